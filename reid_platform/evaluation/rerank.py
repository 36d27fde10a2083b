"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017).

Two entry points compute the same re-ranked distance:

* `k_reciprocal_rerank` takes the three distance matrices, like the widely used reference
  (`re_ranking` in torchreid `torchreid/utils/rerank.py`, fast-reid, and the BoT baseline
  `utils/re_ranking.py`), and reproduces its arithmetic step by step. It holds several dense
  (N+M)^2 matrices, so it only fits small and medium test sets.
* `rerank_features` takes the features. It never builds an (N+M)^2 matrix: neighbour lists come
  from a chunked float32 scan (or FAISS) and are re-ordered in float64, the k-reciprocal
  encodings are sparse, and only the (num_query, num_gallery) output is dense. Market-1501
  (3368 x 15913) takes about 0.4 GB above its features.
* `rerank_blocks` is `rerank_features` handed out in blocks of query rows, so not even the
  output is held: what MSMT17 (11,659 x 82,161) needs to be re-ranked and scored.

The reference algorithm, with P = N+M points (queries first, then gallery):

1. D = the full (P, P) distance matrix, squared elementwise (np.power(., 2)); each column is
   divided by its maximum and the result transposed. For a symmetric D that is row i divided
   by the largest squared distance from point i to any of the P points.
2. initial_rank = argsort of each row. R(i, k) = {j in the k+1 nearest of i : i in the k+1
   nearest of j} is the k-reciprocal set (the +1 accounts for the point itself).
3. The expansion set of i is R(i, k1) united with every R(c, round(k1/2)) (c in R(i, k1)) that
   shares more than 2/3 of its members with R(i, k1).
4. V[i, j] = exp(-D[i, j]) over the expansion set, normalised to sum 1 over the row.
5. If k2 != 1: local query expansion, V[i] = mean of V over the k2 nearest rows of i.
6. Jaccard distance 1 - s / (2 - s) with s = sum_k min(V[q, k], V[g, k]).
7. final = (1 - lambda) * jaccard + lambda * D, restricted to (query rows, gallery columns).

The reference squares whatever it is given. torchreid feeds its own distance matrices (plain
Euclidean here gives squared Euclidean inside, the quantity the BoT version computes from the
features); `rerank_features(metric="euclidean")` equals `k_reciprocal_rerank` fed the plain
Euclidean distances, and `metric="cosine"` equals it fed 1 - q.g of L2-normalised features.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

__all__ = ["k_reciprocal_rerank", "rerank_blocks", "rerank_features"]

_METRICS = ("cosine", "euclidean")
_BACKENDS = ("auto", "numpy", "faiss")
# Upper bound on (query, shared column, gallery) triples expanded at once in the Jaccard term:
# about 4 arrays of this length live together, i.e. ~100 MB.
_JACCARD_TRIPLES_PER_CHUNK = 4_000_000
# Neighbours fetched beyond the needed k from the float32 scan, then re-ordered in float64.
_EXTRA_CANDIDATES = 8
# One point in this many bounds the k-th nearest distance in the scan.
_SAMPLE_STEP = 8
# Bytes of one (query rows, num_gallery) float32 block of the output handed out at a time.
_OUTPUT_BLOCK_BYTES = 64 * 2**20


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _check_rerank_params(k1: int, k2: int, lambda_value: float) -> None:
    if int(k1) != k1 or k1 < 1:
        raise ValueError(f"k1 must be an integer >= 1, got {k1!r}")
    if int(k2) != k2 or k2 < 1:
        raise ValueError(f"k2 must be an integer >= 1, got {k2!r}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value!r}")


def _half_k(k1: int) -> int:
    # The reference uses int(np.around(k1 / 2)): round half to even (k1=5 -> 2, k1=7 -> 4).
    return int(np.around(k1 / 2.0))


