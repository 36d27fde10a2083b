"""Architectures by `model.arch`: BoT (one branch), MGN and PCB (part models).

BoT (Luo et al. 2019):

    image (B, 3, H, W) --backbone--> map (B, C, h, w) --pool--> f_t (B, C)
        --[optional linear to embedding_dim]--> BatchNorm1d (bias frozen) --> f_i (B, C)
        --head--> logits (B, num_classes)

MGN (Wang et al. 2018): a ResNet shared up to layer3[0]; one branch per `model.parts` entry,
each with its own copy of layer3[1:] and layer4 (stride 1 on the part branches). A branch
"N" pools its map globally and, for N > 1, in N horizontal stripes; "RxC" (the competition's
2x2 branch) in an R x C grid. Every pooled feature is reduced to `model.part_dim` (1x1 conv +
BN + ReLU) and has its own BNNeck and ID head; metric losses see each branch's global feature.

PCB (Sun et al. 2018): the final map (last stride 1) cut into `model.pcb_stripes` horizontal
stripes, each pooled, reduced (1x1 conv + BN + ReLU) and classified on its own (ID loss per
stripe, no metric loss); with `model.pcb_rpp` the stripes are soft: a part classifier on each
column vector of the map gives the weights of a per-part weighted average (refined part
pooling), trained jointly here.

Every model's embedding is the concatenation of its branches' post-BNNeck features,
L2-normalised (`ReidModel.embed`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from reid_platform.config import ModelConfig
from reid_platform.models.backbones import (
    DEFAULT_INPUT_SIZE,
    build_backbone,
    copy_module,
    feature_map,
    is_resnet,
    is_vit,
    resnet_stages,
    set_last_stride_1,
    set_stage_stride_1,
)
from reid_platform.models.core import BranchOutput, BranchSpec, ModelError, ReidModel
from reid_platform.models.heads import HEADS
from reid_platform.models.pooling import POOLINGS, build_pooling


def _check_common(config: ModelConfig, num_classes: int) -> None:
    if config.pooling not in POOLINGS:
        raise ModelError(f"model.pooling={config.pooling!r}; choose one of {POOLINGS}")
    if config.head not in HEADS:
        raise ModelError(f"model.head={config.head!r}; choose one of {sorted(HEADS)}")
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")


def _pooling(config: ModelConfig, channels: int, out_dim: int = 0) -> nn.Module:
    return build_pooling(config.pooling, channels, config.gem_p, config.gem_learnable,
                         config.netvlad_clusters, out_dim)


def _head(config: ModelConfig, width: int, num_classes: int) -> nn.Module:
    return HEADS[config.head](width, num_classes, scale=config.head_scale,
                              margin=config.head_margin)


def _bnneck(width: int) -> nn.BatchNorm1d:
    neck = nn.BatchNorm1d(width)
    neck.bias.requires_grad_(False)  # BoT: a frozen zero shift
    return neck


class BoTModel(ReidModel):
    """timm backbone + pooling + BNNeck + head: one branch; see the module docstring.

    Transformer backbones: `avg` and `gem` use the backbone's own pooling (its class token
    or token average); `max` and `netvlad` pool the patch tokens laid out on their grid.

    Args:
        config: model settings (backbone name, pooling, head, ...).
        num_classes: training identities N (the classifier has exactly N outputs).
        input_size: (H, W) of the images (transformers are built for it).
    """

    def __init__(self, config: ModelConfig, num_classes: int,
                 input_size: tuple[int, int] = DEFAULT_INPUT_SIZE):
        super().__init__()
        _check_common(config, num_classes)
        self.config = config
        self.num_classes = num_classes
        self.backbone = build_backbone(config, input_size)
        if config.last_stride == 1:
            set_last_stride_1(self.backbone)
        width = self.backbone.num_features
        # NetVLAD projects to embedding_dim itself (its PCA step): no extra reduction.
        netvlad = config.pooling == "netvlad"
        self.pool = _pooling(config, width, config.embedding_dim if netvlad else 0)
        # transformer tokens (B, N, C): avg/GeM mean the backbone's own pooling
        self.tokens_own_pooling = config.pooling in ("avg", "gem")
        width = self.pool.out_dim or width
        if config.embedding_dim > 0 and not netvlad:
            self.reduce: nn.Module = nn.Linear(width, config.embedding_dim, bias=False)
            width = config.embedding_dim
        else:
            self.reduce = nn.Identity()
        self.branches = (BranchSpec("global", width),)
        self.bnneck = _bnneck(width)
        self.head = _head(config, width, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> f_t (B, D), the pooled (and reduced) feature before the BNNeck."""
        x = self.backbone.forward_features(images)
        if x.ndim == 3 and self.tokens_own_pooling:  # the class token (or token average)
            x = self.backbone.forward_head(x, pre_logits=True)
        else:
            x = self.pool(feature_map(self.backbone, x, *images.shape[2:]))
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


