"""Feature post-processing for retrieval: query expansion, database-side augmentation and PCA
whitening.

All functions take and return float32 feature matrices (num, dim) whose rows are L2-normalised,
so that the inner product is the cosine similarity. Neighbours are searched exactly, a chunk of
rows at a time, so memory stays O(chunk_size * num_gallery).

* Average query expansion (Chum et al., ICCV 2007) and alpha-QE (Radenovic et al., TPAMI 2018):
  a query is replaced by the weighted sum of itself and its top-k gallery neighbours, with
  weight 1 for each neighbour (alpha = 0) or sim ** alpha (alpha > 0).
* Database-side augmentation (Arandjelovic & Zisserman, CVPR 2012): the same, applied to every
  gallery item with its top-k gallery neighbours.
* PCA whitening (Jegou & Chum, ECCV 2012): centre, project on the top principal directions,
  divide by the square root of their variances, L2-normalise again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PCAWhitening", "database_augmentation", "fit_pca_whitening", "query_expansion"]


def _l2_normalise(feats: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return (feats / np.maximum(norms, 1e-12)).astype(np.float32)


def _as_feats(name: str, feats: np.ndarray) -> np.ndarray:
    feats = np.asarray(feats, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty 2-D array (num, dim), got shape {feats.shape}"
        )
    return feats


def _check_alpha_and_chunk(alpha: float, chunk_size: int) -> None:
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0 (0 = average expansion), got {alpha!r}")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")


def _top_k_neighbours(
    queries: np.ndarray, base: np.ndarray, k: int, exclude_diagonal: bool, chunk_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of every query in base by inner product, largest first.

    Args:
        queries: (num_query, dim) float32.
        base: (num_base, dim) float32.
        k: neighbours per query, k <= num_base (k <= num_base - 1 with exclude_diagonal).
        exclude_diagonal: queries are base itself; never return a row as its own neighbour.
        chunk_size: query rows per block of similarities.

    Returns:
        index: (num_query, k) int64; sim: (num_query, k) float32 similarities.
    """
    num_query = len(queries)
    index = np.empty((num_query, k), dtype=np.int64)
    sim = np.empty((num_query, k), dtype=np.float32)
    for start in range(0, num_query, chunk_size):
        stop = min(start + chunk_size, num_query)
        block = queries[start:stop] @ base.T  # (c, num_base)
        if exclude_diagonal:
            block[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        part = np.argpartition(block, block.shape[1] - k, axis=1)[:, -k:]  # (c, k) unordered
        part_sim = np.take_along_axis(block, part, axis=1)
        order = np.argsort(-part_sim, axis=1, kind="stable")
        index[start:stop] = np.take_along_axis(part, order, axis=1)
        sim[start:stop] = np.take_along_axis(part_sim, order, axis=1)
    return index, sim


def _expand(
    feats: np.ndarray,
    base: np.ndarray,
    index: np.ndarray,
    sim: np.ndarray,
    alpha: float,
    self_weight: float,
    chunk_size: int,
) -> np.ndarray:
    """L2-normalised self_weight * feats + sum_j w_j * base[index[:, j]]; (num, dim) float32."""
    # alpha-QE: negative similarities get weight 0 (a negative base to a real power is NaN).
    weights = np.ones_like(sim) if alpha == 0 else np.maximum(sim, 0.0) ** alpha  # (num, k)
    expanded = self_weight * feats
    for start in range(0, len(feats), chunk_size):
        rows = slice(start, start + chunk_size)
        # (c, k) weights x (c, k, dim) gathered neighbours -> (c, dim)
        expanded[rows] += np.einsum("nk,nkd->nd", weights[rows], base[index[rows]])
    # An expansion with zero total weight (self excluded, all neighbours dissimilar) keeps the
    # original feature rather than becoming a zero vector.
    empty = np.linalg.norm(expanded, axis=1) == 0
    expanded[empty] = feats[empty]
    return _l2_normalise(expanded)


def query_expansion(
    query_feats: np.ndarray,
    gallery_feats: np.ndarray,
    k: int = 5,
    alpha: float = 0.0,
    include_self: bool = True,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Average query expansion (alpha = 0) or alpha-QE of the queries with the gallery.

    new_q = normalise(q * [include_self] + sum over the top-k gallery g of w(q, g) * g), with
    w = 1 for alpha = 0 and w = max(q.g, 0) ** alpha otherwise.

    Args:
        query_feats: (num_query, dim) L2-normalised query features.
        gallery_feats: (num_gallery, dim) L2-normalised gallery features.
        k: gallery neighbours per query, 1 <= k <= num_gallery.
        alpha: 0 for average QE, > 0 for alpha-QE (3 is the usual value).
        include_self: add the query itself with weight 1 (its similarity to itself is 1).
        chunk_size: query rows per block of similarities.

    Returns:
        (num_query, dim) float32 expanded query features, L2-normalised.

    Raises:
        ValueError: on shapes that do not fit, k outside [1, num_gallery], alpha < 0 or
            chunk_size < 1.
    """
    query_feats = _as_feats("query_feats", query_feats)
    gallery_feats = _as_feats("gallery_feats", gallery_feats)
    if query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(
            f"query_feats has shape {query_feats.shape} but gallery_feats has shape "
            f"{gallery_feats.shape}: the feature dimensions must match"
        )
    if int(k) != k or not 1 <= k <= len(gallery_feats):
        raise ValueError(
            f"k must be an integer in [1, num_gallery={len(gallery_feats)}], got {k!r}"
        )
    _check_alpha_and_chunk(alpha, chunk_size)
    index, sim = _top_k_neighbours(query_feats, gallery_feats, k, False, chunk_size)
    return _expand(query_feats, gallery_feats, index, sim, alpha, float(include_self), chunk_size)


def database_augmentation(
    gallery_feats: np.ndarray, k: int = 5, alpha: float = 0.0, chunk_size: int = 1024
) -> np.ndarray:
    """Database-side augmentation: every gallery item expanded with its top-k gallery neighbours.

    new_g = normalise(g + sum over the top-k other gallery items h of w(g, h) * h), with
    w = 1 for alpha = 0 and w = max(g.h, 0) ** alpha otherwise. An item is never its own
    neighbour (it is already counted once with weight 1), even among duplicates.

    Args:
        gallery_feats: (num_gallery, dim) L2-normalised gallery features.
        k: neighbours per item, 1 <= k <= num_gallery - 1.
        alpha: 0 for uniform weights, > 0 for similarity ** alpha weights.
        chunk_size: rows per block of similarities.

    Returns:
        (num_gallery, dim) float32 augmented gallery features, L2-normalised.

    Raises:
        ValueError: on a bad shape, k outside [1, num_gallery - 1], alpha < 0 or chunk_size < 1.
    """
    gallery_feats = _as_feats("gallery_feats", gallery_feats)
    if int(k) != k or not 1 <= k <= len(gallery_feats) - 1:
        raise ValueError(
            f"k must be an integer in [1, num_gallery - 1 = {len(gallery_feats) - 1}], got {k!r}"
        )
    _check_alpha_and_chunk(alpha, chunk_size)
    index, sim = _top_k_neighbours(gallery_feats, gallery_feats, k, True, chunk_size)
    return _expand(gallery_feats, gallery_feats, index, sim, alpha, 1.0, chunk_size)


@dataclass(frozen=True)
class PCAWhitening:
    """A fitted PCA (whitening) projection; build it with `fit_pca_whitening`.

    Attributes:
        mean: (dim_in,) float64 mean of the fitting features.
        components: (dim, dim_in) float64 principal directions, largest variance first.
        explained_variance: (dim,) float64 variance along each direction (ddof=1).
        whiten: whether `project` divides by sqrt(explained_variance + eps).
        eps: added to the variances before whitening, so tiny ones are not blown up.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    whiten: bool
    eps: float

    def project(self, feats: np.ndarray) -> np.ndarray:
        """Centres, projects and (if whiten) rescales, without the final L2 normalisation.

        Args:
            feats: (num, dim_in) features.

        Returns:
            (num, dim) float32; on the fitting data its covariance is the identity (whiten,
            eps=0) or diag(explained_variance).
        """
        feats = _as_feats("feats", feats)
        if feats.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"feats has shape {feats.shape} but the PCA was fitted on dim "
                f"{self.mean.shape[0]} features"
            )
        projected = (feats - self.mean) @ self.components.T  # (num, dim)
        if self.whiten:
            projected /= np.sqrt(self.explained_variance + self.eps)
        return projected.astype(np.float32)

    def transform(self, feats: np.ndarray) -> np.ndarray:
        """Projects (see `project`) and L2-normalises.

        Args:
            feats: (num, dim_in) features.

        Returns:
            (num, dim) float32 L2-normalised features.
        """
        return _l2_normalise(self.project(feats))


def fit_pca_whitening(
    feats: np.ndarray, dim: int, whiten: bool = True, eps: float = 1e-6
) -> PCAWhitening:
    """Fits PCA (whitening) on features, e.g. training or gallery features.

    Matches sklearn.decomposition.PCA(n_components=dim, whiten=whiten) up to the sign of each
    component (here the largest-magnitude coordinate of a component is positive) and eps.

    Args:
        feats: (num, dim_in) fitting features, num >= 2.
        dim: output dimension, 1 <= dim <= min(num, dim_in).
        whiten: divide each projected coordinate by its standard deviation.
        eps: added to the variances before dividing (>= 0).

    Returns:
        The fitted `PCAWhitening`.

    Raises:
        ValueError: on fewer than 2 features, dim out of range, or eps < 0.
    """
    feats = _as_feats("feats", feats)
    num, dim_in = feats.shape
    if num < 2:
        raise ValueError(f"PCA needs at least 2 features, got shape {feats.shape}")
    if int(dim) != dim or not 1 <= dim <= min(num, dim_in):
        raise ValueError(
            f"dim must be an integer in [1, min(num={num}, dim_in={dim_in})], got {dim!r}"
        )
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")

    x = feats.astype(np.float64)
    mean = x.mean(axis=0)
    x -= mean
    if num >= dim_in:
        # (dim_in, dim_in) covariance: cheaper than an SVD of the (num, dim_in) data.
        variance, vectors = np.linalg.eigh(x.T @ x / (num - 1))
        order = np.argsort(variance)[::-1][:dim]
        variance, components = np.maximum(variance[order], 0.0), vectors[:, order].T
    else:
        _, singular, vt = np.linalg.svd(x, full_matrices=False)
        variance, components = singular[:dim] ** 2 / (num - 1), vt[:dim]
    # Deterministic signs: the largest-magnitude coordinate of every component is positive.
    signs = np.sign(components[np.arange(dim), np.abs(components).argmax(axis=1)])
    components = components * signs[:, None]
    return PCAWhitening(mean, components, variance, whiten, float(eps))