def _reciprocal_mask(forward: np.ndarray, chunk_size: int = 4096) -> np.ndarray:
    """Marks which forward neighbours are reciprocal.

    Args:
        forward: (P, K) int, the K nearest points of every point (itself included).

    Returns:
        (P, K) bool, True at [i, t] when i is among the K nearest of forward[i, t].
    """
    num_points, k = forward.shape
    mask = np.empty((num_points, k), dtype=bool)
    for start in range(0, num_points, chunk_size):
        stop = min(start + chunk_size, num_points)
        backward = forward[forward[start:stop]]  # (c, K, K): neighbours of the neighbours
        own = np.arange(start, stop)[:, None, None]
        mask[start:stop] = (backward == own).any(axis=2)
    return mask


def _k_reciprocal_expansion(neighbours: np.ndarray, k1: int, chunk_size: int = 1024):
    """Expanded k-reciprocal sets of every point (steps 2-3 of the module docstring).

    Args:
        neighbours: (P, K) int, every point's nearest points in increasing distance, with
            K >= min(k1 + 1, P).
        k1: size of the k-reciprocal neighbourhood.

    Returns:
        (rows, cols): int64 arrays of equal length, the (point, member) pairs of all expansion
            sets, without duplicates, sorted by row then column.
    """
    num_points = neighbours.shape[0]
    forward = neighbours[:, : min(k1 + 1, num_points)]  # (P, K1)
    half_forward = neighbours[:, : min(_half_k(k1) + 1, num_points)]  # (P, H1)
    in_set = _reciprocal_mask(forward)  # R(i, k1) as a mask over forward[i]
    in_half_set = _reciprocal_mask(half_forward)  # R(i, k1/2) as a mask over half_forward[i]
    half_set_size = in_half_set.sum(axis=1)

    rows, cols = [], []
    for start in range(0, num_points, chunk_size):
        stop = min(start + chunk_size, num_points)
        fwd = forward[start:stop]  # (c, K1); the candidates are the members of R(i, k1)
        members = np.where(in_set[start:stop], fwd, -1)  # (c, K1), -1 outside R(i, k1)
        cand_in_half = in_half_set[fwd]  # (c, K1, H1)
        cand_half = np.where(cand_in_half, half_forward[fwd], -2)  # (c, K1, H1) R(cand, k1/2)
        # |R(cand, k1/2) & R(i, k1)|: both are sets, so counting matches is np.intersect1d.
        overlap = (cand_half[..., None] == members[:, None, None, :]).any(axis=3).sum(axis=2)
        accept = in_set[start:stop] & (overlap > 2.0 / 3.0 * half_set_size[fwd])  # (c, K1)

        own = np.arange(start, stop)
        rows.append(np.broadcast_to(own[:, None], fwd.shape)[in_set[start:stop]])
        cols.append(fwd[in_set[start:stop]])
        take = accept[..., None] & cand_in_half  # (c, K1, H1)
        rows.append(np.broadcast_to(own[:, None, None], take.shape)[take])
        cols.append(half_forward[fwd][take])

    rows = np.concatenate(rows).astype(np.int64)
    cols = np.concatenate(cols).astype(np.int64)
    pattern = sp.coo_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(num_points, num_points)
    ).tocsr()
    pattern.sum_duplicates()  # also sorts the column indices of each row
    rows = np.repeat(np.arange(num_points), np.diff(pattern.indptr))
    return rows, pattern.indices.astype(np.int64)


def _row_normalised_weights(rows: np.ndarray, dist: np.ndarray, num_points: int) -> np.ndarray:
    """exp(-dist) normalised to sum 1 within each row (step 4); (nnz,) float32."""
    weight = np.exp(-dist.astype(np.float32))
    row_sum = np.bincount(rows, weights=weight, minlength=num_points)
    return (weight / row_sum[rows]).astype(np.float32)


