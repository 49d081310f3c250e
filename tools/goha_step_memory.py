"""Peak memory of the tiny ``goha_s1`` training step in each mode of the s1 cycle (step % 6:
src, tar, coarse, coarse, cano, cano), every branch on from step 0, measured as
``python -m pyface.bench.train`` does (``pyface.bench.harness.peak_memory_mb``: the allocations
of one step above what was allocated before it).

Usage: ``python tools/goha_step_memory.py [--set KEY=VALUE ...]`` (e.g.
``--set train.backend=reference``, ``--set model.render_chunk_points=null``).
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from pyface.bench.harness import peak_memory_mb
from pyface.models.goha import GOHA
from pyface.train import Trainer, build_experiment


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[], dest="sets")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sets = [f"train.run_dir={tmp}", "train.progress=false", "train.tensorboard=false",
                "train.device=cpu", "model.canonical_until=0", "model.expression_from=0",
                "model.appearance_from=0", *args.sets]
        cfg = build_experiment("goha_s1", GOHA.Config, defaults=GOHA.recipe,
                               presets=GOHA.presets, preset="tiny", overrides=sets)
        tr = Trainer(cfg)
        batch = tr.preview_batch(cfg.train.batch_size)
        for _ in range(6):              # warm-up: optimizer state, every mode once
            tr.train_step(batch)
        peaks = []
        for s in range(6):
            tr.step = s
            peaks.append(peak_memory_mb(lambda: tr.train_step(batch), torch.device("cpu")))
    modes = ("src", "tar", "coarse", "coarse", "cano", "cano")
    print(" ".join(args.sets) or "(tiny)", "peak MB:",
          ", ".join(f"{m} {p:.1f}" for m, p in zip(modes, peaks)))


if __name__ == "__main__":
    main()
