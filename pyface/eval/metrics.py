"""Image metrics of ``pyface eval``, each with its exact protocol.

Conventions (every metric here):

* ``pred``, ``target``: ``(N, 3, H, W)`` float in [0, 1] (data range 1). :func:`prepare` turns a
  pipeline's output in [-1, 1] into that range (clamped, then rounded to 8 bits, as if the frame
  had been saved as a PNG); :func:`prepare_data` turns data frames (uint8, or float in [0, 1])
  into it (``x / 255``, or clamped).
* ``mask``: optional ``(N, 1, H, W)`` bool (or {0, 1} float), the face region of the *target*
  frame; metrics with ``mask`` are reported under the region name ``face``, without it ``image``.
* Values are per image (``(N,)`` float64 tensors); a run reports the mean over pairs.

PSNR: ``10 log10(1 / MSE)`` with the MSE over all pixels and channels (``image``) or over the
mask pixels, all channels (``face``). The MSE is floored at ``1e-10``, so PSNR is capped at
100 dB: identical images give exactly 100 dB (finite, JSON-safe) where scikit-image returns
``inf``, and so does any pair with an MSE below ``1e-10`` (one 8-bit level in one value of a
256 x 256 image: 101.07 dB by the formula); below the cap the values equal
``skimage.metrics.peak_signal_noise_ratio(target, pred, data_range=1)``.

SSIM (Wang et al. 2004): per channel, local statistics under an 11 x 11 Gaussian window with
sigma 1.5 (normalised to sum 1), population (not sample) covariances, ``C1 = (0.01 L)^2``,
``C2 = (0.03 L)^2`` with ``L = 1``, evaluated only where the window lies inside the image (valid
region: ``(H - 10) x (W - 10)``), in float64. ``image``: the SSIM map averaged over the valid
region and the channels; equals ``skimage.metrics.structural_similarity(target, pred, data_range=1,
channel_axis=0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``. ``face``: the
SSIM map averaged over the valid-region pixels inside the mask (the mask cropped by 5 pixels on
every side) and the channels; NaN when no mask pixel lies in the valid region.

Metrics plug in by name (:data:`METRICS`, :func:`register`, :func:`get`); the names are those of
the full suite: psnr, ssim, lpips, csim, fid, kid, akd, aed, aed_id, apd, jitter, fps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

PSNR_MSE_FLOOR = 1e-10      # identical images: 100 dB
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03

#: every metric name of the full suite (issue order); those in :data:`METRICS` are implemented.
ALL_NAMES = ("psnr", "ssim", "lpips", "csim", "fid", "kid", "akd", "aed", "aed_id", "apd",
             "jitter", "fps")


def _check_images(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None):
    if pred.dim() != 4 or pred.shape[1] != 3:
        raise ValueError(f"pred: expected (N, 3, H, W), got {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target: expected shape {tuple(pred.shape)} (as pred), "
                         f"got {tuple(target.shape)}")
    if mask is not None:
        want = (pred.shape[0], 1, *pred.shape[2:])
        if tuple(mask.shape) != want:
            raise ValueError(f"mask: expected shape {want}, got {tuple(mask.shape)}")


def prepare(images: torch.Tensor, *, quantize: bool = True) -> torch.Tensor:
    """Images to float64 in [0, 1]: uint8 -> ``x / 255``; float (a pipeline's output, in
    [-1, 1]) -> clamped, ``(x + 1) / 2``, rounded to 8 bits unless ``quantize=False``.
    Any shape ``(..., 3, H, W)``."""
    if images.dtype == torch.uint8:
        return images.double() / 255.0
    x = (images.detach().double().clamp(-1, 1) + 1) / 2
    return (x * 255).round() / 255 if quantize else x


def prepare_data(images: torch.Tensor) -> torch.Tensor:
    """Data frames (targets, sources) to float64 in [0, 1]: uint8 -> ``x / 255``; float (a
    dataset's ``image_dtype=torch.float32`` frames, in [0, 1]) -> clamped to [0, 1]. Unlike
    :func:`prepare`, float input is *not* read as a pipeline's [-1, 1] output.
    Any shape ``(..., 3, H, W)``."""
    if images.dtype == torch.uint8:
        return images.double() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"images: expected uint8 or float frames, got {images.dtype}")
    return images.detach().double().clamp(0, 1)


def prepare_mask(mask: torch.Tensor) -> torch.Tensor:
    """A data mask ``(..., 1, H, W)`` (uint8 255 = foreground, or float in [0, 1]) -> bool
    (foreground where the value is above half of its range)."""
    if mask.dtype == torch.bool:
        return mask
    return mask > (127 if mask.dtype == torch.uint8 else 0.5)


def psnr(pred: torch.Tensor, target: torch.Tensor,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR in dB per image (see the module docstring).

    Args:
        pred, target: ``(N, 3, H, W)`` in [0, 1].
        mask: optional ``(N, 1, H, W)``: average the squared error over mask pixels only.
    Returns: ``(N,)`` float64; NaN for an image whose mask is empty.
    """
    _check_images(pred, target, mask)
    return psnr_regions(pred, target, mask)["image" if mask is None else "face"]


def _psnr_of(mse: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1.0 / mse.clamp_min(PSNR_MSE_FLOOR))


def psnr_regions(pred: torch.Tensor, target: torch.Tensor,
                 mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{"image": (N,), "face": (N,)}`` PSNR (``face`` only with ``mask``), one error map."""
    _check_images(pred, target, mask)
    err = (pred.double() - target.double()).square()
    out = {"image": _psnr_of(err.flatten(1).mean(1))}
    if mask is not None:
        out["face"] = _psnr_of(_masked_mean(err, mask))
    return out


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA,
                    dtype=torch.float64, device=None) -> torch.Tensor:
    """The normalised 1D Gaussian ``(size,)`` of SSIM."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _band(n: int, g: torch.Tensor) -> torch.Tensor:
    """The valid 1D filter of ``g`` over ``n`` samples as a banded ``(n - k + 1, n)`` matrix."""
    k = g.numel()
    rows = torch.arange(n - k + 1, device=g.device)[:, None]
    cols = rows + torch.arange(k, device=g.device)[None]
    return torch.zeros(n - k + 1, n, dtype=g.dtype, device=g.device).scatter_(
        1, cols, g.expand(n - k + 1, k).contiguous())


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable valid filter of ``x: (B, C, H, W)`` by ``g: (k,)`` ->
    ``(B, C, H - k + 1, W - k + 1)`` (two banded matrix products: float64 BLAS is several
    times faster than a float64 convolution on CPU)."""
    return _band(x.shape[-2], g) @ x @ _band(x.shape[-1], g).T


def ssim_map(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM ``(N, 3, H - 10, W - 10)`` float64 of ``(N, 3, H, W)`` images in [0, 1]
    (valid region; see the module docstring)."""
    _check_images(pred, target, None)
    if min(pred.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"pred: SSIM needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW} "
                         f"pixels, got {tuple(pred.shape[-2:])}")
    x, y = pred.double(), target.double()
    g = gaussian_window(device=x.device)
    # the five local moments in one filter call
    mx, my, exx, eyy, exy = _blur(torch.cat([x, y, x * x, y * y, x * y], 1), g).chunk(5, 1)
    sxx, syy, sxy = exx - mx * mx, eyy - my * my, exy - mx * my
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values (N, C, h, w)`` over the pixels of ``mask (N, 1, h, w)`` -> ``(N,)``."""
    m = mask.double().expand_as(values)
    return (values * m).flatten(1).sum(1) / m.flatten(1).sum(1)   # 0 / 0 -> NaN


def ssim(pred: torch.Tensor, target: torch.Tensor,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """SSIM per image (see the module docstring).

    Args:
        pred, target: ``(N, 3, H, W)`` in [0, 1], H and W >= 11.
        mask: optional ``(N, 1, H, W)``: average the SSIM map over mask pixels of the valid region.
    Returns: ``(N,)`` float64; NaN for an image without a mask pixel in the valid region.
    """
    return ssim_regions(pred, target, mask)["image" if mask is None else "face"]


def ssim_regions(pred: torch.Tensor, target: torch.Tensor,
                 mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{"image": (N,), "face": (N,)}`` SSIM (``face`` only with ``mask``), one SSIM map."""
    _check_images(pred, target, mask)
    s = ssim_map(pred, target)
    out = {"image": s.flatten(1).mean(1)}
    if mask is not None:
        r = (SSIM_WINDOW - 1) // 2
        out["face"] = _masked_mean(s, mask[..., r:mask.shape[-2] - r, r:mask.shape[-1] - r])
    return out


# ----------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Metric:
    """A per-pair image metric: ``fn(pred, target, mask=None) -> {region: (N,)}`` with the
    regions ``image`` (whole frame) and ``face`` (the target's mask; only when a mask is given).
    ``higher_is_better`` orders tables."""
    name: str
    fn: Callable[..., dict]
    higher_is_better: bool = True
    unit: str = ""

    def __call__(self, pred: torch.Tensor, target: torch.Tensor,
                 mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{region: (N,) values}`` for ``pred``, ``target`` ``(N, 3, H, W)`` in [0, 1] and
        ``mask`` ``(N, 1, H, W)`` bool or None."""
        return self.fn(pred, target, mask)


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Adds a metric under its name (a name of :data:`ALL_NAMES`)."""
    if metric.name not in ALL_NAMES:
        raise ValueError(f"metric.name: expected one of {ALL_NAMES}, got {metric.name!r}")
    METRICS[metric.name] = metric
    return metric


#: metrics computed by the evaluator beside the per-pair image metrics of :data:`METRICS`:
#: per pair with a network (lpips, csim, aed_id), over a set of frames (fid, kid), with a
#: landmark detector and pyface's 3DMM fit (akd per pair, aed / apd per source group; see
#: :mod:`pyface.eval.motion`), over frame sequences (jitter), or timed (fps, always measured).
EVALUATOR_METRICS = ("lpips", "csim", "fid", "kid", "akd", "aed", "aed_id", "apd", "jitter",
                     "fps")

#: names of the suite that are not implemented, and what they need (none left).
NOT_IMPLEMENTED: dict[str, str] = {}


def get(name: str) -> Metric:
    """The registered per-pair image metric ``name``; a clear error for unknown names, names of
    the suite that are not implemented, and names the evaluator computes itself."""
    if name in METRICS:
        return METRICS[name]
    check_name(name)
    raise ValueError(f"metric {name!r} is not a per-pair image metric (the evaluator computes "
                     "it); see pyface.eval.evaluate")


def check_name(name: str) -> str:
    """``name`` if :func:`pyface.eval.evaluate.evaluate` can compute it, else a clear error:
    ValueError for an unknown name, NotImplementedError naming what a missing metric needs."""
    if name in METRICS or name in EVALUATOR_METRICS:
        return name
    if name in NOT_IMPLEMENTED:
        raise NotImplementedError(f"metric {name!r} is not implemented: it needs "
                                  f"{NOT_IMPLEMENTED[name]}")
    raise ValueError(f"metric: expected one of {', '.join(ALL_NAMES)}, got {name!r}")


register(Metric("psnr", psnr_regions, unit="dB"))
register(Metric("ssim", ssim_regions))


def mean_finite(values) -> float:
    """Mean of the non-NaN values (NaN when there are none)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    v = v[~torch.isnan(v)]
    return float(v.mean()) if v.numel() else math.nan


def jitter(landmarks: torch.Tensor) -> torch.Tensor:
    """Temporal jitter of a landmark sequence: the mean over frames ``1 .. T-2`` and points of
    the norm of the second difference ``L[t+1] - 2 L[t] + L[t-1]`` (the acceleration, in the
    landmarks' units: pixels at the evaluation resolution).

    landmarks: (T, K, 2) with T >= 3 -> () float64."""
    if landmarks.ndim != 3 or landmarks.shape[-1] != 2 or landmarks.shape[0] < 3:
        raise ValueError(f"landmarks: expected shape (T >= 3, K, 2), got "
                         f"{tuple(landmarks.shape)}")
    return second_differences(landmarks).mean()


def second_differences(landmarks: torch.Tensor) -> torch.Tensor:
    """landmarks: (T, K, 2) -> (T - 2,) float64: per middle frame, the mean over points of
    ``|L[t+1] - 2 L[t] + L[t-1]|``."""
    x = landmarks.double()
    return (x[2:] - 2 * x[1:-1] + x[:-2]).norm(dim=-1).mean(-1)
