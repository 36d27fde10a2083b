"""Losses of the BoT recipe as small composable modules.

- `TripletLoss`: batch-hard mining, margin or soft margin, Euclidean or cosine distance.
- `CrossEntropyLabelSmooth`: ID loss with label smoothing.
- `CenterLoss`: pulls features to a learned per-class centre (own optimizer, see training).
- `ReidLoss`: the weighted total, returning every term for logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from reid_platform.config import LossConfig


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


class ReidLoss(nn.Module):
    """w_id * ID(logits) + w_tri * triplet(f_t) + w_center * center(f_t).

    Args:
        config: weights, margin, distance and smoothing.
        num_classes: identities N.
        feat_dim: dimension of f_t (for the center loss).
    """

    def __init__(self, config: LossConfig, num_classes: int, feat_dim: int):
        super().__init__()
        self.config = config
        self.id_loss = CrossEntropyLabelSmooth(config.label_smoothing)
        self.triplet = TripletLoss(config.margin, config.soft_margin, config.distance)
        self.center = CenterLoss(num_classes, feat_dim) if config.center_weight > 0 else None

    def forward(self, features: torch.Tensor, logits: torch.Tensor,
                pids: torch.Tensor) -> LossTerms:
        terms = {
            "id": self.id_loss(logits.float(), pids),
            "triplet": self.triplet(features.float(), pids),
        }
        total = self.config.id_weight * terms["id"] + self.config.triplet_weight * terms["triplet"]
        if self.center is not None:
            terms["center"] = self.center(features.float(), pids)
            total = total + self.config.center_weight * terms["center"]
        return LossTerms(total=total, terms=terms)
