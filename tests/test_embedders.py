"""Embedding runtimes: the torch runtime equals the model on the eval transform, flip TTA is
the normalised mean with the mirror image, the onnx runtime (exported on first use) equals the
torch runtime, and an unknown runtime is named."""

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from reid_platform.checkpoint import save_checkpoint
    from reid_platform.config import Config
    from reid_platform.models import build_model

    config = Config().replace(
        **{"model.backbone": "test_resnet", "data.height": 64, "data.width": 32}
    )
    torch.manual_seed(0)
    return save_checkpoint(
        tmp_path_factory.mktemp("emb") / "ck", build_model(config.model, 5), config, 0
    )


def test_torch_runtime_equals_the_model_and_flip_is_the_mirror_mean(checkpoint):
    from reid_platform.checkpoint import load_model
    from reid_platform.data.transforms import build_eval_transform
    from reid_platform.retrieval.embedders import make_embedder

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((64, 32), (100, 41))]
    embedder = make_embedder("torch", checkpoint, "cpu", num_threads=1)
    assert embedder.input_size == (64, 32) and embedder.info()["runtime"] == "torch"
    model, _ = load_model(checkpoint)
    transform = build_eval_transform(64, 32)
    batch = torch.stack([transform(image=i)["image"] for i in images])
    with torch.inference_mode():
        plain, mirror = model.embed(batch).numpy(), model.embed(batch.flip(-1)).numpy()
    np.testing.assert_allclose(embedder.embed(images), plain, atol=1e-5)
    expected = (plain + mirror) / np.linalg.norm(plain + mirror, axis=1, keepdims=True)
    flipped = embedder.embed(images, flip=True)
    np.testing.assert_allclose(flipped, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(flipped, axis=1), 1.0, atol=1e-5)
    # the mirror of the mirror: flip TTA does not depend on the image's orientation
    np.testing.assert_allclose(
        embedder.embed([i[:, ::-1] for i in images], flip=True), flipped, atol=1e-5
    )
    assert embedder.embed([]).shape == (0, embedder.embedding_dim)


def test_unknown_runtime_is_named(checkpoint):
    from reid_platform.retrieval.embedders import make_embedder

    with pytest.raises(
        ValueError, match=r"runtime 'tensorrt' is not known; choose one of \['onnx', 'torch'\]"
    ):
        make_embedder("tensorrt", checkpoint)


def test_onnx_runtime_exports_on_first_use_and_equals_torch(tmp_path, tiny_market):
    from reid_platform.checkpoint import save_checkpoint
    from reid_platform.config import Config
    from reid_platform.models import build_model
    from reid_platform.retrieval.embedders import make_embedder
    from reid_platform.retrieval.export import ExportError, read_metadata

    config = Config().replace(**{
        "model.backbone": "test_resnet", "data.height": 64, "data.width": 32,
        "data.root": str(tiny_market), "data.format": "market1501",
    })
    torch.manual_seed(1)
    ckpt = save_checkpoint(tmp_path / "ck", build_model(config.model, 5), config, 2)
    assert not (ckpt / "model.onnx").exists()
    onnx = make_embedder("onnx", ckpt, "cpu", num_threads=1)  # exports, parity-checked
    assert (ckpt / "model.onnx").is_file() and read_metadata(ckpt / "model.onnx").parity_images
    reference = make_embedder("torch", ckpt, "cpu", num_threads=1)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
              for h, w in ((64, 32), (100, 41), (30, 70))]  # resized like the torch runtime
    got = onnx.embed(images)
    assert got.dtype == np.float32 and got.shape == (3, reference.embedding_dim)
    np.testing.assert_allclose(got, reference.embed(images), atol=1e-4, rtol=0)
    np.testing.assert_allclose(onnx.embed(images, flip=True), reference.embed(images, flip=True),
                               atol=1e-4, rtol=0)
    assert not np.allclose(onnx.embed(images, flip=True), got, atol=1e-3)  # flip is applied
    assert onnx.embed([]).shape == (0, reference.embedding_dim)
    info = onnx.info()
    assert (info["runtime"], info["threads"], info["device"]) == ("onnx", 1, "cpu")
    assert info["providers"] == ["CPUExecutionProvider"]
    assert info["onnx"] == str(ckpt / "model.onnx")
    assert (info["input_size"], info["dim"]) == ([64, 32], reference.embedding_dim)
    assert info["backbone"] == "test_resnet"
    # A second embedder finds the current export (not re-exported); an export of other weights
    # is refused, naming the file.
    mtime = (ckpt / "model.onnx").stat().st_mtime_ns
    assert make_embedder("onnx", ckpt, "cpu", 2).info()["threads"] == 2
    assert (ckpt / "model.onnx").stat().st_mtime_ns == mtime
    other = save_checkpoint(tmp_path / "other", build_model(config.model, 5), config, 0)
    with pytest.raises(ExportError, match=r"model.onnx: not a current ONNX export of .*other"):
        type(onnx)(other, "cpu", 1, onnx_path=ckpt / "model.onnx")
