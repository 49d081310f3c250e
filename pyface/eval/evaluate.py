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
and metrics excluded; CUDA synchronised around each chunk). A chunk during which ``torch.compile``
compiled a graph (a compiled pipeline's first chunk, a new chunk size:
:func:`pyface.train.model.compiled_graphs`) is left out of the frames per second and reported as
``compile_chunks`` / ``compile_seconds`` instead, unless every chunk compiled. All pipeline calls
run under ``torch.no_grad()``; a pipeline that optimises at encode time enables gradients itself.
Evaluations are reproducible: before each chunk torch's generators are seeded with ``seed +``
the chunk's first pair index, inside :func:`torch.random.fork_rng` (the caller's random state is
left as it was), so a pipeline that draws random numbers (e.g. OTAvatar's pivotal tuning, which
renders random samples) gives the same numbers on every run with the same arguments. The pairs of
one source are an animation seeded with ``seed + g`` (``g``: their first pair index), as
:meth:`pyface.train.model.Pipeline.stream` seeds one: a pipeline's optional ``seed_frames(motion,
seed + g, k)`` is called on each chunk's motion (``k``: the position of its first pair in the
group), so EG3D and GOHA draw each pair's ray samples from its own generator and their
predictions do not depend on ``batch_size``.

Beside the per-pair image metrics (psnr, ssim) the evaluator computes lpips, csim and aed_id
per pair and fid / kid over each subset with user-weighted networks (:func:`load_networks`);
akd per pair and aed / apd per source group with a landmark detector
(:mod:`pyface.eval.landmarks`) and pyface's 3DMM fit (:mod:`pyface.eval.motion`); and jitter over
the driving sequences of each source: of the ground-truth driving landmarks, and of the output's
landmarks: detected when a detector is in use, else those the pipeline knows by construction
(optional ``implied_landmarks(source, driving) -> (T, 68, 2) | None``).

*Ground truth*: on synthetic data (``meta.json`` ``generator`` = ``pyface.data.synthetic``) the
stored landmarks and coefficients are exact, so akd compares the detected output with them and
aed / apd are also reported against the exact coefficients; on real clips (``protocol="real"``,
the default for a folder written by ``pyface data prepare``) the stored ones are themselves
detections, so the detector runs on both the output and the target (see docs/eval.md).

