"""Evaluate checkpoints end to end: embed once, build the variants, score each, report.

A *variant* is one way of turning embeddings into a query-gallery distance matrix:

- `raw`: the distance of the model's embeddings (named by the checkpoint's folder when several
  checkpoints are evaluated);
- `+pca{D}`: PCA whitening to D dimensions, fitted on the gallery features (or on the
  training split's, `EvalOptions.pca_fit="train"`), then L2 again;
- `+dba{K}`: database-side augmentation of the gallery with its top-K gallery neighbours;
- `+qe{K}`: query expansion with the query's top-K gallery neighbours;
- `+rerank`: k-reciprocal re-ranking (k1, k2, lambda);
- all the requested steps chained (PCA, DBA, QE, re-ranking, in that order) when there are two
  or more;
- `ensemble`: the weighted sum of the models' distance matrices (weights normalised to sum
  1), then re-ranked on the summed query-query, gallery-gallery and query-gallery distances
  (`ensemble+rerank`), and with every requested step applied to each model's features first
  (`ensemble+pca..+rerank`). That dense re-ranking holds a few (N+M)^2 matrices: fine for
  moderate test sets, not for Market-size ensembles on a small machine.

Queries that cannot be scored (identity absent from the gallery, or only seen by the query's
own camera) are skipped and counted in the report; no valid query at all is an
`EvaluationError` that says which of the two it was.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reid_platform.checkpoint import load_model, read_checkpoint
from reid_platform.config import Config, ConfigError
from reid_platform.data.formats import ReidDataset, Sample
from reid_platform.data.root import load_config_dataset, resolve_data_root
from reid_platform.evaluation.embed import extract_features
from reid_platform.evaluation.metrics import (
    EvaluationError,
    RankResult,
    compute_distmat,
    evaluate_rank,
)
from reid_platform.evaluation.postprocess import (
    database_augmentation,
    fit_pca_whitening,
    query_expansion,
)
from reid_platform.evaluation.report import plot_cmc, plot_embedding_scatter, plot_ranked_lists
from reid_platform.evaluation.rerank import k_reciprocal_rerank, rerank_features
from reid_platform.runtime import amp_enabled, resolve_device

METRIC_NAMES = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP", "score")
DISTANCES = ("cosine", "euclidean")
PCA_FITS = ("gallery", "train")
PCA_FIT_MAX_IMAGES = 20000  # training images embedded to fit PCA (an even spread of the split)
REPORT_FILE = "report.json"
PICTURES = {"cmc": "cmc.png", "ranked_lists": "ranked_lists.png", "embedding": "embedding.png"}


# ---- what to evaluate ----------------------------------------------------------------------


@dataclass(frozen=True)
class Steps:
    """Post-processing of one variant, applied in this order; 0 / False = off."""

    pca_dim: int = 0
    dba_k: int = 0
    qe_k: int = 0
    rerank: bool = False

    @property
    def suffix(self) -> str:
        """The variant name suffix, e.g. `+pca16+qe2+rerank` ("" for none)."""
        parts = [
            f"+pca{self.pca_dim}" if self.pca_dim else "",
            f"+dba{self.dba_k}" if self.dba_k else "",
            f"+qe{self.qe_k}" if self.qe_k else "",
            "+rerank" if self.rerank else "",
        ]
        return "".join(parts)

    @property
    def has_feature_steps(self) -> bool:
        return bool(self.pca_dim or self.dba_k or self.qe_k)


@dataclass(frozen=True)
class EvalOptions:
    """What the user asked for: distance, post-processing and re-ranking parameters."""

    distance: str = "cosine"
    pca_dim: int = 0
    qe_k: int = 0
    dba_k: int = 0
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    pca_fit: str = "gallery"  # or "train": fit the whitening on the training split

    @property
    def requested(self) -> Steps:
        return Steps(self.pca_dim, self.dba_k, self.qe_k, self.rerank)

    def validate(
        self, num_query: int, num_gallery: int, dim: int, num_fit: int | None = None
    ) -> None:
        """Check the options against the data; the message names the flag.

        Raises:
            EvaluationError: a value does not fit the data (e.g. --pca larger than the gallery).
        """
        if self.distance not in DISTANCES:
            raise EvaluationError(f"--distance {self.distance!r}: choose one of {DISTANCES}")
        if self.pca_fit not in PCA_FITS:
            raise EvaluationError(f"--pca-fit {self.pca_fit!r}: choose one of {PCA_FITS}")
        fit_count = num_gallery if num_fit is None else num_fit
        if self.pca_dim < 0 or self.pca_dim > min(fit_count, dim):
            raise EvaluationError(
                f"--pca {self.pca_dim}: PCA is fitted on the {self.pca_fit} features, so DIM "
                f"must be in [1, min({self.pca_fit} images={fit_count}, feature dim={dim})]"
            )
        if self.qe_k < 0 or self.qe_k > num_gallery:
            raise EvaluationError(f"--qe {self.qe_k}: K must be in [1, {num_gallery}] (gallery)")
        if self.dba_k < 0 or self.dba_k > num_gallery - 1:
            raise EvaluationError(
                f"--dba {self.dba_k}: K must be in [1, {num_gallery - 1}] (gallery size - 1)"
            )
        if self.k1 < 1 or self.k2 < 1 or not 0.0 <= self.lambda_value <= 1.0:
            raise EvaluationError(
                f"re-ranking needs k1 >= 1, k2 >= 1 and lambda in [0, 1], got k1={self.k1}, "
                f"k2={self.k2}, lambda={self.lambda_value}"
            )


@dataclass(frozen=True)
class Variant:
    """One row of the report: which models (several = ensemble) and which steps."""

    name: str
    models: tuple[int, ...]  # indices into the list of ModelEmbeddings
    steps: Steps


def plan_variants(model_names: Sequence[str], options: EvalOptions) -> list[Variant]:
    """The variants to evaluate, in table order: per model, then the ensemble.

    Args:
        model_names: one unique name per model; a single model is called `raw`.
        options: the requested post-processing.
    """
    req = options.requested
    singles = [
        Steps(pca_dim=req.pca_dim),
        Steps(dba_k=req.dba_k),
        Steps(qe_k=req.qe_k),
        Steps(rerank=req.rerank),
    ]
    singles = [s for s in singles if s != Steps()]
    per_model = _unique([Steps(), *singles, *([req] if len(singles) > 1 else [])])
    variants = []
    for index, name in enumerate(model_names):
        base = "raw" if len(model_names) == 1 else name
        variants += [Variant(base + s.suffix, (index,), s) for s in per_model]
    if len(model_names) > 1:
        everything = tuple(range(len(model_names)))
        chains = [Steps(), Steps(rerank=req.rerank), req]
        variants += [Variant("ensemble" + s.suffix, everything, s) for s in _unique(chains)]
    return variants


def _unique(steps: Sequence[Steps]) -> list[Steps]:
    return list(dict.fromkeys(steps))


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


# ---- distances ----------------------------------------------------------------------------


def ensemble_distance(
    distmats: Sequence[np.ndarray], weights: Sequence[float] | None = None
) -> np.ndarray:
    """Weighted sum of distance matrices of several models, weights normalised to sum 1.

    Normalised weights keep the result on the scale of one model: the ensemble of a model with
    itself is that model's matrix exactly.

    Args:
        distmats: K matrices of one shape, e.g. (num_query, num_gallery), smaller is closer.
        weights: K non-negative weights (None = equal).

    Returns:
        float32 matrix of the same shape.

    Raises:
        EvaluationError: no matrices, shapes that differ (both named), or bad weights.
    """
    if not distmats:
        raise EvaluationError("ensemble_distance needs at least one distance matrix")
    weights = [1.0] * len(distmats) if weights is None else [float(w) for w in weights]
    if len(weights) != len(distmats):
        raise EvaluationError(f"{len(weights)} weights for {len(distmats)} distance matrices")
    if not all(np.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise EvaluationError(f"weights must be finite, >= 0 and not all 0, got {weights}")
    shape = np.shape(distmats[0])
    for n, distmat in enumerate(distmats[1:], start=1):
        if np.shape(distmat) != shape:
            raise EvaluationError(
                f"cannot sum distance matrices of shapes {shape} (model 0) and "
                f"{np.shape(distmat)} (model {n}): every model must embed the same images"
            )
    total = sum(weights)
    out = np.zeros(shape, dtype=np.float32)
    for distmat, weight in zip(distmats, weights):
        out += np.float32(weight / total) * np.asarray(distmat, dtype=np.float32)
    return out


def postprocess_features(
    query: np.ndarray, gallery: np.ndarray, steps: Steps, pca_fit: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Apply PCA whitening, DBA and QE, in that order.

    Args:
        query: (N, D) L2-normalised features.
        gallery: (M, D) L2-normalised features.
        pca_fit: (T, D) features to fit the PCA whitening on; None = the gallery.

    Returns:
        (query, gallery) as (N, D') and (M, D') float32, L2-normalised (D' = pca_dim or D).
    """
    if steps.pca_dim:
        pca = fit_pca_whitening(gallery if pca_fit is None else pca_fit, steps.pca_dim)
        query, gallery = pca.transform(query), pca.transform(gallery)
    if steps.dba_k:
        gallery = database_augmentation(gallery, steps.dba_k)
    if steps.qe_k:
        # QE looks up neighbours in the (augmented) gallery, as in the usual DBA + QE recipe.
        query = query_expansion(query, gallery, steps.qe_k)
    return query, gallery


