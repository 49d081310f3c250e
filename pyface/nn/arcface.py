# Provenance: reproduces the IResNet layout of insightface's arcface_torch
# (deepinsight/insightface, MIT) so that its released .pth files load; the weights carry their own
# terms. Our own implementation, written from the papers and the upstream's documented behaviour;
# no upstream code is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""ArcFace identity loss with an IResNet backbone whose state-dict keys match insightface's
released ``arcface_torch`` ``.pth`` files (``conv1``, ``bn1``, ``prelu``, ``layer1.0.bn1`` ...,
``bn2``, ``fc``, ``features``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn._pretrained import load_into, read_state, warn_random_init
from pyface.nn._reduce import mean_or_zero
from pyface.ops._checks import check_choice

IRESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3),
                  "r100": (3, 13, 30, 3)}


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    """x: (B, 3, 112, 112) in [-1, 1] -> embedding (B, 512)."""

    def __init__(self, arch: str = "r50", embedding: int = 512, dropout: float = 0.0):
        super().__init__()
        check_choice("arch", arch, sorted(IRESNET_LAYERS))
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        cin = 64
        for i, (n, planes) in enumerate(zip(IRESNET_LAYERS[arch], (64, 128, 256, 512))):
            blocks = [IBasicBlock(cin, planes, 2)] + [IBasicBlock(planes, planes)
                                                      for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = planes
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(512 * 7 * 7, embedding)
        self.features = nn.BatchNorm1d(embedding, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (3, 112, 112):
            raise ValueError(f"x: expected shape (B, 3, 112, 112), got {tuple(x.shape)}")
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x).flatten(1))
        return self.features(self.fc(x))


@dataclass
class IdentityConfig:
    arch: str = "r50"
    crop: tuple[float, float, float, float] | None = None   # (x0, y0, x1, y1) relative face box


class IdentityLoss(nn.Module):
    """1 - cos(ArcFace(pred), ArcFace(target)), mean over the batch.

    pred, target: (B, 3, H, W) in [-1, 1], aligned face crops (optionally cropped by
    ``crop`` first) resized to 112x112. ``weights``: insightface ``.pth`` for ``arch``. An empty
    batch (B = 0) gives 0, still connected to ``pred``."""

    def __init__(self, cfg: IdentityConfig | None = None, weights: str | None = None,
                 **overrides):
        super().__init__()
        self.cfg = cfg or IdentityConfig(**overrides)
        self.net = IResNet(self.cfg.arch)
        if weights is not None:
            load_into(self.net, read_state(weights), source=weights)
        else:
            warn_random_init("IdentityLoss (ArcFace)", "the identity loss")
        self.net.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit ArcFace embeddings (N, D) of images x (N, 3, H, W) in [-1, 1]."""
        if self.cfg.crop is not None:
            H, W = x.shape[-2:]
            x0, y0, x1, y1 = self.cfg.crop
            x = x[..., int(y0 * H):int(y1 * H), int(x0 * W):int(x1 * W)]
        x = F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=False,
                          antialias=True)
        return F.normalize(self.net(x), dim=1)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            et = self.embed(target)
        return mean_or_zero(1 - (self.embed(pred) * et).sum(1))
