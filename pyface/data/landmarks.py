"""MediaPipe face mesh (478 points) -> the iBUG 68-landmark layout, and landmark utilities.

The index table below is our own, written from two public facts:

* the topology of MediaPipe's face mesh (Apache-2.0, google-ai-edge/mediapipe): the contour
  rings it publishes as ``FACEMESH_FACE_OVAL``, ``FACEMESH_LIPS``, ``FACEMESH_{LEFT,RIGHT}_EYE``,
  ``FACEMESH_{LEFT,RIGHT}_EYEBROW`` and ``FACEMESH_NOSE`` in ``solutions/face_mesh_connections.py``
  (vertex 1 is the nose tip, 152 the chin, 33/133 the subject's right eye corners, 362/263 the
  left ones, 61/291 the mouth corners, 78/308 the inner mouth corners);
* the iBUG 300-W 68-point semantics: 0-16 jaw from the subject's right (image left) round the
  chin, 17-21 right brow and 22-26 left brow (image left to right), 27-30 nose bridge to tip,
  31-35 lower nose, 36-41 right eye and 42-47 left eye (outer/inner corner, two upper-lid and two
  lower-lid points), 48-59 outer lips and 60-67 inner lips, clockwise in the image from the
  right mouth corner.

Rules used:

* eyes, brows, nose, inner lips: corners are the rings' corner vertices; the points between two
  corners are the ring vertices at equal steps of the ring (e.g. the upper right lid runs 33-246-
  161-160-159-158-157-173-133, eight steps, so 37 and 38 are its 3rd and 5th vertices: 160, 158);
* outer lips, by their anatomical meaning in iBUG: 48/54 the corners (61, 291), 51 and 57 the
  lip centres (0, 17), 50 and 52 the peaks of the Cupid's bow (37 and 267, the upper ring's
  vertices next to the centre), 49 and 53 halfway between corner and peak, 55-56 and 58-59 at
  thirds of the lower lip from each corner to the centre; "halfway" and "thirds" are measured
  along the ring in 3D (x, y and the mesh's z), so they stay on the same place of the lip when
  the head turns (2D arc length would slide them with the foreshortening);
* jaw 0-16 (:func:`jaw_points`): the lower face-oval ring (234 ... 152 ... 454, ear level to ear
  level through the chin) resampled at 17 equal 3D arc-length steps gives fixed places on the
  face (``contour="static"``: what a 3DMM fit with fixed model vertices needs). iBUG's contour
  points lie on the visible outline instead, which differs once the head turns (the far cheek
  hides the oval). ``contour="silhouette"`` (the default, the dataset's ``landmarks.npy``) is the
  usual 3DMM "dynamic contour": each static point slides outward, along the normal of the jaw
  curve in the image, to the outline of the projected mesh (its convex hull); on the near side,
  where the oval is the outline, it barely moves.
"""
from __future__ import annotations

import numpy as np

#: The lower face-oval ring from the subject's right (image left) through the chin (152).
JAW_RING = (234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152,
            377, 400, 378, 379, 365, 397, 288, 361, 323, 454)

#: Mesh vertex of each iBUG landmark 17-67 (the jaw 0-16 comes from :data:`JAW_RING`).
FIXED_68 = {
    # brows: upper brow ring, outer -> inner (right), inner -> outer (left)
    17: 70, 18: 63, 19: 105, 20: 66, 21: 107,
    22: 336, 23: 296, 24: 334, 25: 293, 26: 300,
    # nose bridge 168-6-197-195-5-4-1 at steps 0, 2, 4, 6; lower nose 98-97-2-326-327
    27: 168, 28: 197, 29: 5, 30: 1,
    31: 98, 32: 97, 33: 2, 34: 326, 35: 327,
    # right eye: outer corner, upper lid (3rd, 5th of 8 steps), inner corner, lower lid
    36: 33, 37: 160, 38: 158, 39: 133, 40: 153, 41: 144,
    # left eye: inner corner, upper lid, outer corner, lower lid
    42: 362, 43: 385, 44: 387, 45: 263, 46: 373, 47: 380,
    # outer lips: 61-185-40-39-37-0-267-269-270-409-291 (upper), 291-...-17-...-61 (lower);
    # 49, 53, 55, 56, 58, 59 are replaced by arc-length points of LIP_ARCS in mesh_to_68
    48: 61, 49: 40, 50: 37, 51: 0, 52: 267, 53: 270, 54: 291,
    55: 321, 56: 405, 57: 17, 58: 181, 59: 91,
    # inner lips: 78-191-80-81-82-13-312-311-310-415-308 and 308-...-14-...-78
    60: 78, 61: 81, 62: 13, 63: 311, 64: 308, 65: 402, 66: 14, 67: 178,
}
FIXED_INDEX = np.array([FIXED_68[k] for k in range(17, 68)], dtype=np.int64)

