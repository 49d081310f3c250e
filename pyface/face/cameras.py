# Provenance: reproduces the camera conventions of EG3D (NVlabs/eg3d, commit 7cf1fd1, NVIDIA
# Source Code License, non-commercial) (camera_utils, dataset_preprocessing) and the Euler-angle
# convention of Deep3DFaceRecon (sicxu/Deep3DFaceRecon_pytorch, MIT). Our own implementation,
# written from the papers and the upstream's documented behaviour; no upstream code is copied.
# pyface's code is licensed under Apache-2.0 (LICENSE).
"""Camera conventions: EG3D 25-dim labels, look-at, FOV <-> intrinsics, orbits, mirroring, and the
Deep3DFaceRecon pose -> EG3D camera conversion.

Conventions (all functions are batched over leading dims and differentiable):

* **World frame** (EG3D and our head models): y up, the face looks along +z, the subject's right
  ear at -x. Units of EG3D space; a BFM-space head is mapped in by ``BFM_TO_EG3D_SCALE`` (0.27).
* **cam2world** ``(..., 4, 4)``: OpenCV camera axes in world coordinates: x right, y *down*,
  z forward (the viewing direction); last column is the camera centre.
* **Normalized intrinsics** ``(..., 3, 3)``: ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` in units of
  the image size: a camera-space point (x, y, z) lands at ``u = fx * x / z + cx`` with u in
  [0, 1] from the left image border to the right one (v from top to bottom). Pixel ``(i, j)`` of a
  ``W``-wide image covers ``u`` in ``[j / W, (j + 1) / W]``.
* **EG3D label** ``(..., 25)``: flattened cam2world (16, row-major) ‖ flattened intrinsics (9).
"""
from __future__ import annotations

import math
import numbers

import torch

from pyface.ops._checks import has_values

#: EG3D FFHQ normalized focal length (2985.29 px on a 700-px crop of the 1024 alignment).
FFHQ_FOCAL = 4.2647
#: EG3D FFHQ field of view in degrees *as EG3D's ``FOV_to_intrinsics`` defines it* (see there).
FFHQ_FOV_DEG = 18.837
#: EG3D FFHQ camera radius and look-at pivot.
FFHQ_RADIUS = 2.7
FFHQ_PIVOT = (0.0, 0.0, 0.2)
#: Deep3DFaceRecon camera: distance from the BFM origin, focal length and centre on the 224 crop.
BFM_CAMERA_DISTANCE = 10.0
BFM_FOCAL = 1015.0
BFM_CENTER = 112.0
BFM_IMAGE_SIZE = 224
#: EG3D's radius normalisation of Deep3DFaceRecon cameras (BFM units -> EG3D units).
BFM_TO_EG3D_SCALE = 0.27
#: The two offsets of EG3D's FFHQ preprocessing ("additional offset used in submission"), added to
#: the camera centre after scaling. In-the-wild pipelines (GOHA) leave them out.
EG3D_SUBMISSION_OFFSET = (0.0, 0.006, 0.161)


def _vec(x, like: torch.Tensor | None = None, dtype=None, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if like is not None:
        dtype, device = like.dtype, like.device
    return torch.as_tensor(x, dtype=dtype or torch.get_default_dtype(), device=device)


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _check(name: str, x, trailing: tuple[int, ...], doc: str | None = None) -> None:
    """TypeError / ValueError naming ``name`` unless ``x`` is a floating-point tensor of shape
    ``(..., *trailing)`` (``doc``: the shape as the docstring writes it)."""
    doc = doc or "(..., " + ", ".join(str(t) for t in trailing) + ")"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {doc}, got {type(x).__name__}")
    if x.dim() < len(trailing) or tuple(x.shape[x.dim() - len(trailing):]) != trailing:
        raise ValueError(f"{name}: expected shape {doc}, got {_fmt_shape(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype "
                        f"{str(x.dtype).replace('torch.', '')}")


def _batch(names: str, *shapes) -> torch.Size:
    """The broadcast of the leading ``shapes``, or a ValueError naming the arguments."""
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise ValueError(f"{names}: leading (batch) dims do not broadcast: "
                         + ", ".join(_fmt_shape(s) for s in shapes)) from None


def _number(name: str, value, low: float = 0.0, high: float = math.inf) -> float:
    """``value`` as a float in the open interval ``(low, high)``, or a ValueError naming it."""
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}: expected a number, got {value!r}") from None
    if not low < v < high:
        bound = f"> {low:g}" if high == math.inf else f"in ({low:g}, {high:g})"
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")
    return v


