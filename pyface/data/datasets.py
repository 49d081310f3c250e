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


def _synth_field():
    return field(default_factory=SynthOptions)


class _Configurable:
    """``from_config(data_config)``: the root from ``data.path`` or the built-in synthetic set
    (:func:`pyface.data.builtin.resolve_root`), the common fields (resolution, seed, skip_bad)
    and ``data.options`` converted to ``cls.Options``."""

    @classmethod
    def _init_kwargs(cls, o) -> dict:
        return {}

    @classmethod
    def from_config(cls, cfg):
        o = options_of(cls, getattr(cfg, "options", None))
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
            raise fmt.DataError(f"{self.root}: no usable videos")
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
        n = len(self)
        for k in range(n):
            try:
                return fn((index + k) % n)
            except fmt.DataError as e:
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping bad item {(index + k) % n}: {e}", stacklevel=3)
        raise fmt.DataError(f"{self.root}: no readable item left")


class FrameDataset(_Configurable, VideoDatasetBase):
    """Single frames, EG3D style. With ``mirror=True`` the dataset has twice the frames, the
    second half mirrored (EG3D's ``--mirror``)."""

    @dataclass
    class Options:
        mirror: bool = False
        load_masks: bool = True
        synth: SynthOptions = _synth_field()

    @classmethod
    def _init_kwargs(cls, o):
        return {"mirror": o.mirror}

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

    @dataclass
    class Options:
        mode: str = "same_video"
        min_gap: int = 0
        repeats: int = 8
        load_masks: bool = True
        synth: SynthOptions = _synth_field()

    @classmethod
    def _init_kwargs(cls, o):
        return {"mode": o.mode, "min_gap": o.min_gap, "repeats": o.repeats}

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

    @dataclass
    class Options:
        frames_per_item: int = 2
        radius: int = 13
        weighted: bool = True
        repeats: int = 64
        load_masks: bool = True
        synth: SynthOptions = _synth_field()

    @classmethod
    def _init_kwargs(cls, o):
        return {"frames_per_item": o.frames_per_item, "radius": o.radius,
                "weighted": o.weighted, "repeats": o.repeats}

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

    @dataclass
    class Options:
        frames: int = 8
        min_gap: int = 4
        repeats: int = 8
        load_masks: bool = True
        synth: SynthOptions = _synth_field()

    @classmethod
    def _init_kwargs(cls, o):
        return {"frames": o.frames, "min_gap": o.min_gap, "repeats": o.repeats}

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

    @classmethod
    def _init_kwargs(cls, o):
        return {"swap": o.swap}

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
