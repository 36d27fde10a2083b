"""Evaluate checkpoints end to end: embed once, score every variant, draw, report.

The variants (raw, each post-processing step, the chain of them, ensembles) are planned from
the step table of `variants.py`. Every variant is scored from consecutive blocks of query rows
(`variant_blocks` -> `evaluate_blocks`): no (num_query, num_gallery) matrix is held at any
gallery size, and only the rows the ranked-list picture draws are kept. `run_evaluation`
says so when the matrix would have been large (`LARGE_MATRIX_BYTES`).

Queries that cannot be scored (identity absent from the gallery, or only seen by the query's
own camera) are skipped and counted in the report; no valid query at all is an
`EvaluationError` that says which of the two it was. MLflow logging lives in
`reid_platform.tracking` (`log_evaluation`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reid_platform.checkpoint import load_model, read_checkpoint
from reid_platform.config import Config, ConfigError
from reid_platform.data.formats import ReidDataset, Sample
from reid_platform.data.root import load_config_dataset, resolve_data_root
from reid_platform.evaluation.embed import activation_maps, extract_features
from reid_platform.evaluation.metrics import (
    DISTANCE_TILE,
    EvaluationError,
    RankResult,
    auto_block_size,
    evaluate_blocks,
)
from reid_platform.evaluation.pictures import (
    pick_queries,
    plot_activation_maps,
    plot_cmc,
    plot_embedding_scatter,
    plot_ranked_lists,
)
from reid_platform.evaluation.variants import (
    DataSizes,
    EvalOptions,
    Steps,
    normalised_weights,
    plan_variants,
    variant_blocks,
)
from reid_platform.runtime import amp_enabled, resolve_device

METRIC_NAMES = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP", "score")
PCA_FIT_MAX_IMAGES = 20000  # training images embedded to fit PCA (an even spread of the split)
REPORT_FILE = "report.json"
PICTURES = {"cmc": "cmc.png", "ranked_lists": "ranked_lists.png", "embedding": "embedding.png"}
ACTIVATION_MAPS_FILE = "activation_maps.png"
RANKED_LIST_QUERIES = 8
# A full distance matrix above this size is worth saying that it is not built.
LARGE_MATRIX_BYTES = 2**30


# ---- inputs -------------------------------------------------------------------------------


@dataclass
class ModelEmbeddings:
    """Query and gallery embeddings of one model (rows aligned with `EvalLabels`)."""

    name: str
    query: np.ndarray  # (N, D) float32, L2-normalised
    gallery: np.ndarray  # (M, D) float32, L2-normalised
    weight: float = 1.0  # its share in an ensemble (weights are normalised to sum 1)
    checkpoint: str = ""
    epoch: int | None = None
    embed_seconds: float = 0.0
    pca_fit: np.ndarray | None = None  # (T, D) features PCA is fitted on, if not the gallery


@dataclass
class EvalLabels:
    """Identities, cameras and (for pictures) image files of the query and gallery rows."""

    q_pids: np.ndarray  # (N,)
    q_camids: np.ndarray  # (N,)
    g_pids: np.ndarray  # (M,)
    g_camids: np.ndarray  # (M,)
    query_paths: list[str] = field(default_factory=list)
    gallery_paths: list[str] = field(default_factory=list)
    query_boxes: list[tuple[int, int, int, int] | None] | None = None
    gallery_boxes: list[tuple[int, int, int, int] | None] | None = None

    @classmethod
    def from_samples(cls, query: Sequence[Sample], gallery: Sequence[Sample]) -> EvalLabels:
        return cls(
            q_pids=np.array([s.pid for s in query], dtype=np.int64),
            q_camids=np.array([s.camid for s in query], dtype=np.int64),
            g_pids=np.array([s.pid for s in gallery], dtype=np.int64),
            g_camids=np.array([s.camid for s in gallery], dtype=np.int64),
            query_paths=[s.path for s in query],
            gallery_paths=[s.path for s in gallery],
            query_boxes=[s.box for s in query],
            gallery_boxes=[s.box for s in gallery],
        )


@dataclass
class QueryStats:
    """How many queries can be scored under the Market-1501 protocol, and why not the rest."""

    total: int
    valid: int
    absent_from_gallery: int  # identity not in the gallery at all (or query pid -1)
    same_camera_only: int  # identity in the gallery, but only seen by the query's camera

    @property
    def skipped(self) -> int:
        return self.absent_from_gallery + self.same_camera_only

    def as_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "valid": self.valid,
            "skipped": self.skipped,
            "skipped_absent_from_gallery": self.absent_from_gallery,
            "skipped_same_camera_only": self.same_camera_only,
        }


def count_valid_queries(labels: EvalLabels) -> QueryStats:
    """Which queries have a true match left after removing junk (labels only, no distances).

    Raises:
        EvaluationError: no query is valid; the message says why.
    """
    cameras_of: dict[int, set[int]] = {}
    for pid, camid in zip(labels.g_pids.tolist(), labels.g_camids.tolist()):
        if pid != -1:
            cameras_of.setdefault(pid, set()).add(camid)
    absent = same_camera = 0
    for pid, camid in zip(labels.q_pids.tolist(), labels.q_camids.tolist()):
        cams = cameras_of.get(pid) if pid != -1 else None
        if not cams:
            absent += 1
        elif cams == {camid}:
            same_camera += 1
    total = len(labels.q_pids)
    stats = QueryStats(total, total - absent - same_camera, absent, same_camera)
    if stats.valid == 0:
        raise EvaluationError(
            f"no valid query: of {total} queries, {absent} have an identity absent from the "
            f"gallery ({len(cameras_of)} gallery identities) and {same_camera} are matched only "
            "by gallery images from their own camera, which the Market-1501 protocol ignores; "
            "check that query and gallery share identities (and that data without real cameras "
            "gives query and gallery distinct camids)"
        )
    return stats


def _check_shapes(models: Sequence[ModelEmbeddings], labels: EvalLabels) -> None:
    num_query, num_gallery = len(labels.q_pids), len(labels.g_pids)
    if labels.q_camids.shape != labels.q_pids.shape:
        raise EvaluationError(
            f"q_pids has shape {labels.q_pids.shape} but q_camids has shape {labels.q_camids.shape}"
        )
    if labels.g_camids.shape != labels.g_pids.shape:
        raise EvaluationError(
            f"g_pids has shape {labels.g_pids.shape} but g_camids has shape {labels.g_camids.shape}"
        )
    for model in models:
        q, g = np.asarray(model.query), np.asarray(model.gallery)
        if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
            raise EvaluationError(
                f"model {model.name!r}: query features have shape {q.shape} and gallery features "
                f"{g.shape}; expected (num_query, D) and (num_gallery, D)"
            )
        if len(q) != num_query or len(g) != num_gallery:
            raise EvaluationError(
                f"model {model.name!r}: features have shapes {q.shape} (query) and {g.shape} "
                f"(gallery) but the labels have shapes {labels.q_pids.shape} (query) and "
                f"{labels.g_pids.shape} (gallery)"
            )


# ---- evaluation ---------------------------------------------------------------------------


@dataclass
class VariantResult:
    """Metrics of one variant and the time its distances and ranking took."""

    name: str
    result: RankResult
    seconds: float

    def metrics(self) -> dict[str, float]:
        return self.result.as_metrics()


@dataclass
class Evaluation:
    """Every variant's result, and the rows of the best variant the ranked lists draw."""

    results: list[VariantResult]
    queries: QueryStats
    best: str
    best_steps: Steps
    picture_queries: np.ndarray  # (R,) query rows kept for the ranked lists
    best_rows: np.ndarray  # (R, num_gallery) the best variant's distances of those queries


