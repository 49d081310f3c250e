"""Where the memory of MMFA's training step goes, on fused and reference ops.

    python tools/mmfa_step_memory.py [--preset tiny] [--checkpoint-hourglass]
                                     [--json bench/results/OUT.json]

For each backend (fused: each op's default; reference: ``train.backend=reference``), one
training step of the preset (the batch of ``pyface.bench.train``, after one warm-up step):

* ``peak_mem_mb``: the step's peak above what was allocated before it
  (:func:`pyface.bench.harness.peak_memory_mb`, the number ``pyface.bench.train`` reports);
* ``saved_mb``: the tensors autograd saves for the backward pass (unique storages), attributed
  to the module (two levels deep, e.g. ``dense_motion.hourglass``) that was running when they
  were saved; ``(step)`` is everything outside the modules (losses, source blend, warps of the
  fused ops called from ``MMFA.render``);
* ``cpu_s``: process CPU time of one step (the median of 3).

``--checkpoint-hourglass`` adds a third measurement: the fused step with the dense-motion
hourglass under activation checkpointing (``torch.utils.checkpoint``, recomputed in the
backward), i.e. how much of the peak the hourglass's activations are.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time

import torch
import torch.utils.checkpoint as checkpoint

from pyface.bench.harness import peak_memory_mb
from pyface.train import Trainer
from pyface.train.config import build_experiment
from pyface.train.registry import model_class


def measure(preset: str, backend: str, ckpt_hourglass: bool = False) -> dict:
    cls = model_class("mmfa")
    cfg = build_experiment("mmfa", cls.Config, defaults=cls.recipe, preset=preset, overrides=[
        f"train.run_dir={tempfile.mkdtemp(prefix='mmfa-mem-')}", "train.progress=false",
        "train.tensorboard=false", "train.device=cpu", f"train.backend={backend}"])
    tr = Trainer(cfg)
    batch = tr.preview_batch(tr.local_batch)
    model = tr.model.module if hasattr(tr.model, "module") else tr.model
    if ckpt_hourglass:
        hg = model.dense_motion.hourglass
        plain = hg.forward
        hg.forward = lambda x: checkpoint.checkpoint(plain, x, use_reentrant=False)
    tr.train_step(batch)
    cpu = []
    for _ in range(3):
        c0 = time.process_time()
        tr.train_step(batch)
        cpu.append(time.process_time() - c0)
    peak = peak_memory_mb(lambda: tr.train_step(batch), torch.device("cpu"))

    stack, seen, per = ["(step)"], set(), collections.Counter()

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            per[stack[-1]] += s.nbytes()
        return t

    def enter(name):
        def hook(module, inputs):
            stack.append(name)
        return hook

    def leave(module, inputs, output):
        stack.pop()

    hooks = []
    for name, mod in model.named_modules():
        if name and name.count(".") <= 1:
            hooks.append(mod.register_forward_pre_hook(enter(name)))
            hooks.append(mod.register_forward_hook(leave))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tr.train_step(batch)
    for h in hooks:
        h.remove()
    return {"peak_mem_mb": round(peak, 2), "cpu_s": round(statistics.median(cpu), 4),
            "saved_total_mb": round(sum(per.values()) / 2**20, 2),
            "saved_mb": {k: round(v / 2**20, 2) for k, v in per.most_common()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint-hourglass", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = {"preset": args.preset, "threads": torch.get_num_threads(),
           "fused": measure(args.preset, "null"),
           "reference": measure(args.preset, "reference")}
    if args.checkpoint_hourglass:
        out["fused_checkpoint_hourglass"] = measure(args.preset, "null", ckpt_hourglass=True)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
