"""Sweep config keys (`tune.space`) with Ray Tune; every trial is a full Ray Train run.

    python jobs/tune.py                                   # the demo sweep (synthetic data, CPU)
    python jobs/tune.py --config configs/sweep.yaml --set data.root=/data/Market-1501
    python jobs/tune.py --config configs/sweep.yaml --resume     # continue an interrupted one
    python jobs/tune.py --set 'tune.space.model.pooling={type: choice, values: [avg, gem]}'
    ray job submit --working-dir . -- python jobs/tune.py --config configs/sweep.yaml

A sweep whose experiment already exists (same `name`) is resumed with the config it started
with. The last line printed is `best config: <path>`, which `jobs/train.py --config` accepts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _cli

DEMO = Path(__file__).resolve().parents[1] / "configs" / "sweep_demo.yaml"

SMOKE_OVERRIDES = {
    **_cli.SMOKE_OVERRIDES,
    "model.backbone": "resnet18",
    "tune.num_samples": 2,
    "tune.max_concurrent": 0,
    "train.epochs": 2,
    "train.num_workers": 1,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _cli.add_config_args(parser)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="resume the interrupted sweep of this config's name (error if none)",
    )
    args = parser.parse_args()
    config = _cli.config_from_args(args, default=str(DEMO) if DEMO.is_file() else None)
    if args.smoke_test:
        # a fresh sweep every time (an existing name would be resumed)
        name = f"{config.name}-smoke-{time.strftime('%Y%m%d-%H%M%S')}"
        config = config.replace(name=name, **SMOKE_OVERRIDES)

    from reid_platform.tuning import SweepInterrupted, run_sweep

    try:
        result = run_sweep(config, resume=args.resume)
    except SweepInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        sys.exit(130)
    # Workers' log lines reach the driver asynchronously: disconnect first so that none of
    # them lands after the summary (its last line is what scripts read).
    import ray

    ray.shutdown()
    print("  ".join(f"{k} {v:.4f}" for k, v in result.best_metrics.items()))
    print("best trial: " + ", ".join(f"{k}={v}" for k, v in result.best_params.items()))
    print(f"search: {result.search}  experiment: {result.experiment_path}")
    print(f"mlflow parent run: {result.parent_run_id} ({result.tracking_uri})")
    print(f"results: {result.results_csv}")
    print(f"plot: {result.plot}")
    print(f"best config: {result.best_config_path}")


if __name__ == "__main__":
    _cli.run_main(main)
