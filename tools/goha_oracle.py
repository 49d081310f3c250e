"""Bounds of GOHA's composited output on held-out same-identity ``moving`` pairs.

GOHA renders a matted head over black; ``GOHAPipeline.generate(composite=True)`` puts it over
the source's background (the head's hole filled with the mean background colour). This prints,
at ``RES``, the PSNR of:

* ``copy``: the source itself (the copy-source baseline);
* ``oracle_composite``: the target's own matted head composited over the source's filled
  background (a perfect render: the best a composite can score);
* ``no_head``: the filled background alone (an empty render);
* ``oracle_black``: the target's matted head over black (a perfect render without composite).

Usage: ``python tools/goha_oracle.py DATA RES [--every 4]``.
"""
from __future__ import annotations

import argparse
import math

from pyface.data import reenactment_pairs


def psnr(a, b) -> float:
    return 10 * math.log10(1 / max(float(((a - b) ** 2).mean()), 1e-10))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("res", type=int)
    ap.add_argument("--every", type=int, default=4)
    args = ap.parse_args()
    data = reenactment_pairs(args.data, resolution=args.res, protocol="same", subset="moving")
    sums = {"copy": 0.0, "oracle_composite": 0.0, "no_head": 0.0, "oracle_black": 0.0}
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
        n += 1
    print(f"{n} pairs at {args.res}^2:", {k: round(v / n, 2) for k, v in sums.items()})


if __name__ == "__main__":
    main()
