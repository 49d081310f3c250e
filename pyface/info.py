"""``python -m pyface.info`` / ``pyface info``: versions, what was built, and for every op which
backend runs on CPU and CUDA tensors and why the others are unavailable."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys


def collect() -> dict:
    import torch

    from pyface import __version__, _backend

    ops = {}
    for name, spec in sorted(_backend.registered_ops().items()):
        entry = {"backends": {}, "default": {}, "note": spec.note}
        for device in ("cpu", "cuda"):
            statuses = {}
            for b in spec.backends:
                ok, reason = _backend.backend_status(spec, b, device)
                statuses[b] = {"available": ok, "reason": reason}
            entry["backends"][device] = statuses
            default = next((b for b in spec.priority.get(device, ("reference",))
                            if statuses.get(b, {}).get("available")), "reference")
            entry["default"][device] = default
        ops[name] = entry
    cuda = None
    if torch.cuda.is_available():
        cuda = {"device": torch.cuda.get_device_name(),
                "capability": ".".join(map(str, torch.cuda.get_device_capability()))}
    return {
        "pyface": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": cuda,
        "triton": _backend.triton_version(),
        "triton_interpret": _backend.triton_interpret(),
        "extension": {"loaded": _backend.extension() is not None,
                      "reason": _backend.extension_reason(),
                      "build": _backend.build_config()},
        "ops": ops,
        "forced_backend": os.environ.get("PYFACE_BACKEND") or None,
    }


def format_report(info: dict) -> str:
    lines = [f"pyface {info['pyface']}  (python {info['python']}, {info['platform']})",
             f"torch {info['torch']}  CUDA runtime: {info['torch_cuda'] or 'none (CPU build)'}",
             f"GPU: {info['cuda_device']['device'] + ' sm_' + info['cuda_device']['capability'].replace('.', '') if info['cuda_device'] else 'none visible'}",
             f"triton: {info['triton'] or 'not installed'}"
             + ("  (TRITON_INTERPRET=1: kernels run in the CPU interpreter)"
                if info["triton_interpret"] else ""),
             ""]
    ext = info["extension"]
    build = ext["build"] or {}
    lines.append(f"extension pyface._C: {'loaded' if ext['loaded'] else 'NOT LOADED'}"
                 + ("" if ext["loaded"] else f" - {ext['reason']}"))
    if build:
        lines.append(f"  built {build.get('built_at')} against torch {build.get('torch')}, "
                     f"backends: {', '.join(build.get('backends', []))}")
        if build.get("with_cuda"):
            lines.append(f"  CUDA kernels: yes, archs {build.get('cuda_archs')}")
        else:
            lines.append(f"  CUDA kernels: NO - {build.get('cuda_reason')}")
    if info.get("forced_backend"):
        lines.append(f"PYFACE_BACKEND={info['forced_backend']}: every op called without "
                     "backend= is forced onto it (the defaults below do not apply)")
    lines.append("")
    for name, op in info["ops"].items():
        lines.append(f"{name}:")
        for device in ("cpu", "cuda"):
            lines.append(f"  {device:<5} -> {op['default'][device]}")
            for b, st in op["backends"][device].items():
                mark = "ok " if st["available"] else "-- "
                lines.append(f"      {mark}{b:<10} {st['reason']}")
        if op["note"]:
            lines.append(f"  note: {op['note']}")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions, built backends and per-op backend choice",
                              description=__doc__)
    p.add_argument("--json", action="store_true", help="print JSON instead of a report")
    p.set_defaults(func=run)


def run(args) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyface.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a report")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
