"""Where a GOHA run loses PSNR on held-out same-identity ``moving`` pairs.

The pipeline's composite is ``P = fg + (1 - a) * bg`` (``fg``: the render, premultiplied over
black, after the SR in s2; ``a``: its opacity; ``bg``: the source's background with the head's
hole filled). With the target ``T = t * m + (1 - m) * t`` (``m`` its matte),
``P - T = (fg - t * m) + (m - a) * bg + (1 - m) * (bg - t)``: a colour term, an opacity term and
a background term. This prints, at the model's output side, the PSNR of the composite and what
it would be with a perfect colour (``fg := t * m``), a perfect opacity (``a := m``) or both, and
the MSE share of each term; with ``--stages`` also for the run's earlier stages (s1 / s1_gan at
their render side).

Usage: ``python tools/goha_error_budget.py MODEL RUN --data DIR [--pairs 96] [--side S]``
(MODEL: ``goha``, ``goha_s1_gan`` or ``goha_s1``).
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import pyface.models
from pyface.data import reenactment_pairs


def psnr(mse: float) -> float:
    return 10 * math.log10(1 / max(mse, 1e-10))


def _rs(x: torch.Tensor, s: int) -> torch.Tensor:
    if x.shape[-1] == s:
        return x
    return F.interpolate(x, size=(s, s), mode="bilinear", antialias=s < x.shape[-1],
                         align_corners=False)


@torch.no_grad()
def budget(name: str, run: str, data_dir: str, pairs: int, side: int | None = None) -> dict:
    pipe = pyface.models.load(name, run, device="cpu")
    model = pipe.model
    if side:
        pipe.resolution = side      # the output (and the background) at this side
    s = pipe.resolution
    data = reenactment_pairs(data_dir, protocol="same", subset="moving")
    idx = torch.linspace(0, len(data) - 1, min(pairs, len(data))).round().long().tolist()
    acc = dict.fromkeys(("actual", "perfect_colour", "perfect_opacity", "perfect_both",
                         "mse_colour", "mse_opacity", "mse_background", "psnr_over_black"), 0.0)
    for i in idx:
        it = data[i]
        state = pipe.encode_source(it["source"])
        drv = {k: v[None] for k, v in it["driving"].items() if torch.is_tensor(v)}
        motion = pipe.encode_driving(drv)
        planes = model.animate_planes(state, motion["expression"])
        out = model.render(planes, motion["camera"])
        # the pipeline's foreground (s2: the SR kept inside the opacity) at the output side,
        # then resized to s
        a_out = _rs(out["weights"].clamp(0, 1), model.output_resolution)
        fg = _rs(model.foreground(out["image"], model.finish(out["image"]).clamp(-1, 1), a_out), s)
        a = _rs(out["weights"].clamp(0, 1), s)
        bg = state["background"]
        t = _rs(it["target"]["image"][None].float() / 255, s)
        m = _rs(it["target"]["mask"][None].float() / 255, s).clamp(0, 1)
        tm = t * m
        for key, f, al in (("actual", fg, a), ("perfect_colour", tm, a),
                           ("perfect_opacity", fg, m), ("perfect_both", tm, m)):
            acc[key] += psnr(float((f + (1 - al) * bg - t).square().mean()))
        acc["mse_colour"] += float((fg - tm).square().mean())
        acc["mse_opacity"] += float(((m - a) * bg).square().mean())
        acc["mse_background"] += float(((1 - m) * (bg - t)).square().mean())
        acc["psnr_over_black"] += psnr(float((fg - tm).square().mean()))
    n = len(idx)
    return {"model": name, "side": s, "pairs": n, **{k: round(v / n, 5 if "mse" in k else 2)
                                                      for k, v in acc.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("run")
    ap.add_argument("--data", required=True)
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--side", type=int, default=None,
                    help="evaluate at this side (the output resized bilinearly; default: the "
                         "pipeline's output side)")
    args = ap.parse_args()
    print(budget(args.model, args.run, args.data, args.pairs, args.side))


if __name__ == "__main__":
    main()
