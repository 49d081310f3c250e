"""Inputs of inference pipelines: a source portrait and a driving video.

* :func:`read_source` reads an image file, the first frame of a video file or frame folder, or
  the first frame of a pyface-format video folder (with its camera, coefficients, landmarks and
  mask);
* :func:`read_driving` reads a pyface-format video folder (``frames/`` or ``frames.mp4`` +
  ``coeffs.npy`` + ``dataset.json`` + optional ``landmarks.npy`` / ``masks/``, as written by
  ``pyface data synth``; see :mod:`pyface.data.format`), or a video file / folder of images
  (images only: for image-driven models).

Images come back as float in [-1, 1], resized to ``resolution`` x ``resolution`` with
antialiasing (a non-square image from a file or frame folder is centre-cropped to a square
first); landmarks are rescaled to the new pixel grid. ``resolution=None`` keeps the size.
"""
from __future__ import annotations

import numbers
import os

import numpy as np
import torch

from pyface.data import format as fmt

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif")


def is_video_folder(path: str) -> bool:
    """A pyface-format video folder: ``meta.json`` plus ``frames/`` or ``frames.mp4``."""
    return os.path.isfile(os.path.join(path, fmt.META)) and (
        os.path.isdir(os.path.join(path, fmt.FRAME_DIR))
        or os.path.isfile(os.path.join(path, fmt.VIDEO_FILE)))


def _scan_folder(path: str) -> tuple[str, fmt.VideoRecord]:
    """The dataset root above the pyface video folder ``path`` and the folder's record."""
    root, name = os.path.split(os.path.normpath(os.path.abspath(path)))
    return root, fmt.scan_video(root, name)


def _not_found(path: str) -> fmt.DataError:
    return fmt.DataError(f"{path}: not found (expected a pyface video folder, a video file or a "
                         "folder of images)")


def _images(frames: list[np.ndarray], resolution: int | None, *, crop: bool,
            name: str) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
    """(T, H, W, 3) uint8 frames -> ((T, 3, R, R) float in [-1, 1], (sx, sy, ox, oy)): an input
    pixel (x, y) lands at ((x - ox) * sx, (y - oy) * sy) (``crop``: centre square crop first)."""
    sizes = {f.shape[:2] for f in frames}
    if len(sizes) != 1:
        raise ValueError(f"{name}: frames differ in size: {sorted(sizes)}")
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
    H, W = x.shape[-2:]
    ox = oy = 0
    if crop and H != W:
        s = min(H, W)
        oy, ox = (H - s) // 2, (W - s) // 2
        x = x[..., oy:oy + s, ox:ox + s]
        H = W = s
    sx = sy = 1.0
    if resolution is not None and (H, W) != (resolution, resolution):
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear",
                                            antialias=True, align_corners=False)
        sx, sy = resolution / W, resolution / H
    return (x / 127.5 - 1).clamp_(-1, 1).contiguous(), (sx, sy, float(ox), float(oy))


def _check_resolution(resolution) -> None:
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                   or resolution <= 0):
        raise ValueError(f"resolution: expected a positive int or None, got {resolution!r}")


def _check_counts(**counts) -> None:
    """``stride`` / ``chunk`` / ``max_frames`` (None allowed): ints >= 1."""
    for name, n in counts.items():
        if n is None and name == "max_frames":
            continue
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{name}: expected an int >= 1"
                             + (" or None" if name == "max_frames" else "") + f", got {n!r}")


def _read_image_file(path: str) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            return fmt.rgb8(ImageOps.exif_transpose(im))    # EXIF orientation, as prepare
    except FileNotFoundError:
        raise fmt.DataError(f"{path}: not found") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise fmt.DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _read_video_file(path: str, max_frames: int | None) -> tuple[list[np.ndarray], float | None]:
    import imageio.v2 as iio

    frames = []
    try:
        reader = iio.get_reader(path)
    except FileNotFoundError:
        raise fmt.DataError(f"{path}: not found") from None
    except Exception as e:
        raise fmt.DataError(_open_video_error(path, e)) from None
    try:
        fps = reader.get_meta_data().get("fps")
        for frame in reader:
            frames.append(np.asarray(frame)[..., :3])
            if max_frames is not None and len(frames) >= max_frames:
                break
    except Exception as e:
        if not frames:
            raise fmt.DataError(f"{path}: cannot decode the video ({type(e).__name__}: {e})") \
                from None
    finally:
        reader.close()
    if not frames:
        raise fmt.DataError(f"{path}: the video has no frames")
    return frames, (float(fps) if fps else None)


