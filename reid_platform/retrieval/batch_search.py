"""Offline batch retrieval: embed many queries (or boxes in them) with Ray Data and rank the
gallery index for each, for competition submissions and nightly re-identification runs.

    queries (dataset query split, CSV manifest, folder; optional boxes CSV)
        --iter_gallery_embeddings (Ray Data actor pool)--> (Q, D) unit vectors
        --ShardedIndex.search_with_metadata--> top-k per query (+ label vote) --> rows

A corrupt query image is skipped and listed, never fatal.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reid_platform.data.formats import DatasetError, Sample, detect_format, load_dataset
from reid_platform.retrieval.gallery import (
    DEFAULT_BATCH_SIZE,
    folder_images,
    iter_gallery_embeddings,
)
from reid_platform.retrieval.index import ShardedIndex

BOX_COLUMNS = ("image", "x", "y", "w", "h")


def query_samples(path: str | Path, fmt: str = "auto") -> list[Sample]:
    """The query images of a dataset path: a Market-1501 tree's or CSV manifest's query split,
    a `train/ query/ gallery/` folder's query split, or every image of any other folder.
    Ids are paths relative to the root (or a manifest's `id` column)."""
    path = Path(path).expanduser().resolve()
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt in ("market1501", "csv"):
        return load_dataset(path, fmt).query
    if (path / "query").is_dir() and (path / "gallery").is_dir():
        return load_dataset(path, "folder").query
    return folder_images(path)


def read_boxes(path: str | Path, root: str | Path) -> list[Sample]:
    """Query boxes from a CSV `image,x,y,w,h[,box_id]` (e.g. a detector's output): one sample
    per box, cropped when read. `image` paths are relative to `root` (or absolute); the id of a
    box is `box_id`, else `<image>#<row>`.

    Raises:
        DatasetError: naming the file and line of a missing column or a bad box.
    """
    path, root = Path(path), Path(root)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in BOX_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}: columns {missing} are missing; expected {BOX_COLUMNS}")
        samples = []
        for line, row in enumerate(reader, start=2):
            try:
                box = tuple(float(row[c]) for c in ("x", "y", "w", "h"))
            except ValueError:
                raise DatasetError(f"{path}:{line}: box x,y,w,h must be numbers") from None
            if not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
                raise DatasetError(f"{path}:{line}: box {box} needs finite x, y and w, h > 0")
            if box[0] < 0 or box[1] < 0:
                raise DatasetError(f"{path}:{line}: box {box} starts outside the image")
            image = Path(row["image"])
            image = image if image.is_absolute() else root / image
            samples.append(
                Sample(
                    str(image),
                    -1,
                    -1,
                    "query",
                    box=tuple(int(round(v)) for v in box),  # type: ignore[arg-type]
                    item_id=row.get("box_id") or f"{row['image']}#{line - 1}",
                )
            )
    if not samples:
        raise DatasetError(f"{path}: no boxes")
    return samples


def label_vote(
    scores: Sequence[float], metadata: Sequence[Mapping[str, Any]], label_key: str
) -> tuple[Any, float]:
    """Score-weighted vote of the hits' `label_key` values (hits without it abstain).

    Args:
        scores: the hits' similarities, best first (negative ones count as 0).
        metadata: the hits' metadata, same order.
        label_key: the metadata key that holds the label (e.g. "class", "pid").

    Returns:
        (label with the largest summed score, its share of the summed scores in [0, 1]);
        (None, 0.0) when no hit carries the key.
    """
    totals: dict[str, tuple[Any, float]] = {}
    for score, meta in zip(scores, metadata):
        if label_key in meta:
            value = meta[label_key]
            key = repr(value)  # labels may be unhashable (lists) or mixed types
            totals[key] = (value, totals.get(key, (value, 0.0))[1] + max(float(score), 0.0))
    if not totals:
        return None, 0.0
    value, best = max(totals.values(), key=lambda t: t[1])
    whole = sum(t[1] for t in totals.values())
    return value, (best / whole if whole > 0 else 0.0)


@dataclass
class QueryResult:
    """The ranked hits of one query (or box)."""

    query_id: str
    path: str
    box: tuple[int, int, int, int] | None
    ids: list[str]
    scores: list[float]
    metadata: list[dict[str, Any]]
    label: Any = None
    label_score: float = 0.0


def search_queries(
    index_dir: str | Path,
    samples: Sequence[Sample],
    checkpoint: str | Path | None = None,
    k: int = 10,
    label_key: str | None = None,
    where: Mapping[str, Any] | None = None,
    exclude: Mapping[str, Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    concurrency: int | None = None,
    num_gpus: float | None = None,
    progress: bool = True,
    skipped: list[str] | None = None,
) -> Iterator[QueryResult]:
    """Embed `samples` with Ray Data and yield each one's top-k in the index, in sample order.

    Args:
        index_dir: a built index (its manifest names the checkpoint unless `checkpoint` does).
        samples: queries (`query_samples`, `read_boxes`); ids must be unique.
        k: hits per query.
        label_key: also vote a label per query from its hits' metadata (`label_vote`).
        where, exclude: metadata filters (see `ShardedIndex.search`).
        batch_size, concurrency, num_gpus, progress: see `iter_gallery_embeddings`.
        skipped: a list that receives "<path>: <why>" for each image that could not be read.
    """
    index = ShardedIndex.open(index_dir)
    try:
        checkpoint = checkpoint or index.extra.get("checkpoint")
        if not checkpoint:
            raise ValueError(f"{index_dir}: its manifest names no checkpoint; pass one")
        # Ray Data keys rows by id: make them unique per sample (boxes of one image).
        keyed = [replace(s, item_id=str(n)) for n, s in enumerate(samples)]
        flip = index.extra.get("tta", "none") == "flip"  # queries embedded as the gallery was
        for batch in iter_gallery_embeddings(
            keyed, checkpoint, batch_size, concurrency, num_gpus, progress, flip=flip
        ):
            if skipped is not None:
                skipped.extend(batch.skipped)
            if not batch.ids:
                continue
            scores, ids, metadata = index.search_with_metadata(batch.vectors, k, where, exclude)
            for row, key in enumerate(batch.ids):
                sample = samples[int(key)]
                hit_scores = [float(s) for s in scores[row, : len(ids[row])]]
                label, share = (
                    label_vote(hit_scores, metadata[row], label_key) if label_key else (None, 0.0)
                )
                yield QueryResult(
                    sample.item_id,
                    sample.path,
                    sample.box,
                    ids[row],
                    hit_scores,
                    metadata[row],
                    label,
                    share,
                )
    finally:
        index.close()


def write_results(results: Iterator[QueryResult], out: str | Path, label_key: str | None) -> int:
    """One CSV row per (query, rank): query_id, query_path, x, y, w, h, rank, id, score[,
    label, label_score]. Returns the number of queries written."""
    header = ["query_id", "query_path", "x", "y", "w", "h", "rank", "id", "score"]
    if label_key:
        header += ["label", "label_score"]
    count = 0
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for result in results:
            box = list(result.box) if result.box is not None else ["", "", "", ""]
            for rank, (item_id, score) in enumerate(zip(result.ids, result.scores), start=1):
                row = [result.query_id, result.path, *box, rank, item_id, f"{score:.6f}"]
                if label_key:
                    row += [result.label, f"{result.label_score:.4f}"]
                writer.writerow(row)
            count += 1
    return count
