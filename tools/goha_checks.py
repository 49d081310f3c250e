"""GOHA s1 acceptance checks on held-out synthetic data (issue: canonical neutrality, the
appearance plane's source-view gain).

For same-video pairs of ``--data`` (``pyface.data.reenactment_pairs``, protocol ``same``):

* neutrality: L1 between the canonical render at the driving camera and the neutral 3DMM
  render (driving coefficients with expression 0), inside the neutral render's mask, for the
  trained model and for the same architecture at initialisation (ratio: trained / initial),
  and for the matted driving frame itself (what a perfect reconstruction scores); for the
  trained model also the part of that L1 inside the expression regions (the canonical
  branch's masked input; neutral expression, at the driving camera) and the render's mean
  opacity inside the neutral mask;
* appearance: source-view PSNR (matted source, at the render size) with and without the
  appearance plane;
* expression: L1 to the matted driving frame inside its mouth + lips region (morphable-model
  regions at the driving camera), canonical + expression planes against canonical only, over
  all pairs and over the half with the largest expression change (jaw / mouth motion).

RUN may be any stage's run (s1, s1_gan or the final s2): the tri-plane networks are compared.

Usage: ``python tools/goha_checks.py RUN --data DIR [--pairs 64]``.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from pyface.data import reenactment_pairs
from pyface.models.goha import GOHA
from pyface.train.model import config_from_dict, load_pretrained


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--data", required=True)
    ap.add_argument("--pairs", type=int, default=64)
    args = ap.parse_args()
    cfg_d, state = load_pretrained(args.run)
    cfg = config_from_dict(GOHA.Config, cfg_d)
    trained = GOHA(cfg).eval()
    # any stage's run: the tri-plane networks (s1_gan / s2 add a discriminator and the SR)
    trained.load_state_dict({k: v for k, v in state.items() if k in trained.state_dict()})
    torch.manual_seed(0)
    init = GOHA(cfg).eval()
    data = reenactment_pairs(args.data, resolution=cfg.resolution, protocol="same")
    idx = torch.linspace(0, len(data) - 1, min(args.pairs, len(data))).round().long().tolist()
    r = cfg.render_resolution
    sums = {"neutral_trained": 0.0, "neutral_init": 0.0, "neutral_frame": 0.0,
            "neutral_regions": 0.0, "regions_share": 0.0, "neutral_opacity": 0.0,
            "psnr_app": 0.0, "psnr_noapp": 0.0,
            "mouth_exp": 0.0, "mouth_cano": 0.0}
    mouth_pairs = []       # (expression change |e_d - e_s|, L1 with, L1 without expression)
    with torch.no_grad():
        for i in idx:
            item = data[i]
            batch = {k: {kk: v[None] for kk, v in item[k].items() if torch.is_tensor(v)}
                     for k in ("source", "driving")}
            drv0 = trained.prepare_frame(batch["driving"], "driving")
            neutral0, nm0 = trained.neutral_render(drv0["coeffs"], drv0["camera"], r)
            frame0 = F.interpolate(drv0["image"], size=(r, r), mode="bilinear", antialias=True,
                                   align_corners=False)
            sums["neutral_frame"] += float(((frame0 - neutral0).abs() * nm0).sum()
                                           / (3 * nm0.sum()).clamp_min(1))
            for name, m in (("trained", trained), ("init", init)):
                src = m.prepare_frame(batch["source"], "source")
                drv = m.prepare_frame(batch["driving"], "driving")
                st = m.encode_source(src, appearance=(name == "trained"))
                rend = m.render(st["canonical"], drv["camera"])
                cano = rend["image"]
                neutral, nm = m.neutral_render(drv["coeffs"], drv["camera"], r)
                l1 = ((cano - neutral).abs() * nm).sum() / (3 * nm.sum()).clamp_min(1)
                sums[f"neutral_{name}"] += float(l1)
                if name == "trained":
                    reg = m.region_mask(drv["coeffs"], drv["camera"], r, neutral=True)
                    sums["neutral_regions"] += float(((cano - neutral).abs() * nm * reg).sum()
                                                     / (3 * nm.sum()).clamp_min(1))
                    sums["regions_share"] += float((nm * reg).sum() / nm.sum().clamp_min(1))
                    sums["neutral_opacity"] += float((rend["weights"].clamp(0, 1) * nm).sum()
                                                     / nm.sum().clamp_min(1))
                    target = F.interpolate(src["image"], size=(r, r), mode="bilinear",
                                           antialias=True, align_corners=False)
                    exp = src["coeffs"][:, 80:144]
                    mouth = m.face(drv["coeffs"].device).render(
                        drv["coeffs"], r, label=drv["camera"], regions=("mouth", "lips"))
                    mm = torch.maximum(mouth.regions["mouth"], mouth.regions["lips"])
                    tgt = F.interpolate(drv["image"], size=(r, r), mode="bilinear",
                                        antialias=True, align_corners=False)
                    dexp = drv["coeffs"][:, 80:144]
                    pair = [float((dexp - exp).norm())]
                    for key, use in (("mouth_exp", True), ("mouth_cano", False)):
                        out = m.render(m.animate_planes(st, dexp, use_expression=use,
                                                        use_appearance=False),
                                       drv["camera"])["image"]
                        l1 = float(((out - tgt).abs() * mm).sum() / (3 * mm.sum()).clamp_min(1))
                        sums[key] += l1
                        pair.append(l1)
                    mouth_pairs.append(pair)
                    for key, app in (("psnr_app", True), ("psnr_noapp", False)):
                        out = m.render(m.animate_planes(st, exp, use_appearance=app),
                                       src["camera"])["image"].clamp(-1, 1)
                        mse = float(((out - target) / 2).square().mean())
                        sums[key] += 10 * math.log10(1 / max(mse, 1e-10))
    n = len(idx)
    res = {k: v / n for k, v in sums.items()}
    print(f"pairs: {n}")
    print(f"neutral masked L1: trained {res['neutral_trained']:.4f}, init "
          f"{res['neutral_init']:.4f}, ratio {res['neutral_trained'] / res['neutral_init']:.3f} "
          f"(the matted driving frame itself: {res['neutral_frame']:.4f}, ratio "
          f"{res['neutral_frame'] / res['neutral_init']:.3f})")
    print(f"  of the trained L1, inside the expression regions: {res['neutral_regions']:.4f} "
          f"(the regions: {100 * res['regions_share']:.1f} % of the neutral mask); the canonical "
          f"render's mean opacity inside the mask: {res['neutral_opacity']:.3f}")
    print(f"source-view PSNR: with appearance {res['psnr_app']:.2f} dB, without "
          f"{res['psnr_noapp']:.2f} dB, gain {res['psnr_app'] - res['psnr_noapp']:+.2f} dB")
    print(f"mouth-region L1 to the driving frame: canonical + expression {res['mouth_exp']:.4f}, "
          f"canonical only {res['mouth_cano']:.4f}")
    big = sorted(mouth_pairs, reverse=True)[:max(1, len(mouth_pairs) // 2)]
    print(f"  on the {len(big)} pairs with the largest expression change: canonical + expression "
          f"{sum(p[1] for p in big) / len(big):.4f}, canonical only "
          f"{sum(p[2] for p in big) / len(big):.4f}")


if __name__ == "__main__":
    main()
