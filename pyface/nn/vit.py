# Provenance: the blocks are SegFormer's Mix Transformer blocks (pyface.nn.segformer, see its
# header) conditioned by Export3D's Expression-Adaptive LayerNorm (Ki et al. 2024, no code
# released); the plain super-resolution follows the paper's description ("plain convolutional
# blocks, no style code"). Our own implementation; no upstream code is copied. pyface's code is
# licensed under Apache-2.0 (LICENSE).
"""Single-scale conditioned transformer stack and a plain convolutional super-resolution
(Export3D's tri-plane generator and image head).

* :class:`MiTStack`: ``depth`` :class:`pyface.nn.segformer.MiTBlock` s at one resolution, every
  block norm adaptive on a condition (EAdaLN: ``LN(x) (1 + scale(c)) + shift(c)``, projections
  zero-initialised, so the stack ignores the condition until trained), then a LayerNorm.
* :class:`PlainSuperResolution`: raw RGB + rendered features -> a higher-resolution image with
  plain (unmodulated) convolutions; the output is a learned residual over the bilinearly
  upsampled raw RGB (zero at initialisation).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn.segformer import _ACTIVATIONS, MiTBlock
from pyface.ops._checks import check_choice

__all__ = ["MiTStack", "MiTStackConfig", "PlainSuperResolution", "PlainSuperResolutionConfig"]


def _config(cls, cfg, overrides):
    if cfg is None:
        return cls(**overrides)
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


@dataclasses.dataclass(frozen=True)
class MiTStackConfig:
    """:class:`MiTStack`; defaults are Export3D's (our reading): 8 blocks of width 512, 8 heads,
    no spatial reduction, conditioned on a 512-d code.

    Attributes:
        dim: token width D.
        depth: number of blocks.
        heads: attention heads (``dim % heads == 0``).
        sr_ratio: spatial reduction of keys / values (1: full attention).
        mlp_ratio: Mix-FFN hidden width ``int(dim * mlp_ratio)``.
        cond_dim: > 0: every block norm is adaptive on a (B, cond_dim) condition; 0: plain.
        eps: LayerNorm eps.
        hidden_act: Mix-FFN activation (names of :class:`pyface.nn.MiTConfig`).
        drop_path_rate: stochastic depth rising linearly from 0 to this over the blocks.
        final_norm: end with a (plain) LayerNorm.
    """

    dim: int = 512
    depth: int = 8
    heads: int = 8
    sr_ratio: int = 1
    mlp_ratio: float = 4.0
    cond_dim: int = 512
    eps: float = 1e-6
    hidden_act: str = "gelu"
    drop_path_rate: float = 0.0
    final_norm: bool = True


class MiTStack(nn.Module):
    """A single-scale stack of (conditioned) Mix Transformer blocks.

    ``forward(x, cond=None)``: x (B, dim, h, w) feature map (or tokens (B, h*w, dim) with
    ``hw=(h, w)``); cond (B, cond_dim), required when ``cond_dim > 0``, refused otherwise.
    Returns the same layout and shape as x.
    """

    def __init__(self, cfg: MiTStackConfig | None = None, **overrides):
        super().__init__()
        self.cfg = c = _config(MiTStackConfig, cfg, overrides)
        if c.dim % c.heads:
            raise ValueError(f"heads: dim {c.dim} is not divisible by {c.heads} heads")
        check_choice("hidden_act", c.hidden_act, sorted(_ACTIVATIONS))
        if c.depth < 1:
            raise ValueError(f"depth: expected >= 1, got {c.depth}")
        rates = [c.drop_path_rate * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList(
            MiTBlock(c.dim, c.heads, c.sr_ratio, c.mlp_ratio, c.eps, c.cond_dim,
                     act=c.hidden_act, drop_path=rates[i]) for i in range(c.depth))
        self.norm = nn.LayerNorm(c.dim, eps=c.eps) if c.final_norm else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, *,
                hw: tuple[int, int] | None = None) -> torch.Tensor:
        c = self.cfg
        if c.cond_dim > 0:
            if cond is None or cond.dim() != 2 or cond.shape != (x.shape[0], c.cond_dim):
                raise ValueError(f"cond: expected shape ({x.shape[0]}, {c.cond_dim}), got "
                                 f"{None if cond is None else tuple(cond.shape)}")
        elif cond is not None:
            raise ValueError("cond: this stack was built with cond_dim=0; pass cond=None")
        if hw is None:
            if x.dim() != 4 or x.shape[1] != c.dim:
                raise ValueError(f"x: expected shape (B, {c.dim}, h, w), got {tuple(x.shape)}")
            B, _, h, w = x.shape
            t = x.flatten(2).transpose(1, 2)
        else:
            h, w = hw
            if x.dim() != 3 or x.shape[1:] != (h * w, c.dim):
                raise ValueError(f"x: expected tokens of shape (B, {h * w}, {c.dim}) for "
                                 f"hw={hw}, got {tuple(x.shape)}")
            t = x
        for blk in self.blocks:
            t = blk(t, h, w, cond)
        if self.norm is not None:
            t = self.norm(t)
        if hw is not None:
            return t
        return t.transpose(1, 2).reshape(B, c.dim, h, w)


@dataclasses.dataclass(frozen=True)
class PlainSuperResolutionConfig:
    """:class:`PlainSuperResolution`; defaults are Export3D's (our reading): 128^2 raw render ->
    512^2, widths 256 -> 128 -> 64.

    Attributes:
        channels: rendered feature channels (without the raw RGB).
        widths: one stage per entry; every stage after the first starts with a x2 upsampling, so
            the scale is ``2 ** (len(widths) - 1)``.
        res_blocks: residual blocks per stage (conv-LeakyReLU-conv + skip).
        image_channel: channels of the raw RGB and of the output.
        guide_channels: channels of an optional output-resolution guide image (0: none), added
            through a 3x3 conv to the input of the last stage.
        cond_dim: width of an optional condition vector (0: none): the first stage's input
            (at the input resolution, where it costs the least memory) is modulated as
            ``x (1 + scale(c)) + shift(c)`` per channel (a zero-initialised linear map, so the
            initial output does not depend on it).
        channels_last: run the convolutions in channels-last memory format (the output is
            returned contiguous). On CPU (oneDNN) the backward of a narrow convolution then
            needs no copies padded to 16 channels: 0.5 MB instead of 2.0 MB of temporaries for
            8 channels at 64^2, batch 4, and 1.6x less CPU time
            (docs/models/export3d-measured.md). Not measured on CUDA.
    """

    channels: int = 32
    widths: tuple[int, ...] = (256, 128, 64)
    res_blocks: int = 1
    image_channel: int = 3
    guide_channels: int = 0
    cond_dim: int = 0
    channels_last: bool = True


class _PlainResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.leaky_relu(self.conv1(x), 0.2, inplace=True))


class PlainSuperResolution(nn.Module):
    """Plain convolutional super-resolution (no style input).

    ``forward(rgb, features, guide=None, cond=None)``: rgb (B, image_channel, r, r) raw render,
    features (B, channels, r, r) (same spatial size), guide (B, guide_channels, r * scale,
    r * scale) when ``guide_channels`` > 0, cond (B, cond_dim) when ``cond_dim`` > 0 ->
    (B, image_channel, r * scale, r * scale) =
    ``bilinear_up(rgb) + to_rgb(convs(rgb ‖ features, guide))``. ``to_rgb`` starts at zero, so
    the initial output is the upsampled raw RGB.
    """

    def __init__(self, cfg: PlainSuperResolutionConfig | None = None, **overrides):
        super().__init__()
        self.cfg = c = _config(PlainSuperResolutionConfig, cfg, overrides)
        if len(c.widths) < 1:
            raise ValueError("widths: expected at least one stage, got ()")
        self.scale = 2 ** (len(c.widths) - 1)
        w = c.widths
        self.stem = nn.Conv2d(c.image_channel + c.channels, w[0], 3, padding=1)
        self.up = nn.ModuleList(nn.Conv2d(w[i], w[i + 1], 3, padding=1)
                                for i in range(len(w) - 1))
        self.stages = nn.ModuleList(nn.Sequential(*[_PlainResBlock(wi)
                                                    for _ in range(c.res_blocks)]) for wi in w)
        self.guide = (nn.Conv2d(c.guide_channels, w[-1], 3, padding=1) if c.guide_channels
                      else None)
        self.modulation = None
        if c.cond_dim:
            self.modulation = nn.Linear(c.cond_dim, 2 * w[0])
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)
        self.to_rgb = nn.Conv2d(w[-1], c.image_channel, 1)
        nn.init.zeros_(self.to_rgb.weight)
        nn.init.zeros_(self.to_rgb.bias)

    def forward(self, rgb: torch.Tensor, features: torch.Tensor,
                guide: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        c = self.cfg
        if rgb.dim() != 4 or rgb.shape[1] != c.image_channel:
            raise ValueError(f"rgb: expected shape (B, {c.image_channel}, r, r), got "
                             f"{tuple(rgb.shape)}")
        if features.shape != (rgb.shape[0], c.channels) + rgb.shape[2:]:
            raise ValueError(f"features: expected shape ({rgb.shape[0]}, {c.channels}, "
                             f"{rgb.shape[2]}, {rgb.shape[3]}), got {tuple(features.shape)}")
        out_size = (rgb.shape[2] * self.scale, rgb.shape[3] * self.scale)
        if self.guide is not None:
            if guide is None or guide.shape != (rgb.shape[0], c.guide_channels) + out_size:
                raise ValueError(f"guide: expected shape ({rgb.shape[0]}, {c.guide_channels}, "
                                 f"{out_size[0]}, {out_size[1]}), got "
                                 f"{None if guide is None else tuple(guide.shape)}")
        elif guide is not None:
            raise ValueError("guide: this super-resolution was built with guide_channels=0, got "
                             f"a guide of shape {tuple(guide.shape)}")
        if self.modulation is not None:
            if cond is None or cond.shape != (rgb.shape[0], c.cond_dim):
                raise ValueError(f"cond: expected shape ({rgb.shape[0]}, {c.cond_dim}), got "
                                 f"{None if cond is None else tuple(cond.shape)}")
        elif cond is not None:
            raise ValueError("cond: this super-resolution was built with cond_dim=0, got a "
                             f"condition of shape {tuple(cond.shape)}")
        fmt = torch.channels_last if c.channels_last else torch.contiguous_format
        x = torch.cat([rgb, features], dim=1).contiguous(memory_format=fmt)
        x = F.leaky_relu(self.stem(x), 0.2, inplace=True)
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
                x = F.leaky_relu(self.up[i - 1](x), 0.2, inplace=True)
            if i == last and self.guide is not None:
                x = x + self.guide(guide.to(x.dtype).contiguous(memory_format=fmt))
            if i == 0 and self.modulation is not None:
                scale, shift = self.modulation(cond.to(x.dtype))[:, :, None, None].chunk(2, 1)
                x = x * (1 + scale) + shift
            x = stage(x)
        base = rgb if self.scale == 1 else F.interpolate(
            rgb, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return (base + self.to_rgb(x)).contiguous()