#: Outer-lip points placed along a ring at a fraction of its 3D arc length:
#: landmark -> (ring from a corner or peak to a peak or centre, fraction).
LIP_ARCS = {
    49: ((61, 185, 40, 39, 37), 1 / 2), 53: ((291, 409, 270, 269, 267), 1 / 2),
    55: ((291, 375, 321, 405, 314, 17), 1 / 3), 56: ((291, 375, 321, 405, 314, 17), 2 / 3),
    59: ((61, 146, 91, 181, 84, 17), 1 / 3), 58: ((61, 146, 91, 181, 84, 17), 2 / 3),
}
CONTOURS = ("silhouette", "static")

#: Groups of the 68 layout, for per-group errors.
GROUPS = {"jaw": range(0, 17), "brows": range(17, 27), "nose": range(27, 36),
          "eyes": range(36, 48), "mouth": range(48, 68)}


def resample_polyline(points: np.ndarray, n: int) -> np.ndarray:
    """``n`` points at equal arc length along polylines ``points: (..., K, D)`` -> ``(..., n, D)``
    (the arc length is measured in all D coordinates)."""
    d = points.shape[-1]
    seg = np.linalg.norm(np.diff(points, axis=-2), axis=-1)                   # (..., K-1)
    cum = np.concatenate([np.zeros(seg.shape[:-1] + (1,)), np.cumsum(seg, -1)], -1)
    total = np.maximum(cum[..., -1:], 1e-9)
    s = np.linspace(0.0, 1.0, n) * total                                    # (..., n)
    flat_cum = cum.reshape(-1, cum.shape[-1])
    flat_s = s.reshape(-1, n)
    flat_p = points.reshape(-1, points.shape[-2], d)
    out = np.empty((flat_cum.shape[0], n, d), dtype=np.float64)
    for b in range(flat_cum.shape[0]):
        for j in range(d):
            out[b, :, j] = np.interp(flat_s[b], flat_cum[b], flat_p[b, :, j])
    return out.reshape(points.shape[:-2] + (n, d))