Every mean comes with a 95 % interval: a cluster bootstrap over the pairs' sources
(:meth:`EvalResult.intervals`, :mod:`pyface.eval.stats`; the JSON's ``ci95`` and ``clusters``).

Several processes (``pyface eval`` under torchrun, :mod:`pyface.eval.distributed`): each
evaluates whole source groups (``evaluate(shard=(rank, world))``, :func:`shard_groups`) with the
chunks and seeds of one process, and :func:`merge_results` joins their results into the
one-process result (per-pair values equal; fps the aggregate throughput, :data:`FPS_AGGREGATION`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pyface.eval import metrics as M
from pyface.eval import stats as S

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

    def implied_landmarks(self, source: dict, driving: dict) -> torch.Tensor | None:
        """The landmarks the outputs have by construction: the source's, T times
        ``(T, 68, 2)`` (None without source landmarks)."""
        lm = source.get("landmarks")
        if lm is None:
            return None
        return lm.unsqueeze(0).expand(int(driving["image"].shape[0]), -1, -1)

    def animate(self, source: dict, driving: dict, **controls) -> torch.Tensor:
        return self.generate(self.encode_source(source), self.encode_driving(driving), **controls)


@dataclass
class EvalResult:
    """What :func:`evaluate` measured for one protocol.

    ``values[metric][region]``: per-pair values ``(n,)`` float64, in pair order (regions:
    ``image``, ``face``; akd / aed / apd also ``detected`` (1 / 0) and, with ground truth,
    ``floor`` and (aed / apd) ``gt``, see docs/eval.md); ``moving``:
    ``(n,)`` bool (``has_moving`` is False when the data has no ``moving`` flags); ``sheet``:
    ``{"source", "driving", "target", "prediction"}`` -> ``(K, 3, H, W)``
    in [-1, 1] (a few pairs, one per source, for :func:`pyface.train.monitor.image_grid`);
    ``clusters``: ``(n,)`` int, the source of each pair (:func:`cluster_key`), over which
    :meth:`intervals` resamples."""
    protocol: str
    subset: str
    resolution: int
    indices: list[int]
    moving: np.ndarray
    values: dict[str, dict[str, np.ndarray]]
    frames: int = 0
    seconds: float = 0.0                     # encode_driving + generate
    # chunks during which torch.compile compiled a graph: their frames and seconds (in the
    # totals above too), left out of fps
    compile_chunks: int = 0
    compile_frames: int = 0
    compile_seconds: float = 0.0
    source_seconds: float = 0.0              # encode_source, all sources
    sources: int = 0
    memory_peak_mb: float | None = None      # CUDA: peak allocated during the evaluation
    has_moving: bool = True                  # False when the data has no coefficients
    sheet: dict[str, torch.Tensor] = field(default_factory=dict)
    # fid / kid: per-pair Inception features of the target ("real") and the prediction ("fake")
    features: dict[str, np.ndarray] = field(default_factory=dict)
    set_metrics: tuple[str, ...] = ()        # of fid, kid
    # jitter: per-triple second differences of landmark sequences (see jitter_summary)
    jitter: dict[str, list] | None = None
    ground_truth: bool = True                # stored landmarks / coefficients are exact
    detector: str | None = None              # the landmark detector's name, if one ran
    controls: dict = field(default_factory=dict)   # generate() controls (protocol_controls)
    seed: int | None = None                          # the evaluation's seed (None: unseeded)
    # (n,) int: the source (cluster) of each pair, for the bootstrap intervals (cluster_key)
    clusters: np.ndarray | None = None
    # (n,) bool: the pairs this result evaluated (evaluate(shard=...): those of its source
    # groups; None: every pair); merge_results joins the parts of all shards
    evaluated: np.ndarray | None = None
    sheet_pairs: list[int] = field(default_factory=list)   # the pair index of each sheet row
    # merged shards (merge_results): per rank {"rank", "pairs", "sources", "frames", "seconds",
    # "compile_frames", "compile_seconds", "fps"}; None for one process
    ranks: list[dict] | None = None

    @property
    def world_size(self) -> int:
        """The processes whose shards this result joins (1 for one process)."""
        return len(self.ranks) if self.ranks else 1

    @property
    def fps(self) -> float:
        """Frames per second of the chunks that compiled nothing (all the chunks when every
        one compiled: then :attr:`fps_includes_compilation`). Of merged shards
        (:func:`merge_results`): the aggregate throughput, those frames of every rank over the
        seconds of the rank that spent longest (:data:`FPS_AGGREGATION`)."""
        return _fps(self.frames, self.seconds, self.compile_frames, self.compile_seconds,
                    self.fps_includes_compilation, self.ranks)

    @property
    def fps_includes_compilation(self) -> bool:
        """True when every chunk compiled a graph, so that :attr:`fps` counts compilation."""
        return self.compile_chunks > 0 and self.compile_frames >= self.frames

    def summary(self, subset: str) -> dict:
        """``{"count": n, metric: {region: mean}}`` over ``subset`` ("all" or "moving")."""
        keep = np.ones(len(self.indices), bool) if subset == "all" else self.moving
        out = {"count": int(keep.sum())}
        for name, regions in self.values.items():
            out[name] = {r: _json_float(M.mean_finite(v[keep]) if keep.any() else math.nan)
                         for r, v in regions.items()}
        if self.set_metrics:
            from pyface.eval.fid import fid_from_features, kid_from_features

            ok = keep & np.isfinite(self.features["fake"]).all(1)
            real, fake = self.features["real"][ok], self.features["fake"][ok]
            enough = len(real) >= 2
            if "fid" in self.set_metrics:
                out["fid"] = {"image": _json_float(fid_from_features(real, fake) if enough
                                                   else math.nan)}
            if "kid" in self.set_metrics:
                mean, std = kid_from_features(real, fake) if enough else (math.nan, math.nan)
                out["kid"] = {"image": _json_float(mean), "image_std": _json_float(std)}
        return out

    def intervals(self, subset: str) -> tuple[dict | None, int]:
        """The 95 % intervals of :meth:`summary`'s per-pair means over ``subset``:
        ``({metric: {region: [lo, hi] | None}}, sources)``, a cluster bootstrap over the pairs'
        sources (:func:`pyface.eval.stats.summary_intervals`: 1000 resamples of the sources
        with replacement, all their pairs together, fixed seed, percentile interval; NaN values
        left out as in the means). ``(None, sources)`` with fewer than 2 sources. Without
        ``clusters`` every pair is its own source. fid / kid have none."""
        return S.summary_intervals(self.values, self.subset_mask(subset), self.cluster_ids())

    def cluster_ids(self) -> np.ndarray:
        """``(n,)`` int: the source of each pair (``clusters``; without them each pair its
        own)."""
        return self.clusters if self.clusters is not None else np.arange(len(self.indices))

    def jitter_summary(self) -> dict | None:
        """``{"output", "driving", "triples", "output_landmarks", "target_detector"}``:
        :func:`pyface.eval.metrics.jitter` over every run of three consecutive driving frames of
        one source, in pixels at the evaluation resolution, of: the output's landmarks
        (``output_landmarks`` says whence: ``"detector"`` when a detector is in use,
        ``"implied"`` from the pipeline's ``implied_landmarks``; ``output`` is None when neither
        exists); the driving frames' stored landmarks (``driving``); and, with a detector, the
        detector run on the target frames (``target_detector``: what a perfect output scores
        through the same detector, its own noise included). Triples with an undetected frame
        are left out of the detector-based means."""
        if self.jitter is None:
            return None
        d, o = self.jitter["driving"], self.jitter["output"]
        def mean(v):
            return _json_float(np.nanmean(v)) if v and np.isfinite(v).any() else None
        out = {"output": mean(o) if o is not None else None, "driving": mean(d),
               "triples": len(d), "output_landmarks": self.jitter.get("kind")}
        if self.jitter.get("target") is not None:
            out["target_detector"] = mean(self.jitter["target"])
        return out

    @property
    def report_subsets(self) -> tuple[str, ...]:
        """The subsets :meth:`to_dict` reports: ``moving`` alone for an evaluation of the
        moving subset, else ``all`` and (when the data has coefficients) ``moving``."""
        return ("moving",) if self.subset == "moving" else \
            ("all", "moving") if self.has_moving else ("all",)

    def subset_mask(self, subset: str) -> np.ndarray:
        """``(n,)`` bool: the pairs of ``subset`` ("all" or "moving")."""
        return np.ones(len(self.indices), bool) if subset == "all" else self.moving

    def to_dict(self) -> dict:
        subsets = self.report_subsets
        ci = {s: self.intervals(s) for s in subsets}
        return {"subsets": {s: self.summary(s) for s in subsets},
                "ci95": {s: v[0] for s, v in ci.items()},
                "clusters": {s: v[1] for s, v in ci.items()},
                "bootstrap": dict(BOOTSTRAP),
                "pairs": len(self.indices), "sources": self.sources,
                "fps": _json_float(self.fps), "frames": self.frames,
                "seconds": round(self.seconds, 4),
                **({"fps_aggregation": FPS_AGGREGATION,
                    "ranks": [{k: (_json_float(v) if k == "fps" else
                                   round(v, 4) if isinstance(v, float) else v)
                               for k, v in r.items()} for r in self.ranks]}
                   if self.ranks else {}),
                **({"compile_chunks": self.compile_chunks,
                    "compile_seconds": round(self.compile_seconds, 4),
                    "fps_includes_compilation": self.fps_includes_compilation}
                   if self.compile_chunks else {}),
                "source_encode_ms": _json_float(1000 * self.source_seconds / max(self.sources, 1)),
                "memory_peak_mb": (None if self.memory_peak_mb is None
                                   else round(self.memory_peak_mb, 1)),
                "ground_truth": self.ground_truth, "detector": self.detector,
                "seed": self.seed,
                **({"controls": self.controls} if self.controls else {}),
                **({"jitter": self.jitter_summary()} if self.jitter is not None else {})}


#: How the intervals of :meth:`EvalResult.intervals` are made (reported as ``"bootstrap"``).
BOOTSTRAP = {"method": "cluster bootstrap over sources, percentile interval",
             "level": S.LEVEL, "resamples": S.RESAMPLES, "seed": S.SEED}


#: How :attr:`EvalResult.fps` joins the ranks of a sharded evaluation (the JSON's
#: ``fps_aggregation``).
FPS_AGGREGATION = ("frames of all ranks / generation seconds of the slowest rank (compiling "
                   "chunks left out as in one process); per-rank fps in 'ranks'")


def _fps(frames, seconds, compile_frames, compile_seconds, includes_compilation,
         ranks=None) -> float:
    """:attr:`EvalResult.fps` (``ranks``: the per-rank counts of merged shards)."""
    if ranks:
        if includes_compilation:
            num, den = frames, max(r["seconds"] for r in ranks)
        else:
            num = frames - compile_frames
            den = max(r["seconds"] - r["compile_seconds"] for r in ranks)
        return num / den if den > 0 else math.nan
    if includes_compilation:
        return frames / seconds if seconds > 0 else math.nan
    seconds = seconds - compile_seconds
    return (frames - compile_frames) / seconds if seconds > 0 else math.nan


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


def cluster_key(data, index: int):
    """The key of the bootstrap cluster of pair ``index``: the source image. For the
    cross-identity pairs of :class:`pyface.data.reenactment.ReenactmentPairs` the source video
    and frame (the cross videos of one identity driven by different videos share it), else
    :func:`source_key`."""
    from pyface.data.reenactment import ReenactmentPairs

    if isinstance(data, ReenactmentPairs) and data.protocol == "cross" and \
            not hasattr(data, "source_key"):
        m = data.cross.meta[data.cross.cross.locate(data.pairs[index])[0]]
        return ("cross", m["source_video"], int(m.get("source_frame", 0)))
    return source_key(data, index)


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


def shard_groups(sizes, world: int) -> list[int]:
    """The rank of each source group when ``world`` processes share an evaluation (``sizes``:
    the groups' pair counts, in group order): the largest groups first (ties: in group order),
    each to the rank with the fewest pairs so far (ties: the lowest rank), so the ranks' pair
    counts differ by at most one group's. Deterministic: every rank computes the same list."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world: expected an int >= 1, got {world!r}")
    sizes = [int(n) for n in sizes]
    load = [0] * world
    owner = [0] * len(sizes)
    for g in sorted(range(len(sizes)), key=lambda g: (-sizes[g], g)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[g] = r
        load[r] += sizes[g]
    return owner


def merge_results(parts) -> EvalResult:
    """The :class:`EvalResult` of one process from the results of the shards of one evaluation
    (:func:`evaluate` with ``shard=(rank, world)`` for every rank, in rank order), as
    ``pyface eval`` under torchrun joins them on rank 0.

    Each pair's row comes from the one part that evaluated it (``evaluated``; a part without it
    evaluated every pair): a pair evaluated by two parts or by none is a ValueError, as are
    parts of different evaluations (protocol, pairs, seed, ...). Per-pair values, ``moving``
    and the fid / kid features are taken row by row, so they equal one process's; the jitter
    triples and the sheet rows are put back in the order of one process (by source group and
    pair), so their means equal one process's too. Counts (frames, seconds, sources, compiled
    chunks) are summed, ``memory_peak_mb`` is the largest rank's, and ``ranks`` keeps each
    part's counts and fps; :attr:`EvalResult.fps` is then the aggregate throughput
    (:data:`FPS_AGGREGATION`)."""
    parts = list(parts)
    if not parts or not all(isinstance(p, EvalResult) for p in parts):
        raise ValueError(f"merge_results: expected a list of 1 or more EvalResult, got "
                         f"{[type(p).__name__ for p in parts]}")
    first = parts[0]
    n = len(first.indices)
    for k, p in enumerate(parts):
        if p.ranks is not None:
            raise ValueError(f"merge_results: part {k} is itself merged ({p.world_size} ranks); "
                             "expected the results of evaluate(shard=...)")
        for attr in ("protocol", "subset", "resolution", "indices", "seed", "ground_truth",
                     "set_metrics", "controls", "detector"):
            if getattr(p, attr) != getattr(first, attr):
                raise ValueError(f"merge_results: part {k}'s {attr} ({getattr(p, attr)!r}) "
                                 f"differs from part 0's ({getattr(first, attr)!r}): not "
                                 "shards of one evaluation")
        if (p.jitter is None) != (first.jitter is None):
            said = {True: "none", False: "measured"}
            raise ValueError(f"merge_results: part {k}'s jitter ({said[p.jitter is None]}) "
                             f"differs from part 0's ({said[first.jitter is None]}): not shards "
                             "of one evaluation")
        if list(p.values) != list(first.values):
            raise ValueError(f"merge_results: part {k}'s metrics ({list(p.values)}) differ from "
                             f"part 0's ({list(first.values)}): not shards of one evaluation")
        if (p.evaluated is not None and np.shape(p.evaluated) != (n,)):
            raise ValueError(f"merge_results: part {k}'s evaluated: expected shape ({n},), "
                             f"got {np.shape(p.evaluated)}")
    owner = np.full(n, -1)
    for k, p in enumerate(parts):
        ev = np.ones(n, bool) if p.evaluated is None else np.asarray(p.evaluated, bool)
        both = ev & (owner >= 0)
        if both.any():
            j = int(np.flatnonzero(both)[0])
            overlap = int(both.sum())
            raise ValueError(f"merge_results: pair {first.indices[j]} was evaluated by part "
                             f"{owner[j]} and by part {k} ("
                             + ("1 pair overlaps" if overlap == 1 else f"{overlap} pairs overlap")
                             + "): the shards overlap")
        owner[ev] = k
    if (owner < 0).any():
        miss = np.flatnonzero(owner < 0)
        raise ValueError(f"merge_results: {len(miss)} of {n} pair{'' if n == 1 else 's'} "
                         "evaluated by no part "
                         f"(first: pair {first.indices[int(miss[0])]}): a shard is missing")
    rows = [owner == k for k in range(len(parts))]

    def take(get):
        out = None
        for k, p in enumerate(parts):
            v = get(p)
            if v is None:                  # a region this part's chunks did not produce
                continue
            if out is None:
                out = np.full_like(v, np.nan) if v.dtype.kind == "f" else np.zeros_like(v)
            out[rows[k]] = v[rows[k]]
        return out

    # a metric's regions appear with the chunks that produce them (a rank without chunks has
    # none): those of any part, in order of appearance
    regions = {m: list(dict.fromkeys(r for p in parts for r in p.values[m])) for m in first.values}
    res = EvalResult(first.protocol, first.subset, first.resolution, list(first.indices),
                     take(lambda p: p.moving),
                     {m: {r: take(lambda p, m=m, r=r: p.values[m].get(r)) for r in rs}
                      for m, rs in regions.items()},
                     set_metrics=first.set_metrics, ground_truth=first.ground_truth,
                     detector=first.detector, controls=dict(first.controls), seed=first.seed,
                     clusters=None if first.clusters is None else np.array(first.clusters))
    res.features = {k: take(lambda p, k=k: p.features[k]) for k in first.features}
    res.has_moving = all(p.has_moving for p in parts)
    for attr in ("frames", "seconds", "compile_chunks", "compile_frames", "compile_seconds",
                 "source_seconds", "sources"):
        setattr(res, attr, sum(getattr(p, attr) for p in parts))
    peaks = [p.memory_peak_mb for p in parts if p.memory_peak_mb is not None]
    res.memory_peak_mb = max(peaks) if peaks else None
    if first.jitter is not None:
        res.jitter = _merge_jitter([p.jitter for p in parts])
    pairs = [i for p in parts for i in p.sheet_pairs]
    if pairs:
        order = sorted(range(len(pairs)), key=pairs.__getitem__)
        res.sheet = {k: torch.cat([p.sheet[k] for p in parts if p.sheet_pairs])[order]
                     for k in ("source", "driving", "target", "prediction")}
        res.sheet_pairs = [pairs[j] for j in order]
    if len(parts) > 1:
        res.ranks = [{"rank": k, "pairs": int(rows[k].sum()), "sources": p.sources,
                      "frames": p.frames, "seconds": float(p.seconds),
                      "compile_frames": p.compile_frames,
                      "compile_seconds": float(p.compile_seconds), "fps": p.fps,
                      "memory_peak_mb": p.memory_peak_mb}
                     for k, p in enumerate(parts)]
    return res


def _merge_jitter(parts: list[dict]) -> dict:
    """The jitter lists of :func:`merge_results`: every part's triples, ordered by source group
    as one process adds them; the output's None when a part's is (a source whose pipeline
    implies no landmarks) or when no part had output landmarks (``kind``)."""
    group = [g for j in parts for g in j["group"]]
    order = sorted(range(len(group)), key=group.__getitem__)      # stable: a group's order kept

    def cat(key):
        if any(j.get(key) is None for j in parts):
            return None
        v = [x for j in parts for x in j[key]]
        return [v[i] for i in order]

    kind = next((j["kind"] for j in parts if j["kind"] is not None), None)
    return {"driving": cat("driving"), "output": cat("output") if kind is not None else None,
            "kind": kind, "target": cat("target"), "group": [group[i] for i in order]}


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


def _resize_frames(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Data frames ``(N, 3, H, W)`` in [0, 1] (:func:`~pyface.eval.metrics.prepare_data`) at
    ``size``, as pyface's loaders resize uint8 frames (``pyface.data``'s ``_to_image``): the
    8-bit levels resized in float32 (bilinear, antialiased), clamped and rounded to 8 bits. So
    a dataset object of larger frames gives the targets that its root loaded at the evaluation
    resolution gives: 8-bit images, as the predictions are and as the reference metrics
    compare. Frames already at ``size`` pass unchanged."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    levels = F.interpolate((x * 255).float(), size=size, mode="bilinear", antialias=True,
                           align_corners=False)
    return levels.clamp_(0, 255).round_().double() / 255.0


def _resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A data mask ``(N, 1, H, W)`` at ``size`` as a bool mask (foreground: above half of its
    range, :func:`~pyface.eval.metrics.prepare_mask`), resized as pyface's loaders resize it:
    a uint8 mask's levels in float32 (bilinear, antialiased), rounded to uint8 before the
    threshold; a float (or bool) mask's values in float32."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return M.prepare_mask(mask)
    m = F.interpolate(mask.float(), size=size, mode="bilinear", antialias=True,
                      align_corners=False)
    if mask.dtype == torch.uint8:
        m = m.clamp_(0, 255).round_().to(torch.uint8)
    return M.prepare_mask(m)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def load_networks(metrics, weights: dict | None, *, device=None) -> dict:
    """The networks of the requested metrics that need user weights (lpips; csim and aed_id: one
    ArcFace for both; fid / kid: one Inception for both), built by
    :func:`pyface.eval.weights.load_weighted_metric` from ``weights`` (``{name: path}``, as from
    :func:`pyface.eval.weights.parse_weights`). Raises
    :class:`pyface.eval.weights.MissingWeightsError` naming the file to pass."""
    from pyface.checkpoint import CheckpointError
    from pyface.eval.weights import (METRICS_NEEDING_WEIGHTS, MissingWeightsError,
                                     load_weighted_metric)

    out = {}
    weights = dict(weights or {})
    for name in metrics:
        if name not in METRICS_NEEDING_WEIGHTS:
            continue
        key = network_key(name)
        if key not in out:
            try:
                out[key] = load_weighted_metric(name, weights, device=device)
            except MissingWeightsError:
                raise
            except (CheckpointError, ValueError, KeyError) as exc:   # a file of another network
                msg = str(exc).strip('"')
                heads = weights.get("lpips_heads")
                if name == "lpips" and heads and heads in msg:
                    given, what = f"lpips_heads={heads}", "LPIPS's linear heads"
                else:
                    k = next(k for k in (key, name) if k in weights)
                    given = f"{k}={weights[k]}"
                    what = METRICS_NEEDING_WEIGHTS[name].what
                raise ValueError(f"metric {name!r}: --weights {given} is not {what} ({msg})") \
                    from None
    return out


def network_key(metric: str) -> str:
    """The ``networks`` entry a weight-dependent metric uses: fid and kid share ``"fid"``, csim
    and aed_id share ``"csim"`` (the ArcFace)."""
    return {"kid": "fid", "aed_id": "csim"}.get(metric, metric)


#: what :func:`describe_networks` calls the FID Inception (one network, one weight file).
FID_NETWORK = "inception-v3 pool3 (pytorch-fid pt_inception-2015-12-05)"


def describe_networks(networks: dict | None) -> dict[str, str]:
    """Which networks a report's weight-dependent metrics used, by ``networks`` key: ``lpips``
    its backbone (``"alex"``, ``"vgg"`` or ``"squeeze"``: LPIPS values of different backbones do
    not compare), ``csim`` the ArcFace depth (``"r18"`` ... ``"r100"``, also aed_id's), ``fid``
    :data:`FID_NETWORK` (also kid's). ``{}`` without networks."""
    out = {}
    for key, net in sorted((networks or {}).items()):
        if key == "lpips":
            out[key] = str(getattr(net, "net_name", "unknown"))
        elif key == "csim":
            out[key] = str(getattr(net, "arch", "unknown"))
        elif key == "fid":
            out[key] = FID_NETWORK
    return out


#: Metrics that cannot run without a landmark detector.
DETECTOR_METRICS = ("akd", "aed", "apd")
#: Protocols of :func:`evaluate`: ``real`` = the same-identity pairs of real clips (no exact
#: ground truth: the detector runs on the output and on the target).
EVAL_PROTOCOLS = ("same", "cross", "real")


def data_kind(root) -> str:
    """``"synthetic"`` when every video of the dataset root was written by ``pyface data synth``
    (``meta.json`` ``generator`` = ``pyface.data.synthetic``: exact landmarks and coefficients),
    ``"real"`` otherwise (e.g. ``pyface data prepare``'s ``pyface.data.prepare``)."""
    import json
    import os

    from pyface.data import format as fmt

    recs = fmt.load_index(root)
    if not recs:
        raise fmt.DataError(f"{root}: no videos")
    for r in recs:
        path = r.path(root, fmt.META)
        gen = None
        if os.path.isfile(path):
            with open(path) as f:
                gen = json.load(f).get("generator")
        if gen != "pyface.data.synthetic":
            return "real"
    return "synthetic"


def evaluate(pipeline, data, *, protocol: str = "same", subset: str = "all",
             metrics=("psnr", "ssim"), batch_size: int = 8, max_pairs: int | None = None,
             sheet_rows: int = 8, workers: int = 0, progress: bool = False,
             networks: dict | None = None, weights: dict | None = None,
             detector="auto", ground_truth: bool | None = None,
             cache: dict | None = None, seed: int | None = 0,
             shard: tuple[int, int] | None = None) -> EvalResult:
    """Evaluates ``pipeline`` (see the module docstring) on reenactment pairs.

    Args:
        data: a dataset root (pairs from :func:`pyface.data.reenactment_pairs` at
            ``pipeline.resolution`` for ``protocol`` / ``subset``) or a dataset whose items are
            ``{"source", "driving", "target", "moving"}`` (targets and masks are then resized
            to the prediction's size when they differ, as pyface's loaders resize them:
            antialiased, then rounded to 8 bits).
        protocol: ``"same"``, ``"cross"`` (:mod:`pyface.data.reenactment`) or ``"real"`` (the
            same-identity pairs, without exact ground truth: real clips).
        metrics: names of :data:`pyface.eval.metrics.METRICS` (per-pair image metrics) and of
            :data:`pyface.eval.metrics.EVALUATOR_METRICS` (lpips, csim, fid, kid, akd, aed,
            aed_id, apd, jitter; fps is always measured).
        batch_size: driving frames per ``encode_driving`` / ``generate`` call.
        max_pairs: evaluate this many pairs spread evenly over the set (None: all).
        sheet_rows: pairs kept for the PNG sheet (the middle pair of each source, in order).
        workers: DataLoader worker processes.
        networks: ``{"lpips" | "csim" | "fid": module}`` already built (:func:`load_networks`);
            missing ones are built from ``weights`` (``{name: path}``).
        detector: the landmark detector of akd / aed / apd and of the output's jitter
            (:func:`pyface.eval.landmarks.get_detector`: ``"auto"``, ``"mediapipe"``,
            ``"none"`` or a detector object). Without one, akd / aed / apd raise
            :class:`pyface.eval.landmarks.MissingDetectorError` naming the extra to install.
        ground_truth: whether the data's landmarks and coefficients are exact (default: True for
            ``same`` / ``cross`` on synthetic data or a dataset object, False for ``real`` and
            for roots not written by ``pyface data synth``).
        cache: a dict reused across calls on the same data (``pyface eval --runs``): the target
            frames' detections and fits are computed once.
        seed: torch's generators are seeded with ``seed + i`` before the chunk whose first pair
            index is ``i`` (the caller's random state is restored afterwards), and a pipeline's
            ``seed_frames`` is told the frames' seed (see the module docstring); None: no
            seeding (the pipeline draws from the caller's random state).
        shard: ``(rank, world)``: evaluate only the source groups :func:`shard_groups` gives
            ``rank`` of ``world`` processes (``pyface eval`` under torchrun). The result keeps
            every pair's row (``indices``, ``clusters``) with the other shards' rows unfilled
            and ``evaluated`` marking its own; :func:`merge_results` joins the ranks' results
            into the one-process result. Chunks and seeds are those of one process, so each
            pair's values do not depend on the split. None: every pair.
    """
    import contextlib
    import os

    from torch.utils.data import DataLoader

    from pyface.data.reenactment import SUBSETS, reenactment_pairs
    from pyface.eval import landmarks as L
    from pyface.train.model import compiled_graphs

    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"protocol: expected one of {EVAL_PROTOCOLS}, got {protocol!r}")
    if subset not in SUBSETS:
        raise ValueError(f"subset: expected one of {SUBSETS}, got {subset!r}")
    if int(batch_size) <= 0:
        raise ValueError(f"batch_size: expected > 0, got {batch_size}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"evaluate: seed must be a non-negative int or None, got {seed!r}")
    if shard is not None:
        ok = (isinstance(shard, tuple) and len(shard) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in shard))
        if not ok or not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard: expected (rank, world) with 0 <= rank < world, got "
                             f"{shard!r}")
    metrics = [M.check_name(n) for n in metrics]
    mets = [M.get(n) for n in metrics if n in M.METRICS]
    resolution = int(getattr(pipeline, "resolution"))
    device = torch.device(getattr(pipeline, "device", None) or "cpu")
    nets = dict(networks or {})
    missing = [n for n in metrics if n in ("lpips", "csim", "aed_id", "fid", "kid")
               and network_key(n) not in nets]
    nets.update(load_networks(missing, weights, device=device))
    set_metrics = tuple(n for n in ("fid", "kid") if n in metrics)
    want_jitter = "jitter" in metrics
    det_metrics = [n for n in DETECTOR_METRICS if n in metrics]
    det = L.get_detector(detector, required_by=det_metrics) \
        if (det_metrics or want_jitter) else None
    is_root = isinstance(data, (str, os.PathLike))
    if ground_truth is None:
        ground_truth = protocol != "real" and (not is_root or data_kind(data) == "synthetic")
    pair_protocol = "same" if protocol == "real" else protocol
    data_key = os.path.abspath(data) if is_root else id(data)
    if is_root:
        data = reenactment_pairs(data, resolution=resolution, protocol=pair_protocol,
                                 subset=subset)
    indices = select_pairs(len(data), max_pairs)
    if not indices:
        raise ValueError(f"data: no {pair_protocol}-identity pairs in subset {subset!r}")
    groups = _groups(data, indices)
    sheet_pick = {g[len(g) // 2] for g in groups[:sheet_rows]}   # of all shards' groups
    if shard is not None:
        owner = shard_groups([len(g) for g in groups], shard[1])
        groups = [g for g, r in zip(groups, owner) if r == shard[0]]
    chunks = [g[s:s + batch_size] for g in groups for s in range(0, len(g), batch_size)]
    first_of_group = {g[0] for g in groups}
    # pair -> (its group's first pair, its position in the group): the frame a chunk starts at
    group_start = {i: (g[0], k) for g in groups for k, i in enumerate(g)}
    seed_frames = getattr(pipeline, "seed_frames", None)
    loader = DataLoader(data, batch_sampler=chunks, num_workers=workers)
    cache = {} if cache is None else cache
    det_key = None if det is None else (data_key, pair_protocol, subset, resolution,
                                        getattr(det, "name", type(det).__name__))

    pos = {i: k for k, i in enumerate(indices)}
    values = {m.name: {} for m in mets}
    moving = np.zeros(len(indices), bool)
    nan = lambda: np.full(len(indices), np.nan)           # noqa: E731
    for name in ("lpips", "csim", "aed_id"):
        if name in metrics:
            values[name] = {"image": nan()}
    for name in det_metrics:
        values[name] = {"image": nan(), "detected": nan()}
        if ground_truth:
            values[name]["floor"] = nan()
            if name != "akd":
                values[name]["gt"] = nan()
    res = EvalResult(protocol, subset, resolution, indices, moving, values,
                     set_metrics=set_metrics, ground_truth=bool(ground_truth),
                     detector=None if det is None else getattr(det, "name", type(det).__name__))
    # the pipeline's own controls for this protocol (e.g. MMFA's cross_identity=True)
    controls = dict(getattr(pipeline, "protocol_controls", lambda p: {})(pair_protocol) or {})
    res.controls = controls
    res.clusters = S.cluster_ids(cluster_key(data, i) for i in indices)
    if shard is not None:
        res.evaluated = np.zeros(len(indices), bool)
        res.evaluated[[pos[i] for g in groups for i in g]] = True
    if set_metrics:
        from pyface.eval.fid import FEATURE_DIM
        res.features = {k: np.full((len(indices), FEATURE_DIM), np.nan) for k in ("real", "fake")}
    if want_jitter:
        # "group": per triple, the first pair index of its source group (merge_results
        # puts the shards' triples back in one process's order)
        res.jitter = {"driving": [], "output": [], "kind": None,
                      "target": [] if det is not None else None, "group": []}
    seq: dict = {}
    fits: dict = {}
    sheet = {k: [] for k in ("source", "driving", "target", "prediction")}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(g) for g in groups), unit="pair",
                   desc=f"pyface eval {protocol}" + (f" (rank {shard[0]} of {shard[1]})"
                                                     if shard is not None else ""))
    state = None
    own_detector = det is not None and isinstance(detector, str)     # started here: closed here
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rng = contextlib.ExitStack()
    if seed is not None:
        rng.enter_context(torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else [], device_type=device.type))
    res.seed = seed
    try:
        for chunk, batch in zip(chunks, loader):
            if seed is not None:
                torch.manual_seed(seed + int(chunk[0]))
            with torch.no_grad():
                if chunk[0] in first_of_group:
                    if want_jitter:
                        _close_sequence(res, seq)
                        seq = {"driving": [], "output": [], "frame": [], "target": [],
                               "group": int(chunk[0])}
                    if {"aed", "apd"} & set(metrics):
                        _close_fits(res, fits, cache, det, det_key)
                        fits = {"rows": [], "keys": [], "pred": [], "target": [], "gt": []}
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
                graphs = compiled_graphs()
                t0 = time.perf_counter()
                motion = pipeline.encode_driving(driving)
                if seed_frames is not None:       # as Pipeline.stream: frame i of the group's
                    g0, k = group_start[chunk[0]]  # animation, seeded with seed + its first pair
                    motion = seed_frames(motion, None if seed is None else seed + g0, k)
                pred = pipeline.generate(state, motion, **controls)
                _sync(device)
                dt = time.perf_counter() - t0
                res.seconds += dt
                if compiled_graphs() != graphs:     # torch.compile compiled in this chunk
                    res.compile_chunks += 1
                    res.compile_frames += len(chunk)
                    res.compile_seconds += dt
            n = len(chunk)
            if pred.dim() != 4 or pred.shape[0] != n or pred.shape[1] != 3:
                raise ValueError(f"pipeline.generate: expected (T={n}, 3, H, W), "
                                 f"got {tuple(pred.shape)}")
            bad = ~torch.isfinite(pred.detach()).flatten(1).all(1).cpu()
            if bad.any():      # NaN would drop the pair from the means (as an empty mask)
                which = [int(i) for i, b in zip(chunk, bad) if b]
                raise ValueError("pipeline.generate: expected finite values, got NaN or infinity "
                                 "in the prediction of " + (f"pair {which[0]}" if len(which) == 1
                                                           else f"pairs {which}"))
            res.frames += n
            p = M.prepare(pred.cpu())
            size = tuple(p.shape[-2:])
            t = _resize_frames(M.prepare_data(batch["target"]["image"]), size)
            mask = batch["target"].get("mask")
            if mask is not None:
                mask = _resize_mask(mask, size)
            for m in mets:
                for region, v in m(p, t, mask).items():
                    values[m.name].setdefault(region, np.full(len(indices), np.nan))
                    values[m.name][region][[pos[i] for i in chunk]] = v.numpy()
            rows = [pos[i] for i in chunk]
            scale = torch.tensor([size[1] / batch["target"]["image"].shape[-1],
                                  size[0] / batch["target"]["image"].shape[-2]])
            if "lpips" in nets and "lpips" in metrics:
                with torch.no_grad():
                    v = nets["lpips"]((p * 2 - 1).float().to(device),
                                      (t * 2 - 1).float().to(device))
                values["lpips"]["image"][rows] = v.double().cpu().numpy()
            if "csim" in metrics:
                values["csim"]["image"][rows] = _csim(nets["csim"], batch, p, size, scale,
                                                      device)
            if "aed_id" in metrics:
                values["aed_id"]["image"][rows] = _aed_id(nets["csim"], batch, p, t, scale,
                                                          device)
            if set_metrics:
                f = nets["fid"]
                res.features["real"][rows] = f.features((t * 2 - 1).float())
                res.features["fake"][rows] = f.features((p * 2 - 1).float())
            gt_lm = batch["target"].get("landmarks")
            gt_lm = None if gt_lm is None else gt_lm.double() * scale.double()
            pred_lm = tgt_lm = None
            if det is not None:
                pred_lm, pred_found = L.detect(det, (p * 2 - 1).float())
                tgt_lm, tgt_found = _detect_targets(cache, det, det_key, chunk, t)
            if "akd" in metrics:
                _akd_chunk(values["akd"], rows, pred_lm, pred_found, tgt_lm, tgt_found, gt_lm,
                           bool(ground_truth))
            if {"aed", "apd"} & set(metrics):
                gt_c = batch["target"].get("coeffs")
                if ground_truth and gt_c is None:
                    raise ValueError("data: metrics 'aed' / 'apd' with ground truth need the "
                                     "target frames' 'coeffs' (coeffs.npy); this data has none")
                fits["rows"] += rows
                fits["keys"] += list(chunk)
                fits["pred"].append(pred_lm)
                fits["target"].append(tgt_lm)
                fits["gt"].append(None if gt_c is None else gt_c.double())
            if want_jitter:
                lm = batch["driving"].get("landmarks")
                if lm is None:
                    raise ValueError("data: metric 'jitter' needs the driving frames' "
                                     "'landmarks' (landmarks.npy); this data has none")
                seq["driving"].append(lm.double() * scale.double())
                fr = batch["driving"].get("frame")
                seq["frame"].append(None if fr is None else torch.as_tensor(fr).long())
                if det is not None:
                    res.jitter["kind"] = "detector"
                    seq["output"].append(pred_lm)
                    seq["target"].append(tgt_lm)
                else:
                    imp = getattr(pipeline, "implied_landmarks", None)
                    imp = imp(source, driving) if imp is not None else None
                    seq["output"].append(None if imp is None
                                         else imp.double().cpu() * scale.double())
                    if imp is not None:
                        res.jitter["kind"] = "implied"
            if "moving" in batch:
                moving[[pos[i] for i in chunk]] = batch["moving"].numpy().astype(bool)
            else:                                   # no coefficients: no moving subset
                res.has_moving = False
            for j, i in enumerate(chunk):
                if i in sheet_pick:
                    res.sheet_pairs.append(int(i))
                    sheet["source"].append(batch["source"]["image"][j])
                    sheet["driving"].append(batch["driving"]["image"][j])
                    sheet["target"].append(batch["target"]["image"][j])
                    sheet["prediction"].append(p[j] * 2 - 1)
            if bar is not None:
                bar.update(n)
        if want_jitter:
            _close_sequence(res, seq)
        if {"aed", "apd"} & set(metrics):
            _close_fits(res, fits, cache, det, det_key)
        if device.type == "cuda":
            res.memory_peak_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
    finally:
        rng.close()
        if bar is not None:
            bar.close()
        if own_detector and hasattr(det, "close"):
            det.close()
    if want_jitter and res.jitter["kind"] is None and shard is None:
        res.jitter["output"] = None    # neither detected nor implied (shards: merge_results)
    if sheet["prediction"]:
        size = tuple(sheet["prediction"][0].shape[-2:])
        res.sheet = {k: torch.stack(v).float() if k == "prediction"
                     else _resize_frames(M.prepare_data(torch.stack(v)), size).float() * 2 - 1
                     for k, v in sheet.items()}
    return res


