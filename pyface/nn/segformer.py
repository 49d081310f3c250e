"""SegFormer Mix Transformer (MiT-b0 ... b5) encoder with adaptive-norm conditioning, and the
all-MLP decode head.

Provenance: reproduces the semantics of SegFormer (Xie et al. 2021; NVlabs/SegFormer, NVIDIA
Source Code License) as ported to HuggingFace ``transformers`` (``models/segformer``,
Apache-2.0), whose weight files users load. Parameter names follow ``transformers``
(``encoder.block.0.0.attention.self.query.weight`` ...). The code is our own implementation,
written from the paper and the documented behaviour; no upstream code is copied.

Numerics, matched to ``transformers`` (checked by tests/test_convert.py against an independent
functional transcription):

* every LayerNorm uses eps 1e-5 (PyTorch's default). ``transformers`` builds all of them with
  the default and never reads ``config.layer_norm_eps`` (1e-6 in the released configs);
  :func:`config_from_hf` therefore ignores that field. The original NVlabs code uses 1e-6 for
  the block norms and the per-stage output norms, and 1e-5 for the patch-embedding and
  spatial-reduction norms: ``MiTConfig(layer_norm_eps=1e-6)`` reproduces that;
* the Mix-FFN hidden width is ``int(hidden_size * mlp_ratio)`` per stage; the activation is
  ``hidden_act`` (``"gelu"`` = exact erf GELU);
* attention scores are scaled by ``1 / sqrt(head_dim)``; keys and values come from the
  spatially reduced sequence (strided conv + LayerNorm) when ``sr_ratio > 1``;
* the decode head projects every stage to ``decoder_hidden_size``, upsamples bilinearly
  (``align_corners=False``) to stage 1's size, concatenates in reverse stage order, fuses with a
  bias-free 1x1 conv, then BatchNorm + ReLU (``head_norm=True``);
* training-only regularisers (stochastic depth with a linear ``drop_path_rate`` schedule, hidden
  and attention dropout, classifier dropout) act as in ``transformers``; in eval mode they are
  identities.

Conditioning (Export3D's EAdaLN): blocks built with ``cond_dim > 0`` modulate both of their layer
norms, ``LN(x) * (1 + scale(cond)) + shift(cond)``; the scale/shift projections start at zero, so a
pretrained encoder is unchanged until they learn.
"""
from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn._pretrained import read_state
from pyface.ops._checks import check_choice

# transformers' ACT2FN names that the Mix-FFN supports, and what they compute
_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),                              # exact (erf)
    "gelu_python": lambda x: F.gelu(x),                       # exact (erf), written out
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),      # tanh approximation
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

#: LayerNorm eps of the patch-embedding and spatial-reduction norms (both upstreams).
EMBED_NORM_EPS = 1e-5

#: Keys of the first patch embedding's conv (the stem that sees the input channels), relative to a
#: :class:`SegFormer`; pass as ``skip=`` to :func:`load_hf_segformer` to keep a fresh stem when the
#: input channel count differs from the checkpoint's (drop the ``encoder.`` prefix for a
#: :class:`MixTransformer`).
STEM_KEYS = ("encoder.patch_embeddings.0.proj.weight", "encoder.patch_embeddings.0.proj.bias")