def evaluate_variants(
    models: Sequence[ModelEmbeddings],
    labels: EvalLabels,
    options: EvalOptions,
    picture_queries: Sequence[int] = (),
    block_size: int | None = None,
) -> Evaluation:
    """Score every planned variant under the Market-1501 protocol, block by block.

    Args:
        models: embeddings of one or more models, rows aligned with `labels`.
        labels: query and gallery pids and camids.
        options: distance and post-processing.
        picture_queries: query rows whose distances are kept (best variant) for the pictures.
        block_size: query rows per block (None: ~64 MiB blocks).

    Raises:
        EvaluationError: mismatched shapes (both named), options that do not fit the data, or
            no valid query (with the reason).
    """
    if not models:
        raise EvaluationError("no model to evaluate")
    _check_shapes(models, labels)
    stats = count_valid_queries(labels)
    fits = [len(m.pca_fit) for m in models if m.pca_fit is not None]
    sizes = DataSizes(
        num_query=len(labels.q_pids),
        num_gallery=len(labels.g_pids),
        dim=min(m.query.shape[1] for m in models),
        num_fit=min(fits) if fits else None,
        num_models=len(models),
    )
    options.validate(sizes)
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise EvaluationError(f"model names must be unique, got {names}")
    try:
        normalised_weights([m.weight for m in models])
    except EvaluationError:
        raise EvaluationError(
            f"ensemble weights must be finite, >= 0 and not all 0: {[m.weight for m in models]}"
        ) from None
    rows = np.asarray(picture_queries, dtype=np.int64)
    label_args = (labels.q_pids, labels.g_pids, labels.q_camids, labels.g_camids)
    results: list[VariantResult] = []
    best, best_score, best_steps = "", -np.inf, Steps()
    best_rows = np.empty((0, len(labels.g_pids)), dtype=np.float32)
    for variant in plan_variants(names, options):
        start = time.perf_counter()
        kept: dict[int, np.ndarray] = {}
        blocks = _keeping_rows(variant_blocks(variant, models, options, block_size), rows, kept)
        result = evaluate_blocks(blocks, *label_args)
        results.append(VariantResult(variant.name, result, time.perf_counter() - start))
        score = result.as_metrics()["score"]
        if score > best_score:
            best, best_score, best_steps = variant.name, score, variant.steps
            best_rows = np.stack([kept[r] for r in rows.tolist()]) if len(rows) else best_rows
    return Evaluation(results, stats, best, best_steps, rows, best_rows)


