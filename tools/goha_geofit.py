"""How fast the tiny preset's renderer can fit a head at all: one free tri-plane (a mean head,
no encoders) and an ``OSGDecoder`` fitted with Adam to random frames of ``DATA`` (the matte's
L1 to the accumulated opacity + L1 to the matted frame, 32^2 renders with 12 + 12 samples,
batch 4). Prints the two losses and the PSNR over black every 25 steps.

Usage: ``python tools/goha_geofit.py DATA [--lr 1e-3] [--scale 0.1] [--steps 150]``
(``--scale``: the std of the initial plane features; GOHA's tiny encoders start near 0.04).
"""
from __future__ import annotations

import argparse
import time

import torch

from pyface.data.datasets import FrameDataset
from pyface.nn import OSGDecoder, RenderConfig, TriplaneRenderer
from pyface.ops import ray_bundle


def free_triplane(scale: float, lr: float):
    """A free tri-plane (1, 3, 16, 32, 32) with its decoder, the tiny preset's renderer (12 + 12
    samples, corrected axes, the synthetic cameras' ray range) and an Adam over both."""
    planes = torch.nn.Parameter(torch.randn(1, 3, 16, 32, 32) * scale)
    dec = OSGDecoder(16, 32, 8)
    ren = TriplaneRenderer(RenderConfig(depth_resolution=12, depth_resolution_importance=12,
                                        plane_axes="xy_xz_zy", ray_start=2.25, ray_end=3.3,
                                        box_warp=1.0))
    opt = torch.optim.Adam([planes, *dec.parameters()], lr=lr, betas=(0.9, 0.99))
    return planes, dec, ren, opt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    torch.manual_seed(0)
    ds = FrameDataset(args.data, 32)
    planes, dec, ren, opt = free_triplane(args.scale, args.lr)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for s in range(args.steps + 1):
        items = [ds[i] for i in torch.randint(len(ds), (4,), generator=g).tolist()]
        m = torch.stack([it["mask"] for it in items]).float() / 255
        img = torch.stack([it["image"] for it in items]).float() / 127.5 - 1
        img = img * m - (1 - m)
        o, d = ray_bundle(torch.stack([it["camera"] for it in items]).float(), 32)
        out = ren(planes.expand(4, -1, -1, -1, -1), dec, o, d)
        im = out.images(32)["image_raw"]
        w = out.weights_sum.permute(0, 2, 1).reshape(4, 1, 32, 32)
        ml, l1 = (w - m).abs().mean(), (im - img).abs().mean()
        opt.zero_grad()
        (ml + l1).backward()
        opt.step()
        if s % 25 == 0:
            psnr = 10 * torch.log10(4 / (im - img).square().mean())
            print(f"step {s}: mask_l1 {ml.item():.3f}  l1 {l1.item():.3f}  psnr {psnr.item():.2f}"
                  f"  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
