"""Torch datasets over the pyface video format, image folders and EG3D ``dataset.json`` folders.

All datasets are worker-safe (no open files or RNG state shared between workers; randomness is
drawn from ``numpy.random.default_rng([seed, epoch, index])``, so an item depends only on the
seed, the epoch (:meth:`set_epoch`) and its index, never on the worker that loads it).

Items are dicts of tensors. Images are ``(3, H, W)`` uint8 (as EG3D's loader returns them, so
worker processes pass a quarter of the bytes; convert on the device with :func:`to_float`), or
float32 in [0, 1] with ``image_dtype=torch.float32``; resized to ``resolution`` when given.
Masks ``(1, H, W)`` follow the image dtype (255 or 1.0 = foreground), ``camera (25,)`` EG3D
labels, ``coeffs (257,)``, ``landmarks (68, 2)`` in pixels of the returned image.

Bad data (missing or corrupt frames, a coefficient file of the wrong length, NaN cameras)
raises :class:`pyface.data.format.DataError` naming the file. With ``skip_bad=True`` bad videos
are dropped when the dataset is built and an item whose frame cannot be decoded is replaced by
the next good one, each with a warning: nothing fails silently.
"""
from __future__ import annotations

import io
import json
import os
import warnings
import zipfile

import numpy as np
import torch
from torch.utils.data import Dataset

from pyface.data import format as fmt

# iBUG-68 left-right mirror permutation.
MIRROR_68 = np.array(
    list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46] + [39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65])


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape) -> float32 in [0, 1]; float images pass through."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def _to_image(arr: np.ndarray, resolution: int | None, dtype=torch.uint8) -> torch.Tensor:
    t = torch.from_numpy(arr).permute(2, 0, 1)
    if resolution is not None and tuple(t.shape[-2:]) != (resolution, resolution):
        t = torch.nn.functional.interpolate(t[None].float(), size=(resolution, resolution),
                                            mode="bilinear", antialias=True, align_corners=False)[0]
        t = t.clamp_(0, 255)
        return t.div_(255.0) if dtype == torch.float32 else t.round_().to(torch.uint8)
    t = t.contiguous()
    return t.float().div_(255.0) if dtype == torch.float32 else t


def _to_mask(arr: np.ndarray, resolution: int | None, dtype=torch.uint8) -> torch.Tensor:
    return _to_image(arr[..., None], resolution, dtype)


def _check_dtype(image_dtype):
    if image_dtype not in (torch.uint8, torch.float32):
        raise ValueError(f"image_dtype: expected torch.uint8 or torch.float32, got {image_dtype}")
    return image_dtype


def mirror_item(item: dict) -> dict:
    """Left-right mirror of an item in place: images and masks flipped, camera mirrored
    (:func:`pyface.face.cameras.mirror_label`), landmarks mirrored and re-ordered, pose
    coefficients mirrored (yaw, roll and x translation negated; id/exp/tex are left as they are:
    a general 3DMM basis has no mirror symmetry)."""
    from pyface.face.cameras import mirror_label

    for k in ("image", "mask"):
        if k in item:
            item[k] = item[k].flip(-1).contiguous()
    if "camera" in item:
        item["camera"] = mirror_label(item["camera"])
    if "landmarks" in item:
        w = item["image"].shape[-1]
        lm = item["landmarks"].clone()
        lm[..., 0] = w - lm[..., 0]
        if lm.shape[-2] == 68:
            lm = lm[..., torch.from_numpy(MIRROR_68), :]
        item["landmarks"] = lm
    if "coeffs" in item:
        c = item["coeffs"].clone()
        c[..., 225] = -c[..., 225]
        c[..., 226] = -c[..., 226]
        c[..., 254] = -c[..., 254]
        item["coeffs"] = c
    item["mirrored"] = torch.tensor(True)
    return item


