"""The evaluator of ``pyface eval``: runs an inference pipeline over reenactment pairs and
averages per-pair metrics (see docs/eval.md).

A *pipeline* is any object with the methods of :class:`pyface.train.model.Pipeline`:

* ``resolution`` (int): its output size; the data is loaded at this size (antialiased resize);
* ``device`` (optional, default CPU): where its inputs go;
* ``encode_source(source: dict) -> state``: ``source`` is a frame dict, ``image (3, H, W)`` float
  in [-1, 1], ``mask (1, H, W)`` float in [0, 1], ``camera (25,)``, ``coeffs (257,)``,
  ``landmarks (68, 2)``;
* ``encode_driving(driving: dict) -> motion``: the same keys with a leading ``T``;
* ``generate(state, motion) -> (T, 3, H, W)`` in [-1, 1].

Pairs sharing a source are evaluated together: the source is encoded once, the driving frames
go through ``encode_driving`` + ``generate`` in chunks of ``batch_size``; frames per second are
``driven frames / seconds spent in encode_driving + generate`` (the source encoding, data loading
and metrics excluded; CUDA synchronised around each chunk). All pipeline calls run under
``torch.no_grad()``; a pipeline that optimises at encode time enables gradients itself.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pyface.eval import metrics as M

FRAME_KEYS = ("image", "mask", "camera", "coeffs", "landmarks")


class CopySource:
    """The copy-source baseline as a pipeline: every prediction is the source image.

    ``resolution``: the output size (the data is evaluated at this size)."""

    name = "copy-source"

    def __init__(self, resolution: int, *, device="cpu"):
        if int(resolution) < M.SSIM_WINDOW:
            raise ValueError(f"resolution: expected >= {M.SSIM_WINDOW}, got {resolution}")
        self.resolution = int(resolution)
        self.device = torch.device(device)
        self.model = None

    def encode_source(self, source: dict) -> torch.Tensor:
        """source["image"]: (3, H, W) -> state (3, H, W)."""
        return source["image"]

    def encode_driving(self, driving: dict) -> int:
        """driving["image"]: (T, 3, H, W) -> T."""
        return int(driving["image"].shape[0])

    def generate(self, state: torch.Tensor, motion: int, **controls) -> torch.Tensor:
        """-> (T, 3, H, W): the source, T times."""
        return state.unsqueeze(0).expand(motion, -1, -1, -1).contiguous()

    def animate(self, source: dict, driving: dict, **controls) -> torch.Tensor:
        return self.generate(self.encode_source(source), self.encode_driving(driving), **controls)


@dataclass
class EvalResult:
    """What :func:`evaluate` measured for one protocol.

    ``values[metric][region]``: per-pair values ``(n,)`` float64, in pair order; ``moving``:
    ``(n,)`` bool (``has_moving`` is False when the data has no ``moving`` flags); ``sheet``:
    ``{"source", "driving", "target", "prediction"}`` -> ``(K, 3, H, W)``
    in [-1, 1] (a few pairs, one per source, for :func:`pyface.train.monitor.image_grid`)."""
    protocol: str
    subset: str
    resolution: int
    indices: list[int]
    moving: np.ndarray
    values: dict[str, dict[str, np.ndarray]]
    frames: int = 0
    seconds: float = 0.0                     # encode_driving + generate
    source_seconds: float = 0.0              # encode_source, all sources
    sources: int = 0
    has_moving: bool = True                  # False when the data has no coefficients
    sheet: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else math.nan

    def summary(self, subset: str) -> dict:
        """``{"count": n, metric: {region: mean}}`` over ``subset`` ("all" or "moving")."""
        keep = np.ones(len(self.indices), bool) if subset == "all" else self.moving
        out = {"count": int(keep.sum())}
        for name, regions in self.values.items():
            out[name] = {r: _json_float(M.mean_finite(v[keep]) if keep.any() else math.nan)
                         for r, v in regions.items()}
        return out

    def to_dict(self) -> dict:
        subsets = ("moving",) if self.subset == "moving" else \
            ("all", "moving") if self.has_moving else ("all",)
        return {"subsets": {s: self.summary(s) for s in subsets},
                "pairs": len(self.indices), "sources": self.sources,
                "fps": _json_float(self.fps), "frames": self.frames,
                "seconds": round(self.seconds, 4),
                "source_encode_ms": _json_float(1000 * self.source_seconds / max(self.sources, 1))}


def _json_float(x: float):
    """JSON has no NaN / inf: those become None."""
    x = float(x)
    return x if math.isfinite(x) else None


def select_pairs(n: int, max_pairs: int | None) -> list[int]:
    """``max_pairs`` indices spread evenly over ``range(n)`` (all when None or >= n)."""
    if max_pairs is None or max_pairs >= n:
        return list(range(n))
    if max_pairs <= 0:
        raise ValueError(f"max_pairs: expected > 0, got {max_pairs}")
    return sorted(set(np.linspace(0, n - 1, max_pairs).round().astype(int).tolist()))


def source_key(data, index: int):
    """A hashable key of the source of pair ``index`` (pairs with equal keys share a source).

    Known without loading the item for :class:`pyface.data.reenactment.ReenactmentPairs` and
    datasets with a ``source_key(index)`` method; otherwise read from the item's source
    ``video`` and ``frame`` ids."""
    if hasattr(data, "source_key"):
        return data.source_key(index)
    from pyface.data.reenactment import ReenactmentPairs

    if isinstance(data, ReenactmentPairs):
        p = data.pairs[index]
        if data.protocol == "same":                 # (video, source frame, driving frame)
            return ("same", p[0], p[1])
        return ("cross", data.cross.cross.locate(p)[0])   # one source per cross video
    s = data[index]["source"]
    return (int(s["video"]), int(s["frame"])) if "video" in s and "frame" in s else index


def _groups(data, indices: list[int]) -> list[list[int]]:
    """``indices`` grouped by source (consecutive runs of one source)."""
    out, last = [], object()
    for i in indices:
        key = source_key(data, i)
        if key != last:
            out.append([])
            last = key
        out[-1].append(i)
    return out


def to_pipeline_frame(frame: dict, device) -> dict:
    """A data frame dict (uint8 image / mask) -> a pipeline input: ``image`` float in [-1, 1],
    ``mask`` float in [0, 1], other keys of :data:`FRAME_KEYS` as float32, on ``device``."""
    out = {}
    for k in FRAME_KEYS:
        if k not in frame:
            continue
        v = frame[k]
        if k == "image":
            v = v.float() / 127.5 - 1 if v.dtype == torch.uint8 else v.float() * 2 - 1
        elif k == "mask":
            v = v.float() / 255 if v.dtype == torch.uint8 else v.float()
        else:
            v = v.float()
        out[k] = v.to(device, non_blocking=True)
    return out


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.double(), size=size, mode="bilinear", antialias=True,
                         align_corners=False)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(pipeline, data, *, protocol: str = "same", subset: str = "all",
             metrics=("psnr", "ssim"), batch_size: int = 8, max_pairs: int | None = None,
             sheet_rows: int = 8, workers: int = 0, progress: bool = False) -> EvalResult:
    """Evaluates ``pipeline`` (see the module docstring) on reenactment pairs.

    Args:
        data: a dataset root (pairs from :func:`pyface.data.reenactment_pairs` at
            ``pipeline.resolution`` for ``protocol`` / ``subset``) or a dataset whose items are
            ``{"source", "driving", "target", "moving"}`` (targets and masks are then resized
            to the prediction's size with antialiasing when they differ).
        metrics: names of :data:`pyface.eval.metrics.METRICS`.
        batch_size: driving frames per ``encode_driving`` / ``generate`` call.
        max_pairs: evaluate this many pairs spread evenly over the set (None: all).
        sheet_rows: pairs kept for the PNG sheet (the middle pair of each source, in order).
        workers: DataLoader worker processes.
    """
    import os

    from torch.utils.data import DataLoader

    from pyface.data.reenactment import PROTOCOLS, SUBSETS, reenactment_pairs

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    if subset not in SUBSETS:
        raise ValueError(f"subset: expected one of {SUBSETS}, got {subset!r}")
    if int(batch_size) <= 0:
        raise ValueError(f"batch_size: expected > 0, got {batch_size}")
    mets = [M.get(n) for n in metrics]
    resolution = int(getattr(pipeline, "resolution"))
    device = torch.device(getattr(pipeline, "device", None) or "cpu")
    if isinstance(data, (str, os.PathLike)):
        data = reenactment_pairs(data, resolution=resolution, protocol=protocol, subset=subset)
    indices = select_pairs(len(data), max_pairs)
    if not indices:
        raise ValueError(f"data: no {protocol}-identity pairs in subset {subset!r}")
    groups = _groups(data, indices)
    chunks = [g[s:s + batch_size] for g in groups for s in range(0, len(g), batch_size)]
    first_of_group = {g[0] for g in groups}
    sheet_pick = {g[len(g) // 2] for g in groups[:sheet_rows]}
    loader = DataLoader(data, batch_sampler=chunks, num_workers=workers)

    pos = {i: k for k, i in enumerate(indices)}
    values = {m.name: {} for m in mets}
    moving = np.zeros(len(indices), bool)
    res = EvalResult(protocol, subset, resolution, indices, moving, values)
    sheet = {k: [] for k in ("source", "driving", "target", "prediction")}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(indices), unit="pair", desc=f"pyface eval {protocol}")
    state = None
    try:
        for chunk, batch in zip(chunks, loader):
            with torch.no_grad():
                if chunk[0] in first_of_group:
                    first = {k: v[0] for k, v in batch["source"].items()}
                    source = to_pipeline_frame(first, device)
                    _sync(device)
                    t0 = time.perf_counter()
                    state = pipeline.encode_source(source)
                    _sync(device)
                    res.source_seconds += time.perf_counter() - t0
                    res.sources += 1
                driving = to_pipeline_frame(batch["driving"], device)
                _sync(device)
                t0 = time.perf_counter()
                pred = pipeline.generate(state, pipeline.encode_driving(driving))
                _sync(device)
                res.seconds += time.perf_counter() - t0
            n = len(chunk)
            if pred.dim() != 4 or pred.shape[0] != n or pred.shape[1] != 3:
                raise ValueError(f"pipeline.generate: expected (T={n}, 3, H, W), "
                                 f"got {tuple(pred.shape)}")
            res.frames += n
            p = M.prepare(pred.cpu())
            size = tuple(p.shape[-2:])
            t = _resize(M.prepare(batch["target"]["image"]), size)
            mask = batch["target"].get("mask")
            if mask is not None:
                mask = _resize(M.prepare_mask(mask).double(), size) > 0.5
            for m in mets:
                for region, v in m(p, t, mask).items():
                    values[m.name].setdefault(region, np.full(len(indices), np.nan))
                    values[m.name][region][[pos[i] for i in chunk]] = v.numpy()
            if "moving" in batch:
                moving[[pos[i] for i in chunk]] = batch["moving"].numpy().astype(bool)
            else:                                   # no coefficients: no moving subset
                res.has_moving = False
            for j, i in enumerate(chunk):
                if i in sheet_pick:
                    sheet["source"].append(batch["source"]["image"][j])
                    sheet["driving"].append(batch["driving"]["image"][j])
                    sheet["target"].append(batch["target"]["image"][j])
                    sheet["prediction"].append(p[j] * 2 - 1)
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    if sheet["prediction"]:
        size = tuple(sheet["prediction"][0].shape[-2:])
        res.sheet = {k: torch.stack(v).float() if k == "prediction"
                     else _resize(M.prepare(torch.stack(v)), size).float() * 2 - 1
                     for k, v in sheet.items()}
    return res
