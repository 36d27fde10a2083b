"""Driver side of training: data preparation, Ray start-up, the TorchTrainer, MLflow run.

`run_training(config)` is what `jobs/train.py` calls; `build_trainer` is reused by the Tune
sweep, which launches one trainer per trial.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
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
from reid_platform.models import check_backbone
from reid_platform.runtime import cluster_gpus, init_ray
from reid_platform.tracking import RunLogger, resolve_tracking_uri, start_run
from reid_platform.training.loop import train_loop_per_worker


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
    if config.train.num_workers < 1:
        raise ConfigError(f"train.num_workers={config.train.num_workers} must be >= 1")
    if config.train.epochs < 0:
        raise ConfigError(f"train.epochs={config.train.epochs} must be >= 0")
    check_backbone(config.model.backbone)
    overrides = {}
    if config.model.pretrained:
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
) -> TorchTrainer:
    """A TorchTrainer running `train_loop_per_worker` with the config's scaling settings.

    `callbacks` go to the trainer's RunConfig (the Tune sweep passes one that forwards the
    evaluation reports to Tune); `storage_path` defaults to `<workspace>/ray_results`.
    """
    use_gpu = resolve_use_gpu(config)
    train = config.train
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "tracking_uri": tracking_uri,
                           "run_id": run_id},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path
            or config.train.storage_path
            or str(config.workspace_dir / "ray_results"),
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


def run_training(config: Config, progress: bool = True) -> TrainingResult:
    """Train and evaluate as configured; returns the MLflow run, final checkpoint and metrics."""
    config, dataset = prepare_data(config, progress=progress)
    print(dataset.summary(), flush=True)
    run_name = config.tracking.run_name or f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = resolve_tracking_uri(config)
    run_id = start_run(config, uri, run_name=run_name, tags={"dataset": dataset.name,
                                                             "data_root": config.data.root})
    logger = RunLogger(uri, run_id)
    run_dir = config.workspace_dir / "runs" / run_name
    config_path = save_config(config, run_dir / "config.yaml")
    logger.log_artifact(config_path)
    needed = config.train.num_workers * config.train.cpus_per_worker
    init_ray(num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)))
    trainer = build_trainer(config, uri, run_id, run_name)
    with logger.ending_on_exit():
        with sigterm_as_interrupt():
            result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        download_to = config.workspace_dir / "checkpoints" / run_name
        checkpoint = local_checkpoint(result.checkpoint, download_to)
        with tempfile.TemporaryDirectory() as tmp:
            # MLflow keeps the model, not the optimizer state (a third of the size with Adam)
            logger.log_artifact(slim_copy(checkpoint, tmp), "checkpoints/final")
    return TrainingResult(run_id, uri, checkpoint, dict(result.metrics or {}), config_path)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (`ray job stop`, `kill`, a scheduler's pre-emption) into KeyboardInterrupt
    while the block runs, so `finally` clauses run and the MLflow run is ended KILLED."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
