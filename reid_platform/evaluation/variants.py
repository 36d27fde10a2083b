"""What is evaluated: the post-processing steps as one ordered table, and the variants.

`STEPS` is the table. A row is a step: its name (the suffix it adds to a variant's name), its
option (the `EvalOptions` field and command-line flag that switch it on, plus further
settings), the function that applies it, and the check of its values against the data. Steps
apply in table order: the feature steps first (PCA whitening, then DBA, then QE), then at most
one distance step (k-reciprocal re-ranking). A new post-processing step is its function (in
`postprocess.py`) and one row here: `EvalOptions`, the CLI flags of `jobs/evaluate.py`, the
variant names, the report's options and the checks all follow from the table.

A *variant* is one way of turning embeddings into query-gallery distances:

- `raw`: the distance of the model's embeddings (named by the checkpoint's folder when several
  checkpoints are evaluated);
- each requested step alone (`raw+pca16`, `raw+dba5`, `raw+qe5`, `raw+rerank`), and all of them
  chained in table order when there are two or more;
- with several models, `ensemble`: the weighted sum of their distances (weights normalised to
  sum 1), then the ensemble with the distance step alone (`ensemble+rerank`) and with every
  requested step applied to each model's features first.

Distances are produced in blocks of query rows (`variant_blocks`), never as a whole
(num_query, num_gallery) matrix, so a variant is scored at any gallery size. An ensemble is
re-ranked from the models' features concatenated with weights sqrt(w): their cosine distance
is exactly the weighted sum of the models' cosine distances, so `rerank_blocks` re-ranks the
ensemble without any (N+M)^2 matrix. For Euclidean distances, whose sum is no distance of
concatenated features, the dense re-ranking of the summed matrices is used, for test sets
small enough for it (`DENSE_RERANK_MAX_BYTES`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reid_platform.evaluation.metrics import EvaluationError, compute_distmat, distance_blocks
from reid_platform.evaluation.postprocess import (
    database_augmentation,
    fit_pca_whitening,
    query_expansion,
)
from reid_platform.evaluation.rerank import k_reciprocal_rerank, rerank_blocks

DISTANCES = ("cosine", "euclidean")
PCA_FITS = ("gallery", "train")
# The dense re-ranking of an ensemble of Euclidean distances holds a few (N+M)^2 arrays.
DENSE_RERANK_BYTES_PER_ENTRY = 40
DENSE_RERANK_MAX_BYTES = 4 * 2**30

Blocks = Iterator[tuple[int, np.ndarray]]  # (start, (b, num_gallery) float32 distances)


# ---- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One setting: an `EvalOptions` field and its command-line flag.

    A `bool` option is a switch (`--rerank`); the others take a value (`--pca 256`).
    """

    name: str  # the EvalOptions field
    flag: str
    kind: type
    default: Any
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    smoke: Any = None  # the value `--smoke-test` uses when no step is asked for (None: default)
    low: float | None = None  # smallest value allowed
    high: float | None = None  # largest value allowed

    def check_value(self, value: Any) -> None:
        """Raises EvaluationError naming the flag when value is not of the option's kind, not
        one of its choices or outside [low, high]."""
        if self.kind is bool:
            ok = isinstance(value, (bool, np.bool_))
        elif self.kind is int:
            ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        elif self.kind is float:
            ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, self.kind)
        if not ok:
            raise EvaluationError(f"{self.flag} {value!r}: expected a {self.kind.__name__}")
        if self.choices and value not in self.choices:
            raise EvaluationError(f"{self.flag} {value!r}: choose one of {self.choices}")
        if self.high is not None and not self.low <= value <= self.high:
            raise EvaluationError(f"{self.flag} {value}: must be in [{self.low}, {self.high}]")
        if self.low is not None and value < self.low:
            off = " (0 = off)" if self.low == 0 else ""  # the steps' sizes
            raise EvaluationError(f"{self.flag} {value}: must be >= {self.low}{off}")