def _safe_max(max_dist: np.ndarray) -> np.ndarray:
    # An all-zero column (every point identical) would divide 0 by 0; leave it at 0 instead.
    return np.where(max_dist > 0, max_dist, 1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Dense reference version
# --------------------------------------------------------------------------------------------


def _check_dense_shapes(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray):
    for name, mat in (("q_g_dist", q_g_dist), ("q_q_dist", q_q_dist), ("g_g_dist", g_g_dist)):
        if mat.ndim != 2:
            raise ValueError(f"{name} must be a 2-D matrix, got shape {mat.shape}")
    num_query, num_gallery = q_g_dist.shape
    if num_query == 0 or num_gallery == 0:
        raise ValueError(f"q_g_dist must be non-empty, got shape {q_g_dist.shape}")
    if q_q_dist.shape != (num_query, num_query):
        raise ValueError(
            f"q_q_dist has shape {q_q_dist.shape} but q_g_dist has shape {q_g_dist.shape}: "
            f"expected q_q_dist of shape {(num_query, num_query)}"
        )
    if g_g_dist.shape != (num_gallery, num_gallery):
        raise ValueError(
            f"g_g_dist has shape {g_g_dist.shape} but q_g_dist has shape {q_g_dist.shape}: "
            f"expected g_g_dist of shape {(num_gallery, num_gallery)}"
        )


def k_reciprocal_rerank(
    q_g_dist: np.ndarray,
    q_q_dist: np.ndarray,
    g_g_dist: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """k-reciprocal re-ranking from dense distance matrices, as in the reference implementation.

    Follows the arithmetic of the reference `re_ranking` (torchreid, fast-reid, BoT) and agrees
    with it to float32 rounding; ties in a row are broken by the same `np.argsort` call. Memory
    is O((N+M)^2) (about 30 bytes per entry); use `rerank_features` for large galleries.

    Args:
        q_g_dist: (num_query, num_gallery) query-gallery distances, smaller is closer. They are
            squared inside, like the reference: pass plain (not squared) Euclidean distances,
            or 1 - cosine similarity.
        q_q_dist: (num_query, num_query) query-query distances.
        g_g_dist: (num_gallery, num_gallery) gallery-gallery distances.
        k1: size of the k-reciprocal neighbourhood (paper: 20).
        k2: size of the local query expansion (paper: 6); 1 disables it.
        lambda_value: weight of the original distance in the result (paper: 0.3).

    Returns:
        (num_query, num_gallery) float32 re-ranked distances, smaller is closer.

    Raises:
        ValueError: if the shapes do not fit together or a parameter is out of range.
    """
    _check_rerank_params(k1, k2, lambda_value)
    q_g_dist, q_q_dist, g_g_dist = (np.asarray(m) for m in (q_g_dist, q_q_dist, g_g_dist))
    _check_dense_shapes(q_g_dist, q_q_dist, g_g_dist)
    num_query, num_gallery = q_g_dist.shape
    num_points = num_query + num_gallery

    original_dist = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]])  # (P, P)
    original_dist = np.power(original_dist, 2).astype(np.float32)
    # Column i divided by its max, then transposed: row i holds the distances to point i.
    original_dist = np.transpose(original_dist / _safe_max(np.max(original_dist, axis=0)))
    initial_rank = np.argsort(original_dist)  # (P, P); same call as the reference (ties)

    rows, cols = _k_reciprocal_expansion(initial_rank[:, : min(k1 + 1, num_points)], k1)
    V = np.zeros((num_points, num_points), dtype=np.float32)
    V[rows, cols] = _row_normalised_weights(rows, original_dist[rows, cols], num_points)

    if k2 != 1:
        expansion = initial_rank[:, :k2]  # (P, k2'), k2' = min(k2, P)
        V_qe = np.empty_like(V)
        step = max(1, 2**25 // (expansion.shape[1] * num_points))  # ~128 MB of gathered rows
        for start in range(0, num_points, step):
            V_qe[start : start + step] = V[expansion[start : start + step]].mean(axis=1)
        V = V_qe
    del initial_rank

    V_gallery = V[num_query:]  # (M, P)
    final_dist = np.empty((num_query, num_gallery), dtype=np.float32)
    for i in range(num_query):
        shared = np.flatnonzero(V[i])
        # sum_k min(V[i, k], V[g, k]); columns where V[i] is zero add nothing.
        min_sum = np.minimum(V[i, shared], V_gallery[:, shared]).sum(axis=1)  # (M,)
        jaccard = 1 - min_sum / (2.0 - min_sum)
        final_dist[i] = jaccard * (1 - lambda_value) + original_dist[i, num_query:] * lambda_value
    return final_dist


# --------------------------------------------------------------------------------------------
# Scalable version from features
# --------------------------------------------------------------------------------------------


def _squared_dist_block(
    a: np.ndarray, b: np.ndarray, b_sq_norms: np.ndarray | None, metric: str
) -> np.ndarray:
    """(len(a), len(b)) float32 squared base distances: (1 - a.b)^2 or ||a - b||^2."""
    block = a @ b.T
    if metric == "cosine":
        np.subtract(1.0, block, out=block)
        np.multiply(block, block, out=block)
    else:
        block *= -2.0
        block += np.einsum("ij,ij->i", a, a)[:, None]
        block += b_sq_norms[None, :]
        np.maximum(block, 0.0, out=block)
    return block


def _squared_dist_pairs(
    points: np.ndarray,
    sq_norms: np.ndarray | None,
    rows: np.ndarray,
    cols: np.ndarray,
    metric: str,
    batch: int = 8192,
) -> np.ndarray:
    """Squared base distance of the point pairs (rows[t], cols[t]); (len(rows),) float32."""
    out = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), batch):
        r, c = rows[start : start + batch], cols[start : start + batch]
        dot = np.einsum("ij,ij->i", points[r], points[c])
        if metric == "cosine":
            d = 1.0 - dot
            out[start : start + batch] = d * d
        else:
            out[start : start + batch] = np.maximum(sq_norms[r] + sq_norms[c] - 2.0 * dot, 0.0)
    return out


