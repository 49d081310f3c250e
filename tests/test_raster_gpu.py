"""CUDA backends of the rasterization ops vs the reference (skipped without a CUDA device;
a build without the CUDA kernels fails)."""
import pytest
import torch

import pyface.ops as ops
from pyface import _backend
from pyface.ops.reference import (points_to_triplane_reference, rasterize_mesh_reference,
                                  splat_points_reference)
from pyface.testing import assert_close, grads

pytestmark = pytest.mark.gpu


def _needs(op):
    # Without CUDA the `gpu` marker skips these tests (conftest.py); with CUDA, a build that
    # lacks the kernel is a failure, not a skip.
    if not _backend.has_compiled_kernel(op, "CUDA"):
        cfg = _backend.build_config() or {}
        pytest.fail(f"pyface._C has no CUDA kernel for {op}: pyface._C "
                    f"{_backend.extension_reason()}, built without CUDA because "
                    f"{cfg.get('cuda_reason', 'unknown')}", pytrace=False)


def random_scene(B, V, F, seed):
    g = torch.Generator().manual_seed(seed)
    verts = torch.rand(B, V, 3, generator=g) * 2.4 - 1.2
    verts[..., 2] = torch.rand(B, V, generator=g) * 2.5 + 0.5
    faces = torch.randint(0, V, (F, 3), generator=g)
    return verts, faces, torch.randn(B, V, 4, generator=g)


def test_rasterize_mesh_cuda():
    _needs("raster_mesh")
    for persp in (True, False):
        verts, faces, attrs = random_scene(B=2, V=200, F=300, seed=1)
        attrs.requires_grad_(True)
        dev = [verts.cuda(), faces.cuda(), attrs.detach().cuda().requires_grad_(True)]
        fn = lambda v, f, x: ops.rasterize_mesh(v, f, (37, 53), x,  # noqa: E731
                                                perspective_correct=persp, backend="cuda")
        ref_fn = lambda v, f, x: rasterize_mesh_reference(v, f, (37, 53), x,  # noqa: E731
                                                          perspective_correct=persp)
        (attr, mask, depth, fi, bary), (_, _, g), cot = grads(fn, dev)
        (rattr, rmask, rdepth, rfi, rbary), (_, _, g_ref), _ = grads(
            ref_fn, [verts, faces, attrs], [c.cpu() for c in cot])
        # the GPU z-test compares float32 depth keys: only near-tied depths may choose differently
        same = fi.cpu() == rfi
        assert same.float().mean() > 0.999
        assert_close(bary.cpu()[same], rbary[same])
        assert_close(depth.cpu()[:, 0][same & (rfi >= 0)], rdepth[:, 0][same & (rfi >= 0)])
        sel = same[:, None].expand_as(rattr)
        assert_close(attr.detach().cpu()[sel], rattr.detach()[sel], scale=10)
        if same.all():
            assert_close(g.cpu(), g_ref, scale=10)


def test_splat_points_cuda():
    _needs("splat_points_index")
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(2, 500, 3, generator=g) * 2.2 - 1.1
    feats = torch.randn(2, 500, 8, generator=g)
    a = ops.splat_points(pts.cuda(), feats.cuda(), (33, 47), radius=1.5, backend="cuda")
    b = splat_points_reference(pts, feats, (33, 47), radius=1.5)
    # float32 input: the packed float32 depth keys order exactly as the float64 reference
    torch.testing.assert_close(a[2].cpu(), b[2], rtol=0, atol=0)
    torch.testing.assert_close(a[0].cpu(), b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1].cpu(), b[1], rtol=0, atol=0)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("plane_axes", ["xy_xz_zy", "eg3d"])
def test_points_to_triplane_cuda(align_corners, plane_axes):
    _needs("points_to_triplane_index")
    g = torch.Generator().manual_seed(0)
    pts = (torch.rand(2, 2000, 3, generator=g) - 0.5) * 1.4
    feats = torch.randn(2, 2000, 4, generator=g)
    valid = torch.rand(2, 2000, generator=g) > 0.2
    for md in (None, 0.05):
        a = ops.points_to_triplane(pts.cuda(), feats.cuda(), (40, 56), plane_axes=plane_axes,
                                   align_corners=align_corners, valid=valid.cuda(),
                                   max_distance=md, backend="cuda")
        b = points_to_triplane_reference(pts, feats, (40, 56), plane_axes=plane_axes,
                                         align_corners=align_corners, valid=valid,
                                         max_distance=md)
        # same float64 distances, ties -> lowest index: identical choices
        torch.testing.assert_close(a[1].cpu(), b[1], rtol=0, atol=0)
        torch.testing.assert_close(a[0].cpu(), b[0], rtol=0, atol=0)