def _open_video_error(path: str, exc: Exception) -> str:
    """One line: why ``path`` did not open as a video. imageio-ffmpeg is suggested only when it
    is not installed; a container ffmpeg opens without any stream (an mp4 of zero frames) has
    no frames; otherwise the file is not a video ffmpeg decodes (ffmpeg's last line)."""
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return (f"{path}: cannot open the video ({type(exc).__name__}); video files need "
                "imageio-ffmpeg (pip install imageio-ffmpeg)")
    text = str(exc)
    if "Input #0" in text and "Stream #" not in text:
        # ffmpeg opened the container but found no stream in it (e.g. an mp4 written with no
        # frames): a video, but an empty one
        return f"{path}: the video has no frames (ffmpeg finds no video stream in it)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (f"{path}: not a video file ffmpeg can read"
            + (f" ({lines[-1].rstrip(').')})" if lines else "")
            + f"; expected a video ({', '.join(VIDEO_EXTS)}), an image or a folder")


def _frame_files(path: str) -> list[str]:
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise fmt.DataError(f"{path}: no image files ({', '.join(IMAGE_EXTS)}) and not a pyface "
                            f"video folder ({fmt.META} + {fmt.FRAME_DIR}/ or {fmt.VIDEO_FILE})")
    return [os.path.join(path, f) for f in files]


def _read_video_folder(path: str, resolution: int | None, frames: list[int] | None) -> dict:
    root, rec = _scan_folder(path)
    idx = list(range(rec.num_frames)) if frames is None else frames
    if not idx:
        raise fmt.DataError(f"{path}: no frames")
    coeffs = fmt.load_coeffs(root, rec)
    labels = fmt.load_labels(root, rec)
    lms = fmt.load_landmarks(root, rec)
    raw = [fmt.read_frame(root, rec, i) for i in idx]
    image, (sx, sy, _, _) = _images(raw, resolution, crop=False, name=path)
    out = {"image": image, "camera": torch.from_numpy(labels[idx]),
           "coeffs": torch.from_numpy(coeffs[idx])}
    if lms is not None:
        out["landmarks"] = torch.from_numpy(lms[idx]) * torch.tensor([sx, sy])
    if rec.has_masks:
        m = torch.from_numpy(np.stack([fmt.read_mask(root, rec, i) for i in idx]))[:, None].float()
        if resolution is not None and tuple(m.shape[-2:]) != (resolution, resolution):
            m = torch.nn.functional.interpolate(m, size=(resolution, resolution), mode="bilinear",
                                                antialias=True, align_corners=False)
        out["mask"] = (m / 255.0).clamp_(0, 1)
    return out


def read_source(path: str, resolution: int | None) -> dict:
    """The source frame dict: ``image (3, R, R)`` float in [-1, 1], plus ``camera (25,)``,
    ``coeffs (257,)``, ``landmarks (68, 2)`` (pixels at R) and ``mask (1, R, R)`` in [0, 1] when
    ``path`` is a pyface video folder (its first frame). ``path``: an image file, a video file
    (its first frame), a folder of images (the first, by name) or a pyface video folder."""
    _check_resolution(resolution)
    if os.path.isdir(path):
        if is_video_folder(path):
            return {k: v[0] for k, v in _read_video_folder(path, resolution, [0]).items()}
        raw = [_read_image_file(_frame_files(path)[0])]
    elif path.lower().endswith(VIDEO_EXTS):
        raw = _read_video_file(path, 1)[0]
    else:
        raw = [_read_image_file(path)]
    return {"image": _images(raw, resolution, crop=True, name=path)[0][0]}


def read_driving(path: str, resolution: int | None, *, max_frames: int | None = None,
                 stride: int = 1) -> dict:
    """The driving frames: ``image (T, 3, R, R)`` float in [-1, 1]; for a pyface video folder
    also ``camera (T, 25)``, ``coeffs (T, 257)``, ``landmarks (T, 68, 2)`` (when present, pixels
    at R) and ``mask (T, 1, R, R)`` (when present). A video file or a folder of images gives
    ``image`` only. ``stride`` keeps every n-th frame, ``max_frames`` the first ones after that."""
    _check_resolution(resolution)
    _check_counts(stride=stride, max_frames=max_frames)
    if os.path.isdir(path):
        if is_video_folder(path):
            n = _scan_folder(path)[1].num_frames
            idx = list(range(0, n, stride))[:max_frames]
            return _read_video_folder(path, resolution, idx)
        files = _frame_files(path)[::stride][:max_frames]
        raw = [_read_image_file(f) for f in files]
    elif os.path.isfile(path):
        limit = None if max_frames is None else max_frames * stride
        raw = _read_video_file(path, limit)[0][::stride]
    else:
        raise _not_found(path)
    return {"image": _images(raw, resolution, crop=True, name=path)[0]}


