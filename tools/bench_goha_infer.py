"""GOHA inference timing: avatar build (``encode_source``: the three encoders plus the lift) and
per-frame animation (``generate``: expression plane, render, super-resolution) on one device.

Usage::

    python tools/bench_goha_infer.py --run RUN                 # a trained run (any size)
    python tools/bench_goha_infer.py --preset full             # GOHA's size, random weights
    ... [--frames 8] [--repeats 3] [--device cpu] [--json bench/results/goha_infer_cpu.json]

Random weights do not change the cost (the renderer's importance sampling is data-dependent
only through the sample positions). Times: medians over ``--repeats`` of the build, of the
first frame after it, and of a ``--frames``-frame chunk (per frame).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="trained run (pyface.models.load('goha', RUN))")
    ap.add_argument("--model", default="goha", help="registered name of --run's model")
    ap.add_argument("--preset", default=None, help="goha preset with random weights")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import pyface.models
    from pyface.cli import parse_only
    from pyface.face.morphable import MorphableModel
    from pyface.models.goha import GOHAPipeline, GOHASR
    from pyface.train import build_experiment

    if parse_only():
        # PYFACE_PARSE_ONLY=1: the command line checked (options, --device, --preset's config),
        # nothing built or timed (--run's content is not checked)
        from pyface.train.cli import check_device

        try:
            check_device(args.device)
            for name in ("frames", "repeats"):
                if getattr(args, name) < 1:
                    raise ValueError(f"--{name}: expected an integer >= 1, got "
                                     f"{getattr(args, name)}")
            if not args.run:
                build_experiment("goha", GOHASR.Config, defaults=GOHASR.recipe,
                                 presets=GOHASR.presets, preset=args.preset)
        except ValueError as exc:       # ConfigError too
            raise SystemExit(f"bench_goha_infer: {exc}") from None
        print("bench_goha_infer: arguments checked (PYFACE_PARSE_ONLY=1: nothing run)")
        return
    if args.run:
        pipe = pyface.models.load(args.model, args.run, device=args.device)
    else:
        cfg = build_experiment("goha", GOHASR.Config, defaults=GOHASR.recipe,
                               presets=GOHASR.presets, preset=args.preset).model_config
        torch.manual_seed(0)
        pipe = GOHAPipeline(GOHASR(cfg), device=args.device)
    cfg = pipe.model.cfg
    R = cfg.resolution
    g = torch.Generator().manual_seed(0)
    T = args.frames
    coeffs = torch.zeros(T, 257)
    coeffs[:, :80] = torch.randn(T, 80, generator=g) * 0.5
    coeffs[:, 80:144] = torch.randn(T, 64, generator=g) * 0.5
    coeffs[:, 144:224] = torch.randn(T, 80, generator=g) * 0.5
    r = MorphableModel.builtin().render(coeffs, R)
    source = {"image": r.image[0] * 2 - 1, "camera": r.label[0], "coeffs": coeffs[0],
              "mask": r.mask[0]}
    driving = {"image": r.image * 2 - 1, "camera": r.label, "coeffs": coeffs}
    dev = torch.device(args.device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    build, first, chunk = [], [], []
    with torch.no_grad():
        for _ in range(args.repeats + 1):             # the first round warms up
            sync()
            t0 = time.perf_counter()
            state = pipe.encode_source(source)
            sync()
            t1 = time.perf_counter()
            one = {k: v[:1] for k, v in driving.items()}
            pipe.generate(state, pipe.encode_driving(one))
            sync()
            t2 = time.perf_counter()
            pipe.generate(state, pipe.encode_driving(driving))
            sync()
            t3 = time.perf_counter()
            build.append(t1 - t0)
            first.append(t2 - t1)
            chunk.append((t3 - t2) / T)
    med = lambda xs: statistics.median(xs[1:])
    res = {"bench": "goha_infer", "run": args.run, "preset": args.preset, "device": str(dev),
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "resolution": R, "render_resolution": cfg.render_resolution,
           "output_resolution": pipe.resolution, "encoder": cfg.encoder,
           "samples": [cfg.depth_samples, cfg.depth_samples_importance],
           "lift": [cfg.lift_resolution, cfg.lift_samples], "frames": T,
           "repeats": args.repeats, "build_s": med(build), "first_frame_s": med(first),
           "per_frame_s": med(chunk), "fps": 1 / med(chunk)}
    print(json.dumps(res, indent=1))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
