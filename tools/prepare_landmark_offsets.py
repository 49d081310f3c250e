"""How much of ``pyface data prepare``'s landmark error a fixed per-point correction would remove,
measured without fitting the test: the mean offset of every prepared landmark from the ground
truth on one quality folder (the calibration set, e.g. seed 1000) is subtracted from the
landmarks of the other folders (written by ``python -m pyface.data.prepare_quality``), against
the generator's landmark vertices (``vert``) and the convention-following points (``conv``).

    python tools/prepare_landmark_offsets.py CALIBRATION_DIR DIR [DIR ...]
"""
import json
import sys

import numpy as np

from pyface.data import format as fmt
from pyface.data.landmarks import GROUPS
from pyface.data.prepare import to_crop
from pyface.data.prepare_quality import convention_landmarks


def offsets(root, conv):
    """Prepared minus true landmarks ``(N, 68, 2)`` (crop pixels) over every frame of ``root``."""
    out = []
    for rec in fmt.load_index(f"{root}/prepared"):
        meta = json.load(open(f"{root}/prepared/{rec.name}/meta.json"))
        src, boxes = np.asarray(meta["source_frames"]), np.asarray(meta["crop_boxes"])
        g = fmt.scan_video(f"{root}/synth", rec.name)
        size = fmt.read_frame(f"{root}/synth", g, 0).shape[1::-1]
        gl = (convention_landmarks(fmt.load_coeffs(f"{root}/synth", g)[src], size) if conv
              else fmt.load_landmarks(f"{root}/synth", g)[src])
        out.append(fmt.load_landmarks(f"{root}/prepared", rec) - to_crop(gl, boxes, meta["resolution"][0]))
    return np.concatenate(out)


def main():
    cal_root, roots = sys.argv[1], sys.argv[2:]
    for conv in (False, True):
        cal = offsets(cal_root, conv).mean(0)
        for r in roots:
            o = offsets(r, conv)
            e0, e1 = np.linalg.norm(o, axis=-1), np.linalg.norm(o - cal, axis=-1)
            em = list(range(36, 68))
            grp = ", ".join(f"{k} {e0[:, list(v)].mean():.1f} -> {e1[:, list(v)].mean():.1f}"
                            for k, v in GROUPS.items())
            print(f"{'conv' if conv else 'vert'} {r}: 68 points (median) {np.median(e0.mean(1)):.2f} -> "
                  f"{np.median(e1.mean(1)):.2f} px, eyes+mouth {np.median(e0[:, em].mean(1)):.2f} -> "
                  f"{np.median(e1[:, em].mean(1)):.2f} px; {grp}")


if __name__ == "__main__":
    main()
