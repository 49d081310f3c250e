"""``pyface data prepare``: portrait videos and photos -> pyface datasets (docs/data.md).

Pipeline per video (two decoding passes, so memory does not grow with the video length):

1. **Decode** with PyAV (in-process FFmpeg: exact frame order, a Python exception naming the
   file for corrupt streams, wheels that bundle FFmpeg), applying the stream's display rotation
   (portrait phone videos) like players do; frame folders and images with Pillow.
2. **Face mesh** (478 points) with MediaPipe's legacy face-mesh solution (``mediapipe==0.10.21``,
   whose wheel ships the detector and mesh models: offline) in tracking mode, several faces per
   frame; the kept track is the largest, most central face of the first frame with a face,
   followed by box overlap (a frame whose pick overlaps no pick of the frame before is a jump,
   ``track_jumps``: smoothing restarts there; a frame or two missing the kept face while another
   face is seen are left out instead, when the kept face comes back). Per-frame confidence: the
   best score of MediaPipe's short- and full-range face detectors for the kept face (0 when only
   the mesh tracker found it). Frames without the kept face are flagged and left out.
3. **Smoothing**: Savitzky-Golay over time of the mesh (per run of consecutive kept frames);
   jitter (:func:`pyface.data.landmarks.jitter`) before and after is recorded. 478 -> 68 with
   :func:`pyface.data.landmarks.mesh_to_68`.
4. **Crop** (square, no rotation), its centre and size smoothed over time:
   ``eg3d``: EG3D's in-the-wild recipe - a 5-point fit (eye centres, nose tip, mouth corners)
   of the head model's 5-point template gives the scale ``s`` (pixels per model unit) and the
   centre ``t`` (the template origin's image); the image is scaled to put ``s`` at 300/1024 of
   the crop and the central 700 of the 1024 square is kept: side ``700 s / 300``.
   ``fomm``: FOMM/LivePortrait-style - side 2.0 x the larger side of the 68-landmark box, centre
   the box centre raised by 0.1 x side.
5. **Matting**: MediaPipe selfie segmentation of the crop (threshold 0.5), or with
   ``matting="modnet"`` the soft alpha of MODNet (:mod:`pyface.nn.modnet`) with weights from a
   user path (``matting_weights``; nothing is downloaded).
6. **3DMM fit** (:func:`pyface.face.fit.fit_landmarks`): 257 coefficients and EG3D labels;
   then albedo and lighting (:func:`pyface.face.fit.fit_appearance`) on 64x64 copies of the crops.
7. **Photometric refinement** (:func:`pyface.face.fit.fit_photometric`, ``photometric=True``):
   identity, expression and pose refined against the 64x64 crops (skin colours sampled at the
   projected vertices) together with the landmarks; then the final albedo and lighting.

Output per video: ``frames/``, ``masks/``, ``landmarks.npy (T, 68, 2)`` (the detector's, iBUG
convention), ``landmarks_fit.npy (T, 68, 2)`` (the fitted model's own landmarks, with the fit),
``mesh.npy (T, 478, 3)`` (crop pixels; z in the same scale), ``coeffs.npy``, ``dataset.json``, ``meta.json`` (with
``source_frames``, per-frame ``confidence``, ``fit_residual_px`` and ``photometric_rms``
(0..255), ``no_face_frames``,
``jitter_px``, and for a video whose decoding failed part-way ``decode_error``
(``{"frame": N, "message": ...}``: frames ``0 .. N-1`` are kept, with a warning) and
``source_damaged`` (the warning)); a video is written into a hidden folder and renamed when
complete, so ``--resume`` skips exactly the finished ones.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import re
import shutil
import time
import unicodedata
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from pyface.cli import plural
from pyface.data import format as fmt
from pyface.data.landmarks import jitter, mesh_to_68

APPEARANCE_SIZE = 64                # crops are downsampled to this for the albedo/lighting fit
#: The fitted model's own 68 landmarks ``(T, 68, 2)`` in crop pixels (its landmark vertices, or
#: BFM's iBUG keypoints, projected with the fitted camera); ``landmarks.npy`` keeps the detector's.
LANDMARKS_FIT = "landmarks_fit.npy"
#: Overrides of :class:`pyface.face.fit.PhotometricConfig` for the photometric refinement.
PHOTOMETRIC_OPTIONS: dict = {}
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
CROPS = ("eg3d", "fomm")
MATTING = ("selfie", "modnet")
EXTRA_HINT = 'pip install -e ".[prepare]"'
#: The fewest decoded frames that make a video: fewer is an error; a video whose decoding fails
#: part-way (a truncated file) keeps its frames when at least this many decoded.
MIN_FRAMES = 1


GENERATOR = "pyface.data.prepare"       # meta.json's "generator" of a prepared video
#: The config fields that change what a video's preparation writes: stored in ``meta.json``
#: (``options``); ``--resume`` reuses a finished video only when they match.
OUTPUT_OPTIONS = ("crop", "resolution", "fit", "fit_steps", "smooth_window", "crop_sigma",
                  "min_detection_confidence", "max_faces", "submission_offsets", "bfm",
                  "appearance", "photometric", "matting", "matting_weights")
#: The ``pyface data prepare`` option of each config field (messages name the option).
CLI_OPTIONS = {"out": "--out", "crop": "--crop", "resolution": "--resolution",
               "workers": "--workers", "fit": "--no-fit", "fit_steps": "--fit-steps",
               "bfm": "--bfm", "appearance": "--no-appearance", "photometric": "--no-photometric",
               "matting": "--matting", "matting_weights": "--matting-weights",
               "submission_offsets": "--submission-offsets", "skip_bad": "--skip-bad",
               "resume": "--resume", "shard": "--shard"}


class PrepareError(fmt.DataError):
    """An input that cannot be prepared; the message names the file."""


@dataclass
class PrepareConfig:
    out: str
    crop: str = "eg3d"
    resolution: int = 256
    workers: int = 1
    skip_bad: bool = False
    resume: bool = False
    fit: bool = True
    fit_steps: int = 100
    smooth_window: int = 5          # Savitzky-Golay window (frames, odd) of the landmarks
    crop_sigma: float = 2.0         # Gaussian sigma (frames) of the crop centre and size
    min_detection_confidence: float = 0.3
    max_faces: int = 4
    progress: bool = True
    submission_offsets: bool = False
    bfm: str | None = None          # BFM_model_front.mat for the fit (default: the built-in head)
    appearance: bool = True         # fit albedo (per video) and SH lighting (per frame) too
    photometric: bool = True        # refine geometry and pose with the image (needs appearance)
    matting: str = "selfie"         # "selfie" (MediaPipe) or "modnet" (needs matting_weights)
    matting_weights: str | None = None   # MODNet weights file (e.g. the released .ckpt)
    #: ``(K, N)``: prepare only the videos of shard K of N (:func:`shard_of`) and leave
    #: ``index.json`` alone (``pyface data index`` once all shards finished); None: all videos
    shard: tuple | None = None

    def __post_init__(self):
        if self.shard is not None:
            ok = isinstance(self.shard, (tuple, list)) and len(self.shard) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) for x in self.shard)
            if not ok or not 0 <= self.shard[0] < self.shard[1]:
                raise ValueError(f"shard: expected (K, N) with 0 <= K < N, got {self.shard!r}")
            self.shard = (self.shard[0], self.shard[1])
        if self.crop not in CROPS:
            raise ValueError(f"crop: expected one of {CROPS}, got {self.crop!r}")
        if self.matting not in MATTING:
            raise ValueError(f"matting: expected one of {MATTING}, got {self.matting!r}")
        if self.matting == "modnet" and not self.matting_weights:
            raise ValueError("matting: 'modnet' needs its weights: pass matting_weights "
                             "(--matting-weights PATH, e.g. MODNet's released "
                             "modnet_photographic_portrait_matting.ckpt); pyface downloads nothing")
        if self.matting == "selfie" and self.matting_weights:
            raise ValueError(f"matting_weights: only used with matting='modnet', got "
                             f"{self.matting_weights!r} with matting='selfie'")
        if self.resolution not in (256, 512):
            raise ValueError(f"resolution: expected 256 or 512, got {self.resolution}")
        if self.workers < 1:
            raise ValueError(f"workers: expected >= 1, got {self.workers}")
        if self.fit_steps < 1:
            raise ValueError(f"fit_steps: expected >= 1, got {self.fit_steps}")
        if self.smooth_window < 1 or self.smooth_window % 2 == 0:
            raise ValueError(f"smooth_window: expected an odd number >= 1, got {self.smooth_window}")


def options(cfg: PrepareConfig) -> dict:
    """The :data:`OUTPUT_OPTIONS` of ``cfg`` as ``meta.json`` stores them (paths absolute), and
    :data:`PHOTOMETRIC_OPTIONS` as ``photometric_options`` when it overrides anything."""
    d = {k: getattr(cfg, k) for k in OUTPUT_OPTIONS}
    for k in ("bfm", "matting_weights"):
        if d[k]:
            d[k] = os.path.abspath(d[k])
    if PHOTOMETRIC_OPTIONS:             # as JSON gives it back (tuples are lists)
        d["photometric_options"] = json.loads(json.dumps(PHOTOMETRIC_OPTIONS))
    return d


#: The options that change nothing when ``fit`` is off (then there is no 3DMM fit: zero
#: coefficients and frontal cameras).
FIT_OPTIONS = ("fit_steps", "bfm", "appearance", "photometric", "photometric_options",
               "submission_offsets")


def effective_options(opts: dict) -> dict:
    """The options of ``opts`` (an :func:`options` record) that decide the output: without
    ``fit`` the :data:`FIT_OPTIONS` are dropped, without ``appearance`` the photometric
    refinement's; a record with ``photometric`` but no ``photometric_options`` (none overridden)
    gets ``{}``. Two videos with the same effective options have frames and labels prepared
    alike."""
    d = dict(opts)
    if "photometric" in d:
        d.setdefault("photometric_options", {})
    if d.get("fit") is False:
        for k in FIT_OPTIONS:
            d.pop(k, None)
    elif d.get("appearance") is False:
        d.pop("photometric", None)
        d.pop("photometric_options", None)
    return d


def recorded_options(meta: dict) -> dict:
    """The :func:`effective_options` a video's ``meta.json`` (``meta``) records. A folder
    prepared before ``meta.json`` kept the ``options`` record gives what its other keys tell:
    ``crop``, ``resolution``, ``matting`` (``selfie`` before there was a choice),
    ``submission_offsets`` and, from ``fit_model``, ``fit`` (and no ``bfm``); options it does not
    tell are not compared."""
    have = meta.get("options")
    if not isinstance(have, dict):      # written before meta.json kept the options
        have = {"crop": meta.get("crop"), "matting": meta.get("matting", "selfie"),
                "submission_offsets": meta.get("submission_offsets", False)}
        res = meta.get("resolution")
        if isinstance(res, list) and res:
            have["resolution"] = res[0]
        if "fit_model" in meta and meta["fit_model"] in (None, "builtin"):
            have["fit"] = meta["fit_model"] is not None
            if have["fit"]:
                have["bfm"] = None
    return effective_options(have)


def _show(k, v) -> str:
    """A value of option ``k`` as the command line says it (flags: given or not)."""
    opt = CLI_OPTIONS.get(k, k)
    if isinstance(v, bool) and opt.startswith("--"):
        return "given" if v != opt.startswith("--no-") else "not given"
    return repr(v)


def _differences(have: dict, want: dict) -> str | None:
    """``"--opt A there, B now; ..."``: the options both record, with other values (None: alike)."""
    diff = [f"{CLI_OPTIONS.get(k, k)} {_show(k, have[k])} there, {_show(k, want[k])} now"
            for k in want if k in have and have[k] != want[k]]
    return "; ".join(diff) or None


SHARD_FORM = "K/N with 0 <= K < N (e.g. 0/4), or auto (a SLURM job array)"


def parse_shard(text: str, environ=None) -> tuple[int, int]:
    """``--shard``: ``"K/N"`` -> ``(K, N)``; ``"auto"`` reads a SLURM job array's
    ``SLURM_ARRAY_TASK_ID``, ``_MIN``, ``_MAX`` and ``_COUNT`` (``environ``, default
    ``os.environ``): K = id - min, N = count, for an array of consecutive ids (``--array=0-7`` or
    ``1-8``). Raises ValueError (``"shard: ..."``) naming the expected form and the value."""
    text = str(text).strip()
    if text == "auto":
        env = os.environ if environ is None else environ
        names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX",
                 "SLURM_ARRAY_TASK_COUNT")
        missing = [v for v in names if v not in env]
        if missing:
            raise ValueError(f"shard: auto reads a SLURM job array's {', '.join(names)}; "
                             f"{', '.join(missing)} not set (run it as an array task, e.g. "
                             "sbatch --array=0-7, or pass --shard K/N)")
        try:
            tid, lo, hi, count = (int(env[v]) for v in names)
        except ValueError:
            raise ValueError("shard: auto: expected integer SLURM_ARRAY_TASK_* variables, got "
                             + ", ".join(f"{v}={env[v]!r}" for v in names)) from None
        if hi - lo + 1 != count or not lo <= tid <= hi:
            raise ValueError(f"shard: auto needs an array of consecutive task ids (--array=0-7), "
                             f"got ids {lo}..{hi} with {count} tasks (a step or a list); pass "
                             "--shard K/N")
        return tid - lo, count
    m = re.fullmatch(r"([0-9]+)/([0-9]+)", text)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"shard: expected {SHARD_FORM}, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def shard_of(name: str, n: int) -> int:
    """The shard (0..n-1) of the video named ``name`` (its output folder as the inputs name it):
    the first 8 bytes of the SHA-256 of the UTF-8 name, big-endian, modulo ``n``. A function of
    the name alone: the same in every process and on every machine, and adding inputs moves no
    other video to another shard."""
    import hashlib

    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % n


@dataclass
class Source:
    """One input video: a video file, a frame folder, or a single image."""

    name: str
    kind: str                       # "video" | "frames" | "image"
    path: str
    files: list = field(default_factory=list)


def require_backends():
    """Imports the optional dependencies, or raises ImportError saying which extra installs them
    (also for a PyAV older than 14.1, which does not give a frame's display rotation)."""
    try:
        import av
    except ImportError as e:
        av, missing = None, e
    frame = getattr(av, "VideoFrame", None)
    if frame is not None and not hasattr(frame, "rotation"):          # added in PyAV 14.1
        raise ImportError("pyface data prepare needs PyAV >= 14.1 (VideoFrame.rotation: the "
                          "display rotation of portrait phone videos), found "
                          f"{getattr(av, '__version__', '?')}; install it with: {EXTRA_HINT}")
    try:
        if av is None:
            raise missing
        import mediapipe  # noqa: F401
        from mediapipe.python.solutions import face_mesh  # noqa: F401
    except ImportError as e:
        raise ImportError(f"pyface data prepare needs PyAV and mediapipe==0.10.21 ({e}); "
                          f"install them with: {EXTRA_HINT}") from None


# ----------------------------------------------------------------------------------------------
# inputs


#: The longest video folder name, in UTF-8 bytes: room left within the usual 255-byte limit of
#: a file name for a ``_NN`` suffix and the hidden ``.<name>.replaced.partial`` work folder.
MAX_NAME_BYTES = 200


def _safe(name: str) -> str:
    """A video folder name from a file or folder stem: letters (any script: ``видео``, ``视频``,
    with their combining marks), digits, ``_``, ``.`` and ``-`` are kept (in Unicode NFC, the form
    a name typed on another system compares equal to); each run of other characters (spaces,
    separators, control and other symbols) becomes one ``_``; leading and trailing ``.`` and ``_``
    are dropped (no hidden folder, no ``..``); the name is cut to :data:`MAX_NAME_BYTES`; an empty
    result is ``video``."""
    name = unicodedata.normalize("NFC", name)
    kept = "".join(c if c in "_.-" or unicodedata.category(c)[0] in "LMN" else "/" for c in name)
    name = re.sub("/+", "_", kept).strip("._")
    while len(name.encode("utf-8")) > MAX_NAME_BYTES:
        name = name[:-1].rstrip("._")
    return name or "video"


def collect_sources(inputs, ignored: list | None = None, errors: list | None = None,
                    exclude=(), notes: list | None = None) -> list[Source]:
    """Expands the command-line inputs into videos.

    * a video file (``VIDEO_EXTS``) -> one video; an image file -> a one-frame video;
    * a folder whose images all have numeric names (``00001.png``...) -> one frame-folder video;
    * any other folder -> each video file in it, and each image in it as a one-frame video
      (one level deep; numeric-named sub-folders are frame folders).

    A missing path or a named file that is neither a video nor an image raises
    :class:`PrepareError`, or is appended to ``errors`` (a message naming it) when a list is
    given. Entries of a folder that are not read (other files, sub-folders that are not frame
    folders) are appended to ``ignored`` as messages naming them; hidden entries (``.name``) are
    passed over silently, and so are the folders of ``exclude`` (the output folder, when it lies
    in an input folder) and, in an input folder that is in ``exclude`` (the output folder
    itself), its index and video folders; an input met twice is read once. An input folder of
    photos whose image names all share one numbered pattern (``frame_00001.png``, ...: frames
    extracted with a prefix) gets a message in ``notes`` saying how frames are named. Names are
    the file or folder stems made file-system safe (:func:`_safe`: letters of any script kept,
    ``видео.mp4`` is ``видео``) and unique in any letter case (:func:`unique_names`), never a
    name the dataset root reserves (:data:`RESERVED_NAMES`):
    a name taken twice gets the first free ``_2``, ``_3``, ... suffix that no input's own name
    uses, so ``clip.mov``, ``clip.mp4`` and ``clip_1.mp4`` become ``clip``, ``clip_2``,
    ``clip_1``, and ``Anna.mp4``, ``anna.mp4`` become ``Anna``, ``anna_2``.
    """
    out: list[Source] = []
    skip = {os.path.realpath(e) for e in exclude}
    kinds = f"a video ({', '.join(VIDEO_EXTS)}) or image ({', '.join(IMAGE_EXTS)}) file"

    def fail(msg):
        if errors is None:
            raise PrepareError(msg)
        errors.append(msg)

    def add_file(p):
        ext = os.path.splitext(p)[1].lower()
        stem = _safe(os.path.splitext(os.path.basename(p))[0])
        if ext in VIDEO_EXTS:
            out.append(Source(stem, "video", p))
        elif ext in IMAGE_EXTS:
            out.append(Source(stem, "image", p, [p]))
        else:
            return False
        return True

    def frame_folder(d):
        imgs = sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTS))
        if imgs and all(os.path.splitext(f)[0].isdigit() for f in imgs):
            return [os.path.join(d, f) for f in sorted(imgs, key=lambda f: int(os.path.splitext(f)[0]))]
        return None

    for p in inputs:
        if os.path.isfile(p):
            if not add_file(p):
                fail(f"{p}: not {kinds}")
        elif os.path.isdir(p):
            frames = frame_folder(p)
            if frames:
                out.append(Source(_safe(os.path.basename(os.path.normpath(p))), "frames", p, frames))
                continue
            if notes is not None:
                note = _numbered_photos(p)
                if note:
                    notes.append(note)
            is_out = os.path.realpath(p) in skip        # --out is this input folder:
            for f in sorted(os.listdir(p)):                 # its index and videos are no input
                q = os.path.join(p, f)
                if f.startswith(".") or os.path.realpath(q) in skip or is_out and (
                        _reserved(f) or os.path.isfile(os.path.join(q, fmt.META))):
                    continue
                if os.path.isdir(q):
                    fr = frame_folder(q)
                    if fr:
                        out.append(Source(_safe(f), "frames", q, fr))
                    elif ignored is not None:
                        ignored.append(f"{q}: a folder inside a folder is read only as a frame "
                                       "folder (every image name numeric: 00001.png, ...); pass "
                                       "it as an input of its own")
                elif not add_file(q) and ignored is not None:
                    ignored.append(f"{q}: not {kinds}")
        else:
            fail(f"{p}: no such file or folder")
    seen, unique = set(), []
    for s in out:           # `clips/ clips/a.mp4` or a path given twice: prepared once
        key = os.path.realpath(s.path)
        if key in seen:
            if ignored is not None:
                ignored.append(f"{s.path}: given more than once (prepared once)")
            continue
        seen.add(key)
        unique.append(s)
    unique_names(unique)
    return unique


