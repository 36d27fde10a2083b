"""Pseudo-identities from embeddings: DBSCAN, k-means and threshold linking.

    features (N, D) --distances.distance_graph--> sparse (N, N) graph --dbscan / link--> labels
    features (N, D) --FAISS spherical k-means--> labels

Every method returns labels (N,) with -1 for outliers; clusters smaller than
`min_cluster_size` (default 2: one image cannot form a positive pair) become outliers too, and
the rest are numbered 0..C-1 from the largest cluster down.

- `dbscan`: scikit-learn's DBSCAN on the sparse graph (`metric="precomputed"`), as SpCL and
  cluster-contrast run it on Jaccard distances. eps, when not given, is the mean of the
  N * `eps_pairs` smallest pair distances (`auto_eps`).
- `kmeans`: FAISS spherical k-means on the L2-normalised features into `clusters` groups
  (a million images are fine); no outliers but the tiny clusters.
- `link`: the threshold linking ("loop search") of the practitioners' notes: every image takes
  the id of its nearest neighbour if that neighbour is closer than `threshold`; a mutual pair
  (a -> b and b -> a) is one id, and chains (a -> b -> c) resolve to one id. These are the
  connected components of the nearest-neighbour graph; images without a neighbour under the
  threshold are outliers. The number of identities sets itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from reid_platform.pseudo.distances import distance_graph, normalise_features

METHODS = ("dbscan", "kmeans", "link")
DISTANCES = ("jaccard", "cosine")


class ClusteringError(ValueError):
    """A clustering setting is invalid or the clustering is unusable; the message says what to
    change."""


@dataclass
class Clustering:
    """The outcome of one clustering."""

    labels: np.ndarray  # (N,) int64: 0..C-1, -1 = outlier; 0 is the largest cluster
    method: str
    params: dict[str, Any] = field(default_factory=dict)  # eps / threshold / clusters, ...

    @property
    def num_clusters(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) and self.labels.max() >= 0 else 0

    @property
    def num_outliers(self) -> int:
        return int((self.labels < 0).sum())

    @property
    def sizes(self) -> np.ndarray:
        """(C,) images per cluster, largest first."""
        return np.bincount(self.labels[self.labels >= 0], minlength=self.num_clusters)


# ---- the methods --------------------------------------------------------------------------


def auto_eps(graph: sp.csr_matrix, pairs_per_image: float = 6.0) -> float:
    """DBSCAN eps from the data: the mean of the N * `pairs_per_image` smallest pair distances.

    MMT / SpCL-era code takes the mean of the smallest rho = 1.6e-3 of all N^2 / 2 pairwise
    distances. That count grows with N^2 while the same-identity pairs grow with N: rho fits
    Market-1501 (12,936 images, about 10 pairs per image) and no other size. Counting pairs per
    image keeps the rule's meaning at any N: with ~`pairs_per_image / 0.75` images per identity
    the mean lands inside the same-identity distances. The graph holds every small distance
    (see `distances`), so the smallest pairs of all N^2 are among its pairs.

    Args:
        graph: (N, N) symmetric sparse distances (`distance_graph`).
        pairs_per_image: > 0; 6 suits ~8 images per identity (the synthetic data); ~10
            corresponds to SpCL's rho on Market-1501.

    Returns:
        eps (> 0).
    """
    if not pairs_per_image > 0:
        raise ClusteringError(f"eps_pairs must be > 0, got {pairs_per_image!r}")
    upper = sp.triu(graph, k=1, format="coo").data  # each pair once
    if upper.size == 0:
        raise ClusteringError("the distance graph has no pairs to choose eps from")
    top = int(np.clip(round(pairs_per_image * graph.shape[0]), 1, upper.size))
    eps = float(np.partition(upper, top - 1)[:top].mean())
    return max(eps, 1e-6)  # identical images (distance 0) still need a positive radius


def dbscan(graph: sp.csr_matrix, eps: float, min_samples: int = 4) -> np.ndarray:
    """DBSCAN labels (N,) (-1 = noise) on a sparse precomputed distance graph.

    Pairs missing from the graph count as farther than eps.
    """
    from sklearn.cluster import DBSCAN
    from sklearn.neighbors import sort_graph_by_row_values

    if not eps > 0:
        raise ClusteringError(f"eps must be > 0, got {eps!r}")
    if int(min_samples) != min_samples or min_samples < 1:
        raise ClusteringError(f"min_samples must be an integer >= 1, got {min_samples!r}")
    graph = sort_graph_by_row_values(graph.tocsr(), copy=True, warn_when_not_sorted=False)
    model = DBSCAN(eps=eps, min_samples=int(min_samples), metric="precomputed", n_jobs=1)
    return model.fit(graph).labels_.astype(np.int64)


def nearest_under_threshold(graph: sp.csr_matrix, threshold: float) -> np.ndarray:
    """Each image's nearest neighbour in the graph if closer than `threshold`, else -1.

    Ties go to the lower index, so the result does not depend on the storage order.

    Returns:
        (N,) int64.
    """
    graph = graph.tocsr()
    num = graph.shape[0]
    rows = np.repeat(np.arange(num), np.diff(graph.indptr))
    cols, values = graph.indices.astype(np.int64), graph.data
    off_diagonal = rows != cols
    rows, cols, values = rows[off_diagonal], cols[off_diagonal], values[off_diagonal]
    order = np.lexsort((cols, values, rows))  # by row, then distance, then column
    rows, cols, values = rows[order], cols[order], values[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    nearest = np.full(num, -1, dtype=np.int64)
    take = first & (values < threshold)
    nearest[rows[take]] = cols[take]
    return nearest


def threshold_link(graph: sp.csr_matrix, threshold: float = 0.5) -> np.ndarray:
    """The notes' threshold linking; labels (N,), -1 for images linked to nothing.

    Every image points to its nearest neighbour under the threshold; a mutual pair is merged
    into one id (the cycle a -> b -> a is where following the links would loop, so it ends
    the chain there), and chains are followed to their end: the ids are the connected
    components of these links. An image nothing points to and that points to nothing is an
    outlier.
    """
    if not threshold > 0:
        raise ClusteringError(f"threshold must be > 0, got {threshold!r}")
    num = graph.shape[0]
    nearest = nearest_under_threshold(graph, threshold)
    linked = nearest >= 0
    links = sp.coo_matrix(
        (np.ones(int(linked.sum()), dtype=np.int8), (np.nonzero(linked)[0], nearest[linked])),
        shape=(num, num),
    )
    _, labels = connected_components(links, directed=True, connection="weak")
    sizes = np.bincount(labels)
    return np.where(sizes[labels] > 1, labels, -1).astype(np.int64)


def kmeans_plus_plus(points: np.ndarray, clusters: int, seed: int = 0,
                     sample_per_cluster: int = 40, max_sample: int = 200_000) -> np.ndarray:
    """Greedy k-means++ seeds (Arthur & Vassilvitskii 2007, as scikit-learn seeds) for unit
    rows, drawn from a sample of at most `sample_per_cluster` points per cluster (and at most
    `max_sample`): the cost is clusters x sample x D x (2 + log k).

    Each step draws 2 + log(k) candidates with probability proportional to their squared
    distance to the nearest seed so far (2 - 2 cos for unit rows) and keeps the one that lowers
    the total most, so every group gets a seed; random seeding misses groups when they are
    many and small, and Lloyd's iterations cannot repair that.

    Returns:
        (clusters, D) float32.
    """
    rng = np.random.default_rng(seed)
    num = len(points)
    sample = min(sample_per_cluster * clusters, max(max_sample, clusters))
    if num > sample:
        points = points[np.sort(rng.choice(num, sample, replace=False))]
    num = len(points)
    trials = 2 + int(np.log(clusters))
    chosen = [int(rng.integers(num))]
    nearest = np.maximum(2.0 - 2.0 * (points @ points[chosen[0]]), 0.0)  # (n,)
    for _ in range(1, clusters):
        total = float(nearest.sum())
        if total <= 0:  # every point sits on a seed already
            candidates = rng.integers(num, size=trials)
        else:
            cumulative = np.cumsum(nearest, dtype=np.float64)
            candidates = np.searchsorted(cumulative, rng.random(trials) * cumulative[-1])
            candidates = np.minimum(candidates, num - 1)
        distances = np.maximum(2.0 - 2.0 * (points @ points[candidates].T), 0.0)  # (n, trials)
        potentials = np.minimum(distances, nearest[:, None]).sum(axis=0)
        best = int(np.argmin(potentials))
        chosen.append(int(candidates[best]))
        nearest = np.minimum(nearest, distances[:, best])
    return np.ascontiguousarray(points[chosen], dtype=np.float32)


def spherical_kmeans(
    features: np.ndarray, clusters: int, niter: int = 25, seed: int = 0, restarts: int = 0
) -> np.ndarray:
    """FAISS k-means on L2-normalised features (centroids re-normalised each step) from
    greedy k-means++ seeds; labels (N,).

    Lloyd's iterations stop in a local optimum: `restarts` runs from different seeds keep the
    one whose images are most similar to their centroids (0 = 3 up to 100k images, else 1).
    Beyond 256 images per centroid FAISS trains the centroids on a sample, then every image is
    assigned. An iteration costs min(N, 256 clusters) x clusters x D: a million images into a
    thousand groups is minutes on a CPU, into 100k groups it is not.

    Raises:
        ClusteringError: clusters < 2 or more clusters than images.
    """
    points = normalise_features(features)
    if int(clusters) != clusters or clusters < 2:
        raise ClusteringError(
            f"k-means needs --clusters (self_train.clusters) >= 2, got {clusters!r}"
        )
    if clusters > len(points):
        raise ClusteringError(
            f"--clusters {clusters} is more than the {len(points)} images; choose fewer"
        )
    best, best_similarity = None, -np.inf
    for run in range(restarts or (3 if len(points) <= 100_000 else 1)):
        kmeans = faiss.Kmeans(
            points.shape[1], int(clusters), niter=niter, seed=seed + run, spherical=True,
            gpu=_faiss_gpus(), verbose=False,
            min_points_per_centroid=1,  # small sets are fine; no warning per call
        )
        kmeans.train(points, init_centroids=kmeans_plus_plus(points, int(clusters), seed + run))
        similarity, assignment = kmeans.index.search(points, 1)  # inner product to centroid
        if similarity.sum() > best_similarity:
            best, best_similarity = assignment[:, 0], float(similarity.sum())
    return best.astype(np.int64)


def _faiss_gpus() -> int | bool:
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else False


def relabel_by_size(labels: np.ndarray, min_cluster_size: int = 2) -> np.ndarray:
    """Clusters with fewer than `min_cluster_size` images become -1; the others 0..C-1 from
    the largest down (ties: the one with the smaller original label first).

    Returns:
        (N,) int64.
    """
    labels = np.asarray(labels, dtype=np.int64)
    out = np.full(len(labels), -1, dtype=np.int64)
    kept = labels >= 0
    if not kept.any():
        return out
    ids, inverse, counts = np.unique(labels[kept], return_inverse=True, return_counts=True)
    order = np.lexsort((ids, -counts))  # largest first
    new_id = np.full(len(ids), -1, dtype=np.int64)
    big = counts[order] >= min_cluster_size
    new_id[order[big]] = np.arange(int(big.sum()))
    out[kept] = new_id[inverse]
    return out


# ---- one entry point ----------------------------------------------------------------------


def cluster_features(
    features: np.ndarray,
    method: str = "dbscan",
    distance: str = "jaccard",
    k1: int = 20,
    k2: int = 6,
    knn: int = 0,
    eps: float = 0.0,
    eps_pairs: float = 6.0,
    min_samples: int = 4,
    threshold: float = 0.5,
    clusters: int = 0,
    min_cluster_size: int = 2,
    index: str = "auto",
    seed: int = 0,
) -> Clustering:
    """Cluster embeddings into pseudo-identities.

    Args:
        features: (N, D) embeddings (L2-normalised here if they are not).
        method: "dbscan", "kmeans" or "link".
        distance: "jaccard" (k-reciprocal, the default) or "cosine"; dbscan and link only.
        k1, k2: Jaccard neighbourhood and query expansion.
        knn: candidate pairs per image in the graph; 0 = k1.
        eps: DBSCAN radius; 0 = `auto_eps(graph, eps_pairs)`.
        eps_pairs: see `auto_eps`.
        min_samples: DBSCAN core size (the image itself included).
        threshold: link's largest distance to the nearest neighbour.
        clusters: k-means groups.
        min_cluster_size: smaller clusters are outliers.
        index: neighbour search (see `distances.nearest_neighbours`).
        seed: k-means seed.

    Returns:
        Clustering; `params` records what was used (eps as chosen, threshold, ...).

    Raises:
        ClusteringError: an invalid setting, or fewer than 2 pseudo-identities (the message
            says what to change).
    """
    if method not in METHODS:
        raise ClusteringError(f"method {method!r} is not known; choose one of {METHODS}")
    if distance not in DISTANCES:
        raise ClusteringError(f"distance {distance!r} is not known; choose one of {DISTANCES}")
    if int(min_cluster_size) != min_cluster_size or min_cluster_size < 1:
        raise ClusteringError(f"min_cluster_size must be an integer >= 1, got {min_cluster_size}")
    num = len(features)
    if num < 2 * max(min_cluster_size, 1):
        raise ClusteringError(
            f"{num} image(s) cannot form 2 pseudo-identities of {min_cluster_size}+ images"
        )
    params: dict[str, Any] = {"min_cluster_size": int(min_cluster_size)}
    if method == "kmeans":
        labels = spherical_kmeans(features, clusters, seed=seed)
        params.update(clusters=int(clusters), distance="cosine")
    else:
        graph = distance_graph(features, distance, k1, k2, knn, index)
        params.update(distance=distance, knn=int(knn or k1))
        if distance == "jaccard":
            params.update(k1=int(k1), k2=int(k2))
        if method == "dbscan":
            chosen = float(eps) if eps > 0 else auto_eps(graph, eps_pairs)
            labels = dbscan(graph, chosen, min_samples)
            params.update(eps=chosen, eps_auto=not eps > 0, min_samples=int(min_samples))
            if not eps > 0:
                params["eps_pairs"] = float(eps_pairs)
        else:
            labels = threshold_link(graph, threshold)
            params.update(threshold=float(threshold))
    result = Clustering(relabel_by_size(labels, min_cluster_size), method, params)
    _check_usable(result, num)
    return result


def _check_usable(result: Clustering, num: int) -> None:
    """Fewer than 2 pseudo-identities cannot train an ID classifier: say what to change.

    The flags are those of `jobs/pseudo_label.py`; `jobs/self_train.py` takes the same names
    as `self_train.*` keys.
    """
    found = result.num_clusters
    if found >= 2:
        return
    p = result.params
    clusters = f"{found} cluster{'' if found == 1 else 's'}"
    counts = (f"{num} images, {result.num_outliers} outliers, clusters of "
              f"{p['min_cluster_size']}+ images")
    swallowed = found == 1 and result.num_outliers < num / 2  # one cluster took (nearly) all
    if result.method == "dbscan":
        eps = p["eps"]
        if swallowed:
            hint = f"try --eps {eps * 0.67:.2g} or --method kmeans"
        else:
            hint = (f"try --eps {min(eps * 1.5, 0.99):.2g}, --min-samples "
                    f"{max(2, p['min_samples'] - 2)} or --method kmeans")
        raise ClusteringError(
            f"DBSCAN found {clusters} at eps={eps:.3g}, min_samples={p['min_samples']} "
            f"({counts}); {hint}"
        )
    if result.method == "link":
        t = p["threshold"]
        if swallowed:
            hint = f"try --threshold {t * 0.67:.2g} or --method kmeans"
        else:
            hint = f"try --threshold {t * 1.5:.2g} or --method kmeans"
        raise ClusteringError(f"link found {clusters} at threshold={t:.3g} ({counts}); {hint}")
    raise ClusteringError(
        f"k-means found {clusters} at clusters={p['clusters']} ({counts}); try --clusters "
        f"{2 * p['clusters']}"
    )


# ---- scoring against true labels ----------------------------------------------------------


def score_clustering(labels: np.ndarray, true_pids: np.ndarray) -> dict[str, float]:
    """How well pseudo labels match true identities (images with a true pid >= 0 only).

    Returns:
        ari, nmi, purity on the clustered images (outliers left out); ari_all, nmi_all with
        every outlier its own cluster; num_true_ids, num_scored. Empty when nothing is labelled.
        purity = share of clustered images whose true pid is their cluster's most common one.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels, true_pids = np.asarray(labels), np.asarray(true_pids)
    known = true_pids >= 0
    if not known.any():
        return {}
    labels, true_pids = labels[known], true_pids[known]
    clustered = labels >= 0
    singletons = np.where(clustered, labels, labels.max(initial=-1) + 1 + np.arange(len(labels)))
    out = {
        "ari_all": float(adjusted_rand_score(true_pids, singletons)),
        "nmi_all": float(normalized_mutual_info_score(true_pids, singletons)),
        "num_true_ids": int(len(np.unique(true_pids))),
        "num_scored": int(known.sum()),
    }
    if clustered.sum() >= 2:
        lab, tru = labels[clustered], true_pids[clustered]
        out["ari"] = float(adjusted_rand_score(tru, lab))
        out["nmi"] = float(normalized_mutual_info_score(tru, lab))
        _, tru_idx = np.unique(tru, return_inverse=True)
        table = sp.coo_matrix((np.ones(len(lab)), (lab, tru_idx))).tocsr()  # (C, T) counts
        out["purity"] = float(table.max(axis=1).toarray().sum() / len(lab))
    return out