def _csim(net, batch, p: torch.Tensor, size, scale: torch.Tensor, device) -> np.ndarray:
    """CSIM of one chunk: the source frame against each prediction ``p (n, 3, h, w)`` in
    [0, 1], aligned with the source's landmarks and the *target* frame's ground-truth landmarks
    (the frame the prediction should reproduce), both scaled to the prediction's size and
    moved to the pixel-centre coordinates of the ArcFace alignment."""
    src, tgt = batch["source"], batch["target"]
    if src.get("landmarks") is None or tgt.get("landmarks") is None:
        raise ValueError("data: metric 'csim' needs 'landmarks' on the source and target frames "
                         "(landmarks.npy) to align the faces; this data has none")
    n = p.shape[0]
    s_img = _resize_frames(M.prepare_data(src["image"]), size)
    from pyface.eval.identity import pixel_centres

    s_lm = pixel_centres(src["landmarks"].double() * scale.double())
    t_lm = pixel_centres(tgt["landmarks"].double() * scale.double())
    with torch.no_grad():
        v = net((s_img * 2 - 1).float().to(device), s_lm[:n].to(device),
                (p * 2 - 1).float().to(device), t_lm[:n].to(device))
    return v.double().cpu().numpy()


def _aed_id(net, batch, p: torch.Tensor, t: torch.Tensor, scale: torch.Tensor,
            device) -> np.ndarray:
    """aed_id of one chunk (:func:`pyface.eval.motion.identity_distance`): the prediction
    ``p (n, 3, h, w)`` and the target ``t (n, 3, h, w)`` (both in [0, 1], the prediction's size),
    both aligned with the target frame's stored landmarks (in pixel-centre coordinates, as for
    csim), embedded by the ArcFace of csim."""
    from pyface.eval.identity import pixel_centres
    from pyface.eval.motion import identity_distance

    lm = batch["target"].get("landmarks")
    if lm is None:
        raise ValueError("data: metric 'aed_id' needs the target frames' 'landmarks' "
                         "(landmarks.npy) to align the faces; this data has none")
    lm = pixel_centres(lm.double() * scale.double()).to(device)
    with torch.no_grad():
        e_p = net.embed((p * 2 - 1).float().to(device), lm)
        e_t = net.embed((t * 2 - 1).float().to(device), lm)
    return identity_distance(e_p.cpu(), e_t.cpu()).numpy()


