"""Pseudo-label a set of unlabelled images with a model: what `jobs/pseudo_label.py` runs.

    images (folder / CSV / Market-1501 tree) --unlabelled_samples--> Samples
        --embed_samples (Ray Data actor pool, as the gallery build)--> features (N, D)
        --clustering.cluster_features--> labels (-1 = outlier)
        --write_outputs--> pseudo_labels.csv, report.json, pictures

`pseudo_labels.csv` is a CSV manifest the platform trains on (`data.extra_train`): columns
`path,pid,camid,split,id` (+ `x,y,w,h` when the input had boxes, + `true_pid` when it had
labels; extra columns are metadata), `split=train`, absolute paths, pseudo pids 0..C-1 (0 the
largest cluster); outliers are left out and counted in the report.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reid_platform.data.formats import (
    IMAGE_SUFFIXES,
    MARKET_DIRS,
    DatasetError,
    Sample,
    check_unique_ids,
    parse_box,
    parse_market_name,
)
from reid_platform.pseudo import pictures
from reid_platform.pseudo.clustering import Clustering, cluster_features, score_clustering

CSV_NAME, REPORT_NAME = "pseudo_labels.csv", "report.json"
PICTURES = {
    "sizes": "cluster_sizes.png",
    "samples": "cluster_samples.png",
    "truth": "clustering_vs_truth.png",
}
OUTPUT_NAMES = (CSV_NAME, REPORT_NAME, *PICTURES.values())


# ---- which images -------------------------------------------------------------------------


def unlabelled_samples(path: str | Path) -> tuple[list[Sample], str]:
    """The images of an unlabelled set, with their true pids when the input has them.

    - a `.csv` manifest: column `path` (relative to the CSV) and optionally `pid`, `camid`,
      `split` (then only `split=train` rows), `x,y,w,h` boxes, `id`; pid is kept only for
      scoring (-1 where absent);
    - a Market-1501 tree (a `bounding_box_train/` folder, or one level down): its training
      images, pids and cameras from the file names;
    - any other folder: every image under it at any depth, without labels.

    Returns:
        (samples with split "train", item ids = paths relative to the root unless the CSV has
        `id`; the kind read: "csv", "market1501" or "folder").

    Raises:
        DatasetError: a missing path, no images, a malformed manifest row, or duplicate ids.
    """
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise DatasetError(f"--images {path}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(
                f"--images {path}: a file must be a .csv manifest; give a folder of images "
                "or a Market-1501 tree otherwise"
            )
        samples, kind = _csv_samples(path), "csv"
    elif (train_dir := _market_train_dir(path)) is not None:
        samples, kind = _market_samples(train_dir), "market1501"
    else:
        samples, kind = _folder_samples(path), "folder"
    check_unique_ids(samples, f"--images {path}")
    return samples, kind


def _market_train_dir(root: Path) -> Path | None:
    folder = MARKET_DIRS["train"]
    if (root / folder).is_dir():
        return root / folder
    inner = [p / folder for p in _listdir(root) if (p / folder).is_dir()]
    return inner[0] if len(inner) == 1 else None


def _listdir(root: Path) -> list[Path]:
    try:
        return sorted(root.iterdir())
    except PermissionError:
        raise DatasetError(f"--images {root}: cannot read the folder (permission denied)") from None


def _image_files(root: Path) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(root, onerror=_raise_unreadable):
        dirs.sort()
        files.extend(Path(folder) / n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES)
    files.sort()
    if not files:
        raise DatasetError(
            f"--images {root}: no images found at any depth (suffixes {sorted(IMAGE_SUFFIXES)})"
        )
    return files


def _raise_unreadable(err: OSError) -> None:
    raise DatasetError(f"--images {err.filename}: cannot read the folder ({err.strerror})")


def _folder_samples(root: Path) -> list[Sample]:
    # Sub-folders are only how the images are organised (cameras, days, ...): no labels.
    return [
        Sample(str(p), -1, -1, "train", item_id=p.relative_to(root).as_posix())
        for p in _image_files(root)
    ]


def _market_samples(train_dir: Path) -> list[Sample]:
    samples = []
    for p in _image_files(train_dir):
        pid, camid = parse_market_name(p)
        samples.append(
            Sample(str(p), pid if pid > 0 else -1, camid, "train",
                   item_id=p.relative_to(train_dir.parent).as_posix())
        )
    return samples


def _int_field(row: dict[str, str], key: str, where: str, default: int) -> int:
    raw = (row.get(key) or "").strip()
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DatasetError(f"{where}: {key} {raw!r} must be an integer") from None


def _csv_samples(manifest: Path) -> list[Sample]:
    base = manifest.parent
    samples = []
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if "path" not in header:
            raise DatasetError(
                f"{manifest}: header lacks the path column; expected path[,pid,camid,split]"
                f"[,x,y,w,h][,id], got {','.join(header) or 'nothing'}"
            )
        box_cols = [c in header for c in ("x", "y", "w", "h")]
        if any(box_cols) and not all(box_cols):
            raise DatasetError(f"{manifest}: box columns must be all of x,y,w,h or none")
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            where = f"{manifest}:{line}"
            if "split" in header and row["split"] != "train":
                continue
            if not row["path"]:
                raise DatasetError(f"{where}: path is empty")
            box = parse_box(row, where) if all(box_cols) else None
            samples.append(
                Sample(
                    str(base / row["path"]),
                    _int_field(row, "pid", where, -1),
                    _int_field(row, "camid", where, -1),
                    "train",
                    box=box,
                    item_id=row.get("id") or row["path"],
                )
            )
    if not samples:
        raise DatasetError(
            f"{manifest}: no image rows"
            + (" with split=train" if "split" in header else "")
        )
    return samples


# ---- embedding ----------------------------------------------------------------------------


@dataclass
class Embedded:
    """Embeddings of the images that decoded, in input order."""

    samples: list[Sample]
    features: np.ndarray  # (N, D) float32, L2-normalised
    skipped: list[str] = field(default_factory=list)  # "<path>: <why>" per corrupt image


def embed_samples(
    samples: list[Sample],
    checkpoint: str | Path,
    batch_size: int = 64,
    concurrency: int | None = None,
    num_gpus: float | None = None,
    progress: bool = True,
) -> Embedded:
    """Embed with the gallery build's Ray Data actor pool (GPUs when present); Ray must run.

    Raises:
        DatasetError: none of the images could be decoded.
    """
    from reid_platform.retrieval.gallery import iter_gallery_embeddings

    by_id = {s.item_id: s for s in samples}
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    skipped: list[str] = []
    for batch in iter_gallery_embeddings(
        samples, checkpoint, batch_size, concurrency, num_gpus, progress
    ):
        ids.extend(batch.ids)
        vectors.append(batch.vectors)
        skipped.extend(batch.skipped)
    if not ids:
        example = f" (e.g. {skipped[0]})" if skipped else ""
        raise DatasetError(f"none of the {len(samples)} images could be decoded{example}")
    return Embedded([by_id[i] for i in ids], np.concatenate(vectors), skipped)


# ---- outputs ------------------------------------------------------------------------------


def check_out_dir(out: str | Path, images: str | Path | None = None) -> Path:
    """The output folder, refusing one that would overwrite a previous result or mix the
    outputs into the input images.

    Raises:
        DatasetError: the folder holds outputs already, or lies inside the image folder.
    """
    out = Path(out).expanduser().resolve()
    if images is not None:
        images = Path(images).expanduser().resolve()
        if images.is_dir() and (out == images or images in out.parents):
            raise DatasetError(
                f"--out {out} lies inside the image folder {images}: the outputs would be read "
                "as images next time; choose another --out"
            )
        if images.is_file() and out / CSV_NAME == images:
            raise DatasetError(f"--out {out} would overwrite the input manifest {images}")
    if out.is_file():
        raise DatasetError(f"--out {out} is a file; give a folder")
    existing = [n for n in OUTPUT_NAMES if (out / n).exists()]
    if existing:
        raise DatasetError(
            f"--out {out} already holds {', '.join(existing)}: nothing is overwritten; choose "
            "another --out or move them away"
        )
    return out


def write_pseudo_csv(samples: list[Sample], labels: np.ndarray, path: str | Path) -> int:
    """Write the clustered samples as a training manifest; returns the rows written."""
    labels = np.asarray(labels)
    has_box = any(s.box is not None for s in samples)
    has_truth = any(s.pid >= 0 for s in samples)
    columns = ["path", "pid", "camid", "split", "id"]
    columns += ["x", "y", "w", "h"] * has_box + ["true_pid"] * has_truth
    order = np.lexsort((np.arange(len(labels)), labels))  # by pseudo id, then input order
    rows = 0
    path = Path(path)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for i in order:
            if labels[i] < 0:
                continue
            s = samples[i]
            row = [s.path, int(labels[i]), s.camid if s.camid >= 0 else "", "train", s.item_id]
            if has_box:
                row += list(s.box) if s.box is not None else ["", "", "", ""]
            if has_truth:
                row.append(s.pid)
            writer.writerow(row)
            rows += 1
    os.replace(tmp, path)  # a reader never sees half a manifest
    return rows


def _picture_members(samples: list[Sample], labels: np.ndarray, max_rows: int = 12,
                     per_row: int = 10) -> tuple[list[list[Sample]], list[list[int]], list[int]]:
    """Clusters drawn: the largest, a median-sized and the smallest ones, `per_row` each."""
    num_clusters = int(labels.max()) + 1 if (labels >= 0).any() else 0
    if num_clusters <= max_rows:
        chosen = list(range(num_clusters))
    else:  # ids are ordered by size: spread the rows over the whole range
        chosen = sorted(set(np.linspace(0, num_clusters - 1, max_rows).round().astype(int)))
    members, pids = [], []
    for c in chosen:
        idx = np.nonzero(labels == c)[0][:per_row]
        members.append([samples[i] for i in idx])
        pids.append([samples[i].pid for i in idx])
    return members, pids, chosen


def write_outputs(
    out: Path,
    embedded: Embedded,
    clustering: Clustering,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """pseudo_labels.csv, report.json and the pictures in `out`; returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    samples, labels = embedded.samples, clustering.labels
    rows = write_pseudo_csv(samples, labels, out / CSV_NAME)
    sizes = clustering.sizes
    true = np.array([s.pid for s in samples])
    scores = score_clustering(labels, true)
    report: dict[str, Any] = {
        "num_images": len(samples),
        "num_clusters": clustering.num_clusters,
        "num_outliers": clustering.num_outliers,
        "method": clustering.method,
        **clustering.params,
        **scores,
        "num_rows": rows,
        "num_skipped": len(embedded.skipped),
        "skipped": embedded.skipped[:20],
        "largest_cluster": int(sizes.max()) if len(sizes) else 0,
        "median_cluster": float(np.median(sizes)) if len(sizes) else 0.0,
        "largest_cluster_fraction": float(sizes.max() / len(samples)) if len(sizes) else 0.0,
        **extra,
        "csv": str(out / CSV_NAME),
    }
    title = f"{clustering.method} on {report.get('distance', 'cosine')}"
    pics = {"sizes": pictures.plot_cluster_sizes(sizes, clustering.num_outliers,
                                                 out / PICTURES["sizes"], title)}
    members, pids, chosen = _picture_members(samples, labels)
    pics["samples"] = pictures.plot_cluster_samples(
        members, out / PICTURES["samples"], pids if scores else None,
        row_labels=[f"id {c}\n{sizes[c]} img" for c in chosen],
        title=f"{title}: clusters {chosen[0] if chosen else '-'}..{chosen[-1] if chosen else '-'}"
              " (0 = largest)",
    )
    if scores:
        pics["truth"] = pictures.plot_truth_comparison(
            scores, clustering.num_clusters, scores["num_true_ids"], out / PICTURES["truth"], title
        )
    report["pictures"] = {k: str(v) for k, v in pics.items()}
    tmp = out / (REPORT_NAME + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False))
    os.replace(tmp, out / REPORT_NAME)
    return report


