"""``pyface eval``: evaluate a trained model (or the copy-source baseline) on reenactment pairs.

Writes a JSON report (``--json``), prints a table and writes a PNG sheet of source | driving |
target | prediction rows (``--sheet``). See docs/eval.md.
"""
from __future__ import annotations

import sys

BASELINES = ("copy-source",)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="PSNR / SSIM / fps of a model on held-out reenactment pairs",
        description="Evaluate MODEL (a registered model name with --checkpoint RUN, or the "
                    "baseline copy-source: the prediction is the source image) on the "
                    "same-identity and/or cross-identity reenactment pairs of a pyface dataset "
                    "(see docs/eval.md). Prints a table; writes JSON and a PNG sheet on request.")
    p.add_argument("model", help="registered model name, or copy-source")
    p.add_argument("--checkpoint", default=None, help="run folder or checkpoint folder (models)")
    p.add_argument("--data", required=True,
                   help="dataset root (pyface format; held-out: `pyface data synth --split test`)")
    p.add_argument("--protocol", choices=("same", "cross", "both"), default="both")
    p.add_argument("--subset", choices=("all", "moving"), default="all",
                   help="all pairs (the moving subset is reported as well) or moving pairs only")
    p.add_argument("--metrics", default="psnr,ssim", help="comma-separated metric names")
    p.add_argument("--json", default=None, metavar="OUT", help="write the report here")
    p.add_argument("--sheet", default=None, metavar="OUT.png", help="write a PNG sheet here")
    p.add_argument("--sheet-rows", type=int, default=6, help="rows of the sheet per protocol")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--max-pairs", type=int, default=None,
                   help="evaluate at most N pairs per protocol, spread evenly over the set")
    p.add_argument("--batch-size", type=int, default=8, help="driving frames per generate call")
    p.add_argument("--resolution", type=int, default=None,
                   help="copy-source only: evaluation size (default: the data's resolution)")
    p.add_argument("--no-ema", action="store_true", help="use the live weights, not the EMA")
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def data_hash(root: str) -> str:
    """A stable hash (16 hex digits) of a dataset root's index and per-video metadata and ground
    truth: ``index.json``, and for each listed video ``meta.json``, ``dataset.json`` and
    ``coeffs.npy``, for ``root`` and ``root/cross``. Frames are not read (moving or re-encoding
    them keeps the hash; regenerating the data with another seed changes it)."""
    import hashlib
    import os

    from pyface.data import format as fmt

    h = hashlib.sha256()
    for sub in ("", "cross"):
        d = os.path.join(root, sub)
        index = os.path.join(d, fmt.INDEX)
        if not os.path.isfile(index):
            continue
        names = [fmt.INDEX] + [os.path.join(r.name, f) for r in fmt.load_index(d)
                               for f in (fmt.META, fmt.LABELS, fmt.COEFFS)]
        for name in names:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                h.update(os.path.join(sub, name).replace(os.sep, "/").encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read())
                h.update(b"\0")
    return h.hexdigest()[:16]


def versions() -> dict:
    import platform

    import numpy
    import torch

    import pyface

    return {"pyface": pyface.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda,
            "platform": platform.platform()}


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _data_resolution(root: str) -> int:
    from pyface.data import format as fmt

    recs = fmt.load_index(root)
    res = {tuple(r.resolution) for r in recs if r.resolution}
    if len(res) != 1 or len(next(iter(res))) != 2 or len(set(next(iter(res)))) != 1:
        raise ValueError(f"{root}: cannot infer one square resolution from its index "
                         f"(found {sorted(res)}); pass --resolution")
    return int(next(iter(res))[0])


