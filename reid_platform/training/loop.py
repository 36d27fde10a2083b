"""The per-worker training loop: the only module that talks to `ray.train`.

Each Ray Train worker runs `train_loop_per_worker(loop_config)` with a plain dict:
    {"config": Config.to_dict(), "tracking_uri": str, "run_id": str | None}
Rank 0 evaluates, writes checkpoints (reported to Ray every epoch) and logs to MLflow; every
rank calls `ray.train.report` the same number of times.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from reid_platform.checkpoint import read_checkpoint, save_checkpoint
from reid_platform.config import Config
from reid_platform.data.dataset import ImageDataset, collate_skip_corrupt
from reid_platform.data.formats import ReidDataset, balance
from reid_platform.data.root import load_config_dataset
from reid_platform.data.sampler import PKBatchSampler
from reid_platform.data.transforms import build_train_transform
from reid_platform.evaluation.embed import evaluate_model
from reid_platform.evaluation.report import plot_cmc
from reid_platform.losses import ReidLoss
from reid_platform.models import ReidModel, build_model
from reid_platform.tracking import RunLogger
from reid_platform.training.schedule import WarmupSchedule
from reid_platform.training.swa import make_swa_model, recompute_batchnorm


def build_optimizer(model: ReidModel, config: Config) -> torch.optim.Optimizer:
    """Adam or SGD with two groups: backbone (frozen at first if asked) and the rest."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    backbone_ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone_ids]
    groups = [{"params": backbone, "name": "backbone"}, {"params": rest, "name": "head"}]
    train = config.train
    if train.optimizer == "adam":
        return torch.optim.Adam(groups, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(groups, lr=train.lr, weight_decay=train.weight_decay,
                           momentum=train.momentum, nesterov=True)


def _unwrap(model: torch.nn.Module) -> ReidModel:
    return model.module if hasattr(model, "module") else model  # DDP wraps in .module


def _load_resume_state(config: Config) -> dict[str, Any] | None:
    """Ray's checkpoint after a worker failure first, then the user's `train.resume_from`."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            return read_checkpoint(directory)
    if config.train.resume_from:
        return read_checkpoint(config.train.resume_from)
    return None


def _prepare_data(config: Config) -> tuple[ReidDataset, list, int]:
    dataset = load_config_dataset(config)
    data = config.data
    train, pid_map = balance(
        dataset.train, data.drop_single_image_ids, data.oversample_min, data.oversample_max,
        data.oversample_p, seed=config.train.seed,
    )
    return dataset, train, len(pid_map)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Train the BoT model with DDP; see the module docstring for `loop_config`."""
    config = Config.from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    is_main = rank == 0
    logger = RunLogger(loop_config["tracking_uri"], loop_config.get("run_id") if is_main else None)
    device = ray.train.torch.get_device()
    use_amp = config.train.amp == "on" or (config.train.amp == "auto" and device.type == "cuda")
    torch.manual_seed(config.train.seed)

    dataset, train_samples, num_classes = _prepare_data(config)
    model = build_model(config.model, num_classes)
    criterion = ReidLoss(config.loss, num_classes, model.embedding_dim)
    optimizer = build_optimizer(model, config)
    center_optimizer = (
        torch.optim.SGD(criterion.center.parameters(), lr=config.loss.center_lr)
        if criterion.center is not None
        else None
    )
    swa_model = make_swa_model(model) if config.train.swa_epochs > 0 else None

    start_epoch = 0
    state = _load_resume_state(config)
    if state is not None:
        if state["num_classes"] != num_classes:
            raise ValueError(
                f"resume checkpoint was trained on {state['num_classes']} identities, this data "
                f"has {num_classes}: resume only on the same training set"
            )
        model.load_state_dict(state["model_state"])  # before DDP, which broadcasts rank 0's
        start_epoch = int(state["epoch"])
        if is_main:
            print(f"[train] resuming after epoch {start_epoch}", flush=True)

    model = ray.train.torch.prepare_model(model)  # DDP on the right device (gloo/NCCL)
    criterion.to(device)
    if swa_model is not None:
        swa_model.to(device)
    if state is not None:
        # Optimizer states after the move: load_state_dict puts them on the params' device.
        training_state = state.get("training_state") or {}
        if "optimizer" in training_state:
            optimizer.load_state_dict(training_state["optimizer"])
        if center_optimizer is not None and "center" in training_state:
            criterion.center.load_state_dict(training_state["center"])
            center_optimizer.load_state_dict(training_state["center_optimizer"])
        if swa_model is not None and "swa" in training_state:
            swa_model.load_state_dict(training_state["swa"])
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and device.type == "cuda")

    data = config.data
    sampler = PKBatchSampler(
        [s.pid for s in train_samples], data.num_ids_per_batch, data.num_instances,
        num_replicas=world, rank=rank, seed=config.train.seed,
        batches_per_epoch=config.train.batches_per_epoch,
    )
    # Our own batch sampler: the loader is NOT passed to prepare_data_loader, which would
    # replace the sampler with a DistributedSampler and break PK batches.
    loader = torch.utils.data.DataLoader(
        ImageDataset(train_samples, build_train_transform(data.height, data.width, data.augment)),
        batch_sampler=sampler,
        num_workers=data.loader_workers,
        collate_fn=collate_skip_corrupt,
        persistent_workers=data.loader_workers > 0,
        pin_memory=device.type == "cuda",
    )
    schedule = WarmupSchedule.from_config(config.train)
    iters_per_epoch = max(len(sampler), 1)
    epochs = config.train.epochs
    best_score, best_dir = -math.inf, Path(tempfile.mkdtemp(prefix="reid-best-"))
    last_metrics: dict[str, float] = {}

    def evaluate(net: torch.nn.Module, prefix: str = "") -> dict[str, float]:
        result, skipped = evaluate_model(
            net, dataset.query, dataset.gallery, data.height, data.width,
            batch_size=data.eval_batch_size, device=device, amp=use_amp,
        )
        metrics = {f"{prefix}{k}": v for k, v in result.as_metrics().items()}
        metrics[f"{prefix}eval_skipped_queries"] = result.num_skipped_queries
        metrics[f"{prefix}eval_skipped_images"] = skipped
        with tempfile.TemporaryDirectory() as tmp:
            logger.log_artifact(plot_cmc({prefix.rstrip("_") or "model": result.cmc},
                                         Path(tmp) / f"{prefix}cmc.png"), "plots")
        return metrics

    def report(epoch: int, metrics: dict[str, float], net: torch.nn.Module,
               score_key: str = "score") -> None:
        """Every rank reports; rank 0 logs, checkpoints `net`, keeps the best by `score_key`."""
        nonlocal best_score
        if not is_main:
            ray.train.report(metrics)
            return
        logger.log_metrics(metrics, step=epoch)
        training_state = {"optimizer": optimizer.state_dict()}
        if center_optimizer is not None:
            training_state["center"] = criterion.center.state_dict()
            training_state["center_optimizer"] = center_optimizer.state_dict()
        if swa_model is not None:
            training_state["swa"] = swa_model.state_dict()
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, net, config, epoch, metrics, training_state)
            if score_key in metrics and metrics[score_key] > best_score:
                best_score = metrics[score_key]
                save_checkpoint(best_dir, net, config, epoch, metrics)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    if epochs == 0 or start_epoch >= epochs:
        # Nothing (left) to train: evaluate the model as it is.
        metrics = {"epoch": start_epoch}
        if is_main:
            metrics.update(evaluate(_unwrap(model)))
        report(start_epoch, metrics, _unwrap(model))

    global_iter = start_epoch * iters_per_epoch
    run_start = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        iters_per_epoch = max(len(sampler), 1)  # PK batch counts vary a little per epoch
        model.train()
        epoch_start = time.perf_counter()
        sums: dict[str, float] = {}
        images, batches, skipped = 0, 0, []
        lr = config.train.lr
        for it, batch in enumerate(loader):
            skipped.extend(batch["skipped"])
            progress = epoch + it / iters_per_epoch
            factor = schedule(progress)
            frozen = global_iter < config.train.freeze_backbone_iters
            for group in optimizer.param_groups:
                scale = 0.0 if (frozen and group["name"] == "backbone") else 1.0
                group["lr"] = config.train.lr * factor * scale
            lr = config.train.lr * factor
            global_iter += 1
            if batch["image"] is None:
                continue  # every image of this batch was corrupt; still a step for all ranks
            images_t = batch["image"].to(device, non_blocking=True)
            pids = batch["pid"].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            if center_optimizer is not None:
                center_optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                out = model(images_t, pids)
            losses = criterion(out.features, out.logits, pids)
            scaler.scale(losses.total).backward()
            if config.train.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
            scaler.step(optimizer)
            if center_optimizer is not None:
                # undo the loss weight (BoT: centres learn at center_lr whatever the weight)
                # and the AMP loss scale; skip the step when AMP found inf/NaN gradients
                grads = [p.grad for p in criterion.center.parameters() if p.grad is not None]
                if world > 1:  # the centres are not in DDP: average their gradients by hand
                    for grad in grads:
                        torch.distributed.all_reduce(grad)
                        grad.div_(world)
                if all(torch.isfinite(g).all() for g in grads):
                    for grad in grads:
                        grad.mul_(1.0 / (config.loss.center_weight * scaler.get_scale()))
                    center_optimizer.step()
            scaler.update()
            sums["loss"] = sums.get("loss", 0.0) + float(losses.total.detach())
            for name, value in losses.terms.items():
                sums[f"loss_{name}"] = sums.get(f"loss_{name}", 0.0) + float(value.detach())
            images += images_t.shape[0]
            batches += 1
            if is_main and config.train.log_every and (it + 1) % config.train.log_every == 0:
                print(f"[train] epoch {epoch + 1} iter {it + 1}/{iters_per_epoch} "
                      f"loss {float(losses.total):.4f} lr {lr:.2e}", flush=True)

        if swa_model is not None and epoch >= epochs - config.train.swa_epochs:
            swa_model.update_parameters(_unwrap(model))
        elapsed = time.perf_counter() - epoch_start
        metrics: dict[str, float] = {k: v / max(batches, 1) for k, v in sums.items()}
        metrics.update(
            epoch=epoch + 1,
            lr=lr,
            images_per_s=images * world / max(elapsed, 1e-9),
            epoch_time_s=elapsed,
            skipped_images=len(skipped),
        )
        done = epoch + 1 - start_epoch
        eta = (time.perf_counter() - run_start) / done * (epochs - epoch - 1)
        is_last = epoch + 1 == epochs
        if is_main and ((epoch + 1) % max(config.train.eval_every, 1) == 0 or is_last):
            metrics.update(evaluate(_unwrap(model)))
        if is_main:
            terms = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("loss"))
            line = (f"[train] epoch {epoch + 1}/{epochs} {terms} lr {lr:.2e} "
                    f"{metrics['images_per_s']:.1f} img/s eta {_format_eta(eta)}")
            if "rank1" in metrics:
                line += (f" | rank1 {metrics['rank1']:.4f} mAP {metrics['mAP']:.4f} "
                         f"mINP {metrics['mINP']:.4f}")
            if skipped:
                line += f" | skipped {len(skipped)} corrupt image(s), e.g. {skipped[0]}"
            print(line, flush=True)
        last_metrics = metrics
        if is_last and swa_model is not None:
            # BatchNorm statistics of the averaged weights, then evaluate it too; the final
            # checkpoint is the SWA model.
            recompute_batchnorm(swa_model, (b["image"] for b in loader if b["image"] is not None),
                                device)
            swa_net = swa_model.module
            if is_main:
                swa_metrics = evaluate(swa_net, prefix="swa_")
                metrics.update(swa_metrics)
                print(f"[train] SWA model: rank1 {swa_metrics['swa_rank1']:.4f} "
                      f"mAP {swa_metrics['swa_mAP']:.4f} mINP {swa_metrics['swa_mINP']:.4f}",
                      flush=True)
            report(epoch + 1, metrics, swa_net, score_key="swa_score")
        else:
            report(epoch + 1, metrics, _unwrap(model))

    if is_main and best_score > -math.inf:
        logger.log_artifact(best_dir, "checkpoints/best")
        logger.set_tags({"best_score": f"{best_score:.6f}"})
    shutil.rmtree(best_dir, ignore_errors=True)
    del last_metrics
