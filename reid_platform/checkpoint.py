"""Checkpoints: one directory holding `model.pt`, loadable by every job with `--checkpoint`.

`model.pt` holds the model weights, the resolved config (so the model can be rebuilt with no
other input), the number of classes, the epoch, metrics and, for resuming, the optimizer state.

Loading never runs code from the file: `torch.load(weights_only=True)` unpickles only tensors
and plain containers/numbers/strings, which is all a checkpoint written here holds. A file
that needs anything else (a pickled class, a function, a shell command in `__reduce__`) is
refused with `CheckpointError` before any of it runs. Every entry point (`--checkpoint`,
`train.resume_from`, Ray Train's restart, an index manifest, the service) reads through
`read_checkpoint`.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from reid_platform.config import Config
from reid_platform.models import ReidModel, build_model

CHECKPOINT_FILE = "model.pt"
FORMAT = "reid-platform-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint path or file is not usable; the message names it."""


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    config: Config,
    epoch: int,
    metrics: dict[str, float] | None = None,
    training_state: dict[str, Any] | None = None,
    mlflow_run: dict[str, str] | None = None,
) -> Path:
    """Write `directory/model.pt` atomically (temp file + rename); returns the directory.

    Args:
        model: a ReidModel (unwrapped from DDP).
        config: the resolved config the model was built from.
        epoch: epochs completed.
        metrics: latest evaluation metrics, stored for reference.
        training_state: optimizer/scheduler/center-loss states needed to resume.
        mlflow_run: {"tracking_uri", "run_id"} of the training run that wrote it, so later
            jobs (export, evaluation, index builds) can log to it and record lineage.
    """
    payload = {
        "format": FORMAT,
        "config": config.to_dict(),
        "num_classes": model.num_classes,
        "model_state": model.state_dict(),
        "epoch": epoch,
        "metrics": metrics or {},
        "training_state": training_state or {},
        "mlflow_run": dict(mlflow_run or {}),
    }
    return _write(directory, payload)


def slim_copy(source: str | Path, directory: str | Path) -> Path:
    """Write `directory/model.pt` with the weights, config and metrics of `source` but without
    its training state (optimizer, SWA, loss terms): what a finished model needs, at about a
    third of the size of an Adam checkpoint. Returns the directory."""
    payload = read_checkpoint(source)
    payload["training_state"] = {}
    return _write(directory, payload)


def _write(directory: str | Path, payload: dict[str, Any]) -> Path:
    """`directory/model.pt` written atomically (temp file + rename); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(handle)
    torch.save(payload, tmp)
    os.replace(tmp, directory / CHECKPOINT_FILE)
    return directory


def checkpoint_file(path: str | Path) -> Path:
    """The `model.pt` of a checkpoint given as its directory or the file itself."""
    path = Path(path).expanduser()
    candidate = path / CHECKPOINT_FILE if path.is_dir() else path
    if not candidate.is_file():
        raise CheckpointError(
            f"{path}: not a checkpoint (expected a directory with {CHECKPOINT_FILE} or the file)"
        )
    return candidate


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load the raw checkpoint dict (on CPU)."""
    file = checkpoint_file(path)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses globals it does not know: the file wants to build Python
        # objects (possibly run code) on load. Never retry with weights_only=False.
        lines = [line.strip() for line in str(err).splitlines()]
        detail = next((x for x in lines if "GLOBAL" in x or x.startswith("Unsupported")),
                      lines[-1] if lines else "")
        raise CheckpointError(
            f"{file}: cannot read checkpoint: refused by the safe loader, which accepts only "
            f"tensors and plain data ({detail[:200]}); the file is damaged or holds Python "
            "objects that could run code when loaded. Only checkpoints written by "
            "reid-platform (weights, config, metrics, optimizer state) are loaded"
        ) from None
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"{file}: cannot read checkpoint ({err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a reid-platform checkpoint (format {FORMAT})")
    return payload


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[ReidModel, Config]:
    """Rebuild the model of a checkpoint in eval mode, with its config.

    Returns:
        (model on `device`, eval mode; the config it was trained with).
    """
    payload = read_checkpoint(path)
    config = Config.from_saved(payload["config"])
    # Weights come from the checkpoint: do not look for the ImageNet file again.
    model_cfg = config.replace(**{"model.pretrained": ""}).model
    model = build_model(model_cfg, payload["num_classes"],
                        input_size=(config.data.height, config.data.width))
    model.load_state_dict(payload["model_state"])
    return model.to(device).eval(), config
