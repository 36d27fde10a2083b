"""Embed query and gallery images with a model and score them under the Market protocol."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from reid_platform.data.dataset import ImageDataset, collate_skip_corrupt
from reid_platform.data.formats import Sample
from reid_platform.data.transforms import build_eval_transform
from reid_platform.evaluation.metrics import RankResult, evaluate_features


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
