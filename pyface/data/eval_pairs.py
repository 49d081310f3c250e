"""Evaluation pairs of ``pyface eval``: :func:`reenactment_pairs`.

Protocols (see docs/eval.md):

* ``same`` (same-identity reenactment): for every video of ``root``, source = frame 0, driving =
  every later frame ``f >= 1`` of the same video, target = the driving frame.
* ``cross`` (cross-identity reenactment, synthetic ground truth): for every video
  ``root/cross/<A>_by_<V>`` written by ``pyface data synth``, source = frame
  ``meta["source_frame"]`` (0) of ``meta["source_video"]`` (identity A), driving = frame ``f`` of
  ``meta["driving_video"]`` V (identity B), target = frame ``f`` of the cross video (A rendered
  with B's expression and pose of that frame).

A pair is ``moving`` when the ground-truth head rotation of the target differs from the source's
by at least ``pose_deg`` degrees (geodesic angle between the two rotations of the coefficients'
``angles``), or the L2 norm of the difference of their 64 expression coefficients is above
``exp_l2``. ``subset="moving"`` keeps only those pairs.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from pyface.data import format as fmt
from pyface.data.datasets import FrameDataset

#: head rotation difference (degrees) from which a pair is ``moving``
MOVING_POSE_DEG = 10.0
#: L2 norm of the expression-coefficient difference above which a pair is ``moving``
MOVING_EXP_L2 = 0.5

PROTOCOLS = ("same", "cross")
SUBSETS = ("all", "moving")


def rotation_angle_deg(angles_a: np.ndarray, angles_b: np.ndarray) -> np.ndarray:
    """Geodesic angle in degrees between head rotations given as Deep3DFaceRecon Euler angles
    ``(..., 3)`` (pitch, yaw, roll in radians) -> ``(...)``."""
    from pyface.face.cameras import euler_to_rotation

    ra = euler_to_rotation(torch.as_tensor(angles_a, dtype=torch.float64))
    rb = euler_to_rotation(torch.as_tensor(angles_b, dtype=torch.float64))
    rel = ra.transpose(-1, -2) @ rb
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos)).numpy()


def motion_between(source_coeffs: np.ndarray, target_coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(pose_deg, exp_l2)`` between coefficient vectors ``(..., 257)``."""
    pose = rotation_angle_deg(source_coeffs[..., 224:227], target_coeffs[..., 224:227])
    exp = np.linalg.norm(np.asarray(target_coeffs[..., 80:144], np.float64)
                         - np.asarray(source_coeffs[..., 80:144], np.float64), axis=-1)
    return pose, exp


