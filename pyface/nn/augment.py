# Provenance: reproduces the semantics of the random affine + thin-plate-spline transform used for
# the equivariance loss and of the keypoint prior of FOMM / face-vid2vid (Siarohin et al. 2019,
# Wang et al. 2021) as in zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis
# (commit 9511d25, CC BY-NC 4.0; modules/model.py), used by MMFA (Li et al. 2026). Our own
# implementation, written from the papers and the documented behaviour; no upstream code is
# copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""Random affine + thin-plate-spline warps for keypoint equivariance, and the keypoint prior.

Convention: coordinates are (x, y) in [-1, 1], x along the width, with the corners at the
centres of the corner pixels (``align_corners=True``). A transform T maps output coordinates to
input coordinates: ``y = T.warp_image(x)`` samples ``y(p) = x(T(p))``. So a point seen at p in the
warped image is at ``T(p)`` in the original, and a keypoint detector is equivariant when
``kp(x) == T.warp_keypoints(kp(y))``; the equivariance loss is
``(kp(x)[..., :2] - T.warp_keypoints(kp(y))[..., :2]).abs().mean()``.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from pyface.nn._reduce import mean_or_zero
from pyface.nn.compiling import generator_kwargs

__all__ = ["AffineTPS", "RandomAffineTPS", "equivariance_loss", "keypoint_prior_loss"]


def _tps_kernel(sq: torch.Tensor) -> torch.Tensor:
    """U(r) = r^2 log r from squared distances (0 at r = 0)."""
    return 0.5 * sq * torch.log(sq.clamp_min(1e-12))


