"""The fast training paths, resolved once per worker: channels-last memory format,
torch.compile (with an eager fallback), and the training dataset (`data.cache: ram`).

Mixed precision (`train.amp`: fp16 with a GradScaler, bf16 without one) is in
`reid_platform.runtime` (`amp_enabled`, `amp_dtype`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from reid_platform.config import DataConfig
from reid_platform.data.cache import RamCachedDataset
from reid_platform.data.dataset import ImageDataset
from reid_platform.data.formats import Sample


def is_cnn(model: torch.nn.Module) -> bool:
    """Whether the model's work is mostly 2-D convolutions (what channels-last speeds up)."""
    convs = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    total = sum(p.numel() for p in model.parameters())
    return total > 0 and convs / total > 0.5


def use_channels_last(setting: str, device: torch.device, model: torch.nn.Module) -> bool:
    """`train.channels_last`: "on", "off", or "auto" = on for CNNs on a CUDA device (tensor
    cores read NHWC natively; on CPU the gain is small and depends on the kernels)."""
    if setting == "auto":
        return device.type == "cuda" and is_cnn(model)
    return setting == "on"


class CompiledForward:
    """`torch.compile(module)` called like the module; if compiling fails (an unsupported
    platform, a graph break it cannot handle), warns once and runs the module eagerly.

    Compilation happens at the first call, so that is where a failure shows; an error after
    a successful first call is a real one and is raised.

    Args:
        module: the (DDP-wrapped) model.
        compile_kwargs: for `torch.compile` (e.g. `backend`, `mode`).
    """

    def __init__(self, module: torch.nn.Module, **compile_kwargs: Any):
        self.module = module
        self.ok: bool | None = None
        try:
            self.compiled: Callable[..., Any] | None = torch.compile(module, **compile_kwargs)
        except Exception as err:  # e.g. no compiler backend for this platform
            self._fall_back(err)

    def _fall_back(self, err: Exception) -> None:
        warnings.warn(
            f"train.compile: torch.compile is unavailable here ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else ''}); training without it",
            stacklevel=3,
        )
        self.ok, self.compiled = False, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.module(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as err:
            if self.ok:
                raise
            self._fall_back(err)
            return self.module(*args, **kwargs)
        self.ok = True
        return out


def train_dataset(samples: Sequence[Sample], data: DataConfig,
                  transform: Callable[..., dict[str, Any]],
                  threads: int = 2) -> torch.utils.data.Dataset:
    """The training dataset: decoded per item, or from the RAM cache (`data.cache: ram`)."""
    if data.cache == "ram":
        return RamCachedDataset(samples, data.height, data.width, transform, threads=threads)
    return ImageDataset(samples, transform)
