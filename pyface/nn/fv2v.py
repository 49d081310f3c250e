# Provenance: reproduces the semantics of face-vid2vid's building blocks (Wang et al. 2021) as in
# the open reimplementation zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis
# (commit 9511d25, CC BY-NC 4.0; modules/util.py, keypoint_detector.py, generator.py) and
# KwaiVGI/LivePortrait (commit 1986663, MIT): residual / down / up / same blocks, the appearance
# feature extractor, the canonical keypoint detector, and MMFA's multi-scale decoder (Li et al.
# 2026, no code released; built from the paper's description). Our own implementation, written
# from the papers and the upstream's documented behaviour; no upstream code is copied. pyface's
# code is licensed under Apache-2.0 (LICENSE).
"""face-vid2vid-family blocks shared by keypoint-driven models (MMFA).

Blocks (BatchNorm everywhere, as in face-vid2vid):

* :class:`ResBlock2d` / :class:`ResBlock3d`: pre-activation residual block
  ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``, channels and size kept.
* :class:`DownBlock2d` (conv + BN + ReLU + 2x2 average pool), :class:`UpBlock2d` (nearest x2 +
  conv + BN + ReLU), :class:`SameBlock2d` (conv + BN + ReLU or LeakyReLU 0.2);
  ``UpBlock3d`` / ``DownBlock3d`` (depth kept) live in :mod:`pyface.nn.motion` (the dense-motion
  hourglass uses them) and are re-exported here.
* :class:`AppearanceFeatureExtractor`: image -> feature volume (B, 32, 16, H/4, W/4).
* :class:`CanonicalKeypointDetector`: image -> K canonical 3D keypoints, the expected coordinates
  of per-keypoint volumetric heatmaps (softmax with temperature 0.1); jacobians optional (off by
  default, face-vid2vid's vox-256 setting).
* :class:`MultiScaleDecoder`: warped volume -> images at 3 scales (MMFA's generator output).
* :func:`antialias_downsample`, :func:`make_coordinate_grid`, :func:`expected_coordinates`.
"""
from __future__ import annotations

import dataclasses
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn.motion import DownBlock3d, UpBlock3d

__all__ = ["ResBlock2d", "ResBlock3d", "DownBlock2d", "UpBlock2d", "SameBlock2d", "DownBlock3d",
           "UpBlock3d", "AppearanceFeatureExtractor", "AppearanceConfig",
           "CanonicalKeypointDetector", "KeypointDetectorConfig", "MultiScaleDecoder",
           "MultiScaleDecoderConfig", "antialias_downsample", "make_coordinate_grid",
           "expected_coordinates"]


def _config(cls, cfg, overrides):
    if cfg is None:
        return cls(**overrides)
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# ------------------------------------------------------------------------------------------------
# blocks
# ------------------------------------------------------------------------------------------------

class ResBlock2d(nn.Module):
    """Pre-activation residual block. x (B, features, H, W) -> (B, features, H, W)."""

    def __init__(self, features: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(features, affine=True)
        self.conv1 = nn.Conv2d(features, features, kernel_size, padding=padding)
        self.norm2 = nn.BatchNorm2d(features, affine=True)
        self.conv2 = nn.Conv2d(features, features, kernel_size, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.norm1(x)))
        return x + self.conv2(F.relu(self.norm2(y)))


class ResBlock3d(nn.Module):
    """Pre-activation 3D residual block. x (B, features, D, H, W) -> same shape."""

    def __init__(self, features: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.norm1 = nn.BatchNorm3d(features, affine=True)
        self.conv1 = nn.Conv3d(features, features, kernel_size, padding=padding)
        self.norm2 = nn.BatchNorm3d(features, affine=True)
        self.conv2 = nn.Conv3d(features, features, kernel_size, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.norm1(x)))
        return x + self.conv2(F.relu(self.norm2(y)))


