"""Training benchmarks.

    python -m pyface.bench.train [--steps 40] [--json bench/results/train.json]
    python -m pyface.bench.train MODEL [--preset NAME] [--set KEY=VALUE ...] [--steps 10]
        [--compile MODE | --no-compile]
    torchrun --standalone --nproc_per_node=2 -m pyface.bench.train --overlap [--steps 20]

Without arguments: the per-step overhead of :class:`pyface.train.Trainer` over a bare PyTorch
loop on the example model, and checkpoint save/load time of a ~30M-parameter model.

``MODEL``: a registered model's training step on fused ops (each op's default backend) vs
reference ops (``train.backend=reference``): step time (median, [p20, p80]; also the process's
CPU time, which machine load does not inflate) and peak memory of a
step above the resident weights and optimizer state, with the backends the ops actually ran on;
the two trainers alternate step by step so that machine load hits both alike. With
``--compile MODE`` (the default on cuda; on cpu only when given) two more trainers join the
alternation with ``train.compile=MODE``: reference+compile (torch.compile of the reference ops)
and fused+compile (the fused ops inside the compiled graphs); their compilation (the warmup
steps) is reported apart from their step time. A model's
earlier stages (otavatar, export3d) are trained first for one step each
(``--set stages.<name>.train.steps=N``; or give a trained run as ``--set model.<key>=RUN``).
JSON under ``bench/results/`` (or ``--json``), never replacing an earlier run's file.

``--overlap`` (under torchrun, N ranks): step time of a few-million-parameter MLP with the
gradient all-reduce overlapped with the backward (bucketed hooks) vs one flat all-reduce after
it, alternating step by step on one trainer, plus the time of the flat all-reduce alone.

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
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time


def _q(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def engine_overhead(steps: int = 40, warmup: int = 5, overrides: list[str] | None = None) -> dict:
    import torch

    from pyface import _backend
    from pyface.bench.harness import default_backends
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
                "overhead_paired_pct": 100 * statistics.median(paired) / mb,
                # the ops' backends (PYFACE_BACKEND applies to both loops) and precision
                "pyface_backend_env": os.environ.get("PYFACE_BACKEND"),
                "default_backends": default_backends(sorted(_backend.registered_ops()),
                                                     torch.device("cpu")),
                **run_settings(tr)}
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


def run_settings(tr) -> dict:
    """What a trainer's steps ran with: ``train.backend`` (None: each op's default choice),
    ``train.precision``, the autocast dtype it means (None: fp32, no autocast) and the
    parameters' dtype."""
    t = tr.cfg.train
    param = next(iter(tr.model.parameters()), None)
    return {"train_backend": t.backend, "precision": t.precision,
            "autocast_dtype": "bfloat16" if t.precision == "bf16" else None,
            "param_dtype": None if param is None else str(param.dtype).replace("torch.", "")}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(xs: list[float]) -> dict:
    return {"median_s": statistics.median(xs), "p20_p80_s": [_q(xs, .2), _q(xs, .8)],
            "min_s": min(xs), "steps": len(xs)}


def stage_steps_overrides(cls, overrides: list[str] | None, stage_steps: int) -> list[str]:
    """``overrides`` preceded by ``stages.<name>.train.steps=stage_steps`` for every stage of
    ``cls`` (recursively) whose steps ``overrides`` does not set itself."""
    from pyface.train.stages import stage_names

    given = {o.split("=", 1)[0].strip() for o in overrides or []}
    return [*(f"stages.{n}.train.steps={stage_steps}" for n in stage_names(cls)
              if f"stages.{n}.train.steps" not in given), *(overrides or [])]


#: the rows of ``python -m pyface.bench.train MODEL``: label -> train.backend ("null": each op's
#: default choice); the compiled rows ("+compile") add train.compile
ROWS = {"fused": "null", "reference": "reference", "reference+compile": "reference",
        "fused+compile": "null"}


