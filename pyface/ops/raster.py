"""Public rasterization ops: mesh rasterization, camera projection, z-buffered point splatting and
nearest-point point-cloud -> tri-plane lifting.

Screen conventions of the family (``rasterize_mesh``, ``splat_points``, ``project_points``):

* x, y are NDC in [-1, 1]; x = -1 is the LEFT edge of the image, y = -1 the TOP edge (rows grow
  with y, as in ``F.grid_sample``); z is depth, smaller is nearer.
* Pixel centres follow ``align_corners=False``: pixel (row i, column j) of an H x W image has its
  centre at x = (2 j + 1) / W - 1, y = (2 i + 1) / H - 1. So
  ``F.grid_sample(image, verts_ndc[..., :2].unsqueeze(1), align_corners=False)`` reads the
  rendered image at the vertices' positions.
"""
from __future__ import annotations

import dataclasses

import torch

from pyface import _backend
from pyface.ops._checks import (MAX_PLANE_SIZE, ShapeChecker, check_autodiff_mode, check_choice,
                                check_positive, has_values, is_number)
from pyface.ops.reference.raster import (
    CULL_MODES,
    points_to_triplane_reference,
    rasterize_mesh_reference,
    splat_points_reference,
)
from pyface.ops.triplane import PLANE_AXES


@dataclasses.dataclass(frozen=True)
class BFMCamera:
    """The fixed perspective camera of Deep3DFaceRecon's BFM renderer (224 x 224 crops).

    The BFM mesh is in a right-handed frame (x right, y up, z towards the viewer); the camera sits
    at (0, 0, ``distance``) looking down -z, so a vertex's depth is ``distance - z``. The image
    point is ``focal * (x, y) / depth + center`` in pixels with y up, flipped to y down for the
    image; ``center`` is measured from the image's left/top EDGE (pixel centres at i + 0.5).
    """

    focal: float = 1015.0
    center: float = 112.0
    distance: float = 10.0
    image_size: int = 224


def _image_hw(name: str, image_size) -> tuple[int, int]:
    if is_number(image_size, integer=True):
        h = w = image_size
    elif (isinstance(image_size, (tuple, list, torch.Size)) and len(image_size) == 2
          and all(is_number(s, integer=True) for s in image_size)):
        h, w = image_size
    else:
        raise ValueError(f"{name}: expected an int or (H, W) ints, got {image_size!r}")
    if h <= 0 or w <= 0:
        raise ValueError(f"{name}: expected positive sizes, got {image_size!r}")
    return int(h), int(w)


def project_points(verts: torch.Tensor, cameras) -> torch.Tensor:
    """Projects world points to the family's NDC (x, y in [-1, 1], y down) with z = camera-space
    depth, ready for :func:`rasterize_mesh` / :func:`splat_points`. Pure PyTorch, differentiable.

    Args:
        verts: (B, V, 3) world coordinates.
        cameras: one of
            * (B, 25) or (25,) EG3D labels: flattened OpenCV cam2world 4x4 (x right, y down,
              z forward) followed by the flattened 3x3 intrinsics normalized by the image size
              (fx/W, fy/H, cx/W, cy/H; u = 0 is the image's left edge). Resolution-free.
            * a :class:`BFMCamera` (or the string ``"bfm"`` for the default one): Deep3DFaceRecon's
              224-crop camera, focal 1015, centre 112, camera distance 10.
    Returns:
        (B, V, 3) verts_ndc: x, y in NDC, z = depth along the optical axis (positive in front).
    """
    chk = ShapeChecker()
    chk.tensor("verts", verts, "B V 3")
    if isinstance(cameras, str):
        check_choice("cameras", cameras, ("bfm",))
        cameras = BFMCamera()
    if isinstance(cameras, BFMCamera):
        depth = cameras.distance - verts[..., 2]
        s = 2.0 / cameras.image_size
        u = cameras.focal * verts[..., 0] / depth + cameras.center
        v = cameras.focal * verts[..., 1] / depth + cameras.center  # y up
        return torch.stack([u * s - 1.0, (cameras.image_size - v) * s - 1.0, depth], -1)
    if not isinstance(cameras, torch.Tensor):
        raise TypeError("cameras: expected a (B, 25) tensor of EG3D labels, a BFMCamera or 'bfm', "
                        f"got {type(cameras).__name__}")
    if cameras.dim() == 1:
        chk.tensor("cameras", cameras, "25")
        cameras = cameras.unsqueeze(0).expand(verts.shape[0], -1)
    else:
        chk.tensor("cameras", cameras, "B 25")
    c = cameras.to(verts.dtype)
    cam2world = c[:, :16].reshape(-1, 4, 4)
    K = c[:, 16:25].reshape(-1, 3, 3)
    R, t = cam2world[:, :3, :3], cam2world[:, :3, 3]
    p = torch.bmm(verts - t[:, None], R)  # R^T (p - t), as rows
    uvw = torch.bmm(p, K.transpose(1, 2))  # normalized image coords * z
    z = p[..., 2]
    return torch.stack([2.0 * uvw[..., 0] / z - 1.0, 2.0 * uvw[..., 1] / z - 1.0, z], -1)


