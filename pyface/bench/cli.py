"""``pyface bench``: measure ops against their reference and torch.compile of it."""
from __future__ import annotations

import importlib
import os
import pkgutil
import shlex
import sys
import time

from pyface.cli import plural


def _families() -> list[str]:
    import pyface.bench.ops as pkg

    return [m.name for m in pkgutil.iter_modules(pkg.__path__)]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark ops: fwd/bwd/fwd+bwd time and peak memory vs the reference",
        description="Benchmark every backend of an op against its PyTorch reference and "
                    "torch.compile of it: median and [p20, p80] of fwd, bwd and fwd+bwd time "
                    "(ms), peak memory (MB), with device/version metadata. Each measurement "
                    "runs 2 unmeasured calls, then at least 3 and at most 200 timed ones "
                    "(until --min-time). Prints a table; writes JSON only with --json.")
    p.add_argument("ops", nargs="*", help="op families or op names (default: all); "
                                          f"families: {', '.join(_families())}")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--size", choices=("small", "full"), default=None,
                   help="small shapes only, or the full model shapes too "
                        "(default: full on cuda, small on cpu)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated subset of the shape names, e.g. B4-K15,B4-K21 (default: "
                        "every shape of --size)")
    p.add_argument("--providers", default=None,
                   help="comma-separated providers: reference, compile (torch.compile of the "
                        "reference) and the op's backends, e.g. reference,cpu; an unknown name "
                        "lists the choices (default: every one available on --device, on cpu "
                        "without those --with-slow adds)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip torch.compile(reference) (default: run it on cuda; on cpu only "
                        "with --with-slow or named in --providers)")
    p.add_argument("--with-slow", action="store_true",
                   help="on cpu, also run what is left out there by default because it takes "
                        "minutes: the " + " and ".join(op for op, _ in CPU_SLOW) + " references "
                        "(seconds a call) and torch.compile of every reference (seconds to "
                        "minutes to compile each); cuda runs them all by default")
    p.add_argument("--min-time", type=float, default=0.5,
                   help="seconds per measurement (>= 0; each runs at least 3 times; default 0.5)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write results here: a file ending in .json, or a folder (existing or ending "
                        "in /; created) for an auto-named file inside it")
    p.set_defaults(func=run, check=check)


def _near(name: str, choices) -> str:
    from pyface.train.config import did_you_mean

    return did_you_mean(name, sorted(choices))


def check(args) -> int:
    """``pyface bench`` under ``PYFACE_PARSE_ONLY=1``: every option checked as a run checks it
    (ops, shapes, providers, --json), for --device whether or not this machine has it; nothing
    measured, no JSON written."""
    return run(args, check_only=True)


