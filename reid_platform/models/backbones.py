"""Backbones: timm models with ImageNet weights, made fit for re-identification.

`build_backbone(config, input_size)` is the one way every architecture gets its feature
extractor:

1. `timm.create_model(name, num_classes=0)`; transformers (ViT, DeiT, Swin, ...) are built for
   the re-ID input size (`img_size=(H, W)`).
2. ImageNet weights (`model.pretrained`): a local file, or `timm` = timm's own hub cache
   (online, or offline from a cache prepared beforehand with `HF_HUB_OFFLINE=1`). timm's
   loader adapts them to the model, e.g. it resamples a ViT's 14x14 position embeddings to
   the re-ID grid.
3. Modifiers, applied after the weights so that every ImageNet weight keeps its place:
   last stride 1 (ResNets), IBN-a / IBN-b (`model.ibn`), non-local blocks
   (`model.non_local`), overlapping patches (`model.patch_stride`, with the position
   embeddings resampled once more to the finer grid).

`resnet_stages(backbone)` exposes a timm ResNet as `[stem, layer1, layer2, layer3, layer4]`
(modules of the backbone itself, not copies): MGN cuts the network there, and a model with
modality-specific shallow layers copies the first stages per modality.
"""

from __future__ import annotations

import copy
import difflib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from reid_platform.config import ModelConfig
from reid_platform.models.core import ModelError
from reid_platform.torchvision_guard import ensure_torchvision_importable

ensure_torchvision_importable()
import timm  # noqa: E402  (needs the guard first on CPU-only torch)
from timm.layers import resample_abs_pos_embed  # noqa: E402
from timm.models.resnet import ResNet  # noqa: E402

# `model.pretrained` value that asks for timm's own (hub-cached) ImageNet weights.
TIMM_HUB = "timm"
# An ImageNet classifier is dropped on purpose (num_classes=0): never reported as unplaced.
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.")
DEFAULT_INPUT_SIZE = (256, 128)


