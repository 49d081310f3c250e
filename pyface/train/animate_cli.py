"""``pyface animate``: a trained model's pipeline on a source image and a driving video."""
from __future__ import annotations

import argparse
import sys

from pyface.cli import parse_name_paths, plural


def add_parser(subparsers) -> None:
    from pyface.train.cli import add_import_argument
    from pyface.train.registry import MODELS

    a = subparsers.add_parser(
        "animate", help="animate a source portrait with a trained model",
        description="Animate SOURCE with a trained model's inference pipeline "
                    "(pyface.models.load): the source is encoded once, then the driving frames "
                    "are streamed through it. Writes an mp4 of side-by-side source | driving | "
                    "result frames and prints the frames per second of the animation (source "
                    "encoding, reading and writing excluded). Driving frames are read --batch "
                    "at a time, so long videos need little memory. The inputs are checked "
                    "before the model loads: a source or driving without a label the model "
                    "needs (camera, 3DMM coefficients) and a missing --driving for a model "
                    "with no default motion are refused.",
        epilog="example: pyface animate example --checkpoint runs/example --source face.png "
               "--driving data/test/test0000_v00 --out anim.mp4")
    a.add_argument("model", help=f"registered model: {', '.join(sorted(MODELS))}, or a plugin's")
    a.add_argument("--checkpoint", required=True,
                   help="a run folder (latest checkpoint), a checkpoint folder or a weights folder")
    a.add_argument("--source", default=None,
                   help="source: an image (centre-cropped when not square), a video file or a "
                        "folder of images (the first frame), or a pyface video folder (its first "
                        "frame and labels); required, except for a generator animated from "
                        "--seeds")
    a.add_argument("--driving", default=None, metavar="DIR_OR_VIDEO",
                   help="driving: a pyface video folder (frames + coeffs.npy + dataset.json + "
                        "landmarks.npy, as `pyface data synth` writes), a video file or a folder "
                        "of images; omitted: the model's default motion (example: an orbit)")
    a.add_argument("--out", default="animation.mp4",
                   help="output video: a file name ending in " + ", ".join(OUT_EXTS) + ", or a "
                        "folder (existing, or given with a trailing /): FOLDER/animation.mp4; "
                        "missing parent folders are created (default: animation.mp4)")
    a.add_argument("--frames", type=int, default=None,
                   help="at most this many driving frames (default: all; 48 without --driving)")
    a.add_argument("--stride", type=int, default=None,
                   help="use every n-th driving frame (default 1; not with --seeds)")
    a.add_argument("--fps", type=float, default=None,
                   help="output frame rate, > 0 (default: the driving video's / --stride, else "
                        "25; 24 for --seeds)")
    a.add_argument("--batch", type=int, default=None,
                   help="driving frames per generate call (default 8; not with --seeds)")
    a.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    a.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights where the run kept them (default); --no-ema: the "
                        "live weights")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.add_argument("--seeds", default=None,
                   help="generators (eg3d): instead of a source, orbit videos of these latent "
                        "seeds side by side, e.g. 0-3 (--frames, --fps, --truncation apply; "
                        "--source, --driving, --stride and --batch are refused)")
    a.add_argument("--truncation", type=float, default=0.7,
                   help="generators (eg3d), with --seeds: truncation psi (default 0.7)")
    a.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                   help="a pretrained network the source encoding uses (repeatable), for models "
                        "whose source encoding optimises a loss: otavatar's inversion takes "
                        "vgg=PATH (pyface convert vgg19) and arcface=PATH")
    add_import_argument(a)
    a.set_defaults(func=run_animate)


#: models that animate latent seeds without a source image: name -> "module:function(args)"
SEED_ANIMATORS = {"eg3d": "pyface.models.eg3d.cli:run_animate"}

#: the file types --out may name (imageio + ffmpeg; .gif through Pillow)
OUT_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".gif")


def resolve_out(out: str, default_name: str = "animation.mp4") -> str:
    """``--out`` -> the video file to write: an existing folder, or a name ending in a path
    separator, gets ``default_name`` inside; otherwise the name must end in one of
    :data:`OUT_EXTS` and no existing part of its folder may be a file (ValueError naming
    ``--out`` otherwise). Checked before any work, so a typo costs no inference."""
    import os

    if not out:
        raise ValueError("--out: expected a video file name or a folder, got ''")
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        out = os.path.join(out, default_name)
    ext = os.path.splitext(out)[1].lower()
    if ext not in OUT_EXTS:
        raise ValueError(f"--out: expected a video file name ending in {', '.join(OUT_EXTS)} (or "
                         f"a folder), got {out!r}")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out}: cannot create its folder: {parent} is a file")
    return out


