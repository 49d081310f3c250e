"""Reference rasterization ops: mesh rasterization, z-buffered point splatting and the
nearest-point point-cloud -> tri-plane lifting of GOHA.

Screen conventions shared by every op of the family (and by ``pyface.ops.project_points``):

* x, y are NDC in [-1, 1]: x = -1 is the left edge of the image, x = +1 the right edge, y = -1
  the TOP edge and y = +1 the bottom edge (image rows grow with y, as in ``F.grid_sample``).
* Pixel centres follow ``align_corners=False``: the pixel in row i, column j has its centre at
  x = (2 j + 1) / W - 1, y = (2 i + 1) / H - 1. In pixel units X = (x + 1) W / 2, the centre of
  column j is X = j + 0.5.
* z is depth: smaller is nearer.

These functions are slow, simple and exact: they define the semantics that the compiled kernels
reproduce, and they are the test oracle.
"""
from __future__ import annotations

import math

import torch

from pyface.ops.reference.triplane import project_onto_planes

# Mesh rasterization snaps vertices to a fixed-point grid of 1/256 pixel, so that edge functions
# are exact integers: a pixel centre on an edge shared by two triangles is then owned by exactly
# one of them (top-left rule), whatever the floating-point rounding.
SUBPIXEL_BITS = 8
SUBPIXEL = 1 << SUBPIXEL_BITS
# Faces with a vertex farther than this many subpixel units from the image origin are not drawn
# (keeps every edge-function product inside int64). That is 2^21 = 2M pixels.
GUARD = 1 << 29

CULL_MODES = ("none", "cw", "ccw")


