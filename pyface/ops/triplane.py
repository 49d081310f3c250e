"""Public tri-plane sampling op."""
from __future__ import annotations

import torch

from pyface import _backend
from pyface.ops._checks import (MAX_PLANE_SIZE, ShapeChecker, _fmt, check_autodiff_mode,
                                check_choice, check_plane_size, check_positive)
from pyface.ops.reference.triplane import triplane_sample_reference

PLANE_AXES = ("xy_xz_zy", "eg3d")
REDUCTIONS = ("mean", "sum", "none")
#: (re-exported here: ``pyface.ops.triplane.MAX_PLANE_SIZE``)
MAX_PLANE_SIZE = MAX_PLANE_SIZE


def triplane_sample(planes: torch.Tensor, points: torch.Tensor, *, plane_axes: str,
                    box_size: float = 1.0, reduce: str = "mean", align_corners: bool = False,
                    backend: str | None = None) -> torch.Tensor:
    """Bilinear sampling of three feature planes at 3D points (fused; forward and backward).

    Points are scaled by ``2 / box_size`` and projected onto the planes: with
    ``plane_axes="xy_xz_zy"`` plane 0 is sampled at (x, y), plane 1 at (x, z), plane 2 at (z, y);
    ``plane_axes="eg3d"`` reproduces EG3D's released checkpoints, (x, y), (x, z), (z, x). The first
    coordinate indexes the width and the second the height, bilinear with zero padding and
    ``align_corners`` exactly as ``F.grid_sample``. Differentiable w.r.t. ``planes`` and
    ``points``. Low-precision planes (float16/bfloat16) accumulate in float32. NaN coordinates give
    NaN features for that point; coordinates outside the box give zeros, +-inf too on the
    compiled backends (``backend="reference"``, ``F.grid_sample`` as EG3D, gives NaN there).

    Args:
        planes: (B, 3, C, H, W) plane features, C, H, W >= 1, any strides (a channels-last view,
            ``planes_bhwc.permute(0, 1, 4, 2, 3)`` of a (B, 3, H, W, C) tensor, is read in place).
        points: (B, N, 3) world coordinates, floating point.
        plane_axes: ``"eg3d"`` (EG3D / OTAvatar checkpoints: planes (x, y), (x, z), (z, x)) or
            ``"xy_xz_zy"`` (corrected: (x, y), (x, z), (z, y); GOHA, Export3D, MMFA). Required,
            with no default: the planes' axes are a property of the checkpoint / the network
            that made them, and points lifted or sampled with one and rendered with the other
            silently swap the third plane.
        box_size: side of the cube that the planes span, centred at the origin.
        reduce: ``"mean"`` or ``"sum"`` over the planes -> (B, N, C); ``"none"`` -> (B, 3, N, C).
        align_corners: as in ``F.grid_sample``.
        backend: ``None`` (the default for the device), ``"reference"``, ``"cpu"``, ``"cuda"`` or
            ``"triton"``.

    Returns:
        (B, N, C) or (B, 3, N, C) features in the dtype of ``planes``.

    Example:
        >>> planes = torch.randn(2, 3, 32, 64, 64, requires_grad=True)
        >>> points = torch.rand(2, 1000, 3) - 0.5
        >>> feats = pyface.ops.triplane_sample(planes, points, plane_axes="eg3d")  # (2, 1000, 32)
        >>> feats.square().mean().backward()
    """
    chk = ShapeChecker()
    chk.tensor("planes", planes, "B 3 C H W")
    chk.tensor("points", points, "B N 3")
    if min(planes.shape[2:]) < 1:   # every backend alike (grid_sample raises its own words)
        raise ValueError(f"planes: expected shape (B, 3, C, H, W) with C, H, W >= 1, got "
                         f"{_fmt(planes.shape)}")
    check_plane_size(planes)        # e.g. an expanded (stride 0) plane
    check_choice("plane_axes", plane_axes, PLANE_AXES)
    check_choice("reduce", reduce, REDUCTIONS)
    check_positive("box_size", box_size)
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners: expected bool, got {type(align_corners).__name__}")
    name = _backend.select_backend("triplane_sample", planes.device, backend, planes.dtype)
    box_size = float(box_size)
    if name == "reference":
        return triplane_sample_reference(planes, points, plane_axes=plane_axes,
                                         box_size=box_size, reduce=reduce,
                                         align_corners=align_corners)
    check_autodiff_mode("triplane_sample", name, planes, points)
    if name == "triton":
        from pyface._ops.triplane import triton_op

        return triton_op()(planes, points, plane_axes, box_size, reduce, align_corners)
    return torch.ops.pyface.triplane_sample(planes, points, plane_axes, box_size, reduce,
                                            align_corners)
