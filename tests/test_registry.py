"""Model registry against a real `mlflow server` (proxied artifacts, loopback): registration on
train and sweep, versions, tags, aliases, loading by every URI form, lineage, and the errors.

One server for the module; tiny models (`test_resnet`, 64x32) trained in debug mode
(`train.num_workers: 0`, no Ray) except the sweep.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow_server import mlflow_server

from reid_platform.checkpoint import (
    CheckpointError,
    checkpoint_file,
    load_model,
    model_source,
    read_checkpoint,
    save_checkpoint,
)
from reid_platform.config import Config, load_config
from reid_platform.lineage import MANIFEST_MODEL_KEYS, index_lineage
from reid_platform.retrieval.index import read_manifest
from reid_platform.tracking import (
    RegistryError,
    dataset_digest,
    parse_model_uri,
    promote,
    record_model,
    start_run,
)

from conftest import REPO, job_env, tiny_config_overrides

MODEL = f"reg-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def server(tmp_path_factory, workspace):
    """The module's MLflow server, made the default store (MLFLOW_TRACKING_URI) meanwhile."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(root) as url, pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", url)
        yield url, root


def tiny_config(tiny_market: Path, **extra) -> Config:
    return Config().replace(**{
        **tiny_config_overrides(),
        "name": MODEL,
        "data.format": "market1501",
        "data.root": str(tiny_market),
        "train.num_workers": 0,  # debug mode: the loop in this process, no Ray
        "train.epochs": 1,
        "train.batches_per_epoch": 2,
        **extra,
    })


@pytest.fixture(scope="module")
def trained(server, tiny_market):
    """Two training runs of MODEL: the second resumes from the first by alias (the URI form a
    user would give), so it also tests `train.resume_from` with a model URI."""
    from mlflow.tracking import MlflowClient

    from reid_platform.training.trainer import run_training

    url, _ = server
    first = run_training(tiny_config(tiny_market), progress=False)
    MlflowClient(url).set_registered_model_alias(MODEL, "candidate", "1")
    second = run_training(
        tiny_config(tiny_market, **{"train.epochs": 2,
                                    "train.resume_from": f"models:/{MODEL}@candidate"}),
        progress=False,
    )
    return first, second


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- URIs without a store --------------------------------------------------------------


@pytest.mark.parametrize(("uri", "message"), [
    ("models:/", "expected models:/NAME@ALIAS or models:/NAME/VERSION"),
    ("models:/demo", "expected models:/NAME@ALIAS or models:/NAME/VERSION"),
    ("models:/demo@", "expected models:/NAME@ALIAS"),
    ("models:/demo/Production", "stages are deprecated, use an alias: models:/demo@production"),
    ("models:/demo/1/extra", "expected models:/NAME@ALIAS or models:/NAME/VERSION"),
    ("runs:/", "expected runs:/RUN_ID/PATH"),
])
def test_malformed_uris_are_refused_naming_them(uri, message):
    with pytest.raises(RegistryError) as err:
        parse_model_uri(uri)
    assert message in str(err.value) and uri in str(err.value)
    with pytest.raises(CheckpointError, match="expected|stages"):
        checkpoint_file(uri)


def test_uri_forms_parse():
    assert parse_model_uri("models:/demo@production") == ("models", "demo", "@production")
    assert parse_model_uri("models:/demo/3") == ("models", "demo", "3")
    assert parse_model_uri("models:/demo/latest") == ("models", "demo", "latest")
    assert parse_model_uri("runs:/abc/checkpoints/final") == ("runs", "abc", "checkpoints/final")
    assert parse_model_uri("runs:/abc") == ("runs", "abc", "model")


def test_other_schemes_and_missing_local_store(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="s3://b/k: unsupported URI"):
        checkpoint_file("s3://b/k")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")
    with pytest.raises(CheckpointError, match="no MLflow store at sqlite:///"):
        checkpoint_file("models:/demo/1")
    assert not (tmp_path / "none.db").exists()  # refused, not created


