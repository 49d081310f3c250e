"""Registration of the tri-plane sampling ops: C++ (fake kernels + autograd) and Triton."""
from __future__ import annotations

import torch

from pyface._ops import define_once, fused_backward, triton_interpret

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _out_shape(planes, points, reduce):
    B, _, C = planes.shape[:3]
    N = points.shape[1]
    return (B, 3, N, C) if reduce == "none" else (B, N, C)


def _setup_context(ctx, inputs, output):
    planes, points, plane_axes, box_size, reduce, align_corners = inputs
    ctx.save_for_backward(planes, points)
    ctx.opts = (plane_axes, box_size, reduce, align_corners)


def _backward_cpp(ctx, grad):
    planes, points = ctx.saved_tensors
    need_planes, need_points = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    g_planes, g_points = torch.ops.pyface.triplane_sample_bwd(
        grad, planes, points, *ctx.opts, need_planes, need_points)
    return (g_planes if need_planes else None, g_points if need_points else None,
            None, None, None, None)


def register_cpp() -> None:
    """Fake kernels and autograd for torch.ops.pyface.triplane_sample{,_bwd}."""

    from pyface.ops._checks import check_plane_size

    @torch.library.register_fake("pyface::triplane_sample")
    def _fwd_fake(planes, points, plane_axes, box_size, reduce, align_corners):
        check_plane_size(planes)               # as the C++ kernels' argument checks
        return planes.new_empty(_out_shape(planes, points, reduce))

    @torch.library.register_fake("pyface::triplane_sample_bwd")
    def _bwd_fake(grad_out, planes, points, plane_axes, box_size, reduce, align_corners,
                  need_planes_grad, need_points_grad):
        check_plane_size(planes)
        if not need_planes_grad:
            g_planes = planes.new_empty((0,))
        elif planes.device.type == "cuda":  # the CUDA kernel keeps a dense layout (channels-last)
            g_planes = torch.empty_like(planes)
        else:
            g_planes = planes.new_empty(planes.shape)
        g_points = points.new_empty(points.shape if need_points_grad else (0,))
        return g_planes, g_points

    torch.library.register_autograd("pyface::triplane_sample",
                                    fused_backward("triplane_sample", atomics=("cuda",))(
                                        _backward_cpp),
                                    setup_context=_setup_context)


@define_once
def triton_op():
    """The Triton op ``torch.ops.pyface.triplane_sample_triton`` (defined on first use)."""
    from torch.library import triton_op as _triton_op
    from torch.library import wrap_triton

    from pyface.kernels import triplane as tk
    from pyface.ops._checks import check_plane_size

    @_triton_op("pyface::triplane_sample_triton", mutates_args={})
    def triplane_sample_triton(planes: torch.Tensor, points: torch.Tensor, plane_axes: str,
                               box_size: float, reduce: str, align_corners: bool) -> torch.Tensor:
        check_plane_size(planes)
        pts = points.to(torch.float32).contiguous()
        return tk.forward(planes, pts, plane_axes, box_size, reduce, align_corners,
                          wrap=wrap_triton, interpret=triton_interpret())

    @_triton_op("pyface::triplane_sample_triton_bwd", mutates_args={})
    def triplane_sample_triton_bwd(grad_out: torch.Tensor, planes: torch.Tensor,
                                   points: torch.Tensor, plane_axes: str, box_size: float,
                                   reduce: str, align_corners: bool, need_planes_grad: bool,
                                   need_points_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        check_plane_size(planes)
        pts = points.to(torch.float32).contiguous()
        go = grad_out.contiguous()
        g_planes, g_points = tk.backward(go, planes, pts, plane_axes, box_size, reduce,
                                         align_corners, need_planes_grad, need_points_grad,
                                         wrap=wrap_triton, interpret=triton_interpret())
        return g_planes.to(planes.dtype), g_points.to(points.dtype)

    def _backward(ctx, grad):
        planes, points = ctx.saved_tensors
        need_planes, need_points = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_planes, g_points = triplane_sample_triton_bwd(grad, planes, points, *ctx.opts,
                                                        need_planes, need_points)
        return (g_planes if need_planes else None, g_points if need_points else None,
                None, None, None, None)

    triplane_sample_triton.register_autograd(
        fused_backward("triplane_sample", atomics=("triton",), triton=True)(_backward),
        setup_context=_setup_context)
    return triplane_sample_triton
