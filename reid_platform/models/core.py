"""The contract every re-identification model answers (`ReidModel`), and its output types.

    forward(images (B, 3, H, W), pids (B,) | None, modality (B,) | None) -> ReidOutput
    embed(images, modality=None, feature="post_bn") -> (B, D) L2-normalised
    branches: tuple[BranchSpec, ...]      # name, width and role of each output branch

`ReidOutput` holds one `BranchOutput` per branch (features before and after the branch's
BNNeck, and its ID logits). Losses sum over branches; the inference embedding is defined once,
in `concat_embedding`: the branches' features concatenated, then L2-normalised. A part model
(global + stripe branches) and the one-branch BoT model go through the same code.
`forward` always returns the same `ReidOutput`, in train and eval mode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from reid_platform.config import ModelConfig


class ModelError(ValueError):
    """A model cannot be built as configured; the message names the setting."""


FEATURES = ("post_bn", "pre_bn")  # which side of the BNNeck `embed` returns


@dataclass(frozen=True)
class BranchSpec:
    """One output branch of a model.

    Attributes:
        name: e.g. "global", "part2_1".
        dim: width of the branch's features (before and after its BNNeck).
        metric: metric-learning losses (triplet, center, ...) apply to this branch's
            features; ID losses apply to every branch's logits.
    """

    name: str
    dim: int
    metric: bool = True


@dataclass
class BranchOutput:
    """One branch's outputs: features (B, D_b) before and after its BNNeck, logits (B, N).

    `logits` is None only when the model was run for embedding (`ReidModel.embed`).
    """

    features: torch.Tensor
    bn_features: torch.Tensor
    logits: torch.Tensor | None


def concat_embedding(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The inference embedding of every model: branch features concatenated, L2-normalised.

    Args:
        parts: one (B, D_b) tensor per branch.

    Returns:
        (B, sum D_b), unit L2 norm per row.
    """
    return F.normalize(torch.cat(list(parts), dim=1), dim=1)


@dataclass
class ReidOutput:
    """What every model's `forward` returns: one `BranchOutput` per `model.branches` entry."""

    branches: list[BranchOutput]

    def embedding(self, feature: str = "post_bn") -> torch.Tensor:
        """The L2-normalised (B, D) embedding from the features after ("post_bn", the default
        for inference) or before ("pre_bn") each branch's BNNeck."""
        if feature not in FEATURES:
            raise ModelError(f"feature={feature!r}; choose one of {FEATURES}")
        attr = "bn_features" if feature == "post_bn" else "features"
        return concat_embedding([getattr(b, attr) for b in self.branches])


class ReidModel(nn.Module):
    """The contract every architecture implements; see the module docstring.

    Subclasses set `branches`, `num_classes` and `config`, and implement `forward_branches`.
    """

    branches: tuple[BranchSpec, ...]
    num_classes: int
    config: ModelConfig

    @property
    def embedding_dim(self) -> int:
        """Width D of the inference embedding (the branches' widths summed)."""
        return sum(b.dim for b in self.branches)

    def forward_branches(
        self,
        images: torch.Tensor,
        pids: torch.Tensor | None = None,
        modality: torch.Tensor | None = None,
        logits: bool = True,
    ) -> list[BranchOutput]:
        """One BranchOutput per `self.branches` entry for images (B, 3, H, W).

        Args:
            pids: (B,) identities; enable the margin of CosFace/ArcFace heads in training.
            modality: (B,) modality index of each image, for models with modality-specific
                layers (others ignore it).
            logits: compute the ID logits (False when only embedding).
        """
        raise NotImplementedError

    def forward(
        self,
        images: torch.Tensor,
        pids: torch.Tensor | None = None,
        modality: torch.Tensor | None = None,
    ) -> ReidOutput:
        """Run the whole model; the same return type in train and eval mode."""
        return ReidOutput(self.forward_branches(images, pids, modality))

    def embed(
        self,
        images: torch.Tensor,
        modality: torch.Tensor | None = None,
        feature: str = "post_bn",
    ) -> torch.Tensor:
        """Inference embedding (B, D), L2-normalised; see `ReidOutput.embedding`.

        Uses the BatchNorm running statistics only in eval mode: call `model.eval()` first.
        """
        return ReidOutput(
            self.forward_branches(images, modality=modality, logits=False)
        ).embedding(feature)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the (ImageNet-initialised) feature extractor: the optimizer's
        "backbone" group, frozen for `train.freeze_backbone_iters`; the rest is the "head"."""
        return self.backbone.parameters()