def check_backbone(name: str) -> None:
    """Raise ModelError, listing similar names, unless `name` is a timm model."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=6,
                                          cutoff=0.5)
        hint = f"similar names: {close} (did you mean {close[0]!r}?)" if close else (
            "see timm.list_models()")
        raise ModelError(f"model.backbone={name!r} is not a timm model; {hint}")


def is_transformer(name: str) -> bool:
    """Whether timm builds `name` for one fixed input size (ViT, DeiT, Swin, ...)."""
    cfg = timm.models.get_pretrained_cfg(name)
    return bool(cfg is not None and getattr(cfg, "fixed_input_size", False))


def hub_instructions(name: str) -> str:
    """How to put `name`'s ImageNet weights into timm's hub cache for offline use."""
    return (
        "prepare the cache on a machine that is online: python -c \"import reid_platform, "
        f"timm; timm.create_model('{name}', pretrained=True)\" (the cache is "
        "$HF_HOME/hub, default ~/.cache/huggingface/hub; copy it to the same place, or set "
        "HF_HOME, on the offline machines), then run with HF_HUB_OFFLINE=1"
    )


def create_backbone(name: str, pretrained: str = "",
                    input_size: tuple[int, int] | None = None) -> nn.Module:
    """A timm feature extractor (`num_classes=0`), with ImageNet weights if asked.

    Args:
        name: any timm model name, e.g. resnet50, resnet50_gn, seresnext50_32x4d, vit_small_*.
        pretrained: "" (random init), a path to a weights file (.pth/.bin/.safetensors), or
            "timm" (timm's hub cache; offline with HF_HUB_OFFLINE=1 once it is prepared).
        input_size: (H, W) the model will see; transformers are built for it (CNNs take any).

    Raises:
        ModelError: unknown model name, missing weights file, weights not in the offline cache.
    """
    check_backbone(name)
    kwargs: dict = {"num_classes": 0}
    if input_size is not None and is_transformer(name):
        kwargs["img_size"] = tuple(input_size)
    if not pretrained:
        return timm.create_model(name, **kwargs)
    if pretrained == TIMM_HUB:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:  # hub/network errors come in many types
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            why = "is not in timm's hub cache" if offline else "could not be downloaded"
            raise ModelError(
                f"model.pretrained=timm: the ImageNet weights of {name} {why} "
                f"({type(err).__name__}: {str(err)[:200]}); {hub_instructions(name)}"
            ) from None
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ModelError(f"model.pretrained={pretrained!r}: no such weights file")
    try:
        raw = timm.models.load_state_dict(str(path))
    except Exception as err:  # torch/safetensors raise many types for a damaged file
        raise ModelError(f"model.pretrained={pretrained!r}: cannot read weights ({err})") from None
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
    )
    # Tensors timm could not place (e.g. IBN-Net's own bn1.IN / bn1.BN) may fit the model
    # once the modifiers have run: `build_backbone` loads them then.
    own = model.state_dict()
    rest = {k: v for k, v in raw.items()
            if k not in own and not k.startswith(CLASSIFIER_PREFIXES)}
    if rest:
        model.pending_weights = (str(path), rest)
    return model


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> int:
    """Copy every entry of `state` whose name and shape match `module`'s; warn about the
    others (an ImageNet classifier is expected to be left out).

    Returns:
        the number of tensors loaded.
    """
    own = module.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    module.load_state_dict(matched, strict=False)
    left = sorted(k for k in set(state) - set(matched) if not k.startswith(CLASSIFIER_PREFIXES))
    if left:
        warnings.warn(
            f"model.pretrained={source}: {len(left)} tensors of the file fit no tensor of the "
            f"model by name and shape and were not loaded (e.g. {left[:3]})",
            stacklevel=2,
        )
    return len(matched)


# ---- ResNet anatomy ----------------------------------------------------------------------


def is_resnet(backbone: nn.Module) -> bool:
    """A timm ResNet-family model (ResNet, ResNet-D, ResNeXt, SE-ResNet(X), ECA-ResNet...)."""
    return isinstance(backbone, ResNet)


def resnet_stages(backbone: nn.Module) -> list[nn.Module]:
    """`[stem, layer1, layer2, layer3, layer4]` of a timm ResNet; each maps a map to a map.

    The stem is a new `nn.Sequential` over the backbone's own conv1/bn1/act1/maxpool (the
    same parameters); the stages are the backbone's modules.

    Raises:
        ModelError: the backbone is not ResNet-shaped.
    """
    if not is_resnet(backbone):
        raise ModelError(
            f"{type(backbone).__name__} is not a timm ResNet-family backbone (layer1..layer4)"
        )
    stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.act1, backbone.maxpool)
    return [stem, backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]


def set_stage_stride_1(stage: nn.Module) -> None:
    """Remove the downsampling of a ResNet stage (its first block's strided conv/pool)."""
    first_block = stage[0]
    for module in first_block.modules():
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (1, 1)
        elif isinstance(module, nn.AvgPool2d) and module.stride in (2, (2, 2)):
            module.kernel_size, module.stride = 1, 1  # ResNet-D average-pool downsampling


def set_last_stride_1(backbone: nn.Module) -> bool:
    """Remove the stride of the last ResNet stage (16x8 maps at 256x128 instead of 8x4).

    Returns:
        True if the backbone has a ResNet `layer4` and it was changed.
    """
    layer4 = getattr(backbone, "layer4", None)
    if layer4 is None:
        return False
    set_stage_stride_1(layer4)
    return True


# ---- IBN-Net ---------------------------------------------------------------------------------


class IBN(nn.Module):
    """Instance-Batch Normalisation (Pan et al., ECCV 2018): InstanceNorm on the first
    `half` channels, BatchNorm on the rest. Names `IN` and `BN` as in IBN-Net's release, so
    its weight files load by name."""

    def __init__(self, channels: int, ratio: float = 0.5):
        super().__init__()
        self.half = int(channels * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(channels - self.half)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> IBN:
        """An IBN whose halves start from `bn`'s ImageNet affine parameters and statistics."""
        ibn = cls(bn.num_features)
        with torch.no_grad():
            ibn.IN.weight.copy_(bn.weight[: ibn.half])
            ibn.IN.bias.copy_(bn.bias[: ibn.half])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(ibn.BN, name).copy_(getattr(bn, name)[ibn.half:])
            ibn.BN.num_batches_tracked.copy_(bn.num_batches_tracked)
        return ibn

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w)
        first, rest = x[:, : self.half], x[:, self.half:]
        return torch.cat([self.IN(first.contiguous()), self.BN(rest.contiguous())], dim=1)


class InstanceNormThen(nn.Module):
    """IBN-b's InstanceNorm after the residual sum, then the block's own activation."""

    def __init__(self, channels: int, act: nn.Module):
        super().__init__()
        self.IN = nn.InstanceNorm2d(channels, affine=True)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.IN(x))


