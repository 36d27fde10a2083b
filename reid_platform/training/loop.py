"""The per-worker training loop; it reaches Ray Train only through its session.

Each Ray Train worker runs `train_loop_per_worker(loop_config)` with a plain dict:
    {"config": Config.to_dict(), "tracking_uri": str, "run_id": str | None,
     "progress_bar": bool (rank 0 draws a per-epoch bar on the driver's terminal)}
It reads top to bottom in four steps:

    run = WorkerRun(loop_config)        set-up: data, model (DDP), loss, optimizer, resume
    run.train_epoch(epoch)              one epoch of PK batches -> loss terms, lr, images/s
    run.evaluate(net, prefix)           rank 0: CMC / mAP / mINP on query vs gallery
    run.report(epoch, metrics, net)     every rank: ray.train.report (+ rank 0's checkpoint),
                                        then rank 0 logs to MLflow (once per epoch)

Rank 0 evaluates, writes checkpoints and logs to MLflow; every rank calls `ray.train.report`
the same number of times, and takes part in every collective of every step.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from reid_platform.checkpoint import read_checkpoint, save_checkpoint
from reid_platform.config import Config
from reid_platform.data.dataset import collate_skip_corrupt
from reid_platform.data.formats import ReidDataset, Sample, balance
from reid_platform.data.root import load_config_dataset
from reid_platform.data.sampler import PKBatchSampler
from reid_platform.data.transforms import build_train_transform
from reid_platform.evaluation.embed import evaluate_model
from reid_platform.evaluation.report import plot_cmc
from reid_platform.losses import ReidLoss
from reid_platform.models import ReidModel, build_model
from reid_platform.runtime import amp_dtype, amp_enabled
from reid_platform.tracking import RunLogger
from reid_platform.training.fast import CompiledForward, train_dataset, use_channels_last
from reid_platform.training.schedule import WarmupSchedule
from reid_platform.training.session import LocalSession, RaySession
from reid_platform.training.swa import make_swa_model, recompute_batchnorm

# The final model's metrics are the headline ones; with SWA the final model is the averaged
# one, and the last epoch's plain model is reported under this prefix.
PRE_SWA_PREFIX = "pre_swa_"


def build_optimizer(model: ReidModel, config: Config,
                    extra: list[torch.nn.Parameter] = ()) -> torch.optim.Optimizer:
    """Adam or SGD with two groups: backbone (frozen at first if asked) and the rest.

    Args:
        extra: parameters outside the model that train with it (loss terms without an own
            optimizer), put in the "head" group.
    """
    backbone = [p for p in model.backbone_parameters() if p.requires_grad]
    backbone_ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone_ids]
    groups = [{"params": backbone, "name": "backbone"},
              {"params": rest + list(extra), "name": "head"}]
    train = config.train
    if train.optimizer == "adam":
        return torch.optim.Adam(groups, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(groups, lr=train.lr, weight_decay=train.weight_decay,
                           momentum=train.momentum, nesterov=True)


def _unwrap(model: torch.nn.Module) -> ReidModel:
    return model.module if hasattr(model, "module") else model  # DDP wraps in .module


def _prepare_data(config: Config) -> tuple[ReidDataset, list[Sample], int]:
    """(dataset, balanced training samples with pids 0..N-1, N)."""
    dataset = load_config_dataset(config, report=False)  # the driver reported what it ignored
    data = config.data
    train, pid_map = balance(
        dataset.train, data.drop_single_image_ids, data.oversample_min, data.oversample_max,
        data.oversample_p, seed=config.train.seed,
    )
    return dataset, train, len(pid_map)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _all_ranks_have(flag: bool, device: torch.device, world: int) -> bool:
    """True when `flag` is true on every rank (an all-reduce: every rank must call it)."""
    if world <= 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item() > 0.5)


class WorkerRun:
    """One worker's training run: everything `train_loop_per_worker` sets up, and its steps.

    Args:
        loop_config: see the module docstring.
    """

    def __init__(self, loop_config: dict[str, Any], session: RaySession | LocalSession):
        config = self.config = Config.from_dict(loop_config["config"])
        self.session = session
        self.rank, self.world = session.rank, session.world_size
        self.is_main = self.rank == 0
        self.progress_bar = bool(loop_config.get("progress_bar")) and self.is_main
        self.logger = RunLogger(loop_config["tracking_uri"],
                                loop_config.get("run_id") if self.is_main else None)
        self.mlflow_run = ({"tracking_uri": loop_config["tracking_uri"],
                            "run_id": loop_config["run_id"]} if loop_config.get("run_id") else {})
        self.device = device = session.device
        self.use_amp = amp_enabled(config.train.amp, device)
        self.amp_dtype = amp_dtype(config.train.amp)
        torch.manual_seed(config.train.seed)

        self.dataset, train_samples, num_classes = _prepare_data(config)
        model = build_model(config.model, num_classes,
                            input_size=(config.data.height, config.data.width))
        self.criterion = ReidLoss(config.loss, num_classes, model.branches)
        self.optimizer = build_optimizer(model, config, self.criterion.model_parameters())
        self.swa_model = make_swa_model(model) if config.train.swa_epochs > 0 else None

        self.start_epoch = 0
        self.best_score, self.best_epoch = -math.inf, 0
        # This run's own checkpoint after a worker failure, else the user's train.resume_from
        state, self._orphans = session.restart_checkpoint()
        restarted = state is not None
        if state is None and config.train.resume_from:
            state = read_checkpoint(config.train.resume_from)
        if state is not None:
            if state["num_classes"] != num_classes:
                raise ValueError(
                    f"resume checkpoint was trained on {state['num_classes']} identities, this "
                    f"data has {num_classes}: resume only on the same training set"
                )
            model.load_state_dict(state["model_state"])  # before DDP, which broadcasts rank 0's
            self.start_epoch = int(state["epoch"])
            if self.is_main:
                print(f"[train] {'restarted' if restarted else 'resuming'} after epoch "
                  f"{self.start_epoch}", flush=True)

        self.channels_last = use_channels_last(config.train.channels_last, device, model)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = session.prepare_model(model)  # DDP on the right device (Ray)
        self.forward = CompiledForward(self.model) if config.train.compile else self.model
        self.criterion.to(device)
        if self.swa_model is not None:
            self.swa_model.to(device)
        if state is not None:
            self._restore(state, restarted)
        # fp16 needs loss scaling against underflow; bf16 has fp32's exponent range
        self.scaler = torch.amp.GradScaler(device.type, enabled=(
            self.use_amp and device.type == "cuda" and self.amp_dtype == torch.float16))

        data = config.data
        self.sampler = PKBatchSampler(
            [s.pid for s in train_samples], data.num_ids_per_batch, data.num_instances,
            num_replicas=self.world, rank=self.rank, seed=config.train.seed,
            batches_per_epoch=config.train.batches_per_epoch,
            max_images_per_id=data.max_images_per_id,
        )
        # Our own batch sampler: the loader is NOT passed to prepare_data_loader, which would
        # replace the sampler with a DistributedSampler and break PK batches.
        self.loader = torch.utils.data.DataLoader(
            train_dataset(train_samples, data,
                          build_train_transform(data.height, data.width, data.augment),
                          threads=max(int(config.train.cpus_per_worker), 1)),
            batch_sampler=self.sampler,
            num_workers=data.loader_workers,
            collate_fn=collate_skip_corrupt,
            persistent_workers=data.loader_workers > 0,
            pin_memory=device.type == "cuda",
        )
        self.schedule = WarmupSchedule.from_config(config.train)
        self.global_iter = self.start_epoch * max(len(self.sampler), 1)

    # ---- set-up helpers ---------------------------------------------------------------------

    def _restore(self, state: dict[str, Any], restarted: bool) -> None:
        """Optimizer, loss-term, SWA and best-score state of a resume checkpoint.

        After the move to the device: `load_state_dict` puts optimizer states on the params'.

        Args:
            restarted: the checkpoint is this run's own (Ray restarted the workers after a
                failure), not a `train.resume_from` of another run.
        """
        training_state = state.get("training_state") or {}
        if "optimizer" in training_state:
            self.optimizer.load_state_dict(training_state["optimizer"])
        self.criterion.load_training_state(training_state)
        if self.swa_model is not None and "swa" in training_state:
            self.swa_model.load_state_dict(training_state["swa"])
        if not restarted:
            return  # another run's checkpoint: its best and its metrics are not this run's
        self.best_score = float(training_state.get("best_score", -math.inf))
        self.best_epoch = int(training_state.get("best_epoch", 0))
        if self.is_main and state.get("metrics"):
            # The metrics of the resumed epoch live in its checkpoint: if the failed attempt
            # died between its report and its MLflow write, they are written now (once).
            self.logger.log_metrics_once(state["metrics"], step=self.start_epoch)

    def training_state(self) -> dict[str, Any]:
        """What a resume needs besides the weights."""
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            **self.criterion.training_state(),
        }
        if self.swa_model is not None:
            state["swa"] = self.swa_model.state_dict()
        return state

    # ---- one epoch --------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch of PK batches; returns its mean loss terms, lr and throughput."""
        config, device = self.config, self.device
        self.sampler.set_epoch(epoch)
        iters = max(len(self.sampler), 1)  # PK batch counts vary a little per epoch
        train = config.train
        if self.is_main and train.swa_epochs > 0 and epoch == train.epochs - train.swa_epochs:
            print(f"[train] SWA phase: the weights of the last {train.swa_epochs} epoch(s) are "
                  f"averaged, at a constant lr {train.lr * train.swa_lr_factor:.2e}", flush=True)
        bar = None
        if self.progress_bar:
            bar = self.session.progress_bar(f"[train] epoch {epoch + 1}/{train.epochs}",
                                            iters * self.sampler.batch_size * self.world)
        self.model.train()
        start = time.perf_counter()
        sums: dict[str, float] = {}
        images, batches, skipped = 0, 0, []
        lr = config.train.lr
        for it, batch in enumerate(self.loader):
            skipped.extend(batch["skipped"])
            lr = self._set_lr(epoch + it / iters)
            self.global_iter += 1
            # A batch whose images were all corrupt on one rank: every rank skips the step
            # together, or the others would wait in DDP's all-reduce forever.
            if not _all_ranks_have(batch["image"] is not None, device, self.world):
                continue
            terms = self._step(batch)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value
            images += batch["image"].shape[0]
            batches += 1
            if bar is not None:
                bar.update(batch["image"].shape[0] * self.world)
            if self.is_main and config.train.log_every and (it + 1) % config.train.log_every == 0:
                print(f"[train] epoch {epoch + 1} iter {it + 1}/{iters} "
                      f"loss {terms['loss']:.4f} lr {lr:.2e}", flush=True)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - start
        metrics = {k: v / max(batches, 1) for k, v in sums.items()}
        metrics.update(
            epoch=epoch + 1,
            lr=lr,
            images_per_s=images * self.world / max(elapsed, 1e-9),
            epoch_time_s=elapsed,
            skipped_images=len(skipped),
        )
        if self.swa_model is not None and epoch >= config.train.epochs - config.train.swa_epochs:
            self.swa_model.update_parameters(_unwrap(self.model))
        self._skipped = skipped
        return metrics

    def _set_lr(self, progress: float) -> float:
        """Set every group's lr for the fractional epoch `progress`; returns the base lr."""
        train = self.config.train
        lr = train.lr * self.schedule(progress)
        frozen = self.global_iter < train.freeze_backbone_iters
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0 if (frozen and group["name"] == "backbone") else lr
        return lr

    def _step(self, batch: dict[str, Any]) -> dict[str, float]:
        """Forward, backward and every optimizer step for one batch; returns the loss terms."""
        device, train = self.device, self.config.train
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()
                  if isinstance(v, torch.Tensor)}  # image (B, 3, H, W); pid, camid, ... (B,)
        self.optimizer.zero_grad(set_to_none=True)
        self.criterion.zero_grad(set_to_none=True)
        images = inputs["image"]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            out = self.forward(images, inputs["pid"], inputs.get("modality"))
        losses = self.criterion(out, inputs)
        self.scaler.scale(losses.total).backward()
        self.criterion.sync_gradients(self.world)
        if train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip)
        self.scaler.step(self.optimizer)
        self.criterion.step(grad_scale=self.scaler.get_scale())
        self.scaler.update()
        terms = {"loss": float(losses.total.detach())}
        terms.update({f"loss_{k}": float(v.detach()) for k, v in losses.terms.items()})
        return terms

    # ---- evaluate and report ----------------------------------------------------------------

    def evaluate(self, net: torch.nn.Module, prefix: str = "") -> dict[str, float]:
        """Rank 0: metrics of `net` on query vs gallery, keys prefixed; logs the CMC picture."""
        data = self.config.data
        result, skipped = evaluate_model(
            net, self.dataset.query, self.dataset.gallery, data.height, data.width,
            batch_size=data.eval_batch_size, device=self.device, amp=self.use_amp,
        )
        metrics = {f"{prefix}{k}": v for k, v in result.as_metrics().items()}
        metrics[f"{prefix}eval_skipped_queries"] = result.num_skipped_queries
        metrics[f"{prefix}eval_skipped_images"] = skipped
        with tempfile.TemporaryDirectory() as tmp:
            label = "SWA model" if net is not _unwrap(self.model) else "model"
            self.logger.log_artifact(plot_cmc({label: result.cmc}, Path(tmp) / "cmc.png"),
                                     "plots")
        return metrics

    def report(self, epoch: int, metrics: dict[str, float], net: torch.nn.Module) -> None:
        """Every rank reports; rank 0 checkpoints `net`, keeps the best by `score`, then logs.

        MLflow is written after the checkpoint is reported and at most once per epoch, so a
        run resumed after a failure has exactly one value per metric per epoch.
        """
        if not self.is_main:
            self.session.report(metrics, None)
            return
        if "score" in metrics and metrics["score"] > self.best_score:
            self.best_score, self.best_epoch = float(metrics["score"]), epoch
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, net, self.config, epoch, metrics,
                                mlflow_run=self.mlflow_run)
                self.logger.log_artifact(tmp, "checkpoints/best")
            self.logger.set_tags({"best_score": f"{self.best_score:.6f}",
                                  "best_epoch": str(self.best_epoch)})
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, net, self.config, epoch, metrics, self.training_state(),
                            mlflow_run=self.mlflow_run)
            self.session.report(metrics, tmp)
        self.logger.log_metrics_once(metrics, step=epoch)
        if self._orphans:  # a newer checkpoint now exists: drop those a failure left behind
            self.session.remove(self._orphans)
            self._orphans = []

    def progress_line(self, metrics: dict[str, float], eta_s: float) -> str:
        epochs = self.config.train.epochs
        terms = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("loss"))
        line = (f"[train] epoch {int(metrics['epoch'])}/{epochs} {terms} "
                f"lr {metrics['lr']:.2e} {metrics['images_per_s']:.1f} img/s "
                f"eta {_format_eta(eta_s)}")
        if "rank1" in metrics:
            line += (f" | rank1 {metrics['rank1']:.4f} mAP {metrics['mAP']:.4f} "
                     f"mINP {metrics['mINP']:.4f}")
        if self._skipped:
            line += (f" | skipped {len(self._skipped)} corrupt image(s), "
                     f"e.g. {self._skipped[0]}")
        return line

    def finish_swa(self, epoch: int, metrics: dict[str, float]) -> torch.nn.Module:
        """After the last epoch: BatchNorm statistics of the averaged weights, then rank 0
        evaluates it. The SWA model is the final checkpoint, so its metrics become the
        headline ones and the plain model's move under `PRE_SWA_PREFIX`."""
        assert self.swa_model is not None
        recompute_batchnorm(
            self.swa_model, (b["image"] for b in self.loader if b["image"] is not None),
            self.device,
        )
        swa_net = self.swa_model.module
        if self.is_main:
            plain = {k: metrics.pop(k) for k in list(metrics)
                     if k in self._eval_keys(metrics)}
            metrics.update({f"{PRE_SWA_PREFIX}{k}": v for k, v in plain.items()})
            swa_metrics = self.evaluate(swa_net)
            metrics.update(swa_metrics)
            print(f"[train] SWA model (the checkpoint): rank1 {swa_metrics['rank1']:.4f} "
                  f"mAP {swa_metrics['mAP']:.4f} mINP {swa_metrics['mINP']:.4f}; before "
                  f"averaging: rank1 {plain['rank1']:.4f} mAP {plain['mAP']:.4f}", flush=True)
        return swa_net

    @staticmethod
    def _eval_keys(metrics: dict[str, float]) -> list[str]:
        keys = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP", "score",
                "eval_skipped_queries", "eval_skipped_images")
        return [k for k in keys if k in metrics]


