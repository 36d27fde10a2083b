"""Embed a gallery with Ray Data and write it into a sharded FAISS index.

    gallery path --gallery_samples--> Samples (item_id, path, pid, camid, meta)
        --ray.data.from_items--> rows (paths) --map_batches(decode_batch, CPU tasks)-->
        images (B, 3, H, W) --map_batches(GalleryEmbedder, actor pool, GPUs when present)-->
        (item_id, embedding (B, D) float32, L2-normalised) --ShardedIndex.add--> shards on disk

The actor pool holds one model per actor (one GPU each when the cluster has GPUs). A corrupt
image is skipped and counted, never fatal. `build_gallery_index` is what `jobs/build_index.py`
runs; re-running it with the same arguments upserts the same ids, so it is safe.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from reid_platform.checkpoint import checkpoint_file, load_model, read_checkpoint
from reid_platform.data.dataset import ImageDecodeError, read_image
from reid_platform.data.formats import (
    FORMATS,
    IMAGE_SUFFIXES,
    DatasetError,
    Sample,
    check_unique_ids,
    detect_format,
    load_dataset,
    load_folder,
)
from reid_platform.data.transforms import build_eval_transform
from reid_platform.retrieval.embedders import (
    AUGMENT_MODES,
    TTA_MODES,
    embed_onnx,
    embed_tensor,
    embed_views,
)
from reid_platform.retrieval.index import ShardedIndex, read_manifest
from reid_platform.runtime import gpus_per_actor, resolve_device

GALLERY_FORMATS = ("auto", *FORMATS)
# Manifest fields that must match for a re-run to add into an existing index.
_REBUILD_KEYS = ("index_type", "num_shards", "metric", "dim")
DEFAULT_BATCH_SIZE = 64  # images per forward pass (jobs/build_index.py --batch-size)
_ADD_CHUNK = 4096  # vectors per ShardedIndex.add call (one SQLite transaction per shard)
_TRAIN_SAMPLE = 65_536  # vectors buffered to train IVF/PQ types (>= 39 * 1024 lists of IVF1024)


class IndexBuildError(ValueError):
    """The index cannot be built as asked (index type vs data, or an existing index built
    with other settings); the message names the option."""


@dataclass
class EmbeddedBatch:
    """One batch out of the actor pool: embeddings of the images that decoded."""

    ids: list[str]
    vectors: np.ndarray  # (B, D) float32, L2-normalised
    skipped: list[str] = field(default_factory=list)  # "<path>: <why>" per corrupt image
    flipped: np.ndarray | None = None  # (B, D): the mirrored images' (augment), else None


# ---- which images -------------------------------------------------------------------------


def gallery_samples(path: str | Path, fmt: str = "auto") -> tuple[list[Sample], str]:
    """The gallery images of a dataset path.

    A benchmark tree (Market-1501, DukeMTMC, MSMT17, CUHK03, VeRi-776, VehicleID) or a CSV
    manifest gives its gallery split; a folder tree with
    `train/ query/ gallery/` its gallery split; any other folder gives every image under it
    (a first-level subfolder names the identity: pid numbers them, `identity` keeps the name;
    loose images get pid -1). Camera -1 means unknown.

    Args:
        path: dataset root, CSV manifest or folder of images.
        fmt: one of GALLERY_FORMATS; "auto" detects it from what is on disk.

    Returns:
        (samples, the format used). Item ids are paths relative to the root unless a manifest
        has an `id` column.

    Raises:
        DatasetError: no images, an unknown format, or two images with the same id.
    """
    path = Path(path).expanduser().resolve()
    if fmt not in GALLERY_FORMATS:
        raise DatasetError(f"gallery format {fmt!r} is not known; choose one of {GALLERY_FORMATS}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt != "folder":
        samples = load_dataset(path, fmt).gallery
    elif (path / "train").is_dir() and (path / "gallery").is_dir():
        samples = load_folder(path).gallery
    else:
        samples = folder_images(path)
    check_unique_ids(samples, str(path), "gallery ids")
    return samples, fmt


def folder_images(root: Path) -> list[Sample]:
    """Every image under `root` (ids: relative paths; a first-level folder names the
    identity: pid numbers them, meta `identity` keeps the name; loose images get pid -1)."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(f"{root}: no images found (suffixes {sorted(IMAGE_SUFFIXES)})")
    rel = [p.relative_to(root) for p in files]
    identities = sorted({r.parts[0] for r in rel if len(r.parts) > 1})
    pid_of = {name: n for n, name in enumerate(identities)}
    samples = []
    for p, r in zip(files, rel):
        identity = r.parts[0] if len(r.parts) > 1 else None
        samples.append(
            Sample(
                str(p),
                pid_of[identity] if identity is not None else -1,
                -1,
                "gallery",
                meta={"identity": identity} if identity is not None else {},
                item_id=r.as_posix(),
            )
        )
    return samples


