"""Training-engine benchmarks: per-step overhead of :class:`pyface.train.Trainer` over a bare
PyTorch loop on the example model, and checkpoint save/load time of a ~30M-parameter model.

    python -m pyface.bench.train [--steps 40] [--json bench/results/train.json]

Overhead is measured with data loading excluded, two ways:

* direct: inside ``Trainer.train_step`` (``trainer.timings``), the time not spent in the model's
  forward/losses, ``backward`` or ``optimizer.step`` - i.e. schedule, reseeding, phase
  bookkeeping, grad-norm + NaN guard, EMA update - relative to the time that is;
* paired: the same batch fed to ``train_step`` and to a bare ``zero_grad / loss / backward /
  step`` loop on the same model, interleaved step by step; the median of the per-pair
  differences relative to the bare median. Noisy on a loaded machine.

Medians and [p20, p80] are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time


def _q(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def engine_overhead(steps: int = 40, warmup: int = 5, overrides: list[str] | None = None) -> dict:
    import torch

    from pyface.train import Trainer, build_experiment
    from pyface.train.example import TriplaneAutoencoder as M

    tmp = tempfile.mkdtemp(prefix="pyface-bench-")
    try:
        cfg = build_experiment("example", M.Config, defaults=M.recipe, overrides=[
            f"train.run_dir={tmp}", "train.progress=false", "train.tensorboard=false",
            "train.device=cpu", *(overrides or [])])
        tr = Trainer(cfg)
        batch = tr.preview_batch(cfg.train.batch_size)
        model, opt = tr.model, tr.optimizers["main"]

        def bare():
            opt.zero_grad(set_to_none=True)
            loss = model.step("main", batch, None)["loss"]
            loss.backward()
            opt.step()

        t_bare, t_eng = [], []
        tr.timings = {}
        for i in range(warmup + steps):
            # alternate which loop goes first so that ordering effects cancel
            if i % 2:
                t0 = time.perf_counter()
                bare()
                t1 = time.perf_counter()
                tr.train_step(batch)
                t2 = time.perf_counter()
                tb, te = t1 - t0, t2 - t1
            else:
                t0 = time.perf_counter()
                tr.train_step(batch)
                t1 = time.perf_counter()
                bare()
                t2 = time.perf_counter()
                te, tb = t1 - t0, t2 - t1
            if i >= warmup:
                t_bare.append(tb)
                t_eng.append(te)
        mb, me = statistics.median(t_bare), statistics.median(t_eng)
        tm = {k: v[warmup:] for k, v in tr.timings.items()}
        work = [m + b + o for m, b, o in zip(tm["model"], tm["backward"], tm["optimizer"])]
        rest = [t - w for t, w in zip(tm["total"], work)]
        direct = [100 * r / w for r, w in zip(rest, work)]
        paired = [e - b for e, b in zip(t_eng, t_bare)]
        return {"bench": "engine_overhead", "model": "example", "batch_size":
                cfg.train.batch_size, "resolution": cfg.data.resolution, "steps": steps,
                "ema_modules": cfg.train.ema.modules, "threads": torch.get_num_threads(),
                "bare_median_s": mb, "bare_p20_p80_s": [_q(t_bare, .2), _q(t_bare, .8)],
                "engine_median_s": me, "engine_p20_p80_s": [_q(t_eng, .2), _q(t_eng, .8)],
                "engine_only_median_s": statistics.median(rest),
                "overhead_direct_pct": statistics.median(direct),
                "overhead_direct_p20_p80_pct": [_q(direct, .2), _q(direct, .8)],
                "overhead_paired_pct": 100 * statistics.median(paired) / mb}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_io(repeats: int = 5, with_optimizer: bool = False) -> dict:
    import torch

    from pyface import checkpoint as ckpt
    from pyface.nn.stylegan import TriplaneBackbone

    torch.manual_seed(0)
    model = TriplaneBackbone()          # EG3D backbone, ~29M parameters
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta: dict = {"kind": "bench", "step": 0}
    if with_optimizer:
        opt = torch.optim.Adam(model.parameters())
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        t, info = ckpt.optimizer_to_flat(opt, "optim.main")
        tensors.update(t)
        meta["optimizers"] = {"main": info}
    n_params = sum(p.numel() for p in model.parameters())
    nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
    tmp = tempfile.mkdtemp(prefix="pyface-bench-")
    saves, loads = [], []
    try:
        for i in range(repeats + 1):
            path = os.path.join(tmp, "ckpt")
            t0 = time.perf_counter()
            ckpt.save_folder(path, tensors, meta)
            t1 = time.perf_counter()
            loaded, _ = ckpt.load_folder(path)
            t2 = time.perf_counter()
            assert len(loaded) == len(tensors)
            if i:  # the first round warms the page cache and allocator
                saves.append(t1 - t0)
                loads.append(t2 - t1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"bench": "checkpoint_io", "params": n_params, "with_optimizer": with_optimizer,
            "bytes": nbytes, "repeats": repeats,
            "save_median_s": statistics.median(saves), "save_max_s": max(saves),
            "load_median_s": statistics.median(loads), "load_max_s": max(loads),
            "note": "save includes fsync + SHA-256; load includes SHA-256 verification"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyface.bench.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="measured steps per loop")
    p.add_argument("--repeats", type=int, default=5, help="checkpoint save/load repeats")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override for the example model, e.g. train.batch_size=16")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    from pyface.bench.harness import environment

    import torch

    env = environment(torch.device("cpu"))
    results = [engine_overhead(args.steps, overrides=args.overrides),
               checkpoint_io(args.repeats), checkpoint_io(args.repeats, with_optimizer=True)]
    print(f"# {env.get('cpu')}  torch {env.get('torch')}  threads {torch.get_num_threads()}")
    e = results[0]
    print(f"engine step (example, batch {e['batch_size']}, {e['resolution']}px): bare "
          f"{e['bare_median_s'] * 1e3:.1f} ms [{e['bare_p20_p80_s'][0] * 1e3:.1f}, "
          f"{e['bare_p20_p80_s'][1] * 1e3:.1f}], engine {e['engine_median_s'] * 1e3:.1f} ms "
          f"[{e['engine_p20_p80_s'][0] * 1e3:.1f}, {e['engine_p20_p80_s'][1] * 1e3:.1f}]")
    print(f"engine overhead: direct {e['overhead_direct_pct']:.2f}% "
          f"[{e['overhead_direct_p20_p80_pct'][0]:.2f}, {e['overhead_direct_p20_p80_pct'][1]:.2f}]"
          f" ({e['engine_only_median_s'] * 1e3:.2f} ms/step), paired "
          f"{e['overhead_paired_pct']:+.1f}%")
    for r in results[1:]:
        print(f"checkpoint {r['params'] / 1e6:.1f}M params"
              f"{' + Adam state' if r['with_optimizer'] else ''} ({r['bytes'] / 2**20:.0f} MiB): "
              f"save {r['save_median_s']:.3f} s (max {r['save_max_s']:.3f}), load "
              f"{r['load_median_s']:.3f} s (max {r['load_max_s']:.3f})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": results}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
