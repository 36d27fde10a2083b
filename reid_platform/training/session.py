"""Where the training loop runs: a Ray Train worker, or (debug mode) this very process.

The loop (`training/loop.py`) talks to its surroundings only through a session:

    rank, world_size, device          who and where this process is
    prepare_model(model)              DDP on the right device (Ray) / the device (local)
    restart_checkpoint()              this run's newest checkpoint after a failure, or None
    report(metrics, directory)        hand over an epoch's metrics and its checkpoint folder
    remove(paths)                     delete checkpoint folders of this run
    progress_bar(desc, total)         a bar on the driver's terminal

`RaySession` is Ray Train's worker API; `LocalSession` is `train.num_workers: 0`: the same loop
in the driver, without Ray (plain PyTorch, `pdb` works, errors surface as themselves), writing
the same checkpoints and MLflow run.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from reid_platform.checkpoint import CheckpointError, read_checkpoint
from reid_platform.runtime import resolve_device


class RaySession:
    """The loop inside a Ray Train worker."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self._train = ray.train
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # DDP on the right device (gloo/NCCL)

    def restart_checkpoint(self) -> tuple[dict[str, Any] | None, list[str]]:
        """After Ray restarted the workers: (the newest readable checkpoint this run
        persisted, the folders of this run Ray never registered); (None, []) otherwise.

        Ray restarts from the last checkpoint its controller *registered*; the controller
        polls the workers every few seconds, so a checkpoint persisted just before a failure
        may not be registered yet, and resuming from the registered one would lose a
        finished epoch. The run's storage folder lists every persisted checkpoint (Ray names
        them by time). The unregistered folders are deleted once a newer checkpoint exists
        (Ray's retention never sees them).
        """
        import pyarrow.fs

        registered = self._train.get_checkpoint()
        if registered is None:
            return None, []
        storage = self._train.get_context().get_storage()
        fs = storage.storage_filesystem
        infos = fs.get_file_info(pyarrow.fs.FileSelector(storage.experiment_fs_path))
        newer = sorted(
            (i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
             and i.base_name.startswith("checkpoint_")
             and i.base_name > Path(registered.path).name),
            reverse=True,
        )
        for checkpoint in [self._train.Checkpoint(p, filesystem=fs) for p in newer]:
            try:
                with checkpoint.as_directory() as directory:
                    return read_checkpoint(directory), newer
            except (CheckpointError, OSError):
                continue  # a checkpoint whose upload the failure cut short
        with registered.as_directory() as directory:
            return read_checkpoint(directory), newer

    def report(self, metrics: dict[str, float], directory: str | Path | None) -> None:
        checkpoint = None if directory is None else self._train.Checkpoint.from_directory(
            str(directory))
        self._train.report(metrics, checkpoint=checkpoint)

    def progress_bar(self, desc: str, total: int) -> Any:
        """A tqdm-like bar that the driver draws on its terminal."""
        from ray.experimental.tqdm_ray import tqdm

        return tqdm(desc=desc, total=total, unit="img")

    def remove(self, paths: list[str]) -> None:
        fs = self._train.get_context().get_storage().storage_filesystem
        for path in paths:
            try:
                fs.delete_dir(path)
            except OSError:
                pass  # already gone


class LocalSession:
    """The loop in this process (`train.num_workers: 0`): one rank, no Ray.

    Checkpoints go to `storage_dir/checkpoint_<time>/` (the newest one kept, like the Ray
    runs' `num_to_keep=1`); `latest` and `metrics` are what `run_training` returns.

    Args:
        storage_dir: the run's folder, `<workspace>/ray_results/<run name>`.
        device: "auto" (the first GPU when present) or a torch device string.
    """

    def __init__(self, storage_dir: str | Path, device: str = "auto"):
        self.rank, self.world_size = 0, 1
        self.device = resolve_device(device, flag="train.use_gpu")
        self.storage_dir = Path(storage_dir)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.latest: Path | None = None
        self.metrics: dict[str, float] = {}

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def restart_checkpoint(self) -> tuple[dict[str, Any] | None, list[str]]:
        return None, []  # nothing restarts a process that failed

    def report(self, metrics: dict[str, float], directory: str | Path | None) -> None:
        self.metrics = dict(metrics)
        if directory is None:
            return
        target = self.storage_dir / time.strftime("checkpoint_%Y-%m-%d_%H-%M-%S")
        suffix = 0
        while target.exists():
            suffix += 1
            target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
        shutil.copytree(directory, target)
        if self.latest is not None:
            shutil.rmtree(self.latest, ignore_errors=True)
        self.latest = target

    def progress_bar(self, desc: str, total: int) -> Any:
        from tqdm.auto import tqdm

        return tqdm(desc=desc, total=total, unit="img", leave=False)

    def remove(self, paths: list[str]) -> None:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
