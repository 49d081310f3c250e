"""``pyface eval``: evaluate trained models and the baselines on reenactment pairs.

One model (``pyface eval MODEL --checkpoint RUN``) or baseline (``copy-source``,
``warp-baseline``): prints a table, writes a JSON report (``--json``) and a PNG sheet of
source | driving | target | prediction rows (``--sheet``). Several runs
(``pyface eval --runs NAME=RUN ... --out DIR``): every run plus the baselines, one markdown
table, one JSON and a PNG sheet per model, and each row's paired differences against the
first (cluster-bootstrap 95 % intervals). Every mean has a 95 % interval (a cluster bootstrap
over the pairs' sources, :mod:`pyface.eval.stats`). See docs/eval.md.
"""
from __future__ import annotations

import sys

BASELINES = ("copy-source", "warp-baseline")
DEFAULT_METRICS = "psnr,ssim,jitter"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="metrics and fps of models and baselines on held-out reenactment pairs",
        description="Evaluate MODEL (a registered model name with --checkpoint RUN, or a "
                    "baseline: copy-source, the prediction is the source image; warp-baseline, "
                    "a thin-plate-spline warp of the source from its landmarks to the driving "
                    "frame's) on the same-identity and/or cross-identity reenactment pairs of a "
                    "pyface dataset, or several runs with --runs NAME=RUN ... and the baselines "
                    "(see docs/eval.md). Prints a table and the 95 % intervals of its means (a "
                    "cluster bootstrap over the pairs' sources); writes JSON and PNG sheets. "
                    "Under torchrun the ranks share the pairs (whole sources each) and rank 0 "
                    "prints and writes the one report.",
        epilog="example: pyface eval copy-source --data data/test --json copy-source.json; "
               "pyface eval mmfa --checkpoint runs/mmfa --data data/test; on 8 GPUs: "
               "torchrun --nproc_per_node=8 -m pyface eval mmfa --checkpoint runs/mmfa --data "
               "data/test --json mmfa.json (fps: the frames of all ranks over the slowest "
               "rank's seconds; docs/eval.md)")
    p.add_argument("model", nargs="?", default=None,
                   help="registered model name, or copy-source / warp-baseline (not with --runs)")
    p.add_argument("--checkpoint", default=None, help="run folder or checkpoint folder (models)")
    p.add_argument("--runs", nargs="*", default=None, metavar="MODEL=RUN",
                   help="evaluate these runs (registered model name = run or checkpoint folder) "
                        "and the baselines (none given: the baselines only); writes --out "
                        "DIR/{table.md, report.json, <model>.json, <model>.png}); prints "
                        "each row's paired differences against the first row")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder of --runs "
                   "(default: eval)")
    p.add_argument("--data", required=True,
                   help="dataset root (pyface format; held-out: `pyface data synth --split test`)")
    p.add_argument("--protocol", choices=("auto", "same", "cross", "both", "real"),
                   default="auto",
                   help="auto (default): same and cross on synthetic data (cross where ROOT/cross "
                        "exists), real on any other folder (e.g. written by `pyface data "
                        "prepare`); real: same-identity pairs (first frame of each video = "
                        "source) without exact ground truth (the landmark detector runs on the "
                        "output and the target)")
    p.add_argument("--subset", choices=("all", "moving"), default="all",
                   help="all (default): all pairs, the moving subset reported as well; "
                        "moving: moving pairs only")
    p.add_argument("--metrics", default=None,
                   help="comma-separated metric names (default: psnr,ssim,jitter; jitter only "
                        "when the data has landmarks): psnr, ssim, lpips, csim, fid, kid, akd, "
                        "aed, aed_id, apd, jitter (fps is always measured; akd, aed, apd need "
                        "the landmark detector of the `prepare` extra; lpips, csim, aed_id, "
                        "fid, kid need --weights)")
    p.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                   help="weights of a metric (repeatable): lpips=, lpips_heads=, fid= (or kid=), "
                        "csim= (or aed_id=); pyface never downloads them (docs/eval.md)")
    p.add_argument("--detector", choices=("auto", "mediapipe", "none"), default="auto",
                   help="landmark detector of akd / aed / apd and of the output's jitter: "
                        "auto (default: MediaPipe when installed), mediapipe, none (jitter then "
                        "uses the landmarks a baseline knows by construction)")
    p.add_argument("--json", default=None, metavar="OUT.json",
                   help="write the report here (a folder: FOLDER/MODEL.json)")
    p.add_argument("--sheet", default=None, metavar="OUT.png",
                   help="write a PNG sheet here (a folder: FOLDER/MODEL.png)")
    p.add_argument("--sheet-rows", type=int, default=6,
                   help="rows of the sheet per protocol (default 6; 0: no sheet)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available; "
                   "under torchrun cuda means cuda:LOCAL_RANK on each rank)")
    p.add_argument("--max-pairs", type=int, default=None,
                   help="evaluate at most N pairs per protocol, spread evenly over the set "
                        "(default: all)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="driving frames per generate call (default 8)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random numbers a pipeline draws (e.g. OTAvatar's pivotal "
                        "tuning), reset per chunk of pairs; EG3D and GOHA draw each pair's ray "
                        "samples from its own generator, whatever --batch-size: the same "
                        "arguments give the same numbers (default 0)")
    p.add_argument("--resolution", type=int, default=None,
                   help="baselines only: evaluation size (default: the data's resolution; with "
                        "--runs: every model's resolution)")
    p.add_argument("--no-ema", action="store_true", help="use the live weights, not the EMA")
    p.add_argument("--workers", type=int, default=0,
                   help="data loader processes (default 0: the main process)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from pyface.train.animate_cli import add_compile_argument, add_option_argument
    from pyface.train.cli import add_import_argument

    add_option_argument(p, "eval")   # MODEL --checkpoint only; the JSON records them (options)

    add_compile_argument(p, "fps leaves out the chunks of pairs that compiled (reported as "
                            "compile_chunks / compile_seconds; the JSON records the mode as "
                            "compile); models only, with --runs every run's model")

    add_import_argument(p)
    p.set_defaults(func=run, check=check)


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


def _fmt(name: str, v) -> str:
    if v is None:
        return "-"
    if name in ("ssim", "lpips", "csim", "aed", "apd", "aed_id"):
        return f"{v:.4f}"
    if name == "kid":
        return f"{v:.5f}"
    if name in ("jitter", "akd"):
        return f"{v:.3f}"
    if name == "fps":
        return f"{v:.1f}"
    return f"{v:.2f}"


def metric_columns(report: dict) -> list[tuple[str, str, str]]:
    """``(label, metric, region)`` of the per-subset values of a report, in metric order:
    ``psnr``, ``psnr face``, ..., ``aed``, ``aed gt`` (against the exact coefficients), ...,
    ``kid``. Other sub-fields (``floor``, ``detected``, ``image_std``) stay in the JSON."""
    cols = []
    for n in report["metrics"]:
        regions = set()
        for r in report["protocols"].values():
            for s in r["subsets"].values():
                regions |= set(s.get(n, {}))
        for region in ("image", "face", "gt"):
            if region in regions:
                cols.append((n if region == "image" else f"{n} {region}", n, region))
    return cols


def format_table(report: dict) -> str:
    """The printed table of a report (one row per protocol and subset)."""
    cols = metric_columns(report)
    jit = "jitter" in report["metrics"]
    head = ["protocol", "subset", "pairs"] + [c[0] for c in cols] + ["fps"]
    head += ["jitter", "jitter driving"] if jit else []
    rows = []
    for proto, r in report["protocols"].items():
        for subset, s in r["subsets"].items():
            row = [proto, subset, str(s["count"])]
            row += [_fmt(n, s.get(n, {}).get(region)) for _, n, region in cols]
            row.append(_fmt("fps", r["fps"]))
            if jit:
                j = r.get("jitter") or {}
                row += [_fmt("jitter", j.get("output")), _fmt("jitter", j.get("driving"))]
            rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]

    def fmt_row(r):
        return "  ".join(x.rjust(w) if i > 1 else x.ljust(w)
                         for i, (x, w) in enumerate(zip(r, widths)))

    lines = [fmt_row(head), fmt_row(["-" * w for w in widths])] + [fmt_row(r) for r in rows]
    return "\n".join(lines)


def format_compile(report: dict) -> str:
    """One line on ``--compile`` (the mode, the modules, and per protocol the chunks that
    compiled and were left out of fps); "" for an uncompiled pipeline."""
    mode = report.get("compile", "off")
    if mode == "off":
        return ""
    names = ", ".join(report.get("compiled_modules") or ()) or "nothing"
    parts = []
    for proto, r in report["protocols"].items():
        n = r.get("compile_chunks", 0)
        if not n:
            parts.append(f"{proto}: no chunk compiled")
        elif r.get("fps_includes_compilation"):
            parts.append(f"{proto}: every chunk compiled ({r['compile_seconds']:.1f} s), so its "
                         "fps includes compilation")
        else:
            parts.append(f"{proto}: {n} chunk{'s' if n != 1 else ''} compiled "
                         f"({r['compile_seconds']:.1f} s), left out of fps")
    return f"--compile {mode}: compiled {names}; " + "; ".join(parts)


def _fmt_ci(name: str, ci) -> str:
    return "-" if ci is None or None in ci else f"[{_fmt(name, ci[0])}, {_fmt(name, ci[1])}]"


def format_intervals(report: dict) -> str:
    """The 95 % intervals of a report's per-pair means (the JSON's ``ci95``: cluster bootstrap
    over sources), one row ``protocol/subset`` per protocol and subset, ``[lo, hi]`` in the
    printed table's number format; "-" where there is none (fid / kid, fewer than 2 sources:
    said once below the table). Empty for a report without intervals."""
    cols = [c for c in metric_columns(report) if c[1] not in ("fid", "kid")]
    rows, few = [], []
    for proto, r in report["protocols"].items():
        if "ci95" not in r:
            continue
        for subset in r["subsets"]:
            ci = r["ci95"].get(subset)
            n = r["clusters"].get(subset, 0)
            if ci is None:
                few.append(f"{proto}/{subset} ({n})")
            rows.append([f"{proto}/{subset}", str(n)]
                        + [_fmt_ci(name, (ci or {}).get(name, {}).get(region))
                           for _, name, region in cols])
    if not rows or not cols:
        return ""
    b = next(r["bootstrap"] for r in report["protocols"].values() if "bootstrap" in r)
    head = ["interval", "sources"] + [c[0] for c in cols]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = [f"{100 * b['level']:g} % intervals of the means: cluster bootstrap over sources "
             f"({b['resamples']} resamples, seed {b['seed']}; see docs/eval.md)"]
    lines += ["  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
              for r in [head, ["-" * w for w in widths]] + rows]
    if few:
        lines.append("no interval with fewer than 2 sources: " + ", ".join(few))
    return "\n".join(lines)


def markdown_table(reports: dict) -> str:
    """One markdown table of several reports (``{row label: report}``): one row per model;
    columns: resolution, then ``protocol/subset metric`` for every protocol, subset and metric,
    then fps and jitter per protocol (jitter: the output's; the driving ground truth's is in the
    row ``driving (ground truth)``). With a detector on ground-truth data, a row
    ``target (detector floor)`` per resolution holds what the target frames themselves score:
    akd of the detected target against the ground truth, aed / apd gt of the target's fit
    against the exact coefficients, and the detected targets' jitter."""
    first = next(iter(reports.values()))
    cols = metric_columns(first)
    head, keys = ["model", "res"], []
    for proto, r in first["protocols"].items():
        for subset in r["subsets"]:
            for label, n, region in cols:
                head.append(f"{proto}/{subset} {label}")
                keys.append((proto, subset, n, region))
    protos = list(first["protocols"])
    jit = "jitter" in first["metrics"]
    head += [f"{p} fps" for p in protos] + ([f"{p} jitter" for p in protos] if jit else [])
    rows = []
    for name, rep in reports.items():
        row = [name, str(rep["resolution"])]
        for proto, subset, n, region in keys:
            s = rep["protocols"].get(proto, {}).get("subsets", {}).get(subset, {})
            row.append(_fmt(n, s.get(n, {}).get(region)))
        row += [_fmt("fps", rep["protocols"][p]["fps"]) for p in protos]
        if jit:
            row += [_fmt("jitter", (rep["protocols"][p].get("jitter") or {}).get("output"))
                    for p in protos]
        rows.append(row)
    if jit:   # the driving frames' own jitter (the reference), from the first report
        row = ["driving (ground truth)", str(first["resolution"])] + ["-"] * len(keys)
        row += ["-"] * len(protos)
        row += [_fmt("jitter", (first["protocols"][p].get("jitter") or {}).get("driving"))
                for p in protos]
        rows.append(row)
    floors = {}              # the targets through the detector: what a perfect output scores
    for rep in reports.values():
        res = rep["resolution"]
        for (proto, subset, n, region) in keys:
            s = rep["protocols"].get(proto, {}).get("subsets", {}).get(subset, {})
            if n in ("akd", "aed", "apd") and "floor" in s.get(n, {}) and \
                    region == ("image" if n == "akd" else "gt"):
                floors.setdefault(res, {})[(proto, subset, n, region)] = s[n]["floor"]
        if jit and res in floors:
            for p in protos:
                j = rep["protocols"].get(p, {}).get("jitter") or {}
                if j.get("target_detector") is not None:
                    floors[res][("jitter", p)] = j["target_detector"]
    for res, vals in floors.items():
        row = ["target (detector floor)", str(res)]
        row += [_fmt(k[2], vals.get(k)) for k in keys] + ["-"] * len(protos)
        if jit:
            row += [_fmt("jitter", vals.get(("jitter", p))) for p in protos]
        rows.append(row)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def differences(results: dict, reference: str) -> dict:
    """Paired differences of several runs on the same pairs: ``results`` ``{label: {protocol:
    EvalResult}}``, ``reference`` one of its labels -> ``{"reference", "bootstrap", "models":
    {label: {protocol: {"subsets": {subset: {metric: {region: {"mean", "ci95", "pairs"}}}},
    "clusters": {subset: sources}}}}, "skipped": {label: why}}``: for every other label the mean
    over pairs of (label's value - reference's value), with its 95 % cluster-bootstrap interval
    over the reference's sources (:func:`pyface.eval.stats.paired_differences`: both runs
    resampled with the same sources). A label evaluated on other pairs (another resolution or
    pair selection) is skipped."""
    import numpy as np

    from pyface.eval import stats as S
    from pyface.eval.evaluate import BOOTSTRAP

    ref = results[reference]
    out = {"reference": reference, "bootstrap": dict(BOOTSTRAP), "models": {}, "skipped": {}}
    for label, protos in results.items():
        if label == reference:
            continue
        rows, why = {}, None
        for proto, r0 in ref.items():
            res = protos.get(proto)
            if res is None:
                why = f"no {proto} evaluation"
            elif res.resolution != r0.resolution:
                why = f"evaluated at {res.resolution} px, {reference} at {r0.resolution} px"
            elif res.indices != r0.indices or not np.array_equal(res.moving, r0.moving):
                why = f"{proto}: not the pairs of {reference}"
            if why:
                break
            c = r0.cluster_ids()
            subs = {s: S.paired_differences(res.values, r0.values, r0.subset_mask(s), c)
                    for s in r0.report_subsets}
            rows[proto] = {"subsets": subs,
                           "clusters": {s: len(np.unique(c[r0.subset_mask(s)]))
                                        for s in r0.report_subsets}}
        if why:
            out["skipped"][label] = why
        else:
            out["models"][label] = rows
    return out


def _fmt_diff(name: str, d) -> str:
    """``+0.12 [-0.05, +0.30]``, `` *`` appended when the interval excludes 0."""
    from pyface.eval.stats import excludes_zero

    def signed(v):
        return ("+" if v >= 0 else "") + _fmt(name, v)

    if d is None or d.get("mean") is None:
        return "-"
    ci = d.get("ci95")
    text = signed(d["mean"])
    if ci is not None:
        text += f" [{signed(ci[0])}, {signed(ci[1])}]" + (" *" if excludes_zero(ci) else "")
    return text


def differences_table(diff: dict, report: dict) -> str:
    """The markdown table of :func:`differences` (``report``: the reference's report, for the
    columns): one row per model, ``mean [lo, hi]`` per protocol, subset, metric and region, `` *``
    where the interval excludes 0; a line per skipped model."""
    ref = diff["reference"]
    cols = [c for c in metric_columns(report) if c[1] not in ("fid", "kid")]
    head, keys = [f"model - {ref}"], []
    for proto, r in report["protocols"].items():
        for subset in r["subsets"]:
            for label, n, region in cols:
                head.append(f"{proto}/{subset} {label}")
                keys.append((proto, subset, n, region))
    rows = []
    for name, protos in diff["models"].items():
        row = [name]
        for proto, subset, n, region in keys:
            d = protos.get(proto, {}).get("subsets", {}).get(subset, {}).get(n, {}).get(region)
            row.append(_fmt_diff(n, d))
        rows.append(row)
    b = diff["bootstrap"]
    out = [f"Difference vs {ref} on the same pairs (row minus {ref}): mean per-pair difference "
           f"[{100 * b['level']:g} % interval: cluster bootstrap over sources, the same "
           f"resampled sources for both, {b['resamples']} resamples, seed {b['seed']}]; * the "
           "interval excludes 0.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    if diff["skipped"]:
        out += [""] + [f"not compared: {k} ({v})" for k, v in diff["skipped"].items()]
    return "\n".join(out)


def load_pipeline(model: str, checkpoint: str | None, *, device, ema: bool = True, resolution=None,
                  data: str | None = None, option: str = "--checkpoint", compile=None,
                  options: dict | None = None):
    """The pipeline to evaluate: :class:`~pyface.eval.evaluate.CopySource` for ``copy-source``,
    :class:`~pyface.eval.warp_baseline.WarpBaseline` for ``warp-baseline``, else
    ``pyface.models.load(model, checkpoint, device=device, ema=ema, compile=compile,
    options=options)`` (``compile``: ``--compile``'s mode, ``options``: ``--option``'s inference
    options, models only); a checkpoint of another
    model is a ValueError naming ``option``, what it holds and what ``model`` takes."""
    from pyface.eval.evaluate import CopySource
    from pyface.eval.warp_baseline import WarpBaseline

    if model in BASELINES:
        cls = CopySource if model == "copy-source" else WarpBaseline
        return cls(resolution or _data_resolution(data), device=device)
    if checkpoint is None:
        raise ValueError(f"--checkpoint: required for model {model!r} (only {', '.join(BASELINES)} "
                         "runs without one)")
    try:
        from pyface.models import load
    except ImportError as e:
        raise RuntimeError(f"pyface.models.load is not available in this build ({e})") from None
    from pyface.train.model import WrongModelError

    try:
        return load(model, checkpoint, device=device, ema=ema,
                    **({"compile": compile} if compile is not None else {}),
                    **({"options": options} if options else {}))
    except WrongModelError as e:
        raise ValueError(e.for_option(option, checkpoint)) from None
    except KeyError as e:      # an unknown model name: the registry's message lists the names
        raise ValueError(str(e).strip('"') + f"; or a baseline: {', '.join(BASELINES)}") \
            from None


def _metrics(args) -> list[str]:
    from pyface.data import format as fmt
    from pyface.eval import metrics as M

    names = [m.strip() for m in (args.metrics or DEFAULT_METRICS).split(",") if m.strip()]
    for m in names:
        try:
            M.check_name(m)
        except ValueError as e:
            raise ValueError(f"--metrics {args.metrics}: {e}") from None
    if args.metrics is None:      # the default: jitter only where the data has landmarks
        try:
            if not all(r.has_landmarks for r in fmt.load_index(args.data)):
                names.remove("jitter")
        except Exception:  # noqa: BLE001 - a bad root is reported by the evaluation itself
            pass
    return names


def protocols_of(protocol: str, data: str) -> tuple[str, ...]:
    """The protocols ``--protocol`` means on the dataset root ``data``: ``auto`` -> ``same`` and
    ``cross`` (when ``data/cross`` holds an index) on synthetic data, ``real`` on any other
    folder (:func:`pyface.eval.evaluate.data_kind`); ``both`` -> ``same``, ``cross``."""
    import os

    from pyface.data import format as fmt
    from pyface.eval.evaluate import data_kind

    has_cross = os.path.isfile(os.path.join(data, "cross", fmt.INDEX))
    if protocol in ("both", "cross") and not has_cross and os.path.isdir(data):
        raise ValueError(f"--protocol {protocol}: {data} has no cross-identity pairs (no "
                         f"{os.path.join(data, 'cross', fmt.INDEX)}; `pyface data synth` writes "
                         "them for 2 or more identities); use --protocol same")
    if protocol == "both":
        return ("same", "cross")
    if protocol != "auto":
        return (protocol,)
    if data_kind(data) == "real":
        return ("real",)
    return ("same", "cross") if has_cross else ("same",)


def evaluate_report(name: str, pipeline, args, *, metrics, networks, checkpoint=None,
                    detector="auto", cache=None, results: dict | None = None, group=None,
                    options: dict | None = None):
    """Evaluates ``pipeline`` on every requested protocol -> (report dict, sheet dicts);
    ``options``: the inference options the model was loaded with (``--option``; the report's
    ``options``, ``{}`` for none);
    ``results``: a dict that receives ``{protocol: EvalResult}`` (the per-pair values).
    ``group`` (:class:`pyface.eval.distributed.EvalGroup`, under torchrun): each rank evaluates
    its shard and rank 0 gets the merged results; the other ranks return ``(None, [])``."""
    import datetime
    import os

    from pyface.eval.evaluate import describe_networks, evaluate

    protocols = protocols_of(args.protocol, args.data)
    main = group is None or group.is_main
    merged = {}
    for proto in protocols:
        kwargs = dict(protocol=proto, subset=args.subset, metrics=metrics,
                      batch_size=args.batch_size, max_pairs=args.max_pairs,
                      sheet_rows=args.sheet_rows, workers=args.workers,
                      progress=not args.quiet and main, networks=networks, detector=detector,
                      cache=cache, seed=args.seed)
        if group is None:
            merged[proto] = evaluate(pipeline, args.data, **kwargs)
            continue
        res = err = None
        try:
            res = evaluate(pipeline, args.data, shard=(group.rank, group.world), **kwargs)
        except Exception as exc:  # noqa: BLE001 - told to every rank, then re-raised here
            err = exc
        merged[proto] = group.gather(res, err, f"the {proto} evaluation of {name}")
    if not main:
        return None, []
    device = getattr(pipeline, "device", None) or "cpu"
    report = {"model": name,
              "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
              "options": {f"model.{k}": v for k, v in (options or {}).items()},
              "data": os.path.abspath(args.data), "data_hash": data_hash(args.data),
              "device": device_name(device), "resolution": int(pipeline.resolution),
              "batch_size": args.batch_size, "max_pairs": args.max_pairs, "subset": args.subset,
              "seed": args.seed, "world_size": 1 if group is None else group.world,
              "compile": getattr(pipeline, "compile_mode", "off"),
              "compiled_modules": list(getattr(pipeline, "compiled_modules", ())),
              "metrics": metrics, "metric_networks": describe_networks(networks),
              "moving": _moving_thresholds(args.data),
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(), "protocols": {}}
    sheets = []
    for proto, res in merged.items():
        report["protocols"][proto] = res.to_dict()
        sheets.append(res.sheet)
        if results is not None:
            results[proto] = res
    return report, sheets


def _write_json(report, path) -> None:
    """``report`` as JSON at ``path``, written to a hidden temporary next to it and renamed over
    it: an error or Ctrl-C while writing leaves the earlier file as it was, and no temporary."""
    import json

    _write_replacing(path, lambda f: json.dump(report, f, indent=2, allow_nan=False))


def _write_replacing(path: str, write) -> None:
    """``write(f)`` into a temporary text file next to ``path``, renamed to ``path`` once
    complete; removed on any error or interruption."""
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise


def _write_sheet(sheets, path) -> None:
    import torch

    from pyface.train.monitor import image_grid, save_png

    rows = {k: torch.cat([s[k] for s in sheets if s]) for k in
            ("source", "driving", "target", "prediction")}
    save_png(image_grid(rows, max_items=rows["source"].shape[0]), path)


def parse_runs(items) -> dict[str, str]:
    """``["eg3d=RUN1", "otavatar=RUN2"]`` -> ``{"eg3d": "RUN1", ...}`` (model names unique and
    not a baseline's)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--runs: expected MODEL=RUN, got {item!r}")
        if name in BASELINES:
            raise ValueError(f"--runs: {name!r} is a baseline (always evaluated); expected a "
                             "registered model name")
        if name in out:
            raise ValueError(f"--runs: model {name!r} given twice")
        out[name] = path
    return out


def output_file(path: str, option: str, default_name: str, exts: tuple[str, ...]) -> str:
    """``--json`` / ``--sheet``: a file name ending in one of ``exts``, or a folder (existing, or
    given with a trailing separator) -> ``FOLDER/default_name``; no existing part of its folder
    may be a file. ValueError naming ``option`` otherwise; checked before the evaluation."""
    import os

    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        path = os.path.join(path, default_name)
    if not path.lower().endswith(exts):
        raise ValueError(f"{option}: expected a file name ending in {' or '.join(exts)} (or a "
                         f"folder), got {path!r}")
    _check_parent(path, option)
    return path


def _check_parent(path: str, option: str) -> None:
    from pyface.cli import file_in_the_way

    parent = file_in_the_way(path)
    if parent is not None:
        raise ValueError(f"{option} {path}: cannot create its folder: {parent} is a file")


def check_args(args) -> None:
    """The numeric options' ranges and the output paths, before any model loads (ValueError
    naming the option, what it expects and the value given); a --data that is missing or no
    dataset: :class:`pyface.data.format.DataError` (a ValueError; an input's failure, exit
    code 1)."""
    import os

    check_ranges(args)
    from pyface.data import format as fmt
    from pyface.eval import metrics as M

    for m in (args.metrics or "").split(","):    # a typo'd metric, before any model loads
        if m.strip():
            try:
                M.check_name(m.strip())
            except ValueError as e:
                raise ValueError(f"--metrics {args.metrics}: {e}") from None
    data_help = ("expected a pyface dataset root: index.json and video folders, as `pyface data "
                 "synth` or `pyface data prepare` write")
    if os.path.isfile(args.data):
        raise fmt.DataError(f"--data {args.data}: a file, not a folder ({data_help})")
    if not os.path.isdir(args.data):
        raise fmt.DataError(f"--data {args.data}: not found ({data_help})")
    if not os.path.isfile(os.path.join(args.data, fmt.INDEX)) and not fmt.video_names(args.data):
        raise fmt.DataError(f"--data {args.data}: no {fmt.INDEX} and no video folders "
                            f"({data_help})")
    protocols_of(args.protocol, args.data)      # e.g. cross pairs the data does not have
    check_outputs(args)


def check_ranges(args) -> None:
    """The numeric options' ranges (ValueError naming the option, what it expects and the value
    given), and --metrics against --detector (:func:`check_detector_option`)."""
    for name, low in (("max_pairs", 1), ("batch_size", 1), ("sheet_rows", 0), ("workers", 0),
                      ("resolution", 1)):
        v = getattr(args, name)
        if v is not None and v < low:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= {low}"
                             + (" or none" if name in ("max_pairs", "resolution") else "")
                             + f", got {v}")
    if args.sheet and args.sheet_rows < 1:
        raise ValueError(f"--sheet-rows: --sheet needs at least 1 row, got {args.sheet_rows}")
    check_detector_option(args)


def check_detector_option(args) -> None:
    """A metric that needs a landmark detector (akd, aed, apd) with ``--detector none``: options
    that contradict each other (ValueError naming both, exit code 2), refused before anything
    loads."""
    from pyface.eval.evaluate import DETECTOR_METRICS

    if getattr(args, "detector", "auto") != "none" or not args.metrics:
        return
    needs = [m.strip() for m in args.metrics.split(",") if m.strip() in DETECTOR_METRICS]
    if needs:
        names = ", ".join(repr(m) for m in needs)
        verb = "needs" if len(needs) == 1 else "need"
        raise ValueError(f"--metrics {args.metrics}: {names} {verb} a landmark detector, but "
                         f"--detector none turns detection off; expected --detector auto or "
                         f"mediapipe, or --metrics without {names}")


def check_outputs(args) -> None:
    """The output paths (--json, --sheet, --out) and --compile (ValueError naming the option)."""
    import os

    label = args.model or "report"
    if args.json:
        args.json = output_file(args.json, "--json", f"{label}.json", (".json",))
    if args.sheet:
        args.sheet = output_file(args.sheet, "--sheet", f"{label}.png", (".png", ".jpg", ".jpeg"))
    from pyface.train.animate_cli import parse_compile_option

    args.compile = parse_compile_option(getattr(args, "compile", None))
    if args.runs is not None and args.out:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out}: exists and is not a folder")
        _check_parent(os.path.join(args.out, "table.md"), "--out")


def run(args) -> int:
    """``pyface eval``; under torchrun (``WORLD_SIZE`` > 1) every rank checks the arguments
    before the process group starts, evaluates its shard of the pairs, and rank 0 prints and
    writes the one report (:mod:`pyface.eval.distributed`)."""
    from pyface.eval.distributed import EvalGroup, rank_prefix, world_size

    pre = rank_prefix()
    checked = _check_command(args, pre)
    if isinstance(checked, int):
        return checked
    device = checked
    group = None
    if world_size() > 1:
        try:
            group = EvalGroup.start("auto" if args.device is None else device)
        except (RuntimeError, ValueError) as exc:
            print(f"{pre}pyface eval: {exc}", file=sys.stderr)
            return 2
        device = str(group.device)
    try:
        return _run(args, device, group)
    finally:
        if group is not None:
            group.close()


def check(args) -> int:
    """``pyface eval`` under ``PYFACE_PARSE_ONLY=1``: the option values (ranges, --metrics,
    output paths, --compile), --device whether or not this machine has it, and the model's
    name; nothing evaluated. With --data not there yet, what it holds (protocols, landmarks) is
    not checked; nor is the checkpoint's content."""
    import os

    from pyface.train.cli import check_device
    from pyface.train.registry import import_plugins, model_class

    check_device(args.device)
    if os.path.isdir(args.data):
        check_args(args)
    else:
        check_ranges(args)
        check_outputs(args)
        print(f"pyface eval: not there yet, so not checked: --data {args.data}", file=sys.stderr)
    if args.metrics is not None or os.path.isdir(args.data):
        _metrics(args)
    import_plugins(args.imports)
    if args.model is not None and args.model not in BASELINES:
        model_class(args.model)
        from pyface.train.animate_cli import parse_model_options

        parse_model_options(args)
    if args.checkpoint and not os.path.exists(args.checkpoint):
        print(f"pyface eval: not there yet, so not checked: --checkpoint {args.checkpoint}",
              file=sys.stderr)
    return 0


