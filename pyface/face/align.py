# Provenance: the 5-point face alignment of ArcFace (deepinsight/insightface, MIT: the 5-point
# 112x112 template) with the least-squares similarity of Umeyama (1991). Our own implementation,
# written from the papers and the upstream's documented behaviour; no upstream code is copied.
# pyface's code is licensed under Apache-2.0 (LICENSE).
"""5-point face alignment shared by the identity networks (``pyface.nn.arcface18``, the models'
identity losses) and the identity metrics (``pyface.eval.identity``: csim, aed_id).

* :func:`five_points`: 68-point landmarks -> the 5 ArcFace points: the eye centres (means of the
  68-point layout's points 36-41 and 42-47, 0-based; ``eyes="corners"``: midpoints of the eye
  corners 36/39 and 42/45, OTAvatar's), the nose tip (30) and the mouth corners (48, 54);
  5-point input is returned as it is.
* :func:`umeyama_similarity`: the least-squares similarity (rotation, uniform scale, translation,
  no reflection) between two point sets.
* :data:`ARCFACE_TEMPLATE`: insightface's template for 112 x 112 crops, (x, y) pixels.
* :func:`pixel_centres` and :func:`warp_affine`: the template's pixel convention (pixel i's
  centre at i, as insightface's alignment, ``cv2.warpAffine`` and kornia's ``warp_affine`` with
  ``align_corners=True``); pyface's landmarks (image corner at 0) move there by ``- 0.5``.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

#: insightface's ArcFace template for 112x112 crops, (x, y) pixels with pixel i's centre at i
#: (:func:`pixel_centres`): left eye, right eye (as seen
#: in the image), nose tip, left and right mouth corners. (5, 2) float64.
ARCFACE_TEMPLATE = torch.tensor([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=torch.float64)
ARCFACE_SIZE = 112


EYE_CENTRES = ("mean", "corners")


def five_points(landmarks: torch.Tensor, eyes: str = "mean") -> torch.Tensor:
    """landmarks: (..., 68, 2) or (..., 5, 2) pixels (x right, y down) -> (..., 5, 2)
    (5-point input is returned as it is). ``eyes``: ``"mean"``, each eye centre the mean of its
    six points (36-41, 42-47; the csim / aed_id metrics); ``"corners"``, the midpoint of its two
    corners (36 and 39, 42 and 45; OTAvatar's identity loss)."""
    if eyes not in EYE_CENTRES:
        raise ValueError(f"eyes: expected one of {list(EYE_CENTRES)}, got {eyes!r}")
    if not isinstance(landmarks, torch.Tensor):
        raise TypeError(f"landmarks: expected a torch.Tensor of shape (..., 68, 2) or (..., 5, 2), "
                        f"got {type(landmarks).__name__}")
    if landmarks.ndim < 2 or landmarks.shape[-1] != 2 or landmarks.shape[-2] not in (5, 68):
        raise ValueError(f"landmarks: expected shape (..., 68, 2) or (..., 5, 2), got "
                         f"{tuple(landmarks.shape)}")
    if landmarks.shape[-2] == 5:
        return landmarks
    if eyes == "mean":
        left, right = landmarks[..., 36:42, :].mean(-2), landmarks[..., 42:48, :].mean(-2)
    else:
        left = (landmarks[..., 36, :] + landmarks[..., 39, :]) / 2
        right = (landmarks[..., 42, :] + landmarks[..., 45, :]) / 2
    return torch.stack([left, right, landmarks[..., 30, :], landmarks[..., 48, :],
                        landmarks[..., 54, :]], -2)


def umeyama_similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity ``dst ~ s R src + t`` (no reflection).

    src, dst: (B, N, 2) with N >= 2 (B = 0 works) -> (B, 2, 3) float64 matrices ``[s R | t]``.
    Non-finite points raise a ValueError (on a CPU; on a GPU the result is NaN: the values are
    not read back)."""
    if src.ndim != 3 or src.shape[-1] != 2 or src.shape != dst.shape or src.shape[1] < 2:
        raise ValueError(f"src, dst: expected equal shapes (B, N >= 2, 2), got "
                         f"{tuple(src.shape)} and {tuple(dst.shape)}")
    src, dst = src.double(), dst.double()
    ms, md = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    xs, xd = src - ms, dst - md
    cov = xd.transpose(1, 2) @ xs / src.shape[1]                      # (B, 2, 2)
    try:
        U, S, Vh = torch.linalg.svd(cov)
    except torch.linalg.LinAlgError:
        raise ValueError("src, dst: expected finite points, got NaN or inf") from None
    d = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vh))
    d = torch.where(d == 0, torch.ones_like(d), d)
    D = torch.stack([torch.ones_like(d), d], -1)                      # (B, 2)
    R = U @ torch.diag_embed(D) @ Vh
    var = xs.square().sum((1, 2)) / src.shape[1]
    scale = (S * D).sum(-1) / var
    A = scale[:, None, None] * R
    t = md.squeeze(1) - (A @ ms.transpose(1, 2)).squeeze(-1)
    return torch.cat([A, t[..., None]], -1)


def pixel_centres(landmarks: torch.Tensor) -> torch.Tensor:
    """pyface's landmarks (image corner at 0: pixel i covers [i, i + 1), the convention of
    pyface's data and detectors) -> the pixel-centre coordinates of :data:`ARCFACE_TEMPLATE` and
    :func:`warp_affine` (pixel i's centre at i, as insightface's alignment and
    ``cv2.warpAffine``): ``landmarks - 0.5``."""
    return landmarks - 0.5


def _output_size(size) -> tuple[int, int]:
    """:func:`warp_affine`'s ``size`` (``n`` or ``(h, w)``, positive integers) as ``(h, w)``."""
    expected = "a positive integer n or a pair of positive integers (h, w)"
    pair = (size, size) if isinstance(size, numbers.Integral) else size
    try:
        h, w = pair
    except (TypeError, ValueError):
        raise ValueError(f"size: expected {expected}, got {size!r}") from None
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0 for s in (h, w)):
        raise ValueError(f"size: expected {expected}, got {size!r}")
    return int(h), int(w)