def variant_distance(
    variant: Variant, models: Sequence[ModelEmbeddings], options: EvalOptions
) -> np.ndarray:
    """The (num_query, num_gallery) float32 distance matrix of one variant, smaller is closer.

    A single model is re-ranked from its features (`rerank_features`, no (N+M)^2 matrix); an
    ensemble is re-ranked on its summed q-q, g-g and q-g distances (`k_reciprocal_rerank`).
    """
    steps, metric = variant.steps, options.distance
    rerank = {"k1": options.k1, "k2": options.k2, "lambda_value": options.lambda_value}
    feats = [
        postprocess_features(models[i].query, models[i].gallery, steps, models[i].pca_fit)
        for i in variant.models
    ]
    if len(feats) == 1 and steps.rerank:
        return rerank_features(*feats[0], metric=metric, **rerank)
    weights = [models[i].weight for i in variant.models]
    q_g = ensemble_distance([compute_distmat(q, g, metric) for q, g in feats], weights)
    if not steps.rerank:
        return q_g
    q_q = ensemble_distance([compute_distmat(q, q, metric) for q, _ in feats], weights)
    g_g = ensemble_distance([compute_distmat(g, g, metric) for _, g in feats], weights)
    return k_reciprocal_rerank(q_g, q_q, g_g, **rerank)


