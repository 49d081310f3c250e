"""Where the peak memory and the CPU time of one OTAvatar training step go
(docs/models/otavatar-measured.md, "Fused vs reference ops").

    python tools/otavatar_step_profile.py --set model.generator=EG3D_RUN [--backend reference]
        [--set KEY=VALUE ...] [--top 20]

Builds the ``tiny`` trainer as ``python -m pyface.bench.train otavatar --preset tiny`` does, runs
two warm-up steps, then profiles one step (torch.profiler, ``profile_memory``; CPU: the allocator
events of the calling thread, as the bench counts them) and prints:

* the step's peak memory above what was allocated before it, and the innermost events running at
  the peak;
* for the first inversion iteration: the memory allocated when each fused renderer pass (and
  its backward, and the plane-gradient scatter in it) starts, and the most it reaches inside;
* the ops with the most self CPU time.

    python tools/otavatar_step_profile.py --render CHUNK:BLOCK [CHUNK:BLOCK ...]

instead times the fused renderer alone on the ``tiny`` inversion's shapes (8 frames, 16² rays,
12 + 12 samples, 8-channel 32² planes, hidden 32; forward + backward w.r.t. planes and decoder
weights) for each ``chunk_points:CPU_DECODER_BLOCK`` pair (``ref`` as CHUNK: the reference
renderer): median CPU time of 15 alternating repeats and the peak memory.
"""
from __future__ import annotations

import argparse
import bisect
import sys
import tempfile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="null", help="train.backend (null: fused; reference)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--render", nargs="+", metavar="CHUNK:BLOCK", default=None)
    args = p.parse_args(argv)
    if args.render:
        return render_blocks(args.render)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pyface.train import Trainer
    from pyface.train.config import build_experiment
    from pyface.train.registry import model_class

    cls = model_class("otavatar")
    tmp = tempfile.mkdtemp(prefix="pyface-prof-")
    cfg = build_experiment("otavatar", cls.Config, defaults=dict(cls.recipe), preset="tiny",
                           overrides=[*args.overrides, f"train.run_dir={tmp}/run",
                                      "train.progress=false", "train.tensorboard=false",
                                      "train.device=cpu", f"train.backend={args.backend}"])
    tr = Trainer(cfg)
    batch = tr.preview_batch(tr.local_batch)
    for _ in range(2):
        tr.train_step(batch)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tr.train_step(batch)
    events = list(prof.profiler.kineto_results.events())
    mem = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    times, cum, cur = [], [], 0
    for e in mem:
        cur += e.nbytes()
        times.append(e.start_ns())
        cum.append(cur)
    i_peak = max(range(len(cum)), key=cum.__getitem__)
    t_peak = times[i_peak]
    print(f"step peak {cum[i_peak] / 2**20:.2f} MB ({args.backend} ops); running at the peak:")
    ops = sorted((e for e in events if e.name() != "[memory]"
                  and e.start_ns() <= t_peak <= e.end_ns()), key=lambda e: e.start_ns())
    for e in ops[-4:]:
        print(f"  {e.name()}")

    def at(t):
        i = bisect.bisect_right(times, t) - 1
        return cum[i] if i >= 0 else 0

    def most(t0, t1):
        i0, i1 = bisect.bisect_left(times, t0), bisect.bisect_right(times, t1)
        return max(cum[i0:i1]) if i1 > i0 else at(t0)

    names = ("_OSGFinalPass", "_OSGFinalPassBackward", "pyface::triplane_sample_bwd")
    sel = sorted((e for e in events if e.name() in names), key=lambda e: e.start_ns())
    if sel:
        print("first inversion iteration, fused renderer (MB allocated at the start / most "
              "inside):")
    seen = set()
    for e in sel:
        if e.name() in seen:
            break
        seen.add(e.name())
        print(f"  {e.name():32s} {at(e.start_ns()) / 2**20:7.2f} / "
              f"{most(e.start_ns(), e.end_ns()) / 2**20:7.2f}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


def render_blocks(cases: list[str]) -> int:
    import statistics
    import time

    import torch

    import pyface.ops.render as R
    from pyface.bench.harness import peak_memory_mb

    torch.manual_seed(0)
    B, C, S, n = 8, 8, 12, 256
    planes = torch.randn(B, 3, C, 32, 32, requires_grad=True)
    o = torch.tensor([0.0, 0.0, 2.7]).expand(B, n, 3).contiguous()
    d = torch.nn.functional.normalize(torch.randn(B, n, 3) * 0.1
                                      + torch.tensor([0.0, 0.0, -1.0]), dim=-1)
    w = [(torch.randn(32, C) * 0.3).requires_grad_(), torch.zeros(32, requires_grad=True),
         (torch.randn(9, 32) * 0.2).requires_grad_(), torch.zeros(9, requires_grad=True)]
    noise, u = torch.rand(B, n, S), torch.rand(B, n, S)

    def run(case):
        chunk, block = case.split(":")
        R.CPU_DECODER_BLOCK = int(block)
        ref = chunk == "ref"
        f, dep, ws = R.render_triplane(
            planes, o, d, w, near=2.25, far=3.3, n_coarse=S, n_fine=S, plane_axes="eg3d",
            white_back=True, stratified_noise=noise, importance_u=u,
            backend="reference" if ref else "cpu", recompute=True if ref else "decoder",
            chunk_points=None if ref else int(chunk))
        (f.square().sum() + dep.sum() + ws.sum()).backward()

    times = {c: [] for c in cases}
    for c in cases:
        run(c)
    for _ in range(15):
        for c in cases:
            t0 = time.process_time()
            run(c)
            times[c].append(time.process_time() - t0)
    for c in cases:
        mem = peak_memory_mb(lambda: run(c), torch.device("cpu"))
        print(f"{c:14s} CPU median {statistics.median(times[c]) * 1e3:7.1f} ms  "
              f"peak {mem:6.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
