"""Model families side by side: BoT, MGN, PCB and BoT-IBN-a, same data, epochs and recipe.

Each family is trained from random init on the synthetic demo data (`configs/demo.yaml`: 100
training identities, 4 cameras) and on scikit-learn's digits (10 identities, real images),
with the same epochs, PK batch, lr schedule (warm-up + cosine), optimizer groups, losses
(label-smoothed ID + batch-hard triplet) and augmentation; the table reports rank-1 and mAP
on the dataset's query/gallery split and the training images/s.

`--loop ray` trains with our Ray Train loop (`run_training`, DDP over `--workers`);
`--loop plain` (the default) runs the same pieces (PK sampler, transforms, `ReidLoss`,
`build_optimizer`, `WarmupSchedule`, `evaluate_model`) in one process, one thread, so that
a CPU-sized comparison finishes on a busy 2-core machine (Ray's per-run worker start-up
dominates there; the Ray loop's own speed is what bench/train_throughput.py measures).

    python bench/compare_families.py                   # resnet18 at 128x64, 8 epochs, plain
    python bench/compare_families.py --loop ray --epochs 20 --datasets demo
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


def train_plain(config) -> tuple[dict[str, float], float, int]:
    """Train in this process as the Ray loop does (no DDP); returns (metrics of the final
    model, training images/s over all epochs, embedding width)."""
    import time

    import torch

    from reid_platform.data.dataset import collate_skip_corrupt
    from reid_platform.data.formats import balance
    from reid_platform.data.root import load_config_dataset
    from reid_platform.data.sampler import PKBatchSampler
    from reid_platform.data.transforms import build_train_transform
    from reid_platform.evaluation.embed import evaluate_model
    from reid_platform.losses import ReidLoss
    from reid_platform.models import build_model
    from reid_platform.training.fast import train_dataset
    from reid_platform.training.loop import build_optimizer
    from reid_platform.training.schedule import WarmupSchedule

    torch.set_num_threads(1)
    torch.manual_seed(config.train.seed)
    data, train = config.data, config.train
    dataset = load_config_dataset(config)
    samples, pid_map = balance(dataset.train, data.drop_single_image_ids, seed=train.seed)
    model = build_model(config.model, len(pid_map), (data.height, data.width))
    criterion = ReidLoss(config.loss, len(pid_map), model.branches)
    optimizer = build_optimizer(model, config, criterion.model_parameters())
    schedule = WarmupSchedule.from_config(train)
    sampler = PKBatchSampler([s.pid for s in samples], data.num_ids_per_batch,
                             data.num_instances, seed=train.seed)
    loader = torch.utils.data.DataLoader(
        train_dataset(samples, data, build_train_transform(data.height, data.width,
                                                           data.augment)),
        batch_sampler=sampler, collate_fn=collate_skip_corrupt)
    images, seconds = 0, 0.0
    for epoch in range(train.epochs):
        sampler.set_epoch(epoch)
        iters = max(len(sampler), 1)
        model.train()
        start = time.perf_counter()
        for it, batch in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = train.lr * schedule(epoch + it / iters)
            out = model(batch["image"], batch["pid"])
            loss = criterion(out, {"pid": batch["pid"]}).total
            optimizer.zero_grad(set_to_none=True)
            criterion.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            criterion.step()
            images += batch["image"].shape[0]
        seconds += time.perf_counter() - start
    result, _ = evaluate_model(model, dataset.query, dataset.gallery, data.height, data.width,
                               batch_size=data.eval_batch_size)
    return result.as_metrics(), images / max(seconds, 1e-9), model.embedding_dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--loop", choices=["plain", "ray"], default="plain")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (--loop ray)")
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.backbone, args.height, args.width, args.epochs = "test_resnet", 64, 32, 1
        args.families = ["BoT", "MGN"]

    from reid_platform.checkpoint import load_model
    from reid_platform.data.digits import write_digits_tree
    from reid_platform.training.trainer import prepare_data, run_training

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp)
        write_digits_tree(workspace / "digits", size=32)
        for dataset in args.datasets:
            for family in args.families:
                config = family_config(args, workspace, dataset, family)
                if args.loop == "ray":
                    result = run_training(config, progress=False)
                    metrics = result.metrics
                    rate = metrics["images_per_s"]
                    dim = load_model(result.checkpoint)[0].embedding_dim
                else:
                    config, _ = prepare_data(config, progress=False)
                    metrics, rate, dim = train_plain(config)
                row = {
                    "bench": "compare_families", "loop": args.loop, "dataset": dataset,
                    "family": family, "backbone": args.backbone,
                    "image_size": [args.height, args.width], "epochs": args.epochs,
                    "workers": args.workers if args.loop == "ray" else 1,
                    "embedding_dim": dim,
                    "rank1": round(metrics["rank1"], 4), "mAP": round(metrics["mAP"], 4),
                    "images_per_s": round(rate, 1),
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