def sample_metadata(sample: Sample) -> dict[str, Any]:
    """What the index stores with an item: path, pid, camid, box, extra manifest columns."""
    meta: dict[str, Any] = {"path": sample.path, "pid": sample.pid, "camid": sample.camid}
    if sample.box is not None:
        meta["box"] = list(sample.box)
    meta.update(sample.meta)
    return meta


# ---- embedding with Ray Data --------------------------------------------------------------


def decode_batch(batch: dict[str, np.ndarray], height: int, width: int) -> dict[str, np.ndarray]:
    """`map_batches` function (CPU tasks): read, crop and transform a batch of images.

    Returns:
        item_id, image (B, 3, height, width) float32 normalised, error ("" or why the image
        could not be read; its image is zeros).
    """
    transform = build_eval_transform(height, width)
    num_rows = len(batch["item_id"])
    images = np.zeros((num_rows, 3, height, width), dtype=np.float32)
    errors = [""] * num_rows
    for row in range(num_rows):
        box = tuple(int(batch[c][row]) for c in ("box_x", "box_y", "box_w", "box_h"))
        try:
            image = read_image(str(batch["path"][row]), box if box[2] > 0 else None)
        except ImageDecodeError as err:
            errors[row] = str(err)
            continue
        images[row] = transform(image=image)["image"].numpy()
    return {"item_id": batch["item_id"], "image": images, "error": np.array(errors)}


class GalleryEmbedder:
    """`map_batches` callable class (the actor pool): decoded images -> L2-normalised
    embeddings (B, D). One model per actor, on the actor's GPU when it was given one; rows
    with a decode error get a zero vector. `flip`: flip test-time augmentation
    (`embedders.embed_tensor`); `augment`: also the mirrored image's embedding, in column
    "flipped" (`embedders.embed_views`, the same forward pass). `runtime`: "torch", or "onnx"
    (the checkpoint's current ONNX export under ONNX Runtime, with the actor's CPUs as
    threads; `onnx_path` names it)."""

    def __init__(
        self, checkpoint: str, flip: bool = False, runtime: str = "torch", onnx_path: str = "",
        augment: bool = False,
    ):
        self.flip = flip
        self.augment = augment
        self.runtime = runtime
        if runtime == "onnx":
            from reid_platform.retrieval.export import OnnxEmbedder

            self.onnx = OnnxEmbedder(onnx_path)
            self.dim = self.onnx.embedding_dim
            return
        self.device = resolve_device("auto")
        self.model, _ = load_model(checkpoint, self.device)
        self.dim = self.model.embedding_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        vectors = np.zeros((len(ok), self.dim), dtype=np.float32)
        flipped = np.zeros_like(vectors) if self.augment else None
        if ok.any() and self.runtime == "onnx":
            pixels = np.asarray(batch["image"][ok])  # (B, 3, H, W)
            if self.augment:  # both views, one run of 2B
                views = self.onnx(np.concatenate([pixels, pixels[..., ::-1]]))
                vectors[ok], flipped[ok] = views[: len(pixels)], views[len(pixels):]
            else:
                vectors[ok] = embed_onnx(self.onnx, pixels, self.flip)
        elif ok.any():
            images = torch.from_numpy(np.array(batch["image"][ok]))  # (B, 3, H, W), a copy
            images = images.to(self.device)
            if self.augment:
                views = embed_views(self.model, images).cpu().numpy()  # (2, B, D)
                vectors[ok], flipped[ok] = views[0], views[1]
            else:
                vectors[ok] = embed_tensor(self.model, images, self.flip)
        out = {"item_id": batch["item_id"], "embedding": vectors, "error": batch["error"]}
        if flipped is not None:
            out["flipped"] = flipped
        return out


