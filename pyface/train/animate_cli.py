"""``pyface animate``."""
from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    from pyface.train.registry import MODELS

    a = subparsers.add_parser(
        "animate", help="render a clip from a trained checkpoint",
        description="Animate a source image with a trained model. Only the example model is "
                    "registered so far: it renders an orbit clip of the tri-plane reconstruction "
                    "of SOURCE. The portrait models (Export3D, OTAvatar, GOHA, MMFA) will add "
                    "driving-video reenactment here.")
    a.add_argument("model", help=f"registered model: {', '.join(sorted(MODELS))}")
    a.add_argument("--checkpoint", required=True, help="a training checkpoint folder or run folder")
    a.add_argument("--source", default=None, help="source image (PNG/JPEG)")
    a.add_argument("--driving", default=None, help="driving video (portrait models only)")
    a.add_argument("--out", default="animation.mp4", help="output mp4")
    a.add_argument("--frames", type=int, default=48)
    a.add_argument("--ema", action="store_true", help="use the EMA weights if present")
    from pyface.models.eg3d.cli import add_animate_arguments

    add_animate_arguments(a)
    a.set_defaults(func=run_animate)


def run_animate(args) -> int:
    import math
    import os

    import torch

    from pyface import checkpoint as ckpt
    from pyface.train.config import from_dict
    from pyface.train.monitor import save_video
    from pyface.train.registry import model_class

    if args.model == "eg3d":
        from pyface.models.eg3d.cli import run_animate as run_eg3d

        return run_eg3d(args)
    if args.source is None:
        print("pyface animate: --source is required", file=sys.stderr)
        return 2
    if args.model != "example":
        print(f"pyface animate: no animation pipeline is registered for {args.model!r} yet; "
              "only 'example' (orbit of a tri-plane reconstruction)", file=sys.stderr)
        return 2
    path = args.checkpoint
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = ckpt.latest_checkpoint(path) or path
    try:
        tensors, meta = ckpt.load_folder(path)
    except ckpt.CheckpointError as exc:
        print(f"pyface animate: {exc}", file=sys.stderr)
        return 1
    cls = model_class(args.model)
    model = cls(from_dict(cls.Config, meta["experiment"]["model_config"]))
    ckpt.load_module_state(model, ckpt.sub_state(tensors, "model"), path)
    if args.ema:
        for name in meta.get("ema_modules", []):
            model.get_submodule(name).load_state_dict(ckpt.sub_state(tensors, f"ema.{name}"))
    model.eval()
    from PIL import Image

    R = model.cfg.resolution
    img = Image.open(args.source).convert("RGB").resize((R, R), Image.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(R, R, 3)
    x = x.permute(2, 0, 1).float().div(127.5).sub(1).unsqueeze(0)
    with torch.no_grad():
        planes = model.encode(x)
        frames = [model.render(planes, torch.tensor(
            [math.radians(35) * math.sin(2 * math.pi * t / args.frames)]))[0]
            for t in range(args.frames)]
    out = save_video(torch.stack(frames), args.out)
    print(out)
    return 0
