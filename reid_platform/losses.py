"""Losses of the BoT recipe as small composable modules.

- `TripletLoss`: batch-hard mining, margin or soft margin, Euclidean or cosine distance.
- `CrossEntropyLabelSmooth`: ID loss with label smoothing.
- `CenterLoss`: pulls features to a learned per-class centre.
- `LossTerm`: one weighted term of the training loss over the model's `ReidOutput`; it owns
  its parameters and, if it has one, its optimizer step (`IdLossTerm`, `TripletLossTerm`,
  `CenterLossTerm`).
- `MetricLearningTerm`: the wider loss zoo from pytorch-metric-learning (contrastive, circle,
  multi-similarity, cross-batch memory), configured by `loss.extra`, with every rank's
  embeddings gathered before mining under DDP.
- `ReidLoss`: the weighted total of the configured terms, returning every term for logging,
  with the gradient averaging, own optimizer steps and resume state of all terms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.utils.distributed import (
    DistributedLossWrapper,
    DistributedMinerWrapper,
)
from torch import nn

from reid_platform.config import ExtraLoss, LossConfig
from reid_platform.models import BranchSpec, ReidOutput


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances (M, D) x (N, D) -> (M, N), numerically clamped."""
    xx = x.pow(2).sum(1, keepdim=True)  # (M, 1)
    yy = y.pow(2).sum(1, keepdim=True).t()  # (1, N)
    dist = (xx + yy - 2.0 * x @ y.t()).clamp(min=1e-12)
    return dist.sqrt()


def cosine_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine distances 1 - cos (M, D) x (N, D) -> (M, N), in [0, 2]."""
    return 1.0 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).t()


DISTANCES = {"euclidean": euclidean_dist, "cosine": cosine_dist}


def hard_example_mining(
    dist: torch.Tensor, pids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each anchor, the farthest positive and the closest negative distance.

    Args:
        dist: (B, B) pairwise distances.
        pids: (B,) identity labels.

    Returns:
        (dist_ap, dist_an), each (B,). An anchor's farthest positive may be itself (distance
        ~0) when its identity has one image in the batch; an anchor without negatives (one
        identity in the batch) gets dist_an = +inf, which the caller masks out.
    """
    same = pids.unsqueeze(0) == pids.unsqueeze(1)  # (B, B)
    dist_ap = torch.where(same, dist, torch.full_like(dist, -torch.inf)).max(dim=1).values
    dist_an = torch.where(~same, dist, torch.full_like(dist, torch.inf)).min(dim=1).values
    return dist_ap, dist_an


class TripletLoss(nn.Module):
    """Batch-hard triplet loss: mean over anchors of max(0, d(a,p) - d(a,n) + margin).

    Args:
        margin: the hinge margin (ignored with soft_margin).
        soft_margin: use log(1 + exp(d(a,p) - d(a,n))) instead of the hinge.
        distance: "euclidean" or "cosine".
    """

    def __init__(self, margin: float = 0.3, soft_margin: bool = False,
                 distance: str = "euclidean"):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"loss.distance={distance!r}; choose one of {sorted(DISTANCES)}")
        self.margin = margin
        self.soft_margin = soft_margin
        self.distance = DISTANCES[distance]

    def forward(self, features: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        dist = self.distance(features, features)  # (B, B)
        dist_ap, dist_an = hard_example_mining(dist, pids)
        valid = torch.isfinite(dist_an)  # anchors with at least one negative
        if not valid.any():
            return features.sum() * 0.0  # one identity in the batch: nothing to contrast
        diff = dist_ap[valid] - dist_an[valid]
        if self.soft_margin:
            return F.softplus(diff).mean()
        return F.relu(diff + self.margin).mean()


class CrossEntropyLabelSmooth(nn.Module):
    """Cross-entropy against (1 - eps) * onehot + eps / N (Szegedy et al.; BoT's ID loss)."""

    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"loss.label_smoothing={epsilon} must be in [0, 1)")
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits, dim=1)  # (B, N)
        num_classes = logits.shape[1]
        target = torch.full_like(log_probs, self.epsilon / num_classes)
        target.scatter_(1, pids.unsqueeze(1), 1.0 - self.epsilon + self.epsilon / num_classes)
        return -(target * log_probs).sum(dim=1).mean()


