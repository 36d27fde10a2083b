"""Market-1501 CMC / mAP / mINP against a per-query loop, the blocked evaluation from features
against the full matrix, and distance matrices vs scipy."""

from __future__ import annotations

import math
import re
import tracemalloc

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from reid_platform.evaluation import (
    EvaluationError,
    RankResult,
    compute_distmat,
    evaluate_features,
    evaluate_rank,
)
from reid_platform.evaluation.metrics import RankAccumulator, distance_blocks, evaluate_blocks


def loop_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """The protocol written out one query at a time, with Python lists."""
    cmc_sum = [0.0] * max_rank
    aps, inps = [], []
    for i in range(len(q_pids)):
        # Python's sort is stable: ties keep gallery order; NaN distances go last.
        row = [(1, 0.0) if math.isnan(d) else (0, d) for d in distmat[i]]
        order = sorted(range(len(g_pids)), key=lambda j: row[j])
        ranked = [
            j
            for j in order
            if not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i]) and g_pids[j] != -1
        ]
        hits = [g_pids[j] == q_pids[i] for j in ranked]
        if not any(hits):
            continue
        first = hits.index(True)
        for k in range(max_rank):
            cmc_sum[k] += 1.0 if first <= k else 0.0
        precisions, found = [], 0
        for position, hit in enumerate(hits):
            if hit:
                found += 1
                precisions.append(found / (position + 1))
        aps.append(sum(precisions) / len(precisions))
        last = max(p for p, hit in enumerate(hits) if hit)
        inps.append(found / (last + 1))
    num_valid = len(aps)
    return (
        [c / num_valid for c in cmc_sum],
        sum(aps) / num_valid,
        sum(inps) / num_valid,
        num_valid,
        len(q_pids) - num_valid,
    )


def random_problem(rng, num_q, num_g, num_ids, num_cams, kind="uniform"):
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = rng.integers(-1, num_ids + 2, num_g)  # -1 junk; ids >= num_ids never queried
    q_camids = rng.integers(0, num_cams, num_q)
    g_camids = rng.integers(0, num_cams, num_g)
    if kind == "uniform":
        distmat = rng.random((num_q, num_g))
    elif kind == "ties":  # a handful of integer values: matches tie with non-matches
        distmat = rng.integers(0, 4, (num_q, num_g))
    else:  # float32 with ties, infinities and NaN (ranked last, as by np.argsort)
        distmat = rng.integers(0, 6, (num_q, num_g)).astype(np.float32)
        distmat[rng.random(distmat.shape) < 0.1] = np.inf
        distmat[rng.random(distmat.shape) < 0.05] = -np.inf
        distmat[rng.random(distmat.shape) < 0.1] = np.nan
    return distmat, q_pids, g_pids, q_camids, g_camids


@pytest.mark.parametrize(
    "num_q,num_g,num_ids,num_cams,max_rank,block_size",
    [
        (30, 80, 6, 3, 50, 256),
        (25, 60, 10, 2, 20, 7),
        (12, 5, 3, 2, 10, 4),  # num_gallery < max_rank: CMC saturates
        (40, 30, 15, 2, 50, 16),  # sparse gallery: many queries have no valid match
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["uniform", "ties", "nan_inf"])
def test_evaluate_rank_matches_loop(
    num_q, num_g, num_ids, num_cams, max_rank, block_size, seed, kind
):
    rng = np.random.default_rng(seed * 100 + num_q)
    problem = random_problem(rng, num_q, num_g, num_ids, num_cams, kind)
    distmat, q_pids, g_pids, q_camids, g_camids = problem
    want = loop_evaluate(
        distmat.tolist(),
        q_pids.tolist(),
        g_pids.tolist(),
        q_camids.tolist(),
        g_camids.tolist(),
        max_rank,
    )
    got = evaluate_rank(*problem, max_rank=max_rank, block_size=block_size)
    cmc, m_ap, m_inp, num_valid, num_skipped = want
    assert got.cmc.shape == (max_rank,)
    np.testing.assert_allclose(got.cmc, cmc, atol=1e-12)
    assert got.mAP == pytest.approx(m_ap, abs=1e-12)
    assert got.mINP == pytest.approx(m_inp, abs=1e-12)
    assert (got.num_valid_queries, got.num_skipped_queries) == (num_valid, num_skipped)
    assert np.isnan(got.all_AP).sum() == num_skipped
    assert np.all(np.diff(got.cmc) >= 0) and got.cmc[-1] <= 1.0
    if num_g < max_rank:
        assert got.cmc[-1] == 1.0  # every valid query has its first hit within the gallery


def test_skipped_queries_counted():
    rng = np.random.default_rng(9)
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(rng, 20, 50, 5, 3)
    q_pids[:4] = 99  # identities absent from the gallery
    got = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids)
    assert np.isnan(got.all_AP[:4]).all() and np.isnan(got.all_INP[:4]).all()
    assert got.num_skipped_queries >= 4
    assert got.num_valid_queries + got.num_skipped_queries == 20


