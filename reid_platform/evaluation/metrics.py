"""Re-identification metrics under the Market-1501 protocol: CMC, mAP, mINP.

For each query, gallery items with the same pid *and* the same camera are junk (the same
shot seen by the same camera is not a retrieval), and so are pid -1 items; a query without a
valid match left is skipped and counted. The ranking is vectorised over blocks of queries, so
a Market-sized (3368 x 19732) matrix takes seconds and bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class EvaluationError(ValueError):
    """Evaluation inputs are inconsistent or leave nothing to evaluate."""


@dataclass
class RankResult:
    """CMC curve (length max_rank, in [0, 1]), mAP and mINP over valid queries."""

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid_queries: int
    num_skipped_queries: int
    all_AP: np.ndarray = field(repr=False)  # (num_query,), NaN where skipped
    all_INP: np.ndarray = field(repr=False)

    def rank(self, k: int) -> float:
        """Rank-k accuracy (k >= 1)."""
        return float(self.cmc[min(k, len(self.cmc)) - 1])

    def as_metrics(self) -> dict[str, float]:
        """The names logged to MLflow: rank1/5/10/20, mAP, mINP, score (all in [0, 1])."""
        out = {f"rank{k}": self.rank(k) for k in (1, 5, 10, 20)}
        out.update(mAP=float(self.mAP), mINP=float(self.mINP))
        out["score"] = 0.5 * out["rank1"] + 0.5 * out["mAP"]
        return out


def evaluate_rank(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    ignore_junk_pid: bool = True,
    block_size: int = 256,
) -> RankResult:
    """CMC, mAP and mINP of a query-gallery distance matrix (Market-1501 protocol).

    Args:
        distmat: (num_query, num_gallery), smaller is closer.
        q_pids, q_camids: (num_query,) identities and cameras of the queries.
        g_pids, g_camids: (num_gallery,) identities and cameras of the gallery.
        max_rank: length of the returned CMC curve.
        ignore_junk_pid: treat gallery pid -1 as junk (Market-1501's own evaluation does).
        block_size: queries ranked at once (bounds memory to block_size x num_gallery).

    Returns:
        RankResult; AP is the mean over hits of the precision at that hit, INP is
        (number of true matches) / (rank of the last true match).

    Raises:
        EvaluationError: shapes disagree, or no query has a valid match.
    """
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    if distmat.ndim != 2:
        raise EvaluationError(f"distmat must be 2-D (num_query, num_gallery), got {distmat.shape}")
    num_q, num_g = distmat.shape
    if q_pids.shape != (num_q,) or q_camids.shape != (num_q,):
        raise EvaluationError(
            f"query labels have shapes pids {q_pids.shape}, camids {q_camids.shape}; "
            f"distmat {distmat.shape} needs ({num_q},)"
        )
    if g_pids.shape != (num_g,) or g_camids.shape != (num_g,):
        raise EvaluationError(
            f"gallery labels have shapes pids {g_pids.shape}, camids {g_camids.shape}; "
            f"distmat {distmat.shape} needs ({num_g},)"
        )
    if max_rank < 1:
        raise EvaluationError(f"max_rank must be >= 1, got {max_rank}")

    all_ap = np.full(num_q, np.nan)
    all_inp = np.full(num_q, np.nan)
    first_hit = np.full(num_q, -1, dtype=np.int64)  # rank (0-based, junk removed) of 1st hit
    for start in range(0, num_q, block_size):
        stop = min(start + block_size, num_q)
        # stable sort: ties keep gallery order, like a per-query argsort
        order = np.argsort(distmat[start:stop], axis=1, kind="stable")  # (b, G)
        pid_sorted = g_pids[order]
        same_pid = pid_sorted == q_pids[start:stop, None]  # (b, G)
        junk = same_pid & (g_camids[order] == q_camids[start:stop, None])
        if ignore_junk_pid:
            junk |= pid_sorted == -1
        keep = ~junk
        hits = same_pid & keep  # true matches in ranked order
        position = np.cumsum(keep, axis=1) - 1  # rank among kept items, 0-based
        num_rel = hits.sum(axis=1)  # (b,)
        valid = num_rel > 0
        cum_hits = np.cumsum(hits, axis=1)
        precision = np.where(hits, cum_hits / np.maximum(position + 1.0, 1.0), 0.0)
        ap = precision.sum(axis=1) / np.maximum(num_rel, 1)
        # first and last hit ranks among kept items
        first = np.where(valid, np.argmax(hits, axis=1), 0)
        last = hits.shape[1] - 1 - np.argmax(hits[:, ::-1], axis=1)
        rows = np.arange(stop - start)
        first_rank = position[rows, first]
        last_rank = position[rows, last]
        inp = num_rel / (last_rank + 1.0)
        all_ap[start:stop] = np.where(valid, ap, np.nan)
        all_inp[start:stop] = np.where(valid, inp, np.nan)
        first_hit[start:stop] = np.where(valid, first_rank, -1)

    valid = first_hit >= 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise EvaluationError(
            f"no valid query: none of the {num_q} queries has a true match in the gallery "
            "outside its own camera (check that query and gallery share identities, and give "
            "data without cameras distinct query/gallery camids)"
        )
    ranks = np.arange(max_rank)
    cmc = (first_hit[valid, None] <= ranks[None, :]).mean(axis=0)  # (max_rank,)
    return RankResult(
        cmc=cmc.astype(np.float64),
        mAP=float(np.nanmean(all_ap)),
        mINP=float(np.nanmean(all_inp)),
        num_valid_queries=num_valid,
        num_skipped_queries=num_q - num_valid,
        all_AP=all_ap,
        all_INP=all_inp,
    )


def compute_distmat(
    query_feats: np.ndarray, gallery_feats: np.ndarray, metric: str = "cosine",
    block_size: int = 4096,
) -> np.ndarray:
    """Query-gallery distances, computed in blocks of queries.

    Args:
        query_feats: (num_query, D) float.
        gallery_feats: (num_gallery, D) float.
        metric: "cosine" (1 - cos; features are L2-normalised here first) or "euclidean".

    Returns:
        (num_query, num_gallery) float32, smaller is closer.
    """
    q = np.asarray(query_feats, dtype=np.float32)
    g = np.asarray(gallery_feats, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise EvaluationError(
            f"query features {q.shape} and gallery features {g.shape} must be (N, D) and (M, D)"
        )
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    elif metric != "euclidean":
        raise EvaluationError(f"distance {metric!r} is not known; choose cosine or euclidean")
    out = np.empty((q.shape[0], g.shape[0]), dtype=np.float32)
    g_sq = (g * g).sum(axis=1)
    for start in range(0, q.shape[0], block_size):
        block = q[start : start + block_size]
        dot = block @ g.T
        if metric == "cosine":
            out[start : start + block_size] = 1.0 - dot
        else:
            sq = (block * block).sum(axis=1)[:, None] + g_sq[None, :] - 2.0 * dot
            out[start : start + block_size] = np.sqrt(np.maximum(sq, 0.0))
    return out
