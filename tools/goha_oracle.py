"""Bounds of GOHA's composited output on held-out same-identity ``moving`` pairs.

GOHA renders a matted head over black; ``GOHAPipeline.generate(composite=True)`` puts it over
the source's background (the head's hole filled with the mean background colour). This prints,
at ``RES``, the PSNR of:

* ``copy``: the source itself (the copy-source baseline);
* ``oracle_composite``: the target's own matted head composited over the source's filled
  background (a perfect render: the best a composite can score);
* ``no_head``: the filled background alone (an empty render);
* ``oracle_black``: the target's matted head over black (a perfect render without composite);
* ``oracle_at_S`` (``--sizes``): the perfect head and its matte downsampled to S^2 (area) and
  upsampled bilinearly to RES before the composite: the bound of a perfect render at S^2 (the
  tiny preset renders at 32^2, its appearance features are at 16^2);
* ``source_head``: the source's own head (not moved) composited over its filled background, i.e.
  what an avatar scores that reproduces the source exactly but ignores the motion.

Usage: ``python tools/goha_oracle.py DATA RES [--every 4] [--sizes 16,32]``.
"""
from __future__ import annotations

import argparse
import math

import torch.nn.functional as F

from pyface.data import reenactment_pairs


def psnr(a, b) -> float:
    return 10 * math.log10(1 / max(float(((a - b) ** 2).mean()), 1e-10))


def _down_up(x, s: int, res: int):
    """(C, res, res) -> area-downsampled to (C, s, s) -> bilinear back to (C, res, res)."""
    y = F.interpolate(x[None], size=(s, s), mode="area")
    return F.interpolate(y, size=(res, res), mode="bilinear", align_corners=False)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("res", type=int)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--sizes", default="16,32", help="render sides S of the oracle_at_S rows")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    data = reenactment_pairs(args.data, resolution=args.res, protocol="same", subset="moving")
    keys = ["copy", "oracle_composite", "no_head", "oracle_black", "source_head"]
    keys += [f"oracle_at_{s}" for s in sizes]
    sums = dict.fromkeys(keys, 0.0)
    n = 0
    for i in range(0, len(data), args.every):
        it = data[i]
        src, tgt = (it[k]["image"].float() / 255 for k in ("source", "target"))
        ms, mt = (it[k]["mask"].float() / 255 for k in ("source", "target"))
        fill = (src * (1 - ms)).sum((1, 2), keepdim=True) / (1 - ms).sum().clamp_min(1e-6)
        bg = src * (1 - ms) + fill * ms
        sums["copy"] += psnr(src, tgt)
        sums["oracle_composite"] += psnr(tgt * mt + (1 - mt) * bg, tgt)
        sums["no_head"] += psnr(bg, tgt)
        sums["oracle_black"] += psnr(tgt * mt, tgt)
        sums["source_head"] += psnr(src * ms + (1 - ms) * bg, tgt)
        for s in sizes:
            fg, a = _down_up(tgt * mt, s, args.res), _down_up(mt, s, args.res).clamp(0, 1)
            sums[f"oracle_at_{s}"] += psnr(fg + (1 - a) * bg, tgt)
        n += 1
    print(f"{n} pairs at {args.res}^2:", {k: round(v / n, 2) for k, v in sums.items()})


if __name__ == "__main__":
    main()
