"""Why an OTAvatar run's controller does or does not move the mouth
(docs/models/otavatar-measured.md, "Motion transfer: diagnosis"). On held-out videos
(frames whose jaw opening differs from frame
0's by > 0.3, as tools/otavatar_motion_transfer.py):

* ``signal``: the mouth-RoI L1 between the ground-truth source frame and the ground-truth
  driving frame (what the motion changes in the mouth box), next to the model's;
* ``controller``: the offset's norm, its spread over the windows, and how far +0.3 on one
  input group (jaw, all expression, angles, translation) moves it;
* ``windows``: PSNR / mouth-RoI L1 with the driving window, the source window, the driving
  expression with the source pose (``drv_exp``) and the reverse (``drv_pose``).

    python tools/otavatar_diagnose.py RUN HELDOUT [VIDEOS] [PTI_STEPS]

Prints JSON.
"""
import glob
import json
import os
import sys

import torch

import pyface.models
from pyface.data.driving import read_driving, read_source
from pyface.models.otavatar.losses import MOUTH, landmark_box
from pyface.nn.roi import roi_align

JAW_OPEN = 80                       # coeffs index of exp[0]
GROUPS = {"jaw": [0], "expression": list(range(64)), "angles": [64, 65, 66],
          "translation": [67, 68, 69]}


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(4 / ((a - b) ** 2).mean(dim=(1, 2, 3)))


def main(run: str, data: str, max_videos: int = 16, pti: int | None = None) -> dict:
    torch.manual_seed(0)
    pipe = pyface.models.load("otavatar", run, device="cpu")
    R, ctrl = pipe.resolution, pipe.model.controller
    folders = sorted(os.path.dirname(p) for p in glob.glob(f"{data}/*/coeffs.npy"))
    sums: dict[str, list[float]] = {}
    windows, signal, n = [], 0.0, 0
    for fo in folders[:max_videos]:
        src, drv = read_source(fo, R), read_driving(fo, R)
        jaw = drv["coeffs"][:, JAW_OPEN]
        sel = ((jaw - jaw[0]).abs() > 0.3).nonzero().flatten()
        md_all = pipe.encode_driving(drv)["motion"]
        windows.append(md_all)
        if len(sel) == 0:
            continue
        state = pipe.encode_source(src, pti_steps=pti)
        md, ms = md_all[sel], state["motion"].expand(len(sel), -1, -1)
        exp, pose = ms.clone(), ms.clone()
        exp[:, :64], pose[:, 64:] = md[:, :64], md[:, 64:]
        gt, cam = drv["image"][sel], drv["camera"][sel]
        boxes = landmark_box(drv["landmarks"][sel], MOUTH, 120 / 512 * R, int(10 / 512 * R))
        rois = torch.cat([torch.arange(len(sel))[:, None].float(), boxes], 1)
        mouth = lambda x: (roi_align(x, rois, 8) - roi_align(gt, rois, 8)).abs().mean(  # noqa
            dim=(1, 2, 3))
        signal += float(mouth(drv["image"][:1].expand_as(gt)).sum())
        n += len(sel)
        for name, m in (("driving", md), ("source", ms), ("drv_exp", exp), ("drv_pose", pose)):
            out = pipe.generate(state, {"motion": m, "camera": cam})
            s = sums.setdefault(name, [0.0, 0.0])
            s[0] += float(psnr(out, gt).sum())
            s[1] += float(mouth(out).sum())
    m = torch.cat(windows)
    with torch.no_grad():
        base = ctrl(m)
        sens = {}
        for name, ch in GROUPS.items():
            mm = m.clone()
            mm[:, ch] += 0.3
            sens[name] = float((ctrl(mm) - base).norm(dim=-1).mean())
    return {"frames": n, "pti_steps": pipe.model.cfg.pti_steps if pti is None else pti,
            "signal_mouth_l1_gt_source_vs_gt_driving": signal / n,
            "windows": {k: {"psnr": v[0] / n, "mouth_l1": v[1] / n} for k, v in sums.items()},
            "controller": {"offset_norm": float(base.norm(dim=-1).mean()),
                           "offset_spread": float(base.std(0).norm(dim=-1).mean()),
                           "plus_0.3": sens}}


if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps(main(a[0], a[1], int(a[2]) if len(a) > 2 else 16,
                          int(a[3]) if len(a) > 3 else None), indent=1))