def frame_labels(path: str) -> set[str]:
    """The keys :func:`read_source` / :func:`read_driving` give for ``path``, from its files
    alone (no frame is decoded): ``image``, plus for a pyface video folder ``camera``
    (dataset.json), ``coeffs`` (coeffs.npy), ``landmarks`` and ``mask`` where they exist. A
    caller checks with it what a model needs before any weights load. DataError when ``path``
    does not exist."""
    if not os.path.exists(path):
        raise fmt.DataError(f"{path}: not found (expected a pyface video folder, a video file, "
                            "an image or a folder of images)")
    keys = {"image"}
    if os.path.isdir(path) and is_video_folder(path):
        root, rec = _scan_folder(path)
        for key, present in (("camera", os.path.isfile(rec.path(root, fmt.LABELS))),
                             ("coeffs", os.path.isfile(rec.path(root, fmt.COEFFS))),
                             ("landmarks", rec.has_landmarks), ("mask", rec.has_masks)):
            if present:
                keys.add(key)
    return keys


def count_driving(path: str, *, max_frames: int | None = None, stride: int = 1) -> int | None:
    """The number of frames :func:`read_driving` / :func:`iter_driving` give for ``path``
    (None when a video file does not say)."""
    _check_counts(stride=stride, max_frames=max_frames)
    if os.path.isdir(path):
        if is_video_folder(path):
            n = _scan_folder(path)[1].num_frames
        else:
            n = len(_frame_files(path))
    elif not os.path.isfile(path):   # an error here, before a caller starts its progress bar
        raise _not_found(path)
    else:
        import imageio.v2 as iio

        try:
            r = iio.get_reader(path)
        except Exception as e:  # not a video: an error now, before any progress output
            raise fmt.DataError(_open_video_error(path, e)) from None
        try:
            n = r.count_frames()
        except Exception:  # a container without a frame count: unknown
            return None
        finally:
            r.close()
    n = len(range(0, n, stride))
    return n if max_frames is None else min(n, max_frames)


def iter_driving(path: str, resolution: int | None, *, chunk: int = 16,
                 max_frames: int | None = None, stride: int = 1):
    """:func:`read_driving` in chunks of at most ``chunk`` frames (the same dicts, split along
    T), reading only one chunk at a time: memory stays bounded for long videos."""
    _check_resolution(resolution)
    _check_counts(chunk=chunk, stride=stride, max_frames=max_frames)
    if os.path.isdir(path):
        if is_video_folder(path):
            n = _scan_folder(path)[1].num_frames
            idx = list(range(0, n, stride))[:max_frames]
            for a in range(0, len(idx), chunk):
                yield _read_video_folder(path, resolution, idx[a:a + chunk])
            return
        files = _frame_files(path)[::stride][:max_frames]
        for a in range(0, len(files), chunk):
            raw = [_read_image_file(f) for f in files[a:a + chunk]]
            yield {"image": _images(raw, resolution, crop=True, name=path)[0]}
        return
    if not os.path.isfile(path):
        raise _not_found(path)
    import imageio.v2 as iio

    try:
        reader = iio.get_reader(path)
    except Exception as e:
        raise fmt.DataError(_open_video_error(path, e)) from None
    raw, kept = [], 0
    try:
        for i, frame in enumerate(reader):
            if i % stride:
                continue
            raw.append(np.asarray(frame)[..., :3])
            kept += 1
            if len(raw) == chunk:
                yield {"image": _images(raw, resolution, crop=True, name=path)[0]}
                raw = []
            if max_frames is not None and kept >= max_frames:
                break
    finally:
        reader.close()
    if raw:
        yield {"image": _images(raw, resolution, crop=True, name=path)[0]}
    elif kept == 0:
        raise fmt.DataError(f"{path}: the video has no frames")


def video_fps(path: str) -> float | None:
    """Frames per second of a pyface video folder (meta.json) or a video file, else None."""
    try:
        if os.path.isdir(path):
            if is_video_folder(path):
                meta = fmt._load_json(os.path.join(path, fmt.META))
                return float(meta["fps"]) if meta.get("fps") else None
            return None
        import imageio.v2 as iio

        with iio.get_reader(path) as r:
            fps = r.get_meta_data().get("fps")
        return float(fps) if fps else None
    except Exception:  # fps is cosmetic: the caller falls back to a default
        return None
