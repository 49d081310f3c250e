"""3D-flow warping ops: C++ CPU kernels vs the pure-PyTorch reference (forward and backward),
F.grid_sample, gradcheck, opcheck, torch.compile, odd/non-contiguous/empty inputs, errors."""
import pytest
import torch
import torch.nn.functional as F

import pyface.ops as ops
from pyface.ops import reference as ref
from pyface.ops.reference.warp import (combine_jacobians, keypoint_heatmaps_reference,
                                       make_coordinate_grid)
from pyface.testing import assert_close, grads

cpp = pytest.mark.cpp  # fails, never skips, when pyface._C is missing (conftest.py)


def _kp(B, K, dtype=torch.float64, scale=1.0, gen=None):
    return ((torch.rand(B, K, 3, generator=gen, dtype=dtype) * 2 - 1) * scale).requires_grad_()


def make(B=2, C=3, D=4, H=5, W=6, out=(3, 4, 5), K=3, dtype=torch.float64, jac=False, seed=0,
         normalized_masks=False):
    """Inputs of the keypoint ops. Masks do not sum to one unless asked."""
    gen = torch.Generator().manual_seed(seed)
    vol = torch.randn(B, C, D, H, W, generator=gen, dtype=dtype).requires_grad_()
    kps, kpd = _kp(B, K, dtype, gen=gen), _kp(B, K, dtype, gen=gen)
    masks = torch.rand(B, K + 1, *out, generator=gen, dtype=dtype)
    if normalized_masks:
        masks = (masks * 4).softmax(1)
    masks.requires_grad_()
    j = None
    if jac:
        j = (torch.eye(3, dtype=dtype) + 0.3 * torch.randn(B, K, 3, 3, generator=gen,
                                                           dtype=dtype)).requires_grad_()
    return vol, kps, kpd, masks, j


def compare(fn_a, fn_b, inputs, dtype=None, scale=1.0):
    outs_a, grads_a, cot = grads(fn_a, inputs)
    outs_b, grads_b, _ = grads(fn_b, inputs, cot)
    for i, (a, b) in enumerate(zip(outs_a, outs_b)):
        assert_close(a, b, dtype=dtype, scale=scale, msg=f"output {i}")
    for i, (a, b) in enumerate(zip(grads_a, grads_b)):
        if a is None and b is None:
            continue
        assert a is not None and b is not None, f"input {i}: one gradient is missing"
        assert_close(a, b, dtype=dtype, scale=scale, msg=f"gradient of input {i}")


# ------------------------------------------------------------------------------------------------
# semantics of the reference
# ------------------------------------------------------------------------------------------------

def test_coordinate_grid_conventions():
    g = make_coordinate_grid((2, 3, 5), align_corners=True, dtype=torch.float64)
    assert g.shape == (2, 3, 5, 3)
    assert torch.equal(g[0, 0, :, 0], torch.linspace(-1, 1, 5, dtype=torch.float64))
    assert torch.equal(g[:, 0, 0, 2], torch.tensor([-1.0, 1.0], dtype=torch.float64))
    c = make_coordinate_grid((2, 3, 4), align_corners=False, dtype=torch.float64)
    assert torch.allclose(c[0, 0, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75],
                                                      dtype=torch.float64))
    assert torch.allclose(c[:, 0, 0, 2], torch.tensor([-0.5, 0.5], dtype=torch.float64))
    # voxel-centre identity grid + align_corners=False sampling is the identity warp
    vol = torch.randn(1, 2, 2, 3, 4, dtype=torch.float64)
    out = F.grid_sample(vol, c.unsqueeze(0), align_corners=False)
    assert torch.allclose(out, vol)


def test_reference_identity_and_translation():
    vol, kps, kpd, masks, _ = make(out=(4, 5, 6))
    one_hot = torch.zeros_like(masks)
    one_hot[:, 0] = 1
    out = ref.warp_by_keypoints_reference(vol, kps, kpd, one_hot, grid_align_corners=False)
    assert torch.allclose(out, vol)
    # all weight on keypoint 1: a pure translation by kp_source - kp_driving
    one_hot = torch.zeros_like(masks)
    one_hot[:, 1] = 1
    flow = ref.keypoint_flow_reference(kps, kpd, one_hot)
    grid = make_coordinate_grid((4, 5, 6), dtype=torch.float64)
    shift = (kps[:, 0] - kpd[:, 0]).view(-1, 1, 1, 1, 3)
    assert torch.allclose(flow, grid + shift)


