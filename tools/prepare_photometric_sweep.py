"""Settings of the photometric refinement on a quality folder: refits the detections stored by
``python -m pyface.data.prepare_quality --out DIR`` (``prepared/*/mesh.npy``, the crops) with the
landmark fit and :func:`pyface.face.fit.fit_photometric` under each given
:class:`pyface.face.fit.PhotometricConfig`, as ``pyface data prepare`` runs them (64^2 crops,
pixels outside the source frame left out), and prints the median camera pitch / yaw error (the
crop's camera), the signed median pitch error per video, the jaw / smile / blink correlations
(mean over videos), the error of the fitted model's own 68 landmarks (the head's landmark
vertices projected with the fitted camera, as ``landmarks_fit.npy`` stores them) against the
generator's landmarks and against the convention-following points
(:func:`pyface.data.prepare_quality.convention_landmarks`), next to the detector's
(``landmarks.npy``), and the refinement's CPU time. ``--json PATH`` also writes the numbers.
The setting ``landmarks`` (no ``=``) reports the landmark fit alone (no refinement).

    python tools/prepare_photometric_sweep.py DIR "rounds=3,steps=60" "sigma_color=0.1" ...
"""
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image


def _median_err(pred, truth, idx=slice(None)):
    """Median over frames of the mean point distance ``(T, 68, 2)`` (over the points ``idx``)."""
    return np.linalg.norm(pred[:, idx] - truth[:, idx], axis=-1).mean(1)


