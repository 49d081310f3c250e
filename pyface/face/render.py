"""The one place where pyface.face renders meshes.

:func:`render_mesh` rasterizes with ``pyface.ops.rasterize_mesh`` when that op is available and
otherwise with :func:`_rasterize_fallback`, a small pure-PyTorch z-buffer rasterizer kept here
so that the face toolkit and the synthetic data engine work on any install. Both follow the
conventions below; everything else in ``pyface.face`` and ``pyface.data`` goes through
:func:`render_mesh`.

Conventions: ``verts_ndc: (B, V, 3)`` with x from -1 (left image border) to +1 (right), y from -1
(top border) to +1 (bottom), i.e. ``x = 2 u - 1`` for the normalized image coordinates ``u`` of
:mod:`pyface.face.cameras`; pixel ``(i, j)`` has its centre at ``x = (2 j + 1) / W - 1``,
``y = (2 i + 1) / H - 1``; z is the camera-space depth (> 0 in front of the camera; smaller is
nearer). Faces with a vertex at ``z <= 0`` (at or behind the camera) are dropped. Optional
culling by winding on the displayed image (``cull="cw"`` skips faces whose signed area
``(x1 - x0)(y2 - y0) - (x2 - x0)(y1 - y0)`` in these y-down coordinates is positive, ``"ccw"``
those where it is negative): a closed mesh with outward (right-hand rule) normals, such as the
built-in head, drops its back faces with ``"cw"``. Attributes are interpolated perspective-correctly; gradients flow to ``attributes``
only. ``depth`` is inf and ``bary`` zero where no face is drawn.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    h, w = (int(s) for s in image_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size: expected positive (H, W), got {tuple(image_size)}")
    return h, w


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
    if cull not in CULL_MODES:
        raise ValueError(f"cull: expected one of {CULL_MODES}, got {cull!r}")
    h, w = _size(image_size)
    if verts_ndc.dim() != 3 or verts_ndc.shape[-1] != 3:
        raise ValueError(f"verts_ndc: expected shape (B, V, 3), got {tuple(verts_ndc.shape)}")
    if faces.dim() != 2 or faces.shape[-1] != 3 or faces.is_floating_point():
        raise ValueError(f"faces: expected an integer tensor of shape (F, 3), got "
                         f"{tuple(faces.shape)} {faces.dtype}")
    if attributes is not None and (attributes.dim() != 3 or attributes.shape[:2] != verts_ndc.shape[:2]):
        raise ValueError(f"attributes: expected shape (B, V, C) = ({verts_ndc.shape[0]}, "
                         f"{verts_ndc.shape[1]}, C), got {tuple(attributes.shape)}")
    if faces.numel() and (faces.min() < 0 or faces.max() >= verts_ndc.shape[1]):
        raise ValueError(f"faces: indices must be in [0, {verts_ndc.shape[1] - 1}], got "
                         f"[{int(faces.min())}, {int(faces.max())}]")
    op = _library_rasterizer()
    if op is not None:
        attr_image, mask, depth, face_index, bary = op(verts_ndc, faces.long(), (h, w), attributes,
                                                       cull=cull)
        return RasterOutput(attr_image=attr_image if attributes is not None else None, mask=mask,
                            depth=depth, face_index=face_index, bary=bary)
    return _rasterize_fallback(verts_ndc, faces.long(), (h, w), attributes, cull)


def _library_rasterizer():
    """``pyface.ops.rasterize_mesh`` when this install has it, else None."""
    try:
        from pyface.ops import rasterize_mesh
    except ImportError:
        return None
    return rasterize_mesh


# ----------------------------------------------------------------------------------------------
# pure-PyTorch fallback rasterizer


_INT64_MAX = torch.iinfo(torch.int64).max


def _rasterize_fallback(verts_ndc, faces, size, attributes, cull="none") -> RasterOutput:
    """Z-buffer by ``scatter_reduce(amin)`` of (depth bits << 32 | face index) over the pixels
    of each face's bounding box, faces bucketed by box size. Ties in depth go to the lower face
    index; a pixel centre exactly on a shared edge is claimed by both faces and resolved by the
    same rule, so shared edges leave no holes."""
    h, w = size
    b = verts_ndc.shape[0]
    dev = verts_ndc.device
    face_index = torch.full((b, h, w), -1, dtype=torch.int64, device=dev)
    bary = torch.zeros(b, h, w, 3, dtype=verts_ndc.dtype, device=dev)
    with torch.no_grad():
        for bi in range(b):
            fi, bc = _raster_one(verts_ndc[bi].detach(), faces, h, w, cull)
            face_index[bi] = fi
            bary[bi] = bc.to(bary.dtype)
    mask = (face_index >= 0).unsqueeze(1).to(verts_ndc.dtype)
    if faces.shape[0] == 0:  # nothing to draw: keep a valid index for the gathers below
        faces = torch.zeros(1, 3, dtype=torch.int64, device=dev)
    fidx = face_index.clamp_min(0)
    tri = faces[fidx]                                               # (B, H, W, 3)
    zv = verts_ndc[..., 2].detach()
    zt = torch.gather(zv, 1, tri.reshape(b, -1)).reshape(b, h, w, 3)
    depth = (bary * zt).sum(-1, keepdim=True).permute(0, 3, 1, 2)
    depth = torch.where(mask > 0, depth, torch.full_like(depth, float("inf")))
    attr_image = None
    if attributes is not None:
        c = attributes.shape[-1]
        at = torch.gather(attributes, 1, tri.reshape(b, -1, 1).expand(-1, -1, c))
        at = at.reshape(b, h, w, 3, c)
        attr_image = (bary.to(at.dtype).unsqueeze(-1) * at).sum(-2).permute(0, 3, 1, 2)
        attr_image = attr_image * mask.to(attr_image.dtype)
    return RasterOutput(attr_image=attr_image, mask=mask, depth=depth, face_index=face_index,
                        bary=bary)


def _raster_one(v, faces, h, w, cull):
    dev = v.device
    v = v.double()
    px = (v[:, 0] + 1) * (0.5 * w) - 0.5           # pixel-centre coordinates: centre j at px = j
    py = (v[:, 1] + 1) * (0.5 * h) - 0.5
    z = v[:, 2]
    fidx = torch.arange(faces.shape[0], device=dev)
    x0, x1, x2 = px[faces].unbind(-1)
    y0, y1, y2 = py[faces].unbind(-1)
    z0, z1, z2 = z[faces].unbind(-1)
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    j0 = torch.minimum(torch.minimum(x0, x1), x2).ceil().clamp_min(0)
    j1 = torch.maximum(torch.maximum(x0, x1), x2).floor().clamp_max(w - 1)
    i0 = torch.minimum(torch.minimum(y0, y1), y2).ceil().clamp_min(0)
    i1 = torch.maximum(torch.maximum(y0, y1), y2).floor().clamp_max(h - 1)
    keep = ((area.abs() > 1e-12) & (torch.minimum(torch.minimum(z0, z1), z2) > 0)
            & (j1 >= j0) & (i1 >= i0) & torch.isfinite(area))
    if cull == "cw":
        keep &= area < 0
    elif cull == "ccw":
        keep &= area > 0
    buf = torch.full((h * w,), _INT64_MAX, dtype=torch.int64, device=dev)
    ext = torch.maximum(j1 - j0, i1 - i0) + 1
    keep_idx = fidx[keep]
    if keep_idx.numel():
        ext_k = ext[keep_idx]
        sizes = 2 ** torch.ceil(torch.log2(ext_k.clamp_min(1))).long()
        for s in torch.unique(sizes).tolist():
            sel = keep_idx[sizes == s]
            chunk = max(1, (1 << 22) // (s * s))
            for c0 in range(0, sel.numel(), chunk):
                _scatter_faces(sel[c0:c0 + chunk], s, buf, x0, x1, x2, y0, y1, y2, z0, z1, z2,
                               area, j0, j1, i0, i1, w)
    covered = buf != _INT64_MAX
    face_index = torch.where(covered, buf & 0xFFFFFFFF, torch.full_like(buf, -1))
    bary = torch.zeros(h * w, 3, dtype=torch.float64, device=dev)
    pix = covered.nonzero().squeeze(1)
    if pix.numel():
        f = face_index[pix]
        pj = (pix % w).double()
        pi = (pix // w).double()
        l0, l1, l2 = _edge_weights(pj, pi, x0[f], x1[f], x2[f], y0[f], y1[f], y2[f], area[f])
        pc = torch.stack([l0 / z0[f], l1 / z1[f], l2 / z2[f]], -1)
        bary[pix] = pc / pc.sum(-1, keepdim=True)
    return face_index.view(h, w), bary.view(h, w, 3)


def _edge_weights(px, py, x0, x1, x2, y0, y1, y2, area):
    l0 = ((x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)) / area
    l1 = ((x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)) / area
    return l0, l1, 1.0 - l0 - l1


def _scatter_faces(sel, s, buf, x0, x1, x2, y0, y1, y2, z0, z1, z2, area, j0, j1, i0, i1, w):
    off = torch.arange(s, device=sel.device)
    oj = off.view(1, 1, s)
    oi = off.view(1, s, 1)
    pj = (j0[sel].view(-1, 1, 1) + oj).expand(-1, s, s)
    pi = (i0[sel].view(-1, 1, 1) + oi).expand(-1, s, s)
    inside_box = (pj <= j1[sel].view(-1, 1, 1)) & (pi <= i1[sel].view(-1, 1, 1))
    g = lambda t: t[sel].view(-1, 1, 1)
    l0, l1, l2 = _edge_weights(pj, pi, g(x0), g(x1), g(x2), g(y0), g(y1), g(y2), g(area))
    inside = inside_box & (l0 >= 0) & (l1 >= 0) & (l2 >= 0)
    zinv = l0 / g(z0) + l1 / g(z1) + l2 / g(z2)
    depth = (1.0 / zinv).float()
    key = (depth.view(torch.int32).long() << 32) | sel.view(-1, 1, 1)
    lin = (pi * w + pj).long()
    buf.scatter_reduce_(0, lin[inside], key[inside], reduce="amin")
