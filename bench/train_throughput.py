"""Training throughput: our Ray Train loop against a plain single-process PyTorch loop.

Same model, batch (P x K), images and augmentation, measured in one run, so the ratio is
meaningful on a shared, noisy machine. Also the data loader's images/s alone (decode +
augment, no model), which bounds both.

    python bench/train_throughput.py                 # resnet18 at 128x64, 2 Ray workers
    python bench/train_throughput.py --backbone resnet50 --height 256 --width 128
    python bench/train_throughput.py --smoke-test

Prints one JSON line.
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


def make_config(args: argparse.Namespace, workspace: str):
    from reid_platform.config import Config

    return Config().replace(**{
        "name": "bench-train-throughput",
        "workspace": workspace,
        "model.backbone": args.backbone,
        "data.height": args.height,
        "data.width": args.width,
        "data.num_ids_per_batch": args.p,
        "data.num_instances": args.k,
        "data.loader_workers": args.loader_workers,
        "data.synthetic.num_train_ids": 40,
        "data.synthetic.num_test_ids": 10,
        "train.epochs": 2,
        "train.warmup_epochs": 0,
        "train.eval_every": 100,
        "train.batches_per_epoch": args.batches,
        "train.num_workers": args.workers,
    })


def loader_and_data(config):
    import torch

    from reid_platform.data.dataset import ImageDataset, collate_skip_corrupt
    from reid_platform.data.formats import balance, load_dataset
    from reid_platform.data.sampler import PKBatchSampler
    from reid_platform.data.transforms import build_train_transform

    data = config.data
    dataset = load_dataset(data.root, data.format)
    train, pid_map = balance(dataset.train)
    sampler = PKBatchSampler([s.pid for s in train], data.num_ids_per_batch, data.num_instances,
                             batches_per_epoch=config.train.batches_per_epoch)
    loader = torch.utils.data.DataLoader(
        ImageDataset(train, build_train_transform(data.height, data.width, data.augment)),
        batch_sampler=sampler, num_workers=data.loader_workers,
        collate_fn=collate_skip_corrupt,
    )
    return loader, sampler, len(pid_map)


def measure_loader(config) -> float:
    loader, sampler, _ = loader_and_data(config)
    images, start = 0, time.perf_counter()
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for batch in loader:
            images += batch["image"].shape[0]
    return images / (time.perf_counter() - start)


def measure_plain(config, threads: int) -> float:
    """A plain PyTorch loop: no Ray, no DDP; one warm-up epoch, then one timed epoch.

    On a GPU machine it runs on one GPU with fp16 autocast, like one of our workers.
    """
    import torch

    from reid_platform.losses import ReidLoss
    from reid_platform.models import build_model
    from reid_platform.runtime import resolve_device

    torch.set_num_threads(threads)
    loader, sampler, num_classes = loader_and_data(config)
    device = resolve_device("auto")
    amp = device.type == "cuda"
    model = build_model(config.model, num_classes).train().to(device)
    criterion = ReidLoss(config.loss, num_classes, model.branches).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    rate = 0.0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        images, start = 0, time.perf_counter()
        for batch in loader:
            images_t = batch["image"].to(device, non_blocking=True)
            pids = batch["pid"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                out = model(images_t, pids)
            loss = criterion(out, {"pid": pids}).total
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            images += batch["image"].shape[0]
        if amp:
            torch.cuda.synchronize()
        rate = images / (time.perf_counter() - start)
    return rate


def measure_ray(config) -> float:
    """Our Ray Train loop (DDP over `train.num_workers`); images/s of the second epoch."""
    from mlflow.tracking import MlflowClient

    from reid_platform.training.trainer import run_training

    result = run_training(config, progress=False)
    history = MlflowClient(result.tracking_uri).get_metric_history(result.run_id,
                                                                   "images_per_s")
    return sorted(history, key=lambda m: m.step)[-1].value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--p", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batches", type=int, default=10, help="batches per epoch per worker")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.backbone, args.height, args.width, args.batches = "test_resnet", 64, 32, 2

    from reid_platform.training.trainer import prepare_data

    with tempfile.TemporaryDirectory() as workspace:
        config, _ = prepare_data(make_config(args, workspace), progress=False)
        loader_rate = measure_loader(config)
        # The plain loop gets as many threads as the Ray run has workers (same CPU budget).
        plain_rate = measure_plain(config, threads=args.workers)
        ray_rate = measure_ray(config)
    print(json.dumps({
        "bench": "train_throughput",
        "backbone": args.backbone,
        "image_size": [args.height, args.width],
        "batch": args.p * args.k,
        "ray_workers": args.workers,
        "loader_images_per_s": round(loader_rate, 1),
        "plain_images_per_s": round(plain_rate, 1),
        "ray_images_per_s": round(ray_rate, 1),
        "ray_vs_plain": round(ray_rate / plain_rate, 3),
        "loader_vs_plain": round(loader_rate / plain_rate, 3),
    }))


if __name__ == "__main__":
    main()
