"""Reference ray marching and volume rendering: EG3D's renderer semantics, quirks included.

Mirrors ``eg3d/training/volumetric_rendering/`` (``RaySampler``, ``MipRayMarcher2``,
``ImportanceRenderer.sample_stratified / sample_importance / sample_pdf / unify_samples``) and
``training/triplane.py: OSGDecoder``, with two layout changes: depths and densities are
``(B, R, S)`` (EG3D: ``(B, R, S, 1)``), and the compositing op does not apply EG3D's final
``rgb * 2 - 1`` (the module does). Every random number is injectable; when it is not given it is
drawn from the current torch generator with the same shape and order as EG3D, so seeded runs
reproduce EG3D's samples.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from pyface.ops.reference.triplane import triplane_sample_reference

# EG3D's sample_pdf epsilon and sample_importance smoothing offset.
PDF_EPS = 1e-5
SMOOTH_OFFSET = 0.01
# EG3D's transmittance shift: cumprod(1 - alpha + 1e-10).
TRANSMITTANCE_EPS = 1e-10
# EG3D's OSG decoder output clamp (MipNeRF): sigmoid(x) * (1 + 2 * 0.001) - 0.001.
OSG_CLAMP = 0.001


def ray_bundle_reference(cameras: torch.Tensor, resolution: int):
    """EG3D's ``RaySampler`` on 25-dim camera labels.

    Args:
        cameras: (B, 25) flattened OpenCV cam2world 4x4 followed by the flattened 3x3 intrinsics
            normalised by the image size.
        resolution: rays per image side; R = resolution**2 rays in row-major pixel order.
    Returns:
        ray_origins (B, R, 3), ray_dirs (B, R, 3) (unit length), in the dtype of ``cameras``.
    """
    B = cameras.shape[0]
    dev, dt = cameras.device, cameras.dtype
    cam2world = cameras[:, :16].reshape(B, 4, 4)
    intr = cameras[:, 16:25].reshape(B, 3, 3)
    fx, fy = intr[:, 0, 0, None], intr[:, 1, 1, None]
    cx, cy, sk = intr[:, 0, 2, None], intr[:, 1, 2, None], intr[:, 0, 1, None]
    # EG3D builds the pixel grid in float32 (torch.arange(..., dtype=float32)).
    ar = torch.arange(resolution, dtype=torch.float32, device=dev)
    uv = torch.stack(torch.meshgrid(ar, ar, indexing="ij")) * (1.0 / resolution) \
        + (0.5 / resolution)
    uv = uv.flip(0).reshape(2, -1).transpose(1, 0).to(dt)
    x_cam = uv[None, :, 0].expand(B, -1)
    y_cam = uv[None, :, 1].expand(B, -1)
    z_cam = torch.ones_like(x_cam)
    x_lift = (x_cam - cx + cy * sk / fy - sk * y_cam / fy) / fx * z_cam
    y_lift = (y_cam - cy) / fy * z_cam
    cam_rel = torch.stack((x_lift, y_lift, z_cam, torch.ones_like(z_cam)), dim=-1)
    world = torch.bmm(cam2world, cam_rel.permute(0, 2, 1)).permute(0, 2, 1)[:, :, :3]
    origins = cam2world[:, :3, 3]
    dirs = F.normalize(world - origins[:, None, :], dim=2)
    return origins.unsqueeze(1).expand(-1, dirs.shape[1], -1).contiguous(), dirs


def sample_stratified_reference(ray_origins: torch.Tensor, near: float, far: float,
                                n_samples: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    """EG3D's ``sample_stratified`` (scalar ray_start/ray_end, no disparity sampling).

    ``depths[..., i] = linspace(near, far, n)[i] + noise[..., i] * (far - near) / (n - 1)``.

    Args:
        ray_origins: (B, R, 3); only its shape, device and dtype are used.
        noise: (B, R, S) uniform [0, 1) jitter; ``None`` gives the bin starts.
    Returns:
        (B, R, S) depths.
    """
    B, R, _ = ray_origins.shape
    depths = torch.linspace(near, far, n_samples, device=ray_origins.device,
                            dtype=ray_origins.dtype).reshape(1, 1, n_samples).repeat(B, R, 1)
    if noise is not None:
        depths = depths + noise.to(depths.dtype) * ((far - near) / (n_samples - 1))
    return depths


def mip_composite_reference(features: torch.Tensor, densities: torch.Tensor, depths: torch.Tensor,
                            *, density_bias: float = -1.0, white_back: bool = False,
                            depth_range: torch.Tensor | None = None):
    """EG3D's ``MipRayMarcher2.run_forward`` without the final ``* 2 - 1``.

    Args:
        features: (B, R, S, C) per-sample features (colors).
        densities: (B, R, S) raw densities.
        depths: (B, R, S) sample depths, increasing along each ray; treated as a constant (EG3D
            samples them without gradient).
    Returns:
        features_out (B, R, C), depth (B, R, 1), weights (B, R, S - 1).

    The depth is clamped to the min and max over the *whole* ``depths`` tensor, as EG3D does,
    or to ``depth_range`` (2,) = (min, max) when given (rays composited in chunks).
    """
    depths = depths.detach()
    B, R, S, C = features.shape
    if B * R == 0:
        z = features.sum(2)
        # (empty tensors, kept in the graph of densities as the compiled op's outputs are)
        return z, depths[..., :1] + densities[..., :1] * 0, densities[..., 1:] * 0
    deltas = depths[..., 1:] - depths[..., :-1]
    f_mid = (features[:, :, :-1] + features[:, :, 1:]) / 2
    s_mid = (densities[..., :-1] + densities[..., 1:]) / 2
    d_mid = (depths[..., :-1] + depths[..., 1:]) / 2
    sigma = F.softplus(s_mid + density_bias)
    alpha = 1 - torch.exp(-(sigma * deltas))
    shifted = torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha + TRANSMITTANCE_EPS], -1)
    weights = alpha * torch.cumprod(shifted, -1)[..., :-1]
    out = torch.sum(weights.unsqueeze(-1) * f_mid, -2)
    wsum = weights.sum(-1, keepdim=True)
    depth = torch.sum(weights * d_mid, -1, keepdim=True) / wsum
    depth = torch.nan_to_num(depth, float("inf"))
    if depth_range is None:
        depth = torch.clamp(depth, torch.min(depths), torch.max(depths))
    else:
        depth = torch.clamp(depth, depth_range[0].to(depth), depth_range[1].to(depth))
    if white_back:
        out = out + 1 - wsum
    return out, depth, weights


def sample_importance_reference(depths: torch.Tensor, weights: torch.Tensor, n_importance: int,
                                u: torch.Tensor | None = None) -> torch.Tensor:
    """EG3D's ``sample_importance`` + ``sample_pdf`` (no gradient).

    Args:
        depths: (B, R, S) coarse depths.
        weights: (B, R, S - 1) compositing weights of the coarse pass.
        u: (B, R, n_importance) uniforms in [0, 1); ``None`` draws ``torch.rand`` like EG3D.
    Returns:
        (B, R, n_importance) depths, detached.
    """
    with torch.no_grad():
        B, R, S = depths.shape
        n = B * R
        z = depths.reshape(n, S)
        w = weights.reshape(n, S - 1)
        w = F.max_pool1d(w.unsqueeze(1), 2, 1, padding=1)
        w = F.avg_pool1d(w, 2, 1).squeeze(1)
        w = w + SMOOTH_OFFSET
        bins = 0.5 * (z[:, :-1] + z[:, 1:])
        w = w[:, 1:-1]
        if u is None:
            u = torch.rand(n, n_importance, device=depths.device, dtype=depths.dtype)
        u = u.reshape(n, n_importance).to(depths.dtype).contiguous()
        samples = _sample_pdf(bins, w, u)
        return samples.reshape(B, R, n_importance).detach()


def _sample_pdf(bins: torch.Tensor, weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    n_rays, n_bins = weights.shape
    n_imp = u.shape[1]
    weights = weights + PDF_EPS
    pdf = weights / torch.sum(weights, -1, keepdim=True)
    cdf = torch.cumsum(pdf, -1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], -1)
    inds = torch.searchsorted(cdf, u, right=True)
    below = torch.clamp_min(inds - 1, 0)
    above = torch.clamp_max(inds, n_bins)
    inds_g = torch.stack([below, above], -1).view(n_rays, 2 * n_imp)
    cdf_g = torch.gather(cdf, 1, inds_g).view(n_rays, n_imp, 2)
    bins_g = torch.gather(bins, 1, inds_g).view(n_rays, n_imp, 2)
    denom = cdf_g[..., 1] - cdf_g[..., 0]
    denom = torch.where(denom < PDF_EPS, torch.ones_like(denom), denom)
    return bins_g[..., 0] + (u - cdf_g[..., 0]) / denom * (bins_g[..., 1] - bins_g[..., 0])


def osg_decode_reference(features: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                         w2: torch.Tensor, b2: torch.Tensor):
    """EG3D's OSG decoder on plane-averaged features with effective weights.

    Args:
        features: (..., C_in) plane-averaged features.
        w1: (hidden, C_in), b1: (hidden,), w2: (1 + C_out, hidden), b2: (1 + C_out,): the
            effective weights (EG3D's FullyConnectedLayer gains already applied).
    Returns:
        rgb (..., C_out) = sigmoid(x[..., 1:]) * 1.002 - 0.001, sigma (...) = x[..., 0] (raw).
    """
    shape = features.shape[:-1]
    x = features.reshape(-1, features.shape[-1])
    h = F.softplus(torch.addmm(b1.unsqueeze(0), x, w1.t()))
    x = torch.addmm(b2.unsqueeze(0), h, w2.t())
    rgb = torch.sigmoid(x[:, 1:]) * (1 + 2 * OSG_CLAMP) - OSG_CLAMP
    return rgb.reshape(*shape, rgb.shape[-1]), x[:, 0].reshape(shape)


Decoder = Sequence[torch.Tensor] | Callable


def run_decoder(decoder: Decoder, planes: torch.Tensor, points: torch.Tensor, *, plane_axes: str,
                box_size: float, sample: Callable | None = None):
    """Samples the planes at ``points`` (B, N, 3) and decodes: -> rgb (B, N, C_out), sigma (B, N).

    ``decoder`` is either the OSG weights ``(w1, b1, w2, b2)`` (applied to the plane mean) or a
    callable on the per-plane features (B, 3, N, C) returning ``{"rgb", "sigma"}`` or
    ``(rgb, sigma)`` with rgb (B, N, C_out) and sigma (B, N) or (B, N, 1).
    """
    sample = sample or triplane_sample_reference
    if isinstance(decoder, (tuple, list)):
        feats = sample(planes, points, plane_axes=plane_axes, box_size=box_size, reduce="mean")
        return osg_decode_reference(feats, *decoder)
    feats = sample(planes, points, plane_axes=plane_axes, box_size=box_size, reduce="none")
    return decoder_outputs(decoder(feats), points.shape[0], points.shape[1])


def decoder_outputs(out, B: int, N: int):
    """A callable decoder's output ``{"rgb", "sigma"}`` or ``(rgb, sigma)`` for N points per
    batch item -> rgb (B, N, C_out), sigma (B, N); a ValueError naming the decoder's contract
    for other shapes (instead of a reshape error deeper in the renderer)."""
    rgb, sigma = (out["rgb"], out["sigma"]) if isinstance(out, dict) else out
    if sigma.dim() == 3 and sigma.shape[-1] == 1:
        sigma = sigma.squeeze(-1)
    if rgb.dim() != 3 or tuple(rgb.shape[:2]) != (B, N) or tuple(sigma.shape) != (B, N):
        raise ValueError(f"decoder: expected rgb (B, N, C_out) = ({B}, {N}, C_out) and sigma "
                         f"(B, N, 1) or (B, N) = ({B}, {N}), got rgb {tuple(rgb.shape)} and "
                         f"sigma {tuple(sigma.shape)}")
    return rgb, sigma


def render_uniforms(B: int, R: int, n_coarse: int, n_fine: int, like: torch.Tensor,
                    stratified_noise: torch.Tensor | None = None,
                    importance_u: torch.Tensor | None = None, *,
                    generator: torch.Generator | None = None):
    """The random numbers of one EG3D render, drawn where not given: stratified noise
    (B, R, n_coarse), then the importance uniforms (B, R, n_fine) (``None`` when n_fine = 0),
    with ``torch.rand`` from ``generator`` (None: the current generator) on the device and in
    the dtype of ``like``. EG3D draws the same numbers in the same order (nothing else is drawn
    between them), so every backend renders EG3D's image for the same seed."""
    kw = dict(device=like.device, dtype=like.dtype)
    if generator is not None:       # torch.compile: rand(generator=None) of a dynamic shape fails
        kw["generator"] = generator
    if stratified_noise is None:
        stratified_noise = torch.rand(B, R, n_coarse, **kw)
    if n_fine > 0 and importance_u is None:
        importance_u = torch.rand(B, R, n_fine, **kw)
    return stratified_noise, importance_u


def render_triplane_reference(planes: torch.Tensor, ray_origins: torch.Tensor,
                              ray_dirs: torch.Tensor, decoder: Decoder, *, near: float, far: float,
                              n_coarse: int, n_fine: int, plane_axes: str,
                              box_size: float = 1.0, density_bias: float = -1.0,
                              white_back: bool = False,
                              stratified_noise: torch.Tensor | None = None,
                              importance_u: torch.Tensor | None = None):
    """EG3D's ``ImportanceRenderer.forward`` (fixed ray_start/ray_end), written as EG3D does.

    Args:
        planes: (B, 3, C, H, W); ray_origins, ray_dirs: (B, R, 3).
        stratified_noise: (B, R, n_coarse) or ``None`` (drawn with torch.rand).
        importance_u: (B, R, n_fine) or ``None`` (drawn with torch.rand after the coarse pass).
    Returns:
        features (B, R, C_out), depth (B, R, 1), weights_sum (B, R, 1).
    """
    B, R, _ = ray_origins.shape
    stratified_noise, importance_u = render_uniforms(B, R, n_coarse, n_fine, ray_origins,
                                                     stratified_noise, importance_u)
    depths_c = sample_stratified_reference(ray_origins, near, far, n_coarse, stratified_noise)

    def run(depths):
        S = depths.shape[-1]
        pts = (ray_origins.unsqueeze(-2) + depths.unsqueeze(-1) * ray_dirs.unsqueeze(-2))
        rgb, sigma = run_decoder(decoder, planes, pts.reshape(B, R * S, 3),
                                 plane_axes=plane_axes, box_size=box_size)
        return rgb.reshape(B, R, S, rgb.shape[-1]), sigma.reshape(B, R, S)

    colors_c, dens_c = run(depths_c)
    kw = dict(density_bias=density_bias, white_back=white_back)
    if n_fine > 0:
        _, _, weights = mip_composite_reference(colors_c, dens_c, depths_c, **kw)
        depths_f = sample_importance_reference(depths_c, weights, n_fine, importance_u)
        colors_f, dens_f = run(depths_f)
        depths = torch.cat([depths_c, depths_f], -1)
        colors = torch.cat([colors_c, colors_f], -2)
        dens = torch.cat([dens_c, dens_f], -1)
        _, idx = torch.sort(depths, dim=-1)
        depths = torch.gather(depths, -1, idx)
        colors = torch.gather(colors, -2, idx.unsqueeze(-1).expand(-1, -1, -1, colors.shape[-1]))
        dens = torch.gather(dens, -1, idx)
    else:
        depths, colors, dens = depths_c, colors_c, dens_c
    feats, depth, weights = mip_composite_reference(colors, dens, depths, **kw)
    return feats, depth, weights.sum(-1, keepdim=True)