@dataclass(frozen=True)
class DataSizes:
    """What the checks compare option values with."""

    num_query: int
    num_gallery: int
    dim: int  # feature dimension (the smallest of the models)
    num_fit: int | None = None  # training features PCA can be fitted on (None: not embedded)
    num_models: int = 1


@dataclass(frozen=True)
class PostStep:
    """A row of the table: one post-processing step.

    Attributes:
        name: suffix in variant names: `+{name}{value}`, or `+{name}` for a switch.
        option: its EvalOptions field and flag; 0 / False = off.
        apply: feature step: (query, gallery, value, options, fit) -> (query, gallery), all
            (num, D) float32 L2-normalised (fit: (T, D) training features, or None); distance
            step: (query, gallery, value, options) -> Blocks.
        check: (value, options, sizes) -> None, raising EvaluationError naming the flag when
            the value does not fit the data; called only when the step is on. Bounds that do
            not depend on the data are the options' own (`Option.low`, `Option.high`).
        params: its further settings (e.g. k1, k2, lambda of the re-ranking).
        makes_distances: a distance step (last in a chain, at most one per chain).
        apply_dense: for a distance step, (q_g, q_q, g_g, value, options) -> (N, M) distances:
            used for ensembles whose summed distances are no distance of features (Euclidean).
    """

    name: str
    option: Option
    apply: Callable[..., Any]
    check: Callable[[Any, Any, DataSizes], None] | None
    params: tuple[Option, ...] = ()
    makes_distances: bool = False
    apply_dense: Callable[..., np.ndarray] | None = None

    def suffix(self, value: Any) -> str:
        return f"+{self.name}" if self.option.kind is bool else f"+{self.name}{value}"


def _pca(query, gallery, dim, options, fit):
    pca = fit_pca_whitening(gallery if options.pca_fit == "gallery" else fit, dim)
    return pca.transform(query), pca.transform(gallery)


def _check_pca(dim, options, sizes: DataSizes) -> None:
    if options.pca_fit == "train" and sizes.num_fit is None:
        raise EvaluationError("--pca-fit train: no training features were embedded")
    fit_count = sizes.num_gallery if options.pca_fit == "gallery" else sizes.num_fit
    if not 1 <= dim <= min(fit_count, sizes.dim):
        raise EvaluationError(
            f"--pca {dim}: PCA is fitted on the {options.pca_fit} features, so DIM "
            f"must be in [1, min({options.pca_fit} images={fit_count}, feature dim={sizes.dim})]"
        )


def _dba(query, gallery, k, options, fit):
    return query, database_augmentation(gallery, k)


def _check_dba(k, options, sizes: DataSizes) -> None:
    if not 1 <= k <= sizes.num_gallery - 1:
        raise EvaluationError(
            f"--dba {k}: K must be in [1, {sizes.num_gallery - 1}] (gallery size - 1)"
        )


def _qe(query, gallery, k, options, fit):
    # QE looks up neighbours in the (augmented) gallery, as in the usual DBA + QE recipe.
    return query_expansion(query, gallery, k), gallery


def _check_qe(k, options, sizes: DataSizes) -> None:
    if not 1 <= k <= sizes.num_gallery:
        raise EvaluationError(f"--qe {k}: K must be in [1, {sizes.num_gallery}] (gallery)")


def _rerank_params(options) -> dict[str, Any]:
    return {"k1": options.k1, "k2": options.k2, "lambda_value": options.lambda_value}


def _rerank(query, gallery, on, options) -> Blocks:
    return rerank_blocks(query, gallery, metric=options.distance, **_rerank_params(options))


def _rerank_dense(q_g, q_q, g_g, on, options) -> np.ndarray:
    return k_reciprocal_rerank(q_g, q_q, g_g, **_rerank_params(options))