def test_hand_computed_example():
    # query 0: pid 1, cam 0.  gallery ranked by distance (columns already in rank order):
    #   g0 pid 1 cam 0 -> junk (same pid, same camera)
    #   g1 pid 2 cam 1 -> miss      (kept rank 1)
    #   g2 pid 1 cam 1 -> hit       (kept rank 2)
    #   g3 pid -1      -> junk
    #   g4 pid 3 cam 0 -> miss      (kept rank 3)
    #   g5 pid 1 cam 2 -> hit       (kept rank 4)
    # AP = (1/2 + 2/4) / 2 = 0.5; INP = 2 / 4 = 0.5; first hit at rank 2.
    # query 1: pid 2, cam 0: g1 (pid 2, cam 1) is the closest valid item -> AP = INP = 1.
    # query 2: pid 3, cam 0: its only gallery image g4 is in its own camera -> skipped.
    distmat = np.array(
        [
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            [0.9, 0.1, 0.5, 0.2, 0.3, 0.4],
            [0.3, 0.2, 0.6, 0.5, 0.1, 0.4],
        ]
    )
    g_pids = np.array([1, 2, 1, -1, 3, 1])
    g_camids = np.array([0, 1, 1, 0, 0, 2])
    got = evaluate_rank(distmat, [1, 2, 3], g_pids, [0, 0, 0], g_camids, max_rank=5)
    np.testing.assert_allclose(got.cmc, [0.5, 1.0, 1.0, 1.0, 1.0])
    assert got.mAP == pytest.approx(0.75)
    assert got.mINP == pytest.approx(0.75)
    assert (got.num_valid_queries, got.num_skipped_queries) == (2, 1)
    np.testing.assert_allclose(got.all_AP, [0.5, 1.0, np.nan])
    np.testing.assert_allclose(got.all_INP, [0.5, 1.0, np.nan])
    assert got.rank(1) == 0.5 and got.rank(2) == 1.0 and got.rank(50) == 1.0

    # with pid -1 kept, g3 becomes a miss at kept rank 3: AP = (1/2 + 2/5)/2, INP = 2/5
    kept = evaluate_rank(distmat, [1, 2, 3], g_pids, [0, 0, 0], g_camids, ignore_junk_pid=False)
    assert kept.all_AP[0] == pytest.approx((0.5 + 0.4) / 2)
    assert kept.all_INP[0] == pytest.approx(0.4)


def test_as_metrics_keys_and_score():
    rng = np.random.default_rng(3)
    result = evaluate_rank(*random_problem(rng, 30, 80, 6, 3), max_rank=50)
    metrics = result.as_metrics()
    assert set(metrics) == {"rank1", "rank5", "rank10", "rank20", "mAP", "mINP", "score"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics.values())
    for k in (1, 5, 10, 20):
        assert metrics[f"rank{k}"] == result.cmc[k - 1]
    assert metrics["score"] == pytest.approx(0.5 * (metrics["rank1"] + metrics["mAP"]))


def test_as_metrics_short_cmc_uses_last_rank():
    result = RankResult(
        cmc=np.array([0.25, 0.5, 1.0]),
        mAP=0.4,
        mINP=0.3,
        num_valid_queries=4,
        num_skipped_queries=0,
        all_AP=np.zeros(4),
        all_INP=np.zeros(4),
    )
    metrics = result.as_metrics()
    assert metrics["rank1"] == 0.25 and metrics["rank5"] == metrics["rank20"] == 1.0
    assert metrics["score"] == pytest.approx(0.325)


