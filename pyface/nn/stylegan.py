# Provenance: reproduces the StyleGAN2 mapping and synthesis networks, tri-plane backbone and
# super-resolution modules of EG3D (NVlabs/eg3d, commit 7cf1fd1, NVIDIA Source Code License,
# non-commercial), which derive from StyleGAN2-ADA (NVlabs/stylegan2-ada-pytorch, NVIDIA Source
# Code License); parameter names follow EG3D's released networks. Our own implementation, written
# from the papers and the upstream's documented behaviour; no upstream code is copied. pyface's
# code is licensed under Apache-2.0 (LICENSE).
"""EG3D-compatible StyleGAN2 generator pieces in plain PyTorch.

* :class:`MappingNetwork` - z (B, 512) + pose c (B, 25) -> ws (B, num_ws, 512), ``w_avg`` tracking,
  truncation.
* :class:`SynthesisNetwork` - 'skip' architecture of modulated-conv blocks.
* :class:`TriplaneBackbone` - EG3D's tri-plane backbone: 256^2, 96 channels -> planes
  (B, 3, 32, 256, 256), 14 ws.
* :class:`SuperResolution` - every super-resolution module EG3D ships (Hybrid2X, 4X, 8X, 8XDC,
  Deepfp32), styled by the last w.

Module and parameter names follow EG3D's networks (``mapping.fc0.weight``, ``synthesis.b4.const``,
``superresolution.block0.conv0.affine.weight``, ...) so that ``pyface convert eg3d`` maps state
dicts without renaming. The maths follows StyleGAN2 (modulation/demodulation, equalised lr, noise,
FIR up-sampling); this implementation uses no custom CUDA, so results can differ from EG3D's fused
kernels in the last bits (and fp16 / conv_clamp paths are not reproduced).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pyface.nn.layers import (ACTIVATIONS, FullyConnectedLayer, bias_act, modulated_conv2d,
                              normalize_2nd_moment)
from pyface.nn.resample import filtered_resize, setup_filter, upsample2d
from pyface.ops._checks import check_choice

NOISE_MODES = ("random", "const", "none")


@dataclass
class MappingConfig:
    z_dim: int = 512
    c_dim: int = 25               # EG3D pose conditioning: cam2world (16) + intrinsics (9)
    w_dim: int = 512
    num_ws: int | None = 14
    num_layers: int = 2           # EG3D --map-depth default
    embed_features: int | None = None   # default: w_dim
    layer_features: int | None = None   # default: w_dim
    activation: str = "lrelu"
    lr_multiplier: float = 0.01
    w_avg_beta: float | None = 0.998


class MappingNetwork(nn.Module):
    """z: (B, z_dim), c: (B, c_dim) -> ws: (B, num_ws, w_dim) (or (B, w_dim) if num_ws is None).

    ``truncation_psi`` < 1 pulls the first ``truncation_cutoff`` ws towards ``w_avg`` (tracked
    during training with ``update_emas=True``)."""

    def __init__(self, cfg: MappingConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or MappingConfig(**overrides)
        self.cfg = cfg
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = cfg.z_dim, cfg.c_dim, cfg.w_dim, cfg.num_ws
        embed = cfg.w_dim if cfg.embed_features is None else cfg.embed_features
        if cfg.c_dim == 0:
            embed = 0
        if cfg.z_dim == 0 and cfg.c_dim == 0:
            raise ValueError("MappingNetwork: z_dim and c_dim cannot both be 0")
        hidden = cfg.w_dim if cfg.layer_features is None else cfg.layer_features
        feats = [cfg.z_dim + embed] + [hidden] * (cfg.num_layers - 1) + [cfg.w_dim]
        if cfg.c_dim > 0:
            self.embed = FullyConnectedLayer(cfg.c_dim, embed)
        for i in range(cfg.num_layers):
            self.add_module(f"fc{i}", FullyConnectedLayer(feats[i], feats[i + 1],
                                                          activation=cfg.activation,
                                                          lr_multiplier=cfg.lr_multiplier))
        if cfg.num_ws is not None and cfg.w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

    def forward(self, z: torch.Tensor | None, c: torch.Tensor | None,
                truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                update_emas: bool = False) -> torch.Tensor:
        x = None
        if self.z_dim > 0:
            if z is None or z.ndim != 2 or z.shape[1] != self.z_dim:
                raise ValueError(f"z: expected shape (B, {self.z_dim}), got "
                                 f"{None if z is None else tuple(z.shape)}")
            x = normalize_2nd_moment(z.float())
        if self.c_dim > 0:
            if c is None or c.ndim != 2 or c.shape[1] != self.c_dim:
                raise ValueError(f"c: expected shape (B, {self.c_dim}), got "
                                 f"{None if c is None else tuple(c.shape)}")
            if x is not None and c.shape[0] != x.shape[0]:
                raise ValueError(f"c: expected shape ({x.shape[0]}, {self.c_dim}) (B of z), got "
                                 f"{tuple(c.shape)}")
            y = normalize_2nd_moment(self.embed(c.float()))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for i in range(self.cfg.num_layers):
            x = getattr(self, f"fc{i}")(x)
        if update_emas and hasattr(self, "w_avg"):
            self.w_avg.copy_(x.detach().mean(0).lerp(self.w_avg, self.cfg.w_avg_beta))
        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            if not hasattr(self, "w_avg"):
                raise ValueError("truncation needs w_avg (num_ws and w_avg_beta must be set)")
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff],
                                                           truncation_psi)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (+ optional 2x up-sampling), noise, bias, lrelu.
    x: (B, in, R/up, R/up), w: (B, w_dim) -> (B, out, R, R)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 kernel_size: int = 3, up: int = 1, use_noise: bool = True,
                 activation: str = "lrelu", resample_filter=(1, 3, 3, 1),
                 conv_clamp: float | None = None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resolution, self.up, self.use_noise = resolution, up, use_noise
        self.activation, self.conv_clamp = activation, conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = ACTIVATIONS[activation][1]
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size,
                                               kernel_size))
        if use_noise:
            self.register_buffer("noise_const", torch.randn(resolution, resolution))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random",
                gain: float = 1.0, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``noise`` (B, 1, R, R): the per-pixel noise of ``noise_mode="random"`` drawn by the
        caller (the layer draws it with ``torch.randn`` in x's dtype when None); ignored in
        the other modes and by a layer without noise."""
        check_choice("noise_mode", noise_mode, NOISE_MODES)
        styles = self.affine(w)
        x = modulated_conv2d(x, self.weight, styles, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter, flip_weight=self.up == 1)
        if self.use_noise and noise_mode != "none":
            if noise_mode == "random" and noise is not None:
                want = (x.shape[0], 1, self.resolution, self.resolution)
                if tuple(noise.shape) != want:
                    raise ValueError(f"noise: expected shape {want}, got {tuple(noise.shape)}")
                noise = noise.to(device=x.device, dtype=x.dtype)
            elif noise_mode == "random":
                noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution,
                                    device=x.device, dtype=x.dtype)
            else:
                noise = self.noise_const.to(x.dtype)
            x = x + noise * self.noise_strength
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, act=self.activation, gain=self.act_gain * gain,
                        clamp=clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv without demodulation. x: (B, in, R, R) -> (B, img_channels, R, R)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size,
                                               kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, padding=self.padding)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the 'skip' synthesis network.

    ``in_channels == 0``: a learned constant (out, R, R) starts the network. ``up == 1`` gives
    EG3D's ``SynthesisBlockNoUp`` (super-resolution at the input size).

    forward(x: (B, in, R/up, R/up) or None, img: (B, img_channels, R/up, R/up) or None,
    ws: (B, num_conv + num_torgb, w_dim)) -> (x (B, out, R, R), img (B, img_channels, R, R)).
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 img_channels: int, is_last: bool, architecture: str = "skip",
                 resample_filter=(1, 3, 3, 1), conv_clamp: float | None = None, up: int = 2,
                 use_noise: bool = True):
        super().__init__()
        if architecture != "skip":
            raise ValueError(f"architecture: only 'skip' is implemented, got {architecture!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resolution, self.img_channels, self.is_last = resolution, img_channels, is_last
        self.up = up
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=up,
                                        resample_filter=resample_filter, conv_clamp=conv_clamp,
                                        use_noise=use_noise)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution,
                                    conv_clamp=conv_clamp, use_noise=use_noise)
        self.num_conv += 1
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_torgb = 1

    def noise_layers(self) -> list[SynthesisLayer]:
        """The layers that add per-pixel noise, in the order ``forward`` runs them."""
        convs = [self.conv1] if self.in_channels == 0 else [self.conv0, self.conv1]
        return [c for c in convs if c.use_noise]

    def forward(self, x, img, ws: torch.Tensor, noise_mode: str = "random",
                noise: list | None = None):
        """``noise``: one (B, 1, R, R) tensor per layer of :meth:`noise_layers` (the noise of
        ``noise_mode="random"`` drawn by the caller), or None."""
        n = self.num_conv + self.num_torgb
        if ws.ndim != 3 or ws.shape[1] != n:
            raise ValueError(f"ws: expected shape (B, {n}, w_dim), got {tuple(ws.shape)}")
        layers = self.noise_layers()
        if noise is not None and len(noise) != len(layers):
            raise ValueError(f"noise: expected {len(layers)} tensors (one per noise layer), "
                             f"got {len(noise)}")
        given = dict(zip(map(id, layers), noise)) if noise is not None else {}
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.const.to(ws.dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        else:
            x = self.conv0(x, next(w_iter), noise_mode=noise_mode,
                           noise=given.get(id(self.conv0)))
        x = self.conv1(x, next(w_iter), noise_mode=noise_mode, noise=given.get(id(self.conv1)))
        if img is not None and self.up > 1:
            img = upsample2d(img, self.resample_filter)
        y = self.torgb(x, next(w_iter))
        img = img + y if img is not None else y
        return x, img


@dataclass
class SynthesisConfig:
    w_dim: int = 512
    img_resolution: int = 256
    img_channels: int = 96
    channel_base: int = 32768
    channel_max: int = 512
    conv_clamp: float | None = None
    use_noise: bool = True


class SynthesisNetwork(nn.Module):
    """ws: (B, num_ws, w_dim) -> img: (B, img_channels, R, R). Blocks ``b4 ... b<R>``."""

    def __init__(self, cfg: SynthesisConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or SynthesisConfig(**overrides)
        R = cfg.img_resolution
        if R < 4 or R & (R - 1):
            raise ValueError(f"img_resolution: expected a power of two >= 4, got {R}")
        self.cfg = cfg
        self.block_resolutions = [2 ** i for i in range(2, int(math.log2(R)) + 1)]
        ch = {r: min(cfg.channel_base // r, cfg.channel_max) for r in self.block_resolutions}
        self.num_ws = 0
        for r in self.block_resolutions:
            block = SynthesisBlock(ch[r // 2] if r > 4 else 0, ch[r], cfg.w_dim, r,
                                   cfg.img_channels, is_last=r == R, conv_clamp=cfg.conv_clamp,
                                   use_noise=cfg.use_noise)
            self.num_ws += block.num_conv + (block.num_torgb if r == R else 0)
            setattr(self, f"b{r}", block)

    def forward(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.cfg.w_dim:
            raise ValueError(f"ws: expected shape (B, {self.num_ws}, {self.cfg.w_dim}), got "
                             f"{tuple(ws.shape)}")
        x = img = None
        idx = 0
        for r in self.block_resolutions:
            block = getattr(self, f"b{r}")
            x, img = block(x, img, ws.narrow(1, idx, block.num_conv + block.num_torgb),
                           noise_mode=noise_mode)
            idx += block.num_conv
        return img


@dataclass
class TriplaneBackboneConfig:
    mapping: MappingConfig = None
    synthesis: SynthesisConfig = None
    plane_channels: int = 32

    def __post_init__(self):
        self.mapping = self.mapping or MappingConfig()
        self.synthesis = self.synthesis or SynthesisConfig()
        if isinstance(self.mapping, dict):
            self.mapping = MappingConfig(**self.mapping)
        if isinstance(self.synthesis, dict):
            self.synthesis = SynthesisConfig(**self.synthesis)


class TriplaneBackbone(nn.Module):
    """EG3D's tri-plane backbone (``backbone.*`` in EG3D checkpoints).

    ``mapping(z, c)``: z (B, 512), c (B, 25) -> ws (B, 14, 512);
    ``synthesis(ws)`` -> planes (B, 3, 32, 256, 256). Defaults are EG3D's FFHQ configuration.
    """

    def __init__(self, cfg: TriplaneBackboneConfig | None = None):
        super().__init__()
        cfg = cfg or TriplaneBackboneConfig()
        self.cfg = cfg
        if cfg.synthesis.img_channels != 3 * cfg.plane_channels:
            raise ValueError(f"synthesis.img_channels ({cfg.synthesis.img_channels}) must be "
                             f"3 * plane_channels ({3 * cfg.plane_channels})")
        self.synthesis = SynthesisNetwork(cfg.synthesis)
        self.num_ws = self.synthesis.num_ws
        mcfg = MappingConfig(**{**cfg.mapping.__dict__, "num_ws": self.num_ws,
                                "w_dim": cfg.synthesis.w_dim})
        self.mapping = MappingNetwork(mcfg)

    def planes(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        """ws (B, num_ws, w_dim) -> (B, 3, C, R, R)."""
        img = self.synthesis(ws, noise_mode=noise_mode)
        B, _, H, W = img.shape
        return img.view(B, 3, self.cfg.plane_channels, H, W)

    def forward(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, noise_mode: str = "random",
                update_emas: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (planes (B, 3, C, R, R), ws (B, num_ws, w_dim))."""
        ws = self.mapping(z, c, truncation_psi, truncation_cutoff, update_emas=update_emas)
        return self.planes(ws, noise_mode), ws


#: EG3D's super-resolution modules (``training/superresolution.py``): variant ->
#: (input resolution, (block0 out channels, block0 resolution, block0 up), (block1 out channels,
#: block1 resolution), resize condition, antialias forced off, top-level ``resample_filter``
#: buffer).
#: The 2X / 4X / Deepfp32 block0 is EG3D's ``SynthesisBlockNoUp`` (no up-sampling, and the raw
#: RGB is not up-sampled either). ``resize``: ``"ne"`` resizes inputs whose size differs from the
#: input resolution, ``"lt"`` only smaller ones. The buffer is registered but never used in EG3D.
SR_VARIANTS = {
    "hybrid2x": (64, (128, 64, 1), (64, 128), "ne", False, True),       # ShapeNet 128
    "hybrid4x": (128, (128, 128, 1), (64, 256), "lt", False, True),     # 256 outputs
    "hybrid8x": (128, (128, 256, 2), (64, 512), "ne", False, True),     # early 512 configs
    "hybrid8xdc": (128, (256, 256, 2), (128, 512), "ne", False, False),  # FFHQ / AFHQ 512
    "hybriddeepfp32": (128, (128, 128, 1), (64, 256), "lt", True, True),  # old 256 models
}
#: EG3D class name suffix -> variant
SR_CLASS_NAMES = {"SuperresolutionHybrid2X": "hybrid2x", "SuperresolutionHybrid4X": "hybrid4x",
                  "SuperresolutionHybrid8X": "hybrid8x",
                  "SuperresolutionHybrid8XDC": "hybrid8xdc",
                  "SuperresolutionHybridDeepfp32": "hybriddeepfp32"}
_SCALE_VARIANT = {2: "hybrid2x", 4: "hybrid4x", 8: "hybrid8xdc"}


@dataclass
class SuperResolutionConfig:
    """EG3D super-resolution. ``variant`` names EG3D's module (:data:`SR_VARIANTS`); the older
    ``scale`` field selects 2 -> hybrid2x, 4 -> hybrid4x, 8 -> hybrid8xdc when ``variant`` is unset.

    ``input_resolution`` / ``block_channels`` override EG3D's fixed sizes (small models only;
    converted EG3D weights keep them ``None``). ``conv_clamp``: EG3D clamps the SR convolutions
    at 256 because it runs them in fp16; pyface runs them in float32 without clamping by default.
    ``dtype``: ``"float32"`` (default) or ``"bfloat16"`` (compute dtype of the SR blocks; the
    output is float32).
    """
    scale: int = 8                 # 2: 64->128, 4: 128->256, 8: 128->512 (Hybrid8XDC)
    channels: int = 32             # feature-image channels from the renderer
    w_dim: int = 512
    antialias: bool = True
    noise_mode: str = "none"       # EG3D --sr_noise_mode default
    conv_clamp: float | None = None
    variant: str | None = None
    input_resolution: int | None = None
    block_channels: list[int] | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.variant is None:
            if self.scale not in _SCALE_VARIANT:
                raise ValueError(f"scale: expected one of {sorted(_SCALE_VARIANT)}, got "
                                 f"{self.scale}")
            self.variant = _SCALE_VARIANT[self.scale]
        check_choice("variant", self.variant, sorted(SR_VARIANTS))
        r_in, (_, r0, up0), (_, r1), _, _, _ = SR_VARIANTS[self.variant]
        self.scale = r1 // r_in
        check_choice("noise_mode", self.noise_mode, NOISE_MODES)
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype: expected 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.block_channels is not None and len(self.block_channels) != 2:
            raise ValueError(f"block_channels: expected 2 widths, got {self.block_channels}")


# kept for older imports: scale -> (input res, (block0 out, res, up), (block1 out, res))
_SR = {s: SR_VARIANTS[v][:3] for s, v in _SCALE_VARIANT.items()}


class SuperResolution(nn.Module):
    """EG3D's super-resolution modules (``superresolution.*``): raw RGB (B, 3, r, r) and features
    (B, channels, r, r) -> image (B, 3, R, R); styles from the last w repeated 3 times.

    forward(rgb, x, ws (B, num_ws, w_dim)) -> (B, 3, R, R) float32; with ``return_alias=True``
    also EG3D's in-place side effect on ``rgb`` (see :meth:`forward`)."""

    def __init__(self, cfg: SuperResolutionConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or SuperResolutionConfig(**overrides)
        self.cfg = cfg
        r_in, (c0, r0, up0), (c1, r1), resize, no_aa, buf = SR_VARIANTS[cfg.variant]
        if cfg.input_resolution is not None:
            f = cfg.input_resolution / r_in
            r_in, r0, r1 = cfg.input_resolution, int(r0 * f), int(r1 * f)
        if cfg.block_channels is not None:
            c0, c1 = cfg.block_channels
        self.input_resolution, self.output_resolution = r_in, r1
        self._resize, self._antialias = resize, cfg.antialias and not no_aa
        self._up0 = up0
        self.block0 = SynthesisBlock(cfg.channels, c0, cfg.w_dim, r0, 3, is_last=False, up=up0,
                                     conv_clamp=cfg.conv_clamp)
        self.block1 = SynthesisBlock(c0, c1, cfg.w_dim, r1, 3, is_last=True,
                                     conv_clamp=cfg.conv_clamp)
        if buf:  # registered (unused) by EG3D's module, so its state dicts carry it
            self.register_buffer("resample_filter", setup_filter())

    def draw_noise(self, batch: int, like: torch.Tensor, generators: list | None = None
                   ) -> list[torch.Tensor] | None:
        """The per-pixel noise ``forward`` draws itself with ``noise_mode="random"``, for
        ``batch`` images: one (batch, 1, R, R) tensor per noise layer, in the order ``forward``
        draws them (``torch.randn`` from torch's current generator: the same numbers), on
        ``like``'s device in the blocks' dtype (bfloat16 with ``dtype="bfloat16"``, else float64
        for float64 ``like``, else float32). ``generators``: one ``torch.Generator`` per image,
        each image's noise drawn from its own. None when the mode draws nothing. Passed back as
        ``forward(noise=)``, the noise stays out of a module compiled with ``torch.compile``
        (Inductor would draw other numbers with its own generator)."""
        if self.cfg.noise_mode != "random":
            return None
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
        if generators is not None and len(generators) != batch:
            raise ValueError(f"generators: expected {batch} (one per image), got "
                             f"{len(generators)}")
        dt = (torch.bfloat16 if self.cfg.dtype == "bfloat16" else
              torch.float64 if like.dtype == torch.float64 else torch.float32)
        out = []
        for layer in self.block0.noise_layers() + self.block1.noise_layers():
            r = layer.resolution
            if generators is None:
                out.append(torch.randn(batch, 1, r, r, device=like.device, dtype=dt))
            else:
                out.append(torch.cat([torch.randn(1, 1, r, r, device=like.device, dtype=dt,
                                                  generator=g) for g in generators]))
        return out

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, ws: torch.Tensor, *,
                return_alias: bool = False, noise: list | None = None):
        """rgb (B, 3, r, r), x (B, channels, r, r), ws (B, num_ws, w_dim) -> image (B, 3, R, R).

        ``noise``: the noise of ``noise_mode="random"`` drawn by :meth:`draw_noise` (None: drawn
        here).

        ``return_alias=True`` returns ``(image, alias)``: EG3D's first block of the 2X / 4X /
        Deepfp32 modules does not up-sample, so when the input is used as it is (not resized)
        its ``img.add_(torgb)`` adds the block's RGB into the caller's ``rgb`` in place; ``alias``
        (B, 3, r, r) is that modified ``rgb`` (EG3D then returns it as ``image_raw``), or None
        when EG3D leaves ``rgb`` untouched. pyface never modifies ``rgb``.
        """
        if ws.ndim != 3 or ws.shape[-1] != self.cfg.w_dim:
            raise ValueError(f"ws: expected shape (B, num_ws, {self.cfg.w_dim}), got "
                             f"{tuple(ws.shape)}")
        for name, t, c in (("rgb", rgb, 3), ("x", x, self.cfg.channels)):
            if t.ndim != 4 or t.shape[1] != c or t.shape[0] != ws.shape[0]:
                raise ValueError(f"{name}: expected shape ({ws.shape[0]}, {c}, H, W), got "
                                 f"{tuple(t.shape)}")
        ws = ws[:, -1:, :].expand(-1, 3, -1)
        r = self.input_resolution
        resized = x.shape[-1] != r if self._resize == "ne" else x.shape[-1] < r
        if resized:
            x = filtered_resize(x, r, antialias=self._antialias)
            rgb = filtered_resize(rgb, r, antialias=self._antialias)
        dt = torch.bfloat16 if self.cfg.dtype == "bfloat16" else None
        if dt is not None:
            x, rgb, ws = x.to(dt), rgb.to(dt), ws.to(dt)
        n0 = len(self.block0.noise_layers())
        if noise is not None:
            want = n0 + len(self.block1.noise_layers())
            if self.cfg.noise_mode != "random":
                raise ValueError(f"noise: given, but noise_mode is {self.cfg.noise_mode!r} "
                                 f"(only 'random' adds drawn noise)")
            if len(noise) != want:
                raise ValueError(f"noise: expected {want} tensors (draw_noise), got "
                                 f"{len(noise)}")
        x, rgb = self.block0(x, rgb, ws, noise_mode=self.cfg.noise_mode,
                             noise=None if noise is None else noise[:n0])
        alias = rgb.float() if self._up0 == 1 and not resized else None
        x, rgb = self.block1(x, rgb, ws, noise_mode=self.cfg.noise_mode,
                             noise=None if noise is None else noise[n0:])
        return (rgb.float(), alias) if return_alias else rgb.float()
