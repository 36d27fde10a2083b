"""Re-identification models: one interface for every architecture, the BoT model its simplest case.

Every model answers the same contract (`ReidModel`):

    forward(images (B, 3, H, W), pids (B,) | None, modality (B,) | None) -> ReidOutput
    embed(images, modality=None, feature="post_bn") -> (B, D) L2-normalised
    branches: tuple[BranchSpec, ...]      # name, width and role of each output branch

`ReidOutput` holds one `BranchOutput` per branch (features before and after the branch's
BNNeck, and its ID logits). Losses sum over branches; the inference embedding is defined once,
in `concat_embedding`: the branches' features concatenated, then L2-normalised. A part model
(global + stripe branches) and the one-branch BoT model go through the same code.

The BoT model (Luo et al. 2019):

    image (B, 3, H, W) --backbone--> map (B, C, h, w) --avg/GeM--> f_t (B, C)
        --[optional linear to embedding_dim]--> BatchNorm1d (bias frozen) --> f_i (B, C)
        --head--> logits (B, num_classes)

The triplet loss sees f_t, the ID loss the logits of f_i; inference uses f_i, L2-normalised.
`forward` always returns the same `ReidOutput`, in train and eval mode.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reid_platform.config import ModelConfig
from reid_platform.torchvision_guard import ensure_torchvision_importable

ensure_torchvision_importable()
import timm  # noqa: E402  (needs the guard first on CPU-only torch)


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


class GeM(nn.Module):
    """Generalized-mean pooling: (mean x^p)^(1/p) over the spatial map; p=1 is average."""

    def __init__(self, p: float = 3.0, learnable: bool = False, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, C)
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


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
POOLINGS = ("avg", "gem")


def set_last_stride_1(backbone: nn.Module) -> bool:
    """Remove the stride of the last ResNet stage (16x8 maps at 256x128 instead of 8x4).

    Returns:
        True if the backbone has a ResNet `layer4` and it was changed.
    """
    layer4 = getattr(backbone, "layer4", None)
    if layer4 is None:
        return False
    first_block = layer4[0]
    for module in first_block.modules():
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (1, 1)
        elif isinstance(module, nn.AvgPool2d) and module.stride in (2, (2, 2)):
            module.kernel_size, module.stride = 1, 1  # ResNet-D average-pool downsampling
    return True


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


class BoTModel(ReidModel):
    """timm backbone + pooling + BNNeck + head: one branch; see the module docstring.

    Args:
        config: model settings (backbone name, pooling, head, ...).
        num_classes: training identities N (the classifier has exactly N outputs).
    """

    def __init__(self, config: ModelConfig, num_classes: int):
        super().__init__()
        if config.pooling not in POOLINGS:
            raise ModelError(f"model.pooling={config.pooling!r}; choose one of {POOLINGS}")
        if config.head not in HEADS:
            raise ModelError(f"model.head={config.head!r}; choose one of {sorted(HEADS)}")
        if num_classes < 1:
            raise ModelError(f"num_classes must be >= 1, got {num_classes}")
        self.config = config
        self.num_classes = num_classes
        self.backbone = create_backbone(config.backbone, config.pretrained)
        if config.last_stride == 1:
            set_last_stride_1(self.backbone)
        self.pool = (
            GeM(config.gem_p, config.gem_learnable)
            if config.pooling == "gem"
            else nn.AdaptiveAvgPool2d(1)
        )
        width = self.backbone.num_features
        if config.embedding_dim > 0:
            self.reduce: nn.Module = nn.Linear(width, config.embedding_dim, bias=False)
            width = config.embedding_dim
        else:
            self.reduce = nn.Identity()
        self.branches = (BranchSpec("global", width),)
        self.bnneck = nn.BatchNorm1d(width)
        self.bnneck.bias.requires_grad_(False)  # BoT: a frozen zero shift
        self.head = HEADS[config.head](
            width, num_classes, scale=config.head_scale, margin=config.head_margin
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> f_t (B, D), the pooled (and reduced) feature before the BNNeck."""
        x = self.backbone.forward_features(images)
        if x.ndim == 4:  # CNN map (B, C, h, w)
            x = self.pool(x).flatten(1)
        else:  # transformer tokens: the backbone's own pooling (cls token or average)
            x = self.backbone.forward_head(x, pre_logits=True)
        return self.reduce(x)

    def forward_branches(
        self,
        images: torch.Tensor,
        pids: torch.Tensor | None = None,
        modality: torch.Tensor | None = None,
        logits: bool = True,
    ) -> list[BranchOutput]:
        f_t = self.features(images)  # (B, D)
        f_i = self.bnneck(f_t)  # (B, D)
        return [BranchOutput(f_t, f_i, self.head(f_i, pids) if logits else None)]


# Architectures by `model.arch`: a new one is a ReidModel subclass and one entry here.
ARCHS: dict[str, type[ReidModel]] = {"bot": BoTModel}


def check_backbone(name: str) -> None:
    """Raise ModelError, listing similar names, unless `name` is a timm model."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=6,
                                          cutoff=0.5)
        hint = f"similar names: {close} (did you mean {close[0]!r}?)" if close else (
            "see timm.list_models()")
        raise ModelError(f"model.backbone={name!r} is not a timm model; {hint}")


def create_backbone(name: str, pretrained: str = "") -> nn.Module:
    """A timm feature extractor (`num_classes=0`), with ImageNet weights from a local file.

    Args:
        name: any timm model name, e.g. resnet50, resnet50_gn, seresnext50_32x4d, vit_small_*.
        pretrained: path to a weights file (.pth/.bin/.safetensors), or "" for random init.
            Model hubs are not contacted.

    Raises:
        ModelError: unknown model name or missing weights file.
    """
    check_backbone(name)
    kwargs: dict = {"num_classes": 0}
    if pretrained:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ModelError(f"model.pretrained={pretrained!r}: no such weights file")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    return timm.create_model(name, **kwargs)


def build_model(config: ModelConfig, num_classes: int) -> ReidModel:
    """Build the model described by `config` (`model.arch`) with `num_classes` identities.

    Raises:
        ModelError: an unknown architecture or a setting the architecture cannot build.
    """
    if config.arch not in ARCHS:
        raise ModelError(f"model.arch={config.arch!r}; choose one of {sorted(ARCHS)}")
    return ARCHS[config.arch](config, num_classes)
