"""The warping baseline of ``pyface eval``: a plain 2D thin-plate-spline warp of the source
image, driven by 68-point landmarks (see docs/eval.md).

For each output pixel ``q`` the thin-plate spline ``f`` that maps the driving landmarks onto the
source landmarks (``f(d_k) = s_k``; ``U(r) = r^2 log r^2``, an affine part, a small ridge
``TPS_REG`` for coincident points) gives the source position ``f(q)`` to sample (bilinear,
``F.grid_sample``, border padding). Coordinates are pixels with the image's corner at (0, 0) and
pixel ``i`` covering ``[i, i + 1)`` (the convention of pyface's landmarks, which scale with the
image size); they are normalised by the image size before the solve. Equal landmarks give the
identity warp; landmarks moved by one translation give that translation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TPS_REG = 1e-6          # ridge on the kernel matrix, in normalised units (coordinates in [-1, 1])


def _kernel(sq: torch.Tensor) -> torch.Tensor:
    """U as a function of the squared distance: r^2 log r^2 (0 at r = 0)."""
    return torch.where(sq > 0, sq * torch.log(sq.clamp_min(1e-30)), torch.zeros_like(sq))


def tps_solve(ctrl: torch.Tensor, values: torch.Tensor, *, reg: float = TPS_REG) -> torch.Tensor:
    """Thin-plate spline through ``f(ctrl_k) = values_k``.

    ctrl, values: (B, K, 2) float, K >= 3 -> parameters (B, K + 3, 2) float64: K kernel weights
    then the affine part (constant, x, y)."""
    if ctrl.ndim != 3 or ctrl.shape[-1] != 2 or ctrl.shape[1] < 3:
        raise ValueError(f"ctrl: expected shape (B, K >= 3, 2), got {tuple(ctrl.shape)}")
    if values.shape != ctrl.shape:
        raise ValueError(f"values: expected shape {tuple(ctrl.shape)} (as ctrl), got "
                         f"{tuple(values.shape)}")
    c, v = ctrl.double(), values.double()
    B, K, _ = c.shape
    Kmat = _kernel(torch.cdist(c, c).square()) + reg * torch.eye(K, dtype=c.dtype, device=c.device)
    P = torch.cat([torch.ones(B, K, 1, dtype=c.dtype, device=c.device), c], -1)     # (B, K, 3)
    A = torch.zeros(B, K + 3, K + 3, dtype=c.dtype, device=c.device)
    A[:, :K, :K], A[:, :K, K:], A[:, K:, :K] = Kmat, P, P.transpose(1, 2)
    rhs = torch.cat([v, torch.zeros(B, 3, 2, dtype=c.dtype, device=c.device)], 1)
    return torch.linalg.solve(A, rhs)


def tps_apply(params: torch.Tensor, ctrl: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """params: (B, K + 3, 2) from :func:`tps_solve`; ctrl: (B, K, 2); points: (B, N, 2)
    -> f(points) (B, N, 2) float64."""
    K = ctrl.shape[1]
    p = points.double()
    U = _kernel(torch.cdist(p, ctrl.double()).square())                         # (B, N, K)
    affine = params[:, K][:, None] + p @ params[:, K + 1:]                       # (B, N, 2)
    return U @ params[:, :K] + affine


def tps_warp(image: torch.Tensor, src_landmarks: torch.Tensor,
             dst_landmarks: torch.Tensor) -> torch.Tensor:
    """Warps ``image`` so that its ``src_landmarks`` move to ``dst_landmarks``.

    image: (B, C, H, W) float; src_landmarks, dst_landmarks: (B, K, 2) pixels of ``image``
    (x right, y down, corner at 0) -> (B, C, H, W) in ``image``'s dtype."""
    if image.ndim != 4:
        raise ValueError(f"image: expected shape (B, C, H, W), got {tuple(image.shape)}")
    B, _, H, W = image.shape
    for name, lm in (("src_landmarks", src_landmarks), ("dst_landmarks", dst_landmarks)):
        if lm.ndim != 3 or lm.shape[0] != B or lm.shape[-1] != 2:
            raise ValueError(f"{name}: expected shape ({B}, K, 2), got {tuple(lm.shape)}")
    scale = torch.tensor([2.0 / W, 2.0 / H], dtype=torch.float64, device=image.device)
    norm = lambda x: x.double().to(image.device) * scale - 1          # noqa: E731
    src, dst = norm(src_landmarks), norm(dst_landmarks)
    params = tps_solve(dst, src)                                      # driving -> source
    ys = (torch.arange(H, dtype=torch.float64, device=image.device) + 0.5) * (2.0 / H) - 1
    xs = (torch.arange(W, dtype=torch.float64, device=image.device) + 0.5) * (2.0 / W) - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    q = torch.stack([gx, gy], -1).reshape(1, H * W, 2).expand(B, -1, -1)
    grid = tps_apply(params, dst, q).reshape(B, H, W, 2)
    return F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode="border",
                         align_corners=False)


class WarpBaseline:
    """The warping baseline as a pipeline (see the module docstring). ``resolution``: the output
    size. Needs ``landmarks (68, 2)`` on the source and driving frames."""

    name = "warp-baseline"

    def __init__(self, resolution: int, *, device="cpu"):
        from pyface.eval.metrics import SSIM_WINDOW

        if int(resolution) < SSIM_WINDOW:
            raise ValueError(f"resolution: expected >= {SSIM_WINDOW}, got {resolution}")
        self.resolution = int(resolution)
        self.device = torch.device(device)
        self.model = None

    @staticmethod
    def _landmarks(frame: dict, what: str, shape) -> torch.Tensor:
        lm = frame.get("landmarks")
        if lm is None:
            raise ValueError(f"{what}: the warp baseline needs 'landmarks' (68, 2) on every "
                             "frame; this data has none (landmarks.npy)")
        if tuple(lm.shape) != tuple(shape):
            raise ValueError(f"{what}['landmarks']: expected shape {tuple(shape)}, got "
                             f"{tuple(lm.shape)}")
        return lm

    def encode_source(self, source: dict) -> dict:
        """source: image (3, H, W), landmarks (68, 2) -> state."""
        return {"image": source["image"],
                "landmarks": self._landmarks(source, "source", (68, 2))}

    def encode_driving(self, driving: dict) -> torch.Tensor:
        """driving: landmarks (T, 68, 2) -> motion (T, 68, 2)."""
        T = driving["image"].shape[0]
        return self._landmarks(driving, "driving", (T, 68, 2))

    def generate(self, state: dict, motion: torch.Tensor, **controls) -> torch.Tensor:
        """-> (T, 3, H, W): the source warped from its landmarks to each driving frame's."""
        T = motion.shape[0]
        img = state["image"].unsqueeze(0).expand(T, -1, -1, -1)
        return tps_warp(img, state["landmarks"].unsqueeze(0).expand(T, -1, -1), motion)

    def implied_landmarks(self, source: dict, driving: dict) -> torch.Tensor | None:
        """The landmarks the outputs have by construction: the driving ones ``(T, 68, 2)``."""
        return driving.get("landmarks")

    def animate(self, source: dict, driving: dict, **controls) -> torch.Tensor:
        return self.generate(self.encode_source(source), self.encode_driving(driving), **controls)
