"""Which part of MMFA's posed keypoints makes the equivariance error.

    python tools/mmfa_equivariance_split.py --checkpoint RUN --data HELDOUT [--pairs 150]

On the driving frames of ``--pairs`` same-identity moving pairs (spread over the set, as in
``tools/mmfa_eval.py``), with one random affine + TPS warp T per frame (the run's sigmas, seed
0), the equivariance error mean |x(D) - T(x(T D))| of the posed 2D keypoints (the check of
``tools/mmfa_eval.py``), and the same with one part of T D's pose replaced by D's:

* ``model``: every part from its own frame;
* ``delta_of_D`` / ``f_exp_of_D``: T D posed with D's delta / with delta decoded from D's f_exp;
* ``no_delta``: both posed with delta = 0;
* ``kc_of_D``: T D's delta decoded on D's canonical keypoints, and posed from them;
* ``st_of_D`` / ``s_of_D``: T D posed with D's scale and translation / D's scale.

R is the driving frame's (ground truth) in every case. A part whose replacement leaves the error
unchanged does not make it.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import pyface.models
from pyface.data.reenactment import reenactment_pairs
from pyface.models.mmfa.motion import pose_keypoints
from pyface.nn.augment import RandomAffineTPS

VARIANTS = ("model", "delta_of_D", "f_exp_of_D", "no_delta", "kc_of_D", "st_of_D", "s_of_D")


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--pairs", type=int, default=150)
    args = ap.parse_args(argv)
    pipe = pyface.models.load("mmfa", args.checkpoint, device="cpu")
    m = pipe.model
    ds = reenactment_pairs(args.data, resolution=pipe.resolution, protocol="same",
                           subset="moving")
    idx = np.linspace(0, len(ds) - 1, min(args.pairs, len(ds))).round().astype(int)
    gen = torch.Generator().manual_seed(0)
    aug = RandomAffineTPS(m.cfg.sigma_affine, m.cfg.sigma_tps)
    res = {k: [] for k in VARIANTS}
    for i in idx:
        item = ds[int(i)]
        d1 = {k: v[None] for k, v in item["target"].items() if k in ("image", "coeffs")}
        img = pipe.prepare(d1, batched=True, name="driving")["image"]
        rot = m.rotation_of(d1, "driving", 1, "cpu")
        t = aug.sample(1, generator=gen)
        kc_a, mo_a = m.kp_detector(img)["value"], m.motion_of(img)
        timg = t.warp_image(img)
        kc_b, mo_b = m.kp_detector(timg)["value"], m.motion_of(timg)
        da = m.exp_decoder(mo_a["f_exp"], kc_a)
        db = m.exp_decoder(mo_b["f_exp"], kc_b)
        # (canonical keypoints of T D, delta of T D, delta of D, scale of T D, translation of T D)
        sb, tb = mo_b["scale"], mo_b["translation"]
        parts = {"model": (kc_b, db, da, sb, tb), "delta_of_D": (kc_b, da, da, sb, tb),
                 "f_exp_of_D": (kc_b, m.exp_decoder(mo_a["f_exp"], kc_b), da, sb, tb),
                 "no_delta": (kc_b, 0 * db, 0 * da, sb, tb),
                 "kc_of_D": (kc_a, m.exp_decoder(mo_b["f_exp"], kc_a), da, sb, tb),
                 "st_of_D": (kc_b, db, da, mo_a["scale"], mo_a["translation"]),
                 "s_of_D": (kc_b, db, da, mo_a["scale"], tb)}
        for k, (kcb, d_b, d_a, s_b, t_b) in parts.items():
            a = pose_keypoints(kc_a, rot, mo_a["scale"], mo_a["translation"], d_a)
            back = t.warp_keypoints(pose_keypoints(kcb, rot, s_b, t_b, d_b))
            res[k].append(float((a[..., :2] - back[..., :2]).abs().mean()))
    print(json.dumps({"checkpoint": args.checkpoint, "pairs": len(idx),
                      **{k: round(float(np.mean(v)), 4) for k, v in res.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
