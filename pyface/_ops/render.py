"""Registration of the volume-rendering ops: C++ (fake kernels, autograd, autocast) and the
fused Triton renderer (a ``triton_op`` with registered autograd)."""
from __future__ import annotations

import torch

from pyface._ops import define_once, fused_backward, register_autocast_float32, triton_interpret


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

    for op in ("pyface::mip_composite", "pyface::sample_importance"):
        register_autocast_float32(op)
    torch.library.register_autograd("pyface::mip_composite",
                                    fused_backward("mip_composite")(_composite_backward),
                                    setup_context=_composite_setup_context)


@define_once
def triton_op():
    """The fused Triton renderer as ``torch.ops.pyface.render_triplane_triton`` (a
    ``torch.library.triton_op`` with registered autograd, so ``torch.compile`` traces the kernel
    launches; defined on first use)."""
    from torch.library import triton_op as _triton_op
    from torch.library import wrap_triton

    from pyface.kernels import render as rk
    from pyface.ops._checks import check_plane_size

    def _opts(plane_axes, box_size, density_bias, white_back):
        return dict(plane_axes=plane_axes, box_size=box_size, density_bias=density_bias,
                    white_back=white_back)

    @_triton_op("pyface::render_triplane_triton", mutates_args={})
    def render_triplane_triton(planes: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                               w2: torch.Tensor, b2: torch.Tensor, ray_origins: torch.Tensor,
                               ray_dirs: torch.Tensor, coarse_depths: torch.Tensor,
                               importance_u: torch.Tensor | None, plane_axes: str,
                               box_size: float, density_bias: float, white_back: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
        """float32 inputs -> features (B, R, C_out), depth (B, R, 1), weights_sum (B, R, 1),
        merged sample depths (B, R, S) (saved for the backward)."""
        check_plane_size(planes)                   # triplane_sample's limit
        return rk.forward(planes, w1, b1, w2, b2, ray_origins, ray_dirs, coarse_depths,
                          importance_u, **_opts(plane_axes, box_size, density_bias, white_back),
                          wrap=wrap_triton, interpret=triton_interpret())

    @_triton_op("pyface::render_triplane_triton_bwd", mutates_args={})
    def render_triplane_triton_bwd(
            grad_features: torch.Tensor, grad_depth: torch.Tensor, grad_weights_sum: torch.Tensor,
            planes: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
            b2: torch.Tensor, ray_origins: torch.Tensor, ray_dirs: torch.Tensor,
            merged_depths: torch.Tensor, coarse_depths: torch.Tensor, plane_axes: str,
            box_size: float, density_bias: float, white_back: bool, need_planes_grad: bool,
            need_decoder_grad: bool, need_rays_grad: bool) -> list[torch.Tensor]:
        """Gradients (planes, w1, b1, w2, b2, ray_origins, ray_dirs); empty where not asked."""
        check_plane_size(planes)
        g = rk.backward(grad_features, grad_depth, grad_weights_sum, planes, w1, b1, w2, b2,
                        ray_origins, ray_dirs, merged_depths, coarse_depths,
                        **_opts(plane_axes, box_size, density_bias, white_back),
                        need_planes=need_planes_grad, need_decoder=need_decoder_grad,
                        need_rays=need_rays_grad, wrap=wrap_triton, interpret=triton_interpret())
        return [x if x is not None else planes.new_empty((0,)) for x in g]

    def _setup(ctx, inputs, output):
        planes, w1, b1, w2, b2, o, d, tc, u, *opts = inputs
        ctx.save_for_backward(planes, w1, b1, w2, b2, o, d, output[3], tc)
        ctx.opts = opts
        ctx.mark_non_differentiable(output[3])

    def _backward(ctx, g_feats, g_depth, g_wsum, _g_merged):
        planes, w1, b1, w2, b2, o, d, merged, tc = ctx.saved_tensors
        need = ctx.needs_input_grad
        B, R = merged.shape[:2]
        shapes = ((B, R, w2.shape[0] - 1), (B, R, 1), (B, R, 1))
        grads = [g if g is not None else merged.new_zeros(shape)
                 for g, shape in zip((g_feats, g_depth, g_wsum), shapes)]
        g = render_triplane_triton_bwd(*grads, planes, w1, b1, w2, b2, o, d, merged, tc,
                                       *ctx.opts, need[0], any(need[1:5]), need[5] or need[6])
        return (*(g[i] if need[i] else None for i in range(7)), None, None, None, None, None,
                None)

    render_triplane_triton.register_autograd(
        fused_backward("render_triplane", atomics=("triton",), triton=True)(_backward),
        setup_context=_setup)
    register_autocast_float32("pyface::render_triplane_triton")
    return render_triplane_triton