# ------------------------------------------------------------------------------------------------
# C++ CPU vs reference / F.grid_sample
# ------------------------------------------------------------------------------------------------

@cpp
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warp_volume_matches_grid_sample(align_corners, dtype):
    gen = torch.Generator().manual_seed(1)
    vol = torch.randn(2, 3, 4, 5, 7, generator=gen, dtype=dtype).requires_grad_()
    # output size differs from the input; positions far outside [-1, 1] too
    grid = (torch.rand(2, 3, 6, 2, 3, generator=gen, dtype=dtype) * 5 - 2.5)
    grid[0, 0, 0, 0] = torch.tensor([40.0, -1e6, 3e4])
    grid.requires_grad_()
    compare(lambda v, g: ops.warp_volume(v, g, align_corners=align_corners, backend="cpu"),
            lambda v, g: F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                       align_corners=align_corners), [vol, grid])


@cpp
@pytest.mark.parametrize("K", [1, 15, 21])
@pytest.mark.parametrize("jac", [False, True])
@pytest.mark.parametrize("grid_align_corners", [True, False])
def test_keypoint_flow(K, jac, grid_align_corners):
    _, kps, kpd, masks, j = make(K=K, jac=jac, out=(3, 2, 5))
    inputs = [kps, kpd, masks] + ([j] if jac else [])

    def run(fn, **kw):
        return lambda *x: fn(*x[:3], jacobian=x[3] if jac else None,
                             grid_align_corners=grid_align_corners, **kw)
    compare(run(ops.keypoint_flow, backend="cpu"), run(ref.keypoint_flow_reference), inputs)


@cpp
@pytest.mark.parametrize("K", [1, 15, 21])
@pytest.mark.parametrize("jac", [False, True])
@pytest.mark.parametrize("align_corners,grid_align_corners", [(False, True), (True, False),
                                                              (False, False)])
def test_warp_by_keypoints(K, jac, align_corners, grid_align_corners):
    vol, kps, kpd, masks, j = make(K=K, jac=jac, out=(3, 4, 5), seed=K)
    inputs = [vol, kps, kpd, masks] + ([j] if jac else [])

    def run(fn, **kw):
        return lambda *x: fn(*x[:4], jacobian=x[4] if jac else None, align_corners=align_corners,
                             grid_align_corners=grid_align_corners, **kw)
    compare(run(ops.warp_by_keypoints, backend="cpu"), run(ref.warp_by_keypoints_reference),
            inputs)


@cpp
def test_warp_by_keypoints_return_flow_and_far_keypoints():
    vol, kps, kpd, masks, _ = make(K=4)
    with torch.no_grad():
        kps[0, 0] = torch.tensor([30.0, -50.0, 2.0], dtype=kps.dtype)  # flow far outside
    compare(lambda *x: ops.warp_by_keypoints(*x, return_flow=True, backend="cpu"),
            lambda *x: ref.warp_by_keypoints_reference(*x, return_flow=True),
            [vol, kps, kpd, masks])


@cpp
@pytest.mark.parametrize("K", [1, 15, 21])
@pytest.mark.parametrize("jac", [False, True])
@pytest.mark.parametrize("align_corners,grid_align_corners", [(False, True), (True, False)])
def test_motion_field_input(K, jac, align_corners, grid_align_corners):
    vol, kps, kpd, _, j = make(K=K, jac=jac, C=2, D=3, H=4, W=5, seed=K)
    inputs = [vol, kps, kpd] + ([j] if jac else [])

    def run(fn, **kw):
        return lambda *x: fn(*x[:3], jacobian=x[3] if jac else None, heatmap_variance=0.05,
                             align_corners=align_corners, grid_align_corners=grid_align_corners,
                             **kw)
    compare(run(ops.motion_field_input, backend="cpu"), run(ref.motion_field_input_reference),
            inputs)