def _numbered_photos(d: str) -> str | None:
    """A note when the images of the folder ``d`` (two or more) are all named one prefix, a
    number and one extension (``frame_00001.png``): the frames of a video, read as photos
    because their names are not numbers only."""
    imgs = sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTS)
                  and not f.startswith("."))
    parts = [re.fullmatch(r"(.*?)([0-9]+)(\.[^.]+)", f) for f in imgs]
    if len(imgs) < 2 or not all(parts) or len({(m.group(1), m.group(3)) for m in parts}) > 1:
        return None
    imgs = [m.group(0) for m in sorted(parts, key=lambda m: int(m.group(2)))]
    return (f"{d}: its {len(imgs)} images are named like the frames of a video ({imgs[0]} ... "
            f"{imgs[-1]}) and are read as {len(imgs)} photos (one-frame videos); to read them "
            "as the frames of one video, name them by number only (00001.png, 00002.png, ...)")


#: Names a dataset root gives to things other than its videos: the index and its temporary file
#: while it is rewritten, the cross-identity set ``cross/`` and the second views ``multiview/``
#: (read by the loaders and ``pyface eval``), the synthetic engine's ``synth.json`` and
#: ``synth.partial.json``, and an image-folder root's labels ``dataset.json``. No video folder
#: takes these names, in any letter case (a case-insensitive file system reads ``Cross`` as
#: ``cross``): an input cross.mp4 is prepared as cross_2, index.json.mp4 as index.json_2.
RESERVED_NAMES = (fmt.INDEX, fmt.INDEX + ".tmp", "cross", "multiview", "synth.json",
                  fmt.SYNTH_PARTIAL, fmt.LABELS)


