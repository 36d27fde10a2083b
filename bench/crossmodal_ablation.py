"""The cross-modal ablation of the notes, reproduced on the synthetic optical / SAR tiles.

Every variant starts from the same random init (seed) and trains with the same budget
(epochs, PK batches of P identities x K images with K split across the modalities, lr
schedule, ID + batch-hard triplet) in one process, one thread, with the platform's pieces
(cross-modal `PKBatchSampler`, per-modality transforms, `ReidLoss`, `build_optimizer`,
`WarmupSchedule`, `evaluate_cross_modal`). Each variant adds one thing to the shared
baseline: channel exchange on the optical side, the modality-adversarial loss, N = 1, 2, 3
modality-specific stages (pseudo-siamese), the cross-modal triplet; `best` combines the
ones given with `--best`. `untrained` is the initial model.

    python bench/crossmodal_ablation.py                      # resnet18 at 64x64, 10 epochs
    python bench/crossmodal_ablation.py --epochs 20 --ids 120 --size 64
    python bench/crossmodal_ablation.py --smoke-test

Prints one JSON line per variant (optical->sar rank1 / mAP, sar->optical reverse_rank1 /
reverse_mAP, score = their mean; `score_vs_baseline` = score / the shared baseline's score
measured in the same run), then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import reid_platform  # noqa: E402, F401  (loopback Ray switch before importing ray)

VARIANTS = {
    "untrained": {},
    "shared baseline": {},
    "+ channel exchange": {"data.augment.channel_exchange_p": 0.5,
                           "data.augment.channel_exchange_modality": "optical"},
    "+ adversarial": {"loss.adversarial_weight": 0.1},
    "+ cross-modal triplet": {"loss.cross_modal_triplet": True},
    "pseudo-siamese N=1": {"model.modality_specific_stages": 1},
    "pseudo-siamese N=2": {"model.modality_specific_stages": 2},
    "pseudo-siamese N=3": {"model.modality_specific_stages": 3},
}
KEYS = ("rank1", "mAP", "reverse_rank1", "reverse_mAP", "score")


def base_config(args: argparse.Namespace, workspace: Path):
    from reid_platform.config import Config

    return Config().replace(**{
        "name": "crossmodal-ablation",
        "workspace": str(workspace),
        "data.format": "synthetic",
        "data.synthetic.modalities": ["optical", "sar"],
        "data.synthetic.num_train_ids": args.ids,
        "data.synthetic.num_test_ids": args.test_ids,
        "data.synthetic.min_images_per_camera": 2,
        "data.synthetic.max_images_per_camera": 3,
        "data.synthetic.height": args.size,
        "data.synthetic.width": args.size,
        "data.synthetic.seed": args.seed,
        "data.height": args.size,
        "data.width": args.size,
        "data.num_ids_per_batch": 8,
        "data.num_instances": 4,
        "data.cross_modal_sampling": True,
        "data.protocol": "cross_modal",
        "data.cache": "ram",
        "data.augment.erasing_p": 0.0,
        "data.augment.pad": 4,
        "model.backbone": args.backbone,
        "model.pretrained": "",
        "model.last_stride": 1,
        "train.epochs": args.epochs,
        "train.lr": args.lr,
        "train.warmup_epochs": 1,
        "train.scheduler": "cosine",
        "train.swa_epochs": 0,
        "train.seed": args.seed,
    })


def run_variant(config, train: bool) -> tuple[dict[str, float], float]:
    """Train (or not) in this process; returns (cross-modal metrics, training seconds)."""
    import torch

    from reid_platform.data.dataset import collate_skip_corrupt, modality_indices
    from reid_platform.data.formats import balance
    from reid_platform.data.root import load_config_dataset, resolve_data_root, resolve_modalities
    from reid_platform.data.sampler import PKBatchSampler
    from reid_platform.data.transforms import build_train_transform
    from reid_platform.evaluation.crossmodal import cross_modal_split, evaluate_cross_modal
    from reid_platform.losses import ReidLoss
    from reid_platform.models import build_model
    from reid_platform.training.fast import train_dataset
    from reid_platform.training.loop import build_optimizer
    from reid_platform.training.schedule import WarmupSchedule

    torch.set_num_threads(1)
    config = resolve_data_root(config, progress=False)
    dataset = load_config_dataset(config, report=False)
    config = resolve_modalities(config, dataset)
    data, tr, modalities = config.data, config.train, config.model.modalities
    samples, pid_map = balance(dataset.train, data.drop_single_image_ids, seed=tr.seed)
    torch.manual_seed(tr.seed)  # the same initial weights for every variant
    model = build_model(config.model, len(pid_map), (data.height, data.width))
    seconds = 0.0
    if train:
        criterion = ReidLoss(config.loss, len(pid_map), model.branches)
        optimizer = build_optimizer(model, config, criterion.model_parameters())
        schedule = WarmupSchedule.from_config(tr)
        sampler = PKBatchSampler([s.pid for s in samples], data.num_ids_per_batch,
                                 data.num_instances, seed=tr.seed,
                                 modalities=modality_indices(samples, modalities))
        loader = torch.utils.data.DataLoader(
            train_dataset(samples, data, build_train_transform(data.height, data.width,
                                                               data.augment),
                          modalities=modalities),
            batch_sampler=sampler, collate_fn=collate_skip_corrupt)
        start = time.perf_counter()
        for epoch in range(tr.epochs):
            sampler.set_epoch(epoch)
            iters = max(len(sampler), 1)
            model.train()
            for it, batch in enumerate(loader):
                for group in optimizer.param_groups:
                    group["lr"] = tr.lr * schedule(epoch + it / iters)
                out = model(batch["image"], batch["pid"], batch["modality"])
                loss = criterion(out, batch).total
                optimizer.zero_grad(set_to_none=True)
                criterion.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                criterion.step()
        seconds = time.perf_counter() - start
    split = cross_modal_split(dataset, data.query_modality, data.gallery_modality)
    metrics, _, _, _ = evaluate_cross_modal(model, split, data.height, data.width, modalities,
                                            batch_size=data.eval_batch_size)
    return metrics, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--ids", type=int, default=60, help="training identities (places)")
    parser.add_argument("--test-ids", type=int, default=40)
    parser.add_argument("--size", type=int, default=64, help="tile side in pixels")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        help=f"which of {list(VARIANTS)} (plus 'best')")
    parser.add_argument("--best", nargs="+", default=["+ channel exchange", "+ adversarial"],
                        help="the variants the 'best' row combines")
    parser.add_argument("--workspace", help="where the tiles go (default: a temporary folder)")
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.epochs, args.ids, args.test_ids, args.size = 1, 8, 4, 32
        args.backbone = "test_resnet"
    variants = {name: VARIANTS[name] for name in args.variants if name in VARIANTS}
    if "best" in args.variants:
        variants["best"] = {k: v for name in args.best for k, v in VARIANTS[name].items()}
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(args.workspace or tmp)
        base = base_config(args, workspace)
        rows, baseline = [], None
        for name, overrides in variants.items():
            metrics, seconds = run_variant(base.replace(**overrides), name != "untrained")
            row = {"bench": "crossmodal_ablation", "variant": name,
                   **{k: round(metrics[k], 4) for k in KEYS},
                   "train_s": round(seconds, 1), "epochs": args.epochs,
                   "backbone": args.backbone, "size": args.size, "train_ids": args.ids,
                   "test_ids": args.test_ids, "overrides": overrides}
            if name == "shared baseline":
                baseline = metrics["score"]
            if baseline:
                row["score_vs_baseline"] = round(metrics["score"] / baseline, 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| variant | o->s rank-1 | o->s mAP | s->o rank-1 | s->o mAP | score |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['rank1']:.3f} | {r['mAP']:.3f} | "
              f"{r['reverse_rank1']:.3f} | {r['reverse_mAP']:.3f} | {r['score']:.3f} |")


if __name__ == "__main__":
    main()
