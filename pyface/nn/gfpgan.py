# Provenance: reproduces the GFPGANv1Clean generator (U-Net with spatial feature transform
# conditions feeding a StyleGAN2 "clean" decoder) of GFPGAN (TencentARC/GFPGAN, Apache-2.0), whose
# parameter names and shapes follow the released GFPGANv1.3 checkpoint (``params_ema``); GOHA
# (NVlabs/GOHA, commit 102abbf) uses it as its stage-2 super-resolution; and the StyleGAN2
# discriminator layout of BasicSR (XPixelGroup/BasicSR, Apache-2.0) that GFPGAN's released
# ``net_d`` uses and GOHA fine-tunes (3 channels, and 6 for dual discrimination). Our own
# implementation, written from the papers and the upstream's documented behaviour; no upstream
# code is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""GFPGANv1Clean: face restoration / super-resolution generator (GOHA's stage-2 SR).

Layout (``S = out_size``, ``L = log2(S)``; channels are GFPGAN's tables, the U-Net at half the
decoder's width):

* U-Net encoder: ``conv_body_first`` (1x1, 3 -> c(S)), ``conv_body_down.0 .. L-3`` (residual
  blocks halving the resolution with bilinear resizing, S -> 4), ``final_conv`` (3x3 at 4x4),
  ``final_linear`` (flattened 4x4 features -> one style, or ``2L - 2`` styles with
  ``different_w``).
* U-Net decoder: ``conv_body_up.0 .. L-3`` (residual blocks doubling the resolution, 4 -> S, each
  adding the encoder's skip of the same size first), per level a ``condition_scale.i`` /
  ``condition_shift.i`` (conv3 -> LeakyReLU 0.2 -> conv3) and an auxiliary ``toRGB.i`` (1x1).
* ``stylegan_decoder``: StyleGAN2 "clean" generator (plain convolutions, bilinear up-sampling; no
  custom ops): ``style_mlp`` (2nd-moment normalisation + ``num_mlp`` Linear/LeakyReLU pairs),
  ``constant_input``, ``style_conv1`` + ``to_rgb1`` at 4x4, then per resolution 8 .. S two
  ``style_convs`` and one ``to_rgbs``; after the first conv of each resolution the SFT condition
  is applied - to all channels, or with ``sft_half`` to the second half only:
  ``h = h * scale + shift``. ``noises.noise{i}`` are the stored noise maps.

GFPGANv1.3 (and GOHA): ``out_size 512, num_style_feat 512, channel_multiplier 2, num_mlp 8,
different_w, sft_half, input_is_latent`` (the style MLP is kept in the weights but not applied).

:class:`GFPGANDiscriminator` is BasicSR's StyleGAN2 discriminator (GFPGAN's ``net_d``) with an
``in_channels`` option (GOHA's 6-channel dual discriminator).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)


@dataclass
class GFPGANConfig:
    out_size: int = 512
    num_style_feat: int = 512
    channel_multiplier: int = 2
    num_mlp: int = 8
    narrow: float = 1.0            # width factor (GFPGAN's ``narrow``); the U-Net is half of it
    sft_half: bool = True          # SFT on the second half of the channels only
    different_w: bool = True       # one style per layer from ``final_linear``
    input_is_latent: bool = True   # styles are W (skip ``style_mlp``), as GFPGANv1.3 runs

    def __post_init__(self):
        L = math.log2(self.out_size) if self.out_size > 0 else 0.0
        if self.out_size < 8 or L != int(L):
            raise ValueError(f"GFPGANConfig.out_size: expected a power of two >= 8, got "
                             f"{self.out_size}")
        if self.num_style_feat < 1 or self.num_mlp < 0 or self.narrow <= 0:
            raise ValueError("GFPGANConfig: num_style_feat >= 1, num_mlp >= 0 and narrow > 0 "
                             f"expected, got {self.num_style_feat}, {self.num_mlp}, "
                             f"{self.narrow}")

    @property
    def log_size(self) -> int:
        return int(math.log2(self.out_size))

    @property
    def num_latent(self) -> int:
        """Styles the decoder reads: 2 at 4x4 plus 2 per doubling (16 at 512)."""
        return 2 * self.log_size - 2

    def decoder_channels(self, res: int) -> int:
        return _channels(res, self.channel_multiplier, self.narrow)

    def unet_channels(self, res: int) -> int:
        return _channels(res, self.channel_multiplier, self.narrow * 0.5)


def _channels(res: int, cm: int, narrow: float) -> int:
    """GFPGAN's channel table: 512 up to 32x32, then 256 * cm / 2^k."""
    if res <= 32:
        return int(512 * narrow)
    return int(256 * cm * narrow * 64 // res)


# --------------------------------------------------------------------------------------------
# StyleGAN2 "clean" decoder
# --------------------------------------------------------------------------------------------

class _NormStyle(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class ModulatedConv(nn.Module):
    """Modulated convolution with plain PyTorch ops: x (B, Cin, H, W), style (B, num_style_feat)
    -> (B, Cout, H', W'), H' = 2H when ``upsample`` (bilinear, before the convolution).

    Parameters: ``weight`` (1, Cout, Cin, k, k), ``modulation`` Linear(num_style_feat -> Cin)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 num_style_feat: int, demodulate: bool = True, upsample: bool = False,
                 eps: float = 1e-8):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.demodulate, self.upsample, self.eps = demodulate, upsample, eps
        self.padding = kernel_size // 2
        self.modulation = nn.Linear(num_style_feat, in_channels, bias=True)
        nn.init.kaiming_normal_(self.modulation.weight, a=0, mode="fan_in",
                                nonlinearity="linear")
        nn.init.ones_(self.modulation.bias)
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size,
                                               kernel_size)
                                   / math.sqrt(in_channels * kernel_size ** 2))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        s = self.modulation(style).view(B, 1, C, 1, 1)
        w = self.weight * s                                               # (B, O, C, k, k)
        if self.demodulate:
            w = w * torch.rsqrt(w.pow(2).sum(dim=(2, 3, 4), keepdim=True) + self.eps)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        H, W = x.shape[-2:]
        out = F.conv2d(x.reshape(1, B * C, H, W), w.reshape(B * self.out_channels, C,
                                                             *w.shape[-2:]),
                       padding=self.padding, groups=B)
        return out.view(B, self.out_channels, *out.shape[-2:])


class StyleConv(nn.Module):
    """ModulatedConv (3x3, demodulated) * sqrt(2) + weight * noise + bias, LeakyReLU 0.2.
    x (B, Cin, H, W), style (B, F), noise (B or 1, 1, H', W') or None (fresh)
    -> (B, Cout, H', W')."""

    def __init__(self, in_channels: int, out_channels: int, num_style_feat: int,
                 upsample: bool = False):
        super().__init__()
        self.modulated_conv = ModulatedConv(in_channels, out_channels, 3, num_style_feat,
                                            demodulate=True, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))             # noise strength
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) * SQRT2
        if noise is None:
            noise = out.new_empty(out.shape[0], 1, *out.shape[-2:]).normal_()
        return F.leaky_relu(out + self.weight * noise + self.bias, 0.2)


class ToRGB(nn.Module):
    """1x1 modulated conv (no demodulation) to RGB + bias, plus the (bilinearly up-sampled)
    skip: x (B, C, H, W), style (B, F), skip (B, 3, H/2, W/2) or None -> (B, 3, H, W)."""

    def __init__(self, in_channels: int, num_style_feat: int, upsample: bool = True):
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv(in_channels, 3, 1, num_style_feat, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor,
                skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            if self.upsample:
                skip = F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
            out = out + skip
        return out


class _ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.expand(batch, -1, -1, -1)


class StyleGAN2DecoderSFT(nn.Module):
    """StyleGAN2 "clean" generator with SFT conditions (GFPGAN's ``stylegan_decoder``).

    forward(styles (B, F) or (B, num_latent, F), conditions [scale_8, shift_8, ..., scale_S,
    shift_S] with scale/shift (B, c, r, r) for r = 8 .. S (c = decoder channels at r, halved with
    ``sft_half``), input_is_latent, noise list or None) -> (B, 3, S, S)."""

    def __init__(self, cfg: GFPGANConfig):
        super().__init__()
        self.cfg = cfg
        F_ = cfg.num_style_feat
        layers: list[nn.Module] = [_NormStyle()]
        for _ in range(cfg.num_mlp):
            layers += [nn.Linear(F_, F_), nn.LeakyReLU(0.2)]
        self.style_mlp = nn.Sequential(*layers)
        for m in self.style_mlp:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, a=0.2, mode="fan_in",
                                        nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        c4 = cfg.decoder_channels(4)
        self.constant_input = _ConstantInput(c4, 4)
        self.style_conv1 = StyleConv(c4, c4, F_)
        self.to_rgb1 = ToRGB(c4, F_, upsample=False)
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        cin = c4
        for i in range(3, cfg.log_size + 1):
            cout = cfg.decoder_channels(2 ** i)
            self.style_convs.append(StyleConv(cin, cout, F_, upsample=True))
            self.style_convs.append(StyleConv(cout, cout, F_))
            self.to_rgbs.append(ToRGB(cout, F_, upsample=True))
            cin = cout
        self.num_layers = 2 * (cfg.log_size - 2) + 1
        self.noises = nn.Module()
        for k in range(self.num_layers):
            r = 2 ** ((k + 5) // 2)
            self.noises.register_buffer(f"noise{k}", torch.randn(1, 1, r, r))

    def noise_shapes(self, batch: int = 1) -> list[tuple[int, int, int, int]]:
        """Shapes of the noise maps of the ``num_layers`` noise injections, in order:
        ``(batch, 1, r, r)``, r the side of the stored map ``noises.noise{k}`` (4, 8, 8, 16, 16,
        ..., S)."""
        return [(batch, 1, *getattr(self.noises, f"noise{k}").shape[-2:])
                for k in range(self.num_layers)]

    def draw_noise(self, batch: int, *, generators: list | None = None,
                   device=None, dtype=None) -> list[torch.Tensor]:
        """Fresh noise maps, one list entry per injection (:meth:`noise_shapes`), N(0, 1) in
        ``dtype`` (default float32) on ``device`` (default the stored maps'): with
        ``generators`` (one ``torch.Generator`` per item, ``len == batch``) item ``b``'s maps come
        from ``generators[b]`` in layer order (independent of how items are batched), else from
        torch's generator for the whole batch. Pass them as ``noise=`` to run the decoder with
        them outside a compiled graph's own random numbers."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
        ref = self.noises.noise0
        device = ref.device if device is None else torch.device(device)
        dtype = torch.float32 if dtype is None else dtype
        shapes = self.noise_shapes(1)
        if generators is None:
            return [torch.randn((batch, *s[1:]), device=device, dtype=dtype) for s in shapes]
        if len(generators) != batch:
            raise ValueError(f"generators: expected one per item ({batch}), got "
                             f"{len(generators)}")
        drawn = [[torch.randn(s, generator=g, device=device, dtype=dtype) for s in shapes]
                 for g in generators]
        return [torch.cat([d[k] for d in drawn]) for k in range(len(shapes))]

    def forward(self, styles: torch.Tensor, conditions: list[torch.Tensor], *,
                input_is_latent: bool | None = None,
                noise: list[torch.Tensor | None] | None = None,
                randomize_noise: bool = True) -> torch.Tensor:
        cfg = self.cfg
        if input_is_latent is None:
            input_is_latent = cfg.input_is_latent
        if not input_is_latent:
            styles = self.style_mlp(styles) if styles.ndim == 2 else \
                self.style_mlp(styles.flatten(0, 1)).view(styles.shape)
        if styles.ndim == 2:
            latent = styles.unsqueeze(1).expand(-1, cfg.num_latent, -1)
        elif styles.ndim == 3 and styles.shape[1] == cfg.num_latent:
            latent = styles
        else:
            raise ValueError(f"styles: expected (B, {cfg.num_style_feat}) or (B, "
                             f"{cfg.num_latent}, {cfg.num_style_feat}), got "
                             f"{tuple(styles.shape)}")
        n_cond = 2 * (cfg.log_size - 2)
        if len(conditions) != n_cond:
            raise ValueError(f"conditions: expected {n_cond} maps (scale, shift per level), "
                             f"got {len(conditions)}")
        if noise is None:
            noise = [None] * self.num_layers if randomize_noise else \
                [getattr(self.noises, f"noise{k}") for k in range(self.num_layers)]
        elif len(noise) != self.num_layers:
            raise ValueError(f"noise: expected a list of {self.num_layers} maps (one per noise "
                             f"injection) or None, got {len(noise)}")
        else:
            B = latent.shape[0]
            for k, (t, want) in enumerate(zip(noise, self.noise_shapes(B))):
                if t is not None and (t.ndim != 4 or t.shape[0] not in (1, B)
                                      or tuple(t.shape[1:]) != want[1:]):
                    raise ValueError(f"noise[{k}]: expected shape ({B} or 1, 1, {want[2]}, "
                                     f"{want[3]}), got {tuple(t.shape)}")
        out = self.style_conv1(self.constant_input(latent.shape[0]), latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for lvl, to_rgb in enumerate(self.to_rgbs):
            conv_a, conv_b = self.style_convs[2 * lvl], self.style_convs[2 * lvl + 1]
            out = conv_a(out, latent[:, i], noise[i])
            scale, shift = conditions[2 * lvl], conditions[2 * lvl + 1]
            want = (out.shape[1] // 2 if cfg.sft_half else out.shape[1], *out.shape[-2:])
            for name, t in (("scale", scale), ("shift", shift)):
                if t.ndim != 4 or tuple(t.shape[1:]) != want:
                    raise ValueError(f"conditions[{2 * lvl + (name == 'shift')}] ({name} at "
                                     f"{want[-1]}x{want[-1]}): expected shape (B, {want[0]}, "
                                     f"{want[1]}, {want[2]}), got {tuple(t.shape)}")
            if cfg.sft_half:
                keep, sft = out.split(out.shape[1] // 2, dim=1)
                out = torch.cat([keep, sft * scale + shift], dim=1)
            else:
                out = out * scale + shift
            out = conv_b(out, latent[:, i + 1], noise[i + 1])
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip


# --------------------------------------------------------------------------------------------
# U-Net and the full generator
# --------------------------------------------------------------------------------------------

class ResBlockResample(nn.Module):
    """GFPGAN-clean residual block: x (B, Cin, H, W) -> (B, Cout, H*f, W*f), f = 0.5 (down) or
    2 (up): lrelu(conv1) -> bilinear resize -> lrelu(conv2), plus skip(1x1, no bias) of the
    resized input."""

    def __init__(self, in_channels: int, out_channels: int, mode: str):
        super().__init__()
        if mode not in ("down", "up"):
            raise ValueError(f"mode: expected 'down' or 'up', got {mode!r}")
        self.factor = 0.5 if mode == "down" else 2.0
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.interpolate(h, scale_factor=self.factor, mode="bilinear", align_corners=False)
        h = F.leaky_relu(self.conv2(h), 0.2)
        x = F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)
        return h + self.skip(x)


class GFPGANv1Clean(nn.Module):
    """GFPGANv1Clean generator.

    forward(x (B, 3, S, S) in [-1, 1], *, noise=None, randomize_noise=True, return_rgbs=False)
    -> image (B, 3, S, S) (roughly [-1, 1], not clamped); with ``return_rgbs`` also the list of
    the U-Net's auxiliary RGB outputs, (B, 3, r, r) for r = 8 .. S. ``noise``: the decoder's
    noise maps, a list of ``stylegan_decoder.num_layers`` tensors (B or 1, 1, r, r) (shapes:
    ``stylegan_decoder.noise_shapes``, fresh ones: ``stylegan_decoder.draw_noise``); None: fresh
    maps drawn in each injection with ``randomize_noise`` (GFPGAN's ``noise=None``), else the
    stored ``noises.noise*``.

    Parameter names equal GFPGAN's (``conv_body_first.weight``, ``stylegan_decoder.style_convs.0.
    modulated_conv.weight``, ...), so GFPGANv1.3's ``params_ema`` loads unchanged (see
    :func:`load_gfpgan`, ``pyface convert gfpgan``)."""

    def __init__(self, cfg: GFPGANConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or GFPGANConfig(**overrides)
        self.cfg = cfg
        L, U = cfg.log_size, cfg.unet_channels
        self.conv_body_first = nn.Conv2d(3, U(cfg.out_size), 1)
        self.conv_body_down = nn.ModuleList()
        cin = U(cfg.out_size)
        for i in range(L, 2, -1):
            cout = U(2 ** (i - 1))
            self.conv_body_down.append(ResBlockResample(cin, cout, "down"))
            cin = cout
        self.final_conv = nn.Conv2d(cin, U(4), 3, 1, 1)
        self.conv_body_up = nn.ModuleList()
        self.condition_scale = nn.ModuleList()
        self.condition_shift = nn.ModuleList()
        self.toRGB = nn.ModuleList()
        cin = U(4)
        for i in range(3, L + 1):
            cout = U(2 ** i)
            self.conv_body_up.append(ResBlockResample(cin, cout, "up"))
            sft = cout if cfg.sft_half else 2 * cout
            for lst in (self.condition_scale, self.condition_shift):
                lst.append(nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1), nn.LeakyReLU(0.2),
                                         nn.Conv2d(cout, sft, 3, 1, 1)))
            self.toRGB.append(nn.Conv2d(cout, 3, 1))
            cin = cout
        n_out = cfg.num_latent * cfg.num_style_feat if cfg.different_w else cfg.num_style_feat
        self.final_linear = nn.Linear(U(4) * 16, n_out)
        self.stylegan_decoder = StyleGAN2DecoderSFT(cfg)

    def forward(self, x: torch.Tensor, *, noise: list[torch.Tensor | None] | None = None,
                randomize_noise: bool = True, return_rgbs: bool = False):
        cfg = self.cfg
        S = cfg.out_size
        if x.ndim != 4 or x.shape[1:] != (3, S, S):
            raise ValueError(f"x: expected shape (B, 3, {S}, {S}), got {tuple(x.shape)}")
        feat = F.leaky_relu(self.conv_body_first(x), 0.2)
        skips = []
        for blk in self.conv_body_down:
            feat = blk(feat)
            skips.append(feat)
        feat = F.leaky_relu(self.final_conv(feat), 0.2)
        style = self.final_linear(feat.flatten(1))
        if cfg.different_w:
            style = style.view(x.shape[0], cfg.num_latent, cfg.num_style_feat)
        conditions, rgbs = [], []
        for lvl, blk in enumerate(self.conv_body_up):
            feat = blk(feat + skips[-1 - lvl])
            conditions.append(self.condition_scale[lvl](feat))
            conditions.append(self.condition_shift[lvl](feat))
            if return_rgbs:
                rgbs.append(self.toRGB[lvl](feat))
        image = self.stylegan_decoder(style, conditions, noise=noise,
                                      randomize_noise=randomize_noise)
        return (image, rgbs) if return_rgbs else image


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

def gfpgan_config_from_state(state: dict[str, torch.Tensor], where: str = "state") \
        -> GFPGANConfig:
    """Infer the :class:`GFPGANConfig` of a GFPGANv1-clean state dict (GFPGAN's key names).

    ``input_is_latent`` is not stored in the weights; GFPGANv1.3's value (True) is assumed."""
    from pyface.checkpoint import CheckpointError

    def get(k):
        if k not in state:
            raise CheckpointError(f"{where}: not a GFPGANv1-clean state dict; missing {k!r}")
        return state[k]

    n_down = len({k.split(".")[1] for k in state if k.startswith("conv_body_down.")})
    c4 = get("stylegan_decoder.constant_input.weight")
    if c4.ndim != 4:
        raise CheckpointError(f"{where}: stylegan_decoder.constant_input.weight: expected "
                              f"(1, C, 4, 4), got {tuple(c4.shape)}")
    narrow = c4.shape[1] / 512
    F_ = int(get("stylegan_decoder.to_rgb1.modulated_conv.modulation.weight").shape[1])
    num_mlp = sum(1 for k in state if k.startswith("stylegan_decoder.style_mlp.")
                  and k.endswith(".weight"))
    out_size = 2 ** (n_down + 2)
    cm = 2
    if out_size >= 64:   # the decoder's width at 64x64 is 256 * cm * narrow
        w64 = get("stylegan_decoder.style_convs.6.modulated_conv.weight")
        cm = max(1, round(w64.shape[1] / (256 * narrow)))
    up0 = get("conv_body_up.0.conv2.weight").shape[0]
    sft_half = int(get("condition_scale.0.2.weight").shape[0]) == int(up0)
    n_lin = int(get("final_linear.weight").shape[0])
    different_w = n_lin != F_
    return GFPGANConfig(out_size=out_size, num_style_feat=F_, channel_multiplier=cm,
                        num_mlp=num_mlp, narrow=narrow, sft_half=sft_half,
                        different_w=different_w)


def load_gfpgan(path: str, *, device: str | torch.device = "cpu",
                input_is_latent: bool | None = None) -> GFPGANv1Clean:
    """A ``pyface convert gfpgan`` folder, or a GFPGAN ``.pth`` (``params_ema``, read with
    ``torch.load(weights_only=True)``) -> :class:`GFPGANv1Clean`, loaded strictly (every key and
    shape checked)."""
    import os

    from pyface.checkpoint import load_module_state, load_weights, load_weights_file

    if os.path.isdir(path):
        state, meta = load_weights(path, kind="gfpgan", device=device)
        cfg_d = meta.get("config", {})
        cfg = GFPGANConfig(**{k: v for k, v in cfg_d.items()
                              if k in GFPGANConfig.__dataclass_fields__}) \
            if "out_size" in cfg_d else gfpgan_config_from_state(state, path)
    else:
        raw = load_weights_file(path, map_location=device)
        state = raw.get("params_ema", raw.get("params", raw)) if isinstance(raw, dict) else raw
        cfg = gfpgan_config_from_state(state, path)
    if input_is_latent is not None:
        cfg = GFPGANConfig(**{**asdict(cfg), "input_is_latent": input_is_latent})
    model = GFPGANv1Clean(cfg)
    load_module_state(model, state, f"{path} (GFPGANv1Clean)")
    return model.to(device)


# --------------------------------------------------------------------------------------------
# Discriminator (GFPGAN's ``net_d``: BasicSR's StyleGAN2 discriminator)
# --------------------------------------------------------------------------------------------

@dataclass
class GFPGANDiscriminatorConfig:
    out_size: int = 512
    channel_multiplier: int = 1    # GFPGANv1_net_d / GOHA: 1
    narrow: float = 1.0
    in_channels: int = 3           # 6: GOHA's dual discrimination (image || upsampled render)
    stddev_group: int = 4

    def __post_init__(self):
        L = math.log2(self.out_size) if self.out_size > 0 else 0.0
        if self.out_size < 8 or L != int(L):
            raise ValueError(f"GFPGANDiscriminatorConfig.out_size: expected a power of two >= 8, "
                             f"got {self.out_size}")
        if self.in_channels < 1 or self.stddev_group < 1:
            raise ValueError("GFPGANDiscriminatorConfig: in_channels >= 1 and stddev_group >= 1 "
                             f"expected, got {self.in_channels}, {self.stddev_group}")


class _Weight(nn.Module):
    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*shape))


class _Bias(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n))


class _Blur(nn.Module):
    """[1, 3, 3, 1] low-pass (no parameters) padded for a following stride-2 conv of size k."""

    def __init__(self, k: int):
        super().__init__()
        from pyface.nn.resample import setup_filter

        p = 2 + (k - 1)                       # filter taps - factor + conv size - 1
        self.pad = ((p + 1) // 2, p // 2, (p + 1) // 2, p // 2)
        self.register_buffer("filter", setup_filter((1, 3, 3, 1)), persistent=False)

    def forward(self, x):
        from pyface.nn.resample import upfirdn2d

        return upfirdn2d(x, self.filter.to(x.dtype), padding=self.pad)


class _EqualConv(nn.Module):
    """Equalised-lr convolution (weight * 1/sqrt(fan_in)), optionally after the blur with stride
    2 (``down``); with ``act`` a bias and LeakyReLU(0.2) * sqrt(2) follow. Submodules are named
    like BasicSR's ``ConvLayer``: ``0.weight`` (+ ``1.bias``), or ``0`` = blur, ``1.weight``
    (+ ``2.bias``) when down-sampling."""

    def __init__(self, cin: int, cout: int, k: int, down: bool = False, act: bool = True):
        super().__init__()
        self.k, self.down, self.act = k, down, act
        self.scale = 1 / math.sqrt(cin * k * k)
        parts: list[nn.Module] = [_Blur(k)] if down else []
        parts.append(_Weight(cout, cin, k, k))
        if act:
            parts.append(_Bias(cout))
        for i, m in enumerate(parts):
            self.add_module(str(i), m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = 1 if self.down else 0
        w = self._modules[str(i)].weight * self.scale
        if self.down:
            x = F.conv2d(self._modules["0"](x), w, stride=2)
        else:
            x = F.conv2d(x, w, padding=self.k // 2)
        if self.act:
            x = F.leaky_relu(x + self._modules[str(i + 1)].bias.view(1, -1, 1, 1), 0.2) * SQRT2
        return x


class _DResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _EqualConv(cin, cin, 3)
        self.conv2 = _EqualConv(cin, cout, 3, down=True)
        self.skip = _EqualConv(cin, cout, 1, down=True, act=False)

    def forward(self, x):
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


class _EqualLinear(nn.Module):
    def __init__(self, cin: int, cout: int, act: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale, self.act = 1 / math.sqrt(cin), act

    def forward(self, x):
        if self.act:
            return F.leaky_relu(F.linear(x, self.weight * self.scale) + self.bias, 0.2) * SQRT2
        return F.linear(x, self.weight * self.scale, self.bias)


class GFPGANDiscriminator(nn.Module):
    """StyleGAN2 ResNet discriminator in BasicSR's layout (GFPGAN's ``net_d``, which GOHA's
    stage s1_gan starts from; ``GFPGANv1_net_d.pth``'s ``params`` load unchanged).

    forward(x (B, in_channels, S, S)) -> logits (B, 1). Layout: ``conv_body.0`` (1x1 from
    ``in_channels``), ``conv_body.1 .. L-2`` residual blocks (conv3 -> blur + stride-2 conv3, blur
    + stride-2 1x1 skip, sum / sqrt(2)), minibatch standard deviation (group ``stddev_group``, one
    feature), ``final_conv`` (3x3), ``final_linear`` (two equalised linears, the first with
    LeakyReLU). Widths: 512 to 32x32, then 256 * channel_multiplier / 2^k (times ``narrow``).

    ``in_channels=6`` is GOHA's stage-2 dual discrimination (see :meth:`dual`);
    :func:`load_gfpgan_discriminator` starts it from a 3-channel ``net_d`` with a fresh first
    1x1 conv."""

    def __init__(self, cfg: GFPGANDiscriminatorConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or GFPGANDiscriminatorConfig(**overrides)
        self.cfg = cfg
        L = int(math.log2(cfg.out_size))

        def ch(r):
            return _channels(r, cfg.channel_multiplier, cfg.narrow)

        body: list[nn.Module] = [_EqualConv(cfg.in_channels, ch(cfg.out_size), 1)]
        cin = ch(cfg.out_size)
        for i in range(L, 2, -1):
            body.append(_DResBlock(cin, ch(2 ** (i - 1))))
            cin = ch(2 ** (i - 1))
        self.conv_body = nn.Sequential(*body)
        self.final_conv = _EqualConv(cin + 1, ch(4), 3)
        self.final_linear = nn.Sequential(_EqualLinear(ch(4) * 16, ch(4), act=True),
                                          _EqualLinear(ch(4), 1, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        S, C = cfg.out_size, cfg.in_channels
        if x.ndim != 4 or x.shape[1:] != (C, S, S):
            raise ValueError(f"x: expected shape (B, {C}, {S}, {S}), got {tuple(x.shape)}")
        out = self.conv_body(x)
        B, Cf, H, W = out.shape
        g = min(B, cfg.stddev_group)
        if B % g:
            raise ValueError(f"x: the batch ({B}) must be a multiple of the minibatch-std group "
                             f"({g})")
        # sample n = j * (B / g) + m belongs to group m; one std feature per group
        std = torch.sqrt(out.view(g, -1, Cf, H, W).var(dim=0, unbiased=False) + 1e-8)
        std = std.mean(dim=(1, 2, 3)).view(1, -1, 1, 1, 1).expand(g, -1, 1, H, W)
        out = torch.cat([out, std.reshape(B, 1, H, W)], dim=1)
        return self.final_linear(self.final_conv(out).flatten(1))

    def dual(self, image: torch.Tensor, image_raw: torch.Tensor) -> torch.Tensor:
        """GOHA's dual discrimination: image (B, 3, S, S), image_raw (B, 3, r, r) -> logits
        (B, 1) of :meth:`dual_input` ``image || bilinear(image_raw -> S, align_corners=True)``
        (needs ``in_channels == 6``)."""
        return self(self.dual_input(image, image_raw, "dual"))

    def dual_input(self, image: torch.Tensor, image_raw: torch.Tensor,
                   name: str = "dual_input") -> torch.Tensor:
        """The 6-channel input (B, 6, S, S) that :meth:`dual` discriminates: image (B, 3, S, S)
        and image_raw (B, 3, r, r) upsampled bilinearly to S (``align_corners=True``), stacked
        along the channels (a gradient penalty w.r.t. this tensor is taken on what the
        discriminator sees; w.r.t. ``image_raw`` it is taken through the upsampling)."""
        if self.cfg.in_channels != 6:
            raise ValueError(f"{name}: needs in_channels 6, this discriminator has "
                             f"{self.cfg.in_channels}")
        S = self.cfg.out_size
        if image_raw.ndim != 4 or image_raw.shape[1] != 3:
            raise ValueError(f"image_raw: expected shape (B, 3, r, r), got "
                             f"{tuple(image_raw.shape)}")
        if image.ndim != 4 or image.shape[1:] != (3, S, S):
            raise ValueError(f"image: expected shape (B, 3, {S}, {S}), got "
                             f"{tuple(image.shape)}")
        raw = image_raw if image_raw.shape[-1] == S and image_raw.shape[-2] == S else \
            F.interpolate(image_raw, size=(S, S), mode="bilinear", align_corners=True)
        return torch.cat([image, raw], dim=1)


def gfpgan_discriminator_config_from_state(state: dict[str, torch.Tensor],
                                           where: str = "state") -> GFPGANDiscriminatorConfig:
    """Infer the :class:`GFPGANDiscriminatorConfig` (size, widths, input channels) of a BasicSR
    StyleGAN2 discriminator state dict."""
    from pyface.checkpoint import CheckpointError

    first = state.get("conv_body.0.0.weight")
    c4 = state.get("final_conv.0.weight")
    if first is None or first.ndim != 4 or c4 is None or c4.ndim != 4 \
            or "final_linear.1.weight" not in state:
        raise CheckpointError(f"{where}: not a GFPGAN / BasicSR StyleGAN2 discriminator state "
                              "dict (needs conv_body.0.0.weight, final_conv.0.weight and "
                              "final_linear.1.weight)")
    n_blocks = len({k.split(".")[1] for k in state if k.startswith("conv_body.")}) - 1
    narrow = int(c4.shape[0]) / 512
    out_size = 2 ** (n_blocks + 2)
    cm = 1
    if out_size >= 64:   # width at 64x64 is 256 * cm * narrow: block L - 6 outputs 64x64
        j = int(math.log2(out_size)) - 6
        w = first if j == 0 else state.get(f"conv_body.{j}.conv2.1.weight")
        if w is None:
            raise CheckpointError(f"{where}: missing 'conv_body.{j}.conv2.1.weight'")
        cm = max(1, round(int(w.shape[0]) / (256 * narrow)))
    return GFPGANDiscriminatorConfig(out_size=out_size, channel_multiplier=cm, narrow=narrow,
                                     in_channels=int(first.shape[1]))


def _discriminator_state(path: str) -> dict[str, torch.Tensor]:
    import os

    from pyface.checkpoint import load_weights_file

    raw = load_weights_file(path, map_location="cpu")
    if isinstance(raw, dict) and not os.path.isdir(path):
        for key in ("params", "params_ema", "state_dict"):
            if isinstance(raw.get(key), dict):
                raw = raw[key]
                break
    from pyface.checkpoint import CheckpointError

    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (bare or under "
                              "'params')")
    return dict(raw)


def load_gfpgan_discriminator(path: str, *, in_channels: int | None = None,
                              device: str | torch.device = "cpu") -> GFPGANDiscriminator:
    """GFPGAN ``net_d`` weights (``GFPGANv1_net_d.pth``: ``params``, or a bare state dict; read
    with ``torch.load(weights_only=True)``; or a ``pyface convert gfpgan-d`` folder)
    -> GFPGANDiscriminator.

    The config (size, widths) is inferred from the weights. With ``in_channels`` different from
    the file's, the first 1x1 conv (``conv_body.0.0.weight``) keeps its fresh initialisation, as
    GOHA does for its 6-channel dual discriminator; every other key is loaded strictly."""
    from dataclasses import replace

    from pyface.checkpoint import check_state_dict

    state = _discriminator_state(path)
    cfg = gfpgan_discriminator_config_from_state(state, path)
    file_channels = cfg.in_channels
    if in_channels is not None:
        cfg = replace(cfg, in_channels=in_channels)
    model = GFPGANDiscriminator(cfg)
    if cfg.in_channels != file_channels:
        state["conv_body.0.0.weight"] = model.state_dict()["conv_body.0.0.weight"]
    check_state_dict(model, state, f"{path} (GFPGAN discriminator)")
    model.load_state_dict(state, strict=True)
    return model.to(device)
