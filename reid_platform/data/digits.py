"""scikit-learn's bundled handwritten digits as a small real-image re-ID dataset.

1797 8x8 grey images of ten digits, upscaled, in the `folder` format with explicit splits
(`root/{train,query,gallery}/digit<N>/*.png`): every digit is an identity present in every
split (half the images train, a tenth query, the rest gallery). Learnable in a few CPU
epochs, unlike random synthetic data: the tests and `bench/compare_families.py` use it to see
that training really learns.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def write_digits_tree(root: str | Path, size: int = 32, seed: int = 0) -> Path:
    """Write the digits under `root` (created) as `folder` format with splits; returns root.

    Args:
        size: side of the written (square) images, upscaled bilinearly from 8x8.
        seed: the shuffle that assigns images to splits.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    order = np.random.default_rng(seed).permutation(len(digits.target))
    for n, index in enumerate(order):
        label = int(digits.target[index])
        split = "train" if n % 2 == 0 else ("query" if n % 10 == 1 else "gallery")
        image = (digits.images[index] * (255 / 16)).astype(np.uint8)
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{index:04d}.png"), cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    return root
