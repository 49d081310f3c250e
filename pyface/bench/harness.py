"""Timing and memory measurement shared by ``pyface bench`` and the pytest-benchmark suite."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import torch


@dataclasses.dataclass
class BenchCase:
    """One op at one shape.

    Attributes:
        op: op name (``triplane_sample``).
        shape: short name of the shape (``"eg3d"``, ``"small"``).
        params: the shape's parameters, recorded in the results.
        make_inputs: ``(device, seed) -> list of tensors`` (leaves requiring grad where the op
            is differentiable in them).
        providers: provider name -> ``fn(*inputs) -> Tensor | tuple``; ``"reference"`` is the
            baseline, ``"compile"`` is added automatically as torch.compile of the reference.
    """

    op: str
    shape: str
    params: dict
    make_inputs: Callable[[torch.device, int], list[torch.Tensor]]
    providers: dict[str, Callable[..., torch.Tensor | Sequence[torch.Tensor]]]


@dataclasses.dataclass
class Measurement:
    op: str
    shape: str
    provider: str
    mode: str  # "fwd", "bwd" or "fwd+bwd"
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    peak_mem_mb: float | None = None
    # memory of what the call hands back (fwd: the outputs; fwd+bwd: the outputs and the
    # gradients of the inputs), which every implementation must allocate
    result_mem_mb: float | None = None
    error: str | None = None

    @property
    def work_mem_mb(self) -> float | None:
        """Working memory: the peak above the result (intermediates, saved tensors, scratch)."""
        if self.peak_mem_mb is None or self.result_mem_mb is None:
            return None
        return max(0.0, self.peak_mem_mb - self.result_mem_mb)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "work_mem_mb": self.work_mem_mb}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _storage_mb(tensors: Sequence[torch.Tensor]) -> float:
    """Memory held by ``tensors``, each storage counted once, in MB."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values()) / 2**20


def _tensors(out) -> list[torch.Tensor]:
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]


def _time(fn: Callable[[], None], device: torch.device, setup: Callable[[], object] | None,
          min_time: float, max_reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        state = setup() if setup else None
        fn(state) if setup else fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_time or len(times) < 3):
        state = setup() if setup else None
        _sync(device)
        t0 = time.perf_counter()
        fn(state) if setup else fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


@contextlib.contextmanager
def _quiet_stderr():
    """Silences the profiler's start/stop lines, which its C++ side prints to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_mb(fn: Callable[[], None], device: torch.device) -> float:
    """Peak memory allocated by ``fn`` above what was allocated before it, in MB.

    CUDA: the caching allocator's peak. CPU: the running sum of the allocator events recorded by
    the profiler: every ATen allocation made on the calling thread, including those inside C++
    kernels. The profiler records memory events per thread, so allocations made inside a
    parallel region's worker threads would escape it; pyface's CPU kernels allocate all their
    workspace on the calling thread for this reason.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


@contextlib.contextmanager
def _timed_public_ops(on_enter: Callable[[str], None], on_exit: Callable[[str], None]):
    """Every public op of the op table (``pyface.ops.<name>``), wherever a pyface module holds
    it, calls ``on_enter(name)`` / ``on_exit(name)`` around its outermost calls (an op that
    calls another, ``render_triplane`` -> ``triplane_sample``, is one range); restored
    afterwards."""
    import functools
    import importlib

    from pyface import _opspecs

    funcs = {}
    for spec in _opspecs.OPS.values():
        fn = getattr(importlib.import_module(f"pyface.ops.{spec.family}"), spec.name, None)
        if callable(fn):
            funcs[id(fn)] = (spec.name, fn)
    depth = [0]

    def wrap(name, fn):
        @functools.wraps(fn)
        def timed(*a, **k):
            depth[0] += 1
            if depth[0] == 1:
                on_enter(name)
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    on_exit(name)
        return timed

    wrappers = {key: wrap(name, fn) for key, (name, fn) in funcs.items()}
    patched = []
    for mod in list(sys.modules.values()):
        if not getattr(mod, "__name__", "").startswith("pyface"):
            continue
        for attr, value in list(vars(mod).items()):
            if id(value) in wrappers and value is funcs[id(value)][1]:
                setattr(mod, attr, wrappers[id(value)])
                patched.append((mod, attr, value))
    try:
        yield
    finally:
        for mod, attr, value in patched:
            setattr(mod, attr, value)