def run(args, check_only: bool = False) -> int:
    import math

    import torch

    from pyface.bench.harness import (JsonPathError, default_backends, environment, format_table,
                                      resolve_json_path, run_case, write_json)

    from pyface.train.cli import resolve_device
    from pyface.train.distributed import refuse_under_torchrun

    def fail(msg: str) -> int:
        print(f"pyface bench: {msg}", file=sys.stderr)
        return 2

    refused = refuse_under_torchrun(
        "pyface bench", "run the same pyface bench command without torchrun (each rank would "
        "also time its ops on a machine the other ranks load)")
    if refused is not None:
        return refused
    try:
        if check_only and args.device is not None:     # a device this machine may lack
            from pyface.train.cli import check_device

            device = check_device(args.device)
        else:
            device = torch.device(resolve_device(args.device))
    except ValueError as exc:
        return fail(str(exc))
    if not math.isfinite(args.min_time) or args.min_time < 0:
        return fail(f"--min-time: expected a finite number of seconds >= 0 (0: the minimum of 3 "
                    f"runs per measurement), got {args.min_time}")
    providers = ([p for p in args.providers.split(",") if p] if args.providers is not None
                 else None)
    defaults = resolve_defaults(device.type, size=args.size, providers=providers,
                                with_slow=args.with_slow)
    size, slow = defaults["size"], defaults["left_out"]
    use_compile = not args.no_compile and defaults["compile"]
    families = _families()
    wanted = args.ops or families
    shapes = [s for s in args.shapes.split(",") if s] if args.shapes is not None else None
    for opt, names in (("--shapes", shapes), ("--providers", providers)):
        if names == []:
            return fail(f"{opt}: expected a comma-separated list of names, got "
                        f"{getattr(args, opt[2:])!r}")

    def family_cases(sz):
        return [(fam, case) for fam in families
                for case in importlib.import_module(f"pyface.bench.ops.{fam}").cases(device, sz)]

    cases = family_cases(size)
    unknown = [w for w in wanted if w not in families and w not in {c.op for _, c in cases}]
    if unknown:
        ops = sorted({c.op for _, c in cases})
        return fail(f"unknown op or family {', '.join(map(repr, unknown))}; expected families "
                    f"{', '.join(families)} or ops {', '.join(ops)}"
                    + _near(unknown[0], [*families, *ops]))
    cases = [c for fam, c in cases if fam in wanted or c.op in wanted]
    if shapes is not None:
        known = {c.shape for c in cases}
        missing = [s for s in shapes if s not in known]
        if missing:
            other = "full" if size == "small" else "small"
            there = {c.shape for fam, c in family_cases(other) if fam in wanted or c.op in wanted}
            hint = [s for s in missing if s in there]
            return fail(f"--shapes {args.shapes}: {', '.join(map(repr, missing))} "
                        f"{'is' if len(missing) == 1 else 'are'} not a shape of the selected ops "
                        f"at --size {size}; shapes of the selected ops: {', '.join(sorted(known))}"
                        + (f" (--size {other} has {', '.join(hint)})" if hint
                           else _near(missing[0], known)))
        cases = [c for c in cases if c.shape in shapes]
    if providers is not None:
        known = {p for c in cases for p in c.providers}
        if use_compile and any("reference" in c.providers for c in cases):
            known.add("compile")
        missing = [p for p in providers if p not in known]
        if missing:
            why = " (--no-compile leaves out 'compile')" if "compile" in missing and \
                args.no_compile else ""
            return fail(f"--providers {args.providers}: unknown or unavailable provider "
                        f"{', '.join(map(repr, missing))} for the selected ops on {device.type}"
                        f"{why}; expected some of {', '.join(sorted(known))}"
                        + _near(missing[0], known))
    # (a check names the device type: this machine may not have the device)
    env = {"date": time.strftime("%Y-%m-%d")} if check_only else environment(device)
    json_path = None
    if args.json:
        tag = (env.get("gpu") or device.type).replace(" ", "_")
        try:   # before measuring, so that a bad path does not cost the run
            json_path = resolve_json_path(
                args.json, f"{'_'.join(wanted)}-{tag}-{env['date'][:10]}.json", "--json")
        except JsonPathError as exc:
            return fail(str(exc))
    if check_only:
        print(f"pyface bench: {plural(len(cases), 'case')} on {device.type} at --size {size}, "
              f"--json {json_path}", file=sys.stderr)
        return 0
    print(f"# device: {env.get('gpu') or env['cpu']} ({device.type}, {env['cpu_threads']} threads)"
          f"  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}", flush=True)
    left_out = [{"op": op, "provider": prov, "why": slow[(op, prov)]} for op, prov in slow
                if any(c.op == op for c in cases)]
    if not args.no_compile and not use_compile:
        left_out += [{"op": op, "provider": "compile", "why": CPU_COMPILE_WHY}
                     for op in dict.fromkeys(c.op for c in cases if "reference" in c.providers)]
    alt = ("small", "the small shapes only") if size == "full" else \
        ("full", "the model shapes too")
    print(f"# size: {size}" + ("" if args.size else f" (the {device.type} default; --size "
                                                    f"{alt[0]} for {alt[1]})"), flush=True)
    note = _left_out_note(left_out, device)
    if note:
        print(note, flush=True)
    # the providers each case runs (None: all of them)
    plan = [providers if providers is not None or not any(e["op"] == c.op for e in left_out)
            else [p for p in [*c.providers, "compile"] if (c.op, p) not in slow] for c in cases]
    compiles = sum(1 for c, pl in zip(cases, plan) if use_compile
                   and "reference" in c.providers and (pl is None or "compile" in pl))
    runs = sum(len([p for p in [*c.providers, *(["compile"] if "reference" in c.providers
                                                 and use_compile else [])]
                    if pl is None or p in pl]) for c, pl in zip(cases, plan))
    print(f"# {plural(len(cases), 'case')}, {plural(runs, 'provider run')} of up to 3 "
          f"measurements, each at least "
          f"{args.min_time:g} s and 3 calls after {WARMUP} unmeasured ones"
          + (f"; {plural(compiles, 'torch.compile compilation')} first (seconds to minutes each on "
             f"{device.type}; --no-compile leaves them out)" if compiles else ""), flush=True)
    results = []
    start = time.perf_counter()
    try:
        for i, case in enumerate(cases, 1):
            print(f"# [{i}/{len(cases)}, {time.perf_counter() - start:.0f} s] {case.op} "
                  f"[{case.shape}] {case.params}", flush=True)
            results += run_case(case, device, providers=plan[i - 1], min_time=args.min_time,
                                compile_reference=use_compile, max_reps=MAX_REPS,
                                warmup=WARMUP,
                                log=lambda line: print("  " + line, flush=True))
    except KeyboardInterrupt:
        print()
        print(format_table(results))
        print("pyface bench: interrupted; the measurements above are not written"
              + (f" ({json_path} left as it was)" if json_path else ""), file=sys.stderr)
        return 130
    print()
    print(format_table(results))
    print(f"# {plural(len(cases), 'case')} in {time.perf_counter() - start:.0f} s", flush=True)
    if note:
        print(note, flush=True)
    if json_path:
        auto = os.path.isdir(args.json)       # a folder: the file is auto-named
        replaced = not auto and os.path.exists(json_path)
        json_path = write_json(json_path, keep_existing=auto, data={
            "environment": env, "size": size, "command": _command(args, device, size),
            "options": {"ops": list(args.ops), "device": str(device), "size": size,
                        "shapes": shapes, "providers": providers,
                        "compile_reference": use_compile, "min_time_s": args.min_time,
                        "min_reps": 3, "max_reps": MAX_REPS, "warmup": WARMUP,
                        "with_slow": args.with_slow, "left_out": left_out},
            "order": ORDER,
            "default_backends": default_backends(sorted({c.op for c in cases}), device),
            "cases": [{"op": c.op, "shape": c.shape, "params": c.params} for c in cases],
            "results": [r.as_dict() for r in results]})
        print(f"wrote {json_path}" + (" (replacing the file that was there)" if replaced else ""))
    return 0