def _detect_targets(cache: dict, det, det_key, chunk: list[int], t: torch.Tensor):
    """The detector on the target frames ``t (n, 3, h, w)`` in [0, 1] of the pairs ``chunk``,
    cached per pair (the targets are the same for every model evaluated on the data)."""
    from pyface.eval import landmarks as L

    store = cache.setdefault(("targets",) + det_key, {})
    todo = [j for j, i in enumerate(chunk) if i not in store]
    if todo:
        lm, found = L.detect(det, (t[todo] * 2 - 1).float())
        for k, j in enumerate(todo):
            store[chunk[j]] = (lm[k], bool(found[k]))
    lm = torch.stack([store[i][0] for i in chunk])
    found = torch.tensor([store[i][1] for i in chunk])
    return lm, found


def _akd_chunk(vals: dict, rows, pred_lm, pred_found, tgt_lm, tgt_found, gt_lm,
               ground_truth: bool) -> None:
    """akd of one chunk (:func:`pyface.eval.motion.akd`): with ground truth the detected output
    against the stored landmarks (``floor``: the detected target against them); without, the
    detected output against the detected target. ``detected``: 1 where the reference exists and
    the output's face was found."""
    from pyface.eval.motion import akd

    if ground_truth:
        if gt_lm is None:
            raise ValueError("data: metric 'akd' needs the target frames' ground-truth "
                             "'landmarks' (landmarks.npy); this data has none")
        vals["image"][rows] = akd(pred_lm, gt_lm).numpy()
        vals["floor"][rows] = akd(tgt_lm, gt_lm).numpy()
        vals["detected"][rows] = pred_found.double().numpy()
    else:
        vals["image"][rows] = akd(pred_lm, tgt_lm).numpy()
        vals["detected"][rows] = (pred_found & tgt_found).double().numpy()


