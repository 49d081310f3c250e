# Provenance: reproduces the VGG19 feature layout of torchvision (pytorch/vision, BSD-3-Clause) so
# that its released vgg19 .pth loads. Our own implementation, written from the papers and the
# upstream's documented behaviour; no upstream code is copied. pyface's code is licensed under
# Apache-2.0 (LICENSE).
"""VGG19 feature extractor whose state-dict keys match torchvision's ``vgg19`` file
(``features.<i>.weight``), and a multi-layer, multi-scale perceptual loss with a Gram term."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn._pretrained import load_into, read_state, warn_random_init
from pyface.nn._reduce import l1_or_zero, mse_or_zero

# torchvision cfg "E": channels, "M" = max-pool
_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"]


def _layer_names() -> dict[str, int]:
    names, block, idx, i = {}, 1, 1, 0
    for v in _VGG19:
        if v == "M":
            names[f"pool{block}"] = i
            block, idx, i = block + 1, 1, i + 1
        else:
            names[f"conv{block}_{idx}"] = i
            names[f"relu{block}_{idx}"] = i + 1
            idx, i = idx + 1, i + 2
    return names


LAYERS = _layer_names()
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG19(nn.Module):
    """x: (B, 3, H, W) in [-1, 1] -> {layer name: features} for the requested layers
    (``relu1_1`` ... ``relu5_4``, ``conv*``, ``pool*``). Frozen; ImageNet-normalised inside."""

    def __init__(self, weights: str | None = None, layers: Sequence[str] = ("relu5_1",)):
        super().__init__()
        for n in layers:
            if n not in LAYERS:
                raise ValueError(f"layers: unknown VGG19 layer {n!r}; valid: relu1_1 ... relu5_4")
        self.layers = list(layers)
        self.last = max(LAYERS[n] for n in self.layers)
        mods, cin = [], 3
        for v in _VGG19:
            if v == "M":
                mods.append(nn.MaxPool2d(2, 2))
            else:
                mods += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
                cin = v
        self.features = nn.Sequential(*mods)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if weights is not None:
            self.load_torchvision(weights)
        self.requires_grad_(False).eval()

    def load_torchvision(self, path_or_state) -> None:
        """torchvision ``vgg19-*.pth`` (classifier keys are ignored) or a converted file."""
        state = read_state(path_or_state) if isinstance(path_or_state, str) else path_or_state
        load_into(self, state, source=str(path_or_state if isinstance(path_or_state, str)
                                          else "VGG19 state dict"),
                  rename=lambda k: k if k.startswith("features.") else None)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen feature extractor

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out, want = {}, {LAYERS[n]: n for n in self.layers}
        for i, m in enumerate(self.features):
            x = m(x)
            if i in want:
                out[want[i]] = x
            if i >= self.last:
                break
        return out


def gram(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C) Gram matrix normalised by C*H*W."""
    B, C, H, W = x.shape
    f = x.reshape(B, C, H * W)
    return f @ f.transpose(1, 2) / (C * H * W)


@dataclass
class PerceptualConfig:
    layers: list[str] = field(default_factory=lambda: ["relu1_1", "relu2_1", "relu3_1",
                                                       "relu4_1", "relu5_1"])
    layer_weights: list[float] | None = None           # default: 1 each
    scales: list[float] = field(default_factory=lambda: [1.0])   # pyramid, e.g. 1, .5, .25
    style_weight: float = 0.0                           # Gram term (OTAvatar: 250 at scale 1)
    style_scales: int = 1                               # Gram on the first N scales
    criterion: str = "l1"                               # l1 | l2


class PerceptualLoss(nn.Module):
    """VGG19 perceptual loss. pred, target: (B, 3, H, W) in [-1, 1] -> scalar.

    Sum over scales s and layers l of ``w_l * |phi_l(pred_s) - phi_l(target_s)|`` (mean), plus
    ``style_weight`` * the L1 between Gram matrices. ``weights``: torchvision VGG19 file.
    ``forward(pred, target, scales=None)``: ``scales`` (a non-empty sequence of factors in
    (0, 1]) replaces the configured pyramid for that call (e.g. a shorter pyramid on a coarser
    output). An empty batch (B = 0) gives 0, still connected to ``pred`` (backward gives an
    empty gradient)."""

    def __init__(self, cfg: PerceptualConfig | None = None, weights: str | None = None,
                 **overrides):
        super().__init__()
        cfg = cfg or PerceptualConfig(**overrides)
        if cfg.criterion not in ("l1", "l2"):
            raise ValueError(f"criterion: expected 'l1' or 'l2', got {cfg.criterion!r}")
        self.cfg = cfg
        self.vgg = VGG19(weights, cfg.layers)
        self.layer_weights = cfg.layer_weights or [1.0] * len(cfg.layers)
        if len(self.layer_weights) != len(cfg.layers):
            raise ValueError(f"layer_weights: expected {len(cfg.layers)} values, got "
                             f"{len(self.layer_weights)}")
        if weights is None:
            warn_random_init("PerceptualLoss (VGG19)", "the perceptual loss")

    def forward(self, pred: torch.Tensor, target: torch.Tensor,
                scales: Sequence[float] | None = None) -> torch.Tensor:
        if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(f"pred/target: expected equal shapes (B, 3, H, W), got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        if scales is None:
            scales = self.cfg.scales
        elif not len(scales) or not all(0 < float(s) <= 1 for s in scales):
            raise ValueError(f"scales: expected a non-empty list of factors in (0, 1], got "
                             f"{list(scales)}")
        dist = l1_or_zero if self.cfg.criterion == "l1" else mse_or_zero
        total = pred.new_zeros(())
        for si, s in enumerate(scales):
            p, t = pred, target
            if s != 1:
                p = F.interpolate(pred, scale_factor=s, mode="bilinear", align_corners=False,
                                  antialias=s < 1)
                t = F.interpolate(target, scale_factor=s, mode="bilinear", align_corners=False,
                                  antialias=s < 1)
            fp, ft = self.vgg(p), self.vgg(t.detach())
            for name, w in zip(self.cfg.layers, self.layer_weights):
                total = total + w * dist(fp[name], ft[name])
                if self.cfg.style_weight and si < self.cfg.style_scales:
                    total = total + self.cfg.style_weight * l1_or_zero(gram(fp[name]),
                                                                       gram(ft[name]))
        return total
