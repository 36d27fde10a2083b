"""Evaluation: Market-1501 metrics (from a distance matrix, or from features in query blocks),
re-ranking, query expansion, PCA whitening, the variants table, pictures, reports.

The numeric functions need only numpy/scipy/faiss; the pipeline (torch, timm) and the
pictures (matplotlib) load on first use, so `from reid_platform.evaluation import
evaluate_rank` stays light.
"""

import importlib

from reid_platform.evaluation.metrics import (
    EvaluationError,
    RankResult,
    compute_distmat,
    distance_blocks,
    evaluate_blocks,
    evaluate_features,
    evaluate_rank,
)
from reid_platform.evaluation.postprocess import (
    PCAWhitening,
    database_augmentation,
    fit_pca_whitening,
    query_expansion,
)
from reid_platform.evaluation.rerank import k_reciprocal_rerank, rerank_blocks, rerank_features
from reid_platform.evaluation.variants import (
    STEPS,
    EvalOptions,
    PostStep,
    ensemble_distance,
    plan_variants,
)

__all__ = [
    "STEPS",
    "EvalLabels",
    "EvalOptions",
    "EvaluationError",
    "ModelEmbeddings",
    "PCAWhitening",
    "PostStep",
    "RankResult",
    "compute_distmat",
    "count_valid_queries",
    "database_augmentation",
    "distance_blocks",
    "ensemble_distance",
    "evaluate_blocks",
    "evaluate_features",
    "evaluate_rank",
    "evaluate_variants",
    "fit_pca_whitening",
    "k_reciprocal_rerank",
    "plan_variants",
    "plot_activation_maps",
    "plot_cmc",
    "plot_embedding_scatter",
    "plot_ranked_lists",
    "query_expansion",
    "rerank_blocks",
    "rerank_features",
    "run_evaluation",
]

_LAZY = {
    **dict.fromkeys(
        [
            "EvalLabels",
            "ModelEmbeddings",
            "count_valid_queries",
            "evaluate_variants",
            "run_evaluation",
        ],
        "reid_platform.evaluation.pipeline",
    ),
    **dict.fromkeys(
        ["plot_activation_maps", "plot_cmc", "plot_embedding_scatter", "plot_ranked_lists"],
        "reid_platform.evaluation.pictures",
    ),
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