def _close_fits(res: EvalResult, fits: dict, cache: dict, det, det_key) -> None:
    """aed / apd of one source group: pyface's 3DMM fit (:func:`pyface.eval.motion.
    fit_coefficients`, identity shared by the group) of the detected outputs and of the
    detected targets (cached per group); ``gt`` against the stored coefficients and ``floor``
    the targets' fit against them (ground truth only)."""
    from pyface.eval import motion as mo

    if not fits or not fits["rows"]:
        return
    conv = det.convention
    size = res.resolution
    pred_c = mo.fit_coefficients(torch.cat(fits["pred"]), size, convention=conv)
    key = ("fits",) + det_key + (tuple(fits["keys"]),)
    if key not in cache:
        cache[key] = mo.fit_coefficients(torch.cat(fits["target"]), size, convention=conv)
    tgt_c = cache[key]
    rows = fits["rows"]
    ok = (torch.isfinite(pred_c).all(1) & torch.isfinite(tgt_c).all(1)).double().numpy()
    gt = None if any(g is None for g in fits["gt"]) else torch.cat(fits["gt"])
    for name, fn in (("aed", mo.aed), ("apd", mo.apd)):
        if name not in res.values:
            continue
        v = res.values[name]
        v["image"][rows] = fn(pred_c, tgt_c).numpy()
        v["detected"][rows] = ok
        if "gt" in v and gt is not None:
            v["gt"][rows] = fn(pred_c, gt).numpy()
            v["floor"][rows] = fn(tgt_c, gt).numpy()