def rasterize_mesh(verts_ndc: torch.Tensor, faces: torch.Tensor, image_size,
                   attributes: torch.Tensor | None = None, *, cull: str = "none",
                   perspective_correct: bool = True, backend: str | None = None):
    """Z-buffered triangle rasterization with perspective-correct attribute interpolation.

    Conventions: see the module docstring (NDC x right, y DOWN, pixel centres as
    ``align_corners=False``). Coverage is exact: vertices snap to 1/256 pixel and edge functions
    are integers, with the top-left fill rule, so a pixel centre on an edge shared by two
    triangles is drawn exactly once. The nearest face (smallest depth) wins; equal depths ->
    lowest face index. Faces with a vertex at z <= 0 (at or behind the camera; there is no
    near-plane clipping), a non-finite vertex, a vertex beyond 2^21 pixels from the image, or
    zero area are not drawn.

    Gradients flow to ``attributes`` only (the interpolation is linear in them); vertex
    positions get no gradient (coverage, depth and barycentrics are piecewise constant in the
    rasterizer's sense and are returned detached).

    Args:
        verts_ndc: (B, V, 3) vertices: x, y in NDC, z = camera-space depth (> 0 in front of the
            camera), e.g. from :func:`project_points`.
        faces: (F, 3) int32/int64 vertex indices in [0, V), shared by the batch.
        image_size: int or (H, W).
        attributes: (B, V, C) per-vertex attributes (colours, normals, uv, ...) or None.
        cull: ``"none"``, ``"cw"`` or ``"ccw"``: skip the faces whose vertices run clockwise /
            counter-clockwise on the image as displayed (x right, y down). A mesh whose front
            faces are counter-clockwise seen from the camera in a y-up frame (OpenGL / BFM) shows
            them clockwise on the image: cull back faces with ``cull="ccw"``.
        perspective_correct: interpolate with 1/z (default). False: screen-space linear
            barycentrics and depth (for orthographic projections; any z).
        backend: ``None`` (the default for the device), ``"reference"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        attr_image: (B, C, H, W) interpolated attributes (zeros where empty; C = 0 without
            attributes), dtype of ``attributes``.
        mask: (B, 1, H, W) 1.0 where a face is drawn, else 0.0 (dtype of ``verts_ndc``).
        depth: (B, 1, H, W) depth of the visible surface, ``inf`` where empty.
        face_index: (B, H, W) int64 index of the visible face, -1 where empty.
        bary: (B, H, W, 3) barycentrics of the visible face (perspective-correct when asked),
            zeros where empty: attr = sum_k bary[..., k] * attributes[faces[face_index, k]].
    """
    chk = ShapeChecker()
    chk.tensor("verts_ndc", verts_ndc, "B V 3")
    chk.tensor("faces", faces, "F 3", dtypes=(torch.int32, torch.int64))
    if attributes is not None:
        chk.tensor("attributes", attributes, "B V C")
    H, W = _image_hw("image_size", image_size)
    check_choice("cull", cull, CULL_MODES)
    if not isinstance(perspective_correct, bool):
        raise TypeError("perspective_correct: expected bool, got "
                        f"{type(perspective_correct).__name__}")
    name = _backend.select_backend("rasterize_mesh", verts_ndc.device, backend, verts_ndc.dtype)
    if name == "reference":
        _check_faces_range(faces, verts_ndc.shape[1])
        return rasterize_mesh_reference(verts_ndc, faces, (H, W), attributes, cull=cull,
                                        perspective_correct=perspective_correct)
    check_autodiff_mode("rasterize_mesh", name, attributes)
    face_index, bary, depth = torch.ops.pyface.raster_mesh(verts_ndc.detach(), faces, H, W, cull,
                                                           perspective_correct)
    mask = (face_index >= 0).unsqueeze(1).to(verts_ndc.dtype)
    if attributes is None:
        attr_image = verts_ndc.new_zeros((verts_ndc.shape[0], 0, H, W))
    else:
        attr_image = torch.ops.pyface.mesh_interpolate(attributes, faces, face_index, bary)
    return attr_image, mask, depth, face_index, bary


