"""``pyface data``: generate, index, validate and benchmark talking-head datasets."""
from __future__ import annotations

import os
import sys

from pyface.cli import plural


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="synthetic talking-head data, dataset index and checks",
                              description="Generate the synthetic ground-truth dataset, write a "
                                          "dataset index, validate a dataset, benchmark loading.")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    s = sub.add_parser("synth", help="render a synthetic talking-head dataset",
                       description="Render talking-head videos of the built-in procedural head "
                                   "model with exact ground truth (see docs/data.md).")
    s.add_argument("--out", required=True,
                   help="output dataset root: absent or empty, outside other datasets; the same "
                        "command again finishes an interrupted set (synth.partial.json) and "
                        "leaves a complete one as it is")
    s.add_argument("--identities", type=int, default=4,
                   help="procedural identities (default 4)")
    s.add_argument("--videos-per-identity", type=int, default=2,
                   help="videos of each identity (default 2)")
    s.add_argument("--frames", type=int, default=32, help="frames per video (default 32)")
    s.add_argument("--resolution", type=int, default=256,
                   help="frame side, 1-4096 (default 256)")
    s.add_argument("--fps", type=float, default=25.0, help="frame rate, >= 0.1 (default 25)")
    s.add_argument("--seed", type=int, default=0,
                   help="seed of the identities and trajectories, >= 0 (default 0)")
    s.add_argument("--workers", type=int, default=0,
                   help="processes (default 0: all cores); the output does not depend on it")
    s.add_argument("--no-cross", action="store_true",
                   help="skip the cross-identity ground truth (ROOT/cross)")
    s.add_argument("--no-masks", action="store_true", help="do not write masks/")
    s.add_argument("--split", choices=("train", "test"), default="train",
                   help="train (default) or test: held-out identities (test0000, ...) from random "
                        "streams no training split uses, with the cross-identity set")
    s.add_argument("--zoom", type=float, default=0.0,
                   help="per-video zoom: log-scale amplitude (0.2: scale 0.82-1.22 in each video; "
                        "default 0: none)")
    s.add_argument("--exp-leak", type=float, default=0.0,
                   help="add exp_leak * L @ id to the stored expression coefficients (default 0)")
    s.add_argument("--multiview", action="store_true",
                   help="also render every video from a second camera (ROOT/multiview)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_synth, check=_synth_check)

    e = sub.add_parser("pairs", help="count the evaluation pairs and their copy-source PSNR",
                       description="Same- and cross-identity reenactment pairs of a dataset "
                                   "(pyface.data.reenactment_pairs), all and moving, with the "
                                   "PSNR of copying the source (the baseline).")
    e.add_argument("root", help="dataset root (e.g. written by pyface data synth --split test)")
    e.add_argument("--resolution", type=int, default=None,
                   help="resize frames to this side before the PSNR (default: the data's)")
    e.set_defaults(func=_pairs)

    k = sub.add_parser("cache", help="list or build the cached built-in synthetic sets",
                       description="List the cached synthetic datasets ($PYFACE_CACHE, default "
                                   "~/.cache/pyface), or build the built-in set a training run "
                                   "with data.path unset uses (--build RESOLUTION).")
    k.add_argument("--build", type=int, metavar="RESOLUTION", default=None,
                   help="generate the built-in set at this data.resolution (no-op when cached)")
    k.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a built-in set option (data.options.synth), e.g. --set zoom=0.2")
    k.set_defaults(func=_cache)

    c = sub.add_parser("check", help="report missing or corrupt files of a dataset",
                       description="Validate a dataset root: index, meta.json, dataset.json "
                                   "(finite, orthonormal cameras), coeffs.npy (T, 257), "
                                   "landmarks.npy, every frame and mask (decoded), and that "
                                   "the videos of pyface data prepare were prepared with the "
                                   "same options; a WARNING line names each video prepared "
                                   "from a truncated or damaged source (not an error).")
    c.add_argument("root", help="dataset root")
    c.add_argument("--fast", action="store_true", help="check that frames exist, do not decode")
    c.set_defaults(func=_check)

    q = sub.add_parser("prepare", help="portrait videos/photos -> a pyface dataset (offline)",
                       description="Decode videos, frame folders or images; MediaPipe face mesh "
                                   "(478 -> 68 landmarks, smoothed); EG3D or FOMM crops; selfie "
                                   "masks; a landmark 3DMM fit (257 coefficients, EG3D cameras). "
                                   "Needs the extra: pip install -e \".[prepare]\" "
                                   "(see docs/data.md).")
    q.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video files, frame folders (numeric image names), image files, or "
                        "folders of videos/images")
    q.add_argument("--out", required=True, help="output dataset root")
    q.add_argument("--crop", choices=("eg3d", "fomm"), default="eg3d",
                   help="eg3d (default): EG3D's in-the-wild alignment; fomm: twice the "
                        "landmark box (docs/data.md)")
    q.add_argument("--resolution", type=int, choices=(256, 512), default=256,
                   help="side of the cropped frames (default 256)")
    q.add_argument("--workers", type=int, default=1,
                   help="videos prepared in parallel (default 1)")
    q.add_argument("--skip-bad", action="store_true",
                   help="warn about a bad input (missing, unreadable, no face, or failing "
                        "otherwise), skip it and go on")
    q.add_argument("--resume", action="store_true",
                   help="skip the videos of these inputs already finished in --out (an error "
                        "when they were prepared with other options)")
    q.add_argument("--no-fit", action="store_true",
                   help="skip the 3DMM fit (zero coefficients, frontal EG3D cameras)")
    q.add_argument("--no-appearance", action="store_true",
                   help="do not fit albedo and lighting (tex and gamma stay 0; no photometric "
                        "refinement either)")
    q.add_argument("--no-photometric", action="store_true",
                   help="landmarks only for the geometry and pose (no photometric refinement)")
    q.add_argument("--fit-steps", type=int, default=100,
                   help="L-BFGS iterations of the 3DMM fit (default 100)")
    q.add_argument("--bfm", default=None, metavar="PATH",
                   help="fit Deep3DFaceRecon's BFM_model_front.mat instead of the built-in head")
    q.add_argument("--submission-offsets", action="store_true",
                   help="add EG3D's FFHQ submission offsets to the camera labels")
    q.add_argument("--matting", choices=("selfie", "modnet"), default="selfie",
                   help="masks: MediaPipe selfie segmentation (default) or MODNet's soft alpha "
                        "(needs --matting-weights)")
    q.add_argument("--matting-weights", default=None, metavar="PATH",
                   help="MODNet weights file (e.g. modnet_photographic_portrait_matting.ckpt)")
    q.add_argument("--shard", default=None, metavar="K/N",
                   help="prepare only shard K of N (0 <= K < N) of the videos, chosen by a hash "
                        "of each video's name, under the same names as one run; N jobs given the "
                        "same inputs and options can write into one --out at once (other "
                        "machines, SLURM array tasks); a shard refuses to start when --out holds "
                        "other shards' videos prepared with other options. A shard does not "
                        "write index.json: run pyface data index OUT once all shards finished "
                        "(it refuses videos prepared with different options). auto: a SLURM array "
                        "task's SLURM_ARRAY_TASK_ID / _COUNT (docs/data.md)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_prepare)

    i = sub.add_parser("index", help="(re)write ROOT/index.json by scanning the video folders",
                       description="Scan the video folders of ROOT (folders with meta.json or "
                                   "frames/) and write ROOT/index.json. Refused: a root without "
                                   "video folders, a video folder, an unfinished synthetic set, "
                                   "videos of pyface data prepare (e.g. its --shard jobs) "
                                   "prepared with different options (the error names each "
                                   "option, its values and the videos of each).")
    i.add_argument("root", help="dataset root")
    i.set_defaults(func=_index)

    b = sub.add_parser("bench", help="time the synthetic engine and the pair loader",
                       description="Generates a dataset into a temporary folder (timed), then "
                                   "times PairDataset through a DataLoader.")
    b.add_argument("--identities", type=int, default=4, help="identities generated (default 4)")
    b.add_argument("--videos-per-identity", type=int, default=2,
                   help="videos per identity (default 2)")
    b.add_argument("--frames", type=int, default=32, help="frames per video (default 32)")
    b.add_argument("--resolution", type=int, default=256, help="frame side (default 256)")
    b.add_argument("--workers", type=int, default=2,
                   help="generation processes and loader workers (default 2; 0: generation on "
                        "all cores, loading in the main process)")
    b.add_argument("--batch-size", type=int, default=8, help="pairs per loader batch (default 8)")
    b.add_argument("--samples", type=int, default=1024, help="pairs to load (default 1024)")
    b.add_argument("--root", default=None, help="use this existing dataset instead of generating")
    b.set_defaults(func=_bench)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _synth_config(args):
    """The SynthConfig of ``pyface data synth``'s options, or exit code 2 after printing the
    error, named by its option."""
    from pyface.data.synthetic import SynthConfig

    try:
        cfg = SynthConfig(identities=args.identities, videos_per_identity=args.videos_per_identity,
                          frames=args.frames, resolution=args.resolution, fps=args.fps,
                          seed=args.seed, workers=args.workers, cross=not args.no_cross,
                          masks=not args.no_masks, split=args.split, zoom=args.zoom,
                          exp_leak=args.exp_leak, multiview=args.multiview)
    except ValueError as exc:   # the config's field names are the options'
        field, _, msg = str(exc).partition(": ")
        option = "--" + field.replace("_", "-")
        if field == "cross":
            option, msg = (("--split test --no-cross", msg) if args.no_cross else
                           ("--identities", f"{msg} (or --no-cross), got {args.identities}"))
        print(f"pyface data synth: {option}: {msg}", file=sys.stderr)
        return 2
    return cfg


def _synth_check(args) -> int:
    """``pyface data synth`` under ``PYFACE_PARSE_ONLY=1``: its options' values; nothing
    rendered or written."""
    cfg = _synth_config(args)
    return cfg if isinstance(cfg, int) else _out_below_a_file(args.out, "pyface data synth: ")


def _out_below_a_file(out: str, prefix: str) -> int:
    """Exit code 2 after a one-line message naming --out when a folder cannot be created at
    ``out`` (an existing part of its path is a file), else 0."""
    from pyface.cli import file_in_the_way

    blocking = None if os.path.exists(out) else file_in_the_way(out)
    if blocking is None:
        return 0
    print(f"{prefix}--out {out}: cannot create its folder: {blocking} is a file",
          file=sys.stderr)
    return 2


def _synth(args) -> int:
    from pyface.data.format import DataError
    from pyface.data.synthetic import PARTIAL, generate
    from pyface.train.distributed import refuse_under_torchrun

    refused = refuse_under_torchrun(
        "pyface data synth", "run the same command without torchrun (--workers N renders in N "
        "processes)")
    if refused is not None:
        return refused
    cfg = _synth_config(args)
    if isinstance(cfg, int):
        return cfg
    if _out_below_a_file(args.out, "pyface data synth: "):
        return 2
    try:
        s = generate(args.out, cfg, progress=not args.quiet)
    except DataError as exc:
        print(f"pyface data synth: --out {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: {args.out} is unfinished ({PARTIAL}; no loader takes it); run "
              "the same command again to finish it", file=sys.stderr)
        return 130
    if s.get("existing"):
        print(f"{args.out} already holds this dataset (synth.json): nothing to do")
        return 0
    if s.get("resumed_videos"):
        print(f"resumed: {plural(s['resumed_videos'], 'finished video')} kept")
    extra = (f", {plural(s['view_videos'], 'second view')}" if s["view_videos"] else "") + \
        (f", split {args.split}" if args.split != "train" else "")
    print(f"wrote {plural(s['videos'], 'video')} + "
          f"{plural(s['cross_videos'], 'cross-identity video')} "
          f"({plural(s['frames'], 'frame')}){extra} to {args.out} in {s['seconds']:.1f} s with "
          f"{plural(s['workers'], 'worker')}")
    return 0


def _pairs(args) -> int:
    from pyface.data.format import DataError
    from pyface.data.reenactment import reenactment_pairs

    if args.resolution is not None and args.resolution <= 0:
        print(f"pyface data pairs: --resolution: expected > 0, got {args.resolution}",
              file=sys.stderr)
        return 2
    try:
        return _pairs_report(args, reenactment_pairs)
    except DataError as exc:
        print(f"pyface data pairs: {exc}", file=sys.stderr)
        return 1


def _pairs_report(args, reenactment_pairs) -> int:
    import os

    import numpy as np

    for protocol in ("same", "cross"):
        if protocol == "cross" and not os.path.isdir(os.path.join(args.root, "cross")):
            continue
        ds = reenactment_pairs(args.root, resolution=args.resolution, protocol=protocol)
        psnr = []
        for i in range(len(ds)):
            it = ds[i]
            a = it["source"]["image"].float() / 255
            b = it["target"]["image"].float() / 255
            psnr.append(-10 * np.log10(max(float(((a - b) ** 2).mean()), 1e-10)))
        psnr = np.array(psnr)
        mv = np.asarray(ds.moving, bool)
        if not len(ds):     # one frame per video: no driving frame besides the source
            print(f"{protocol:5s}: 0 pairs (every video has a single frame)")
            continue
        line = f"{protocol:5s}: {len(ds)} pairs, copy-source PSNR {psnr.mean():.2f} dB"
        if ds.has_coeffs:
            line += (f"; moving {int(mv.sum())} ({psnr[mv].mean() if mv.any() else float('nan'):.2f} dB)"
                     f", static {int((~mv).sum())} "
                     f"({psnr[~mv].mean() if (~mv).any() else float('nan'):.2f} dB)")
            if ds.moving_rule != "coefficients":        # fitted coefficients: docs/eval.md
                line += f" [moving by the {ds.moving_rule} rule]"
        print(line)
    return 0


def _cache(args) -> int:
    import json
    import os

    from pyface.data.cache import cache_dir, cached, is_complete

    if args.overrides and args.build is None:
        print("pyface data cache: --set needs --build RESOLUTION (it sets an option of the set "
              "to build)", file=sys.stderr)
        return 2
    if args.build is not None:
        import time

        from pyface.train.distributed import refuse_under_torchrun

        refused = refuse_under_torchrun(
            "pyface data cache --build", "run the same command without torchrun (pyface train "
            "under torchrun builds a missing set on rank 0 alone)")
        if refused is not None:
            return refused

        from pyface.data.builtin import SynthOptions

        import dataclasses

        import yaml

        valid = [f.name for f in dataclasses.fields(SynthOptions)]
        defaults = {f.name: f.default for f in dataclasses.fields(SynthOptions)}
        kw = {}
        for item in args.overrides:
            k, sep, v = item.partition("=")
            if not sep or k not in valid:
                print(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(valid)}",
                      file=sys.stderr)
                return 2
            kw[k] = yaml.safe_load(v)
            want = type(defaults[k]) if defaults[k] is not None else int   # resolution: int
            ok = isinstance(kw[k], (int, float)) and not isinstance(kw[k], bool) \
                if want is float else isinstance(kw[k], want) and \
                (want is bool or not isinstance(kw[k], bool))
            if not ok:
                print(f"pyface data cache: --set {k}: expected {want.__name__}, got {v!r}",
                      file=sys.stderr)
                return 2
        try:
            cfg = SynthOptions(**kw).synth_config(args.build)
        except (ValueError, TypeError) as exc:
            field, _, msg = str(exc).partition(": ")
            where = "--build" if field == "resolution" and "resolution" not in kw else \
                f"--set {field}"
            print(f"pyface data cache: {where}: {msg or exc}", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        root = cached(cfg, progress=True)
        print(f"{root} ({time.perf_counter() - t0:.1f} s)")
        return 0
    base = os.path.join(cache_dir(), "synthetic")
    names = sorted(os.listdir(base)) if os.path.isdir(base) else []
    # a generation killed before its rename leaves its hidden temporary folder behind
    stale = [n for n in names if n.startswith(".") and ".tmp-" in n
             and os.path.isdir(os.path.join(base, n))]
    names = [n for n in names if not n.startswith(".") and not n.endswith(".lock")]
    print(f"{base}: {plural(len(names), 'dataset')}")
    for n in stale:
        print(f"  {n}  (temporary folder of an interrupted generation; no run uses it, delete it "
              "unless a generation is running)")
    for n in names:
        root = os.path.join(base, n)
        if not is_complete(root):
            print(f"  {n}  (incomplete)")
            continue
        try:
            with open(os.path.join(root, "synth.json")) as f:
                s = json.load(f)
            print(f"  {n}  {plural(s['frames'], 'frame')}, generated in {s['seconds']:.1f} s")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"  {n}  (unreadable synth.json: {exc})")
    return 0