def _instance_norm_from(bn: nn.BatchNorm2d) -> nn.InstanceNorm2d:
    norm = nn.InstanceNorm2d(bn.num_features, affine=True)
    with torch.no_grad():
        norm.weight.copy_(bn.weight)
        norm.bias.copy_(bn.bias)
    return norm


def _block_out_channels(block: nn.Module) -> int:
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return last_bn.num_features


def apply_ibn(backbone: nn.Module, mode: str) -> None:
    """Turn a timm ResNet-family backbone into its IBN-a or IBN-b variant, in place.

    IBN-a: the first BatchNorm of every block of stages 1-3 becomes IBN (InstanceNorm on half
    the channels). IBN-b (as in IBN-Net's reference implementation): the stem's BatchNorm
    becomes an InstanceNorm, and an InstanceNorm follows the residual sum of the last block of
    stages 1 and 2. The replaced norms start from the BatchNorms' ImageNet parameters.

    Raises:
        ModelError: mode is not "a"/"b", or the backbone is not ResNet-shaped.
    """
    if mode not in ("a", "b"):
        raise ModelError(f"model.ibn={mode!r}; choose one of ['none', 'a', 'b']")
    if not is_resnet(backbone):
        raise ModelError(
            f"model.ibn={mode} needs a timm ResNet-family backbone (resnet*, resnext*, "
            f"seresnet*, ...), got {type(backbone).__name__}"
        )
    if mode == "a":
        for stage in (backbone.layer1, backbone.layer2, backbone.layer3):
            for block in stage:
                block.bn1 = IBN.from_batchnorm(block.bn1)
        return
    backbone.bn1 = _instance_norm_from(backbone.bn1)
    for stage in (backbone.layer1, backbone.layer2):
        block = stage[-1]
        act_name = "act3" if hasattr(block, "act3") else "act2"
        setattr(block, act_name,
                InstanceNormThen(_block_out_channels(block), getattr(block, act_name)))


# ---- non-local blocks ------------------------------------------------------------------------


