"""Driver side of training: data preparation, Ray start-up, the TorchTrainer, MLflow run.

`run_training(config)` is what `jobs/train.py` calls; `build_trainer` is reused by the Tune
sweep, which launches one trainer per trial.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from reid_platform.checkpoint import CheckpointError, read_checkpoint
from reid_platform.config import Config, ConfigError, save_config
from reid_platform.data.formats import DatasetError, ReidDataset, balance, load_dataset
from reid_platform.models import check_backbone
from reid_platform.tracking import RunLogger, resolve_tracking_uri, start_run
from reid_platform.training.loop import train_loop_per_worker

# Environment every Ray worker needs: albumentations otherwise checks for updates online;
# Train's print patch would echo every progress line twice (logger + tee to the real stdout).
WORKER_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "PYTHONUNBUFFERED": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


@dataclass
class TrainingResult:
    """What a finished run left behind."""

    run_id: str
    tracking_uri: str
    checkpoint: Path
    metrics: dict[str, Any]
    config_path: Path


def resolve_data_root(config: Config, progress: bool = True) -> Config:
    """The config with an absolute `data.root`, generating the synthetic dataset if asked.

    Absolute because workers, other nodes and `ray job` copies of the working dir need it.
    Training and evaluation both call this, so they use the same synthetic tree.

    Raises:
        ConfigError: no root for a real format, or a synthetic root that holds other data.
    """
    data = config.data
    root = data.root
    if data.format == "synthetic":
        from reid_platform.data.synthetic import ensure_synthetic

        s = data.synthetic
        if not root:
            root = str(config.workspace_dir / "data" / (
                f"synthetic-{s.num_train_ids}-{s.num_test_ids}-{s.num_cameras}-"
                f"{s.min_images_per_camera}to{s.max_images_per_camera}-"
                f"{s.height}x{s.width}-seed{s.seed}"))
        try:
            ensure_synthetic(
                root, num_train_ids=s.num_train_ids, num_test_ids=s.num_test_ids,
                num_cameras=s.num_cameras,
                images_per_id_per_camera=(s.min_images_per_camera, s.max_images_per_camera),
                height=s.height, width=s.width, seed=s.seed, progress=progress,
            )
        except ValueError as err:
            raise ConfigError(f"data.root / data.synthetic: {err}") from None
    elif not root:
        raise ConfigError(
            f"data.root is empty; data.format={data.format} needs a dataset path "
            "(--set data.root=/path/to/dataset)"
        )
    return config.replace(**{"data.root": str(Path(root).expanduser().resolve())})


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
    dataset = load_dataset(data.root, data.format, data.test_fraction)
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


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to $RAY_ADDRESS, or start a new local Ray listening on 127.0.0.1 only.

    Loopback comes from the switch set in `reid_platform/__init__.py` (Ray ignores a
    127.0.0.1 `_node_ip_address` and advertises the outward IP instead).
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True)
        return
    # address="local": a fresh instance even if `ray start` left a cluster running (plain
    # ray.init() would join it, and then refuse num_cpus).
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": WORKER_ENV},
        log_to_driver=True,
    )


def resolve_use_gpu(config: Config) -> bool:
    """`train.use_gpu`: "auto" means GPUs when the cluster has one for every worker now (an
    autoscaling cluster starts without GPU nodes: say "true" there)."""
    if config.train.use_gpu == "auto":
        gpus = ray.cluster_resources().get("GPU", 0)
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
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
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
    try:
        result = trainer.fit()
    except Exception:
        logger.end("FAILED")
        raise
    if result.checkpoint is None:
        logger.end("FAILED")
        raise RuntimeError("training finished without a checkpoint")
    download_to = config.workspace_dir / "checkpoints" / run_name
    checkpoint = local_checkpoint(result.checkpoint, download_to)
    logger.log_artifact(checkpoint, "checkpoints/final")
    logger.end()
    return TrainingResult(run_id, uri, checkpoint, dict(result.metrics or {}), config_path)
