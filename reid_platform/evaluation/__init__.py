"""Evaluation: Market-1501 metrics, re-ranking, query expansion, PCA whitening, reports.

The numeric functions need only numpy/scipy/faiss; the pipeline (torch, timm) and the
pictures (matplotlib) load on first use, so `from reid_platform.evaluation import
evaluate_rank` stays light.
"""

import importlib

from reid_platform.evaluation.metrics import (
    EvaluationError,
    RankResult,
    compute_distmat,
    evaluate_features,
    evaluate_rank,
)
from reid_platform.evaluation.postprocess import (
    PCAWhitening,
    database_augmentation,
    fit_pca_whitening,
    query_expansion,
)
from reid_platform.evaluation.rerank import k_reciprocal_rerank, rerank_features

__all__ = [
    "EvalLabels",
    "EvalOptions",
    "EvaluationError",
    "ModelEmbeddings",
    "PCAWhitening",
    "RankResult",
    "compute_distmat",
    "count_valid_queries",
    "database_augmentation",
    "ensemble_distance",
    "evaluate_features",
    "evaluate_rank",
    "evaluate_variants",
    "fit_pca_whitening",
    "k_reciprocal_rerank",
    "plan_variants",
    "plot_cmc",
    "plot_embedding_scatter",
    "plot_ranked_lists",
    "query_expansion",
    "rerank_features",
    "run_evaluation",
]

_LAZY = {
    **dict.fromkeys(
        [
            "EvalLabels",
            "EvalOptions",
            "ModelEmbeddings",
            "count_valid_queries",
            "ensemble_distance",
            "evaluate_variants",
            "plan_variants",
            "run_evaluation",
        ],
        "reid_platform.evaluation.pipeline",
    ),
    **dict.fromkeys(
        ["plot_cmc", "plot_embedding_scatter", "plot_ranked_lists"],
        "reid_platform.evaluation.report",
    ),
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