def _check(args) -> int:
    import os

    from pyface.data.format import check_dataset
    from pyface.data.prepare import damaged_videos

    records, problems = check_dataset(args.root, deep=not args.fast)
    frames = sum(r.num_frames for r in records)
    for p in problems:
        print(f"ERROR {p}")
    damaged = damaged_videos(args.root, [r.name for r in records])
    for d in damaged:           # usable (its frames up to the damage), so no error
        print(f"WARNING {d}")
    extra = ""
    for sub, what in (("cross", "cross-identity videos"), ("multiview", "second views")):
        d = os.path.join(args.root, sub)
        if not os.path.isfile(os.path.join(d, "index.json")):
            continue
        rc, pc = check_dataset(d, deep=not args.fast)
        for p in pc:
            print(f"ERROR {p}")
        problems += pc
        extra += f" (+ {len(rc)} {what}, {sum(r.num_frames for r in rc)} frames)"
    status = "OK" if not problems else plural(len(problems), "problem")
    if damaged:
        status += (f"; {plural(len(damaged), 'video')} prepared from a truncated or damaged "
                   "source (its frames before the damage)")
    print(f"{args.root}: {plural(len(records), 'video')}, {plural(frames, 'frame')}{extra}: "
          f"{status}")
    return 0 if not problems else 1


