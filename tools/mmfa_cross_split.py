"""Which part of the driving motion costs MMFA its cross-identity PSNR.

    python tools/mmfa_cross_split.py --checkpoint RUN --data HELDOUT [--pairs 96] [--json OUT]

On ``--pairs`` cross-identity pairs of the held-out split (``protocol="cross"``, subset ``all``,
spread over the set as in ``tools/mmfa_eval.py``; source = identity A's frame, driving = a frame
of identity B, target = A rendered with that frame's expression, head pose and head
translation), PSNR (whole image / face mask; images rounded to 8 bits) of the pipeline's output
with the driving motion's parts taken from the driving frame or from the source:

* ``driving_st``: nothing replaced (``pyface eval``'s cross protocol);
* ``source_st``: the source's scale and translation (``cross_identity=True``);
* ``driving_s_source_t`` / ``source_s_driving_t``: one of the two replaced;
* ``driving_st_source_exp`` / ``source_st_source_exp``: the same with the source's expression
  feature (no expression transfer);
* ``copy``: the source image.

``placement``: how far the scale / translation head moves from the source to the driving frame
(mean |log s_B - log s_A| and mean |t_B - t_A| over x, y, grid units) against how far the head
really moves between the two frames (the same differences of
:func:`pyface.models.mmfa.motion.placement_from_label` on the frames' cameras). A head whose
change is much larger than the cameras' carries the face's shape (identity), which cross-identity
reenactment then puts on the source.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

import pyface.models
from pyface.data.reenactment import reenactment_pairs
from pyface.models.mmfa.motion import placement_from_label

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mmfa_eval import emit_report, frame, psnr, to01  # noqa: E402

VARIANTS = {"driving_st": {}, "source_st": {"cross_identity": True},
            "driving_s_source_t": {"translation": "source"},
            "source_s_driving_t": {"scale": "source"},
            "driving_st_source_exp": {"expression": "source"},
            "source_st_source_exp": {"cross_identity": True, "expression": "source"}}


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    pipe = pyface.models.load("mmfa", args.checkpoint, device="cpu")
    ds = reenactment_pairs(args.data, resolution=pipe.resolution, protocol="cross", subset="all")
    n = min(args.pairs, len(ds))
    idx = np.linspace(0, len(ds) - 1, n).round().astype(int)
    rows: dict[str, list[float]] = {}
    moves = {"model_log_s": [], "model_t": [], "camera_log_s": [], "camera_t": []}
    cache: dict = {}
    for i in idx:
        item = ds[int(i)]
        src, drv = frame(item, "source", "cpu"), frame(item, "driving", "cpu")
        key = (str(item["source"].get("video")), int(item["source"]["frame"]))
        if key not in cache:
            cache = {key: pipe.encode_source(src)}
        state = cache[key]
        motion = pipe.encode_driving({k: v[None] for k, v in drv.items()})
        tgt = to01(item["target"]["image"].float() / 127.5 - 1)
        mask = item["target"].get("mask")
        outs = {"copy": to01(state["image"][0])}
        for name, kw in VARIANTS.items():
            outs[name] = to01(pipe.generate(state, motion, **kw)[0])
        for name, img in outs.items():
            rows.setdefault(name, []).append(psnr(img, tgt))
            if mask is not None:
                rows.setdefault(name + "_face", []).append(psnr(img, tgt, mask))
        moves["model_log_s"].append(float((motion["scale"].log() - state["scale"].log()).abs()))
        moves["model_t"].append(float((motion["translation"] - state["translation"]).abs().mean()))
        if "camera" in item["source"] and "camera" in item["target"]:
            cams = torch.stack([item["source"]["camera"], item["target"]["camera"]]).float()
            ls, t = placement_from_label(cams)
            moves["camera_log_s"].append(float((ls[1] - ls[0]).abs()))
            moves["camera_t"].append(float((t[1] - t[0]).abs().mean()))
    report = {"checkpoint": args.checkpoint, "data": args.data, "pairs": int(n),
              "psnr": {k: float(np.nanmean(v)) for k, v in rows.items()},
              "placement": {k: float(np.mean(v)) for k, v in moves.items() if v}}
    report["margin"] = {k: report["psnr"][k] - report["psnr"]["copy"] for k in VARIANTS}
    emit_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
