"""Embedding runtimes: decoded images -> L2-normalised embeddings, for the service and jobs.

    images (list of (H, W, 3) uint8 RGB, any sizes) --resize + normalise (the eval transform,
    the checkpoint's input size)--> (B, 3, H, W) --runtime--> (B, D) float32, L2-normalised

A runtime is one class with `embed(images, flip=False) -> (B, D)` and `info() -> dict`, listed
in `RUNTIMES`; `make_embedder(runtime, checkpoint, ...)` is what the Serve Embedder deployment and
the offline jobs call. "torch" runs the checkpoint's model with PyTorch; "onnx" runs its ONNX
export (`reid_platform.retrieval.export`) with ONNX Runtime, exporting it first when there is
no current `model.onnx` beside the checkpoint.

Flip test-time augmentation (`flip=True`): the embedding of an image is the normalised mean of
the embeddings of the image and its horizontal mirror, computed as one batch of 2B.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from reid_platform.checkpoint import checkpoint_file, load_model
from reid_platform.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from reid_platform.runtime import resolve_device

TTA_MODES = ("none", "flip")
AUGMENT_MODES = ("none", "flip")  # gallery augmentation: extra views indexed per item


def embed_views(model: torch.nn.Module, batch: torch.Tensor,
                modality: torch.Tensor | None = None, feature: str = "post_bn") -> torch.Tensor:
    """`model.embed` of a preprocessed batch (B, 3, H, W) and of its horizontal mirror, as one
    forward pass of 2B: (2, B, D) float32, each row L2-normalised ([0] the batch, [1] the
    mirror). Flip TTA (`embed_tensor`), gallery augmentation (`jobs/build_index.py --augment`)
    and `jobs/evaluate.py --tta flip` all embed the mirror through this. `modality` (B,) and
    `feature` as `ReidModel.embed` takes them (cross-modal models; pre/post-BNNeck)."""
    with torch.inference_mode():
        images = torch.cat([batch, batch.flip(-1)])
        if modality is None and feature == "post_bn":
            both = model.embed(images)  # any embedder's call shape
        else:
            both = model.embed(images, None if modality is None else modality.repeat(2), feature)
        return both.float().view(2, len(batch), -1)  # (2B, D) -> (2, B, D)


def flip_mean(views: torch.Tensor) -> torch.Tensor:
    """Flip TTA of `embed_views`' (2, B, D): the normalised mean of the two views, (B, D)."""
    return torch.nn.functional.normalize(views[0] + views[1], dim=1)


def embed_tensor(model: torch.nn.Module, batch: torch.Tensor, flip: bool = False) -> np.ndarray:
    """`model.embed` of a preprocessed batch (B, 3, H, W) on the model's device: (B, D)
    float32, L2-normalised; with `flip`, the normalised mean with the mirrored batch's."""
    if flip:
        return flip_mean(embed_views(model, batch)).cpu().numpy()
    with torch.inference_mode():
        return model.embed(batch).float().cpu().numpy()


def embed_onnx(embedder: Any, batch: np.ndarray, flip: bool = False) -> np.ndarray:
    """`OnnxEmbedder` on a preprocessed batch (B, 3, H, W) float32: (B, D) float32,
    L2-normalised; with `flip`, the normalised mean with the mirrored batch's (one run of 2B,
    as `embed_tensor`)."""
    if not flip:
        return embedder(batch)
    both = embedder(np.concatenate([batch, batch[..., ::-1]]))  # (2B, D)
    mean = both[: len(batch)] + both[len(batch) :]
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


class ImageEmbedder(Protocol):
    """What every runtime provides."""

    embedding_dim: int
    input_size: tuple[int, int]  # (height, width) the model expects

    def embed(self, images: list[np.ndarray], flip: bool = False) -> np.ndarray: ...

    def info(self) -> dict[str, Any]: ...


class _BatchEmbedder:
    """`embed` shared by the runtimes: decoded images -> `preprocess` -> `embed_batch`."""

    embedding_dim: int

    def preprocess(self, images: list[np.ndarray]) -> Any:
        raise NotImplementedError

    def embed_batch(self, batch: Any, flip: bool = False) -> np.ndarray:
        raise NotImplementedError

    def embed(self, images: list[np.ndarray], flip: bool = False) -> np.ndarray:
        """Embeddings of decoded images: (B, D) float32, L2-normalised.

        Args:
            images: B arrays (H_i, W_i, 3) uint8 RGB.
            flip: average each image's embedding with its horizontal mirror's.
        """
        if not images:
            return np.empty((0, self.embedding_dim), np.float32)
        return self.embed_batch(self.preprocess(images), flip)