def test_dataset_digest_follows_the_data(tiny_market, tmp_path):
    import shutil

    from reid_platform.data.root import load_config_dataset

    config = tiny_config(tiny_market)
    before = dataset_digest(load_config_dataset(config, report=False))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_market, copy)
    moved = config.replace(**{"data.root": str(copy)})
    assert dataset_digest(load_config_dataset(moved, report=False)) == before  # any mount point
    victim = next((copy / "bounding_box_test").glob("*.jpg"))
    victim.unlink()
    assert dataset_digest(load_config_dataset(moved, report=False)) != before


# ---- against the server ----------------------------------------------------------------


@pytest.mark.slow
def test_training_runs_register_versions_with_tags(server, trained, tiny_market):
    from mlflow.tracking import MlflowClient

    url, root = server
    first, second = trained
    client = MlflowClient(url, registry_uri=url)
    versions = {v.version: v for v in client.search_model_versions(f"name = '{MODEL}'")}
    assert sorted(versions) == ["1", "2"]
    for version, result in (("1", first), ("2", second)):
        mv = versions[version]
        payload = read_checkpoint(result.checkpoint)
        assert mv.run_id == result.run_id and mv.tags["run_id"] == result.run_id
        assert mv.tags["dataset"] == tiny_market.name
        assert mv.tags["input_size"] == "64x32"
        for key in ("score", "mAP", "rank1"):
            assert float(mv.tags[key]) == pytest.approx(payload["metrics"][key], abs=1e-6)
        assert "sweep_parent_run_id" not in mv.tags
        run = client.get_run(result.run_id)
        assert run.data.tags["registered_model_version"] == f"{MODEL}/{version}"
        # the dataset input: name, digest of the samples, source
        (dataset_input,) = run.inputs.dataset_inputs
        assert dataset_input.dataset.name == tiny_market.name
        assert dataset_input.dataset.digest == mv.tags["dataset_digest"]
        assert len(dataset_input.dataset.digest) == 16
        assert json.loads(dataset_input.dataset.source) == {"uri": str(tiny_market)}
        assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "train"
        profile = json.loads(dataset_input.dataset.profile)
        assert profile["train_ids"] == 12 and profile["query_images"] > 0
        # checkpoints record the run that wrote them
        assert payload["mlflow_run"] == {"tracking_uri": url, "run_id": result.run_id}
    assert versions["1"].tags["dataset_digest"] == versions["2"].tags["dataset_digest"]

    # The MLflow Model: a pyfunc from code (nothing pickled), its signature and input size,
    # stored through the server's proxied artifacts.
    model_id = versions["2"].source.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == second.run_id
    assert logged.artifact_location.startswith("mlflow-artifacts:")
    model_dir = next(root.joinpath("artifacts").rglob(f"{model_id}/artifacts"))
    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert {"MLmodel", "mlflow_model.py", "artifacts/model.pt"} <= files
    assert not any(f.endswith((".pkl", ".cloudpickle")) for f in files)
    import yaml

    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in pyfunc  # a pickled model would be named here
    assert mlmodel["metadata"]["reid_platform"]["input_size"] == [64, 32]
    dim = mlmodel["metadata"]["reid_platform"]["embedding_dim"]
    inputs = json.loads(mlmodel["signature"]["inputs"])[0]["tensor-spec"]
    outputs = json.loads(mlmodel["signature"]["outputs"])[0]["tensor-spec"]
    assert inputs == {"dtype": "uint8", "shape": [-1, -1, -1, 3]}
    assert outputs == {"dtype": "float32", "shape": [-1, dim]}
    inside = torch.load(model_dir / "artifacts" / "model.pt", weights_only=True)
    assert inside["training_state"] == {}  # slim: no optimizer state
    assert state_equal(inside["model_state"], read_checkpoint(second.checkpoint)["model_state"])


@pytest.mark.slow
def test_resume_from_an_alias_pins_the_version(trained):
    first, second = trained
    saved = load_config(second.config_path)
    assert saved.train.resume_from == f"models:/{MODEL}/1"  # the alias, resolved once
    assert read_checkpoint(second.checkpoint)["epoch"] == 2
    assert read_checkpoint(first.checkpoint)["epoch"] == 1


