"""Torch datasets over the pyface video format, image folders and EG3D ``dataset.json`` folders.

All datasets are worker-safe (no open files or RNG state shared between workers; randomness is
drawn from ``numpy.random.default_rng([seed, epoch, index])``, so an item depends only on the
seed, the epoch (:meth:`set_epoch`) and its index, never on the worker that loads it).

Items are dicts of tensors. Images are ``(3, H, W)`` uint8 (as EG3D's loader returns them, so
worker processes pass a quarter of the bytes; convert on the device with :func:`to_float`), or
float32 in [0, 1] with ``image_dtype=torch.float32``; resized to ``resolution`` when given.
Masks ``(1, H, W)`` follow the image dtype (255 or 1.0 = foreground), ``camera (25,)`` EG3D
labels, ``coeffs (257,)``, ``landmarks (68, 2)`` in pixels of the returned image.

Videos without ``coeffs.npy`` / ``dataset.json`` / ``landmarks.npy`` load; their items simply lack
``coeffs`` / ``camera`` / ``landmarks`` (datasets that need coefficients, such as
:class:`MotionWindowDataset`, raise a DataError naming the file instead).

Every dataset registered for training (``pyface.train.registry.DATASETS``) has an ``Options``
dataclass (``data.options`` in a training config) and a ``from_config(data_config)`` builder.

Bad data (missing or corrupt frames, a coefficient file of the wrong length, NaN cameras)
raises :class:`pyface.data.format.DataError` naming the file. With ``skip_bad=True`` bad videos
are dropped when the dataset is built and an item whose frame cannot be decoded is replaced by
the next good one, each with a warning: nothing fails silently.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pyface.data import format as fmt
from pyface.data.builtin import SynthOptions, resolve_root

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


def _with_mirrored_cameras(cams: torch.Tensor, mirror: bool) -> torch.Tensor:
    """``cams`` (N, 25), followed by their mirrors with ``mirror`` (a dataset doubled by
    mirrored copies lists them after the originals)."""
    from pyface.face.cameras import mirror_label

    return torch.cat([cams, mirror_label(cams)]) if mirror else cams


# ----------------------------------------------------------------------------------------------
# typed options of the registered datasets


def options_of(cls, options):
    """``cls.Options`` from ``None`` (defaults), an ``Options`` instance or a mapping (nested
    ``synth`` mapping included). Unknown keys raise a ValueError listing the valid ones."""
    opt_cls = cls.Options
    if options is None:
        return opt_cls()
    if isinstance(options, opt_cls):
        return options
    if not isinstance(options, dict):
        raise TypeError(f"data.options: expected a mapping or {cls.__name__}.Options, got "
                        f"{type(options).__name__}")
    names = [f.name for f in dataclasses.fields(opt_cls)]
    for k in options:
        if k not in names:
            raise ValueError(f"data.options.{k}: unknown option of {cls.__name__}; valid: "
                             f"{', '.join(names)}")
    kw = dict(options)
    if isinstance(kw.get("synth"), dict):
        snames = [f.name for f in dataclasses.fields(SynthOptions)]
        for k in kw["synth"]:
            if k not in snames:
                raise ValueError(f"data.options.synth.{k}: unknown option; valid: {', '.join(snames)}")
        kw["synth"] = SynthOptions(**kw["synth"])
    return opt_cls(**kw)


def _first_readable(fn, index: int, n: int, skip_bad: bool, where: str, what: str, *,
                    stacklevel: int):
    """``fn(index)``. A DataError is raised, or with ``skip_bad`` warned about ("skipping bad
    item I: ...", ``stacklevel`` counted from here) and the next index tried, cyclically, until
    an item reads; none of the ``n`` does: DataError "WHERE: no readable WHAT left"."""
    for k in range(n):
        i = (index + k) % n
        try:
            return fn(i)
        except fmt.DataError as e:
            if not skip_bad:
                raise
            warnings.warn(f"skipping bad item {i}: {e}", stacklevel=stacklevel)
    raise fmt.DataError(f"{where}: no readable {what} left")


def _synth_field():
    return field(default_factory=SynthOptions)


class _Configurable:
    """``from_config(data_config)``: the root from ``data.path`` or the built-in synthetic set
    (:func:`pyface.data.builtin.resolve_root`), the common fields (resolution, seed, skip_bad)
    and ``data.options`` converted to ``cls.Options``."""

    #: Lower bounds of numeric options, checked before the root is resolved (and the built-in
    #: set perhaps generated): ``{field: minimum}``.
    _OPTION_MIN: dict = {}

    #: Options fields every dataset has, which from_config uses itself (to find the root, to
    #: pass ``load_masks`` to VideoDatasetBase): not keywords of the dataset's own.
    _COMMON_OPTIONS = ("load_masks", "synth")

    @classmethod
    def _init_kwargs(cls, o) -> dict:
        """The dataset's own keyword arguments: every other field of ``cls.Options``, under its
        own name."""
        return {f.name: getattr(o, f.name) for f in dataclasses.fields(o)
                if f.name not in cls._COMMON_OPTIONS}

    @classmethod
    def from_config(cls, cfg):
        o = options_of(cls, getattr(cfg, "options", None))
        for k, low in cls._OPTION_MIN.items():
            if getattr(o, k) < low:
                raise fmt.DataError(f"data.options.{k}: expected >= {low} for {cls.__name__}, "
                                    f"got {getattr(o, k)}")
        root = resolve_root(cfg, getattr(o, "synth", None))
        return cls(root, cfg.resolution, seed=cfg.seed, skip_bad=cfg.skip_bad,
                   load_masks=o.load_masks, **cls._init_kwargs(o))


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
                c = fmt.load_coeffs(self.root, rec, required=False)
                lab = fmt.load_labels(self.root, rec, required=False)
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
            why = "" if records or os.path.isfile(os.path.join(self.root, fmt.INDEX)) else (
                f" (no {fmt.INDEX} and no video folders, folders with {fmt.META} or "
                f"{fmt.FRAME_DIR}/: not a pyface dataset root)")
            raise fmt.DataError(f"{self.root}: no usable videos{why}")
        idents = sorted({v.identity for v in self.videos})
        self.identity_ids = {name: i for i, name in enumerate(idents)}
        self.video_identity = np.array([self.identity_ids[v.identity] for v in self.videos])
        lengths = np.array([v.num_frames for v in self.videos])
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.num_frames_total = int(self.offsets[-1])

    def require_coeffs(self, why: str) -> None:
        """Raises a DataError naming the first video without ``coeffs.npy``."""
        for rec, c in zip(self.videos, self.coeffs):
            if c is None:
                raise fmt.DataError(f"{rec.path(self.root, fmt.COEFFS)}: missing ({why} needs "
                                    "the 3DMM coefficients of every video)")

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
                "identity": torch.tensor(int(self.video_identity[v])),
                "video": torch.tensor(v), "frame": torch.tensor(f), "mirrored": torch.tensor(False)}
        if self.labels[v] is not None:
            item["camera"] = torch.from_numpy(self.labels[v][f])
        if self.coeffs[v] is not None:
            item["coeffs"] = torch.from_numpy(self.coeffs[v][f])
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
        return _first_readable(fn, index, len(self), self.skip_bad, self.root, "item", stacklevel=4)


class FrameDataset(_Configurable, VideoDatasetBase):
    """Single frames, EG3D style. With ``mirror=True`` the dataset has twice the frames, the
    second half mirrored (EG3D's ``--mirror``)."""

    @dataclass
    class Options:
        mirror: bool = False
        load_masks: bool = True
        synth: SynthOptions = _synth_field()

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

    def item_labels(self, key: str) -> torch.Tensor | None:
        """``key``'s value of every item, in item order, stacked ``(len(self), ...)``, read from
        the per-frame labels without decoding a frame: ``"camera"`` (the second half mirrored
        with ``mirror``, as the items are). None for another key or when a video has no
        cameras (the caller then reads the items themselves)."""
        if key != "camera" or any(lab is None for lab in self.labels):
            return None
        cams = torch.from_numpy(np.concatenate(self.labels)).float()
        return _with_mirrored_cameras(cams, self.mirror)


class PairDataset(_Configurable, VideoDatasetBase):
    """Source/driving pairs (registered as ``pairs``). Index = the driving frame (index modulo
    the number of frames: ``repeats`` > 1 lists every driving frame ``repeats`` times, each
    index with its own random source, so a training run that never calls :meth:`set_epoch`
    still sees varied pairs). ``mode="same_video"`` draws the source from the same video (how
    every model here trains), at least ``min_gap`` frames away when the video allows it;
    ``"cross_video"`` from another video of the same identity when there is one, else of any
    other video; ``"cross_identity"`` from a video of another identity. Items: ``source`` and
    ``driving`` dicts (see :meth:`frame`)."""

    MODES = ("same_video", "cross_video", "cross_identity")

    _OPTION_MIN = {"min_gap": 0, "repeats": 1}

    @dataclass
    class Options:
        mode: str = "same_video"
        min_gap: int = 0
        repeats: int = 8
        load_masks: bool = True
        synth: SynthOptions = _synth_field()

    def __init__(self, root, resolution=None, *, mode: str = "same_video",
                 min_gap: int = 0, repeats: int = 1, **kw):
        if mode not in self.MODES:
            raise ValueError(f"mode: expected one of {self.MODES}, got {mode!r}")
        if int(repeats) < 1 or int(min_gap) < 0:
            raise ValueError(f"repeats / min_gap: expected >= 1 / >= 0, got {repeats} / {min_gap}")
        super().__init__(root, resolution, **kw)
        self.mode = mode
        self.min_gap = int(min_gap)
        self.repeats = int(repeats)
        if mode == "cross_identity" and len(self.identity_ids) < 2:
            raise fmt.DataError(f"{self.root}: mode='cross_identity' needs >= 2 identities")
        if mode == "cross_video" and len(self.videos) < 2:
            raise fmt.DataError(f"{self.root}: mode='cross_video' needs >= 2 videos")

    def __len__(self):
        return self.num_frames_total * self.repeats

    def __getitem__(self, index):
        return self._guarded(index, self._item)

    def source_of(self, index: int) -> tuple[int, int]:
        """(video, frame) of the source paired with item ``index`` (driving frame
        ``index % frames``)."""
        rng = self._rng(index)
        v, f = self.locate(index % self.num_frames_total)
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
        return {"source": self.frame(sv, sf),
                "driving": self.frame(*self.locate(index % self.num_frames_total))}


def expression_weights(coeffs: np.ndarray) -> np.ndarray:
    """OTAvatar's frame weights ``(T,)``: proportional to the L1 norm of the expression
    coefficients (favours expressive frames); uniform when all are zero."""
    w = np.abs(np.asarray(coeffs)[:, 80:144]).sum(1).astype(np.float64)
    s = w.sum()
    return w / s if s > 0 else np.full(len(w), 1.0 / len(w))


class MotionWindowDataset(_Configurable, VideoDatasetBase):
    """OTAvatar's training item (registered as ``motion_windows``): one identity, one random
    video of it, ``frames_per_item`` frames drawn with :func:`expression_weights`
    (``weighted=True``) or uniformly, each with its 70 x 27 motion window
    (:func:`pyface.face.coeffs.motion_window`, clamped at the video ends).

    Index = identity (``index % identities``; ``repeats`` lists every identity that many times,
    each index with its own draw). Items: ``image (K, 3, H, W)``, ``mask (K, 1, H, W)`` (when
    present), ``motion (K, 70, 27)``, ``camera (K, 25)``, ``coeffs (K, 257)``, ``landmarks
    (K, 68, 2)`` (when present), ``id_coeffs (K, 80)``, ``frame (K,)``, ``video``,
    ``identity``. Needs ``coeffs.npy`` and ``dataset.json`` in every video.
    """

    _OPTION_MIN = {"frames_per_item": 1, "radius": 0, "repeats": 1}

    @dataclass
    class Options:
        frames_per_item: int = 2
        radius: int = 13
        weighted: bool = True
        repeats: int = 64
        load_masks: bool = True
        synth: SynthOptions = _synth_field()

    def __init__(self, root, resolution=None, *, frames_per_item: int = 2, radius: int = 13,
                 weighted: bool = True, repeats: int = 1, **kw):
        if int(frames_per_item) < 1 or int(radius) < 0 or int(repeats) < 1:
            raise ValueError(f"frames_per_item / radius / repeats: expected >= 1 / >= 0 / >= 1, "
                             f"got {frames_per_item} / {radius} / {repeats}")
        super().__init__(root, resolution, **kw)
        self.require_coeffs("MotionWindowDataset")
        for rec, lab in zip(self.videos, self.labels):
            if lab is None:
                raise fmt.DataError(f"{rec.path(self.root, fmt.LABELS)}: missing "
                                    "(MotionWindowDataset needs the cameras of every video)")
        self.k = int(frames_per_item)
        self.radius = int(radius)
        self.weighted = weighted
        self.repeats = int(repeats)
        self.identity_videos = [np.nonzero(self.video_identity == i)[0]
                                for i in range(len(self.identity_ids))]

    def __len__(self):
        return len(self.identity_ids) * self.repeats

    def __getitem__(self, index):
        return self._guarded(index, self._item)

    def _item(self, index):
        from pyface.face.coeffs import motion_window

        rng = self._rng(index)
        identity = index % len(self.identity_ids)
        vids = self.identity_videos[identity]
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
               "coeffs": ct[frames],
               "id_coeffs": ct[frames, 0:80],
               "frame": torch.from_numpy(frames), "video": torch.tensor(v),
               "identity": torch.tensor(identity)}
        for k in ("landmarks", "mask"):
            if k in items[0]:
                out[k] = torch.stack([it[k] for it in items])
        return out


class ClipDataset(_Configurable, VideoDatasetBase):
    """``frames`` frames of one video, consecutive chosen frames at least ``min_gap`` apart
    (Export3D's CLeBS pre-training; registered as ``clips``).

    Index = video (``index % videos``; ``repeats`` lists every video that many times, each
    index with its own draw). The frame set is uniform over all sets of ``frames`` frames whose
    sorted neighbours differ by ``>= min_gap`` (so a video needs ``(frames - 1) * min_gap + 1``
    frames; shorter videos raise a DataError, or are skipped with a warning with ``skip_bad``).
    Items: ``image (N, 3, H, W)``, ``mask (N, 1, H, W)``, ``camera (N, 25)``, ``coeffs (N, 257)``,
    ``landmarks (N, 68, 2)`` (each when the video has it), ``frame (N,)`` sorted, ``video``,
    ``identity``.
    """

    _OPTION_MIN = {"frames": 1, "min_gap": 1, "repeats": 1}

    @dataclass
    class Options:
        frames: int = 8
        min_gap: int = 4
        repeats: int = 8
        load_masks: bool = True
        synth: SynthOptions = _synth_field()

    def __init__(self, root, resolution=None, *, frames: int = 8, min_gap: int = 1,
                 repeats: int = 1, **kw):
        if int(frames) < 1 or int(min_gap) < 1 or int(repeats) < 1:
            raise ValueError(f"frames / min_gap / repeats: expected >= 1, got {frames} / "
                             f"{min_gap} / {repeats}")
        super().__init__(root, resolution, **kw)
        self.n, self.min_gap, self.repeats = int(frames), int(min_gap), int(repeats)
        need = (self.n - 1) * self.min_gap + 1
        self.clip_videos = []
        for v, rec in enumerate(self.videos):
            if rec.num_frames >= need:
                self.clip_videos.append(v)
                continue
            msg = (f"{rec.path(self.root, fmt.META)}: {rec.num_frames} frames, a clip of "
                   f"{self.n} frames with min_gap {self.min_gap} needs {need}")
            if not self.skip_bad:
                raise fmt.DataError(msg)
            warnings.warn(f"skipping video {rec.name}: {msg}", stacklevel=2)
        if not self.clip_videos:
            raise fmt.DataError(f"{self.root}: no video long enough for clips of {self.n} frames "
                                f"with min_gap {self.min_gap} ({need} frames)")

    def __len__(self):
        return len(self.clip_videos) * self.repeats

    def __getitem__(self, index):
        return self._guarded(index, self._item)

    def clip_frames(self, index: int) -> tuple[int, np.ndarray]:
        """(video, sorted frame indices ``(N,)``) of item ``index``."""
        rng = self._rng(index)
        v = self.clip_videos[index % len(self.clip_videos)]
        slack = self.videos[v].num_frames - (self.n - 1) * (self.min_gap - 1)
        u = np.sort(rng.choice(slack, size=self.n, replace=False))
        return v, u + np.arange(self.n) * (self.min_gap - 1)

    def _item(self, index):
        v, frames = self.clip_frames(index)
        items = [self.frame(v, int(f)) for f in frames]
        out = {k: torch.stack([it[k] for it in items])
               for k in ("image", "mask", "camera", "coeffs", "landmarks") if k in items[0]}
        out.update({"frame": torch.from_numpy(frames.astype(np.int64)), "video": torch.tensor(v),
                    "identity": items[0]["identity"]})
        return out


class MultiViewDataset(_Configurable, Dataset):
    """One instant seen from two cameras (registered as ``multiview``): frame ``f`` of video
    ``V`` of ``ROOT`` (camera 0) and frame ``f`` of ``ROOT/multiview/V`` (camera 1 of the
    synthetic engine's two-camera rig, ``SynthConfig(multiview=True)``; same head, expression
    and surface colours, another camera).

    Index = a frame of a video that has a second view. Items: ``{"source": frame, "driving":
    frame}`` like :class:`PairDataset` (so a pair-trained model can use them as is), each frame
    dict with ``view`` (0 or 1, its camera) and ``video`` (the camera-0 video's index); with
    ``swap=True`` the view that is the source is drawn per item (``(seed, epoch, index)``),
    otherwise the source is camera 0.
    """

    VIEWS = "multiview"

    @dataclass
    class Options:
        swap: bool = True
        load_masks: bool = True
        synth: SynthOptions = _synth_field()

    def __init__(self, root, resolution=None, *, swap: bool = True, **kw):
        self.root = os.fspath(root)
        vroot = os.path.join(self.root, self.VIEWS)
        if not os.path.isdir(vroot):
            raise fmt.DataError(f"{vroot}: missing; the second views are rendered by the synthetic "
                                "engine with multiview=True (pyface data synth --multiview)")
        self.base = FrameDataset(self.root, resolution, **kw)
        self.views = FrameDataset(vroot, resolution, **kw)
        self.swap = swap
        self.seed, self.epoch = self.base.seed, 0
        view_of = {r.name: i for i, r in enumerate(self.views.videos)}
        self.pairs = []
        for v, rec in enumerate(self.base.videos):
            u = view_of.get(rec.name)
            if u is None:
                continue
            if self.views.videos[u].num_frames != rec.num_frames:
                raise fmt.DataError(f"{self.views.videos[u].path(vroot, fmt.META)}: "
                                    f"{self.views.videos[u].num_frames} frames, camera 0 has "
                                    f"{rec.num_frames}")
            self.pairs.append((v, u))
        if not self.pairs:
            raise fmt.DataError(f"{vroot}: no second view of any video of {self.root}")
        self.offsets = np.concatenate([[0], np.cumsum([self.base.videos[v].num_frames
                                                       for v, _ in self.pairs])])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, index):
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        f = int(index - self.offsets[k])
        v, u = self.pairs[k]
        a = self.base.frame(v, f)
        b = self.views.frame(u, f)
        a["view"], b["view"] = torch.tensor(0), torch.tensor(1)
        b["video"] = a["video"]
        if self.swap and np.random.default_rng([self.seed, self.epoch, int(index)]).integers(2):
            a, b = b, a
        return {"source": a, "driving": b}


