"""Reference tri-plane sampling: EG3D's ``sample_from_planes`` (renderer.py) semantics."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Plane-axis matrices. For "eg3d" these are EG3D's generate_planes(); sample_from_planes projects
# with the inverse of each matrix and keeps the first two coordinates, which yields (x, y),
# (x, z), (z, x) - the mapping its released checkpoints were trained with. "xy_xz_zy" samples
# the third plane at (z, y) instead.
_PLANE_AXES = {
    "eg3d": ((1, 0, 0, 0, 1, 0, 0, 0, 1),
             (1, 0, 0, 0, 0, 1, 0, 1, 0),
             (0, 0, 1, 1, 0, 0, 0, 1, 0)),
    "xy_xz_zy": ((1, 0, 0, 0, 1, 0, 0, 0, 1),
                 (1, 0, 0, 0, 0, 1, 0, 1, 0),
                 (0, 0, 1, 0, 1, 0, 1, 0, 0)),
}

# (u, v) coordinate components per plane: u indexes the width, v the height.
PLANE_UV = {
    "eg3d": ((0, 1), (0, 2), (2, 0)),
    "xy_xz_zy": ((0, 1), (0, 2), (2, 1)),
}


def plane_axes_matrix(plane_axes: str, device=None, dtype=torch.float32) -> torch.Tensor:
    """The (3, 3, 3) plane-axis matrices in EG3D's ``generate_planes`` form."""
    return torch.tensor(_PLANE_AXES[plane_axes], device=device, dtype=dtype).view(3, 3, 3)


def project_onto_planes(points: torch.Tensor, plane_axes: str) -> torch.Tensor:
    """(B, N, 3) points -> (B, 3, N, 2) plane coordinates, as EG3D's ``project_onto_planes``."""
    B, N, _ = points.shape
    if plane_axes == "eg3d":
        planes = plane_axes_matrix(plane_axes, points.device, points.dtype)
        coords = points.unsqueeze(1).expand(-1, 3, -1, -1).reshape(B * 3, N, 3)
        inv = torch.linalg.inv(planes).unsqueeze(0).expand(B, -1, -1, -1).reshape(B * 3, 3, 3)
        return torch.bmm(coords, inv)[..., :2].reshape(B, 3, N, 2)
    uv = PLANE_UV[plane_axes]
    return torch.stack([points[..., list(p)] for p in uv], dim=1)


def triplane_sample_reference(planes: torch.Tensor, points: torch.Tensor, *,
                              plane_axes: str, box_size: float = 1.0,
                              reduce: str = "mean", align_corners: bool = False) -> torch.Tensor:
    """Bilinear tri-plane sampling with ``F.grid_sample``, exactly as EG3D.

    Args:
        planes: (B, 3, C, H, W) plane features.
        points: (B, N, 3) world coordinates; scaled by ``2 / box_size`` before projection.
    Returns:
        (B, N, C) for ``reduce`` "mean"/"sum", (B, 3, N, C) for "none". Low-precision planes are
        sampled in float32 and the result cast back to the planes' dtype.
    """
    B, _, C, H, W = planes.shape
    N = points.shape[1]
    work = torch.float64 if planes.dtype == torch.float64 else torch.float32
    p = planes.to(work).reshape(B * 3, C, H, W)
    coords = project_onto_planes(points.to(work) * (2.0 / box_size), plane_axes)
    grid = coords.reshape(B * 3, 1, N, 2)
    out = F.grid_sample(p, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=align_corners)
    out = out.permute(0, 3, 2, 1).reshape(B, 3, N, C)
    if reduce == "mean":
        out = out.mean(1)
    elif reduce == "sum":
        out = out.sum(1)
    return out.to(planes.dtype)
