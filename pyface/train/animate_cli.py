"""``pyface animate``: a trained model's pipeline on a source image and a driving video."""
from __future__ import annotations

import argparse
import sys

from pyface.cli import file_in_the_way, parse_name_paths, plural


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
                        "seeds side by side, e.g. 0-3 (--frames, --fps, --truncation, --seed "
                        "and --compile apply; --source, --driving, --stride, --batch, "
                        "--camera and --control are refused)")
    a.add_argument("--truncation", type=float, default=0.7,
                   help="generators (eg3d), with --seeds: truncation psi (default 0.7)")
    a.add_argument("--camera", choices=CAMERA_MODES, default=None,
                   help="3D-aware models (" + ", ".join(CAMERA_MODELS) + ", a plugin whose "
                        "pipeline has a camera): the view of every frame: 'driving' (the "
                        "driving frames' cameras), 'source' (fixed at the source's camera) or "
                        "'orbit' (free view: an ellipse of +-20 degrees yaw and +-8 degrees "
                        "pitch around the head, one turn over the animated frames); needs "
                        "--driving; default: what the model does (the driving cameras where "
                        "they have them). "
                        "Example: --camera orbit")
    a.add_argument("--control", action="append", default=[], metavar="NAME=VALUE",
                   help="a keyword control of the model's generate (repeatable), passed to "
                        "every generate call, checked against its signature before the model "
                        "loads and parsed by its type (bool: true/false, int, float, str; "
                        "untyped: a Python literal such as 0,20,0 or {3: 2.0}, else text): "
                        "example: yaw_scale; goha: expression, appearance, composite; "
                        "export3d: lam_scale, chunk; mmfa: cross_identity, rotation, angles, "
                        "scale, translation, expression. Example: --control yaw_scale=0.5")
    a.add_argument("--seed", default=None, metavar="N",
                   help="seed of the random numbers a model draws (OTAvatar's source inversion "
                        "samples rays at random, EG3D and GOHA render random ray samples): "
                        "torch is seeded with N before the source encoding and with N + t "
                        "before the chunk whose first frame is t (EG3D and GOHA draw frame i's "
                        "ray samples from a generator of (N, i), whatever --batch), so the same "
                        "command gives the same frames; 'none': torch's random state as it is "
                        "(frames differ from run to run) (default 0)")
    a.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                   help="a pretrained network the source encoding uses (repeatable), for models "
                        "whose source encoding optimises a loss: otavatar's inversion takes "
                        "vgg=PATH (pyface convert vgg19) and arcface=PATH")
    add_option_argument(a, "animate")
    add_compile_argument(a, "the frames per second printed leave out the chunks that compiled "
                            "(and say how long they took)")
    add_import_argument(a)
    a.set_defaults(func=run_animate, check=check_animate)


#: models that animate latent seeds without a source image: name -> "module:function(args)"
#: (``args.model_options``: the checked ``--option`` values, or None, for the model's load)
SEED_ANIMATORS = {"eg3d": "pyface.models.eg3d.cli:run_animate"}
#: their parse of --seeds (name -> "module:function(text)", ValueError for a bad one) and the
#: seeds they animate without it
SEED_PARSERS = {"eg3d": ("pyface.models.eg3d.pipeline:parse_seeds", "0-3")}

#: --camera: the view of the frames, one meaning for every 3D-aware model (OTAvatar's and
#: Export3D's ``generate(camera=...)`` modes)
CAMERA_MODES = ("driving", "source", "orbit")

#: the built-in models that take --camera (for the help; an error lists the registered ones)
CAMERA_MODELS = ("eg3d", "example", "export3d", "goha", "goha_s1", "goha_s1_gan", "otavatar")

#: the file types --out may name (imageio + ffmpeg; .gif through Pillow)
OUT_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".gif")


def add_option_argument(parser, command: str) -> None:
    """``--option KEY=VALUE`` (repeatable): an inference option of the trained model, passed to
    ``pyface.models.load(..., options=...)`` (``pyface animate``, ``pyface eval``; ``pyface
    invert``, whose inverter builds the generator with them)."""
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="an inference option of the trained model (repeatable), replacing the value its "
             "checkpoint saved, e.g. --option model.pti_steps=50 --option inference=reference "
             "(otavatar), --option model.sr_noise=random (goha) or --option "
             "generator.render.depth_resolution=96 (eg3d: a field of a nested config by its "
             "dotted path; otavatar's renderer: render.depth_resolution=96, a key of its "
             "model.render overrides); KEY with or without 'model.', VALUE read like a pyface "
             "train --set "
             "value. Only the model's inference "
             "options (pyface.models.inference_options(NAME); a wrong key lists them), which "
             f"change no weights. pyface {command} exits 2 for a bad key or value")


