"""Public ray-marching and volume-rendering ops with EG3D's semantics.

``ray_bundle`` -> ``sample_stratified`` -> (sample the planes, decode) -> ``mip_composite`` ->
``sample_importance`` -> ... is EG3D's ``ImportanceRenderer``; ``render_triplane`` runs all of
it, either with the compiled ops in ray chunks that are recomputed in the backward (small
activation memory), or as one fused Triton kernel per ray block.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from pyface import _backend
from pyface._ops import fused_backward
from pyface.ops._checks import (ShapeChecker, check_autodiff_mode, check_choice, check_finite,
                                check_plane_size, check_positive, has_values, is_finite,
                                is_number)
from pyface.ops.reference.render import (
    OSG_CLAMP,
    decoder_outputs,
    mip_composite_reference,
    ray_bundle_reference,
    render_triplane_reference,
    render_uniforms,
    sample_importance_reference,
    sample_stratified_reference,
)
from pyface.ops.triplane import PLANE_AXES, triplane_sample


Decoder = Sequence[torch.Tensor] | Callable


# ---------------------------------------------------------------------------------------------
# Ops 1-4
# ---------------------------------------------------------------------------------------------

def ray_bundle(cameras: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera rays through the pixel centres, exactly as EG3D's ``RaySampler``.

    Args:
        cameras: (B, 25) EG3D labels: flattened OpenCV cam2world 4x4 (x right, y down, z forward)
            followed by the flattened 3x3 intrinsics normalised by the image size.
        resolution: pixels per side; pixel (i, j) (row i, column j) looks through
            ((j + 0.5) / res, (i + 0.5) / res); ray index i * res + j.

    Returns:
        ray_origins (B, R, 3) and unit ray_dirs (B, R, 3), R = resolution**2, in cameras' dtype.
    """
    chk = ShapeChecker()
    chk.tensor("cameras", cameras, "B 25")
    check_positive("resolution", resolution, integer=True)
    if cameras.numel() and has_values(cameras) and not bool(torch.isfinite(cameras).all()):
        bad = (~torch.isfinite(cameras)).any(1).nonzero().flatten().tolist()
        raise ValueError(f"cameras: expected finite values, got NaN/inf in batch items {bad[:8]}")
    return ray_bundle_reference(cameras, int(resolution))


def _check_range(near, far) -> tuple[float, float]:
    for name, v in (("near", near), ("far", far)):
        if not is_number(v) or not is_finite(v):
            raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if not near < far:
        raise ValueError(f"near, far: expected near < far, got near={near!r}, far={far!r}")
    return float(near), float(far)


def _check_samples(name: str, n, minimum: int) -> int:
    if not is_number(n, integer=True) or n < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {n!r}")
    return int(n)


