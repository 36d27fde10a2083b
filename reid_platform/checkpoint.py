"""Checkpoints: one directory holding `model.pt`, loadable by every job with `--checkpoint`.

`model.pt` holds the model weights, the resolved config (so the model can be rebuilt with no
other input), the number of classes, the epoch, metrics and, for resuming, the optimizer state.

A checkpoint is given as a path or as an MLflow model URI: `models:/NAME@ALIAS`,
`models:/NAME/VERSION` (a registered version) or `runs:/RUN_ID/PATH` (a run's MLflow Model
`model`, or a checkpoint folder such as `checkpoints/final`). `checkpoint_file` is the one place
that resolves a URI: it downloads the checkpoint inside the model (`artifacts/model.pt`, not the
pickled-code parts of an MLflow Model) into `<workspace>/model-cache/`, keyed by the store and the
resolved version, and reuses it; so every job and the service accept URIs without code of their
own. The tracking store is $MLFLOW_TRACKING_URI, else the workspace's SQLite file.

Loading never runs code from the file: `torch.load(weights_only=True)` unpickles only tensors
and plain containers/numbers/strings, which is all a checkpoint written here holds. A file
that needs anything else (a pickled class, a function, a shell command in `__reduce__`) is
refused with `CheckpointError` before any of it runs. Every entry point (`--checkpoint`,
`train.resume_from`, Ray Train's restart, an index manifest, the service) reads through
`read_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from reid_platform.config import Config
from reid_platform.models import ReidModel, build_model

CHECKPOINT_FILE = "model.pt"
FORMAT = "reid-platform-checkpoint/1"
MODEL_CACHE = "model-cache"  # under the workspace
SOURCE_FILE = "source.json"  # beside a cached model.pt: which URI, version and run it is
URI_SCHEMES = ("models:/", "runs:/")


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


def checkpoint_file(path: str | Path, tracking_uri: str | None = None) -> Path:
    """The `model.pt` of a checkpoint given as its directory, the file itself, or a model URI
    (downloaded once into the workspace's model cache; see the module docstring).

    Args:
        tracking_uri: the MLflow store a URI refers to; None: $MLFLOW_TRACKING_URI, else the
            workspace's SQLite store.

    Raises:
        CheckpointError: no checkpoint there; a malformed URI, or a model, version, alias or
            run that does not exist (the message names it).
    """
    if isinstance(path, str) and path.startswith(URI_SCHEMES):
        return cached_model_checkpoint(path, tracking_uri)
    text = str(path)
    path = Path(path).expanduser()
    candidate = path / CHECKPOINT_FILE if path.is_dir() else path
    if not candidate.is_file():
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", text):
            raise CheckpointError(
                f"{text}: unsupported URI; a checkpoint is a local path, models:/NAME@ALIAS, "
                "models:/NAME/VERSION or runs:/RUN_ID/PATH"
            )
        raise CheckpointError(
            f"{path}: not a checkpoint (expected a directory with {CHECKPOINT_FILE}, the file, "
            "or a model URI such as models:/NAME@production)"
        )
    return candidate


def cached_model_checkpoint(uri: str, tracking_uri: str | None = None) -> Path:
    """Resolve a model URI and return its checkpoint in the model cache, downloading it the
    first time: `<workspace>/model-cache/<store>/models/<NAME>/<VERSION>/model.pt` (an alias is
    resolved to its version first, so moving the alias fetches the new version) or
    `.../runs/<RUN_ID>/<PATH>/model.pt`, with `source.json` beside it. The file is moved into
    place last, so processes resolving the same URI at once never read a partial file.

    Raises:
        CheckpointError: the URI does not resolve or holds no checkpoint; the message names it.
    """
    from reid_platform.tracking import (
        RegistryError,
        default_tracking_uri,
        download_model_checkpoint,
        resolve_model_uri,
    )

    if tracking_uri is None:
        cached = _cached_pinned(uri)
        if cached is not None:
            return cached
    tracking_uri = tracking_uri or default_tracking_uri()
    try:
        resolved = resolve_model_uri(uri, tracking_uri)
    except RegistryError as err:
        raise CheckpointError(str(err)) from None
    folder = model_cache_dir(resolved, tracking_uri)
    file = folder / CHECKPOINT_FILE
    if file.is_file():
        return file
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        try:
            downloaded = download_model_checkpoint(resolved, tracking_uri, Path(tmp))
        except RegistryError as err:
            raise CheckpointError(str(err)) from None
        source = {
            "uri": uri,
            "pinned_uri": resolved.pinned_uri,
            "tracking_uri": tracking_uri,
            "name": resolved.name,
            "version": resolved.version,
            "run_id": resolved.run_id,
            "model_id": resolved.model_id,
            "path": resolved.path,
            "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (folder / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        os.replace(downloaded, file)
    print(f"[model] {uri} -> {resolved.pinned_uri} (cached at {folder})", flush=True)
    return file


def _cached_pinned(uri: str) -> Path | None:
    """The cached checkpoint of a URI naming one immutable thing (`models:/NAME/VERSION`,
    `runs:/RUN/PATH`), found without asking any store: a Ray worker reading
    `train.resume_from: models:/demo/3` uses the copy its driver fetched, whatever store its
    own environment names. None when not cached, or cached from several stores."""
    from reid_platform.config import resolve_workspace
    from reid_platform.tracking import RegistryError, parse_model_uri

    try:
        kind, _, ref = parse_model_uri(uri)
    except RegistryError:
        return None
    if kind == "models" and not ref.isdigit():
        return None  # an alias or "latest" may point elsewhere by now
    matches = []
    for source in (resolve_workspace() / MODEL_CACHE).glob(f"*/{kind}/**/{SOURCE_FILE}"):
        info = model_source(source.parent)
        if info and info.get("pinned_uri") == uri and (source.parent / CHECKPOINT_FILE).is_file():
            matches.append(source.parent / CHECKPOINT_FILE)
    return matches[0] if len(matches) == 1 else None


def model_cache_dir(resolved, tracking_uri: str) -> Path:
    """Cache folder of a resolved URI (a `reid_platform.tracking.ResolvedModel`)."""
    from reid_platform.config import resolve_workspace

    store = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]
    root = resolve_workspace() / MODEL_CACHE / store
    safe = re.compile(r"[^A-Za-z0-9._-]")
    if resolved.kind == "models":
        return root / "models" / safe.sub("_", resolved.name) / resolved.version
    parts = [safe.sub("_", p) for p in resolved.path.split("/") if p not in ("", ".", "..")]
    return root.joinpath("runs", resolved.run_id, *parts)


def model_source(path: str | Path) -> dict[str, str] | None:
    """For a checkpoint in the model cache: the `source.json` saying which URI, registered
    version and run it came from; None for any other checkpoint."""
    file = Path(path)
    folder = file.parent if file.name == CHECKPOINT_FILE else file
    source = folder / SOURCE_FILE
    if not source.is_file():
        return None
    try:
        return json.loads(source.read_text())
    except (OSError, ValueError):
        return None


def resolve_checkpoint_ref(value: str, key: str = "checkpoint") -> str:
    """A checkpoint reference to hand to other processes: an absolute path, or for a model URI
    the pinned URI (`models:/NAME@production` -> `models:/NAME/7`, so every worker loads the
    same version even if the alias moves meanwhile), downloaded into the cache now.

    Raises:
        CheckpointError: no such file or directory, or a URI that does not resolve.
    """
    if value.startswith(URI_SCHEMES):
        from reid_platform.tracking import RegistryError, resolve_model_uri

        try:
            pinned = resolve_model_uri(value).pinned_uri
        except RegistryError as err:
            raise CheckpointError(f"{key}: {err}") from None
        checkpoint_file(pinned)
        return pinned
    path = Path(value).expanduser()
    if not path.exists():
        raise CheckpointError(f"{key}={value!r}: no such file or directory")
    return str(path.resolve())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load the raw checkpoint dict (on CPU) from a path or a model URI (`checkpoint_file`)."""
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
