"""``pyface data``: generate, index, validate and benchmark talking-head datasets."""
from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="synthetic talking-head data, dataset index and checks",
                              description="Generate the synthetic ground-truth dataset, write a "
                                          "dataset index, validate a dataset, benchmark loading.")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    s = sub.add_parser("synth", help="render a synthetic talking-head dataset",
                       description="Render talking-head videos of the built-in procedural head "
                                   "model with exact ground truth (see docs/data.md).")
    s.add_argument("--out", required=True, help="output dataset root")
    s.add_argument("--identities", type=int, default=4)
    s.add_argument("--videos-per-identity", type=int, default=2)
    s.add_argument("--frames", type=int, default=32, help="frames per video")
    s.add_argument("--resolution", type=int, default=256)
    s.add_argument("--fps", type=float, default=25.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    s.add_argument("--no-cross", action="store_true",
                   help="skip the cross-identity ground truth (ROOT/cross)")
    s.add_argument("--no-masks", action="store_true", help="do not write masks/")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_synth)

    c = sub.add_parser("check", help="report missing or corrupt files of a dataset",
                       description="Validate a dataset root: index, meta.json, dataset.json "
                                   "(finite, orthonormal cameras), coeffs.npy (T, 257), "
                                   "landmarks.npy, and every frame and mask (decoded).")
    c.add_argument("root")
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
    q.add_argument("--crop", choices=("eg3d", "fomm"), default="eg3d")
    q.add_argument("--resolution", type=int, choices=(256, 512), default=256)
    q.add_argument("--workers", type=int, default=1, help="videos prepared in parallel")
    q.add_argument("--skip-bad", action="store_true",
                   help="warn about unreadable inputs (and inputs without a face) and go on")
    q.add_argument("--resume", action="store_true", help="skip videos already finished in --out")
    q.add_argument("--no-fit", action="store_true",
                   help="skip the 3DMM fit (zero coefficients, frontal EG3D cameras)")
    q.add_argument("--no-appearance", action="store_true",
                   help="do not fit albedo and lighting (tex and gamma stay 0)")
    q.add_argument("--fit-steps", type=int, default=100, help="L-BFGS iterations of the 3DMM fit")
    q.add_argument("--bfm", default=None, metavar="PATH",
                   help="fit Deep3DFaceRecon's BFM_model_front.mat instead of the built-in head")
    q.add_argument("--submission-offsets", action="store_true",
                   help="add EG3D's FFHQ submission offsets to the camera labels")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_prepare)

    i = sub.add_parser("index", help="(re)write ROOT/index.json by scanning the video folders")
    i.add_argument("root")
    i.set_defaults(func=_index)

    b = sub.add_parser("bench", help="time the synthetic engine and the pair loader",
                       description="Generates a dataset into a temporary folder (timed), then "
                                   "times PairDataset through a DataLoader.")
    b.add_argument("--identities", type=int, default=4)
    b.add_argument("--videos-per-identity", type=int, default=2)
    b.add_argument("--frames", type=int, default=32)
    b.add_argument("--resolution", type=int, default=256)
    b.add_argument("--workers", type=int, default=2, help="generation processes and loader workers")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--samples", type=int, default=1024, help="pairs to load")
    b.add_argument("--root", default=None, help="use this existing dataset instead of generating")
    b.set_defaults(func=_bench)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _synth(args) -> int:
    from pyface.data.synthetic import SynthConfig, generate

    cfg = SynthConfig(identities=args.identities, videos_per_identity=args.videos_per_identity,
                      frames=args.frames, resolution=args.resolution, fps=args.fps, seed=args.seed,
                      workers=args.workers, cross=not args.no_cross, masks=not args.no_masks)
    s = generate(args.out, cfg, progress=not args.quiet)
    print(f"wrote {s['videos']} videos + {s['cross_videos']} cross-identity videos "
          f"({s['frames']} frames) to {args.out} in {s['seconds']:.1f} s with {s['workers']} workers")
    return 0


