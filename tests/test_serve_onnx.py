"""The retrieval service with `runtime: onnx`: the app exports the checkpoint on the fly when
there is no ONNX file beside it, the Embedder runs ONNX Runtime with the replica's CPUs as
threads, and search over HTTP equals brute force over the ONNX embeddings."""

from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from test_serve import app_args, assert_same_ranking, deploy, embed, search, serve_port

pytestmark = pytest.mark.slow
APP = "onnx"
__all__ = ["serve_port"]  # the Serve instance fixture, shared with test_serve


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """No training data recorded: the on-the-fly export checks parity on the gallery."""
    from reid_platform.checkpoint import save_checkpoint
    from reid_platform.config import Config
    from reid_platform.models import build_model

    base = tmp_path_factory.mktemp("serve-onnx")
    config = Config().replace(**{
        "model.backbone": "test_resnet", "data.height": 64, "data.width": 32,
        "data.format": "market1501", "data.root": str(base / "moved-away"),
    })
    directory = base / "checkpoint"
    return save_checkpoint(directory, build_model(config.model, num_classes=12), config, 0)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, tiny_market, checkpoint) -> SimpleNamespace:
    """The gallery embedded by ONNX Runtime from an export kept elsewhere (none beside the
    checkpoint, so the app has to export it)."""
    from reid_platform.data.dataset import read_image
    from reid_platform.retrieval.embedders import OnnxRuntimeEmbedder
    from reid_platform.retrieval.export import export_onnx
    from reid_platform.retrieval.gallery import gallery_samples, sample_metadata

    elsewhere = export_onnx(checkpoint, tmp_path_factory.mktemp("elsewhere"),
                            parity_data=tiny_market).path
    samples, _ = gallery_samples(tiny_market)
    runtime = OnnxRuntimeEmbedder(checkpoint, "cpu", 1, onnx_path=elsewhere)
    assert not (checkpoint / "model.onnx").exists()
    return SimpleNamespace(
        ids=[s.item_id for s in samples],
        vectors=runtime.embed([read_image(s.path) for s in samples]),  # (N, D)
        metadata=[sample_metadata(s) for s in samples],
        onnx=runtime,
    )


@pytest.fixture(scope="module")
def client(ray_session, serve_port, tmp_path_factory, gallery, checkpoint, tiny_market):
    from ray import serve

    from reid_platform.retrieval import ShardedIndex

    index_dir = tmp_path_factory.mktemp("serve-onnx") / "index"
    extra = {"checkpoint": str(checkpoint), "gallery": str(tiny_market)}  # as build_index
    with ShardedIndex.create(index_dir, gallery.vectors.shape[1], 2, extra=extra) as index:
        index.add(gallery.ids, gallery.vectors, gallery.metadata)
        index.save()
    deploy({APP: app_args(index_dir, APP, runtime="onnx")})
    with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}/reid-test-{APP}",
                      timeout=60.0) as made:
        yield made
    serve.delete(f"reid-test-{APP}")


def test_onnx_service_exports_on_the_fly_and_equals_brute_force(
    client, gallery, checkpoint, tiny_market
):
    from reid_platform.retrieval.export import is_current, read_metadata

    onnx_file = checkpoint / "model.onnx"
    assert is_current(onnx_file, checkpoint)  # exported by the app builder
    meta = read_metadata(onnx_file)
    assert meta.parity_images > 0 and meta.parity_max_abs_diff <= 1e-4
    assert meta.parity_images == min(64, len(gallery.ids))  # the gallery: no query set left
    model = client.get("/v1/stats").json()["model"]
    assert (model["runtime"], model["onnx"], model["threads"]) == ("onnx", str(onnx_file), 1)
    assert model["providers"][-1] == "CPUExecutionProvider" and model["dim"] == meta.embedding_dim

    paths = [m["path"] for m in gallery.metadata]
    served = np.stack([embed(client, Path(p).read_bytes()) for p in paths[:6]])
    np.testing.assert_allclose(served, gallery.vectors[:6], atol=1e-5, rtol=0)
    queries = [p.read_bytes() for p in sorted((tiny_market / "query").iterdir())[:4]]
    for image in queries:
        query = embed(client, image)
        scores = gallery.vectors @ query  # (N,) brute force over the ONNX embeddings
        order = np.argsort(-scores, kind="stable")
        for k in (1, 5, len(gallery.ids)):
            top = order[:k]
            assert_same_ranking(search(client, image, k), [gallery.ids[j] for j in top],
                                scores[top])


def test_onnx_app_without_parity_images_is_refused_at_build(ray_session, tmp_path):
    """No query images recorded and no gallery in the manifest: the build names why."""
    from reid_platform.checkpoint import save_checkpoint
    from reid_platform.config import Config
    from reid_platform.models import build_model
    from reid_platform.retrieval import ShardedIndex
    from serve_apps.retrieval import build_app

    config = Config().replace(**{
        "model.backbone": "test_resnet", "data.height": 64, "data.width": 32,
        "data.format": "market1501", "data.root": str(tmp_path / "moved-away"),
    })
    model = build_model(config.model, 3)
    ckpt = save_checkpoint(tmp_path / "ck", model, config, 0)
    dim = model.embedding_dim  # the index must fit the model (build_app checks that first)
    with ShardedIndex.create(tmp_path / "index", dim, 1, extra={"checkpoint": str(ckpt)}) as index:
        index.save()
    with pytest.raises(ValueError, match=r"runtime=onnx: the parity check needs real images, "
                                         r"but the checkpoint's dataset .*--parity-data PATH"):
        build_app({"index_dir": str(tmp_path / "index"), "runtime": "onnx"})
    assert not (ckpt / "model.onnx").exists()
