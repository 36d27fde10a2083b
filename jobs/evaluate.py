"""Evaluate checkpoints: CMC / mAP / mINP per variant, re-ranking, QE, DBA, PCA, ensembles.

    python jobs/evaluate.py --checkpoint CKPT                       # raw embeddings
    python jobs/evaluate.py --checkpoint CKPT --rerank --qe 5 --dba 5 --pca 256
    python jobs/evaluate.py --checkpoint A --checkpoint B --weights 0.6 0.4 --rerank
    python jobs/evaluate.py --checkpoint CKPT --set data.root=/data/market data.format=market1501
    python jobs/evaluate.py --checkpoint CKPT --run-id MLFLOW_RUN   # log into the training run
    python jobs/evaluate.py --checkpoint CKPT --activation-maps 8   # where the model looks
    python jobs/evaluate.py --smoke-test                            # tiny model + tiny data

The dataset is the first checkpoint's own (`data.*` of its config) unless `--config` (its
`data` section) or `--set data.*=...` override it. Writes report.json and the pictures to
`--out` (default `<workspace>/evaluations/<timestamp>`) and logs them to MLflow. The
post-processing flags come from the step table (`reid_platform.evaluation.variants.STEPS`).
Every variant is scored in blocks of queries, so any gallery size fits in memory. The last
line printed is `report: <path to report.json>`.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import _cli  # first: puts the checkout on sys.path

if TYPE_CHECKING:
    from reid_platform.config import Config

SMOKE_MAX_QUERY = 16
SMOKE_MAX_GALLERY = 64
SMOKE_DATA = {"data.loader_workers": 0, "data.eval_batch_size": 32}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="PATH",
        help="checkpoint directory or model.pt; repeat for an ensemble",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="ensemble weights, one per --checkpoint (default: equal)",
    )
    _cli.add_config_args(parser)
    parser._option_string_actions[
        "--config"
    ].help = "YAML config whose data section replaces the checkpoint's (default: the checkpoint's)"
    from reid_platform.evaluation.variants import add_option_arguments

    add_option_arguments(parser)  # --distance, --pca, --pca-fit, --dba, --qe, --rerank, --k1...
    parser.add_argument("--out", help="output folder (default: <workspace>/evaluations/<time>)")
    parser.add_argument("--run-id", help="log into this MLflow run (e.g. the training run)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda")
    parser.add_argument(
        "--scatter",
        choices=("tsne", "pca"),
        default="tsne",
        help="2-D projection of the embedding picture",
    )
    parser.add_argument(
        "--activation-maps",
        type=int,
        default=0,
        metavar="N",
        help="draw where the model looks (backbone activation maps) for N queries",
    )
    return parser.parse_args()


def effective_config(stored: Config, args: argparse.Namespace) -> Config:
    """The checkpoint's config, with `--config`'s data section and `--set` on top."""
    from reid_platform.config import Config, load_config, parse_overrides

    if args.config:
        data = stored.to_dict()
        data["data"] = load_config(args.config).to_dict()["data"]
        stored = Config.from_dict(data)
    overrides = list(args.overrides)
    if args.smoke_test:
        overrides += [f"{k}={v}" for k, v in SMOKE_DATA.items()]
    return stored.replace(**parse_overrides(overrides))


MAX_SKIPPED_LISTED = 10  # unreadable images printed one per line; report.json lists all


def main() -> None:
    args = parse_args()
    from reid_platform.config import load_config
    from reid_platform.evaluation.metrics import EvaluationError
    from reid_platform.evaluation.pipeline import (
        METRIC_NAMES,
        default_output_dir,
        format_table,
        read_checkpoint_input,
        run_evaluation,
    )
    from reid_platform.evaluation.variants import options_from_args

    paths = list(args.checkpoint)
    smoke_subset = args.smoke_test and bool(paths)
    if not paths:
        if not args.smoke_test:
            raise EvaluationError("give at least one --checkpoint (or --smoke-test)")
        workspace = load_config(None, args.overrides).workspace_dir
        paths = [str(_cli.smoke_checkpoint(workspace)[0])]
    if args.weights is not None and len(args.weights) != len(paths):
        raise EvaluationError(
            f"--weights has {len(args.weights)} values for {len(paths)} --checkpoint"
        )
    weights = args.weights or [1.0] * len(paths)
    checkpoints = []
    for path, weight in zip(paths, weights):
        stored = read_checkpoint_input(path, weight)  # fails early on a bad path
        checkpoints.append(replace(stored, config=effective_config(stored.config, args)))
    config = checkpoints[0].config

    # --smoke-test without any step asked for exercises every step on the tiny set.
    options = options_from_args(args, smoke_test=args.smoke_test)
    if args.run_id and not args.no_mlflow:
        from reid_platform.tracking import require_run

        try:
            require_run(config, args.run_id)  # before the slow part
        except LookupError as err:
            raise EvaluationError(f"--run-id {args.run_id}: {err}") from None
    out_dir = (
        Path(args.out).expanduser().resolve()
        if args.out
        else default_output_dir(config.workspace_dir)
    )
    outcome = run_evaluation(
        checkpoints,
        options,
        out_dir,
        device=args.device,
        scatter=args.scatter,
        max_query=SMOKE_MAX_QUERY if smoke_subset else 0,
        max_gallery=SMOKE_MAX_GALLERY if smoke_subset else 0,
        activation_map_count=args.activation_maps,
        say=print,
    )
    report = outcome.report
    queries = report["queries"]
    skipped = report["skipped_images"]
    print(
        f"dataset {report['dataset']['name']}: {report['num_query']} queries, "
        f"{report['num_gallery']} gallery images; {queries['valid']} valid queries, "
        f"{queries['skipped']} skipped ({queries['skipped_absent_from_gallery']} identity "
        f"absent from the gallery, {queries['skipped_same_camera_only']} same camera only); "
        f"{len(skipped)} unreadable images skipped"
    )
    for message in skipped[:MAX_SKIPPED_LISTED]:
        print(f"  skipped image: {message}")
    if len(skipped) > MAX_SKIPPED_LISTED:
        print(f"  ... and {len(skipped) - MAX_SKIPPED_LISTED} more (all in report.json)")
    print(format_table(outcome.evaluation.results))
    print(f"best: {report['best_variant']}")
    if not args.no_mlflow:
        from reid_platform.tracking import log_evaluation

        uri, run_id = log_evaluation(
            report, outcome.report_path, config, METRIC_NAMES, args.run_id
        )
        print(f"mlflow run: {run_id} ({uri})")
    print(f"report: {outcome.report_path}")


if __name__ == "__main__":
    _cli.run_main(main)
