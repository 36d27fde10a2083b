"""Train a re-identification model with Ray Train (DDP) and track it in MLflow.

    python jobs/train.py                                   # the demo on embedded defaults
    python jobs/train.py --config configs/market1501_bot.yaml --set data.root=/data/Market-1501
    ray job submit --working-dir . -- python jobs/train.py --config configs/demo.yaml

The last line printed is `checkpoint: <path>`, the final checkpoint the other jobs accept.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _cli

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _cli.add_config_args(parser)
    args = parser.parse_args()
    config = _cli.config_from_args(args, default=str(DEMO) if DEMO.is_file() else None)
    if args.smoke_test:
        config = config.replace(**_cli.SMOKE_OVERRIDES)

    from reid_platform.training.loop import PRE_SWA_PREFIX
    from reid_platform.training.trainer import run_training

    result = run_training(config)
    metrics = result.metrics
    nan = float("nan")
    keys = ("rank1", "mAP", "mINP", "score")
    # the headline metrics are those of the saved checkpoint (the SWA model when SWA is on)
    swa = f"{PRE_SWA_PREFIX}mAP" in metrics
    line = "  ".join(f"{k} {metrics.get(k, nan):.4f}" for k in keys)
    print(f"{'SWA model (the checkpoint)' if swa else 'checkpoint'} metrics: {line}")
    if swa:
        print("before averaging: "
              + "  ".join(f"{k} {metrics.get(PRE_SWA_PREFIX + k, nan):.4f}" for k in keys))
    print(f"mlflow run: {result.run_id} ({result.tracking_uri})")
    print(f"config: {result.config_path}")
    print(f"checkpoint: {result.checkpoint}")


if __name__ == "__main__":
    _cli.run_main(main)