# ---- errors --------------------------------------------------------------------------------


def test_no_valid_query_error():
    distmat = np.zeros((2, 3))
    with pytest.raises(EvaluationError, match="no valid query.*2 queries"):
        evaluate_rank(distmat, [1, 2], [1, 2, 3], [0, 0], [0, 0, 1])


@pytest.mark.parametrize(
    "q_shape,g_shape,bad",
    [((4,), (6,), "(4,)"), ((5,), (7,), "(7,)"), ((5, 1), (6,), "(5, 1)")],
)
def test_shape_mismatch_names_both_shapes(q_shape, g_shape, bad):
    distmat = np.zeros((5, 6))
    with pytest.raises(EvaluationError, match=re.escape(bad)) as info:
        evaluate_rank(
            distmat, np.zeros(q_shape), np.zeros(g_shape), np.zeros(q_shape), np.zeros(g_shape)
        )
    assert "(5, 6)" in str(info.value)


def test_non_2d_distmat_and_bad_max_rank():
    with pytest.raises(EvaluationError, match=re.escape("(6,)")):
        evaluate_rank(np.zeros(6), [0], [0], [0], [1])
    with pytest.raises(EvaluationError, match="max_rank"):
        evaluate_rank(np.zeros((1, 1)), [0], [0], [0], [1], max_rank=0)


# ---- distance matrices ---------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("num_query", [10, 300])  # 300: two tiles of query rows
def test_compute_distmat_matches_cdist(metric, num_query):
    rng = np.random.default_rng(11)
    query = rng.standard_normal((num_query, 16)) * 2
    gallery = rng.standard_normal((23, 16)) * 2
    got = compute_distmat(query, gallery, metric=metric)
    assert got.dtype == np.float32 and got.shape == (num_query, 23)
    np.testing.assert_allclose(got, cdist(query, gallery, metric), rtol=1e-4, atol=1e-4)
    # The blocks are the same bits, whatever their size.
    for block_size in (1, 257, None):
        blocks = list(distance_blocks(query, gallery, metric, block_size))
        assert [start for start, _ in blocks] == list(range(0, num_query, len(blocks[0][1])))
        np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), got)


def test_compute_distmat_identical_rows():
    feats = np.random.default_rng(12).standard_normal((5, 8)).astype(np.float32)
    for metric in ("cosine", "euclidean"):
        got = compute_distmat(feats, feats, metric=metric)
        assert np.all(np.isfinite(got)) and np.all(got >= -1e-5)
        np.testing.assert_allclose(np.diag(got), 0.0, atol=2e-3)


def test_compute_distmat_errors():
    with pytest.raises(EvaluationError, match=re.escape("(3, 4)") + ".*" + re.escape("(2, 5)")):
        compute_distmat(np.zeros((3, 4)), np.zeros((2, 5)))
    with pytest.raises(EvaluationError, match="manhattan"):
        compute_distmat(np.zeros((3, 4)), np.zeros((2, 4)), metric="manhattan")


# ---- the blocked evaluation from features ---------------------------------------------------


def tied_features(rng, num_q, num_g, dim, num_ids):
    """Clustered features on a coarse grid, with exact duplicates: many exactly tied distances.

    Labels have junk (-1), distractors never queried, same-camera matches and queries whose
    identity is absent from the gallery.
    """
    centres = rng.integers(-2, 3, (num_ids + 1, dim)).astype(np.float32)
    q_pids = rng.integers(0, num_ids + 3, num_q)  # ids >= num_ids: absent from the gallery
    g_pids = rng.integers(-1, num_ids, num_g)
    query = centres[np.minimum(q_pids, num_ids)] + rng.integers(-1, 2, (num_q, dim))
    gallery = centres[np.maximum(g_pids, 0)] + rng.integers(-1, 2, (num_g, dim))
    gallery[1::3] = gallery[::3][: len(gallery[1::3])]  # exact duplicates
    q_camids, g_camids = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
    return query.astype(np.float32), gallery.astype(np.float32), q_pids, g_pids, q_camids, g_camids


