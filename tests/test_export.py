"""ONNX export (`reid_platform.retrieval.export`, `jobs/export.py`): parity with PyTorch on real
images, the dynamic batch axis, the metadata contract, fp16, MLflow logging, error paths."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from reid_platform.checkpoint import CheckpointError, load_model, save_checkpoint
from reid_platform.config import Config
from reid_platform.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from reid_platform.models import ARCHS, build_model
from reid_platform.retrieval import export as ex

from conftest import REPO, run_job


def tiny_config(root, backbone: str = "test_resnet", **extra) -> Config:
    return Config().replace(**{
        "name": "export-test", "model.backbone": backbone, "data.root": str(root),
        "data.format": "market1501", "data.height": 64, "data.width": 32, **extra,
    })


def randomise_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """BatchNorm statistics away from (0, 1), so an export that drops or mis-folds them
    cannot agree with PyTorch by accident (a fresh model's BNs are near-identities)."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.running_mean.numel()
            module.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
    return model.eval()


def make_checkpoint(directory, root, backbone="test_resnet", mlflow_run=None, **extra):
    config = tiny_config(root, backbone, **extra)
    model = randomise_norms(build_model(config.model, num_classes=12))
    return save_checkpoint(directory, model, config, epoch=3, mlflow_run=mlflow_run)


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory):
    """A run in a fresh SQLite store, as a training run would have recorded it."""
    from mlflow.tracking import MlflowClient

    base = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("export", artifact_location=(base / "art").as_uri())
    return {"tracking_uri": uri, "run_id": client.create_run(experiment).info.run_id}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_market):
    """One fp32 export of a test_resnet BoT checkpoint, shared by the read-only tests."""
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "bot", tiny_market)
    return checkpoint, ex.export_onnx(checkpoint)


def query_images(root, count=9):
    from reid_platform.data.formats import load_dataset

    samples = load_dataset(root, "market1501").query[:count]
    return ex.load_images(samples, 64, 32)[0]


@pytest.mark.parametrize("backbone", ["test_resnet", "resnet18"])
def test_bot_export_matches_pytorch_on_query_images(backbone, tmp_path, tiny_market):
    checkpoint = make_checkpoint(tmp_path / "ckpt", tiny_market, backbone)
    result = ex.export_onnx(checkpoint)
    assert result.path == checkpoint / "model.onnx" and result.path.is_file()
    parity = result.parity
    assert parity.passed and parity.max_abs_diff <= 1e-4 and parity.min_cosine > 0.9999
    from reid_platform.data.formats import load_dataset

    num_query = len(load_dataset(tiny_market, "market1501").query)
    assert parity.num_images == min(64, num_query) and parity.batch_sizes == (1, num_query - 1)
    assert "query set" in result.parity_source

    # The file on disk, in a fresh session, on a batch size never traced (the export saw 2).
    model, _ = load_model(checkpoint)
    images = query_images(tiny_market, 5)
    embedder = ex.OnnxEmbedder(result.path, num_threads=1)
    with torch.inference_mode():
        reference = model.embed(torch.from_numpy(images)).numpy()
    got = embedder(images)
    assert got.dtype == np.float32 and got.shape == (5, model.embedding_dim)
    np.testing.assert_allclose(got, reference, atol=1e-4, rtol=0)
    assert embedder.providers[-1] == "CPUExecutionProvider"