@pytest.mark.slow
def test_promote_and_load_by_every_uri_form(server, trained, workspace):
    import promote as promote_job

    url, _ = server
    first, second = trained
    weights = {r.run_id: read_checkpoint(r.checkpoint)["model_state"] for r in trained}

    result = promote_job.main(["--model", MODEL, "--version", "1", "--alias", "production"])
    assert result["version"] == "1" and result["run_id"] == first.run_id
    prod = checkpoint_file(f"models:/{MODEL}@production")
    assert state_equal(read_checkpoint(prod)["model_state"], weights[first.run_id])
    source = model_source(prod)
    assert source["pinned_uri"] == f"models:/{MODEL}/1" and source["run_id"] == first.run_id
    assert prod.parent.parent.name == MODEL and prod.parent.name == "1"  # keyed by version
    mtime = prod.stat().st_mtime_ns
    assert checkpoint_file(f"models:/{MODEL}/1") == prod  # same version: the cached copy
    assert prod.stat().st_mtime_ns == mtime

    scores = {r.run_id: read_checkpoint(r.checkpoint)["metrics"]["score"] for r in trained}
    best_run = max(trained, key=lambda r: (scores[r.run_id], r is second)).run_id
    moved = promote(url, MODEL, "production", best_by="score")
    assert moved.run_id == best_run
    again = checkpoint_file(f"models:/{MODEL}@production")
    assert state_equal(read_checkpoint(again)["model_state"], weights[best_run])
    assert again.parent.name == moved.version  # an alias that moved fetches the new version

    forms = {
        f"models:/{MODEL}/2": second.run_id,
        f"models:/{MODEL}/latest": second.run_id,
        f"runs:/{first.run_id}/model": first.run_id,
        f"runs:/{first.run_id}/checkpoints/final": first.run_id,
        f"runs:/{second.run_id}/checkpoints/final/model.pt": second.run_id,
    }
    for uri, run_id in forms.items():
        model, config = load_model(uri)
        assert state_equal(model.state_dict(), weights[run_id]), uri
        assert config.name == MODEL
    cache = workspace / "model-cache"
    assert all(p.name == "model.pt" for p in cache.rglob("*.pt"))
    assert not list(cache.rglob(".download-*"))  # no partial downloads left


@pytest.mark.slow
@pytest.mark.parametrize(("uri", "message"), [
    (f"models:/{MODEL}@nope", f"model '{MODEL}' has no alias 'nope' (its aliases:"),
    (f"models:/{MODEL}/99", f"model '{MODEL}' has no version 99 (versions: 1..2)"),
    ("models:/no-such-model/1", "no registered model 'no-such-model' in http://127.0.0.1:"),
    ("runs:/0123456789abcdef/model", "no run '0123456789abcdef' in http://127.0.0.1:"),
])
def test_unknown_models_versions_aliases_runs_are_named(trained, uri, message):
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(uri)
    assert message in str(err.value) and uri in str(err.value)


@pytest.mark.slow
def test_promote_errors(server, trained):
    url, _ = server
    with pytest.raises(RegistryError, match=f"model '{MODEL}' has no version 7"):
        promote(url, MODEL, "production", version="7")
    with pytest.raises(RegistryError, match="no registered model 'ghost'"):
        promote(url, "ghost", "production", version="1")
    with pytest.raises(RegistryError, match="an alias is a name"):
        promote(url, MODEL, "3", version="1")
    with pytest.raises(RegistryError, match="choose one of"):
        promote(url, MODEL, "production", best_by="loss")