def assert_same_result(got: RankResult, want: RankResult):
    np.testing.assert_array_equal(got.cmc, want.cmc)
    np.testing.assert_array_equal(got.all_AP, want.all_AP)
    np.testing.assert_array_equal(got.all_INP, want.all_INP)
    assert (got.mAP, got.mINP) == (want.mAP, want.mINP)
    assert (got.num_valid_queries, got.num_skipped_queries) == (
        want.num_valid_queries,
        want.num_skipped_queries,
    )


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("block_size", [None, 1, 300])
def test_evaluate_features_equals_the_full_matrix(metric, block_size):
    rng = np.random.default_rng(21)
    query, gallery, q_pids, g_pids, q_camids, g_camids = tied_features(rng, 600, 400, 6, 12)
    distmat = compute_distmat(query, gallery, metric)
    # the data is as nasty as promised
    assert len(np.unique(distmat[0])) < 0.5 * len(gallery)  # heavy ties
    want = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=30)
    assert 0 < want.num_skipped_queries < 600
    assert want.mAP < 0.9  # plenty of false matches ranked ahead
    got = evaluate_features(
        query, gallery, q_pids, g_pids, q_camids, g_camids, metric=metric, max_rank=30,
        block_size=block_size,
    )  # fmt: skip
    assert_same_result(got, want)
    # and the full matrix itself agrees with the per-query loop on a few queries
    loop = loop_evaluate(
        distmat[:40].tolist(), q_pids[:40].tolist(), g_pids.tolist(), q_camids[:40].tolist(),
        g_camids.tolist(), 30,
    )  # fmt: skip
    head = evaluate_rank(distmat[:40], q_pids[:40], g_pids, q_camids[:40], g_camids, max_rank=30)
    assert head.mAP == pytest.approx(loop[1], abs=1e-12)
    np.testing.assert_allclose(head.cmc, loop[0], atol=1e-12)


def test_evaluate_features_memory_is_bounded():
    """Peak allocations of the blocked path stay far below the one full matrix."""
    rng = np.random.default_rng(5)
    num_q, num_g, dim, num_ids = 1024, 16000, 32, 400
    centres = rng.standard_normal((num_ids, dim)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, num_ids, num_q), rng.integers(0, num_ids, num_g)
    query = centres[q_pids] + 0.3 * rng.standard_normal((num_q, dim), dtype=np.float32)
    gallery = centres[g_pids] + 0.3 * rng.standard_normal((num_g, dim), dtype=np.float32)
    q_camids, g_camids = rng.integers(0, 6, num_q), rng.integers(0, 6, num_g)
    full_bytes = num_q * num_g * 4  # 65.5 MB
    tracemalloc.start()
    try:
        result = evaluate_features(
            query, gallery, q_pids, g_pids, q_camids, g_camids, block_size=128
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.num_valid_queries > 1000
    # one 256-row block (16 MB; blocks are whole tiles of 256 query rows), its mask and the
    # distances it keeps, feature copies (2 MB)
    block_bytes = 256 * num_g * 4
    assert peak < 1.6 * block_bytes, peak / 2**20
    assert peak < full_bytes / 2.5
    want = evaluate_rank(compute_distmat(query, gallery), q_pids, g_pids, q_camids, g_camids)
    assert_same_result(result, want)


def test_blocks_out_of_order_or_missing_are_errors():
    rng = np.random.default_rng(3)
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(rng, 10, 20, 4, 2)
    labels = (q_pids, g_pids, q_camids, g_camids)
    expected_first = r"rows 5\.\.9: expected the block that starts at row 0 "
    with pytest.raises(EvaluationError, match=expected_first):
        evaluate_blocks([(5, distmat[5:])], *labels)
    with pytest.raises(EvaluationError, match=r"only 6 of 10 query rows were ranked"):
        evaluate_blocks([(0, distmat[:6])], *labels)
    with pytest.raises(EvaluationError, match=r"shape \(10, 19\); expected \(rows, 20\)"):
        RankAccumulator(*labels).add(distmat[:, 1:])
    with pytest.raises(EvaluationError, match=r"query features have shape \(10, 4\) but query"):
        evaluate_features(np.zeros((10, 4)), np.zeros((20, 4)), q_pids[:9], *labels[1:])
