"""Landmark-based 3DMM fit of whole videos: identity shared per video, expression and pose per
frame, with a temporal smoothness prior; vectorised over frames.

Unknowns: ``id (80,)`` shared, ``exp (T, 64)``, ``angles (T, 3)``, ``trans (T, 3)``. The 68 model
landmarks are projected with the EG3D camera of the pose (:func:`pyface.face.cameras.
deep3d_to_label`, fixed FFHQ intrinsics), exactly as :meth:`MorphableModel.render` draws them, so
the fitted coefficients and their labels are consistent with the image the landmarks come from.
Only the 68 landmark rows of the bases are evaluated. Texture and lighting are not fitted (zeros).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pyface.face import cameras as cam
from pyface.face.coeffs import merge_coeffs

#: Default per-landmark weights: the jaw contour and the nose carry less weight (their meaning
#: differs most between landmark detectors and head models).
GROUP_WEIGHTS = {"jaw": 0.2, "brows": 1.0, "nose": 0.5, "eyes": 1.0, "mouth": 1.0}
_GROUPS = {"jaw": range(0, 17), "brows": range(17, 27), "nose": range(27, 36),
           "eyes": range(36, 48), "mouth": range(48, 68)}


@dataclass
class FitConfig:
    steps: int = 300
    lr: float = 0.03
    w_id: float = 1e-3          # ||id||^2
    w_exp: float = 1e-3         # ||exp||^2 per frame
    w_smooth: float = 1.0       # squared first differences of exp, angles and trans per frame
    device: str = "cpu"


@dataclass
class FitResult:
    """``coeffs (T, 257)``, ``labels (T, 25)``, ``residual (T,)`` mean landmark error in pixels,
    ``landmarks (T, 68, 2)`` the fitted model's landmarks in pixels."""

    coeffs: torch.Tensor
    labels: torch.Tensor
    residual: torch.Tensor
    landmarks: torch.Tensor


def landmark_weights() -> torch.Tensor:
    w = torch.ones(68)
    for g, idx in _GROUPS.items():
        w[list(idx)] = GROUP_WEIGHTS[g]
    return w


def project_landmarks(model, id_c, exp, angles, trans, image_size: int) -> torch.Tensor:
    """Model landmarks ``(T, 68, 2)`` in pixels of ``image_size`` for ``id_c: (80,)`` and per
    frame ``exp (T, 64)``, ``angles (T, 3)``, ``trans (T, 3)``."""
    lm = model.landmarks
    v = model.num_vertices
    mean = model.mean_shape[lm]                                        # (68, 3)
    idb = model.id_basis.view(v, 3, -1)[lm]                            # (68, 3, 80)
    exb = model.exp_basis.view(v, 3, -1)[lm]                           # (68, 3, 64)
    pts = mean + idb @ id_c + torch.einsum("kcj,tj->tkc", exb, exp)    # (T, 68, 3)
    label = cam.deep3d_to_label(angles, trans)
    uv, _ = cam.project_label(pts * cam.BFM_TO_EG3D_SCALE, label)
    return uv * image_size


def fit_landmarks(model, landmarks: torch.Tensor, image_size: int, *, weights=None,
                  segments: torch.Tensor | None = None, config: FitConfig | None = None) -> FitResult:
    """Fits ``model`` to ``landmarks: (T, 68, 2)`` (pixels of a square ``image_size`` image,
    x right, y down).

    Args:
        weights: optional ``(68,)`` per-landmark weights (default :func:`landmark_weights`).
        segments: optional ``(T,)`` int ids; the smoothness prior links consecutive frames of the
            same segment only (frames left out between them break the chain).
    """
    cfg = config or FitConfig()
    if landmarks.dim() != 3 or landmarks.shape[1:] != (68, 2):
        raise ValueError(f"landmarks: expected shape (T, 68, 2), got {tuple(landmarks.shape)}")
    t = landmarks.shape[0]
    if t == 0:
        raise ValueError("landmarks: expected at least one frame, got T = 0")
    dev = torch.device(cfg.device)
    model = model.to(dev)
    target = landmarks.to(dev, torch.float32)
    w = (landmark_weights() if weights is None else torch.as_tensor(weights)).to(dev, torch.float32)
    link = torch.ones(max(t - 1, 0), device=dev)
    if segments is not None:
        seg = torch.as_tensor(segments, device=dev)
        link = (seg[1:] == seg[:-1]).float()
    id_c = torch.zeros(model.id_basis.shape[1], device=dev, requires_grad=True)
    exp = torch.zeros(t, model.exp_basis.shape[1], device=dev, requires_grad=True)
    angles = torch.zeros(t, 3, device=dev, requires_grad=True)
    trans = torch.zeros(t, 3, device=dev, requires_grad=True)
    opt = torch.optim.Adam([id_c, exp, angles, trans], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=cfg.lr * 0.05)
    scale = 1.0 / image_size
    for step in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        # pose first: the shape unknowns join after a fifth of the steps
        shape_on = step >= cfg.steps // 5
        e = exp if shape_on else exp.detach()
        i = id_c if shape_on else id_c.detach()
        proj = project_landmarks(model, i, e, angles, trans, image_size)
        d2 = ((proj - target) * scale).pow(2).sum(-1)                   # (T, 68)
        loss = (d2 * w).sum(-1).mean() / w.sum()
        loss = loss + cfg.w_id * id_c.pow(2).sum() / 80 + cfg.w_exp * exp.pow(2).mean()
        if t > 1:
            sm = 0.0
            for x, k in ((exp, 1.0), (angles, 10.0), (trans, 10.0)):
                sm = sm + k * ((x[1:] - x[:-1]).pow(2).mean(-1) * link).sum() / max(t - 1, 1)
            loss = loss + cfg.w_smooth * 1e-3 * sm
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        proj = project_landmarks(model, id_c, exp, angles, trans, image_size)
        residual = (proj - target).norm(dim=-1).mean(-1)
        zeros = lambda n: torch.zeros(t, n, device=dev)
        coeffs = merge_coeffs(id_c.expand(t, -1), exp, zeros(80), angles, zeros(27), trans)
        labels = cam.deep3d_to_label(angles, trans)
    return FitResult(coeffs=coeffs.cpu(), labels=labels.cpu(), residual=residual.cpu(),
                     landmarks=proj.cpu())