@cpp
def test_motion_field_input_channel_order():
    vol, kps, kpd, _, _ = make(K=2, C=3)
    out = ops.motion_field_input(vol, kps, kpd, backend="cpu").detach()
    assert out.shape == (2, 3 * 4, 4, 5, 6)
    assert torch.count_nonzero(out[:, 0]) == 0  # background heatmap
    heat = (keypoint_heatmaps_reference(kpd, (4, 5, 6))
            - keypoint_heatmaps_reference(kps, (4, 5, 6))).detach()
    assert_close(out[:, 4], heat[:, 0])
    assert_close(out[:, 8], heat[:, 1])
    ident = make_coordinate_grid((4, 5, 6), dtype=vol.dtype).expand(2, 4, 5, 6, 3)
    assert_close(out[:, 1:4], F.grid_sample(vol.detach(), ident, align_corners=False))


@cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_and_float32(dtype):
    vol, kps, kpd, masks, _ = make(K=15, dtype=torch.float32, C=4, normalized_masks=True)
    vol_lp = vol.detach().to(dtype).requires_grad_()
    compare(lambda *x: ops.warp_by_keypoints(*x, backend="cpu"),
            lambda *x: ref.warp_by_keypoints_reference(*x), [vol_lp, kps, kpd, masks],
            dtype=dtype, scale=10 if dtype == torch.float32 else 1)
    compare(lambda *x: ops.motion_field_input(*x, backend="cpu"),
            lambda *x: ref.motion_field_input_reference(*x), [vol_lp, kps, kpd],
            dtype=dtype, scale=10 if dtype == torch.float32 else 1)


@cpp
def test_non_contiguous_inputs():
    vol, kps, kpd, masks, j = make(K=3, jac=True)
    # a channels-last view of the volume, strided keypoints / masks / jacobian
    vol_cl = vol.detach().permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)
    vol_cl.requires_grad_()
    kps_nc = torch.cat([kps.detach(), kps.detach()], 2)[..., ::2].requires_grad_()
    masks_nc = masks.detach().transpose(3, 4).contiguous().transpose(3, 4).requires_grad_()
    j_nc = j.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    assert not vol_cl.is_contiguous() and not kps_nc.is_contiguous()
    assert not masks_nc.is_contiguous() and not j_nc.is_contiguous()
    inputs = [vol_cl, kps_nc, kpd, masks_nc, j_nc]
    compare(lambda *x: ops.warp_by_keypoints(*x[:4], jacobian=x[4], backend="cpu"),
            lambda *x: ref.warp_by_keypoints_reference(*x[:4], jacobian=x[4]), inputs)
    compare(lambda *x: ops.motion_field_input(*x[:3], jacobian=x[4], backend="cpu"),
            lambda *x: ref.motion_field_input_reference(*x[:3], jacobian=x[4]), inputs)
    grid = torch.rand(2, 5, 4, 3, 3, dtype=vol.dtype).transpose(1, 3).requires_grad_()
    compare(lambda v, g: ops.warp_volume(v, g, backend="cpu"),
            lambda v, g: ref.warp_volume_reference(v, g), [vol_cl, grid])


@cpp
def test_empty_batch_and_empty_output():
    vol, kps, kpd, masks, _ = make(B=0, K=2)
    for fn in (lambda: ops.warp_by_keypoints(vol, kps, kpd, masks, backend="cpu"),
               lambda: ops.motion_field_input(vol, kps, kpd, backend="cpu"),
               lambda: ops.keypoint_flow(kps, kpd, masks, backend="cpu")):
        out = fn()
        assert out.shape[0] == 0
        out.sum().backward()
    assert vol.grad.shape == vol.shape and kps.grad.shape == kps.shape
    vol, kps, kpd, masks, _ = make(K=2, out=(0, 3, 2))
    out = ops.warp_by_keypoints(vol, kps, kpd, masks, backend="cpu")
    assert out.shape == (2, 3, 0, 3, 2)
    out.sum().backward()
    assert torch.count_nonzero(vol.grad) == 0 and torch.count_nonzero(kps.grad) == 0


@cpp
def test_partial_gradients():
    vol, kps, kpd, masks, _ = make(K=3)
    kps.requires_grad_(False)
    masks.requires_grad_(False)
    compare(lambda *x: ops.warp_by_keypoints(*x, backend="cpu"),
            lambda *x: ref.warp_by_keypoints_reference(*x), [vol, kps, kpd, masks])
    vol.requires_grad_(False)
    compare(lambda *x: ops.motion_field_input(*x, backend="cpu"),
            lambda *x: ref.motion_field_input_reference(*x), [vol, kps, kpd])