def _image_hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def snap_vertices(verts_ndc: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NDC x, y -> fixed-point pixel coordinates (int64, units of 1/256 pixel), and a per-vertex
    flag of coordinates inside the guard band (finite and |X| <= 2^29)."""
    v = verts_ndc.detach().to(torch.float64)
    X = (v[..., 0] + 1.0) * W / 2.0
    Y = (v[..., 1] + 1.0) * H / 2.0
    fx = torch.floor(X * SUBPIXEL + 0.5)
    fy = torch.floor(Y * SUBPIXEL + 0.5)
    ok = torch.isfinite(fx) & torch.isfinite(fy) & (fx.abs() <= GUARD) & (fy.abs() <= GUARD)
    fx = torch.where(ok, fx, torch.zeros_like(fx)).to(torch.int64)
    fy = torch.where(ok, fy, torch.zeros_like(fy)).to(torch.int64)
    return torch.stack([fx, fy], -1), ok


def rasterize_mesh_reference(verts_ndc: torch.Tensor, faces: torch.Tensor, image_size,
                             attributes: torch.Tensor | None = None, *, cull: str = "none",
                             perspective_correct: bool = True):
    """Z-buffered triangle rasterization (dense pixels x faces evaluation, faces in chunks).

    Args:
        verts_ndc: (B, V, 3) x, y in NDC (see module docstring), z = camera-space depth.
        faces: (F, 3) integer vertex indices, shared by the batch.
        image_size: int or (H, W).
        attributes: (B, V, C) per-vertex attributes, or None.
        cull: "none", "cw" or "ccw": skip faces whose vertices run (counter-)clockwise on the
            image as displayed (x right, y down).
        perspective_correct: interpolate with 1/z (faces with a vertex at z <= 0 are skipped);
            False: screen-space linear interpolation, any z.
    Returns:
        attr_image (B, C, H, W), mask (B, 1, H, W), depth (B, 1, H, W) (inf where empty),
        face_index (B, H, W) int64 (-1 where empty), bary (B, H, W, 3).
    """
    H, W = _image_hw(image_size)
    B, V, _ = verts_ndc.shape
    F_ = faces.shape[0]
    dev = verts_ndc.device
    fixed, ok = snap_vertices(verts_ndc, H, W)
    z = verts_ndc.detach().to(torch.float64)[..., 2]
    faces = faces.to(device=dev, dtype=torch.int64)
    # pixel centres in fixed point
    py = (torch.arange(H, device=dev, dtype=torch.int64) * SUBPIXEL + SUBPIXEL // 2)
    px = (torch.arange(W, device=dev, dtype=torch.int64) * SUBPIXEL + SUBPIXEL // 2)
    py, px = torch.meshgrid(py, px, indexing="ij")
    px, py = px.reshape(-1, 1), py.reshape(-1, 1)  # (P, 1)
    P = H * W
    best_depth = torch.full((B, P), float("inf"), dtype=torch.float64, device=dev)
    best_face = torch.full((B, P), -1, dtype=torch.int64, device=dev)
    best_bary = torch.zeros(B, P, 3, dtype=torch.float64, device=dev)
    chunk = max(1, (1 << 22) // max(P, 1))
    for b in range(B):
        for f0 in range(0, F_, chunk):
            fc = faces[f0:f0 + chunk]  # (f, 3)
            fid = torch.arange(f0, f0 + fc.shape[0], device=dev)
            vx = fixed[b, :, 0][fc]  # (f, 3)
            vy = fixed[b, :, 1][fc]
            vz = z[b][fc]
            valid = ok[b][fc].all(1) & torch.isfinite(vz).all(1)
            if perspective_correct:
                valid &= (vz > 0).all(1)
            # edge k is opposite vertex k: from vertex k+1 to vertex k+2
            ax, ay = vx[:, [1, 2, 0]], vy[:, [1, 2, 0]]
            bx, by = vx[:, [2, 0, 1]], vy[:, [2, 0, 1]]
            dx, dy = bx - ax, by - ay  # (f, 3)
            area = dx[:, 2] * (vy[:, 2] - ay[:, 2]) - dy[:, 2] * (vx[:, 2] - ax[:, 2])
            valid &= area != 0
            if cull == "cw":  # area > 0 <=> clockwise on the displayed image (y down)
                valid &= area < 0
            elif cull == "ccw":
                valid &= area > 0
            sign = torch.where(area < 0, -1, 1)
            odx, ody = dx * sign[:, None], dy * sign[:, None]
            top_left = ((ody == 0) & (odx > 0)) | (ody < 0)  # (f, 3)
            # edge functions (P, f, 3), exact in int64
            w = (dx[None] * (py[:, :, None] - ay[None]) - dy[None] * (px[:, :, None] - ax[None]))
            w = w * sign[None, :, None]
            inside = ((w > 0) | ((w == 0) & top_left[None])).all(-1) & valid[None]
            bs = w.to(torch.float64) / (area * sign).to(torch.float64)[None, :, None]
            if perspective_correct:
                q = bs / vz[None]
                inv = q.sum(-1)
                depth = 1.0 / inv
                bary = q / inv[..., None]
            else:
                depth = (bs * vz[None]).sum(-1)
                bary = bs
            depth = torch.where(inside, depth, torch.full_like(depth, float("inf")))
            # z-test inside the chunk: smallest depth, ties -> lowest face index
            dmin = depth.min(1).values  # (P,)
            cand = inside & (depth == dmin[:, None])
            first = torch.where(cand, fid[None], torch.full_like(cand, F_, dtype=torch.int64))
            first = first.min(1).values
            has = first < F_
            sel = (first - f0).clamp(0, fc.shape[0] - 1)
            better = has & ((dmin < best_depth[b])
                            | ((dmin == best_depth[b]) & (first < best_face[b])))
            best_depth[b] = torch.where(better, dmin, best_depth[b])
            best_face[b] = torch.where(better, first, best_face[b])
            chosen = bary.gather(1, sel[:, None, None].expand(-1, 1, 3))[:, 0]
            best_bary[b] = torch.where(better[:, None], chosen, best_bary[b])
    out_dtype = verts_ndc.dtype
    face_index = best_face.view(B, H, W)
    bary = best_bary.to(out_dtype).view(B, H, W, 3)
    depth = best_depth.to(out_dtype).view(B, 1, H, W)
    mask = (face_index >= 0).to(out_dtype).unsqueeze(1)
    attr_image = interpolate_attributes_reference(attributes, faces, face_index, bary, B, H, W,
                                                  out_dtype)
    return attr_image, mask, depth, face_index, bary


def interpolate_attributes_reference(attributes, faces, face_index, bary, B=None, H=None, W=None,
                                     dtype=None):
    """attr_image (B, C, H, W) = sum_k bary[..., k] * attributes[b, faces[face_index, k]]
    (zeros where face_index < 0). Differentiable in ``attributes``."""
    if attributes is None:
        B, H, W = face_index.shape
        return torch.zeros(B, 0, H, W, dtype=dtype or bary.dtype, device=bary.device)
    B, H, W = face_index.shape
    C = attributes.shape[-1]
    if faces.shape[0] == 0 or attributes.shape[1] == 0 or B * H * W * C == 0:
        # zeros in the graph of attributes (an empty sum: no attribute value is read)
        return attributes.new_zeros(B, C, H, W) + attributes[:, :0].sum()
    faces = faces.to(device=attributes.device, dtype=torch.int64)
    fi = face_index.reshape(B, H * W)
    vid = faces[fi.clamp(min=0)]  # (B, P, 3)
    g = torch.gather(attributes, 1, vid.reshape(B, 3 * H * W, 1).expand(-1, -1, C))  # (B, 3P, C)
    g = g.reshape(B, H * W, 3, C)
    hit = (fi >= 0)[..., None]
    w = torch.where(hit, bary.reshape(B, H * W, 3),
                    torch.zeros((), dtype=bary.dtype, device=bary.device))
    # (the where after the sum too: an empty pixel reads face 0's attributes with weight 0, and
    # 0 * NaN / inf would put NaN there; the compiled kernels leave empty pixels 0)
    out = torch.where(hit, (g * w.to(g.dtype)[..., None]).sum(2),
                      torch.zeros((), dtype=g.dtype, device=g.device))  # (B, P, C)
    return out.permute(0, 2, 1).reshape(B, C, H, W)


def splat_points_reference(points_ndc: torch.Tensor, features: torch.Tensor, image_size, *,
                           radius: float = 0.5, background: float = 0.0):
    """Z-buffered point splatting, every (point, covered pixel) pair materialised.

    A point covers the pixels whose centre lies within ``radius`` pixels of the point's projected
    position (distance <= radius, in pixel units); per pixel the covering point of smallest z
    wins, ties -> lowest index. Points with a non-finite coordinate are ignored.

    Args:
        points_ndc: (B, N, 3) x, y in NDC, z depth (smaller is nearer).
        features: (B, N, C).
    Returns:
        image (B, C, H, W) (``background`` where empty), depth (B, 1, H, W) (inf where empty),
        index (B, H, W) int64 (-1 where empty).
    """
    H, W = _image_hw(image_size)
    B, N, _ = points_ndc.shape
    C = features.shape[-1]
    dev = points_ndc.device
    p = points_ndc.detach().to(torch.float64)
    X = (p[..., 0] + 1.0) * W / 2.0 - 0.5  # pixel-centre coordinates: centre j at X = j
    Y = (p[..., 1] + 1.0) * H / 2.0 - 0.5
    Z = p[..., 2]
    finite = torch.isfinite(X) & torch.isfinite(Y) & torch.isfinite(Z)
    Xs = torch.where(finite, X, torch.zeros_like(X))
    Ys = torch.where(finite, Y, torch.zeros_like(Y))
    r = float(radius)
    # candidate pixels: a window of +-k around the point's pixel, its position clamped to the
    # one-pixel border around the image (a pixel of the image within r of the point is then
    # still in the window), k capped at the image size (a larger window adds no pixel)
    k = min(int(r), max(H, W) + 1) + 1
    offs = torch.arange(-k, k + 2, device=dev)
    oy, ox = torch.meshgrid(offs, offs, indexing="ij")
    ox, oy = ox.reshape(-1), oy.reshape(-1)  # (K,)
    cx = torch.floor(Xs).clamp(-1, W).to(torch.int64)[..., None] + ox  # (B, N, K)
    cy = torch.floor(Ys).clamp(-1, H).to(torch.int64)[..., None] + oy
    d2 = (cx.to(torch.float64) - Xs[..., None]) ** 2 + (cy.to(torch.float64) - Ys[..., None]) ** 2
    cover = (d2 <= r * r) & (cx >= 0) & (cx < W) & (cy >= 0) & (cy < H) & finite[..., None]
    pix = (cy.clamp(0, H - 1) * W + cx.clamp(0, W - 1))  # (B, N, K)
    NK = N * ox.numel()
    depth = torch.full((B, H * W), float("inf"), dtype=torch.float64, device=dev)
    zc = torch.where(cover, Z[..., None].expand_as(d2), torch.full_like(d2, float("inf")))
    depth.scatter_reduce_(1, pix.reshape(B, NK), zc.reshape(B, NK), "amin")
    idx = torch.arange(N, device=dev)[None, :, None].expand_as(pix)
    win = cover & (zc == depth.gather(1, pix.reshape(B, NK)).view_as(zc))
    index = torch.full((B, H * W), N, dtype=torch.int64, device=dev)
    index.scatter_reduce_(1, pix.reshape(B, NK),
                          torch.where(win, idx, torch.full_like(idx, N)).reshape(B, NK), "amin")
    index = torch.where(index == N, torch.full_like(index, -1), index)
    image = gather_features_reference(features, index, background).view(B, C, H, W)
    return image, depth.to(points_ndc.dtype).view(B, 1, H, W), index.view(B, H, W)


def gather_features_reference(features: torch.Tensor, index: torch.Tensor,
                              background: float = 0.0) -> torch.Tensor:
    """(B, N, C) features, (B, ...) int64 index (-1: empty) -> (B, C, ...) features[b, index]
    (``background`` where empty). Differentiable in ``features``."""
    B, N, C = features.shape
    flat = index.reshape(B, math.prod(index.shape[1:]))
    g = torch.gather(features, 1, flat.clamp(min=0)[..., None].expand(-1, -1, C))
    g = torch.where((flat >= 0)[..., None], g,
                    torch.full((), background, dtype=features.dtype, device=features.device))
    return g.permute(0, 2, 1).reshape(B, C, *index.shape[1:])


def texel_centres(n: int, align_corners: bool, dtype=torch.float64, device=None) -> torch.Tensor:
    """Normalized coordinates of the texel centres along an axis of n texels (grid_sample's)."""
    i = torch.arange(n, dtype=dtype, device=device)
    if align_corners:
        return i * (2.0 / (n - 1)) - 1.0 if n > 1 else torch.zeros(1, dtype=dtype, device=device)
    return (2.0 * i + 1.0) / n - 1.0


def points_to_triplane_reference(points: torch.Tensor, features: torch.Tensor, resolution, *,
                                 plane_axes: str, box_size: float = 1.0,
                                 align_corners: bool = False, valid: torch.Tensor | None = None,
                                 max_distance: float | None = None):
    """Nearest-point lifting of a point cloud to three planes, by brute force (as GOHA's
    ``torch.cdist`` + ``argmin``, with exact distances: (du^2 + dv^2) in float64).

    Args:
        points: (B, N, 3) world coordinates, scaled by ``2 / box_size`` before projection.
        features: (B, N, C).
        resolution: int or (H, W) of each plane.
        valid: (B, N) bool or None. Points with a non-finite coordinate are never valid.
        max_distance: texels whose nearest point is farther (normalized plane units) stay empty.
    Returns:
        planes (B, 3, C, H, W) (zeros where empty), index (B, 3, H, W) int64 (-1 where empty).
    """
    H, W = _image_hw(resolution)
    B, N, _ = points.shape
    C = features.shape[-1]
    dev = points.device
    p = points.detach().to(torch.float64) * (2.0 / box_size)
    uv = project_onto_planes(p, plane_axes)  # (B, 3, N, 2)
    ok = torch.isfinite(uv).all(-1)  # (B, 3, N)
    if valid is not None:
        ok &= valid.to(dev, torch.bool)[:, None]
    cu = texel_centres(W, align_corners, device=dev)
    cv = texel_centres(H, align_corners, device=dev)
    tv, tu = torch.meshgrid(cv, cu, indexing="ij")
    tex = torch.stack([tu.reshape(-1), tv.reshape(-1)], -1)  # (HW, 2)
    index = torch.full((B, 3, H * W), -1, dtype=torch.int64, device=dev)
    chunk = max(1, (1 << 22) // max(N, 1))
    for b in range(B):
        for pl in range(3):
            q = torch.where(ok[b, pl, :, None], uv[b, pl], torch.zeros_like(uv[b, pl]))
            for t0 in range(0, H * W, chunk):
                t = tex[t0:t0 + chunk]
                d2 = (t[:, None, 0] - q[None, :, 0]) ** 2 + (t[:, None, 1] - q[None, :, 1]) ** 2
                d2 = torch.where(ok[b, pl][None], d2, torch.full_like(d2, float("inf")))
                if N == 0:
                    continue
                dmin, amin = d2.min(1)  # min returns the first minimal index
                keep = torch.isfinite(dmin)
                if max_distance is not None:
                    keep &= dmin <= float(max_distance) ** 2
                index[b, pl, t0:t0 + chunk] = torch.where(keep, amin, torch.full_like(amin, -1))
    planes = gather_features_reference(features, index.view(B, 3 * H * W))  # (B, C, 3HW)
    planes = planes.view(B, C, 3, H, W).permute(0, 2, 1, 3, 4)
    return planes, index.view(B, 3, H, W)