def step_memory_mb(fn: Callable[[], None], device: torch.device) -> tuple[float, float | None]:
    """``(peak, ops_peak)`` in MB of one call of ``fn``: ``peak`` as :func:`peak_memory_mb`
    (everything ``fn`` allocates above what was allocated before it); ``ops_peak``: the largest
    peak inside one outermost call of a public op (``pyface.ops.<name>``, any backend: the
    reference PyTorch code and the fused kernels alike) above what was allocated when that
    call began, None when ``fn`` calls none. A step whose peak is reached outside the ops (a
    network trained after a rendering without gradients) has the same ``peak`` on every
    backend; ``ops_peak`` is the ops' own working memory."""
    ranges: list[list] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        overall = [base]

        def enter(name):
            torch.cuda.synchronize(device)
            overall[0] = max(overall[0], torch.cuda.max_memory_allocated(device))
            ranges.append([name, torch.cuda.memory_allocated(device)])
            torch.cuda.reset_peak_memory_stats(device)

        def leave(name):
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            overall[0] = max(overall[0], peak)
            ranges[-1].append(peak - ranges[-1][1])

        with _timed_public_ops(enter, leave):
            fn()
        torch.cuda.synchronize(device)
        overall[0] = max(overall[0], torch.cuda.max_memory_allocated(device))
        ops = [r[2] for r in ranges if len(r) == 3]
        return (overall[0] - base) / 2**20, (max(ops) / 2**20 if ops else None)
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    open_ranges: list = []

    def enter(name):
        rf = record_function(f"pyface.bench.op:{name}")
        rf.__enter__()
        open_ranges.append(rf)

    def leave(name):
        open_ranges.pop().__exit__(None, None, None)

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with _timed_public_ops(enter, leave):
            fn()
    events = prof.profiler.kineto_results.events()
    memory = sorted(((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"))
    spans = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
             if e.name().startswith("pyface.bench.op:")]
    import bisect

    times, levels, cur = [], [], 0
    for t, n in memory:
        cur += n
        times.append(t)
        levels.append(cur)
    peak = max(levels, default=0)
    ops_peak = None
    for a, b in spans:
        i, j = bisect.bisect_left(times, a), bisect.bisect_right(times, b)
        start = levels[i - 1] if i else 0           # allocated when the op was called
        top = max(levels[i:j], default=start) - start
        ops_peak = top if ops_peak is None else max(ops_peak, top)
    return max(peak, 0) / 2**20, (None if ops_peak is None else ops_peak / 2**20)


def run_case(case: BenchCase, device: torch.device, *, providers: Sequence[str] | None = None,
             modes: Sequence[str] = ("fwd", "bwd", "fwd+bwd"), min_time: float = 0.5,
             max_reps: int = 200, warmup: int = 2, compile_reference: bool = True,
             seed: int = 0, log: Callable[[str], None] | None = None) -> list[Measurement]:
    """Measures every provider of ``case`` in every mode on ``device``."""
    fns = dict(case.providers)
    if compile_reference and "reference" in fns:
        fns["compile"] = torch.compile(fns["reference"], dynamic=False)
    if providers is not None:
        fns = {k: v for k, v in fns.items() if k in providers}
    results: list[Measurement] = []
    for name, fn in fns.items():
        inputs = case.make_inputs(device, seed)
        leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

        def forward():
            return fn(*inputs)

        try:
            out = forward()  # also compiles the torch.compile provider
            cot = [torch.randn_like(o) for o in _tensors(out)]
            outs = [o for o in ([out] if isinstance(out, torch.Tensor) else list(out))
                    if isinstance(o, torch.Tensor)]
            out_mb = _storage_mb(outs)
            # a gradient is a dense tensor of its input's shape and dtype
            grads_mb = sum(x.numel() * x.element_size() for x in leaves) / 2**20
            del out, outs

            def fwd_bwd():
                outs = _tensors(forward())
                torch.autograd.grad(outs, leaves, cot)

            def fwd_only():
                with torch.no_grad():
                    forward()

            def bwd(state):
                torch.autograd.grad(_tensors(state), leaves, cot)

            for mode in modes:
                if mode == "fwd":
                    times = _time(fwd_only, device, None, min_time, max_reps, warmup)
                    mem = peak_memory_mb(fwd_only, device)
                    result_mb = out_mb
                elif mode == "bwd":
                    if not leaves:
                        continue
                    times = _time(bwd, device, forward, min_time, max_reps, warmup)
                    mem = result_mb = None
                else:
                    if not leaves:
                        continue
                    times = _time(fwd_bwd, device, None, min_time, max_reps, warmup)
                    mem = peak_memory_mb(fwd_bwd, device)
                    result_mb = out_mb + grads_mb
                # inclusive: quantiles between the fastest and slowest rep (the default,
                # exclusive, method extrapolates from few reps, even below zero)
                q = (statistics.quantiles(times, n=5, method="inclusive") if len(times) >= 2
                     else [times[0]] * 4)
                m = Measurement(case.op, case.shape, name, mode, statistics.median(times),
                                q[0], q[3], len(times), mem, result_mb)
                results.append(m)
                if log:
                    log(format_row(m))
        except Exception as exc:  # a provider failing must not hide the others' numbers
            m = Measurement(case.op, case.shape, name, "all", float("nan"), float("nan"),
                            float("nan"), 0, error=f"{type(exc).__name__}: {exc}"[:300])
            results.append(m)
            if log:
                log(format_row(m))
    return results


def format_row(m: Measurement) -> str:
    if m.error:
        return f"{m.op:<22} {m.shape:<8} {m.provider:<10} {m.mode:<8} ERROR {m.error}"
    mem = f"{m.peak_mem_mb:10.1f}" if m.peak_mem_mb is not None else f"{'-':>10}"
    work = m.work_mem_mb
    work = f"{work:8.1f}" if work is not None else f"{'-':>8}"
    return (f"{m.op:<22} {m.shape:<8} {m.provider:<10} {m.mode:<8} {m.median_ms:10.3f} "
            f"[{m.p20_ms:8.3f}, {m.p80_ms:8.3f}] {mem} {work} {m.reps:5d}")


def format_table(results: Sequence[Measurement]) -> str:
    head = (f"{'op':<22} {'shape':<8} {'provider':<10} {'mode':<8} {'median ms':>10} "
            f"{'[p20, p80] ms':>21} {'peak MB':>10} {'work MB':>8} {'reps':>5} {'vs ref':>7}")
    base = {(m.op, m.shape, m.mode): m.median_ms for m in results
            if m.provider == "reference" and not m.error}
    lines = [head, "-" * len(head)]
    for m in results:
        ref = base.get((m.op, m.shape, m.mode))
        speed = f"{ref / m.median_ms:6.2f}x" if ref and not m.error and m.median_ms > 0 else ""
        lines.append(f"{format_row(m)} {speed:>7}")
    return "\n".join(lines)


def _git(*args: str) -> str | None:
    """Output of ``git args`` in the source tree pyface is imported from; None outside one. A
    git repository that merely contains the installed package (a virtualenv inside a project's
    checkout) is not pyface's: its commit would be another project's."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*a: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", root, *a], capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if not top or os.path.realpath(top) != os.path.realpath(root):
        return None
    return git(*args)


def _git_commit() -> str | None:
    return _git("rev-parse", "--short", "HEAD") or None


def _git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (None: not a git checkout)."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out)


def default_backends(ops, device: torch.device) -> dict[str, str | None]:
    """The backend each op's default choice runs on ``device`` (what a model calling the op
    gets; None for a bench op that is not a registered op or cannot run there)."""
    from pyface import _backend

    chosen: dict[str, str | None] = {}
    for op in ops:
        try:
            chosen[op] = _backend.select_backend(op, device, None)
        except Exception:   # not a registered op, or no backend on this device
            chosen[op] = None
    return chosen


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict:
    """Device and version metadata recorded with every result."""
    from pyface import __version__, _backend

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pyface": __version__,
        "commit": _git_commit(),
        # tracked files differing from the commit: the numbers may not be the commit's
        "commit_dirty": _git_dirty(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _backend.triton_version(),
        "device_type": device.type,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "build": _backend.build_config(),
        # forces every op's backend where the command applies it (None: unset)
        "PYFACE_BACKEND": os.environ.get("PYFACE_BACKEND"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return env


class JsonPathError(ValueError):
    """A ``--json`` destination that cannot take the results; the message names the option."""


def resolve_json_path(path: str, default_name: str, option: str = "--json") -> str:
    """Where results given as ``option PATH`` go, checked before anything is measured.

    ``PATH`` is a file ending in ``.json`` (its folder is created; an existing file is replaced,
    as asked), or a folder (an existing one, or one written with a trailing ``/``, created) that
    gets ``default_name`` inside it, with ``-2``, ``-3``, ... before ``.json`` when a file of
    that name is already there, so that a second run does not overwrite the first. Any
    other path, or a folder that cannot be created or written, raises :class:`JsonPathError`
    naming the option, what it expects and the path given.
    """
    is_dir = os.path.isdir(path) or path.endswith(("/", os.sep))
    if not is_dir and not path.endswith(".json"):
        raise JsonPathError(f"{option}: expected a file ending in .json or a folder (an existing "
                            f"one, or ending in /), got {path!r}")
    folder = path if is_dir else (os.path.dirname(path) or ".")
    target = os.path.join(path, default_name) if is_dir else path
    from pyface.cli import file_in_the_way

    blocking = file_in_the_way(target)
    if blocking is not None:        # os.makedirs would say "File exists"
        raise JsonPathError(f"{option} {path}: cannot create its folder: {blocking} is a file")
    if is_dir:      # an auto-named file never replaces an earlier run's: -2, -3, ... appended
        stem, ext = os.path.splitext(target)
        n = 2
        while os.path.lexists(target):
            target, n = f"{stem}-{n}{ext}", n + 1
    try:
        os.makedirs(folder, exist_ok=True)
        if os.path.isdir(target):
            raise JsonPathError(f"{option}: {target!r} is a folder, expected a file to write")
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".pyface-", suffix=".tmp"):
            pass
    except OSError as exc:
        raise JsonPathError(f"{option}: cannot write to {folder!r}: "
                            f"{exc.strerror or exc}") from None
    return target


def _finite(x):
    """``x`` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: str, data: dict, *, keep_existing: bool = False) -> str:
    """Writes ``data`` to ``path`` whole or not at all: a temporary file in the same folder,
    renamed over ``path`` once complete, so an interrupted write leaves no half-written file.
    NaN and infinite numbers (a failed provider's times) are written as null: strict JSON.

    ``keep_existing`` (an auto-named file): a file that appeared at ``path`` since it was
    chosen (another run, finished first) is kept and ``-2``, ``-3``, ... is appended instead.
    Returns the path written."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(_finite(data), f, indent=2, allow_nan=False)
        if not keep_existing:
            os.replace(tmp, path)
            return path
        stem, ext = os.path.splitext(path)
        target, n = path, 2
        while True:
            try:
                os.link(tmp, target)        # fails if target exists: no run replaces another
                break
            except FileExistsError:
                target, n = f"{stem}-{n}{ext}", n + 1
            except OSError:                 # no hard links on this file system
                while os.path.lexists(target):
                    target, n = f"{stem}-{n}{ext}", n + 1
                os.replace(tmp, target)
                return target
        os.unlink(tmp)
        return target
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