class ReenactmentPairs(Dataset):
    """Source / driving / target triplets of one protocol (see the module docstring).

    Items: ``{"source": frame, "driving": frame, "target": frame, "moving": bool tensor,
    "pose_deg": float tensor, "exp_l2": float tensor}``, frames as in
    :class:`pyface.data.datasets.FrameDataset` (``image (3, H, W)`` uint8, ``mask (1, H, W)``,
    ``camera (25,)``, ``coeffs (257,)``, ``landmarks (68, 2)``, ...), resized to ``resolution``
    with antialiasing when given. Pairs are ordered by source, then driving frame;
    :meth:`groups` lists the indices that share a source (encode it once).
    """

    def __init__(self, root, resolution: int | None = None, *, protocol: str = "same",
                 subset: str = "all", pose_deg: float = MOVING_POSE_DEG,
                 exp_l2: float = MOVING_EXP_L2, **kw):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
        if subset not in SUBSETS:
            raise ValueError(f"subset: expected one of {SUBSETS}, got {subset!r}")
        self.root = os.fspath(root)
        self.resolution = resolution
        self.protocol, self.subset = protocol, subset
        self.pose_deg, self.exp_l2 = float(pose_deg), float(exp_l2)
        self.base = FrameDataset(self.root, resolution, **kw)
        # a pair: ((source video, frame), (driving video, frame), (target video, frame)); the
        # target video indexes self.base (same) or self.cross (cross)
        pairs = []
        if protocol == "same":
            self.cross = None
            target_set = self.base
            for v, rec in enumerate(self.base.videos):
                pairs += [((v, 0), (v, f), (v, f)) for f in range(1, rec.num_frames)]
        else:
            cross_root = os.path.join(self.root, "cross")
            if not os.path.isfile(os.path.join(cross_root, fmt.INDEX)):
                raise fmt.DataError(f"{cross_root}/{fmt.INDEX}: missing; protocol='cross' needs the "
                                    "cross-identity ground truth of `pyface data synth` (without "
                                    "--no-cross)")
            self.cross = FrameDataset(cross_root, resolution, **kw)
            target_set = self.cross
            by_name = {r.name: i for i, r in enumerate(self.base.videos)}
            for c, rec in enumerate(self.cross.videos):
                meta_path = rec.path(cross_root, fmt.META)
                m = fmt._load_json(meta_path)
                for k in ("source_video", "driving_video"):
                    if m.get(k) not in by_name:
                        raise fmt.DataError(f"{meta_path}: {k} {m.get(k)!r} not found in {self.root}")
                sv, dv = by_name[m["source_video"]], by_name[m["driving_video"]]
                sf = int(m.get("source_frame", 0))
                n = min(rec.num_frames, self.base.videos[dv].num_frames)
                pairs += [((sv, sf), (dv, f), (c, f)) for f in range(n)]
        src = np.stack([self.base.coeffs[v][f] for (v, f), _, _ in pairs]) if pairs else np.zeros((0, 257))
        tgt = np.stack([target_set.coeffs[v][f] for _, _, (v, f) in pairs]) if pairs else np.zeros((0, 257))
        pose, exp = motion_between(src, tgt) if pairs else (np.zeros(0), np.zeros(0))
        moving = (pose >= self.pose_deg) | (exp > self.exp_l2)
        keep = np.ones(len(pairs), bool) if subset == "all" else moving
        self.pairs = [p for p, k in zip(pairs, keep) if k]
        self.pose = pose[keep]
        self.exp = exp[keep]
        self.moving = moving[keep]
        self._target_set = target_set

    def __len__(self):
        return len(self.pairs)

    def source_key(self, index: int) -> tuple[int, int]:
        """(video, frame) of the source of pair ``index`` (videos of :attr:`base`)."""
        return self.pairs[index][0]

    def groups(self) -> list[list[int]]:
        """Pair indices grouped by source, in order."""
        out: dict = {}
        for i, p in enumerate(self.pairs):
            out.setdefault(p[0], []).append(i)
        return list(out.values())

    def source(self, index: int) -> dict:
        """The source frame of pair ``index``."""
        return self.base.frame(*self.pairs[index][0])

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"pair {index} out of range ({len(self)} pairs)")
        s, d, t = self.pairs[index]
        target = self._target_set.frame(*t)
        driving = target if self.protocol == "same" else self.base.frame(*d)
        return {"source": self.base.frame(*s), "driving": driving, "target": target,
                "moving": torch.tensor(bool(self.moving[index])),
                "pose_deg": torch.tensor(float(self.pose[index])),
                "exp_l2": torch.tensor(float(self.exp[index]))}


def reenactment_pairs(root, *, resolution: int | None = None, protocol: str = "same",
                      subset: str = "all", **kw) -> ReenactmentPairs:
    """The evaluation pairs of ``root`` for ``protocol`` (``"same"`` or ``"cross"``) and
    ``subset`` (``"all"`` or ``"moving"``); see :class:`ReenactmentPairs`. Keyword arguments
    (``pose_deg``, ``exp_l2``, ``skip_bad``, ``image_dtype``, ...) go to it."""
    return ReenactmentPairs(root, resolution, protocol=protocol, subset=subset, **kw)