def _check_faces_range(faces: torch.Tensor, V: int) -> None:
    if faces.numel() and has_values(faces) and (int(faces.min()) < 0 or int(faces.max()) >= V):
        raise IndexError(f"faces: vertex indices must lie in [0, V) = [0, {V}), got values in "
                         f"[{int(faces.min())}, {int(faces.max())}]")


def splat_points(points_ndc: torch.Tensor, features: torch.Tensor, image_size, *,
                 radius: float = 0.5, background: float = 0.0, backend: str | None = None):
    """Z-buffered point splatting: every point covers the pixels whose centre lies within
    ``radius`` pixels of its projected position (distance <= radius); per pixel the nearest
    covering point (smallest z) wins, ties -> lowest index. Conventions: see the module
    docstring; with the default ``radius=0.5`` a point covers the pixel it falls in (and a
    neighbour only when it lies exactly half a pixel away from that neighbour's centre).
    Points with a non-finite coordinate are ignored.

    Gradients flow to ``features`` (scatter-add through ``index``); points get none.

    Args:
        points_ndc: (B, N, 3) x, y in NDC, z = depth (smaller is nearer); N = 0 gives an
            empty image.
        features: (B, N, C).
        image_size: int or (H, W).
        radius: splat radius in pixels (>= 0).
        background: value of empty pixels in ``image``.
        backend: ``None``, ``"reference"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        image: (B, C, H, W) the winning point's features (``background`` where empty).
        depth: (B, 1, H, W) its depth (``inf`` where empty).
        index: (B, H, W) int64 its index (-1 where empty).
    """
    chk = ShapeChecker()
    chk.tensor("points_ndc", points_ndc, "B N 3")
    chk.tensor("features", features, "B N C")
    H, W = _image_hw("image_size", image_size)
    if not is_number(radius) or not radius >= 0 or radius == float("inf"):
        raise ValueError(f"radius: expected a finite number >= 0, got {radius!r}")
    if not is_number(background):
        raise TypeError(f"background: expected a number, got {background!r}")
    name = _backend.select_backend("splat_points", points_ndc.device, backend, points_ndc.dtype)
    if chk.dims["N"] == 0:      # no point: every pixel is empty (the same on every backend)
        B, C = features.shape[0], features.shape[2]
        image = features.new_full((B, C, H, W), float(background)) + features.sum() * 0
        depth = points_ndc.new_full((B, 1, H, W), float("inf"))
        return image, depth, torch.full((B, H, W), -1, dtype=torch.int64,
                                        device=points_ndc.device)
    if name == "reference":
        return splat_points_reference(points_ndc, features, (H, W), radius=radius,
                                      background=background)
    check_autodiff_mode("splat_points", name, features)
    index, depth = torch.ops.pyface.splat_points_index(points_ndc.detach(), H, W, float(radius))
    B, C = features.shape[0], features.shape[2]
    image = torch.ops.pyface.gather_features(features, index.view(B, 1, H * W), float(background))
    return image.view(B, C, H, W), depth, index


