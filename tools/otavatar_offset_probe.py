"""Where OTAvatar's motion offset helps and hurts (docs/models/otavatar-measured.md,
"Motion transfer with pivotal tuning: what was tried"). On the frames of
tools/otavatar_motion_transfer.py (jaw opening
differs from frame 0's by > 0.3), the source inverted once with the run's pipeline, every frame
is rendered at its own camera with ``ws = w + o_src + g (o_drv - o_src)``, ``o`` the
controller's offsets of the source window and of the driving window (``driving``) or of the
driving window with the source's pose rows (``drv_exp``), for gains ``g``; per variant: PSNR,
mouth-RoI L1, and the squared error summed over three regions of the frame (divided by its
pixel count): the mouth box (the mouth-RoI square), the face box (landmarks' bounding box grown
by 10 % on each side) outside the mouth box, and outside the face box.

    python tools/otavatar_offset_probe.py RUN HELDOUT [VIDEOS] [KEY=VALUE ...]

``KEY=VALUE`` overrides a field of the model's config (e.g. ``pti_steps=0``). Prints JSON.
"""
import glob
import json
import os
import sys

import torch

import pyface.models
from pyface.data.driving import read_driving, read_source
from pyface.models.otavatar.losses import MOUTH, landmark_box
from pyface.models.otavatar.model import apply_intrinsics
from pyface.models.otavatar.pipeline import fixed_samples
from pyface.nn.roi import roi_align

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from otavatar_motion_transfer import JAW_OPEN, apply_overrides  # noqa: E402

GAINS = (0.0, 0.25, 0.5, 1.0)


def box_mask(boxes: torch.Tensor, R: int) -> torch.Tensor:
    """boxes (N, 4) x0, y0, x1, y1 pixels -> (N, 1, R, R) 1 inside."""
    c = torch.arange(R, dtype=torch.float32) + 0.5
    inx = (c[None] >= boxes[:, 0, None]) & (c[None] <= boxes[:, 2, None])
    iny = (c[None] >= boxes[:, 1, None]) & (c[None] <= boxes[:, 3, None])
    return (iny[:, :, None] & inx[:, None, :]).float()[:, None]


def main(run: str, data: str, max_videos: int = 16, overrides: tuple[str, ...] = ()) -> dict:
    torch.manual_seed(0)
    pipe = pyface.models.load("otavatar", run, device="cpu")
    apply_overrides(pipe.model.cfg, overrides)
    R, ctrl = pipe.resolution, pipe.model.controller
    folders = sorted(os.path.dirname(p) for p in glob.glob(f"{data}/*/coeffs.npy"))
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for fo in folders[:max_videos]:
        src, drv = read_source(fo, R), read_driving(fo, R)
        jaw = drv["coeffs"][:, JAW_OPEN]
        sel = ((jaw - jaw[0]).abs() > 0.3).nonzero().flatten()
        if len(sel) == 0:
            continue
        T = len(sel)
        state = pipe.encode_source(src)
        md = pipe.encode_driving(drv)["motion"][sel]
        ms = state["motion"].expand(T, -1, -1)
        me = torch.cat([md[:, :64], ms[:, 64:]], 1)
        gt, lm = drv["image"][sel], drv["landmarks"][sel].float()
        cam = apply_intrinsics(drv["camera"][sel].float(), state["intrinsics"].expand(T, -1))
        boxes = landmark_box(lm, MOUTH, 120 / 512 * R, int(10 / 512 * R))
        rois = torch.cat([torch.arange(T)[:, None].float(), boxes], 1)
        lo, hi = lm.min(1).values, lm.max(1).values
        face = box_mask(torch.cat([lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)], 1), R)
        mouth = box_mask(boxes, R)
        regions = (mouth, face * (1 - mouth), 1 - face)
        G = state.get("generator") or pipe.model.generator
        with torch.no_grad():
            o_src = ctrl(ms)
            for name, m in (("driving", md), ("drv_exp", me)):
                o = ctrl(m)
                for g in GAINS if name == "driving" else GAINS[1:]:
                    ws = state["w"].expand(T, -1, -1) + o_src + g * (o - o_src)
                    out = G.synthesis(ws, cam, **fixed_samples(G, T, "cpu"))["image"]
                    out = out.clamp(-1, 1)
                    se = ((out - gt) ** 2).mean(1, keepdim=True)
                    row = torch.stack([
                        (10 * torch.log10(4 / se.mean((1, 2, 3)))).sum(),
                        (roi_align(out, rois, 8) - roi_align(gt, rois, 8)).abs().mean(
                            (1, 2, 3)).sum(),
                        *[(se * r).sum((1, 2, 3)).sum() / (R * R) for r in regions]])
                    key = f"{name} gain {g}" if g else "source"
                    sums[key] = sums.get(key, 0) + row
        n += T
    return {"frames": n, **{k: dict(zip(("psnr", "mouth_l1", "se_mouth_box",
                                         "se_face_box_not_mouth", "se_outside_face"),
                                        (v / n).tolist()))
                            for k, v in sums.items()}}


if __name__ == "__main__":
    kv = tuple(x for x in sys.argv[1:] if "=" in x)
    a = [x for x in sys.argv[1:] if "=" not in x]
    print(json.dumps(main(a[0], a[1], int(a[2]) if len(a) > 2 else 16, kv), indent=1))
