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
from reid_platform.config import Config
from reid_platform.evaluation import (
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
    plan_variants,
    plot_embedding_scatter,
    plot_ranked_lists,
    query_expansion,
)
from reid_platform.evaluation.pipeline import mlflow_metric_name
from reid_platform.evaluation.report import FALSE_MATCH, JUNK, TRUE_MATCH, match_kinds
from reid_platform.models import build_model

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
    assert mlflow_metric_name("a+pca8+rerank", "mAP") == "eval/a_pca8_rerank/mAP"


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
    with pytest.raises(ValueError, match=r"\(3, 8\) and \(2,\)"):
        plot_embedding_scatter(np.zeros((3, 8)), np.zeros(2), tmp_path / "x.png")


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
    assert json.loads((out / "report.json").read_text())["mlflow"]["run_id"] == run_id


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