@dataclass
class MiTConfig:
    """SegFormer encoder + decode head.

    Attributes:
        in_channels: input channels (HF ``num_channels``).
        hidden_sizes, depths, num_heads, sr_ratios, patch_sizes, strides: per stage (all the
            same length, the number of stages; HF ``num_encoder_blocks``).
        mlp_ratio: Mix-FFN width ratio, one number for every stage or one per stage (HF
            ``mlp_ratios``); the hidden width is ``int(hidden_size * ratio)``.
        hidden_act: the Mix-FFN activation, one of transformers' names ``gelu`` (exact),
            ``gelu_python``, ``gelu_new`` / ``gelu_pytorch_tanh`` (tanh approximation),
            ``quick_gelu``, ``relu``, ``silu`` / ``swish``.
        layer_norm_eps: eps of the block norms and the per-stage output norms. 1e-5 matches
            transformers (the default); 1e-6 the original NVlabs code. The patch-embedding and
            spatial-reduction norms always use 1e-5 (:data:`EMBED_NORM_EPS`), as in both.
        drop_path_rate: stochastic depth, linearly increasing from 0 over all blocks (training).
        hidden_dropout, attention_dropout: dropout after the attention / Mix-FFN projections and
            on the attention probabilities (training).
        cond_dim: > 0: adaptive block norms conditioned on (B, cond_dim).
        decoder_hidden_size: decode head width.
        head_norm: the decode head ends with BatchNorm + ReLU (SegFormer); False returns the fused
            projection as is and has no ``decode_head.batch_norm`` (GOHA's encoders).
        classifier_dropout: dropout before the decode head's classifier (training; only with a
            classifier).
    """

    in_channels: int = 3
    hidden_sizes: list[int] = field(default_factory=lambda: [32, 64, 160, 256])
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    num_heads: list[int] = field(default_factory=lambda: [1, 2, 5, 8])
    sr_ratios: list[int] = field(default_factory=lambda: [8, 4, 2, 1])
    patch_sizes: list[int] = field(default_factory=lambda: [7, 3, 3, 3])
    strides: list[int] = field(default_factory=lambda: [4, 2, 2, 2])
    mlp_ratio: float | list[float] = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    drop_path_rate: float = 0.0
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    cond_dim: int = 0                 # > 0: adaptive norms conditioned on (B, cond_dim)
    decoder_hidden_size: int = 256    # decode head width
    head_norm: bool = True
    classifier_dropout: float = 0.0

    def __post_init__(self):
        n = len(self.hidden_sizes)
        for name in ("depths", "num_heads", "sr_ratios", "patch_sizes", "strides"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"MiTConfig.{name}: expected {n} entries (one per stage, as "
                                 f"hidden_sizes), got {list(getattr(self, name))}")
        if isinstance(self.mlp_ratio, (list, tuple)) and len(self.mlp_ratio) != n:
            raise ValueError(f"MiTConfig.mlp_ratio: expected one number or {n} (one per stage), "
                             f"got {list(self.mlp_ratio)}")
        check_choice("MiTConfig.hidden_act", self.hidden_act, sorted(_ACTIVATIONS))
        for d, h in zip(self.hidden_sizes, self.num_heads):
            if d % h:
                raise ValueError(f"MiTConfig.num_heads: hidden size {d} is not divisible by {h} "
                                 "heads")

    @property
    def num_stages(self) -> int:
        return len(self.hidden_sizes)

    @property
    def mlp_ratios(self) -> list[float]:
        r = self.mlp_ratio
        return list(r) if isinstance(r, (list, tuple)) else [r] * self.num_stages


_DEPTHS = {"b0": [2, 2, 2, 2], "b1": [2, 2, 2, 2], "b2": [3, 4, 6, 3], "b3": [3, 4, 18, 3],
           "b4": [3, 8, 27, 3], "b5": [3, 6, 40, 3]}


def mit_config(name: str, **overrides) -> MiTConfig:
    """The published MiT configurations ``"b0"`` ... ``"b5"``."""
    check_choice("name", name, sorted(_DEPTHS))
    hidden = [32, 64, 160, 256] if name == "b0" else [64, 128, 320, 512]
    dec = 256 if name in ("b0", "b1") else 768
    kwargs = {"hidden_sizes": hidden, "depths": list(_DEPTHS[name]), "decoder_hidden_size": dec}
    return MiTConfig(**{**kwargs, **overrides})


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples with probability p, scale the rest by 1 / (1 - p)."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype,
                       device=x.device).bernoulli_(1 - p)
    return x * keep / (1 - p)


