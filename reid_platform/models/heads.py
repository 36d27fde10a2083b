"""ID classifier heads: plain linear (BoT), AM-Softmax/CosFace and ArcFace (scale, margin)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Module):
    """Plain linear classifier without bias (the BoT head)."""

    def __init__(self, in_features: int, num_classes: int, **_: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, std=0.001)

    def forward(self, x: torch.Tensor, pids: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight)


class CosFaceHead(nn.Module):
    """AM-Softmax / CosFace: s * (cos(theta) - m) for the target class, s * cos elsewhere."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0,
                 margin: float = 0.35):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = scale, margin

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x), F.normalize(self.weight))

    def forward(self, x: torch.Tensor, pids: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(x)
        if pids is not None:
            cos = cos - self.margin * F.one_hot(pids, cos.shape[1]).to(cos.dtype)
        return self.scale * cos


class ArcFaceHead(CosFaceHead):
    """ArcFace: s * cos(theta + m) for the target class (with the usual easy-margin fallback)."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0,
                 margin: float = 0.5):
        super().__init__(in_features, num_classes, scale, margin)
        self.threshold = math.cos(math.pi - margin)
        self.mm = math.sin(math.pi - margin) * margin

    def forward(self, x: torch.Tensor, pids: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(x)
        if pids is not None:
            sin = (1.0 - cos.pow(2)).clamp(min=1e-7).sqrt()
            phi = cos * math.cos(self.margin) - sin * math.sin(self.margin)
            # past theta = pi - m, cos(theta + m) stops decreasing: use a linear penalty
            phi = torch.where(cos > self.threshold, phi, cos - self.mm)
            onehot = F.one_hot(pids, cos.shape[1]).to(cos.dtype)
            cos = onehot * phi + (1.0 - onehot) * cos
        return self.scale * cos


HEADS = {"linear": LinearHead, "cosface": CosFaceHead, "arcface": ArcFaceHead}
