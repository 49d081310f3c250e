"""How much of the mouth's motion does MMFA's expression make? The mouth-motion term's two
readings on held-out pairs.

    python tools/mmfa_mouth_motion.py --checkpoint RUN --data HELDOUT [--pairs 150] [--json OUT]

On ``--pairs`` same-identity ``moving`` pairs spread over the set whose expression changes
(expression distance above ``MOVING_EXP_L2``, as the mouth check of tools/mmfa_eval.py), the
expression's share of the motion is the difference between the model with the driving frame's
delta and with the source's delta (the mouth check's swap), both at the driving frame's pose.
The target is the mouth and chin landmarks' expression motion
(:func:`pyface.models.mmfa.model.expression_motion`: their eye-aligned change put back into the
driving image):

* ``keypoints``: the keypoints' share, against the Gaussian-weighted landmark motion near each
  keypoint (:func:`~pyface.models.mmfa.model.mouth_motion_loss`, sigma ``--sigma``); the
  nearness-weighted mean motion of the keypoints and of their targets (pixels), their standard
  deviations over the pairs and R^2 of the target by the model (1: the expression moves the
  keypoints at the mouth as the mouth moves; <= 0: not at all);
* ``flow``: the share of the depth-averaged backward flow at the driving frame's mouth and chin
  points (:func:`~pyface.models.mmfa.model.mouth_flow_loss`); the same statistics of the
  points' motion (pixels; the flow moves by -m where the mouth moves by m, so the sign is
  flipped for the report), over every point of every pair.

Each error is given for the model and for no expression motion at all (zero): the model's below
zero's means that the expression moves the mouth the right way. Errors are squared, in units of
``MOUTH_MOTION_UNIT`` (one pixel at 64^2).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import pyface.models
from pyface.data.reenactment import MOVING_EXP_L2, expression_difference, reenactment_pairs
from pyface.models.mmfa.model import (MOUTH_MOTION_UNIT, MOUTH_SHAPE_POINTS, expression_motion,
                                      mouth_flow_loss, mouth_motion_loss, mouth_motion_target,
                                      pixels_to_grid)
from pyface.models.mmfa.motion import pose_keypoints
from mmfa_eval import emit_report


def _stats(target: np.ndarray, model: np.ndarray) -> dict:
    """target, model (N, 2) pixels -> std of each, R^2 of target by model per axis."""
    res = ((target - model) ** 2).sum(0)
    tot = ((target - target.mean(0)) ** 2).sum(0).clip(1e-12)
    return {"target_std_px": target.std(0).round(4).tolist(),
            "model_std_px": model.std(0).round(4).tolist(),
            "r2": (1 - res / tot).round(4).tolist()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--pairs", type=int, default=150)
    ap.add_argument("--sigma", type=float, default=0.2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    pipe = pyface.models.load("mmfa", args.checkpoint, device="cpu")
    m, R = pipe.model, pipe.resolution
    ds = reenactment_pairs(args.data, resolution=R, protocol="same", subset="moving")
    px = (R - 1) / 2                                          # grid units -> pixels
    err = {k: [] for k in ("kp_model", "kp_zero", "flow_model", "flow_zero")}
    kp_t, kp_m, fl_t, fl_m = [], [], [], []
    n = 0
    with torch.no_grad():
        for i in np.linspace(0, len(ds) - 1, 4 * args.pairs).round().astype(int):
            item = ds[int(i)]
            if expression_difference(item["source"]["coeffs"].numpy(),
                                     item["target"]["coeffs"].numpy()) <= MOVING_EXP_L2:
                continue
            st = pipe.encode_source({k: v for k, v in item["source"].items()
                                     if k in ("image", "coeffs")})
            mo = pipe.encode_driving({k: v[None] for k, v in item["driving"].items()
                                      if k in ("image", "coeffs")})
            lms = item["source"]["landmarks"][None].float()
            lmd = item["target"]["landmarks"][None].float()
            kc = st["kp_canonical"]
            rd = mo["rotation"] if mo["rotation"] is not None else st["rotation"]
            dd, dsrc = m.exp_decoder(mo["f_exp"], kc), m.exp_decoder(st["f_exp"], kc)
            kp = pose_keypoints(kc, rd, mo["scale"], mo["translation"], dd)
            kp_swap = pose_keypoints(kc, rd, mo["scale"], mo["translation"], dsrc)
            motion = (kp - kp_swap)[..., :2]
            err["kp_model"].append(float(mouth_motion_loss(motion, kp, lms, lmd, R, args.sigma)))
            err["kp_zero"].append(float(mouth_motion_loss(motion * 0, kp, lms, lmd, R,
                                                          args.sigma)))
            target, near = mouth_motion_target(kp, lms, lmd, R, args.sigma)
            w = (near[0] / near[0].sum())[:, None]
            kp_t.append(((target[0] * w).sum(0) * px).numpy())
            kp_m.append(((motion[0] * w).sum(0) * px).numpy())
            f = m.render(st["volume"], st["kp_source"], kp, st["image"], flow=True)["flow"]
            fs = m.render(st["volume"], st["kp_source"], kp_swap, st["image"], flow=True)["flow"]
            err["flow_model"].append(float(mouth_flow_loss(f, fs, lms, lmd, R)))
            err["flow_zero"].append(float(mouth_flow_loss(f, f, lms, lmd, R)))
            grid = pixels_to_grid(lmd[:, list(MOUTH_SHAPE_POINTS)], R)[:, :, None]
            at = torch.nn.functional.grid_sample((f - fs).permute(0, 3, 1, 2), grid,
                                                 padding_mode="border",
                                                 align_corners=True)[..., 0]   # (1, 2, P)
            fl_m.append((-at[0].T * px).numpy())                          # (P, 2)
            fl_t.append((expression_motion(lms, lmd, R)[0] * px).numpy())
            n += 1
            if n >= args.pairs:
                break
    report = {"checkpoint": args.checkpoint, "data": args.data, "pairs": n,
              "sigma": args.sigma, "unit_grid": MOUTH_MOTION_UNIT,
              "error": {k: float(np.mean(v)) for k, v in err.items()},
              "keypoints": _stats(np.array(kp_t), np.array(kp_m)),
              "flow": _stats(np.concatenate(fl_t), np.concatenate(fl_m))}
    emit_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