def train_loop_per_worker(loop_config: dict[str, Any],
                          session: RaySession | LocalSession | None = None) -> None:
    """Train with DDP (in a Ray Train worker) or in this process (`session`, debug mode);
    see the module docstring for `loop_config` and the steps."""
    run = WorkerRun(loop_config, session or RaySession())
    config, epochs = run.config, run.config.train.epochs
    if epochs == 0 or run.start_epoch >= epochs:
        # Nothing (left) to train: evaluate the model as it is.
        metrics: dict[str, float] = {"epoch": run.start_epoch}
        if run.is_main:
            metrics.update(run.evaluate(_unwrap(run.model)))
        run.report(run.start_epoch, metrics, _unwrap(run.model))
        return

    run_start = time.perf_counter()
    for epoch in range(run.start_epoch, epochs):
        metrics = run.train_epoch(epoch)
        is_last = epoch + 1 == epochs
        if run.is_main and ((epoch + 1) % max(config.train.eval_every, 1) == 0 or is_last):
            metrics.update(run.evaluate(_unwrap(run.model)))
        if run.is_main:
            done = epoch + 1 - run.start_epoch
            eta = (time.perf_counter() - run_start) / done * (epochs - epoch - 1)
            print(run.progress_line(metrics, eta), flush=True)
        net = _unwrap(run.model)
        if is_last and run.swa_model is not None:
            net = run.finish_swa(epoch, metrics)
        run.report(epoch + 1, metrics, net)
