"""Driver side of training: data preparation, Ray start-up, the TorchTrainer, MLflow run.

`run_training(config)` is what `jobs/train.py` calls; `build_trainer` is reused by the Tune
sweep, which launches one trainer per trial.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from reid_platform.checkpoint import CheckpointError, read_checkpoint, slim_copy
from reid_platform.config import Config, ConfigError, save_config
from reid_platform.data.formats import DatasetError, ReidDataset, balance
from reid_platform.data.root import load_config_dataset, resolve_data_root
from reid_platform.models import TIMM_HUB, check_backbone, check_model, create_backbone
from reid_platform.runtime import cluster_gpus, init_ray, verbose
from reid_platform.tracking import RunLogger, resolve_tracking_uri, start_run
from reid_platform.training.loop import train_loop_per_worker
from reid_platform.training.session import LocalSession


@dataclass
class TrainingResult:
    """What a finished run left behind."""

    run_id: str
    tracking_uri: str
    checkpoint: Path
    metrics: dict[str, Any]
    config_path: Path


def _absolute_file(value: str, key: str) -> str:
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}={value!r}: no such file or directory")
    return str(path.resolve())


def prepare_data(config: Config, progress: bool = True) -> tuple[Config, ReidDataset]:
    """Check everything the workers will need, in the driver, with clear errors.

    Resolves paths to absolute ones (data, pretrained weights, resume checkpoint), generates
    the synthetic dataset if asked, reads and validates the dataset, the backbone name, the
    worker count and a resume checkpoint's number of classes, so that a mistake is one clear
    message here rather than a worker traceback retried `max_failures` times.
    """
    if config.train.num_workers < 0:
        raise ConfigError(
            f"train.num_workers={config.train.num_workers} must be >= 1 (Ray Train DDP "
            "workers), or 0 to run the loop in this process without Ray (debug mode)"
        )
    if config.train.epochs < 0:
        raise ConfigError(f"train.epochs={config.train.epochs} must be >= 0")
    check_backbone(config.model.backbone)
    check_model(config.model, (config.data.height, config.data.width))
    overrides = {}
    if config.model.pretrained == TIMM_HUB:
        # fetched into timm's hub cache here once (or found there offline), before the workers
        create_backbone(config.model.backbone, TIMM_HUB)
    elif config.model.pretrained:
        overrides["model.pretrained"] = _absolute_file(config.model.pretrained, "model.pretrained")
    if config.train.resume_from:
        overrides["train.resume_from"] = _absolute_file(
            config.train.resume_from, "train.resume_from"
        )
    config = resolve_data_root(config.replace(**overrides), progress)
    data = config.data
    dataset = load_config_dataset(config)
    train, pid_map = balance(dataset.train, data.drop_single_image_ids)  # validates train ids
    needed = data.num_ids_per_batch
    if len(pid_map) < needed:
        raise DatasetError(
            f"data.num_ids_per_batch={needed} but the training split of {data.root} has only "
            f"{len(pid_map)} identities with 2+ images"
        )
    if config.train.resume_from:
        trained_on = read_checkpoint(config.train.resume_from)["num_classes"]
        if trained_on != len(pid_map):
            raise CheckpointError(
                f"train.resume_from={config.train.resume_from} was trained on {trained_on} "
                f"identities, the training split of {data.root} has {len(pid_map)}: resume "
                "only on the same training set"
            )
    return config, dataset


def resolve_use_gpu(config: Config) -> bool:
    """`train.use_gpu`: "auto" means GPUs when the cluster has one for every worker now (an
    autoscaling cluster starts without GPU nodes: say "true" there)."""
    if config.train.use_gpu == "auto":
        gpus = cluster_gpus()
        if 0 < gpus < config.train.num_workers:
            print(f"[train] {gpus:g} GPU(s) for {config.train.num_workers} workers: training on "
                  "CPU (set train.num_workers to the GPU count, or train.use_gpu=true on an "
                  "autoscaling cluster)", flush=True)
        return gpus >= config.train.num_workers
    return config.train.use_gpu == "true"


def build_trainer(
    config: Config,
    tracking_uri: str,
    run_id: str | None,
    run_name: str,
    storage_path: str | None = None,
    callbacks: list[Any] | None = None,
    progress_bar: bool = False,
) -> TorchTrainer:
    """A TorchTrainer running `train_loop_per_worker` with the config's scaling settings.

    `callbacks` go to the trainer's RunConfig (the Tune sweep passes one that forwards the
    evaluation reports to Tune); `storage_path` defaults to `<workspace>/ray_results`;
    `progress_bar` draws a per-epoch bar (for a terminal).
    """
    use_gpu = resolve_use_gpu(config)
    train = config.train
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "tracking_uri": tracking_uri,
                           "run_id": run_id, "progress_bar": progress_bar},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=_storage_path(config, storage_path),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            # One resumable checkpoint (weights + optimizer) per run: Ray deletes the previous
            # one only after the new one is persisted.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,
        ),
    )


def local_checkpoint(checkpoint: ray.train.Checkpoint, download_to: Path) -> Path:
    """A local directory of the checkpoint: its own path on a local filesystem, else a copy
    downloaded from the object store (`train.storage_path: s3://...`)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    return Path(checkpoint.to_directory(str(download_to)))