def format_table(report: dict) -> str:
    """The printed table of a report (one row per protocol and subset)."""
    names = report["metrics"]
    head = ["protocol", "subset", "pairs"]
    for n in names:
        head += [n, f"{n} face"]
    head += ["fps"]
    rows = []
    for proto, r in report["protocols"].items():
        for subset, s in r["subsets"].items():
            row = [proto, subset, str(s["count"])]
            for n in names:
                for region in ("image", "face"):
                    v = s.get(n, {}).get(region)
                    row.append("-" if v is None else f"{v:.4f}" if n == "ssim" else f"{v:.2f}")
            row.append("-" if r["fps"] is None else f"{r['fps']:.1f}")
            rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]

    def fmt_row(r):
        return "  ".join(x.rjust(w) if i > 1 else x.ljust(w)
                         for i, (x, w) in enumerate(zip(r, widths)))

    lines = [fmt_row(head), fmt_row(["-" * w for w in widths])] + [fmt_row(r) for r in rows]
    return "\n".join(lines)


def load_pipeline(model: str, checkpoint: str | None, *, device, ema: bool = True, resolution=None,
                  data: str | None = None):
    """The pipeline to evaluate: :class:`~pyface.eval.evaluate.CopySource` for ``copy-source``,
    else ``pyface.models.load(model, checkpoint, device=device, ema=ema)``."""
    from pyface.eval.evaluate import CopySource

    if model == "copy-source":
        return CopySource(resolution or _data_resolution(data), device=device)
    if checkpoint is None:
        raise ValueError(f"--checkpoint: required for model {model!r} (only {', '.join(BASELINES)} "
                         "runs without one)")
    try:
        from pyface.models import load
    except ImportError as e:
        raise RuntimeError(f"pyface.models.load is not available in this build ({e})") from None
    return load(model, checkpoint, device=device, ema=ema)


def run(args) -> int:
    import datetime
    import json
    import os

    import torch

    from pyface.data.format import DataError
    from pyface.eval.evaluate import evaluate

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.resolution is not None and args.model != "copy-source":
        print("pyface eval: --resolution applies to copy-source only (a model evaluates at its "
              "output resolution)", file=sys.stderr)
        return 2
    try:
        from pyface.eval import metrics as M
        for m in metrics:
            M.get(m)
        pipeline = load_pipeline(args.model, args.checkpoint, device=device, ema=not args.no_ema,
                                 resolution=args.resolution, data=args.data)
        protocols = ("same", "cross") if args.protocol == "both" else (args.protocol,)
        report = {"model": args.model,
                  "checkpoint": os.path.abspath(args.checkpoint) if args.checkpoint else None,
                  "data": os.path.abspath(args.data), "data_hash": data_hash(args.data),
                  "device": device_name(getattr(pipeline, "device", None) or device),
                  "resolution": int(pipeline.resolution), "batch_size": args.batch_size,
                  "max_pairs": args.max_pairs, "subset": args.subset, "metrics": metrics,
                  "moving": _moving_thresholds(),
                  "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  "versions": versions(), "protocols": {}}
        sheets = []
        for proto in protocols:
            res = evaluate(pipeline, args.data, protocol=proto, subset=args.subset,
                           metrics=metrics, batch_size=args.batch_size, max_pairs=args.max_pairs,
                           sheet_rows=args.sheet_rows, workers=args.workers,
                           progress=not args.quiet)
            report["protocols"][proto] = res.to_dict()
            sheets.append(res.sheet)
    except (DataError, ValueError, NotImplementedError, RuntimeError, FileNotFoundError) as e:
        print(f"pyface eval: {e}", file=sys.stderr)
        return 1
    print(f"{args.model} on {args.data} (data hash {report['data_hash']}, "
          f"{report['resolution']} px, {report['device']})")
    print(format_table(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, allow_nan=False)
        print(f"wrote {args.json}")
    if args.sheet:
        from pyface.train.monitor import image_grid, save_png

        rows = {k: torch.cat([s[k] for s in sheets if s]) for k in
                ("source", "driving", "target", "prediction")}
        save_png(image_grid(rows, max_items=rows["source"].shape[0]), args.sheet)
        print(f"wrote {args.sheet}")
    return 0


def _moving_thresholds() -> dict:
    from pyface.data.reenactment import MOVING_EXP_L2, MOVING_POSE_DEG
    return {"pose_deg": MOVING_POSE_DEG, "exp_l2": MOVING_EXP_L2}
