"""Make `import torchvision` (and so `import timm`) work on CPU-only torch.

PyPI's torchvision wheels are CUDA builds. With the CPU wheel of torch, torchvision's compiled
ops library (`torchvision/_C.so`) fails to load, and torchvision's Python code then registers
fake kernels for `torchvision::nms` at import time, which raises
"operator torchvision::nms does not exist". Declaring the two op schemas first lets the import
succeed; calling those ops would still fail, and nothing in this project calls them.

The guard acts only when the compiled ops cannot load, so a matching torch/torchvision pair
(e.g. a CUDA machine) is left untouched. Call `ensure_torchvision_importable()` before the first
import of torchvision or timm; it is idempotent and per process (every Ray worker calls it
through `reid_platform.models`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

# Kept on the module so the Library object (and its definitions) lives as long as the process.
_LIBRARY: torch.library.Library | None = None


def _compiled_ops_load() -> bool:
    """True when torchvision's own `_C` ops library loads into this torch."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision not installed: nothing to guard
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    candidates = sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(str(candidates[0]))
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> bool:
    """Declare `torchvision::nms`/`qnms` when torchvision's compiled ops cannot load.

    Returns:
        True if the schemas were declared by this call (the guard was needed), else False.
    """
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in sys.modules:
        return False
    if _compiled_ops_load():
        return False
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return False  # someone already declared it
    except RuntimeError:
        pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold, float? output_scale, "
        "int? output_zero_point) -> Tensor"
    )
    _LIBRARY = library
    return True