STEPS: tuple[PostStep, ...] = (
    PostStep(
        "pca",
        Option("pca_dim", "--pca", int, 0, "PCA whitening to DIM dimensions", "DIM", smoke=16,
               low=0),  # fmt: skip
        _pca,
        _check_pca,
        params=(
            Option(
                "pca_fit", "--pca-fit", str, "gallery",
                "features the PCA whitening is fitted on (default: gallery)", choices=PCA_FITS,
            ),  # fmt: skip
        ),
    ),
    PostStep(
        "dba",
        Option("dba_k", "--dba", int, 0, "database-side augmentation, top-K", "K", smoke=2,
               low=0),  # fmt: skip
        _dba,
        _check_dba,
    ),
    PostStep(
        "qe",
        Option("qe_k", "--qe", int, 0, "query expansion, top-K", "K", smoke=2, low=0),
        _qe,
        _check_qe,
    ),
    PostStep(
        "rerank",
        Option("rerank", "--rerank", bool, False, "k-reciprocal re-ranking", smoke=True),
        _rerank,
        None,
        params=(
            Option("k1", "--k1", int, 20, "re-ranking k1 (default 20)", "K1", low=1),
            Option("k2", "--k2", int, 6, "re-ranking k2 (default 6)", "K2", low=1),
            Option(
                "lambda_value", "--lambda", float, 0.3,
                "re-ranking weight of the original distance (default 0.3)", "LAMBDA",
                low=0.0, high=1.0,
            ),  # fmt: skip
        ),
        makes_distances=True,
        apply_dense=_rerank_dense,
    ),
)
STEP_BY_NAME = {step.name: step for step in STEPS}
DISTANCE = Option(
    "distance", "--distance", str, "cosine", "distance between embeddings", choices=DISTANCES
)
# Every setting, in the order of the report and the --help text.
OPTIONS: tuple[Option, ...] = (
    DISTANCE,
    *(option for step in STEPS for option in (step.option, *step.params)),
)


# ---- options ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Steps:
    """The post-processing of one variant: (step name, value) pairs in table order."""

    values: tuple[tuple[str, Any], ...] = ()

    @property
    def suffix(self) -> str:
        """The variant name suffix, e.g. `+pca16+qe2+rerank` ("" for none)."""
        return "".join(STEP_BY_NAME[name].suffix(value) for name, value in self.values)

    @property
    def feature_steps(self) -> tuple[tuple[str, Any], ...]:
        return tuple(item for item in self.values if not STEP_BY_NAME[item[0]].makes_distances)

    @property
    def distance_step(self) -> tuple[str, Any] | None:
        last = [item for item in self.values if STEP_BY_NAME[item[0]].makes_distances]
        return last[0] if last else None


class _EvalOptionsMethods:
    """Behaviour of `EvalOptions`; its fields come from the table (`OPTIONS`)."""

    @property
    def requested(self) -> Steps:
        """Every step that is on, in table order."""
        return Steps(
            tuple(
                (step.name, getattr(self, step.option.name))
                for step in STEPS
                if getattr(self, step.option.name)
            )
        )

    def check_values(self) -> None:
        """Check every value against its option, without the data (before anything is
        embedded): kind, choices, bounds.

        Raises:
            EvaluationError: the message names the flag.
        """
        for option in OPTIONS:
            option.check_value(getattr(self, option.name))

    def validate(self, sizes: DataSizes) -> None:
        """Check every value against its kind and the data; the message names the flag.

        Raises:
            EvaluationError: a value that does not fit (e.g. --pca larger than the gallery).
        """
        self.check_values()
        for step in STEPS:
            value = getattr(self, step.option.name)
            if value and step.check is not None:
                step.check(value, self, sizes)
        if self.rerank and sizes.num_models > 1 and self.distance != "cosine":
            points = sizes.num_query + sizes.num_gallery
            need = points**2 * DENSE_RERANK_BYTES_PER_ENTRY
            if need > DENSE_RERANK_MAX_BYTES:
                raise EvaluationError(
                    f"--rerank of an ensemble with --distance {self.distance}: re-ranking the "
                    f"summed Euclidean distances needs the dense (N+M)^2 matrices, about "
                    f"{need / 2**30:.1f} GiB for {points} images; use --distance cosine, "
                    "which re-ranks an ensemble from its concatenated features"
                )

    def as_dict(self) -> dict[str, Any]:
        """Every setting by field name (the report's `options`)."""
        return {option.name: getattr(self, option.name) for option in OPTIONS}