def _arc_point(points: np.ndarray, frac: float) -> np.ndarray:
    """The point at ``frac`` of the arc length of polylines ``points: (..., K, D)`` -> (..., D)."""
    seg = np.linalg.norm(np.diff(points, axis=-2), axis=-1)
    cum = np.concatenate([np.zeros(seg.shape[:-1] + (1,)), np.cumsum(seg, -1)], -1)
    target = frac * cum[..., -1:]                                           # (..., 1)
    k = np.clip((cum[..., 1:-1] < target).sum(-1), 0, points.shape[-2] - 2)   # segment index
    c0 = np.take_along_axis(cum, k[..., None], -1)
    ln = np.maximum(np.take_along_axis(seg, k[..., None], -1), 1e-9)
    w = np.clip((target - c0) / ln, 0.0, 1.0)
    p0 = np.take_along_axis(points, k[..., None, None], -2)[..., 0, :]
    p1 = np.take_along_axis(points, (k + 1)[..., None, None], -2)[..., 0, :]
    return p0 + w * (p1 - p0)


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull vertices ``(H, 2)`` of ``points: (N, 2)``, in order round the hull."""
    from scipy.spatial import ConvexHull, QhullError

    try:
        return points[ConvexHull(points).vertices]
    except (QhullError, ValueError):            # degenerate (collinear or too few points)
        return points[:0]


def _exit_along(p: np.ndarray, d: np.ndarray, hull: np.ndarray) -> np.ndarray:
    """Where rays ``p + t d`` (``p, d: (K, 2)``, t >= 0) from inside (or on) the convex polygon
    ``hull: (H, 2)`` leave it (the nearest edge crossing, so a point on the outline stays); a
    ray that meets no edge keeps its start."""
    if len(hull) < 3:
        return p
    a, e = hull, np.roll(hull, -1, 0) - hull                                 # (H, 2)
    r = a[None] - p[:, None]                                                # (K, H, 2)
    den = d[:, None, 0] * (-e[None, :, 1]) + d[:, None, 1] * e[None, :, 0]      # (K, H)
    safe = np.where(np.abs(den) > 1e-12, den, 1.0)
    t = (r[..., 0] * (-e[None, :, 1]) + r[..., 1] * e[None, :, 0]) / safe
    u = (d[:, None, 0] * r[..., 1] - d[:, None, 1] * r[..., 0]) / safe
    ok = (np.abs(den) > 1e-12) & (u >= -1e-9) & (u <= 1 + 1e-9) & (t >= 0)
    t = np.where(ok, t, np.inf).min(1)
    return p + np.where(np.isfinite(t), t, 0.0)[:, None] * d


def jaw_points(mesh: np.ndarray, contour: str = "silhouette") -> np.ndarray:
    """iBUG jaw points 0-16 ``(..., 17, 2)`` of meshes ``mesh: (..., 478, 2|3)`` (see the module
    docstring): ``static`` - 17 equal (3D) arc-length steps along the lower face oval;
    ``silhouette`` - those points moved outward along the jaw curve's normal to the outline
    (convex hull) of the projected mesh."""
    if contour not in CONTOURS:
        raise ValueError(f"contour: expected one of {CONTOURS}, got {contour!r}")
    pts = np.asarray(mesh, dtype=np.float64)
    static = resample_polyline(pts[..., list(JAW_RING), :], 17)[..., :2]
    if contour == "static":
        return static
    flat_s = static.reshape(-1, 17, 2)
    flat_m = pts[..., :2].reshape(-1, pts.shape[-2], 2)
    out = np.empty_like(flat_s)
    for b in range(flat_s.shape[0]):
        poly = flat_s[b]
        tan = np.gradient(poly, axis=0)
        nrm = np.stack([tan[:, 1], -tan[:, 0]], 1)
        # outward: away from the chord between the two ends (the jaw bulges away from it)
        side = np.sign(((poly - 0.5 * (poly[0] + poly[-1])) * nrm).sum(1))
        nrm = nrm * np.where(side == 0, 1.0, side)[:, None]
        nrm /= np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-9)
        out[b] = _exit_along(poly, nrm, _hull(flat_m[b]))
    return out.reshape(static.shape)


def mesh_to_68(mesh: np.ndarray, contour: str = "silhouette") -> np.ndarray:
    """iBUG-68 landmarks ``(..., 68, 2)`` of MediaPipe meshes ``mesh: (..., 478, 2|3)`` (pixels;
    with z, arc lengths are measured in 3D). ``contour``: ``"silhouette"`` (iBUG's convention:
    jaw points on the visible outline) or ``"static"`` (fixed places on the face; see
    :func:`jaw_points`)."""
    if mesh.shape[-2] not in (468, 478) or mesh.shape[-1] not in (2, 3):
        raise ValueError(f"mesh: expected shape (..., 478, 2|3), got {mesh.shape}")
    if contour not in CONTOURS:
        raise ValueError(f"contour: expected one of {CONTOURS}, got {contour!r}")
    pts = np.asarray(mesh, dtype=np.float64)
    out = np.concatenate([jaw_points(pts, contour), pts[..., FIXED_INDEX, :2]], axis=-2)
    for k, (ring, frac) in LIP_ARCS.items():
        out[..., k, :] = _arc_point(pts[..., list(ring), :], frac)[..., :2]
    return out.astype(np.float32)


def jitter(points: np.ndarray) -> float:
    """Mean distance of each point from the midpoint of its neighbours in time, over
    ``points: (T, N, 2)`` (pixels; 0 for T < 3): high-frequency shake, blind to steady motion."""
    if points.shape[0] < 3:
        return 0.0
    acc = points[1:-1] - 0.5 * (points[:-2] + points[2:])
    return float(np.linalg.norm(acc, axis=-1).mean())


# The built-in head's vertices under MediaPipe's 68 points with the static contour
# (mesh_to_68(..., contour="static"), what the fit uses), measured by
# tools/calibrate_landmarks.py on 144 synthetic frames (seed 1000, 6 identities; disjoint from
# the seed-0 quality measurement): mean distance to the detections 4.94 px at 256^2 against
# 7.24 px for the head's own 68 landmark vertices. Valid while the head has BUILTIN_VERTICES
# vertices.
BUILTIN_VERTICES = 18900
BUILTIN_MEDIAPIPE_68 = (
    8089, 10395, 12126, 13422, 14300, 14577, 15162, 15604, 15768, 15643, 15365, 14941, 14369,
    13649, 11635, 18562, 8760, 5077, 4649, 4509, 4516, 4669, 4690, 4554, 4561, 4709, 5001, 6552,
    8135, 9573, 10437, 11002, 11436, 11156, 11163, 11028, 6668, 18749, 6389, 6827, 7110, 7104,
    6853, 6426, 6432, 6723, 7151, 7146, 13012, 12584, 12161, 12312, 12174, 12615, 13052, 13912,
    14050, 14041, 14030, 13735, 13013, 12878, 12888, 12898, 13051, 13475, 13320, 13454)
