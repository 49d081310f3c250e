"""Uncertainty of ``pyface eval``'s means: a cluster bootstrap over sources (see docs/eval.md).

Pairs that share a source (one source frame, several driving frames) are correlated, so the
pairs are not independent draws and a per-pair standard error is too small. The bootstrap here
resamples *sources* with replacement and keeps all the pairs of a drawn source together; each
resample's mean is the mean over the finite values of its pairs (a source drawn twice counts
twice), and the interval is the percentile interval of the resampled means. The resamples come
from a fixed :class:`numpy.random.Generator` seed and depend only on the number of sources, so
every metric and region of one subset (and every run compared on the same pairs) shares the
same resampled sources, and the same values give the same interval on every run.
"""
from __future__ import annotations

import math
from typing import Hashable, Iterable, Sequence

import numpy as np

#: Bootstrap resamples per interval.
RESAMPLES = 1000
#: Seed of the :class:`numpy.random.Generator` that draws the resampled sources.
SEED = 0
#: Coverage of the intervals.
LEVEL = 0.95


def cluster_ids(keys: Iterable[Hashable]) -> np.ndarray:
    """Per-item hashable keys -> ``(n,)`` int64 ids ``0 .. C-1`` in order of first appearance
    (equal keys, equal ids)."""
    ids: dict = {}
    return np.asarray([ids.setdefault(k, len(ids)) for k in keys], np.int64)


def resample_weights(n_clusters: int, *, resamples: int = RESAMPLES,
                     seed: int = SEED) -> np.ndarray:
    """``(resamples, n_clusters)`` float64: how often each cluster is drawn in each resample of
    ``n_clusters`` clusters drawn with replacement (``Generator(seed).integers(0, C, (B, C))``,
    row by row)."""
    if n_clusters < 1 or resamples < 1:
        raise ValueError(f"n_clusters and resamples: expected >= 1, got {n_clusters}, "
                         f"{resamples}")
    idx = np.random.default_rng(seed).integers(0, n_clusters, size=(resamples, n_clusters))
    flat = idx + n_clusters * np.arange(resamples)[:, None]
    return np.bincount(flat.ravel(), minlength=resamples * n_clusters) \
        .reshape(resamples, n_clusters).astype(np.float64)


def bootstrap_means(values: Sequence[float], clusters: np.ndarray,
                    weights: np.ndarray) -> np.ndarray:
    """``(B,)``: the mean of the non-NaN ``values`` in each resample of ``weights`` (from
    :func:`resample_weights` with ``C > clusters.max()``); NaN for a resample that drew no
    cluster with a value. ``values`` must have no infinities."""
    v = np.asarray(values, np.float64)
    c = np.asarray(clusters, np.int64)
    if v.shape != c.shape or v.ndim != 1:
        raise ValueError(f"values {v.shape} and clusters {c.shape}: expected the same (n,)")
    ok = ~np.isnan(v)
    n_c = weights.shape[1]
    sums = np.bincount(c[ok], v[ok], minlength=n_c)
    counts = np.bincount(c[ok], minlength=n_c).astype(np.float64)
    num, den = weights @ sums, weights @ counts
    out = np.full(weights.shape[0], np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def cluster_interval(values: Sequence[float], clusters: np.ndarray, weights: np.ndarray,
                     level: float = LEVEL) -> list[float] | None:
    """``[lo, hi]``: the percentile interval (``np.percentile``, linear) of
    :func:`bootstrap_means` at ``level``; None when fewer than 2 clusters have a non-NaN value
    (or a value is infinite: the mean itself is then not finite)."""
    v = np.asarray(values, np.float64)
    c = np.asarray(clusters, np.int64)
    ok = ~np.isnan(v)
    if np.isinf(v[ok]).any() or len(np.unique(c[ok])) < 2:
        return None
    means = bootstrap_means(v, c, weights)
    means = means[~np.isnan(means)]
    if not len(means):
        return None
    tail = 50 * (1 - level)
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return [float(lo), float(hi)]


def summary_intervals(values: dict, keep: np.ndarray, clusters: np.ndarray, *,
                      resamples: int = RESAMPLES, seed: int = SEED,
                      level: float = LEVEL) -> tuple[dict | None, int]:
    """The intervals of :meth:`pyface.eval.evaluate.EvalResult.summary`'s means over the pairs
    ``keep`` (bool ``(n,)``): ``({metric: {region: [lo, hi] | None}}, clusters)``, or
    ``(None, clusters)`` when the subset has fewer than 2 sources."""
    c = np.asarray(clusters, np.int64)[keep]
    ids = np.unique(c, return_inverse=True)[1].reshape(-1) if len(c) else c
    n_c = int(ids.max()) + 1 if len(ids) else 0
    if n_c < 2:
        return None, n_c
    w = resample_weights(n_c, resamples=resamples, seed=seed)
    return ({name: {r: cluster_interval(v[keep], ids, w, level) for r, v in regions.items()}
             for name, regions in values.items()}, n_c)


def paired_differences(a: dict, b: dict, keep: np.ndarray, clusters: np.ndarray, *,
                       resamples: int = RESAMPLES, seed: int = SEED,
                       level: float = LEVEL) -> dict:
    """Run ``a`` minus run ``b`` on the same pairs (``a`` / ``b``: ``{metric: {region: (n,)}}``
    in the same pair order; ``keep``: bool ``(n,)``): ``{metric: {region: {"mean", "ci95",
    "pairs"}}}`` for the metrics and regions both have. ``mean``: the mean of the per-pair
    differences where both values are non-NaN; ``ci95``: its cluster-bootstrap interval (the
    same resampled sources for both runs), None with fewer than 2 such sources."""
    c = np.asarray(clusters, np.int64)[keep]
    ids = np.unique(c, return_inverse=True)[1].reshape(-1) if len(c) else c
    n_c = int(ids.max()) + 1 if len(ids) else 0
    w = resample_weights(n_c, resamples=resamples, seed=seed) if n_c >= 2 else None
    out = {}
    for name, regions in a.items():
        for r, va in regions.items():
            vb = b.get(name, {}).get(r)
            if vb is None:
                continue
            d = np.asarray(va, np.float64)[keep] - np.asarray(vb, np.float64)[keep]
            ok = ~np.isnan(d)
            mean = float(d[ok].mean()) if ok.any() else math.nan
            ci = None if w is None else cluster_interval(d, ids, w, level)
            out.setdefault(name, {})[r] = {"mean": mean if math.isfinite(mean) else None,
                                           "ci95": ci, "pairs": int(ok.sum())}
    return out


def excludes_zero(ci) -> bool:
    """Whether an interval ``[lo, hi]`` lies entirely above or below 0 (False for None)."""
    return ci is not None and (ci[0] > 0 or ci[1] < 0)