def sample_stratified(ray_origins: torch.Tensor, ray_dirs: torch.Tensor, near: float, far: float,
                      n_samples: int, *, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Stratified depths along each ray, EG3D's ``sample_stratified`` (linspace plus jitter).

    ``depths[..., i] = near + i * delta + noise[..., i] * delta`` with
    ``delta = (far - near) / (n_samples - 1)``, so with noise the last sample can lie up to one
    bin beyond ``far``, as in EG3D.

    Args:
        ray_origins: (B, R, 3) (sets the shape, device and dtype).
        ray_dirs: (B, R, 3).
        near, far: finite, near < far.
        n_samples: S >= 2.
        noise: (B, R, S) uniform [0, 1) jitter; ``None`` gives the bin starts (deterministic).
            EG3D's training draws ``torch.rand(B, R, S)``.

    Returns:
        (B, R, S) depths.
    """
    chk = ShapeChecker()
    chk.tensor("ray_origins", ray_origins, "B R 3")
    chk.tensor("ray_dirs", ray_dirs, "B R 3")
    near, far = _check_range(near, far)
    S = _check_samples("n_samples", n_samples, 2)
    if noise is not None:
        chk.dims["S"] = S
        chk._bound_by["S"] = "n_samples"
        chk.tensor("noise", noise, "B R S")
    return sample_stratified_reference(ray_origins, near, far, S, noise)


def mip_composite(features: torch.Tensor, densities: torch.Tensor, depths: torch.Tensor, *,
                  density_bias: float = -1.0, white_back: bool = False,
                  depth_range: torch.Tensor | None = None, backend: str | None = None):
    """EG3D's ``MipRayMarcher2`` compositing (without its final ``rgb * 2 - 1``).

    Midpoints of consecutive samples: features, densities and depths are averaged, the interval
    length is the depth difference, ``sigma = softplus(density + density_bias)``,
    ``alpha = 1 - exp(-sigma * delta)``, transmittance ``T`` the exclusive cumulative product of
    ``1 - alpha + 1e-10``, ``weights = alpha * T``; ``features_out = sum(weights * features)``
    (``+ 1 - sum(weights)`` with ``white_back``), ``depth = sum(weights * depth) / sum(weights)``
    with NaN mapped to inf and clamped to the min / max of the whole ``depths`` tensor (or to
    ``depth_range``). Differentiable w.r.t. ``features`` and ``densities``; ``depths`` is a
    constant, as in EG3D where depths are sampled without gradient. The compiled backward
    recomputes the transmittance per ray in forward order with a running sum (nothing of size
    S is stored); where a ray's total weight is exactly 0 its depth gradient is 0 (the
    reference gives NaN there).

    Args:
        features: (B, R, S, C) per-sample features, S >= 2 (C may be 0).
        densities: (B, R, S) raw densities.
        depths: (B, R, S) increasing sample depths.
        density_bias: added before the softplus (EG3D: -1).
        white_back: composite over a white background.
        depth_range: optional (2,) tensor (min, max) for the depth clamp: finite,
            min <= max.
        backend: ``None``, ``"reference"``, ``"cpu"`` or ``"cuda"``.

    Precision: float16 / bfloat16 inputs are computed in float32 and returned in the dtype of
    ``features``; under ``torch.autocast`` they are computed and returned in float32 (float64
    stays float64, with or without autocast).

    Returns:
        features_out (B, R, C), depth (B, R, 1), weights (B, R, S - 1).
    """
    return _mip_composite(features, densities, depths, density_bias=density_bias,
                          white_back=white_back, depth_range=depth_range, backend=backend,
                          _check_values=True)


def _mip_composite(features, densities, depths, *, density_bias, white_back, depth_range,
                   backend, _check_values):
    """:func:`mip_composite`; ``_check_values=False`` (the renderer's own chunks, whose
    ``depth_range`` is the min / max of its depths) skips reading ``depth_range``'s values,
    a device sync per chunk."""
    chk = ShapeChecker()
    chk.tensor("features", features, "B R S C")
    chk.tensor("densities", densities, "B R S")
    chk.tensor("depths", depths, "B R S")
    if chk.dims["S"] < 2:
        raise ValueError(f"features: expected S >= 2 samples per ray, got shape "
                         f"{tuple(features.shape)}")
    _check_compute_dtype("features", features, ("densities", densities), ("depths", depths))
    out_dtype, (features, densities, depths) = _float32_compute(features, densities, depths)
    if depth_range is not None:
        chk.tensor("depth_range", depth_range, "2")
        if _check_values and has_values(depth_range):
            lo, hi = depth_range.tolist()
            if not (is_finite(lo) and is_finite(hi) and lo <= hi):
                # (the backends disagreed: the reference clamps to NaN, or to max when
                # min > max, the compiled kernels ignore a NaN bound and clamp to min)
                raise ValueError(f"depth_range: expected finite (min, max) with min <= max, got "
                                 f"({lo}, {hi})")
    if not isinstance(white_back, bool):
        raise TypeError(f"white_back: expected bool, got {type(white_back).__name__}")
    check_finite("density_bias", density_bias)
    density_bias = float(density_bias)
    name = _backend.select_backend("mip_composite", features.device, backend, features.dtype)
    with _no_autocast(features.device):
        if name == "reference":
            out = mip_composite_reference(features, densities, depths, density_bias=density_bias,
                                          white_back=white_back, depth_range=depth_range)
        else:
            check_autodiff_mode("mip_composite", name, features, densities)
            out = torch.ops.pyface.mip_composite(features, densities, depths.detach(),
                                                 depth_range, density_bias, white_back)
    return tuple(o.to(out_dtype) for o in out)


def _autocast_on(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def _no_autocast(device: torch.device):
    """Autocast off inside a float32 op (as torchvision's autocast kernels do)."""
    if _autocast_on(device):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _float32_compute(*tensors: torch.Tensor):
    """The compositing ops compute in float32 / float64: float16 / bfloat16 inputs are promoted
    to float32. Returns the output dtype (float32 under autocast, as autocast's float32 ops
    do, except for float64, which autocast leaves alone; else the first tensor's dtype) and
    the promoted tensors."""
    half = (torch.float16, torch.bfloat16)
    out_dtype = tensors[0].dtype
    if _autocast_on(tensors[0].device) and out_dtype != torch.float64:
        out_dtype = torch.float32
    return out_dtype, tuple(t.float() if t.dtype in half else t for t in tensors)


def _check_compute_dtype(ref_name: str, ref: torch.Tensor, *named) -> None:
    """The tensors ``named`` compute in the dtype of ``ref``: float64 with float64, float32
    with any of float16 / bfloat16 / float32. The error names the dtype that was passed (not
    the float32 it would have been promoted to)."""
    for name, t in named:
        if (t.dtype == torch.float64) != (ref.dtype == torch.float64):
            expected = (f"torch.float64 (the dtype of {ref_name})" if ref.dtype == torch.float64
                        else f"torch.float32, torch.float16 or torch.bfloat16 (computed in "
                             f"float32 like {ref_name}, {ref.dtype})")
            raise TypeError(f"{name}: expected dtype {expected}, got {t.dtype}")


def sample_importance(depths: torch.Tensor, weights: torch.Tensor, n_importance: int, *,
                      u: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """EG3D's importance sampling (``sample_importance`` + ``sample_pdf``); no gradient.

    The weights are smoothed (``max_pool1d(2, 1, pad 1)`` then ``avg_pool1d(2, 1)``, + 0.01),
    ``weights[1:-1] + 1e-5`` define a piecewise-constant pdf over the midpoints of ``depths``,
    and each ``u`` is mapped through the inverse cdf (``searchsorted(right=True)``, linear
    interpolation, denominators below 1e-5 replaced by 1). The pdf has S - 3 bins, so S >= 4
    (EG3D's code fails for S <= 3).

    Args:
        depths: (B, R, S) coarse depths, S >= 4.
        weights: (B, R, S - 1) coarse compositing weights (``mip_composite``'s third output).
        n_importance: M >= 1 new samples per ray.
        u: (B, R, M) uniforms in [0, 1); ``None`` draws them with ``torch.rand`` from the
            current generator (the same numbers EG3D would draw).
        backend: ``None``, ``"reference"``, ``"cpu"`` or ``"cuda"``.

    Precision: as :func:`mip_composite` (float16 / bfloat16 computed in float32).

    Returns:
        (B, R, M) depths, detached (not sorted).
    """
    chk = ShapeChecker()
    chk.tensor("depths", depths, "B R S")
    if chk.dims["S"] < 4:
        raise ValueError(f"depths: expected S >= 4 samples per ray (the pdf is built over the "
                         f"S - 3 inner smoothed weights), got shape {tuple(depths.shape)}")
    chk.dims["S-1"] = chk.dims["S"] - 1
    chk._bound_by["S-1"] = "depths"
    chk.tensor("weights", weights, "B R S-1")
    M = _check_samples("n_importance", n_importance, 1)
    _check_compute_dtype("depths", depths, ("weights", weights))
    out_dtype, (depths, weights) = _float32_compute(depths, weights)
    if u is None:
        B, R, _ = depths.shape
        u = torch.rand(B, R, M, device=depths.device, dtype=depths.dtype)
    else:
        chk.dims["M"] = M
        chk._bound_by["M"] = "n_importance"
        chk.tensor("u", u, "B R M")
        u = u.to(depths.dtype)
    name = _backend.select_backend("sample_importance", depths.device, backend, depths.dtype)
    with torch.no_grad(), _no_autocast(depths.device):
        if name == "reference":
            return sample_importance_reference(depths, weights, M, u).to(out_dtype)
        out = torch.ops.pyface.sample_importance(depths.detach(), weights.detach(), u.detach())
        # A NaN weight makes the ray's whole pdf NaN in the reference (EG3D's max_pool1d
        # propagates it); the kernels' smoothing max drops a NaN first weight: NaN samples for
        # such a ray on every backend.
        out = torch.where(weights.isnan().any(-1, keepdim=True),
                          torch.full((), math.nan, dtype=out.dtype, device=out.device), out)
        return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# The renderer
# ---------------------------------------------------------------------------------------------

def _is_osg(decoder) -> bool:
    return isinstance(decoder, (tuple, list))


def _check_decoder(decoder, C: int, planes: torch.Tensor):
    if _is_osg(decoder):
        if len(decoder) != 4:
            raise ValueError(f"decoder: expected (w1, b1, w2, b2), got {len(decoder)} items")
        chk = ShapeChecker()
        chk.dims["C"] = C
        chk._bound_by["C"] = "planes"
        w1, b1, w2, b2 = decoder
        chk.tensor("decoder w1", w1, "HID C")
        chk.tensor("decoder b1", b1, "HID")
        chk.tensor("decoder w2", w2, "OUT HID")
        chk.tensor("decoder b2", b2, "OUT")
        if chk.dims["OUT"] < 2:
            raise ValueError(f"decoder w2: expected at least 2 output rows (density + features), "
                             f"got shape {tuple(w2.shape)}")
        if w1.device != planes.device:
            raise ValueError(f"decoder: expected tensors on {planes.device} (the device of "
                             f"planes), got {w1.device}")
        return chk.dims["OUT"] - 1
    if not callable(decoder):
        raise TypeError(f"decoder: expected (w1, b1, w2, b2) or a callable on (B, 3, N, C) "
                        f"features, got {type(decoder).__name__}")
    return None


def _osg_mlp(feats: torch.Tensor, w1, b1, w2, b2, density_only: bool = False):
    """Plane-averaged features (..., C) -> rgb (..., C_out), sigma (...)."""
    shape = feats.shape[:-1]
    x = feats.reshape(-1, feats.shape[-1])
    h = F.softplus(torch.addmm(b1.unsqueeze(0), x, w1.t()))
    if density_only:
        sigma = torch.addmm(b2[:1].unsqueeze(0), h, w2[:1].t())
        return None, sigma.reshape(shape)
    # density and features as two GEMMs: the feature block comes out contiguous, so the sigmoid
    # and the affine run vectorised (on the strided x[:, 1:] of one GEMM they are several times
    # slower on CPU)
    sigma = torch.addmm(b2[:1].unsqueeze(0), h, w2[:1].t())
    x = torch.addmm(b2[1:].unsqueeze(0), h, w2[1:].t())
    rgb = torch.sigmoid(x) * (1 + 2 * OSG_CLAMP) - OSG_CLAMP
    return rgb.reshape(*shape, rgb.shape[-1]), sigma.reshape(shape)


# Samples per block of the OSG decoder on CPU (recompute="decoder" and the coarse pass): its
# (block, hidden) activations then stay in cache, and transient memory is a block's, not a
# chunk's. Measured on the OTAvatar / EG3D tiny renders (docs/models/otavatar-measured.md).
CPU_DECODER_BLOCK = 4096


def _decoder_block(feats: torch.Tensor) -> int:
    """Samples per decoder block for feats (N, C): ``CPU_DECODER_BLOCK`` on CPU, all on GPUs."""
    return CPU_DECODER_BLOCK if feats.device.type == "cpu" else max(1, feats.shape[0])


def _osg_mlp_blocked(feats: torch.Tensor, w1, b1, w2, b2, density_only: bool = False):
    """``_osg_mlp`` of feats (N, C) in row blocks of ``_decoder_block`` samples (the same values):
    rgb (N, C_out) or None, sigma (N,)."""
    N = feats.shape[0]
    block = _decoder_block(feats)
    if N <= block:
        return _osg_mlp(feats, w1, b1, w2, b2, density_only)
    sigma = feats.new_empty(N)
    rgb = None if density_only else feats.new_empty(N, w2.shape[0] - 1)
    for i0 in range(0, N, block):
        r, s = _osg_mlp(feats[i0:i0 + block], w1, b1, w2, b2, density_only)
        sigma[i0:i0 + block] = s
        if rgb is not None:
            rgb[i0:i0 + block] = r
    return rgb, sigma


def _decode(decoder, planes, points, plane_axes, box_size, backend, density_only=False):
    """points (B, N, 3) -> rgb (B, N, C_out) or None, sigma (B, N)."""
    if _is_osg(decoder):
        feats = triplane_sample(planes, points, plane_axes=plane_axes, box_size=box_size,
                                reduce="mean", backend=backend)
        if torch.is_grad_enabled():     # the autograd graph keeps every block anyway
            return _osg_mlp(feats, *decoder, density_only=density_only)
        B, N = feats.shape[:2]
        rgb, sigma = _osg_mlp_blocked(feats.reshape(B * N, feats.shape[-1]), *decoder,
                                      density_only=density_only)
        return (None if rgb is None else rgb.reshape(B, N, rgb.shape[-1])), sigma.reshape(B, N)
    feats = triplane_sample(planes, points, plane_axes=plane_axes, box_size=box_size,
                            reduce="none", backend=backend)
    return decoder_outputs(decoder(feats), points.shape[0], points.shape[1])


def _points(o, d, t):
    """o, d (B, R, 3), t (B, R, S) -> (B, R * S, 3)."""
    B, R, S = t.shape
    return (o.unsqueeze(-2) + t.unsqueeze(-1) * d.unsqueeze(-2)).reshape(B, R * S, 3)


def _final_pass(planes, o, d, t, depth_range, opts, decoder, *weights):
    plane_axes, box_size, density_bias, white_back, backend = opts
    dec = weights if _is_osg(decoder) else decoder
    B, R, S = t.shape
    rgb, sigma = _decode(dec, planes, _points(o, d, t), plane_axes, box_size, backend)
    feats, depth, w = _mip_composite(rgb.reshape(B, R, S, rgb.shape[-1]), sigma.reshape(B, R, S),
                                     t, density_bias=density_bias, white_back=white_back,
                                     depth_range=depth_range, backend=backend,
                                     _check_values=False)
    return feats, depth, w.sum(-1, keepdim=True)


def _osg_final_backward(ctx, g_feats, g_depth, g_wsum):
    planes, o, d, t, depth_range, feats, *weights = ctx.saved_tensors
    plane_axes, box_size, density_bias, white_back, backend = ctx.opts
    need = ctx.needs_input_grad
    need_planes, need_rays = need[0], need[1] or need[2]
    B, R, S = t.shape
    C = feats.shape[-1]
    # the decoder and the compositing run again from the kept plane features, in blocks of rays
    # (B * R rays, ``_decoder_block`` samples per block: the block's activations stay in cache
    # and are the only transient memory); the feature gradients of all samples are gathered and
    # scattered to the planes in one triplane_sample_bwd call (one plane-sized gradient per
    # chunk). The decoder's backward is written out so that its narrow GEMMs run in their fast
    # orientation (on CPU, (N, 32)^T @ (N, C) and (N, 32) @ (32, C) with small C are several
    # times slower than the transposed products autograd's addmm backward would use)
    w1, b1, w2, b2 = (w.detach() for w in weights)
    f_all = feats.detach().reshape(B * R, S, C)
    t_all = t.reshape(B * R, S)
    gf_all = g_feats.contiguous().reshape(B * R, g_feats.shape[-1])
    gd_all = g_depth.contiguous().reshape(B * R, 1)
    gw_all = g_wsum.contiguous().reshape(B * R, 1)
    need_f = need_planes or need_rays
    g_f_all = feats.new_empty(B * R, S, C) if need_f else None
    # weight-gradient accumulators, transposed (the fast GEMM orientation)
    acc = [torch.zeros_like(w1.t()) if need[7] else None,
           torch.zeros_like(b1) if need[8] else None,
           torch.zeros_like(w2.t()) if need[9] else None,
           torch.zeros_like(b2) if need[10] else None]
    rays = max(1, _decoder_block(feats.reshape(B * R * S, C)) // max(1, S))
    for i0 in range(0, B * R, rays):
        i1 = min(B * R, i0 + rays)
        n = i1 - i0
        f = f_all[i0:i1].reshape(n * S, C)
        hp = torch.addmm(b1.unsqueeze(0), f, w1.t())
        h = F.softplus(hp)
        sigma = torch.addmm(b2[:1].unsqueeze(0), h, w2[:1].t())
        sg = torch.sigmoid(torch.addmm(b2[1:].unsqueeze(0), h, w2[1:].t()))
        rgb = sg * (1 + 2 * OSG_CLAMP) - OSG_CLAMP
        # the compositing backward straight from its inputs (its forward is not needed
        # again); the weights' gradient is that of their sum
        g_rgb, g_sig = torch.ops.pyface.mip_composite_bwd(
            gf_all[i0:i1].unsqueeze(0), gd_all[i0:i1].unsqueeze(0),
            gw_all[i0:i1].unsqueeze(0).expand(1, n, S - 1).contiguous(),
            rgb.reshape(1, n, S, rgb.shape[-1]), sigma.reshape(1, n, S),
            t_all[i0:i1].unsqueeze(0), depth_range, density_bias, white_back, True, True)
        g_rgb, g_sig = g_rgb.reshape(rgb.shape), g_sig.reshape(sigma.shape)
        g_x = torch.cat([g_sig, g_rgb * (sg * (1 - sg)) * (1 + 2 * OSG_CLAMP)], 1)
        g_h = g_x @ w2
        g_hp = torch.ops.aten.softplus_backward(g_h, hp, 1.0, 20.0)
        if acc[2] is not None:
            acc[2].addmm_(h.t(), g_x)
        if acc[3] is not None:
            acc[3] += g_x.sum(0)
        if acc[0] is not None:
            acc[0].addmm_(f.t(), g_hp)
        if acc[1] is not None:
            acc[1] += g_hp.sum(0)
        if g_f_all is not None:
            g_f_all[i0:i1] = (w1.t() @ g_hp.t()).t().reshape(n, S, C)
    g_w = [None if a is None else (a.t() if a.dim() == 2 else a) for a in acc]
    g_planes = g_o = g_d = None
    if g_f_all is not None:
        g_planes, g_pts = torch.ops.pyface.triplane_sample_bwd(
            g_f_all.reshape(feats.shape), planes, _points(o, d, t), plane_axes, box_size, "mean",
            False, need_planes, need_rays)
        g_planes = g_planes if need_planes else None
        if need_rays:
            g_pts = g_pts.reshape(B, R, S, 3)
            g_o = g_pts.sum(2) if need[1] else None
            g_d = (g_pts * t.unsqueeze(-1)).sum(2) if need[2] else None
    return (g_planes, g_o, g_d, None, None, None, None, *g_w)


_osg_final_backward_guarded = fused_backward("render_triplane", atomics=("cuda",))(
    _osg_final_backward)


class _OSGFinalPass(torch.autograd.Function):
    """The final pass of one ray chunk with OSG decoder weights (``recompute="decoder"``): keeps
    the plane-averaged features (B, R * S, C) and recomputes only the decoder and the compositing
    in the backward (``_final_pass`` under ``torch.utils.checkpoint`` recomputes the sampling
    too)."""

    @staticmethod
    def forward(ctx, planes, o, d, t, depth_range, opts, decoder, w1, b1, w2, b2):
        plane_axes, box_size, density_bias, white_back, backend = opts
        B, R, S = t.shape
        feats = triplane_sample(planes, _points(o, d, t), plane_axes=plane_axes,
                                box_size=box_size, reduce="mean", backend=backend)
        rgb, sigma = _osg_mlp_blocked(feats.reshape(B * R * S, feats.shape[-1]), w1, b1, w2, b2)
        out_f, depth, w = _mip_composite(rgb.reshape(B, R, S, rgb.shape[-1]),
                                         sigma.reshape(B, R, S), t, density_bias=density_bias,
                                         white_back=white_back, depth_range=depth_range,
                                         backend=backend, _check_values=False)
        ctx.save_for_backward(planes, o, d, t, depth_range, feats, w1, b1, w2, b2)
        ctx.opts = opts
        return out_f, depth, w.sum(-1, keepdim=True)

    @staticmethod
    def backward(ctx, g_feats, g_depth, g_wsum):
        return _osg_final_backward_guarded(ctx, g_feats, g_depth, g_wsum)


def _render_compiled(planes, ray_origins, ray_dirs, decoder, near, far, n_coarse, n_fine,
                     plane_axes, box_size, density_bias, white_back, noise, u, backend,
                     chunk_points, recompute):
    B, R, _ = ray_origins.shape
    dt = ray_origins.dtype
    depths_c = sample_stratified_reference(ray_origins, near, far, n_coarse, noise)
    S = n_coarse + n_fine
    if chunk_points is None:
        chunk_points = 1 << 17
    chunk = R if not recompute else max(1, chunk_points // max(1, B * S))
    # equal chunks (at most chunk rays each): no small remainder chunk paying a whole chunk's
    # per-call overhead
    chunk = -(-R // -(-R // chunk)) if R > 0 else chunk
    n_chunks = max(1, -(-R // chunk))
    # Coarse pass and importance sampling: no gradient flows through them (EG3D), so they run
    # without autograd, chunk by chunk; only the merged sorted depths (B, R, S) are kept.
    if n_fine > 0:
        parts = []
        with torch.no_grad():
            for i in range(n_chunks):
                sl = slice(i * chunk, min(R, (i + 1) * chunk))
                tc = depths_c[:, sl]
                pts = _points(ray_origins[:, sl], ray_dirs[:, sl], tc)
                _, sigma = _decode(decoder, planes, pts, plane_axes, box_size, backend,
                                   density_only=True)
                empty = tc.new_empty(tc.shape + (0,))
                _, _, w = mip_composite(empty, sigma.reshape(tc.shape).to(dt), tc,
                                        density_bias=density_bias, backend=backend)
                tf = sample_importance(tc, w, n_fine, u=u[:, sl], backend=backend)
                parts.append(torch.sort(torch.cat([tc, tf], -1), -1).values)
        depths = torch.cat(parts, 1)
    else:
        depths = depths_c
    if depths.numel():
        depth_range = torch.stack(torch.aminmax(depths))
    else:
        depth_range = depths.new_zeros(2)
    opts = (plane_axes, box_size, density_bias, white_back, backend)
    weights = tuple(decoder) if _is_osg(decoder) else ()
    need_grad = torch.is_grad_enabled() and (
        planes.requires_grad or ray_origins.requires_grad or ray_dirs.requires_grad
        or any(w.requires_grad for w in weights)
        or (not _is_osg(decoder) and isinstance(decoder, torch.nn.Module)
            and any(p.requires_grad for p in decoder.parameters())))
    outs = []
    for i in range(n_chunks):
        sl = slice(i * chunk, min(R, (i + 1) * chunk))
        args = (planes, ray_origins[:, sl], ray_dirs[:, sl], depths[:, sl], depth_range, opts,
                decoder, *weights)
        if recompute == "decoder" and need_grad and _is_osg(decoder):
            outs.append(_OSGFinalPass.apply(*args))
        elif recompute and need_grad:
            outs.append(torch.utils.checkpoint.checkpoint(_final_pass, *args, use_reentrant=False))
        else:
            outs.append(_final_pass(*args))
    feats, depth, wsum = (torch.cat([o[i] for o in outs], 1) for i in range(3))
    # The chunks clamp to depth_range, whose NaN bounds the kernels ignore; one composite of all
    # rays (and the reference, as EG3D) clamps to the min / max of all depths, NaN when a depth
    # is NaN (a NaN ray or noise): the whole depth map is NaN then, here too.
    depth = torch.where(depth_range.isnan().any(), torch.full((), math.nan, dtype=depth.dtype,
                                                              device=depth.device), depth)
    return feats, depth, wsum


def render_triplane(planes: torch.Tensor, ray_origins: torch.Tensor, ray_dirs: torch.Tensor,
                    decoder: Decoder, *, near: float, far: float, n_coarse: int, n_fine: int,
                    plane_axes: str, box_size: float = 1.0, density_bias: float = -1.0,
                    white_back: bool = False, stratified_noise: torch.Tensor | None = None,
                    importance_u: torch.Tensor | None = None, backend: str | None = None,
                    recompute: bool = True, chunk_points: int | None = None):
    """EG3D's ``ImportanceRenderer`` on tri-planes: coarse pass, importance sampling, fine pass,
    merge by depth, final composite.

    ``decoder`` is either EG3D's OSG decoder as its effective float weights ``(w1, b1, w2, b2)``
    (mean of the 3 plane features -> ``w1`` -> softplus -> ``w2``; density = output 0, features
    = ``sigmoid(x[1:]) * 1.002 - 0.001``), or any callable (e.g. an ``nn.Module``) on the
    per-plane features ``(B, 3, N, C)`` returning ``{"rgb": (B, N, C_out), "sigma": (B, N, 1)}``
    or ``(rgb, sigma)`` (EG3D's decoder contract; ray directions are not passed).

    Backends: ``"cpu"`` / ``"cuda"`` run the compiled ops over chunks of rays; with
    ``recompute=True`` only the merged sample depths are kept and each chunk is recomputed in
    the backward, so activation memory is one chunk's, not the whole image's (``recompute=False``
    is the plain unfused pipeline). ``"triton"`` runs the fully fused kernel (the ``triton_op``
    ``torch.ops.pyface.render_triplane_triton``; OSG weights, float32; gradients for planes,
    decoder weights and rays). ``"reference"`` is EG3D's code. The random numbers are drawn once,
    before the backend is chosen (:func:`pyface.ops.reference.render.render_uniforms`), so all
    backends give the same result for the same seed.

    Precision: float64 inputs compute in float64; float32, float16 and bfloat16 compute in
    float32 (also under ``torch.autocast``, which is switched off inside, as torchvision does for
    its float32-only ops) and the outputs come back in the dtype of ``planes``. A callable
    decoder gets the features in the dtype of ``planes`` under the caller's autocast state.

    Double backward (gradients of gradients) works with ``backend="reference"`` only; the fused
    backwards raise an error naming the op. Under ``torch.use_deterministic_algorithms(True)``
    the default choice skips backends whose backward uses atomics (CUDA, Triton).

    Args:
        planes: (B, 3, C, H, W) tri-plane features.
        ray_origins: (B, R, 3), ray_dirs: (B, R, 3) (from ``ray_bundle``).
        decoder: ``(w1 (HID, C), b1 (HID,), w2 (1 + C_out, HID), b2 (1 + C_out,))`` or a callable.
        near, far: depth range of the stratified samples (EG3D FFHQ: 2.25, 3.3).
        n_coarse: samples per ray of the coarse pass (>= 2, >= 4 with n_fine > 0; EG3D: 48).
        n_fine: importance samples per ray (>= 0; EG3D: 48).
        plane_axes: ``"eg3d"`` (EG3D / OTAvatar checkpoints: planes (x, y), (x, z), (z, x)) or
            ``"xy_xz_zy"`` (corrected: (x, y), (x, z), (z, y); GOHA, Export3D, MMFA). Required,
            with no default: the planes' axes are a property of the checkpoint / the network
            that made them, and points lifted or sampled with one and rendered with the other
            silently swap the third plane.
        box_size: side of the cube the planes span (EG3D's ``box_warp``).
        density_bias, white_back: as in ``mip_composite``.
        stratified_noise: (B, R, n_coarse) uniforms or ``None`` (drawn with torch.rand).
        importance_u: (B, R, n_fine) uniforms or ``None`` (drawn with torch.rand after the
            stratified noise, like EG3D).
        backend: ``None`` (the default for the device), ``"reference"``, ``"cpu"``, ``"cuda"``,
            ``"triton"``.
        recompute: ``True``: recompute each ray chunk in the backward (compiled backends;
            only the merged depths are kept); ``"decoder"`` (OSG decoder weights): keep the
            plane-averaged features of each sample, (B, R * S, C), and recompute only the decoder
            and the compositing (the sampling is not run again; a callable decoder falls back to
            ``True``); ``False``: keep the whole graph.
        chunk_points: samples per chunk (default 131072) for the compiled backends.

    Returns:
        features (B, R, C_out), depth (B, R, 1), weights_sum (B, R, 1).
    """
    chk = ShapeChecker()
    chk.tensor("planes", planes, "B 3 C H W")
    chk.tensor("ray_origins", ray_origins, "B R 3")
    chk.tensor("ray_dirs", ray_dirs, "B R 3")
    if min(planes.shape[2:]) < 1:   # as triplane_sample, every backend alike (grid_sample of
        # the reference raised its own words, naming no argument)
        raise ValueError(f"planes: expected shape (B, 3, C, H, W) with C, H, W >= 1, got "
                         f"{tuple(planes.shape)}")
    check_plane_size(planes)        # triplane_sample's limit, for every backend alike
    check_choice("plane_axes", plane_axes, PLANE_AXES)
    check_positive("box_size", box_size)
    near, far = _check_range(near, far)
    n_coarse = _check_samples("n_coarse", n_coarse, 2)
    n_fine = _check_samples("n_fine", n_fine, 0)
    if n_fine > 0 and n_coarse < 4:
        raise ValueError(f"n_coarse: expected >= 4 when n_fine > 0 (importance sampling builds "
                         f"its pdf over n_coarse - 3 bins), got {n_coarse}")
    dev = planes.device
    autocast = _autocast_on(dev)
    out_dtype = planes.dtype
    work = _work_dtype(planes.dtype)
    for name, t in (("ray_origins", ray_origins), ("ray_dirs", ray_dirs)):
        if _work_dtype(t.dtype) != work:
            expected = ("torch.float64 (the dtype of planes)" if work == torch.float64 else
                        f"float16, bfloat16 or float32 (planes are {planes.dtype})")
            raise TypeError(f"{name}: expected dtype {expected}, got {t.dtype}")
    if stratified_noise is not None:
        chk.dims["S"] = n_coarse
        chk._bound_by["S"] = "n_coarse"
        chk.tensor("stratified_noise", stratified_noise, "B R S")
        stratified_noise = stratified_noise.to(work)
    if importance_u is not None:
        chk.dims["M"] = n_fine
        chk._bound_by["M"] = "n_fine"
        chk.tensor("importance_u", importance_u, "B R M")
        importance_u = importance_u.to(work)
    _check_decoder(decoder, chk.dims["C"], planes)
    if not isinstance(white_back, bool):
        raise TypeError(f"white_back: expected bool, got {type(white_back).__name__}")
    if chunk_points is not None:
        check_positive("chunk_points", chunk_points, integer=True)
        chunk_points = int(chunk_points)
    if recompute not in (True, False, "decoder"):
        raise ValueError(f"recompute: expected True, False or 'decoder', got {recompute!r}")
    check_finite("density_bias", density_bias)
    box_size, density_bias = float(box_size), float(density_bias)
    # Float16 / bfloat16 and autocast: the renderer computes in float32 (transmittance products,
    # softplus and the sorted depths need it), the callable decoder sees the caller's dtype and
    # autocast state, and the outputs come back in the dtype of planes.
    planes, ray_origins, ray_dirs = (t.to(work) for t in (planes, ray_origins, ray_dirs))
    if _is_osg(decoder):
        decoder = tuple(w.to(work) for w in decoder)
    elif work != out_dtype or autocast:
        decoder = _CastDecoder(decoder, out_dtype, work, dev.type, autocast)
    # EG3D's random numbers, drawn once here, whatever backend runs.
    B, R, _ = ray_origins.shape
    stratified_noise, importance_u = render_uniforms(B, R, n_coarse, n_fine, ray_origins,
                                                     stratified_noise, importance_u)
    kw = dict(near=near, far=far, n_coarse=n_coarse, n_fine=n_fine, plane_axes=plane_axes,
              box_size=box_size, density_bias=density_bias, white_back=white_back)
    name = _select_renderer(planes, ray_origins, ray_dirs, decoder, backend)
    if name != "reference":
        check_autodiff_mode("render_triplane", name, planes, ray_origins, ray_dirs,
                            *(decoder if _is_osg(decoder) else ()))
    with torch.autocast(dev.type, enabled=False) if autocast else contextlib.nullcontext():
        if name == "reference":
            out = render_triplane_reference(planes, ray_origins, ray_dirs, decoder,
                                            stratified_noise=stratified_noise,
                                            importance_u=importance_u, **kw)
        elif name == "triton":
            out = _render_triton(planes, ray_origins, ray_dirs, decoder, stratified_noise,
                                 importance_u, **kw)
        else:
            out = _render_compiled(planes, ray_origins, ray_dirs, decoder, near, far, n_coarse,
                                   n_fine, plane_axes, box_size, density_bias, white_back,
                                   stratified_noise, importance_u, name, chunk_points, recompute)
    return tuple(o.to(out_dtype) for o in out)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the renderer computes in: float64 stays, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _CastDecoder(torch.nn.Module):
    """A callable decoder seen through the renderer's float32 compute: it gets the features in
    the caller's dtype and autocast state, and its outputs come back in float32."""

    def __init__(self, decoder, in_dtype, work, device_type, autocast):
        super().__init__()
        self.decoder = decoder
        self.in_dtype, self.work, self.device_type, self.autocast = (in_dtype, work, device_type,
                                                                     autocast)

    def forward(self, feats):
        ctx = (torch.autocast(self.device_type, dtype=torch.get_autocast_dtype(self.device_type))
               if self.autocast else contextlib.nullcontext())
        with ctx:
            out = self.decoder(feats.to(self.in_dtype))
        rgb, sigma = (out["rgb"], out["sigma"]) if isinstance(out, dict) else out
        return rgb.to(self.work), sigma.to(self.work)


def _render_triton(planes, ray_origins, ray_dirs, decoder, noise, u, *, near, far, n_coarse,
                   n_fine, plane_axes, box_size, density_bias, white_back):
    """``render_triplane`` through the fused Triton op (float32, OSG decoder weights)."""
    from pyface._ops.render import triton_op

    tc = sample_stratified_reference(ray_origins, near, far, n_coarse, noise).detach()
    f32 = [t.to(torch.float32) for t in (planes, *decoder, ray_origins, ray_dirs, tc)]
    feats, depth, wsum, _ = triton_op()(*f32, u.float() if n_fine > 0 else None, plane_axes,
                                        box_size, density_bias, white_back)
    return feats, depth, wsum


def _triton_ok(planes, ray_origins, ray_dirs, decoder) -> str:
    """'' when the fused Triton kernel can run these inputs, else the reason."""
    if not _is_osg(decoder):
        return "the fused kernel takes OSG decoder weights (w1, b1, w2, b2), not a callable"
    if decoder[0].shape[0] > 128 or decoder[2].shape[0] > 128 or planes.shape[2] > 128:
        return "the fused kernel supports C, hidden and 1 + C_out up to 128"
    return ""


def _select_renderer(planes, ray_origins, ray_dirs, decoder, backend) -> str:
    dev = planes.device
    name = _backend.select_backend("render_triplane", dev, backend, planes.dtype)
    # triton asked for (backend=, use_backend or PYFACE_BACKEND, all honoured or raising)
    # rather than chosen by default: a decoder the fused kernel cannot run raises
    asked = backend is not None or name == (_backend._forced or os.environ.get("PYFACE_BACKEND"))
    if name == "triton" and asked:
        reason = _triton_ok(planes, ray_origins, ray_dirs, decoder)
        if reason:
            raise _backend.BackendUnavailableError(f"render_triplane: backend 'triton': {reason}")
        return name
    if backend is not None:
        return name
    if name == "triton" and _triton_ok(planes, ray_origins, ray_dirs, decoder):
        for alt in ("cuda", "reference"):
            spec = _backend.registered_ops()["render_triplane"]
            if _backend.backend_status(spec, alt, dev.type)[0]:
                return alt
    return name
