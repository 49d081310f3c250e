# Provenance: reproduces the layout of the ResNetArcFace-18 identity network used by GFPGAN and
# OTAvatar (TencentARC/GFPGAN, Apache-2.0, basicsr/archs/arcface_arch.py layout; theEricMa/
# OTAvatar, commit c8c484f, CC BY-NC-SA 4.0, uses it on grayscale crops) so that its released
# weights load, and the 5-point similarity alignment onto insightface's 112-px ArcFace template
# (deepinsight/insightface, MIT; a least-squares similarity, Umeyama 1991). Our own
# implementation, written from the documented behaviour; no upstream code is copied. pyface's
# code is licensed under Apache-2.0 (LICENSE).
"""ResNetArcFace-18 on 128x128 grayscale crops, 68 -> 5-point similarity alignment, and the
identity loss built from them (OTAvatar's ArcFace term).

* :func:`five_points` (from :mod:`pyface.face.align`): landmarks (N, 68, 2) -> (N, 5, 2): eye
  centres (means of 36-41 and 42-47; ``eyes="corners"``, the midpoints of 36/39 and 42/45, is
  what :func:`align_crops` uses, as OTAvatar), nose tip (30), mouth corners (48, 54).
* :func:`align_crops`: images (N, C, H, W) + landmarks (N, 68 | 5, 2) pixels (corner at 0)
  -> (N, C, S, S) crops, a least-squares similarity mapping the 5 points onto the 112-px
  template placed in the top-left corner of an S = 128 canvas (offset 0, as OTAvatar's
  identity loss; ``offset=8`` centres it), in the template's pixel-centre
  coordinates (:func:`pyface.face.align.pixel_centres`, :func:`pyface.face.align.warp_affine`,
  as the csim metric), differentiable with respect to the images.
* :class:`ResNetArcFace`: (N, 1, 128, 128) -> (N, 512). State-dict keys ``conv1``, ``bn1``,
  ``prelu``, ``layer{1-4}.{i}.{bn0,conv1,bn1,prelu,conv2,bn2,downsample.{0,1}}``, ``bn4``,
  ``fc5``, ``bn5``.
* :class:`ArcFaceIdentityLoss`: ``1 - cos`` of the embeddings of the aligned grayscale crops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyface.face.align import (ARCFACE_TEMPLATE, five_points, pixel_centres, umeyama_similarity,
                               warp_affine)
from pyface.nn._pretrained import load_into, read_state, warn_random_init
from pyface.nn._reduce import mean_or_zero

#: insightface's 5-point template for 112 x 112 crops (left eye, right eye, nose, mouth corners)
TEMPLATE_112 = tuple(tuple(p) for p in ARCFACE_TEMPLATE.tolist())


def similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src (N, K, 2) onto
    dst (N, K, 2) or (K, 2): (N, 2, 3) matrices ``[s R | t]`` in src's dtype
    (:func:`pyface.face.align.umeyama_similarity`)."""
    dst = dst.to(src.device).expand(src.shape[0], *src.shape[1:])
    return umeyama_similarity(src, dst).to(src.dtype)


