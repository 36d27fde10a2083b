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


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: the built-in demo)")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override config keys, e.g. --set train.epochs=2 data.root=/data/market",
    )
    parser.add_argument("--smoke-test", action="store_true",
                        help="a tiny, fast run of the same code path")


def config_from_args(args: argparse.Namespace, default: str | None = None) -> Config:
    path = args.config or default
    return load_config(path, args.overrides)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's input: print the message, no traceback."""
    from reid_platform.checkpoint import CheckpointError
    from reid_platform.data.formats import DatasetError
    from reid_platform.evaluation.metrics import EvaluationError
    from reid_platform.models import ModelError

    return (ConfigError, DatasetError, ModelError, CheckpointError, EvaluationError,
            FileNotFoundError)


def run_main(main) -> None:
    """Run `main()`; user errors print `error: ...` and exit 2."""
    try:
        main()
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
