"""``python -m pyface.info`` / ``pyface info``: versions, what was built, and for every op which
backend runs on CPU and CUDA tensors, why (the default table in ``pyface._opspecs``), why the
others are unavailable, and the op's measured number from the newest bench JSON.

Exits with status 1 when the build recorded in ``pyface/_build_config.json`` is missing or does
not load (so a broken install fails loudly in CI), or when ``PYFACE_BACKEND`` names no backend."""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import sys


def bench_results_dir() -> str:
    """Where the bench JSON lives: ``$PYFACE_BENCH_RESULTS`` or the checkout's bench/results."""
    return os.environ.get("PYFACE_BENCH_RESULTS") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")


def measured(results_dir: str | None = None) -> dict[str, dict]:
    """Per op, the row named by its spec's ``bench`` (shape, provider), forward median, from the
    newest JSON file (by its recorded date) in ``results_dir`` (not its sub-folders) that has it.
    -> {op: {"ms", "shape", "provider", "file", "date"}}; ops without such a row are absent."""
    from pyface._opspecs import OPS

    results_dir = results_dir or bench_results_dir()
    found: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            with open(path) as f:
                data = json.load(f)
            date = data["environment"]["date"]
            rows = data["results"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        for name, spec in OPS.items():
            if spec.bench is None:
                continue
            shape, provider = spec.bench
            for row in rows:
                if (isinstance(row, dict) and row.get("op") == name
                        and row.get("shape") == shape and row.get("provider") == provider
                        and row.get("mode") == "fwd" and row.get("error") is None
                        and row.get("median_ms") is not None):
                    if name not in found or date > found[name]["date"]:
                        found[name] = {"ms": float(row["median_ms"]), "shape": shape,
                                       "provider": provider, "file": os.path.basename(path),
                                       "date": date}
    return found


def format_ms(ms: float) -> str:
    """As the docs quote it: whole milliseconds from 100 ms, else three significant digits
    (11854, 518, 10.9, 4.71)."""
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def collect() -> dict:
    import torch

    from pyface import __version__, _backend

    numbers = measured()
    ops = {}
    for name, spec in sorted(_backend.registered_ops().items()):
        entry = {"backends": {}, "default": {}, "why": {}, "note": spec.note,
                 "atomic_backward": list(spec.atomic_backward),
                 "measured": numbers.get(name)}
        for device in ("cpu", "cuda"):
            statuses = {}
            for b in spec.backends:
                ok, reason = _backend.backend_status(spec, b, device)
                statuses[b] = {"available": ok, "reason": reason}
            entry["backends"][device] = statuses
            default = _backend.default_order(name, device)
            entry["default"][device] = next(
                (b for b in default.order if statuses.get(b, {}).get("available")), "reference")
            entry["why"][device] = {"order": list(default.order), "why": default.why}
            # the backends before the chosen one in the order: why each was passed over
            chosen = entry["default"][device]
            skipped = list(default.order[:default.order.index(chosen)]) \
                if chosen in default.order else list(default.order)
            entry.setdefault("fallback", {})[device] = {
                b: statuses.get(b, {}).get("reason", "not a backend of this op") for b in skipped}
        ops[name] = entry
    module = _backend.extension()
    cuda = None
    if torch.cuda.is_available():
        cuda = {"device": torch.cuda.get_device_name(),
                "capability": ".".join(map(str, torch.cuda.get_device_capability()))}
    info = {
        "pyface": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": cuda,
        "triton": _backend.triton_version(),
        "triton_interpret": _backend.triton_interpret(),
        "extension": {"loaded": module is not None,
                      "reason": _backend.extension_reason(),
                      "file": getattr(module, "__file__", None) if module is not None else None,
                      "package": os.path.dirname(os.path.abspath(__file__)),
                      "build": _backend.build_config()},
        "bench_results": bench_results_dir(),
        "ops": ops,
        "forced_backend": os.environ.get("PYFACE_BACKEND") or None,
        "compile": compile_toolchain(),
    }
    info["forced_backend_error"] = forced_backend_problem(info)
    return info


def compile_toolchain(env: dict | None = None) -> dict:
    """What ``torch.compile`` (``--compile``, ``train.compile``) would compile with: on CPU
    Inductor writes C++ and needs a compiler (``CXX``, else ``g++`` / ``clang++`` / ``c++`` on
    PATH); on CUDA it writes Triton kernels. Looks on PATH only; compiles nothing."""
    env = os.environ if env is None else env
    names = [env["CXX"]] if env.get("CXX") else ["g++", "clang++", "c++"]
    found = next(((n, shutil.which(n, path=env.get("PATH"))) for n in names
                  if shutil.which(n, path=env.get("PATH"))), None)
    return {"cpu_cxx": found[1] if found else None,
            "cpu_cxx_looked_for": ("CXX=" + names[0]) if env.get("CXX") else ", ".join(names)}


def build_problem(info: dict) -> str | None:
    """Why the recorded build is unusable (missing _build_config.json, or pyface._C does not
    load), or None when it is fine."""
    ext = info["extension"]
    if ext["build"] is None:
        return ("pyface/_build_config.json is missing: the extension was never built; build it "
                "with `pip install -e . --no-build-isolation`")
    if not ext["loaded"]:
        return f"the recorded build does not load: {ext['reason']}"
    return None


def foreign_extension(info: dict) -> str | None:
    """Why the loaded ``pyface._C`` may not be this package's (it was found outside this pyface's
    folder, e.g. through another checkout's editable install), or None."""
    ext = info["extension"]
    path, package = ext.get("file"), ext.get("package")
    if not path or not package:
        return None
    if os.path.dirname(os.path.abspath(path)) == os.path.abspath(package):
        return None
    return (f"pyface._C was loaded from {path}, outside this pyface ({package}): another "
            "checkout's build (an editable install?), whose kernels may not match this source; "
            "build this one with `pip install -e . --no-build-isolation`")


def forced_backend_problem(info: dict) -> str | None:
    """Why ``PYFACE_BACKEND`` cannot be used (a value that is no backend: every op called without
    ``backend=`` raises), or None when it is unset or valid."""
    from pyface._backend import BACKENDS

    forced = info.get("forced_backend")
    if forced is None or forced in BACKENDS:
        return None
    return (f"PYFACE_BACKEND: expected one of {', '.join(BACKENDS)} (or unset), got {forced!r}; "
            "every op called without backend= raises ValueError until it is fixed")


def format_report(info: dict) -> str:
    gpu = info["cuda_device"]
    lines = [f"pyface {info['pyface']}  (python {info['python']}, {info['platform']})",
             f"torch {info['torch']}  CUDA runtime: {info['torch_cuda'] or 'none (CPU build)'}",
             "GPU: " + (f"{gpu['device']} sm_{gpu['capability'].replace('.', '')}" if gpu
                        else "none visible"),
             f"triton: {info['triton'] or 'not installed'}"
             + ("  (TRITON_INTERPRET=1: kernels run in the CPU interpreter)"
                if info["triton_interpret"] else ""),
             ""]
    ext = info["extension"]
    build = ext["build"] or {}
    lines.append(f"extension pyface._C: {'loaded' if ext['loaded'] else 'NOT LOADED'}"
                 + (f" from {ext['file']}" if ext.get("file") else "")
                 + ("" if ext["loaded"] else f" - {ext['reason']}"))
    if foreign_extension(info):
        lines.append(f"  WARNING: {foreign_extension(info)}")
    if build:
        lines.append(f"  built {build.get('built_at')} against torch {build.get('torch')}, "
                     f"backends: {', '.join(build.get('backends', []))}")
        if build.get("with_cuda"):
            lines.append(f"  CUDA kernels: yes, archs {build.get('cuda_archs')}")
        else:
            lines.append(f"  CUDA kernels: NO - {build.get('cuda_reason')}")
    tc = info.get("compile")
    if tc is not None:
        lines.append("torch.compile (--compile, train.compile; off unless asked): CPU: "
                     + (f"Inductor's C++ compiler {tc['cpu_cxx']}" if tc["cpu_cxx"] else
                        f"NO C++ compiler ({tc['cpu_cxx_looked_for']} not found): only the "
                        "aot_eager / eager modes work on CPU; install g++ or set CXX")
                     + "; CUDA: Inductor writes Triton kernels"
                     + ("" if info["triton"] else " (triton not installed: no Inductor on CUDA)"))
    if info.get("forced_backend") and not forced_backend_problem(info):
        lines.append(f"PYFACE_BACKEND={info['forced_backend']}: every op called without "
                     "backend= is forced onto it (the defaults below do not apply)")
    lines += ["", "Default backends (pyface/_opspecs.py): a compiled backend is a default on a "
              "device only after its tests passed there.",
              f"Measured: forward median of the op's compiled CPU path, newest JSON in "
              f"{info['bench_results']}.", ""]
    for name, op in info["ops"].items():
        lines.append(f"{name}:")
        for device in ("cpu", "cuda"):
            why = op["why"][device]
            passed = op.get("fallback", {}).get(device) or {}
            lines.append(f"  {device:<5} -> {op['default'][device]}   "
                         + (f"(FALLBACK: {', '.join(passed)} unavailable, see below; "
                            if passed else "(") + f"order {', '.join(why['order'])}: "
                         f"{why['why']})")
            for b, st in op["backends"][device].items():
                mark = "ok " if st["available"] else "-- "
                lines.append(f"      {mark}{b:<10} {st['reason']}")
        m = op["measured"]
        if m:
            lines.append(f"  measured: {format_ms(m['ms'])} ms ({m['provider']}, shape "
                         f"{m['shape']}, fwd; {m['file']})")
        if op["atomic_backward"]:
            lines.append(f"  backward uses atomics on: {', '.join(op['atomic_backward'])} "
                         "(skipped by default under torch.use_deterministic_algorithms)")
        if op["note"]:
            lines.append(f"  note: {op['note']}")
    for problem in (build_problem(info), forced_backend_problem(info)):
        if problem:
            lines += ["", f"ERROR: {problem}"]
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions, built backends and per-op backend choice",
                              description=__doc__)
    p.add_argument("--json", action="store_true", help="print JSON instead of a report")
    p.set_defaults(func=run)


def run(args) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 1 if build_problem(info) or forced_backend_problem(info) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyface.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a report")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
