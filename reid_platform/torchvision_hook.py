"""Make a plain `import torchvision` / `import timm` work in the project's environment.

`torchvision_guard.ensure_torchvision_importable()` must run before torchvision is first
imported (see that module). `reid_platform.models` calls it, but a notebook that starts with
`import timm` does not. This module installs a tiny import hook from a `.pth` file in the
virtualenv's site-packages (written by `make install`, i.e. `python
reid_platform/torchvision_hook.py`): at interpreter start-up it only adds a finder to
`sys.meta_path` (no torch import, nothing else loaded); the first time anything imports
torchvision, the finder runs the guard once, removes itself and lets the normal import go on.

The `.pth` line loads this file by its path, so start-up does not import the `reid_platform`
package either. Set REID_PLATFORM_NO_TORCHVISION_HOOK=1 to switch the hook off.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "reid_platform_torchvision.pth"
GUARD_MODULE = "reid_platform.torchvision_guard"


class TorchvisionGuardFinder:
    """A meta-path finder that runs the guard just before torchvision's first import."""

    def find_spec(self, name: str, path=None, target=None):  # noqa: ANN001 (importlib API)
        if name != "torchvision":
            return None
        uninstall()  # once; and the guard's own find_spec("torchvision") must not recurse
        guard = sys.modules.get(GUARD_MODULE) or _load_guard()
        guard.ensure_torchvision_importable()
        return None  # the regular finders import torchvision itself


def _load_guard():
    """torchvision_guard.py (beside this file) as `reid_platform.torchvision_guard`, without
    running the package's `__init__`; a later `import reid_platform.torchvision_guard` gets
    this same module (and its state) from sys.modules."""
    spec = importlib.util.spec_from_file_location(
        GUARD_MODULE, Path(__file__).with_name("torchvision_guard.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[GUARD_MODULE] = module
    spec.loader.exec_module(module)
    return module


def install() -> None:
    """Put the finder first on sys.meta_path (idempotent; a no-op once torchvision is in)."""
    if os.environ.get("REID_PLATFORM_NO_TORCHVISION_HOOK", "") not in ("", "0"):
        return
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, TorchvisionGuardFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionGuardFinder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TorchvisionGuardFinder)]


def pth_line() -> str:
    """The one `.pth` line that loads this file by path and installs the hook."""
    here = str(Path(__file__).resolve())
    return (
        "import importlib.util as _u; _s = _u.spec_from_file_location("
        f"'_reid_platform_torchvision_hook', {here!r}); _m = _u.module_from_spec(_s); "
        "_s.loader.exec_module(_m); _m.install()\n"
    )


def write_pth(site_packages: str | Path | None = None) -> Path:
    """Write the `.pth` file into `site_packages` (default: this interpreter's); its path."""
    directory = Path(site_packages or sysconfig.get_paths()["purelib"])
    path = directory / PTH_NAME
    path.write_text(pth_line())
    return path


if __name__ == "__main__":
    print(f"import hook: {write_pth()}")
