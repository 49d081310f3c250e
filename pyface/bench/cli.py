"""``pyface bench``: measure ops against their reference and torch.compile of it."""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys


def _families() -> list[str]:
    import pyface.bench.ops as pkg

    return [m.name for m in pkgutil.iter_modules(pkg.__path__)]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark ops: fwd/bwd/fwd+bwd time and peak memory vs the reference",
        description="Benchmark every backend of an op against its PyTorch reference and "
                    "torch.compile of it: median and [p20, p80] of fwd, bwd and fwd+bwd time, "
                    "peak memory, with device/version metadata.")
    p.add_argument("ops", nargs="*", help="op families or op names (default: all); "
                                          f"families: {', '.join(_families())}")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--size", choices=("small", "full"), default=None,
                   help="small shapes only, or the full model shapes too "
                        "(default: full on cuda, small on cpu)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated subset of the shape names, e.g. B4-K15,B4-K21")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset, e.g. reference,compile,cpu")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write results here (a folder -> an auto-named file inside it)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from pyface.bench.harness import environment, format_table, run_case

    from pyface.train.cli import resolve_device

    try:
        device = torch.device(resolve_device(args.device))
    except ValueError as exc:
        print(f"pyface bench: {exc}", file=sys.stderr)
        return 2
    size = args.size or ("full" if device.type == "cuda" else "small")
    families = _families()
    wanted = args.ops or families
    providers = args.providers.split(",") if args.providers else None
    shapes = set(args.shapes.split(",")) if args.shapes else None
    env = environment(device)
    print(f"# device: {env.get('gpu') or env['cpu']} ({device.type}, {env['cpu_threads']} threads)"
          f"  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}", flush=True)
    cases = [(fam, case) for fam in families
             for case in importlib.import_module(f"pyface.bench.ops.{fam}").cases(device, size)]
    unknown = [w for w in wanted if w not in families and w not in {c.op for _, c in cases}]
    if unknown:
        ops = sorted({c.op for _, c in cases})
        print(f"pyface bench: unknown op or family {', '.join(map(repr, unknown))}; expected "
              f"families {', '.join(families)} or ops {', '.join(ops)}", file=sys.stderr)
        return 2
    cases = [c for fam, c in cases if fam in wanted or c.op in wanted]
    if shapes is not None and not any(c.shape in shapes for c in cases):
        print(f"pyface bench: --shapes {args.shapes}: none of these at --size {size}; shapes of "
              f"the selected ops: {', '.join(sorted({c.shape for c in cases}))}",
              file=sys.stderr)
        return 2
    results = []
    for case in cases:
        if shapes is not None and case.shape not in shapes:
            continue
        print(f"# {case.op} [{case.shape}] {case.params}", flush=True)
        results += run_case(case, device, providers=providers, min_time=args.min_time,
                            compile_reference=not args.no_compile,
                            log=lambda line: print("  " + line, flush=True))
    print()
    print(format_table(results))
    if args.json:
        path = args.json
        if os.path.isdir(path) or path.endswith(os.sep):
            os.makedirs(path, exist_ok=True)
            tag = (env.get("gpu") or device.type).replace(" ", "_")
            path = os.path.join(path, f"{'_'.join(wanted)}-{tag}-{env['date'][:10]}.json")
        with open(path, "w") as f:
            json.dump({"environment": env, "size": size,
                       "results": [r.as_dict() for r in results]}, f, indent=2)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pyface.bench.cli")
    sub = parser.add_subparsers()
    add_parser(sub)
    sys.exit(run(parser.parse_args(["bench"] + sys.argv[1:])))
