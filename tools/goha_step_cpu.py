"""Process CPU time of the tiny ``goha_s1`` training step, fused against reference ops, over
whole mode cycles (step % 6: src, tar, coarse, coarse, cano, cano; every branch on from step
0), interleaved step by step so that both sides see the same machine load.

``python -m pyface.bench.train`` reports the median of a dozen steps, which mixes the six
modes (their costs differ by ~2x) and moves by +-10 % between runs on a loaded machine; this
sums ``time.process_time`` (which does not count the time other processes hold the core)
over ``--cycles`` full cycles per side and prints the ratio of the sums, per mode and in all,
for each ``--variant`` (a comma-separated list of ``--set`` items for the fused side; the
reference side is the preset under ``train.backend=reference``).

Usage: ``python tools/goha_step_cpu.py [--cycles 8] [--variant model.render_chunk_points=16384
...]``.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from pyface.models.goha import GOHA
from pyface.train import Trainer, build_experiment

MODES = ("src", "tar", "coarse", "coarse", "cano", "cano")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=8)
    ap.add_argument("--variant", action="append", default=[],
                    help="comma-separated --set items of one fused variant (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sides = {"fused (tiny)": [], "reference": ["train.backend=reference"]}
    for v in args.variant:
        sides[f"fused {v}"] = [x for x in v.split(",") if x]
    with tempfile.TemporaryDirectory() as tmp:
        trainers, batch = {}, None
        for i, (name, sets) in enumerate(sides.items()):
            cfg = build_experiment("goha_s1", GOHA.Config, defaults=GOHA.recipe,
                                   presets=GOHA.presets, preset="tiny", overrides=[
                                       f"train.run_dir={tmp}/{i}", "train.progress=false",
                                       "train.tensorboard=false", "train.device=cpu",
                                       "model.canonical_until=0", "model.expression_from=0",
                                       "model.appearance_from=0", *sets])
            torch.manual_seed(0)
            trainers[name] = Trainer(cfg)
            batch = batch if batch is not None else trainers[name].preview_batch(
                cfg.train.batch_size)
        cpu = {n: [0.0] * 6 for n in trainers}
        for s in range(6 * (args.cycles + 1)):          # the first cycle: warm-up
            for name, tr in trainers.items():
                tr.step = s
                c0 = time.process_time()
                tr.train_step(batch)
                if s >= 6:
                    cpu[name][s % 6] += time.process_time() - c0
    ref = cpu["reference"]
    n = args.cycles
    for name, c in cpu.items():
        per = {m: 0.0 for m in dict.fromkeys(MODES)}
        rper = dict(per)
        for k, m in enumerate(MODES):
            per[m] += c[k]
            rper[m] += ref[k]
        print(f"{name}: {1e3 * sum(c) / (6 * n):.1f} ms CPU per step; reference / this: all "
              f"x{sum(ref) / sum(c):.3f}; " + ", ".join(
                  f"{m} x{rper[m] / per[m]:.3f}" for m in per))


if __name__ == "__main__":
    main()
