"""The semi-supervised protocol used to measure self-training: a labelled dataset whose
training identities are split into a labelled part and an unlabelled part.

    dataset (train / query / gallery)
        -> labelled.csv   : the training images of `labelled_fraction` of the identities,
                            plus the dataset's query and gallery (the same test split)
        -> unlabelled.csv : the training images of the other identities, `pid` kept only to
                            score the clustering (jobs/pseudo_label.py never clusters on it)
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from reid_platform.data.formats import ReidDataset, Sample


def _write(path: Path, samples: list[Sample]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "pid", "camid", "split", "id"])
        for s in samples:
            writer.writerow([s.path, s.pid, s.camid, s.split, s.item_id])
    return path


def split_labelled(
    dataset: ReidDataset, out_dir: str | Path, labelled_fraction: float = 0.25, seed: int = 0
) -> tuple[Path, Path]:
    """Write `labelled.csv` and `unlabelled.csv` (absolute image paths) into `out_dir`.

    Args:
        dataset: a dataset with train, query and gallery splits (e.g. the synthetic one).
        out_dir: where the two manifests go.
        labelled_fraction: share of the training identities that keep their labels (at
            least 2 identities on each side).
        seed: which identities are labelled.

    Returns:
        (labelled.csv, unlabelled.csv).

    Raises:
        ValueError: fewer than 4 training identities, or a fraction outside (0, 1).
    """
    if not 0.0 < labelled_fraction < 1.0:
        raise ValueError(f"labelled_fraction must be in (0, 1), got {labelled_fraction!r}")
    pids = np.array(sorted({s.pid for s in dataset.train}))
    if len(pids) < 4:
        raise ValueError(f"{dataset.root}: {len(pids)} training identities; need at least 4")
    count = int(np.clip(round(labelled_fraction * len(pids)), 2, len(pids) - 2))
    labelled = set(np.random.default_rng(seed).choice(pids, size=count, replace=False).tolist())
    out_dir = Path(out_dir)
    labelled_csv = _write(
        out_dir / "labelled.csv",
        [s for s in dataset.train if s.pid in labelled] + dataset.query + dataset.gallery,
    )
    unlabelled_csv = _write(
        out_dir / "unlabelled.csv", [s for s in dataset.train if s.pid not in labelled]
    )
    return labelled_csv, unlabelled_csv
