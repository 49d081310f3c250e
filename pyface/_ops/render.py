"""Registration of the volume-rendering ops: C++ (fake kernels + autograd) and the Triton renderer."""
from __future__ import annotations

import functools

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
                            depth_range, density_bias, white_back, need_features_grad, need_densities_grad):
        g_f = features.new_empty(features.shape if need_features_grad else (0,))
        g_s = densities.new_empty(densities.shape if need_densities_grad else (0,))
        return g_f, g_s

    @torch.library.register_fake("pyface::sample_importance")
    def _importance_fake(depths, weights, u):
        B, R, _ = depths.shape
        return depths.new_empty((B, R, u.shape[2]))

    torch.library.register_autograd("pyface::mip_composite", _composite_backward,
                                    setup_context=_composite_setup_context)


@functools.lru_cache(maxsize=None)
def triton_renderer():
    """The fused Triton renderer as an autograd function (defined on first use)."""
    from pyface.kernels import render as rk

    class FusedRender(torch.autograd.Function):
        @staticmethod
        def forward(ctx, planes, w1, b1, w2, b2, depths_c, u, opts):
            feats, depth, wsum, depths = rk.forward(planes, w1, b1, w2, b2, depths_c, u, opts,
                                                    interpret=triton_interpret())
            ctx.save_for_backward(planes, w1, b1, w2, b2, depths, depths_c)
            ctx.opts = opts
            return feats, depth, wsum

        @staticmethod
        def backward(ctx, g_feats, g_depth, g_wsum):
            planes, w1, b1, w2, b2, depths, depths_c = ctx.saved_tensors
            grads = rk.backward(g_feats, g_depth, g_wsum, planes, w1, b1, w2, b2, depths,
                                depths_c, ctx.opts, needs=ctx.needs_input_grad[:5],
                                interpret=triton_interpret())
            return (*grads, None, None, None)

    return FusedRender