class VideoDatasetBase(Dataset):
    """Shared loading of a pyface video root (see :mod:`pyface.data.format`)."""

    def __init__(self, root: str, resolution: int | None = None, *, seed: int = 0,
                 skip_bad: bool = False, load_masks: bool = True,
                 image_dtype: torch.dtype = torch.uint8):
        self.root = os.fspath(root)
        self.resolution = resolution
        self.image_dtype = _check_dtype(image_dtype)
        self.seed = int(seed)
        self.epoch = 0
        self.skip_bad = skip_bad
        self.load_masks = load_masks
        records = fmt.load_index(self.root)
        self.videos, self.coeffs, self.labels, self.landmarks = [], [], [], []
        for rec in records:
            try:
                c = fmt.load_coeffs(self.root, rec)
                lab = fmt.load_labels(self.root, rec)
                lm = fmt.load_landmarks(self.root, rec)
                missing = [rec.frame_path(self.root, i) for i in range(rec.num_frames)
                           if rec.frames == "png" and not os.path.isfile(rec.frame_path(self.root, i))]
                if rec.frames == "mp4" and not os.path.isfile(rec.frame_path(self.root, 0)):
                    missing = [rec.frame_path(self.root, 0)]
                if missing:
                    raise fmt.DataError(f"{missing[0]}: missing frame"
                                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
                if rec.num_frames <= 0:
                    raise fmt.DataError(f"{rec.path(self.root, fmt.META)}: video has no frames")
            except fmt.DataError as e:
                if not skip_bad:
                    raise
                warnings.warn(f"skipping video {rec.name}: {e}", stacklevel=2)
                continue
            self.videos.append(rec)
            self.coeffs.append(c)
            self.labels.append(lab)
            self.landmarks.append(lm)
        if not self.videos:
            raise fmt.DataError(f"{self.root}: no usable videos")
        idents = sorted({v.identity for v in self.videos})
        self.identity_ids = {name: i for i, name in enumerate(idents)}
        self.video_identity = np.array([self.identity_ids[v.identity] for v in self.videos])
        lengths = np.array([v.num_frames for v in self.videos])
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.num_frames_total = int(self.offsets[-1])

    def set_epoch(self, epoch: int) -> None:
        """Changes the random draws of the next epoch (call it from every worker's sampler loop;
        items depend only on ``(seed, epoch, index)``)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def locate(self, flat: int) -> tuple[int, int]:
        """Flat frame index -> (video, frame)."""
        v = int(np.searchsorted(self.offsets, flat, side="right") - 1)
        return v, int(flat - self.offsets[v])

    def frame(self, v: int, f: int) -> dict:
        """One frame of video ``v`` as an item dict (raises DataError on bad data)."""
        rec = self.videos[v]
        img = fmt.read_frame(self.root, rec, f)
        h, w = img.shape[:2]
        item = {"image": _to_image(img, self.resolution, self.image_dtype),
                "camera": torch.from_numpy(self.labels[v][f]),
                "coeffs": torch.from_numpy(self.coeffs[v][f]),
                "identity": torch.tensor(int(self.video_identity[v])),
                "video": torch.tensor(v), "frame": torch.tensor(f), "mirrored": torch.tensor(False)}
        if self.load_masks and rec.has_masks:
            item["mask"] = _to_mask(fmt.read_mask(self.root, rec, f), self.resolution, self.image_dtype)
        if self.landmarks[v] is not None:
            lm = torch.from_numpy(self.landmarks[v][f]).clone()
            if self.resolution is not None:
                lm *= torch.tensor([self.resolution / w, self.resolution / h])
            item["landmarks"] = lm
        return item

    def _guarded(self, index: int, fn):
        """Runs ``fn(index)``; with ``skip_bad`` a DataError moves on to the next index."""
        n = len(self)
        for k in range(n):
            try:
                return fn((index + k) % n)
            except fmt.DataError as e:
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping bad item {(index + k) % n}: {e}", stacklevel=3)
        raise fmt.DataError(f"{self.root}: no readable item left")


class FrameDataset(VideoDatasetBase):
    """Single frames, EG3D style. With ``mirror=True`` the dataset has twice the frames, the
    second half mirrored (EG3D's ``--mirror``)."""

    def __init__(self, root, resolution=None, *, mirror: bool = False, **kw):
        super().__init__(root, resolution, **kw)
        self.mirror = mirror

    def __len__(self):
        return self.num_frames_total * (2 if self.mirror else 1)

    def __getitem__(self, index):
        return self._guarded(index, self._item)

    def _item(self, index):
        flip = index >= self.num_frames_total
        item = self.frame(*self.locate(index % self.num_frames_total))
        return mirror_item(item) if flip else item


class PairDataset(VideoDatasetBase):
    """Source/driving pairs. Index = the driving frame. ``mode="same_video"`` draws the source
    from the same video (how every model here trains); ``"cross_video"`` from another video of
    the same identity when there is one, else of any other video; ``"cross_identity"`` from a
    video of another identity. Items: ``source`` and ``driving`` dicts (see :meth:`frame`)."""

    MODES = ("same_video", "cross_video", "cross_identity")

    def __init__(self, root, resolution=None, *, mode: str = "same_video",
                 min_gap: int = 0, **kw):
        if mode not in self.MODES:
            raise ValueError(f"mode: expected one of {self.MODES}, got {mode!r}")
        super().__init__(root, resolution, **kw)
        self.mode = mode
        self.min_gap = int(min_gap)
        if mode == "cross_identity" and len(self.identity_ids) < 2:
            raise fmt.DataError(f"{self.root}: mode='cross_identity' needs >= 2 identities")
        if mode == "cross_video" and len(self.videos) < 2:
            raise fmt.DataError(f"{self.root}: mode='cross_video' needs >= 2 videos")

    def __len__(self):
        return self.num_frames_total

    def __getitem__(self, index):
        return self._guarded(index, self._item)

    def source_of(self, index: int) -> tuple[int, int]:
        """(video, frame) of the source paired with driving frame ``index``."""
        rng = self._rng(index)
        v, f = self.locate(index)
        if self.mode == "same_video":
            n = self.videos[v].num_frames
            cands = [k for k in range(n) if abs(k - f) >= self.min_gap] or list(range(n))
            return v, int(cands[rng.integers(len(cands))])
        ident = self.video_identity[v]
        if self.mode == "cross_video":
            pool = [u for u in range(len(self.videos)) if u != v and self.video_identity[u] == ident]
            pool = pool or [u for u in range(len(self.videos)) if u != v]
        else:
            pool = [u for u in range(len(self.videos)) if self.video_identity[u] != ident]
        u = int(pool[rng.integers(len(pool))])
        return u, int(rng.integers(self.videos[u].num_frames))

    def _item(self, index):
        sv, sf = self.source_of(index)
        return {"source": self.frame(sv, sf), "driving": self.frame(*self.locate(index))}


def expression_weights(coeffs: np.ndarray) -> np.ndarray:
    """OTAvatar's frame weights ``(T,)``: proportional to the L1 norm of the expression
    coefficients (favours expressive frames); uniform when all are zero."""
    w = np.abs(np.asarray(coeffs)[:, 80:144]).sum(1).astype(np.float64)
    s = w.sum()
    return w / s if s > 0 else np.full(len(w), 1.0 / len(w))


class MotionWindowDataset(VideoDatasetBase):
    """OTAvatar's training item: one identity, one random video of it, ``frames_per_item`` frames
    drawn with :func:`expression_weights` (``weighted=True``) or uniformly, each with its 70 x 27
    motion window (:func:`pyface.face.coeffs.motion_window`, clamped at the video ends).

    Index = identity. Items: ``image (K, 3, H, W)``, ``motion (K, 70, 27)``, ``camera (K, 25)``,
    ``landmarks (K, 68, 2)`` (when present), ``id_coeffs (K, 80)``, ``frame (K,)``, ``video``,
    ``identity``.
    """

    def __init__(self, root, resolution=None, *, frames_per_item: int = 2, radius: int = 13,
                 weighted: bool = True, **kw):
        super().__init__(root, resolution, **kw)
        self.k = int(frames_per_item)
        self.radius = int(radius)
        self.weighted = weighted
        self.identity_videos = [np.nonzero(self.video_identity == i)[0]
                                for i in range(len(self.identity_ids))]

    def __len__(self):
        return len(self.identity_ids)

    def __getitem__(self, index):
        return self._guarded(index, self._item)

    def _item(self, index):
        from pyface.face.coeffs import motion_window

        rng = self._rng(index)
        vids = self.identity_videos[index]
        v = int(vids[rng.integers(len(vids))])
        c = self.coeffs[v]
        p = expression_weights(c) if self.weighted else None
        n_pos = len(c) if p is None else int(np.count_nonzero(p))
        frames = rng.choice(len(c), size=self.k, replace=n_pos < self.k, p=p)
        items = [self.frame(v, int(f)) for f in frames]
        ct = torch.from_numpy(c)
        out = {"image": torch.stack([it["image"] for it in items]),
               "motion": motion_window(ct, torch.from_numpy(frames), self.radius),
               "camera": torch.stack([it["camera"] for it in items]),
               "id_coeffs": ct[frames, 0:80],
               "frame": torch.from_numpy(frames), "video": torch.tensor(v),
               "identity": torch.tensor(index)}
        if "landmarks" in items[0]:
            out["landmarks"] = torch.stack([it["landmarks"] for it in items])
        return out


class CrossIdentityDataset(Dataset):
    """The cross-identity evaluation set written by the synthetic engine (``ROOT/cross``).

    Index = a frame of a cross video. Items: ``source`` (identity A's source frame), ``driving``
    (the driving frame of identity B) and ``target`` (the ground truth: A with B's expression and
    pose), each a frame dict as in :class:`FrameDataset`.
    """

    def __init__(self, root, resolution=None, **kw):
        self.root = os.fspath(root)
        self.cross = FrameDataset(os.path.join(self.root, "cross"), resolution, **kw)
        self.base = FrameDataset(self.root, resolution, **kw)
        self.by_name = {r.name: i for i, r in enumerate(self.base.videos)}
        self.meta = []
        for rec in self.cross.videos:
            m = fmt._load_json(rec.path(self.cross.root, fmt.META))
            for k in ("source_video", "driving_video"):
                if m.get(k) not in self.by_name:
                    raise fmt.DataError(f"{rec.path(self.cross.root, fmt.META)}: {k} "
                                        f"{m.get(k)!r} not found in {self.root}")
            self.meta.append(m)

    def __len__(self):
        return len(self.cross)

    def __getitem__(self, index):
        v, f = self.cross.locate(index)
        m = self.meta[v]
        return {"source": self.base.frame(self.by_name[m["source_video"]], int(m.get("source_frame", 0))),
                "driving": self.base.frame(self.by_name[m["driving_video"]], f),
                "target": self.cross.frame(v, f)}


# ----------------------------------------------------------------------------------------------
# image folders (FFHQ-like) and EG3D dataset.json folders / zips

_IMG_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class _Source:
    """Files of a folder or an uncompressed/compressed zip, opened lazily per process."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.is_zip = os.path.isfile(self.path) and zipfile.is_zipfile(self.path)
        if not self.is_zip and not os.path.isdir(self.path):
            raise fmt.DataError(f"{self.path}: not a folder or a zip file")
        self._zip, self._pid = None, None

    def names(self) -> list[str]:
        if self.is_zip:
            with zipfile.ZipFile(self.path) as z:
                return sorted(z.namelist())
        out = []
        for d, _, files in os.walk(self.path):
            out += [os.path.relpath(os.path.join(d, f), self.path).replace(os.sep, "/") for f in files]
        return sorted(out)

    def read(self, name: str) -> bytes:
        where = f"{self.path}:{name}" if self.is_zip else os.path.join(self.path, name)
        try:
            if self.is_zip:
                if self._zip is None or self._pid != os.getpid():
                    self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
                return self._zip.read(name)
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read()
        except (KeyError, FileNotFoundError):
            raise fmt.DataError(f"{where}: missing") from None
        except (OSError, zipfile.BadZipFile) as e:
            raise fmt.DataError(f"{where}: unreadable ({e})") from None

    def image(self, name: str) -> np.ndarray:
        from PIL import Image
        where = f"{self.path}:{name}" if self.is_zip else os.path.join(self.path, name)
        data = self.read(name)
        try:
            with Image.open(io.BytesIO(data)) as im:
                return np.array(im.convert("RGB"))
        except Exception as e:
            raise fmt.DataError(f"{where}: corrupt or unreadable image ({type(e).__name__}: {e})") from None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_zip"], d["_pid"] = None, None
        return d


class ImageFolderDataset(Dataset):
    """Images of a folder (recursively) or a zip, FFHQ-like, optionally with EG3D cameras.

    With ``labels=True`` (default: when ``dataset.json`` exists) each item also has ``camera
    (25,)`` from EG3D's ``dataset.json`` (``{"labels": [[name, [25 floats]], ...]}``); images
    without a label, or NaN labels, raise (or are dropped with ``skip_bad``). ``mirror=True``
    doubles the dataset with mirrored copies (EG3D ``--mirror``).
    """

    def __init__(self, path, resolution: int | None = None, *, labels: bool | None = None,
                 mirror: bool = False, skip_bad: bool = False,
                 image_dtype: torch.dtype = torch.uint8):
        self.source = _Source(path)
        self.resolution = resolution
        self.image_dtype = _check_dtype(image_dtype)
        self.mirror = mirror
        self.skip_bad = skip_bad
        names = self.source.names()
        self.files = [n for n in names if n.lower().endswith(_IMG_EXT)]
        if not self.files:
            raise fmt.DataError(f"{self.source.path}: no images ({', '.join(_IMG_EXT)})")
        has_json = "dataset.json" in names
        self.use_labels = has_json if labels is None else labels
        self.cameras = None
        if self.use_labels:
            where = f"{self.source.path}:dataset.json"
            if not has_json:
                raise fmt.DataError(f"{where}: missing (labels=True)")
            try:
                lab = json.loads(self.source.read("dataset.json"))["labels"]
                lab = {str(n).replace(os.sep, "/"): np.asarray(c, np.float32) for n, c in (lab or [])}
            except (KeyError, TypeError, ValueError) as e:
                raise fmt.DataError(f"{where}: expected {{'labels': [[file, [25 floats]], ...]}} ({e})") from None
            keep, cams = [], []
            for n in self.files:
                c = lab.get(n)
                err = None
                if c is None:
                    err = f"{where}: no label for {n}"
                elif c.shape != (25,):
                    err = f"{where}: label of {n} has shape {c.shape}, expected (25,)"
                elif not np.isfinite(c).all():
                    err = f"{where}: NaN or inf camera for {n}"
                if err:
                    if not skip_bad:
                        raise fmt.DataError(err)
                    warnings.warn(f"skipping: {err}", stacklevel=2)
                    continue
                keep.append(n)
                cams.append(c)
            self.files = keep
            self.cameras = np.stack(cams) if cams else np.zeros((0, 25), np.float32)
            if not self.files:
                raise fmt.DataError(f"{where}: no usable labelled images")

    def __len__(self):
        return len(self.files) * (2 if self.mirror else 1)

    def __getitem__(self, index):
        n = len(self)
        for k in range(n):
            i = (index + k) % n
            try:
                return self._item(i)
            except fmt.DataError as e:
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping bad item {i}: {e}", stacklevel=2)
        raise fmt.DataError(f"{self.source.path}: no readable image left")

    def _item(self, index):
        k = index % len(self.files)
        item = {"image": _to_image(self.source.image(self.files[k]), self.resolution, self.image_dtype),
                "index": torch.tensor(k), "mirrored": torch.tensor(False)}
        if self.cameras is not None:
            item["camera"] = torch.from_numpy(self.cameras[k])
        return mirror_item(item) if index >= len(self.files) else item


def EG3DDataset(path, resolution=None, **kw) -> ImageFolderDataset:
    """An EG3D dataset (folder or zip with ``dataset.json``): images with their 25-dim cameras
    (keyword arguments as :class:`ImageFolderDataset`)."""
    return ImageFolderDataset(path, resolution, labels=True, **kw)