def _prepare(args) -> int:
    import warnings

    from pyface.data.format import DataError
    from pyface.data.prepare import CLI_OPTIONS, PrepareConfig, parse_shard, prepare, shard_line
    from pyface.train.distributed import refuse_under_torchrun

    refused = refuse_under_torchrun(
        "pyface data prepare", "run the same command without torchrun (--workers N prepares N "
        "videos in parallel)")
    if refused is not None:
        return refused

    try:
        shard = None if args.shard is None else parse_shard(args.shard)
        cfg = PrepareConfig(out=args.out, crop=args.crop, resolution=args.resolution,
                            workers=args.workers, skip_bad=args.skip_bad, resume=args.resume,
                            fit=not args.no_fit, fit_steps=args.fit_steps,
                            submission_offsets=args.submission_offsets, bfm=args.bfm,
                            appearance=not args.no_appearance,
                            photometric=not args.no_photometric, matting=args.matting,
                            matting_weights=args.matting_weights, progress=not args.quiet,
                            shard=shard)
    except ValueError as exc:   # name the command-line option, not the config field
        field, _, msg = str(exc).partition(": ")
        print(f"ERROR {CLI_OPTIONS.get(field, field)}: {msg}", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and not os.path.isdir(args.out):   # before any input is read
        print(f"ERROR --out {args.out}: exists and is not a folder", file=sys.stderr)
        return 2
    if _out_below_a_file(args.out, "ERROR "):
        return 2
    import signal

    class Terminated(KeyboardInterrupt):
        """SIGTERM (kill PID, a SLURM time limit or preemption): stopped like Ctrl-C, so the
        video being written is removed and the workers are stopped."""

    def terminated(signum, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, terminated)
    except ValueError:          # not the main thread: signals stay as they are
        previous = None
    try:
        def show(message, *_, **__):   # a line above the progress bars, not through them
            from tqdm import tqdm
            tqdm.write(f"WARNING {message}", file=sys.stderr)

        with warnings.catch_warnings():     # restores showwarning afterwards
            warnings.simplefilter("always")
            warnings.showwarning = show
            s = prepare(args.inputs, cfg)
    except ImportError as e:        # the prepare extra is missing: the command cannot run here
        print(f"ERROR {e}", file=sys.stderr)
        return 1
    except (DataError, ValueError) as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        how, code = (("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else
                     ("interrupted", 130))
        if shard is not None:
            print(f"\n{how}: the finished videos of shard {shard[0]}/{shard[1]} in "
                  f"{args.out} are kept; run the same command with --resume to prepare the rest "
                  f"of the shard, and pyface data index {args.out} once all shards finished",
                  file=sys.stderr)
            return code
        print(f"\n{how}: the finished videos in {args.out} are kept and indexed; run the "
              "same command with --resume to prepare the rest", file=sys.stderr)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    for r in s["results"]:
        j = r["jitter_px"]
        print(f"{r['name']}: {r['frames']}/{r['source_frames']} frames with a face, "
              f"jitter {j['before']:.3f} -> {j['after']:.3f} px, {r['seconds']:.1f} s")
    if s["skipped_finished"]:
        print(f"resumed: {plural(len(s['skipped_finished']), 'finished video')} skipped")
    for d in s["damaged"]:      # kept in part: the frames before the damage
        print(f"damaged: {d['name']}: {d['source']}: decoding failed at frame {d['frame']}, "
              f"{plural(d['frames_kept'], 'frame')} kept ({d['message']})")
    for b in s["bad"]:
        print(f"skipped: {b}")
    for m in s["ignored"]:
        print(f"ignored: {m}")
    where = args.out if shard is None else \
        f"{args.out}: shard {shard_line(shard, s['shard_videos'], s['total_videos'])}"
    print(f"{where}: prepared {plural(s['videos'], 'video')}, {plural(s['frames'], 'frame')} "
          f"in {s['seconds']:.1f} s ({s['fps']:.2f} frames/s); "
          f"{plural(len(s['bad']), 'bad input')} skipped"
          + (f", {plural(len(s['damaged']), 'damaged video')} kept up to the damage"
             if s["damaged"] else "")
          + (f", {plural(len(s['ignored']), 'folder entry', 'folder entries')} ignored"
             if s["ignored"] else ""))
    if shard is not None:
        print(f"index.json not written (shared by the shards): once all {shard[1]} shards "
              f"finished, run: pyface data index {args.out}")
    return 0


def _index(args) -> int:
    import os

    from pyface.data.format import DataError, write_index
    from pyface.data.prepare import check_same_options
    from pyface.train.distributed import refuse_under_torchrun

    refused = refuse_under_torchrun("pyface data index", "run the same command without torchrun")
    if refused is not None:
        return refused
    try:
        if os.path.isdir(args.root):    # write_index says why another path is no root
            check_same_options(args.root)
        recs = write_index(args.root)
    except DataError as exc:
        print(f"pyface data index: {exc}", file=sys.stderr)
        return 1
    print(f"{args.root}/index.json: {plural(len(recs), 'video')}")
    return 0


def _bench(args) -> int:
    from pyface.train.distributed import refuse_under_torchrun

    refused = refuse_under_torchrun(
        "pyface data bench", "run the same command without torchrun (--workers N loads in N "
        "processes)")
    if refused is not None:
        return refused
    for option, value, low in (("--batch-size", args.batch_size, 1), ("--samples", args.samples, 1),
                               ("--workers", args.workers, 0)):
        if value < low:
            print(f"pyface data bench: {option}: expected >= {low}, got {value}", file=sys.stderr)
            return 2
    from pyface.data.format import DataError
    from pyface.data.synthetic import SynthConfig

    cfg = None
    if args.root is None:
        try:
            cfg = SynthConfig(identities=args.identities,
                              videos_per_identity=args.videos_per_identity, frames=args.frames,
                              resolution=args.resolution, workers=args.workers, cross=False)
        except ValueError as exc:   # the config's field names are the options'
            field, _, msg = str(exc).partition(": ")
            print(f"pyface data bench: --{field.replace('_', '-')}: {msg}", file=sys.stderr)
            return 2
    try:
        return _bench_run(args, cfg)
    except DataError as exc:        # a bad --root
        print(f"pyface data bench: {exc}", file=sys.stderr)
        return 1


def _bench_run(args, cfg) -> int:
    import os
    import tempfile
    import time

    import torch

    from pyface.data.datasets import PairDataset
    from pyface.data.synthetic import generate

    # a --root is read first: one that is no dataset is the only thing said
    ds = PairDataset(args.root) if args.root is not None else None
    print(f"# cpu cores {os.cpu_count()}  torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = os.path.join(tmp, "synth")
            s = generate(root, cfg, progress=False)
            print(f"generate {args.identities}x{args.videos_per_identity}x{args.frames} at "
                  f"{args.resolution}^2 (no cross), {plural(s['workers'], 'worker')}: "
                  f"{s['seconds']:.2f} s "
                  f"({s['frames'] / s['seconds']:.1f} frames/s); CPU time of the render "
                  f"workers {s['render_cpu_seconds']:.2f} s "
                  f"({1e3 * s['render_cpu_seconds'] / s['frames']:.0f} ms/frame)", flush=True)
        ds = PairDataset(root) if ds is None else ds
        if len(ds) < args.batch_size:   # the loader drops the incomplete batch: none to time
            print(f"pyface data bench: --batch-size {args.batch_size} needs at least that many "
                  f"pairs, got {len(ds)} in {root} (more --frames / --identities, or a smaller "
                  "--batch-size)", file=sys.stderr)
            return 2
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                             num_workers=args.workers, drop_last=True,
                                             persistent_workers=args.workers > 0)
        # the loading's CPU time: the workers', or with --workers 0 this (the main) process's
        cpu_now = _children_cpu if args.workers > 0 else time.process_time
        n, t0, epochs, c0 = 0, None, 0, None
        while n < args.samples:
            for batch in loader:
                if t0 is None:   # exclude worker start-up and the first batch
                    t0, c0 = time.perf_counter(), cpu_now()
                    continue
                n += batch["driving"]["image"].shape[0]
                if n >= args.samples:
                    break
            epochs += 1
        dt = time.perf_counter() - t0
        cpu = cpu_now() - c0
        del loader
        who = plural(args.workers, "worker") if args.workers > 0 else "loaded in the main process"
        print(f"PairDataset at {ds.frame(0, 0)['image'].shape[-1]}^2, batch {args.batch_size}, "
              f"{who}: {n / dt:.1f} pairs/s ({n} pairs in {dt:.2f} s); CPU time of the "
              f"{'loader workers' if args.workers > 0 else 'main process'} "
              f"{1e3 * cpu / n:.2f} ms/pair")
        _load_note()
    return 0


def _children_cpu() -> float:
    """CPU seconds of this process's live child processes (the DataLoader workers)."""
    import os

    total = 0.0
    tck = os.sysconf("SC_CLK_TCK")
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if parts[1] == me:   # ppid
            total += (int(parts[11]) + int(parts[12])) / tck
    return total


def _load_note() -> None:
    import os

    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    print(f"# load average {load:.2f} on {os.cpu_count()} cores (wall-clock rates are lower "
          "bounds when other work shares the cores)")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="pyface")
    add_parser(parser.add_subparsers())
    a = parser.parse_args()
    sys.exit(a.func(a))
