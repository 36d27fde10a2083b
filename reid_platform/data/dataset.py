"""Decode images for training and evaluation; corrupt files are skipped and counted.

A corrupt or unreadable image must never crash an epoch: `ImageDataset` returns None for it,
and `collate_skip_corrupt` drops it from the batch and reports its path, so the training loop
can count and log what was skipped.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from reid_platform.data.formats import Sample

# Decompression bombs: a served or scraped image may claim billions of pixels.
Image.MAX_IMAGE_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message says which and why."""


def _to_rgb_array(image: Image.Image, source: str) -> np.ndarray:
    try:
        image.load()  # forces a full decode: truncated files raise here, not later
        return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"{source}: cannot decode image ({err})") from None


def decode_image(data: bytes, source: str = "image") -> np.ndarray:
    """Decode image bytes (JPEG, PNG, ...) into an (H, W, 3) uint8 RGB array.

    Raises:
        ImageDecodeError: the bytes are not a complete image.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"{source}: not an image ({err})") from None
    return _to_rgb_array(image, source)


def read_image(path: str | Path, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB, cropped to box (x, y, w, h) if given.

    Raises:
        ImageDecodeError: missing, unreadable or corrupt file, or a box outside the image.
    """
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"{path}: not an image ({err})") from None
    array = _to_rgb_array(image, str(path))
    if box is not None:
        x, y, w, h = box
        height, width = array.shape[:2]
        if x >= width or y >= height:
            raise ImageDecodeError(f"{path}: box {box} lies outside the {width}x{height} image")
        array = array[y : min(y + h, height), x : min(x + w, width)]
    return array


class ImageDataset(torch.utils.data.Dataset):
    """Samples -> dicts of image tensor, pid, camid and index; None for a corrupt image.

    Args:
        samples: what to read.
        transform: an albumentations pipeline ending in ToTensorV2.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[..., dict[str, Any]]):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | tuple[str, str]:
        sample = self.samples[index]
        try:
            image = read_image(sample.path, sample.box)
        except ImageDecodeError as err:
            return ("corrupt", f"{err}")
        return {
            "image": self.transform(image=image)["image"],
            "pid": sample.pid,
            "camid": sample.camid,
            "index": index,
        }


def collate_skip_corrupt(items: list[Any]) -> dict[str, Any]:
    """Stack good items; corrupt ones are dropped and listed in `skipped`.

    Returns:
        {"image": (B, 3, H, W), "pid": (B,), "camid": (B,), "index": (B,), "skipped": [str]}
        with B possibly 0 when every image of the batch was corrupt.
    """
    good = [item for item in items if isinstance(item, dict)]
    skipped = [item[1] for item in items if not isinstance(item, dict)]
    if not good:
        return {"image": None, "pid": None, "camid": None, "index": None, "skipped": skipped}
    return {
        "image": torch.stack([item["image"] for item in good]),
        "pid": torch.tensor([item["pid"] for item in good], dtype=torch.long),
        "camid": torch.tensor([item["camid"] for item in good], dtype=torch.long),
        "index": torch.tensor([item["index"] for item in good], dtype=torch.long),
        "skipped": skipped,
    }
