"""SegFormer Mix Transformer (MiT-b0 ... b5) encoder with adaptive-norm conditioning, and the
all-MLP decode head. Parameter names follow HuggingFace ``transformers``' SegFormer
(``encoder.block.0.0.attention.self.query.weight`` ...), so HF-format weights load from a local
folder with :func:`load_hf_segformer`.

Conditioning (Export3D's EAdaLN): blocks built with ``cond_dim > 0`` modulate both of their layer
norms, ``LN(x) * (1 + scale(cond)) + shift(cond)``; the scale/shift projections start at zero, so a
pretrained encoder is unchanged until they learn.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn._pretrained import read_state


@dataclass
class MiTConfig:
    in_channels: int = 3
    hidden_sizes: list[int] = field(default_factory=lambda: [32, 64, 160, 256])
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    num_heads: list[int] = field(default_factory=lambda: [1, 2, 5, 8])
    sr_ratios: list[int] = field(default_factory=lambda: [8, 4, 2, 1])
    patch_sizes: list[int] = field(default_factory=lambda: [7, 3, 3, 3])
    strides: list[int] = field(default_factory=lambda: [4, 2, 2, 2])
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-6
    cond_dim: int = 0                 # > 0: adaptive norms conditioned on (B, cond_dim)
    decoder_hidden_size: int = 256    # decode head width


_DEPTHS = {"b0": [2, 2, 2, 2], "b1": [2, 2, 2, 2], "b2": [3, 4, 6, 3], "b3": [3, 4, 18, 3],
           "b4": [3, 8, 27, 3], "b5": [3, 6, 40, 3]}


def mit_config(name: str, **overrides) -> MiTConfig:
    """The published MiT configurations ``"b0"`` ... ``"b5"``."""
    if name not in _DEPTHS:
        raise ValueError(f"name: expected one of {sorted(_DEPTHS)}, got {name!r}")
    hidden = [32, 64, 160, 256] if name == "b0" else [64, 128, 320, 512]
    dec = 256 if name in ("b0", "b1") else 768
    kwargs = {"hidden_sizes": hidden, "depths": list(_DEPTHS[name]), "decoder_hidden_size": dec}
    return MiTConfig(**{**kwargs, **overrides})


class AdaptiveLayerNorm(nn.LayerNorm):
    """LayerNorm (same parameters) plus, if ``cond_dim`` > 0, ``ada``: cond -> (scale, shift)."""

    def __init__(self, dim: int, eps: float, cond_dim: int = 0):
        super().__init__(dim, eps=eps)
        self.ada = None
        if cond_dim > 0:
            self.ada = nn.Linear(cond_dim, 2 * dim)
            nn.init.zeros_(self.ada.weight)
            nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        y = super().forward(x)
        if self.ada is not None:
            if cond is None:
                raise ValueError("cond: this encoder was built with cond_dim > 0; pass "
                                 "cond (B, cond_dim)")
            scale, shift = self.ada(cond).unsqueeze(1).chunk(2, dim=-1)
            y = y * (1 + scale) + shift
        return y


class OverlapPatchEmbed(nn.Module):
    """(B, C, H, W) -> tokens (B, h*w, D), h, w."""

    def __init__(self, patch: int, stride: int, cin: int, dim: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, patch, stride, padding=patch // 2)
        self.layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        x = self.proj(x)
        _, _, h, w = x.shape
        return self.layer_norm(x.flatten(2).transpose(1, 2)), h, w


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int, eps: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads, self.sr_ratio = heads, sr
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, h, w):
        B, N, C = x.shape
        q = self.query(x)
        kv = x
        if self.sr_ratio > 1:
            kv = x.transpose(1, 2).reshape(B, C, h, w)
            kv = self.layer_norm(self.sr(kv).flatten(2).transpose(1, 2))
        k, v = self.key(kv), self.value(kv)
        split = lambda t: t.reshape(B, -1, self.heads, C // self.heads).transpose(1, 2)  # noqa
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(B, N, C)


class _Attention(nn.Module):
    def __init__(self, dim, heads, sr, eps):
        super().__init__()
        self.self = _SelfAttention(dim, heads, sr, eps)
        self.output = nn.Module()
        self.output.dense = nn.Linear(dim, dim)

    def forward(self, x, h, w):
        return self.output.dense(self.self(x, h, w))


class _DWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, h, w):
        B, N, C = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2)


class _MixFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.dense1 = nn.Linear(dim, hidden)
        self.dwconv = _DWConv(hidden)
        self.dense2 = nn.Linear(hidden, dim)

    def forward(self, x, h, w):
        return self.dense2(F.gelu(self.dwconv(self.dense1(x), h, w)))


class MiTBlock(nn.Module):
    """x: (B, h*w, D) [+ cond (B, cond_dim)] -> (B, h*w, D)."""

    def __init__(self, dim, heads, sr, mlp_ratio, eps, cond_dim=0):
        super().__init__()
        self.layer_norm_1 = AdaptiveLayerNorm(dim, eps, cond_dim)
        self.attention = _Attention(dim, heads, sr, eps)
        self.layer_norm_2 = AdaptiveLayerNorm(dim, eps, cond_dim)
        self.mlp = _MixFFN(dim, dim * mlp_ratio)

    def forward(self, x, h, w, cond=None):
        x = x + self.attention(self.layer_norm_1(x, cond), h, w)
        return x + self.mlp(self.layer_norm_2(x, cond), h, w)


class MixTransformer(nn.Module):
    """SegFormer encoder. x: (B, in_channels, H, W) [, cond (B, cond_dim)] -> 4 feature maps
    (B, D_i, H / 4·2^i, W / 4·2^i)."""

    def __init__(self, cfg: MiTConfig | None = None):
        super().__init__()
        cfg = cfg or MiTConfig()
        self.cfg = cfg
        eps = cfg.layer_norm_eps
        cins = [cfg.in_channels] + cfg.hidden_sizes[:-1]
        self.patch_embeddings = nn.ModuleList(
            OverlapPatchEmbed(p, s, ci, d, eps)
            for p, s, ci, d in zip(cfg.patch_sizes, cfg.strides, cins, cfg.hidden_sizes))
        self.block = nn.ModuleList(
            nn.ModuleList(MiTBlock(d, hd, sr, cfg.mlp_ratio, eps, cfg.cond_dim)
                          for _ in range(n))
            for d, hd, sr, n in zip(cfg.hidden_sizes, cfg.num_heads, cfg.sr_ratios, cfg.depths))
        self.layer_norm = nn.ModuleList(nn.LayerNorm(d, eps=eps) for d in cfg.hidden_sizes)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"x: expected shape (B, {self.cfg.in_channels}, H, W), got "
                             f"{tuple(x.shape)}")
        outs = []
        for embed, blocks, norm in zip(self.patch_embeddings, self.block, self.layer_norm):
            t, h, w = embed(x)
            for blk in blocks:
                t = blk(t, h, w, cond)
            t = norm(t)
            x = t.transpose(1, 2).reshape(t.shape[0], -1, h, w)
            outs.append(x)
        return outs


class SegformerDecodeHead(nn.Module):
    """All-MLP head: 4 maps -> (B, decoder_hidden_size, H/4, W/4) (``classifier`` optional)."""

    def __init__(self, cfg: MiTConfig, num_labels: int = 0):
        super().__init__()
        D = cfg.decoder_hidden_size
        self.linear_c = nn.ModuleList()
        for d in cfg.hidden_sizes:
            m = nn.Module()
            m.proj = nn.Linear(d, D)
            self.linear_c.append(m)
        self.linear_fuse = nn.Conv2d(4 * D, D, 1, bias=False)
        self.batch_norm = nn.BatchNorm2d(D)
        self.classifier = nn.Conv2d(D, num_labels, 1) if num_labels > 0 else None

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        ups = []
        for f, lin in zip(feats, self.linear_c):
            B, C, h, w = f.shape
            y = lin.proj(f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, -1, h, w)
            ups.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        x = F.relu(self.batch_norm(self.linear_fuse(torch.cat(ups[::-1], dim=1))))
        return self.classifier(x) if self.classifier is not None else x


class SegFormer(nn.Module):
    """Encoder + decode head (``encoder.*``, ``decode_head.*``). x: (B, C, H, W) [, cond]
    -> (B, decoder_hidden_size or num_labels, H/4, W/4)."""

    def __init__(self, cfg: MiTConfig | None = None, num_labels: int = 0):
        super().__init__()
        self.cfg = cfg or MiTConfig()
        self.encoder = MixTransformer(self.cfg)
        self.decode_head = SegformerDecodeHead(self.cfg, num_labels)

    def forward(self, x, cond=None):
        return self.decode_head(self.encoder(x, cond))


def config_from_hf(path: str, **overrides) -> MiTConfig:
    """MiTConfig from a local HuggingFace ``config.json`` (folder or file)."""
    f = os.path.join(path, "config.json") if os.path.isdir(path) else path
    with open(f) as fh:
        hf = json.load(fh)
    return MiTConfig(in_channels=hf.get("num_channels", 3), hidden_sizes=hf["hidden_sizes"],
                     depths=hf["depths"], num_heads=hf["num_attention_heads"],
                     sr_ratios=hf["sr_ratios"], patch_sizes=hf["patch_sizes"],
                     strides=hf["strides"], mlp_ratio=hf.get("mlp_ratios", [4])[0],
                     layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
                     decoder_hidden_size=hf.get("decoder_hidden_size", 256), **overrides)


def load_hf_segformer(module: MixTransformer | SegFormer, path: str, *,
                      allow_missing_head: bool = True) -> list[str]:
    """Load HuggingFace-format SegFormer weights from a local folder (``model.safetensors`` or
    ``pytorch_model.bin``, read without executing code) or file.

    ``segformer.`` prefixes are stripped; ``decode_head.classifier`` is dropped when the module
    has no classifier; the conditioning projections (``.ada.``) and, with
    ``allow_missing_head``, the decode head may be missing. Any other missing or unexpected key,
    or a shape mismatch, raises CheckpointError. Returns the module keys left at their init.
    """
    from pyface.checkpoint import CheckpointError

    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
    state = read_state(path)
    mapped = {}
    enc_only = isinstance(module, MixTransformer)
    for k, v in state.items():
        k = k[len("segformer."):] if k.startswith("segformer.") else k
        if enc_only:
            if not k.startswith("encoder."):
                continue
            k = k[len("encoder."):]
        if k.startswith("decode_head.classifier") and (
                enc_only or module.decode_head.classifier is None):
            continue
        mapped[k] = v
    own = module.state_dict()
    optional = lambda k: ".ada." in k or (allow_missing_head and k.startswith("decode_head."))  # noqa
    missing = [k for k in own if k not in mapped and not optional(k)]
    unexpected = [k for k in mapped if k not in own]
    shapes = [f"{k}: file {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
              for k in mapped if k in own and mapped[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{path}: SegFormer weights do not fit (missing: {missing[:5]}, "
                              f"unexpected: {unexpected[:5]}, shapes: {shapes[:5]})")
    module.load_state_dict(mapped, strict=False)
    return [k for k in own if k not in mapped]
