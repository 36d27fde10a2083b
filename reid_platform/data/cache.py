"""`data.cache: ram`: decode and resize every training image once, augment from memory.

JPEG decoding and the resize to (H, W) are the same every epoch; with a small model (or a
fast GPU) they bound the loader. `RamCachedDataset` does them once per training worker, into
one uint8 tensor in shared memory (N x H x W x 3 bytes: 12,936 Market-1501 images at 256x128
are 1.3 GB), which the DataLoader's worker processes read without copying; each epoch only
augments (flip, pad + crop, erasing, normalise, ...).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
import torch

from reid_platform.data.dataset import ImageDecodeError, read_image
from reid_platform.data.formats import Sample

# Refuse a cache larger than this share of the machine's memory (the workers, the model and
# the DataLoader need the rest).
MAX_MEMORY_SHARE = 0.5


class CacheError(ValueError):
    """The RAM cache cannot be built as configured; the message says why."""


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no check
        return 0


def cache_bytes(num_images: int, height: int, width: int) -> int:
    """Bytes of the cache for `num_images` images at (height, width)."""
    return num_images * height * width * 3


class RamCachedDataset(torch.utils.data.Dataset):
    """Training samples decoded and resized once into shared memory; same items as
    `ImageDataset` (a dict, or ("corrupt", message) for an unreadable image).

    Args:
        samples: the training samples.
        height, width: the training size; images are resized to it as the training
            pipeline's first step would (bilinear), so that step leaves them unchanged.
        transform: the albumentations training pipeline (ending in ToTensorV2).
        threads: decoding threads (PIL and OpenCV release the GIL).

    Raises:
        CacheError: the cache would take more than half of the machine's memory.
    """

    def __init__(self, samples: Sequence[Sample], height: int, width: int,
                 transform: Callable[..., dict[str, Any]], threads: int = 2):
        self.samples = list(samples)
        self.transform = transform
        size = cache_bytes(len(self.samples), height, width)
        memory = _physical_memory()
        if memory and size > MAX_MEMORY_SHARE * memory:
            raise CacheError(
                f"data.cache=ram: {len(self.samples)} images at {height}x{width} need "
                f"{size / 2**30:.1f} GiB, more than half of this machine's "
                f"{memory / 2**30:.1f} GiB; use data.cache=none or smaller images"
            )
        self.images = torch.empty((len(self.samples), height, width, 3), dtype=torch.uint8)
        self.images.share_memory_()
        self.errors: list[str | None] = [None] * len(self.samples)
        array = self.images.numpy()  # a view: writes land in the shared tensor

        def load(index: int) -> None:
            sample = self.samples[index]
            try:
                image = read_image(sample.path, sample.box)
            except ImageDecodeError as err:
                self.errors[index] = str(err)
                return
            if image.shape[:2] != (height, width):
                image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
            array[index] = image

        with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
            list(pool.map(load, range(len(self.samples))))

    @property
    def num_corrupt(self) -> int:
        return sum(e is not None for e in self.errors)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | tuple[str, str]:
        if self.errors[index] is not None:
            return ("corrupt", self.errors[index])
        sample = self.samples[index]
        image = np.ascontiguousarray(self.images[index].numpy())  # (H, W, 3) uint8 copy
        return {
            "image": self.transform(image=image)["image"],
            "pid": sample.pid,
            "camid": sample.camid,
            "index": index,
        }