def row_config(name: str, label: str, overrides: list[str] | None, tmp: str, device,
               compile: str | None, preset: str | None):
    """The ExperimentConfig of the row ``label`` (a key of :data:`ROWS`) of
    :func:`model_backends`, its run folder in ``tmp``."""
    from pyface.train.config import build_experiment
    from pyface.train.registry import model_class
    from pyface.train.stages import own_overrides

    cls = model_class(name)
    compiled = label.endswith("+compile")
    sets = [*(overrides or []), f"train.run_dir={tmp}/{label.replace('+', '-')}",
            "train.progress=false", "train.tensorboard=false", f"train.device={device}",
            f"train.backend={ROWS[label]}", f"train.compile={compile if compiled else 'off'}"]
    return build_experiment(name, cls.Config, defaults=dict(getattr(cls, "recipe", {}) or {}),
                            preset=preset, overrides=own_overrides(sets))


def check_model_backends(name: str, overrides: list[str] | None = None, *, warmup: int = 2,
                         device: str = "cuda", preset: str | None = None, stage_steps: int = 1,
                         compile: str | None = None) -> list[str]:
    """What :func:`model_backends` would build, built and checked without training or
    measuring (``PYFACE_PARSE_ONLY=1``): the config of every row and of every stage trained
    first (ConfigError naming the key). Returns the labels of the rows."""
    from pyface.nn.compiling import parse_compile
    from pyface.train.registry import model_class
    from pyface.train.stages import prepare_stages

    options = parse_compile(compile, what="compile")
    if options is not None and warmup < 1:
        raise ValueError("warmup: the compiled rows compile in their first step; expected >= 1 "
                         f"unmeasured step with compile={compile!r}, got {warmup}")
    cls = model_class(name)
    labels = [k for k in ROWS if options is not None or not k.endswith("+compile")]
    tmp = os.path.join(tempfile.gettempdir(), "pyface-bench-check")   # not created
    for label in labels:
        cfg = row_config(name, label, overrides, tmp, device, compile, preset)
        if getattr(cls, "stages", ()):
            prepare_stages(cls, cfg, overrides=stage_steps_overrides(cls, overrides, stage_steps),
                           dry_run=True)
    return labels


