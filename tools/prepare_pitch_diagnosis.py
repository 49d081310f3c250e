"""Where the camera pitch error of ``pyface data prepare`` comes from, on a quality folder written
by ``python -m pyface.data.prepare_quality --out DIR`` (its ``synth/`` ground truth and
``prepared/`` output).

For every video it refits the landmark fit (:func:`pyface.face.fit.fit_landmarks`'s objective,
default settings) to variants of the 68 points and prints the signed median pitch / yaw error
(degrees, the crop's camera, as the quality protocol measures them):

* ``det``: the detector's points (what ``prepare`` fits);
* ``trueid``: the same with the identity held at the generator's (is it a shape/pose trade?);
* ``exact``: the head's vertices under the detector's points (``BUILTIN_MEDIAPIPE_68``),
  projected with the exact coefficients (the fit's own floor);
* ``only_<group>``: exact points except one group (jaw, brows, nose, eyes, mouth) taken from
  the detector: which groups pull pitch;

and, over the stored output, the correlation of the pitch error with the true pitch.

    python tools/prepare_pitch_diagnosis.py DIR [--variants det,trueid,exact,only_jaw,...]
"""
import argparse
import json
import os

import numpy as np
import torch

GROUPS = {"jaw": range(0, 17), "brows": range(17, 27), "nose": range(27, 36),
          "eyes": range(36, 48), "mouth": range(48, 68)}


def refit(model, target, index, seg, fixed_id=None, steps=100):
    """fit_landmarks' objective (estimated noise level), optionally with a fixed identity."""
    from pyface.face.coeffs import merge_coeffs
    from pyface.face.fit import (FitConfig, landmark_weights, lbfgs_minimise, model_id_std,
                                  project_landmarks)

    cfg = FitConfig(steps=steps)
    t = target.shape[0]
    w = landmark_weights()
    link = (seg[1:] == seg[:-1]).float()
    id_c = torch.zeros(80, requires_grad=fixed_id is None) if fixed_id is None else fixed_id.float()
    exp = torch.zeros(t, 64, requires_grad=True)
    ang = torch.zeros(t, 3, requires_grad=True)
    tr = torch.zeros(t, 3, requires_grad=True)
    id_std = model_id_std(model)

    def objective(shape_on, sigma):
        e = exp if shape_on else exp.detach()
        i = id_c if shape_on and fixed_id is None else id_c.detach()
        d2 = (project_landmarks(model, i, e, ang, tr, 256, index) - target).pow(2).sum(-1)
        loss = 0.5 * (d2 * w).sum() / sigma ** 2 + 0.5 * (i / id_std).pow(2).sum()
        loss = loss + 0.5 * (e / cfg.exp_std).pow(2).sum()
        for x, s in ((e, cfg.smooth_exp), (ang, cfg.smooth_angle), (tr, cfg.smooth_trans)):
            loss = loss + 0.5 * (((x[1:] - x[:-1]) / s).pow(2).sum(-1) * link).sum()
        return loss / float(t * w.sum())

    def run(shape_on, iters, sigma):
        ps = [ang, tr] + ([exp] if shape_on else []) + ([id_c] if shape_on and fixed_id is None else [])
        lbfgs_minimise(ps, lambda: objective(shape_on, sigma), iters)

    run(False, steps // 5, cfg.sigma_init)
    run(True, steps, cfg.sigma_init)
    with torch.no_grad():
        d2 = (project_landmarks(model, id_c, exp, ang, tr, 256, index) - target).pow(2).sum(-1)
        sigma = max(float(((d2 * w).sum() / (2 * t * 68)).sqrt()), cfg.sigma_min)
    run(True, 2 * steps, sigma)
    z = torch.zeros(t, 80)
    return merge_coeffs(id_c.detach().expand(t, -1), exp.detach(), z, ang.detach(),
                        torch.zeros(t, 27), tr.detach())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--variants", default="det,trueid,exact,only_jaw,only_brows,only_nose,"
                                          "only_eyes,only_mouth")
    a = ap.parse_args()
    from pyface.data import format as fmt
    from pyface.data.landmarks import mesh_to_68
    from pyface.data.prepare import fit_model, runs, to_crop
    from pyface.data.prepare_quality import crop_view_angles
    from pyface.face import cameras as cam

    torch.set_num_threads(1)
    model, index = fit_model(None)
    synth, prep = os.path.join(a.root, "synth"), os.path.join(a.root, "prepared")
    variants = a.variants.split(",")
    rows, true_p, err_p = {v: [] for v in variants}, [], []
    for rec in fmt.load_index(prep):
        meta = json.load(open(os.path.join(prep, rec.name, fmt.META)))
        src, boxes = np.asarray(meta["source_frames"]), np.asarray(meta["crop_boxes"])
        gc = fmt.load_coeffs(synth, fmt.scan_video(synth, rec.name))[src]
        ga = np.degrees(crop_view_angles(gc[:, 224:227], boxes, (256, 256)))
        stored = np.degrees(fmt.load_coeffs(prep, rec)[:, 224:227])
        true_p.append(ga[:, 0])
        err_p.append(stored[:, 0] - ga[:, 0])
        c = torch.from_numpy(gc)
        with torch.no_grad():
            uv, _ = cam.project_label(model(c)["verts"][:, index] * cam.BFM_TO_EG3D_SCALE,
                                      model.label_of(c))
        exact = to_crop(uv.numpy() * 256, boxes, 256)
        det = mesh_to_68(np.load(os.path.join(prep, rec.name, "mesh.npy")), contour="static")
        seg = torch.from_numpy(runs(src))
        for v in variants:
            tgt, fixed = det.copy(), None
            if v == "trueid":
                fixed = torch.from_numpy(gc[0, :80])
            elif v == "exact":
                tgt = exact.copy()
            elif v.startswith("only_"):
                tgt = exact.copy()
                tgt[:, list(GROUPS[v[5:]])] = det[:, list(GROUPS[v[5:]])]
            fit = refit(model, torch.from_numpy(tgt).float(), index, seg, fixed)
            pa = np.degrees(fit.numpy()[:, 224:227])
            rows[v].append((float(np.median(pa[:, 0] - ga[:, 0])), float(np.median(pa[:, 1] - ga[:, 1]))))
    for v in variants:
        print(f"{v:12s} signed median pitch / yaw error per video (deg): "
              + "  ".join(f"{p:+.1f}/{y:+.1f}" for p, y in rows[v]))
    t, e = np.concatenate(true_p), np.concatenate(err_p)
    print(f"stored output: corr(true pitch, pitch error) {np.corrcoef(t, e)[0, 1]:.2f}, "
          f"slope {np.polyfit(t, e, 1)[0]:.2f}; true pitch per video (mean, deg): "
          + " ".join(f"{x.mean():+.1f}" for x in true_p))


if __name__ == "__main__":
    main()