@cpp
def test_nan_grid_gives_nan():
    vol = torch.randn(1, 2, 3, 3, 3)
    grid = torch.zeros(1, 1, 1, 2, 3)
    grid[0, 0, 0, 0, 1] = float("nan")
    out = ops.warp_volume(vol, grid, backend="cpu")
    assert torch.isnan(out[0, :, 0, 0, 0]).all() and not torch.isnan(out[0, :, 0, 0, 1]).any()


def test_combine_jacobians():
    js = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    jd = torch.eye(3, dtype=torch.float64) * 2
    assert torch.allclose(combine_jacobians(js, jd.expand(2, 3, 3, 3)), js / 2)


# ------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ------------------------------------------------------------------------------------------------

@cpp
@pytest.mark.parametrize("jac", [False, True])
def test_gradcheck(jac):
    vol, kps, kpd, masks, j = make(B=1, C=2, D=2, H=3, W=3, out=(2, 2, 3), K=2, jac=jac)
    extra = [j] if jac else []
    grid = (torch.rand(1, 2, 2, 2, 3, dtype=torch.float64) * 2.4 - 1.2).requires_grad_()
    check = torch.autograd.gradcheck
    assert check(lambda v, g: ops.warp_volume(v, g, backend="cpu"), (vol, grid))
    assert check(lambda *x: ops.keypoint_flow(*x[:3], jacobian=x[3] if jac else None,
                                              backend="cpu"), (kps, kpd, masks, *extra))
    assert check(lambda *x: ops.warp_by_keypoints(*x[:4], jacobian=x[4] if jac else None,
                                                  backend="cpu"), (vol, kps, kpd, masks, *extra))
    assert check(lambda *x: ops.motion_field_input(*x[:3], jacobian=x[3] if jac else None,
                                                   heatmap_variance=0.1, backend="cpu"),
                 (vol, kps, kpd, *extra))


@cpp
@pytest.mark.parametrize("jac", [False, True])
def test_opcheck(jac):
    vol, kps, kpd, masks, j = make(K=2, dtype=torch.float32, jac=jac)
    grid = torch.rand(2, 2, 3, 2, 3, requires_grad=True)
    P = torch.ops.pyface
    torch.library.opcheck(P.warp_volume, (vol, grid, False))
    torch.library.opcheck(P.keypoint_flow, (kps, kpd, masks, j, True))
    torch.library.opcheck(P.warp_by_keypoints, (vol, kps, kpd, masks, j, False, True))
    torch.library.opcheck(P.motion_field_input, (vol, kps, kpd, j, 0.01, False, True))


@cpp
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    vol, kps, kpd, masks, _ = make(K=2, dtype=torch.float32)
    grid = torch.rand(2, 2, 3, 2, 3, requires_grad=True)

    def f(vol, kps, kpd, masks, grid):
        a = ops.warp_by_keypoints(vol, kps, kpd, masks, backend="cpu")
        b = ops.motion_field_input(vol, kps, kpd, backend="cpu")
        c = ops.warp_volume(vol, grid, backend="cpu")
        d = ops.keypoint_flow(kps, kpd, masks, backend="cpu")
        return a.square().sum() + b.sum() + c.sum() + d.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = [vol, kps, kpd, masks, grid]
    compare(compiled, f, inputs)


@cpp
def test_torch_compile_dynamic_shapes_fullgraph():
    # dynamic=True traces the float options (heatmap_variance's default) as SymFloat; their
    # checks must not graph-break, and new shapes must reuse the graph
    torch._dynamo.reset()

    def f(vol, kps, kpd, grid):
        return (ops.motion_field_input(vol, kps, kpd).square().sum()
                + ops.warp_volume(vol, grid).square().sum())

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for k, (C, D) in enumerate([(3, 4), (5, 6), (4, 7)]):
        vol, kps, kpd, _, _ = make(C=C, D=D, K=2, dtype=torch.float32, seed=k)
        grid = (torch.rand(2, 3, 4, 5, 3) * 2 - 1).requires_grad_()
        compare(compiled, f, [vol, kps, kpd, grid])