def _fold(name: str) -> str:
    """``name`` as a case-insensitive file system compares it (macOS, Windows): ``Anna`` and
    ``anna`` are one folder there. Unicode case folding, which also equates a few names such a
    file system may tell apart (``ß`` and ``ss``): a suffix more, never a collision."""
    return name.casefold()


def _reserved(name: str) -> bool:
    return _fold(name) in {_fold(r) for r in RESERVED_NAMES}


def unique_names(sources, taken=()) -> None:
    """Makes the names of ``sources`` unique (in place, in order) and different from ``taken``
    and :data:`RESERVED_NAMES`, all compared in any letter case (:func:`_fold`: two names that
    differ only in case are one folder on a case-insensitive file system): a repeated name gets
    the first free ``_2``, ``_3``, ... suffix that is neither another source's own name nor
    taken, so ``Anna``, ``anna``, ``ANNA`` become ``Anna``, ``anna_2``, ``ANNA_3``. The same
    sources in the same order get the same names on every run and file system."""
    own = {_fold(s.name) for s in sources}
    used = {_fold(n) for n in taken} | {_fold(r) for r in RESERVED_NAMES}
    for s in sources:
        name, k = s.name, 2
        while _fold(name) in used:
            name = f"{s.name}_{k}"
            k += 1
            while _fold(name) in own:
                name = f"{s.name}_{k}"
                k += 1
        s.name = name
        used.add(_fold(name))


def iter_frames(src: Source, damaged: list | None = None):
    """Yields ``(H, W, 3)`` uint8 RGB frames of a source; raises :class:`PrepareError` naming the
    file when it cannot be decoded, or when a frame's size differs from the frames before it
    (the crops are smoothed over time in source pixels). With a list ``damaged``, a video whose
    decoding fails after :data:`MIN_FRAMES` or more frames (a truncated file) ends there
    instead, and ``{"frame": N, "message": "..."}`` is appended to ``damaged``: ``N`` is the
    index (from 0) of the first frame not decoded, so frames ``0 .. N-1`` (``N`` frames) were
    yielded, and ``message`` the decoder's error (:func:`damaged_message` makes the warning)."""
    if src.kind == "video":
        import av
        decoded, first = 0, None
        try:
            with av.open(src.path) as container:
                stream = _video_stream(container)
                if stream is None:
                    raise PrepareError(f"{src.path}: no video stream")
                for frame in _decode(container, stream, av.FFmpegError):
                    img = frame.to_ndarray(format="rgb24")
                    # phone videos store their orientation as a display rotation
                    # (counterclockwise degrees): show the frame the way players do
                    k = int(round((getattr(frame, "rotation", 0) or 0) / 90.0)) % 4
                    img = np.ascontiguousarray(np.rot90(img, k)) if k else img
                    if decoded and img.shape != first:
                        raise PrepareError(
                            f"{src.path}: frame {decoded} is {_wxh(img.shape)} pixels, the "
                            f"frames before it are {_wxh(first)} (the stream changes its size or "
                            "orientation): the frames of one video must have one size; cut the "
                            "video where it changes, or re-encode it at one size")
                    first = img.shape
                    decoded += 1
                    yield img
        except PrepareError:
            raise
        except (av.FFmpegError, ValueError, OSError) as e:
            if damaged is not None and decoded >= MIN_FRAMES:
                damaged.append({"frame": decoded, "message": f"{type(e).__name__}: {e}"})
                return
            if not decoded:
                why = mp4_without_index(src.path)
                if why is not None:
                    raise PrepareError(f"{src.path}: truncated video: {why}, so no frame can be "
                                       "recovered from it; copy or download the whole file "
                                       f"again ({type(e).__name__}: {e})") from None
            where = f" after {decoded} decoded frames (truncated?)" if decoded else ""
            raise PrepareError(f"{src.path}: corrupt or unreadable video{where} "
                               f"({type(e).__name__}: {e})") from None
        return
    from PIL import Image, ImageOps
    first = None
    for f in src.files:
        try:
            with Image.open(f) as im:
                img = fmt.rgb8(ImageOps.exif_transpose(im))                   # EXIF orientation
        except Exception as e:  # PIL raises many types for corrupt data
            raise PrepareError(f"{f}: corrupt or unreadable image ({type(e).__name__}: {e})") from None
        if first is not None and img.shape != first:    # the crops are smoothed over time
            raise PrepareError(
                f"{f}: {_wxh(img.shape)} pixels, the frames before it in {src.path} are "
                f"{_wxh(first)}: the frames of a frame folder (one video) must have one size; "
                "resize them, or give them as photos (a folder whose image names are not all "
                "numeric, or the image files themselves)")
        first = img.shape
        yield img


def damaged_message(path: str, frame: int, message: str) -> str:
    """The warning of a video ``path`` whose decoding failed at ``frame`` (from 0: the first
    frame not kept; the ``frame`` frames before it are kept) with the decoder's error
    ``message``."""
    kept = "frame 0" if frame == 1 else f"frames 0-{frame - 1}"
    return (f"{path}: truncated or damaged video: decoding failed at frame {frame}; kept the "
            f"{plural(frame, 'frame')} decoded before it ({kept}) ({message})")


def _frames_list(frames, k: int = 5) -> str:
    """``"frame 4"``, ``"frames 4, 9"``, ``"frames 1, 2, 3, 4, 5, ... (7 in all)"``."""
    shown = ", ".join(str(f) for f in frames[:k])
    return ("frame " if len(frames) == 1 else "frames ") + shown + (
        f", ... ({len(frames)} in all)" if len(frames) > k else "")


def _wxh(shape) -> str:
    return f"{shape[1]}x{shape[0]}"


