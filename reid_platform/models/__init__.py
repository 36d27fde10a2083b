"""Re-identification models: one interface for every architecture.

- `core`: the contract (`ReidModel`, `ReidOutput`, `BranchOutput`, `BranchSpec`,
  `concat_embedding`);
- `backbones`: timm backbones with ImageNet weights (local file or timm's hub cache), IBN-a/b,
  non-local blocks, transformers at re-ID input sizes with overlapping patches, ResNet stages;
- `pooling`: avg, max, GeM, NetVLAD;
- `heads`: linear, CosFace, ArcFace;
- `archs`: BoT, MGN, PCB, and `build_model(config, num_classes, input_size=(H, W))`.
"""

from reid_platform.models.archs import (
    ARCHS,
    BoTModel,
    MGNModel,
    PCBModel,
    RefinedPartPooling,
    build_model,
    check_model,
    parse_split,
    split_map,
)
from reid_platform.models.backbones import (
    IBN,
    TIMM_HUB,
    NonLocalBlock,
    apply_ibn,
    build_backbone,
    check_backbone,
    create_backbone,
    insert_non_local,
    resnet_stages,
    set_last_stride_1,
    set_patch_stride,
)
from reid_platform.models.core import (
    FEATURES,
    BranchOutput,
    BranchSpec,
    ModelError,
    ReidModel,
    ReidOutput,
    concat_embedding,
)
from reid_platform.models.heads import HEADS, ArcFaceHead, CosFaceHead, LinearHead
from reid_platform.models.pooling import POOLINGS, GeM, NetVLAD, build_pooling

__all__ = [
    "ARCHS", "FEATURES", "HEADS", "IBN", "POOLINGS", "TIMM_HUB", "ArcFaceHead", "BoTModel",
    "BranchOutput", "BranchSpec", "CosFaceHead", "GeM", "LinearHead", "MGNModel", "ModelError",
    "NetVLAD", "NonLocalBlock", "PCBModel", "RefinedPartPooling", "ReidModel", "ReidOutput",
    "apply_ibn", "build_backbone", "build_model", "build_pooling", "check_backbone", "check_model",
    "concat_embedding", "create_backbone", "insert_non_local", "parse_split", "resnet_stages",
    "set_last_stride_1", "set_patch_stride", "split_map",
]