# ---- part models ---------------------------------------------------------------------------


def parse_split(entry: str) -> tuple[int, int]:
    """A `model.parts` entry -> (rows, columns): "3" = 3 horizontal stripes, "2x2" = a grid.

    Raises:
        ModelError: anything else.
    """
    match = re.fullmatch(r"\s*(\d+)\s*(?:x\s*(\d+)\s*)?", str(entry))
    if not match or int(match.group(1)) < 1 or (match.group(2) and int(match.group(2)) < 1):
        raise ModelError(
            f"model.parts entry {entry!r}: expected N (N horizontal stripes, 1 = global only) "
            "or RxC (an R x C grid, e.g. 2x2)"
        )
    return int(match.group(1)), int(match.group(2) or 1)


def split_map(x: torch.Tensor, rows: int, cols: int) -> list[torch.Tensor]:
    """Cut a map (B, C, h, w) into rows x cols cells, row-major (uneven sizes allowed)."""
    if rows > x.shape[2] or cols > x.shape[3]:
        raise ModelError(
            f"cannot cut a {x.shape[2]}x{x.shape[3]} feature map into {rows}x{cols} parts "
            "(model.parts / model.pcb_stripes): use larger images (data.height, data.width) "
            "or fewer parts"
        )
    return [cell for band in torch.tensor_split(x, rows, dim=2)
            for cell in torch.tensor_split(band, cols, dim=3)]


class Reduction(nn.Module):
    """A pooled feature (B, C) -> (B, D): 1x1 conv (as a linear layer) + BN + ReLU (MGN, PCB)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.bn = nn.BatchNorm1d(out_dim)
        nn.init.kaiming_normal_(self.linear.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.linear(x)))


class PartHeads(nn.Module):
    """Per feature: reduction, BNNeck, ID head; turns pooled features into BranchOutputs."""

    def __init__(self, config: ModelConfig, in_dims: list[int], num_classes: int):
        super().__init__()
        dim = config.part_dim
        if dim < 1:
            raise ModelError(f"model.part_dim={dim} must be >= 1")
        self.reductions = nn.ModuleList(Reduction(d, dim) for d in in_dims)
        self.necks = nn.ModuleList(_bnneck(dim) for _ in in_dims)
        self.heads = nn.ModuleList(_head(config, dim, num_classes) for _ in in_dims)

    def forward(self, pooled: list[torch.Tensor], pids: torch.Tensor | None,
                logits: bool) -> list[BranchOutput]:
        out = []
        for x, reduce, neck, head in zip(pooled, self.reductions, self.necks, self.heads):
            f_t = reduce(x)  # (B, part_dim)
            f_i = neck(f_t)
            out.append(BranchOutput(f_t, f_i, head(f_i, pids) if logits else None))
        return out


class PartModel(ReidModel):
    """A model whose branches are pooled (B, C) features (global and parts), each through its
    own reduction, BNNeck and head (`parts_head`); subclasses implement `pooled`."""

    parts_head: PartHeads

    def pooled(self, images: torch.Tensor) -> list[torch.Tensor]:
        """One (B, C) pooled feature per branch, in `branches` order."""
        raise NotImplementedError

    def forward_branches(
        self,
        images: torch.Tensor,
        pids: torch.Tensor | None = None,
        modality: torch.Tensor | None = None,
        logits: bool = True,
    ) -> list[BranchOutput]:
        return self.parts_head(self.pooled(images), pids, logits)


class _ViTShared(nn.Module):
    """A ViT up to (not including) its last block: image -> tokens (B, N, C)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        # the last block and the final norm go to the branches; the head is never used (DDP
        # refuses parameters that get no gradient)
        vit.blocks = vit.blocks[:-1]
        vit.norm, vit.fc_norm, vit.head = nn.Identity(), nn.Identity(), nn.Identity()
        if getattr(vit, "attn_pool", None) is not None:
            vit.attn_pool = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit._pos_embed(vit.patch_embed(images))
        x = vit.norm_pre(vit.patch_drop(x))
        return vit.blocks(x)


