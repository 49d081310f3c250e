# Provenance: reproduces the dataset.json camera-label layout of EG3D (NVlabs/eg3d, commit
# 7cf1fd1, NVIDIA Source Code License, non-commercial). Our own implementation, written from the
# papers and the upstream's documented behaviour; no upstream code is copied. pyface's code is
# licensed under Apache-2.0 (LICENSE).
"""The on-disk talking-head dataset format, its index and its validation.

A dataset root holds one folder per video::

    ROOT/
      index.json                   fast listing (written by write_index / `pyface data index`)
      <video>/
        meta.json                  {"identity": str, "fps": float, "source": str,
                                    "num_frames": T, "resolution": [H, W], ...}
        frames/00000.png ...       RGB frames (or a single frames.mp4)
        masks/00000.png ...        optional foreground masks (8-bit, 255 = foreground)
        dataset.json               optional EG3D labels: {"labels": [["frames/00000.png", [25 floats]], ...]}
        coeffs.npy                 optional (T, 257) float32 Deep3DFaceRecon coefficients
        landmarks.npy              optional (T, 68, 2) or (T, 478, 2) float32, pixels (x right, y down)

Only the frames are required. A video without ``coeffs.npy`` / ``dataset.json`` / ``landmarks.npy``
loads with those keys absent from its items (image-only models); without ``meta.json`` (a
``frames/`` folder only) its identity is the folder name. Present files are always checked.

``index.json`` = ``{"format": "pyface-video/1", "videos": [{"name", "identity", "num_frames",
"frames": "png" | "mp4", "resolution", "has_masks", "has_landmarks"}, ...]}``.
"""
from __future__ import annotations

import atexit
import json
import os
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

FORMAT = "pyface-video/1"
INDEX = "index.json"
META = "meta.json"
#: Marks a dataset root whose `pyface data synth` generation has not finished
#: (:data:`pyface.data.synthetic.PARTIAL`).
SYNTH_PARTIAL = "synth.partial.json"
LABELS = "dataset.json"
COEFFS = "coeffs.npy"
LANDMARKS = "landmarks.npy"
FRAME_DIR, MASK_DIR, VIDEO_FILE = "frames", "masks", "frames.mp4"


class DataError(ValueError):
    """Bad or missing data; the message names the offending file."""


@dataclass
class VideoRecord:
    """One video of a dataset root (what ``index.json`` lists)."""

    name: str
    identity: str
    num_frames: int
    frames: str = "png"                 # "png" or "mp4"
    resolution: list = field(default_factory=list)
    has_masks: bool = False
    has_landmarks: bool = False

    def path(self, root: str, *parts: str) -> str:
        return os.path.join(root, self.name, *parts)

    def frame_path(self, root: str, i: int) -> str:
        if self.frames == "mp4":
            return self.path(root, VIDEO_FILE)
        return self.path(root, FRAME_DIR, f"{i:05d}.png")

    def mask_path(self, root: str, i: int) -> str:
        return self.path(root, MASK_DIR, f"{i:05d}.png")


# ----------------------------------------------------------------------------------------------
# writing


