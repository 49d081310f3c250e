"""Is a GOHA run's held-out error the novel view or the reconstruction itself?

For same-identity ``moving`` pairs of ``--data`` (``pyface.data.reenactment_pairs``), at
``--side`` (the render upsampled bilinearly, the background at that side), prints the mean
PSNR of the pipeline's composite:

* ``driving_app{1,0}``: at the driving camera and expression against the driving frame (what
  ``pyface eval`` scores), with and without the appearance planes;
* ``source_app{1,0}``: at the source's own camera and expression against the source frame
  (the one-shot reconstruction of the input);
* ``*_overblack``: the render over black against the matted frame; ``*_opacityL1``: mean L1 of
  the render's opacity to the frame's matte;
* ``model_at_source_vs_target``: the render at the source camera and expression against the
  driving frame (the model's own copy-source) and ``copy_source`` itself.

Usage: ``python tools/goha_view_split.py MODEL RUN --data DIR [--pairs 64] [--side 64]``
(MODEL: ``goha``, ``goha_s1_gan`` or ``goha_s1``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import pyface.models
from pyface.data import reenactment_pairs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from goha_error_budget import _rs, psnr  # noqa: E402


@torch.no_grad()
def split(name: str, run: str, data_dir: str, pairs: int = 64, side: int = 64) -> dict:
    pipe = pyface.models.load(name, run, device="cpu")
    model = pipe.model
    pipe.resolution = side                  # the background at this side
    data = reenactment_pairs(data_dir, protocol="same", subset="moving")
    idx = torch.linspace(0, len(data) - 1, min(pairs, len(data))).round().long().tolist()
    acc: dict[str, float] = {}

    def add(k, v):
        acc[k] = acc.get(k, 0.0) + v

    for i in idx:
        it = data[i]
        state = pipe.encode_source(it["source"])
        bg = state["background"]

        def composite(motion, app=True):
            planes = model.animate_planes(state, motion["expression"], use_appearance=app)
            out = model.render(planes, motion["camera"])
            a_out = _rs(out["weights"].clamp(0, 1), model.output_resolution)
            fg = _rs(model.foreground(out["image"], model.finish(out["image"]).clamp(-1, 1),
                                      a_out), side)
            a = _rs(out["weights"].clamp(0, 1), side)
            return fg + (1 - a) * bg, fg, a

        motions = {role: pipe.encode_driving({k: v[None] for k, v in it[role].items()
                                              if torch.is_tensor(v)})
                   for role in ("source", "driving")}
        for role, frame in (("driving", it["target"]), ("source", it["source"])):
            t = _rs(frame["image"][None].float() / 255, side)
            m = _rs(frame["mask"][None].float() / 255, side).clamp(0, 1)
            for app in (True, False):
                P, fg, a = composite(motions[role], app)
                add(f"{role}_app{int(app)}", psnr(float((P - t).square().mean())))
                add(f"{role}_app{int(app)}_overblack", psnr(float((fg - t * m).square().mean())))
                add(f"{role}_app{int(app)}_opacityL1", float((a - m).abs().mean()))
        P, _, _ = composite(motions["source"])
        t = _rs(it["target"]["image"][None].float() / 255, side)
        add("model_at_source_vs_target", psnr(float((P - t).square().mean())))
        src = _rs(it["source"]["image"][None].float() / 255, side)
        add("copy_source", psnr(float((src - t).square().mean())))
    n = len(idx)
    return {"model": name, "side": side, "pairs": n,
            **{k: round(v / n, 3) for k, v in acc.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("run")
    ap.add_argument("--data", required=True)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--side", type=int, default=64)
    args = ap.parse_args()
    print(split(args.model, args.run, args.data, args.pairs, args.side))


if __name__ == "__main__":
    main()
