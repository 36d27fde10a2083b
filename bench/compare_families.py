"""Model families side by side: BoT, MGN, PCB and BoT-IBN-a, same data, epochs and recipe.

Each family is trained with our Ray Train loop (`run_training`, DDP over `--workers`) on the
synthetic demo data (`configs/demo.yaml`: 100 training identities, 4 cameras) and on
scikit-learn's digits (10 identities, real images), from random init, with the same epochs,
batch, lr and augmentation; the table reports the final (SWA-free) model's rank-1 and mAP
on the dataset's query/gallery split and the training images/s of the last epoch.

    python bench/compare_families.py                   # resnet18 at 128x64, 8 epochs
    python bench/compare_families.py --epochs 20 --datasets demo
    python bench/compare_families.py --smoke-test

Prints one JSON line per (dataset, family), then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import reid_platform  # noqa: E402, F401  (loopback Ray switch before importing ray)

FAMILIES = {
    "BoT": {"model.arch": "bot"},
    "MGN": {"model.arch": "mgn", "model.parts": [1, 2, 3]},
    "PCB": {"model.arch": "pcb", "model.pcb_stripes": 6},
    "BoT-IBN-a": {"model.arch": "bot", "model.ibn": "a"},
}
DATASETS = ("demo", "digits")


def family_config(args: argparse.Namespace, workspace: Path, dataset: str, family: str):
    from reid_platform.config import load_config

    overrides = {
        "name": f"compare-{dataset}-{family.lower()}",
        "workspace": str(workspace),
        "model.backbone": args.backbone,
        "data.height": args.height,
        "data.width": args.width,
        "train.epochs": args.epochs,
        "train.swa_epochs": 0,  # the plain model: the same for every family
        "train.eval_every": args.epochs,
        "train.num_workers": args.workers,
        **FAMILIES[family],
    }
    if dataset == "digits":
        overrides.update({
            "data.root": str(workspace / "digits"),
            "data.format": "folder",
            "data.num_ids_per_batch": 5,  # 10 identities: P=5, K=8 (batch 40 vs the demo's 32)
            "data.num_instances": 8,
            "data.augment.flip_p": 0.0,  # a mirrored digit is another shape
            "data.augment.erasing_p": 0.0,
        })
    if family == "PCB" and args.height < 96:
        overrides["model.pcb_stripes"] = 4
    config = load_config("configs/demo.yaml", [])  # the demo recipe: lr 1e-3, warm-up 1
    return config.replace(**overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.backbone, args.height, args.width, args.epochs = "test_resnet", 64, 32, 1
        args.families = ["BoT", "MGN"]

    from reid_platform.checkpoint import load_model
    from reid_platform.data.digits import write_digits_tree
    from reid_platform.training.trainer import run_training

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp)
        write_digits_tree(workspace / "digits", size=32)
        for dataset in args.datasets:
            for family in args.families:
                config = family_config(args, workspace, dataset, family)
                result = run_training(config, progress=False)
                metrics = result.metrics
                row = {
                    "bench": "compare_families", "dataset": dataset, "family": family,
                    "backbone": args.backbone, "image_size": [args.height, args.width],
                    "epochs": args.epochs, "workers": args.workers,
                    "embedding_dim": load_model(result.checkpoint)[0].embedding_dim,
                    "rank1": round(metrics["rank1"], 4), "mAP": round(metrics["mAP"], 4),
                    "images_per_s": round(metrics["images_per_s"], 1),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\n| dataset | family | rank-1 | mAP | images/s | embedding |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['family']} | {r['rank1']:.3f} | {r['mAP']:.3f} | "
              f"{r['images_per_s']:.1f} | {r['embedding_dim']} |")


if __name__ == "__main__":
    main()