def _check_command(args, pre: str):
    """The checks of ``run`` before any model or network loads (every rank makes them alike
    under torchrun) -> the device, or the exit code after printing why: 2 for the command line
    (an option's value, a missing option), 1 for a --data that is missing or no dataset."""
    from pyface.data.format import DataError
    from pyface.eval.distributed import world_size
    from pyface.train.cli import resolve_device

    try:
        device = resolve_device(args.device)
        check_args(args)
        if world_size() > 1 and args.device is not None:
            import torch

            dev = torch.device(args.device)
            if dev.type == "cuda" and dev.index is not None:
                raise ValueError(f"--device: under torchrun each rank takes cuda:LOCAL_RANK; "
                                 f"expected cuda (or cpu, or none), got {args.device!r}")
    except DataError as exc:
        print(f"{pre}pyface eval: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"{pre}pyface eval: {exc}", file=sys.stderr)
        return 2
    if args.runs is not None:
        if args.model is not None or args.checkpoint or args.json or args.sheet:
            print(f"{pre}pyface eval: --runs takes no MODEL, --checkpoint, --json or --sheet (it "
                  "writes --out DIR)", file=sys.stderr)
            return 2
        if args.option:
            print(f"{pre}pyface eval: --runs takes no --option (inference options apply to one "
                  "model: pyface eval MODEL --checkpoint RUN --option KEY=VALUE)",
                  file=sys.stderr)
            return 2
    elif args.model is None:
        print(f"{pre}pyface eval: expected MODEL (or --runs MODEL=RUN ...)", file=sys.stderr)
        return 2
    elif not args.checkpoint and args.model not in BASELINES:
        print(f"{pre}pyface eval: --checkpoint: required for model {args.model!r} (only "
              f"{', '.join(BASELINES)} runs without one)", file=sys.stderr)
        return 2
    elif args.checkpoint and args.model in BASELINES:
        print(f"{pre}pyface eval: --checkpoint: {args.model} is a baseline and takes none (to "
              "evaluate a run: pyface eval MODEL --checkpoint RUN)", file=sys.stderr)
        return 2
    elif args.compile is not None and args.model in BASELINES:
        print(f"{pre}pyface eval: --compile: {args.model} is a baseline, with no modules to "
              "compile (--compile applies to a model: pyface eval MODEL --checkpoint RUN "
              "--compile)", file=sys.stderr)
        return 2
    elif args.option and args.model in BASELINES:
        print(f"{pre}pyface eval: --option: {args.model} is a baseline, with no inference "
              "options (--option applies to a model: pyface eval MODEL --checkpoint RUN "
              "--option KEY=VALUE)", file=sys.stderr)
        return 2
    elif args.resolution is not None and args.model not in BASELINES:
        print(f"{pre}pyface eval: --resolution applies to the baselines only (a model evaluates "
              "at its output resolution)", file=sys.stderr)
        return 2
    from pyface.train.animate_cli import parse_model_options
    from pyface.train.registry import import_plugins, model_class

    try:            # a plugin (--import); an unknown or broken model before the metrics load
        import_plugins(args.imports)
    except (ValueError, ImportError) as exc:
        print(f"{pre}pyface eval: {exc}", file=sys.stderr)
        return 2
    try:            # the same exit code as pyface train and pyface animate give them
        models = list(parse_runs(args.runs)) if args.runs is not None else [args.model]
        for name in models:
            if name is not None and name not in BASELINES:
                model_class(name)
        args.options = parse_model_options(args) if args.runs is None else {}
    except (ValueError, KeyError) as exc:     # ValueError: ModelDefinitionError too
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{pre}pyface eval: {msg}", file=sys.stderr)
        return 2
    from pyface.eval.weights import (METRICS_NEEDING_WEIGHTS, missing_weights_message,
                                     parse_weights)

    try:            # --weights' syntax, and a metric without the --weights it needs
        weights = parse_weights(args.weights)
        unweighted = [m for m in _metrics(args) if m in METRICS_NEEDING_WEIGHTS
                      and m not in weights]
    except ValueError as exc:
        print(f"{pre}pyface eval: {exc}", file=sys.stderr)
        return 2
    if unweighted:
        print(f"{pre}pyface eval: {missing_weights_message(unweighted[0])}", file=sys.stderr)
        return 2
    return device


def _setup(group, what: str, fn):
    """``fn()``; under torchrun the ranks then agree that it worked on every one
    (:meth:`pyface.eval.distributed.EvalGroup.agree`), so that a rank that failed to load its
    model does not leave the others waiting."""
    if group is None:
        return fn()
    out = err = None
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - told to every rank, then re-raised here
        err = exc
    group.agree(err, what)
    return out


def _run(args, device, group) -> int:
    from pyface.data.format import DataError
    from pyface.eval.distributed import PeerFailed, rank_prefix
    from pyface.eval.weights import parse_weights

    pre = rank_prefix()
    main = group is None or group.is_main
    detector = None
    try:
        from pyface.eval.evaluate import DETECTOR_METRICS, load_networks
        from pyface.eval.landmarks import MissingDetectorError, get_detector

        def networks_and_detector():
            metrics = _metrics(args)
            networks = load_networks(metrics, parse_weights(args.weights), device=device)
            needs = [m for m in metrics if m in DETECTOR_METRICS]
            det = None
            if needs or "jitter" in metrics:    # started once, shared by every evaluation
                det = get_detector(args.detector, required_by=needs)
            return metrics, networks, det

        metrics, networks, detector = _setup(group, "loading the metrics", networks_and_detector)
        if args.runs is not None:
            return _run_many(args, metrics, networks, device, detector, group)
        pipeline = _setup(group, f"loading {args.model}", lambda: load_pipeline(
            args.model, args.checkpoint, device=device, ema=not args.no_ema,
            resolution=args.resolution, data=args.data, compile=args.compile,
            options=getattr(args, "options", None)))
        report, sheets = evaluate_report(args.model, pipeline, args, metrics=metrics,
                                         networks=networks, checkpoint=args.checkpoint,
                                         detector=detector or "none", group=group,
                                         options=getattr(args, "options", None))
    except PeerFailed as e:
        if main:
            print(f"pyface eval: {e}", file=sys.stderr)
        return 1
    except (DataError, ValueError, NotImplementedError, RuntimeError, FileNotFoundError,
            MissingDetectorError) as e:
        print(f"{pre}pyface eval: {e}", file=sys.stderr)
        return 1
    finally:
        if detector is not None and hasattr(detector, "close"):
            detector.close()
    if not main:
        return 0
    print(f"{args.model} on {args.data} (data hash {report['data_hash']}, "
          f"{report['resolution']} px, {report['device']}{_ranks(report)})")
    print(format_table(report))
    if format_compile(report):
        print(format_compile(report))
    intervals = format_intervals(report)
    if intervals:
        print("\n" + intervals)
    if args.json:
        _write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.sheet:
        _write_sheet(sheets, args.sheet)
        print(f"wrote {args.sheet}")
    return 0


def _ranks(report: dict) -> str:
    """``", 2 ranks (fps: ...)"`` for a report of several processes, else ``""``."""
    world = report.get("world_size", 1)
    if world <= 1:
        return ""
    return (f"; {world} ranks under torchrun, fps = frames of all ranks / generation seconds of "
            "the slowest")


def _run_many(args, metrics, networks, device, detector=None, group=None) -> int:
    """--runs: every run and the baselines at each model's resolution (``NAME@RES`` rows
    when the models' resolutions differ). The baselines are evaluated first (they are fast), and
    the table and report.json are rewritten after every evaluation, runs first in the given
    order, so an interrupted evaluation leaves the finished rows. Under torchrun (``group``)
    every rank evaluates its shard of each and rank 0 alone prints and writes."""
    import os

    main = group is None or group.is_main
    runs = parse_runs(args.runs)
    out = args.out or "eval"

    def load_all():
        pipelines = {name: load_pipeline(name, path, device=device, ema=not args.no_ema,
                                         option=f"--runs {name}=", compile=args.compile)
                     for name, path in runs.items()}
        resolutions = sorted({int(p.resolution) for p in pipelines.values()}) or \
            [args.resolution or _data_resolution(args.data)]
        if args.resolution is not None and pipelines:
            resolutions = [args.resolution]
        for b in BASELINES:
            for r in resolutions:
                label = b if len(resolutions) == 1 else f"{b}@{r}"
                pipelines[label] = load_pipeline(b, None, device=device, resolution=r)
        return pipelines

    pipelines = _setup(group, "loading the runs", load_all)
    reports, cache = {}, {}        # cache: the targets' detections and fits, computed once
    results: dict = {}             # per-pair values, for the paired differences
    order = list(pipelines)
    table = diff = ""
    for label in order[len(runs):] + order[:len(runs)]:
        pipe = pipelines[label]
        results[label] = {}
        rep, sheets = evaluate_report(label, pipe, args, metrics=metrics, networks=networks,
                                      checkpoint=runs.get(label), detector=detector or "none",
                                      cache=cache, results=results[label], group=group)
        if not main:
            continue
        reports[label] = rep
        _write_json(rep, os.path.join(out, f"{label}.json"))
        if args.sheet_rows:
            _write_sheet(sheets, os.path.join(out, f"{label}.png"))
        print(f"{label} ({rep['resolution']} px, {rep['device']}{_ranks(rep)})")
        print(format_table(rep))
        if format_compile(rep):
            print(format_compile(rep))
        intervals = format_intervals(rep)
        if intervals:
            print("\n" + intervals)
        done = [k for k in order if k in reports]
        table, diff = _write_table({k: reports[k] for k in done}, metrics, out,
                                   {k: results[k] for k in done} if order[0] in reports else None)
    if not main:
        return 0
    print(table)
    if diff:
        print("\n" + diff)
    print(f"wrote {out}/table.md, report.json and per-model .json"
          + (" / .png" if args.sheet_rows else ""))
    return 0


def _write_table(reports: dict, metrics, out: str,
                 results: dict | None = None) -> tuple[str, str]:
    """Writes ``out/table.md`` and ``out/report.json`` of the reports so far -> (the table, the
    differences table or ""). ``results`` (``{label: {protocol: EvalResult}}``, the first label
    the table's first row): the paired differences against that first row
    (:func:`differences`), as ``"differences"`` in report.json and a markdown table (printed;
    table.md keeps the one table of the means)."""
    import os

    table = markdown_table(reports)
    first = next(iter(reports.values()))
    extra, diff_table = {}, ""
    if results is not None and len(results) > 1:
        ref = next(iter(results))
        diff = differences(results, ref)
        extra["differences"] = diff
        diff_table = differences_table(diff, reports[ref])
    _write_json({"data": first["data"], "data_hash": first["data_hash"], "metrics": metrics,
                 "reports": reports, **extra}, os.path.join(out, "report.json"))
    _write_replacing(os.path.join(out, "table.md"), lambda f: f.write(table + "\n"))
    return table, diff_table


def _moving_thresholds(data) -> dict:
    """The moving subset's rule and thresholds on the dataset root ``data``
    (:func:`pyface.data.reenactment.moving_criterion`)."""
    from pyface.data.reenactment import moving_criterion
    return moving_criterion(data)
