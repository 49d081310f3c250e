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

That rule (``"coefficients"``) holds for ground truth: videos written by ``pyface data synth``
(``meta.json`` ``generator`` = ``pyface.data.synthetic``). Every other video with
``landmarks.npy`` (e.g. ``pyface data prepare``'s, whose ``coeffs.npy`` is a 3DMM fit) uses the
``"landmarks"`` rule (:func:`is_moving_landmarks`): the pose half is the same (on the fitted angles,
whose relative rotations come out shrunk, slope 0.80 against ground truth, from the detector's
landmarks: ``tools/prepare_pose_check.py``, docs/eval.md), the expression half is :func:`landmark_expression_difference`
above :data:`MOVING_LANDMARK_EXP`, because the fitted expression coefficients are noisier and
scaled differently: on four prepared clips of synthetic heads (``python -m
pyface.data.prepare_quality --out PQ --identities 4 --frames 48``) their median L2 to the first
frame is 1.16 against 0.57 for the ground truth of the same frames, the 14 pairs static by
ground truth reach 0.29-1.33, and the coefficient rule calls all 188 pairs moving.
:func:`moving_rule` tells which rule a video gets.
"""
from __future__ import annotations

import os

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
#: Landmarks the similarity alignment of :func:`landmark_expression_difference` uses (all 68).
LANDMARK_ALIGN_POINTS = list(range(68))
#: Expression-bearing landmarks whose residual it measures: brows 17-26, eyes 36-47, mouth 48-67.
LANDMARK_EXP_POINTS = list(range(17, 27)) + list(range(36, 68))
#: Minimum landmark expression difference (:func:`landmark_expression_difference`, in
#: inter-ocular distances) of a moving pair under the ``"landmarks"`` rule. Calibration
#: (docs/eval.md, "moving subset on prepared data"; ``pyface data synth --out S<seed>
#: --identities 32 --frames 32 --resolution 32 --seed <seed> --no-cross --no-masks`` for seeds
#: 0-3, ``python -m pyface.data.prepare_quality --out PQ --identities 4 --frames 48``, then
#: ``python tools/moving_calibration.py --synth S0 S1 S2 S3 --prepared PQ``): on 7936
#: same-identity pairs of synthetic ground truth (128 identities, 5957 pairs moving) the
#: threshold whose flags (pose half unchanged) agree best with the coefficient rule (best
#: balanced accuracy) is 0.012: agreement 76.7 %, false positives 17.6 % of the static pairs,
#: false negatives 25.2 % of the moving ones (the 68 points do not see every expression
#: coefficient alike). The detector's landmarks on prepared clips add noise: the median
#: absolute difference between the measure on prepared and on true landmarks of the same frames
#: is 0.0067, so the threshold is 0.012 + 0.007 ~ 0.02. On the 188 prepared pairs (174 moving
#: by ground truth) it flags 160: false positives 8 of 14 static pairs, false negatives 22 of
#: 174; the coefficient rule on the fitted coefficients flags all 188.
MOVING_LANDMARK_EXP = 0.02
#: The moving rules: ground-truth coefficients, or fitted pose + detected landmarks.
MOVING_RULES = ("coefficients", "landmarks")

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


def landmark_expression_difference(src: np.ndarray, drv: np.ndarray, *,
                                   align=None, measure=None) -> np.ndarray:
    """Expression change between 68-landmark sets ``src``, ``drv`` ``(..., 68, 2)`` (broadcast):
    ``drv`` is aligned to ``src`` by the least-squares similarity transform (scale, in-plane
    rotation, translation: Umeyama / Procrustes) over the points ``align`` (default
    :data:`LANDMARK_ALIGN_POINTS`), and the mean distance of the points ``measure`` (default
    :data:`LANDMARK_EXP_POINTS`) from their source positions is divided by the source's
    inter-ocular distance (outer eye corners 36 and 45) -> ``(...)``."""
    align = LANDMARK_ALIGN_POINTS if align is None else list(align)
    measure = LANDMARK_EXP_POINTS if measure is None else list(measure)
    s = np.asarray(src, np.float64)
    d = np.asarray(drv, np.float64)
    s, d = np.broadcast_arrays(s, d)
    sa, da = s[..., align, :], d[..., align, :]
    ms, md = sa.mean(-2, keepdims=True), da.mean(-2, keepdims=True)
    xs, xd = sa - ms, da - md
    # complex form of the 2D similarity: z_s ~ a * z_d with a = <z_d, z_s> / |z_d|^2
    zs = xs[..., 0] + 1j * xs[..., 1]
    zd = xd[..., 0] + 1j * xd[..., 1]
    a = (np.conj(zd) * zs).sum(-1) / np.maximum((np.abs(zd) ** 2).sum(-1), 1e-12)
    zm = (d[..., measure, 0] - md[..., 0]) + 1j * (d[..., measure, 1] - md[..., 1])
    moved = a[..., None] * zm + (ms[..., 0, 0] + 1j * ms[..., 0, 1])[..., None]
    target = s[..., measure, 0] + 1j * s[..., measure, 1]
    iod = np.linalg.norm(s[..., 45, :] - s[..., 36, :], axis=-1)
    return np.abs(moved - target).mean(-1) / np.maximum(iod, 1e-9)


def is_moving(src: np.ndarray, drv: np.ndarray) -> np.ndarray:
    """``(...)`` bool: pose difference >= :data:`MOVING_POSE_DEG` or expression difference >
    :data:`MOVING_EXP_L2` between coefficient vectors ``(..., 257)``."""
    return (pose_difference_deg(src, drv) >= MOVING_POSE_DEG) | \
        (expression_difference(src, drv) > MOVING_EXP_L2)


def is_moving_landmarks(src: np.ndarray, drv: np.ndarray, src_lm: np.ndarray,
                        drv_lm: np.ndarray) -> np.ndarray:
    """``(...)`` bool, the ``"landmarks"`` rule: pose difference of the (fitted) coefficient
    vectors ``(..., 257)`` >= :data:`MOVING_POSE_DEG` or landmark expression difference of the
    68 landmarks ``(..., 68, 2)`` (:func:`landmark_expression_difference`) >
    :data:`MOVING_LANDMARK_EXP`."""
    return (pose_difference_deg(src, drv) >= MOVING_POSE_DEG) | \
        (landmark_expression_difference(src_lm, drv_lm) > MOVING_LANDMARK_EXP)


def moving_rule(root, rec) -> str:
    """The moving rule of the video ``rec`` (a :class:`pyface.data.format.VideoRecord`) of
    ``root``: ``"coefficients"`` for ground truth (``meta.json`` ``generator`` =
    ``pyface.data.synthetic``) and for videos without ``landmarks.npy``, ``"landmarks"`` for
    any other video (fitted coefficients, e.g. ``pyface data prepare``)."""
    path = rec.path(os.fspath(root), fmt.META)
    gen = None
    if os.path.isfile(path):
        meta = fmt._load_json(path)     # an unparsable file is a DataError naming it
        gen = meta.get("generator") if isinstance(meta, dict) else None
    if gen == "pyface.data.synthetic" or not rec.has_landmarks:
        return "coefficients"
    return "landmarks"


def moving_criterion(root) -> dict:
    """What the ``moving`` flags of the same-identity pairs of ``root`` follow, as the eval JSON
    records it: ``{"rule": "coefficients" | "landmarks" | "mixed", "pose_deg": ..., "exp_l2":
    ...}`` (coefficients) or ``"landmark_exp"`` (landmarks); a mixed root lists both."""
    rules = {moving_rule(root, r) for r in fmt.load_index(os.fspath(root))} \
        if _is_root(root) else {"coefficients"}
    rule = rules.pop() if len(rules) == 1 else "mixed"
    out = {"rule": rule, "pose_deg": MOVING_POSE_DEG}
    if rule != "landmarks":
        out["exp_l2"] = MOVING_EXP_L2
    if rule != "coefficients":
        out["landmark_exp"] = MOVING_LANDMARK_EXP
    return out


def _is_root(root) -> bool:
    return isinstance(root, (str, os.PathLike)) and os.path.isfile(os.path.join(root, fmt.INDEX))


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
            rules = [moving_rule(root, rec) if lm is not None else "coefficients"
                     for rec, lm in zip(self.frames.videos, self.frames.landmarks)]
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
            rules = None                            # cross-identity: synthetic ground truth
        self.has_coeffs = have
        #: The moving rule of these pairs ("coefficients", "landmarks" or "mixed").
        used = {"coefficients"} if rules is None else set(rules)
        self.moving_rule = used.pop() if len(used) == 1 else "mixed"
        if not have and subset == "moving":
            raise fmt.DataError(f"{root}: subset='moving' needs coeffs.npy in every video "
                                "(pose and expression of each pair)")
        if have and pairs:
            moving = is_moving(np.stack([src(p) for p in pairs]), np.stack([tgt(p) for p in pairs]))
            if rules is not None and "landmarks" in rules:
                lms = self.frames.landmarks
                sel = [k for k, p in enumerate(pairs) if rules[p[0]] == "landmarks"]
                moving[sel] = is_moving_landmarks(
                    np.stack([src(pairs[k]) for k in sel]), np.stack([tgt(pairs[k]) for k in sel]),
                    np.stack([lms[pairs[k][0]][pairs[k][1]] for k in sel]),
                    np.stack([lms[pairs[k][0]][pairs[k][2]] for k in sel]))
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
        subset: ``"all"`` or ``"moving"`` (:func:`is_moving` between source and target on
            ground truth, :func:`is_moving_landmarks` on fitted videos: :func:`moving_rule`).
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


__all__ = ["reenactment_pairs", "is_moving", "is_moving_landmarks", "pose_difference_deg",
           "expression_difference", "landmark_expression_difference", "moving_rule",
           "moving_criterion", "MOVING_POSE_DEG", "MOVING_EXP_L2", "MOVING_LANDMARK_EXP",
           "MOVING_RULES", "ReenactmentPairs"]
