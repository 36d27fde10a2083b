"""End to end for the part models on scikit-learn's digits: 2-worker DDP runs of MGN (with a
circle-loss term, the RAM cache and channels-last) and PCB (with RPP) that beat their
untrained model; the MGN checkpoint built into an index and served, search equal to brute
force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_serve import (  # noqa: F401  (serve_port: the Serve fixture, shared)
    app_args,
    assert_same_ranking,
    deploy,
    search,
    serve_port,
)
from test_train_e2e import digits_tree  # noqa: F401  (the digits fixture, shared)

from reid_platform.config import Config

from conftest import tiny_config_overrides

pytestmark = pytest.mark.slow

FAMILIES = {
    "mgn": {"model.arch": "mgn", "model.parts": [1, 2, "2x2"], "model.part_dim": 32,
            "loss.extra": [{"name": "circle", "weight": 0.2, "scale": 32.0}],
            "data.cache": "ram", "train.channels_last": "on"},
    "pcb": {"model.arch": "pcb", "model.pcb_stripes": 2, "model.pcb_rpp": True,
            "model.part_dim": 32},
}


def family_config(arch: str, root) -> Config:
    """The digits recipe of test_train_e2e (32x32, no flip or erasing), 2 DDP workers."""
    return Config().replace(**{
        **tiny_config_overrides(),
        "name": f"family-{arch}",
        "data.root": str(root),
        "data.format": "folder",
        "data.height": 32,
        "data.width": 32,
        "data.num_ids_per_batch": 5,
        "data.num_instances": 8,
        "data.augment.flip_p": 0.0,
        "data.augment.erasing_p": 0.0,
        "data.augment.pad": 2,
        "train.epochs": 6,
        "train.lr": 0.001,
        "train.eval_every": 100,
        **FAMILIES[arch],
    })


def untrained_metrics(config: Config) -> dict[str, float]:
    """The metrics of the model the workers start from (same seed, same builder)."""
    from reid_platform.data.formats import balance
    from reid_platform.data.root import load_config_dataset
    from reid_platform.evaluation.embed import evaluate_model
    from reid_platform.models import build_model

    dataset = load_config_dataset(config)
    _, pid_map = balance(dataset.train)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, len(pid_map), (config.data.height, config.data.width))
    result, _ = evaluate_model(model, dataset.query, dataset.gallery, config.data.height,
                               config.data.width)
    return result.as_metrics()


@pytest.fixture(scope="module")
def trained(digits_tree, ray_session, workspace):  # noqa: F811  (the fixture)
    from reid_platform.training.trainer import run_training

    runs = {}
    for arch in FAMILIES:
        config = family_config(arch, digits_tree)
        runs[arch] = (config, untrained_metrics(config), run_training(config, progress=False))
    return runs


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_ddp_family_run_beats_untrained(trained, arch):
    from mlflow.tracking import MlflowClient

    config, before, result = trained[arch]
    after = result.metrics
    print(f"{arch}: untrained mAP {before['mAP']:.4f} rank1 {before['rank1']:.4f}; trained "
          f"mAP {after['mAP']:.4f} rank1 {after['rank1']:.4f}")
    assert after["mAP"] > before["mAP"] + 0.1, (before, after)
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    expected = {"loss_id"} | ({"loss_triplet", "loss_circle"} if arch == "mgn" else set())
    assert expected <= set(run.data.metrics)
    if arch == "pcb":  # no metric branch: no triplet term
        assert "loss_triplet" not in run.data.metrics


def test_mgn_checkpoint_indexes_and_serves(
    trained, tiny_market, tmp_path, serve_port  # noqa: F811  (the fixture)
):
    import build_index
    import httpx
    from ray import serve

    from reid_platform.checkpoint import load_model, read_checkpoint
    from reid_platform.evaluation.embed import extract_features
    from reid_platform.retrieval.gallery import gallery_samples

    _, _, result = trained["mgn"]
    model, loaded = load_model(result.checkpoint)
    assert loaded.model.arch == "mgn" and model.embedding_dim == 9 * 32
    assert read_checkpoint(result.checkpoint)["epoch"] == 6

    index_dir = tmp_path / "index"
    build_index.main(["--checkpoint", str(result.checkpoint), "--gallery", str(tiny_market),
                      "--shards", "2", "--out", str(index_dir), "--workers", "1",
                      "--batch-size", "16", "--no-progress"])
    samples, _ = gallery_samples(tiny_market)
    features = extract_features(model, samples, loaded.data.height, loaded.data.width)
    ids = [s.item_id for s in samples]
    deploy({"mgn": app_args(index_dir, "mgn")})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}/reid-test-mgn",
                          timeout=60.0) as client:
            for path in sorted((tiny_market / "query").iterdir())[:3]:
                query = extract_features(model, _query_sample(path), loaded.data.height,
                                         loaded.data.width).feats[0]
                scores = features.feats @ query  # (N,) cosine of unit vectors
                order = np.argsort(-scores, kind="stable")[:10]
                results = search(client, path.read_bytes(), 10)
                assert_same_ranking(results, [ids[j] for j in order], scores[order])
    finally:
        serve.delete("reid-test-mgn")


def _query_sample(path):
    from reid_platform.data.formats import Sample

    return [Sample(path=str(path), pid=0, camid=0, split="query")]
