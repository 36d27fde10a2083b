"""Embed query and gallery images with a model, score them under the Market protocol, and
read where the model looks (activation maps)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from reid_platform.data.dataset import (
    ImageDataset,
    ImageDecodeError,
    collate_skip_corrupt,
    read_image,
)
from reid_platform.data.formats import Sample
from reid_platform.data.transforms import build_eval_transform
from reid_platform.evaluation.metrics import EvaluationError, RankResult, evaluate_features


@dataclass
class Features:
    """Embeddings of a list of samples; corrupt images are left out and listed."""

    feats: np.ndarray  # (N, D) float32, L2-normalised
    pids: np.ndarray  # (N,)
    camids: np.ndarray  # (N,)
    indices: np.ndarray  # (N,) positions in the input sample list
    skipped: list[str] = field(default_factory=list)


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    height: int,
    width: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    amp: bool = False,
    progress: bool = False,
    desc: str = "embedding",
) -> Features:
    """Run `model.embed` over samples in batches (model put in eval mode).

    Returns:
        Features with L2-normalised (N, D) float32 embeddings.
    """
    model.eval()
    dataset = ImageDataset(samples, build_eval_transform(height, width))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collate_skip_corrupt,
    )
    device = torch.device(device)
    feats, pids, camids, indices, skipped = [], [], [], [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        skipped.extend(batch["skipped"])
        if batch["image"] is None:
            continue
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            emb = model.embed(batch["image"].to(device, non_blocking=True))
        feats.append(emb.float().cpu().numpy())
        pids.append(batch["pid"].numpy())
        camids.append(batch["camid"].numpy())
        indices.append(batch["index"].numpy())
    if not feats:
        raise ValueError(f"none of the {len(samples)} images could be decoded ({desc})")
    return Features(
        feats=np.concatenate(feats).astype(np.float32),
        pids=np.concatenate(pids),
        camids=np.concatenate(camids),
        indices=np.concatenate(indices),
        skipped=skipped,
    )


def evaluate_model(
    model: torch.nn.Module,
    query: Sequence[Sample],
    gallery: Sequence[Sample],
    height: int,
    width: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    amp: bool = False,
    metric: str = "cosine",
) -> tuple[RankResult, int]:
    """Embed query and gallery and evaluate in query blocks (no full distance matrix).

    Returns:
        (result, number of images that could not be decoded and were left out).
    """
    kwargs = dict(height=height, width=width, batch_size=batch_size, device=device,
                  num_workers=num_workers, amp=amp)
    q = extract_features(model, query, desc="query", **kwargs)
    g = extract_features(model, gallery, desc="gallery", **kwargs)
    result = evaluate_features(q.feats, g.feats, q.pids, g.pids, q.camids, g.camids, metric)
    return result, len(q.skipped) + len(g.skipped)


# ---- activation maps ----------------------------------------------------------------------


def _feature_energy(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Sum over channels of the squared last feature map, per location: (B, h, w).

    CNNs give (B, C, h, w) maps (NHWC for backbones whose `output_fmt` says so); vision
    transformers give (B, T, C) tokens, read as the squared norm of each patch token on the
    patch grid (class and other prefix tokens dropped).

    Raises:
        EvaluationError: the backbone's output is neither.
    """
    maps = backbone.forward_features(images)
    if maps.ndim == 4:
        channel_dim = 3 if getattr(backbone, "output_fmt", "NCHW") == "NHWC" else 1
        return (maps.float() ** 2).sum(dim=channel_dim)
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    if maps.ndim == 3 and grid is not None:
        tokens = maps[:, getattr(backbone, "num_prefix_tokens", 0) :]  # (B, h*w, C)
        if tokens.shape[1] == grid[0] * grid[1]:
            return (tokens.float() ** 2).sum(dim=2).reshape(len(maps), *grid)
    raise EvaluationError(
        f"--activation-maps: the backbone {type(backbone).__name__} gives features of shape "
        f"{tuple(maps.shape)}, neither a (B, C, h, w) map nor patch tokens on a grid; "
        "activation maps are not supported for it"
    )


@torch.no_grad()
def activation_maps(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    height: int,
    width: int,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Where the model looks: the energy of its backbone's last feature map over each image.

    As the public re-ID toolkits draw them: per location the sum over channels of the squared
    activations (`model.backbone.forward_features`), upsampled bilinearly to the input size
    and scaled to [0, 1] per image.

    Args:
        model: a model with `backbone.forward_features` (put in eval mode here).
        samples: the images (path, optional box).
        height, width: the model's input size.
        device: where the model is.

    Returns:
        images: (N, height, width, 3) uint8, the inputs resized; maps: (N, height, width)
        float32 in [0, 1].

    Raises:
        EvaluationError: the model has no backbone feature map, or an image cannot be read.
    """
    backbone = getattr(model, "backbone", None)
    if not callable(getattr(backbone, "forward_features", None)):
        raise EvaluationError(
            f"--activation-maps: model {type(model).__name__} has no backbone.forward_features"
        )
    model.eval()
    transform = build_eval_transform(height, width)
    pictures, tensors = [], []
    for sample in samples:
        try:
            array = read_image(sample.path, sample.box)
        except ImageDecodeError as err:
            raise EvaluationError(f"--activation-maps: {err}") from None
        pictures.append(
            np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR))
        )
        tensors.append(transform(image=array)["image"])
    device = torch.device(device)
    energy = _feature_energy(backbone, torch.stack(tensors).to(device))  # (N, h, w)
    maps = F.interpolate(energy[:, None], size=(height, width), mode="bilinear")[:, 0]
    flat = maps.reshape(len(maps), -1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    maps = (maps - low[:, None, None]) / (high - low).clamp_min(1e-12)[:, None, None]
    return np.stack(pictures), maps.cpu().numpy().astype(np.float32)