def split_trunk(backbone: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(shared, tail): the part every MGN branch shares and the part each branch copies.

    ResNet: shared = stem + layer1 + layer2 + layer3[0], tail = layer3[1:] + layer4 (MGN).
    ViT: shared = patch embedding + all blocks but the last, tail = last block + final norm
    (as TransReID's branches copy the last block).

    Raises:
        ModelError: any other backbone.
    """
    if is_resnet(backbone):
        stem, layer1, layer2, layer3, layer4 = resnet_stages(backbone)
        return (nn.Sequential(stem, layer1, layer2, layer3[0]),
                nn.Sequential(layer3[1:], layer4))
    if is_vit(backbone) and len(backbone.blocks) >= 2:
        tail = nn.Sequential(backbone.blocks[-1], backbone.norm)
        return _ViTShared(backbone), tail
    raise ModelError(
        f"model.arch=mgn needs a ResNet-family (layer1..layer4) or ViT-style (blocks) "
        f"backbone, got {type(backbone).__name__}"
    )


class MGNModel(PartModel):
    """Multiple Granularity Network; see the module docstring.

    Branch names: `b{i}_global` (metric losses), `b{i}_part{j}` (ID loss only), one branch
    per `model.parts` entry i, cells j row-major.

    Args:
        config: `model.parts`, `model.part_dim`, pooling, head, backbone...
        num_classes: training identities N.
        input_size: (H, W) of the images.
    """

    def __init__(self, config: ModelConfig, num_classes: int,
                 input_size: tuple[int, int] = DEFAULT_INPUT_SIZE):
        super().__init__()
        _check_common(config, num_classes)
        if not config.parts:
            raise ModelError("model.parts is empty: list the branch splits, e.g. [1, 2, 3]")
        self.config, self.num_classes = config, num_classes
        self.splits = [parse_split(p) for p in config.parts]
        backbone = build_backbone(config, input_size)
        width = backbone.num_features
        shared, tail = split_trunk(backbone)
        self.shared = shared
        self.trunks = nn.ModuleList()
        for rows, cols in self.splits:
            trunk = copy_module(tail)
            if is_resnet(backbone) and (rows * cols > 1 or config.last_stride == 1):
                set_stage_stride_1(trunk[1])  # part branches keep layer4 at stride 1
            self.trunks.append(trunk)
        self.pools = nn.ModuleList(_pooling(config, width) for _ in self.splits)
        names, in_dims = [], []
        for i, ((rows, cols), pool) in enumerate(zip(self.splits, self.pools)):
            cells = rows * cols if rows * cols > 1 else 0  # "1" = the global feature only
            names += [(f"b{i}_global", True)] + [(f"b{i}_part{j}", False) for j in range(cells)]
            in_dims += [pool.out_dim] * (1 + cells)
        self.parts_head = PartHeads(config, in_dims, num_classes)
        self.branches = tuple(BranchSpec(n, config.part_dim, metric) for n, metric in names)
        self._vit = is_vit(backbone)  # tokens are laid out by `self.shared.vit`'s patch grid

    def pooled(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The pooled features (B, C) of every branch, global first, in `branches` order."""
        height, width = images.shape[2:]
        shared = self.shared(images)
        out = []
        for trunk, pool, (rows, cols) in zip(self.trunks, self.pools, self.splits):
            x = trunk(shared)
            if self._vit:  # tokens (B, N, C) -> (B, C, gh, gw)
                x = feature_map(self.shared.vit, x, height, width)
            out.append(pool(x))
            if rows * cols > 1:
                out.extend(pool(cell) for cell in split_map(x, rows, cols))
        return out

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.shared.parameters()
        yield from self.trunks.parameters()


class RefinedPartPooling(nn.Module):
    """RPP: a part classifier on each column vector f of the map, P(part | f) = softmax(W f),
    and part i's feature = sum_f P(i | f) f / sum_f P(i | f) (a weighted average)."""

    def __init__(self, channels: int, parts: int):
        super().__init__()
        self.classifier = nn.Conv2d(channels, parts, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, parts, C)
        prob = self.classifier(x).flatten(2).softmax(dim=1)  # (B, parts, N)
        weighted = prob @ x.flatten(2).transpose(1, 2)  # (B, parts, C)
        return weighted / prob.sum(dim=2, keepdim=True).clamp(min=1e-6)


class PCBModel(PartModel):
    """Part-based Convolutional Baseline (+ RPP); see the module docstring.

    Args:
        config: `model.pcb_stripes`, `model.pcb_rpp`, `model.part_dim`, pooling, head...
        num_classes: training identities N.
        input_size: (H, W) of the images.
    """

    def __init__(self, config: ModelConfig, num_classes: int,
                 input_size: tuple[int, int] = DEFAULT_INPUT_SIZE):
        super().__init__()
        _check_common(config, num_classes)
        stripes = config.pcb_stripes
        if stripes < 1:
            raise ModelError(f"model.pcb_stripes={stripes} must be >= 1")
        if config.pcb_rpp and config.pooling != "avg":
            raise ModelError(
                f"model.pcb_rpp pools by soft part weights (a weighted average): it needs "
                f"model.pooling=avg, got {config.pooling!r}"
            )
        self.config, self.num_classes, self.stripes = config, num_classes, stripes
        self.backbone = build_backbone(config, input_size)
        if config.last_stride == 1:
            set_last_stride_1(self.backbone)
        width = self.backbone.num_features
        self.pool = _pooling(config, width)
        self.rpp = RefinedPartPooling(width, stripes) if config.pcb_rpp else None
        self.parts_head = PartHeads(config, [self.pool.out_dim] * stripes, num_classes)
        self.branches = tuple(BranchSpec(f"stripe{i}", config.part_dim, metric=False)
                              for i in range(stripes))

    def pooled(self, images: torch.Tensor) -> list[torch.Tensor]:
        """One pooled (B, C) feature per stripe, top to bottom."""
        x = feature_map(self.backbone, self.backbone.forward_features(images),
                        *images.shape[2:])
        if self.rpp is not None:
            return list(self.rpp(x).unbind(dim=1))
        return [self.pool(stripe) for stripe in split_map(x, self.stripes, 1)]


# Architectures by `model.arch`: a new one is a ReidModel subclass and one entry here.
ARCHS: dict[str, type[ReidModel]] = {"bot": BoTModel, "mgn": MGNModel, "pcb": PCBModel}


def build_model(config: ModelConfig, num_classes: int,
                input_size: tuple[int, int] = DEFAULT_INPUT_SIZE) -> ReidModel:
    """Build the model described by `config` (`model.arch`) with `num_classes` identities.

    Args:
        input_size: (H, W) of the images it will see (`data.height`, `data.width`);
            transformers are built for it, part models check their maps can be cut.

    Raises:
        ModelError: an unknown architecture or a setting the architecture cannot build.
    """
    if config.arch not in ARCHS:
        raise ModelError(f"model.arch={config.arch!r}; choose one of {sorted(ARCHS)}")
    return ARCHS[config.arch](config, num_classes, tuple(input_size))


def check_model(config: ModelConfig, input_size: tuple[int, int] = DEFAULT_INPUT_SIZE) -> None:
    """Build the model and run one image through it on the meta device (no memory, no
    weights), so a setting the model cannot take fails in the driver with its clear error
    rather than in every Ray worker.

    Raises:
        ModelError: e.g. `model.ibn` on a ViT, MGN parts that do not fit the feature map.
    """
    import dataclasses

    meta_config = dataclasses.replace(config, pretrained="")  # weights are not needed here
    with torch.device("meta"):
        model = build_model(meta_config, 2, input_size)
        model.eval()(torch.empty(1, 3, *input_size))
