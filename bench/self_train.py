"""Does self-training on unlabelled images help? Labelled-only vs 1, 2, 3 rounds, per method.

    python bench/self_train.py                                  # dbscan and link, 3 rounds
    python bench/self_train.py --methods dbscan --rounds 2 --epochs 8
    python bench/self_train.py --smoke-test

The protocol (`reid_platform.pseudo.experiment.split_labelled`): the synthetic generator's
training identities are split into a labelled quarter and unlabelled three quarters (their
labels only score the clustering); the test split is the generator's query / gallery. Round 0
trains on the labelled quarter (`--epochs0`); then, for each method, `run_self_training` starts
from that same checkpoint and runs `--rounds` rounds of pseudo-labelling the unlabelled images and
training on labelled + pseudo-labelled images for `--epochs` each (Ray Train DDP, 2 CPU workers).
One JSON line per (method, round): mAP / rank-1 on the test split, the clustering's ARI / NMI /
purity / cluster count, and the ratio of mAP to the labelled-only model's (the baseline,
measured in the same run). `--control` also trains the labelled-only model for as many epochs
as round 0 and all rounds together (is a gain the pseudo-labels' or the extra epochs'?);
`--oracle` also trains on all training labels (the upper bound).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import _cli  # noqa: E402  (puts the checkout on sys.path)

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["dbscan", "link"],
                        choices=["dbscan", "link", "kmeans"])
    parser.add_argument("--distance", default="jaccard", choices=["jaccard", "cosine"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-train-ids", type=int, default=120)
    parser.add_argument("--num-test-ids", type=int, default=50)
    parser.add_argument("--labelled-fraction", type=float, default=0.25)
    parser.add_argument("--epochs0", type=int, default=30, help="round 0 (labelled only)")
    parser.add_argument("--epochs", type=int, default=8, help="each self-training round")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--oracle", action="store_true", help="also train on every label")
    parser.add_argument("--control", action="store_true",
                        help="also train labelled-only for epochs0 + rounds * epochs")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more config overrides (e.g. self_train.eps=0.5)")
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.num_train_ids, args.num_test_ids, args.rounds = 16, 8, 1
        args.epochs0, args.epochs, args.backbone = 1, 1, "test_resnet"
        args.methods = ["kmeans"]

    from reid_platform.config import load_config
    from reid_platform.data.formats import load_market1501
    from reid_platform.data.synthetic import ensure_synthetic
    from reid_platform.pseudo.experiment import split_labelled
    from reid_platform.pseudo.rounds import run_self_training
    from reid_platform.training.trainer import run_training

    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = load_config(DEMO, [
        f"name=bench-self-train-{stamp}", f"model.backbone={args.backbone}",
        f"data.height={args.height}", f"data.width={args.width}", "train.swa_epochs=0",
        "train.warmup_epochs=1", f"train.eval_every={max(args.epochs0, args.epochs)}",
        "data.num_ids_per_batch=8", "data.num_instances=4", f"train.seed={args.seed}",
        *args.overrides,
    ])
    root = ensure_synthetic(
        base.workspace_dir / "data" / f"bench-self-train-{args.num_train_ids}-"
        f"{args.num_test_ids}-seed{args.seed}",
        num_train_ids=args.num_train_ids, num_test_ids=args.num_test_ids, num_cameras=4,
        images_per_id_per_camera=(2, 3), height=128, width=64, seed=args.seed, progress=False,
    )
    out = base.workspace_dir / "bench" / f"self-train-{stamp}"
    labelled, unlabelled = split_labelled(load_market1501(root), out / "split",
                                          args.labelled_fraction, args.seed)
    config = base.replace(**{"data.format": "csv", "data.root": str(labelled),
                             "data.allow_outside_root": True,  # split_labelled: absolute paths
                             "data.unlabelled": str(unlabelled)})
    common = {"num_train_ids": args.num_train_ids, "labelled_fraction": args.labelled_fraction,
              "backbone": args.backbone, "size": f"{args.height}x{args.width}"}

    start = time.perf_counter()
    zero = run_training(config.replace(**{"train.epochs": args.epochs0,
                                          "tracking.run_name": f"{config.name}-labelled"}),
                        progress=False)
    baseline = {k: zero.metrics[k] for k in ("mAP", "rank1")}
    print(json.dumps({"method": "labelled-only", "round": 0, "epochs": args.epochs0,
                      **baseline, "train_s": round(time.perf_counter() - start, 1),
                      **common}), flush=True)
    if args.control:
        start = time.perf_counter()
        epochs = args.epochs0 + args.rounds * args.epochs
        longer = run_training(config.replace(**{"train.epochs": epochs, "tracking.run_name":
                                                f"{config.name}-labelled-long"}), progress=False)
        print(json.dumps({"method": "labelled-only, same total epochs", "round": 0,
                          "epochs": epochs, "mAP": longer.metrics["mAP"],
                          "rank1": longer.metrics["rank1"],
                          "train_s": round(time.perf_counter() - start, 1), **common}),
              flush=True)
    if args.oracle:
        start = time.perf_counter()
        everything = run_training(
            base.replace(**{"data.format": "market1501", "data.root": str(root),
                            "train.epochs": args.epochs0, "tracking.run_name":
                            f"{config.name}-oracle"}), progress=False)
        print(json.dumps({"method": "all-labelled (upper bound)", "round": 0,
                          "epochs": args.epochs0, "mAP": everything.metrics["mAP"],
                          "rank1": everything.metrics["rank1"],
                          "train_s": round(time.perf_counter() - start, 1), **common}),
              flush=True)

    for method in args.methods:
        method_config = config.replace(**{
            "self_train.method": method, "self_train.distance": args.distance,
            "self_train.rounds": args.rounds, "self_train.epochs": args.epochs,
            "self_train.out": str(out / method),
            "self_train.clusters": round(args.num_train_ids * (1 - args.labelled_fraction)),
            "tracking.run_name": f"{config.name}-{method}",
        })
        start = time.perf_counter()
        result = run_self_training(method_config, checkpoint=zero.checkpoint, progress=False)
        for row in result.rounds:
            keep = {k: row[k] for k in ("mAP", "rank1", "num_clusters", "num_outliers", "ari",
                                        "nmi", "purity", "num_true_ids", "eps", "threshold")
                    if row.get(k) is not None}
            print(json.dumps({
                "method": method, "distance": args.distance if method != "kmeans" else "cosine",
                "round": row["round"], "epochs": args.epochs if row["round"] else args.epochs0,
                **keep, "baseline_mAP": baseline["mAP"],
                "mAP_ratio": round(row["mAP"] / max(baseline["mAP"], 1e-9), 4),
                "rank1_gain": round(row["rank1"] - baseline["rank1"], 4),
                "parent_run": result.parent_run_id, **common,
            }), flush=True)
        print(json.dumps({"method": method, "total_s": round(time.perf_counter() - start, 1),
                          "final_checkpoint": str(result.checkpoint)}), flush=True)


if __name__ == "__main__":
    _cli.run_main(main)
