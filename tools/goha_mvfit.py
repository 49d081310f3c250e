"""Are a dataset's cameras consistent across the frames of one video? One free tri-plane and
an ``OSGDecoder`` (the tiny preset's sizes: 16 channels, 32^2 planes, decoder 32 / 8, 32^2
renders with 12 + 12 samples) fitted with Adam to the even frames of video ``--video`` of
``DATA`` (L1 of the opacity to the matte + L1 to the matted frame, batch 4); every 100 steps the
opacity L1 and the PSNR over black on 12 even (fitted) and 12 odd (held-out) frames. With
consistent cameras the held-out frames score like the fitted ones.

Usage: ``python tools/goha_mvfit.py DATA [--video 0] [--steps 300] [--lr 1e-2]``.
"""
from __future__ import annotations

import argparse

import torch

from goha_geofit import free_triplane
from pyface.data.datasets import FrameDataset
from pyface.ops import ray_bundle


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--video", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()
    torch.manual_seed(0)
    ds = FrameDataset(args.data, 32)
    a, b = int(ds.offsets[args.video]), int(ds.offsets[args.video + 1])
    fit, held = list(range(a, b, 2)), list(range(a + 1, b, 2))
    planes, dec, ren, opt = free_triplane(0.1, args.lr)
    g = torch.Generator().manual_seed(0)

    def batch(ids):
        items = [ds[i] for i in ids]
        m = torch.stack([it["mask"] for it in items]).float() / 255
        img = torch.stack([it["image"] for it in items]).float() / 127.5 - 1
        return img * m - (1 - m), m, torch.stack([it["camera"] for it in items]).float()

    def render(cam):
        o, d = ray_bundle(cam, 32)
        out = ren(planes.expand(cam.shape[0], -1, -1, -1, -1), dec, o, d)
        return (out.images(32)["image_raw"],
                out.weights_sum.permute(0, 2, 1).reshape(cam.shape[0], 1, 32, 32))

    for s in range(args.steps + 1):
        img, m, cam = batch([fit[i] for i in torch.randint(len(fit), (4,), generator=g)])
        im, w = render(cam)
        loss = (w - m).abs().mean() + (im - img).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if s % 100 == 0 or s == args.steps:
            with torch.no_grad():
                line = []
                for name, ids in (("fitted", fit[:12]), ("held-out", held[:12])):
                    img, m, cam = batch(ids)
                    im, w = render(cam)
                    p = 10 * torch.log10(4 / (im - img).square().mean())
                    line.append(f"{name}: opacity L1 {(w - m).abs().mean():.4f}, "
                                f"PSNR {p:.2f} dB")
            print(f"step {s}: " + "; ".join(line), flush=True)


if __name__ == "__main__":
    main()