@pytest.mark.slow
def test_pyfunc_maps_images_to_the_models_embeddings(server, trained):
    """`mlflow.pyfunc.load_model` runs the model's code (no unpickling) and gives exactly the
    embeddings of our own loader, for images of the input size and of another size."""
    import mlflow.pyfunc

    from reid_platform.data.transforms import build_eval_transform

    _, second = trained
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}/2")
    model, config = load_model(second.checkpoint)
    rng = np.random.default_rng(0)
    for shape in ((5, 64, 32, 3), (3, 100, 50, 3)):
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        got = pyfunc.predict(images)
        transform = build_eval_transform(config.data.height, config.data.width)
        batch = torch.stack([transform(image=im)["image"] for im in images])
        with torch.inference_mode():
            want = model.embed(batch).numpy()
        assert got.shape == (shape[0], model.embedding_dim) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_promote_and_lineage_smoke_tests(tmp_path, monkeypatch):
    """`--smoke-test` of promote and lineage: a throw-away store with versions 1 (score 0.25)
    and 2 (0.5); the best by score is promoted, and the lineage of an index built from
    models:/smoke@production names version 2 and the run that logged it."""
    import importlib

    promote_job = importlib.import_module("promote")
    lineage_job = importlib.import_module("lineage")
    monkeypatch.setenv("REID_PLATFORM_HOME", str(tmp_path))  # restored after the jobs set it
    result = promote_job.main(["--smoke-test"])
    assert (result["model"], result["alias"], result["version"]) == ("smoke", "production", "2")
    assert float(result["score"]) == 0.5
    chain = lineage_job.main(["--smoke-test", "--json"])
    assert chain["model"]["uri"] == "models:/smoke/2"
    assert chain["model"]["source_uri"] == "models:/smoke@production"
    assert chain["model"]["tags"]["run_id"] == chain["training_run"]["run_id"]
    assert float(chain["model"]["tags"]["score"]) == 0.5
    assert chain["index"]["count"] == 0 and chain["sweep_run"] is None


@pytest.mark.slow
def test_register_false_logs_the_model_only(server, tiny_market, tmp_path):
    from mlflow.tracking import MlflowClient

    from reid_platform.models import build_model

    url, _ = server
    config = tiny_config(tiny_market, **{"name": f"{MODEL}-off", "tracking.register": False})
    run_id = start_run(config, url)
    checkpoint = save_checkpoint(tmp_path / "ckpt", build_model(config.model, 12), config, 0)
    assert record_model(config, url, run_id, checkpoint) is None
    client = MlflowClient(url, registry_uri=url)
    assert client.search_registered_models(f"name = '{MODEL}-off'") == []
    # the run's MLflow Model is still there, and loadable by runs:/ URI
    model, _ = load_model(f"runs:/{run_id}/model")
    assert state_equal(model.state_dict(), read_checkpoint(checkpoint)["model_state"])


