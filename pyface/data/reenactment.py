"""Reenactment evaluation pairs (``pyface eval``): same-identity and cross-identity protocols and
the ``moving`` subset.

* ``protocol="same"``: for every video, source = its first frame, driving = each other frame,
  target = the driving frame.
* ``protocol="cross"``: the synthetic cross-identity ground truth (``ROOT/cross``,
  :class:`~pyface.data.datasets.CrossIdentityDataset`): source = identity A's source frame,
  driving = a frame of identity B, target = A rendered with that frame's expression and pose.

A pair is *moving* (:func:`is_moving`) when the target's head pose differs from the source's by
at least :data:`MOVING_POSE_DEG` degrees (the angle of the relative rotation) or its expression
differs by more than :data:`MOVING_EXP_L2` (L2 norm of the difference of the 64 stored
expression coefficients, ``coeffs[80:144]``). On static pairs copying the source is nearly
perfect (the synthetic background is static); the moving subset keeps the pairs where motion
must be transferred. Pose and expression come from the stored coefficients (Deep3DFaceRecon
layout, :mod:`pyface.face.coeffs`: angles at 224:227 in radians). The expression-identity leak
of the synthetic engine is a per-identity constant, so it cancels in these differences.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from pyface.data import format as fmt

#: Minimum relative head rotation of a moving pair, degrees.
MOVING_POSE_DEG = 10.0
#: Minimum L2 norm of the expression-coefficient difference of a moving pair (the built-in head
#: model's expression components have unit range: e.g. the jaw opening by 0.25 alone). Chosen on
#: the synthetic data, where the pairs below it are those copy-source nearly reproduces
#: (docs/data.md, "Evaluation pairs").
MOVING_EXP_L2 = 0.25

PROTOCOLS = ("same", "cross")
SUBSETS = ("all", "moving")


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Deep3DFaceRecon ``R = Rz Ry Rx`` ``(..., 3, 3)`` of ``angles (..., 3)`` (numpy twin of
    :func:`pyface.face.cameras.euler_to_rotation`)."""
    a, b, c = np.moveaxis(np.asarray(angles, np.float64), -1, 0)
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    one, zero = np.ones_like(a), np.zeros_like(a)
    rx = np.stack([one, zero, zero, zero, ca, -sa, zero, sa, ca], -1).reshape(*a.shape, 3, 3)
    ry = np.stack([cb, zero, sb, zero, one, zero, -sb, zero, cb], -1).reshape(*a.shape, 3, 3)
    rz = np.stack([cc, -sc, zero, sc, cc, zero, zero, zero, one], -1).reshape(*a.shape, 3, 3)
    return rz @ ry @ rx


def pose_difference_deg(src: np.ndarray, drv: np.ndarray) -> np.ndarray:
    """Angle in degrees of the rotation between the head poses of ``src`` and ``drv``
    ``(..., 257)`` coefficient vectors (broadcast): ``arccos((trace(R_s^T R_d) - 1) / 2)``."""
    rs = _rotation(np.asarray(src)[..., 224:227])
    rd = _rotation(np.asarray(drv)[..., 224:227])
    tr = np.einsum("...ij,...ij->...", rs, rd)
    return np.degrees(np.arccos(np.clip((tr - 1) / 2, -1.0, 1.0)))


def expression_difference(src: np.ndarray, drv: np.ndarray) -> np.ndarray:
    """L2 norm of the difference of the expression coefficients ``[80:144]`` ``(...)``."""
    d = np.asarray(drv, np.float64)[..., 80:144] - np.asarray(src, np.float64)[..., 80:144]
    return np.sqrt((d * d).sum(-1))


def is_moving(src: np.ndarray, drv: np.ndarray) -> np.ndarray:
    """``(...)`` bool: pose difference >= :data:`MOVING_POSE_DEG` or expression difference >
    :data:`MOVING_EXP_L2` between coefficient vectors ``(..., 257)``."""
    return (pose_difference_deg(src, drv) >= MOVING_POSE_DEG) | \
        (expression_difference(src, drv) > MOVING_EXP_L2)