def test_embedder_call_shape_dynamic_batches_and_bad_input(exported, tiny_market):
    checkpoint, result = exported
    model, _ = load_model(checkpoint)
    images = query_images(tiny_market, 7)
    embedder = ex.OnnxEmbedder(result.path, num_threads=1, max_batch_size=3)  # chunks 3+3+1
    got = embedder(torch.from_numpy(images))  # a torch CPU tensor is accepted too
    with torch.inference_mode():
        reference = model.embed(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(got, reference, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(embedder(images[2:3]), reference[2:3], atol=1e-4, rtol=0)
    assert embedder(images[:0]).shape == (0, model.embedding_dim)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 32, 64\); this model takes \(B, 3, 64, "
                                         r"32\)"):
        embedder(np.zeros((2, 3, 32, 64), np.float32))


def test_metadata_round_trip(exported):
    checkpoint, result = exported
    meta = ex.read_metadata(result.path)
    assert meta == result.metadata
    assert ex.OnnxEmbedder(result.path, num_threads=1).metadata == meta
    payload = torch.load(checkpoint / "model.pt", weights_only=True)
    assert (meta.input_height, meta.input_width) == (64, 32)
    assert meta.mean == pytest.approx(IMAGENET_MEAN) and meta.std == pytest.approx(IMAGENET_STD)
    assert (meta.channel_order, meta.layout, meta.pixel_scale) == ("RGB", "NCHW", 255.0)
    assert meta.embedding_dim == load_model(checkpoint)[0].embedding_dim
    assert (meta.feature, meta.normalized, meta.precision) == ("post_bn", "l2", "fp32")
    assert (meta.arch, meta.backbone, meta.checkpoint_epoch) == ("bot", "test_resnet", 3)
    assert meta.config_digest == ex.config_digest(payload["config"])
    assert meta.checkpoint_sha256 == ex.file_sha256(checkpoint / "model.pt")
    assert meta.parity_max_abs_diff == result.parity.max_abs_diff <= 1e-4
    assert meta.exporter in ("dynamo", "torchscript") and meta.opset == 18
    # A config differing in one value has another digest; key order does not matter.
    changed = dict(payload["config"], train={**payload["config"]["train"], "lr": 1.0})
    assert ex.config_digest(changed) != meta.config_digest
    assert ex.config_digest(dict(reversed(payload["config"].items()))) == meta.config_digest
    # Unset parity numbers (NaN) survive the JSON round trip.
    blank = ex.OnnxMetadata.from_props(
        {**meta.to_props(), "reid_platform.parity_max_abs_diff": "null"})
    assert np.isnan(blank.parity_max_abs_diff)
    # The input and output are named and typed as the contract says, the batch axis symbolic.
    import onnx

    graph = onnx.load(str(result.path)).graph
    (inp,), (out,) = graph.input, graph.output
    assert (inp.name, out.name) == ("images", "embeddings")
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, 64, 32]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_fp16_export_is_float16_inside_and_within_its_bound(exported, tiny_market):
    import onnx

    checkpoint, fp32 = exported
    result = ex.export_onnx(checkpoint, fp16=True)
    assert result.path == checkpoint / "model.fp16.onnx" and fp32.path.is_file()
    assert result.metadata.precision == "fp16" and result.parity.atol == ex.FP16_ATOL == 5e-3
    # Really half precision: differs from PyTorch more than fp32 does, within the bound.
    assert 1e-6 < result.parity.max_abs_diff <= 5e-3, result.parity.summary()
    proto = onnx.load(str(result.path))
    weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert sum(int(np.prod(t.dims)) for t in weights) > 10_000  # the conv weights
    for value in (*proto.graph.input, *proto.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert result.size_bytes < 0.6 * fp32.size_bytes
    got = ex.OnnxEmbedder(result.path, num_threads=1)(query_images(tiny_market, 4))
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_parity_failure_writes_nothing(exported):
    checkpoint, _ = exported
    target = checkpoint / "model.fp16.onnx"
    target.unlink(missing_ok=True)
    with pytest.raises(ex.ExportError, match=r"disagrees with PyTorch: max abs diff .* bound "
                                             r"1e-07\): FAILED; not written"):
        ex.export_onnx(checkpoint, fp16=True, atol=1e-7)  # fp16 cannot be that close
    assert not target.exists()
    assert not [p for p in checkpoint.iterdir() if p.name.endswith(".tmp")]


def test_check_parity_catches_other_weights(exported, tiny_market):
    checkpoint, result = exported
    model, config = load_model(checkpoint)
    other = randomise_norms(build_model(config.model, num_classes=12), seed=5)
    report = ex.check_parity(other, ex.OnnxEmbedder(result.path, num_threads=1),
                             query_images(tiny_market), 1e-4)
    assert not report.passed and report.max_abs_diff > 1e-2 and "FAILED" in report.summary()
    nan = ex.ParityReport(float("nan"), float("nan"), 3, (1, 2), 1e-4)
    assert not nan.passed  # an fp16 overflow must not pass


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_exports_with_parity(arch, tiny_market):
    """Every `model.arch` the platform trains: a new one is checked the moment it is listed.
    At 128x64, where part models (6 PCB stripes) can cut test_resnet's map."""
    config = tiny_config(tiny_market, **{"model.arch": arch})
    model = randomise_norms(build_model(config.model, num_classes=12))
    proto, exporter = ex.model_to_onnx(model, 128, 64)
    meta = ex.OnnxMetadata(128, 64, model.embedding_dim, arch, "test_resnet", "0" * 16, "", 0,
                           "fp32", exporter, ex.DEFAULT_OPSET, torch.__version__)
    ex.set_metadata(proto, meta)
    embedder = ex.OnnxEmbedder(proto.SerializeToString(), num_threads=1)
    from reid_platform.data.formats import load_dataset

    images = ex.load_images(load_dataset(tiny_market, "market1501").query[:6], 128, 64)[0]
    report = ex.check_parity(model, embedder, images, ex.FP32_ATOL)
    assert report.passed, report.summary()


def test_a_model_onnx_cannot_export_is_a_clear_error():
    class Eigen(torch.nn.Module):
        """An embedding through an eigendecomposition: no ONNX operator for it."""

        def embed(self, images: torch.Tensor) -> torch.Tensor:
            flat = images.flatten(2)  # (B, 3, H*W)
            gram = flat @ flat.transpose(1, 2)  # (B, 3, 3)
            return torch.linalg.eigh(gram).eigenvalues  # (B, 3)

    with pytest.raises(ex.ExportError, match=r"Eigen: ONNX cannot export this model "
                                             r"\(torch.export-based exporter: .*; TorchScript "
                                             r"exporter: .*\)"):
        ex.model_to_onnx(Eigen(), 8, 4)


def test_bad_inputs_are_clear_errors(tmp_path, exported, tiny_market):
    checkpoint, result = exported
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        ex.export_onnx(tmp_path / "nothing-here")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        ex.export_onnx(tmp_path / "junk")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ex.ExportError, match=r"--out .*a-file: exists and is not a directory"):
        ex.export_onnx(checkpoint, blocker)
    with pytest.raises(ex.ExportError, match=r"--out .*a-file/sub: not writable"):
        ex.export_onnx(checkpoint, blocker / "sub")
    with pytest.raises(ex.ExportError, match="no such ONNX file"):
        ex.OnnxEmbedder(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(ex.ExportError, match="bad.onnx: ONNX Runtime cannot load it"):
        ex.OnnxEmbedder(tmp_path / "bad.onnx", providers=["CPUExecutionProvider"])
    import onnx

    plain = onnx.load(str(result.path))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(ex.ExportError, match="not an ONNX model exported by reid-platform"):
        ex.OnnxEmbedder(tmp_path / "plain.onnx")


def test_parity_data_when_the_training_data_is_gone(tmp_path, tiny_market):
    checkpoint = make_checkpoint(tmp_path / "ckpt", tmp_path / "moved-away")
    with pytest.raises(ex.ExportError, match=r"needs real images, but the checkpoint's dataset "
                                             r"\(data.root=.*moved-away.*--parity-data PATH"):
        ex.export_onnx(checkpoint)
    assert not (checkpoint / "model.onnx").exists()
    result = ex.export_onnx(checkpoint, tmp_path / "out", parity_data=tiny_market / "query",
                            parity_images=8)
    assert result.path == tmp_path / "out" / "model.onnx" and result.parity.num_images == 8
    assert "query" in result.parity_source
    assert ex.is_current(result.path, checkpoint)
    # ensure_onnx re-exports when the checkpoint changed after the export.
    config = tiny_config(tmp_path / "moved-away")
    save_checkpoint(checkpoint, randomise_norms(build_model(config.model, 12), seed=9), config, 4)
    assert not ex.is_current(result.path, checkpoint)
    fresh = ex.ensure_onnx(checkpoint, parity_data=tiny_market / "query", parity_images=4)
    assert fresh == checkpoint / "model.onnx" and ex.is_current(fresh, checkpoint)
    assert ex.read_metadata(fresh).checkpoint_epoch == 4
    mtime = fresh.stat().st_mtime_ns
    assert ex.ensure_onnx(checkpoint) == fresh and fresh.stat().st_mtime_ns == mtime  # as is


def test_cli_exports_and_logs_into_the_checkpoints_run(tmp_path, tiny_market, mlflow_run):
    from mlflow.tracking import MlflowClient

    checkpoint = make_checkpoint(tmp_path / "ckpt", tiny_market, mlflow_run=mlflow_run)
    proc = subprocess.run(
        [sys.executable, "jobs/export.py", "--checkpoint", str(checkpoint), "--parity-images",
         "12"], cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"onnx: {checkpoint / 'model.onnx'}"
    assert any("parity on the query set" in line and ": ok" in line for line in lines), lines
    assert f"mlflow: logged to run {mlflow_run['run_id']}" in proc.stdout
    assert "Traceback" not in proc.stderr and "[torch.onnx]" not in proc.stdout
    client = MlflowClient(mlflow_run["tracking_uri"])
    run = client.get_run(mlflow_run["run_id"])
    assert run.data.metrics["onnx_parity_max_abs_diff"] <= 1e-4
    assert run.data.metrics["onnx_parity_min_cosine"] > 0.9999
    assert run.data.tags["onnx.fp32.path"] == str(checkpoint / "model.onnx")
    history = client.get_metric_history(run.info.run_id, "onnx_parity_max_abs_diff")
    assert [m.step for m in history] == [3]  # the checkpoint's epoch
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "onnx")}
    assert artifacts == {"onnx/model.onnx", "onnx/export.json"}