# ---- the whole job ------------------------------------------------------------------------


@dataclass
class PseudoLabelResult:
    csv: Path
    report: dict[str, Any]
    clustering: Clustering
    embedded: Embedded


def pseudo_label(
    checkpoint: str | Path,
    images: str | Path,
    out: str | Path,
    method: str = "dbscan",
    distance: str = "jaccard",
    batch_size: int = 64,
    concurrency: int | None = None,
    num_gpus: float | None = None,
    progress: bool = True,
    **cluster_options: Any,
) -> PseudoLabelResult:
    """Embed `images` with `checkpoint`, cluster, write the outputs into `out`.

    Args:
        checkpoint: model checkpoint (directory or model.pt).
        images: see `unlabelled_samples`.
        out: output folder (must not hold outputs already).
        method, distance, **cluster_options: see `clustering.cluster_features`.
        batch_size, concurrency, num_gpus, progress: see `embed_samples`; Ray is started
            (`init_ray`) if it is not running.

    Raises:
        DatasetError: unusable images or output folder. ClusteringError: an unusable
        clustering (fewer than 2 pseudo-identities) or setting. CheckpointError: bad checkpoint.
    """
    from reid_platform.checkpoint import checkpoint_file, read_checkpoint
    from reid_platform.runtime import init_ray

    out = check_out_dir(out, images)
    ckpt = checkpoint_file(checkpoint)
    read_checkpoint(ckpt)  # a damaged or foreign file fails here, not in every actor
    samples, kind = unlabelled_samples(images)
    init_ray()  # after the input checks: bad input never waits for Ray to start
    started = time.perf_counter()
    try:
        embedded = embed_samples(samples, ckpt, batch_size, concurrency, num_gpus, progress)
    except DatasetError as err:
        raise DatasetError(f"--images {images}: {err}") from None
    embed_s = time.perf_counter() - started
    started = time.perf_counter()
    clustering = cluster_features(embedded.features, method, distance, **cluster_options)
    cluster_s = time.perf_counter() - started
    report = write_outputs(out, embedded, clustering, {
        "images": str(Path(images).expanduser().resolve()),
        "input_format": kind,
        "checkpoint": str(ckpt.parent),
        "embedding_dim": int(embedded.features.shape[1]),
        "embed_s": round(embed_s, 3),
        "cluster_s": round(cluster_s, 3),
    })
    return PseudoLabelResult(out / CSV_NAME, report, clustering, embedded)
