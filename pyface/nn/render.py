# Provenance: reproduces the tri-plane renderer of EG3D (NVlabs/eg3d, commit 7cf1fd1, NVIDIA
# Source Code License, non-commercial): ImportanceRenderer, MipRayMarcher2, importance sampling,
# OSGDecoder and density regularisers; and the density regulariser variant of OTAvatar
# (theEricMa/OTAvatar, commit c8c484f, CC BY-NC-SA 4.0). Our own implementation, written from the
# papers and the upstream's documented behaviour; no upstream code is copied. pyface's code is
# licensed under Apache-2.0 (LICENSE).
"""Tri-plane volume renderer modules: EG3D's ``ImportanceRenderer`` and ``OSGDecoder``, and the
density regularisers of EG3D and OTAvatar, on top of :func:`pyface.ops.render_triplane`.

They call fused ops: first-order gradients are exact; double backward needs
``RenderConfig(backend="reference")`` (the fused backwards raise an error naming the op)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pyface._opspecs import BACKENDS as _BACKENDS
from pyface.nn._reduce import l1_or_zero, mean_or_zero
from pyface.nn.compiling import generator_kwargs
from pyface.nn.layers import FullyConnectedLayer
from pyface.ops.reference.render import OSG_CLAMP
from pyface.ops.reference.render import render_uniforms
from pyface.ops.render import render_triplane
from pyface.ops.triplane import triplane_sample


class OSGDecoder(nn.Module):
    """EG3D's tri-plane decoder: mean over the 3 planes -> FC -> softplus -> FC.

    Output channel 0 is the raw density, channels 1: are features
    ``sigmoid(x) * (1 + 2 * 0.001) - 0.001`` (the first 3 are the raw RGB). Ray directions are
    ignored, as in EG3D.

    Args:
        n_features: plane channels C (EG3D: 32).
        hidden: hidden width (EG3D: 64).
        out_features: feature channels C_out (EG3D: 32).
        lr_multiplier: EG3D's ``decoder_lr_mul`` (1).
    """

    def __init__(self, n_features: int = 32, hidden: int = 64, out_features: int = 32, *,
                 lr_multiplier: float = 1.0) -> None:
        super().__init__()
        self.hidden_dim = hidden
        self.net = nn.Sequential(
            FullyConnectedLayer(n_features, hidden, lr_multiplier=lr_multiplier),
            nn.Softplus(),
            FullyConnectedLayer(hidden, 1 + out_features, lr_multiplier=lr_multiplier),
        )

    def effective_weights(self, dtype: torch.dtype | None = None):
        """(w1 (hidden, C), b1, w2 (1 + C_out, hidden), b2): what ``render_triplane`` fuses."""
        w1, b1 = self.net[0].effective(dtype)
        w2, b2 = self.net[2].effective(dtype)
        return w1, b1, w2, b2

    def forward(self, sampled_features: torch.Tensor, ray_directions: torch.Tensor | None = None):
        """sampled_features: (B, 3, N, C) -> {"rgb": (B, N, C_out), "sigma": (B, N, 1)}."""
        x = sampled_features.mean(1)
        B, N, C = x.shape
        x = self.net(x.reshape(B * N, C)).reshape(B, N, -1)
        rgb = torch.sigmoid(x[..., 1:]) * (1 + 2 * OSG_CLAMP) - OSG_CLAMP
        return {"rgb": rgb, "sigma": x[..., 0:1]}


#: the values ``RenderConfig.backend`` takes besides None (``render_triplane``'s backends)
RENDER_BACKENDS: tuple[str, ...] = tuple(_BACKENDS)


@dataclasses.dataclass(kw_only=True)
class RenderConfig:
    """Rendering options (EG3D's ``rendering_kwargs``); defaults are EG3D's FFHQ configuration,
    except ``plane_axes``, which has none (the presets :meth:`ffhq` and
    :meth:`ffhq_corrected_axes` set it).

    Attributes:
        depth_resolution: coarse samples per ray.
        depth_resolution_importance: importance samples per ray (0: coarse pass only).
        ray_start, ray_end: depth range of the coarse samples.
        box_warp: side of the cube spanned by the planes.
        plane_axes: ``"eg3d"`` (EG3D / OTAvatar checkpoints: planes xy, xz, zx) or
            ``"xy_xz_zy"`` (corrected projection: GOHA, Export3D, MMFA). Required: it is a
            property of the checkpoint, and a wrong default silently swaps the third plane.
        density_bias: added to the density before the softplus.
        white_back: composite over white.
        backend: ``render_triplane`` backend (``None``: the default for the device, see
            ``pyface info``; ``"reference"`` for double backward through the renderer).
        recompute: recompute ray chunks in the backward (compiled backends); ``"decoder"``
            keeps the sampled plane features (C floats per sample) and recomputes only the
            decoder and the compositing (see ``render_triplane``).
        chunk_points: samples per chunk for the compiled backends (``None``: default).
    """

    depth_resolution: int = 48
    depth_resolution_importance: int = 48
    ray_start: float = 2.25
    ray_end: float = 3.3
    box_warp: float = 1.0
    plane_axes: str
    density_bias: float = -1.0
    white_back: bool = False
    backend: str | None = None
    recompute: bool | Literal["decoder"] = True
    chunk_points: int | None = None

    @classmethod
    def ffhq(cls, **overrides) -> "RenderConfig":
        """EG3D FFHQ: 48 + 48 samples, rays 2.25 - 3.3, box 1, EG3D plane axes."""
        return cls(**{"plane_axes": "eg3d", **overrides})

    @classmethod
    def ffhq_corrected_axes(cls, **overrides) -> "RenderConfig":
        """FFHQ options with the corrected xy / xz / zy plane projection."""
        return cls(**{"plane_axes": "xy_xz_zy", **overrides})


def check_render_values(values, key: str) -> None:
    """The inference-time :class:`RenderConfig` fields among ``values`` (a mapping of field
    name -> value, e.g. a model's ``render`` overrides; absent fields are not checked), a
    ValueError naming ``key.FIELD`` and the expected and given values otherwise:
    ``depth_resolution`` an int >= 2, ``depth_resolution_importance`` an int >= 0,
    ``backend`` None or a render backend (:data:`RENDER_BACKENDS`), ``recompute`` true, false or ``"decoder"``, ``chunk_points`` an int >= 1 or None. (The
    coarse pass needs >= 4 samples when there are importance samples: check that with the
    complete config, :func:`check_sample_counts`.)"""
    if "depth_resolution_importance" in values:
        m = values["depth_resolution_importance"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"{key}.depth_resolution_importance: expected an int >= 0 "
                             f"(0: the coarse pass only), got {m!r}")
    if "depth_resolution" in values:
        n = values["depth_resolution"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"{key}.depth_resolution: expected an int >= 2, got {n!r}")
    if "backend" in values and values["backend"] is not None \
            and values["backend"] not in RENDER_BACKENDS:
        raise ValueError(f"{key}.backend: expected one of {list(RENDER_BACKENDS)} or None (the "
                         f"default for the device), got {values['backend']!r}")
    if "recompute" in values and values["recompute"] not in (True, False, "decoder"):
        raise ValueError(f"{key}.recompute: expected true, false or 'decoder', got "
                         f"{values['recompute']!r}")
    if "chunk_points" in values:
        c = values["chunk_points"]
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"{key}.chunk_points: expected an int >= 1 or None (the "
                             f"renderer's default), got {c!r}")


def check_sample_counts(config: RenderConfig, key: str, *, blame: str = "depth_resolution"
                        ) -> None:
    """``config``'s coarse samples per ray fit its importance samples: with
    ``depth_resolution_importance > 0`` the coarse pass needs ``depth_resolution >= 4`` (the
    importance pass resamples the coarse weights' interior). Otherwise a ValueError naming
    ``key.blame`` (the field the caller set: ``"depth_resolution"`` or
    ``"depth_resolution_importance"``) with both values."""
    n, m = config.depth_resolution, config.depth_resolution_importance
    if m > 0 and n < 4:
        if blame == "depth_resolution_importance":
            raise ValueError(f"{key}.depth_resolution_importance: expected 0 with fewer than 4 "
                             f"coarse samples (depth_resolution {n}), got {m}")
        raise ValueError(f"{key}.depth_resolution: expected >= 4 with importance samples "
                         f"(depth_resolution_importance {m}), got {n}")


@dataclasses.dataclass
class RenderOutput:
    """Renderer outputs for R = H * W rays.

    Attributes:
        features: (B, R, C_out) composited features mapped to [-1, 1] (``* 2 - 1``), as EG3D's
            ``ImportanceRenderer`` returns them.
        depth: (B, R, 1) composited depth.
        weights_sum: (B, R, 1) accumulated opacity.
    """

    features: torch.Tensor
    depth: torch.Tensor
    weights_sum: torch.Tensor

    def images(self, height: int, width: int | None = None) -> dict[str, torch.Tensor]:
        """EG3D generator images: ``feature_image`` (B, C_out, H, W), ``image_raw`` (B, 3, H, W),
        ``image_depth`` (B, 1, H, W)."""
        width = width or height
        B = self.features.shape[0]
        feat = self.features.permute(0, 2, 1).reshape(B, -1, height, width).contiguous()
        depth = self.depth.permute(0, 2, 1).reshape(B, 1, height, width)
        return {"feature_image": feat, "image_raw": feat[:, :3], "image_depth": depth}


class TriplaneRenderer(nn.Module):
    """EG3D's ``ImportanceRenderer`` on tri-planes (coarse, importance, fine, merge, composite).

    Uses the fused path of :func:`pyface.ops.render_triplane` when the decoder is an
    :class:`OSGDecoder` (its effective weights are fused, gradients flow to its parameters),
    otherwise the unfused ops with the decoder module on the sampled (B, 3, N, C) features.
    """

    def __init__(self, config: RenderConfig) -> None:
        super().__init__()
        if not isinstance(config, RenderConfig):
            raise TypeError(f"config: expected a RenderConfig (e.g. RenderConfig.ffhq()), got "
                            f"{type(config).__name__}")
        self.config = config

    def forward(self, planes: torch.Tensor, decoder: nn.Module, ray_origins: torch.Tensor,
                ray_dirs: torch.Tensor, *, stratified_noise: torch.Tensor | None = None,
                importance_u: torch.Tensor | None = None) -> RenderOutput:
        """planes (B, 3, C, H, W), ray_origins / ray_dirs (B, R, 3); optional injected uniforms
        stratified_noise (B, R, depth_resolution), importance_u (B, R, depth_resolution_importance).
        """
        cfg = self.config
        dec = decoder
        if isinstance(decoder, OSGDecoder):
            dec = decoder.effective_weights(_weights_dtype(planes))
        feats, depth, wsum = render_triplane(
            planes, ray_origins, ray_dirs, dec, near=cfg.ray_start, far=cfg.ray_end,
            n_coarse=cfg.depth_resolution, n_fine=cfg.depth_resolution_importance,
            plane_axes=cfg.plane_axes, box_size=cfg.box_warp, density_bias=cfg.density_bias,
            white_back=cfg.white_back, stratified_noise=stratified_noise,
            importance_u=importance_u, backend=cfg.backend, recompute=cfg.recompute,
            chunk_points=cfg.chunk_points)
        return RenderOutput(feats * 2 - 1, depth, wsum)


def ray_uniforms(config: RenderConfig, generators: list, n_rays: int,
                 planes: torch.Tensor) -> dict:
    """The uniforms :class:`TriplaneRenderer` draws for its ray samples
    (:func:`pyface.ops.reference.render.render_uniforms`), item ``b``'s from ``generators[b]``
    (one ``torch.Generator`` per item: frames whose samples do not depend on how they are
    batched): ``stratified_noise`` (B, n_rays, depth_resolution) and ``importance_u``
    (B, n_rays, depth_resolution_importance) or None, B = len(generators), on ``planes``'
    device in the renderer's dtype (``planes``: the (B, 3, C, H, W) planes to render). Pass them
    to :meth:`TriplaneRenderer.forward`."""
    like = torch.empty(0, device=planes.device, dtype=_weights_dtype(planes))
    drawn = [render_uniforms(1, n_rays, config.depth_resolution,
                             config.depth_resolution_importance, like, generator=g)
             for g in generators]
    noise, imp = zip(*drawn)
    return {"stratified_noise": torch.cat(noise),
            "importance_u": None if imp[0] is None else torch.cat(imp)}



def renderer_uniforms(config: RenderConfig, batch: int, n_rays: int,
                      like: torch.Tensor) -> dict:
    """The uniforms :class:`TriplaneRenderer` draws itself when given none, for ``batch``
    renders of ``n_rays`` rays: ``torch.rand`` from torch's current generator, the same numbers
    in the same order (``stratified_noise`` (batch, n_rays, depth_resolution), then
    ``importance_u`` (batch, n_rays, depth_resolution_importance) or None), on ``like``'s device
    in the renderer's dtype for planes of ``like``'s dtype (``like``: any tensor, e.g. the
    (B, 3, C, H, W) planes). Drawn before the call and passed to
    :meth:`TriplaneRenderer.forward`, they stay out of a renderer compiled with
    ``torch.compile``, whose Inductor backend would draw other numbers with its own generator;
    uncompiled renders do not change."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
    if isinstance(n_rays, bool) or not isinstance(n_rays, int) or n_rays < 1:
        raise ValueError(f"n_rays: expected an int >= 1, got {n_rays!r}")
    noise, imp = render_uniforms(batch, n_rays, config.depth_resolution,
                                 config.depth_resolution_importance,
                                 torch.empty(0, device=like.device, dtype=_weights_dtype(like)))
    return {"stratified_noise": noise, "importance_u": imp}

# ---------------------------------------------------------------------------------------------
# Density regularisers (EG3D training/loss.py; OTAvatar uses the monotonic one)
# ---------------------------------------------------------------------------------------------

def _weights_dtype(planes: torch.Tensor) -> torch.dtype:
    """The renderer computes in float64 or float32 (also for float16 / bfloat16 planes)."""
    return torch.float64 if planes.dtype == torch.float64 else torch.float32


def query_density(planes: torch.Tensor, decoder, points: torch.Tensor, *,
                  plane_axes: str, box_size: float = 1.0) -> torch.Tensor:
    """Raw density (B, N) of the decoder at points (B, N, 3) of planes (B, 3, C, H, W)
    (EG3D's ``sample_mixed``);
    ``plane_axes`` as in :class:`RenderConfig` (required).

    Precision as in the renderer: float16 / bfloat16 planes are sampled and OSG weights applied
    in float32 (autocast off), so the differences of nearby densities the regularisers take are
    not lost to rounding; a callable decoder gets the features in the dtype of ``planes`` under
    the caller's autocast. Returns float32 (float64 for float64 planes)."""
    work = _weights_dtype(planes)
    in_dtype = planes.dtype
    planes = planes.to(work)
    if isinstance(decoder, OSGDecoder):
        decoder = decoder.effective_weights(work)
    if isinstance(decoder, (tuple, list)):
        w1, b1, w2, b2 = (w.to(work) for w in decoder)
        dev = planes.device.type
        off = (torch.autocast(dev, enabled=False) if dev in ("cpu", "cuda")
               and torch.is_autocast_enabled(dev) else contextlib.nullcontext())
        with off:
            f = triplane_sample(planes, points, plane_axes=plane_axes, box_size=box_size)
            h = F.softplus(torch.addmm(b1.unsqueeze(0), f.reshape(-1, f.shape[-1]), w1.t()))
            sigma = torch.addmm(b2[:1].unsqueeze(0), h, w2[:1].t())
        return sigma.reshape(points.shape[:2])
    f = triplane_sample(planes, points, plane_axes=plane_axes, box_size=box_size, reduce="none")
    out = decoder(f.to(in_dtype))
    sigma = out["sigma"] if isinstance(out, dict) else out[1]
    return sigma.reshape(points.shape[:2]).to(work)


def density_l1_regularizer(planes: torch.Tensor, decoder, *, n_points: int = 1000,
                           p_dist: float = 0.004, plane_axes: str,
                           box_size: float = 1.0,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """EG3D's density regulariser (``reg_type='l1'``): ``n_points`` uniform points in
    [-1, 1]^3 per batch item and copies perturbed by N(0, p_dist^2); returns the L1 between
    their raw densities (EG3D multiplies it by ``density_reg`` = 0.25); an empty batch (B = 0)
    gives 0, still connected to ``planes``.

    Args:
        planes: (B, 3, C, H, W); decoder: an :class:`OSGDecoder`, its weights or a callable.
        plane_axes: as in :class:`RenderConfig` (required; use the renderer's
            ``config.plane_axes``).
    """
    B, dev, dt = planes.shape[0], planes.device, _weights_dtype(planes)
    x = torch.rand(B, n_points, 3, device=dev, dtype=dt, **generator_kwargs(generator)) * 2 - 1
    y = x + torch.randn(x.shape, device=dev, dtype=dt, **generator_kwargs(generator)) * p_dist
    sigma = query_density(planes, decoder, torch.cat([x, y], 1), plane_axes=plane_axes,
                          box_size=box_size)
    return l1_or_zero(sigma[:, :n_points], sigma[:, n_points:])


def density_monotonic_regularizer(planes: torch.Tensor, decoder, *, n_points: int = 2000,
                                  box_size: float = 1.0, detach: bool = True,
                                  scale: float = 10.0, plane_axes: str,
                                  generator: torch.Generator | None = None) -> torch.Tensor:
    """EG3D's ``monotonic-detach`` / ``monotonic-fixed`` term (used by OTAvatar): density should
    not decrease towards -z. ``n_points`` uniform points in [-1, 1]^3 and copies shifted by
    ``-box_size / 256`` in z; returns ``relu(sigma_front - sigma_behind).mean() * scale`` with
    ``sigma_front`` detached when ``detach``. (EG3D adds an L1 term with p_dist = box_size / 256
    next to it: :func:`density_l1_regularizer`.) ``plane_axes`` as in :class:`RenderConfig`
    (required; use the renderer's ``config.plane_axes``). ``planes``: (B, 3, C, H, W). An empty
    batch (B = 0) gives 0, still connected to ``planes``.
    """
    B, dev, dt = planes.shape[0], planes.device, _weights_dtype(planes)
    x = torch.rand(B, n_points, 3, device=dev, dtype=dt, **generator_kwargs(generator)) * 2 - 1
    y = x + torch.tensor([0.0, 0.0, -1.0], device=dev, dtype=dt) * (1 / 256) * box_size
    sigma = query_density(planes, decoder, torch.cat([x, y], 1), plane_axes=plane_axes,
                          box_size=box_size)
    front, behind = sigma[:, :n_points], sigma[:, n_points:]
    if detach:
        front = front.detach()
    return mean_or_zero(torch.relu(front - behind)) * scale