def write_video(root: str, name: str, frames: np.ndarray, coeffs: np.ndarray, labels: np.ndarray, *,
                identity: str, fps: float = 25.0, source: str = "unknown",
                masks: np.ndarray | None = None, landmarks: np.ndarray | None = None,
                extra_meta: dict | None = None, png_compression: int = 1) -> VideoRecord:
    """Writes one video folder.

    Args:
        frames: ``(T, H, W, 3)`` uint8.
        coeffs: ``(T, 257)``; labels: ``(T, 25)`` EG3D cameras.
        masks: optional ``(T, H, W)`` uint8 or bool; landmarks: optional ``(T, 68|478, 2)`` pixels.
    """
    from PIL import Image

    t = frames.shape[0]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if coeffs.shape != (t, 257):
        raise ValueError(f"coeffs: expected shape ({t}, 257), got {coeffs.shape}")
    if labels.shape != (t, 25):
        raise ValueError(f"labels: expected shape ({t}, 25), got {labels.shape}")
    d = os.path.join(root, name)
    os.makedirs(os.path.join(d, FRAME_DIR), exist_ok=True)
    entries = []
    for i in range(t):
        rel = f"{FRAME_DIR}/{i:05d}.png"
        Image.fromarray(frames[i]).save(os.path.join(d, rel), compress_level=png_compression)
        entries.append([rel, [float(x) for x in labels[i]]])
    if masks is not None:
        os.makedirs(os.path.join(d, MASK_DIR), exist_ok=True)
        m = masks.astype(np.uint8) * (255 if masks.dtype == bool else 1)
        for i in range(t):
            Image.fromarray(m[i]).save(os.path.join(d, MASK_DIR, f"{i:05d}.png"),
                                       compress_level=png_compression)
    np.save(os.path.join(d, COEFFS), coeffs.astype(np.float32))
    if landmarks is not None:
        np.save(os.path.join(d, LANDMARKS), landmarks.astype(np.float32))
    _dump(os.path.join(d, LABELS), {"labels": entries})
    meta = {"identity": identity, "fps": fps, "source": source, "num_frames": t,
            "resolution": [int(frames.shape[1]), int(frames.shape[2])]}
    meta.update(extra_meta or {})
    _dump(os.path.join(d, META), meta)
    return VideoRecord(name=name, identity=identity, num_frames=t, frames="png",
                       resolution=meta["resolution"], has_masks=masks is not None,
                       has_landmarks=landmarks is not None)