def mp4_without_index(path: str) -> str | None:
    """Why an MP4 / MOV file (ISO base media boxes, ``ftyp`` first) cannot be opened when it
    ends before its index: its top-level boxes hold no ``moov`` (the sample tables that say
    where every frame's bytes are, written last by most recorders and encoders); the file is
    cut inside a box (``mdat``, the frame data) or just after it. None for any other file (not
    such a file, or one with its index)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            pos, boxes, cut = 0, [], None
            while pos + 8 <= size:
                f.seek(pos)
                head = f.read(16)
                n, kind = int.from_bytes(head[:4], "big"), head[4:8]
                if n == 1 and len(head) >= 16:           # a 64-bit size follows
                    n = int.from_bytes(head[8:16], "big")
                elif n == 0:                             # to the end of the file
                    n = size - pos
                if n < 8 or not all(32 <= b < 127 for b in kind):
                    return None                          # not a box: not an ISO media file
                boxes.append(kind.decode("ascii"))
                if pos + n > size:
                    cut = (kind.decode("ascii"), pos, n)
                    break
                pos += n
    except OSError:
        return None
    if not boxes or boxes[0] != "ftyp" or "moov" in boxes:
        return None
    index = "its index (the 'moov' box, which most recorders write last)"
    if cut is not None:
        kind, at, n = cut
        return (f"the file ends ({size} bytes) inside its '{kind}' box ({n} bytes declared at "
                f"byte {at}), before {index}")
    return f"the file ends ({size} bytes) after its {', '.join(boxes)} boxes, without {index}"


def _decode(container, stream, ffmpeg_error):
    """The frames of ``stream`` (``container.decode(stream)``), packet by packet; on an error
    (a truncated file) the frames the decoder still holds (its reordering delay) come out before
    the error is raised."""
    errors = (ffmpeg_error, ValueError, OSError)
    try:
        for packet in container.demux(stream):      # the last packet (empty) flushes the decoder
            yield from packet.decode()
    except errors:
        try:
            held = stream.codec_context.decode(None)
        except errors:
            held = []
        yield from held
        raise


def _video_stream(container):
    """The video stream of a PyAV container that FFmpeg's ``av_find_best_stream`` picks (players
    and ``ffmpeg -i`` do too): never a cover picture (``attached_pic``), a moving stream before a
    single-picture one; the first video stream when only one. None: no video stream."""
    if not container.streams.video:
        return None
    return container.streams.best("video") or container.streams.video[0]


def count_frames(src: Source) -> int:
    """The number of frames a source declares (0 when a video does not say)."""
    if src.kind != "video":
        return len(src.files)
    import av
    try:
        with av.open(src.path) as c:
            stream = _video_stream(c)
            return int(stream.frames) if stream is not None else 0
    except Exception:  # the decode pass reports the error with its file name
        return 0


def source_fps(src: Source) -> float:
    if src.kind != "video":
        return 25.0
    import av
    try:
        with av.open(src.path) as c:
            stream = _video_stream(c)
            r = stream.average_rate if stream is not None else None
            return float(r) if r else 25.0
    except Exception:  # the decode pass reports the error with its file name
        return 25.0


# ----------------------------------------------------------------------------------------------
# detection


class _QuietStderr:
    """Sends file descriptor 2 to /dev/null while MediaPipe starts its graphs (its C++ logging
    prints start-up notices there that Python cannot filter)."""

    def __enter__(self):
        import sys
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)
        except OSError:
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)


class MediaPipeFaces:
    """Face mesh (478 points, pixels), detection scores and selfie segmentation with MediaPipe's
    legacy solutions. One instance per video (tracking state)."""

    def __init__(self, max_faces=4, min_detection_confidence=0.3, static=False):
        require_backends()
        from mediapipe.python.solutions import face_detection, face_mesh
        with _QuietStderr():
            self.mesh = face_mesh.FaceMesh(static_image_mode=static, max_num_faces=max_faces,
                                           refine_landmarks=True,
                                           min_detection_confidence=min_detection_confidence,
                                           min_tracking_confidence=0.5)
            # the short-range model (faces within ~2 m: portraits) and the full-range one
            self.detectors = [face_detection.FaceDetection(model_selection=k,
                                                           min_detection_confidence=0.1)
                              for k in (0, 1)]
            blank = np.zeros((64, 64, 3), np.uint8)    # starts the graphs (and their notices)
            self.mesh.process(blank)
            for d in self.detectors:
                d.process(blank)
            if not static:                             # forget the blank frame's tracking state
                self.mesh.reset()
                # reset() restarts the graph: its calculators open (and log) on MediaPipe's
                # threads, after reset() returns; wait for them before stderr comes back
                self.mesh._graph.wait_until_idle()
        self._seg = None
        self._quiet = True

    def faces(self, img: np.ndarray):
        """``[(mesh (478, 3) pixels, score)]`` of ``img: (H, W, 3)`` uint8 RGB."""
        h, w = img.shape[:2]
        if self._quiet:       # until the first face: the landmark graph starts on it
            with _QuietStderr():
                r = self.mesh.process(img)
            self._quiet = not r.multi_face_landmarks
        else:
            r = self.mesh.process(img)
        if not r.multi_face_landmarks:
            return []
        meshes = [np.array([[p.x * w, p.y * h, p.z * w] for p in f.landmark], np.float32)
                  for f in r.multi_face_landmarks]
        boxes = []
        dets = [det for d in self.detectors for det in (d.process(img).detections or [])]
        for det in dets:
            b = det.location_data.relative_bounding_box
            boxes.append((np.array([b.xmin * w, b.ymin * h, (b.xmin + b.width) * w,
                                    (b.ymin + b.height) * h]), float(det.score[0])))
        out = []
        for m in meshes:
            mb = _box(m)
            score = max([s for b, s in boxes if _iou(mb, b) > 0.3], default=0.0)
            out.append((m, score))
        return out

    def segment(self, img: np.ndarray) -> np.ndarray:
        """Foreground probability ``(H, W)`` float32 of ``img: (H, W, 3)`` uint8 RGB."""
        if self._seg is None:
            from mediapipe.python.solutions import selfie_segmentation
            with _QuietStderr():
                self._seg = selfie_segmentation.SelfieSegmentation(model_selection=0)
                return self._seg.process(img).segmentation_mask
        return self._seg.process(img).segmentation_mask

    def close(self):
        for x in (self.mesh, *self.detectors, self._seg):
            if x is not None:
                x.close()


def _box(pts):
    return np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / max(union, 1e-9)


#: Frames :func:`select_track` looks ahead for the kept face when a frame shows only other faces.
REACQUIRE_FRAMES = 2


def _reappears(box, frames) -> bool:
    """Whether a face of ``frames`` overlaps ``box`` (IoU > 0.3) before a frame without faces
    (which ends the track anyway)."""
    for faces in frames:
        if not faces:
            return False
        if any(_iou(box, _box(m)) > 0.3 for m, _ in faces):
            return True
    return False


def select_track(frame_faces, image_size):
    """Picks one face per frame: the largest, most central face where the track starts (or
    restarts), then the face overlapping the previous pick most. A frame where no face overlaps
    the previous pick while one of the next :data:`REACQUIRE_FRAMES` frames has a face that does
    (the kept face missed for a frame or two while another face is seen) gets no pick: it is
    left out like a frame without a face, and the track goes on with the kept face instead of
    moving to the other one for good. ``frame_faces``: per frame a list of
    ``(mesh (478, 3), score)``; returns per frame the pick or None."""
    w, h = image_size
    prev = None
    picks = []
    for t, faces in enumerate(frame_faces):
        if not faces:
            picks.append(None)
            prev = None
            continue
        boxes = [_box(m) for m, _ in faces]
        choice = None
        if prev is not None:
            ious = [_iou(prev, b) for b in boxes]
            if max(ious) > 0.3:
                choice = int(np.argmax(ious))
            elif _reappears(prev, frame_faces[t + 1:t + 1 + REACQUIRE_FRAMES]):
                picks.append(None)      # prev kept: the next frames pick the kept face again
                continue
        if choice is None:
            def rank(b):
                area = (b[2] - b[0]) * (b[3] - b[1]) / (w * h)
                c = np.array([(b[0] + b[2]) / 2 / w - 0.5, (b[1] + b[3]) / 2 / h - 0.5])
                return area / (1.0 + 4.0 * float(c @ c))
            choice = int(np.argmax([rank(b) for b in boxes]))
        prev = boxes[choice]
        picks.append(faces[choice])
    return picks


# ----------------------------------------------------------------------------------------------
# smoothing and crops


def track_jumps(picks) -> list[int]:
    """The frames whose pick (:func:`select_track`) does not overlap the previous frame's pick
    (box IoU <= 0.3): the kept face jumped - a shot cut, or the followed face lost while another
    face is seen. A pick after a frame without one is no jump (the gap already ends the run)."""
    return [i for i in range(1, len(picks)) if picks[i] is not None and picks[i - 1] is not None
            and _iou(_box(picks[i - 1][0]), _box(picks[i][0])) <= 0.3]


def runs(frames: np.ndarray, breaks=()) -> np.ndarray:
    """Segment id per kept frame: consecutive source frame indices share a segment, except that
    a frame in ``breaks`` (source indices: :func:`track_jumps`) starts a new one."""
    if len(frames) == 0:
        return np.zeros(0, np.int64)
    new = np.diff(frames) != 1
    if len(breaks):
        new |= np.isin(frames[1:], np.asarray(breaks))
    return np.concatenate([[0], np.cumsum(new)]).astype(np.int64)


def smooth_savgol(x: np.ndarray, segments: np.ndarray, window: int, order: int = 2) -> np.ndarray:
    """Savitzky-Golay along axis 0 of ``x: (T, ...)`` within each segment (shorter segments are
    smoothed with the largest odd window that fits, or left as they are)."""
    from scipy.signal import savgol_filter

    out = x.astype(np.float64).copy()
    for s in np.unique(segments):
        idx = np.nonzero(segments == s)[0]
        win = min(window, len(idx) if len(idx) % 2 else len(idx) - 1)
        if win > order:
            out[idx] = savgol_filter(out[idx], win, order, axis=0, mode="interp")
    return out.astype(x.dtype)


def smooth_gauss(x: np.ndarray, segments: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter1d

    out = x.astype(np.float64).copy()
    if sigma <= 0:
        return out
    for s in np.unique(segments):
        idx = np.nonzero(segments == s)[0]
        if len(idx) > 1:
            out[idx] = gaussian_filter1d(out[idx], sigma, axis=0, mode="nearest")
    return out


_TEMPLATE5 = None


def template5() -> np.ndarray:
    """The 5-point template (right eye centre, left eye centre, nose tip, right and left mouth
    corners) ``(5, 3)`` of the built-in head's mean shape, model units (y up)."""
    global _TEMPLATE5
    if _TEMPLATE5 is None:
        from pyface.face import MorphableModel
        m = MorphableModel.builtin()
        p = m.mean_shape[m.landmarks].double().numpy()
        _TEMPLATE5 = np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])
    return _TEMPLATE5


def five_points(lm68: np.ndarray) -> np.ndarray:
    """``(..., 5, 2)``: eye centres, nose tip, mouth corners of ``lm68: (..., 68, 2)``."""
    return np.stack([lm68[..., 36:42, :].mean(-2), lm68[..., 42:48, :].mean(-2), lm68[..., 30, :],
                     lm68[..., 48, :], lm68[..., 54, :]], axis=-2)