class ReenactmentPairs(Dataset):
    """See :func:`reenactment_pairs`. ``pairs``: list of ``(kind-specific source, driving,
    target)`` locators; ``moving``: ``(len,)`` bool array (all False when the videos have no
    coefficients)."""

    def __init__(self, root, *, resolution=None, protocol="same", subset="all", **kw):
        from pyface.data.datasets import CrossIdentityDataset, FrameDataset

        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
        if subset not in SUBSETS:
            raise ValueError(f"subset: expected one of {SUBSETS}, got {subset!r}")
        self.root, self.protocol, self.subset = root, protocol, subset
        if protocol == "same":
            self.frames = FrameDataset(root, resolution, **kw)
            pairs = [(v, 0, f) for v, rec in enumerate(self.frames.videos)
                     for f in range(1, rec.num_frames)]
            coeffs = self.frames.coeffs
            have = all(c is not None for c in coeffs)
            src = lambda p: coeffs[p[0]][p[1]]      # noqa: E731
            tgt = lambda p: coeffs[p[0]][p[2]]      # noqa: E731
        else:
            self.cross = CrossIdentityDataset(root, resolution, **kw)
            pairs = list(range(len(self.cross)))
            base, cr = self.cross.base, self.cross.cross
            have = all(c is not None for c in base.coeffs + cr.coeffs)

            def src(i):
                m = self.cross.meta[cr.locate(i)[0]]
                return base.coeffs[self.cross.by_name[m["source_video"]]][int(m.get("source_frame", 0))]

            def tgt(i):
                v, f = cr.locate(i)
                return cr.coeffs[v][f]
        self.has_coeffs = have
        if not have and subset == "moving":
            raise fmt.DataError(f"{root}: subset='moving' needs coeffs.npy in every video "
                                "(pose and expression of each pair)")
        if have and pairs:
            moving = is_moving(np.stack([src(p) for p in pairs]), np.stack([tgt(p) for p in pairs]))
        else:
            moving = np.zeros(len(pairs), bool)
        if subset == "moving":
            keep = np.nonzero(moving)[0]
            pairs, moving = [pairs[i] for i in keep], moving[keep]
        self.pairs, self.moving = pairs, moving

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        p = self.pairs[index]
        if self.protocol == "same":
            v, s, f = p
            drv = self.frames.frame(v, f)
            item = {"source": self.frames.frame(v, s), "driving": drv,
                    "target": {k: t.clone() for k, t in drv.items()}}
        else:
            item = self.cross[p]
        if self.has_coeffs:
            item["moving"] = torch.tensor(bool(self.moving[index]))
        return item


def reenactment_pairs(root, *, resolution: int | None = None, protocol: str = "same",
                      subset: str = "all", **kw) -> Dataset:
    """Evaluation pairs of a pyface dataset root (``pyface data synth --split test`` writes one).

    Args:
        root: the dataset root (``protocol="cross"`` also reads ``root/cross``).
        resolution: resize frames (antialiased) to this size; None: as stored.
        protocol: ``"same"`` (source = first frame of each video, driving = each other frame,
            target = the driving frame) or ``"cross"`` (the cross-identity ground truth).
        subset: ``"all"`` or ``"moving"`` (:func:`is_moving` between source and target).
        **kw: passed to the frame datasets (``image_dtype``, ``load_masks``, ``skip_bad``).

    Returns:
        A Dataset whose items are ``{"source": frame, "driving": frame, "target": frame,
        "moving": bool tensor}``; frames as :meth:`~pyface.data.datasets.VideoDatasetBase.frame`
        (``image (3, H, W)`` uint8 by default, ``mask (1, H, W)``, ``camera (25,)``,
        ``coeffs (257,)``, ``landmarks (68, 2)``, ids). Order: videos by name, frames in order.
        ``moving`` is absent when the videos have no ``coeffs.npy`` (then ``subset="moving"``
        raises a DataError).
    """
    return ReenactmentPairs(root, resolution=resolution, protocol=protocol, subset=subset, **kw)


__all__ = ["reenactment_pairs", "is_moving", "pose_difference_deg", "expression_difference",
           "MOVING_POSE_DEG", "MOVING_EXP_L2", "ReenactmentPairs"]