def parse_model_options(args) -> dict:
    """``args.option`` (``--option KEY=VALUE`` items) -> the checked ``{field: value}`` of
    ``args.model`` (:func:`pyface.models.check_options`); ValueError naming the key."""
    items = getattr(args, "option", None) or []
    if not items:
        return {}
    from pyface.models import check_options
    from pyface.train.config import parse_options

    return check_options(args.model, parse_options(items))


def add_compile_argument(parser, timing: str, *, work: str = "frames",
                         again: str = "a new batch size compiles again",
                         result: str = "Frames are those of the uncompiled model") -> None:
    """``--compile [MODE]`` (``pyface animate``, ``pyface eval``, ``pyface invert``): the value
    is checked by :func:`parse_compile_option`. ``timing``: what the command's timing leaves
    out; ``work``: what the command runs, in the plural (``frames``, ``steps``); ``again``:
    what compiles again; ``result``: what equals the uncompiled model's to float rounding; for
    the help."""
    from pyface.nn.compiling import COMPILE_CHOICES

    parser.add_argument(
        "--compile", nargs="?", const="default", default=None, metavar="MODE",
        help="torch.compile the model's heavy modules (its pipeline's compile_modules, e.g. "
             "EG3D's synthesis network, renderer and super-resolution) before running: MODE one "
             f"of {', '.join(COMPILE_CHOICES)}; --compile alone means default (Inductor); "
             f"aot_eager and eager only capture graphs (debugging). The first {work} are slow "
             f"while the modules compile (seconds to minutes), later {work} run faster; {again}; "
             f"{timing}. {result} to float rounding. On CPU, "
             "Inductor needs a C++ compiler (g++ or clang++, or the one named by CXX). Example: "
             "--compile (default: no compilation)")


def parse_compile_option(value):
    """``--compile``'s value -> the mode string for :meth:`pyface.train.model.Pipeline.compile`
    (None: not given, or off); ValueError naming ``--compile``, the modes and the value."""
    from pyface.nn.compiling import parse_compile

    options = parse_compile(value, what="--compile")
    return None if options is None else options.choice


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
    parent = file_in_the_way(out)
    if parent is not None:
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
    args.seed = parse_seed(getattr(args, "seed", None))
    if not math.isfinite(args.truncation):
        raise ValueError(f"--truncation: expected a finite number, got {args.truncation}")
    args.weights = parse_name_paths(getattr(args, "weights", None), must_exist=True)
    args.compile = parse_compile_option(getattr(args, "compile", None))


def seed_animation(args) -> bool:
    """Whether the command animates latent seeds (--seeds, or a generator without --source)."""
    return args.seeds is not None or (args.source is None and args.model in SEED_ANIMATORS)


def check_seed_args(args) -> None:
    """The options of a seed animation: a generator, and none of the options that animate a
    source (ValueError naming them)."""
    if args.model not in SEED_ANIMATORS:
        raise ValueError(f"--seeds: model {args.model!r} is not a generator; models animated "
                         f"from seeds: {', '.join(sorted(SEED_ANIMATORS))}")
    if args.source is not None or args.driving is not None:
        raise ValueError("--seeds renders latent seeds along an orbit and takes no --source or "
                         "--driving (without --seeds, --source and --driving animate an image)")
    given = [f"--{k}" for k in ("stride", "batch") if getattr(args, k) is not None]
    if given:
        raise ValueError(f"--seeds renders every orbit frame and takes no {' or '.join(given)} "
                         "(they pick and batch driving frames)")
    given = [f"--{k}" for k in ("camera", "control") if getattr(args, k)]
    if given:
        raise ValueError(f"--seeds renders latent seeds along EG3D's orbit and takes no "
                         f"{' or '.join(given)} (they steer a source's animation)")