def model_backends(name: str, overrides: list[str] | None = None, *, steps: int = 10,
                   warmup: int = 2, device: str | None = None,
                   preset: str | None = None, stage_steps: int = 1,
                   compile: str | None = None) -> dict:
    """Step time and peak memory of model ``name`` on fused vs reference ops (see module doc),
    and with ``compile`` (a ``train.compile`` value) the same two compiled: "reference+compile"
    (torch.compile of the reference) and "fused+compile" (the fused ops inside the compiled
    graphs).

    A model with earlier stages (otavatar, export3d) needs their runs: each stage whose
    ``model.<checkpoint_key>`` is not given is trained first, for ``stage_steps`` steps (a
    stage's ``stages.<name>.train.steps`` in ``overrides`` wins), in a temporary folder; a full
    stage run would take as long as ``pyface train`` of it.

    The compiled rows compile in their first steps: the ``warmup`` unmeasured steps (>= 1 with
    ``compile``), whose time above as many steady-state steps is reported as ``compile_s``;
    ``graphs_compiled``: the graphs TorchDynamo captured during the warmup and the measured
    steps (a recompile in the measured steps shows there)."""
    import torch
    from torch._dynamo.utils import counters

    from pyface import _backend
    from pyface.bench.harness import default_backends, peak_memory_mb, step_memory_mb
    from pyface.nn.compiling import parse_compile
    from pyface.train import Trainer
    from pyface.train.stages import prepare_stages
    from pyface.train.registry import model_class

    options = parse_compile(compile, what="compile")
    if options is not None and warmup < 1:
        raise ValueError("warmup: the compiled rows compile in their first step; expected >= 1 "
                         f"unmeasured step with compile={compile!r}, got {warmup}")
    labels = [k for k in ROWS if options is not None or not k.endswith("+compile")]
    cls = model_class(name)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env_backend = os.environ.pop("PYFACE_BACKEND", None)   # "fused" means the default choice
    tmp = tempfile.mkdtemp(prefix="pyface-bench-")
    real_select = _backend.select_backend
    counts: dict[str, dict[str, int]] = {}
    current = [None]

    def counting_select(op, device, backend, dtype=None):
        b = real_select(op, device, backend, dtype)
        per = counts.setdefault(current[0], {}).setdefault(op, {})
        per[b] = per.get(b, 0) + 1
        return b

    def graphs() -> int:
        return counters["stats"]["unique_graphs"]

    try:
        trainers, batches, filled = {}, {}, {}
        for label in labels:
            cfg = row_config(name, label, overrides, tmp, dev, compile, preset)
            if getattr(cls, "stages", ()):
                # earlier stages are trained once (fused ops) and shared by both measurements;
                # a step's time does not depend on how well they are trained
                filled = filled or prepare_stages(
                    cls, cfg, overrides=stage_steps_overrides(cls, overrides, stage_steps))
                for key, run in filled.items():
                    setattr(cfg.model_config, key, run)
            tr = Trainer(cfg)
            trainers[label] = tr
            batches[label] = tr.preview_batch(tr.local_batch)
        times: dict[str, list[float]] = {k: [] for k in trainers}
        cpu: dict[str, list[float]] = {k: [] for k in trainers}
        warm: dict[str, list[float]] = {k: [] for k in trainers}
        compiled_graphs = {k: [0, 0] for k in trainers}       # during warmup, measured steps
        for i in range(warmup + steps):
            # which trainer goes first alternates too, so that what one step leaves behind
            # (caches, allocator, frequency) favours neither
            for label, tr in (list(trainers.items()) if i % 2 == 0 else
                              list(trainers.items())[::-1]):
                compiled = label.endswith("+compile")
                # the op calls of one step of each uncompiled trainer are counted; a compiled
                # graph is left with the function it was traced with (its guards check it)
                current[0] = label if i == warmup else None
                _backend.select_backend = real_select if compiled else counting_select
                _sync(dev)
                g0 = graphs()
                t0, c0 = time.perf_counter(), time.process_time()
                tr.train_step(batches[label])
                _sync(dev)
                dt = time.perf_counter() - t0
                _backend.select_backend = real_select
                compiled_graphs[label][i >= warmup] += graphs() - g0
                if i >= warmup:
                    times[label].append(dt)
                    cpu[label].append(time.process_time() - c0)
                else:
                    warm[label].append(dt)
        _backend.select_backend = real_select
        out = {"bench": "train_backends", "model": name, "preset": preset,
               "overrides": list(overrides or []), "device": str(dev),
               # PYFACE_BACKEND as the command found it: not applied here ("fused" is each
               # op's default choice, "reference" train.backend=reference)
               "pyface_backend_env": env_backend,
               # what each op's default choice runs on this device (the fused trainer's)
               "default_backends": default_backends(sorted(_backend.registered_ops()), dev),
               # earlier stages trained here (model.<key>), for this many steps unless the
               # overrides' stages.<name>.train.steps say otherwise
               "stages_trained": sorted(filled), "stage_steps": stage_steps if filled else None,
               "batch_size": trainers["fused"].cfg.train.batch_size, "warmup": warmup,
               "threads": torch.get_num_threads(),
               # the compiled rows' train.compile (None: left out) and what it means
               "compile": None if options is None else {
                   "mode": trainers["fused+compile"].cfg.train.compile,
                   "backend": options.backend, "inductor_mode": options.mode,
                   "dynamic": options.dynamic, "fullgraph": options.fullgraph,
                   "torch": torch.__version__,
                   "modules": trainers["fused+compile"].compiled},
               "order": "one process, the same config, batch and thread count for every row; "
                        "the trainers alternate step by step, in the order of results on even "
                        "steps and the reverse on odd ones (steps counted from 0, warmup "
                        "included), the warmup steps of each unmeasured (the compiled rows "
                        "compile in them); then one more step of each (in the order of "
                        "results) under the memory profiler",
               "results": {}}
        for label, tr in trainers.items():
            compiled = label.endswith("+compile")
            if compiled:
                # the graphs were traced with the ops as they are: the per-op memory ranges
                # (which wrap the ops) would make them recompile, and inside a compiled graph
                # the ops' boundaries are gone
                with tr._backend():
                    mem, ops_mem = peak_memory_mb(lambda: tr.train_step(batches[label]),
                                                  dev), None
            else:
                with tr._backend():     # the backend the trainer's steps run on, for the ops
                    mem, ops_mem = step_memory_mb(lambda: tr.train_step(batches[label]), dev)
            row = {**_stats(times[label]),
                   "cpu_median_s": statistics.median(cpu[label]),
                   # every measured step, in order (phases differ by step)
                   "times_s": times[label], "cpu_times_s": cpu[label],
                   "warmup_times_s": warm[label],
                   "peak_mem_mb": mem, "ops_peak_mem_mb": ops_mem,
                   "ops": None if compiled else counts.get(label, {}),
                   "compile": tr.cfg.train.compile,
                   "graphs_compiled": {"warmup": compiled_graphs[label][0],
                                       "measured": compiled_graphs[label][1]},
                   **run_settings(tr)}
            if compiled:
                # the first steps' time above as many steady-state steps: compilation
                row["compile_s"] = max(sum(warm[label]) - len(warm[label]) * row["median_s"],
                                       0.0)
            out["results"][label] = row
        f, r = out["results"]["fused"], out["results"]["reference"]
        out["speedup"] = r["median_s"] / f["median_s"]
        # process CPU time: what the step costs when other jobs share the cores
        out["speedup_cpu"] = r["cpu_median_s"] / max(f["cpu_median_s"], 1e-9)
        out["memory_ratio"] = r["peak_mem_mb"] / max(f["peak_mem_mb"], 1e-9)
        out["ops_memory_ratio"] = (None if f["ops_peak_mem_mb"] is None
                                   or r["ops_peak_mem_mb"] is None else
                                   r["ops_peak_mem_mb"] / max(f["ops_peak_mem_mb"], 1e-9))
        # every row against the fused one: > 1 is slower / more memory than fused
        out["vs_fused"] = {k: {"time": x["median_s"] / f["median_s"],
                               "cpu_time": x["cpu_median_s"] / max(f["cpu_median_s"], 1e-9),
                               "memory": x["peak_mem_mb"] / max(f["peak_mem_mb"], 1e-9)}
                           for k, x in out["results"].items() if k != "fused"}
        out["note"] = ("peak_mem_mb: peak of one training step above the memory allocated "
                       "before it (weights, optimizer state); ops_peak_mem_mb: the largest peak "
                       "inside one call of a pyface op (pyface.ops.<name>, the reference code "
                       "or a fused kernel) above what was allocated when it was called (None "
                       "for the compiled rows: inside a compiled graph the ops' boundaries are "
                       "gone); CPU: ATen allocations on the calling thread (profiler); ops: "
                       "the backends one step's op calls chose (None for the compiled rows: "
                       "chosen while tracing, as their uncompiled row's)")
        if f["ops_peak_mem_mb"] is not None and \
                abs(r["peak_mem_mb"] - f["peak_mem_mb"]) <= 0.01 * max(r["peak_mem_mb"], 1e-9):
            out["memory_note"] = ("the step's peak is the same on both: it is reached outside "
                                  "the ops (e.g. a network trained after a rendering without "
                                  "gradients), whose own memory ops_peak_mem_mb compares")
        return out
    finally:
        _backend.select_backend = real_select
        if env_backend is not None:
            os.environ["PYFACE_BACKEND"] = env_backend
        shutil.rmtree(tmp, ignore_errors=True)


