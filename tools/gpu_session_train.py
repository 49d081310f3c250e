"""Runs ``pyface train`` in this process and writes what a short run measured as JSON: per run
(the final model and each stage it trained first) the steps done, seconds, the training rates of
its log lines and the peak GPU memory of that run; the exit code of ``pyface train`` is this
script's. Used by ``bench/gpu_session.sh``::

    python tools/gpu_session_train.py --json OUT.json -- MODEL --preset gpu-short --set ...

Everything after ``--`` is ``pyface train``'s command line, unchanged. The peak memory of each
run is ``torch.cuda.max_memory_allocated`` between the start and the end of its ``Trainer.fit``
(the statistics are reset before each fit; null on CPU). Rates are read from the run's
``log.txt`` lines ``step N/M: ... (X images/s, Y steps/s)``: the first interval holds the
warm-up (cuDNN autotuning, Triton compilation, the first batches), so ``steps_per_s_after_first``
leaves it out. A run stopped by SIGTERM (``timeout``) finishes its step, writes its checkpoint and
is recorded with ``interrupted: true``. Under ``PYFACE_PARSE_ONLY=1`` ``pyface train`` checks its
command line (the configs of the run and of its stages) and this script writes no JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

RATE = re.compile(r"step (\d+)/(\d+): .*\(([0-9.eE+-]+) images/s, ([0-9.eE+-]+) steps/s\)")


def parse_log(path: str) -> list[dict]:
    """The ``step N/M ... images/s, steps/s`` lines of a run's log.txt (the last run in it: a
    line whose step is not above the previous one starts over)."""
    rows: list[dict] = []
    if not os.path.isfile(path):
        return rows
    with open(path, errors="replace") as f:
        for line in f:
            m = RATE.search(line)
            if not m:
                continue
            step = int(m.group(1))
            if rows and step <= rows[-1]["step"]:
                rows = []
            rows.append({"step": step, "steps": int(m.group(2)),
                         "images_per_s": float(m.group(3)), "steps_per_s": float(m.group(4))})
    return rows


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("gpu_session_train: expected `--json OUT.json -- MODEL [pyface train options]`, "
              f"got {argv!r} (no --)", file=sys.stderr)
        return 2
    split = argv.index("--")
    ap = argparse.ArgumentParser(prog="gpu_session_train")
    ap.add_argument("--json", required=True, help="write the measurements here")
    args = ap.parse_args(argv[:split])
    train_argv = argv[split + 1:]
    if not train_argv:
        print("gpu_session_train: expected a model after --, got nothing", file=sys.stderr)
        return 2

    import torch

    from pyface.cli import main as pyface_main
    from pyface.train.engine import Trainer

    runs: list[dict] = []
    fit = Trainer.fit

    def measured_fit(self):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start_step, t0 = self.step, time.perf_counter()
        record = {"model": self.cfg.model, "run_dir": self.run_dir,
                  "preset": self.cfg.preset, "device": str(self.device),
                  "batch_size": self.cfg.train.batch_size,
                  "precision": self.cfg.train.precision, "start_step": start_step}
        runs.append(record)
        try:
            result = fit(self)
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                record["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                record["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
            else:
                record["peak_gib"] = None
            record["seconds"] = time.perf_counter() - t0
            record["step"] = self.step
        record["interrupted"] = result.interrupted
        record["checkpoint"] = result.checkpoint
        steps = self.step - start_step
        record["steps_per_s"] = steps / record["seconds"] if steps > 0 else None
        return result

    Trainer.fit = measured_fit
    t0 = time.perf_counter()
    try:
        code = int(pyface_main(["train", *train_argv]) or 0)
    finally:
        Trainer.fit = fit
    from pyface.cli import parse_only

    if parse_only():        # PYFACE_PARSE_ONLY=1: the command line checked, nothing to report
        return code
    wall = time.perf_counter() - t0
    for record in runs:
        rows = parse_log(os.path.join(record["run_dir"], "log.txt"))
        record["log_rates"] = rows
        later = [r["steps_per_s"] for r in rows[1:]]
        record["steps_per_s_after_first"] = statistics.median(later) if later else None
        record["images_per_s_after_first"] = (record["steps_per_s_after_first"]
                                              * record["batch_size"]
                                              if later else None)
    report = {
        "bench": "gpu_session_train",
        "command": ["pyface", "train", *train_argv],
        "exit_code": code,
        "wall_s": wall,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    for record in runs:
        peak = "-" if record.get("peak_gib") is None else f"{record['peak_gib']:.2f} GiB"
        rate = record.get("steps_per_s_after_first") or record.get("steps_per_s")
        print(f"gpu_session_train: {record['model']}: steps {record['start_step']}->"
              f"{record['step']} in {record['seconds']:.1f} s, "
              f"{'-' if rate is None else f'{rate:.3g}'} steps/s, peak {peak}"
              + (" (interrupted)" if record.get("interrupted") else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())
