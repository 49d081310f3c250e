"""pyface's psnr / ssim beside the variants other implementations compute, on copy-source pairs.

    python tools/metric_variants.py DATA [--protocol same|cross] [--max-pairs N]

For every pair of ``pyface.data.reenactment_pairs(DATA, protocol=...)`` the prediction is the
source frame (copy-source) and the reference the target frame, both uint8 / 255. Prints the mean
over pairs of

* ``psnr``: pyface's (per pair, then the mean of the dB values), and ``psnr pooled``: the PSNR of
  the squared error pooled over all pairs (torchmetrics' ``PeakSignalNoiseRatio`` default), its
  MSE floored as pyface's (identical frames: 100 dB, not infinity);
* ``ssim``: pyface's (Wang's window, per RGB channel), ``ssim skimage defaults``
  (``structural_similarity(data_range=1, channel_axis=0)``: 7 x 7 uniform window, sample
  covariances) and ``ssim grey``: Wang's settings on ``0.2989 R + 0.5870 G + 0.1140 B`` (the
  grey conversion papers apply before Wang's MATLAB code; that code's downsampling does not
  apply below 384 px).

docs/eval.md ("Against the standard definitions") quotes its output.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch


def main(argv=None) -> int:
    from skimage.metrics import structural_similarity

    from pyface.data import reenactment_pairs
    from pyface.eval import metrics as M

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--protocol", default="same", choices=("same", "cross"))
    ap.add_argument("--max-pairs", type=int, default=None)
    args = ap.parse_args(argv)

    ds = reenactment_pairs(args.data, protocol=args.protocol)
    n = len(ds) if args.max_pairs is None else min(len(ds), args.max_pairs)
    if n < 1:
        raise SystemExit(f"data: expected at least one {args.protocol} pair, got none")
    grey = torch.tensor([0.2989, 0.5870, 0.1140], dtype=torch.float64).view(3, 1, 1)
    rows = {k: [] for k in ("psnr", "mse", "ssim", "ssim_skimage_defaults", "ssim_grey")}
    for i in range(n):
        item = ds[i]
        p = M.prepare_data(item["source"]["image"])[None]
        t = M.prepare_data(item["target"]["image"])[None]
        rows["psnr"].append(float(M.psnr(p, t)[0]))
        rows["mse"].append(float((p - t).square().mean()))
        rows["ssim"].append(float(M.ssim(p, t)[0]))
        a, b = t[0].numpy(), p[0].numpy()
        rows["ssim_skimage_defaults"].append(
            structural_similarity(a, b, data_range=1.0, channel_axis=0))
        ga, gb = (grey * t[0]).sum(0).numpy(), (grey * p[0]).sum(0).numpy()
        rows["ssim_grey"].append(structural_similarity(
            ga, gb, data_range=1.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False))
    mean = {k: float(np.mean(v)) for k, v in rows.items()}
    print(f"{args.protocol}: {n} copy-source pairs of {args.data}")
    print(f"psnr (pyface: per pair, mean of dB)     {mean['psnr']:.2f}")
    pooled = 10 * math.log10(1 / max(mean["mse"], M.PSNR_MSE_FLOOR))
    print(f"psnr pooled (MSE over all pairs)        {pooled:.2f}")
    print(f"ssim (pyface: Wang's window, RGB)       {mean['ssim']:.4f}")
    print(f"ssim skimage defaults (7x7 uniform)     {mean['ssim_skimage_defaults']:.4f}")
    print(f"ssim grey (Wang's window, luma)         {mean['ssim_grey']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