# ---- evaluation ---------------------------------------------------------------------------


@dataclass
class VariantResult:
    """Metrics of one variant and the time its distance matrix and ranking took."""

    name: str
    result: RankResult
    seconds: float

    def metrics(self) -> dict[str, float]:
        return self.result.as_metrics()


@dataclass
class Evaluation:
    """Every variant's result, plus the best variant's distance matrix for the pictures."""

    results: list[VariantResult]
    queries: QueryStats
    best: str
    best_distmat: np.ndarray  # (num_query, num_gallery)


def evaluate_variants(
    models: Sequence[ModelEmbeddings], labels: EvalLabels, options: EvalOptions
) -> Evaluation:
    """Evaluate every planned variant under the Market-1501 protocol.

    Only the current and the best distance matrices are held at once.

    Args:
        models: embeddings of one or more models, rows aligned with `labels`.
        labels: query and gallery pids and camids.
        options: distance and post-processing.

    Raises:
        EvaluationError: mismatched shapes (both named), options that do not fit the data, or
            no valid query (with the reason).
    """
    if not models:
        raise EvaluationError("no model to evaluate")
    _check_shapes(models, labels)
    stats = count_valid_queries(labels)
    dim = min(m.query.shape[1] for m in models)
    fits = [len(m.pca_fit) for m in models if m.pca_fit is not None]
    options.validate(len(labels.q_pids), len(labels.g_pids), dim, min(fits) if fits else None)
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise EvaluationError(f"model names must be unique, got {names}")
    weights = [m.weight for m in models]
    if not all(np.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise EvaluationError(f"ensemble weights must be finite, >= 0 and not all 0: {weights}")
    results: list[VariantResult] = []
    best, best_score, best_distmat = "", -np.inf, np.empty((0, 0), dtype=np.float32)
    for variant in plan_variants(names, options):
        start = time.perf_counter()
        distmat = variant_distance(variant, models, options)
        result = evaluate_rank(
            distmat, labels.q_pids, labels.g_pids, labels.q_camids, labels.g_camids
        )
        results.append(VariantResult(variant.name, result, time.perf_counter() - start))
        score = result.as_metrics()["score"]
        if score > best_score:
            best, best_score, best_distmat = variant.name, score, distmat
    return Evaluation(results, stats, best, best_distmat)


def format_table(results: Sequence[VariantResult]) -> str:
    """One line per variant: rank-1/5/10/20, mAP, mINP and score as fractions."""
    width = max([len("variant"), *(len(r.name) for r in results)])
    lines = [f"{'variant':<{width}}" + "".join(f"{m:>8}" for m in METRIC_NAMES)]
    for r in results:
        metrics = r.metrics()
        lines.append(f"{r.name:<{width}}" + "".join(f"{metrics[m]:>8.4f}" for m in METRIC_NAMES))
    return "\n".join(lines)


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
    config = Config.from_dict(payload["config"])
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


# ---- report -------------------------------------------------------------------------------


def write_pictures(
    out_dir: Path,
    evaluation: Evaluation,
    models: Sequence[ModelEmbeddings],
    labels: EvalLabels,
    scatter: str = "tsne",
) -> dict[str, str]:
    """CMC curves of every variant, ranked lists of the best variant, embedding scatter.

    Returns:
        picture kind -> file name inside out_dir.
    """
    plot_cmc({r.name: r.result.cmc for r in evaluation.results}, out_dir / PICTURES["cmc"])
    plot_ranked_lists(
        labels.query_paths,
        labels.gallery_paths,
        evaluation.best_distmat,
        labels.q_pids,
        labels.g_pids,
        labels.q_camids,
        labels.g_camids,
        out_dir / PICTURES["ranked_lists"],
        query_boxes=labels.query_boxes,
        gallery_boxes=labels.gallery_boxes,
        title=f"ranked lists: {evaluation.best}",
    )
    # The identities that are queried: drops distractors (pid 0) and junk (pid -1).
    first = models[0]
    feats = np.concatenate([first.query, first.gallery])  # (N+M, D)
    pids = np.concatenate([labels.q_pids, labels.g_pids])
    keep = np.isin(pids, labels.q_pids)
    plot_embedding_scatter(
        feats[keep],
        pids[keep],
        out_dir / PICTURES["embedding"],
        method=scatter,
        title=f"{first.name}: query + gallery embeddings",
    )
    return dict(PICTURES)


def build_report(
    evaluation: Evaluation,
    models: Sequence[ModelEmbeddings],
    labels: EvalLabels,
    options: EvalOptions,
    dataset: dict[str, Any] | None = None,
    skipped_images: Sequence[str] = (),
    pictures: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The JSON-serialisable report: settings, query counts and every variant's metrics."""
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
        "options": {
            "distance": options.distance,
            "pca_dim": options.pca_dim,
            "pca_fitted_on": options.pca_fit,
            "qe_k": options.qe_k,
            "dba_k": options.dba_k,
            "rerank": options.rerank,
            "k1": options.k1,
            "k2": options.k2,
            "lambda": options.lambda_value,
        },
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


# ---- MLflow -------------------------------------------------------------------------------

_MLFLOW_UNSAFE = re.compile(r"[^\w\-. :/]")


def mlflow_metric_name(variant: str, metric: str) -> str:
    """`eval/<variant>/<metric>`, characters MLflow rejects (e.g. `+`) replaced by `_`."""
    return f"eval/{_MLFLOW_UNSAFE.sub('_', variant.replace('/', '_'))}/{metric}"


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a report: every variant's metrics and the query counts."""
    metrics = {
        mlflow_metric_name(name, key): values[key]
        for name, values in report["variants"].items()
        for key in METRIC_NAMES
    }
    queries = report["queries"]
    metrics["eval/valid_queries"] = queries["valid"]
    metrics["eval/skipped_queries"] = queries["skipped"]
    metrics["eval/skipped_queries_absent_from_gallery"] = queries["skipped_absent_from_gallery"]
    metrics["eval/skipped_queries_same_camera_only"] = queries["skipped_same_camera_only"]
    metrics["eval/skipped_images"] = len(report["skipped_images"])
    return metrics


def check_mlflow_run(config: Config, run_id: str) -> str:
    """The tracking URI in which `run_id` exists.

    Raises:
        EvaluationError: no such run there.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from reid_platform.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(config)
    try:
        MlflowClient(uri).get_run(run_id)
    except MlflowException as err:
        raise EvaluationError(f"--run-id {run_id}: no such MLflow run at {uri} ({err})") from None
    return uri


def log_to_mlflow(
    report: dict[str, Any], out_dir: Path, config: Config, run_id: str | None = None
) -> tuple[str, str]:
    """Log the metrics and `out_dir` (artifacts under `evaluation/`) to MLflow.

    The run is recorded in the report (`report["mlflow"]`) and report.json rewritten first.

    Args:
        report: from `build_report`.
        out_dir: holds report.json and the pictures.
        config: names the experiment and the tracking URI.
        run_id: an existing (e.g. training) run to log into; None creates a new run.

    Returns:
        (tracking URI, run id).
    """
    from reid_platform.tracking import RunLogger, resolve_tracking_uri, start_run

    uri = resolve_tracking_uri(config)
    tags = {
        "eval.checkpoints": ", ".join(c["path"] for c in report["checkpoints"]),
        "eval.best_variant": report["best_variant"],
        "eval.output_dir": str(out_dir),
        **{f"eval.{k}": str(v) for k, v in report["options"].items()},
    }
    created = run_id is None
    if created:
        run_id = start_run(
            config,
            uri,
            run_name=f"eval-{out_dir.name}",
            tags={"job": "evaluate", "dataset": report["dataset"].get("name", "")},
        )
    logger = RunLogger(uri, run_id)
    try:
        report["mlflow"] = {"tracking_uri": uri, "run_id": run_id}
        write_report(report, out_dir)
        logger.set_tags(tags)
        step = report["checkpoints"][0].get("epoch") or 0
        logger.log_metrics(report_metrics(report), step=int(step))
        logger.log_artifact(out_dir, "evaluation")
    except Exception:
        if created:
            logger.end("FAILED")
        raise
    if created:
        logger.end()
    return uri, run_id


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

    Raises:
        EvaluationError, DatasetError, CheckpointError: input that cannot be evaluated.
    """
    if not checkpoints:
        raise EvaluationError("give at least one --checkpoint")
    config = checkpoints[0].config
    dataset = load_eval_dataset(config)
    if max_query > 0 or max_gallery > 0:
        dataset = limit_dataset(
            dataset, max_query or len(dataset.query), max_gallery or len(dataset.gallery)
        )
    # Fail before the slow part when the labels alone leave nothing to evaluate.
    count_valid_queries(EvalLabels.from_samples(dataset.query, dataset.gallery))
    fit_samples = None
    if options.pca_dim and options.pca_fit == "train":
        if not dataset.train:
            raise EvaluationError("--pca-fit train: the dataset has no training split")
        step = max(1, -(-len(dataset.train) // PCA_FIT_MAX_IMAGES))  # ceil division
        fit_samples = dataset.train[::step]
    models, labels, skipped = embed_checkpoints(
        checkpoints, dataset.query, dataset.gallery, device, progress, fit_samples
    )
    evaluation = evaluate_variants(models, labels, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = write_pictures(out_dir, evaluation, models, labels, scatter)
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
