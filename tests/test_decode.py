"""Image decoding limits: a decompression bomb is refused from its header, before any pixel is
decoded, by the service's decode_image and by read_image (every job's dataset images)."""

import io
import re
import time

import numpy as np
import pytest
from PIL import Image

from reid_platform.data.dataset import (
    MAX_IMAGE_PIXELS,
    ImageDataset,
    ImageDecodeError,
    ImageTooLargeError,
    collate_skip_corrupt,
    decode_image,
    read_image,
)
from reid_platform.data.formats import Sample
from reid_platform.data.transforms import build_eval_transform

from hardening import png_bomb

SIZE_MESSAGE = re.escape(
    f"image of 11000x11000 = 121000000 pixels is over the limit of {MAX_IMAGE_PIXELS}"
)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return png_bomb(11_000, 11_000)  # ~15 KB, 363 MB as RGB


def test_bomb_is_refused_from_its_header(bomb, tmp_path):
    # Truncated after the header: had the pixels been decoded, the error would be "cannot
    # decode"; the size check must come first.
    for data in (bomb, bomb[:200]):
        start = time.perf_counter()
        with pytest.raises(ImageTooLargeError, match="upload.png: " + SIZE_MESSAGE):
            decode_image(data, "upload.png")
        assert time.perf_counter() - start < 0.5
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    with pytest.raises(ImageTooLargeError, match=re.escape(str(path)) + ": " + SIZE_MESSAGE):
        read_image(path, (0, 0, 10, 10))
    assert issubclass(ImageTooLargeError, ImageDecodeError)  # callers skip it like any corrupt


def test_limit_is_a_parameter_and_smaller_images_decode(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    # 30 x 40 is exactly at a limit of 1200: accepted
    np.testing.assert_array_equal(decode_image(data, max_pixels=1200), pixels)
    with pytest.raises(ImageTooLargeError, match="30x40 = 1200 pixels is over the limit of 1199"):
        decode_image(data, max_pixels=1199)
    (tmp_path / "a.png").write_bytes(data)
    with pytest.raises(ImageTooLargeError, match="over the limit of 100 pixels"):
        read_image(tmp_path / "a.png", max_pixels=100)


def test_dataset_skips_a_bomb_like_a_corrupt_image(bomb, tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb)
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((16, 8, 3), np.uint8)).save(good)
    dataset = ImageDataset(
        [Sample(str(tmp_path / "bomb.png"), 1, 0, "train"), Sample(str(good), 2, 0, "train")],
        build_eval_transform(16, 8),
    )
    batch = collate_skip_corrupt([dataset[0], dataset[1]])
    assert batch["pid"].tolist() == [2]
    (skipped,) = batch["skipped"]
    assert "bomb.png" in skipped and "over the limit" in skipped
