# Provenance: reproduces the ArcFace face alignment of insightface (deepinsight/insightface, MIT:
# the 5-point 112x112 template and a least-squares similarity, Umeyama 1991) and the CSIM
# protocol of the face-reenactment literature (cosine similarity of ArcFace embeddings of the
# source and the output). Our own implementation, written from the papers and the upstream's
# documented behaviour; no upstream code is copied. pyface's code is licensed under Apache-2.0.
"""CSIM: ArcFace cosine similarity between the source and the output, with user weights.

Protocol:

1. 5 points per face: the eye centres (means of the 68-point layout's points 36-41 and 42-47,
   0-based), the nose tip (30) and the mouth corners (48, 54); 5-point input is used as is;
2. the least-squares similarity (rotation, uniform scale, translation; Umeyama) maps them onto
   insightface's 112x112 ArcFace template, and the image is warped with it (bilinear, pixel
   centres at integer coordinates, black outside the image, as ``cv2.warpAffine``); the
   landmarks are in those pixel-centre coordinates (the evaluator moves pyface's landmarks,
   corner at 0, there with :func:`pixel_centres`; both it and :func:`warp_affine` are
   :mod:`pyface.face.align`'s, shared with ``pyface.nn.arcface18.align_crops``);
3. the IResNet (``pyface.nn.arcface``) embeds both crops in [-1, 1]; CSIM is the cosine of the
   two embeddings, one value per pair (higher is better; the same image gives 1).

Weights: an insightface ``arcface_torch`` ``backbone.pth`` (r18 / r34 / r50 / r100, detected from
the file), read safely. Nothing is downloaded.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pyface.eval.weights import MissingWeightsError, missing_weights_message
from pyface.face.align import (ARCFACE_SIZE, ARCFACE_TEMPLATE, five_points, pixel_centres,
                               umeyama_similarity, warp_affine)
from pyface.nn._pretrained import load_into, read_state
from pyface.nn.arcface import IRESNET_LAYERS, IResNet

__all__ = ["ARCFACE_SIZE", "ARCFACE_TEMPLATE", "five_points", "umeyama_similarity", "warp_affine",
           "pixel_centres", "align_faces", "detect_arch", "CSIM"]


def align_faces(images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """images: (B, 3, H, W) in [-1, 1]; landmarks: (B, 68, 2) or (B, 5, 2) pixels of ``images``
    in pixel-centre coordinates (pixel i's centre at i, as the template; pyface's landmarks
    through :func:`pixel_centres`) -> ArcFace crops (B, 3, 112, 112) in [-1, 1] (black, -1,
    outside the image)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected shape (B, 3, H, W), got {tuple(images.shape)}")
    pts = five_points(landmarks)
    if pts.ndim != 3 or pts.shape[0] != images.shape[0]:
        raise ValueError(f"landmarks: expected shape ({images.shape[0]}, 68 or 5, 2), got "
                         f"{tuple(landmarks.shape)}")
    M = umeyama_similarity(pts, ARCFACE_TEMPLATE.to(pts.device).expand(pts.shape[0], 5, 2))
    crops = warp_affine((images.float() + 1) / 2, M, (ARCFACE_SIZE, ARCFACE_SIZE))
    return crops * 2 - 1


def detect_arch(state: Mapping[str, torch.Tensor]) -> str:
    """IResNet depth of an arcface_torch state dict, from its number of blocks per stage."""
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")})
                   for i in range(1, 5))
    for arch, layers in IRESNET_LAYERS.items():
        if layers == blocks:
            return arch
    raise ValueError(f"weights: not an arcface_torch IResNet state dict (blocks per stage "
                     f"{blocks}; known: {IRESNET_LAYERS})")


class CSIM(nn.Module):
    """source, output: (B, 3, H, W) in [-1, 1] with landmarks (B, 68 or 5, 2) in their pixels,
    pixel-centre coordinates (:func:`align_faces`) -> (B,) cosine similarity of the ArcFace
    embeddings of the aligned crops.

    ``weights``: path or state dict of an arcface_torch ``backbone.pth``."""

    def __init__(self, weights):
        super().__init__()
        if weights is None or (isinstance(weights, str) and not os.path.exists(weights)):
            raise MissingWeightsError(missing_weights_message("csim", weights))
        if isinstance(weights, Mapping):
            state, src = dict(weights), "ArcFace state dict"
        else:
            state, src = read_state(str(weights)), str(weights)
        self.arch = detect_arch(state)
        self.net = IResNet(self.arch)
        load_into(self.net, state, source=src)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)   # a fixed metric

    @torch.no_grad()
    def embed(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), (B, 68 or 5, 2) -> unit embeddings (B, 512)."""
        return F.normalize(self.net(align_faces(images, landmarks)).float(), dim=1)

    def forward(self, source: torch.Tensor, source_landmarks: torch.Tensor,
                output: torch.Tensor, output_landmarks: torch.Tensor) -> torch.Tensor:
        if source.shape[0] != output.shape[0]:
            raise ValueError(f"output: expected batch {source.shape[0]} (as source), got "
                             f"{output.shape[0]}")
        return (self.embed(source, source_landmarks) *
                self.embed(output, output_landmarks)).sum(1)