def check_animate_args(args) -> None:
    """The numeric options' ranges, each error naming its option and the value given."""
    import math

    for name in ("batch", "stride", "frames"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name}: expected an integer >= 1, got {v}")
    for name in ("source", "driving", "checkpoint"):
        if getattr(args, name) == "":
            raise ValueError(f"--{name}: expected a path, got ''")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise ValueError(f"--fps: expected a frame rate > 0, got {args.fps}")
    if not math.isfinite(args.truncation):
        raise ValueError(f"--truncation: expected a finite number, got {args.truncation}")
    args.weights = parse_name_paths(getattr(args, "weights", None), must_exist=True)


def label_error(exc: Exception, args) -> str:
    """The one-line message of an input error; a missing label (camera, coeffs, ...) of a plain
    image or video gets the `pyface data prepare` hint."""
    from pyface.data.driving import is_video_folder

    msg = str(exc).strip('"')
    plain = [p for p in (args.source, args.driving) if p and not is_video_folder(p)]
    if plain and any(f"'{k}'" in msg for k in ("camera", "coeffs", "landmarks", "motion",
                                               "mask")):    # a label an image lacks
        msg += (". An image or video file carries the image only; `pyface data prepare FILE "
                "--out DIR` adds the camera, 3DMM coefficients and landmarks: pass its video "
                "folder DIR/NAME instead")
    return msg


def side_by_side(*columns) -> "torch.Tensor":  # noqa: F821
    """Columns of (T, 3, H, W) (or (3, H, W), repeated) in [-1, 1] -> (T, 3, H', n * W'),
    every column resized (antialiased) to the last one's (H', W'), the result's size."""
    import torch

    T = max(c.shape[0] for c in columns if c.dim() == 4)
    size = tuple(columns[-1].shape[-2:])
    cols = []
    for c in columns:
        c = c.float().cpu()
        c = c.unsqueeze(0).expand(T, -1, -1, -1) if c.dim() == 3 else c
        if tuple(c.shape[-2:]) != size:
            c = torch.nn.functional.interpolate(c, size=size, mode="bilinear", antialias=True,
                                                align_corners=False)
        cols.append(c)
    return torch.cat(cols, dim=-1)


class VideoWriter:
    """Streams (T, 3, H, W) chunks in [-1, 1] to an mp4 (imageio + ffmpeg, H.264 yuv420p); a GIF
    next to it when ffmpeg is missing. ``path`` is the written file after :meth:`close`."""

    def __init__(self, path: str, fps: float):
        import os

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.fps = path, fps
        self._writer = None
        self._gif: list = []

    def append(self, frames) -> None:
        import warnings

        import imageio.v2 as imageio

        from pyface.train.monitor import to_uint8

        arr = to_uint8(frames).numpy()
        H, W = arr.shape[1:3]
        arr = arr[:, : H - H % 2, : W - W % 2]          # yuv420p needs even sizes
        if self._writer is None and not self._gif:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._writer = imageio.get_writer(
                        self.path, fps=self.fps, codec="libx264", quality=8, macro_block_size=1,
                        pixelformat="yuv420p")
            except Exception as exc:  # ffmpeg plugin or binary missing
                import logging
                import os

                gif = os.path.splitext(self.path)[0] + ".gif"
                logging.getLogger("pyface").warning("mp4 output failed (%s); writing %s instead",
                                                    exc, gif)
                self.path = gif
        for frame in arr:
            if self._writer is not None:
                self._writer.append_data(frame)
            else:
                self._gif.append(frame)

    def close(self) -> str:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        elif self._gif:
            import imageio.v2 as imageio

            imageio.mimwrite(self.path, self._gif, duration=1.0 / self.fps)
            self._gif = []
        return self.path


