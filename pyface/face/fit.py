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
    steps: int = 100            # L-BFGS iterations of the joint stage (the pose stage: a fifth)
    w_id: float = 100.0         # x 1e-3 mean id^2 (strong: 68 points barely constrain shape)
    w_exp: float = 1.0          # x 1e-3 mean exp^2
    w_smooth: float = 1.0       # x 1e-3 squared first differences of exp, angles and trans
    device: str = "cpu"


@dataclass
class FitResult:
    """``coeffs (T, 257)``, ``labels (T, 25)``, ``residual (T,)`` mean point error in pixels,
    ``landmarks (T, K, 2)`` the fitted model's points in pixels."""

    coeffs: torch.Tensor
    labels: torch.Tensor
    residual: torch.Tensor
    landmarks: torch.Tensor


def landmark_weights() -> torch.Tensor:
    w = torch.ones(68)
    for g, idx in _GROUPS.items():
        w[list(idx)] = GROUP_WEIGHTS[g]
    return w


def project_landmarks(model, id_c, exp, angles, trans, image_size: int,
                      landmark_index: torch.Tensor | None = None) -> torch.Tensor:
    """Model landmarks ``(T, K, 2)`` in pixels of ``image_size`` for ``id_c: (80,)`` and per
    frame ``exp (T, 64)``, ``angles (T, 3)``, ``trans (T, 3)``; ``landmark_index: (K,)`` vertex
    indices (default ``model.landmarks``)."""
    lm = model.landmarks if landmark_index is None else landmark_index.to(model.landmarks)
    v = model.num_vertices
    mean = model.mean_shape[lm]                                        # (68, 3)
    idb = model.id_basis.view(v, 3, -1)[lm]                            # (68, 3, 80)
    exb = model.exp_basis.view(v, 3, -1)[lm]                           # (68, 3, 64)
    pts = mean + idb @ id_c + torch.einsum("kcj,tj->tkc", exb, exp)    # (T, 68, 3)
    label = cam.deep3d_to_label(angles, trans)
    uv, _ = cam.project_label(pts * cam.BFM_TO_EG3D_SCALE, label)
    return uv * image_size


def fit_landmarks(model, landmarks: torch.Tensor, image_size: int, *, weights=None,
                  segments: torch.Tensor | None = None, config: FitConfig | None = None,
                  landmark_index: torch.Tensor | None = None) -> FitResult:
    """Fits ``model`` to ``landmarks: (T, K, 2)`` (pixels of a square ``image_size`` image,
    x right, y down); K = 68 (the model's landmarks) unless ``landmark_index`` says which
    vertices the K points are.

    Args:
        weights: optional ``(K,)`` per-point weights (default :func:`landmark_weights` for 68
            points, else ones).
        segments: optional ``(T,)`` int ids; the smoothness prior links consecutive frames of the
            same segment only (frames left out between them break the chain).
        landmark_index: optional ``(K,)`` model vertices the points correspond to (default
            ``model.landmarks``; a detector whose points mean other vertices brings its own).
    """
    cfg = config or FitConfig()
    if landmarks.dim() != 3 or landmarks.shape[-1] != 2:
        raise ValueError(f"landmarks: expected shape (T, K, 2), got {tuple(landmarks.shape)}")
    t, k = landmarks.shape[:2]
    if landmark_index is None and k != 68:
        raise ValueError(f"landmarks: expected shape (T, 68, 2) without landmark_index, got "
                         f"{tuple(landmarks.shape)}")
    if landmark_index is not None and tuple(landmark_index.shape) != (k,):
        raise ValueError(f"landmark_index: expected shape ({k},), got {tuple(landmark_index.shape)}")
    if weights is not None and tuple(torch.as_tensor(weights).shape) != (k,):
        raise ValueError(f"weights: expected shape ({k},), got {tuple(torch.as_tensor(weights).shape)}")
    if t == 0:
        raise ValueError("landmarks: expected at least one frame, got T = 0")
    dev = torch.device(cfg.device)
    model = model.to(dev)
    target = landmarks.to(dev, torch.float32)
    if weights is None:
        weights = landmark_weights() if k == 68 else torch.ones(k)
    w = torch.as_tensor(weights).to(dev, torch.float32)
    link = torch.ones(max(t - 1, 0), device=dev)
    if segments is not None:
        seg = torch.as_tensor(segments, device=dev)
        link = (seg[1:] == seg[:-1]).float()
    id_c = torch.zeros(model.id_basis.shape[1], device=dev, requires_grad=True)
    exp = torch.zeros(t, model.exp_basis.shape[1], device=dev, requires_grad=True)
    angles = torch.zeros(t, 3, device=dev, requires_grad=True)
    trans = torch.zeros(t, 3, device=dev, requires_grad=True)
    scale = 1.0 / image_size

    def objective(shape_on: bool):
        e = exp if shape_on else exp.detach()
        i = id_c if shape_on else id_c.detach()
        proj = project_landmarks(model, i, e, angles, trans, image_size, landmark_index)
        d2 = ((proj - target) * scale).pow(2).sum(-1)                   # (T, 68)
        loss = (d2 * w).sum(-1).mean() / w.sum()
        loss = loss + cfg.w_id * 1e-3 * id_c.pow(2).mean() + cfg.w_exp * 1e-3 * exp.pow(2).mean()
        if t > 1:
            sm = 0.0
            for x, k in ((exp, 1.0), (angles, 10.0), (trans, 10.0)):
                sm = sm + k * ((x[1:] - x[:-1]).pow(2).mean(-1) * link).sum() / (t - 1)
            loss = loss + cfg.w_smooth * 1e-3 * sm
        return loss

    # L-BFGS (strong Wolfe line search): the pose alone first, then everything together
    for shape_on, iters in ((False, max(cfg.steps // 5, 5)), (True, cfg.steps)):
        params = [angles, trans] + ([id_c, exp] if shape_on else [])
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, history_size=20,
                                tolerance_grad=1e-12, tolerance_change=1e-14,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = objective(shape_on)
            loss.backward()
            return loss
        opt.step(closure)
    with torch.no_grad():
        proj = project_landmarks(model, id_c, exp, angles, trans, image_size, landmark_index)
        residual = (proj - target).norm(dim=-1).mean(-1)
        zeros = lambda n: torch.zeros(t, n, device=dev)
        coeffs = merge_coeffs(id_c.expand(t, -1), exp, zeros(80), angles, zeros(27), trans)
        labels = cam.deep3d_to_label(angles, trans)
    return FitResult(coeffs=coeffs.cpu(), labels=labels.cpu(), residual=residual.cpu(),
                     landmarks=proj.cpu())