def overlap_bench(steps: int = 20, warmup: int = 3, width: int = 1024, depth: int = 4,
                  batch: int = 64, bucket_mb: float = 4.0) -> dict:
    """Overlapped vs flat gradient all-reduce (see module doc); run under torchrun."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from pyface.train import Phase, Trainer, TrainableModel
    from pyface.train.config import ExperimentConfig, TrainConfig

    class MLP(TrainableModel):
        def __init__(self):
            super().__init__()
            layers = []
            for _ in range(depth):
                layers += [nn.Linear(width, width), nn.GELU()]
            self.net = nn.Sequential(*layers)

        def build_optimizers(self):
            return {"main": torch.optim.SGD(self.parameters(), lr=1e-4)}

        def phases(self):
            return [Phase("main", "main")]

        def step(self, phase, b, ctx):
            return {"loss": self.net(b["x"]).square().mean()}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 1024

        def __getitem__(self, i):
            return {"x": torch.randn(width, generator=torch.Generator().manual_seed(i))}

    tmp = tempfile.mkdtemp(prefix="pyface-bench-")
    t = TrainConfig(run_dir=tmp, batch_size=batch, device="cpu", progress=False,
                    tensorboard=False, image_every=0, ckpt_every=0, bucket_mb=bucket_mb)
    torch.manual_seed(0)
    tr = Trainer(ExperimentConfig(model="mlp", train=t), model=MLP(), dataset=Data())
    try:
        if not tr.dist.enabled:
            raise RuntimeError("--overlap needs several ranks: torchrun --standalone "
                               "--nproc_per_node=2 -m pyface.bench.train --overlap")
        b = tr.preview_batch(tr.local_batch)
        times: dict[str, list[float]] = {"overlap": [], "flat": []}
        for i in range(warmup + steps):
            for mode in (("overlap", "flat") if i % 2 else ("flat", "overlap")):
                tr.cfg.train.overlap_grad_reduce = mode == "overlap"
                dist.barrier()
                t0 = time.perf_counter()
                tr.train_step(b)
                dt = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)     # the slowest rank's step
                if i >= warmup:
                    times[mode].append(float(dt))
        params = [p for p in tr.model.parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        comm = []
        for i in range(warmup + steps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(flat)
            if i >= warmup:
                comm.append(time.perf_counter() - t0)
        reducer = next(iter(tr._reducers.values()))
        n_params = sum(p.numel() for p in params)
        out = {"bench": "overlap_grad_reduce", "world_size": tr.dist.world_size,
               "backend": dist.get_backend(), "params": n_params, "width": width,
               "depth": depth, "global_batch": batch, "bucket_mb": bucket_mb,
               "buckets": len(reducer.buckets), "threads": torch.get_num_threads(),
               "overlap": _stats(times["overlap"]), "flat": _stats(times["flat"]),
               "allreduce_alone": _stats(comm)}
        out["saved_pct"] = 100 * (1 - out["overlap"]["median_s"] / out["flat"]["median_s"])
        # the two modes alternate step by step: per-pair differences cancel slow load drifts
        pairs = [f - o for f, o in zip(times["flat"], times["overlap"])]
        out["paired_saved_ms"] = 1e3 * statistics.median(pairs)
        out["paired_saved_p20_p80_ms"] = [1e3 * _q(pairs, .2), 1e3 * _q(pairs, .8)]
        return out
    finally:
        tr.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _print_backends(r: dict) -> None:
    width = max(len(k) for k in r["results"])
    for label, x in r["results"].items():
        ops = ("inside the compiled graphs, as the " + label.split("+")[0] + " row's"
               if x.get("ops") is None else
               ", ".join(f"{op}: {'/'.join(sorted(b))}" for op, b in sorted(x["ops"].items()))
               or "none")
        print(f"{r['model']} {label:{width}s} step {x['median_s'] * 1e3:8.1f} ms "
              f"[{x['p20_p80_s'][0] * 1e3:.1f}, {x['p20_p80_s'][1] * 1e3:.1f}] "
              f"(CPU {x.get('cpu_median_s', float('nan')) * 1e3:.1f} ms)  peak "
              f"{x['peak_mem_mb']:8.1f} MB"
              + (f" (in ops {x['ops_peak_mem_mb']:.1f} MB)"
                 if x.get("ops_peak_mem_mb") is not None else "")
              + f"  ops: {ops}")
    for label, x in r["results"].items():
        if "compile_s" in x:
            g = x["graphs_compiled"]
            print(f"  {label}: compiling took about {x['compile_s']:.1f} s (the "
                  f"{len(x['warmup_times_s'])} warmup steps: "
                  + ", ".join(f"{t:.1f}" for t in x["warmup_times_s"])
                  + f" s; {g['warmup']} graphs), not in its median"
                  + (f"; {g['measured']} more graphs compiled during the measured steps"
                     if g["measured"] else ""))
    ops_ratio = r.get("ops_memory_ratio")
    print(f"reference / fused: time x{r['speedup']:.2f} (process CPU time "
          f"x{r.get('speedup_cpu', float('nan')):.2f}), peak memory x{r['memory_ratio']:.2f}"
          + (f", inside the ops x{ops_ratio:.2f}" if ops_ratio is not None else ""))
    for label, v in r.get("vs_fused", {}).items():
        if label != "reference":
            print(f"{label} / fused: time x{v['time']:.2f} (process CPU time "
                  f"x{v['cpu_time']:.2f}), peak memory x{v['memory']:.2f}")
    if r.get("memory_note"):
        print(f"  ({r['memory_note']})")
    x = r["results"]["fused"]
    c = r.get("compile")
    print(f"precision {x.get('precision')} (autocast {x.get('autocast_dtype') or 'off'}, "
          f"parameters {x.get('param_dtype')}); PYFACE_BACKEND "
          f"{r.get('pyface_backend_env') or 'unset'} (not applied: fused = each op's default)"
          + (f"; train.compile={c['mode']} ({c['backend']}"
             + (f", mode {c['inductor_mode']}" if c["inductor_mode"] else "")
             + f"; torch {c['torch']}) of {', '.join(m or '(the model)' for m in c['modules'])}"
             if c else ""))


def main(argv=None) -> int:
    global _COMMAND
    _COMMAND = shlex.join(["python", "-m", "pyface.bench.train",
                           *(sys.argv[1:] if argv is None else argv)])
    try:
        return _main(argv)
    except KeyboardInterrupt:       # the JSON is written only once everything has run
        print("\npython -m pyface.bench.train: interrupted; no JSON written", file=sys.stderr)
        return 130


def _main(argv=None) -> int:
    from pyface.nn.compiling import COMPILE_CHOICES

    p = argparse.ArgumentParser(prog="python -m pyface.bench.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="a registered model: fused vs reference ops (default: engine overhead "
                        "and checkpoint benchmarks)")
    p.add_argument("--preset", default=None, help="with MODEL: one of the model's presets")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="with MODEL: import MODULE first (a plugin that registers MODEL with "
                        "pyface.train.register_model; repeatable; also PYFACE_PLUGINS=M1,M2)")
    p.add_argument("--device", default=None, help="with MODEL: cpu or cuda (default: cuda if "
                                                  "available)")
    p.add_argument("--overlap", action="store_true",
                   help="under torchrun: overlapped vs flat gradient all-reduce")
    p.add_argument("--bucket-mb", type=float, default=None, help="with --overlap: bucket size in MB (default 4)")
    p.add_argument("--steps", type=int, default=None,
                   help="measured steps, >= 1 (default: 40; MODEL: 10; --overlap: 20)")
    p.add_argument("--warmup", type=int, default=None, help="with MODEL: unmeasured steps first, >= 0 (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="checkpoint save/load repeats, >= 1 (default 5)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override (MODEL, or the example model of the overhead "
                        "benchmark), e.g. train.batch_size=16")
    p.add_argument("--compile", default=None, metavar="MODE", choices=COMPILE_CHOICES,
                   help="with MODEL: add the rows reference+compile (torch.compile of the "
                        "reference) and fused+compile, with train.compile=MODE (one of "
                        f"{', '.join(COMPILE_CHOICES)}; default: default on cuda; on cpu they "
                        "are left out unless --compile is given: compiling takes minutes there)")
    p.add_argument("--no-compile", action="store_true",
                   help="with MODEL: leave out the torch.compile rows")
    p.add_argument("--json", default=None,
                   help="write the results here: a file ending in .json, or a folder (existing "
                        "or ending in /) for an auto-named file (MODEL / --overlap: default "
                        "bench/results/)")
    args = p.parse_args(argv)
    global _JSON
    _JSON = args.json
    import datetime

    from pyface.bench.harness import JsonPathError, environment, resolve_json_path

    import torch

    def fail(msg: str) -> int:
        print(f"{p.prog}: {msg}", file=sys.stderr)
        return 2

    for opt, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                              ("--repeats", args.repeats, 1)):
        if value is not None and value < least:
            return fail(f"{opt}: expected an integer >= {least}, got {value}")
    if args.bucket_mb is not None and not args.bucket_mb > 0:
        return fail(f"--bucket-mb: expected a positive number, got {args.bucket_mb}")
    # an option the chosen benchmark does not use was ignored (--device cuda measured the CPU)
    mode = "--overlap" if args.overlap else "MODEL" if args.model else None
    used = {"--overlap": {"--bucket-mb"},
            "MODEL": {"--preset", "--import", "--device", "--warmup", "--set", "--compile",
                      "--no-compile"},
            None: {"--repeats", "--set"}}[mode]
    given = {"MODEL": args.overlap and args.model, "--preset": args.preset,
             "--import": args.imports, "--device": args.device,
             "--warmup": args.warmup is not None, "--set": args.overrides,
             "--bucket-mb": args.bucket_mb is not None, "--repeats": args.repeats is not None,
             "--compile": args.compile is not None, "--no-compile": args.no_compile}
    unused = [o for o, v in given.items() if v and o not in used]
    if unused:
        what = {"--overlap": "--overlap (the all-reduce benchmark)",
                "MODEL": f"MODEL ({args.model}: fused vs reference ops)",
                None: "the engine-overhead and checkpoint benchmark (no MODEL)"}[mode]
        return fail(f"{', '.join(unused)}: not used by {what}; it takes "
                    f"{', '.join(sorted(used)) or 'none of them'} (and --steps, --json)")
    if not args.overlap:        # one process: under torchrun every rank would train and write
        from pyface.train.distributed import refuse_under_torchrun

        refused = refuse_under_torchrun(
            p.prog + (" MODEL" if args.model else ""),
            "run the same command without torchrun (--overlap is the benchmark that runs under "
            "torchrun)")
        if refused is not None:
            return refused
    if args.compile is not None and args.no_compile:
        return fail("--compile and --no-compile: give one of them")
    set_compile = [o for o in args.overrides if o.split("=", 1)[0].strip() == "train.compile"]
    if set_compile:
        return fail(f"--set {set_compile[0]}: each row sets train.compile itself (fused and "
                    "reference uncompiled, the +compile rows compiled); choose the compiled "
                    "rows' mode with --compile MODE")
    if args.compile is not None and args.warmup == 0:
        return fail("--warmup 0: the torch.compile rows compile in their first step, which "
                    "would be measured; give --warmup 1 or more, or --no-compile")
    args.warmup = 2 if args.warmup is None else args.warmup
    args.repeats = 5 if args.repeats is None else args.repeats
    args.bucket_mb = 4.0 if args.bucket_mb is None else args.bucket_mb
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()

    def json_path(default_name: str | None) -> str | None:
        """--json (a .json file or a folder for ``default_name``), else bench/results/ when
        ``default_name`` is given; checked before anything runs."""
        if args.json is None and default_name is None:
            return None
        return resolve_json_path(args.json or os.path.join("bench", "results", ""),
                                 default_name or "train.json", "--json")

    from pyface.cli import parse_only

    if parse_only() and not args.model:
        print(f"{p.prog}: arguments parsed (PYFACE_PARSE_ONLY=1: nothing measured)",
              file=sys.stderr)
        return 0
    if args.overlap:
        if int(os.environ.get("WORLD_SIZE", "1") or 1) < 2:
            return fail("--overlap needs several ranks: torchrun --standalone "
                        "--nproc_per_node=2 -m pyface.bench.train --overlap")
        try:
            path = json_path(f"train-overlap-{os.environ.get('WORLD_SIZE', '1')}ranks-"
                             f"{today}.json") if int(os.environ.get("RANK", "0")) == 0 else None
        except JsonPathError as exc:
            return fail(str(exc))
        r = overlap_bench(args.steps or 20, bucket_mb=args.bucket_mb)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
        env = environment(torch.device("cpu"))
        print(f"# {env.get('cpu')}  torch {env.get('torch')}  {r['world_size']} ranks "
              f"({r['backend']}), {r['threads']} threads each")
        print(f"MLP {r['params'] / 1e6:.2f}M params, global batch {r['global_batch']}, "
              f"{r['buckets']} buckets of <= {r['bucket_mb']} MiB")
        for k in ("flat", "overlap", "allreduce_alone"):
            x = r[k]
            print(f"{k:16s} {x['median_s'] * 1e3:8.1f} ms [{x['p20_p80_s'][0] * 1e3:.1f}, "
                  f"{x['p20_p80_s'][1] * 1e3:.1f}]")
        print(f"overlap saves {r['saved_pct']:.1f}% of the median step; paired: "
              f"{r['paired_saved_ms']:.1f} ms [{r['paired_saved_p20_p80_ms'][0]:.1f}, "
              f"{r['paired_saved_p20_p80_ms'][1]:.1f}] per step")
        _write(path, {"environment": env, "results": [r]})
        return 0
    if args.model:
        from pyface.train.cli import resolve_device
        from pyface.train.config import ConfigError, build_experiment
        from pyface.train.model import ModelDefinitionError
        from pyface.train.registry import RegistryError, import_plugins, model_class
        from pyface.train.stages import check_stage_overrides, own_overrides

        check = parse_only()            # the command line checked, nothing measured
        try:
            import_plugins(args.imports)
            cls = model_class(args.model)
            if check:                   # a device this machine may lack
                from pyface.train.cli import check_device

                device = str(check_device(args.device) or "cuda")
            else:
                device = resolve_device(args.device)
            # stages.<name>.<key>=...: a stage of the model (as pyface train checks)
            check_stage_overrides(args.model, cls, args.overrides)
            # --preset / --set (ConfigError, a ValueError naming the key and the choices)
            build_experiment(args.model, cls.Config,
                             defaults=dict(getattr(cls, "recipe", {}) or {}), preset=args.preset,
                             overrides=own_overrides(list(args.overrides)))
            path = json_path(f"train-{args.model}{'-' + args.preset if args.preset else ''}-"
                             f"{torch.device(device).type}-{today}.json")
        except (KeyError, ImportError, ValueError, ModelDefinitionError, RegistryError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            return fail(msg)
        compile_mode = resolve_compile(torch.device(device).type, args.compile, args.no_compile)
        if check:
            try:
                labels = check_model_backends(args.model, args.overrides, warmup=args.warmup,
                                              device=device, preset=args.preset,
                                              compile=compile_mode)
            except (KeyError, ValueError, ModelDefinitionError) as exc:
                msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                return fail(msg)
            print(f"{p.prog}: arguments checked (PYFACE_PARSE_ONLY=1: nothing measured): rows "
                  f"{', '.join(labels)} on {device}, --json {path}", file=sys.stderr)
            return 0
        if compile_mode is None and not args.no_compile and args.compile is None:
            print(f"# torch.compile rows left out on cpu ({CPU_COMPILE_WHY}); --compile default "
                  "adds them", flush=True)
        try:
            r = model_backends(args.model, args.overrides, steps=args.steps or 10,
                               warmup=args.warmup, device=device, preset=args.preset,
                               compile=compile_mode)
        except ConfigError as exc:          # a value only the built trainer can check
            return fail(str(exc))
        env = environment(torch.device(r["device"]))
        print(f"# {env.get('gpu') or env.get('cpu')}  torch {env.get('torch')}  "
              f"threads {torch.get_num_threads()}")
        _print_backends(r)
        _write(path, {"environment": env, "results": [r]})
        return 0
    try:
        path = json_path(None)
    except JsonPathError as exc:
        return fail(str(exc))
    env = environment(torch.device("cpu"))
    args.steps = args.steps or 40
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
    if path:
        _write(path, {"environment": env, "results": results})
    return 0


#: why the torch.compile rows are left out of a cpu run unless --compile is given
CPU_COMPILE_WHY = "compiling a model's step takes minutes there"


def resolve_compile(device_type: str, mode: str | None, no_compile: bool) -> str | None:
    """The compiled rows' ``train.compile`` of ``python -m pyface.bench.train MODEL``: None
    (left out) with ``no_compile`` or ``mode`` ``off``; ``mode`` when given; else ``default``
    on cuda and None (left out) on cpu, as ``pyface bench`` leaves torch.compile out there."""
    if no_compile or mode == "off":
        return None
    if mode is not None:
        return mode
    return "default" if device_type == "cuda" else None


_COMMAND: str | None = None     # the command line of this run, recorded in the JSON
_JSON: str | None = None        # its --json


def _write(path: str, data: dict) -> None:
    from pyface.bench.harness import write_json

    auto = _JSON is None or os.path.isdir(_JSON)     # a folder: the file is auto-named
    replaced = not auto and os.path.exists(path)
    path = write_json(path, {"command": _COMMAND, **data}, keep_existing=auto)
    print(f"wrote {path}" + (" (replacing the file that was there)" if replaced else ""))


if __name__ == "__main__":
    raise SystemExit(main())
