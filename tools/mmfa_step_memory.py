"""Where the memory of MMFA's training step goes, on fused and reference ops.

    python tools/mmfa_step_memory.py [--preset tiny] [--checkpoint-hourglass] [--top 15]
                                     [--json bench/results/OUT.json]

For each backend (fused: each op's default; reference: ``train.backend=reference``), one
training step of the preset (the batch of ``pyface.bench.train``, after one warm-up step):

* ``peak_mem_mb``: the step's peak above what was allocated before it
  (:func:`pyface.bench.harness.peak_memory_mb`, the number ``pyface.bench.train`` reports);
* ``saved_mb``: the tensors autograd saves for the backward pass (unique storages), attributed
  to the module (two levels deep, e.g. ``dense_motion.hourglass``) that was running when they
  were saved; ``(step)`` is everything outside the modules (losses, source blend, warps of the
  fused ops called from ``MMFA.render``);
* ``cpu_s``: process CPU time of one step (the median of 3);
* ``largest``: the ``--top`` largest saved storages (module, shape, dtype, MB), and
  ``by_shape``: the saved storages grouped by (module, shape) with their count and total MB,
  largest first (the ``--top`` first groups): which tensors make the peak.

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


def measure(preset: str, backend: str, ckpt_hourglass: bool = False, top: int = 15) -> dict:
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
    tensors = []

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            per[stack[-1]] += s.nbytes()
            tensors.append((stack[-1], tuple(t.shape), str(t.dtype).replace("torch.", ""),
                            s.nbytes()))
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
    groups = collections.defaultdict(lambda: [0, 0])
    for name, shape, dtype, nbytes in tensors:
        g = groups[(name, shape, dtype)]
        g[0] += 1
        g[1] += nbytes
    mb = 2.0 ** 20
    return {"peak_mem_mb": round(peak, 2), "cpu_s": round(statistics.median(cpu), 4),
            "saved_total_mb": round(sum(per.values()) / mb, 2),
            "saved_mb": {k: round(v / mb, 2) for k, v in per.most_common()},
            "largest": [{"module": n, "shape": list(sh), "dtype": dt, "mb": round(b / mb, 3)}
                        for n, sh, dt, b in sorted(tensors, key=lambda x: -x[3])[:top]],
            "by_shape": [{"module": n, "shape": list(sh), "dtype": dt, "count": c,
                          "mb": round(b / mb, 3)}
                         for (n, sh, dt), (c, b) in sorted(groups.items(),
                                                           key=lambda x: -x[1][1])[:top]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint-hourglass", action="store_true")
    ap.add_argument("--top", type=int, default=15,
                    help="how many of the largest saved tensors / (module, shape) groups to list")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = {"preset": args.preset, "threads": torch.get_num_threads(),
           "fused": measure(args.preset, "null", top=args.top),
           "reference": measure(args.preset, "reference", top=args.top)}
    if args.checkpoint_hourglass:
        out["fused_checkpoint_hourglass"] = measure(args.preset, "null", ckpt_hourglass=True,
                                                    top=args.top)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