def warp_affine(images: torch.Tensor, matrix: torch.Tensor,
                size: int | tuple[int, int]) -> torch.Tensor:
    """images: (B, C, H, W); matrix: (B, 2, 3) mapping input pixels to output pixels, both in
    pixel-centre coordinates (pixel i's centre at i); size: the output's ``(h, w)``, or one
    integer for a square -> (B, C, h, w);
    ``out(q) = images(M^-1 q)``, bilinear, zeros outside (``cv2.warpAffine`` with
    ``INTER_LINEAR`` and a black border). Differentiable with respect to ``images``; the
    sampling grid is computed in float64, then cast to ``images.dtype``."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a torch.Tensor of shape (B, C, H, W), got "
                        f"{type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images: expected shape (B, C, H, W), got {tuple(images.shape)}")
    B, _, H, W = images.shape
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"matrix: expected a torch.Tensor of shape ({B}, 2, 3), got "
                        f"{type(matrix).__name__}")
    if matrix.shape != (B, 2, 3):
        raise ValueError(f"matrix: expected shape ({B}, 2, 3), got {tuple(matrix.shape)}")
    h, w = _output_size(size)
    dev = images.device
    M = matrix.to(dev, torch.float64)
    Ainv = torch.linalg.inv(M[:, :, :2])
    tinv = -(Ainv @ M[:, :, 2:]).squeeze(-1)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=dev),
                            torch.arange(w, dtype=torch.float64, device=dev), indexing="ij")
    q = torch.stack([xs, ys], -1).reshape(1, h * w, 2)
    p = q @ Ainv.transpose(1, 2) + tinv[:, None]
    # align_corners=True: -1 and 1 are the centres of the first and last pixels
    scale = torch.tensor([2.0 / max(W - 1, 1), 2.0 / max(H - 1, 1)], dtype=torch.float64,
                         device=dev)
    grid = (p * scale - 1).reshape(B, h, w, 2).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