@cpp
@pytest.mark.parametrize("op", ["warp_volume", "keypoint_flow", "warp_by_keypoints",
                                "motion_field_input"])
def test_forward_mode_and_func_grad_raise_naming_the_op(op):
    # forward-mode AD would silently give a zero tangent through the fused kernels
    vol, kps, kpd, masks, _ = make(K=2)
    grid = torch.rand(2, 3, 4, 5, 3, dtype=torch.float64) * 2 - 1
    args = {"warp_volume": (vol, grid), "keypoint_flow": (kps, kpd, masks),
            "warp_by_keypoints": (vol, kps, kpd, masks),
            "motion_field_input": (vol, kps, kpd)}[op]
    args = [a.detach() for a in args]

    def f(first):
        return getattr(ops, op)(first, *args[1:], backend="cpu")

    with pytest.raises(RuntimeError, match=rf"pyface.ops.{op}: forward-mode AD"):
        torch.func.jvp(f, (args[0],), (torch.ones_like(args[0]),))
    with pytest.raises(RuntimeError, match=rf"pyface.ops.{op}: torch.func.grad"):
        torch.func.grad(lambda a: f(a).sum())(args[0])
    assert_close(torch.func.vmap(f)(args[0][None]), f(args[0])[None])


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    vol, kps, kpd, masks, _ = make(K=3)
    with pytest.raises(ValueError, match=r"masks: expected shape \(B, K\+1, D, H, W\) = \(B, 4"):
        ops.warp_by_keypoints(vol, kps, kpd, masks[:, :3])
    with pytest.raises(ValueError, match=r"kp_driving: expected shape \(B, K, 3\)"):
        ops.warp_by_keypoints(vol, kps, kpd[:, :2], masks)
    with pytest.raises(ValueError, match=r"volume: expected shape \(B, C, D, H, W\)"):
        ops.warp_by_keypoints(vol[0], kps, kpd, masks)
    with pytest.raises(ValueError, match=r"grid: expected shape \(B, Do, Ho, Wo, 3\)"):
        ops.warp_volume(vol, torch.zeros(2, 3, 3, 3, 2, dtype=vol.dtype))
    with pytest.raises(TypeError, match="masks: expected a floating-point tensor"):
        ops.keypoint_flow(kps, kpd, masks.long())
    with pytest.raises(ValueError, match="jacobian: expected shape"):
        ops.warp_by_keypoints(vol, kps, kpd, masks, jacobian=torch.zeros(2, 3, 3, 2))
    with pytest.raises(ValueError, match="heatmap_variance"):
        ops.motion_field_input(vol, kps, kpd, heatmap_variance=0.0)
    with pytest.raises(TypeError, match="align_corners"):
        ops.warp_volume(vol, torch.zeros(2, 1, 1, 1, 3, dtype=vol.dtype), align_corners=1)
    with pytest.raises(ValueError, match="volume: expected"):
        ops.warp_volume(vol[:, :0], torch.zeros(2, 1, 1, 1, 3, dtype=vol.dtype))
    with pytest.raises(ValueError, match="kp_source: expected a tensor on"):
        ops.motion_field_input(vol, kps.to("meta"), kpd)


@cpp
def test_cpp_ops_validate_arguments():
    vol, kps, kpd, masks, _ = make(K=3)
    P = torch.ops.pyface
    with pytest.raises(ValueError, match=r"masks: expected shape \(2, 4, D, H, W\)"):
        P.warp_by_keypoints(vol, kps, kpd, masks[:, :2], None, False, True)
    with pytest.raises(ValueError, match=r"jacobian: expected shape \(2, 3, 3, 3\)"):
        P.keypoint_flow(kps, kpd, masks, torch.zeros(2, 3, 3, 2), True)
    with pytest.raises(ValueError, match="grid: expected shape"):
        P.warp_volume(vol, torch.zeros(2, 1, 1, 1, 4, dtype=vol.dtype), False)
    with pytest.raises(ValueError, match="heatmap_variance"):
        P.motion_field_input(vol, kps, kpd, None, -1.0, False, True)
    with pytest.raises(ValueError, match="grad_out: expected shape"):
        P.warp_volume_bwd(torch.zeros(1), vol, torch.zeros(2, 1, 1, 1, 3, dtype=vol.dtype),
                          False, True, True)