def fit_scale_centre(pts2d: np.ndarray, pts3d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares affine camera ``x = A X + t`` (image y down, model y up) of ``pts2d:
    (T, 5, 2)`` to ``pts3d: (5, 3)``; returns the scale ``(T,)`` (mean row norm of ``A``) and
    the centre ``t: (T, 2)``."""
    n = pts3d.shape[0]
    X = np.concatenate([pts3d * np.array([1.0, -1.0, 1.0]), np.ones((n, 1))], 1)   # (5, 4)
    sol, *_ = np.linalg.lstsq(X, pts2d.transpose(1, 0, 2).reshape(n, -1), rcond=None)
    sol = sol.reshape(4, -1, 2)                                     # (4, T, 2)
    a = sol[:3]                                                     # (3, T, 2)
    scale = 0.5 * (np.linalg.norm(a[..., 0], axis=0) + np.linalg.norm(a[..., 1], axis=0))
    return scale, sol[3]


def crop_boxes(lm68: np.ndarray, kind: str) -> np.ndarray:
    """Per-frame square crops ``(T, 3)`` = (centre x, centre y, side) in source pixels."""
    if kind == "eg3d":
        scale, centre = fit_scale_centre(five_points(lm68).astype(np.float64), template5())
        side = 700.0 / 300.0 * scale
        return np.concatenate([centre, side[:, None]], 1)
    lo, hi = lm68.min(1), lm68.max(1)
    side = 2.0 * (hi - lo).max(1)
    c = 0.5 * (lo + hi)
    c[:, 1] -= 0.1 * side
    return np.concatenate([c, side[:, None]], 1)


def crop_image(img: np.ndarray, box, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops the square ``box = (cx, cy, side)`` (pixels; may leave the image: edges are
    repeated) and resizes it to ``size`` with antialiasing. Returns ``(crop (size, size, 3),
    valid (size, size) bool)`` - ``valid`` marks the pixels inside the source image."""
    from PIL import Image

    h, w = img.shape[:2]
    cx, cy, side = (float(v) for v in box)
    x0, y0 = cx - side / 2, cy - side / 2
    ix0, iy0 = int(np.floor(x0)), int(np.floor(y0))
    ix1, iy1 = int(np.ceil(x0 + side)) + 1, int(np.ceil(y0 + side)) + 1
    pad = [max(0, -iy0), max(0, iy1 - h), max(0, -ix0), max(0, ix1 - w)]
    region = img[max(iy0, 0):min(iy1, h), max(ix0, 0):min(ix1, w)]
    if any(pad):
        region = np.pad(region, ((pad[0], pad[1]), (pad[2], pad[3]), (0, 0)), mode="edge")
    valid = np.zeros(region.shape[:2], np.uint8)
    valid[pad[0]:region.shape[0] - pad[1], pad[2]:region.shape[1] - pad[3]] = 255
    bx = (x0 - ix0, y0 - iy0, x0 - ix0 + side, y0 - iy0 + side)
    crop = np.asarray(Image.fromarray(region).resize((size, size), Image.LANCZOS, box=bx))
    vmask = np.asarray(Image.fromarray(valid).resize((size, size), Image.BILINEAR, box=bx)) > 127
    return crop, vmask


def to_crop(points: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Source pixels ``(T, N, 2|3)`` -> crop pixels (z scaled like x)."""
    s = size / boxes[:, 2]
    out = points.astype(np.float64).copy()
    out[..., 0] = (points[..., 0] - (boxes[:, None, 0] - boxes[:, None, 2] / 2)) * s[:, None]
    out[..., 1] = (points[..., 1] - (boxes[:, None, 1] - boxes[:, None, 2] / 2)) * s[:, None]
    if points.shape[-1] == 3:
        out[..., 2] = points[..., 2] * s[:, None]
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# one video


def prepare_video(src: Source, cfg: PrepareConfig, progress=None) -> dict:
    """Prepares one source into ``cfg.out/src.name``; returns a summary dict. Raises
    :class:`PrepareError` (naming the file) for unreadable input or when no frame has a face."""
    from PIL import Image

    t0, c0 = time.perf_counter(), time.process_time()
    timing = {}
    det = MediaPipeFaces(cfg.max_faces, cfg.min_detection_confidence, static=src.kind == "image")
    try:
        # pass 1: mesh per frame
        frame_faces, size, n, damaged = [], None, 0, []
        for img in iter_frames(src, damaged):
            size = (img.shape[1], img.shape[0])
            frame_faces.append(det.faces(img))
            n += 1
            if progress:
                progress(1)
        if n < MIN_FRAMES:
            raise PrepareError(f"{src.path}: no frames decoded")
        timing["detect_s"] = time.perf_counter() - t0
        timing["detect_cpu_s"] = time.process_time() - c0
        picks = select_track(frame_faces, size)
        kept = np.array([i for i, p in enumerate(picks) if p is not None], np.int64)
        no_face = [i for i, p in enumerate(picks) if p is None]
        if len(kept) == 0:
            raise PrepareError(f"{src.path}: no face found in any of its {n} frames")
        jumps, said = track_jumps(picks), []
        if jumps:       # smoothing across a jump would slide the crops between the two faces
            said.append(f"{src.path}: the kept face jumps at {_frames_list(jumps)} (no "
                        "overlap with the face of the frame before: a shot cut, or another "
                        "person): smoothing restarts there, but the video is fitted as one "
                        "identity; cut it there if the faces differ")
        mesh = np.stack([picks[i][0] for i in kept])                  # (T, 478, 3)
        conf = np.array([picks[i][1] for i in kept], np.float32)
        seg = runs(kept, jumps)
        raw68 = mesh_to_68(mesh)
        mesh_s = smooth_savgol(mesh, seg, cfg.smooth_window)
        lm68 = mesh_to_68(mesh_s)                       # iBUG: jaw on the visible outline
        fit68 = mesh_to_68(mesh_s, contour="static")    # fixed face places, for the 3DMM fit
        boxes = crop_boxes(lm68, cfg.crop)
        boxes = smooth_gauss(boxes, seg, cfg.crop_sigma)
        r = cfg.resolution
        lm_crop, raw_crop = to_crop(lm68, boxes, r), to_crop(raw68, boxes, r)
        mesh_crop = to_crop(mesh_s, boxes, r)
        fit_crop = to_crop(fit68, boxes, r)
        jit = {"before": jitter_by_segment(raw_crop, seg), "after": jitter_by_segment(lm_crop, seg)}

        # pass 2: crops, masks, frames
        t1, c1 = time.perf_counter(), time.process_time()
        tmp = os.path.join(cfg.out, f".{src.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, fmt.FRAME_DIR))
        os.makedirs(os.path.join(tmp, fmt.MASK_DIR))
        where = {int(f): k for k, f in enumerate(kept)}
        matter = None
        if cfg.matting == "modnet":
            from pyface.nn.modnet import matte_image
            matter = _modnet(cfg.matting_weights)
        small = np.zeros((len(kept), APPEARANCE_SIZE, APPEARANCE_SIZE, 3), np.uint8)
        small_valid = np.zeros((len(kept), APPEARANCE_SIZE, APPEARANCE_SIZE), bool)
        for i, img in enumerate(itertools.islice(iter_frames(src), n)):   # a truncated
            k = where.get(i)                                # video: the frames of pass 1 only
            if k is None:
                continue
            crop, valid = crop_image(img, boxes[k], r)
            if matter is None:
                mask = (det.segment(crop) > 0.5).astype(np.uint8) * 255
            else:                                       # soft alpha, 0..255
                mask = np.round(matte_image(matter, crop) * 255.0).astype(np.uint8)
            small[k] = np.asarray(Image.fromarray(crop).resize((APPEARANCE_SIZE,) * 2, Image.BOX))
            small_valid[k] = np.asarray(Image.fromarray(valid.astype(np.uint8) * 255).resize(
                (APPEARANCE_SIZE,) * 2, Image.BOX)) > 254            # wholly inside the source
            Image.fromarray(crop).save(os.path.join(tmp, fmt.FRAME_DIR, f"{k:05d}.png"),
                                       compress_level=1)
            Image.fromarray(mask).save(
                os.path.join(tmp, fmt.MASK_DIR, f"{k:05d}.png"), compress_level=1)
        timing["crop_segment_s"] = time.perf_counter() - t1
        timing["crop_segment_cpu_s"] = time.process_time() - c1
    finally:
        det.close()

    # 3DMM fit
    t2, c2 = time.perf_counter(), time.process_time()
    t = len(kept)
    if cfg.fit:
        import torch

        from pyface.face import MorphableModel, cameras
        from pyface.face.fit import FitConfig, fit_landmarks

        torch.set_num_threads(1)
        model, index = fit_model(cfg.bfm)
        res = fit_landmarks(model, torch.from_numpy(fit_crop), r, segments=torch.from_numpy(seg),
                            config=FitConfig(steps=cfg.fit_steps), landmark_index=index)
        coeffs = res.coeffs.numpy()
        if cfg.submission_offsets:
            c = torch.from_numpy(coeffs)
            labels = cameras.deep3d_to_label(c[:, 224:227], c[:, 254:257],
                                             submission_offsets=True).numpy()
        else:
            labels = res.labels.numpy()
        residual = res.residual.numpy()
        photometric = np.full(t, np.nan, np.float32)
        timing["fit_landmarks_s"] = time.perf_counter() - t2
        timing["fit_landmarks_cpu_s"] = time.process_time() - c2
        if cfg.appearance:
            from pyface.face.fit import PhotometricConfig, fit_appearance, fit_photometric

            imgs = torch.from_numpy(small).permute(0, 3, 1, 2).float() / 255.0
            ok = torch.from_numpy(small_valid)[:, None].float()
            if cfg.photometric:
                t3, c3 = time.perf_counter(), time.process_time()
                res = fit_photometric(model, res.coeffs, imgs, torch.from_numpy(fit_crop), r,
                                      sigma=res.sigma, segments=torch.from_numpy(seg),
                                      config=FitConfig(steps=cfg.fit_steps), landmark_index=index,
                                      photometric=PhotometricConfig(**PHOTOMETRIC_OPTIONS),
                                      valid=ok)
                app = res.appearance
                labels = cameras.deep3d_to_label(res.coeffs[:, 224:227], res.coeffs[:, 254:257],
                                                 submission_offsets=cfg.submission_offsets).numpy()
                residual = res.residual.numpy()
                timing["fit_photometric_s"] = time.perf_counter() - t3
                timing["fit_photometric_cpu_s"] = time.process_time() - c3
            else:
                app = fit_appearance(model, res.coeffs, imgs, valid=ok)
            coeffs = app.coeffs.numpy()
            photometric = np.where(app.pixels.numpy() > 0, 255.0 * app.residual.numpy(), np.nan)
    else:
        photometric = np.full(t, np.nan, np.float32)
        from pyface.face import cameras
        coeffs = np.zeros((t, 257), np.float32)
        labels = np.repeat(cameras.default_label().numpy()[None], t, 0)
        residual = np.full(t, np.nan, np.float32)
    lm_fit = None
    if cfg.fit:             # the fitted model's own 68 landmarks, projected with the fitted camera
        from pyface.face.fit import project_landmarks

        c = torch.from_numpy(coeffs)
        with torch.no_grad():
            lm_fit = project_landmarks(model, c[0, :80], c[:, 80:144], c[:, 224:227],
                                       c[:, 254:257], r).numpy()
    timing["fit_s"] = time.perf_counter() - t2      # landmarks, photometric refinement, appearance
    timing["fit_cpu_s"] = time.process_time() - c2

    np.save(os.path.join(tmp, fmt.COEFFS), coeffs.astype(np.float32))
    np.save(os.path.join(tmp, fmt.LANDMARKS), lm_crop.astype(np.float32))
    np.save(os.path.join(tmp, "mesh.npy"), mesh_crop.astype(np.float32))
    if lm_fit is not None:
        np.save(os.path.join(tmp, LANDMARKS_FIT), lm_fit.astype(np.float32))
    entries = [[f"{fmt.FRAME_DIR}/{k:05d}.png", [float(x) for x in labels[k]]] for k in range(t)]
    fmt._dump(os.path.join(tmp, fmt.LABELS), {"labels": entries})
    seconds = time.perf_counter() - t0
    timing["total_cpu_s"] = time.process_time() - c0
    meta = {"identity": src.name, "fps": source_fps(src), "source": os.path.abspath(src.path),
            "num_frames": t, "resolution": [r, r], "generator": GENERATOR,
            "crop": cfg.crop, "source_num_frames": n, "source_frames": kept.tolist(),
            "no_face_frames": no_face, "track_jumps": jumps, "confidence": [round(float(c), 4) for c in conf],
            "fit_residual_px": [None if not np.isfinite(x) else round(float(x), 3) for x in residual],
            "photometric_rms": [None if not np.isfinite(x) else round(float(x), 2) for x in photometric],
            "crop_boxes": np.round(boxes, 2).tolist(), "jitter_px": jit,
            "submission_offsets": cfg.submission_offsets, "matting": cfg.matting,
            "landmarks_fit": LANDMARKS_FIT if lm_fit is not None else None,
            "fit_model": "bfm" if cfg.bfm else ("builtin" if cfg.fit else None), "seconds": round(seconds, 2),
            "timing_s": {k: round(v, 2) for k, v in timing.items()}, "options": options(cfg)}
    decode_error = damaged[0] if damaged else None
    if damaged:             # a truncated video: the frames that decoded, and why no more
        said.insert(0, damaged_message(src.path, **decode_error))
        meta["decode_error"] = decode_error
        meta["source_damaged"] = said[0]            # the warning (older readers)
    fmt._dump(os.path.join(tmp, fmt.META), meta)
    final = os.path.join(cfg.out, src.name)
    if os.path.lexists(final):      # a previous preparation: moved aside whole, then deleted, so
        old = os.path.join(cfg.out, f".{src.name}.replaced.partial")   # a kill never leaves a
        shutil.rmtree(old, ignore_errors=True)                         # half-deleted video
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return {"name": src.name, "source": src.path, "frames": t, "source_frames": n,
            "no_face": len(no_face), "seconds": seconds, "jitter_px": jit, "timing_s": timing,
            "decode_error": decode_error, "warnings": said}


_MODNET: dict = {}


def _modnet(path: str):
    """The MODNet of ``path``, loaded once per process (workers load their own copy)."""
    if path not in _MODNET:
        import torch

        from pyface.nn.modnet import load_modnet

        torch.set_num_threads(1)
        _MODNET[path] = load_modnet(path)
    return _MODNET[path]


def fit_model(bfm: str | None = None):
    """The morphable model of the fit and the vertices the 68 MediaPipe-derived landmarks mean on
    it: BFM (``bfm``: Deep3DFaceRecon's ``BFM_model_front.mat``) uses its own iBUG keypoints; the
    built-in head uses :data:`pyface.data.landmarks.BUILTIN_MEDIAPIPE_68` (measured by
    tools/calibrate_landmarks.py) while its vertex count matches the table's."""
    import torch

    from pyface.data.landmarks import BUILTIN_MEDIAPIPE_68, BUILTIN_VERTICES
    from pyface.face import MorphableModel

    if bfm:
        return MorphableModel.from_bfm(bfm), None
    model = MorphableModel.builtin()
    if model.num_vertices != BUILTIN_VERTICES:
        warnings.warn(f"the built-in head has {model.num_vertices} vertices, the MediaPipe landmark "
                      f"table was measured on {BUILTIN_VERTICES}; fitting to the head's own "
                      "landmarks (re-run tools/calibrate_landmarks.py)", stacklevel=2)
        return model, None
    return model, torch.tensor(BUILTIN_MEDIAPIPE_68)


def jitter_by_segment(points: np.ndarray, seg: np.ndarray) -> float:
    """Frame-weighted mean :func:`jitter` over the runs of consecutive frames."""
    vals, weights = [], []
    for s in np.unique(seg):
        idx = np.nonzero(seg == s)[0]
        if len(idx) >= 3:
            vals.append(jitter(points[idx]))
            weights.append(len(idx) - 2)
    return round(float(np.average(vals, weights=weights)), 4) if vals else 0.0


# ----------------------------------------------------------------------------------------------
# many videos


_progress_queue = None


def _worker_init(q):
    global _progress_queue
    import signal

    _progress_queue = q
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C: the main process stops the pool
    import multiprocessing as mp
    import threading

    parent = mp.parent_process()
    if parent is not None:
        # the main process killed (kill PID, the out-of-memory killer): end with it. Otherwise
        # the worker finishes its video (and the one queued next) into --out after the main
        # process's lock on it is gone, alongside the run that resumes it.
        def watch():
            parent.join()           # returns when the main process has ended
            os._exit(1)
        threading.Thread(target=watch, name="watch-main-process", daemon=True).start()
    import torch
    torch.set_num_threads(1)


def _failed(src: Source, e: Exception) -> str:
    return f"{src.path}: preparation failed ({type(e).__name__}: {e})"


def _output_failure(e: BaseException) -> bool:
    """Whether ``e`` is a failure to write that every later video would meet too (no space
    left, a quota, a read-only file system): it stops the run, even with ``--skip-bad``."""
    import errno

    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _stopped(src: Source, e: OSError, cfg: PrepareConfig) -> PrepareError:
    """The error that stops a run on an :func:`_output_failure` ``e`` while preparing ``src``."""
    kept = "kept" if cfg.shard is not None else "kept and indexed"
    return PrepareError(f"{src.path}: {e}; the finished videos in {cfg.out} are {kept}: make "
                        "room (or fix the output folder) and run the same command with --resume")


def _worker(args):
    src, cfg = args
    q = _progress_queue
    pending = [0]

    def progress(k):
        pending[0] += k
        if pending[0] >= 8 and q is not None:
            q.put(pending[0])
            pending[0] = 0
    try:
        r = prepare_video(src, cfg, progress)
        return src, r, None
    except PrepareError as e:
        return src, None, str(e)
    except Exception as e:      # with --skip-bad one failing input never stops the others
        if not cfg.skip_bad or _output_failure(e):
            raise
        return src, None, _failed(src, e)
    finally:
        if q is not None and pending[0]:
            q.put(pending[0])


def _recorded_source(out: str, name: str) -> str | None:
    """The input path a prepared video's ``meta.json`` records (None when it records none)."""
    try:
        src = fmt._load_json(os.path.join(out, name, fmt.META)).get("source")
    except (fmt.DataError, AttributeError, OSError):
        return None
    return src if isinstance(src, str) else None


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def place_sources(sources, out: str) -> list[str]:
    """Keeps every prepared video of ``out`` with the input it was prepared from: a source whose
    name is a folder of ``out`` holding another input's video (its ``meta.json`` records another
    ``source``) takes the folder that records its own path, if one exists (an earlier run
    renamed it), or else a new unique name. Renames ``sources`` in place; returns a note per
    renamed source. Without this, re-running with another input of the same name would replace
    (or, with ``--resume``, wrongly reuse) the other input's video. A source prepared by an
    earlier run under another name (an older naming rule: a non-Latin name was once ``video``)
    takes that folder back, unless the name is one the root reserves (:data:`RESERVED_NAMES`),
    or differs only in letter case from another source's name (an output of a run before names
    were unique in any case): a note then says to delete the old folder. Folder names are
    compared in any letter case (:func:`_fold`), as a case-insensitive file system does: a
    source named ``anna`` never writes into a folder ``Anna`` holding another input's video."""
    if not os.path.isdir(out):
        return []
    recorded = {n: _recorded_source(out, n) for n in fmt.video_names(out)}
    by_path = {os.path.realpath(v): n for n, v in recorded.items() if v}
    by_fold = collections.defaultdict(list)      # an older output may hold Anna/ and anna/
    for n in recorded:
        by_fold[_fold(n)].append(n)
    names = {s.name for s in sources}
    folded = collections.Counter(_fold(s.name) for s in sources)
    notes = []
    for s in sources:       # prepared under another name by an earlier run (older naming rules:
        n = by_path.get(os.path.realpath(s.path))       # a non-Latin name was once `video`)
        if s.name in recorded or n is None or n in names:
            continue
        if _reserved(n):    # e.g. cross/ from cross.mp4: read as the cross-identity set
            notes.append(f"{s.path}: prepared as {s.name}; {os.path.join(out, n)}, its video "
                         "from an earlier run, has a name the dataset root reserves "
                         f"({', '.join(RESERVED_NAMES)}): delete it")
            continue
        if folded[_fold(n)] - (_fold(n) == _fold(s.name)) > 0:    # e.g. anna/ beside Anna.mp4
            other = next(t.name for t in sources if t is not s and _fold(t.name) == _fold(n))
            notes.append(f"{s.path}: prepared as {s.name}; {os.path.join(out, n)}, its video "
                         f"from an earlier run, differs only in letter case from the video "
                         f"{other} (one folder on a case-insensitive file system): delete it")
            continue
        names.discard(s.name)
        folded[_fold(s.name)] -= 1
        s.name = n
        names.add(n)
        folded[_fold(n)] += 1

    def holder(s):          # the folder of out that s would write into, holding another video
        for n in ([s.name] if s.name in recorded else by_fold.get(_fold(s.name), ())):
            if not (recorded[n] and _same_file(recorded[n], s.path)):
                return n
        return None

    clash = [(s, holder(s)) for s in sources]
    clash = [(s, h) for s, h in clash if h is not None]
    if not clash:
        return notes
    clashing = {id(s) for s, _ in clash}
    keep = {_fold(s.name) for s in sources if id(s) not in clashing}
    taken = set(recorded) | keep
    for s, held in clash:
        n = by_path.get(os.path.realpath(s.path))
        if n is not None and _fold(n) not in keep and not _reserved(n):
            s.name = n                  # its own folder from an earlier run: no news
        else:
            unique_names([s], taken)
            other = recorded[held] or "an input it does not record"
            notes.append(f"{s.path}: prepared as {s.name} ({os.path.join(out, held)} holds the "
                         f"video of {other})")
        keep.add(_fold(s.name))
        taken.add(s.name)
    return notes


def _option_mismatch(out: str, name: str, cfg: PrepareConfig) -> str | None:
    """How the finished video ``out/name`` was prepared differently from ``cfg`` (None: alike)."""
    meta = fmt._load_json(os.path.join(out, name, fmt.META))
    return _differences(recorded_options(meta), effective_options(options(cfg)))


def _prepared_meta(root: str, name: str) -> dict | None:
    """``meta.json`` of ``root/name`` when :func:`prepare` wrote it (None: unreadable, or
    another generator's video)."""
    try:
        meta = fmt._load_json(os.path.join(root, name, fmt.META))
    except (fmt.DataError, OSError):
        return None
    return meta if isinstance(meta, dict) and meta.get("generator") == GENERATOR else None


def damaged_videos(root: str, names=None) -> list[str]:
    """One line for each video of ``root`` (those of ``names``, default all) that :func:`prepare`
    wrote from a source whose decoding failed part-way: the video folder, then the warning of
    the preparation (:func:`damaged_message`, from ``meta.json``'s ``decode_error``; its
    ``source_damaged`` for a video prepared before ``decode_error`` was recorded)."""
    lines = []
    for name in fmt.video_names(root) if names is None else names:
        meta = _prepared_meta(root, name)
        if meta is None:
            continue
        err, folder = meta.get("decode_error"), os.path.join(root, name)
        if isinstance(err, dict) and isinstance(err.get("frame"), int) \
                and not isinstance(err.get("frame"), bool):
            lines.append(f"{folder}: prepared from a damaged source: "
                         + damaged_message(meta.get("source", "?"), err["frame"],
                                           str(err.get("message", ""))))
        elif err is not None or meta.get("source_damaged"):
            lines.append(f"{folder}: prepared from a damaged source: "
                         f"{meta.get('source_damaged') or err}")
    return lines


def _examples(root: str, names: list, k: int = 2) -> str:
    shown = ", ".join(os.path.join(root, n) for n in names[:k])
    return shown + (", ..." if len(names) > k else "")


#: How to repair a folder whose videos were prepared with different options.
MIXED_OPTIONS_FIX = ("to fix it, choose the options, delete the folders of the videos prepared "
                     "with other values and prepare them again: re-run the shards they belong "
                     "to with the chosen options and --resume (or prepare everything into "
                     "another --out)")


def mixed_options(root: str, names=None) -> list[str]:
    """The options (:func:`recorded_options`) whose value differs between the videos of
    ``root`` that :func:`prepare` wrote (``names``, default every video folder): one line per
    option, ``"--resolution: 256 in 5 videos (ROOT/a, ROOT/b, ...), 512 in 1 video
    (ROOT/c)"``, the most common value first. Per-video facts (source, frame counts, timings)
    are no options; a folder whose ``meta.json`` does not tell an option (written before the
    ``options`` record) is not counted for it; unreadable folders and other generators' videos
    are left out. Empty: the videos were prepared alike."""
    values: dict = {}
    for n in (fmt.video_names(root) if names is None else names):
        meta = _prepared_meta(root, n)
        if meta is None:
            continue
        for k, v in recorded_options(meta).items():
            values.setdefault(k, {}).setdefault(json.dumps(v, sort_keys=True), []).append(n)
    lines = []
    for k, by in values.items():
        if len(by) < 2:
            continue
        groups = sorted(by.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        lines.append(f"{CLI_OPTIONS.get(k, k)}: " + ", ".join(
            f"{_show(k, json.loads(v))} in {plural(len(ns), 'video')} ({_examples(root, ns)})"
            for v, ns in groups))
    return lines


def check_same_options(root: str) -> None:
    """Raises :class:`PrepareError` when the prepared videos of ``root`` were prepared with
    different options (:func:`mixed_options`): the message names each option, its values, how
    many videos have each (with examples) and the fix. ``pyface data index`` calls it before it
    writes ``index.json``."""
    lines = mixed_options(root)
    if lines:
        raise PrepareError(f"{root}: videos prepared with different options, which one dataset "
                           f"would mix ({fmt.INDEX} not written):\n  " + "\n  ".join(lines)
                           + f"\n{MIXED_OPTIONS_FIX}; then run pyface data index {root} again")


def _refuse_other_options(cfg: PrepareConfig, mine: set) -> None:
    """Raises :class:`PrepareError` when a finished video of ``cfg.out`` that this run keeps as
    it is and does not own (not in ``mine``: another input's or another shard's) was prepared
    with other options than ``cfg``: one dataset would mix them. Lists each difference with the
    number of videos and examples."""
    want = effective_options(options(cfg))
    differ: dict = {}
    for n in fmt.video_names(cfg.out):
        if n in mine:
            continue
        meta = _prepared_meta(cfg.out, n)
        d = None if meta is None else _differences(recorded_options(meta), want)
        if d:
            differ.setdefault(d, []).append(n)
    if differ:
        what = " | ".join(f"{d}: {plural(len(ns), 'video')} ({_examples(cfg.out, ns)})"
                         for d, ns in sorted(differ.items(), key=lambda kv: -len(kv[1])))
        raise PrepareError(f"--out {cfg.out}: holds videos of other inputs or shards prepared "
                           f"with other options ({what}), which one dataset would mix with "
                           "this run's; prepare with their options, or delete those folders, or "
                           "prepare into another --out")


def prepare(inputs, cfg: PrepareConfig) -> dict:
    """Prepares every input (see :func:`collect_sources`) into ``cfg.out`` and writes the index
    (again after every finished video, so a killed run leaves its finished videos indexed).

    Without ``skip_bad`` the first bad input raises :class:`PrepareError` (videos finished
    before it stay written and indexed); with it, bad inputs (missing, unreadable, no face, or
    failing in any other way) are warnings listed in the summary (``bad``). Folder entries that
    are not read are warnings listed in ``ignored``. With ``resume``, finished videos of the same
    inputs are skipped; one prepared with other options (:func:`effective_options` of
    :data:`OUTPUT_OPTIONS`) is an error before any work. So is a finished video of other inputs
    (or, with ``shard``, of other shards) in ``out`` prepared with other options: the index
    would mix them (:func:`_refuse_other_options`). A run holds a lock on ``out``
    (:func:`_lock_out`: exclusive, shared by shards): a second run into it raises
    :class:`PrepareError` before touching anything. A full disk (:func:`_output_failure`) stops
    the run even with ``skip_bad``.

    With ``shard=(K, N)`` only the videos whose name (:func:`collect_sources`) falls in shard K
    (:func:`shard_of`) are prepared, under the names one run of all the inputs gives them; the
    index is not written (``index.json`` is shared: ``pyface data index`` writes it once all
    shards finished) and only this shard's unfinished folders are cleaned up, so N jobs given
    the same inputs and options can prepare into one ``out`` at the same time. The summary has
    ``shard_videos`` (this shard's videos, finished ones included) and ``total_videos`` (of all
    shards). Its ``damaged`` lists the videos prepared from a source whose decoding failed
    part-way (:func:`iter_frames`), each ``{"name", "source", "frames_kept", "frame",
    "message"}``: the frames before ``frame`` are kept.
    """
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise PrepareError(f"--out {cfg.out}: exists and is not a folder")
    ignored, bad, notes = [], [], []    # the inputs first: a missing one named before the extra
    sources = collect_sources(inputs, ignored=ignored, errors=bad if cfg.skip_bad else None,
                              exclude=[cfg.out], notes=notes)
    for m in notes:
        warnings.warn(m, stacklevel=2)
    for m in ignored:
        warnings.warn(f"ignored: {m}", stacklevel=2)
    for m in bad:
        warnings.warn(f"skipped: {m}", stacklevel=2)
    if not sources:
        raise PrepareError(f"no videos or images found in {list(inputs)}")
    require_backends()
    if cfg.bfm and not os.path.isfile(cfg.bfm):
        raise PrepareError(f"{cfg.bfm}: BFM model file not found (--bfm expects Deep3DFaceRecon's "
                           "BFM_model_front.mat)")
    if cfg.bfm and cfg.fit:
        try:
            fit_model(cfg.bfm)              # a bad file fails here, not once per video
        except (ValueError, KeyError, OSError) as e:
            raise PrepareError(f"--bfm {e}") from None
    if cfg.matting == "modnet":
        from pyface.checkpoint import CheckpointError
        if not os.path.isfile(cfg.matting_weights):
            raise PrepareError(f"{cfg.matting_weights}: MODNet weights file not found "
                               "(--matting-weights expects e.g. MODNet's released "
                               "modnet_photographic_portrait_matting.ckpt)")
        try:
            _modnet(cfg.matting_weights)          # a bad file fails here, before any video
        except CheckpointError as e:
            raise PrepareError(str(e)) from None
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"--out {cfg.out}: cannot create the output folder ({e})") from None
    lock = _lock_out(cfg.out, shared=cfg.shard is not None)
    try:
        return _prepare_locked(sources, ignored, bad, cfg)
    finally:
        if lock is not None:
            os.close(lock)


def _lock_out(out: str, shared: bool) -> int | None:
    """A ``flock`` on the folder ``out`` itself, held while a run writes into it: exclusive for a
    run without ``--shard`` (it cleans up every unfinished video of ``out``), shared by the
    shards (each writes and cleans up only its own videos). Two runs of the same videos into
    one ``out`` would delete each other's unfinished folders and rename a folder the other is
    still writing; a run that cannot take the lock raises :class:`PrepareError` before it
    touches anything. Returns the descriptor to close (None: no lock; a file system or platform
    without ``flock`` on folders, where nothing is locked)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(out, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        # a shard is refused only by a run without --shard (the shards share the lock)
        who = "another pyface data prepare" + (" without --shard" if shared else "")
        raise PrepareError(
            f"--out {out}: {who} is writing into it (it holds the folder's lock); wait for it "
            "to finish, or prepare into another --out (--shard K/N splits one collection "
            "across jobs that write into one --out at once)") from None
    except OSError:             # e.g. a network file system without flock on folders
        os.close(fd)
        return None
    return fd


def _prepare_locked(sources, ignored, bad, cfg: PrepareConfig) -> dict:
    """:func:`prepare` from the collected ``sources`` on, with ``cfg.out`` locked."""
    total = len(sources)
    if cfg.shard is not None:   # chosen by the names the inputs give, before place_sources
        k, n = cfg.shard        # (which every shard runs on all sources: the same names)
        mine = [s for s in sources if shard_of(s.name, n) == k]
    for m in place_sources(sources, cfg.out):
        if cfg.shard is None or any(m.startswith(f"{s.path}: ") for s in mine):
            warnings.warn(m, stacklevel=2)
    if cfg.shard is not None:
        sources = mine
    todo, skipped = [], []
    for s in sources:
        if cfg.resume and os.path.isfile(os.path.join(cfg.out, s.name, fmt.META)):
            skipped.append(s.name)
        else:
            todo.append(s)
    differ = [(n, _option_mismatch(cfg.out, n, cfg)) for n in skipped]
    differ = [f"{os.path.join(cfg.out, n)}: {d}" for n, d in differ if d]
    if differ:
        raise PrepareError("--resume: finished videos were prepared with other options ("
                           + " | ".join(differ) + "); resume with the same options, or prepare "
                           "into another --out")
    _refuse_other_options(cfg, {s.name for s in todo} | set(skipped))
    results = []
    t0 = time.perf_counter()
    vbar = fbar = None
    if cfg.progress:
        from tqdm import tqdm
        if cfg.shard is not None:
            tqdm.write(f"shard {shard_line(cfg.shard, len(sources), total)}"
                       + (f" ({len(skipped)} finished)" if skipped else ""))
        desc = "videos" if cfg.shard is None else f"shard {cfg.shard[0]}/{cfg.shard[1]} videos"
        vbar = tqdm(total=len(todo), unit="video", desc=desc, position=0)
        fbar = tqdm(total=sum(count_frames(s) for s in todo) or None, unit="frame",
                    desc="frames (detection pass)", position=1)

    def done(src, r, err):
        if err is not None:
            if not cfg.skip_bad:
                raise PrepareError(err)
            warnings.warn(f"skipped: {err}", stacklevel=3)
            bad.append(err)
        else:
            for m in r.get("warnings", ()):     # said by the main process, once per video
                warnings.warn(m, stacklevel=3)
            results.append(r)
            if cfg.shard is None:       # a shard leaves index.json to `pyface data index`
                fmt.write_index(cfg.out)
        if vbar is not None:
            vbar.update(1)

    try:
        if cfg.workers == 1 or len(todo) <= 1:
            for s in todo:
                try:
                    r = prepare_video(s, cfg, fbar.update if fbar is not None else None)
                except PrepareError as e:
                    done(s, None, str(e))
                except Exception as e:  # with --skip-bad one failing input never stops the others
                    if _output_failure(e):
                        raise _stopped(s, e, cfg) from None
                    if not cfg.skip_bad:
                        raise
                    done(s, None, _failed(s, e))
                else:
                    done(s, r, None)
        else:
            import multiprocessing as mp
            import threading

            # never fork this process: MediaPipe graphs (a caller's earlier prepare()) run
            # threads that a fork would copy mid-lock. A fork server starts clean and forks
            # the workers with pyface and torch already imported.
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
            if "forkserver" in methods:
                ctx.set_forkserver_preload(["pyface.data.prepare", "pyface.face.fit"])
            q = ctx.Queue()
            stop = threading.Event()

            def drain():
                import queue
                while not stop.is_set():
                    try:
                        k = q.get(timeout=0.2)
                    except queue.Empty:
                        continue
                    if fbar is not None:
                        fbar.update(k)
            th = threading.Thread(target=drain, daemon=True)
            th.start()
            # an executor, not multiprocessing.Pool: a worker killed from outside (the kernel's
            # out-of-memory killer) breaks it with an error, where a Pool waits forever for the
            # lost video
            from concurrent.futures import ProcessPoolExecutor, as_completed
            from concurrent.futures.process import BrokenProcessPool

            ex = ProcessPoolExecutor(min(cfg.workers, len(todo)), mp_context=ctx,
                                     initializer=_worker_init, initargs=(q,))
            try:
                futures = {ex.submit(_worker, (s, cfg)): s for s in todo}
                for f in as_completed(futures):
                    try:
                        s, r, err = f.result()
                    except OSError as e:
                        if not _output_failure(e):
                            raise
                        raise _stopped(futures[f], e, cfg) from None
                    except BrokenProcessPool:
                        lost = [futures[g].path for g in futures
                                if not g.done() or isinstance(g.exception(), BrokenProcessPool)]
                        raise PrepareError(
                            "a worker process died (killed from outside, e.g. by the out-of-"
                            f"memory killer) while preparing one of {lost}; the finished videos "
                            "are kept and indexed: re-run with --resume (fewer --workers if "
                            "memory is short)") from None
                    done(s, r, err)
            except BaseException:
                for proc in list((getattr(ex, "_processes", None) or {}).values()):
                    proc.terminate()        # do not wait for the running videos
                ex.shutdown(wait=False, cancel_futures=True)
                raise
            else:
                ex.shutdown()
            finally:
                stop.set()
                th.join()
    finally:
        for b in (vbar, fbar):
            if b is not None:
                b.close()
        if cfg.shard is None:
            _cleanup_partial(cfg.out)
            if fmt.video_names(cfg.out):
                fmt.write_index(cfg.out)
        else:                   # the other shards' videos being written stay untouched
            _cleanup_partial(cfg.out, [s.name for s in sources])
    seconds = time.perf_counter() - t0
    frames = sum(r["frames"] for r in results)
    damaged = [{"name": r["name"], "source": r["source"], "frames_kept": r["source_frames"],
                **r["decode_error"]} for r in results if r.get("decode_error")]
    return {"videos": len(results), "frames": frames, "skipped_finished": skipped, "bad": bad,
            "ignored": ignored, "damaged": damaged, "seconds": round(seconds, 2),
            "fps": round(frames / seconds, 2) if seconds else 0.0,
            "results": results, "config": asdict(cfg), "shard_videos": len(sources),
            "total_videos": total}


def shard_line(shard, videos: int, total: int) -> str:
    """``"K/N: M of T videos"``."""
    return f"{shard[0]}/{shard[1]}: {videos} of {plural(total, 'video')}"


def _cleanup_partial(out, names=None):
    """Deletes the hidden ``.<name>.partial`` folders of ``out`` (only those of ``names``, when
    given) that an interrupted preparation left."""
    own = None if names is None else \
        {f".{n}{end}" for n in names for end in (".partial", ".replaced.partial")}
    for e in os.listdir(out):
        if e.startswith(".") and e.endswith(".partial") and (own is None or e in own):
            shutil.rmtree(os.path.join(out, e), ignore_errors=True)