def check_animate(args) -> int:
    """``pyface animate`` under ``PYFACE_PARSE_ONLY=1``: the option values (ranges, --seed,
    --weights, --compile, a seed animation's options and EG3D's --seeds), --device whether or
    not this machine has it, and the model's name;
    nothing loaded or rendered. What the checkpoint and the inputs hold is not checked (they may
    not exist yet): the missing ones are named."""
    import os

    from pyface.train.cli import check_device
    from pyface.train.registry import import_plugins, model_class

    check_animate_args(args)
    check_device(args.device)
    import_plugins(args.imports)
    model_class(args.model)
    parse_model_options(args)
    if seed_animation(args):
        check_seed_args(args)
        if args.model in SEED_PARSERS:
            import importlib

            target, default = SEED_PARSERS[args.model]
            module, fn = target.split(":")
            getattr(importlib.import_module(module), fn)(args.seeds or default)
    missing = [f"--{k} {getattr(args, k)}" for k in ("checkpoint", "source", "driving")
               if getattr(args, k) and not os.path.exists(getattr(args, k))]
    if missing:
        print(f"pyface animate: not there yet, so not checked: {', '.join(missing)}",
              file=sys.stderr)
    return 0


def parse_seed(text) -> int | None:
    """``--seed`` -> an int >= 0 (None, not given: 0) or None for ``none``; ValueError naming
    ``--seed`` and the value otherwise."""
    if text is None:
        return 0
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    if str(text).strip().lower() == "none":
        return None
    try:
        seed = int(str(text).strip())
    except ValueError:
        seed = -1
    if seed < 0:
        raise ValueError(f"--seed: expected an integer >= 0 or 'none', got {text!r}")
    return seed


def camera_models() -> list[str]:
    """The registered models whose pipeline has a camera (:meth:`Pipeline.camera_control`),
    plugins included; a model that fails to import is left out."""
    from pyface.train.model import Pipeline
    from pyface.train.registry import model_class, model_names

    out = []
    for name in model_names():
        try:
            pc = getattr(model_class(name), "Pipeline", None)
            if isinstance(pc, type) and issubclass(pc, Pipeline) and pc.camera_control():
                out.append(name)
        except Exception:  # noqa: BLE001 - a broken plugin is not this command's error
            continue
    return out


def orbit_cameras(pipe, frames: int) -> "torch.Tensor":  # noqa: F821
    """``(frames, 25)`` labels of ``--camera orbit``: the free-view orbit
    (:func:`pyface.face.cameras.free_view_orbit`: an ellipse of ``FREE_VIEW_YAW_DEG`` yaw and
    ``FREE_VIEW_PITCH_DEG`` pitch, one turn over ``frames``), at the camera radius and pivot of
    the pipeline's EG3D generator (``cfg.avg_camera_radius``, ``cfg.avg_camera_pivot`` of
    ``pipe.G``, ``pipe.model.generator`` or ``pipe.model``), else EG3D's FFHQ ones: the labels
    OTAvatar's and Export3D's ``generate(camera="orbit")`` render for frames 0 .. frames - 1 of
    a ``frames``-frame :meth:`~pyface.train.model.Pipeline.stream`."""
    from pyface.face.cameras import free_view_orbit

    model = getattr(pipe, "model", None)
    for owner in (getattr(pipe, "G", None), getattr(model, "generator", None), model):
        if hasattr(getattr(owner, "cfg", None), "avg_camera_radius"):
            return free_view_orbit(frames, generator=owner)
    return free_view_orbit(frames)


