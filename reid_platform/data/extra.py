"""More training sources: `data.extra_train` merged into a dataset's training split.

Each source is a CSV manifest (its `split=train` rows, e.g. the `pseudo_labels.csv` written by
`jobs/pseudo_label.py`), a folder holding one, or a Market-1501 tree (its training split).
The identities of every source are moved past all identities already in the training split, so
pseudo id 3 never merges with labelled id 3; `balance` then relabels the union 0..N-1 as usual.
Query and gallery stay those of the main dataset. A source's rows may point anywhere (a
`pseudo_labels.csv` lists the absolute paths of the unlabelled images it clustered):
`data.allow_outside_root` guards the main dataset's manifest, which may come with the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from reid_platform.data.formats import (
    DatasetError,
    ReidDataset,
    Sample,
    detect_format,
    load_csv,
    load_market1501,
)


def read_train_source(path: str | Path) -> list[Sample]:
    """The training samples of one extra source.

    Args:
        path: a CSV manifest (only its train rows are read; query/gallery rows may be absent),
            a folder holding one, or a Market-1501 tree.

    Raises:
        DatasetError: the source is missing, malformed or has no training rows.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"data.extra_train: {path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(
                f"data.extra_train: {path} is a file but not a .csv manifest "
                "(expected path,pid,camid,split rows, e.g. a pseudo_labels.csv)"
            )
        return load_csv(path, need_test=False, allow_outside_root=True).train
    fmt = detect_format(path)
    if fmt == "csv":
        return load_csv(path, need_test=False, allow_outside_root=True).train
    if fmt == "market1501":
        return load_market1501(path).train
    raise DatasetError(
        f"data.extra_train: {path} is neither a CSV manifest, a folder with one, nor a "
        "Market-1501 tree; list its images in a manifest (path,pid,camid,split=train)"
    )


def merge_extra_train(dataset: ReidDataset, sources: Sequence[str | Path]) -> ReidDataset:
    """`dataset` with the training samples of `sources` appended, their ids kept apart.

    Source k's identities become `offset_k + rank` (rank = position of its pid among the
    source's sorted pids), where `offset_k` lies past every pid of the training split and of
    the sources before it; so no two sources, and no source and the labelled data, share an id.

    Args:
        dataset: the main dataset (its train pids as read, before `balance`).
        sources: paths for `read_train_source`.

    Returns:
        A new ReidDataset; every added sample has `meta["train_source"]` = its source path.
    """
    if not sources:
        return dataset
    train = list(dataset.train)
    offset = max((s.pid for s in train), default=-1) + 1
    for source in sources:
        samples = read_train_source(source)
        rank = {pid: n for n, pid in enumerate(sorted({s.pid for s in samples}))}
        train.extend(
            replace(s, pid=offset + rank[s.pid], meta={**s.meta, "train_source": str(source)})
            for s in samples
        )
        offset += len(rank)
    return replace(dataset, train=train)