def main():
    from pyface.data import format as fmt
    from pyface.data.landmarks import GROUPS, mesh_to_68
    from pyface.data.prepare import APPEARANCE_SIZE, crop_image, fit_model, runs, to_crop
    from pyface.data.prepare_quality import convention_landmarks, crop_view_angles
    from pyface.face.fit import (FitConfig, PhotometricConfig, fit_landmarks, fit_photometric,
                                 project_landmarks)
    from pyface.face.procedural import EXP_NAMES

    torch.set_num_threads(1)
    args = sys.argv[1:]
    out_json = None
    if "--json" in args:
        k = args.index("--json")
        out_json = args[k + 1]
        args = args[:k] + args[k + 2:]
    root, settings = args[0], args[1:] or [""]

    def parse(s):
        if s == "landmarks":
            return None
        o = dict(kv.split("=") for kv in s.split(",") if kv)
        return {k: (v in ("1", "true", "True")) if isinstance(getattr(PhotometricConfig, k), bool)
                else type(getattr(PhotometricConfig, k))(v) for k, v in o.items()}
    opts = [parse(s) for s in settings]
    model, index = fit_model(None)
    synth, prep = os.path.join(root, "synth"), os.path.join(root, "prepared")
    size = APPEARANCE_SIZE
    exp_idx = {"jaw": [EXP_NAMES.index("jaw_open")], "smile": [EXP_NAMES.index("smile")],
               "blink": [EXP_NAMES.index("blink_left"), EXP_NAMES.index("blink_right")]}
    groups = {**{k: list(v) for k, v in GROUPS.items()}, "all": list(range(68)),
              "eyes_mouth": list(range(36, 68))}
    res = [[] for _ in opts]
    det = []
    for rec in fmt.load_index(prep):
        meta = json.load(open(os.path.join(prep, rec.name, fmt.META)))
        src, boxes = np.asarray(meta["source_frames"]), np.asarray(meta["crop_boxes"])
        g = fmt.scan_video(synth, rec.name)
        gc = fmt.load_coeffs(synth, g)[src]
        src_img = fmt.read_frame(synth, g, 0)
        ga = np.degrees(crop_view_angles(gc[:, 224:227], boxes, src_img.shape[1::-1]))
        lm = torch.from_numpy(mesh_to_68(np.load(os.path.join(prep, rec.name, "mesh.npy")),
                                         contour="static"))
        r = meta["resolution"][0]
        glm = to_crop(fmt.load_landmarks(synth, g)[src], boxes, r)             # head's vertices
        clm = to_crop(convention_landmarks(gc, src_img.shape[1::-1]), boxes, r)
        plm = fmt.load_landmarks(prep, fmt.scan_video(prep, rec.name))         # the detector's
        det.append((plm - glm, plm - clm))
        imgs = np.stack([np.asarray(Image.fromarray(fmt.read_frame(prep, rec, i)).resize(
            (size, size), Image.BOX)) for i in range(rec.num_frames)])
        imgs = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
        ones = np.full_like(src_img, 255)
        valid = np.stack([np.asarray(Image.fromarray(crop_image(ones, b, r)[1].astype(np.uint8) * 255)
                                     .resize((size, size), Image.BOX)) > 254 for b in boxes])
        valid = torch.from_numpy(valid)[:, None].float()
        seg = torch.from_numpy(runs(src))
        fit = fit_landmarks(model, lm, r, segments=seg, config=FitConfig(), landmark_index=index)
        for j, o in enumerate(opts):
            c0 = time.process_time()
            p = fit if o is None else fit_photometric(
                model, fit.coeffs, imgs, lm, r, sigma=fit.sigma, segments=seg, landmark_index=index,
                photometric=PhotometricConfig(**o), valid=valid)
            cpu = time.process_time() - c0
            pc = p.coeffs.numpy()
            pa = np.degrees(pc[:, 224:227])
            cc = torch.from_numpy(pc)
            own = project_landmarks(model, cc[0, :80], cc[:, 80:144], cc[:, 224:227],
                                    cc[:, 254:257], r).numpy()                  # (T, 68, 2)
            corr = {}
            for key, ix in exp_idx.items():
                a, b = gc[:, [80 + i for i in ix]].mean(1), pc[:, [80 + i for i in ix]].mean(1)
                corr[key] = float(np.corrcoef(a, b)[0, 1]) if a.std() > 1e-6 and b.std() > 1e-6 else np.nan
            res[j].append({"pitch": pa[:, 0] - ga[:, 0], "yaw": pa[:, 1] - ga[:, 1], "corr": corr,
                           "cpu": cpu, "frames": len(src), "own": (own - glm, own - clm)})
    report = {"root": root, "detector": {}, "settings": {}}
    for name, k in (("vertices", 0), ("convention", 1)):
        off = np.concatenate([d[k] for d in det])
        report["detector"][name] = {gname: float(np.median(np.linalg.norm(off[:, ix], axis=-1).mean(1)))
                                    for gname, ix in groups.items()}
    print("detector (landmarks.npy), median px: " + "; ".join(
        f"{n}: " + " ".join(f"{g} {v:.2f}" for g, v in d.items()) for n, d in report["detector"].items()))
    for o, rows in zip(settings, res):
        p = np.concatenate([x["pitch"] for x in rows])
        y = np.concatenate([x["yaw"] for x in rows])
        corr = {k: float(np.nanmean([x["corr"][k] for x in rows])) for k in exp_idx}
        own = {}
        for name, k in (("vertices", 0), ("convention", 1)):
            off = np.concatenate([x["own"][k] for x in rows])
            own[name] = {gname: float(np.median(np.linalg.norm(off[:, ix], axis=-1).mean(1)))
                         for gname, ix in groups.items()}
        frames = sum(x["frames"] for x in rows)
        cpu = sum(x["cpu"] for x in rows)
        rep = {"pitch_median": float(np.median(np.abs(p))), "yaw_median": float(np.median(np.abs(y))),
               "pitch_signed_by_video": [float(np.median(x["pitch"])) for x in rows],
               "corr": corr, "landmarks_fit": own, "cpu_s": cpu, "frames": frames}
        report["settings"][o or "defaults"] = rep
        print(f"{o or 'defaults'}: pitch {rep['pitch_median']:.2f} deg, yaw {rep['yaw_median']:.2f} deg, "
              f"jaw / smile / blink corr {corr['jaw']:.3f} / {corr['smile']:.3f} / {corr['blink']:.3f}, "
              f"CPU {cpu:.1f} s ({cpu / frames:.3f} s/frame); signed pitch per video "
              + " ".join(f"{v:+.1f}" for v in rep["pitch_signed_by_video"]))
        print("  fitted model's 68 landmarks, median px: " + "; ".join(
            f"{n}: " + " ".join(f"{g} {v:.2f}" for g, v in d.items()) for n, d in own.items()))
    if out_json:
        with open(out_json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