class TorchEmbedder(_BatchEmbedder):
    """The checkpoint's model in PyTorch (eval mode, inference_mode), on `device`.

    Args:
        checkpoint: checkpoint directory or its model file.
        device: "auto" (first GPU when present), "cpu", "cuda", "cuda:N".
        num_threads: torch intra-op threads on CPU (the CPUs the caller was given); None
            leaves torch's setting alone.
    """

    runtime = "torch"

    def __init__(
        self, checkpoint: str | Path, device: str = "auto", num_threads: int | None = None
    ):
        if num_threads is not None:
            torch.set_num_threads(max(1, int(num_threads)))
        self.checkpoint = str(checkpoint_file(checkpoint))
        self.device = resolve_device(device)
        self.model, config = load_model(self.checkpoint, self.device)
        self.backbone = config.model.backbone
        self.input_size = (int(config.data.height), int(config.data.width))
        self.embedding_dim = int(self.model.embedding_dim)
        self.transform = build_eval_transform(*self.input_size)

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """(H_i, W_i, 3) uint8 RGB images -> (B, 3, H, W) float32, resized and normalised."""
        return torch.stack([self.transform(image=image)["image"] for image in images])

    def embed_batch(self, batch: torch.Tensor, flip: bool = False) -> np.ndarray:
        """(B, 3, H, W) preprocessed -> (B, D) float32, L2-normalised (`embed_tensor`)."""
        return embed_tensor(self.model, batch.to(self.device), flip)

    def info(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "checkpoint": self.checkpoint,
            "backbone": self.backbone,
            "dim": self.embedding_dim,
            "device": str(self.device),
            "input_size": list(self.input_size),
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "threads": torch.get_num_threads(),
        }


class OnnxRuntimeEmbedder(_BatchEmbedder):
    """The checkpoint's ONNX export under ONNX Runtime (`export.OnnxEmbedder`).

    The export is `model.onnx` beside the checkpoint; a missing or stale one (another
    checkpoint's weights) is exported first, parity-checked against PyTorch on the
    checkpoint's query images (`export.ensure_onnx`). Preprocessing is the torch runtime's
    (the eval transform at the export's input size), so both give the same embeddings within
    the export's parity bound (1e-4).

    Args:
        checkpoint: checkpoint directory or its model file.
        device: "auto" (TensorRT / CUDA first when a GPU is visible), "cpu" (the CPU provider
            only), "cuda", "cuda:N" (a GPU must exist; ONNX Runtime's GPU build runs it).
        num_threads: ONNX Runtime intra-op threads (the CPUs the caller was given); None:
            this process's CPUs (a Ray actor's CPU share).
        onnx_path: run this export instead of the one beside the checkpoint (it must be a
            current export of the checkpoint).
    """

    runtime = "onnx"

    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "auto",
        num_threads: int | None = None,
        onnx_path: str | Path | None = None,
    ):
        from reid_platform.retrieval.export import (
            ExportError,
            OnnxEmbedder,
            ensure_onnx,
            is_current,
        )

        self.checkpoint = str(checkpoint_file(checkpoint))
        if onnx_path is None:
            onnx_path = ensure_onnx(self.checkpoint)
        elif not is_current(onnx_path, self.checkpoint):
            raise ExportError(
                f"{onnx_path}: not a current ONNX export of {self.checkpoint} (other weights, or "
                "not exported by reid-platform); export it with jobs/export.py"
            )
        self.onnx_path = str(onnx_path)
        providers = None
        if device == "cpu":
            providers = ["CPUExecutionProvider"]
        elif device != "auto":
            resolve_device(device)  # DeviceError when this machine has no such GPU
        self.session = OnnxEmbedder(self.onnx_path, num_threads=num_threads, providers=providers)
        self.input_size = self.session.input_size
        self.embedding_dim = int(self.session.embedding_dim)
        self.transform = build_eval_transform(*self.input_size)

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        """(H_i, W_i, 3) uint8 RGB images -> (B, 3, H, W) float32, resized and normalised."""
        return np.stack([self.transform(image=image)["image"].numpy() for image in images])

    def embed_batch(self, batch: np.ndarray, flip: bool = False) -> np.ndarray:
        """(B, 3, H, W) preprocessed -> (B, D) float32, L2-normalised (`embed_onnx`)."""
        return embed_onnx(self.session, batch, flip)

    def info(self) -> dict[str, Any]:
        meta = self.session.metadata
        return {
            "runtime": self.runtime,
            "checkpoint": self.checkpoint,
            "onnx": self.onnx_path,
            "backbone": meta.backbone,
            "dim": self.embedding_dim,
            "device": "cpu" if self.session.providers[0] == "CPUExecutionProvider" else "cuda",
            "providers": list(self.session.providers),
            "precision": meta.precision,
            "input_size": list(self.input_size),
            "mean": list(meta.mean),
            "std": list(meta.std),
            "threads": self.session.num_threads,
        }


RUNTIMES: dict[str, type] = {"torch": TorchEmbedder, "onnx": OnnxRuntimeEmbedder}


def make_embedder(
    runtime: str, checkpoint: str | Path, device: str = "auto", num_threads: int | None = None
) -> ImageEmbedder:
    """The embedder of `runtime` (a key of RUNTIMES) for a checkpoint.

    Raises:
        ValueError: an unknown runtime, naming the known ones.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not known; choose one of {sorted(RUNTIMES)}")
    return RUNTIMES[runtime](checkpoint, device=device, num_threads=num_threads)