EvalOptions = dataclasses.make_dataclass(
    "EvalOptions",
    [(o.name, o.kind, dataclasses.field(default=o.default)) for o in OPTIONS],
    bases=(_EvalOptionsMethods,),
    frozen=True,
)
EvalOptions.__module__ = __name__  # pickling finds it here
EvalOptions.__doc__ = (
    "What the user asked for: the distance and every post-processing setting of the step "
    "table (fields: " + ", ".join(o.name for o in OPTIONS) + "); 0 / False turns a step off."
)


def add_option_arguments(parser) -> None:
    """One flag per setting of the table, on an argparse parser (dests = EvalOptions fields)."""
    for option in OPTIONS:
        if option.kind is bool:
            parser.add_argument(option.flag, dest=option.name, action="store_true",
                                help=option.help)  # fmt: skip
            continue
        parser.add_argument(
            option.flag,
            dest=option.name,
            type=option.kind,
            default=option.default,
            metavar=option.metavar,
            choices=option.choices or None,
            help=option.help,
        )


def options_from_args(args, smoke_test: bool = False):
    """EvalOptions from parsed flags; `smoke_test` with no step asked for turns every step on
    with its smoke value (a tiny run that exercises them all)."""
    values = {option.name: getattr(args, option.name) for option in OPTIONS}
    if smoke_test and not any(values[step.option.name] for step in STEPS):
        values.update(
            {step.option.name: step.option.smoke for step in STEPS if step.option.smoke}
        )
    return EvalOptions(**values)


# ---- variants -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One row of the report: which models (several = ensemble) and which steps."""

    name: str
    models: tuple[int, ...]  # indices into the list of models
    steps: Steps


def plan_variants(model_names: Sequence[str], options) -> list[Variant]:
    """The variants to evaluate, in table order: per model, then the ensemble.

    Args:
        model_names: one unique name per model; a single model is called `raw`.
        options: EvalOptions, the requested post-processing.
    """
    requested = options.requested
    singles = [Steps((item,)) for item in requested.values]
    chained = [requested] if len(singles) > 1 else []
    per_model = _unique([Steps(), *singles, *chained])
    variants = []
    for index, name in enumerate(model_names):
        base = "raw" if len(model_names) == 1 else name
        variants += [Variant(base + s.suffix, (index,), s) for s in per_model]
    if len(model_names) > 1:
        everything = tuple(range(len(model_names)))
        distance = requested.distance_step
        chains = [Steps(), Steps((distance,) if distance else ()), requested]
        variants += [Variant("ensemble" + s.suffix, everything, s) for s in _unique(chains)]
    return variants


def _unique(steps: Sequence[Steps]) -> list[Steps]:
    return list(dict.fromkeys(steps))


# ---- distances ----------------------------------------------------------------------------


