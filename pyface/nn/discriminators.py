# Provenance: reproduces the StyleGAN2 discriminator and dual discrimination of EG3D (NVlabs/eg3d,
# commit 7cf1fd1, NVIDIA Source Code License, non-commercial); the multi-scale PatchGAN of
# face-vid2vid as reimplemented in
# zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis (commit 9511d25, CC BY-NC
# 4.0). Our own implementation, written from the papers and the upstream's documented behaviour;
# no upstream code is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""Discriminators.

* :class:`StyleGAN2Discriminator` - ResNet D with pose-conditioning projection (EG3D names).
* :class:`DualDiscriminator` - EG3D's dual discrimination: SR image ‖ upsampled raw image
  (6 channels), optional conditioning noise.
* :class:`MultiScalePatchDiscriminator` - PatchGAN at several scales with spectral norm, returning
  the feature maps for feature matching (face-vid2vid / MMFA).

All plain PyTorch; double backward works (R1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn.layers import Conv2dLayer, FullyConnectedLayer
from pyface.nn.resample import filtered_resize, setup_filter
from pyface.nn.stylegan import MappingConfig, MappingNetwork


class DiscriminatorBlock(nn.Module):
    """ResNet block at resolution R: x (B, in, R, R) [+ img (B, img_ch, R, R) for the first]
    -> (B, out, R/2, R/2)."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int,
                 img_channels: int, activation: str = "lrelu", conv_clamp: float | None = None):
        super().__init__()
        self.in_channels, self.resolution = in_channels, resolution
        if in_channels == 0:
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, 1, activation=activation,
                                       conv_clamp=conv_clamp)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation=activation,
                                 conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, activation=activation, down=2,
                                 conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=2)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None) -> torch.Tensor:
        if self.in_channels == 0:
            y = self.fromrgb(img)
            x = x + y if x is not None else y
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv0(x)
        x = self.conv1(x, gain=math.sqrt(0.5))
        return y + x


class MinibatchStdLayer(nn.Module):
    """Appends ``num_channels`` maps with the std over groups of ``group_size`` samples."""

    def __init__(self, group_size: int, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        G = min(self.group_size, N) if self.group_size is not None else N
        if N % G:
            G = math.gcd(N, G)
        F_ = self.num_channels
        y = x.reshape(G, -1, F_, C // F_, H, W)
        y = (y - y.mean(dim=0)).square().mean(dim=0)
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])
        y = y.reshape(-1, F_, 1, 1).repeat(G, 1, H, W)
        return torch.cat([x, y], dim=1)


class DiscriminatorEpilogue(nn.Module):
    """4x4 features -> logits (B, 1); with ``cmap_dim`` > 0 the projection onto cmap."""

    def __init__(self, in_channels: int, cmap_dim: int, resolution: int = 4,
                 mbstd_group_size: int = 4, mbstd_num_channels: int = 1,
                 activation: str = "lrelu", conv_clamp: float | None = None):
        super().__init__()
        self.cmap_dim = cmap_dim
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) \
            if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, 3,
                                activation=activation, conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution ** 2, in_channels,
                                      activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: torch.Tensor, cmap: torch.Tensor | None) -> torch.Tensor:
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)
        if self.cmap_dim > 0:
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x


@dataclass
class DiscriminatorConfig:
    c_dim: int = 25
    img_resolution: int = 512
    img_channels: int = 3
    channel_base: int = 32768
    channel_max: int = 512
    cmap_dim: int | None = None         # default: channels at 4x4
    mbstd_group_size: int = 4
    mbstd_num_channels: int = 1
    mapping_layers: int = 8             # c -> cmap mapping (EG3D: MappingNetwork, z_dim 0)
    conv_clamp: float | None = None


class StyleGAN2Discriminator(nn.Module):
    """img: (B, img_channels, R, R), c: (B, c_dim) -> logits (B, 1)."""

    def __init__(self, cfg: DiscriminatorConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or DiscriminatorConfig(**overrides)
        self.cfg = cfg
        R = cfg.img_resolution
        self.block_resolutions = [2 ** i for i in range(int(math.log2(R)), 2, -1)]
        ch = {r: min(cfg.channel_base // r, cfg.channel_max) for r in self.block_resolutions + [4]}
        cmap_dim = ch[4] if cfg.cmap_dim is None else cfg.cmap_dim
        if cfg.c_dim == 0:
            cmap_dim = 0
        for r in self.block_resolutions:
            setattr(self, f"b{r}", DiscriminatorBlock(ch[r] if r < R else 0, ch[r], ch[r // 2], r,
                                                      cfg.img_channels,
                                                      conv_clamp=cfg.conv_clamp))
        if cfg.c_dim > 0:
            self.mapping = MappingNetwork(MappingConfig(
                z_dim=0, c_dim=cfg.c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None,
                num_layers=cfg.mapping_layers))
        self.b4 = DiscriminatorEpilogue(ch[4], cmap_dim, 4, cfg.mbstd_group_size,
                                        cfg.mbstd_num_channels, conv_clamp=cfg.conv_clamp)

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        R, C = self.cfg.img_resolution, self.cfg.img_channels
        if img.ndim != 4 or img.shape[1:] != (C, R, R):
            raise ValueError(f"img: expected shape (B, {C}, {R}, {R}), got {tuple(img.shape)}")
        x = None
        for r in self.block_resolutions:
            x = getattr(self, f"b{r}")(x, img)
        cmap = self.mapping(None, c) if self.cfg.c_dim > 0 else None
        return self.b4(x, cmap)


class DualDiscriminator(StyleGAN2Discriminator):
    """EG3D dual discrimination. forward(image (B, 3, R, R), image_raw (B, 3, r, r), c (B, 25))
    -> (B, 1): D sees ``image ‖ filtered_resize(image_raw, R)`` (6 channels).

    ``c_noise`` > 0 adds Gaussian noise scaled by the batch std of c (EG3D ``disc_c_noise``)."""

    def __init__(self, cfg: DiscriminatorConfig | None = None, c_noise: float = 0.0,
                 **overrides):
        cfg = cfg or DiscriminatorConfig(**overrides)
        cfg = DiscriminatorConfig(**{**cfg.__dict__, "img_channels": 2 * cfg.img_channels})
        super().__init__(cfg)
        self.c_noise = c_noise
        self.register_buffer("resample_filter", setup_filter())  # as in EG3D's state dicts

    def forward(self, image: torch.Tensor, image_raw: torch.Tensor,
                c: torch.Tensor | None = None) -> torch.Tensor:
        if image_raw.ndim != 4 or image.ndim != 4 or image_raw.shape[:2] != image.shape[:2]:
            raise ValueError(f"image_raw: expected shape ({image.shape[0]}, {image.shape[1]}, r, r)"
                             f" (B and channels of image {tuple(image.shape)}), got "
                             f"{tuple(image_raw.shape)}")
        raw = filtered_resize(image_raw, image.shape[-1])
        if self.c_noise > 0 and c is not None and self.training:
            c = c + torch.randn_like(c) * c.std(0) * self.c_noise
        return super().forward(torch.cat([image, raw], dim=1), c)


@dataclass
class PatchDiscriminatorConfig:
    in_channels: int = 3
    scales: list[float] = field(default_factory=lambda: [1.0])
    block_expansion: int = 32
    num_blocks: int = 4
    max_features: int = 512
    spectral_norm: bool = True


class _PatchDown(nn.Module):
    def __init__(self, cin: int, cout: int, norm: bool, pool: bool, sn: bool):
        super().__init__()
        conv = nn.Conv2d(cin, cout, 4)
        self.conv = nn.utils.parametrizations.spectral_norm(conv) if sn else conv
        self.norm = nn.InstanceNorm2d(cout, affine=True) if norm else nn.Identity()
        self.pool = pool

    def forward(self, x):
        x = F.leaky_relu(self.norm(self.conv(x)), 0.2)
        return F.avg_pool2d(x, 2) if self.pool else x


class PatchDiscriminator(nn.Module):
    """x (B, C, H, W) -> (feature maps [(B, c_i, h_i, w_i)], patch logits (B, 1, h, w))."""

    def __init__(self, cfg: PatchDiscriminatorConfig):
        super().__init__()
        blocks, cin = [], cfg.in_channels
        for i in range(cfg.num_blocks):
            cout = min(cfg.max_features, cfg.block_expansion * 2 ** (i + 1))
            blocks.append(_PatchDown(cin, cout, norm=i != 0, pool=i != cfg.num_blocks - 1,
                                     sn=cfg.spectral_norm))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        conv = nn.Conv2d(cin, 1, 1)
        self.out = nn.utils.parametrizations.spectral_norm(conv) if cfg.spectral_norm else conv

    def forward(self, x):
        feats = []
        for b in self.blocks:
            x = b(x)
            feats.append(x)
        return feats, self.out(x)


class MultiScalePatchDiscriminator(nn.Module):
    """PatchGANs on an image pyramid. x: (B, C, H, W) -> {scale: (features, logits)}; use
    :func:`pyface.nn.losses.feature_matching_loss` on the features."""

    def __init__(self, cfg: PatchDiscriminatorConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or PatchDiscriminatorConfig(**overrides)
        self.cfg = cfg
        self.discs = nn.ModuleDict({str(s).replace(".", "-"): PatchDiscriminator(cfg)
                                    for s in cfg.scales})

    def forward(self, x: torch.Tensor) -> dict[str, tuple[list[torch.Tensor], torch.Tensor]]:
        out = {}
        for s, d in zip(self.cfg.scales, self.discs.values()):
            xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear",
                                                align_corners=False, antialias=s < 1)
            out[str(s)] = d(xs)
        return out
