"""Training throughput per model family, fast paths on and off, plain loop vs our Ray loop.

For each family (BoT, MGN, PCB, BoT-IBN-a, ViT-S) and each setting of the fast paths
("off": fp32, contiguous NCHW, eager; "on": bf16 autocast, channels-last for CNNs,
torch.compile; "bf16_cl": the same without compile), one run measures in the same
process, on the same images, model and batch (P x K):

- a plain single-process PyTorch loop (no Ray, no DDP), with as many threads as the Ray run
  has workers (the same CPU budget; the default, 1 worker vs 1 thread, isolates what Ray
  Train itself costs, without DDP's all-reduce or OpenMP threads competing on busy cores);
- our Ray Train loop (`run_training`, DDP over `--workers`), images/s of its last epoch;

and, once, the data loader alone (decode + augment, no model) with and without
`data.cache: ram`. On a GPU machine the plain loop runs on one GPU (so does each Ray worker).

    python bench/train_throughput.py                      # every family, paths off and on
    python bench/train_throughput.py --workers 2          # DDP over 2 workers vs 2 threads
    python bench/train_throughput.py --families bot mgn --paths off --no-ray
    python bench/train_throughput.py --backbone resnet50 --height 256 --width 128
    python bench/train_throughput.py --smoke-test

Prints one JSON line per family and setting, then one for the loader.
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

# family -> model overrides; `{backbone}` is the CNN backbone given on the command line
FAMILIES = {
    "bot": {"model.arch": "bot"},
    "mgn": {"model.arch": "mgn", "model.parts": [1, 2, 3]},
    "pcb": {"model.arch": "pcb", "model.pcb_stripes": 4},
    "ibn_a": {"model.arch": "bot", "model.ibn": "a"},
    "vit_s": {"model.arch": "bot", "model.backbone": "vit_small_patch16_224"},
}
PATHS = {
    "off": {"train.amp": "off", "train.channels_last": "off", "train.compile": False},
    "on": {"train.amp": "bf16", "train.channels_last": "auto_cnn", "train.compile": True},
    "bf16_cl": {"train.amp": "bf16", "train.channels_last": "auto_cnn", "train.compile": False},
}


def make_config(args: argparse.Namespace, workspace: str, family: str, paths: str):
    from reid_platform.config import Config

    model = dict(FAMILIES[family])
    model.setdefault("model.backbone", args.backbone)
    if model["model.arch"] == "pcb" and args.height < 128:
        model["model.pcb_stripes"] = 2
    fast = dict(PATHS[paths])
    if fast["train.channels_last"] == "auto_cnn":  # "on" for CNNs, off for the ViT
        fast["train.channels_last"] = "off" if "vit" in model["model.backbone"] else "on"
    return Config().replace(**{
        "name": f"bench-train-{family}-{paths}",
        "workspace": workspace,
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
        **model,
        **fast,
    })


def loader_and_data(config):
    import torch

    from reid_platform.data.dataset import collate_skip_corrupt
    from reid_platform.data.formats import balance, load_dataset
    from reid_platform.data.sampler import PKBatchSampler
    from reid_platform.data.transforms import build_train_transform
    from reid_platform.training.fast import train_dataset

    data = config.data
    dataset = load_dataset(data.root, data.format)
    train, pid_map = balance(dataset.train)
    sampler = PKBatchSampler([s.pid for s in train], data.num_ids_per_batch, data.num_instances,
                             batches_per_epoch=config.train.batches_per_epoch)
    loader = torch.utils.data.DataLoader(
        train_dataset(train, data, build_train_transform(data.height, data.width, data.augment)),
        batch_sampler=sampler, num_workers=data.loader_workers,
        collate_fn=collate_skip_corrupt,
    )
    return loader, sampler, len(pid_map)


def measure_loader(config) -> tuple[float, float]:
    """(images/s over 2 epochs, seconds to build the loader: the RAM cache's decoding)."""
    start = time.perf_counter()
    loader, sampler, _ = loader_and_data(config)
    build_s = time.perf_counter() - start
    images, start = 0, time.perf_counter()
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for batch in loader:
            images += batch["image"].shape[0]
    return images / (time.perf_counter() - start), build_s


def measure_plain(config, threads: int) -> float:
    """A plain PyTorch loop with the config's fast paths, no Ray, no DDP; one warm-up epoch
    (compilation happens there), then one timed epoch. On a GPU machine it runs on one GPU."""
    import torch

    from reid_platform.losses import ReidLoss
    from reid_platform.models import build_model
    from reid_platform.runtime import amp_dtype, amp_enabled, resolve_device
    from reid_platform.training.fast import CompiledForward, use_channels_last

    torch.set_num_threads(threads)
    train = config.train
    loader, sampler, num_classes = loader_and_data(config)
    device = resolve_device("auto")
    amp, dtype = amp_enabled(train.amp, device), amp_dtype(train.amp)
    model = build_model(config.model, num_classes,
                        (config.data.height, config.data.width)).train().to(device)
    channels_last = use_channels_last(train.channels_last, device, model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = CompiledForward(model) if train.compile else model
    criterion = ReidLoss(config.loss, num_classes, model.branches).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=(
        amp and device.type == "cuda" and dtype == torch.float16))
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    rate = 0.0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        images, start = 0, time.perf_counter()
        for batch in loader:
            images_t = batch["image"].to(device, non_blocking=True)
            if channels_last:
                images_t = images_t.contiguous(memory_format=torch.channels_last)
            pids = batch["pid"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                out = forward(images_t, pids)
            loss = criterion(out, {"pid": pids}).total
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            images += batch["image"].shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = images / (time.perf_counter() - start)
    return rate


def measure_ray(config) -> float:
    """Our Ray Train loop (DDP over `train.num_workers`); images/s of the last epoch."""
    from mlflow.tracking import MlflowClient

    from reid_platform.training.trainer import run_training

    result = run_training(config, progress=False)
    history = MlflowClient(result.tracking_uri).get_metric_history(result.run_id,
                                                                   "images_per_s")
    return sorted(history, key=lambda m: m.step)[-1].value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--paths", nargs="+", default=["off", "on"], choices=list(PATHS))
    parser.add_argument("--backbone", default="resnet18", help="CNN backbone of the families")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--p", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batches", type=int, default=10, help="batches per epoch per worker")
    parser.add_argument("--workers", type=int, default=1,
                        help="Ray Train workers (the plain loop gets as many threads)")
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument("--no-ray", action="store_true", help="plain loop (and loader) only")
    parser.add_argument("--no-loader", action="store_true", help="skip the loader lines")
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.backbone, args.height, args.width, args.batches = "test_resnet", 64, 32, 2
        args.families, args.paths = ["bot", "mgn"], ["off"]

    from reid_platform.runtime import init_ray
    from reid_platform.training.trainer import prepare_data

    with tempfile.TemporaryDirectory() as workspace:
        if not args.no_ray:
            init_ray(num_cpus=max(args.workers, os.cpu_count() or 1))
        for family in args.families:
            for paths in args.paths:
                config, _ = prepare_data(make_config(args, workspace, family, paths),
                                         progress=False)
                plain = measure_plain(config, threads=args.workers)
                line = {
                    "bench": "train_throughput", "family": family, "paths": paths,
                    "backbone": config.model.backbone, "arch": config.model.arch,
                    "amp": config.train.amp, "channels_last": config.train.channels_last,
                    "compile": config.train.compile,
                    "image_size": [args.height, args.width], "batch": args.p * args.k,
                    "plain_images_per_s": round(plain, 1),
                }
                if not args.no_ray:
                    ray_rate = measure_ray(config)
                    line.update(ray_workers=args.workers, ray_images_per_s=round(ray_rate, 1),
                                ray_vs_plain=round(ray_rate / plain, 3))
                print(json.dumps(line), flush=True)
        if args.no_loader:
            return
        config, _ = prepare_data(make_config(args, workspace, "bot", "off"), progress=False)
        plain_rate, _ = measure_loader(config)
        cached_rate, cache_s = measure_loader(config.replace(**{"data.cache": "ram"}))
        print(json.dumps({
            "bench": "train_loader", "image_size": [args.height, args.width],
            "batch": args.p * args.k, "loader_workers": args.loader_workers,
            "loader_images_per_s": round(plain_rate, 1),
            "cached_loader_images_per_s": round(cached_rate, 1),
            "cache_build_s": round(cache_s, 2),
            "cached_vs_plain": round(cached_rate / plain_rate, 3),
        }), flush=True)


if __name__ == "__main__":
    main()
