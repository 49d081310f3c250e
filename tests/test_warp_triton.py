"""Triton 3D-flow warping kernels vs the pure-PyTorch reference, forward and backward: under the
Triton interpreter (TRITON_INTERPRET=1, tiny volumes) without a GPU; torch.compile through the
triton_op on a GPU."""
import pytest
import torch

import pyface.ops as ops
from pyface.ops import reference as ref

from test_warp import compare, make

interp = pytest.mark.triton_interpret

# float32 kernels with float32 accumulation vs a float32 reference: keypoint gradients sum over
# every voxel, so they get a looser bound than the element-wise table entry.
SCALE = 10


@interp
@pytest.mark.parametrize("align_corners", [False, True])
def test_warp_volume(align_corners):
    vol, *_ = make(dtype=torch.float32, C=5)
    grid = (torch.rand(2, 2, 3, 4, 3) * 3 - 1.5)
    grid[0, 0, 0, 0] = torch.tensor([50.0, -1e5, 0.0])
    grid.requires_grad_()
    compare(lambda v, g: ops.warp_volume(v, g, align_corners=align_corners, backend="triton"),
            lambda v, g: ref.warp_volume_reference(v, g, align_corners=align_corners),
            [vol, grid], scale=SCALE)


@interp
@pytest.mark.parametrize("K,jac", [(1, False), (15, True)])
def test_keypoint_flow(K, jac):
    _, kps, kpd, masks, j = make(dtype=torch.float32, K=K, jac=jac, out=(2, 3, 5))
    inputs = [kps, kpd, masks] + ([j] if jac else [])

    def run(fn, **kw):
        return lambda *x: fn(*x[:3], jacobian=x[3] if jac else None, **kw)
    compare(run(ops.keypoint_flow, backend="triton"), run(ref.keypoint_flow_reference), inputs,
            scale=SCALE)


@interp
@pytest.mark.parametrize("K,jac,align_corners,grid_align_corners",
                         [(1, False, False, True), (15, True, True, False),
                          (21, False, False, False)])
def test_warp_by_keypoints(K, jac, align_corners, grid_align_corners):
    vol, kps, kpd, masks, j = make(dtype=torch.float32, K=K, jac=jac, C=5, out=(2, 3, 5))
    inputs = [vol, kps, kpd, masks] + ([j] if jac else [])

    def run(fn, **kw):
        return lambda *x: fn(*x[:4], jacobian=x[4] if jac else None, align_corners=align_corners,
                             grid_align_corners=grid_align_corners, **kw)
    compare(run(ops.warp_by_keypoints, backend="triton"), run(ref.warp_by_keypoints_reference),
            inputs, scale=SCALE)


@interp
@pytest.mark.parametrize("K,jac", [(1, False), (3, True)])
def test_motion_field_input(K, jac):
    vol, kps, kpd, _, j = make(dtype=torch.float32, K=K, jac=jac, C=2, D=2, H=3, W=4)
    inputs = [vol, kps, kpd] + ([j] if jac else [])

    def run(fn, **kw):
        return lambda *x: fn(*x[:3], jacobian=x[3] if jac else None, heatmap_variance=0.1, **kw)
    compare(run(ops.motion_field_input, backend="triton"),
            run(ref.motion_field_input_reference), inputs, scale=SCALE)


@interp
def test_non_contiguous_empty_and_half():
    vol, kps, kpd, masks, _ = make(dtype=torch.float32, K=2, C=4)
    vol_cl = vol.detach().permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)
    vol_cl.requires_grad_()
    compare(lambda *x: ops.warp_by_keypoints(*x, backend="triton"),
            lambda *x: ref.warp_by_keypoints_reference(*x), [vol_cl, kps, kpd, masks],
            scale=SCALE)
    vol_h = vol.detach().half().requires_grad_()
    compare(lambda *x: ops.warp_by_keypoints(*x, backend="triton"),
            lambda *x: ref.warp_by_keypoints_reference(*x), [vol_h, kps, kpd, masks],
            dtype=torch.float16)
    vol0, kps0, kpd0, masks0, _ = make(B=0, dtype=torch.float32, K=2)
    out = ops.warp_by_keypoints(vol0, kps0, kpd0, masks0, backend="triton")
    assert out.shape == (0, 3, 3, 4, 5)
    out.sum().backward()
    assert vol0.grad.shape == vol0.shape


# The Triton interpreter needs real tensors, so tracing a triton_op under fake tensors (what
# torch.compile does) only works with compiled kernels on a GPU.
@pytest.mark.gpu
def test_torch_compile_fullgraph_gpu():
    torch._dynamo.reset()
    vol, kps, kpd, masks, _ = make(dtype=torch.float32, K=2, C=2, out=(2, 2, 3))
    vol, kps, kpd, masks = (t.detach().cuda().requires_grad_() for t in (vol, kps, kpd, masks))

    def f(vol, kps, kpd, masks):
        return (ops.warp_by_keypoints(vol, kps, kpd, masks, backend="triton").square().sum()
                + ops.motion_field_input(vol, kps, kpd, backend="triton").sum())

    f(vol, kps, kpd, masks)  # defines the triton ops (outside any graph)
    compare(torch.compile(f, fullgraph=True, backend="aot_eager"), f, [vol, kps, kpd, masks],
            scale=SCALE)


@interp
def test_triton_ops_opcheck_schema_and_autograd_registration():
    # the triton_ops' schemas and registered autograd (the fake-tensor and compile checks need
    # compiled kernels: the interpreter reads real memory)
    from pyface._ops.triplane import triton_op
    from pyface._ops.warp import triton_ops

    utils = ("test_schema", "test_autograd_registration")
    planes = torch.randn(1, 3, 2, 3, 4, requires_grad=True)
    points = (torch.rand(1, 3, 3) - 0.5).requires_grad_()
    for reduce in ("mean", "none"):
        torch.library.opcheck(triton_op(), (planes, points, "eg3d", 1.0, reduce, False),
                              test_utils=utils)
    ops_ = triton_ops()
    vol = torch.randn(1, 2, 2, 3, 3, requires_grad=True)
    grid = (torch.rand(1, 2, 2, 2, 3) * 2 - 1).requires_grad_()
    kps, kpd = ((torch.rand(1, 2, 3) - 0.5).requires_grad_() for _ in range(2))
    masks = torch.rand(1, 3, 2, 2, 2, requires_grad=True)
    jac = (torch.eye(3) + 0.1 * torch.randn(1, 2, 3, 3)).requires_grad_()
    for name, args in (("warp_volume", (vol, grid, False)),
                       ("keypoint_flow", (kps, kpd, masks, jac, True)),
                       ("warp_by_keypoints", (vol, kps, kpd, masks, None, False, True)),
                       ("motion_field_input", (vol, kps, kpd, jac, 0.01, False, True))):
        torch.library.opcheck(ops_[name], args, test_utils=utils)
