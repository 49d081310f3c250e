"""Registration of the 3D-flow warping ops: C++ (fake kernels + autograd) and Triton."""
from __future__ import annotations

import torch

from pyface._ops import define_once, fused_backward, triton_interpret


def _none(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def _grad_like(t: torch.Tensor, need: bool) -> torch.Tensor:
    return t.new_empty(t.shape) if need else _none(t)


def _jac_grad_like(jacobian, other: torch.Tensor, need: bool) -> torch.Tensor:
    if jacobian is None:
        return _none(other)
    return _grad_like(jacobian, need)


# --------------------------------------------------------------------------------------------
# autograd (shared by the C++ and Triton ops: `bwd` is the matching backward op)
# --------------------------------------------------------------------------------------------

def _warp_volume_setup(ctx, inputs, output):
    volume, grid, align_corners = inputs
    ctx.save_for_backward(volume, grid)
    ctx.align_corners = align_corners


def _warp_volume_backward(bwd):
    def backward(ctx, grad):
        volume, grid = ctx.saved_tensors
        nv, ng = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gv, gg = bwd(grad, volume, grid, ctx.align_corners, nv, ng)
        return gv if nv else None, gg if ng else None, None
    return backward


def _keypoint_flow_setup(ctx, inputs, output):
    kp_source, kp_driving, masks, jacobian, grid_align_corners = inputs
    ctx.save_for_backward(kp_source, kp_driving, masks, jacobian)
    ctx.grid_align_corners = grid_align_corners


def _keypoint_flow_backward(bwd):
    def backward(ctx, grad):
        kps, kpd, masks, jac = ctx.saved_tensors
        n = ctx.needs_input_grad
        need_kp, need_m, need_j = n[0] or n[1], n[2], n[3] and jac is not None
        g_kps, g_kpd, g_m, g_j = bwd(grad, kps, kpd, masks, jac, ctx.grid_align_corners,
                                     need_kp, need_m, need_j)
        return (g_kps if n[0] else None, g_kpd if n[1] else None, g_m if need_m else None,
                g_j if need_j else None, None)
    return backward


def _warp_by_keypoints_setup(ctx, inputs, output):
    volume, kp_source, kp_driving, masks, jacobian, align_corners, grid_align_corners = inputs
    ctx.save_for_backward(volume, kp_source, kp_driving, masks, jacobian)
    ctx.opts = (align_corners, grid_align_corners)


def _warp_by_keypoints_backward(bwd):
    def backward(ctx, grad):
        volume, kps, kpd, masks, jac = ctx.saved_tensors
        n = ctx.needs_input_grad
        need_v, need_kp, need_m, need_j = n[0], n[1] or n[2], n[3], n[4] and jac is not None
        g_v, g_kps, g_kpd, g_m, g_j = bwd(grad, volume, kps, kpd, masks, jac, *ctx.opts,
                                          need_v, need_kp, need_m, need_j)
        return (g_v if need_v else None, g_kps if n[1] else None, g_kpd if n[2] else None,
                g_m if need_m else None, g_j if need_j else None, None, None)
    return backward


def _motion_field_input_setup(ctx, inputs, output):
    (volume, kp_source, kp_driving, jacobian, heatmap_variance, align_corners,
     grid_align_corners) = inputs
    ctx.save_for_backward(volume, kp_source, kp_driving, jacobian)
    ctx.opts = (heatmap_variance, align_corners, grid_align_corners)


def _motion_field_input_backward(bwd):
    def backward(ctx, grad):
        volume, kps, kpd, jac = ctx.saved_tensors
        n = ctx.needs_input_grad
        need_v, need_kp, need_j = n[0], n[1] or n[2], n[3] and jac is not None
        g_v, g_kps, g_kpd, g_j = bwd(grad, volume, kps, kpd, jac, *ctx.opts, need_v, need_kp,
                                     need_j)
        return (g_v if need_v else None, g_kps if n[1] else None, g_kpd if n[2] else None,
                g_j if need_j else None, None, None, None)
    return backward


# (backward factory, setup_context) of each op, for its C++ and its Triton registration
_AUTOGRAD = {
    "warp_volume": (_warp_volume_backward, _warp_volume_setup),
    "keypoint_flow": (_keypoint_flow_backward, _keypoint_flow_setup),
    "warp_by_keypoints": (_warp_by_keypoints_backward, _warp_by_keypoints_setup),
    "motion_field_input": (_motion_field_input_backward, _motion_field_input_setup),
}


# --------------------------------------------------------------------------------------------
# C++ ops
# --------------------------------------------------------------------------------------------

def register_cpp() -> None:
    """Fake kernels and autograd for torch.ops.pyface.{warp_volume, keypoint_flow,
    warp_by_keypoints, motion_field_input}{,_bwd}."""

    @torch.library.register_fake("pyface::warp_volume")
    def _wv_fake(volume, grid, align_corners):
        B, C = volume.shape[:2]
        return volume.new_empty((B, C, *grid.shape[1:4]))

    @torch.library.register_fake("pyface::warp_volume_bwd")
    def _wv_bwd_fake(grad_out, volume, grid, align_corners, need_volume_grad, need_grid_grad):
        return _grad_like(volume, need_volume_grad), _grad_like(grid, need_grid_grad)

    @torch.library.register_fake("pyface::keypoint_flow")
    def _kf_fake(kp_source, kp_driving, masks, jacobian, grid_align_corners):
        return masks.new_empty((masks.shape[0], *masks.shape[2:], 3))

    @torch.library.register_fake("pyface::keypoint_flow_bwd")
    def _kf_bwd_fake(grad_flow, kp_source, kp_driving, masks, jacobian, grid_align_corners,
                     need_kp_grad, need_masks_grad, need_jacobian_grad):
        return (_grad_like(kp_source, need_kp_grad), _grad_like(kp_driving, need_kp_grad),
                _grad_like(masks, need_masks_grad),
                _jac_grad_like(jacobian, masks, need_jacobian_grad))

    @torch.library.register_fake("pyface::warp_by_keypoints")
    def _wk_fake(volume, kp_source, kp_driving, masks, jacobian, align_corners,
                 grid_align_corners):
        B, C = volume.shape[:2]
        return volume.new_empty((B, C, *masks.shape[2:]))

    @torch.library.register_fake("pyface::warp_by_keypoints_bwd")
    def _wk_bwd_fake(grad_out, volume, kp_source, kp_driving, masks, jacobian, align_corners,
                     grid_align_corners, need_volume_grad, need_kp_grad, need_masks_grad,
                     need_jacobian_grad):
        return (_grad_like(volume, need_volume_grad), _grad_like(kp_source, need_kp_grad),
                _grad_like(kp_driving, need_kp_grad), _grad_like(masks, need_masks_grad),
                _jac_grad_like(jacobian, masks, need_jacobian_grad))

    @torch.library.register_fake("pyface::motion_field_input")
    def _mf_fake(volume, kp_source, kp_driving, jacobian, heatmap_variance, align_corners,
                 grid_align_corners):
        B, C = volume.shape[:2]
        K = kp_source.shape[1]
        return volume.new_empty((B, (K + 1) * (C + 1), *volume.shape[2:]))

    @torch.library.register_fake("pyface::motion_field_input_bwd")
    def _mf_bwd_fake(grad_out, volume, kp_source, kp_driving, jacobian, heatmap_variance,
                     align_corners, grid_align_corners, need_volume_grad, need_kp_grad,
                     need_jacobian_grad):
        return (_grad_like(volume, need_volume_grad), _grad_like(kp_source, need_kp_grad),
                _grad_like(kp_driving, need_kp_grad),
                _jac_grad_like(jacobian, volume, need_jacobian_grad))

    ops = torch.ops.pyface
    for name, (backward, setup) in _AUTOGRAD.items():
        torch.library.register_autograd(
            f"pyface::{name}",
            fused_backward(name, atomics=("cuda",))(backward(getattr(ops, f"{name}_bwd"))),
            setup_context=setup)


# --------------------------------------------------------------------------------------------
# Triton ops
# --------------------------------------------------------------------------------------------

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_ops() -> dict:
    """The Triton ops ``torch.ops.pyface.<op>_triton`` by op name, defined on first use.

    ``torch.compile`` traces through this lookup once the ops exist; the definition itself runs
    outside the graph (a first eager call, or a graph break without ``fullgraph``).
    """
    return _triton_ops()


@define_once
def _triton_ops() -> dict:
    from torch.library import triton_op as _triton_op
    from torch.library import wrap_triton

    from pyface.kernels import warp as wk

    def kw():
        return dict(wrap=wrap_triton, interpret=triton_interpret())

    @_triton_op("pyface::warp_volume_triton", mutates_args={})
    def warp_volume_triton(volume: torch.Tensor, grid: torch.Tensor,
                           align_corners: bool) -> torch.Tensor:
        return wk.warp_volume_fwd(volume, grid, align_corners, **kw())

    @_triton_op("pyface::warp_volume_triton_bwd", mutates_args={})
    def warp_volume_triton_bwd(grad_out: torch.Tensor, volume: torch.Tensor, grid: torch.Tensor,
                               align_corners: bool, need_volume_grad: bool,
                               need_grid_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return wk.warp_volume_bwd(grad_out, volume, grid, align_corners, need_volume_grad,
                                  need_grid_grad, **kw())

    @_triton_op("pyface::keypoint_flow_triton", mutates_args={})
    def keypoint_flow_triton(kp_source: torch.Tensor, kp_driving: torch.Tensor,
                             masks: torch.Tensor, jacobian: torch.Tensor | None,
                             grid_align_corners: bool) -> torch.Tensor:
        return wk.keypoint_flow_fwd(kp_source, kp_driving, masks, jacobian, grid_align_corners,
                                    **kw())

    @_triton_op("pyface::keypoint_flow_triton_bwd", mutates_args={})
    def keypoint_flow_triton_bwd(grad_flow: torch.Tensor, kp_source: torch.Tensor,
                                 kp_driving: torch.Tensor, masks: torch.Tensor,
                                 jacobian: torch.Tensor | None, grid_align_corners: bool,
                                 need_kp_grad: bool, need_masks_grad: bool,
                                 need_jacobian_grad: bool
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                            torch.Tensor]:
        return wk.keypoint_flow_bwd(grad_flow, kp_source, kp_driving, masks, jacobian,
                                    grid_align_corners, need_kp_grad, need_masks_grad,
                                    need_jacobian_grad, **kw())

    @_triton_op("pyface::warp_by_keypoints_triton", mutates_args={})
    def warp_by_keypoints_triton(volume: torch.Tensor, kp_source: torch.Tensor,
                                 kp_driving: torch.Tensor, masks: torch.Tensor,
                                 jacobian: torch.Tensor | None, align_corners: bool,
                                 grid_align_corners: bool) -> torch.Tensor:
        return wk.warp_by_keypoints_fwd(volume, kp_source, kp_driving, masks, jacobian,
                                        align_corners, grid_align_corners, **kw())

    @_triton_op("pyface::warp_by_keypoints_triton_bwd", mutates_args={})
    def warp_by_keypoints_triton_bwd(grad_out: torch.Tensor, volume: torch.Tensor,
                                     kp_source: torch.Tensor, kp_driving: torch.Tensor,
                                     masks: torch.Tensor, jacobian: torch.Tensor | None,
                                     align_corners: bool, grid_align_corners: bool,
                                     need_volume_grad: bool, need_kp_grad: bool,
                                     need_masks_grad: bool, need_jacobian_grad: bool
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor, torch.Tensor]:
        return wk.warp_by_keypoints_bwd(grad_out, volume, kp_source, kp_driving, masks,
                                        jacobian, align_corners, grid_align_corners,
                                        need_volume_grad, need_kp_grad, need_masks_grad,
                                        need_jacobian_grad, **kw())

    @_triton_op("pyface::motion_field_input_triton", mutates_args={})
    def motion_field_input_triton(volume: torch.Tensor, kp_source: torch.Tensor,
                                  kp_driving: torch.Tensor, jacobian: torch.Tensor | None,
                                  heatmap_variance: float, align_corners: bool,
                                  grid_align_corners: bool) -> torch.Tensor:
        return wk.motion_field_input_fwd(volume, kp_source, kp_driving, jacobian,
                                         heatmap_variance, align_corners, grid_align_corners,
                                         **kw())

    @_triton_op("pyface::motion_field_input_triton_bwd", mutates_args={})
    def motion_field_input_triton_bwd(grad_out: torch.Tensor, volume: torch.Tensor,
                                      kp_source: torch.Tensor, kp_driving: torch.Tensor,
                                      jacobian: torch.Tensor | None, heatmap_variance: float,
                                      align_corners: bool, grid_align_corners: bool,
                                      need_volume_grad: bool, need_kp_grad: bool,
                                      need_jacobian_grad: bool
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor]:
        return wk.motion_field_input_bwd(grad_out, volume, kp_source, kp_driving, jacobian,
                                         heatmap_variance, align_corners, grid_align_corners,
                                         need_volume_grad, need_kp_grad, need_jacobian_grad,
                                         **kw())

    ops = {"warp_volume": (warp_volume_triton, warp_volume_triton_bwd),
           "keypoint_flow": (keypoint_flow_triton, keypoint_flow_triton_bwd),
           "warp_by_keypoints": (warp_by_keypoints_triton, warp_by_keypoints_triton_bwd),
           "motion_field_input": (motion_field_input_triton, motion_field_input_triton_bwd)}
    for name, (op, bwd) in ops.items():
        backward, setup = _AUTOGRAD[name]
        op.register_autograd(fused_backward(name, atomics=("triton",), triton=True)(backward(bwd)),
                             setup_context=setup)
    return {name: op for name, (op, _) in ops.items()}
