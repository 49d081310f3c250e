"""Settings of the photometric refinement on a quality folder: refits the detections stored by
``python -m pyface.data.prepare_quality --out DIR`` (``prepared/*/mesh.npy``, the crops) with the
landmark fit and :func:`pyface.face.fit.fit_photometric` under each given
:class:`pyface.face.fit.PhotometricConfig`, as ``pyface data prepare`` runs them (64^2 crops,
pixels outside the source frame left out), and prints the median camera pitch / yaw error (the
crop's camera), the signed median pitch error per video, the jaw-opening correlation and the
refinement's CPU time.

    python tools/prepare_photometric_sweep.py DIR "rounds=3,steps=60" "sigma_color=0.1" ...
"""
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image


def main():
    from pyface.data import format as fmt
    from pyface.data.landmarks import mesh_to_68
    from pyface.data.prepare import APPEARANCE_SIZE, crop_image, fit_model, runs
    from pyface.data.prepare_quality import crop_view_angles
    from pyface.face.fit import FitConfig, PhotometricConfig, fit_landmarks, fit_photometric
    from pyface.face.procedural import EXP_NAMES

    torch.set_num_threads(1)
    root, settings = sys.argv[1], sys.argv[2:] or [""]
    opts = [dict(kv.split("=") for kv in s.split(",") if kv) for s in settings]
    opts = [{k: type(getattr(PhotometricConfig, k))(v) if not isinstance(getattr(PhotometricConfig, k), bool)
             else v in ("1", "true", "True") for k, v in o.items()} for o in opts]
    model, index = fit_model(None)
    synth, prep = os.path.join(root, "synth"), os.path.join(root, "prepared")
    size = APPEARANCE_SIZE
    jaw = 80 + EXP_NAMES.index("jaw_open")
    res = [[] for _ in opts]
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
            p = fit_photometric(model, fit.coeffs, imgs, lm, r, sigma=fit.sigma, segments=seg,
                                landmark_index=index, photometric=PhotometricConfig(**o), valid=valid)
            pa = np.degrees(p.coeffs.numpy()[:, 224:227])
            res[j].append((pa[:, 0] - ga[:, 0], pa[:, 1] - ga[:, 1],
                           np.corrcoef(gc[:, jaw], p.coeffs.numpy()[:, jaw])[0, 1],
                           time.process_time() - c0))
    for o, rows in zip(settings, res):
        p = np.concatenate([x[0] for x in rows])
        y = np.concatenate([x[1] for x in rows])
        print(f"{o or 'defaults'}: pitch {np.median(np.abs(p)):.2f} deg, yaw {np.median(np.abs(y)):.2f} deg, "
              f"jaw corr {np.mean([x[2] for x in rows]):.3f}, CPU {sum(x[3] for x in rows):.1f} s; "
              "signed pitch per video " + " ".join(f"{np.median(x[0]):+.1f}" for x in rows))


if __name__ == "__main__":
    main()
