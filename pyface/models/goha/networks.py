# Provenance: reproduces the network layout of GOHA ("Generalizable One-shot 3D Neural Head
# Avatar", NVlabs/GOHA, NVIDIA Source Code License, non-commercial): the three SegFormer encoders,
# Embed2Plane and IDUpsampler, from the paper and pyface's design study
# (shared/reference/specs/otavatar-goha.md section 2). Our own implementation; no upstream code is
# copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""GOHA's building blocks: encoders, ``Embed2Plane``, ``IDUpsampler`` and image helpers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn import MiTConfig, SegFormer, mit_config

#: ImageNet statistics of the SegFormer encoders' inputs
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def encoder_config(name: str, in_channels: int, width: int) -> MiTConfig:
    """MiT config of one GOHA encoder: ``name`` a MiT size (``"b0"``: GOHA) or ``"tiny"`` (a
    4-stage, one-block-per-stage MiT for CPU tests), decode head of ``width`` channels without
    BatchNorm / ReLU (GOHA replaces them by identities)."""
    if name == "tiny":
        return MiTConfig(in_channels=in_channels, hidden_sizes=[16, 32, 32, 32],
                         depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], decoder_hidden_size=width,
                         head_norm=False)
    return mit_config(name, in_channels=in_channels, decoder_hidden_size=width, head_norm=False)


def build_encoder(name: str, in_channels: int, width: int) -> SegFormer:
    """A GOHA encoder: ``x (B, in_channels, R, R) -> (B, width, R/4, R/4)``."""
    return SegFormer(encoder_config(name, in_channels, width))


def imagenet_normalize(image: torch.Tensor) -> torch.Tensor:
    """image: (B, 3, H, W) in [-1, 1] -> ImageNet-normalised (B, 3, H, W)."""
    mean = image.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((image + 1) / 2 - mean) / std


def dilate(mask: torch.Tensor, kernel: int, iterations: int = 1) -> torch.Tensor:
    """mask: (B, 1, H, W) in [0, 1] -> max over ``kernel`` x ``kernel`` windows, repeated."""
    if kernel <= 1:
        return mask
    for _ in range(iterations):
        mask = F.max_pool2d(mask, kernel, stride=1, padding=kernel // 2)
    return mask


def erode(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """mask: (B, 1, H, W) in [0, 1] -> min over ``kernel`` x ``kernel`` windows."""
    return mask if kernel <= 1 else -F.max_pool2d(-mask, kernel, stride=1, padding=kernel // 2)


class Embed2Plane(nn.Module):
    """Encoder map -> tri-plane, doubling the resolution.

    ``x (B, D, h, w) -> planes (B, 3, C, 2h, 2w)``: Conv3 D->D, LReLU 0.2, Conv3 D->W, LReLU,
    ConvT 4/2 W->W, LReLU, Conv3 W->W, LReLU, Conv3 W->3C (GOHA: D 256, W 128, C 32)."""

    def __init__(self, in_channels: int, width: int, plane_channels: int):
        super().__init__()
        self.in_channels, self.plane_channels = in_channels, plane_channels
        act = lambda: nn.LeakyReLU(0.2)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1), act(),
            nn.Conv2d(in_channels, width, 3, padding=1), act(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), act(),
            nn.Conv2d(width, width, 3, padding=1), act(),
            nn.Conv2d(width, 3 * plane_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (B, {self.in_channels}, h, w), got {tuple(x.shape)}")
        y = self.net(x)
        B, _, H, W = y.shape
        return y.view(B, 3, self.plane_channels, H, W)


PLANE_NAMES = ("xy", "xz", "zy")


class IDUpsampler(nn.Module):
    """Lifted appearance planes -> plane features at twice the resolution, per plane:
    ``skip_<p>`` (1x1 conv on the bilinear x2 map) + ``up_<p>`` (ConvT 4/2 D->W, LReLU, Conv3
    W->C).

    ``planes (B, 3, D, A, A) -> (B, 3, C, 2A, 2A)``. GOHA's published network applies the xy
    plane's up-branch to all three planes (``up_xz`` / ``up_zy`` exist but are unused): a bug,
    kept only with ``share_weights=True`` (for its checkpoints); by default each plane has its
    own branch.
    """

    def __init__(self, in_channels: int, width: int, plane_channels: int, *,
                 share_weights: bool = False):
        super().__init__()
        self.in_channels, self.share_weights = in_channels, bool(share_weights)
        for p in PLANE_NAMES:
            self.add_module(f"skip_{p}", nn.Conv2d(in_channels, plane_channels, 1))
            self.add_module(f"up_{p}", nn.Sequential(
                nn.ConvTranspose2d(in_channels, width, 4, stride=2, padding=1),
                nn.LeakyReLU(0.2), nn.Conv2d(width, plane_channels, 3, padding=1)))

    def forward(self, planes: torch.Tensor) -> torch.Tensor:
        if planes.dim() != 5 or planes.shape[1] != 3 or planes.shape[2] != self.in_channels:
            raise ValueError(f"planes: expected (B, 3, {self.in_channels}, A, A), got "
                             f"{tuple(planes.shape)}")
        out = []
        for i, p in enumerate(PLANE_NAMES):
            x = planes[:, i]
            up = getattr(self, "up_xy" if self.share_weights else f"up_{p}")
            skip = getattr(self, f"skip_{p}")
            big = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            out.append(skip(big) + up(x))
        return torch.stack(out, 1)