# ------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("jac", [False, True])
def test_gpu_backends(backend, jac):
    dtype = torch.float64 if backend == "cuda" else torch.float32
    vol, kps, kpd, masks, j = make(K=15, C=5, jac=jac, dtype=dtype)
    vol, kps, kpd, masks = (t.detach().cuda().requires_grad_() for t in (vol, kps, kpd, masks))
    j = j.detach().cuda().requires_grad_() if jac else None
    extra = [j] if jac else []
    scale = 1 if dtype == torch.float64 else 10
    compare(lambda *x: ops.warp_by_keypoints(*x[:4], jacobian=x[4] if jac else None,
                                             backend=backend),
            lambda *x: ref.warp_by_keypoints_reference(*x[:4], jacobian=x[4] if jac else None),
            [vol, kps, kpd, masks, *extra], scale=scale)
    compare(lambda *x: ops.keypoint_flow(*x[:3], jacobian=x[3] if jac else None, backend=backend),
            lambda *x: ref.keypoint_flow_reference(*x[:3], jacobian=x[3] if jac else None),
            [kps, kpd, masks, *extra], scale=scale)
    grid = (torch.rand(2, 3, 4, 5, 3, dtype=dtype, device="cuda") * 3 - 1.5).requires_grad_()
    compare(lambda v, g: ops.warp_volume(v, g, backend=backend),
            lambda v, g: ref.warp_volume_reference(v, g), [vol, grid], scale=scale)
    compare(lambda *x: ops.motion_field_input(*x[:3], jacobian=x[3] if jac else None,
                                              backend=backend),
            lambda *x: ref.motion_field_input_reference(*x[:3], jacobian=x[3] if jac else None),
            [vol, kps, kpd, *extra], scale=scale)


@pytest.mark.gpu
def test_gpu_opcheck_and_gradcheck():
    vol, kps, kpd, masks, j = make(B=1, C=2, D=2, H=3, W=3, out=(2, 2, 3), K=2, jac=True)
    vol, kps, kpd, masks, j = (t.detach().cuda().requires_grad_()
                               for t in (vol, kps, kpd, masks, j))
    P = torch.ops.pyface
    torch.library.opcheck(P.warp_by_keypoints, (vol, kps, kpd, masks, j, False, True))
    torch.library.opcheck(P.keypoint_flow, (kps, kpd, masks, j, True))
    torch.library.opcheck(P.motion_field_input, (vol, kps, kpd, j, 0.1, False, True))
    assert torch.autograd.gradcheck(
        lambda *x: ops.motion_field_input(*x[:3], jacobian=x[3], heatmap_variance=0.1,
                                          backend="cuda"), (vol, kps, kpd, j))
    assert torch.autograd.gradcheck(
        lambda *x: ops.warp_by_keypoints(*x[:4], jacobian=x[4], backend="cuda"),
        (vol, kps, kpd, masks, j))


@cpp
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("C", [6, 37])
def test_backward_paths(B, C):
    """B < threads: a position pass plus a channel-owned scatter; B >= threads: workers own
    batch items and go through channels-last slabs of 16 channels (C = 37: three slabs, the
    last one partial). Both must match the reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        vol, kps, kpd, masks, j = make(B=B, K=3, jac=True, C=C)
        compare(lambda *x: ops.warp_by_keypoints(*x[:4], jacobian=x[4], backend="cpu"),
                lambda *x: ref.warp_by_keypoints_reference(*x[:4], jacobian=x[4]),
                [vol, kps, kpd, masks, j])
        compare(lambda *x: ops.motion_field_input(*x[:3], jacobian=x[3], backend="cpu"),
                lambda *x: ref.motion_field_input_reference(*x[:3], jacobian=x[3]),
                [vol, kps, kpd, j])
        grid = (torch.rand(B, 3, 2, 4, 3, dtype=vol.dtype) * 2.4 - 1.2).requires_grad_()
        compare(lambda v, g: ops.warp_volume(v, g, backend="cpu"),
                lambda v, g: F.grid_sample(v, g, align_corners=False), [vol, grid])
    finally:
        torch.set_num_threads(threads)