def align_crops(images: torch.Tensor, landmarks: torch.Tensor, size: int = 128,
                offset: float = 0.0, eyes: str = "corners") -> torch.Tensor:
    """images (N, C, H, W), landmarks (N, 68 | 5, 2) pixels of images with the image corner at 0
    (pixel i covers [i, i + 1), pyface's convention) -> aligned crops (N, C, size, size): the 5
    points land on the 112-px template shifted by ``offset`` (0: the template's own coordinates
    in the size² canvas, as OTAvatar's identity loss warps onto it), in the template's pixel-centre
    coordinates (pixel i's centre at i: the landmarks move there by
    :func:`pyface.face.align.pixel_centres`), sampled by :func:`pyface.face.align.warp_affine`
    (bilinear, zeros outside; the reference's kornia ``warp_affine``, as the csim metric's
    ``align_faces``). ``eyes``: the eye centres of 68-point landmarks
    (:func:`pyface.face.align.five_points`): ``"corners"``, the midpoints of the eye corners
    36/39 and 42/45, as OTAvatar's identity loss; ``"mean"``, the means of 36-41 and 42-47, as
    the csim metric. Differentiable with respect to the images."""
    if images.dim() != 4:
        raise ValueError(f"images: expected shape (N, C, H, W), got {tuple(images.shape)}")
    pts = five_points(landmarks, eyes=eyes)
    if pts.dim() != 3 or pts.shape[0] != images.shape[0]:
        raise ValueError(f"landmarks: expected shape ({images.shape[0]}, 68, 2) or "
                         f"({images.shape[0]}, 5, 2) (N of images), got {tuple(landmarks.shape)}")
    pts = pixel_centres(pts.detach().to(images.device, torch.float64))
    tmpl = (ARCFACE_TEMPLATE.to(images.device) + offset).expand(pts.shape[0], 5, 2)
    M = umeyama_similarity(pts, tmpl)                           # image px -> canvas px
    return warp_affine(images, M, (size, size))


class IRBlock(nn.Module):
    """bn0 -> conv1 (3x3) -> bn1 -> prelu -> conv2 (3x3, stride) -> bn2, + (downsampled) input,
    -> prelu (the same PReLU)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, inplanes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.prelu = nn.PReLU()
        self.conv2 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.prelu(self.bn1(self.conv1(self.bn0(x))))
        y = self.bn2(self.conv2(y))
        return self.prelu(y + (x if self.downsample is None else self.downsample(x)))


class ResNetArcFace(nn.Module):
    """ResNetArcFace-18: x (N, 1, 128, 128) grayscale in [-1, 1] -> embedding (N, 512)."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU()
        self.maxpool = nn.MaxPool2d(2, 2)
        cin = 64
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            blocks = [IRBlock(cin, planes, stride)] + [IRBlock(planes, planes)
                                                       for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = planes
        self.bn4 = nn.BatchNorm2d(512)
        self.dropout = nn.Dropout()
        self.fc5 = nn.Linear(512 * 8 * 8, 512)
        self.bn5 = nn.BatchNorm1d(512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1:] != (1, 128, 128):
            raise ValueError(f"x: expected shape (N, 1, 128, 128), got {tuple(x.shape)}")
        x = self.maxpool(self.prelu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn4(x)).flatten(1)
        return self.bn5(self.fc5(x))


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> (N, 1, H, W) luma (0.299, 0.587, 0.114)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


class ArcFaceIdentityLoss(nn.Module):
    """``1 - cos(E(crop(pred)), E(crop(target)))``, mean over the batch, with E a frozen
    :class:`ResNetArcFace` and crops the 5-point-aligned grayscale 128² crops.

    ``forward(pred, target, landmarks)``: pred, target (N, 3, H, W) in [-1, 1], landmarks
    (N, 68 | 5, 2) pixels of the target (used for both). ``weights``: a local ResNetArcFace-18
    file (e.g. GFPGAN's ``arcface_resnet18.pth``); None: random weights with a warning. An empty
    batch (N = 0) gives 0, still connected to ``pred``."""

    def __init__(self, weights: str | None = None):
        super().__init__()
        self.net = ResNetArcFace()
        if weights is not None:
            load_into(self.net, read_state(weights), source=weights,
                      rename=lambda k: k[len("module."):] if k.startswith("module.") else k)
        else:
            warn_random_init("ArcFaceIdentityLoss (ResNetArcFace-18)", "the identity loss")
        self.net.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def embed(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Unit embeddings (N, 512) of images (N, 3, H, W) aligned by their landmarks
        (N, 68, 2) or (N, 5, 2) in pixels (:func:`align_crops`)."""
        return F.normalize(self.net(to_gray(align_crops(images.float(), landmarks))), dim=1)

    def forward(self, pred: torch.Tensor, target: torch.Tensor,
                landmarks: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(f"pred/target: expected equal shapes (N, 3, H, W), got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        with torch.no_grad():
            et = self.embed(target, landmarks)
        return mean_or_zero(1 - (self.embed(pred, landmarks) * et).sum(1))
