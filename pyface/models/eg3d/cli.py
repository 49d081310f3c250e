"""``pyface animate eg3d`` (orbit videos of seeds) and ``pyface invert eg3d`` (projection of an
image into W / W+ with the EMA generator)."""
from __future__ import annotations

import json
import os
import sys


def _to_uint8(x):
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(
        *range(x.ndim - 3), -2, -1, -3).cpu().numpy()


def write_png(image, path: str) -> str:
    """(3, H, W) in [-1, 1] -> PNG."""
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(_to_uint8(image)).save(path)
    return path


def write_video(frames, path: str, fps: int = 24) -> str:
    """(T, 3, H, W) in [-1, 1] -> mp4 (H.264 via imageio-ffmpeg)."""
    import imageio.v2 as imageio

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    arr = _to_uint8(frames)
    H, W = arr.shape[1:3]
    arr = arr[:, : H - H % 2, : W - W % 2]
    imageio.mimwrite(path, list(arr), fps=fps, codec="libx264", quality=8, macro_block_size=1,
                     pixelformat="yuv420p")
    return path


def run_animate(args) -> int:
    """``pyface animate eg3d --checkpoint OUT --seeds 0-3 --out orbit.mp4``."""
    import torch

    from pyface.checkpoint import CheckpointError
    from pyface.models.eg3d.pipeline import load_generator, orbit_video, parse_seeds

    try:
        seeds = parse_seeds(getattr(args, "seeds", None) or "0-3")
        dev = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
        G = load_generator(args.checkpoint, device=dev, ema=getattr(args, "ema", True))
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"pyface animate eg3d: {exc}", file=sys.stderr)
        return 1
    frames = orbit_video(G, seeds, args.frames, truncation_psi=args.truncation,
                         progress=not getattr(args, "no_progress", False))
    try:
        print(write_video(frames, args.out, fps=getattr(args, "fps", None) or 24))
    except OSError as exc:
        print(f"pyface animate eg3d: --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def read_camera(spec: str, image_path: str):
    """``--camera``: 25 comma-separated floats, ``frontal``, a ``.npy`` / ``.json`` file with 25
    values, or an EG3D dataset folder / ``dataset.json`` holding the image's label."""
    import numpy as np
    import torch

    if spec == "frontal":
        return None
    if os.path.isdir(spec):
        spec = os.path.join(spec, "dataset.json")
    if os.path.isfile(spec):
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
    else:
        vals = [float(v) for v in spec.split(",") if v.strip()]
    t = torch.as_tensor(np.asarray(vals, dtype=np.float32)).reshape(-1)
    if t.numel() != 25:
        raise ValueError(f"--camera: expected 25 values (EG3D label), got {t.numel()}")
    return t


def run_invert(args) -> int:
    import torch
    from PIL import Image

    from pyface.checkpoint import CheckpointError, save_weights
    from pyface.models.eg3d.pipeline import load_generator, project

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        G = load_generator(args.checkpoint, device=dev, ema=True)
        cam = read_camera(args.camera, args.image)
        with Image.open(args.image) as im:
            arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            img = arr.view(im.height, im.width, 3).permute(2, 0, 1).float() / 127.5 - 1
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"pyface invert: {exc}", file=sys.stderr)
        return 1
    if cam is None:
        cam = G.camera(0.0, 0.0)[0].cpu()
    perceptual = None
    if args.vgg:
        from pyface.nn.vgg import PerceptualLoss

        perceptual = PerceptualLoss(weights=args.vgg).to(dev)
    else:
        print("pyface invert: no --vgg weights; using the L1 loss only", file=sys.stderr)
    ws, info = project(G, img, cam, space=args.space, steps=args.steps, lr=args.lr,
                       perceptual=perceptual)
    os.makedirs(args.out, exist_ok=True)
    save_weights(os.path.join(args.out, "latent"), {"ws": ws.cpu().contiguous(),
                                                    "camera": cam.contiguous()},
                 kind="eg3d-latent", config={"space": args.space, "steps": args.steps,
                                             "final_loss": info["loss"][-1] if info["loss"]
                                             else None})
    target = torch.nn.functional.interpolate(img[None], size=info["image"].shape[-2:],
                                             mode="bilinear", antialias=True)
    write_png(torch.cat([target.cpu(), info["image"].cpu().clamp(-1, 1)], -1)[0],
             os.path.join(args.out, "reconstruction.png"))
    if args.video:
        from pyface.face.cameras import orbit_labels

        labels = orbit_labels(48, radius=G.cfg.avg_camera_radius,
                              pivot=tuple(G.cfg.avg_camera_pivot)).to(dev)
        with torch.no_grad():
            planes = G.backbone.planes(ws, noise_mode="const")
            frames = torch.stack([G.synthesis(ws, labels[t:t + 1], planes=planes)["image"][0]
                                  for t in range(48)]).cpu()
        write_video(frames.clamp(-1, 1), os.path.join(args.out, "orbit.mp4"), fps=24)
    print(f"{args.out}: loss {info['loss'][0]:.4f} -> {info['loss'][-1]:.4f}"
          if info["loss"] else args.out)
    return 0