class CrossIdentityDataset(_Configurable, Dataset):
    """The cross-identity evaluation set written by the synthetic engine (``ROOT/cross``).

    Index = a frame of a cross video. Items: ``source`` (identity A's source frame), ``driving``
    (the driving frame of identity B) and ``target`` (the ground truth: A with B's expression and
    pose), each a frame dict as in :class:`FrameDataset`. Registered as ``cross_identity``.
    """

    @dataclass
    class Options:
        load_masks: bool = True
        synth: SynthOptions = _synth_field()

    def __init__(self, root, resolution=None, **kw):
        self.root = os.fspath(root)
        cross = os.path.join(self.root, "cross")
        if os.path.isdir(self.root) and not os.path.isdir(cross):
            raise fmt.DataError(f"{cross}: missing; the cross-identity ground truth is written by "
                                "the synthetic engine with cross=True and >= 2 identities "
                                "(pyface data synth without --no-cross)")
        self.cross = FrameDataset(cross, resolution, **kw)
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
# mixtures of registered datasets


@dataclass
class MixtureComponent:
    """One component of a :class:`MixtureDataset` (``data.options.components.<key>``):
    ``dataset``, a registered dataset (None: the component's key); ``weight``, its sampling
    weight (>= 0; 0 leaves it out); ``options``, that dataset's own ``Options`` (a mapping is
    converted; ``synth`` is the mixture's, shared by every component)."""

    dataset: str | None = None
    weight: float = 1.0
    options: Any = None