class CenterLoss(nn.Module):
    """Center loss (Wen et al. 2016) as in BoT: squared distance to the class centre,
    averaged over the batch.

    The centres are parameters trained by their own SGD optimizer (BoT: lr 0.5), whose
    gradients are rescaled by 1 / weight so the weight does not slow them down.
    """

    def __init__(self, num_classes: int, feat_dim: int):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        centers = self.centers[pids]  # (B, D)
        return (features - centers).pow(2).sum(dim=1).clamp(1e-12, 1e12).mean()


@dataclass
class LossTerms:
    """The weighted total and each unweighted term (for logging)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


# ---- loss terms ------------------------------------------------------------------------------


class LossTerm(nn.Module):
    """One weighted term of the training loss, with whatever it needs to train itself.

    A term computes its unweighted value from the model output and the batch (`pid`, `camid`
    and, when the data has them, `modality`, each (B,)). It may own parameters (centres, a
    discriminator): those with an own optimizer (`make_optimizer`) are stepped by
    `optimizer_step`, the others train in the model's optimizer. The training loop never
    names a term: `ReidLoss` does all of this for every term alike.

    Args:
        weight: the term's factor in the total.
    """

    name = ""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = float(weight)

    def forward(self, output: ReidOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def make_optimizer(self) -> torch.optim.Optimizer | None:
        """The term's own optimizer for its parameters; None = they train with the model."""
        return None

    def optimizer_step(self, optimizer: torch.optim.Optimizer, grad_scale: float) -> None:
        """Step the own optimizer: undo the AMP loss scale, skip on inf/NaN gradients.

        Args:
            optimizer: what `make_optimizer` returned.
            grad_scale: the AMP GradScaler's current scale (1.0 without AMP).
        """
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not all(torch.isfinite(g).all() for g in grads):
            return
        for grad in grads:
            grad.mul_(1.0 / grad_scale)
        optimizer.step()


class IdLossTerm(LossTerm):
    """ID loss: label-smoothed cross-entropy of every branch's logits, summed over branches."""

    name = "id"

    def __init__(self, weight: float, label_smoothing: float = 0.1):
        super().__init__(weight)
        self.loss = CrossEntropyLabelSmooth(label_smoothing)

    def forward(self, output: ReidOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.loss(b.logits.float(), batch["pid"]) for b in output.branches)