def run_animate(args) -> int:
    import os
    import time

    import torch
    from tqdm import tqdm

    import pyface.models
    from pyface.checkpoint import CheckpointError
    from pyface.data.driving import (count_driving, frame_labels, iter_driving, read_source,
                                     video_fps)
    from pyface.data.format import DataError
    from pyface.train.model import Pipeline, motion_length
    from pyface.train.registry import import_plugins

    def fail(msg: str, code: int) -> int:
        print(f"pyface animate: {msg}", file=sys.stderr)
        return code

    from pyface.train.cli import resolve_device

    try:
        check_animate_args(args)
        args.out = resolve_out(args.out)
        for opt in ("source", "driving"):
            given = getattr(args, opt)
            if given and os.path.realpath(given) == os.path.realpath(args.out):
                raise ValueError(f"--out {args.out}: the same file as --{opt}; writing it would "
                                 "destroy the input: choose another --out")
        args.device = resolve_device(args.device)
    except ValueError as exc:
        return fail(str(exc), 2)
    if args.seeds is not None or (args.source is None and args.model in SEED_ANIMATORS):
        if args.model not in SEED_ANIMATORS:
            return fail(f"--seeds: model {args.model!r} is not a generator; models animated from "
                        f"seeds: {', '.join(sorted(SEED_ANIMATORS))}", 2)
        if args.source is not None or args.driving is not None:
            return fail("--seeds renders latent seeds along an orbit and takes no --source or "
                        "--driving (without --seeds, --source and --driving animate an image)",
                        2)
        given = [f"--{k}" for k in ("stride", "batch") if getattr(args, k) is not None]
        if given:
            return fail(f"--seeds renders every orbit frame and takes no {' or '.join(given)} "
                        "(they pick and batch driving frames)", 2)
        import importlib

        module, fn = SEED_ANIMATORS[args.model].split(":")
        args.frames = args.frames or 48
        return getattr(importlib.import_module(module), fn)(args)
    args.stride = 1 if args.stride is None else args.stride
    args.batch = 8 if args.batch is None else args.batch
    if args.source is None:
        return fail("--source is required (an image, a pyface video folder or a video file)", 2)
    needs_driving = (f"model {args.model!r} needs --driving (a video folder, video file or "
                     "frame folder)")
    try:
        import_plugins(args.imports)
        pipeline_cls = getattr(pyface.models.model_class(args.model), "Pipeline", None)
    except (KeyError, ValueError, ImportError) as exc:
        return fail(str(exc).strip('"'), 2)
    if isinstance(pipeline_cls, type) and issubclass(pipeline_cls, Pipeline):
        # what the inputs must carry, from their files alone: refused before the weights load
        # and the source is encoded (an inversion takes minutes)
        if args.driving is None and pipeline_cls.needs_driving():
            return fail(needs_driving, 2)
        try:
            pipeline_cls.check_labels(
                source=frame_labels(args.source),
                driving=None if args.driving is None else frame_labels(args.driving))
        except (DataError, KeyError, ValueError) as exc:
            return fail(label_error(exc, args), 1)
    try:
        pipe = pyface.models.load(args.model, args.checkpoint, device=args.device, ema=args.ema,
                                  weights=args.weights or None)
    except (KeyError, ValueError, ImportError) as exc:
        return fail(str(exc).strip('"'), 2)
    except CheckpointError as exc:
        return fail(str(exc), 1)
    R = pipe.resolution
    try:
        source = read_source(args.source, R)
        T = None
        if args.driving is not None:
            T = count_driving(args.driving, max_frames=args.frames, stride=args.stride)
            chunks = iter_driving(args.driving, R, chunk=args.batch, max_frames=args.frames,
                                  stride=args.stride)
    except (DataError, OSError, ValueError) as exc:
        return fail(str(exc), 1)
    if args.driving is None:
        motion = pipe.default_motion(args.frames or 48)
        if motion is None:
            return fail(needs_driving, 2)
        T = motion_length(motion)
    fps = args.fps
    if fps is None and args.driving is not None and video_fps(args.driving):
        fps = video_fps(args.driving) / args.stride          # keep the driving video's speed
    fps = fps or 25.0
    try:
        writer = VideoWriter(args.out, fps)
    except OSError as exc:
        return fail(f"--out {args.out}: {exc.strerror or exc}", 1)
    sync = (lambda: torch.cuda.synchronize(pipe.device)) if pipe.device.type == "cuda" \
        else (lambda: None)
    done, seconds = 0, 0.0
    try:
        with torch.no_grad():
            state = pipe.encode_source(source)
            src = source["image"].cpu()
            bar = tqdm(total=T, unit="frame", disable=args.no_progress, dynamic_ncols=True)
            if args.driving is None:
                sync()
                t0 = time.perf_counter()
                for _, frames in pipe.stream(state, None, motion=motion, chunk=args.batch):
                    sync()
                    seconds += time.perf_counter() - t0
                    writer.append(side_by_side(src, frames))
                    done += frames.shape[0]
                    bar.update(frames.shape[0])
                    t0 = time.perf_counter()
            else:
                for part in chunks:                      # read one chunk at a time
                    sync()
                    t0 = time.perf_counter()
                    frames = pipe.generate(state, pipe.encode_driving(part))
                    sync()
                    seconds += time.perf_counter() - t0
                    writer.append(side_by_side(src, part["image"], frames))
                    done += frames.shape[0]
                    bar.update(frames.shape[0])
            bar.close()
    except (DataError, KeyError, ValueError) as exc:   # KeyError: a label the model needs
        writer.close()
        return fail(label_error(exc, args), 1)
    if done == 0:
        writer.close()
        return fail(f"{args.driving}: no driving frames", 1)
    out = writer.close()
    rate = done / max(seconds, 1e-9)
    print(f"{out}\n  {plural(done, 'frame')} at {R}x{R}; animate: {rate:.1f} frames/s "
          f"on {pipe.device} (source encoding, reading and video writing excluded)")
    return 0