class AdaptiveLayerNorm(nn.LayerNorm):
    """LayerNorm (same parameters) plus, if ``cond_dim`` > 0, ``ada``: cond -> (scale, shift).

    x (B, N, dim) [, cond (B, cond_dim)] -> (B, N, dim): ``LN(x) * (1 + scale) + shift``."""

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

    def __init__(self, patch: int, stride: int, cin: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, patch, stride, padding=patch // 2)
        self.layer_norm = nn.LayerNorm(dim, eps=EMBED_NORM_EPS)

    def forward(self, x):
        x = self.proj(x)
        _, _, h, w = x.shape
        return self.layer_norm(x.flatten(2).transpose(1, 2)), h, w


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int, attention_dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads, self.sr_ratio, self.attention_dropout = heads, sr, attention_dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.layer_norm = nn.LayerNorm(dim, eps=EMBED_NORM_EPS)

    def forward(self, x, h, w):
        B, N, C = x.shape
        q = self.query(x)
        kv = x
        if self.sr_ratio > 1:
            kv = x.transpose(1, 2).reshape(B, C, h, w)
            kv = self.layer_norm(self.sr(kv).flatten(2).transpose(1, 2))
        k, v = self.key(kv), self.value(kv)
        split = lambda t: t.reshape(B, t.shape[1], self.heads, C // self.heads).transpose(1, 2)  # noqa
        out = F.scaled_dot_product_attention(
            split(q), split(k), split(v),
            dropout_p=self.attention_dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, N, C)


class _Attention(nn.Module):
    def __init__(self, dim, heads, sr, hidden_dropout=0.0, attention_dropout=0.0):
        super().__init__()
        self.self = _SelfAttention(dim, heads, sr, attention_dropout)
        self.output = nn.Module()
        self.output.dense = nn.Linear(dim, dim)
        self.hidden_dropout = hidden_dropout

    def forward(self, x, h, w):
        return F.dropout(self.output.dense(self.self(x, h, w)), self.hidden_dropout,
                         self.training)


class _DWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, h, w):
        B, N, C = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2)


class _MixFFN(nn.Module):
    def __init__(self, dim, hidden, act: str = "gelu", hidden_dropout: float = 0.0):
        super().__init__()
        self.dense1 = nn.Linear(dim, hidden)
        self.dwconv = _DWConv(hidden)
        self.dense2 = nn.Linear(hidden, dim)
        self.act, self.hidden_dropout = _ACTIVATIONS[act], hidden_dropout

    def forward(self, x, h, w):
        p, t = self.hidden_dropout, self.training
        x = F.dropout(self.act(self.dwconv(self.dense1(x), h, w)), p, t)
        return F.dropout(self.dense2(x), p, t)


class MiTBlock(nn.Module):
    """x: (B, h*w, D) [+ cond (B, cond_dim)] -> (B, h*w, D)."""

    def __init__(self, dim, heads, sr, mlp_ratio, eps, cond_dim=0, *, act="gelu",
                 drop_path=0.0, hidden_dropout=0.0, attention_dropout=0.0):
        super().__init__()
        self.layer_norm_1 = AdaptiveLayerNorm(dim, eps, cond_dim)
        self.attention = _Attention(dim, heads, sr, hidden_dropout, attention_dropout)
        self.layer_norm_2 = AdaptiveLayerNorm(dim, eps, cond_dim)
        self.mlp = _MixFFN(dim, int(dim * mlp_ratio), act, hidden_dropout)
        self.drop_path = drop_path

    def forward(self, x, h, w, cond=None):
        x = x + _drop_path(self.attention(self.layer_norm_1(x, cond), h, w), self.drop_path,
                           self.training)
        return x + _drop_path(self.mlp(self.layer_norm_2(x, cond), h, w), self.drop_path,
                              self.training)