class TripletLossTerm(LossTerm):
    """Batch-hard triplet loss on the pre-BNNeck features of every metric branch, summed."""

    name = "triplet"

    def __init__(self, weight: float, branches: Sequence[BranchSpec], margin: float = 0.3,
                 soft_margin: bool = False, distance: str = "euclidean"):
        super().__init__(weight)
        self.metric = [i for i, b in enumerate(branches) if b.metric]
        self.loss = TripletLoss(margin, soft_margin, distance)

    def forward(self, output: ReidOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(
            self.loss(output.branches[i].features.float(), batch["pid"]) for i in self.metric
        )


class CenterLossTerm(LossTerm):
    """Center loss on the pre-BNNeck features of every metric branch (one centre table each),
    summed. The centres have their own SGD optimizer (BoT: lr 0.5) whose step undoes the loss
    weight, so the centres learn at `lr` whatever the weight."""

    name = "center"

    def __init__(self, weight: float, num_classes: int, branches: Sequence[BranchSpec],
                 lr: float = 0.5):
        super().__init__(weight)
        self.metric = [i for i, b in enumerate(branches) if b.metric]
        self.centers = nn.ModuleList(CenterLoss(num_classes, branches[i].dim) for i in self.metric)
        self.lr = lr

    def forward(self, output: ReidOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(
            centers(output.branches[i].features.float(), batch["pid"])
            for i, centers in zip(self.metric, self.centers)
        )

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, grad_scale: float) -> None:
        super().optimizer_step(optimizer, grad_scale * self.weight)


def _pair_loss(name: str, spec: ExtraLoss) -> tuple[nn.Module, nn.Module | None]:
    """(pytorch-metric-learning loss, its miner or None) for a pair-based loss name."""
    if name == "contrastive":
        return pml_losses.ContrastiveLoss(pos_margin=spec.pos_margin,
                                          neg_margin=spec.neg_margin), None
    if name == "circle":
        return pml_losses.CircleLoss(m=spec.margin, gamma=spec.scale), None
    if name == "multi_similarity":
        miner = (pml_miners.MultiSimilarityMiner(epsilon=spec.miner_epsilon)
                 if spec.miner_epsilon > 0 else None)
        return pml_losses.MultiSimilarityLoss(alpha=spec.alpha, beta=spec.beta,
                                              base=spec.base), miner
    raise ValueError(f"loss.extra: unknown loss {name!r}")


def _distributed() -> tuple[bool, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        return world > 1, world
    return False, 1


class MetricLearningTerm(LossTerm):
    """A pytorch-metric-learning loss (`loss.extra` entry) on the pre-BNNeck features of every
    metric branch, summed over branches.

    Under DDP every rank's embeddings and labels are gathered before mining, as
    pytorch-metric-learning's `DistributedLossWrapper` does: each rank computes the loss of the
    whole global batch (gradients flow into its own embeddings) times the world size, so DDP's
    gradient averaging gives exactly the gradient of the single-process loss. Cross-batch
    memory (`xbm`) enqueues the gathered batch, so every rank's memory holds the same
    embeddings; the memory is a buffer, saved with the training state and restored on resume.

    Args:
        spec: the `loss.extra` entry (name, weight and the loss's own settings).
        branches: the model's branches; the loss applies to those with `metric`.
    """

    def __init__(self, spec: ExtraLoss, branches: Sequence[BranchSpec]):
        super().__init__(spec.weight)
        self.name = spec.name
        self.metric = [i for i, b in enumerate(branches) if b.metric]
        losses, miners = [], []
        for i in self.metric:
            if spec.name == "xbm":
                if spec.memory_size < 1:
                    raise ValueError(f"loss.extra xbm: memory_size={spec.memory_size} must be >= 1")
                inner, inner_miner = _pair_loss(spec.inner, spec)
                # the memory mines its own pairs (batch vs memory) with the inner loss's miner
                losses.append(pml_losses.CrossBatchMemory(
                    inner, embedding_size=branches[i].dim, memory_size=spec.memory_size,
                    miner=inner_miner))
                miners.append(None)
            else:
                loss, miner = _pair_loss(spec.name, spec)
                losses.append(loss)
                miners.append(miner)
        self.losses = nn.ModuleList(losses)
        # Plain lists, not submodules: the wrappers share the losses (and XBM's memory)
        # registered above, which must appear once in the state dict.
        self._wrapped = [DistributedLossWrapper(loss) for loss in losses]
        self._miners = miners
        self._wrapped_miners = [DistributedMinerWrapper(m) if m is not None else None
                                for m in miners]

    def forward(self, output: ReidOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pids = batch["pid"]
        distributed, world = _distributed()
        total = output.branches[self.metric[0]].features.new_zeros((), dtype=torch.float32)
        for k, i in enumerate(self.metric):
            features = output.branches[i].features.float()  # (B, D)
            loss = self.losses[k]
            if isinstance(loss, pml_losses.CrossBatchMemory) and (
                features.shape[0] * world > loss.memory_size
            ):
                raise ValueError(
                    f"loss.extra xbm: memory_size={loss.memory_size} must hold at least one "
                    f"batch of every rank ({features.shape[0]} x {world} workers)"
                )
            if distributed:
                # the miner and the loss both see the gathered global batch, in the same order
                miner = self._wrapped_miners[k]
                tuples = miner(features, pids) if miner is not None else None
                total = total + self._wrapped[k](features, pids, tuples)
            else:
                miner = self._miners[k]
                tuples = miner(features, pids) if miner is not None else None
                total = total + loss(features, pids, tuples)
        return total

    def get_extra_state(self) -> dict[str, Any]:
        # XBM's write position and fill flag are plain attributes, not buffers
        return {"queues": [[int(loss.queue_idx), bool(loss.has_been_filled)]
                           for loss in self.losses
                           if isinstance(loss, pml_losses.CrossBatchMemory)]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        memories = [m for m in self.losses if isinstance(m, pml_losses.CrossBatchMemory)]
        for memory, (queue_idx, filled) in zip(memories, state.get("queues", [])):
            memory.queue_idx, memory.has_been_filled = int(queue_idx), bool(filled)


def build_terms(config: LossConfig, num_classes: int,
                branches: Sequence[BranchSpec]) -> list[LossTerm]:
    """The terms `config` asks for (a weight of 0 leaves a term out).

    Metric-learning terms (triplet, center, `loss.extra`) are left out for a model without
    metric branches (PCB: ID loss per stripe only). A new loss is a `LossTerm` subclass and
    one line here (and its config keys).
    """
    terms: list[LossTerm] = []
    if config.id_weight > 0:
        terms.append(IdLossTerm(config.id_weight, config.label_smoothing))
    if not any(b.metric for b in branches):
        return terms
    if config.triplet_weight > 0:
        terms.append(TripletLossTerm(config.triplet_weight, branches, config.margin,
                                     config.soft_margin, config.distance))
    if config.center_weight > 0:
        terms.append(CenterLossTerm(config.center_weight, num_classes, branches,
                                    config.center_lr))
    terms.extend(MetricLearningTerm(spec, branches) for spec in config.extra if spec.weight > 0)
    return terms


class ReidLoss(nn.Module):
    """The weighted sum of the configured loss terms, and the upkeep of their parameters.

    Args:
        config: weights, margin, distance, smoothing, center-loss lr.
        num_classes: identities N.
        branches: the model's `branches` (widths, and which take metric losses).
        terms: explicit terms instead of the ones `config` describes.
    """

    def __init__(self, config: LossConfig, num_classes: int, branches: Sequence[BranchSpec],
                 terms: Sequence[LossTerm] | None = None):
        super().__init__()
        built = list(terms) if terms is not None else build_terms(config, num_classes, branches)
        if not built:
            raise ValueError("every loss weight is 0: nothing to train (loss.id_weight, ...)")
        names = [t.name for t in built]
        if len(set(names)) != len(names):
            raise ValueError(f"loss terms must have distinct names, got {names}")
        self.terms = nn.ModuleDict({t.name: t for t in built})
        # built once: the parameters are moved in place by .to(device), the optimizers follow
        self.optimizers = {
            name: opt for name, t in self.terms.items() if (opt := t.make_optimizer()) is not None
        }

    def forward(self, output: ReidOutput, batch: Mapping[str, torch.Tensor]) -> LossTerms:
        """Every term's float32 value and the weighted total."""
        terms = {name: term(output, batch) for name, term in self.terms.items()}
        total = sum(self.terms[name].weight * value for name, value in terms.items())
        return LossTerms(total=total, terms=terms)

    def model_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the terms without an own optimizer: they join the model's."""
        return [
            p for name, t in self.terms.items() if name not in self.optimizers
            for p in t.parameters() if p.requires_grad
        ]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)
        super().zero_grad(set_to_none=set_to_none)

    def sync_gradients(self, world_size: int) -> None:
        """Average the terms' gradients across DDP ranks (the terms are not inside DDP).

        Call after backward, before any optimizer step; every rank must call it.
        """
        if world_size <= 1:
            return
        for p in self.parameters():
            if p.requires_grad:
                if p.grad is None:  # keep the collectives aligned across ranks
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(world_size)

    def step(self, grad_scale: float = 1.0) -> None:
        """Run the terms' own optimizer steps (after `sync_gradients`)."""
        for name, optimizer in self.optimizers.items():
            self.terms[name].optimizer_step(optimizer, grad_scale)

    def training_state(self) -> dict[str, Any]:
        """What a resume needs: the terms' parameters/buffers and their optimizers' states."""
        return {
            "loss": self.state_dict(),
            "loss_optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
        }

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        """Restore `training_state()`; a checkpoint without loss state leaves the terms as
        they are (e.g. one saved before the terms had parameters)."""
        if "loss" in state:
            self.load_state_dict(state["loss"])
        for name, opt_state in state.get("loss_optimizers", {}).items():
            if name in self.optimizers:
                self.optimizers[name].load_state_dict(opt_state)
