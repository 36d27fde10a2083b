"""Sparse distance graphs of an unlabelled set against itself, for clustering.

Clustering N images needs their pairwise distances, but an N x N matrix is 4 TB at a million
images. Both distances here are kept only on candidate pairs, symmetrised, never the diagonal:

- `cosine_graph`: 1 - cos of each image and its `knn` nearest neighbours (FAISS, by cosine
  similarity of the L2-normalised embeddings). A pair left out is farther apart than each
  image's knn-th neighbour: DBSCAN with a smaller eps and nearest-neighbour linking never
  need it.
- `jaccard_graph`: the k-reciprocal Jaccard distance of re-ranking (Zhong et al., CVPR 2017),
  as SpCL / cluster-contrast cluster on, computed exactly as `reid_platform.evaluation.rerank`
  computes it (same neighbour search in float64, same expansion, weights and local query
  expansion; `lambda_value=0`), for the pairs of each image with its `knn` nearest neighbours
  and with every member of its k-reciprocal encoding (the pairs whose Jaccard distance can be
  small: two images that share little of their encodings are near 1). The encodings V are
  sparse (P, P) and the Jaccard term of a pair is sum_k min(V[i, k], V[j, k]) of two sparse
  rows. Memory is O(N * (knn + k1^2 * k2)), never O(N^2).

Neighbour search is exact (`IndexFlatIP`) up to `EXACT_MAX` images and an inverted file
(`IVF<4 sqrt N>,Flat`, `nprobe` lists probed) above, where exact search costs O(N^2 D); on the
GPU when FAISS has one.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import scipy.sparse as sp

# The k-reciprocal building blocks are shared with the evaluation's re-ranking, so that the
# graph equals `rerank_features(..., lambda_value=0)` wherever both are computed.
from reid_platform.evaluation.rerank import (
    _EXTRA_CANDIDATES,
    _exact_nearest,
    _faiss_has_gpu,
    _k_reciprocal_expansion,
    _row_normalised_weights,
    _safe_max,
    _squared_dist_pairs,
)

INDEXES = ("auto", "flat", "ivf")
EXACT_MAX = 50_000  # "auto" searches exactly up to this many images (O(N^2 D) above)
_PAIR_ENTRIES_PER_CHUNK = 4_000_000  # sparse entries gathered at once in the Jaccard term


class DistanceError(ValueError):
    """Features or distance settings that cannot give a graph; the message names them."""


def normalise_features(features: np.ndarray) -> np.ndarray:
    """Checked, contiguous float32 copy of `features` (N, D) with unit rows.

    Raises:
        DistanceError: not 2-D, fewer than 2 rows, non-finite values or an all-zero row.
    """
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2:
        raise DistanceError(f"features must be (N >= 2, D), got shape {features.shape}")
    points = np.array(features, dtype=np.float32, order="C")
    if not np.isfinite(points).all():
        raise DistanceError("features must be finite (found NaN or inf)")
    norms = np.linalg.norm(points, axis=1)
    if (norms == 0).any():
        raise DistanceError(f"{int((norms == 0).sum())} feature row(s) are all zero")
    # Unit-length features (model embeddings) are used bit for bit, as the re-ranking does.
    if np.abs(norms - 1.0).max() > 1e-4:
        points /= norms[:, None]
    return points


def _search_index(points: np.ndarray, index: str, nprobe: int, seed: int = 0):
    """A FAISS inner-product index holding `points`, on the GPU when FAISS has one."""
    num, dim = points.shape
    if index not in INDEXES:
        raise DistanceError(f"index must be one of {INDEXES}, got {index!r}")
    if index == "flat" or (index == "auto" and num <= EXACT_MAX):
        search = faiss.IndexFlatIP(dim)
    else:
        nlist = max(1, min(int(4 * math.sqrt(num)), num // 39))  # FAISS wants 39 per list
        quantizer = faiss.IndexFlatIP(dim)
        search = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # 64 points per list train the coarse centroids well (FAISS asks for 39 at least);
        # all of a million would make training the slowest step.
        rng = np.random.default_rng(seed)
        sample = points[np.sort(rng.choice(num, size=min(num, 64 * nlist), replace=False))]
        search.train(sample)
        search.nprobe = max(1, min(nprobe, nlist))
    if _faiss_has_gpu():
        search = faiss.index_cpu_to_all_gpus(search)
    search.add(points)
    return search


def nearest_neighbours(
    points: np.ndarray, k: int, index: str = "auto", nprobe: int = 32, row_max: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Every point's k nearest points by cosine, itself included, in increasing distance.

    Candidates come from FAISS (k + a few extra), then are ordered by their distance in float64
    (see `rerank._exact_nearest`), as the re-ranking orders them.

    Args:
        points: (N, D) float32 unit rows (`normalise_features`).
        k: neighbours per point (clipped to N).
        index: "flat" (exact), "ivf" (approximate, for large N) or "auto".
        nprobe: inverted lists probed by "ivf".
        row_max: also return each point's largest squared cosine distance (1 - cos)^2 to any
            point, the re-ranking's per-row normaliser (a farthest-point search: the nearest
            by inner product to -x).

    Returns:
        (neighbours (N, k) int64, row_max (N,) float32 or None).
    """
    num = len(points)
    k = min(k, num)
    num_cand = min(k + _EXTRA_CANDIDATES, num)
    search = _search_index(points, index, nprobe)
    _, candidates = search.search(points, num_cand)  # (N, num_cand)
    candidates = candidates.astype(np.int64)
    missing = candidates < 0  # an IVF probe can return fewer than asked: pad with the point
    if missing.any():
        candidates[missing] = np.nonzero(missing)[0]
    neighbours = _exact_nearest(points, candidates, k, "cosine")
    farthest = None
    if row_max:
        if hasattr(search, "nprobe"):
            # Only a normaliser of the weights: a few lists find a point nearly as far.
            search.nprobe = max(1, search.nprobe // 8)
        similarity, _ = search.search(-points, 1)  # max <-x, y> = -min cos(x, y)
        farthest = _safe_max(np.square(1.0 + similarity[:, 0]).astype(np.float32))
    return neighbours, farthest


def _candidate_pairs(
    neighbours: np.ndarray, knn: int, support: sp.csr_matrix | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Unique unordered pairs (i < j): each point and its first `knn` other neighbours, and
    (with `support`) each point and every column of its row."""
    num = len(neighbours)
    nearest = neighbours[:, : knn + 1]  # itself (usually first) + knn others
    keys = []
    for start in range(0, num, 65536):  # pair keys a * N + b, built in chunks of rows
        stop = min(start + 65536, num)
        cols = [nearest[start:stop].ravel()]
        rows = [np.repeat(np.arange(start, stop), nearest.shape[1])]
        if support is not None:
            lo, hi = support.indptr[start], support.indptr[stop]
            cols.append(support.indices[lo:hi])
            rows.append(np.repeat(np.arange(start, stop), np.diff(support.indptr[start:stop + 1])))
        rows, cols = np.concatenate(rows), np.concatenate(cols).astype(np.int64)
        key = np.minimum(rows, cols) * num + np.maximum(rows, cols)
        keys.append(np.unique(key[rows != cols]))
    key = np.unique(np.concatenate(keys))  # sorted: the graph is deterministic
    return key // num, key % num


def _symmetric(a: np.ndarray, b: np.ndarray, values: np.ndarray, num: int) -> sp.csr_matrix:
    """(num, num) CSR with values at (a, b) and (b, a); explicit zeros stay stored."""
    graph = sp.coo_matrix(
        (np.concatenate([values, values]).astype(np.float32),
         (np.concatenate([a, b]), np.concatenate([b, a]))),
        shape=(num, num),
    ).tocsr()
    graph.sort_indices()
    return graph


def _check_k(name: str, value: int, minimum: int = 1) -> None:
    if int(value) != value or value < minimum:
        raise DistanceError(f"{name} must be an integer >= {minimum}, got {value!r}")


def cosine_graph(
    features: np.ndarray, knn: int = 20, index: str = "auto", nprobe: int = 32
) -> sp.csr_matrix:
    """Cosine distances 1 - cos of every image and its `knn` nearest neighbours.

    Args:
        features: (N, D) embeddings (L2-normalised here if they are not).
        knn: neighbours per image kept as candidate pairs.
        index, nprobe: see `nearest_neighbours`.

    Returns:
        (N, N) CSR float32, symmetric, no diagonal; values in [0, 2], smaller is closer.
    """
    _check_k("knn", knn)
    points = normalise_features(features)
    neighbours, _ = nearest_neighbours(points, knn + 1, index, nprobe)
    a, b = _candidate_pairs(neighbours, knn)
    distance = np.empty(len(a), dtype=np.float32)
    for start in range(0, len(a), 65536):  # gathered rows in chunks: 2 x 65536 x D floats
        sa, sb = a[start : start + 65536], b[start : start + 65536]
        cos = np.einsum("ij,ij->i", points[sa].astype(np.float64), points[sb].astype(np.float64))
        distance[start : start + 65536] = np.clip(1.0 - cos, 0.0, 2.0)
    return _symmetric(a, b, distance, len(points))


def k_reciprocal_encoding(
    points: np.ndarray, neighbours: np.ndarray, row_max: np.ndarray, k1: int, k2: int
) -> sp.csr_matrix:
    """The re-ranking's k-reciprocal encodings V of every point (steps 2-5 of
    `reid_platform.evaluation.rerank`), sparse.

    Args:
        points: (P, D) float32 unit rows.
        neighbours: (P, K) int64 nearest points in increasing distance, K >= min(k1+1, P)
            and K >= min(k2, P).
        row_max: (P,) float32 largest squared distance of each point (the normaliser).
        k1, k2: neighbourhood and local query expansion sizes.

    Returns:
        (P, P) CSR float32; each row sums to 1.
    """
    num = len(points)
    rows, cols = _k_reciprocal_expansion(neighbours, k1)
    dist = _squared_dist_pairs(points, None, rows, cols, "cosine") / row_max[rows]
    V = sp.csr_matrix((_row_normalised_weights(rows, dist, num), (rows, cols)), shape=(num, num))
    if k2 != 1:  # V <- A @ V, A[i, j] = 1/k2 on the k2 nearest j of i
        expansion = neighbours[:, : min(k2, num)]
        A = sp.csr_matrix(
            (np.full(expansion.size, 1.0 / expansion.shape[1], dtype=np.float32),
             (np.repeat(np.arange(num), expansion.shape[1]), expansion.ravel())),
            shape=(num, num),
        )
        V = (A @ V).tocsr()
    V.sort_indices()
    return V


def pair_jaccard(V: sp.csr_matrix, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Jaccard distance 1 - s / (2 - s), s = sum_k min(V[a, k], V[b, k]), per pair.

    Args:
        V: (P, P) CSR encodings (`k_reciprocal_encoding`).
        a, b: (M,) int64 point indices.

    Returns:
        (M,) float32 in [0, 1].
    """
    out = np.empty(len(a), dtype=np.float32)
    per_row = max(1.0, V.nnz / max(V.shape[0], 1))
    step = max(1, int(_PAIR_ENTRIES_PER_CHUNK / (2 * per_row)))
    for start in range(0, len(a), step):
        sa, sb = a[start : start + step], b[start : start + step]
        shared = np.asarray(V[sa].minimum(V[sb]).sum(axis=1), dtype=np.float64).ravel()
        out[start : start + step] = 1.0 - shared / (2.0 - shared)
    return np.clip(out, 0.0, 1.0)


def jaccard_graph(
    features: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    knn: int = 0,
    index: str = "auto",
    nprobe: int = 32,
) -> sp.csr_matrix:
    """k-reciprocal Jaccard distances of every image with its `knn` nearest neighbours and
    with the members of its k-reciprocal encoding.

    Equals `rerank_features(q, g, k1, k2, lambda_value=0)` on the same N points split into
    q = points[:n], g = points[n:], at every stored (query, gallery) pair.

    Args:
        features: (N, D) embeddings (L2-normalised here if they are not).
        k1: k-reciprocal neighbourhood (re-ranking: 20; SpCL clusters with 30).
        k2: local query expansion (6; 1 turns it off).
        knn: candidate pairs per image; 0 = k1.
        index, nprobe: see `nearest_neighbours`.

    Returns:
        (N, N) CSR float32, symmetric, no diagonal; values in [0, 1], smaller is closer.
    """
    _check_k("k1", k1)
    _check_k("k2", k2)
    _check_k("knn", knn, minimum=0)
    knn = knn or k1
    points = normalise_features(features)
    neighbours, row_max = nearest_neighbours(
        points, max(k1 + 1, k2, knn + 1), index, nprobe, row_max=True
    )
    V = k_reciprocal_encoding(points, neighbours, row_max, k1, k2)
    # A pair outside both k-reciprocal encodings shares little of them: the encodings'
    # supports join the candidates, so the small Jaccard distances are all kept.
    a, b = _candidate_pairs(neighbours, knn, V)
    return _symmetric(a, b, pair_jaccard(V, a, b), len(points))


def distance_graph(
    features: np.ndarray,
    distance: str = "jaccard",
    k1: int = 20,
    k2: int = 6,
    knn: int = 0,
    index: str = "auto",
    nprobe: int = 32,
) -> sp.csr_matrix:
    """`jaccard_graph` or `cosine_graph` (with knn = k1 when 0), by name."""
    if distance == "jaccard":
        return jaccard_graph(features, k1, k2, knn, index, nprobe)
    if distance == "cosine":
        return cosine_graph(features, knn or k1, index, nprobe)
    raise DistanceError(f"distance must be jaccard or cosine, got {distance!r}")
