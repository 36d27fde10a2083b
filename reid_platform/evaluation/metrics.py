"""Re-identification metrics under the Market-1501 protocol: CMC, mAP, mINP.

For each query, gallery items with the same pid *and* the same camera are junk (the same
shot seen by the same camera is not a retrieval), and so are pid -1 items; a query without a
valid match left is skipped and counted.

Exact without sorting whole rows. The metrics need only the rank of every true match among
the kept (non-junk) gallery items, ties broken by gallery order as a stable argsort would.
True matches and same-camera junk are few per query and found once from the labels (a sparse
list of same-identity pairs); a row is then reduced to the items closer than its farthest true
match, and each of those is placed among the row's few match distances by a binary search.
Rows where a non-match ties with a match, or a match distance is NaN, are ranked by a stable
argsort of that row, as before. A Market-sized (3368 x 19732) matrix takes 0.1-0.2 s when the
distances come from a model that ranks matches high, 2-3 s when they are uniformly random.

Two entry points share that ranking: `evaluate_rank` takes a distance matrix;
`evaluate_features` takes the features and computes the distances one block of queries at a
time, so an MSMT17-sized problem (11,659 x 82,161) never holds its 3.6 GiB matrix. Both give
the same `RankResult` for the same inputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

# Bytes of one (block, num_gallery) float32 distance block when the block size is automatic:
# a few arrays of this size live at once while a block is ranked.
BLOCK_BYTES = 64 * 2**20
# Query rows per matrix product. BLAS results depend on the shape of the product, so a fixed
# tile makes every distance independent of how the queries are blocked.
DISTANCE_TILE = 256
METRICS = ("cosine", "euclidean")


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


def auto_block_size(num_gallery: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Queries per block so that one (block, num_gallery) float32 array takes ~block_bytes."""
    return int(np.clip(block_bytes // (4 * max(num_gallery, 1)), 16, 8192))


# ---- ranking -------------------------------------------------------------------------------


class RankAccumulator:
    """Ranks a query-gallery distance matrix one block of query rows at a time.

    Feed every row once, in order (`add`), then read the metrics (`result`). Memory is that of
    the block being ranked plus O(num_query + number of same-identity pairs).

    Args:
        q_pids, q_camids: (num_query,) identities and cameras of the queries.
        g_pids, g_camids: (num_gallery,) identities and cameras of the gallery.
        ignore_junk_pid: treat gallery pid -1 as junk (Market-1501's own evaluation does).

    Raises:
        EvaluationError: label shapes that disagree.
    """

    def __init__(
        self,
        q_pids: np.ndarray,
        g_pids: np.ndarray,
        q_camids: np.ndarray,
        g_camids: np.ndarray,
        ignore_junk_pid: bool = True,
    ):
        q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
        q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
        if q_pids.ndim != 1 or q_camids.shape != q_pids.shape:
            raise EvaluationError(
                f"query labels must be 1-D of one length, got pids {q_pids.shape} and camids "
                f"{q_camids.shape}"
            )
        if g_pids.ndim != 1 or g_camids.shape != g_pids.shape:
            raise EvaluationError(
                f"gallery labels must be 1-D of one length, got pids {g_pids.shape} and camids "
                f"{g_camids.shape}"
            )
        self.num_query, self.num_gallery = len(q_pids), len(g_pids)
        rows, cols = _same_pid_pairs(q_pids, g_pids)
        same_camera = g_camids[cols] == q_camids[rows]
        # A query of pid -1 shares its pid with the gallery's junk: those pairs are junk too.
        junk = same_camera | (ignore_junk_pid & (g_pids[cols] == -1))
        self._hit_rows, self._hit_cols = rows[~junk], cols[~junk]
        self._junk_rows, self._junk_cols = rows[junk], cols[junk]
        self._junk_pid_cols = (
            np.flatnonzero(g_pids == -1) if ignore_junk_pid else np.empty(0, dtype=np.int64)
        )
        self.all_ap = np.full(self.num_query, np.nan)
        self.all_inp = np.full(self.num_query, np.nan)
        self.first_hit = np.full(self.num_query, -1, dtype=np.int64)  # rank of the first match
        self.rows_done = 0

    def add(self, block: np.ndarray, start: int | None = None) -> None:
        """Rank query rows start .. start + len(block) - 1.

        Args:
            block: (b, num_gallery) distances, smaller is closer.
            start: first query row of the block; None = right after the previous block.

        Raises:
            EvaluationError: a block of the wrong width, out of order or past the last query.
        """
        block = np.asarray(block)
        start = self.rows_done if start is None else start
        if block.ndim != 2 or block.shape[1] != self.num_gallery:
            raise EvaluationError(
                f"distance block has shape {block.shape}; expected (rows, {self.num_gallery})"
            )
        stop = start + block.shape[0]
        if start != self.rows_done or stop > self.num_query:
            raise EvaluationError(
                f"distance block of rows {start}..{stop - 1}: expected the block that starts at "
                f"row {self.rows_done} ({self.rows_done} of {self.num_query} query rows done)"
            )
        if not np.issubdtype(block.dtype, np.floating):
            block = block.astype(np.float64)  # NaN marks "no match"; exact for integers < 2^53
        lo, hi = np.searchsorted(self._hit_rows, [start, stop])
        jlo, jhi = np.searchsorted(self._junk_rows, [start, stop])
        ranks, rows, count = _rank_matches(
            block,
            self._hit_rows[lo:hi] - start,
            self._hit_cols[lo:hi],
            self._junk_rows[jlo:jhi] - start,
            self._junk_cols[jlo:jhi],
            self._junk_pid_cols,
        )
        # ranks: (H,) 0-based rank among kept items of each match, grouped by row, in rank order
        valid = count > 0
        ends = np.cumsum(count)
        begins = ends - count
        nth = np.arange(len(ranks)) - np.repeat(begins, count) + 1  # 1-based, per query
        precision = nth / (ranks + 1.0)  # precision at each match
        ap = np.bincount(rows, weights=precision, minlength=len(count)) / np.maximum(count, 1)
        first_rank = np.full(len(count), -1, dtype=np.int64)
        last_rank = np.zeros(len(count), dtype=np.int64)
        first_rank[valid], last_rank[valid] = ranks[begins[valid]], ranks[ends[valid] - 1]
        inp = count / (last_rank + 1.0)
        self.all_ap[start:stop] = np.where(valid, ap, np.nan)
        self.all_inp[start:stop] = np.where(valid, inp, np.nan)
        self.first_hit[start:stop] = first_rank
        self.rows_done = stop

    def result(self, max_rank: int = 50) -> RankResult:
        """The metrics of all rows.

        Raises:
            EvaluationError: rows are missing, or no query has a valid match.
        """
        if max_rank < 1:
            raise EvaluationError(f"max_rank must be >= 1, got {max_rank}")
        if self.rows_done != self.num_query:
            raise EvaluationError(
                f"only {self.rows_done} of {self.num_query} query rows were ranked"
            )
        valid = self.first_hit >= 0
        num_valid = int(valid.sum())
        if num_valid == 0:
            raise EvaluationError(
                f"no valid query: none of the {self.num_query} queries has a true match in the "
                "gallery outside its own camera (check that query and gallery share identities, "
                "and give data without cameras distinct query/gallery camids)"
            )
        ranks = np.arange(max_rank)
        cmc = (self.first_hit[valid, None] <= ranks[None, :]).mean(axis=0)  # (max_rank,)
        return RankResult(
            cmc=cmc.astype(np.float64),
            mAP=float(np.nanmean(self.all_ap)),
            mINP=float(np.nanmean(self.all_inp)),
            num_valid_queries=num_valid,
            num_skipped_queries=self.num_query - num_valid,
            all_AP=self.all_ap,
            all_INP=self.all_inp,
        )


def _same_pid_pairs(q_pids: np.ndarray, g_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (query, gallery) pair with the same pid, sorted by query then gallery index.

    Returns:
        rows, cols: (num_pairs,) int64.
    """
    if len(g_pids) == 0 or len(q_pids) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    order = np.argsort(g_pids, kind="stable")  # gallery grouped by pid, index order inside
    pids, begin, size = np.unique(g_pids[order], return_index=True, return_counts=True)
    slot = np.minimum(np.searchsorted(pids, q_pids), len(pids) - 1)  # (num_query,)
    found = pids[slot] == q_pids
    per_query = np.where(found, size[slot], 0)
    rows = np.repeat(np.arange(len(q_pids)), per_query)
    offset = np.arange(len(rows)) - np.repeat(np.cumsum(per_query) - per_query, per_query)
    cols = order[np.repeat(begin[slot], per_query) + offset]
    return rows.astype(np.int64), cols.astype(np.int64)


def _rank_matches(
    block: np.ndarray,
    hit_rows: np.ndarray,
    hit_cols: np.ndarray,
    junk_rows: np.ndarray,
    junk_cols: np.ndarray,
    junk_pid_cols: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank of every true match among the kept gallery items of its row.

    The order is that of a stable argsort of the row: by distance, ties by gallery index.

    Args:
        block: (b, G) float distances.
        hit_rows, hit_cols: (H,) the true matches (row in the block, gallery column).
        junk_rows, junk_cols: same-identity same-camera pairs, ignored.
        junk_pid_cols: gallery columns ignored for every row (pid -1).

    Returns:
        ranks: (H,) int64 0-based ranks, grouped by row, increasing within a row;
        rows: (H,) the row of each; count: (b,) matches per row.
    """
    num_rows = block.shape[0]
    dist = block[hit_rows, hit_cols]
    order = np.lexsort((hit_cols, dist, hit_rows))  # by row, distance, gallery index
    hit_rows, hit_cols, dist = hit_rows[order], hit_cols[order], dist[order]
    count = np.bincount(hit_rows, minlength=num_rows)
    ends = np.cumsum(count)
    begins = ends - count
    # Only items closer than (or as close as) the farthest match can precede a match.
    farthest = np.full(num_rows, np.nan, dtype=block.dtype)  # NaN compares False: no match
    farthest[count > 0] = dist[ends[count > 0] - 1]
    before = block <= farthest[:, None]  # (b, G) bool
    if junk_pid_cols.size:
        before[:, junk_pid_cols] = False
    before[junk_rows, junk_cols] = False
    before[hit_rows, hit_cols] = False  # other kept items only
    per_row = np.count_nonzero(before, axis=1)
    values = block[before]  # row by row
    value_ends = np.cumsum(per_row)
    ranks = np.empty(len(dist), dtype=np.int64)
    for row in np.flatnonzero(count):
        matches = dist[begins[row] : ends[row]]  # sorted
        others = values[value_ends[row] - per_row[row] : value_ends[row]]
        # slot[i]: how many match distances are <= others[i]
        slot = np.searchsorted(matches, others, side="right")
        padded = np.concatenate(([np.nan], matches))
        if np.isnan(matches[-1]) or np.any(padded[slot] == others):
            # A NaN match, or a non-match at exactly a match's distance: order the whole row.
            ranks[begins[row] : ends[row]] = _ranks_by_argsort(
                block[row],
                hit_cols[begins[row] : ends[row]],
                np.concatenate([junk_pid_cols, junk_cols[junk_rows == row]]),
            )
            continue
        # Items ahead of the j-th match: the non-matches below it, and the j - 1 matches.
        ahead = np.cumsum(np.bincount(slot, minlength=len(matches) + 1))[: len(matches)]
        ranks[begins[row] : ends[row]] = ahead + np.arange(len(matches))
    return ranks, hit_rows, count


def _ranks_by_argsort(row: np.ndarray, hit_cols: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based ranks of hit_cols among the row's non-junk items under a stable argsort."""
    kept = np.ones(len(row), dtype=bool)
    kept[junk] = False
    kept_cols = np.flatnonzero(kept)
    order = np.argsort(row[kept_cols], kind="stable")
    position = np.empty(len(kept_cols), dtype=np.int64)
    position[order] = np.arange(len(kept_cols))
    return position[np.searchsorted(kept_cols, hit_cols)]


# ---- entry points --------------------------------------------------------------------------


def evaluate_rank(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    ignore_junk_pid: bool = True,
    block_size: int | None = None,
) -> RankResult:
    """CMC, mAP and mINP of a query-gallery distance matrix (Market-1501 protocol).

    Args:
        distmat: (num_query, num_gallery), smaller is closer.
        q_pids, q_camids: (num_query,) identities and cameras of the queries.
        g_pids, g_camids: (num_gallery,) identities and cameras of the gallery.
        max_rank: length of the returned CMC curve.
        ignore_junk_pid: treat gallery pid -1 as junk (Market-1501's own evaluation does).
        block_size: queries ranked at once (None: ~64 MiB blocks).

    Returns:
        RankResult; AP is the mean over hits of the precision at that hit, INP is
        (number of true matches) / (rank of the last true match). Ties in distance are ranked
        in gallery order.

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
    block_size = block_size or auto_block_size(num_g)
    return evaluate_blocks(
        ((start, distmat[start : start + block_size]) for start in range(0, num_q, block_size)),
        q_pids, g_pids, q_camids, g_camids, max_rank, ignore_junk_pid,
    )  # fmt: skip


def evaluate_blocks(
    blocks: Iterable[tuple[int, np.ndarray]],
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    ignore_junk_pid: bool = True,
) -> RankResult:
    """`evaluate_rank` of a distance matrix given as consecutive blocks of query rows.

    Args:
        blocks: (start, (b, num_gallery) distances) covering rows 0..num_query-1 in order,
            e.g. from `distance_blocks` or `rerank_blocks`.

    Raises:
        EvaluationError: blocks that are missing, out of order or of the wrong width; no
            valid query.
    """
    accumulator = RankAccumulator(q_pids, g_pids, q_camids, g_camids, ignore_junk_pid)
    for start, block in blocks:
        accumulator.add(block, start)
        del block  # one block alive at a time, also while the next is produced
    return accumulator.result(max_rank)


def evaluate_features(
    query_feats: np.ndarray,
    gallery_feats: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    metric: str = "cosine",
    max_rank: int = 50,
    ignore_junk_pid: bool = True,
    block_size: int | None = None,
) -> RankResult:
    """`evaluate_rank(compute_distmat(query_feats, gallery_feats, metric), ...)` in query blocks.

    The same result, without the (num_query, num_gallery) matrix: at MSMT17 size (11,659 x
    82,161) the matrix alone would be 3.6 GiB; here a block of ~64 MiB lives at a time.

    Args:
        query_feats: (num_query, D) float.
        gallery_feats: (num_gallery, D) float.
        q_pids, q_camids: (num_query,) identities and cameras.
        g_pids, g_camids: (num_gallery,) identities and cameras.
        metric: "cosine" (1 - cos) or "euclidean".
        max_rank: length of the CMC curve.
        ignore_junk_pid: gallery pid -1 is junk.
        block_size: queries per block (None: ~64 MiB blocks).

    Raises:
        EvaluationError: shapes that disagree, an unknown metric, no valid query.
    """
    q_pids, q_camids = np.asarray(q_pids), np.asarray(q_camids)
    num_query = np.shape(query_feats)[0] if np.ndim(query_feats) == 2 else -1
    if q_pids.shape != (num_query,) or q_camids.shape != (num_query,):
        raise EvaluationError(
            f"query features have shape {np.shape(query_feats)} but query labels have shapes "
            f"pids {q_pids.shape}, camids {q_camids.shape}"
        )
    g_pids, g_camids = np.asarray(g_pids), np.asarray(g_camids)
    num_gallery = np.shape(gallery_feats)[0] if np.ndim(gallery_feats) == 2 else -1
    if g_pids.shape != (num_gallery,) or g_camids.shape != (num_gallery,):
        raise EvaluationError(
            f"gallery features have shape {np.shape(gallery_feats)} but gallery labels have "
            f"shapes pids {g_pids.shape}, camids {g_camids.shape}"
        )
    blocks = distance_blocks(query_feats, gallery_feats, metric, block_size)
    return evaluate_blocks(blocks, q_pids, g_pids, q_camids, g_camids, max_rank, ignore_junk_pid)


# ---- distances -----------------------------------------------------------------------------


def _prepare_feats(
    query_feats: np.ndarray, gallery_feats: np.ndarray, metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """float32 features (L2-normalised for cosine) and, for Euclidean, their squared norms."""
    q = np.asarray(query_feats, dtype=np.float32)
    g = np.asarray(gallery_feats, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise EvaluationError(
            f"query features {q.shape} and gallery features {g.shape} must be (N, D) and (M, D)"
        )
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        return q, g, None, None
    if metric != "euclidean":
        raise EvaluationError(f"distance {metric!r} is not known; choose one of {METRICS}")
    return q, g, (q * q).sum(axis=1), (g * g).sum(axis=1)


def _fill_distances(
    out: np.ndarray,
    q: np.ndarray,
    g: np.ndarray,
    q_sq: np.ndarray | None,
    g_sq: np.ndarray | None,
) -> None:
    """out[i] = distances of query row i to the gallery, one fixed-size product at a time.

    Args:
        out: (len(q), len(g)) float32, written in place.
        q, g, q_sq, g_sq: from `_prepare_feats`; q_sq is None for cosine.
    """
    for start in range(0, len(q), DISTANCE_TILE):
        view = out[start : start + DISTANCE_TILE]  # (t, M)
        np.matmul(q[start : start + DISTANCE_TILE], g.T, out=view)
        if q_sq is None:
            np.subtract(1.0, view, out=view)  # 1 - cos
        else:
            view *= -2.0
            view += q_sq[start : start + DISTANCE_TILE, None]
            view += g_sq[None, :]
            np.maximum(view, 0.0, out=view)
            np.sqrt(view, out=view)


def distance_blocks(
    query_feats: np.ndarray,
    gallery_feats: np.ndarray,
    metric: str = "cosine",
    block_size: int | None = None,
):
    """Consecutive query blocks of the distance matrix `compute_distmat` returns (the same
    values bit for bit: every product covers the same fixed tile of query rows).

    Validates the inputs at once; the distances are computed as the blocks are drawn.

    Args:
        query_feats: (num_query, D) float.
        gallery_feats: (num_gallery, D) float.
        metric: "cosine" (1 - cos of L2-normalised features) or "euclidean".
        block_size: query rows per block, rounded up to a multiple of DISTANCE_TILE
            (None: ~64 MiB blocks).

    Returns:
        An iterator of (start, (b, num_gallery) float32 distances), smaller is closer.

    Raises:
        EvaluationError: shapes that disagree or an unknown metric.
    """
    q, g, q_sq, g_sq = _prepare_feats(query_feats, gallery_feats, metric)
    rows = block_size or auto_block_size(len(g))
    rows = -(-rows // DISTANCE_TILE) * DISTANCE_TILE

    def blocks():
        for start in range(0, len(q), rows):
            stop = min(start + rows, len(q))
            block = np.empty((stop - start, len(g)), dtype=np.float32)
            _fill_distances(
                block, q[start:stop], g, None if q_sq is None else q_sq[start:stop], g_sq
            )
            yield start, block
            del block  # before the next one is allocated

    return blocks()


def compute_distmat(
    query_feats: np.ndarray, gallery_feats: np.ndarray, metric: str = "cosine"
) -> np.ndarray:
    """Query-gallery distances.

    Computed in fixed tiles of DISTANCE_TILE query rows, so `distance_blocks` gives the same
    bits whatever its block size.

    Args:
        query_feats: (num_query, D) float.
        gallery_feats: (num_gallery, D) float.
        metric: "cosine" (1 - cos; features are L2-normalised here first) or "euclidean".

    Returns:
        (num_query, num_gallery) float32, smaller is closer.

    Raises:
        EvaluationError: shapes that disagree or an unknown metric.
    """
    q, g, q_sq, g_sq = _prepare_feats(query_feats, gallery_feats, metric)
    out = np.empty((len(q), len(g)), dtype=np.float32)
    _fill_distances(out, q, g, q_sq, g_sq)
    return out
