"""Registration of the volume-rendering ops: C++ (fake kernels + autograd) and the fused Triton
renderer (an autograd Function)."""
from __future__ import annotations

import torch

from pyface._backend import triton_interpret


def _composite_setup_context(ctx, inputs, output):
    features, densities, depths, depth_range, density_bias, white_back = inputs
    ctx.save_for_backward(features, densities, depths, depth_range)
    ctx.opts = (density_bias, white_back)


def _composite_backward(ctx, g_out, g_depth, g_weights):
    features, densities, depths, depth_range = ctx.saved_tensors
    need_f, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_f or need_s):
        return None, None, None, None, None, None
    g_f, g_s = torch.ops.pyface.mip_composite_bwd(g_out, g_depth, g_weights, features, densities,
                                                  depths, depth_range, *ctx.opts, need_f, need_s)
    return (g_f if need_f else None, g_s if need_s else None, None, None, None, None)


def register_cpp() -> None:
    """Fake kernels and autograd for torch.ops.pyface.{mip_composite{,_bwd},sample_importance}."""

    @torch.library.register_fake("pyface::mip_composite")
    def _composite_fake(features, densities, depths, depth_range, density_bias, white_back):
        B, R, S, C = features.shape
        return (features.new_empty((B, R, C)), features.new_empty((B, R, 1)),
                features.new_empty((B, R, S - 1)))

    @torch.library.register_fake("pyface::mip_composite_bwd")
    def _composite_bwd_fake(grad_features, grad_depth, grad_weights, features, densities, depths,
                            depth_range, density_bias, white_back, need_features_grad,
                            need_densities_grad):
        g_f = features.new_empty(features.shape if need_features_grad else (0,))
        g_s = densities.new_empty(densities.shape if need_densities_grad else (0,))
        return g_f, g_s

    @torch.library.register_fake("pyface::sample_importance")
    def _importance_fake(depths, weights, u):
        B, R, _ = depths.shape
        return depths.new_empty((B, R, u.shape[2]))

    torch.library.register_autograd("pyface::mip_composite", _composite_backward,
                                    setup_context=_composite_setup_context)


class _FusedRender(torch.autograd.Function):
    """The fused Triton renderer; the backward recomputes every per-sample value."""

    @staticmethod
    def forward(ctx, planes, w1, b1, w2, b2, o, d, tc, u, opts):
        from pyface.kernels import render as rk

        feats, depth, wsum, merged = rk.forward(planes, w1, b1, w2, b2, o, d, tc, u, **opts,
                                                interpret=triton_interpret())
        ctx.save_for_backward(planes, w1, b1, w2, b2, o, d, merged, tc)
        ctx.opts = opts
        return feats, depth, wsum

    @staticmethod
    def backward(ctx, g_feats, g_depth, g_wsum):
        from pyface.kernels import render as rk

        planes, w1, b1, w2, b2, o, d, merged, tc = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = rk.backward(g_feats, g_depth, g_wsum, planes, w1, b1, w2, b2, o, d, merged, tc,
                        **ctx.opts, need_planes=need[0], need_decoder=any(need[1:5]),
                        need_rays=need[5] or need[6], interpret=triton_interpret())
        return (g[0], *(g[i] if need[i] else None for i in range(1, 7)), None, None, None)


def render_triton(planes, ray_origins, ray_dirs, decoder, noise, u, *, near, far, n_coarse,
                  n_fine, plane_axes, box_size, density_bias, white_back):
    """``render_triplane`` through the fused Triton kernels (float32, OSG decoder weights)."""
    from pyface.ops.reference.render import sample_stratified_reference

    B, R, _ = ray_origins.shape
    dev, dt = ray_origins.device, ray_origins.dtype
    if noise is None:
        noise = torch.rand(B, R, n_coarse, device=dev, dtype=dt)
    if n_fine > 0 and u is None:
        u = torch.rand(B, R, n_fine, device=dev, dtype=dt)
    tc = sample_stratified_reference(ray_origins, near, far, n_coarse, noise)
    w1, b1, w2, b2 = (w.to(torch.float32) for w in decoder)
    opts = dict(plane_axes=plane_axes, box_size=box_size, density_bias=density_bias,
                white_back=white_back)
    return _FusedRender.apply(planes, w1, b1, w2, b2, ray_origins.float(), ray_dirs.float(),
                              tc.detach().float(),
                              u.float() if n_fine > 0 else None, opts)