def _config_error(msg: str) -> Exception:
    from pyface.train.config import ConfigError

    return ConfigError(msg)


class MixtureDataset(Dataset):
    """Items drawn from several registered datasets over one root, by weight (registered as
    ``mixture``), e.g. GOHA's same-video pairs and static multi-view pairs at 2 : 1::

        data: {name: mixture, options: {components: {pairs: {weight: 2},
                                                     multiview: {weight: 1}}}}

    Layout: the mixture has ``L`` items (``length``; 0: the smallest ``L`` in which every
    component's share covers all its items, ``max_k ceil(len_k / p_k)`` with ``p_k = w_k /
    sum(w)``); component ``k`` owns ``n_k = round(L p_k)`` of them (largest remainders, so
    ``sum n_k = L``), interleaved evenly (its ``j``-th slot at about ``(j + 0.5) L / n_k``), so an
    epoch of the engine's permutation sampler draws each component exactly in proportion and
    any run of consecutive indices nearly so. Slot ``j`` of component ``k`` is its item
    ``perm[j % len_k]``, ``perm`` a permutation of its items seeded by ``(seed, epoch, k)``
    (identity when ``n_k >= len_k`` leaves no choice to make); the component draws its own
    randomness from ``(seed, epoch, its index)``. So an item is a pure function of ``(seed,
    epoch, index)``, whatever the worker or the number of ranks. :meth:`set_epoch` is passed on
    to the components.

    Items: the component's item with one more key, ``component`` (its index in
    :attr:`names`, int64). Keys: items of every component must collate together. A key that
    some components have and others lack is filled where it is missing when :data:`FILL` has a
    value for it (``view``: 0, the camera of a one-camera video; so ``pairs`` frames get the
    ``view`` that ``multiview`` frames carry), and dropped from every item otherwise (with a
    warning when the mixture is built, naming the keys; :attr:`dropped_keys`). A key with
    different shapes or dtypes in two components is a DataError naming it. The key sets are
    read from each component's item 0 when the mixture is built.

    Args:
        components: ``{name: dataset}``, map-style datasets of dict items (ordered).
        weights: ``{name: weight}``, the same names, weights >= 0, not all 0 (a 0 weight
            leaves the component out).
        seed: the mixture's seed (inner permutations).
        length: ``L``; 0: the smallest that covers every component.
    """

    #: default values of keys a component may lack (see the class docstring)
    FILL = {"view": 0}

    @dataclass
    class Options:
        components: dict[str, MixtureComponent] = field(default_factory=dict)
        length: int = 0
        synth: SynthOptions = _synth_field()

        def __post_init__(self):
            _check_mixture_options(self)

    @classmethod
    def from_config(cls, cfg):
        """Builds every component with weight > 0 from ``cfg`` (a data config) with its own
        name and options and the mixture's ``synth`` (so all read the same root)."""
        from pyface.train import registry

        o = cfg.options
        if o is None or isinstance(o, dict):
            from pyface.train.config import from_dict

            o = from_dict(cls.Options, o or {}, prefix="data.options.")
        if not isinstance(o, cls.Options):
            raise TypeError(f"data.options: expected MixtureDataset.Options, got "
                            f"{type(o).__name__}")
        datasets, weights = {}, {}
        for key, comp in o.components.items():
            if comp.weight == 0:
                continue
            opts = comp.options
            if opts is not None and any(f.name == "synth" for f in dataclasses.fields(opts)):
                opts = dataclasses.replace(opts, synth=o.synth)
            if dataclasses.is_dataclass(cfg):
                sub = dataclasses.replace(cfg, name=comp.dataset, options=opts)
            else:
                import copy

                sub = copy.copy(cfg)
                sub.name, sub.options = comp.dataset, opts
            ds = registry.build_dataset(sub)
            if len(ds) == 0:
                raise fmt.DataError(f"data.options.components.{key}: dataset {comp.dataset!r} "
                                    f"has no items (data.path {getattr(cfg, 'path', None)!r})")
            datasets[key], weights[key] = ds, comp.weight
        return cls(datasets, weights, seed=cfg.seed, length=o.length)

    def __init__(self, components: dict, weights: dict, *, seed: int = 0, length: int = 0):
        if not components:
            raise ValueError("components: expected at least one dataset, got none")
        if set(weights) != set(components):
            raise ValueError(f"weights: expected one weight per component "
                             f"{sorted(components)}, got {sorted(weights)}")
        for k, w in weights.items():
            if not np.isfinite(w) or w < 0:
                raise ValueError(f"weights[{k!r}]: expected a finite weight >= 0, got {w}")
        if int(length) < 0:
            raise ValueError(f"length: expected >= 0 (0: automatic), got {length}")
        self.names = [k for k in components if weights[k] > 0]
        if not self.names:
            raise ValueError(f"weights: expected at least one > 0, got {dict(weights)}")
        self.datasets = [components[k] for k in self.names]
        for k, ds in zip(self.names, self.datasets):
            if len(ds) == 0:
                raise ValueError(f"components[{k!r}]: empty dataset")
        self.seed, self.epoch = int(seed), 0
        w = np.array([float(weights[k]) for k in self.names])
        p = w / w.sum()
        lens = np.array([len(ds) for ds in self.datasets], dtype=np.int64)
        L = int(length) or int(max(np.ceil(lens / p - 1e-9).max(), 1))
        q = L * p
        n = np.floor(q).astype(np.int64)
        for k in np.argsort(-(q - n), kind="stable")[:L - int(n.sum())]:
            n[k] += 1
        self.lengths, self.counts, self.weights = lens, n, p
        keys = np.concatenate([(np.arange(c) + 0.5) / c for c in n if c > 0])
        comp = np.concatenate([np.full(c, k, np.int64) for k, c in enumerate(n) if c > 0])
        rank = np.concatenate([np.arange(c, dtype=np.int64) for c in n if c > 0])
        order = np.argsort(keys, kind="stable")
        self._comp, self._rank = comp[order], rank[order]
        self._perms: dict = {}
        self._keys, self.dropped_keys = self._schema()
        if self.dropped_keys:
            warnings.warn(f"mixture of {', '.join(self.names)}: keys not in every component's "
                          f"items are dropped: {', '.join(self.dropped_keys)}", stacklevel=2)

    # -- key sets
    def _schema(self):
        """The kept key tree ``{key: (shape, dtype) or subtree}`` and the dropped keys."""
        def tree(item, where):
            if not isinstance(item, dict):
                raise fmt.DataError(f"{where}: expected a dict item, got {type(item).__name__}")
            out = {}
            for k, v in item.items():
                if isinstance(v, dict):
                    out[k] = tree(v, f"{where}[{k!r}]")
                elif torch.is_tensor(v):
                    out[k] = (tuple(v.shape), v.dtype)
                else:
                    out[k] = (None, type(v))
            return out

        trees = [tree(ds[0], f"components[{k!r}][0]") for k, ds in zip(self.names, self.datasets)]
        dropped: list[str] = []

        def merge(ts, path):
            out = {}
            for key in dict.fromkeys(k for t in ts for k in t):
                here = [(n, t[key]) for n, t in zip(self.names, ts) if key in t]
                name = ".".join(path + [key])
                kinds = {isinstance(v, dict) for _, v in here}
                if len(kinds) > 1:
                    raise fmt.DataError(f"mixture: key {name!r} is a dict in some components "
                                        f"and not in others ({', '.join(n for n, _ in here)})")
                if len(here) < len(ts) and not (key in self.FILL and kinds == {False}):
                    dropped.append(name)
                    continue
                if kinds == {True}:
                    out[key] = merge([v for _, v in here], path + [key])
                    continue
                specs = {v for _, v in here}
                if len(specs) > 1:
                    raise fmt.DataError(
                        f"mixture: key {name!r} differs between components: "
                        + ", ".join(f"{n} {v[0]} {v[1]}" for n, v in here))
                out[key] = here[0][1]
            return out

        return merge(trees, []), dropped

    def _conform(self, item: dict, keys: dict) -> dict:
        out = {}
        for k, spec in keys.items():
            if isinstance(spec, dict):
                out[k] = self._conform(item[k], spec)
            elif k in item:
                out[k] = item[k]
            else:
                out[k] = torch.full(spec[0], self.FILL[k], dtype=spec[1])
        return out

    # -- sampling
    def set_epoch(self, epoch: int) -> None:
        """The epoch of the inner permutations, passed on to every component that has
        ``set_epoch``."""
        self.epoch = int(epoch)
        for ds in self.datasets:
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)

    def __len__(self):
        return len(self._comp)

    def locate(self, index: int) -> tuple[int, int]:
        """Mixture index -> (component, the component's index)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index: expected 0 <= index < {len(self)}, got {index}")
        k, j = int(self._comp[index]), int(self._rank[index])
        n = int(self.lengths[k])
        if self.counts[k] >= n:
            return k, j % n
        perm = self._perms.get((self.epoch, k))
        if perm is None:
            self._perms = {e: v for e, v in self._perms.items() if e[0] == self.epoch}
            perm = np.random.default_rng([self.seed, self.epoch, k, 7919]).permutation(n)
            self._perms[(self.epoch, k)] = perm
        return k, int(perm[j])

    def __getitem__(self, index):
        k, j = self.locate(int(index))
        out = self._conform(self.datasets[k][j], self._keys)
        out["component"] = torch.tensor(k)
        return out


def _check_mixture_options(o) -> None:
    """Converts and checks :class:`MixtureDataset.Options` in place (ConfigError naming the
    field)."""
    import math

    from pyface.train import registry
    from pyface.train.config import from_dict

    pre = "data.options.components"
    if not isinstance(o.components, dict):
        raise _config_error(f"{pre}: expected a mapping {{name: {{weight, options}}}}, got "
                            f"{o.components!r}")
    if not o.components:
        raise _config_error(f"{pre}: expected at least one component, e.g. --set "
                            f"{pre}.pairs.weight=2 --set {pre}.multiview.weight=1")
    if int(o.length) < 0:
        raise _config_error(f"data.options.length: expected >= 0 (0: automatic), got {o.length}")
    comps = {}
    for key, c in o.components.items():
        where = f"{pre}.{key}"
        if c is None:
            c = MixtureComponent()
        elif isinstance(c, dict):
            c = from_dict(MixtureComponent, c, prefix=where + ".")
        elif not isinstance(c, MixtureComponent):
            raise _config_error(f"{where}: expected a mapping {{dataset, weight, options}}, got "
                                f"{c!r}")
        name = c.dataset or key
        try:
            target = registry.dataset_class(name)
        except KeyError as exc:
            raise _config_error(f"{where}.dataset: {exc.args[0]}") from None
        if target is MixtureDataset:
            raise _config_error(f"{where}.dataset: a mixture cannot be a component of a mixture")
        w = c.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise _config_error(f"{where}.weight: expected a finite number >= 0, got {w!r}")
        opt_cls = getattr(target, "Options", None)
        opts = c.options
        if opt_cls is None:
            if opts:
                raise _config_error(f"{where}.options: dataset {name!r} takes no options, got "
                                    f"{opts!r}")
        elif not isinstance(opts, opt_cls):
            if opts is not None and not isinstance(opts, dict):
                raise _config_error(f"{where}.options: expected a mapping of {name!r}'s "
                                    f"options, got {opts!r}")
            opts = from_dict(opt_cls, opts or {}, prefix=where + ".options.")
        if opts is not None and any(f.name == "synth" for f in dataclasses.fields(opts)):
            if isinstance(c.options, dict) and "synth" in c.options and opts.synth != o.synth:
                raise _config_error(f"{where}.options.synth: the components share the "
                                    "mixture's root; set data.options.synth instead (got "
                                    f"{opts.synth}, the mixture's {o.synth})")
            opts = dataclasses.replace(opts, synth=o.synth)
        comps[key] = MixtureComponent(dataset=name, weight=float(w), options=opts)
    if not any(c.weight > 0 for c in comps.values()):
        raise _config_error(f"{pre}: every weight is 0; at least one must be > 0 (got "
                            + ", ".join(f"{k} {c.weight:g}" for k, c in comps.items()) + ")")
    o.components = comps


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
                return fmt.rgb8(im)
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
        return _first_readable(self._item, index, len(self), self.skip_bad, self.source.path,
                               "image", stacklevel=3)

    def item_labels(self, key: str) -> torch.Tensor | None:
        """``key``'s value of every item, in item order, stacked ``(len(self), ...)``, read from
        ``dataset.json`` without decoding an image: ``"camera"`` (the second half mirrored with
        ``mirror``, as the items are). None for another key or without labels."""
        if key != "camera" or self.cameras is None:
            return None
        return _with_mirrored_cameras(torch.from_numpy(self.cameras).float(), self.mirror)

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