def _check(args) -> int:
    import os

    from pyface.data.format import check_dataset

    records, problems = check_dataset(args.root, deep=not args.fast)
    frames = sum(r.num_frames for r in records)
    for p in problems:
        print(f"ERROR {p}")
    cross = os.path.join(args.root, "cross")
    extra = ""
    if os.path.isfile(os.path.join(cross, "index.json")):
        rc, pc = check_dataset(cross, deep=not args.fast)
        for p in pc:
            print(f"ERROR {p}")
        problems += pc
        extra = f" (+ {len(rc)} cross-identity videos, {sum(r.num_frames for r in rc)} frames)"
    status = "OK" if not problems else f"{len(problems)} problem(s)"
    print(f"{args.root}: {len(records)} videos, {frames} frames{extra}: {status}")
    return 0 if not problems else 1


def _prepare(args) -> int:
    import warnings

    from pyface.data.format import DataError
    from pyface.data.prepare import PrepareConfig, prepare

    try:
        cfg = PrepareConfig(out=args.out, crop=args.crop, resolution=args.resolution,
                            workers=args.workers, skip_bad=args.skip_bad, resume=args.resume,
                            fit=not args.no_fit, fit_steps=args.fit_steps,
                            submission_offsets=args.submission_offsets, bfm=args.bfm,
                            appearance=not args.no_appearance,
                            progress=not args.quiet)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.formatwarning = lambda m, *a, **k: f"WARNING {m}\n"
            s = prepare(args.inputs, cfg)
    except ImportError as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 2
    except (DataError, ValueError) as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 1
    for r in s["results"]:
        j = r["jitter_px"]
        print(f"{r['name']}: {r['frames']}/{r['source_frames']} frames with a face, "
              f"jitter {j['before']:.3f} -> {j['after']:.3f} px, {r['seconds']:.1f} s")
    if s["skipped_finished"]:
        print(f"resumed: {len(s['skipped_finished'])} finished videos skipped")
    print(f"{args.out}: prepared {s['videos']} videos, {s['frames']} frames in {s['seconds']:.1f} s "
          f"({s['fps']:.2f} frames/s); {len(s['bad'])} bad input(s) skipped")
    return 0


def _index(args) -> int:
    from pyface.data.format import write_index

    recs = write_index(args.root)
    print(f"{args.root}/index.json: {len(recs)} videos")
    return 0


def _bench(args) -> int:
    import os
    import tempfile
    import time

    import torch

    from pyface.data.datasets import PairDataset
    from pyface.data.synthetic import SynthConfig, generate

    print(f"# cpu cores {os.cpu_count()}  torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = os.path.join(tmp, "synth")
            cfg = SynthConfig(identities=args.identities, videos_per_identity=args.videos_per_identity,
                              frames=args.frames, resolution=args.resolution, workers=args.workers,
                              cross=False)
            s = generate(root, cfg, progress=False)
            print(f"generate {args.identities}x{args.videos_per_identity}x{args.frames} at "
                  f"{args.resolution}^2 (no cross), {s['workers']} workers: {s['seconds']:.2f} s "
                  f"({s['frames'] / s['seconds']:.1f} frames/s); CPU time of the render "
                  f"workers {s['render_cpu_seconds']:.2f} s "
                  f"({1e3 * s['render_cpu_seconds'] / s['frames']:.0f} ms/frame)", flush=True)
        ds = PairDataset(root)
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                             num_workers=args.workers, drop_last=True,
                                             persistent_workers=args.workers > 0)
        n, t0, epochs, c0 = 0, None, 0, None
        while n < args.samples:
            for batch in loader:
                if t0 is None:   # exclude worker start-up and the first batch
                    t0, c0 = time.perf_counter(), _children_cpu()
                    continue
                n += batch["driving"]["image"].shape[0]
                if n >= args.samples:
                    break
            epochs += 1
        dt = time.perf_counter() - t0
        cpu = _children_cpu() - c0
        del loader
        print(f"PairDataset at {ds.frame(0, 0)['image'].shape[-1]}^2, batch {args.batch_size}, "
              f"{args.workers} workers: {n / dt:.1f} pairs/s ({n} pairs in {dt:.2f} s); CPU time "
              f"of the loader workers {1e3 * cpu / n:.2f} ms/pair")
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
