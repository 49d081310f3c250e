"""``pyface animate eg3d`` (orbit videos of seeds) and ``pyface invert eg3d`` (projection of an
image into W / W+ with the EMA generator)."""
from __future__ import annotations

import json
import os
import sys


def _to_uint8(x):
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(
        *range(x.ndim - 3), -2, -1, -3).cpu().numpy()


class _Replacing:
    """``with _Replacing(path) as tmp:`` write ``tmp`` (same folder and extension); on success
    it replaces ``path`` in one rename, on any error or interruption it is removed, so ``path``
    is never a half-written file."""

    def __init__(self, path: str):
        self.path = path
        folder, name = os.path.split(path)
        stem, ext = os.path.splitext(name)
        self.tmp = os.path.join(folder, f".{stem}.tmp-{os.getpid()}{ext}")

    def __enter__(self) -> str:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        return self.tmp

    def __exit__(self, kind, exc, tb):
        if kind is None:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)
        return False


def write_png(image, path: str) -> str:
    """(3, H, W) in [-1, 1] -> PNG, replaced in one rename (never half written)."""
    from PIL import Image

    with _Replacing(path) as tmp:
        Image.fromarray(_to_uint8(image)).save(tmp, format="PNG")
    return path


def write_video(frames, path: str, fps: int = 24) -> str:
    """(T, 3, H, W) in [-1, 1] -> mp4 (H.264 via imageio-ffmpeg), replaced in one rename."""
    import imageio.v2 as imageio

    arr = _to_uint8(frames)
    H, W = arr.shape[1:3]
    arr = arr[:, : H - H % 2, : W - W % 2]
    with _Replacing(path) as tmp:
        imageio.mimwrite(tmp, list(arr), fps=fps, codec="libx264", quality=8,
                         macro_block_size=1, pixelformat="yuv420p")
    return path


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def compile_generator(G, mode) -> list[str]:
    """``--compile MODE`` (a :data:`pyface.nn.compiling.COMPILE_CHOICES` value, or None: nothing)
    on a generator run without a pipeline: compiles the modules :class:`EG3DPipeline` compiles
    (its ``compile_modules``) in place and returns their names."""
    from pyface.models.eg3d.pipeline import EG3DPipeline
    from pyface.nn.compiling import compile_modules

    return compile_modules(G, EG3DPipeline.compile_modules, mode) if mode else []


def _steps_text(steps) -> str:
    """0-based step indices -> ``the first 2 steps`` / ``steps 1, 5`` (1-based)."""
    steps = list(steps)
    if steps == list(range(len(steps))):
        return "the first step" if len(steps) == 1 else f"the first {len(steps)} steps"
    return ("step " if len(steps) == 1 else "steps ") + ", ".join(str(s + 1) for s in steps)


def step_report(seconds, compiled_steps, device, mode, compiled) -> str:
    """The timing line of ``pyface invert``: the mean time of a step, and with ``--compile``
    (``mode``; ``compiled``: the modules compiled) the steps during which a graph compiled,
    their time, left out of the mean."""
    n = len(seconds)
    if not mode:
        mean = sum(seconds) / max(n, 1) * 1e3
        return f"{_plural(n, 'step')}: {mean:.1f} ms each on {device}"
    names = ", ".join(compiled) or "nothing (compiled already)"
    slow = set(compiled_steps)
    rest = [s for i, s in enumerate(seconds) if i not in slow]
    text = f"--compile {mode}: compiled {names}; "
    if slow:
        text += (f"compiled in {sum(seconds[i] for i in slow):.1f} s over "
                 f"{_steps_text(sorted(slow))}; ")
    else:
        text += "no step compiled; "
    if rest:
        mean = sum(rest) / len(rest) * 1e3
        text += (f"{'the other ' if slow else ''}{_plural(len(rest), 'step')}: {mean:.1f} ms "
                 f"each on {device}")
    else:
        text += "every step compiled, so there is no compiled step to time (more --steps)"
    return text