def points_to_triplane(points: torch.Tensor, features: torch.Tensor, resolution, *,
                       plane_axes: str, box_size: float = 1.0,
                       align_corners: bool = False, valid: torch.Tensor | None = None,
                       max_distance: float | None = None, backend: str | None = None):
    """Lifts a point cloud to a tri-plane: every texel of each plane takes the features of the
    nearest valid point in the plane's 2D projection (GOHA's appearance branch), found by a
    grid-binned search in O(N + H W) memory instead of an N x H W distance matrix.

    Points are scaled by ``2 / box_size`` and projected as in :func:`pyface.ops.triplane_sample`
    (``"xy_xz_zy"``: planes (x, y), (x, z), (z, y); ``"eg3d"``: (x, y), (x, z), (z, x); the first
    coordinate indexes the width). Texel centres follow ``align_corners`` as ``F.grid_sample``;
    ``align_corners=True`` reproduces GOHA's ``linspace(-1, 1)`` texel grid. Distances are
    Euclidean in normalized plane units; ties -> lowest point index. Points with a non-finite
    coordinate count as invalid. Points outside the box still compete (GOHA does not clip).

    Gradients flow to ``features`` (scatter-add through ``index``); points get none (the choice
    of the nearest point is piecewise constant).

    Args:
        points: (B, N, 3) world coordinates; N = 0 gives empty planes (as no valid point).
        features: (B, N, C).
        resolution: int or (H, W) of each plane, H, W <= 2^24 (as in ``triplane_sample``).
        plane_axes: ``"eg3d"`` (EG3D / OTAvatar checkpoints: planes (x, y), (x, z), (z, x)) or
            ``"xy_xz_zy"`` (corrected: (x, y), (x, z), (z, y); GOHA, Export3D, MMFA). Required,
            with no default: the planes' axes are a property of the checkpoint / the network
            that made them, and points lifted or sampled with one and rendered with the other
            silently swap the third plane.
        box_size: side of the cube that the planes span.
        align_corners: texel-centre convention, as in ``F.grid_sample``.
        valid: (B, N) bool, or None (all valid).
        max_distance: texels whose nearest valid point is farther than this (normalized plane
            units) stay empty; None fills every texel (GOHA).
        backend: ``None``, ``"reference"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        planes: (B, 3, C, H, W) (zeros where empty), dtype of ``features``.
        index: (B, 3, H, W) int64 index of the chosen point, -1 where empty.
    """
    chk = ShapeChecker()
    chk.tensor("points", points, "B N 3")
    chk.tensor("features", features, "B N C")
    if valid is not None:
        chk.tensor("valid", valid, "B N", dtypes=(torch.bool,))
    H, W = _image_hw("resolution", resolution)
    if max(H, W) > MAX_PLANE_SIZE:  # the planes' limit in triplane_sample / render_triplane
        raise ValueError(f"resolution: expected H, W <= 2^24 = {MAX_PLANE_SIZE} (the tri-plane "
                         f"size limit of triplane_sample), got {resolution!r}")
    check_choice("plane_axes", plane_axes, PLANE_AXES)
    check_positive("box_size", box_size)
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners: expected bool, got {type(align_corners).__name__}")
    if max_distance is not None and (not is_number(max_distance) or not max_distance >= 0):
        raise ValueError(f"max_distance: expected None or a number >= 0, got {max_distance!r}")
    name = _backend.select_backend("points_to_triplane", points.device, backend, points.dtype)
    if chk.dims["N"] == 0:      # no point: every texel is empty, as when no point is valid
        B, C = features.shape[0], features.shape[2]
        planes = features.new_zeros((B, 3, C, H, W)) + features.sum() * 0
        return planes, torch.full((B, 3, H, W), -1, dtype=torch.int64, device=points.device)
    if name == "reference":
        return points_to_triplane_reference(points, features, (H, W), plane_axes=plane_axes,
                                            box_size=float(box_size), align_corners=align_corners,
                                            valid=valid, max_distance=max_distance)
    check_autodiff_mode("points_to_triplane", name, features)
    index = torch.ops.pyface.points_to_triplane_index(
        points.detach(), valid, H, W, plane_axes, float(box_size), align_corners,
        -1.0 if max_distance is None else float(max_distance))
    B, C = features.shape[0], features.shape[2]
    planes = torch.ops.pyface.gather_features(features, index.view(B, 3, H * W), 0.0)
    return planes.view(B, 3, C, H, W), index