class NonLocalBlock(nn.Module):
    """Non-local block (Wang et al., CVPR 2018), dot-product form as in fast-reid's R50-NL.

    z = x + W(y), y_i = 1/N sum_j (theta(x_i) . phi(x_j)) g(x_j); W is a 1x1 conv + BN whose
    BN starts at zero, so an inserted block is the identity until it learns something.
    """

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        inner = max(channels // reduction, 1)
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.W = nn.Sequential(nn.Conv2d(inner, channels, 1), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w)
        b, _, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (B, N, C')
        phi = self.phi(x).flatten(2)  # (B, C', N)
        g = self.g(x).flatten(2).transpose(1, 2)  # (B, N, C')
        attention = (theta @ phi) / (h * w)  # (B, N, N)
        y = (attention @ g).transpose(1, 2).reshape(b, -1, h, w)  # (B, C', h, w)
        return x + self.W(y)


def insert_non_local(backbone: nn.Module, counts: Sequence[int]) -> None:
    """Insert counts[s] non-local blocks after the last counts[s] blocks of stage s + 1.

    Args:
        counts: four numbers, e.g. (0, 2, 3, 0) as in fast-reid's R50-NL.

    Raises:
        ModelError: not four counts, a count above the stage's depth, or not a ResNet.
    """
    if len(counts) != 4:
        raise ModelError(f"model.non_local={list(counts)} must list 4 counts (stages 1-4)")
    if not is_resnet(backbone):
        raise ModelError(
            f"model.non_local needs a timm ResNet-family backbone, got {type(backbone).__name__}"
        )
    for index, count in enumerate(counts):
        stage = getattr(backbone, f"layer{index + 1}")
        if not 0 <= count <= len(stage):
            raise ModelError(
                f"model.non_local[{index}]={count}: stage {index + 1} has {len(stage)} blocks"
            )
        for position in range(len(stage) - count, len(stage)):
            block = stage[position]
            stage[position] = nn.Sequential(block, NonLocalBlock(_block_out_channels(block)))


# ---- transformers ------------------------------------------------------------------------


def is_vit(backbone: nn.Module) -> bool:
    """A timm ViT-style model: a patch embedding, absolute position embeddings, blocks."""
    return all(hasattr(backbone, a) for a in ("patch_embed", "pos_embed", "blocks"))


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def token_grid(backbone: nn.Module, height: int, width: int) -> tuple[int, int]:
    """(gh, gw): the patch grid a ViT-style backbone makes of an (height, width) image."""
    proj = backbone.patch_embed.proj
    return (_conv_out(height, proj.kernel_size[0], proj.stride[0], proj.padding[0]),
            _conv_out(width, proj.kernel_size[1], proj.stride[1], proj.padding[1]))


def set_patch_stride(backbone: nn.Module, stride: int) -> None:
    """Overlapping patches (TransReID): the patch convolution steps by `stride` < patch size;
    the position embeddings are resampled to the finer grid.

    Raises:
        ModelError: not a ViT-style backbone, or a stride outside 1..patch size.
    """
    if not is_vit(backbone) or backbone.pos_embed is None:
        raise ModelError(
            "model.patch_stride applies to ViT-style backbones (patch embedding + absolute "
            f"position embeddings: vit_*, deit_*), got {type(backbone).__name__}"
        )
    embed = backbone.patch_embed
    patch = embed.proj.kernel_size
    if not 1 <= stride <= min(patch):
        raise ModelError(f"model.patch_stride={stride} must be in 1..{min(patch)} (patch size)")
    old_grid = tuple(embed.grid_size)
    embed.proj.stride = (stride, stride)
    new_grid = token_grid(backbone, *embed.img_size)
    prefix = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
    with torch.no_grad():
        resampled = resample_abs_pos_embed(
            backbone.pos_embed.data, new_size=list(new_grid), old_size=list(old_grid),
            num_prefix_tokens=prefix,
        )
    backbone.pos_embed = nn.Parameter(resampled)
    embed.grid_size, embed.num_patches = new_grid, new_grid[0] * new_grid[1]


def feature_map(backbone: nn.Module, features: torch.Tensor, height: int,
                width: int) -> torch.Tensor:
    """The backbone's `forward_features` output as a (B, C, h, w) map.

    CNN maps pass through; channels-last maps (Swin) are permuted; ViT tokens (B, N, C) lose
    their prefix (class/register) tokens and are laid out on their patch grid.
    """
    if features.ndim == 4:
        if getattr(backbone, "output_fmt", "NCHW") == "NHWC":
            return features.permute(0, 3, 1, 2)
        return features
    if not is_vit(backbone):
        raise ModelError(f"cannot lay out the tokens of {type(backbone).__name__} as a map")
    gh, gw = token_grid(backbone, height, width)
    tokens = features[:, getattr(backbone, "num_prefix_tokens", 0):]  # (B, gh*gw, C)
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)


# ---- the builder ---------------------------------------------------------------------------


def build_backbone(config: ModelConfig,
                   input_size: tuple[int, int] = DEFAULT_INPUT_SIZE) -> nn.Module:
    """The configured backbone: timm model, ImageNet weights, then the modifiers (see the
    module docstring). `model.last_stride` is left to the architecture (MGN sets it per
    branch).

    Raises:
        ModelError: a modifier the backbone cannot take, or unusable weights.
    """
    backbone = create_backbone(config.backbone, config.pretrained, input_size)
    pending = getattr(backbone, "pending_weights", None)
    if config.ibn != "none":
        apply_ibn(backbone, config.ibn)
    if any(config.non_local):
        insert_non_local(backbone, config.non_local)
    if config.patch_stride:
        set_patch_stride(backbone, config.patch_stride)
    if pending is not None:
        del backbone.pending_weights
        load_matching(backbone, pending[1], pending[0])
    return backbone


def copy_module(module: nn.Module) -> nn.Module:
    """An independent copy (own parameters) of a backbone part, for a branch of its own."""
    return copy.deepcopy(module)