# recorded in the JSON: how the measurements of a run were taken
MAX_REPS, WARMUP = 200, 2
ORDER = ("cases one after another; in each case the providers in turn (the reference first "
         "where the case has one, then each backend, then compile), each measured fwd, then "
         "bwd, then fwd+bwd, on the same inputs (same shapes, dtype, seed) in this one process "
         "(same thread count); each measurement: options.warmup unmeasured calls, then calls "
         "until options.min_time_s has passed and at least options.min_reps (at most "
         "options.max_reps) were timed; peak memory from one more call")


# (op, provider) -> why: left out of a cpu run unless --with-slow or --providers names them.
# One forward call of each reference takes seconds on a 2-core cpu (points_to_triplane 9-13 s,
# rasterize_mesh's dense reference at its small shape 1.8-4 s; docs/raster.md), and a measurement
# makes at least 6 calls (2 unmeasured, 3 timed, 1 for memory) in each of 3 modes: minutes
# per provider, against about a second for each other measurement.
CPU_SLOW = {
    ("points_to_triplane", "reference"): "GOHA's dense cdist, 9-13 s a call on cpu",
    ("rasterize_mesh", "reference"): "the dense reference, 2-4 s a call on cpu",
}
# torch.compile of the references is left out of a cpu run on the same terms: compiling takes
# seconds to minutes per op on a 2-core cpu (render_triplane's case about 2 min, warp_by_keypoints'
# more than 4 min), most of a default run's wall time.
CPU_COMPILE_WHY = "compiling takes seconds to minutes per op on cpu"


def resolve_defaults(device_type: str, *, size: str | None = None,
                     providers: list[str] | None = None, with_slow: bool = False) -> dict:
    """The options a run gets on ``device_type`` where the command line leaves them out:
    ``size`` (full on cuda, small elsewhere), ``left_out``, the (op, provider) pairs not
    run, each with why, and ``compile``, whether torch.compile of the references runs (on
    cpu: :data:`CPU_SLOW` left out and no compile, unless ``with_slow`` or ``providers`` is
    given; on cuda: nothing left out, compile runs)."""
    everything = device_type == "cuda" or with_slow or providers is not None
    return {"size": size or ("full" if device_type == "cuda" else "small"),
            "left_out": {} if everything else dict(CPU_SLOW), "compile": everything}


def _left_out_note(left_out: list[dict], device) -> str:
    if not left_out:
        return ""
    slow = [e for e in left_out if e["provider"] != "compile"]
    parts = [f"{e['op']} {e['provider']} ({e['why']})" for e in slow]
    if len(slow) < len(left_out):
        parts.append(f"torch.compile of the references ({CPU_COMPILE_WHY})")
    return (f"# left out on {device.type}: " + "; ".join(parts)
            + "; to run them: add --with-slow (or name them in --providers)")


def _command(args, device, size: str) -> str:
    """The command line that repeats this run (every choice spelt out)."""
    parts = ["pyface", "bench", *args.ops, "--device", str(device), "--size", size,
             "--min-time", repr(args.min_time)]
    if args.shapes is not None:
        parts += ["--shapes", args.shapes]
    if args.providers is not None:
        parts += ["--providers", args.providers]
    if args.no_compile:
        parts.append("--no-compile")
    if args.with_slow:
        parts.append("--with-slow")
    return shlex.join(parts)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pyface.bench.cli")
    sub = parser.add_subparsers()
    add_parser(sub)
    sys.exit(run(parser.parse_args(["bench"] + sys.argv[1:])))