def split_controls(items, option: str = "--control") -> dict[str, str]:
    """``["NAME=VALUE", ...]`` -> ``{NAME: VALUE}`` (text), the last one winning, as
    :func:`pyface.cli.parse_name_paths` splits ``NAME=PATH``; ValueError naming ``option`` and
    the item."""
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip() or not value:
            raise ValueError(f"{option}: expected NAME=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _control_types(annotation, default) -> list:
    """What a control's text may become: a list of ``bool``, ``int``, ``float``, ``str``,
    ``None``, a tuple of Literal choices, or ``"literal"`` (untyped: a Python literal or text)."""
    import inspect
    import types
    import typing

    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        if isinstance(annotation, str):               # an annotation get_type_hints could not read
            parts = [a.strip() for a in annotation.split("|")]
            named = {"bool": bool, "int": int, "float": float, "str": str, "None": None}
            if all(p in named for p in parts):
                return [named[p] for p in parts]
        if isinstance(default, (bool, int, float, str)):
            return [type(default)]
        return ["literal"]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return [tuple(typing.get_args(annotation))]
    if origin in (typing.Union, types.UnionType):
        out = []
        for a in typing.get_args(annotation):
            out += [None] if a is type(None) else _control_types(a, default)
        return out
    if annotation in (bool, int, float, str):
        return [annotation]
    if annotation is None or annotation is type(None):
        return [None]
    return ["literal"]


def _type_text(kinds) -> str:
    words = []
    for k in kinds:
        if isinstance(k, tuple):
            words.append("one of " + ", ".join(repr(c) for c in k))
        elif k == "literal":
            words.append("a Python literal or text")
        elif k is None:
            words.append("none")
        else:
            words.append({bool: "a bool (true/false)", int: "an int", float: "a float",
                          str: "text"}[k])
    return " or ".join(words)


def _parse_control(text: str, kinds):
    """``text`` as the first of ``kinds`` it parses as; ValueError when none does."""
    import ast
    import math

    for k in kinds:
        if isinstance(k, tuple):                       # Literal choices, compared as text
            for c in k:
                if text == str(c):
                    return c
        elif k is None:
            if text.lower() == "none":
                return None
        elif k is bool:
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
        elif k is int:
            try:
                return int(text)
            except ValueError:
                pass
        elif k is float:
            try:
                v = float(text)
            except ValueError:
                continue
            if math.isfinite(v):
                return v
        elif k is str:
            return text
        elif k == "literal":
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return text
    raise ValueError


def generate_controls(pipeline_cls) -> tuple[dict, bool]:
    """The keyword controls of ``pipeline_cls.generate``: ``({name: (types, default)}, open)``
    (``open``: it takes ``**controls``, any name). The parameters after ``state`` and
    ``motion``."""
    import inspect
    import typing

    fn = pipeline_cls.generate
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name != "self"][2:]
    out, open_ = {}, False
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            open_ = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            ann = p.annotation
            if isinstance(ann, str):          # postponed: resolved in generate's module
                try:
                    scope = getattr(fn, "__globals__", {})
                    ann = eval(ann, dict(vars(typing)), scope)  # noqa: S307
                except Exception:  # noqa: BLE001 - unresolvable: _control_types reads the text
                    pass
            out[p.name] = (_control_types(ann, p.default), p.default)
    return out, open_


def parse_controls(items, pipeline_cls, model: str) -> dict:
    """``--control NAME=VALUE`` items -> ``generate`` keyword arguments of ``pipeline_cls``,
    each value parsed by its parameter's annotation (or its default's type). ValueError naming
    the control: an unknown name (listing the pipeline's controls), ``camera`` (``--camera``
    sets it) or a value that is not of the expected type."""
    given = split_controls(items)
    if not given:
        return {}
    controls, open_ = generate_controls(pipeline_cls)
    listed = ", ".join(f"{n} ({_type_text(k)}, default {d!r})" for n, (k, d) in
                       controls.items() if n != "camera")
    out = {}
    for name, text in given.items():
        if name == "camera":
            raise ValueError(f"--control camera: use --camera {{{','.join(CAMERA_MODES)}}} (the "
                             "view of every frame, one meaning for every model)")
        if name not in controls and not open_:
            raise ValueError(f"--control {name}: model {model!r} has no generate control "
                             f"{name!r}; " + (f"its controls: {listed}" if listed else
                                              "it takes none"))
        kinds = controls[name][0] if name in controls else ["literal"]
        try:
            out[name] = _parse_control(text, kinds)
        except ValueError:
            raise ValueError(f"--control {name}={text}: expected {_type_text(kinds)}, got "
                             f"{text!r}") from None
    return out


