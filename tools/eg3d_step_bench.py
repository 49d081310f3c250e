"""EG3D tiny-preset training step: fused tri-plane rendering vs the reference (EG3D's unfused
maths) on this machine. Each backend runs in its own process (peak RSS is per process).

    python tools/eg3d_step_bench.py --data /tmp/eg3d/synth [--steps 16] [--set KEY=VALUE ...]

Prints per backend the median step time (all four phases of a step, lazy ones included at
their interval) and the process peak RSS.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def one(backend: str, data: str, steps: int, overrides: list[str]) -> dict:
    import torch

    from pyface.models.eg3d.model import EG3D
    from pyface.train.config import build_experiment
    from pyface.train.engine import Trainer

    tmp = tempfile.mkdtemp(prefix="eg3d-bench-")
    sets = [f"data.path={data}", f"train.run_dir={tmp}", "train.progress=false",
            "train.tensorboard=false", "train.device=cpu", *overrides]
    if backend != "default":
        sets.append(f"model.generator.render.backend={backend}")
    tr = Trainer(build_experiment("eg3d", EG3D.Config, overrides=sets, defaults=EG3D.recipe))
    it = iter(tr._loader())
    times = []
    for i in range(steps + 2):
        b = tr._to_device(next(it))
        t0 = time.perf_counter()
        tr.train_step(b)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"backend": backend, "steps": steps, "median_step_s": statistics.median(times),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.backend:
        print(json.dumps(one(a.backend, a.data, a.steps, a.overrides)))
        return
    for backend in ("default", "reference"):
        cmd = [sys.executable, __file__, "--data", a.data, "--steps", str(a.steps),
               "--backend", backend] + [x for s in a.overrides for x in ("--set", s)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
