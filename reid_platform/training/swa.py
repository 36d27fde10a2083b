"""Stochastic weight averaging over the last epochs, with BatchNorm re-estimation.

The averaged weights never saw a forward pass, so their BatchNorm running statistics are
stale: `recompute_batchnorm` re-estimates them on training images before evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.swa_utils import AveragedModel, update_bn


def make_swa_model(model: torch.nn.Module) -> AveragedModel:
    """An equal-weight running average of `model`'s parameters (buffers copied as-is)."""
    return AveragedModel(model)


def recompute_batchnorm(
    swa_model: AveragedModel, images: Iterable[torch.Tensor], device: torch.device
) -> None:
    """Reset and re-estimate every BatchNorm's running mean/var (cumulative average).

    Args:
        swa_model: the averaged model.
        images: an iterable of (B, 3, H, W) training batches (augmented is fine, as in SWA).
        device: where to run the forward passes.
    """
    update_bn(images, swa_model, device=device)
