"""The one place where pyface.face renders meshes: :func:`render_mesh`, a thin wrapper of
``pyface.ops.rasterize_mesh`` (best backend for the device: C++ on CPU, CUDA on GPU). Everything
in ``pyface.face`` and ``pyface.data`` that draws goes through it.

Conventions: ``verts_ndc: (B, V, 3)`` with x from -1 (left image border) to +1 (right), y from -1
(top border) to +1 (bottom), i.e. ``x = 2 u - 1`` for the normalized image coordinates ``u`` of
:mod:`pyface.face.cameras`; pixel ``(i, j)`` has its centre at ``x = (2 j + 1) / W - 1``,
``y = (2 i + 1) / H - 1``; z is the camera-space depth (> 0 in front of the camera; smaller is
nearer). Faces with a vertex at ``z <= 0`` (at or behind the camera) are dropped. Optional
culling by winding on the displayed image (``cull="cw"`` skips faces whose signed area
``(x1 - x0)(y2 - y0) - (x2 - x0)(y1 - y0)`` in these y-down coordinates is positive, ``"ccw"``
those where it is negative): a closed mesh with outward (right-hand rule) normals, such as the
built-in head, drops its back faces with ``"cw"``. A pixel centre on an edge shared by two faces
is drawn once (top-left rule); equal depths go to the lower face index. Attributes are
interpolated perspective-correctly; gradients flow to ``attributes`` only. ``depth`` is inf and
``bary`` zero where no face is drawn.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pyface.ops._checks import check_choice, has_values


@dataclass
class RasterOutput:
    """``attr_image (B, C, H, W)`` (zeros where empty), ``mask (B, 1, H, W)`` float 0/1,
    ``depth (B, 1, H, W)`` (inf where empty), ``face_index (B, H, W)`` int64 (-1 where empty),
    ``bary (B, H, W, 3)`` perspective-correct barycentrics (zeros where empty)."""

    attr_image: torch.Tensor | None
    mask: torch.Tensor
    depth: torch.Tensor
    face_index: torch.Tensor
    bary: torch.Tensor


def _size(image_size) -> tuple[int, int]:
    """``image_size`` (``H`` or ``(H, W)``, positive integers) as ``(H, W)``."""
    import numbers

    size = (image_size, image_size) if isinstance(image_size, numbers.Integral) else image_size
    try:
        h, w = size
    except (TypeError, ValueError):
        raise ValueError(f"image_size: expected positive integers H or (H, W), got "
                         f"{image_size!r}") from None
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0 for s in (h, w)):
        raise ValueError(f"image_size: expected positive integers H or (H, W), got "
                         f"{image_size!r}")
    return int(h), int(w)


CULL_MODES = ("none", "cw", "ccw")


def render_mesh(verts_ndc: torch.Tensor, faces: torch.Tensor, image_size,
                attributes: torch.Tensor | None = None, *, cull: str = "none") -> RasterOutput:
    """Rasterizes triangle meshes (see the module docstring for the conventions).

    Args:
        verts_ndc: ``(B, V, 3)`` vertices: NDC x, y and camera depth z.
        faces: ``(F, 3)`` int vertex indices, shared by the batch.
        image_size: ``H`` or ``(H, W)``.
        attributes: optional ``(B, V, C)`` per-vertex attributes to interpolate.
        cull: ``"none"``, ``"cw"`` or ``"ccw"`` (see the module docstring).
    """
    check_choice("cull", cull, CULL_MODES)
    h, w = _size(image_size)
    if verts_ndc.dim() != 3 or verts_ndc.shape[-1] != 3:
        raise ValueError(f"verts_ndc: expected shape (B, V, 3), got {tuple(verts_ndc.shape)}")
    if not isinstance(verts_ndc, torch.Tensor):
        raise TypeError(f"verts_ndc: expected a torch.Tensor of shape (B, V, 3), got "
                        f"{type(verts_ndc).__name__}")
    if not isinstance(faces, torch.Tensor):
        raise TypeError(f"faces: expected an integer tensor of shape (F, 3), got "
                        f"{type(faces).__name__}")
    if (faces.dim() != 2 or faces.shape[-1] != 3 or faces.is_floating_point()
            or faces.is_complex() or faces.dtype == torch.bool):
        raise ValueError(f"faces: expected an integer tensor of shape (F, 3), got "
                         f"{tuple(faces.shape)} {faces.dtype}")
    if attributes is not None and (attributes.dim() != 3 or attributes.shape[:2] != verts_ndc.shape[:2]):
        raise ValueError(f"attributes: expected shape (B, V, C) = ({verts_ndc.shape[0]}, "
                         f"{verts_ndc.shape[1]}, C), got {tuple(attributes.shape)}")
    if faces.numel() and has_values(faces) and (faces.min() < 0 or faces.max() >= verts_ndc.shape[1]):
        raise ValueError(f"faces: indices must be in [0, {verts_ndc.shape[1] - 1}], got "
                         f"[{int(faces.min())}, {int(faces.max())}]")
    from pyface.ops import rasterize_mesh

    attr_image, mask, depth, face_index, bary = rasterize_mesh(
        verts_ndc, faces.long(), (h, w), attributes, cull=cull)
    return RasterOutput(attr_image=attr_image if attributes is not None else None, mask=mask,
                        depth=depth, face_index=face_index, bary=bary)