class DownBlock2d(nn.Module):
    """Conv + BN + ReLU + 2x2 average pool. x (B, cin, H, W) -> (B, cout, H/2, W/2)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(cout, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.relu(self.norm(self.conv(x))), kernel_size=2)


class UpBlock2d(nn.Module):
    """Nearest x2 + conv + BN + ReLU. x (B, cin, H, W) -> (B, cout, 2H, 2W)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(cout, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(F.interpolate(x, scale_factor=2))))


class SameBlock2d(nn.Module):
    """Conv + BN + ReLU (or LeakyReLU 0.2 with ``lrelu``). x (B, cin, H, W) -> (B, cout, H, W)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, padding: int = 1,
                 lrelu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(cout, affine=True)
        self.lrelu = lrelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        return F.leaky_relu(y, 0.2) if self.lrelu else F.relu(y)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def antialias_downsample(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Gaussian blur (sigma ``(1/scale - 1) / 2``, kernel ``2 round(4 sigma) + 1``, zero
    padding) followed by nearest subsampling by ``scale`` (face-vid2vid's anti-aliased input
    resize). x (B, C, H, W) -> (B, C, floor(H scale), floor(W scale)); identity for scale 1."""
    if x.dim() != 4:
        raise ValueError(f"x: expected shape (B, C, H, W), got {tuple(x.shape)}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale: expected 0 < scale <= 1, got {scale}")
    if scale == 1:
        return x
    sigma = (1 / scale - 1) / 2
    size = 2 * round(sigma * 4) + 1
    r = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = g / g.sum()
    C = x.shape[1]
    x = F.pad(x, [size // 2] * 4)
    x = F.conv2d(x, g.view(1, 1, 1, size).expand(C, 1, 1, size), groups=C)
    x = F.conv2d(x, g.view(1, 1, size, 1).expand(C, 1, size, 1), groups=C)
    return F.interpolate(x, scale_factor=scale, mode="nearest")


def make_coordinate_grid(depth: int, height: int, width: int, *, dtype=torch.float32,
                         device=None) -> torch.Tensor:
    """Coordinates of a (D, H, W) volume in [-1, 1] (inclusive linspace per axis, as
    face-vid2vid): (D, H, W, 3) with the last dimension ordered (x -> W, y -> H, z -> D), the
    order of ``grid_sample``'s 5-D grids. Every size must be an integer >= 1."""
    for name, n in (("depth", depth), ("height", height), ("width", width)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {n!r}")
    lin = [torch.linspace(-1, 1, n, dtype=dtype, device=device) if n > 1
           else torch.zeros(1, dtype=dtype, device=device) for n in (depth, height, width)]
    z, y, x = torch.meshgrid(*lin, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def expected_coordinates(heatmap: torch.Tensor) -> torch.Tensor:
    """Expected coordinates of normalised volumetric heatmaps.

    Args:
        heatmap: (B, K, D, H, W), each (D, H, W) map summing to 1.
    Returns:
        (B, K, 3) ``sum_v heatmap[v] * grid[v]`` with the grid of :func:`make_coordinate_grid`
        (x, y, z in [-1, 1]).
    """
    if heatmap.dim() != 5:
        raise ValueError(f"heatmap: expected shape (B, K, D, H, W), got {tuple(heatmap.shape)}")
    B, K, D, H, W = heatmap.shape
    grid = make_coordinate_grid(D, H, W, dtype=heatmap.dtype, device=heatmap.device)
    return heatmap.reshape(B, K, -1) @ grid.reshape(-1, 3)


# ------------------------------------------------------------------------------------------------
# appearance feature extractor
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AppearanceConfig:
    """:class:`AppearanceFeatureExtractor`; defaults give face-vid2vid's / LivePortrait's
    32 x 16 x 64 x 64 volume from a 256^2 image.

    Attributes:
        image_channel: input channels.
        block_expansion: channels of the first 7x7 block; down block i has
            ``min(max_features, block_expansion * 2^(i+1))``.
        num_down_blocks: each halves H and W.
        max_features: channel cap of the 2D blocks.
        reshape_channel, reshape_depth: the 1x1 conv makes ``reshape_channel * reshape_depth``
            channels, reshaped to (reshape_channel, reshape_depth, h, w).
        num_resblocks: ResBlock3d on the volume.
    """

    image_channel: int = 3
    block_expansion: int = 64
    num_down_blocks: int = 2
    max_features: int = 512
    reshape_channel: int = 32
    reshape_depth: int = 16
    num_resblocks: int = 6


class AppearanceFeatureExtractor(nn.Module):
    """Image -> 3D appearance feature volume.

    ``forward(image)``: image (B, image_channel, H, W), H and W divisible by
    ``2 ** num_down_blocks`` -> (B, reshape_channel, reshape_depth, H / 2^n, W / 2^n).
    Full size: (B, 3, 256, 256) -> (B, 32, 16, 64, 64).
    """

    def __init__(self, cfg: AppearanceConfig | None = None, **overrides):
        super().__init__()
        self.cfg = c = _config(AppearanceConfig, cfg, overrides)
        self.first = SameBlock2d(c.image_channel, c.block_expansion, kernel_size=7, padding=3)

        def width(i):
            return min(c.max_features, c.block_expansion * 2 ** i)
        self.down_blocks = nn.ModuleList(
            DownBlock2d(width(i), width(i + 1)) for i in range(c.num_down_blocks))
        self.second = nn.Conv2d(width(c.num_down_blocks), c.reshape_channel * c.reshape_depth, 1)
        self.resblocks_3d = nn.Sequential(
            *[ResBlock3d(c.reshape_channel) for _ in range(c.num_resblocks)])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        m = 2 ** c.num_down_blocks
        if (image.dim() != 4 or image.shape[1] != c.image_channel or image.shape[2] % m
                or image.shape[3] % m):
            raise ValueError(f"image: expected shape (B, {c.image_channel}, H, W) with H, W "
                             f"divisible by {m}, got {tuple(image.shape)}")
        x = self.first(image)
        for block in self.down_blocks:
            x = block(x)
        x = self.second(x)
        B, _, h, w = x.shape
        return self.resblocks_3d(x.view(B, c.reshape_channel, c.reshape_depth, h, w))


# ------------------------------------------------------------------------------------------------
# canonical keypoint detector
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KeypointDetectorConfig:
    """:class:`CanonicalKeypointDetector`; defaults are face-vid2vid's vox-256 (K = 15).

    Attributes:
        image_channel: input channels.
        num_kp: K.
        scale_factor: the input is anti-aliased and resized by this first (0.25: 256 -> 64).
        block_expansion, max_features, num_blocks: DownBlock2d i has
            ``min(max_features, block_expansion * 2^(i+1))`` channels; the UpBlock3d stack
            mirrors it back to ``block_expansion`` channels.
        reshape_depth: the 1x1 conv after the 2D blocks makes ``C * reshape_depth`` channels,
            reshaped to a (C, reshape_depth, h, w) volume (C: the last 2D width).
        temperature: of the softmax over each keypoint's volume.
        kernel_size: of the Conv3d heads (keypoint logits, jacobians).
        estimate_jacobian: also predict (B, K, 3, 3) jacobians (heatmap-weighted; initialised to
            the identity). Off by default (face-vid2vid's vox-256 and MMFA are jacobian-free).
    """

    image_channel: int = 3
    num_kp: int = 15
    scale_factor: float = 0.25
    block_expansion: int = 32
    max_features: int = 1024
    num_blocks: int = 5
    reshape_depth: int = 16
    temperature: float = 0.1
    kernel_size: int = 3
    estimate_jacobian: bool = False


class CanonicalKeypointDetector(nn.Module):
    """Image -> K canonical 3D keypoints as expected coordinates of volumetric heatmaps.

    ``forward(image)``: image (B, image_channel, H, W) with ``H * scale_factor`` and
    ``W * scale_factor`` divisible by ``2 ** num_blocks`` -> dict:

    * ``value``: (B, K, 3) keypoints (x, y, z) in [-1, 1] (see :func:`expected_coordinates`);
    * ``heatmap``: (B, K, D, h, w) softmax of the logits / temperature over each volume;
    * ``jacobian``: (B, K, 3, 3), only with ``estimate_jacobian``.

    Full size: (B, 3, 256, 256) -> 64^2 -> 2^2 x 1024 ch -> (1024, 16, 2, 2) -> 5 UpBlock3d ->
    (32, 16, 64, 64) -> K heatmaps (B, 15, 16, 64, 64).
    """

    def __init__(self, cfg: KeypointDetectorConfig | None = None, **overrides):
        super().__init__()
        self.cfg = c = _config(KeypointDetectorConfig, cfg, overrides)
        if not c.temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {c.temperature}")

        def width(i):
            return min(c.max_features, c.block_expansion * 2 ** i)
        self.down_blocks = nn.ModuleList(
            DownBlock2d(c.image_channel if i == 0 else width(i), width(i + 1))
            for i in range(c.num_blocks))
        self.reshape_channel = width(c.num_blocks)
        self.conv = nn.Conv2d(self.reshape_channel, self.reshape_channel * c.reshape_depth, 1)
        self.up_blocks = nn.ModuleList(
            UpBlock3d(width(i + 1), width(i)) for i in reversed(range(c.num_blocks)))
        p = c.kernel_size // 2
        self.kp = nn.Conv3d(c.block_expansion, c.num_kp, c.kernel_size, padding=p)
        self.jacobian = None
        if c.estimate_jacobian:
            self.jacobian = nn.Conv3d(c.block_expansion, 9 * c.num_kp, c.kernel_size, padding=p)
            nn.init.zeros_(self.jacobian.weight)
            with torch.no_grad():
                self.jacobian.bias.copy_(torch.eye(3).flatten().repeat(c.num_kp))

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.cfg
        if image.dim() != 4 or image.shape[1] != c.image_channel:
            raise ValueError(f"image: expected shape (B, {c.image_channel}, H, W), got "
                             f"{tuple(image.shape)}")
        x = antialias_downsample(image, c.scale_factor)
        m = 2 ** c.num_blocks
        if x.shape[2] % m or x.shape[3] % m or x.shape[2] < m or x.shape[3] < m:
            raise ValueError(f"image: H and W times scale_factor {c.scale_factor} must be "
                             f"positive multiples of {m}, got {tuple(image.shape)}")
        for block in self.down_blocks:
            x = block(x)
        x = self.conv(x)
        B, _, h, w = x.shape
        x = x.view(B, self.reshape_channel, c.reshape_depth, h, w)
        for block in self.up_blocks:
            x = block(x)
        logits = self.kp(x)
        K, D, H, W = logits.shape[1:]
        heatmap = F.softmax(logits.reshape(B, K, -1) / c.temperature, dim=-1)
        heatmap = heatmap.view(B, K, D, H, W)
        out = {"value": expected_coordinates(heatmap), "heatmap": heatmap}
        if self.jacobian is not None:
            jac = self.jacobian(x).view(B, K, 9, -1)
            out["jacobian"] = (jac * heatmap.view(B, K, 1, -1)).sum(-1).view(B, K, 3, 3)
        return out


# ------------------------------------------------------------------------------------------------
# multi-scale decoder
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MultiScaleDecoderConfig:
    """:class:`MultiScaleDecoder`; defaults decode the full-size 32 x 16 x 64^2 volume to
    images at 64^2, 128^2 and 256^2.

    Attributes:
        in_channels: volume channels times depth (32 * 16 = 512).
        channels: width at each output scale; one scale per entry, each twice the previous.
        res_blocks: ResBlock2d per scale (one number for all scales, or one per scale).
        image_channel: output image channels.
        output: ``"tanh"`` (images in [-1, 1], pyface's convention), ``"sigmoid"`` ([0, 1],
            face-vid2vid's) or ``"none"``.
    """

    in_channels: int = 512
    channels: tuple[int, ...] = (256, 128, 64)
    res_blocks: int | tuple[int, ...] = 1
    image_channel: int = 3
    output: str = "tanh"


class MultiScaleDecoder(nn.Module):
    """MMFA's multi-scale generator output: warped feature volume -> an image per scale.

    The volume is flattened over depth, passed through a 3x3 SameBlock2d (LeakyReLU) and a 1x1
    conv, multiplied by the occlusion map when given, then for each scale s:
    ResBlock2d x res_blocks[s] -> 7x7 conv to an image -> (except at the last scale)
    concatenate the image to the features -> UpBlock2d to the next width.

    ``forward(volume, occlusion=None)``:
        volume: (B, C, D, H, W) with C * D = in_channels, or already flat (B, in_channels, H, W);
        occlusion: optional (B, 1, H, W) in [0, 1].
    Returns a list of ``len(channels)`` images, (B, image_channel, H * 2^s, W * 2^s), coarse to
    fine.
    """

    def __init__(self, cfg: MultiScaleDecoderConfig | None = None, **overrides):
        super().__init__()
        self.cfg = c = _config(MultiScaleDecoderConfig, cfg, overrides)
        n = len(c.channels)
        if n < 1:
            raise ValueError("channels: expected at least one scale, got ()")
        res = (c.res_blocks,) * n if isinstance(c.res_blocks, int) else tuple(c.res_blocks)
        if len(res) != n:
            raise ValueError(f"res_blocks: expected one number or {n} (one per scale), got "
                             f"{c.res_blocks}")
        if c.output not in ("tanh", "sigmoid", "none"):
            raise ValueError(f"output: expected 'tanh', 'sigmoid' or 'none', got {c.output!r}")
        ch = c.channels
        self.third = SameBlock2d(c.in_channels, ch[0], kernel_size=3, padding=1, lrelu=True)
        self.fourth = nn.Conv2d(ch[0], ch[0], 1)
        self.res = nn.ModuleList(nn.Sequential(*[ResBlock2d(ch[s]) for _ in range(res[s])])
                                 for s in range(n))
        self.to_image = nn.ModuleList(nn.Conv2d(ch[s], c.image_channel, 7, padding=3)
                                      for s in range(n))
        self.up = nn.ModuleList(UpBlock2d(ch[s] + c.image_channel, ch[s + 1])
                                for s in range(n - 1))

    def forward(self, volume: torch.Tensor, occlusion: torch.Tensor | None = None,
                return_logits: bool = False):
        """See the class docstring; ``return_logits=True`` also returns each scale's
        ``to_image`` output before the output activation: ``(images, logits)``, both lists of
        (B, image_channel, H * 2^s, W * 2^s)."""
        c = self.cfg
        if volume.dim() == 5:
            B, C, D, H, W = volume.shape
            x = volume.reshape(B, C * D, H, W)
        else:
            x = volume
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"volume: expected shape (B, C, D, H, W) with C * D = "
                             f"{c.in_channels}, or (B, {c.in_channels}, H, W), got "
                             f"{tuple(volume.shape)}")
        x = self.fourth(self.third(x))
        if occlusion is not None:
            if occlusion.shape != (x.shape[0], 1) + x.shape[2:]:
                raise ValueError(f"occlusion: expected shape ({x.shape[0]}, 1, {x.shape[2]}, "
                                 f"{x.shape[3]}), got {tuple(occlusion.shape)}")
            x = x * occlusion
        images, logits = [], []
        for s in range(len(c.channels)):
            x = self.res[s](x)
            img = self.to_image[s](x)
            logits.append(img)
            if c.output == "tanh":
                img = torch.tanh(img)
            elif c.output == "sigmoid":
                img = torch.sigmoid(img)
            images.append(img)
            if s < len(self.up):
                x = self.up[s](torch.cat([x, img], dim=1))
        return (images, logits) if return_logits else images