def _scan_neighbours_numpy(
    points: np.ndarray, sq_norms: np.ndarray | None, k: int, metric: str, chunk_size: int
):
    """One chunked float32 pass over the (P, P) distances: k nearest candidates (unordered) and
    the largest distance of every row.

    The k nearest of a row are found without a partition of the whole row: the k-th smallest
    distance to an evenly spaced sample of the points bounds the row's k-th smallest from above,
    so the items at or below it (about k * _SAMPLE_STEP per row) hold the k nearest.

    Returns:
        candidates: (P, k) int64; row_max: (P,) float32 largest squared distance from each
            point to any point.
    """
    num_points = len(points)
    candidates = np.empty((num_points, k), dtype=np.int64)
    row_max = np.empty(num_points, dtype=np.float32)
    sample = np.arange(0, num_points, _SAMPLE_STEP)
    use_sample = len(sample) >= 4 * k  # else a plain partition of the row is as cheap
    for start in range(0, num_points, chunk_size):
        stop = min(start + chunk_size, num_points)
        block = _squared_dist_block(points[start:stop], points, sq_norms, metric)  # (c, P)
        row_max[start:stop] = block.max(axis=1)
        if k >= num_points:
            candidates[start:stop] = np.arange(num_points)
        elif not use_sample:
            candidates[start:stop] = np.argpartition(block, k - 1, axis=1)[:, :k]
        else:
            bound = np.partition(block[:, sample], k - 1, axis=1)[:, k - 1]  # (c,)
            candidates[start:stop] = _k_smallest_below(block, bound, k)
        del block
    return candidates, row_max


def _k_smallest_below(block: np.ndarray, bound: np.ndarray, k: int) -> np.ndarray:
    """Columns of the k smallest entries of each row, given a bound with >= k entries below.

    Args:
        block: (c, P) float32.
        bound: (c,) with at least k entries of row i <= bound[i].

    Returns:
        (c, k) int64 column indices, unordered.
    """
    rows, cols = np.nonzero(block <= bound[:, None])  # row-major: grouped by row
    per_row = np.bincount(rows, minlength=len(block))
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    values = np.full((len(block), per_row.max()), np.inf, dtype=np.float32)  # (c, width)
    values[rows, slot] = block[rows, cols]
    columns = np.zeros(values.shape, dtype=np.int64)
    columns[rows, slot] = cols
    if values.shape[1] > k:
        pick = np.argpartition(values, k - 1, axis=1)[:, :k]
        columns = np.take_along_axis(columns, pick, axis=1)
    return columns[:, :k]


