"""OTAvatar's motion-transfer check (docs/models/otavatar-measured.md, "Motion transfer on
held-out frames"): on held-out videos,
invert the source (frame 0) only, then render every frame whose jaw opening differs from the
source's by more than 0.3 with the driving window and with the source window, both at that
frame's camera; PSNR and mouth-RoI L1 against the ground truth.

    python tools/otavatar_motion_transfer.py RUN HELDOUT [VIDEOS] [PTI_STEPS] [KEY=VALUE ...]

``VIDEOS``: the first this many videos of HELDOUT (default 16; the cross-identity folder is not
read);
``PTI_STEPS``: override the pipeline's pivotal-tuning iterations (e.g. 0);
``KEY=VALUE``: override a field of the model's config (e.g. ``pti_tune=planes``). Prints JSON.
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
from pyface.train.config import parse_set

JAW_OPEN = 80          # coeffs index of exp[0] (jaw_open in the synthetic face model)


def apply_overrides(cfg, overrides) -> None:
    """``KEY=VALUE`` items onto the model config ``cfg`` (values parsed as YAML scalars, as
    ``pyface train --set``: ``false``, ``null``, ``1e-3``); an unknown key is an error."""
    for key, value in parse_set(list(overrides)).items():
        if not hasattr(cfg, key):
            raise SystemExit(f"{key}: not a field of the model config {type(cfg).__name__}")
        setattr(cfg, key, value)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4 / ((a - b) ** 2).mean()))


def main(run: str, data: str, max_videos: int = 16, pti: int | None = None,
         overrides: tuple[str, ...] = ()) -> dict:
    torch.manual_seed(0)
    pipe = pyface.models.load("otavatar", run, device="cpu")
    if pti is not None:
        pipe.model.cfg.pti_steps = pti
    apply_overrides(pipe.model.cfg, overrides)
    R = pipe.resolution
    folders = sorted(os.path.dirname(p) for p in glob.glob(f"{data}/*/coeffs.npy"))
    rows, ratios = [], []
    for fo in folders[:max_videos]:
        src, drv = read_source(fo, R), read_driving(fo, R)
        jaw = drv["coeffs"][:, JAW_OPEN]
        sel = ((jaw - jaw[0]).abs() > 0.3).nonzero().flatten()
        if len(sel) == 0:
            continue
        state = pipe.encode_source(src)
        n_w = pipe.model.cfg.invert_steps - pipe.model.cfg.invert_controller_iters
        ratios.append(state["loss"][max(n_w - 1, 0)] / state["loss"][0])
        m_drv = pipe.encode_driving(drv)["motion"][sel]
        m_src = state["motion"].expand(len(sel), -1, -1)
        cam = drv["camera"][sel]
        out_d = pipe.generate(state, {"motion": m_drv, "camera": cam})
        out_s = pipe.generate(state, {"motion": m_src, "camera": cam})
        gt = drv["image"][sel]
        boxes = landmark_box(drv["landmarks"][sel], MOUTH, 120 / 512 * R, int(10 / 512 * R))
        rois = torch.cat([torch.zeros(len(sel), 1), boxes], 1)
        for k in range(len(sel)):
            crop = lambda x: roi_align(x[None], rois[k:k + 1], 8)  # noqa: E731
            rows.append({"psnr_driving": psnr(out_d[k], gt[k]),
                         "psnr_source": psnr(out_s[k], gt[k]),
                         "mouth_driving": float((crop(out_d[k]) - crop(gt[k])).abs().mean()),
                         "mouth_source": float((crop(out_s[k]) - crop(gt[k])).abs().mean())})
    n = len(rows)
    mean = lambda k: sum(r[k] for r in rows) / n  # noqa: E731
    return {"frames": n, "videos": len(ratios),
            "psnr_driving": mean("psnr_driving"), "psnr_source": mean("psnr_source"),
            "mouth_l1_driving": mean("mouth_driving"), "mouth_l1_source": mean("mouth_source"),
            "frac_psnr_better": sum(r["psnr_driving"] > r["psnr_source"] for r in rows) / n,
            "frac_mouth_better": sum(r["mouth_driving"] < r["mouth_source"] for r in rows) / n,
            "source_inversion_ratio_max": max(ratios)}


if __name__ == "__main__":
    kv = tuple(x for x in sys.argv[1:] if "=" in x)
    a = [x for x in sys.argv[1:] if "=" not in x]
    print(json.dumps(main(a[0], a[1], int(a[2]) if len(a) > 2 else 16,
                          int(a[3]) if len(a) > 3 else None, kv), indent=1))