def _normalize(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(eps)


# ----------------------------------------------------------------------------------------------
# EG3D labels


def make_label(cam2world: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Packs ``cam2world: (..., 4, 4)`` and ``intrinsics: (..., 3, 3)`` into a label ``(..., 25)``
    (the leading dims broadcast; the label takes ``cam2world``'s dtype)."""
    _check("cam2world", cam2world, (4, 4))
    _check("intrinsics", intrinsics, (3, 3))
    batch = _batch("cam2world, intrinsics", cam2world.shape[:-2], intrinsics.shape[:-2])
    return torch.cat([cam2world.expand(*batch, 4, 4).reshape(*batch, 16),
                      intrinsics.to(cam2world).expand(*batch, 3, 3).reshape(*batch, 9)], dim=-1)


def split_label(label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpacks ``label: (..., 25)`` into ``cam2world (..., 4, 4)`` and ``intrinsics (..., 3, 3)``."""
    _check("label", label, (25,))
    return (label[..., :16].reshape(*label.shape[:-1], 4, 4),
            label[..., 16:].reshape(*label.shape[:-1], 3, 3))


def check_label(label: torch.Tensor, name: str = "label") -> None:
    """Raises ``ValueError`` naming ``name`` if a label is not finite or not a camera (the
    rotation part must be orthonormal, the last row ``0 0 0 1``, intrinsics ``[.., .., 1]``).
    ``label: (..., 25)``; an empty batch passes. Reads the values (a host sync on a GPU)."""
    _check(name, label, (25,))
    if not has_values(label):           # fake / meta tensors: only the shape is known
        return
    if not torch.isfinite(label).all():
        raise ValueError(f"{name}: contains NaN or inf")
    c2w, k = split_label(label.double())
    r = c2w[..., :3, :3]
    eye = torch.eye(3, dtype=r.dtype, device=r.device)
    err = (r.transpose(-1, -2) @ r - eye).abs().amax().item() if r.numel() else 0.0
    if err > 1e-3:
        raise ValueError(f"{name}: rotation part of cam2world is not orthonormal "
                         f"(max |R^T R - I| = {err:.3g})")
    if r.numel() and (c2w[..., 3, :] - r.new_tensor([0, 0, 0, 1.0])).abs().amax() > 1e-4:
        raise ValueError(f"{name}: last row of cam2world must be (0, 0, 0, 1)")
    if k.numel() and (k[..., 2, 2] - 1).abs().amax() > 1e-4:
        raise ValueError(f"{name}: intrinsics[2, 2] must be 1")


# ----------------------------------------------------------------------------------------------
# intrinsics


def fov_to_focal(fov_deg, convention: str = "eg3d"):
    """Normalized focal length of a field of view in degrees.

    ``convention="eg3d"`` reproduces EG3D's ``FOV_to_intrinsics`` (``f = 1 / (tan(fov / 2) *
    1.414)``, with its constants 3.14159 and 1.414), so ``fov_to_focal(18.837) = 4.2634``,
    FFHQ's 4.2647 to three digits; the image then actually spans ``2 * atan(0.5 / f)``
    (13.4 deg for FFHQ).
    ``convention="pinhole"`` is the true full-image FOV: ``f = 0.5 / tan(fov / 2)``.
    ``fov_deg``: a number in (0, 180).
    """
    if convention in ("eg3d", "pinhole"):
        fov_deg = _number("fov_deg", fov_deg, 0.0, 180.0)
    if convention == "eg3d":
        return 1.0 / (math.tan(float(fov_deg) * 3.14159 / 360.0) * 1.414)
    if convention == "pinhole":
        return 0.5 / math.tan(math.radians(float(fov_deg)) / 2.0)
    raise ValueError(f"convention: expected 'eg3d' or 'pinhole', got {convention!r}")


def focal_to_fov(focal, convention: str = "eg3d") -> float:
    """Inverse of :func:`fov_to_focal` (degrees); ``focal``: a finite number > 0."""
    _number("focal", focal)
    if convention == "eg3d":
        return math.atan(1.0 / (float(focal) * 1.414)) * 360.0 / 3.14159
    if convention == "pinhole":
        return math.degrees(2.0 * math.atan(0.5 / float(focal)))
    raise ValueError(f"convention: expected 'eg3d' or 'pinhole', got {convention!r}")


def intrinsics_from_focal(focal: float = FFHQ_FOCAL, cx: float = 0.5, cy: float = 0.5, *,
                          dtype=None, device=None) -> torch.Tensor:
    """Normalized intrinsics ``(3, 3)``."""
    return torch.tensor([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]],
                        dtype=dtype or torch.get_default_dtype(), device=device)


def fov_to_intrinsics(fov_deg: float = FFHQ_FOV_DEG, convention: str = "eg3d", **kw) -> torch.Tensor:
    """Normalized intrinsics ``(3, 3)`` of a FOV in degrees (see :func:`fov_to_focal`)."""
    return intrinsics_from_focal(fov_to_focal(fov_deg, convention), **kw)


def intrinsics_to_pixels(intrinsics: torch.Tensor, width: int, height: int | None = None) -> torch.Tensor:
    """Normalized ``intrinsics: (..., 3, 3)`` -> pixel intrinsics ``(..., 3, 3)`` for a
    ``width x height`` image (``height`` defaults to ``width``)."""
    _check("intrinsics", intrinsics, (3, 3))
    height = width if height is None else height
    _number("width", width)
    _number("height", height)
    s = intrinsics.new_tensor([[width, width, width], [height, height, height], [1.0, 1.0, 1.0]])
    return intrinsics * s


# ----------------------------------------------------------------------------------------------
# extrinsics


def _fmt_vec(v: torch.Tensor) -> str:
    return "(" + ", ".join(f"{x + 0.0:.6g}" for x in v.tolist()) + ")"     # no -0


def _view_problem(origin: torch.Tensor, target: torch.Tensor, up: torch.Tensor):
    """The first camera of a :func:`look_at` batch without a view: ``(kind, index, origin,
    target, up)`` of it, ``kind`` ``"at"`` (``target - origin`` is zero, up to rounding:
    ``|target - origin| <= 16 eps max(|origin|, |target|)``), ``"up"`` (``up`` is zero) or
    ``"parallel"`` (the view direction is parallel to ``up``: the sine of their angle
    ``<= 16 eps``; ``eps`` of the dtype), ``index`` its batch index (``()`` unbatched); None when
    every camera has one (or the tensors have no values: fake / meta). Reads the values (a host
    sync on a GPU)."""
    if not has_values(origin, target, up):
        return None
    batch = torch.broadcast_shapes(origin.shape[:-1], target.shape[:-1], up.shape[:-1])
    o, t, u = (v.detach().expand(*batch, 3) for v in (origin, target, up))
    if not o.numel():
        return None
    tol = 16 * torch.finfo(o.dtype).eps
    d = t - o
    dist = d.norm(dim=-1)
    at = dist <= tol * torch.maximum(o.norm(dim=-1), t.norm(dim=-1))
    zero_up = u.norm(dim=-1) == 0
    sine = torch.linalg.cross(_normalize(d), _normalize(u), dim=-1).norm(dim=-1)
    parallel = ~at & ~zero_up & (sine <= tol)
    for kind, bad in (("at", at), ("up", zero_up & ~at), ("parallel", parallel)):
        hits = bad.nonzero()
        if len(hits):
            i = tuple(hits[0].tolist())
            return kind, i, o[i], t[i], u[i]
    return None


def _check_finite(name: str, x: torch.Tensor, trailing: int = 1) -> None:
    """ValueError naming ``name`` when ``x`` (``(..., *trailing dims)``) holds NaN or inf: its
    value (unbatched) or the batch indices of the rows that do, with the first such row (up to
    8 indices). Skipped for tensors without values (fake / meta). Reads the values (a host sync
    on a GPU)."""
    if not has_values(x) or not x.numel():
        return
    bad = ~torch.isfinite(x.detach())
    if trailing:
        bad = bad.flatten(-trailing).any(-1)
    if not bad.any():
        return
    if not bad.dim():
        got = _fmt_vec(x.detach().reshape(-1)) if trailing else f"{float(x):.6g}"
        raise ValueError(f"{name}: expected finite values, got {got}")
    rows = [tuple(r) if len(r) > 1 else r[0] for r in bad.nonzero().tolist()]
    first = x.detach()[rows[0]]
    first = _fmt_vec(first.reshape(-1)) if trailing else f"{float(first):.6g}"
    more = ", ..." if len(rows) > 8 else ""
    raise ValueError(f"{name}: expected finite values, got NaN or inf at batch indices "
                     f"[{', '.join(str(r) for r in rows[:8])}{more}] (the first: {first})")


def _batch_index(i: tuple) -> str:
    return "" if not i else f" (batch index {i[0] if len(i) == 1 else i})"


def look_at(origin, target=FFHQ_PIVOT, up=(0.0, 1.0, 0.0)) -> torch.Tensor:
    """OpenCV cam2world ``(..., 4, 4)`` of a camera at ``origin: (..., 3)`` looking at
    ``target: (..., 3)``, image-up along world ``up`` (EG3D's ``create_cam2world_matrix``).

    A camera needs a view direction that is not along ``up``: ``ValueError`` (naming the
    arguments, their values and, in a batch, the first such camera's batch index) when
    ``target == origin`` (up to rounding), when ``up`` is zero, or when ``target - origin`` is
    parallel to ``up`` (a camera straight above or below its target with the default ``up``):
    there is no rotation for these (the result would be zero or NaN). NaN or inf in
    ``origin``, ``target`` or ``up``: ``ValueError`` naming the argument and the batch indices
    of its non-finite rows. Reads the values for these checks (a host sync on a GPU)."""
    origin = _vec(origin)
    target = _vec(target, like=origin)
    up = _vec(up, like=origin)
    for name, v in (("origin", origin), ("target", target), ("up", up)):
        _check(name, v, (3,))
    for name, v in (("origin", origin), ("target", target), ("up", up)):
        _check_finite(name, v)
    _batch("origin, target, up", origin.shape[:-1], target.shape[:-1], up.shape[:-1])
    bad = _view_problem(origin, target, up)
    if bad is not None:
        kind, i, o, t, u = bad
        where = _batch_index(i)
        if kind == "at":
            raise ValueError(f"origin, target: expected target != origin (a view direction), got "
                             f"origin {_fmt_vec(o)} and target {_fmt_vec(t)}{where}")
        if kind == "up":
            raise ValueError(f"up: expected a non-zero vector, got {_fmt_vec(u)}{where}")
        raise ValueError(f"origin, target, up: expected a view direction target - origin not "
                         f"parallel to up, got target - origin = {_fmt_vec(t - o)} (origin "
                         f"{_fmt_vec(o)}, target {_fmt_vec(t)}) along up {_fmt_vec(u)}{where}: "
                         "the image's up is undefined; choose another up")
    return _look_at(origin, target, up)


def _look_at(origin: torch.Tensor, target: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """:func:`look_at` of checked arguments."""
    forward = _normalize(target - origin)
    right = _normalize(torch.linalg.cross(forward, up.expand_as(forward), dim=-1))
    down = torch.linalg.cross(forward, right, dim=-1)
    rot = torch.stack([right, down, forward], dim=-1)
    batch = rot.shape[:-2]
    c2w = torch.zeros(*batch, 4, 4, dtype=rot.dtype, device=rot.device)
    c2w[..., :3, :3] = rot
    c2w[..., :3, 3] = origin.expand(*batch, 3)
    c2w[..., 3, 3] = 1.0
    return c2w


def orbit_camera(yaw, pitch, radius: float = FFHQ_RADIUS, pivot=FFHQ_PIVOT) -> torch.Tensor:
    """cam2world ``(..., 4, 4)`` of a camera on the sphere of ``radius`` around the world origin,
    looking at ``pivot`` (EG3D's ``LookAtPoseSampler``: FFHQ uses radius 2.7, pivot (0, 0, 0.2)).

    ``yaw``/``pitch`` in radians (tensors or floats, broadcast): yaw > 0 moves the camera
    towards +x (the subject's left), pitch > 0 moves it up; ``yaw = pitch = 0`` is the frontal
    camera at ``(0, 0, radius)``. The yaw matches ``LookAtPoseSampler.sample`` with
    ``horizontal_mean = pi/2 + yaw``; pitch here is the true elevation angle (EG3D's
    ``vertical_mean = v`` is the elevation ``arcsin(1 - 2 v / pi)``).

    A camera at the pivot, or straight above or below it (its view direction along the world
    up ``(0, 1, 0)``: e.g. ``pitch = pi/2`` with the pivot on the y axis, or
    ``pitch = acos(0.2 / 2.7)`` at ``yaw = 0`` with FFHQ's radius and pivot) has no rotation
    (:func:`look_at`): ``ValueError`` naming the arguments, their values and, in a batch, the
    first such camera's batch index. NaN or inf in ``yaw``, ``pitch``, ``radius`` or ``pivot``:
    ``ValueError`` naming the argument (and the batch indices of its non-finite values).
    """
    yaw, pitch = _vec(yaw), _vec(pitch)
    for name, v in (("yaw", yaw), ("pitch", pitch)):
        _check(name, v, (), "(...)")
    _batch("yaw, pitch", yaw.shape, pitch.shape)
    for name, v in (("yaw", yaw), ("pitch", pitch)):
        _check_finite(name, v, 0)
    if isinstance(radius, torch.Tensor):
        _check_finite("radius", radius, 0)
    elif not isinstance(radius, bool) and isinstance(radius, numbers.Real) \
            and not math.isfinite(radius):
        raise ValueError(f"radius: expected a finite number, got {radius!r}")
    yaw, pitch = torch.broadcast_tensors(yaw, pitch)
    pivot = _vec(pivot, like=yaw)
    _check("pivot", pivot, (3,))
    _check_finite("pivot", pivot)
    direction = torch.stack([torch.cos(pitch) * torch.sin(yaw), torch.sin(pitch),
                             torch.cos(pitch) * torch.cos(yaw)], dim=-1)
    origin, up = radius * direction, direction.new_tensor([0.0, 1.0, 0.0])
    batch = _batch("yaw, pitch, pivot", origin.shape[:-1], pivot.shape[:-1])
    bad = _view_problem(origin, pivot, up)
    if bad is not None:
        kind, i, o, t, _ = bad
        r = f"{radius:.6g}" if isinstance(radius, (int, float)) else str(radius)
        cam = (f"yaw {float(yaw.expand(batch)[i]):.6g}, pitch {float(pitch.expand(batch)[i]):.6g}"
               f" and radius {r}, which put the camera at {_fmt_vec(o)}")
        if kind == "at":
            raise ValueError(f"radius, pivot: expected a camera away from the pivot, got {cam}, "
                             f"the pivot {_fmt_vec(t)}{_batch_index(i)}: it has no view direction")
        raise ValueError(f"yaw, pitch: expected a camera not straight above or below the pivot, "
                         f"got {cam}, the pivot {_fmt_vec(t)}{_batch_index(i)}: it looks along "
                         "the world up (0, 1, 0), so the image's up is undefined")
    return _look_at(origin, pivot, up)


def orbit_labels(n: int, yaw_range: float = math.radians(30), pitch_range: float = math.radians(10),
                 radius: float = FFHQ_RADIUS, pivot=FFHQ_PIVOT, focal: float = FFHQ_FOCAL,
                 kind: str = "ellipse") -> torch.Tensor:
    """``(n, 25)`` labels of a novel-view path: ``"ellipse"`` (yaw and pitch on an ellipse, the
    EG3D video path) or ``"yaw"`` (a horizontal sweep from -yaw_range to +yaw_range);
    ``n >= 0``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an integer >= 0, got {n!r}")
    t = torch.arange(n, dtype=torch.get_default_dtype()) / max(n, 1)
    if kind == "ellipse":
        yaw, pitch = yaw_range * torch.sin(2 * math.pi * t), pitch_range * torch.cos(2 * math.pi * t)
    elif kind == "yaw":
        yaw = torch.linspace(-yaw_range, yaw_range, n)
        pitch = torch.zeros(n)
    else:
        raise ValueError(f"kind: expected 'ellipse' or 'yaw', got {kind!r}")
    return make_label(orbit_camera(yaw, pitch, radius, pivot), intrinsics_from_focal(focal))


#: The free-view orbit of an animation (``pyface animate --camera orbit``, OTAvatar's and
#: Export3D's ``generate(camera="orbit")``): yaw and pitch amplitudes in degrees of an ellipse
#: that turns once over the animated frames (OTAvatar's orbit).
FREE_VIEW_YAW_DEG, FREE_VIEW_PITCH_DEG = 20.0, 8.0


def free_view_orbit(n: int, *, radius: float = FFHQ_RADIUS, pivot=FFHQ_PIVOT,
                    generator=None) -> torch.Tensor:
    """``(n, 25)`` labels of the free-view orbit: :func:`orbit_labels` on an ellipse of
    :data:`FREE_VIEW_YAW_DEG` yaw and :data:`FREE_VIEW_PITCH_DEG` pitch, one turn over ``n``
    frames (frame ``t`` of an animation of ``n`` frames: row ``t``). ``generator``: an EG3D
    generator (or anything with ``cfg.avg_camera_radius`` / ``cfg.avg_camera_pivot``) whose
    radius and pivot replace ``radius`` and ``pivot``; one without them keeps the given ones."""
    cfg = getattr(generator, "cfg", None)
    if cfg is not None and hasattr(cfg, "avg_camera_radius"):
        radius, pivot = cfg.avg_camera_radius, cfg.avg_camera_pivot
    return orbit_labels(n, math.radians(FREE_VIEW_YAW_DEG), math.radians(FREE_VIEW_PITCH_DEG),
                        radius=float(radius), pivot=tuple(pivot))


def camera_yaw_pitch(cam2world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`orbit_camera` for the camera position: (yaw, pitch) in radians of the
    camera centre around the world origin; ``cam2world: (..., 4, 4)`` -> two ``(...)``."""
    _check("cam2world", cam2world, (4, 4))
    d = cam2world[..., :3, 3]
    yaw = torch.atan2(d[..., 0], d[..., 2])
    pitch = torch.atan2(d[..., 1], torch.sqrt(d[..., 0] ** 2 + d[..., 2] ** 2))
    return yaw, pitch


def default_label(focal: float = FFHQ_FOCAL, radius: float = FFHQ_RADIUS, pivot=FFHQ_PIVOT) -> torch.Tensor:
    """The EG3D FFHQ frontal label ``(25,)``: camera at ``(0, 0, radius)`` looking at ``pivot``."""
    return make_label(orbit_camera(0.0, 0.0, radius, pivot), intrinsics_from_focal(focal))


_MIRROR_SIGNS = torch.tensor([[1.0, -1.0, -1.0, -1.0],
                              [-1.0, 1.0, 1.0, 1.0],
                              [-1.0, 1.0, 1.0, 1.0],
                              [1.0, 1.0, 1.0, 1.0]])


def mirror_label(label: torch.Tensor) -> torch.Tensor:
    """The label of the left-right mirrored image ``(..., 25)``.

    World and camera x are negated: cam2world entries (0,1), (0,2), (1,0), (2,0), (0,3) flip sign
    (EG3D's ``_mirror`` dataset augmentation) and ``cx -> 1 - cx`` (a no-op for the usual 0.5).
    Mirroring twice is the identity.
    """
    c2w, k = split_label(label)
    c2w = c2w * _MIRROR_SIGNS.to(c2w)
    k = k.clone()
    k[..., 0, 2] = 1.0 - k[..., 0, 2]
    return make_label(c2w, k)


# ----------------------------------------------------------------------------------------------
# Deep3DFaceRecon


def euler_to_rotation(angles: torch.Tensor) -> torch.Tensor:
    """Deep3DFaceRecon rotation ``R = Rz(c) @ Ry(b) @ Rx(a)`` ``(..., 3, 3)`` of
    ``angles: (..., 3)`` = (a, b, c) in radians: a = pitch about x, b = yaw about y,
    c = roll about z. A posed vertex is ``R @ v + trans`` (Deep3DFaceRecon stores ``R^T`` and
    right-multiplies row vectors; the result is the same)."""
    _check("angles", angles, (3,))
    a, b, c = angles.unbind(-1)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    ca, sa, cb, sb, cc, sc = a.cos(), a.sin(), b.cos(), b.sin(), c.cos(), c.sin()
    rx = torch.stack([one, zero, zero, zero, ca, -sa, zero, sa, ca], -1).unflatten(-1, (3, 3))
    ry = torch.stack([cb, zero, sb, zero, one, zero, -sb, zero, cb], -1).unflatten(-1, (3, 3))
    rz = torch.stack([cc, -sc, zero, sc, cc, zero, zero, zero, one], -1).unflatten(-1, (3, 3))
    return rz @ ry @ rx


def rotation_to_euler(rot: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`euler_to_rotation`: ``rot: (..., 3, 3)`` -> angles ``(..., 3)``
    (unique for |yaw| < 90 deg)."""
    _check("rot", rot, (3, 3))
    b = torch.asin((-rot[..., 2, 0]).clamp(-1.0, 1.0))
    a = torch.atan2(rot[..., 2, 1], rot[..., 2, 2])
    c = torch.atan2(rot[..., 1, 0], rot[..., 0, 0])
    return torch.stack([a, b, c], dim=-1)


def deep3d_to_cam2world(angles: torch.Tensor, trans: torch.Tensor, *,
                        submission_offsets: bool = False,
                        scale: float = BFM_TO_EG3D_SCALE,
                        camera_distance: float = BFM_CAMERA_DISTANCE) -> torch.Tensor:
    """EG3D cam2world ``(..., 4, 4)`` from Deep3DFaceRecon ``angles: (..., 3)`` and
    ``trans: (..., 3)`` (EG3D's ``3dface2idr_mat.py``).

    The Deep3DFaceRecon camera sits at ``(0, 0, camera_distance)`` looking down -z at the posed
    head ``R v + t``; in the head's own frame its centre is ``c = -R^T (t - (0, 0, d))`` and its
    OpenGL axes are the columns of ``R^T``. EG3D scales ``c`` by 0.27 (radius 10 -> 2.7), adds its
    two "submission" offsets when ``submission_offsets`` (FFHQ labels; off for in-the-wild data,
    as GOHA does) and converts to OpenCV axes (``R^T @ diag(1, -1, -1)``). The head frame becomes
    the EG3D world frame, scaled by ``scale``. The leading dims of ``angles`` and ``trans``
    broadcast.
    """
    _check("angles", angles, (3,))
    _check("trans", trans, (3,))
    _batch("angles, trans", angles.shape[:-1], trans.shape[:-1])
    if angles.dtype != trans.dtype:
        raise TypeError(f"trans: expected the dtype of angles ({angles.dtype}), got {trans.dtype}")
    rot_t = euler_to_rotation(angles).transpose(-1, -2)
    t = trans.clone()
    t[..., 2] = t[..., 2] - camera_distance
    centre = -(rot_t @ t.unsqueeze(-1)).squeeze(-1) * scale
    if submission_offsets:
        centre = centre + centre.new_tensor(EG3D_SUBMISSION_OFFSET)
    flip = torch.diag(rot_t.new_tensor([1.0, -1.0, -1.0]))
    c2w = torch.zeros(*rot_t.shape[:-2], 4, 4, dtype=rot_t.dtype, device=rot_t.device)
    c2w[..., :3, :3] = rot_t @ flip
    c2w[..., :3, 3] = centre
    c2w[..., 3, 3] = 1.0
    return c2w


def cam2world_to_deep3d(cam2world: torch.Tensor, *, submission_offsets: bool = False,
                        scale: float = BFM_TO_EG3D_SCALE,
                        camera_distance: float = BFM_CAMERA_DISTANCE) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`deep3d_to_cam2world`: ``cam2world: (..., 4, 4)`` ->
    ``(angles (..., 3), trans (..., 3))``."""
    _check("cam2world", cam2world, (4, 4))
    flip = torch.diag(cam2world.new_tensor([1.0, -1.0, -1.0]))
    rot = (cam2world[..., :3, :3] @ flip).transpose(-1, -2)
    centre = cam2world[..., :3, 3]
    if submission_offsets:
        centre = centre - centre.new_tensor(EG3D_SUBMISSION_OFFSET)
    t = -(rot @ (centre / scale).unsqueeze(-1)).squeeze(-1)
    t = t.clone()
    t[..., 2] = t[..., 2] + camera_distance
    return rotation_to_euler(rot), t


def deep3d_to_label(angles: torch.Tensor, trans: torch.Tensor, *, submission_offsets: bool = False,
                    focal: float = FFHQ_FOCAL) -> torch.Tensor:
    """EG3D label ``(..., 25)`` of a Deep3DFaceRecon pose ``angles: (..., 3)``,
    ``trans: (..., 3)`` (see :func:`deep3d_to_cam2world`), with EG3D's fixed FFHQ intrinsics."""
    c2w = deep3d_to_cam2world(angles, trans, submission_offsets=submission_offsets)
    return make_label(c2w, intrinsics_from_focal(focal, dtype=c2w.dtype, device=c2w.device))


# ----------------------------------------------------------------------------------------------
# projection


def project_label(points: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Projects world ``points: (B, N, 3)`` with EG3D ``label: (B, 25)``.

    Returns ``uv (B, N, 2)`` normalized image coordinates (0..1, origin top-left; multiply by the
    image size for pixels) and ``depth (B, N, 1)`` (camera-space z, > 0 in front of the camera).
    ``points`` and ``label`` share the batch size ``B`` (0 works) and the dtype; the label's
    cam2world must be invertible (:func:`check_label` checks a label's values).
    """
    _check("points", points, (3,), "(B, N, 3)")
    _check("label", label, (25,), "(B, 25)")
    if points.dim() != 3:
        raise ValueError(f"points: expected shape (B, N, 3), got {_fmt_shape(points.shape)}")
    if label.dim() != 2 or label.shape[0] != points.shape[0]:
        raise ValueError(f"label: expected shape ({points.shape[0]}, 25) (B of points), got "
                         f"{_fmt_shape(label.shape)}")
    if label.dtype != points.dtype:
        raise TypeError(f"label: expected the dtype of points ({points.dtype}), got {label.dtype}")
    c2w, k = split_label(label)
    try:
        w2c = torch.linalg.inv(c2w)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"label: cam2world is not invertible, not a camera ({e})") from None
    cam = points @ w2c[:, :3, :3].transpose(-1, -2) + w2c[:, None, :3, 3]
    z = cam[..., 2:3]
    xy = cam[..., :2] / z
    uv = xy @ k[:, :2, :2].transpose(-1, -2) + k[:, None, :2, 2]
    return uv, z


def project_bfm(points: torch.Tensor, focal: float = BFM_FOCAL, center: float = BFM_CENTER,
                camera_distance: float = BFM_CAMERA_DISTANCE) -> tuple[torch.Tensor, torch.Tensor]:
    """Deep3DFaceRecon projection of *posed* BFM-space ``points: (B, N, 3)`` on its 224 crop.

    Returns ``xy (B, N, 2)`` in pixels with Deep3DFaceRecon's convention (origin bottom-left, y up;
    row = 224 - 1 - y for image rows) and ``depth (B, N, 1)`` = ``camera_distance - z``
    (any leading dims: ``(..., 3)`` -> ``(..., 2)``, ``(..., 1)``).
    """
    _check("points", points, (3,), "(B, N, 3)")
    depth = camera_distance - points[..., 2:3]
    xy = focal * points[..., :2] / depth + center
    return xy, depth
