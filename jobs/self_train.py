"""Self-training on unlabelled images: rounds of pseudo-labelling and Ray Train DDP training.

    python jobs/self_train.py --config CONFIG --set data.unlabelled=PATH self_train.rounds=3
    python jobs/self_train.py --config CONFIG --checkpoint CKPT --set data.unlabelled=PATH
    python jobs/self_train.py --smoke-test            # tiny model, synthetic data: round 0 + 1

Round 0 trains on the config's labelled data (or starts from `--checkpoint`, a model of the
config's architecture); each round pseudo-labels `data.unlabelled` with the latest model
(`self_train.method` dbscan / kmeans / link on `self_train.distance`), merges the pseudo
identities with the labelled training set (ids never collide) and trains again from the latest
backbone for `self_train.epochs` (0 = train.epochs). One MLflow parent run with a child run per
round and the per-round curves. Outputs in `self_train.out` (default
`<workspace>/self_train/<name>-<time>`). The last line printed is `checkpoint: <path>`.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import _cli

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    _cli.add_config_args(parser)
    parser.add_argument("--checkpoint", help="start from this model instead of training round 0")
    args = parser.parse_args(argv)
    config = _cli.config_from_args(args, default=str(DEMO) if DEMO.is_file() else None)

    from reid_platform.pseudo.rounds import run_self_training

    scratch = (tempfile.TemporaryDirectory(prefix="self-train-smoke-") if args.smoke_test
               else contextlib.nullcontext())
    with scratch as tmp:
        if args.smoke_test:
            config = _smoke_config(config, Path(tmp))
        result = run_self_training(config, checkpoint=args.checkpoint)
        print(f"rounds: {result.out_dir / 'rounds.csv'}")
        print(f"mlflow parent run: {result.parent_run_id} ({result.tracking_uri})")
        print(f"checkpoint: {result.checkpoint}")


def _smoke_config(config, directory: Path):
    """The tiny synthetic tree split into labelled / unlabelled identities; round 0 and one
    short round."""
    from reid_platform.data.formats import load_market1501
    from reid_platform.pseudo.experiment import split_labelled

    _, root = _cli.smoke_checkpoint(directory)
    labelled, unlabelled = split_labelled(load_market1501(root), directory / "split", 0.5)
    return config.replace(**{
        **_cli.SMOKE_OVERRIDES,
        "model.backbone": "test_resnet",
        "data.format": "csv",
        "data.root": str(labelled),
        "data.allow_outside_root": True,  # split_labelled lists absolute paths
        "data.unlabelled": str(unlabelled),
        "self_train.rounds": 1,
        "self_train.method": "kmeans",  # a random-init model: a fixed count always clusters
        "self_train.clusters": 4,
        "self_train.out": str(directory / "self_train"),
    })


if __name__ == "__main__":
    _cli.run_main(main)