def _dump(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------------------------
# index


def scan_video(root: str, name: str) -> VideoRecord:
    """Builds a record from a video folder's files (meta.json and what exists). Without
    ``meta.json`` a ``frames/`` folder is a video whose identity is the folder name."""
    d = os.path.join(root, name)
    if not os.path.isfile(os.path.join(d, META)) and os.path.isdir(os.path.join(d, FRAME_DIR)):
        meta = {"identity": name}
    else:
        meta = _load_json(os.path.join(d, META))
    if not isinstance(meta, dict) or "identity" not in meta:
        raise DataError(f"{os.path.join(d, META)}: expected an object with an 'identity' field")
    if os.path.isdir(os.path.join(d, FRAME_DIR)):
        kind = "png"
        n = len([f for f in os.listdir(os.path.join(d, FRAME_DIR)) if f.endswith(".png")])
    elif os.path.isfile(os.path.join(d, VIDEO_FILE)):
        kind = "mp4"
        n = int(meta.get("num_frames", 0))
    else:
        raise DataError(f"{d}: neither {FRAME_DIR}/ nor {VIDEO_FILE} found")
    return VideoRecord(name=name, identity=str(meta["identity"]),
                       num_frames=int(meta.get("num_frames", n)), frames=kind,
                       resolution=list(meta.get("resolution", [])),
                       has_masks=os.path.isdir(os.path.join(d, MASK_DIR)),
                       has_landmarks=os.path.isfile(os.path.join(d, LANDMARKS)))


def video_names(root: str) -> list[str]:
    """Folders of ``root`` that are videos: with a ``meta.json`` or a ``frames/`` folder. Hidden
    folders (``.name``) are not: ``pyface data prepare`` writes a video into
    ``.<name>.partial`` until it is complete."""
    return sorted(e for e in os.listdir(root)
                  if not e.startswith(".")
                  and (os.path.isfile(os.path.join(root, e, META))
                       or os.path.isdir(os.path.join(root, e, FRAME_DIR))))


def write_index(root: str, records: list[VideoRecord] | None = None) -> list[VideoRecord]:
    """Scans ``root`` (unless ``records`` are given) and writes ``index.json``. Scanning
    refuses a missing root, a folder without videos, a video folder and an unfinished
    synthetic set (:class:`DataError`)."""
    if records is None:
        if not os.path.isdir(root):
            raise DataError(_not_a_root(root))
        _refuse_unfinished(root)
        if _is_video_folder(root):
            raise DataError(f"{root}: a video folder ({META} or {FRAME_DIR}/), not a dataset "
                            f"root; index the folder above it")
        if not video_names(root):
            raise DataError(f"{root}: no video folders (folders with {META} or {FRAME_DIR}/); "
                            f"{INDEX} not written")
        records = [scan_video(root, n) for n in video_names(root)]
    records = sorted(records, key=lambda r: r.name)
    _dump(os.path.join(root, INDEX), {"format": FORMAT, "videos": [asdict(r) for r in records]})
    return records


def _not_a_root(root: str) -> str:
    """Why ``root`` (not a folder) is no dataset root."""
    import zipfile

    if not os.path.exists(root):
        return f"{root}: dataset root not found"
    if zipfile.is_zipfile(root):
        return (f"{root}: a zip file; a pyface video dataset is a folder (unzip it: only image "
                "folders and EG3D datasets are read from zips, docs/data.md)")
    return f"{root}: not a folder"


def _is_video_folder(path: str) -> bool:
    """``path`` is one video (``meta.json``, or ``frames/`` holding frames), not a root whose
    video happens to be named ``frames``."""
    if os.path.isfile(os.path.join(path, META)):
        return True
    d = os.path.join(path, FRAME_DIR)
    return os.path.isdir(d) and any(f.endswith(".png") for f in os.listdir(d))


def _refuse_unfinished(root: str) -> None:
    if os.path.isfile(os.path.join(root, SYNTH_PARTIAL)):
        raise DataError(_unfinished_message(root))


def _unfinished_message(root: str) -> str:
    return (f"{os.path.join(root, SYNTH_PARTIAL)}: an unfinished `pyface data synth` (interrupted "
            "or still running), not a dataset; run the same command again to finish it, or "
            "delete the folder")


def load_index(root: str) -> list[VideoRecord]:
    """The videos of ``root`` from ``index.json`` (scanned, with a warning, when it is absent;
    none, without a warning, when there is no video folder to scan either: the caller's error
    says the root is no dataset)."""
    if not os.path.isdir(root):
        raise DataError(_not_a_root(root))
    _refuse_unfinished(root)
    path = os.path.join(root, INDEX)
    if not os.path.isfile(path):
        names = video_names(root)
        if names:
            warnings.warn(f"{path} not found; scanning the folders (run `pyface data index "
                          f"{root}` to write it)", stacklevel=2)
        return [scan_video(root, n) for n in names]
    idx = _load_json(path)
    if not isinstance(idx, dict) or idx.get("format") != FORMAT or "videos" not in idx:
        raise DataError(f"{path}: not a {FORMAT} index")
    try:
        return [VideoRecord(**v) for v in idx["videos"]]
    except TypeError as e:
        raise DataError(f"{path}: bad video entry ({e})") from None


# ----------------------------------------------------------------------------------------------
# per-video arrays (checked)


def load_coeffs(root: str, rec: VideoRecord, required: bool = True) -> np.ndarray | None:
    """``(T, 257)`` float32; a missing file raises, or returns None with ``required=False``."""
    path = rec.path(root, COEFFS)
    try:
        c = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        if not required:
            return None
        raise DataError(f"{path}: missing") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if c.shape != (rec.num_frames, 257):
        raise DataError(f"{path}: expected shape ({rec.num_frames}, 257) for {rec.num_frames} "
                        f"frames, got {c.shape}")
    if not np.isfinite(c).all():
        raise DataError(f"{path}: contains NaN or inf")
    return c.astype(np.float32)


def _frames(indices) -> str:
    """``[2]`` -> "frame 2", ``[2, 5]`` -> "frames [2, 5]" (the first 10 listed)."""
    indices = [int(i) for i in indices]
    return f"frame {indices[0]}" if len(indices) == 1 else f"frames {indices[:10]}"


def load_labels(root: str, rec: VideoRecord, required: bool = True) -> np.ndarray | None:
    """``(T, 25)`` float32 EG3D cameras; a missing file raises, or returns None with
    ``required=False``."""
    path = rec.path(root, LABELS)
    if not required and not os.path.exists(path):
        return None
    d = _load_json(path)
    try:
        labels = d["labels"]
        arr = np.asarray([lab[1] for lab in labels], dtype=np.float64)
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise DataError(f"{path}: expected {{'labels': [[file, [25 floats]], ...]}} ({e})") from None
    if arr.shape != (rec.num_frames, 25):
        raise DataError(f"{path}: expected {rec.num_frames} labels of 25 values, got shape {arr.shape}")
    bad = ~np.isfinite(arr).all(1)
    if bad.any():
        raise DataError(f"{path}: NaN or inf camera for {_frames(np.nonzero(bad)[0])}")
    rot = arr[:, :16].reshape(-1, 4, 4)[:, :3, :3]
    err = np.abs(rot.transpose(0, 2, 1) @ rot - np.eye(3)).max(axis=(1, 2))
    if (err > 1e-3).any():
        raise DataError(f"{path}: cam2world rotation not orthonormal for "
                        f"{_frames(np.nonzero(err > 1e-3)[0])}")
    return arr.astype(np.float32)


def load_landmarks(root: str, rec: VideoRecord) -> np.ndarray | None:
    if not rec.has_landmarks:
        return None
    path = rec.path(root, LANDMARKS)
    try:
        lm = np.load(path, allow_pickle=False)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if lm.ndim != 3 or lm.shape[0] != rec.num_frames or lm.shape[1] not in (68, 478) or lm.shape[2] != 2:
        raise DataError(f"{path}: expected shape ({rec.num_frames}, 68|478, 2), got {lm.shape}")
    return lm.astype(np.float32)


_mp4_readers: dict = {}


def close_readers() -> None:
    """Closes the cached mp4 readers of this process (also run at exit)."""
    for key in list(_mp4_readers):
        try:
            _mp4_readers.pop(key).close()
        except Exception:  # a reader of a dead or forked process: nothing left to release
            pass


atexit.register(close_readers)


def rgb8(im) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of a Pillow image, the one conversion every pyface image reader
    uses. 16-bit and 32-bit grey (modes ``I;16*``, ``I`` as Pillow opens 16-bit PNGs, ``F``) are
    scaled from the 16-bit range by 255/65535: Pillow's own ``convert("RGB")`` clips those values
    at 255, which turns nearly every pixel white. Other modes (palette, grey, CMYK, with alpha)
    go through ``convert("RGB")``; an alpha channel is dropped, keeping the colour under it."""
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        g = np.clip(np.round(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    return np.array(im if im.mode == "RGB" else im.convert("RGB"))


def read_frame(root: str, rec: VideoRecord, i: int) -> np.ndarray:
    """Frame ``i`` as ``(H, W, 3)`` uint8; raises :class:`DataError` naming the file."""
    if not 0 <= i < rec.num_frames:
        raise IndexError(f"frame {i} out of range for {rec.name} ({rec.num_frames} frames)")
    path = rec.frame_path(root, i)
    try:
        if rec.frames == "mp4":
            import imageio.v2 as iio
            key = (os.getpid(), path)
            if key not in _mp4_readers:
                _mp4_readers[key] = iio.get_reader(path)
            img = np.asarray(_mp4_readers[key].get_data(i))
        else:
            from PIL import Image
            with Image.open(path) as im:
                img = rgb8(im)
    except FileNotFoundError:
        raise DataError(f"{path}: missing frame") from None
    except Exception as e:  # PIL/imageio raise many types for corrupt data
        raise DataError(f"{path}: corrupt or unreadable frame ({type(e).__name__}: {e})") from None
    return img


def read_mask(root: str, rec: VideoRecord, i: int) -> np.ndarray | None:
    if not rec.has_masks:
        return None
    path = rec.mask_path(root, i)
    try:
        from PIL import Image
        with Image.open(path) as im:
            return np.array(im if im.mode == "L" else im.convert("L"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing mask") from None
    except Exception as e:
        raise DataError(f"{path}: corrupt or unreadable mask ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------
# validation


def check_video(root: str, rec: VideoRecord, deep: bool = True) -> list[str]:
    """Problems of one video (each names a file); empty when the video is fine. ``deep`` decodes
    every frame and mask, otherwise only their presence is checked."""
    problems = []
    meta = rec.path(root, META)
    if os.path.isfile(meta):
        try:
            m = _load_json(meta)
            if not isinstance(m, dict) or "identity" not in m:
                problems.append(f"{meta}: expected an object with an 'identity' field")
        except DataError as e:
            problems.append(str(e))
    for fn in (lambda: load_coeffs(root, rec, required=False),
               lambda: load_labels(root, rec, required=False),
               lambda: load_landmarks(root, rec)):
        try:
            fn()
        except DataError as e:
            problems.append(str(e))
    if rec.frames == "mp4":
        if not os.path.isfile(rec.frame_path(root, 0)):
            problems.append(f"{rec.frame_path(root, 0)}: missing video")
        elif deep:
            try:
                read_frame(root, rec, rec.num_frames - 1)
            except (DataError, IndexError) as e:
                problems.append(str(e))
    for i in range(rec.num_frames):
        for kind, path, reader in (("frame", rec.frame_path(root, i), read_frame),
                                   ("mask", rec.mask_path(root, i), read_mask)):
            if kind == "frame" and rec.frames == "mp4":
                continue
            if kind == "mask" and not rec.has_masks:
                continue
            if not os.path.isfile(path):
                problems.append(f"{path}: missing {kind}")
            elif deep:
                try:
                    reader(root, rec, i)
                except DataError as e:
                    problems.append(str(e))
    return problems


def check_dataset(root: str, deep: bool = True) -> tuple[list[VideoRecord], list[str]]:
    """Validates a dataset root: index vs folders, the options of the videos
    :mod:`pyface.data.prepare` wrote (alike: :func:`pyface.data.prepare.mixed_options`), then
    every video. Returns (records, problems)."""
    problems = []
    if not os.path.isdir(root):
        return [], [_not_a_root(root)]
    if os.path.isfile(os.path.join(root, SYNTH_PARTIAL)):
        return [], [_unfinished_message(root)]
    if _is_video_folder(root):
        return [], [f"{root}: a video folder ({META} or {FRAME_DIR}/), not a dataset root; check "
                    "the folder above it"]
    names = set(video_names(root))
    try:
        if os.path.isfile(os.path.join(root, INDEX)):
            records = load_index(root)
            listed = {r.name for r in records}
            for n in sorted(names - listed):
                problems.append(f"{os.path.join(root, n)}: video folder not in {INDEX} "
                                f"(re-run `pyface data index`)")
            for n in sorted(listed - names):
                problems.append(f"{os.path.join(root, n, META)}: listed in {INDEX} but missing")
            records = [r for r in records if r.name in names]
        else:
            problems.append(f"{os.path.join(root, INDEX)}: missing (run `pyface data index`)")
            records = []
            for n in sorted(names):
                try:
                    records.append(scan_video(root, n))
                except DataError as e:
                    problems.append(str(e))
    except DataError as e:
        return [], problems + [str(e)]
    if not names:
        problems.append(f"{root}: no video folders (folders with {META} or {FRAME_DIR}/)")
    for e in sorted(os.listdir(root)):
        if e.startswith(".") and e.endswith(".partial") and os.path.isdir(os.path.join(root, e)):
            problems.append(f"{os.path.join(root, e)}: an unfinished video of an interrupted "
                            "`pyface data prepare` (not part of the dataset; re-run the same "
                            "command with --resume to finish it, or delete the folder)")
    from pyface.data.prepare import MIXED_OPTIONS_FIX, mixed_options

    for line in mixed_options(root, [r.name for r in records]):
        problems.append(f"{root}: videos prepared with different options: {line}; "
                        f"{MIXED_OPTIONS_FIX}, then pyface data index {root}")
    for rec in records:
        problems += check_video(root, rec, deep=deep)
    return records, problems