def _input_size(checkpoint: str | Path) -> tuple[int, int]:
    config = read_checkpoint(checkpoint)["config"]["data"]
    return int(config["height"]), int(config["width"])


def default_concurrency(num_gpus: float) -> int:
    """Actors in the pool: one per GPU, else half the CPUs (2..4): each actor also decodes."""
    resources = ray.cluster_resources()
    if num_gpus > 0:
        return max(1, int(resources.get("GPU", 0) / num_gpus))
    return max(1, min(4, int(resources.get("CPU", 1)) // 2))


def iter_gallery_embeddings(
    samples: Sequence[Sample],
    checkpoint: str | Path,
    batch_size: int = DEFAULT_BATCH_SIZE,
    concurrency: int | None = None,
    num_gpus: float | None = None,
    progress: bool = True,
    flip: bool = False,
    augment: bool = False,
    runtime: str = "torch",
    onnx_path: str | Path = "",
) -> Iterator[EmbeddedBatch]:
    """Embed `samples` with a Ray Data actor pool, yielding batches as they finish.

    Args:
        samples: gallery images (`gallery_samples`).
        checkpoint: checkpoint directory or `model.pt`, readable by every actor.
        batch_size: images per forward pass.
        concurrency: actors in the pool; None = `default_concurrency`.
        num_gpus: GPUs per actor; None = 1 when the Ray cluster has GPUs, else 0.
        progress: show a progress bar (images embedded).
        flip: flip test-time augmentation (mean with the mirrored image's embedding).
        augment: also embed each mirrored image on its own (`EmbeddedBatch.flipped`).
        runtime: "torch" or "onnx" (then `onnx_path`: a current export of the checkpoint,
            `export.ensure_onnx`).

    Yields:
        EmbeddedBatch per block, in sample order.
    """
    if not samples:
        return
    num_gpus = gpus_per_actor(num_gpus)
    if concurrency is None:
        concurrency = default_concurrency(num_gpus)
    rows = []
    for s in samples:
        x, y, w, h = s.box if s.box is not None else (0, 0, 0, 0)
        rows.append(
            {"item_id": s.item_id, "path": s.path, "box_x": x, "box_y": y, "box_w": w, "box_h": h}
        )
    height, width = _input_size(checkpoint)
    ds = ray.data.from_items(rows)
    ds.context.execution_options.preserve_order = True  # the same order on every run
    ds.context.enable_progress_bars = False  # one bar below, not one per operator
    # Decoding runs in CPU tasks and the model in the actor pool, so GPU actors do not wait
    # on JPEG decoding (without GPUs, Ray Data fuses the two steps into the actors).
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"height": height, "width": width},
        batch_size=batch_size,
        num_cpus=1,
        batch_format="numpy",
    )
    ds = ds.map_batches(
        GalleryEmbedder,
        fn_constructor_kwargs={
            "checkpoint": str(checkpoint_file(checkpoint)),
            "flip": flip,
            "augment": augment,
            "runtime": runtime,
            "onnx_path": str(onnx_path),
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=1,
        num_gpus=num_gpus,
        batch_format="numpy",
    )
    with tqdm(total=len(rows), desc="embedding gallery", unit="img", disable=not progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            errors = batch["error"]
            ok = errors == ""
            bar.update(len(errors))
            yield EmbeddedBatch(
                ids=[str(i) for i in batch["item_id"][ok]],
                vectors=np.ascontiguousarray(batch["embedding"][ok], dtype=np.float32),
                skipped=[str(e) for e in errors[~ok]],
                flipped=(
                    np.ascontiguousarray(batch["flipped"][ok], dtype=np.float32)
                    if augment
                    else None
                ),
            )


# ---- writing the index --------------------------------------------------------------------


def build_gallery_index(
    checkpoint: str | Path,
    gallery: str | Path,
    out: str | Path,
    num_shards: int = 1,
    index_type: str = "Flat",
    fmt: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    concurrency: int | None = None,
    num_gpus: float | None = None,
    progress: bool = True,
    tta: str = "none",
    augment: str = "none",
    runtime: str = "torch",
) -> dict[str, Any]:
    """Embed a gallery and write (or top up) a sharded index at `out`.

    A new `out` gets a fresh index. An existing one is opened and every gallery item upserted
    (same ids, same vectors), so re-running with the same arguments leaves the same index, and
    items added later through the service stay; its shards, index type, metric, dimension
    and checkpoint must match.

    Args:
        checkpoint: model checkpoint (directory or model.pt).
        gallery: dataset path (see `gallery_samples`).
        out: index directory.
        num_shards: shards (>= 1).
        index_type: "Flat" or a FAISS factory string ("IVF1024,PQ32", "HNSW32", ...).
        fmt: gallery format, or "auto".
        batch_size, concurrency, num_gpus, progress: see `iter_gallery_embeddings`.
        tta: "none" or "flip" (each item's embedding averaged with its mirror image's);
            recorded in the manifest, so the service and jobs/search.py embed queries alike.
        augment: "none" or "flip": also index each item's mirror image as a second view
            (searches still return each item once, with its best view); recorded in the
            manifest, so the service's gallery writes add both views too.

    Returns:
        Summary: out, count, counts per shard, skipped, dim, index_type, format, tta,
        augment.
        runtime: "torch", or "onnx": the checkpoint's ONNX export under ONNX Runtime,
            exported beside the checkpoint first when there is no current one (its parity
            check on the checkpoint's query images, or on the gallery when they are gone).

    Returns:
        Summary: out, count, counts per shard, skipped, dim, index_type, format, tta, runtime.

    Raises:
        DatasetError: unusable gallery. IndexBuildError: an index type the data cannot train,
        or an existing index built with other settings. CheckpointError: bad checkpoint.
    """
    # here, not at module level: the embedding workers import this module, not MLflow
    from reid_platform.lineage import model_record

    if tta not in TTA_MODES:
        raise IndexBuildError(f"--tta {tta!r}: choose one of {TTA_MODES}")
    if augment not in AUGMENT_MODES:
        raise IndexBuildError(f"--augment {augment!r}: choose one of {AUGMENT_MODES}")
    if augment == "flip" and tta == "flip":
        raise IndexBuildError(
            "--augment flip with --tta flip would index the same vector twice (a flip-averaged "
            "embedding is its mirror's too); choose one"
        )
    if runtime not in ("torch", "onnx"):
        raise IndexBuildError(f"--runtime {runtime!r}: choose one of ('torch', 'onnx')")
    out = Path(out).expanduser().resolve()
    ckpt = checkpoint_file(checkpoint).parent.resolve()
    model, config = load_model(ckpt)  # on the driver only for its dimension and settings
    dim = int(model.embedding_dim)
    del model
    samples, fmt = gallery_samples(gallery, fmt)
    onnx_path = ""
    if runtime == "onnx":  # exported once here, not in every actor
        from reid_platform.retrieval.export import ExportError, ensure_onnx

        try:
            onnx_path = str(ensure_onnx(ckpt, fallback_parity_data=gallery))
        except ExportError as err:
            raise IndexBuildError(f"--runtime onnx: {err}") from None
    extra = {
        "checkpoint": str(ckpt),
        "gallery": str(Path(gallery).expanduser().resolve()),
        "format": fmt,
        "model": {
            "backbone": config.model.backbone,
            "height": config.data.height,
            "width": config.data.width,
        },
        "normalized": True,
        "tta": tta,
        "augment": augment,
        **model_record(ckpt),  # the registered version and run behind it (jobs/lineage.py)
        "runtime": runtime,
    }
    index = _open_or_create(out, dim, num_shards, index_type, extra)
    by_id = {s.item_id: s for s in samples}
    pending_ids: list[str] = []
    pending: list[np.ndarray] = []
    pending_flipped: list[np.ndarray] = []
    skipped: list[str] = []

    def flush() -> None:
        if not pending_ids:
            return
        vectors = np.concatenate(pending)
        flipped = np.concatenate(pending_flipped) if pending_flipped else None
        if not index.is_trained:
            _train(index, vectors if flipped is None else np.concatenate([vectors, flipped]))
        for start in range(0, len(pending_ids), _ADD_CHUNK):
            ids = pending_ids[start : start + _ADD_CHUNK]
            chunk = slice(start, start + _ADD_CHUNK)
            index.add(
                ids,
                vectors[chunk],
                [sample_metadata(by_id[i]) for i in ids],
                views=None if flipped is None else {"flip": flipped[chunk]},
            )
        pending_ids.clear()
        pending.clear()
        pending_flipped.clear()

    try:
        for batch in iter_gallery_embeddings(
            samples,
            ckpt,
            batch_size,
            concurrency,
            num_gpus,
            progress,
            flip=tta == "flip",
            augment=augment == "flip",
            runtime=runtime,
            onnx_path=onnx_path,
        ):
            pending_ids.extend(batch.ids)
            pending.append(batch.vectors)
            if batch.flipped is not None:
                pending_flipped.append(batch.flipped)
            skipped.extend(batch.skipped)
            # An untrained IVF/PQ index waits for a training sample; others add as they go.
            if len(pending_ids) >= (_ADD_CHUNK if index.is_trained else _TRAIN_SAMPLE):
                flush()
        flush()
        if index.count == 0:
            raise DatasetError(f"{gallery}: none of the {len(samples)} images could be decoded")
        index.manifest["extra"]["skipped"] = len(skipped)
        index.save()  # FAISS snapshots + manifest counts
        summary = {
            "out": str(out),
            "count": index.count,
            "counts": list(index.manifest["counts"]),
            "skipped": len(skipped),
            "dim": dim,
            "index_type": index.index_type,
            "format": fmt,
            "tta": tta,
            "augment": augment,
            "runtime": runtime,
        }
    finally:
        index.close()
    for line in skipped[:20]:
        print(f"skipped {line}")
    return summary


def _train(index: ShardedIndex, vectors: np.ndarray) -> None:
    try:
        index.train(vectors)
    except ValueError as err:
        raise IndexBuildError(f"--index-type {index.index_type!r}: {err}") from None


def _open_or_create(
    out: Path, dim: int, num_shards: int, index_type: str, extra: dict[str, Any]
) -> ShardedIndex:
    try:
        manifest = read_manifest(out)
    except FileNotFoundError:
        try:
            return ShardedIndex.create(out, dim, num_shards, index_type, "ip", extra=extra)
        except ValueError as err:
            raise IndexBuildError(f"--index-type {index_type!r}: {err}") from None
    wanted = {"index_type": index_type, "num_shards": num_shards, "metric": "ip", "dim": dim}
    differ = [
        f"{k} {manifest.get(k)!r} (asked {wanted[k]!r})"
        for k in _REBUILD_KEYS
        if manifest.get(k) != wanted[k]
    ]
    old_ckpt = manifest.get("extra", {}).get("checkpoint")
    if old_ckpt != extra["checkpoint"]:
        differ.append(f"checkpoint {old_ckpt!r} (asked {extra['checkpoint']!r})")
    old_tta = manifest.get("extra", {}).get("tta", "none")
    if old_tta != extra["tta"]:
        differ.append(f"tta {old_tta!r} (asked {extra['tta']!r})")
    old_augment = manifest.get("extra", {}).get("augment", "none")
    if old_augment != extra["augment"]:
        differ.append(f"augment {old_augment!r} (asked {extra['augment']!r})")
    if differ:
        raise IndexBuildError(
            f"{out} holds an index built with other settings: {'; '.join(differ)}. "
            "Choose another --out, or delete it to rebuild."
        )
    index = ShardedIndex.open(out)
    index.manifest["extra"].update(extra)
    return index
