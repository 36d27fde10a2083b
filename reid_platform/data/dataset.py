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

# Decompression bombs: a served or scraped image may declare billions of pixels in a few KB
# (a 117 KB PNG can declare 11000 x 11000). PIL's own limit only warns below twice this value,
# so `check_image_size` refuses anything above the limit from the header, before decoding.
MAX_IMAGE_PIXELS = 64_000_000  # default limit of decode_image / read_image (w * h)
# PIL's own check stays as a backstop for callers that pass a larger limit; set above ours so
# that it never warns about an image that our check lets through.
Image.MAX_IMAGE_PIXELS = 4 * MAX_IMAGE_PIXELS


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message says which and why."""


class ImageTooLargeError(ImageDecodeError):
    """An image declares more pixels than the limit (checked before decoding)."""


def check_image_size(image: Image.Image, source: str, max_pixels: int) -> None:
    """Refuse an opened (not yet decoded) image whose declared width x height is over
    `max_pixels`. `Image.open` reads only the header, so this costs nothing.

    Raises:
        ImageTooLargeError: naming the declared size and the limit.
    """
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{source}: image of {width}x{height} = {width * height} pixels is over the limit "
            f"of {max_pixels} pixels"
        )


def _open(fp: Any, source: str, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(fp)
    except FileNotFoundError:
        raise ImageDecodeError(f"{source}: file not found") from None
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{source}: {err} (the limit here is {max_pixels})") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageDecodeError(f"{source}: not an image ({err})") from None
    check_image_size(image, source, max_pixels)
    return image


def _to_rgb_array(image: Image.Image, source: str) -> np.ndarray:
    try:
        image.load()  # forces a full decode: truncated files raise here, not later
        return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"{source}: cannot decode image ({err})") from None


def decode_image(
    data: bytes, source: str = "image", max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Decode image bytes (JPEG, PNG, ...) into an (H, W, 3) uint8 RGB array.

    Args:
        data: the encoded file.
        source: what to call it in errors (an upload's field, a path).
        max_pixels: largest declared width x height accepted; checked from the header,
            before any pixel is decoded.

    Raises:
        ImageDecodeError: the bytes are not a complete image. ImageTooLargeError (a subclass)
            when it declares more than `max_pixels` pixels.
    """
    image = _open(io.BytesIO(data), source, max_pixels)
    return _to_rgb_array(image, source)


def read_image(
    path: str | Path,
    box: tuple[int, int, int, int] | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB, cropped to box (x, y, w, h) if given.

    Args:
        path: the image file.
        box: region of interest in pixels, clipped to the image.
        max_pixels: largest declared width x height accepted (checked before decoding).

    Raises:
        ImageDecodeError: missing, unreadable or corrupt file, a box outside the image, or
            (ImageTooLargeError) an image declaring more than `max_pixels` pixels.
    """
    image = _open(path, str(path), max_pixels)
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
