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

Rule used: corners are the rings' corner vertices; the points between two corners are the ring
vertices at equal steps of the ring (e.g. the upper right lid runs 33-246-161-160-159-158-157-
173-133, eight steps, so 37 and 38 are its 3rd and 5th vertices: 160 and 158). The jaw is not a
fixed vertex set: :func:`mesh_to_68` resamples the lower face-oval polyline (234 ... 152 ... 454,
ear level to ear level through the chin) at 17 equal arc-length steps in the image, which keeps
the jaw points evenly spread whatever the pose.
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
    # outer lips: 61-185-40-39-37-0-267-269-270-409-291 (upper), 291-...-17-...-61 (lower)
    48: 61, 49: 40, 50: 39, 51: 0, 52: 269, 53: 270, 54: 291,
    55: 321, 56: 405, 57: 17, 58: 181, 59: 91,
    # inner lips: 78-191-80-81-82-13-312-311-310-415-308 and 308-...-14-...-78
    60: 78, 61: 81, 62: 13, 63: 311, 64: 308, 65: 402, 66: 14, 67: 178,
}
FIXED_INDEX = np.array([FIXED_68[k] for k in range(17, 68)], dtype=np.int64)

#: Groups of the 68 layout, for per-group errors.
GROUPS = {"jaw": range(0, 17), "brows": range(17, 27), "nose": range(27, 36),
          "eyes": range(36, 48), "mouth": range(48, 68)}


def resample_polyline(points: np.ndarray, n: int) -> np.ndarray:
    """``n`` points at equal arc length along polylines ``points: (..., K, 2)`` -> ``(..., n, 2)``."""
    seg = np.linalg.norm(np.diff(points, axis=-2), axis=-1)                   # (..., K-1)
    cum = np.concatenate([np.zeros(seg.shape[:-1] + (1,)), np.cumsum(seg, -1)], -1)
    total = np.maximum(cum[..., -1:], 1e-9)
    s = np.linspace(0.0, 1.0, n) * total                                    # (..., n)
    flat_cum = cum.reshape(-1, cum.shape[-1])
    flat_s = s.reshape(-1, n)
    flat_p = points.reshape(-1, points.shape[-2], 2)
    out = np.empty((flat_cum.shape[0], n, 2), dtype=np.float64)
    for b in range(flat_cum.shape[0]):
        for d in range(2):
            out[b, :, d] = np.interp(flat_s[b], flat_cum[b], flat_p[b, :, d])
    return out.reshape(points.shape[:-2] + (n, 2))


def mesh_to_68(mesh: np.ndarray) -> np.ndarray:
    """iBUG-68 landmarks ``(..., 68, 2)`` of MediaPipe meshes ``mesh: (..., 478, 2|3)`` (pixels)."""
    if mesh.shape[-2] not in (468, 478) or mesh.shape[-1] not in (2, 3):
        raise ValueError(f"mesh: expected shape (..., 478, 2|3), got {mesh.shape}")
    xy = np.asarray(mesh[..., :2], dtype=np.float64)
    jaw = resample_polyline(xy[..., list(JAW_RING), :], 17)
    return np.concatenate([jaw, xy[..., FIXED_INDEX, :]], axis=-2).astype(np.float32)


def jitter(points: np.ndarray) -> float:
    """Mean distance of each point from the midpoint of its neighbours in time, over
    ``points: (T, N, 2)`` (pixels; 0 for T < 3): high-frequency shake, blind to steady motion."""
    if points.shape[0] < 3:
        return 0.0
    acc = points[1:-1] - 0.5 * (points[:-2] + points[2:])
    return float(np.linalg.norm(acc, axis=-1).mean())


# The built-in head's vertices under MediaPipe's 68 points (mesh_to_68), measured by
# tools/calibrate_landmarks.py on 144 synthetic frames (seed 1000, 6 identities; disjoint from
# the quality measurement): mean distance to the detections 5.53 px at 256^2 against 8.16 px for
# the head's own 68 landmark vertices. Valid while the head has BUILTIN_VERTICES vertices.
BUILTIN_VERTICES = 18900
BUILTIN_MEDIAPIPE_68 = (
    8089, 10251, 11838, 13567, 14300, 15166, 15890, 16051, 15925, 15649, 15512, 14942, 14225,
    12929, 11061, 18574, 8760, 5077, 4649, 4509, 4516, 4669, 4690, 4554, 4561, 4709, 5001, 6552,
    8135, 9573, 10437, 11002, 11436, 11156, 11163, 11028, 6668, 18749, 6389, 6827, 7110, 7104,
    6853, 6426, 6432, 6723, 7151, 7146, 13012, 12583, 12442, 12312, 12469, 12616, 13052, 13769,
    14053, 14041, 13884, 13735, 13013, 12878, 12888, 12898, 13051, 13475, 13320, 13454)