def _keeping_rows(
    blocks: Iterator[tuple[int, np.ndarray]], rows: np.ndarray, kept: dict[int, np.ndarray]
) -> Iterator[tuple[int, np.ndarray]]:
    """Pass the blocks on, copying the given query rows into `kept` on the way."""
    for start, block in blocks:
        for row in rows[(rows >= start) & (rows < start + len(block))].tolist():
            kept[row] = block[row - start].copy()
        yield start, block
        del block


def format_table(results: Sequence[VariantResult]) -> str:
    """One line per variant: rank-1/5/10/20, mAP, mINP and score as fractions."""
    width = max([len("variant"), *(len(r.name) for r in results)])
    lines = [f"{'variant':<{width}}" + "".join(f"{m:>8}" for m in METRIC_NAMES)]
    for r in results:
        metrics = r.metrics()
        lines.append(f"{r.name:<{width}}" + "".join(f"{metrics[m]:>8.4f}" for m in METRIC_NAMES))
    return "\n".join(lines)


def blocked_note(num_query: int, num_gallery: int) -> str:
    """What the console says when the full distance matrix would be large ("" when not)."""
    full_bytes = num_query * num_gallery * 4
    if full_bytes <= LARGE_MATRIX_BYTES:
        return ""
    rows = min(-(-auto_block_size(num_gallery) // DISTANCE_TILE) * DISTANCE_TILE, num_query)
    return (
        f"large gallery: {num_query} x {num_gallery} distances would take "
        f"{full_bytes / 2**30:.1f} GiB as one matrix; every variant is computed and scored in "
        f"blocks of {rows} queries (re-ranking too), so no such matrix is held"
    )


# ---- checkpoints and data -----------------------------------------------------------------


def model_names(checkpoints: Sequence[str | Path]) -> list[str]:
    """Unique display names: the checkpoint folder's name, `-2`, `-3`... on repeats."""
    names: list[str] = []
    seen: Counter[str] = Counter()
    for path in checkpoints:
        path = Path(path).expanduser()
        base = (path if path.is_dir() else path.parent).resolve().name or "model"
        seen[base] += 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


@dataclass(frozen=True)
class CheckpointInput:
    """A checkpoint to evaluate, with the config its data and image size come from."""

    path: str
    config: Config  # the checkpoint's config with the user's overrides
    epoch: int | None = None
    weight: float = 1.0  # its share in an ensemble


def read_checkpoint_input(path: str | Path, weight: float = 1.0) -> CheckpointInput:
    """The config and epoch stored in a checkpoint (validates the file, no model built).

    Raises:
        CheckpointError: not a readable reid-platform checkpoint.
    """
    payload = read_checkpoint(path)
    config = Config.from_saved(payload["config"])
    return CheckpointInput(str(path), config, payload.get("epoch"), weight)


def load_eval_dataset(config: Config) -> ReidDataset:
    """The query and gallery of `config.data` (the synthetic set is generated if missing).

    Raises:
        DatasetError: the dataset is missing or malformed.
        EvaluationError: data.root is empty for a non-synthetic format.
    """
    # The same resolution as training's, so a synthetic set is found (or generated) once.
    try:
        config = resolve_data_root(config, progress=False)
    except ConfigError as err:
        raise EvaluationError(str(err)) from None
    return load_config_dataset(config)


def limit_dataset(dataset: ReidDataset, max_query: int, max_gallery: int) -> ReidDataset:
    """A smaller test set for smoke tests: evenly spaced queries, their gallery matches first.

    Args:
        max_query, max_gallery: upper bounds on the number of query and gallery images.
    """
    picks = np.unique(np.linspace(0, len(dataset.query) - 1, max_query).round().astype(int))
    query = [dataset.query[i] for i in picks] if len(dataset.query) > max_query else dataset.query
    pids = {s.pid for s in query}
    matching = [s for s in dataset.gallery if s.pid in pids]
    others = [s for s in dataset.gallery if s.pid not in pids]
    gallery = (matching + others)[:max_gallery]
    return ReidDataset(dataset.name, dataset.root, dataset.train, query, gallery)


def embed_checkpoints(
    checkpoints: Sequence[CheckpointInput],
    query: Sequence[Sample],
    gallery: Sequence[Sample],
    device: str = "auto",
    progress: bool = True,
    pca_fit_samples: Sequence[Sample] | None = None,
) -> tuple[list[ModelEmbeddings], EvalLabels, list[str]]:
    """Embed query and gallery with each checkpoint once (batched, on the GPU when present).

    Each model uses the image size and batch size of its own config. Images that cannot be
    decoded are left out for every model, so the rows stay aligned.

    Args:
        checkpoints: K checkpoints with their effective configs.
        query, gallery: the samples to embed.
        device: "auto" (GPU when present), "cpu", "cuda", "cuda:1"...
        pca_fit_samples: also embed these (e.g. training images) to fit PCA whitening on.

    Returns:
        (K ModelEmbeddings, labels of the rows kept, messages of the skipped images).
    """
    torch_device = resolve_device(device)
    names = model_names([c.path for c in checkpoints])
    embedded, skipped, fit_feats = [], [], []
    for index, checkpoint in enumerate(checkpoints):
        model, _ = load_model(checkpoint.path, torch_device)
        data = checkpoint.config.data
        kwargs = dict(
            height=data.height,
            width=data.width,
            batch_size=data.eval_batch_size,
            device=torch_device,
            num_workers=data.loader_workers,
            progress=progress,
            amp=amp_enabled(checkpoint.config.train.amp, torch_device),
        )
        start = time.perf_counter()
        try:
            q = extract_features(model, query, desc=f"{names[index]} query", **kwargs)
            g = extract_features(model, gallery, desc=f"{names[index]} gallery", **kwargs)
            fit = (
                extract_features(model, pca_fit_samples, desc=f"{names[index]} pca-fit", **kwargs)
                if pca_fit_samples
                else None
            )
        except ValueError as err:  # not a single image could be decoded
            raise EvaluationError(str(err)) from None
        fit_feats.append(None if fit is None else fit.feats)
        embedded.append((q, g, time.perf_counter() - start))
        if index == 0:
            skipped = q.skipped + g.skipped
        del model
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
    # Rows every model embedded (decoding does not depend on the model, but be exact).
    q_keep = _common_indices([q.indices for q, _, _ in embedded])
    g_keep = _common_indices([g.indices for _, g, _ in embedded])
    models = [
        ModelEmbeddings(
            name=names[index],
            query=q.feats[np.searchsorted(q.indices, q_keep)],
            gallery=g.feats[np.searchsorted(g.indices, g_keep)],
            weight=checkpoint.weight,
            checkpoint=str(checkpoint.path),
            epoch=checkpoint.epoch,
            embed_seconds=seconds,
            pca_fit=fit_feats[index],
        )
        for index, (checkpoint, (q, g, seconds)) in enumerate(zip(checkpoints, embedded))
    ]
    labels = EvalLabels.from_samples([query[i] for i in q_keep], [gallery[i] for i in g_keep])
    return models, labels, skipped


def _common_indices(indices: Sequence[np.ndarray]) -> np.ndarray:
    common = np.sort(indices[0])
    for other in indices[1:]:
        common = np.intersect1d(common, other)
    return common


# ---- pictures -----------------------------------------------------------------------------


def write_pictures(
    out_dir: Path,
    evaluation: Evaluation,
    models: Sequence[ModelEmbeddings],
    labels: EvalLabels,
    options: EvalOptions,
    scatter: str = "tsne",
) -> dict[str, str]:
    """CMC curves of every variant, ranked lists of the best variant, embedding scatter.

    Returns:
        picture kind -> file name inside out_dir.
    """
    plot_cmc({r.name: r.result.cmc for r in evaluation.results}, out_dir / PICTURES["cmc"])
    rows = evaluation.picture_queries.tolist()
    # Without a distance step, cosine distances are 1 - the similarity the service returns.
    similarity = options.distance == "cosine" and evaluation.best_steps.distance_step is None
    value_name = "" if similarity else f"{options.distance} distance"
    if evaluation.best_steps.distance_step is not None:
        value_name = "re-ranked distance"
    plot_ranked_lists(
        [labels.query_paths[r] for r in rows],
        labels.gallery_paths,
        evaluation.best_rows,
        labels.q_pids[rows],
        labels.g_pids,
        labels.q_camids[rows],
        labels.g_camids,
        out_dir / PICTURES["ranked_lists"],
        num_queries=len(rows),
        query_boxes=[labels.query_boxes[r] for r in rows] if labels.query_boxes else None,
        gallery_boxes=labels.gallery_boxes,
        title=f"ranked lists: {evaluation.best}",
        similarity=similarity,
        value_name=value_name,
        query_ids=rows,
    )
    # The identities that are queried: drops distractors (pid 0) and junk (pid -1).
    first = models[0]
    feats = np.concatenate([first.query, first.gallery])  # (N+M, D)
    pids = np.concatenate([labels.q_pids, labels.g_pids])
    keep = np.isin(pids, labels.q_pids)
    title = "query + gallery embeddings" + (f" of {first.name}" if len(models) > 1 else "")
    plot_embedding_scatter(
        feats[keep], pids[keep], out_dir / PICTURES["embedding"], method=scatter, title=title
    )
    return dict(PICTURES)


def check_activation_maps(count: int, num_query: int) -> None:
    """Raises EvaluationError naming --activation-maps when count does not fit the queries."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not (
        0 <= count <= num_query
    ):
        raise EvaluationError(
            f"--activation-maps {count!r}: N must be an integer in [0, {num_query}] (the number "
            "of queries; 0 = none)"
        )


def draw_activation_maps(
    checkpoint: CheckpointInput,
    labels: EvalLabels,
    count: int,
    path: Path,
    device: str = "auto",
) -> Path:
    """Activation maps of `count` evenly spaced queries under the checkpoint's model.

    Raises:
        EvaluationError: count out of range, or a backbone without a feature map to read.
    """
    check_activation_maps(count, len(labels.q_pids))
    rows = pick_queries(len(labels.q_pids), count).tolist()
    boxes = labels.query_boxes or [None] * len(labels.q_pids)
    samples = [
        Sample(labels.query_paths[r], int(labels.q_pids[r]), int(labels.q_camids[r]), "query",
               boxes[r])
        for r in rows
    ]  # fmt: skip
    torch_device = resolve_device(device)
    model, _ = load_model(checkpoint.path, torch_device)
    data = checkpoint.config.data
    images, maps = activation_maps(model, samples, data.height, data.width, torch_device)
    del model
    captions = [f"q{r} id{labels.q_pids[r]} c{labels.q_camids[r]}" for r in rows]
    name = Path(checkpoint.path).expanduser()
    name = (name if name.is_dir() else name.parent).name
    return plot_activation_maps(
        images, maps, path, captions,
        title=f"activation maps of {checkpoint.config.model.backbone} ({name})",
    )  # fmt: skip


# ---- report -------------------------------------------------------------------------------


def build_report(
    evaluation: Evaluation,
    models: Sequence[ModelEmbeddings],
    labels: EvalLabels,
    options: Any,
    dataset: dict[str, Any] | None = None,
    skipped_images: Sequence[str] = (),
    pictures: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The JSON-serialisable report: settings, query counts and every variant's metrics.

    `options` (EvalOptions) are reported by field name, e.g. pca_dim, pca_fit, k1, lambda_value.
    """
    total_weight = sum(m.weight for m in models)
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoints": [
            {
                "name": m.name,
                "path": m.checkpoint,
                "epoch": m.epoch,
                "weight": m.weight / total_weight,
                "embedding_dim": int(m.query.shape[1]),
                "embed_seconds": round(m.embed_seconds, 3),
            }
            for m in models
        ],
        "dataset": dict(dataset or {}),
        "options": options.as_dict(),
        "num_query": len(labels.q_pids),
        "num_gallery": len(labels.g_pids),
        "queries": evaluation.queries.as_dict(),
        "skipped_images": list(skipped_images),
        "best_variant": evaluation.best,
        "variants": {
            r.name: {
                **r.metrics(),
                "num_valid_queries": r.result.num_valid_queries,
                "num_skipped_queries": r.result.num_skipped_queries,
                "seconds": round(r.seconds, 3),
                "cmc": [float(v) for v in r.result.cmc],
            }
            for r in evaluation.results
        },
        "pictures": dict(pictures or {}),
    }


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    """Write `out_dir/report.json`; returns its path."""
    path = out_dir / REPORT_FILE
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def default_output_dir(workspace: Path) -> Path:
    """`workspace/evaluations/<timestamp>`, suffixed `-1`, `-2`... if taken (not created)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = workspace / "evaluations" / stamp
    n = 0
    while path.exists():
        n += 1
        path = workspace / "evaluations" / f"{stamp}-{n}"
    return path


# ---- the whole job ------------------------------------------------------------------------


@dataclass
class EvaluationOutcome:
    """What `run_evaluation` produced."""

    report: dict[str, Any]
    report_path: Path
    evaluation: Evaluation


def run_evaluation(
    checkpoints: Sequence[CheckpointInput],
    options: EvalOptions,
    out_dir: Path,
    device: str = "auto",
    scatter: str = "tsne",
    max_query: int = 0,
    max_gallery: int = 0,
    progress: bool = True,
    activation_map_count: int = 0,
    say: Callable[[str], None] | None = None,
) -> EvaluationOutcome:
    """Embed, evaluate every variant, draw the pictures and write `out_dir/report.json`.

    Args:
        checkpoints: K checkpoints; K > 1 adds the ensemble variants. The dataset is the one
            of the first checkpoint's (effective) config.
        options: distance and post-processing.
        out_dir: output folder (created).
        device: "auto" (GPU when present), "cpu", "cuda", "cuda:1"...
        scatter: "tsne" or "pca" for the embedding picture.
        max_query, max_gallery: if > 0, evaluate a subset (smoke tests).
        activation_map_count: draw activation maps of this many queries (first checkpoint).
        say: prints what the user should know on the way (e.g. that a large gallery is
            scored in blocks); None = quiet.

    Raises:
        EvaluationError, DatasetError, CheckpointError: input that cannot be evaluated.
    """
    if not checkpoints:
        raise EvaluationError("give at least one --checkpoint")
    options.check_values()  # before the slow part; the data-dependent checks follow
    config = checkpoints[0].config
    dataset = load_eval_dataset(config)
    if max_query > 0 or max_gallery > 0:
        dataset = limit_dataset(
            dataset, max_query or len(dataset.query), max_gallery or len(dataset.gallery)
        )
    # Fail before the slow part when the labels alone leave nothing to evaluate.
    count_valid_queries(EvalLabels.from_samples(dataset.query, dataset.gallery))
    check_activation_maps(activation_map_count, len(dataset.query))
    fit_samples = None
    if options.pca_dim and options.pca_fit == "train":
        if not dataset.train:
            raise EvaluationError("--pca-fit train: the dataset has no training split")
        step = max(1, -(-len(dataset.train) // PCA_FIT_MAX_IMAGES))  # ceil division
        fit_samples = dataset.train[::step]
    models, labels, skipped = embed_checkpoints(
        checkpoints, dataset.query, dataset.gallery, device, progress, fit_samples
    )
    note = blocked_note(len(labels.q_pids), len(labels.g_pids))
    if note and say:
        say(note)
    picture_queries = pick_queries(len(labels.q_pids), RANKED_LIST_QUERIES)
    evaluation = evaluate_variants(models, labels, options, picture_queries)
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = write_pictures(out_dir, evaluation, models, labels, options, scatter)
    if activation_map_count:
        draw_activation_maps(
            checkpoints[0], labels, activation_map_count, out_dir / ACTIVATION_MAPS_FILE, device
        )
        pictures["activation_maps"] = ACTIVATION_MAPS_FILE
    dataset_info = {
        "name": dataset.name,
        "root": str(dataset.root),
        "format": config.data.format,
        "num_query_ids": len(set(labels.q_pids.tolist())),
        "num_gallery_ids": len(set(labels.g_pids.tolist())),
        "subset": bool(max_query or max_gallery),
    }
    report = build_report(evaluation, models, labels, options, dataset_info, skipped, pictures)
    return EvaluationOutcome(report, write_report(report, out_dir), evaluation)