@pytest.mark.slow
def test_jobs_take_model_uris(server, trained, ray_address, workspace, tmp_path):
    """evaluate and build_index with `--checkpoint models:/...`; a missing alias is one line
    naming it (exit 2, no traceback); lineage follows index -> version -> run."""
    url, _ = server
    env = job_env(ray_address, workspace)
    first, _ = trained
    uri = f"models:/{MODEL}/1"
    proc = subprocess.run(
        [sys.executable, "jobs/evaluate.py", "--checkpoint", uri, "--no-mlflow",
         "--scatter", "pca", "--out", str(tmp_path / "eval")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["num_query"] > 0

    proc = subprocess.run(
        [sys.executable, "jobs/evaluate.py", "--checkpoint", f"models:/{MODEL}@missing",
         "--no-mlflow"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2
    assert f"models:/{MODEL}@missing: model '{MODEL}' has no alias 'missing'" in proc.stderr
    assert "Traceback" not in proc.stderr

    index_dir = tmp_path / "index"
    dataset_root = Path(read_checkpoint(first.checkpoint)["config"]["data"]["root"])
    proc = subprocess.run(
        [sys.executable, "jobs/build_index.py", "--checkpoint", uri, "--gallery",
         str(dataset_root), "--out", str(index_dir), "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, "jobs/lineage.py", "--index", str(index_dir), "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    chain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert chain["model"]["uri"] == uri and chain["model"]["source_uri"] == uri
    assert chain["training_run"]["run_id"] == first.run_id
    assert chain["training_run"]["dataset"]["name"] == dataset_root.name
    assert chain["sweep_run"] is None
    assert chain["index"]["count"] > 0 and chain["notes"] == []
    # The manifest records the model itself: the lineage holds without the model cache.
    extra = read_manifest(index_dir)["extra"]
    assert {k: extra[k] for k in MANIFEST_MODEL_KEYS} == {
        "model_uri": uri, "model_name": MODEL, "model_version": "1", "run_id": first.run_id,
        "tracking_uri": url}
    cached = Path(extra["checkpoint"])
    shutil.move(cached, tmp_path / "moved")
    try:
        chain = index_lineage(index_dir)
    finally:
        shutil.move(tmp_path / "moved", cached)
    assert chain["model"]["uri"] == uri and chain["model"]["source_uri"] == uri
    assert chain["training_run"]["run_id"] == first.run_id
    assert any("checkpoint not readable here" in note for note in chain["notes"])


@pytest.mark.slow
def test_sweep_registers_its_best_trial(server, ray_session, tiny_market, workspace):
    from mlflow.tracking import MlflowClient

    from reid_platform.tuning import run_sweep

    url, _ = server
    name = f"{MODEL}-sweep"
    overrides = {
        **tiny_config_overrides(),
        "name": name,
        "data.format": "market1501",
        "data.root": str(tiny_market),
        "train.num_workers": 1,
        "train.epochs": 1,
        "train.batches_per_epoch": 2,
        "tune.num_samples": 2,
        "tune.max_concurrent": 2,
    }
    config = load_config(REPO / "configs" / "sweep_demo.yaml",
                         [f"{k}={v}" for k, v in overrides.items()])
    result = run_sweep(config, progress=False)
    client = MlflowClient(url, registry_uri=url)
    parent = client.get_run(result.parent_run_id)
    best_run_id = parent.data.tags["best_run_id"]
    (mv,) = client.search_model_versions(f"name = '{name}'")
    assert mv.run_id == best_run_id and mv.tags["run_id"] == best_run_id
    assert mv.tags["sweep_parent_run_id"] == result.parent_run_id
    assert float(mv.tags["score"]) == pytest.approx(result.best_metrics["score"], abs=1e-6)
    assert mv.tags["dataset"] == tiny_market.name
    best_run = client.get_run(best_run_id)
    assert best_run.inputs.dataset_inputs[0].dataset.name == tiny_market.name
    assert best_run.data.tags["registered_model_version"] == f"{name}/1"
    payload = read_checkpoint(f"models:/{name}/1")
    assert payload["mlflow_run"]["run_id"] == best_run_id
    assert payload["config"]["loss"]["margin"] == pytest.approx(result.best_params["loss.margin"])

    # summarising the finished sweep again registers nothing new
    run_sweep(config, progress=False)
    assert len(client.search_model_versions(f"name = '{name}'")) == 1

    # lineage of an index built from the sweep's model names the sweep
    from reid_platform.retrieval.index import ShardedIndex

    index_dir = workspace / f"index-{name}"
    checkpoint = checkpoint_file(f"models:/{name}/1")
    ShardedIndex.create(index_dir, dim=8, num_shards=1,
                        extra={"checkpoint": str(checkpoint.parent)})
    chain = index_lineage(index_dir)
    assert chain["sweep_run"]["run_id"] == result.parent_run_id
    assert chain["sweep_run"]["is_best_trial"] is True
    assert chain["model"]["uri"] == f"models:/{name}/1"


# ---- serving a registered model ----------------------------------------------------------


def _index_for(directory: Path, checkpoint: str | Path, dim: int) -> Path:
    """An empty index "built by" `checkpoint`: its manifest records it as build_index does."""
    from reid_platform.lineage import model_record
    from reid_platform.retrieval.index import ShardedIndex

    extra = {"checkpoint": str(checkpoint), **model_record(checkpoint_file(checkpoint))}
    ShardedIndex.create(directory, dim=dim, num_shards=1, extra=extra)
    return directory


def test_serving_checkpoint_resolves_and_refuses(server, trained, tmp_path):
    """`model_uri` is pinned to its version and downloaded at build time; both / neither /
    a path as model_uri / a missing alias / another embedding size are errors naming them."""
    from mlflow.tracking import MlflowClient

    from serve_apps.retrieval import RetrievalArgs, serving_checkpoint

    url, _ = server
    first, second = trained
    MlflowClient(url).set_registered_model_alias(MODEL, "serving", "2")
    dim = load_model(first.checkpoint)[0].embedding_dim

    def pick(index_dir: Path = tmp_path / "v1", **kwargs) -> str:
        return serving_checkpoint(RetrievalArgs(index_dir=str(index_dir), **kwargs),
                                  read_manifest(index_dir), index_dir)

    by_second = _index_for(tmp_path / "v2", second.checkpoint, dim)
    pinned = pick(by_second, model_uri=f"models:/{MODEL}@serving")
    assert pinned == f"models:/{MODEL}/2"
    assert state_equal(read_checkpoint(pinned)["model_state"],
                       read_checkpoint(second.checkpoint)["model_state"])
    _index_for(tmp_path / "v1", first.checkpoint, dim)
    assert pick() == str(checkpoint_file(first.checkpoint))  # the manifest's, as before
    assert pick(model_uri=f"models:/{MODEL}/1") == f"models:/{MODEL}/1"
    # version 2 embeds into another space than the one the index was built in
    with pytest.raises(ValueError, match=f"was built by another model .*{first.run_id}"):
        pick(model_uri=f"models:/{MODEL}@serving")
    assert pick(checkpoint=f"runs:/{first.run_id}/model") == f"runs:/{first.run_id}/model"
    with pytest.raises(ValueError, match="give checkpoint or model_uri, not both"):
        pick(model_uri=f"models:/{MODEL}/1", checkpoint=str(first.checkpoint))
    with pytest.raises(ValueError, match="model_uri='/some/path': expected models:/NAME@ALIAS"):
        pick(model_uri="/some/path")
    with pytest.raises(CheckpointError, match=f"model_uri: models:/{MODEL}@gone: model "
                       f"'{MODEL}' has no alias 'gone'"):
        pick(model_uri=f"models:/{MODEL}@gone")
    other = _index_for(tmp_path / "other", first.checkpoint, dim + 1)
    with pytest.raises(ValueError, match=rf"embeds in {dim} dimensions but the index .* holds "
                       rf"{dim + 1}-dimensional"):
        serving_checkpoint(RetrievalArgs(index_dir=str(other), model_uri=f"models:/{MODEL}/1"),
                           read_manifest(other), other)


@pytest.mark.slow
def test_service_serves_a_registered_model(server, trained, ray_session, tiny_market, tmp_path):
    """`model_uri=models:/NAME@ALIAS`: the Embedder runs that version (its /v1/embed equals
    the version's model on the same image) and /v1/stats names the pinned version."""
    import httpx
    from mlflow.tracking import MlflowClient
    from ray import serve
    from ray.serve.context import _get_global_client

    from reid_platform.data.dataset import decode_image
    from reid_platform.retrieval.embedders import make_embedder
    from serve_apps.retrieval import build_app

    url, _ = server
    first, second = trained
    MlflowClient(url).set_registered_model_alias(MODEL, "serving", "2")
    dim = load_model(first.checkpoint)[0].embedding_dim
    index_dir = _index_for(tmp_path / "index", second.checkpoint, dim)  # by version 2's run
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": free})  # or Serve's running one
    port = ray_session.get(_get_global_client()._controller.get_http_config.remote()).port
    name = f"reg-serve-{uuid.uuid4().hex[:6]}"
    app = build_app({"index_dir": str(index_dir), "model_uri": f"models:/{MODEL}@serving",
                     "embedder_num_cpus": 0.5, "ingress_num_cpus": 0.2, "shard_num_cpus": 0.1})
    serve.run(app, name=name, route_prefix=f"/{name}")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/{name}", timeout=60) as client:
            stats = client.get("/v1/stats").json()
            assert stats["model"]["model_uri"] == f"models:/{MODEL}/2"
            assert stats["model"]["checkpoint"].endswith(f"models/{MODEL}/2/model.pt")
            image = sorted((tiny_market / "query").iterdir())[0]
            got = client.post("/v1/embed", files={"image": image.read_bytes()}).json()
        want = make_embedder("torch", second.checkpoint, "cpu").embed(
            [decode_image(image.read_bytes())])[0]
        np.testing.assert_allclose(np.asarray(got["embedding"]), want, atol=1e-4)
    finally:
        serve.delete(name)