def check_camera(args, pipeline_cls, frame_labels) -> tuple[str | None, int]:
    """``--camera``'s checks before the model loads, from the inputs' files alone:
    ``(message, exit code)`` or ``(None, 0)``. A model without a camera (listing the models
    that take one), no ``--driving``, and a ``--camera driving`` / ``source`` whose driving /
    source frames carry no camera label are refused."""
    mode = args.camera
    if mode is None:
        return None, 0
    if not (isinstance(pipeline_cls, type) and pipeline_cls.camera_control()):
        return (f"--camera: model {args.model!r} has no camera (its frames are not rendered "
                f"from camera labels); models that take --camera: "
                f"{', '.join(camera_models())}"), 2
    if args.driving is None:
        return (f"--camera {mode}: sets the camera of the driving frames; give --driving "
                f"(without it, model {args.model!r} animates its default motion)"), 2
    role = {"driving": "driving", "source": "source"}.get(mode)
    if role is not None and "camera" not in frame_labels(getattr(args, role)):
        return (f"{role}['camera']: missing; --camera {mode} renders every frame from the "
                f"{role}'s EG3D camera label (25,)"), 1
    return None, 0


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
    next to it when ffmpeg is missing. ``path`` is the written file after :meth:`close`. The
    frames go to a hidden temporary next to it, renamed to ``path`` by :meth:`close`:
    :meth:`abort` (a stopped animation) removes it, leaving no partial video and any earlier file
    at ``path`` as it was."""

    def __init__(self, path: str, fps: float):
        import os

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.fps = path, fps
        self._writer = None
        self._gif: list = []

    @property
    def _tmp(self) -> str:
        import os

        folder, name = os.path.split(self.path)
        stem, ext = os.path.splitext(name)
        return os.path.join(folder, f".{stem}.partial{ext}")    # the extension picks the format

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
                        self._tmp, fps=self.fps, codec="libx264", quality=8, macro_block_size=1,
                        pixelformat="yuv420p")
            except Exception as exc:  # ffmpeg plugin or binary missing
                import logging
                import os

                self._remove_tmp()
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
        import os

        try:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
                os.replace(self._tmp, self.path)
            elif self._gif:
                import imageio.v2 as imageio

                imageio.mimwrite(self._tmp, self._gif, duration=1.0 / self.fps)
                self._gif = []
                os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Stop writing and remove the temporary: nothing is written at ``path``."""
        writer, self._writer, self._gif = self._writer, None, []
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - an ffmpeg stopped by the same Ctrl-C
                pass
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        import os

        try:
            os.remove(self._tmp)
        except FileNotFoundError:
            pass


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
    from pyface.train.model import (Pipeline, WrongModelError, compiled_graphs, motion_length,
                                    seeded)
    from pyface.train.registry import import_plugins

    def fail(msg: str, code: int) -> int:
        print(f"pyface animate: {msg}", file=sys.stderr)
        return code

    from pyface.train.cli import resolve_device
    from pyface.train.distributed import refuse_under_torchrun

    refused = refuse_under_torchrun(
        "pyface animate", "run the same pyface animate command without torchrun (--batch N "
        "renders N frames at once)")
    if refused is not None:
        return refused
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
    except OSError as exc:                 # a --weights file that is not there: an input's
        return fail(str(exc), 1)
    if seed_animation(args):
        try:
            check_seed_args(args)
            # the model's inference options reach the seed animator's load (EG3D's
            # load_generator), e.g. more samples per ray for the video
            args.model_options = parse_model_options(args) or None
        except (KeyError, ValueError) as exc:
            return fail(str(exc).strip('"'), 2)
        import importlib

        module, fn = SEED_ANIMATORS[args.model].split(":")
        args.frames = args.frames or 48
        with seeded(args.seed, args.device):
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
        options = parse_model_options(args)
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
            msg, code = check_camera(args, pipeline_cls, frame_labels)
        except (DataError, KeyError, ValueError) as exc:
            return fail(label_error(exc, args), 1)
        if msg is not None:
            return fail(label_error(ValueError(msg), args) if code == 1 else msg, code)
        try:
            controls = parse_controls(args.control, pipeline_cls, args.model)
        except ValueError as exc:
            return fail(str(exc), 2)
    elif args.camera is not None:          # no Pipeline class to ask before loading
        return fail(f"--camera: model {args.model!r} has no camera; models that take --camera: "
                    f"{', '.join(camera_models())}", 2)
    try:
        pipe = pyface.models.load(args.model, args.checkpoint, device=args.device, ema=args.ema,
                                  weights=args.weights or None, compile=args.compile,
                                  options=options or None)
    except WrongModelError as exc:       # another model's: what it holds, what the model takes
        return fail(exc.for_option("--checkpoint", args.checkpoint), 1)
    except (KeyError, ValueError, ImportError) as exc:
        return fail(str(exc).strip('"'), 2)
    except CheckpointError as exc:
        return fail(str(exc), 1)
    if not (isinstance(pipeline_cls, type) and issubclass(pipeline_cls, Pipeline)):
        try:
            controls = parse_controls(args.control, type(pipe), args.model)
        except ValueError as exc:
            return fail(str(exc), 2)
    # --camera: the pipeline's own control where generate has one ("driving", "source"); the
    # driving frames' camera labels replaced otherwise, and for "orbit" everywhere (one orbit
    # over all the frames, the same labels for every model, whatever --batch)
    native = args.camera is not None and type(pipe).camera_control() == "generate"
    if native:
        controls["camera"] = "driving" if args.camera == "orbit" else args.camera
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
    cameras = None                    # (n, 25) labels replacing the driving's, one per frame
    if args.camera == "orbit":
        try:                          # a video file that does not say its length: count it
            n = T if T is not None else sum(p["image"].shape[0] for p in iter_driving(
                args.driving, 8, chunk=64, max_frames=args.frames, stride=args.stride))
        except (DataError, OSError, ValueError) as exc:
            return fail(str(exc), 1)
        cameras = orbit_cameras(pipe, max(n, 1))
    elif args.camera == "source" and not native:
        cameras = source["camera"].float().reshape(1, 25)
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
    # chunks during which torch.compile compiled a graph (--compile: the first ones, a new
    # chunk size): their frames and seconds, left out of the frames per second
    compiling = {"chunks": 0, "frames": 0, "seconds": 0.0}

    def timed(t0: float, graphs: int, n: int) -> None:
        nonlocal seconds
        dt = time.perf_counter() - t0
        seconds += dt
        if compiled_graphs() != graphs:
            compiling["chunks"] += 1
            compiling["frames"] += n
            compiling["seconds"] += dt

    try:
        with torch.no_grad():
            with seeded(args.seed, pipe.device):
                state = pipe.encode_source(source)
            src = source["image"].cpu()
            bar = tqdm(total=T, unit="frame", disable=args.no_progress, dynamic_ncols=True)
            if args.driving is None:
                sync()
                graphs, t0 = compiled_graphs(), time.perf_counter()
                # a Pipeline seeds each chunk itself (seed + its first frame); another
                # object's stream is seeded once, before it starts
                own = isinstance(pipe, Pipeline)
                with seeded(None if own else args.seed, pipe.device):
                    for _, frames in pipe.stream(state, None, motion=motion, chunk=args.batch,
                                                 **({"seed": args.seed} if own else {}),
                                                 **controls):
                        sync()
                        timed(t0, graphs, frames.shape[0])
                        writer.append(side_by_side(src, frames))
                        done += frames.shape[0]
                        bar.update(frames.shape[0])
                        graphs, t0 = compiled_graphs(), time.perf_counter()
            else:
                for part in chunks:                      # read one chunk at a time
                    if cameras is not None:
                        n = part["image"].shape[0]
                        idx = torch.arange(done, done + n) % cameras.shape[0]
                        part = {**part, "camera": cameras[idx]}
                    sync()
                    graphs, t0 = compiled_graphs(), time.perf_counter()
                    with seeded(None if args.seed is None else args.seed + done, pipe.device):
                        motion = pipe.encode_driving(part)
                        if T is not None and isinstance(pipe, Pipeline):
                            motion = pipe.locate(motion, done, T)      # as stream() does
                        if isinstance(pipe, Pipeline):
                            motion = pipe.seed_frames(motion, args.seed, done)
                        frames = pipe.generate(state, motion, **controls)
                    sync()
                    timed(t0, graphs, frames.shape[0])
                    writer.append(side_by_side(src, part["image"], frames))
                    done += frames.shape[0]
                    bar.update(frames.shape[0])
            bar.close()
    except (DataError, KeyError, ValueError) as exc:   # KeyError: a label the model needs
        writer.abort()
        return fail(label_error(exc, args), 1)
    except BaseException:          # Ctrl-C, an error of the model: no partial video at --out
        writer.abort()
        raise
    if done == 0:
        writer.abort()
        return fail(f"{args.driving}: no driving frames", 1)
    out = writer.close()
    steady = done - compiling["frames"]
    rate = (steady / max(seconds - compiling["seconds"], 1e-9) if steady
            else done / max(seconds, 1e-9))
    print(f"{out}\n  {plural(done, 'frame')} at {R}x{R}; animate: {rate:.1f} frames/s "
          f"on {pipe.device} (source encoding, reading and video writing excluded)")
    if args.compile is not None:
        names = ", ".join(getattr(pipe, "compiled_modules", ())) or "nothing (the pipeline " \
            "names no modules to compile)"
        print(f"  --compile {args.compile}: compiled {names}; "
              + (f"{plural(compiling['chunks'], 'chunk')} compiled ({compiling['frames']} "
                 f"frames, {compiling['seconds']:.1f} s with the compilation)"
                 + (", left out of the frames per second" if steady else
                    ": every chunk compiled, so the frames per second include compilation "
                    "(more frames, or a --batch that divides them, measure compiled frames)")
                 if compiling["chunks"] else "no chunk compiled"))
    return 0
