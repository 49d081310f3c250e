"""Where does MMFA's motion go wrong? Landmark errors of the dense motion under controlled swaps.

    python tools/mmfa_diagnose.py --checkpoint RUN --data HELDOUT [--pairs 25] [--oracle 8]

On the same-identity ``moving`` pairs whose expression changes (expression distance above
``MOVING_EXP_L2``, as the mouth check of tools/mmfa_eval.py), the depth-averaged dense motion is
sampled at the driving frame's 68 landmarks and compared with the source's landmarks
(:func:`pyface.models.mmfa.model.landmark_flow_loss`, unit weights, pixels, L1 over x and y), on
all points, the mouth (48-67), the eyes (36-47) and the jaw line (0-16), for:

* ``model``: the driving frame's rotation, scale, translation and expression;
* ``source_expression``: the source's expression feature instead (the mouth check's swap);
* ``source_rotation``: the source's rotation instead of the driving frame's;
* ``inverse_rotation``: the relative rotation inverted (``R_s R_d^T R_s`` for ``R_d``): better
  than ``model`` means the keypoints move against the ground-truth rotation;
* ``identity``: no motion at all.

The report also checks the angle conversion against the rendered frames (no model involved):
the correlation, over pairs of frames of each video, between the in-plane angle of the relative
keypoint-space rotation ``R_d R_s^T`` and the rotation of the eye line (landmarks 36 -> 45) in
the image, and between Deep3D's yaw and the nose's (landmark 30) x offset from the eyes' middle.

``--oracle N``: for N of those pairs, the driving deformation delta is optimised directly (40
Adam steps, everything else fixed) against the mouth and whole-face landmark errors: how far the
keypoints and the dense motion could follow the expression if the expression encoder delivered
the right delta.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import pyface.models
from pyface.data.reenactment import MOVING_EXP_L2, expression_difference, reenactment_pairs
from pyface.models.mmfa.model import landmark_flow_loss
from pyface.models.mmfa.motion import pose_keypoints
from mmfa_eval import emit_report

PARTS = {"all": range(0, 68), "mouth": range(48, 68), "eyes": range(36, 48), "jaw": range(0, 17)}


def _weights(part: str) -> torch.Tensor:
    w = torch.zeros(68)
    w[list(PARTS[part])] = 1.0
    return w


def conversion_check(root: str) -> dict:
    """Correlations between the keypoint-space rotations of the frames' Deep3D angles and the
    rendered landmarks (see the module docstring)."""
    import glob
    import os

    from pyface.models.mmfa.motion import deep3d_to_keypoint_rotation

    roll_kp, roll_img, yaw, nose = [], [], [], []
    for d in sorted(glob.glob(os.path.join(root, "*_v*"))):
        if not (os.path.isfile(os.path.join(d, "coeffs.npy")) and
                os.path.isfile(os.path.join(d, "landmarks.npy"))):
            continue
        c, lm = np.load(os.path.join(d, "coeffs.npy")), np.load(os.path.join(d, "landmarks.npy"))
        rot = deep3d_to_keypoint_rotation(torch.from_numpy(c[:, 224:227]).double()).numpy()
        v = lm[:, 45] - lm[:, 36]
        eye = np.arctan2(v[:, 1], v[:, 0])
        for i in range(0, len(c), 6):
            for j in range(0, len(c), 6):
                r = rot[j] @ rot[i].T
                roll_kp.append(np.arctan2(r[1, 0], r[0, 0]))
                roll_img.append(eye[j] - eye[i])
        yaw += list(c[:, 225])
        nose += list(lm[:, 30, 0] - (lm[:, 36, 0] + lm[:, 45, 0]) / 2)
    if not yaw:
        return {}
    return {"in_plane_rotation_vs_eye_line": float(np.corrcoef(roll_kp, roll_img)[0, 1]),
            "deep3d_yaw_vs_nose_x": float(np.corrcoef(yaw, nose)[0, 1])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--pairs", type=int, default=25)
    ap.add_argument("--oracle", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    pipe = pyface.models.load("mmfa", args.checkpoint, device="cpu")
    m, R = pipe.model, pipe.resolution
    m.requires_grad_(False)
    ds = reenactment_pairs(args.data, resolution=R, protocol="same", subset="moving")
    modes = ("model", "source_expression", "source_rotation", "inverse_rotation", "identity")
    err = {md: {p: [] for p in PARTS} for md in modes}
    oracle = []
    n = 0
    for i in np.linspace(0, len(ds) - 1, 200).round().astype(int):
        item = ds[int(i)]
        if expression_difference(item["source"]["coeffs"].numpy(),
                                 item["target"]["coeffs"].numpy()) <= MOVING_EXP_L2:
            continue
        with torch.no_grad():
            st = pipe.encode_source({k: v for k, v in item["source"].items()
                                     if k in ("image", "coeffs")})
            mo = pipe.encode_driving({k: v[None] for k, v in item["driving"].items()
                                      if k in ("image", "coeffs")})
        lms = item["source"]["landmarks"][None].float()
        lmd = item["target"]["landmarks"][None].float()
        kc, rs = st["kp_canonical"], st["rotation"]
        rd = mo["rotation"] if mo["rotation"] is not None else rs

        def flow(rot, delta):
            kp = pose_keypoints(kc, rot, mo["scale"], mo["translation"], delta)
            return m.render(st["volume"], st["kp_source"], kp, st["image"], flow=True)["flow"]

        with torch.no_grad():
            dd, ds_ = m.exp_decoder(mo["f_exp"], kc), m.exp_decoder(st["f_exp"], kc)
            flows = {"model": flow(rd, dd), "source_expression": flow(rd, ds_),
                     "source_rotation": flow(rs, dd),
                     "inverse_rotation": flow(rs @ rd.transpose(1, 2) @ rs, dd)}
            lin = torch.linspace(-1, 1, flows["model"].shape[1])
            flows["identity"] = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1)[None]
            for md, f in flows.items():
                for p in PARTS:
                    err[md][p].append(float(landmark_flow_loss(f, lms, lmd, R, _weights(p)))
                                      * R / 2)
        if len(oracle) < args.oracle:
            delta = dd.clone().requires_grad_()
            opt = torch.optim.Adam([delta], lr=0.01)
            wm, wa = _weights("mouth"), _weights("all")

            def loss():
                f = flow(rd, delta)
                return (landmark_flow_loss(f, lms, lmd, R, wm),
                        landmark_flow_loss(f, lms, lmd, R, wa))

            for _ in range(40):
                opt.zero_grad()
                a, b = loss()
                (a + b).backward()
                opt.step()
            with torch.no_grad():
                a, b = loss()
            oracle.append((err["model"]["mouth"][-1], float(a) * R / 2,
                           err["model"]["all"][-1], float(b) * R / 2))
        n += 1
        if n >= args.pairs and len(oracle) >= args.oracle:
            break
    report = {"checkpoint": args.checkpoint, "data": args.data, "pairs": n,
              "conversion": conversion_check(args.data),
              "landmark_error_px": {md: {p: float(np.mean(v)) for p, v in e.items()}
                                    for md, e in err.items()}}
    if oracle:
        o = np.array(oracle)
        report["oracle_delta"] = {"pairs": len(oracle), "mouth_before": float(o[:, 0].mean()),
                                  "mouth_after": float(o[:, 1].mean()),
                                  "all_before": float(o[:, 2].mean()),
                                  "all_after": float(o[:, 3].mean())}
    emit_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