def scale_swa(config: Config) -> Config:
    """`train.swa_epochs >= train.epochs` would make every epoch an SWA epoch at a constant
    lr (no warm-up, no decay) and the checkpoint can be worse than without SWA: average the
    last sixth of the epochs instead (at least one; none for a 1-epoch run), and say so."""
    train = config.train
    if train.swa_epochs == 0 or train.swa_epochs < train.epochs or train.epochs == 0:
        return config
    scaled = max(train.epochs // 6, 1) if train.epochs >= 2 else 0
    print(f"[train] warning: train.swa_epochs={train.swa_epochs} >= train.epochs="
          f"{train.epochs} would average every epoch at a constant lr; SWA averages the last "
          f"{scaled} epoch(s) instead (set train.swa_epochs below train.epochs to choose)",
          flush=True)
    return config.replace(**{"train.swa_epochs": scaled})


def default_name(config: Config, dataset: ReidDataset) -> Config:
    """A run on the user's own data (`data.root` of a real format) that kept the demo's name
    is named after the dataset, so it does not land in the demo's MLflow experiment."""
    if config.name != Config.name or config.data.format == "synthetic":
        return config
    print(f"[train] experiment {dataset.name!r} (named after the dataset; --set name=... to "
          "choose another)", flush=True)
    return config.replace(name=dataset.name)


def run_training(config: Config, progress: bool = True) -> TrainingResult:
    """Train and evaluate as configured; returns the MLflow run, final checkpoint and metrics."""
    config, dataset = prepare_data(config, progress=progress)
    config = scale_swa(default_name(config, dataset))
    print(dataset.summary(), flush=True)
    run_name = config.tracking.run_name or f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = resolve_tracking_uri(config)
    run_id = start_run(config, uri, run_name=run_name, tags={"dataset": dataset.name,
                                                             "data_root": config.data.root})
    logger = RunLogger(uri, run_id)
    run_dir = config.workspace_dir / "runs" / run_name
    config_path = save_config(config, run_dir / "config.yaml")
    logger.log_artifact(config_path)
    progress_bar = sys.stderr.isatty() and not verbose()
    loop_config = {"config": config.to_dict(), "tracking_uri": uri, "run_id": run_id,
                   "progress_bar": progress_bar}
    with logger.ending_on_exit():
        with sigterm_as_interrupt() as rearm:
            if config.train.num_workers == 0:
                checkpoint, metrics = _train_in_this_process(config, loop_config, run_name)
            else:
                needed = config.train.num_workers * config.train.cpus_per_worker
                init_ray(num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
                         log_file=run_dir / "ray.log")
                rearm()  # joining Ray installs its own SIGTERM handler in this process
                trainer = build_trainer(config, uri, run_id, run_name, progress_bar=progress_bar)
                result = trainer.fit()
                if result.checkpoint is None:
                    raise RuntimeError("training finished without a checkpoint")
                download_to = config.workspace_dir / "checkpoints" / run_name
                checkpoint = local_checkpoint(result.checkpoint, download_to)
                metrics = dict(result.metrics or {})
        with tempfile.TemporaryDirectory() as tmp:
            # MLflow keeps the model, not the optimizer state (a third of the size with Adam)
            logger.log_artifact(slim_copy(checkpoint, tmp), "checkpoints/final")
    return TrainingResult(run_id, uri, checkpoint, metrics, config_path)


def _train_in_this_process(config: Config, loop_config: dict[str, Any],
                           run_name: str) -> tuple[Path, dict[str, Any]]:
    """`train.num_workers: 0`: the loop in this process, no Ray (pdb works, errors surface as
    themselves); the same checkpoints and MLflow run. Returns (checkpoint, final metrics)."""
    storage = _storage_path(config, None)
    if "://" in storage:
        raise ConfigError(f"train.num_workers=0 writes checkpoints to a local folder; "
                          f"train.storage_path={storage!r} is not one")
    device = {"auto": "auto", "true": "cuda", "false": "cpu"}[config.train.use_gpu]
    session = LocalSession(Path(storage) / run_name, device=device)
    print(f"[train] debug mode (train.num_workers=0): training in this process on "
          f"{session.device}, without Ray", flush=True)
    train_loop_per_worker(loop_config, session)
    if session.latest is None:
        raise RuntimeError("training finished without a checkpoint")
    return session.latest, session.metrics


def _storage_path(config: Config, storage_path: str | None) -> str:
    """Ray Train results and checkpoints: the argument, `train.storage_path`, or
    `<workspace>/ray_results`."""
    return storage_path or config.train.storage_path or str(config.workspace_dir / "ray_results")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[Callable[[], None]]:
    """Turn SIGTERM (`ray job stop`, `kill`, a scheduler's pre-emption) into KeyboardInterrupt
    while the block runs, so `finally` clauses run and the MLflow run is ended KILLED.

    Yields `rearm`: connecting to Ray installs Ray's own fatal-signal handler for SIGTERM in
    this process (it logs and aborts with SIGABRT), so call it again after `init_ray`."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None  # signal handlers can only be set from the main thread
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def rearm() -> None:
        signal.signal(signal.SIGTERM, interrupt)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield rearm
    finally:
        signal.signal(signal.SIGTERM, previous)
