"""k-reciprocal re-ranking: the dense version against a plain loop implementation of the paper's
steps, and the scalable feature version against the dense one."""

import numpy as np
import pytest

from reid_platform.evaluation.rerank import k_reciprocal_rerank, rerank_blocks, rerank_features


def loop_rerank(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value):
    """Readable re-implementation of the reference re_ranking with Python sets and loops."""
    num_query = q_g_dist.shape[0]
    full = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]]).astype(np.float64) ** 2
    num_points = full.shape[0]
    # dist[i][j]: squared distance j -> i divided by the largest squared distance to i.
    dist = [[full[j, i] / full[:, i].max() for j in range(num_points)] for i in range(num_points)]
    ranking = [sorted(range(num_points), key=lambda j, i=i: dist[i][j]) for i in range(num_points)]

    def reciprocal(i, k):
        return {j for j in ranking[i][: k + 1] if i in ranking[j][: k + 1]}

    half = round(k1 / 2)  # Python rounds half to even, like np.around
    V = [[0.0] * num_points for _ in range(num_points)]
    for i in range(num_points):
        r_set = reciprocal(i, k1)
        expanded = set(r_set)
        for cand in r_set:
            c_set = reciprocal(cand, half)
            if len(c_set & r_set) > 2 / 3 * len(c_set):
                expanded |= c_set
        total = sum(np.exp(-dist[i][j]) for j in expanded)
        for j in expanded:
            V[i][j] = np.exp(-dist[i][j]) / total
    if k2 != 1:
        V = [
            [
                sum(V[n][col] for n in ranking[i][:k2]) / len(ranking[i][:k2])
                for col in range(num_points)
            ]
            for i in range(num_points)
        ]
    out = np.zeros(q_g_dist.shape)
    for qi in range(num_query):
        for gi in range(q_g_dist.shape[1]):
            g = num_query + gi
            s = sum(min(V[qi][col], V[g][col]) for col in range(num_points))
            jaccard = 1 - s / (2 - s)
            out[qi, gi] = (1 - lambda_value) * jaccard + lambda_value * dist[qi][g]
    return out