@dataclasses.dataclass
class AffineTPS:
    """A batch of sampled warps ``T(p) = A p + b + sum_k w_k U(|p - c_k|)``.

    Attributes:
        theta: (B, 2, 3) affine part ``[A | b]``.
        control_points: (P, 2) TPS centres c_k in [-1, 1]^2.
        control_params: (B, P, 2) TPS weights w_k (a 2-vector per centre).
    """

    theta: torch.Tensor
    control_points: torch.Tensor
    control_params: torch.Tensor

    def __post_init__(self) -> None:
        t, c, w = self.theta, self.control_points, self.control_params
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[1:] != (2, 3):
            raise ValueError(f"theta: expected shape (B, 2, 3), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
        if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.shape[1] != 2:
            raise ValueError(f"control_points: expected shape (P, 2), got "
                             f"{tuple(c.shape) if isinstance(c, torch.Tensor) else c!r}")
        if not isinstance(w, torch.Tensor) or w.shape != (t.shape[0], c.shape[0], 2):
            raise ValueError(f"control_params: expected shape ({t.shape[0]}, {c.shape[0]}, 2) "
                             f"(B of theta, P of control_points), got "
                             f"{tuple(w.shape) if isinstance(w, torch.Tensor) else w!r}")

    @property
    def batch(self) -> int:
        return self.theta.shape[0]

    def warp_coordinates(self, coords: torch.Tensor) -> torch.Tensor:
        """T(coords). coords: (B, N, 2) (x, y) -> (B, N, 2)."""
        B = self.batch
        if coords.dim() != 3 or coords.shape[0] != B or coords.shape[2] != 2:
            raise ValueError(f"coords: expected shape ({B}, N, 2), got {tuple(coords.shape)}")
        theta = self.theta.to(coords.dtype)
        out = coords @ theta[:, :, :2].transpose(1, 2) + theta[:, :, 2].unsqueeze(1)
        c = self.control_points.to(coords.dtype)
        sq = (coords.unsqueeze(2) - c.view(1, 1, -1, 2)).square().sum(-1)     # (B, N, P)
        return out + _tps_kernel(sq) @ self.control_params.to(coords.dtype)

    def warp_keypoints(self, kp: torch.Tensor) -> torch.Tensor:
        """T applied to the (x, y) of keypoints; other coordinates (z) unchanged.
        kp: (B, K, 2) or (B, K, 3) -> same shape."""
        if kp.dim() != 3 or kp.shape[0] != self.batch or kp.shape[2] not in (2, 3):
            raise ValueError(f"kp: expected shape ({self.batch}, K, 2 or 3), got "
                             f"{tuple(kp.shape)}")
        xy = self.warp_coordinates(kp[..., :2])
        return torch.cat([xy, kp[..., 2:]], dim=-1)

    def jacobian(self, coords: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
        """dT/dp at coords (B, N, 2) -> (B, N, 2, 2), ``J[..., i, j] = dT_i / dp_j``."""
        with torch.enable_grad():
            p = (coords if create_graph and coords.requires_grad
                 else coords.detach().requires_grad_(True))
            t = self.warp_coordinates(p)
            rows = [torch.autograd.grad(t[..., i].sum(), p, create_graph=create_graph,
                                        retain_graph=create_graph or i == 0)[0]
                    for i in range(2)]
        return torch.stack(rows, dim=-2)

    def grid(self, height: int, width: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
        """The sampling grid (B, height, width, 2) of :meth:`warp_image`."""
        ys = torch.linspace(-1, 1, height, dtype=dtype, device=device)
        xs = torch.linspace(-1, 1, width, dtype=dtype, device=device)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([xx, yy], -1).view(1, -1, 2).expand(self.batch, -1, -1)
        return self.warp_coordinates(coords).view(self.batch, height, width, 2)

    def warp_image(self, image: torch.Tensor, *, padding_mode: str = "reflection") -> torch.Tensor:
        """image (B, C, H, W) -> (B, C, H, W) with ``out(p) = image(T(p))`` (bilinear,
        ``align_corners=True``, reflection padding by default)."""
        if image.dim() != 4 or image.shape[0] != self.batch:
            raise ValueError(f"image: expected shape ({self.batch}, C, H, W), got "
                             f"{tuple(image.shape)}")
        grid = self.grid(image.shape[2], image.shape[3], dtype=image.dtype, device=image.device)
        return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding_mode,
                             align_corners=True)


class RandomAffineTPS:
    """Samples :class:`AffineTPS` warps: ``A = I + N(0, sigma_affine^2)``,
    ``b ~ N(0, sigma_affine^2)``, TPS weights ``~ N(0, sigma_tps^2)`` on a ``points x points``
    grid of centres over [-1, 1]^2 (face-vid2vid: 0.05, 0.005, 5).

    ``sample(batch, *, device=None, dtype=torch.float32, generator=None) -> AffineTPS``;
    ``__call__(image, generator=None) -> (warped image, AffineTPS)`` for image (B, C, H, W).
    With both sigmas 0 the warp is the identity.

    Our choices where the reference differs: the TPS kernel uses the Euclidean distance
    (U = r^2 log r, the textbook thin-plate spline) and each centre has a 2-vector weight.
    """

    def __init__(self, sigma_affine: float = 0.05, sigma_tps: float = 0.005, points: int = 5):
        if sigma_affine < 0:
            raise ValueError(f"sigma_affine: expected >= 0, got {sigma_affine}")
        if sigma_tps < 0:
            raise ValueError(f"sigma_tps: expected >= 0, got {sigma_tps}")
        if points < 2:
            raise ValueError(f"points: expected >= 2, got {points}")
        self.sigma_affine, self.sigma_tps, self.points = sigma_affine, sigma_tps, points

    def sample(self, batch: int, *, device=None, dtype=torch.float32,
               generator: torch.Generator | None = None) -> AffineTPS:
        def normal(*shape):
            return torch.randn(*shape, device=device, dtype=dtype, **generator_kwargs(generator))
        theta = torch.eye(2, 3, device=device, dtype=dtype).expand(batch, 2, 3)
        theta = theta + self.sigma_affine * normal(batch, 2, 3)
        lin = torch.linspace(-1, 1, self.points, device=device, dtype=dtype)
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        centres = torch.stack([xx, yy], -1).view(-1, 2)
        params = self.sigma_tps * normal(batch, centres.shape[0], 2)
        return AffineTPS(theta, centres, params)

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None):
        if image.dim() != 4:
            raise ValueError(f"image: expected shape (B, C, H, W), got {tuple(image.shape)}")
        if not image.is_floating_point():
            raise TypeError(f"image: expected a floating-point tensor, got dtype "
                            f"{str(image.dtype).replace('torch.', '')}")
        t = self.sample(image.shape[0], device=image.device, dtype=image.dtype,
                        generator=generator)
        return t.warp_image(image), t


def keypoint_prior_loss(kp: torch.Tensor, *, distance: float = 0.1, depth: float = 0.33,
                        include_self: bool = False) -> torch.Tensor:
    """face-vid2vid's keypoint prior: keypoints spread out, mean depth at ``depth``.

    Per sample ``sum_{i != j} max(0, distance - |x_i - x_j|^2) + |mean_k z_k - depth|``, averaged
    over the batch (ordered pairs: each unordered pair counts twice). ``include_self`` also sums
    the i = j terms, a constant ``K * distance`` (the reference's reported value).

    Args:
        kp: (B, K, 3) keypoints (x, y, z).
    Returns:
        a scalar; 0 for an empty batch (B = 0), still connected to ``kp``.
    """
    if kp.dim() != 3 or kp.shape[2] != 3:
        raise ValueError(f"kp: expected shape (B, K, 3), got {tuple(kp.shape)}")
    sq = (kp.unsqueeze(2) - kp.unsqueeze(1)).square().sum(-1)          # (B, K, K)
    spread = F.relu(distance - sq)
    if not include_self:
        spread = spread * (1 - torch.eye(kp.shape[1], dtype=kp.dtype, device=kp.device))
    value = spread.sum((1, 2)) + (kp[..., 2].mean(-1) - depth).abs()
    return mean_or_zero(value)


def equivariance_loss(kp: torch.Tensor, kp_warped: torch.Tensor,
                      transform: AffineTPS) -> torch.Tensor:
    """Keypoint equivariance under a warp (face-vid2vid, on the 2D projections).

    Args:
        kp: (B, K, 2 or 3) keypoints of the original images x.
        kp_warped: (B, K, 2 or 3) keypoints of ``transform.warp_image(x)``.
        transform: the warp.
    Returns:
        ``mean |kp[..., :2] - T(kp_warped)[..., :2]|`` (L1, a scalar); 0 for an empty batch
        (B = 0), still connected to ``kp`` and ``kp_warped``.
    """
    if kp_warped.shape != kp.shape:
        raise ValueError(f"kp_warped: expected the shape of kp {tuple(kp.shape)}, got "
                         f"{tuple(kp_warped.shape)}")
    back = transform.warp_keypoints(kp_warped)
    return mean_or_zero((kp[..., :2] - back[..., :2]).abs())