def postprocess_features(
    query: np.ndarray,
    gallery: np.ndarray,
    steps: Steps,
    options,
    fit: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the feature steps of `steps`, in table order.

    Args:
        query: (N, D) L2-normalised features.
        gallery: (M, D) L2-normalised features.
        options: EvalOptions (the steps' further settings).
        fit: (T, D) training features, for PCA fitted on the training split.

    Returns:
        (query, gallery) as (N, D') and (M, D') float32, L2-normalised.
    """
    for name, value in steps.feature_steps:
        query, gallery = STEP_BY_NAME[name].apply(query, gallery, value, options, fit)
    return query, gallery


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
    weights = normalised_weights([1.0] * len(distmats) if weights is None else weights)
    if len(weights) != len(distmats):
        raise EvaluationError(f"{len(weights)} weights for {len(distmats)} distance matrices")
    shape = np.shape(distmats[0])
    for n, distmat in enumerate(distmats[1:], start=1):
        if np.shape(distmat) != shape:
            raise EvaluationError(
                f"cannot sum distance matrices of shapes {shape} (model 0) and "
                f"{np.shape(distmat)} (model {n}): every model must embed the same images"
            )
    out = np.zeros(shape, dtype=np.float32)
    for distmat, weight in zip(distmats, weights):
        out += np.float32(weight) * np.asarray(distmat, dtype=np.float32)
    return out


def normalised_weights(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum.

    Raises:
        EvaluationError: a weight that is negative or not finite, or all zero.
    """
    weights = [float(w) for w in weights]
    if not all(np.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise EvaluationError(f"weights must be finite, >= 0 and not all 0, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def concatenated_features(
    feats: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Query and gallery features of K models side by side, model k scaled by sqrt(w_k).

    With L2-normalised features and weights summing to 1, the rows have unit length and
    1 - Q.G = sum_k w_k (1 - q_k.g_k): the ensemble's cosine distance.

    Returns:
        (N, sum D_k) and (M, sum D_k) float32.
    """
    scale = [np.float32(np.sqrt(w)) for w in normalised_weights(weights)]
    query = np.concatenate([s * q for s, (q, _) in zip(scale, feats)], axis=1)
    gallery = np.concatenate([s * g for s, (_, g) in zip(scale, feats)], axis=1)
    return query.astype(np.float32), gallery.astype(np.float32)


def variant_blocks(
    variant: Variant,
    models: Sequence[Any],
    options,
    block_size: int | None = None,
) -> Blocks:
    """The distances of one variant, in consecutive blocks of query rows.

    Args:
        variant: which models and steps.
        models: ModelEmbeddings-like objects (query, gallery, weight, pca_fit).
        options: EvalOptions.
        block_size: query rows per block (None: ~64 MiB blocks).

    Returns:
        An iterator of (start, (b, num_gallery) float32 distances), smaller is closer.
    """
    metric = options.distance
    feats = [
        postprocess_features(
            models[i].query, models[i].gallery, variant.steps, options, models[i].pca_fit
        )
        for i in variant.models
    ]
    distance = variant.steps.distance_step
    if len(feats) == 1:
        query, gallery = feats[0]
        if distance is None:
            return distance_blocks(query, gallery, metric, block_size)
        name, value = distance
        return STEP_BY_NAME[name].apply(query, gallery, value, options)
    weights = [models[i].weight for i in variant.models]
    if distance is None:
        per_model = [distance_blocks(q, g, metric, block_size) for q, g in feats]
        return _summed_blocks(per_model, weights)
    name, value = distance
    step = STEP_BY_NAME[name]
    if metric == "cosine":
        return step.apply(*concatenated_features(feats, weights), value, options)
    q_g = ensemble_distance([compute_distmat(q, g, metric) for q, g in feats], weights)
    q_q = ensemble_distance([compute_distmat(q, q, metric) for q, _ in feats], weights)
    g_g = ensemble_distance([compute_distmat(g, g, metric) for _, g in feats], weights)
    return iter([(0, step.apply_dense(q_g, q_q, g_g, value, options))])


def _summed_blocks(per_model: Sequence[Blocks], weights: Sequence[float]) -> Blocks:
    """Blockwise `ensemble_distance` of the models' distance blocks (same block sizes)."""
    for parts in zip(*per_model):
        yield parts[0][0], ensemble_distance([block for _, block in parts], weights)
