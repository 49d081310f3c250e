"""Registration of the rasterization ops: fake kernels and autograd for the C++/CUDA ops."""
from __future__ import annotations

import torch

from pyface._ops import fused_backward


def _gather_setup(ctx, inputs, output):
    features, index, background = inputs
    ctx.save_for_backward(index)
    ctx.num_points = features.shape[1]


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    g = None
    if ctx.needs_input_grad[0]:
        g = torch.ops.pyface.gather_features_bwd(grad, index, ctx.num_points)
    return g, None, None


def _interp_setup(ctx, inputs, output):
    attributes, faces, face_index, bary = inputs
    ctx.save_for_backward(faces, face_index, bary)
    ctx.num_verts = attributes.shape[1]


def _interp_backward(ctx, grad):
    faces, face_index, bary = ctx.saved_tensors
    g = None
    if ctx.needs_input_grad[0]:
        g = torch.ops.pyface.mesh_interpolate_bwd(grad, faces, face_index, bary, ctx.num_verts)
    return g, None, None, None


def register_cpp() -> None:
    """Fake kernels and autograd for torch.ops.pyface.{raster_mesh, mesh_interpolate,
    splat_points_index, points_to_triplane_index, gather_features}."""

    @torch.library.register_fake("pyface::raster_mesh")
    def _raster_fake(verts, faces, height, width, cull, perspective_correct):
        B = verts.shape[0]
        return (verts.new_empty((B, height, width), dtype=torch.int64),
                verts.new_empty((B, height, width, 3)),
                verts.new_empty((B, 1, height, width)))

    @torch.library.register_fake("pyface::mesh_interpolate")
    def _interp_fake(attributes, faces, face_index, bary):
        B, H, W = face_index.shape
        return attributes.new_empty((B, attributes.shape[2], H, W))

    @torch.library.register_fake("pyface::mesh_interpolate_bwd")
    def _interp_bwd_fake(grad, faces, face_index, bary, num_verts):
        return grad.new_empty((grad.shape[0], num_verts, grad.shape[1]))

    @torch.library.register_fake("pyface::splat_points_index")
    def _splat_fake(points, height, width, radius):
        B = points.shape[0]
        return (points.new_empty((B, height, width), dtype=torch.int64),
                points.new_empty((B, 1, height, width)))

    @torch.library.register_fake("pyface::points_to_triplane_index")
    def _p2t_fake(points, valid, height, width, plane_axes, box_size, align_corners,
                  max_distance):
        return points.new_empty((points.shape[0], 3, height, width), dtype=torch.int64)

    @torch.library.register_fake("pyface::gather_features")
    def _gather_fake(features, index, background):
        B, G, P = index.shape
        return features.new_empty((B, G, features.shape[2], P))

    @torch.library.register_fake("pyface::gather_features_bwd")
    def _gather_bwd_fake(grad, index, num_points):
        return grad.new_empty((grad.shape[0], num_points, grad.shape[2]))

    torch.library.register_autograd("pyface::gather_features",
                                    fused_backward("gather_features (splat_points, "
                                                   "points_to_triplane)", atomics=("cuda",))(
                                        _gather_backward),
                                    setup_context=_gather_setup)
    torch.library.register_autograd("pyface::mesh_interpolate",
                                    fused_backward("rasterize_mesh", atomics=("cuda",))(
                                        _interp_backward),
                                    setup_context=_interp_setup)