def _close_sequence(res: EvalResult, seq: dict) -> None:
    """Adds the jitter triples of one source's driving sequence (see
    :meth:`EvalResult.jitter_summary`): runs of three consecutive driving frames (by their
    ``frame`` ids when the data has them)."""
    if not seq or not seq["driving"]:
        return
    drv = torch.cat(seq["driving"])
    if drv.shape[0] < 3:
        return
    if all(f is not None for f in seq["frame"]):
        fr = torch.cat(seq["frame"])
        step = fr[1:] - fr[:-1]
        ok = (step[:-1] == 1) & (step[1:] == 1)
    else:
        ok = torch.ones(drv.shape[0] - 2, dtype=torch.bool)
    res.jitter["driving"].extend(M.second_differences(drv)[ok].tolist())
    res.jitter["group"].extend([seq["group"]] * int(ok.sum()))
    if res.jitter["output"] is not None:
        if any(o is None for o in seq["output"]):
            res.jitter["output"] = None                  # the pipeline implies no landmarks
        else:
            res.jitter["output"].extend(M.second_differences(torch.cat(seq["output"]))[ok]
                                        .tolist())
    if res.jitter.get("target") is not None and seq["target"]:
        res.jitter["target"].extend(M.second_differences(torch.cat(seq["target"]))[ok].tolist())