def cosine_dists(query, gallery):
    """1 - cosine similarity, in float64, of L2-normalised copies of the features."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    q, g = q.astype(np.float64), g.astype(np.float64)
    return 1 - q @ g.T, 1 - q @ q.T, 1 - g @ g.T


def euclidean_dists(query, gallery):
    def dist(a, b):
        a, b = a.astype(np.float64), b.astype(np.float64)
        return np.sqrt(np.maximum((a**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2 * a @ b.T, 0))

    return dist(query, gallery), dist(query, query), dist(gallery, gallery)


def clustered_feats(rng, num_query, num_gallery, dim, num_ids):
    """Features around num_ids identity centres, so neighbourhoods have structure."""
    centres = rng.standard_normal((num_ids, dim))
    feats = centres[rng.integers(0, num_ids, num_query + num_gallery)]
    feats = feats + 0.8 * rng.standard_normal(feats.shape)
    return feats[:num_query].astype(np.float32), feats[num_query:].astype(np.float32)


@pytest.mark.parametrize(
    "k1,k2,lambda_value",
    [(20, 6, 0.3), (5, 1, 0.3), (7, 3, 0.0), (4, 2, 1.0), (3, 1, 0.5), (60, 6, 0.3)],
)
def test_dense_matches_loop_reference(k1, k2, lambda_value):
    rng = np.random.default_rng(k1 * 100 + k2)
    query, gallery = clustered_feats(rng, 6, 30, 8, 5)
    dists = euclidean_dists(query, gallery)
    got = k_reciprocal_rerank(*dists, k1=k1, k2=k2, lambda_value=lambda_value)
    want = loop_rerank(*dists, k1=k1, k2=k2, lambda_value=lambda_value)
    assert got.dtype == np.float32 and got.shape == (6, 30)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_dense_lambda_one_is_normalised_squared_distance():
    rng = np.random.default_rng(0)
    q_g, q_q, g_g = euclidean_dists(*clustered_feats(rng, 5, 12, 4, 3))
    got = k_reciprocal_rerank(q_g, q_q, g_g, lambda_value=1.0)
    col_max = np.concatenate([q_q, q_g], axis=1).max(axis=1) ** 2  # symmetric: row max
    np.testing.assert_allclose(got, q_g**2 / col_max[:, None], rtol=1e-5)


def test_dense_all_equal_distances_is_finite():
    got = k_reciprocal_rerank(np.zeros((3, 4)), np.zeros((3, 3)), np.zeros((4, 4)), k1=2, k2=2)
    assert np.isfinite(got).all()


@pytest.mark.parametrize(
    "shapes,match",
    [
        (((3, 4), (3, 3), (5, 5)), r"g_g_dist has shape \(5, 5\) but q_g_dist has shape \(3, 4\)"),
        (((3, 4), (4, 4), (4, 4)), r"q_q_dist has shape \(4, 4\) but q_g_dist has shape \(3, 4\)"),
        (((3,), (3, 3), (4, 4)), r"q_g_dist must be a 2-D matrix, got shape \(3,\)"),
    ],
)
def test_dense_shape_errors(shapes, match):
    q_g, q_q, g_g = (np.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        k_reciprocal_rerank(q_g, q_q, g_g)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k1": 0}, r"k1 must be an integer >= 1, got 0"),
        ({"k2": 0}, r"k2 must be an integer >= 1, got 0"),
        ({"lambda_value": 1.5}, r"lambda_value must be in \[0, 1\], got 1.5"),
    ],
)
def test_param_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        k_reciprocal_rerank(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((3, 3)), **kwargs)
    with pytest.raises(ValueError, match=match):
        rerank_features(np.ones((2, 4)), np.ones((3, 4)), **kwargs)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("backend", ["numpy", "faiss"])
@pytest.mark.parametrize("k1,k2,lambda_value", [(20, 6, 0.3), (7, 1, 0.5), (9, 30, 0.1)])
def test_features_match_dense(metric, backend, k1, k2, lambda_value):
    if backend == "faiss":
        pytest.importorskip("faiss")
    rng = np.random.default_rng(7)
    query, gallery = clustered_feats(rng, 40, 260, 32, 30)
    dists = cosine_dists(query, gallery) if metric == "cosine" else euclidean_dists(query, gallery)
    want = k_reciprocal_rerank(*dists, k1=k1, k2=k2, lambda_value=lambda_value)
    got = rerank_features(
        query,
        gallery,
        k1=k1,
        k2=k2,
        lambda_value=lambda_value,
        metric=metric,
        chunk_size=37,
        backend=backend,
    )
    assert got.dtype == np.float32 and got.shape == (40, 260)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_features_tiny_set_k_larger_than_points():
    rng = np.random.default_rng(3)
    query, gallery = clustered_feats(rng, 2, 5, 6, 2)
    want = k_reciprocal_rerank(*euclidean_dists(query, gallery), k1=20, k2=10)
    got = rerank_features(query, gallery, k1=20, k2=10, metric="euclidean")
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_features_errors():
    with pytest.raises(
        ValueError, match=r"query_feats has shape \(2, 4\) but gallery_feats has shape \(3, 5\)"
    ):
        rerank_features(np.ones((2, 4)), np.ones((3, 5)))
    with pytest.raises(
        ValueError, match=r"metric must be one of \('cosine', 'euclidean'\), got 'l1'"
    ):
        rerank_features(np.ones((2, 4)), np.ones((3, 4)), metric="l1")
    with pytest.raises(ValueError, match=r"must be finite"):
        rerank_features(np.full((2, 4), np.nan), np.ones((3, 4)))


def test_features_unit_length_cosine_matches_dense():
    rng = np.random.default_rng(11)
    query, gallery = clustered_feats(rng, 30, 200, 256, 20)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    want = k_reciprocal_rerank(*cosine_dists(query, gallery))
    np.testing.assert_allclose(rerank_features(query, gallery), want, atol=1e-4)


def test_features_match_dense_when_the_scan_samples_its_bound():
    """Over 4 * k * 8 points, the scan bounds each row's k-th neighbour from a sample of the
    points instead of partitioning the whole row: same neighbours, same result."""
    rng = np.random.default_rng(13)
    query, gallery = clustered_feats(rng, 100, 900, 32, 100)  # 1000 points, a sample of 125
    want = k_reciprocal_rerank(*cosine_dists(query, gallery))
    np.testing.assert_allclose(rerank_features(query, gallery, backend="numpy"), want, atol=1e-4)


def test_blocks_are_the_rows_of_rerank_features():
    rng = np.random.default_rng(17)
    query, gallery = clustered_feats(rng, 37, 120, 16, 10)
    full = rerank_features(query, gallery, k1=9, k2=3, metric="euclidean")
    # 120 gallery columns * 4 bytes * 10 rows: blocks of 10 query rows
    blocks = list(rerank_blocks(query, gallery, k1=9, k2=3, metric="euclidean", block_bytes=4800))
    assert [start for start, _ in blocks] == [0, 10, 20, 30]
    assert [len(block) for _, block in blocks] == [10, 10, 10, 7]
    np.testing.assert_array_equal(np.concatenate([block for _, block in blocks]), full)
    with pytest.raises(ValueError, match=r"k1 must be an integer >= 1, got 0"):
        rerank_blocks(query, gallery, k1=0)  # checked at the call, not at the first block
