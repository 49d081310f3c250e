# Provenance: reproduces the head-pose / expression estimator of face-vid2vid as reimplemented in
# zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis (commit 9511d25, CC BY-NC
# 4.0). Our own implementation, written from the papers and the upstream's documented behaviour;
# no upstream code is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""Convolutional encoders: a ResNet bottleneck encoder and the face-vid2vid head-pose /
expression estimator built on it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 residual bottleneck with BatchNorm. (B, cin, H, W) ->
    (B, cout, H/stride, W/stride)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expansion: int = 4):
        super().__init__()
        mid = cout // expansion
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.norm3 = nn.BatchNorm2d(cout)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return F.relu(y + (x if self.skip is None else self.skip(x)))


@dataclass
class ResNetConfig:
    in_channels: int = 3
    stem_channels: int = 64
    widths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    depths: list[int] = field(default_factory=lambda: [3, 4, 6, 3])   # ResNet-50
    #: the stem's 3x3 stride-2 max-pool (ResNet's); False keeps the stem output at H/2 x W/2,
    #: so the stages run at 2x the resolution (4x the cost) for small inputs
    stem_pool: bool = True
    #: the stem's 7x7 convolution stride (ResNet's 2); 4 reads a 2x larger input at the same
    #: stage resolutions (and cost) as stride 2 at the smaller one: the stem still sees every
    #: pixel (kernel 7 > stride 4)
    stem_stride: int = 2


class ResNetEncoder(nn.Module):
    """x: (B, in_channels, H, W) -> pooled features (B, widths[-1]); ``features(x)`` gives the
    stage maps."""

    def __init__(self, cfg: ResNetConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or ResNetConfig(**overrides)
        self.cfg = cfg
        if cfg.stem_stride not in (1, 2, 4):
            raise ValueError(f"stem_stride: expected 1, 2 or 4, got {cfg.stem_stride}")
        stem = [nn.Conv2d(cfg.in_channels, cfg.stem_channels, 7, cfg.stem_stride, 3, bias=False),
                nn.BatchNorm2d(cfg.stem_channels), nn.ReLU()]
        if cfg.stem_pool:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        stages, cin = [], cfg.stem_channels
        for i, (w, d) in enumerate(zip(cfg.widths, cfg.depths)):
            blocks = [Bottleneck(cin, w, stride=1 if i == 0 else 2)]
            blocks += [Bottleneck(w, w) for _ in range(d - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.ModuleList(stages)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"x: expected shape (B, {self.cfg.in_channels}, H, W), got "
                             f"{tuple(x.shape)}")
        x = self.stem(x)
        out = []
        for s in self.stages:
            x = s(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[-1].mean(dim=(2, 3))


@dataclass
class HeadPoseConfig:
    backbone: ResNetConfig = field(default_factory=ResNetConfig)
    num_bins: int = 66            # yaw / pitch / roll classification bins of 3 degrees
    num_keypoints: int = 15       # expression deltas: (K, 3)


class HeadPoseExpressionEstimator(nn.Module):
    """face-vid2vid's head-pose / expression estimator.

    image (B, 3, H, W) -> dict: ``yaw``, ``pitch``, ``roll`` (B, num_bins) logits and their
    expected angles in degrees ``*_deg`` (B,) (``sum softmax * idx * 3 - 99`` for 66 bins),
    ``t`` (B, 3), ``exp`` (B, K, 3)."""

    def __init__(self, cfg: HeadPoseConfig | None = None):
        super().__init__()
        cfg = cfg or HeadPoseConfig()
        self.cfg = cfg
        self.backbone = ResNetEncoder(cfg.backbone)
        d = cfg.backbone.widths[-1]
        self.fc_yaw = nn.Linear(d, cfg.num_bins)
        self.fc_pitch = nn.Linear(d, cfg.num_bins)
        self.fc_roll = nn.Linear(d, cfg.num_bins)
        self.fc_t = nn.Linear(d, 3)
        self.fc_exp = nn.Linear(d, 3 * cfg.num_keypoints)
        self.register_buffer("bin_idx", torch.arange(cfg.num_bins, dtype=torch.float32),
                             persistent=False)

    def angle(self, logits: torch.Tensor) -> torch.Tensor:
        half = self.cfg.num_bins * 3 / 2
        return (logits.softmax(-1) * self.bin_idx).sum(-1) * 3 - half

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.backbone(image)
        out = {"yaw": self.fc_yaw(f), "pitch": self.fc_pitch(f), "roll": self.fc_roll(f),
               "t": self.fc_t(f),
               "exp": self.fc_exp(f).view(f.shape[0], self.cfg.num_keypoints, 3)}
        for k in ("yaw", "pitch", "roll"):
            out[f"{k}_deg"] = self.angle(out[k])
        return out
