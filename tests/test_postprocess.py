"""Query expansion, database-side augmentation and PCA whitening against plain numpy."""

import numpy as np
import pytest
from sklearn.decomposition import PCA

from reid_platform.evaluation.postprocess import (
    database_augmentation,
    fit_pca_whitening,
    query_expansion,
)


def unit_rows(rng, num, dim):
    x = rng.standard_normal((num, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def loop_expansion(feats, base, k, alpha, self_weight, exclude_self):
    """One row at a time: sort all similarities, take the top k, weighted sum, normalise."""
    out = []
    for i, f in enumerate(feats.astype(np.float64)):
        sims = base.astype(np.float64) @ f
        order = [j for j in np.argsort(-sims) if not (exclude_self and j == i)][:k]
        total = self_weight * f
        for j in order:
            total = total + (1.0 if alpha == 0 else max(sims[j], 0.0) ** alpha) * base[j]
        out.append(total / np.linalg.norm(total))
    return np.array(out)


@pytest.mark.parametrize(
    "k,alpha,include_self",
    [(1, 0.0, True), (5, 0.0, True), (4, 3.0, True), (3, 1.0, False), (60, 0.0, True)],
)
def test_query_expansion_matches_loop(k, alpha, include_self):
    rng = np.random.default_rng(k)
    query, gallery = unit_rows(rng, 13, 16), unit_rows(rng, 60, 16)
    got = query_expansion(query, gallery, k=k, alpha=alpha, include_self=include_self, chunk_size=4)
    want = loop_expansion(query, gallery, k, alpha, float(include_self), exclude_self=False)
    assert got.dtype == np.float32 and got.shape == query.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("k,alpha", [(1, 0.0), (3, 0.0), (5, 3.0)])
def test_database_augmentation_matches_loop(k, alpha):
    rng = np.random.default_rng(10 + k)
    gallery = unit_rows(rng, 40, 12)
    got = database_augmentation(gallery, k=k, alpha=alpha, chunk_size=7)
    want = loop_expansion(gallery, gallery, k, alpha, 1.0, exclude_self=True)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_database_augmentation_never_uses_self_among_duplicates():
    gallery = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    got = database_augmentation(gallery, k=1)
    np.testing.assert_allclose(got, [[1, 0], [1, 0], [np.sqrt(0.5), np.sqrt(0.5)]], atol=1e-6)


def test_alpha_qe_with_only_dissimilar_neighbours_keeps_query():
    query = np.array([[1, 0]], dtype=np.float32)
    gallery = np.array([[-1, 0]], dtype=np.float32)
    got = query_expansion(query, gallery, k=1, alpha=3.0, include_self=False)
    np.testing.assert_allclose(got, query)


@pytest.mark.parametrize("num,dim_in,dim", [(200, 16, 16), (200, 16, 5), (12, 30, 8)])
def test_pca_whitening_identity_covariance_and_sklearn(num, dim_in, dim):
    rng = np.random.default_rng(num + dim)
    feats = (rng.standard_normal((num, dim_in)) * np.linspace(0.2, 2.0, dim_in)).astype(np.float32)
    pca = fit_pca_whitening(feats, dim, whiten=True, eps=0.0)
    projected = pca.project(feats).astype(np.float64)
    np.testing.assert_allclose(projected.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(projected, rowvar=False), np.eye(dim), atol=1e-4)

    reference = PCA(n_components=dim, whiten=True).fit(feats).transform(feats)
    signs = np.sign((projected * reference).sum(axis=0))  # components match up to sign
    np.testing.assert_allclose(projected * signs, reference, atol=1e-3)

    transformed = pca.transform(feats)
    assert transformed.dtype == np.float32 and transformed.shape == (num, dim)
    np.testing.assert_allclose(
        transformed, projected / np.linalg.norm(projected, axis=1, keepdims=True), atol=1e-5
    )


def test_pca_without_whitening_keeps_variances():
    rng = np.random.default_rng(1)
    feats = (rng.standard_normal((300, 6)) * [3, 2, 1, 0.5, 0.2, 0.1]).astype(np.float32)
    pca = fit_pca_whitening(feats, 3, whiten=False)
    reference = PCA(n_components=3).fit(feats)
    np.testing.assert_allclose(pca.explained_variance, reference.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(
        np.var(pca.project(feats), axis=0, ddof=1), reference.explained_variance_, rtol=1e-4
    )


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda q, g: query_expansion(q, g, k=0),
            r"k must be an integer in \[1, num_gallery=6\], got 0",
        ),
        (
            lambda q, g: query_expansion(q, g, k=7),
            r"k must be an integer in \[1, num_gallery=6\], got 7",
        ),
        (
            lambda q, g: query_expansion(q, g[:, :3]),
            r"query_feats has shape \(4, 5\) but gallery_feats has shape \(6, 3\)",
        ),
        (lambda q, g: query_expansion(q, g, alpha=-1.0), r"alpha must be >= 0 .*got -1.0"),
        (
            lambda q, g: database_augmentation(g, k=6),
            r"k must be an integer in \[1, num_gallery - 1 = 5\], got 6",
        ),
        (
            lambda q, g: database_augmentation(g[0]),
            r"gallery_feats must be a non-empty 2-D array .*got shape \(5,\)",
        ),
        (
            lambda q, g: fit_pca_whitening(g, 6),
            r"dim must be an integer in \[1, min\(num=6, dim_in=5\)\], got 6",
        ),
        (lambda q, g: fit_pca_whitening(g, 5, eps=-1.0), r"eps must be >= 0, got -1.0"),
        (lambda q, g: fit_pca_whitening(g, 0), r"dim must be an integer .*got 0"),
        (
            lambda q, g: fit_pca_whitening(g[:1], 1),
            r"PCA needs at least 2 features, got shape \(1, 5\)",
        ),
        (
            lambda q, g: fit_pca_whitening(g, 2).transform(q[:, :4]),
            r"feats has shape \(4, 4\) but the PCA was fitted on dim 5 features",
        ),
    ],
)
def test_errors(call, match):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=match):
        call(unit_rows(rng, 4, 5), unit_rows(rng, 6, 5))
