"""Pooling of a feature map (B, C, h, w) into one vector per image: avg, max, GeM, NetVLAD.

Every pooling module has `out_dim`, the width of what it returns, so an architecture can size
the layers after it without knowing which pooling it got.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("avg", "gem", "max", "netvlad")


class AvgPool(nn.Module):
    """Global average pooling (B, C, h, w) -> (B, C)."""

    def __init__(self, channels: int):
        super().__init__()
        self.out_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class MaxPool(nn.Module):
    """Global max pooling (B, C, h, w) -> (B, C) (MGN's choice for its part features)."""

    def __init__(self, channels: int):
        super().__init__()
        self.out_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))


class GeM(nn.Module):
    """Generalized-mean pooling: (mean x^p)^(1/p) over the spatial map; p=1 is average."""

    def __init__(self, p: float = 3.0, learnable: bool = False, eps: float = 1e-6,
                 channels: int = 0):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps
        self.out_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, C)
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class NetVLAD(nn.Module):
    """NetVLAD (Arandjelovic et al., CVPR 2016) with its PCA-whitening projection.

    Local descriptors x_i (the C-d columns of the map, L2-normalised) are soft-assigned to K
    learnt centres c_k (a 1x1 convolution + softmax over k); V_k = sum_i a_k(x_i) (x_i - c_k).
    Each V_k is L2-normalised (intra-normalisation), the K*C vector L2-normalised, then
    projected to `out_dim` by a linear layer (the paper's PCA + whitening, learnt here; it can
    be initialised by `init_pca_whitening`) and L2-normalised again.

    Args:
        channels: C, the width of the map.
        clusters: K.
        out_dim: the projected width (0 = C).
    """

    def __init__(self, channels: int, clusters: int = 64, out_dim: int = 0):
        super().__init__()
        if clusters < 1:
            raise ValueError(f"model.netvlad_clusters={clusters} must be >= 1")
        self.clusters, self.channels = clusters, channels
        self.out_dim = out_dim or channels
        self.centroids = nn.Parameter(torch.rand(clusters, channels))
        # The paper's initialisation: w_k = 2 alpha c_k, b_k = -alpha |c_k|^2, so the
        # assignment starts as a sharp nearest-centre softmax.
        alpha = 30.0
        self.assign = nn.Conv2d(channels, clusters, kernel_size=1, bias=True)
        with torch.no_grad():
            centres = F.normalize(self.centroids, dim=1)
            self.centroids.copy_(centres)
            self.assign.weight.copy_((2.0 * alpha * centres)[:, :, None, None])
            self.assign.bias.copy_(-alpha * centres.pow(2).sum(dim=1))
        self.projection = nn.Linear(clusters * channels, self.out_dim)

    def vlad(self, x: torch.Tensor) -> torch.Tensor:
        """The intra- and L2-normalised VLAD vector (B, K*C) of a map (B, C, h, w)."""
        x = F.normalize(x, dim=1)
        soft = self.assign(x).flatten(2).softmax(dim=1)  # (B, K, N)
        desc = x.flatten(2)  # (B, C, N)
        # sum_i a_k(x_i) x_i - (sum_i a_k(x_i)) c_k  ->  (B, K, C)
        vlad = soft @ desc.transpose(1, 2) - soft.sum(dim=2, keepdim=True) * self.centroids
        vlad = F.normalize(vlad, dim=2)  # intra-normalisation
        return F.normalize(vlad.flatten(1), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, out_dim)
        return F.normalize(self.projection(self.vlad(x)), dim=1)

    @torch.no_grad()
    def init_pca_whitening(self, vlads: torch.Tensor, eps: float = 1e-6) -> None:
        """Set the projection to the PCA whitening of VLAD vectors (the paper's last step).

        Args:
            vlads: (N, K*C) outputs of `vlad` on training images, N > out_dim.
        """
        if vlads.shape[0] <= self.out_dim:
            raise ValueError(
                f"PCA whitening to {self.out_dim} dimensions needs more than {self.out_dim} "
                f"VLAD vectors, got {vlads.shape[0]}"
            )
        mean = vlads.mean(dim=0)
        centred = (vlads - mean).double()
        # principal directions from the SVD of the centred data: cov = V diag(s^2 / (N-1)) V^T
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        var = s[: self.out_dim].pow(2) / (vlads.shape[0] - 1)
        weight = vh[: self.out_dim] / (var + eps).sqrt()[:, None]  # (out_dim, K*C)
        self.projection.weight.copy_(weight.to(self.projection.weight.dtype))
        self.projection.bias.copy_(-(weight @ mean.double()).to(self.projection.bias.dtype))


def build_pooling(name: str, channels: int, gem_p: float = 3.0, gem_learnable: bool = False,
                  netvlad_clusters: int = 64, netvlad_dim: int = 0) -> nn.Module:
    """The pooling `model.pooling` names, for maps of `channels` channels.

    Raises:
        ValueError: an unknown name.
    """
    if name == "avg":
        return AvgPool(channels)
    if name == "max":
        return MaxPool(channels)
    if name == "gem":
        return GeM(gem_p, gem_learnable, channels=channels)
    if name == "netvlad":
        return NetVLAD(channels, netvlad_clusters, netvlad_dim)
    raise ValueError(f"model.pooling={name!r}; choose one of {POOLINGS}")