def run_animate(args) -> int:
    """``pyface animate eg3d --checkpoint OUT --seeds 0-3 --out orbit.mp4 [--compile [MODE]]``:
    writes the orbit video and prints its frames per second (the seeds' mapping and tri-planes
    and the video writing left out; with ``--compile``, the frames during which a graph compiled
    too, reported apart). ``args.model_options``: ``EG3D.inference_options`` values for the
    generator (``--option generator.render.depth_resolution=96``), or None."""
    import time

    import torch
    from tqdm import tqdm

    from pyface.checkpoint import CheckpointError
    from pyface.models.eg3d.pipeline import load_generator, orbit_frames, parse_seeds
    from pyface.train.model import WrongModelError, compiled_graphs

    options = getattr(args, "model_options", None)
    try:
        seeds = parse_seeds(getattr(args, "seeds", None) or "0-3")
        dev = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
        G = load_generator(args.checkpoint, device=dev, ema=getattr(args, "ema", True),
                           options=options)
    except WrongModelError as exc:
        print(f"pyface animate eg3d: {exc.for_option('--checkpoint', args.checkpoint)}",
              file=sys.stderr)
        return 1
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        code = 2 if not isinstance(exc, CheckpointError) and any(
            str(exc).startswith(f"model.{k}") for k in options or {}) else 1
        # 2: an --option value that does not fit the saved config (as pyface invert)
        print(f"pyface animate eg3d: {exc}", file=sys.stderr)
        return code
    mode = getattr(args, "compile", None)
    compiled = compile_generator(G, mode)
    device = G.rendering_resolution.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    graphs, t0 = compiled_graphs(), time.perf_counter()
    it = orbit_frames(G, seeds, args.frames, truncation_psi=args.truncation)
    sync()
    setup = (time.perf_counter() - t0, compiled_graphs() != graphs)   # mapping and tri-planes
    frames, seconds = [], []
    slow = {"frames": 0, "seconds": 0.0}        # frames during which a graph compiled
    bar = tqdm(total=args.frames, unit="frame", disable=getattr(args, "no_progress", False))
    while True:
        sync()
        graphs, t0 = compiled_graphs(), time.perf_counter()
        frame = next(it, None)
        if frame is None:
            break
        sync()
        dt = time.perf_counter() - t0
        if compiled_graphs() != graphs:
            slow["frames"] += 1
            slow["seconds"] += dt
        else:
            seconds.append(dt)
        frames.append(frame.cpu())
        bar.update(1)
    bar.close()
    try:
        out = write_video(torch.stack(frames), args.out, fps=getattr(args, "fps", None) or 24)
    except OSError as exc:
        print(f"pyface animate eg3d: --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    n, (H, W) = len(frames), frames[0].shape[-2:]
    total = sum(seconds) + slow["seconds"]
    rate = len(seconds) / max(sum(seconds), 1e-9) if seconds else n / max(total, 1e-9)
    print(f"{out}\n  {_plural(n, 'frame')} of {_plural(len(seeds), 'seed')} at {H}x{W}; "
          f"animate: {rate:.1f} frames/s on {device} (the seeds' mapping and tri-planes and "
          f"video writing excluded)")
    if mode:
        names = ", ".join(compiled) or "nothing (compiled already)"
        print(f"  --compile {mode}: compiled {names}; "
              + (f"the seeds' tri-planes compiled before the frames ({setup[0]:.1f} s); "
                 if setup[1] else "")
              + (f"{_plural(slow['frames'], 'frame')} compiled ({slow['seconds']:.1f} s with the "
                 "compilation)" + (", left out of the frames per second" if seconds else
                                   ": every frame compiled, so the frames per second include "
                                   "compilation (more --frames measure compiled frames)")
                 if slow["frames"] else "no frame compiled"))
    return 0


def read_camera(spec: str | None, image_path: str):
    """``--camera``: 25 comma-separated floats, ``frontal`` (or None: returns None, the caller
    picks), a ``.npy`` / ``.json`` file with 25 values, or an EG3D dataset folder /
    ``dataset.json`` holding the image's label. ValueError naming ``--camera`` otherwise."""
    import numpy as np
    import torch

    if spec is None or spec == "frontal":
        return None
    if os.path.isdir(spec):
        spec = os.path.join(spec, "dataset.json")
        if not os.path.isfile(spec):
            raise ValueError(f"--camera {os.path.dirname(spec)}: a folder without dataset.json "
                             "(expected an EG3D dataset folder holding the image's label)")
    if os.path.isfile(spec):
        try:
            if spec.endswith(".npy"):
                vals = np.load(spec, allow_pickle=False).reshape(-1)
            else:
                with open(spec) as f:
                    data = json.load(f)
                if isinstance(data, dict) and "labels" in data:
                    name = os.path.basename(image_path)
                    found = [c for n, c in data["labels"] if os.path.basename(str(n)) == name]
                    if not found:
                        raise ValueError(f"--camera {spec}: no label for {name!r}")
                    vals = found[0]
                else:
                    vals = data
            vals = np.asarray(vals, dtype=np.float32)
        except (OSError, ValueError, TypeError) as exc:
            if str(exc).startswith("--camera"):
                raise
            raise ValueError(f"--camera {spec}: not 25 numbers ({exc})") from None
    elif spec.lower().endswith((".npy", ".json")) or os.sep in spec:
        raise ValueError(f"--camera {spec}: not found")
    else:
        try:
            vals = np.asarray([float(v) for v in spec.split(",") if v.strip()], dtype=np.float32)
        except ValueError:
            raise ValueError(f"--camera: expected 25 comma-separated floats, 'frontal', a "
                             f".npy/.json file or a dataset folder, got {spec!r}") from None
    t = torch.as_tensor(vals).reshape(-1)
    if t.numel() != 25:
        raise ValueError(f"--camera: expected 25 values (EG3D label), got {t.numel()}")
    if not torch.isfinite(t).all():
        raise ValueError("--camera: the label holds NaN or infinite values")
    return t


def check_invert_args(args) -> None:
    """``pyface invert eg3d``'s own option values (IMAGE and --out not empty, --steps, --seed,
    --lr, --out not a file nor a pyface checkpoint / weights folder): ValueError naming the
    option; nothing read but --out's folder (also under ``PYFACE_PARSE_ONLY=1``)."""
    import math

    from pyface.checkpoint import check_weights_replaceable

    if not args.image:
        raise ValueError("IMAGE: expected a path, got ''")
    if not args.out:
        raise ValueError("--out: expected a folder, got ''")
    if args.steps < 1:
        raise ValueError(f"--steps: expected an integer >= 1, got {args.steps}")
    if getattr(args, "seed", 0) < 0:
        raise ValueError(f"--seed: expected an integer >= 0, got {args.seed}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr: expected a learning rate > 0, got {args.lr}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: exists and is not a folder")
    if os.path.isfile(os.path.join(args.out, "meta.json")):
        raise ValueError(f"--out {args.out}: a pyface checkpoint or weights folder (meta.json); "
                         "expected a folder for the inversion's outputs: choose another one")
    try:
        check_weights_replaceable(os.path.join(args.out, "latent"))
    except Exception as exc:  # CheckpointError: a file or a folder of other files
        raise ValueError(f"--out: {exc}") from None


def _image_note(path: str, side: int, resolution: int) -> str | None:
    """What ``pyface invert`` does to IMAGE before fitting it, when that is more than a resize
    between similar sizes: a centre crop of a non-square image, an upsampling of a small one."""
    size = None
    if os.path.isfile(path):
        try:
            from PIL import Image

            with Image.open(path) as im:
                size = im.size
        except Exception:  # noqa: BLE001 - a video file: its first frame was read instead
            size = None
    parts = []
    if size is not None and size[0] != size[1]:
        parts.append(f"IMAGE {path} is {size[0]}x{size[1]}, not square: its centre "
                     f"{side}x{side} is fitted")
    if side < resolution // 2:
        parts.append(f"IMAGE {path}: the target is {side}x{side}, upsampled to the "
                     f"generator's {resolution}x{resolution} (a blurred target)")
    return "; ".join(parts) or None


def run_invert(args) -> int:
    """``pyface invert eg3d IMAGE --checkpoint OUT [--option KEY=VALUE ...]``: the latent of
    IMAGE, its reconstruction and optionally an orbit video. ``args.model_options``:
    ``EG3D.inference_options`` values the generator is built with (checked by the command;
    recorded in the latent's metadata as ``options``, ``{"model.KEY": value}``), or None; one
    that does not fit the checkpoint's config (3 coarse samples with importance samples) exits
    2 naming ``model.KEY``."""
    import torch

    from pyface.checkpoint import CheckpointError, save_weights
    from pyface.data.driving import read_source
    from pyface.data.format import DataError
    from pyface.models.eg3d.pipeline import load_generator, project, render_uniforms_of
    from pyface.train.model import WrongModelError

    def fail(msg, code=1):
        print(f"pyface invert: {msg}", file=sys.stderr)
        return code

    try:
        check_invert_args(args)
    except ValueError as exc:
        return fail(exc, 2)
    dev = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        source = read_source(args.image, None)
        img = source["image"]
    except (DataError, ValueError, OSError) as exc:
        return fail(f"IMAGE {exc}")
    try:
        cam = read_camera(args.camera, args.image)
        if cam is None and args.camera is None and "camera" in source:
            cam = source["camera"].float()        # a pyface video folder's own label
    except (DataError, ValueError, OSError) as exc:
        return fail(exc)
    options = getattr(args, "model_options", None) or {}    # --option, checked by the command
    try:
        G = load_generator(args.checkpoint, device=dev, ema=True, options=options or None)
    except WrongModelError as exc:
        return fail(exc.for_option("--checkpoint", args.checkpoint))
    except (CheckpointError, ValueError, OSError) as exc:
        msg = str(exc)
        if not isinstance(exc, CheckpointError) and any(
                msg.startswith(f"model.{k}") for k in options):
            return fail(msg, 2)    # an option's value that does not fit the saved config
        msg = msg[len("checkpoint "):] if msg.startswith("checkpoint ") else msg
        return fail(f"--checkpoint {msg}")
    if cam is None:
        cam = G.camera(0.0, 0.0)[0].cpu()
    note = _image_note(args.image, img.shape[-1], G.cfg.img_resolution)
    if note:
        print(f"pyface invert: note: {note}", file=sys.stderr)
    perceptual = None
    if args.vgg:
        from pyface.nn.vgg import PerceptualLoss

        try:
            perceptual = PerceptualLoss(weights=args.vgg).to(dev)
        except (CheckpointError, OSError, ValueError, KeyError) as exc:
            return fail(f"--vgg {args.vgg}: {str(exc).strip(chr(34))}")
    else:
        print("pyface invert: no --vgg weights; using the L1 loss only", file=sys.stderr)
    compiled = compile_generator(G, getattr(args, "compile", None))
    seed = getattr(args, "seed", 0)
    torch.manual_seed(seed)         # the mean-w samples and the renderer's ray samples
    ws, info = project(G, img, cam, space=args.space, steps=args.steps, lr=args.lr,
                       perceptual=perceptual, progress=not getattr(args, "no_progress", False),
                       generator=torch.Generator().manual_seed(seed))
    target = torch.nn.functional.interpolate(img[None], size=info["image"].shape[-2:],
                                             mode="bilinear", antialias=True)
    frames = None
    if args.video:
        from pyface.face.cameras import orbit_labels

        labels = orbit_labels(48, radius=G.cfg.avg_camera_radius,
                              pivot=tuple(G.cfg.avg_camera_pivot)).to(dev)
        with torch.no_grad():
            planes = G.backbone.planes(ws, noise_mode="const")
            r = G.resolve_resolution(None)          # ray samples drawn outside --compile's graphs
            frames = torch.stack([G.synthesis(ws, labels[t:t + 1], planes=planes,
                                              **render_uniforms_of(G, 1, r, planes))["image"][0]
                                  for t in range(48)]).cpu()
    # every output is computed; each is written under a temporary name and renamed
    name = "latent/"
    try:
        os.makedirs(args.out, exist_ok=True)
        save_weights(os.path.join(args.out, "latent"), {"ws": ws.cpu().contiguous(),
                                                        "camera": cam.contiguous()},
                     kind="eg3d-latent", config={"space": args.space, "steps": args.steps,
                                                 "seed": seed, "lr": args.lr,
                                                 "final_loss": info["loss"][-1] if info["loss"]
                                                 else None,
                                                 "options": {f"model.{k}": v
                                                             for k, v in options.items()}})
        name = "reconstruction.png"
        write_png(torch.cat([target.cpu(), info["image"].cpu().clamp(-1, 1)], -1)[0],
                  os.path.join(args.out, name))
        if frames is not None:
            name = "orbit.mp4"
            write_video(frames.clamp(-1, 1), os.path.join(args.out, name), fps=24)
    except (OSError, CheckpointError) as exc:
        return fail(f"--out {args.out}: cannot write {name} "
                    f"({getattr(exc, 'strerror', None) or exc})")
    print(f"{args.out}: loss {info['loss'][0]:.4f} -> {info['loss'][-1]:.4f}"
          if info["loss"] else args.out)
    print("  " + step_report(info["seconds"], info["compiled_steps"], dev,
                             getattr(args, "compile", None), compiled))
    return 0