def run_cli(monkeypatch, capsys, args):
    """`jobs/export.py` in this process; returns (exit code, stdout, stderr)."""
    return run_job(monkeypatch, capsys, "export.py", args)


def test_cli_errors_and_a_checkpoint_without_a_run(tmp_path, exported, monkeypatch, capsys):
    checkpoint, _ = exported
    code, _, err = run_cli(monkeypatch, capsys, ["--checkpoint", str(tmp_path / "none")])
    assert code == 2 and "error:" in err and "not a checkpoint" in err and "Traceback" not in err
    blocker = tmp_path / "f"
    blocker.write_text("")
    code, _, err = run_cli(monkeypatch, capsys, ["--checkpoint", str(checkpoint), "--out",
                                                 str(blocker)])
    assert code == 2 and "exists and is not a directory" in err
    code, out, _ = run_cli(monkeypatch, capsys, ["--checkpoint", str(checkpoint), "--out",
                                                 str(tmp_path / "o"), "--parity-images", "4"])
    assert code == 0, out
    assert "mlflow: not logged: the checkpoint records no MLflow run" in out
    assert out.strip().splitlines()[-1] == f"onnx: {tmp_path / 'o' / 'model.onnx'}"


def test_execution_providers_order_and_options(exported):
    _, result = exported
    meta = result.metadata
    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    providers = ex.execution_providers(meta, every, gpu=True, cache_dir="/c", max_batch_size=32)
    assert [p[0] if isinstance(p, tuple) else p for p in providers] == every
    trt = providers[0][1]
    assert trt["trt_profile_min_shapes"] == "images:1x3x64x32"
    assert trt["trt_profile_max_shapes"] == "images:32x3x64x32"
    assert trt["trt_fp16_enable"] is False and trt["trt_engine_cache_path"] == "/c"
    fp16 = ex.OnnxMetadata.from_props({**meta.to_props(), "reid_platform.precision": "fp16"})
    assert ex.execution_providers(fp16, every, True, "/c", 8)[0][1]["trt_fp16_enable"] is True
    # No GPU visible (a CPU actor of a GPU build), or a CPU build: the CPU only.
    assert ex.execution_providers(meta, every, gpu=False, cache_dir="/c",
                                  max_batch_size=8) == ["CPUExecutionProvider"]
    assert ex.execution_providers(meta, ["CPUExecutionProvider"], True, "/c", 8) == [
        "CPUExecutionProvider"]


@pytest.mark.slow
def test_threads_follow_the_ray_actors_cpus(exported, ray_session):
    _, result = exported
    ray = ray_session

    @ray.remote
    class Probe:
        def threads(self, path: str) -> tuple[int, int]:
            from reid_platform.retrieval.export import OnnxEmbedder
            from reid_platform.runtime import process_cpus

            return process_cpus(), OnnxEmbedder(path).num_threads

    for cpus in (1, 2):
        probe = Probe.options(num_cpus=cpus).remote()
        assert ray.get(probe.threads.remote(str(result.path)), timeout=120) == (cpus, cpus)
        ray.kill(probe)
    assert ex.OnnxEmbedder(result.path, num_threads=3).num_threads == 3
