"""Augmentation with albumentations: the BoT pipeline plus RandomPatch, RandomShift and
channel exchange written as albumentations transforms.

Images are HxWx3 uint8 RGB numpy arrays; the pipelines end in a (3, H, W) float tensor
normalised with the ImageNet mean and std.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # it checks for updates online on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

from reid_platform.config import AugmentConfig  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_PIXEL = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)


class ChannelExchange(A.ImageOnlyTransform):
    """Replace all colour channels by one of them, or shuffle them.

    The trick that closed most of the optical-SAR gap in cross-modality retrieval: the model
    cannot rely on colours that another modality does not have.

    Args:
        replace_p: given the transform fires, probability of replacing (else shuffling).
        p: probability of applying the transform.
    """

    def __init__(self, replace_p: float = 0.5, p: float = 0.5):
        super().__init__(p=p)
        self.replace_p = replace_p

    def get_params(self) -> dict[str, Any]:
        if self.py_random.random() < self.replace_p:
            channel = self.py_random.randrange(3)
            return {"order": [channel, channel, channel]}
        order = [0, 1, 2]
        self.py_random.shuffle(order)
        return {"order": order}

    def apply(self, img: np.ndarray, order: list[int], **params: Any) -> np.ndarray:
        return np.ascontiguousarray(img[..., order])

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("replace_p",)


class RandomShift(A.ImageOnlyTransform):
    """Simulate a bad detector box: crop part of the person, shrink it, paste it off-centre.

    A random crop of `crop_fraction` of the height (and the full width) is resized by a random
    factor in `scale_range` and pasted at a random place on a gray canvas of the input's size.

    Args:
        crop_fraction: (min, max) share of the height kept by the crop.
        scale_range: (min, max) resize factor of the crop relative to the canvas.
        fill: canvas gray level.
        p: probability of applying the transform.
    """

    def __init__(
        self,
        crop_fraction: tuple[float, float] = (0.6, 0.8),
        scale_range: tuple[float, float] = (0.6, 0.95),
        fill: int = 127,
        p: float = 0.5,
    ):
        super().__init__(p=p)
        self.crop_fraction = tuple(crop_fraction)
        self.scale_range = tuple(scale_range)
        self.fill = fill

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict[str, Any]:
        height, width = params["shape"][:2]
        rng = self.py_random
        crop_h = max(1, int(height * rng.uniform(*self.crop_fraction)))
        top = rng.randint(0, height - crop_h)
        scale = rng.uniform(*self.scale_range)
        new_h = max(1, min(height, int(crop_h * scale / max(self.crop_fraction))))
        new_w = max(1, min(width, int(width * scale)))
        return {
            "crop": (top, crop_h),
            "size": (new_h, new_w),
            "offset": (rng.randint(0, height - new_h), rng.randint(0, width - new_w)),
        }

    def apply(self, img: np.ndarray, crop, size, offset, **params: Any) -> np.ndarray:
        top, crop_h = crop
        new_h, new_w = size
        piece = cv2.resize(img[top : top + crop_h], (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        canvas = np.full_like(img, self.fill)
        canvas[offset[0] : offset[0] + new_h, offset[1] : offset[1] + new_w] = piece
        return canvas

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("crop_fraction", "scale_range", "fill")


class RandomPatch(A.ImageOnlyTransform):
    """Paste a patch cut from a recent training image (better than erasing with a constant).

    Every call cuts a random patch from the input into a pool (bounded, oldest dropped); once
    the pool holds `min_pool` patches, with probability `p` a random pooled patch (possibly
    flipped) is pasted at a random place. The pool lives in the process that applies the
    transform, i.e. per data-loader worker.

    Args:
        pool_size: patches kept.
        min_pool: patches needed before pasting starts.
        area_range: patch area as a fraction of the image area.
        aspect_range: patch height / width range.
        flip_p: probability of mirroring the pasted patch.
        p: probability of pasting.
    """

    def __init__(
        self,
        pool_size: int = 10000,
        min_pool: int = 100,
        area_range: tuple[float, float] = (0.01, 0.5),
        aspect_range: tuple[float, float] = (0.1, 10.0),
        flip_p: float = 0.5,
        p: float = 0.5,
    ):
        # always_apply-like behaviour: the pool must see every image; `p` gates the paste.
        super().__init__(p=1.0)
        self.paste_p = p
        self.pool_size = pool_size
        self.min_pool = min_pool
        self.area_range = tuple(area_range)
        self.aspect_range = tuple(aspect_range)
        self.flip_p = flip_p
        self.pool: deque[np.ndarray] = deque(maxlen=pool_size)

    def _patch_shape(self, height: int, width: int) -> tuple[int, int] | None:
        rng = self.py_random
        for _ in range(100):
            area = rng.uniform(*self.area_range) * height * width
            log_lo, log_hi = np.log(self.aspect_range[0]), np.log(self.aspect_range[1])
            aspect = float(np.exp(rng.uniform(log_lo, log_hi)))
            h = int(round(np.sqrt(area * aspect)))
            w = int(round(np.sqrt(area / aspect)))
            if 0 < h < height and 0 < w < width:
                return h, w
        return None

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        rng = self.py_random
        height, width = img.shape[:2]
        shape = self._patch_shape(height, width)
        if shape is not None:
            h, w = shape
            y, x = rng.randint(0, height - h), rng.randint(0, width - w)
            self.pool.append(img[y : y + h, x : x + w].copy())
        if len(self.pool) < self.min_pool or rng.random() >= self.paste_p:
            return img
        patch = self.pool[rng.randrange(len(self.pool))]
        if rng.random() < self.flip_p:
            patch = patch[:, ::-1]
        h, w = patch.shape[:2]
        if h >= height or w >= width:
            return img
        out = img.copy()
        y, x = rng.randint(0, height - h), rng.randint(0, width - w)
        out[y : y + h, x : x + w] = patch
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("pool_size", "min_pool", "area_range", "aspect_range", "flip_p")


class ModalityTransforms:
    """One training pipeline per modality, for cross-modal data whose augmentation differs
    by modality (channel exchange on the optical side only). Called like an albumentations
    pipeline, with the image's `modality` (a name; unknown or empty = `default`).

    Args:
        by_modality: modality name -> its pipeline.
        default: the pipeline of every other modality.
    """

    def __init__(self, by_modality: dict[str, A.Compose], default: A.Compose):
        self.by_modality = dict(by_modality)
        self.default = default

    def __call__(self, image: np.ndarray, modality: str = "") -> dict[str, Any]:
        return self.by_modality.get(modality, self.default)(image=image)


def apply_transform(transform: Any, image: np.ndarray, modality: str = "") -> Any:
    """`transform(image=image)["image"]`, routed by `modality` for a `ModalityTransforms`."""
    if isinstance(transform, ModalityTransforms):
        return transform(image, modality)["image"]
    return transform(image=image)["image"]


def build_train_transform(height: int, width: int,
                          augment: AugmentConfig) -> A.Compose | ModalityTransforms:
    """The BoT training pipeline: resize, flip, pad + crop, colour, patch/shift, erasing.

    With `augment.channel_exchange_modality` (and `channel_exchange_p` > 0), channel
    exchange applies to that modality's images only: a `ModalityTransforms` whose other
    modalities get the same pipeline without it.
    """
    if augment.channel_exchange_modality and augment.channel_exchange_p > 0:
        import dataclasses

        plain = build_train_transform(
            height, width, dataclasses.replace(augment, channel_exchange_p=0.0,
                                               channel_exchange_modality=""))
        exchanged = build_train_transform(
            height, width, dataclasses.replace(augment, channel_exchange_modality=""))
        return ModalityTransforms({augment.channel_exchange_modality: exchanged}, plain)
    steps: list[A.BasicTransform] = [A.Resize(height, width, interpolation=cv2.INTER_LINEAR)]
    if augment.flip_p > 0:
        steps.append(A.HorizontalFlip(p=augment.flip_p))
    if augment.pad > 0:
        steps += [
            A.PadIfNeeded(
                min_height=height + 2 * augment.pad,
                min_width=width + 2 * augment.pad,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
            ),
            A.RandomCrop(height, width),
        ]
    if augment.color_jitter_p > 0:
        steps.append(
            A.ColorJitter(brightness=0.2, contrast=0.15, saturation=0.1, hue=0.0,
                          p=augment.color_jitter_p)
        )
    if augment.brightness_contrast_p > 0:
        steps.append(A.RandomBrightnessContrast(p=augment.brightness_contrast_p))
    if augment.channel_exchange_p > 0:
        steps.append(ChannelExchange(p=augment.channel_exchange_p))
    if augment.random_shift_p > 0:
        steps.append(RandomShift(p=augment.random_shift_p))
    if augment.random_patch_p > 0:
        steps.append(RandomPatch(p=augment.random_patch_p))
    if augment.erasing_p > 0:
        steps.append(A.Erasing(scale=(0.02, 0.4), ratio=(0.3, 3.3), fill=MEAN_PIXEL,
                               p=augment.erasing_p))
    steps += [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()]
    return A.Compose(steps)


def build_eval_transform(height: int, width: int) -> A.Compose:
    """Resize and normalise: what query, gallery and served images go through."""
    return A.Compose(
        [
            A.Resize(height, width, interpolation=cv2.INTER_LINEAR),
            A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
            ToTensorV2(),
        ]
    )
