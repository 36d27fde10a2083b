"""Shared command-line plumbing of the jobs: config flags and clear errors."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Let `python jobs/x.py` import the package from a checkout (and from a `ray job` copy of it).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from reid_platform.config import Config, ConfigError, load_config  # noqa: E402
from reid_platform.runtime import configure_console  # noqa: E402

# What `--smoke-test` shrinks in every training-based job: a few tiny batches, small images.
SMOKE_OVERRIDES = {
    "train.epochs": 1,
    "train.batches_per_epoch": 2,
    "train.warmup_epochs": 0,
    "train.swa_epochs": 0,
    "train.eval_every": 1,
    "train.num_workers": 2,
    "train.cpus_per_worker": 1.0,
    "train.use_gpu": "auto",  # GPU configs say "true"; a smoke test also runs on CPU
    "data.num_ids_per_batch": 4,
    "data.num_instances": 2,
    "data.height": 64,
    "data.width": 32,
    "data.loader_workers": 0,
    "data.eval_batch_size": 32,
}


def smoke_checkpoint(directory: Path) -> tuple[Path, Path]:
    """A random-init tiny model (timm `test_resnet`, 64x32) and the tiny synthetic Market tree
    its config points at, for the `--smoke-test` of jobs that need a checkpoint.

    Returns:
        (checkpoint directory, dataset root), both under `directory`.
    """
    from reid_platform.checkpoint import save_checkpoint
    from reid_platform.data.synthetic import ensure_synthetic
    from reid_platform.models import build_model

    params = dict(
        num_train_ids=12,
        num_test_ids=8,
        num_cameras=3,
        num_distractors=4,
        num_junk=2,
        height=64,
        width=32,
        seed=0,
    )
    root = ensure_synthetic(directory / "data" / "synthetic-smoke", progress=False, **params)
    config = Config().replace(
        **{
            "name": "smoke",
            "model.backbone": "test_resnet",
            "data.root": str(root),
            "data.format": "market1501",
            "data.height": 64,
            "data.width": 32,
        }
    )
    model = build_model(config.model, num_classes=params["num_train_ids"], input_size=(64, 32))
    return save_checkpoint(directory / "checkpoints" / "smoke", model, config, 0), root


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: the built-in demo)")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set train.epochs=2 data.root=/data/market",
    )
    parser.add_argument(
        "--smoke-test", action="store_true", help="a tiny, fast run of the same code path"
    )
    add_verbose_arg(parser)


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose", action="store_true",
        help="also show Ray's own output (by default it goes to a log file named at start-up)",
    )


def config_from_args(args: argparse.Namespace, default: str | None = None) -> Config:
    configure_console(getattr(args, "verbose", False))
    path = args.config or default
    return load_config(path, args.overrides)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's input: print the message, no traceback."""
    from reid_platform.checkpoint import CheckpointError
    from reid_platform.data.formats import DatasetError
    from reid_platform.evaluation.metrics import EvaluationError
    from reid_platform.models import ModelError
    from reid_platform.pseudo.clustering import ClusteringError
    from reid_platform.pseudo.distances import DistanceError
    from reid_platform.runtime import DeviceError

    return (
        ConfigError,
        DatasetError,
        ModelError,
        CheckpointError,
        EvaluationError,
        DeviceError,
        ClusteringError,
        DistanceError,
        FileNotFoundError,
    )


def run_main(main) -> None:
    """Run `main()`; user errors print `error: ...` and exit 2; Ctrl+C / SIGTERM exit 130."""
    try:
        main()
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