class MixTransformer(nn.Module):
    """SegFormer encoder. x: (B, in_channels, H, W) [, cond (B, cond_dim)] -> one feature map per
    stage, (B, hidden_sizes[i], H / (strides[0]·...·strides[i]), ...) (ceil for odd sizes)."""

    def __init__(self, cfg: MiTConfig | None = None):
        super().__init__()
        cfg = cfg or MiTConfig()
        self.cfg = cfg
        eps = cfg.layer_norm_eps
        cins = [cfg.in_channels] + cfg.hidden_sizes[:-1]
        self.patch_embeddings = nn.ModuleList(
            OverlapPatchEmbed(p, s, ci, d)
            for p, s, ci, d in zip(cfg.patch_sizes, cfg.strides, cins, cfg.hidden_sizes))
        total = sum(cfg.depths)   # stochastic depth rises linearly from 0 over all blocks
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        blocks, i = [], 0
        for d, hd, sr, n, r in zip(cfg.hidden_sizes, cfg.num_heads, cfg.sr_ratios, cfg.depths,
                                   cfg.mlp_ratios):
            blocks.append(nn.ModuleList(
                MiTBlock(d, hd, sr, r, eps, cfg.cond_dim, act=cfg.hidden_act,
                         drop_path=rates[i + j], hidden_dropout=cfg.hidden_dropout,
                         attention_dropout=cfg.attention_dropout)
                for j in range(n)))
            i += n
        self.block = nn.ModuleList(blocks)
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
    """All-MLP head: the stage maps -> (B, decoder_hidden_size, h1, w1) at stage 1's size, or
    (B, num_labels, h1, w1) with a ``classifier``. ``head_norm=False`` drops BatchNorm + ReLU."""

    def __init__(self, cfg: MiTConfig, num_labels: int = 0):
        super().__init__()
        D = cfg.decoder_hidden_size
        self.linear_c = nn.ModuleList()
        for d in cfg.hidden_sizes:
            m = nn.Module()
            m.proj = nn.Linear(d, D)
            self.linear_c.append(m)
        self.linear_fuse = nn.Conv2d(cfg.num_stages * D, D, 1, bias=False)
        self.batch_norm = nn.BatchNorm2d(D) if cfg.head_norm else None
        self.classifier = nn.Conv2d(D, num_labels, 1) if num_labels > 0 else None
        self.classifier_dropout = cfg.classifier_dropout

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """feats: the encoder's stage maps (B, D_i, H_i, W_i) -> (B, decoder_hidden_size or
        num_labels, H_0, W_0)."""
        if len(feats) != len(self.linear_c):
            raise ValueError(f"feats: expected {len(self.linear_c)} stage maps, got {len(feats)}")
        size = feats[0].shape[-2:]
        ups = []
        for f, lin in zip(feats, self.linear_c):
            B, C, h, w = f.shape
            y = lin.proj(f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, -1, h, w)
            ups.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        x = self.linear_fuse(torch.cat(ups[::-1], dim=1))
        if self.batch_norm is not None:
            x = F.relu(self.batch_norm(x))
        if self.classifier is None:
            return x
        return self.classifier(F.dropout(x, self.classifier_dropout, self.training))


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


# ------------------------------------------------------------------------------------------------
# HuggingFace-format files
# ------------------------------------------------------------------------------------------------

_PYFACE_META = "meta.json"
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# config.json fields that do not change the forward pass of a pyface module (ids and labels,
# loss settings, initialisation, output layout)
_HF_INERT = ("reshape_last_stage", "semantic_loss_ignore_index", "initializer_range",
             "layer_norm_eps", "id2label", "label2id", "num_labels")


def _is_pyface_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, _PYFACE_META))


def config_from_hf(path: str, **overrides) -> MiTConfig:
    """MiTConfig from a local HuggingFace ``config.json`` (folder or file), or from a folder
    written by ``pyface convert segformer``.

    Read: ``num_channels``, ``hidden_sizes``, ``depths``, ``num_attention_heads``, ``sr_ratios``,
    ``patch_sizes``, ``strides``, ``mlp_ratios`` (per stage), ``hidden_act``,
    ``decoder_hidden_size``, ``drop_path_rate``, ``hidden_dropout_prob``,
    ``attention_probs_dropout_prob``, ``classifier_dropout_prob``; ``num_encoder_blocks`` must
    equal the length of every per-stage list. ``layer_norm_eps`` is ignored because transformers
    ignores it (every LayerNorm there uses 1e-5). An unsupported ``hidden_act`` or inconsistent
    stage counts raise ValueError. ``overrides`` (MiTConfig field names, e.g. ``in_channels=6``,
    ``head_norm=False``) replace what the file says.
    """
    names = {f.name for f in fields(MiTConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise TypeError(f"config_from_hf: unknown MiTConfig fields {bad}; expected some of "
                        f"{sorted(names)}")
    if _is_pyface_folder(path):
        from pyface.checkpoint import read_meta

        meta = read_meta(path)
        if meta.get("kind") != "segformer":
            raise ValueError(f"{path}: holds {meta.get('kind')!r} weights, expected 'segformer'")
        cfg = {k: v for k, v in meta["config"].items() if k in names}
        return MiTConfig(**{**cfg, **overrides})
    f = os.path.join(path, "config.json") if os.path.isdir(path) else path
    with open(f) as fh:
        hf = json.load(fh)

    def need(key):
        if key not in hf:
            raise ValueError(f"{f}: config.json has no {key!r} (is this a SegFormer config?)")
        return hf[key]

    n = int(hf.get("num_encoder_blocks", len(need("hidden_sizes"))))
    per_stage = {"hidden_sizes": "hidden_sizes", "depths": "depths",
                 "num_attention_heads": "num_heads", "sr_ratios": "sr_ratios",
                 "patch_sizes": "patch_sizes", "strides": "strides", "mlp_ratios": "mlp_ratio"}
    kwargs = {}
    for key, ours in per_stage.items():
        v = need(key) if key != "mlp_ratios" else hf.get(key, [4] * n)
        if not isinstance(v, list) or len(v) != n:
            raise ValueError(f"{f}: {key} = {v!r} does not have num_encoder_blocks = {n} entries")
        kwargs[ours] = list(v)
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{f}: hidden_act {act!r} is not supported; expected one of "
                         f"{sorted(_ACTIVATIONS)}")
    kwargs.update(in_channels=int(hf.get("num_channels", 3)), hidden_act=act,
                  decoder_hidden_size=int(hf.get("decoder_hidden_size", 256)),
                  drop_path_rate=float(hf.get("drop_path_rate", 0.0)),
                  hidden_dropout=float(hf.get("hidden_dropout_prob", 0.0)),
                  attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.0)),
                  classifier_dropout=float(hf.get("classifier_dropout_prob", 0.0)))
    return MiTConfig(**{**kwargs, **overrides})


