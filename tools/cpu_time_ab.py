"""A/B comparison of the C++ CPU kernels of two builds by CPU time, for refactors that must not
slow any op down.

Each side is a source tree with its own built extension (``python setup.py build_ext --inplace``
there). The sides run alternately, ``--rounds`` times each, in fresh processes with one thread;
every process times ``--reps`` calls of the ``cpu`` provider of every small `pyface bench` case
(fwd, and fwd+bwd where the op is differentiable) with ``time.process_time``, which does not
count the time other processes hold the core. Reported per case: the minimum over all calls and
the median over rounds of each process's minimum, before and after.

    python tools/cpu_time_ab.py --before /path/to/old/tree --after . --json OUT.json

Summaries go to bench/results/ab/ (not next to the per-op results of `pyface bench`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import importlib, json, pkgutil, sys, time
import torch
torch.set_num_threads(1)
import pyface.bench.ops as bops
from pyface.bench.harness import _tensors
reps = int(sys.argv[1])
dev = torch.device("cpu")
res = {}
for m in pkgutil.iter_modules(bops.__path__):
    for case in importlib.import_module(f"pyface.bench.ops.{m.name}").cases(dev, "small"):
        fn = case.providers.get("cpu")
        if fn is None:
            continue
        inputs = case.make_inputs(dev, 0)
        leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        cot = [torch.randn_like(o) for o in _tensors(fn(*inputs))]
        modes = [("fwd", lambda: fn(*inputs))]
        if leaves:
            modes.append(("fwd+bwd",
                          lambda: torch.autograd.grad(_tensors(fn(*inputs)), leaves, cot)))
        for mode, f in modes:
            f()
            ts = []
            for _ in range(reps):
                t0 = time.process_time()
                f()
                ts.append(time.process_time() - t0)
            res[f"{case.op}/{case.shape}/{mode}"] = ts
print(json.dumps(res))
"""


def run_side(root: str, reps: int) -> dict[str, list[float]]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(root), OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as cwd:  # import pyface from `root`, not from the cwd
        out = subprocess.run([sys.executable, "-c", CHILD, str(reps)], cwd=cwd, env=env,
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="source tree with the old build")
    p.add_argument("--after", default=".", help="source tree with the new build")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for side in ("before", "after"):
            runs[side].append(run_side(getattr(args, side), args.reps))
            print(f"round {r + 1}/{args.rounds} {side} done", file=sys.stderr)
    rows = []
    for case in runs["before"][0]:
        row = {"case": case}
        for side in ("before", "after"):
            minima = [min(run[case]) * 1e3 for run in runs[side]]
            row[f"{side}_min_ms"] = round(min(minima), 3)
            row[f"{side}_median_of_minima_ms"] = round(statistics.median(minima), 3)
        row["ratio_min"] = round(row["after_min_ms"] / row["before_min_ms"], 3)
        row["ratio_median"] = round(row["after_median_of_minima_ms"]
                                    / row["before_median_of_minima_ms"], 3)
        rows.append(row)
        print(f"{case:40s} min {row['before_min_ms']:9.2f} -> {row['after_min_ms']:9.2f} "
              f"({row['ratio_min']:.3f})   median {row['before_median_of_minima_ms']:9.2f} -> "
              f"{row['after_median_of_minima_ms']:9.2f} ({row['ratio_median']:.3f})")
    if args.json:
        import torch

        summary = {"method": __doc__.split("\n\n")[1].replace("\n", " "),
                   "rounds": args.rounds, "reps": args.reps, "torch": torch.__version__,
                   "cpu_count": os.cpu_count(), "threads": 1, "comparison": rows}
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
