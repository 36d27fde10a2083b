"""Evaluation pipeline, report pictures and `jobs/evaluate.py` (ensembles, post-processing,
skipped queries, clear errors, MLflow logging)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reid_platform.checkpoint import save_checkpoint
from reid_platform.config import Config, ConfigError, parse_overrides
from reid_platform.evaluation import (
    STEPS,
    EvalLabels,
    EvalOptions,
    EvaluationError,
    ModelEmbeddings,
    compute_distmat,
    count_valid_queries,
    database_augmentation,
    ensemble_distance,
    evaluate_rank,
    evaluate_variants,
    fit_pca_whitening,
    k_reciprocal_rerank,
    pipeline,
    plan_variants,
    plot_activation_maps,
    plot_embedding_scatter,
    plot_ranked_lists,
    query_expansion,
    variants,
)
from reid_platform.evaluation.embed import activation_maps
from reid_platform.evaluation.pictures import (
    FALSE_MATCH,
    JUNK,
    TRUE_MATCH,
    cmc_axis_floor,
    match_kinds,
    scatter_caption,
)
from reid_platform.models import build_model
from reid_platform.tracking import evaluation_metric_name

from conftest import REPO, run_job

METRICS = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP", "score")


# ---- small random data -------------------------------------------------------------------


def clustered(rng, pids, dim=16, noise=0.6, centres=None):
    """L2-normalised features around one random centre per identity."""
    feats = centres[pids] + noise * rng.standard_normal((len(pids), dim))
    return (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)


def random_problem(seed=0, num_ids=8, dim=16):
    """A query/gallery split with cameras, distractors (pid 0) and junk (pid -1)."""
    rng = np.random.default_rng(seed)
    q_pids = np.repeat(np.arange(1, num_ids + 1), 2)
    g_pids = np.concatenate([np.repeat(np.arange(1, num_ids + 1), 4), [0, 0, 0, -1, -1]])
    labels = EvalLabels(
        q_pids=q_pids,
        q_camids=np.tile([0, 1], num_ids),
        g_pids=g_pids,
        g_camids=rng.integers(0, 3, len(g_pids)),
    )
    centres = rng.standard_normal((num_ids + 2, dim))
    g_index = np.where(g_pids < 0, num_ids + 1, g_pids)
    query = clustered(rng, q_pids, dim, centres=centres)
    gallery = clustered(rng, g_index, dim, centres=centres)
    return query, gallery, labels


def by_name(evaluation):
    return {r.name: r for r in evaluation.results}


def test_plan_variants_names():
    options = EvalOptions(pca_dim=8, qe_k=2, dba_k=3, rerank=True)
    single = [v.name for v in plan_variants(["m"], options)]
    assert single == [
        "raw",
        "raw+pca8",
        "raw+dba3",
        "raw+qe2",
        "raw+rerank",
        "raw+pca8+dba3+qe2+rerank",
    ]
    two = [v.name for v in plan_variants(["a", "b"], EvalOptions(rerank=True))]
    assert two == ["a", "a+rerank", "b", "b+rerank", "ensemble", "ensemble+rerank"]
    assert [v.name for v in plan_variants(["a", "b"], EvalOptions())] == ["a", "b", "ensemble"]
    assert evaluation_metric_name("a+pca8+rerank", "mAP") == "eval/a_pca8_rerank/mAP"


def test_ensemble_of_a_model_with_itself_ranks_like_the_model_alone():
    query, gallery, labels = random_problem(seed=1)
    options = EvalOptions(rerank=True, k1=6, k2=3)
    models = [
        ModelEmbeddings("a", query, gallery, weight=0.3),
        ModelEmbeddings("a_again", query.copy(), gallery.copy(), weight=0.7),
    ]
    results = by_name(evaluate_variants(models, labels, options))

    distmat = compute_distmat(query, gallery)
    summed = ensemble_distance([distmat, distmat], [0.3, 0.7])
    np.testing.assert_array_equal(
        np.argsort(summed, axis=1, kind="stable"), np.argsort(distmat, axis=1, kind="stable")
    )
    for key in METRICS:
        assert results["ensemble"].metrics()[key] == results["a"].metrics()[key], key
        # Dense re-ranking of the summed distances == feature re-ranking of the model alone.
        assert results["ensemble+rerank"].metrics()[key] == pytest.approx(
            results["a+rerank"].metrics()[key], abs=1e-9
        ), key
    np.testing.assert_array_equal(results["ensemble"].result.all_AP, results["a"].result.all_AP)


def test_ensemble_distance_is_the_normalised_weighted_sum():
    rng = np.random.default_rng(2)
    a, b = rng.random((4, 5)), rng.random((4, 5))
    got = ensemble_distance([a, b], [1.0, 3.0])
    np.testing.assert_allclose(got, 0.25 * a + 0.75 * b, rtol=1e-6)
    assert got.dtype == np.float32
    np.testing.assert_allclose(ensemble_distance([a, b]), (a + b) / 2, rtol=1e-6)


def test_variants_match_the_steps_done_by_hand():
    query, gallery, labels = random_problem(seed=3)
    options = EvalOptions(pca_dim=8, qe_k=2, dba_k=2)
    results = by_name(evaluate_variants([ModelEmbeddings("m", query, gallery)], labels, options))

    def metrics(q, g):
        distmat = compute_distmat(q, g)
        result = evaluate_rank(
            distmat, labels.q_pids, labels.g_pids, labels.q_camids, labels.g_camids
        )
        return result.as_metrics()

    pca = fit_pca_whitening(gallery, 8)
    assert results["raw"].metrics() == metrics(query, gallery)
    assert results["raw+pca8"].metrics() == metrics(pca.transform(query), pca.transform(gallery))
    assert results["raw+qe2"].metrics() == metrics(query_expansion(query, gallery, 2), gallery)
    assert results["raw+dba2"].metrics() == metrics(query, database_augmentation(gallery, 2))
    g = database_augmentation(pca.transform(gallery), 2)
    q = query_expansion(pca.transform(query), g, 2)
    assert results["raw+pca8+dba2+qe2"].metrics() == metrics(q, g)
    for result in results.values():
        assert all(0.0 <= v <= 1.0 for v in result.metrics().values())


def test_pca_fitted_on_training_features():
    query, gallery, labels = random_problem(seed=5)
    train = random_problem(seed=6)[1]  # other features of the same dimension
    model = ModelEmbeddings("m", query, gallery, pca_fit=train)
    options = EvalOptions(pca_dim=8, pca_fit="train")
    result = by_name(evaluate_variants([model], labels, options))["raw+pca8"]
    pca = fit_pca_whitening(train, 8)
    expected = evaluate_rank(
        compute_distmat(pca.transform(query), pca.transform(gallery)),
        labels.q_pids,
        labels.g_pids,
        labels.q_camids,
        labels.g_camids,
    )
    assert result.metrics() == expected.as_metrics()
    with pytest.raises(EvaluationError, match=r"--pca 99: PCA is fitted on the train features"):
        evaluate_variants([model], labels, EvalOptions(pca_dim=99, pca_fit="train"))


def test_skipped_queries_are_counted_by_reason():
    query, gallery, labels = random_problem(seed=4)
    labels.q_pids[0] = 99  # identity absent from the gallery
    labels.q_pids[1] = 98
    # pid 3 only in camera 2 of the gallery; its query in camera 2 has only junk left
    labels.g_camids[labels.g_pids == 3] = 2
    labels.q_camids[labels.q_pids == 3] = 2
    stats = count_valid_queries(labels)
    assert (stats.absent_from_gallery, stats.same_camera_only) == (2, 2)
    assert stats.valid == len(labels.q_pids) - 4
    evaluation = evaluate_variants([ModelEmbeddings("m", query, gallery)], labels, EvalOptions())
    assert evaluation.results[0].result.num_skipped_queries == 4
    assert evaluation.queries.skipped == 4


def test_no_valid_query_error_says_why():
    query, gallery, labels = random_problem(seed=5)
    labels.q_pids[:] = 1000 + np.arange(len(labels.q_pids))
    with pytest.raises(EvaluationError, match=r"no valid query.*16 have an identity absent"):
        evaluate_variants([ModelEmbeddings("m", query, gallery)], labels, EvalOptions())
    labels.q_pids[:] = 1
    labels.q_camids[:] = 0
    labels.g_camids[:] = 0  # every match comes from the query's own camera
    with pytest.raises(EvaluationError, match=r"16 are matched only by gallery images from"):
        count_valid_queries(labels)


def test_mismatched_shapes_name_both():
    with pytest.raises(EvaluationError, match=r"\(3, 4\).*\(3, 5\)"):
        ensemble_distance([np.zeros((3, 4)), np.zeros((3, 5))])
    query, gallery, labels = random_problem(seed=6)
    with pytest.raises(EvaluationError, match=r"\(15, 16\) \(query\).*\(16,\) \(query\)"):
        evaluate_variants([ModelEmbeddings("m", query[:-1], gallery)], labels, EvalOptions())
    models = [ModelEmbeddings("a", query, gallery), ModelEmbeddings("b", query, gallery[:, :8])]
    with pytest.raises(EvaluationError, match=r"\(16, 16\) and gallery features \(37, 8\)"):
        evaluate_variants(models, labels, EvalOptions())


def test_options_that_do_not_fit_the_data_name_the_flag():
    query, gallery, labels = random_problem(seed=7)
    models = [ModelEmbeddings("m", query, gallery)]
    with pytest.raises(EvaluationError, match=r"--pca 17"):
        evaluate_variants(models, labels, EvalOptions(pca_dim=17))
    with pytest.raises(EvaluationError, match=r"--dba 37"):
        evaluate_variants(models, labels, EvalOptions(dba_k=37))


def test_evaluation_in_many_blocks_equals_the_full_matrices():
    """600 queries in blocks of 256 rows: the blocked variants score as the matrices do."""
    query, gallery, labels = random_problem(seed=8, num_ids=300, dim=24)
    options = EvalOptions(qe_k=2)
    results = by_name(
        evaluate_variants([ModelEmbeddings("m", query, gallery)], labels, options, block_size=256)
    )
    args = (labels.q_pids, labels.g_pids, labels.q_camids, labels.g_camids)
    raw = evaluate_rank(compute_distmat(query, gallery), *args)
    np.testing.assert_array_equal(results["raw"].result.all_AP, raw.all_AP)
    np.testing.assert_array_equal(results["raw"].result.cmc, raw.cmc)
    expanded = evaluate_rank(compute_distmat(query_expansion(query, gallery, 2), gallery), *args)
    assert results["raw+qe2"].metrics() == expanded.as_metrics()


def test_ensemble_rerank_from_concatenated_features_is_the_dense_rerank_of_the_sum():
    """sqrt(w)-scaled concatenated features: 1 - Q.G is the weighted sum of cosine distances,
    so their re-ranking is the classic dense re-ranking of the summed matrices."""
    query, gallery, labels = random_problem(seed=9)
    rng = np.random.default_rng(9)
    other_q = query + 0.5 * rng.standard_normal(query.shape).astype(np.float32)
    other_g = gallery + 0.5 * rng.standard_normal(gallery.shape).astype(np.float32)
    other_q /= np.linalg.norm(other_q, axis=1, keepdims=True)
    other_g /= np.linalg.norm(other_g, axis=1, keepdims=True)
    models = [
        ModelEmbeddings("a", query, gallery, weight=1.0),
        ModelEmbeddings("b", other_q, other_g, weight=3.0),
    ]
    options = EvalOptions(rerank=True, k1=6, k2=3)
    got = by_name(evaluate_variants(models, labels, options))["ensemble+rerank"]

    def summed(a_rows, a_cols, b_rows, b_cols):
        return ensemble_distance(
            [compute_distmat(a_rows, a_cols), compute_distmat(b_rows, b_cols)], [1.0, 3.0]
        )

    dense = k_reciprocal_rerank(
        summed(query, gallery, other_q, other_g),
        summed(query, query, other_q, other_q),
        summed(gallery, gallery, other_g, other_g),
        k1=6,
        k2=3,
    )
    args = (labels.q_pids, labels.g_pids, labels.q_camids, labels.g_camids)
    want = evaluate_rank(dense, *args)
    np.testing.assert_allclose(got.result.all_AP, want.all_AP, atol=1e-9)
    np.testing.assert_array_equal(got.result.cmc, want.cmc)


def test_ensemble_rerank_of_euclidean_distances_too_large_for_dense_is_an_error(monkeypatch):
    query, gallery, labels = random_problem(seed=10)
    models = [ModelEmbeddings("a", query, gallery), ModelEmbeddings("b", query, gallery)]
    monkeypatch.setattr(variants, "DENSE_RERANK_MAX_BYTES", 1000)
    with pytest.raises(EvaluationError, match=r"--rerank of an ensemble with --distance euclid"):
        evaluate_variants(models, labels, EvalOptions(rerank=True, distance="euclidean"))
    # the same ensemble under cosine distances has no such limit
    evaluate_variants(models, labels, EvalOptions(rerank=True))


@pytest.mark.parametrize("step", STEPS, ids=lambda step: step.name)
def test_every_step_of_the_table_has_its_flag_its_variant_and_its_checks(step):
    """A row of the table is enough: the option field, the CLI flag, the variant name and the
    checks of the value all come from it."""
    import argparse

    parser = argparse.ArgumentParser()
    variants.add_option_arguments(parser)
    switch = step.option
    on = [switch.flag] if switch.kind is bool else [switch.flag, str(switch.smoke)]
    args = parser.parse_args(on)
    options = variants.options_from_args(args)
    assert getattr(options, switch.name) == (True if switch.kind is bool else switch.smoke)
    assert [v.name for v in plan_variants(["m"], options)] == ["raw", "raw" + step.suffix(
        getattr(options, switch.name)
    )]  # fmt: skip
    query, gallery, labels = random_problem(seed=11)
    result = by_name(evaluate_variants([ModelEmbeddings("m", query, gallery)], labels, options))
    assert 0.0 < result["raw" + step.suffix(getattr(options, switch.name))].metrics()["mAP"]
    if switch.kind is not bool:  # a value that does not fit the data names the flag
        with pytest.raises(EvaluationError, match=f"^{switch.flag} "):
            evaluate_variants(
                [ModelEmbeddings("m", query, gallery)], labels,
                EvalOptions(**{switch.name: len(gallery) + 1}),
            )  # fmt: skip
        with pytest.raises(EvaluationError, match=f"^{switch.flag} -1: must be >= 0"):
            evaluate_variants(
                [ModelEmbeddings("m", query, gallery)], labels, EvalOptions(**{switch.name: -1})
            )


def test_option_values_of_the_wrong_kind_name_the_flag():
    query, gallery, labels = random_problem(seed=12)
    models = [ModelEmbeddings("m", query, gallery)]
    for options, message in [
        (EvalOptions(distance="manhattan"), r"--distance 'manhattan': choose one of"),
        (EvalOptions(pca_dim=2.5), r"--pca 2.5: expected a int"),
        (EvalOptions(rerank=True, k1=0), r"--k1 0: must be >= 1$"),
        (EvalOptions(rerank=True, lambda_value=1.5), r"--lambda 1.5: must be in \[0.0, 1.0\]"),
        (EvalOptions(pca_dim=4, pca_fit="test"), r"--pca-fit 'test': choose one of"),
    ]:
        with pytest.raises(EvaluationError, match=message):
            evaluate_variants(models, labels, options)


def test_parse_overrides_is_the_set_parser_of_every_job():
    assert parse_overrides(["data.root=/d", "train.epochs=2", "loss.margin=0.5", "name="]) == {
        "data.root": "/d",
        "train.epochs": 2,
        "loss.margin": 0.5,
        "name": "",
    }
    config = Config().replace(**parse_overrides(["data.height=64", "model.pooling=gem"]))
    assert (config.data.height, config.model.pooling) == (64, "gem")
    with pytest.raises(ConfigError, match=r"override 'data.root' must look like key=value"):
        parse_overrides(["data.root"])


def test_blocked_note_only_for_large_galleries():
    note = pipeline.blocked_note(11659, 82161)  # MSMT17
    assert "11659 x 82161 distances would take 3.6 GiB" in note
    assert "blocks of 256 queries" in note
    assert pipeline.blocked_note(3368, 19732) == ""  # Market-1501: 0.25 GiB


# ---- pictures ----------------------------------------------------------------------------


def colour_pixels(image: np.ndarray, rgb) -> int:
    return int((np.abs(image.astype(int) - np.array(rgb)).sum(axis=2) <= 6).sum())


def test_match_kinds_follow_the_market_protocol():
    kinds = match_kinds(5, 0, np.array([5, 5, 7, -1, 0]), np.array([1, 0, 1, 2, 0]))
    assert kinds.tolist() == ["true", "junk", "false", "junk", "false"]


def test_ranked_lists_png_has_green_red_and_grey_frames(tmp_path):
    paths = []
    for n in range(7):
        path = tmp_path / f"{n}.png"
        Image.fromarray(np.full((32, 16, 3), 40 * n, dtype=np.uint8)).save(path)
        paths.append(str(path))
    q_pids, q_camids = np.array([1, 2]), np.array([0, 0])
    g_pids, g_camids = np.array([1, 1, 2, -1, 3]), np.array([1, 0, 1, 1, 1])
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.4, 0.1, 0.2, 0.3]])
    out = plot_ranked_lists(
        paths[:2],
        paths[2:],
        distmat,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        tmp_path / "ranked.png",
        topk=4,
        title="test",
    )
    image = np.asarray(Image.open(out).convert("RGB"))
    assert Image.open(out).format == "PNG"
    assert 300 < image.shape[1] < 1200 and 250 < image.shape[0] < 1200
    for colour in (TRUE_MATCH, FALSE_MATCH, JUNK):
        assert colour_pixels(image, colour) > 200, colour
    with pytest.raises(ValueError, match=r"\(2, 5\).*3 query paths"):
        plot_ranked_lists(
            paths[:3], paths[2:], distmat, q_pids, g_pids, q_camids, g_camids, tmp_path / "bad.png"
        )


@pytest.mark.parametrize("method,num", [("tsne", 12), ("tsne", 4), ("pca", 30)])
def test_embedding_scatter_png(tmp_path, method, num):
    rng = np.random.default_rng(num)
    pids = rng.integers(0, 30, num)
    out = plot_embedding_scatter(
        rng.standard_normal((num, 8)), pids, tmp_path / "s.png", method=method, max_ids=20
    )
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (600, 500)
    # One tab20 colour per drawn identity: the 20 with the most points (all, when fewer).
    import matplotlib.pyplot as plt

    drawn = min(20, len(np.unique(pids)))
    pixels = np.asarray(image.convert("RGB")).astype(int)
    palette = (np.array(plt.get_cmap("tab20").colors) * 255).round().astype(int)
    present = [colour_pixels(pixels, rgb) >= 4 for rgb in palette]
    expected = [True] * drawn + [False] * (20 - drawn)
    greys = [14, 15]  # tab20's greys are also the greys of text and frames
    assert [p for n, p in enumerate(present) if n not in greys] == [
        e for n, e in enumerate(expected) if n not in greys
    ]
    with pytest.raises(ValueError, match=r"\(3, 8\) and \(2,\)"):
        plot_embedding_scatter(np.zeros((3, 8)), np.zeros(2), tmp_path / "x.png")


def test_cmc_axis_starts_just_below_the_lowest_curve():
    curves = {"a": np.array([0.91, 0.95, 1.0]), "b": np.array([0.874, 0.9, 0.99])}
    assert cmc_axis_floor(curves) == 80.0  # 87.4 - 5 = 82.4 -> 80
    assert cmc_axis_floor({"a": np.array([0.03, 0.5])}) == 0.0
    assert cmc_axis_floor({"a": np.array([0.2, 0.3]), "b": np.array([0.95])}) == 15.0


def test_scatter_caption_says_what_is_drawn():
    assert scatter_caption("t-SNE", 20, 52, 400, 1040) == (
        "t-SNE of 20 of 52 identities (most images first), 400 of 1040 images"
    )
    assert scatter_caption("PCA", 8, 8, 61, 61) == "PCA of all 8 identities, all 61 images"


def test_activation_maps_png_and_what_they_measure(tmp_path, tiny_market):
    config = Config().replace(**{"model.backbone": "test_resnet"})
    torch.manual_seed(0)
    model = build_model(config.model, num_classes=4)
    from reid_platform.data.formats import Sample

    paths = sorted((tiny_market / "query").glob("*.jpg"))[:3]
    samples = [Sample(str(p), 1, 0, "query") for p in paths]
    images, maps = activation_maps(model, samples, 64, 32)
    assert images.shape == (3, 64, 32, 3) and images.dtype == np.uint8
    assert maps.shape == (3, 64, 32) and maps.dtype == np.float32
    np.testing.assert_allclose(maps.reshape(3, -1).min(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(maps.reshape(3, -1).max(axis=1), 1.0, atol=1e-6)
    # The map is the channel energy of the backbone's last feature map, upsampled: its
    # strongest cell is where the upsampled map peaks.
    from reid_platform.data.transforms import build_eval_transform

    transform = build_eval_transform(64, 32)
    batch = torch.stack([transform(image=np.asarray(Image.open(p).convert("RGB")))["image"]
                         for p in paths])  # fmt: skip
    with torch.no_grad():
        energy = (model.backbone.forward_features(batch) ** 2).sum(dim=1)  # (3, h, w)
    h, w = energy.shape[1:]
    for n in range(3):
        peak = np.unravel_index(maps[n].argmax(), maps[n].shape)
        cell = (peak[0] * h // 64, peak[1] * w // 32)
        assert energy[n][cell] >= energy[n].flatten().sort().values[-2], n  # top-2 cell

    out = plot_activation_maps(images, maps, tmp_path / "act.png", ["a", "b", "c"], title="t")
    picture = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert Image.open(out).format == "PNG" and picture.shape[1] >= 520
    red = (picture[..., 0] > 180) & (picture[..., 1] < 90) & (picture[..., 2] < 90)
    blue = (picture[..., 2] > 150) & (picture[..., 0] < 90)
    assert red.sum() > 50 and blue.sum() > 50  # the jet heat maps are drawn
    with pytest.raises(ValueError, match=r"\(3, 64, 32, 3\) and \(2, 64, 32\)"):
        plot_activation_maps(images, maps[:2], tmp_path / "bad.png")


def test_activation_maps_of_a_transformer_and_of_an_unreadable_backbone():
    import timm

    class Wrapper(torch.nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

    vit = Wrapper(timm.create_model("test_vit", num_classes=0, img_size=(64, 32)))
    from reid_platform.evaluation.embed import _feature_energy

    tokens = torch.randn(2, 3, 64, 32)
    energy = _feature_energy(vit.backbone, tokens)  # the patch tokens' squared norms
    with torch.no_grad():
        want = (vit.backbone.forward_features(tokens)[:, 1:] ** 2).sum(dim=2).reshape(2, 4, 2)
    torch.testing.assert_close(energy, want)

    class Flat(torch.nn.Module):
        def forward_features(self, images):
            return images.mean(dim=(2, 3))  # (B, C): no spatial map

    with pytest.raises(EvaluationError, match=r"--activation-maps: the backbone Flat gives"):
        _feature_energy(Flat(), tokens)
    with pytest.raises(EvaluationError, match=r"--activation-maps: model Linear has no backbone"):
        activation_maps(torch.nn.Linear(2, 2), [], 64, 32)


# ---- the CLI -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_setup(tiny_market, workspace, tmp_path_factory):
    """Two random-init checkpoints on tiny_market, and a copy of the tree with one query
    whose identity is absent from the gallery."""
    root = tmp_path_factory.mktemp("evaluate")
    config = Config().replace(
        **{
            "name": "evaluate-test",
            "model.backbone": "test_resnet",
            "data.root": str(tiny_market),
            "data.format": "market1501",
            "data.height": 64,
            "data.width": 32,
            "data.loader_workers": 0,
            "data.eval_batch_size": 64,
        }
    )
    checkpoints = []
    for seed, name in enumerate(("model_a", "model_b")):
        torch.manual_seed(seed)
        model = build_model(config.model, num_classes=12)
        checkpoints.append(save_checkpoint(root / name, model, config, epoch=3))
    extra = root / "market_extra"
    shutil.copytree(tiny_market, extra)
    first_query = sorted((extra / "query").glob("*.jpg"))[0]
    shutil.copy(first_query, extra / "query" / "0099_c1s1_000001_00.jpg")
    return {"root": root, "checkpoints": checkpoints, "extra": extra, "config": config}


def read_png(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    assert image.format == "PNG"
    return image


def test_cli_ensemble_report_pictures_and_mlflow(eval_setup, workspace):
    from mlflow.tracking import MlflowClient

    a, b = eval_setup["checkpoints"]
    out = eval_setup["root"] / "out"
    env = {**os.environ, "REID_PLATFORM_HOME": str(workspace)}
    proc = subprocess.run(
        [
            sys.executable,
            "jobs/evaluate.py",
            "--checkpoint",
            str(a),
            "--checkpoint",
            str(b),
            "--weights",
            "1",
            "2",
            "--rerank",
            "--qe",
            "2",
            "--dba",
            "2",
            "--pca",
            "16",
            "--set",
            f"data.root={eval_setup['extra']}",
            "data.format=market1501",
            "--scatter",
            "pca",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"report: {out / 'report.json'}"
    assert any(line.startswith("ensemble+rerank ") for line in lines)

    report = json.loads((out / "report.json").read_text())
    suffixes = ["", "+pca16", "+dba2", "+qe2", "+rerank", "+pca16+dba2+qe2+rerank"]
    expected = [f"{m}{s}" for m in ("model_a", "model_b") for s in suffixes]
    expected += ["ensemble", "ensemble+rerank", "ensemble+pca16+dba2+qe2+rerank"]
    assert list(report["variants"]) == expected
    for name, values in report["variants"].items():
        for key in METRICS:
            assert 0.0 <= values[key] <= 1.0, (name, key)
        assert values["num_skipped_queries"] == 1
    assert report["queries"]["skipped_absent_from_gallery"] == 1
    assert report["queries"]["skipped"] == 1
    assert report["num_query"] == report["queries"]["valid"] + 1
    assert [c["weight"] for c in report["checkpoints"]] == pytest.approx([1 / 3, 2 / 3])
    assert report["checkpoints"][0]["epoch"] == 3
    assert report["dataset"]["root"] == str(eval_setup["extra"])
    sizes = {"cmc": (500, 400), "embedding": (600, 500)}
    for kind, file in report["pictures"].items():
        image = read_png(out / file)
        assert image.size == sizes.get(kind, image.size)
        assert min(image.size) >= 300

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["eval/ensemble/mAP"] == pytest.approx(report["variants"]["ensemble"]["mAP"])
    assert "eval/model_b_pca16_dba2_qe2_rerank/rank1" in metrics
    assert metrics["eval/skipped_queries_absent_from_gallery"] == 1
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/report.json",
        "evaluation/cmc.png",
        "evaluation/ranked_lists.png",
        "evaluation/embedding.png",
    } <= artifacts


def run_cli(monkeypatch, capsys, args):
    """`jobs/evaluate.py` in this process; returns (exit code, stdout, stderr)."""
    return run_job(monkeypatch, capsys, "evaluate.py", args)


def test_cli_logs_into_a_given_run(eval_setup, workspace, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from reid_platform.tracking import resolve_tracking_uri, start_run

    config = eval_setup["config"]
    uri = resolve_tracking_uri(config)
    run_id = start_run(config, uri, run_name="pretend-training")
    out = eval_setup["root"] / "into_run"
    code, stdout, stderr = run_cli(
        monkeypatch,
        capsys,
        [
            "--checkpoint",
            str(eval_setup["checkpoints"][0]),
            "--run-id",
            run_id,
            "--scatter",
            "pca",
            "--out",
            str(out),
        ],
    )
    assert code == 0, stderr
    assert f"mlflow run: {run_id}" in stdout
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    assert set(METRICS) <= {k.split("/")[-1] for k in metrics if k.startswith("eval/raw/")}
    report = json.loads((out / "report.json").read_text())
    assert report["mlflow"]["run_id"] == run_id
    # The job's raw numbers are the training loop's evaluation of the same checkpoint.
    from reid_platform.checkpoint import load_model
    from reid_platform.data.root import load_config_dataset
    from reid_platform.evaluation.embed import evaluate_model

    model, _ = load_model(eval_setup["checkpoints"][0], "cpu")
    dataset = load_config_dataset(config)
    result, skipped = evaluate_model(model, dataset.query, dataset.gallery, 64, 32, 64)
    assert skipped == 0
    for key, value in result.as_metrics().items():
        assert report["variants"]["raw"][key] == value, key
        assert metrics[f"eval/raw/{key}"] == pytest.approx(value, abs=1e-12), key


def test_cli_user_errors_exit_2_with_the_reason(eval_setup, tmp_path, monkeypatch, capsys):
    a, _ = eval_setup["checkpoints"]
    no_match = tmp_path / "no_match"
    shutil.copytree(eval_setup["extra"], no_match)
    for image in (no_match / "bounding_box_test").glob("*.jpg"):
        if int(image.name.split("_")[0]) > 0:
            image.unlink()  # the gallery keeps only distractors and junk
    code, _, stderr = run_cli(
        monkeypatch,
        capsys,
        [
            "--checkpoint",
            str(a),
            "--set",
            f"data.root={no_match}",
            "--no-mlflow",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert code == 2
    assert "error: no valid query" in stderr and "absent from the gallery" in stderr

    code, _, stderr = run_cli(
        monkeypatch,
        capsys,
        ["--checkpoint", str(a), "--checkpoint", str(a), "--weights", "1", "--no-mlflow"],
    )
    assert (code, stderr.strip()) == (2, "error: --weights has 1 values for 2 --checkpoint")

    code, _, stderr = run_cli(monkeypatch, capsys, ["--checkpoint", str(tmp_path / "nope")])
    assert code == 2 and "not a checkpoint" in stderr


def test_cli_activation_maps_unreadable_images_and_large_gallery_note(
    eval_setup, tmp_path, monkeypatch, capsys
):
    data = tmp_path / "with_corrupt"
    shutil.copytree(eval_setup["extra"], data)
    corrupt = sorted((data / "bounding_box_test").glob("*.jpg"))[3]
    corrupt.write_bytes(b"not a jpeg")
    monkeypatch.setattr(pipeline, "LARGE_MATRIX_BYTES", 0)  # every gallery counts as large
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        monkeypatch,
        capsys,
        [
            "--checkpoint", str(eval_setup["checkpoints"][0]), "--set", f"data.root={data}",
            "--activation-maps", "3", "--scatter", "pca", "--no-mlflow", "--out", str(out),
        ],
    )  # fmt: skip
    assert code == 0, stderr
    n = len(list((data / "query").glob("*.jpg")))
    assert f"large gallery: {n} x " in stdout and f"scored in blocks of {n} queries" in stdout
    assert f"1 unreadable images skipped\n  skipped image: {corrupt}: " in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["pictures"]["activation_maps"] == "activation_maps.png"
    assert read_png(out / "activation_maps.png").size[0] >= 520
    assert len(report["skipped_images"]) == 1 and str(corrupt) in report["skipped_images"][0]
    assert report["num_gallery"] == len(list((data / "bounding_box_test").glob("*.jpg"))) - 1


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--activation-maps", "-1"], "error: --activation-maps -1: N must be an integer in [0, "),
        (["--activation-maps", "500"], "error: --activation-maps 500: N must be an integer in"),
        (["--pca", "-3"], "error: --pca -3: must be >= 0 (0 = off)"),
        (["--qe", "-1"], "error: --qe -1: must be >= 0 (0 = off)"),
        (["--rerank", "--lambda", "2"], "error: --lambda 2.0: must be in [0.0, 1.0]"),
        (["--rerank", "--k2", "0"], "error: --k2 0: must be >= 1"),
    ],
)
def test_cli_bad_flag_values_name_the_flag(eval_setup, monkeypatch, capsys, flags, message):
    code, _, stderr = run_cli(
        monkeypatch,
        capsys,
        ["--checkpoint", str(eval_setup["checkpoints"][0]), "--no-mlflow", *flags],
    )
    last_line = stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert code == 2 and last_line.startswith(message), stderr
    assert "%|" not in stderr  # failed before anything was embedded


def test_flip_tta_embedding_is_the_mean_with_the_mirror_image(tiny_market, tmp_path):
    """extract_features(flip=True) == normalise(embedding of the image + of its mirror image,
    written to disk and embedded on its own)."""
    from reid_platform.data.formats import Sample
    from reid_platform.evaluation.embed import extract_features

    torch.manual_seed(0)
    config = Config().replace(**{"model.backbone": "test_resnet"})
    model = build_model(config.model, num_classes=4).eval()
    paths = sorted((tiny_market / "query").glob("*.jpg"))[:6]
    samples, mirrors = [], []
    for n, path in enumerate(paths):
        mirror = tmp_path / f"mirror_{n}.png"  # lossless: the mirror's pixels exactly
        Image.open(path).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirror)
        samples.append(Sample(str(path), n, 0, "query"))
        mirrors.append(Sample(str(mirror), n, 0, "query"))
    plain = extract_features(model, samples, 64, 32).feats
    mirrored = extract_features(model, mirrors, 64, 32).feats
    expected = plain + mirrored
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    flipped = extract_features(model, samples, 64, 32, batch_size=4, flip=True)
    np.testing.assert_allclose(flipped.feats, expected, atol=1e-5)
    assert not np.allclose(flipped.feats, plain, atol=1e-3)


def test_cli_tta_flip_is_reported_and_changes_the_scores(eval_setup, monkeypatch, capsys):
    a, _ = eval_setup["checkpoints"]
    reports = {}
    for tta in ("none", "flip"):
        out = eval_setup["root"] / f"tta_{tta}"
        code, _, stderr = run_cli(
            monkeypatch,
            capsys,
            ["--checkpoint", str(a), "--tta", tta, "--no-mlflow", "--scatter", "pca", "--out",
             str(out)],
        )
        assert code == 0, stderr
        reports[tta] = json.loads((out / "report.json").read_text())
        assert reports[tta]["tta"] == tta
    assert reports["flip"]["variants"]["raw"] != reports["none"]["variants"]["raw"]