def _weights_file(path: str) -> str:
    if os.path.isdir(path):
        if _is_pyface_folder(path):
            return path
        for name in _HF_WEIGHTS:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (and not a "
                                "folder written by `pyface convert segformer`)")
    return path


def read_hf_segformer(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """HF-format SegFormer weights (a folder with ``model.safetensors`` / ``pytorch_model.bin``,
    such a file, or a ``pyface convert segformer`` folder), read without executing code.

    Returns ``(state, info)``: ``state`` with pyface key names (``segformer.`` stripped,
    ``encoder.*``, ``decode_head.*`` including its classifier); ``info`` has ``file``,
    ``decode_head`` (whether the file has one), ``head_norm`` (whether that head has a
    ``batch_norm``), ``num_labels`` of the segmentation classifier (0: none) and ``dropped``: keys
    that no pyface module holds (the image-classification head ``classifier.*`` of
    ``SegformerForImageClassification``).
    """
    from pyface.checkpoint import CheckpointError

    f = _weights_file(path)
    state = read_state(f)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise CheckpointError(f"{f}: expected a state dict of tensors")
    out, dropped = {}, []
    for k, v in state.items():
        k = k[len("segformer."):] if k.startswith("segformer.") else k
        if k.startswith(("encoder.", "decode_head.")):
            out[k] = v
        else:
            dropped.append(k)
    if not any(k.startswith("encoder.") for k in out):
        raise CheckpointError(f"{f}: no SegFormer encoder keys (expected 'segformer.encoder.*' or "
                              f"'encoder.*', got e.g. {sorted(state)[:3]})")
    cls = out.get("decode_head.classifier.weight")
    info = {"file": f,
            "decode_head": any(k.startswith("decode_head.") and ".classifier." not in k
                               for k in out),
            "head_norm": "decode_head.batch_norm.weight" in out,
            "num_labels": int(cls.shape[0]) if cls is not None else 0,
            "dropped": dropped}
    return out, info


def load_hf_segformer(module: MixTransformer | SegFormer, path: str, *,
                      allow_missing_head: bool = True, skip: Sequence[str] = (),
                      replace: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """Load HuggingFace-format SegFormer weights into ``module`` (see :func:`read_hf_segformer`
    for what ``path`` may be; a folder written by ``pyface convert segformer`` works too).

    Key handling: ``segformer.`` prefixes are stripped; the image-classification head
    (``classifier.*``) is never loaded; ``decode_head.classifier`` is dropped when the module has
    no classifier, ``decode_head.batch_norm`` when it was built with ``head_norm=False``; a
    :class:`MixTransformer` takes the ``encoder.*`` part. The conditioning projections
    (``.ada.``) may be missing, and with ``allow_missing_head`` the whole decode head (an
    encoder-only file) - it then keeps its initialisation, listed in the return value.

    Args:
        skip: module keys (``fnmatch`` patterns, module-relative names) NOT loaded: they keep the
            module's fresh initialisation and may differ in shape from the file, e.g. a
            6-channel stem from a 3-channel checkpoint: ``skip=STEM_KEYS`` (``"encoder."``
            prefix dropped for a MixTransformer). Every pattern must match a module key.
        replace: module key -> tensor used instead of the file's (same shape as the module's),
            e.g. a stem widened from the pretrained one.
    Returns:
        The module keys left at their initialisation.
    Raises:
        CheckpointError naming missing / unexpected keys and shape mismatches (a mismatched stem
        names ``skip=``), ValueError for a pattern or replacement that names no module key.
    """
    from pyface.checkpoint import CheckpointError

    state, info = read_hf_segformer(path)
    f = info["file"]
    enc_only = isinstance(module, MixTransformer)
    head = None if enc_only else module.decode_head
    mapped = {}
    for k, v in state.items():
        if k.startswith("decode_head."):
            if enc_only:
                continue
            if k.startswith("decode_head.classifier.") and head.classifier is None:
                continue
            if k.startswith("decode_head.batch_norm.") and head.batch_norm is None:
                continue
        elif enc_only:
            k = k[len("encoder."):]
        mapped[k] = v
    own = module.state_dict()
    kept = set()
    for pat in skip:
        hits = [k for k in own if fnmatch.fnmatchcase(k, pat)]
        if not hits:
            raise ValueError(f"skip: pattern {pat!r} matches no key of the module (keys look "
                             f"like {next(iter(own))!r})")
        kept.update(hits)
    for k in kept:
        mapped.pop(k, None)
    for k, v in (replace or {}).items():
        if k not in own:
            raise ValueError(f"replace: {k!r} is not a key of the module")
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"replace[{k!r}]: expected shape {tuple(own[k].shape)}, got "
                             f"{tuple(v.shape)}")
        mapped[k] = v
    head_in_file = any(k.startswith("decode_head.") and ".classifier." not in k for k in mapped)

    def optional(k):
        return (".ada." in k or k.endswith("num_batches_tracked") or k in kept
                or (allow_missing_head and not head_in_file and k.startswith("decode_head.")))

    missing = [k for k in own if k not in mapped and not optional(k)]
    unexpected = [k for k in mapped if k not in own]
    shapes = [f"{k}: file {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
              for k in mapped if k in own and mapped[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        hint = ""
        stem = "patch_embeddings.0.proj.weight"
        if any(s.split(":")[0].endswith(stem) for s in shapes):
            hint = (" - the input channels differ from the checkpoint's; pass "
                    "skip=pyface.nn.segformer.STEM_KEYS to keep a fresh stem, or replace=...")
        if any(k.startswith("decode_head.classifier.") for k in missing):
            hint += " - the file has no segmentation classifier; build the module with " \
                    "num_labels=0"
        raise CheckpointError(f"{f}: SegFormer weights do not fit (missing: {missing[:5]}, "
                              f"unexpected: {unexpected[:5]}, shapes: {shapes[:5]}){hint}")
    module.load_state_dict(mapped, strict=False)
    return [k for k in own if k not in mapped]


def load_segformer(path: str, *, num_labels: int | None = None, encoder_only: bool = False,
                   skip: Sequence[str] = (), replace: Mapping[str, torch.Tensor] | None = None,
                   **overrides) -> SegFormer | MixTransformer:
    """Build and load a SegFormer from an HF-format folder or a ``pyface convert segformer``
    folder: the config from :func:`config_from_hf` (``overrides`` applied, e.g.
    ``in_channels=6`` with ``skip=STEM_KEYS``, ``head_norm=False``), the weights with
    :func:`load_hf_segformer`. ``num_labels`` defaults to the file's segmentation classifier
    size when it has one; ``encoder_only`` (or a file without a decode head) returns a
    :class:`MixTransformer`."""
    cfg = config_from_hf(path, **overrides)
    _, info = read_hf_segformer(path)
    if encoder_only or not info["decode_head"]:
        if num_labels:
            raise ValueError(f"num_labels: {path} has no decode head to classify with")
        module = MixTransformer(cfg)
        skip = [s[len("encoder."):] if s.startswith("encoder.") else s for s in skip]
        replace = {(k[len("encoder."):] if k.startswith("encoder.") else k): v
                   for k, v in (replace or {}).items()}
    else:
        module = SegFormer(cfg, info["num_labels"] if num_labels is None else num_labels)
    load_hf_segformer(module, path, allow_missing_head=False, skip=skip, replace=replace)
    return module

