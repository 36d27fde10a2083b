"""Evaluation: Market-1501 metrics, re-ranking, query expansion, PCA whitening, reports."""

from reid_platform.evaluation.metrics import (
    EvaluationError,
    RankResult,
    compute_distmat,
    evaluate_rank,
)

__all__ = ["EvaluationError", "RankResult", "compute_distmat", "evaluate_rank"]