def _exact_nearest(points: np.ndarray, candidates: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Orders each row's candidates by their distance recomputed in float64, keeps the first k.

    High-dimensional features have concentrated distances: neighbours ranked ~k1 apart can
    differ by 1e-6 relative, about the float32 error of a BLAS product. Re-ranking a few extra
    candidates in float64 makes the k-nearest sets those of exact arithmetic, like the dense
    reference fed with accurate distances.

    Args:
        points: (P, D) float32.
        candidates: (P, K') int64, a superset of every row's k nearest, K' >= k.

    Returns:
        (P, k) int64 nearest points, increasing distance.
    """
    num_points, num_cand = candidates.shape
    nearest = np.empty((num_points, k), dtype=np.int64)
    step = max(1, 2**21 // (num_cand * points.shape[1]))  # ~16 MB of gathered float64 rows
    for start in range(0, num_points, step):
        cand = candidates[start : start + step]  # (c, K')
        own = points[start : start + step, None, :].astype(np.float64)  # (c, 1, D)
        others = points[cand].astype(np.float64)  # (c, K', D)
        if metric == "cosine":
            dist = 1.0 - np.einsum("cid,ckd->ck", own, others)
            dist *= dist
        else:
            others -= own
            dist = np.einsum("ckd,ckd->ck", others, others)
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        nearest[start : start + step] = np.take_along_axis(cand, order, axis=1)
    return nearest


def _faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _scan_neighbours_faiss(points: np.ndarray, sq_norms: np.ndarray | None, k: int, metric: str):
    """Same outputs as `_scan_neighbours_numpy`, from exact FAISS flat searches (GPU if any).

    The largest distance is a farthest-point search: for cosine, the nearest by inner product
    to -x; for Euclidean, max_y ||x - y||^2 = ||x||^2 + max_y [-2x, 1].[y, ||y||^2].
    """
    import faiss

    dim = points.shape[1]
    gpu = _faiss_has_gpu()
    resources = faiss.StandardGpuResources() if gpu else None

    def search(index, base, queries, n):
        if gpu:
            index = faiss.index_cpu_to_gpu(resources, 0, index)
        index.add(np.ascontiguousarray(base))
        return index.search(np.ascontiguousarray(queries), n)

    if metric == "cosine":
        _, candidates = search(faiss.IndexFlatIP(dim), points, points, k)
        farthest, _ = search(faiss.IndexFlatIP(dim), points, -points, 1)
        row_max = np.square(1.0 + farthest[:, 0])
    else:
        _, candidates = search(faiss.IndexFlatL2(dim), points, points, k)
        lifted = np.hstack([points, sq_norms[:, None]])  # (P, D+1)
        lifted_queries = np.hstack([-2.0 * points, np.ones((len(points), 1), np.float32)])
        farthest, _ = search(faiss.IndexFlatIP(dim + 1), lifted, lifted_queries, 1)
        row_max = np.maximum(sq_norms + farthest[:, 0], 0.0)
    return candidates.astype(np.int64), row_max.astype(np.float32)


def _jaccard_chunks(V_query: sp.csr_matrix, V_gallery_t: sp.csr_matrix, max_rows: int):
    """Splits the query rows so that each chunk expands at most ~4M Jaccard triples."""
    gallery_per_column = np.diff(V_gallery_t.indptr)  # how many gallery rows use column k
    entry_cost = np.concatenate([[0], np.cumsum(gallery_per_column[V_query.indices])])
    row_cost = entry_cost[V_query.indptr[1:]] - entry_cost[V_query.indptr[:-1]]
    start, cost = 0, 0
    for i, c in enumerate(row_cost):
        if i > start and (cost + c > _JACCARD_TRIPLES_PER_CHUNK or i - start >= max_rows):
            yield start, i
            start, cost = i, 0
        cost += c
    yield start, len(row_cost)


def _min_sum_block(V_query: sp.csr_matrix, V_gallery_t: sp.csr_matrix) -> np.ndarray:
    """s[q, g] = sum_k min(V[q, k], V[g, k]) for a chunk of queries, from the inverted index.

    min() is not bilinear, so this is not a plain sparse product; it walks the same
    (query, column, gallery) triples a sparse product V_q @ V_g.T would, reducing with min-sum.

    Args:
        V_query: (c, P) CSR weights of c queries.
        V_gallery_t: (P, M) CSR, the gallery weights transposed: row k lists the gallery items
            with V[g, k] != 0 (the inverted index).

    Returns:
        (c, M) float64.
    """
    num_rows, num_gallery = V_query.shape[0], V_gallery_t.shape[1]
    hits = V_gallery_t[V_query.indices]  # one row per stored query entry (query, k)
    per_entry = np.diff(hits.indptr)
    query_value = np.repeat(V_query.data, per_entry)
    query_row = np.repeat(np.repeat(np.arange(num_rows), np.diff(V_query.indptr)), per_entry)
    flat = query_row * num_gallery + hits.indices
    min_sum = np.bincount(
        flat, weights=np.minimum(query_value, hits.data), minlength=num_rows * num_gallery
    )
    return min_sum.reshape(num_rows, num_gallery)


def rerank_features(
    query_feats: np.ndarray,
    gallery_feats: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "cosine",
    chunk_size: int = 512,
    backend: str = "auto",
) -> np.ndarray:
    """k-reciprocal re-ranking from features, without any (N+M)^2 matrix.

    Gives the result of `k_reciprocal_rerank` fed with the dense distances of the same features
    (1 - q.g of L2-normalised features for "cosine", plain Euclidean for "euclidean"), to
    float32 rounding and up to the order of exactly tied neighbours. Memory is
    O((N+M) * (chunk_size + k1^2 * k2) + N * M): Market-1501 (3368 x 15913) needs a few hundred
    MB. `rerank_blocks` hands out the same result in blocks of query rows, without the N * M.

    Args:
        query_feats: (num_query, dim) float query features.
        gallery_feats: (num_gallery, dim) float gallery features.
        k1: size of the k-reciprocal neighbourhood (paper: 20).
        k2: size of the local query expansion (paper: 6); 1 disables it.
        lambda_value: weight of the original distance in the result (paper: 0.3).
        metric: "cosine" (distance 1 - q.g; rows not already of unit length are
            L2-normalised first) or "euclidean".
        chunk_size: rows of the (N+M, N+M) distance matrix computed at once; memory per chunk
            is about 6 * chunk_size * (N+M) bytes.
        backend: nearest-neighbour search. "numpy": one chunked BLAS pass that yields the
            neighbours and each row's largest distance together; "faiss": exact FAISS flat
            indexes (on the GPU when faiss has GPU support); "auto": faiss with a GPU, else numpy.

    Returns:
        (num_query, num_gallery) float32 re-ranked distances, smaller is closer.

    Raises:
        ValueError: on feature shapes that do not fit together, non-finite features, or a
            parameter out of range.
    """
    blocks = rerank_blocks(
        query_feats, gallery_feats, k1, k2, lambda_value, metric, chunk_size, backend
    )
    final_dist = np.empty((len(query_feats), len(gallery_feats)), dtype=np.float32)
    for start, block in blocks:
        final_dist[start : start + len(block)] = block
    return final_dist


def rerank_blocks(
    query_feats: np.ndarray,
    gallery_feats: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "cosine",
    chunk_size: int = 512,
    backend: str = "auto",
    block_bytes: int = _OUTPUT_BLOCK_BYTES,
) -> Iterator[tuple[int, np.ndarray]]:
    """`rerank_features` handed out in consecutive blocks of query rows.

    The neighbour search and the sparse encodings (the slow part) run when this is called,
    and the inputs are checked then; each block's Jaccard and original distances are computed
    as it is drawn. Nothing of size N * M is held: at MSMT17 size (11,659 x 82,161) the whole
    re-ranking stays around a gigabyte where the output alone would be 3.6 GiB.

    Args:
        query_feats, gallery_feats, k1, k2, lambda_value, metric, chunk_size, backend: as in
            `rerank_features`.
        block_bytes: size of one handed-out (rows, num_gallery) float32 block.

    Returns:
        An iterator of (start, (b, num_gallery) float32 re-ranked distances of queries
        start .. start + b - 1), smaller is closer.

    Raises:
        ValueError: as `rerank_features`.
    """
    _check_rerank_params(k1, k2, lambda_value)
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    query_feats, gallery_feats = np.asarray(query_feats), np.asarray(gallery_feats)
    if query_feats.ndim != 2 or gallery_feats.ndim != 2:
        raise ValueError(
            f"query_feats and gallery_feats must be 2-D (num, dim), got shapes "
            f"{query_feats.shape} and {gallery_feats.shape}"
        )
    if query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(
            f"query_feats has shape {query_feats.shape} but gallery_feats has shape "
            f"{gallery_feats.shape}: the feature dimensions must match"
        )
    if len(query_feats) == 0 or len(gallery_feats) == 0:
        raise ValueError(
            f"need at least one query and one gallery item, got shapes {query_feats.shape} "
            f"and {gallery_feats.shape}"
        )

    num_query, num_gallery = len(query_feats), len(gallery_feats)
    num_points = num_query + num_gallery
    points = np.concatenate([query_feats, gallery_feats]).astype(np.float32)  # (P, D)
    if not np.isfinite(points).all():
        raise ValueError("query_feats and gallery_feats must be finite (found NaN or inf)")
    sq_norms = None
    if metric == "cosine":
        norms = np.linalg.norm(points, axis=1)
        # Unit-length features are used bit for bit: normalising them again moves distances
        # by ~1e-8, enough to swap two neighbours whose distances are that close.
        if np.abs(norms - 1.0).max() > 1e-4:
            points /= np.maximum(norms, 1e-12)[:, None]
    else:
        sq_norms = np.einsum("ij,ij->i", points, points)  # (P,)

    # Steps 1-2: nearest neighbours and every row's largest squared distance (the normaliser).
    k_max = min(max(k1 + 1, k2), num_points)
    num_cand = min(k_max + _EXTRA_CANDIDATES, num_points)
    if backend == "faiss" or (backend == "auto" and _faiss_has_gpu()):
        candidates, row_max = _scan_neighbours_faiss(points, sq_norms, num_cand, metric)
    else:
        candidates, row_max = _scan_neighbours_numpy(points, sq_norms, num_cand, metric, chunk_size)
    neighbours = _exact_nearest(points, candidates, k_max, metric)  # (P, k_max)
    row_max = _safe_max(row_max)

    # Steps 3-4: sparse k-reciprocal encodings V, (P, P) CSR.
    rows, cols = _k_reciprocal_expansion(neighbours, k1)
    dist = _squared_dist_pairs(points, sq_norms, rows, cols, metric) / row_max[rows]
    weights = _row_normalised_weights(rows, dist, num_points)
    V = sp.csr_matrix((weights, (rows, cols)), shape=(num_points, num_points))

    # Step 5: V <- A @ V, A[i, j] = 1/k2 on the k2 nearest j of i.
    if k2 != 1:
        expansion = neighbours[:, :k2]  # (P, k2'), k2' = min(k2, P)
        A = sp.csr_matrix(
            (
                np.full(expansion.size, 1.0 / expansion.shape[1], dtype=np.float32),
                (np.repeat(np.arange(num_points), expansion.shape[1]), expansion.ravel()),
            ),
            shape=(num_points, num_points),
        )
        V = (A @ V).tocsr()
    V.sort_indices()
    V_query = V[:num_query]  # (N, P)
    V_gallery_t = V[num_query:].T.tocsr()  # (P, M): the inverted index

    # Steps 6-7, one chunk of queries at a time.
    gallery = points[num_query:]
    gallery_sq = None if sq_norms is None else sq_norms[num_query:]
    max_rows = max(1, min(chunk_size, block_bytes // (4 * num_gallery)))

    def blocks():
        for start, stop in _jaccard_chunks(V_query, V_gallery_t, max_rows):
            # In place on (c, M) float32 blocks, the largest temporaries of this stage.
            block = _min_sum_block(V_query[start:stop], V_gallery_t).astype(np.float32)
            block /= 2.0 - block
            np.subtract(1.0, block, out=block)  # Jaccard distance 1 - s / (2 - s)
            block *= 1 - lambda_value
            original = _squared_dist_block(points[start:stop], gallery, gallery_sq, metric)
            original *= lambda_value / row_max[start:stop, None]
            block += original
            del original
            yield start, block
            del block  # before the next one is computed

    return blocks()
