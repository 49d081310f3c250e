"""Run-folder outputs: TensorBoard scalars and images, preview PNGs and mp4 clips, a log file."""
from __future__ import annotations

import logging
import os
import time
import warnings

import torch

log = logging.getLogger("pyface.train")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu()


def image_grid(rows: dict[str, torch.Tensor], max_items: int = 8, pad: int = 2) -> torch.Tensor:
    """Named batches (N, C, H, W) in [-1, 1] -> one (3, H', W') grid in [-1, 1]: one row per
    item, one column per name (all resized to the first entry's size)."""
    if not rows:
        raise ValueError("image_grid: nothing to show")
    first = next(iter(rows.values()))
    n = min(max_items, first.shape[0])
    H, W = first.shape[-2:]
    cols = []
    for name, x in rows.items():
        x = x[:n].detach().float().cpu()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            x = x[:, :3]
        if x.shape[-2:] != (H, W):
            x = torch.nn.functional.interpolate(x, size=(H, W), mode="bilinear",
                                                align_corners=False, antialias=True)
        cols.append(x)
    grid = torch.full((3, n * (H + pad) + pad, len(cols) * (W + pad) + pad), -1.0)
    for c, x in enumerate(cols):
        for r in range(n):
            y0, x0 = pad + r * (H + pad), pad + c * (W + pad)
            grid[:, y0:y0 + H, x0:x0 + W] = x[r]
    return grid


def save_png(image: torch.Tensor, path: str) -> str:
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(to_uint8(image).numpy()).save(path)
    return path


def save_video(frames: torch.Tensor, path: str, fps: int = 12) -> str | None:
    """(T, 3, H, W) in [-1, 1] -> mp4 (imageio + ffmpeg); a GIF next to it if ffmpeg is missing.
    Returns the written path; None, with a warning, when imageio is not installed (the `train`
    extra), so that a run never fails over its preview clip."""
    try:
        import imageio.v2 as imageio
    except ImportError as exc:
        log.warning("preview video %s skipped: %s (the `train` extra installs imageio and "
                    "imageio-ffmpeg: pip install -e \".[train]\" --no-build-isolation)", path, exc)
        return None

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    arr = to_uint8(frames).numpy()
    H, W = arr.shape[1:3]
    if H % 2 or W % 2:  # yuv420p needs even sizes
        arr = arr[:, : H - H % 2, : W - W % 2]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imageio.mimwrite(path, list(arr), fps=fps, codec="libx264", quality=8,
                             macro_block_size=1, pixelformat="yuv420p")
        return path
    except Exception as exc:  # ffmpeg plugin/binary missing
        gif = os.path.splitext(path)[0] + ".gif"
        log.warning("mp4 preview failed (%s); writing %s instead", exc, gif)
        imageio.mimwrite(gif, list(arr), duration=1.0 / fps)
        return gif


def _after_earlier_event_files(log_dir: str, max_wait: float = 2.0) -> None:
    """Waits (at most ``max_wait`` s) until the clock's second is past those of the event files
    already in ``log_dir``. TensorBoard reads a folder's files in name order, and a name is
    ``events.out.tfevents.<seconds>.<host>.<pid>.<counter>``: two writers of one process within
    one second can sort out of order (counter 10 before 9), which would apply a resumed run's
    ``purge_step`` before the events it should drop."""
    try:
        names = os.listdir(log_dir)
    except OSError:
        return
    stamps = []
    for n in names:
        part = n.split(".")
        if n.startswith("events.out.tfevents.") and len(part) > 3 and part[3].isdigit():
            stamps.append(int(part[3]))
    if not stamps:
        return
    end = time.monotonic() + max_wait
    while int(time.time()) <= max(stamps) and time.monotonic() < end:
        time.sleep(0.05)


class Board:
    """TensorBoard writer on the main rank (a no-op elsewhere or without tensorboard).

    ``purge_step``: the first step this writer will record; TensorBoard drops what the folder's
    earlier event files hold at that step and later (the steps an interrupted run logged after
    its last checkpoint, run again after ``--resume``), so no step appears twice; and it records
    no step before it (those of the earlier files stay: a finished run resumed writes its final
    previews again, as PNG files only)."""

    def __init__(self, log_dir: str | None, purge_step: int | None = None):
        self.writer = None
        self.first_step = purge_step or 0
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            log.warning("TensorBoard logging disabled: %s (pip install tensorboard)", exc)
            return
        _after_earlier_event_files(log_dir)
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None and step >= self.first_step:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.writer is not None and step >= self.first_step:
            self.writer.add_image(tag, (image.clamp(-1, 1) + 1) / 2, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
