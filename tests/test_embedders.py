"""Embedding runtimes: the torch runtime equals the model on the eval transform, flip TTA is
the normalised mean with the mirror image, and an unknown runtime is named."""

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
        ValueError, match=r"runtime 'tensorrt' is not known; choose one of \['torch'\]"
    ):
        make_embedder("tensorrt", checkpoint)
