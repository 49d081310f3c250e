"""Tri-plane sampling: every backend against the reference (which is checked against
F.grid_sample the way EG3D calls it), gradients, layouts, dtypes, compile and bad input."""
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import pyface
from pyface import _backend
from pyface.ops import triplane_sample
from pyface.ops.reference import triplane_sample_reference
from pyface.testing import assert_close, grads

AXES = ("xy_xz_zy", "eg3d")
REDUCE = ("mean", "sum", "none")


def make(B=2, C=5, H=7, W=9, N=23, dtype=torch.float32, layout="contiguous", spread=1.3,
         device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    if layout == "channels_last":
        planes = torch.randn(B, 3, H, W, C, generator=gen).permute(0, 1, 4, 2, 3)
    elif layout == "strided":  # every other channel and column of a larger tensor
        planes = torch.randn(B, 3, 2 * C, H, 2 * W, generator=gen)[:, :, ::2, :, ::2]
    else:
        planes = torch.randn(B, 3, C, H, W, generator=gen)
    points = (torch.rand(B, N, 3, generator=gen) * 2 - 1) * spread
    planes = planes.to(device=device, dtype=dtype).requires_grad_()
    points = points.to(device).requires_grad_()
    return planes, points


def eg3d_sample_from_planes(planes, points, box_warp=1.0, align_corners=False):
    """EG3D's renderer.sample_from_planes / project_onto_planes, transcribed from the paper code's
    description: inverse plane-axis matrices, bmm, keep 2 coordinates, grid_sample, permute."""
    plane_axes = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                               [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
                               [[0, 0, 1], [1, 0, 0], [0, 1, 0]]], dtype=points.dtype)
    B, n_planes, C, H, W = planes.shape
    _, M, _ = points.shape
    planes = planes.view(B * n_planes, C, H, W)
    coords = (2 / box_warp) * points
    coords = coords.unsqueeze(1).expand(-1, n_planes, -1, -1).reshape(B * n_planes, M, 3)
    inv = torch.linalg.inv(plane_axes).unsqueeze(0).expand(B, -1, -1, -1).reshape(
        B * n_planes, 3, 3)
    proj = torch.bmm(coords, inv)[..., :2].unsqueeze(1)
    out = F.grid_sample(planes, proj.float(), mode="bilinear", padding_mode="zeros",
                        align_corners=align_corners)
    return out.permute(0, 3, 2, 1).reshape(B, n_planes, M, C)


@pytest.mark.parametrize("align_corners", (False, True))
def test_reference_is_eg3d(align_corners):
    planes, points = make()
    ours = triplane_sample_reference(planes, points, plane_axes="eg3d", box_size=1.7,
                                     reduce="none", align_corners=align_corners)
    theirs = eg3d_sample_from_planes(planes, points, box_warp=1.7, align_corners=align_corners)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("align_corners", (False, True))
def test_reference_xy_xz_zy_per_plane(align_corners):
    planes, points = make()
    out = triplane_sample_reference(planes, points, reduce="none", align_corners=align_corners,
                                    plane_axes="xy_xz_zy")
    uv = {0: (0, 1), 1: (0, 2), 2: (2, 1)}
    for p in range(3):
        grid = (2 * points[..., list(uv[p])]).unsqueeze(1)
        expected = F.grid_sample(planes[:, p], grid, align_corners=align_corners)[:, :, 0]
        torch.testing.assert_close(out[:, p], expected.transpose(1, 2), rtol=0, atol=0)


CPU_CASES = [
    dict(),
    dict(C=1), dict(C=3), dict(C=33, N=7), dict(C=96, N=9), dict(H=1, W=5), dict(H=11, W=4),
    dict(B=1, N=1),
    dict(layout="channels_last"), dict(layout="strided"), dict(spread=3.0),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items())
                         or "default")
@pytest.mark.parametrize("plane_axes", AXES)
@pytest.mark.parametrize("reduce", REDUCE)
@pytest.mark.parametrize("align_corners", (False, True))
def test_cpu_matches_reference(case, plane_axes, reduce, align_corners):
    planes, points = make(**case)
    kw = dict(plane_axes=plane_axes, box_size=1.7, reduce=reduce, align_corners=align_corners)
    out, g, cot = grads(lambda p, x: triplane_sample(p, x, backend="cpu", **kw), [planes, points])
    ref, g_ref, _ = grads(lambda p, x: triplane_sample_reference(p, x, **kw), [planes, points],
                          cot)
    assert_close(out[0], ref[0])
    # plane gradients are sums of a few products; point gradients sum over C channels and 12
    # taps of values ~N(0, 1) scaled by H/2: compare with the tolerance of float32 at that scale.
    assert_close(g[0], g_ref[0])
    assert_close(g[1], g_ref[1], scale=10)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_cpu_low_precision(dtype):
    planes, points = make(C=8, dtype=dtype)
    out, g, cot = grads(lambda p, x: triplane_sample(p, x, backend="cpu",
                                                     plane_axes="xy_xz_zy"), [planes, points])
    ref, g_ref, _ = grads(lambda p, x: triplane_sample_reference(p, x, plane_axes="xy_xz_zy"),
                          [planes, points], cot)
    assert out[0].dtype == dtype and g[0].dtype == dtype and g[1].dtype == torch.float32
    assert_close(out[0], ref[0])
    assert_close(g[0], g_ref[0])
    assert_close(g[1], g_ref[1], dtype=dtype, scale=4)


@pytest.mark.parametrize("plane_axes", AXES)
@pytest.mark.parametrize("reduce", REDUCE)
def test_gradcheck_float64(plane_axes, reduce):
    planes, points = make(B=1, C=2, H=4, W=5, N=6, dtype=torch.float64)
    points = points.detach().double().requires_grad_()
    for backend in ("cpu", "reference"):
        fn = lambda p, x: triplane_sample(p, x, plane_axes=plane_axes, reduce=reduce,  # noqa: E731
                                          box_size=1.3, backend=backend)
        assert torch.autograd.gradcheck(fn, (planes, points), eps=1e-6, atol=1e-6)


@pytest.mark.cpp
def test_opcheck():
    planes, points = make(C=4)
    for reduce in REDUCE:
        torch.library.opcheck(torch.ops.pyface.triplane_sample.default,
                              (planes, points, "eg3d", 1.0, reduce, False))
    grad = torch.randn(2, 23, 4)
    torch.library.opcheck(torch.ops.pyface.triplane_sample_bwd.default,
                          (grad, planes.detach(), points.detach(), "eg3d", 1.0, "mean", False,
                           True, True))


def test_torch_compile_fullgraph():
    planes, points = make(C=4)

    def fn(p, x):
        return triplane_sample(p, x, plane_axes="eg3d", backend="cpu").square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(planes, points)
    g = torch.autograd.grad(out, (planes, points))
    ref = fn(planes, points)
    g_ref = torch.autograd.grad(ref, (planes, points))
    assert_close(out, ref)
    assert_close(g[0], g_ref[0])
    assert_close(g[1], g_ref[1], scale=10)


def test_torch_compile_inductor_reference_and_cpu():
    planes, points = make(C=4)
    for backend in ("reference", "cpu"):
        fn = torch.compile(lambda p, x: triplane_sample(p, x, backend=backend,
                                                        plane_axes="xy_xz_zy"), fullgraph=True)
        assert_close(fn(planes, points), triplane_sample_reference(planes, points,
                                                                   plane_axes="xy_xz_zy"))


@pytest.mark.cpp
def test_torch_compile_dynamic_shapes_fullgraph():
    # dynamic=True traces float arguments, e.g. the default box_size, as SymFloat: the argument
    # checks must not graph-break on them (math.isfinite did), and new shapes reuse the graph
    torch._dynamo.reset()

    def fn(p, x):
        return triplane_sample(p, x, plane_axes="eg3d").square().sum()

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for k, (C, H, W, N) in enumerate([(5, 7, 9, 23), (6, 8, 10, 31), (7, 9, 11, 41)]):
        planes, points = make(C=C, H=H, W=W, N=N, seed=k)
        out = compiled(planes, points)
        g = torch.autograd.grad(out, (planes, points))
        ref = fn(planes, points)
        g_ref = torch.autograd.grad(ref, (planes, points))
        assert_close(out, ref)
        assert_close(g[0], g_ref[0])
        assert_close(g[1], g_ref[1], scale=10)


@pytest.mark.cpp
def test_profiler_names_the_op_forward_and_backward():
    # docs/render.md "Profiling and using the ops in your own code"
    from torch.profiler import ProfilerActivity, profile

    planes, points = make(C=3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        triplane_sample(planes, points, plane_axes="eg3d", backend="cpu").sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert {"pyface::triplane_sample", "pyface::triplane_sample_bwd",
            "GeneratedBackwardFor_pyface_triplane_sample_default"} <= names, sorted(names)


@pytest.mark.cpp
def test_func_transforms_and_forward_mode():
    # the fused kernels have a reverse-mode backward only: forward-mode AD (whose tangent torch
    # would silently drop: a zero jvp) and torch.func's grad transforms raise naming the op;
    # vmap runs one call per element; the reference backend supports what grid_sample does
    import torch.autograd.forward_ad as fwAD

    planes, points = make(C=3, dtype=torch.float64)
    p, x = planes.detach(), points.detach()

    def f(p, backend="cpu"):
        return triplane_sample(p, x, plane_axes="eg3d", backend=backend)

    fwd = r"pyface.ops.triplane_sample: forward-mode AD .* not supported by the 'cpu' backend"
    with pytest.raises(RuntimeError, match=fwd):
        torch.func.jvp(f, (p,), (torch.ones_like(p),))
    with pytest.raises(RuntimeError, match=fwd):
        torch.func.jacfwd(f)(p)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=fwd):
        f(fwAD.make_dual(p, torch.ones_like(p)))
    with pytest.raises(RuntimeError, match=r"pyface.ops.triplane_sample: torch.func.grad"):
        torch.func.grad(lambda p: f(p).sum())(p)
    with fwAD.dual_level():                    # a dual level alone (no tangent) is fine
        assert_close(f(p), f(p, "reference"))
    stacked = torch.stack([p, 2 * p])
    assert_close(torch.func.vmap(f)(stacked), torch.stack([f(p), f(2 * p)]))
    g_ref = torch.func.grad(lambda p: f(p, "reference").square().sum())(p)
    assert_close(g_ref, torch.autograd.grad(f(planes).square().sum(), planes)[0])


@pytest.mark.parametrize("B,N", [(2, 0), (0, 5), (0, 0)])
def test_empty(B, N):
    planes, points = make(B=B, N=N)
    for backend in ("cpu", "reference"):
        out = triplane_sample(planes, points, backend=backend, plane_axes="xy_xz_zy")
        assert out.shape == (B, N, 5)
        out_none = triplane_sample(planes, points, reduce="none", backend=backend,
                                   plane_axes="xy_xz_zy")
        assert out_none.shape == (B, 3, N, 5)
        gp, gx = torch.autograd.grad(out.sum(), (planes, points), allow_unused=True)
        assert gp is None or (gp.shape == planes.shape and not gp.any())


def test_nan_points_propagate_and_outside_is_zero():
    planes, points = make(N=4)
    with torch.no_grad():
        points[0, 0, 0] = float("nan")
        points[0, 1] = torch.tensor([50.0, -1e30, float("inf")])
    out = triplane_sample(planes, points, backend="cpu", plane_axes="xy_xz_zy")
    assert torch.isnan(out[0, 0]).all()
    assert (out[0, 1] == 0).all()
    assert torch.isfinite(out[0, 2:]).all() and torch.isfinite(out[1]).all()
    gp, gx = torch.autograd.grad(out[:, 1:].sum(), (planes, points))
    assert torch.isfinite(gp).all()
    # the reference is F.grid_sample (EG3D): +-inf coordinates give NaN there (README)
    ref = triplane_sample(planes, points, backend="reference", plane_axes="xy_xz_zy")
    assert torch.isnan(ref[0, :2]).all() and torch.isfinite(ref[0, 2:]).all()


def test_nan_in_planes_propagates():
    planes, points = make(N=50, spread=0.45)  # all inside the box
    with torch.no_grad():
        planes[0, 0, 1].fill_(float("nan"))
    out = triplane_sample(planes, points, backend="cpu", plane_axes="xy_xz_zy")
    ref = triplane_sample_reference(planes, points, plane_axes="xy_xz_zy")
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out[0, :, 1]).all() and not torch.isnan(out[0, :, 0]).any()


def test_points_dtype_float64_with_float32_planes():
    planes, points = make()
    x64 = points.detach().double().requires_grad_()
    out = triplane_sample(planes, x64, backend="cpu", plane_axes="xy_xz_zy")
    assert out.dtype == torch.float32
    (gx,) = torch.autograd.grad(out.sum(), x64)
    assert gx.dtype == torch.float64


def test_only_points_grad():
    planes, points = make()
    planes = planes.detach()
    out = triplane_sample(planes, points, backend="cpu", plane_axes="xy_xz_zy")
    (gx,) = torch.autograd.grad(out.sum(), points)
    ref = triplane_sample_reference(planes, points, plane_axes="xy_xz_zy")
    (gx_ref,) = torch.autograd.grad(ref.sum(), points)
    assert_close(gx, gx_ref, scale=10)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

BAD = [
    (lambda p, x: (p[0], x), ValueError, r"planes: expected shape \(B, 3, C, H, W\) \(5 dims\)"),
    (lambda p, x: (p[:, :2], x), ValueError, "planes: .*dim 1 must be 3"),
    (lambda p, x: (p, x[..., :2]), ValueError, "points: .*dim 2 must be 3"),
    (lambda p, x: (p, x[:1]), ValueError, "points: .*B = 1 does not match B = 2 of planes"),
    (lambda p, x: (p.int(), x), TypeError, "planes: expected a floating-point tensor, got dtype int32"),
    (lambda p, x: (p, x.long()), TypeError, "points: expected a floating-point tensor, got dtype int64"),
    (lambda p, x: (p, x.to("meta")), ValueError, "points: expected a tensor on cpu .*got meta"),
    (lambda p, x: (p.tolist(), x), TypeError, "planes: expected a torch.Tensor"),
    # an empty plane is an error on every backend alike (the reference returned (B, N, 0) for
    # C = 0 and raised grid_sample's own error for H = 0 or W = 0)
    (lambda p, x: (p[:, :, :0], x), ValueError,
     r"planes: expected shape \(B, 3, C, H, W\) with C, H, W >= 1, got \(2, 3, 0, "),
    (lambda p, x: (p[:, :, :, :0], x), ValueError, r"planes: .*C, H, W >= 1, got \(2, 3, \d+, 0, "),
    (lambda p, x: (p[..., :0], x), ValueError, r"planes: .*C, H, W >= 1, got \(2, 3, \d+, \d+, 0\)"),
]


@pytest.mark.parametrize("mutate,exc,match", BAD)
@pytest.mark.parametrize("backend", (None, "cpu", "reference"))
def test_bad_input(mutate, exc, match, backend):
    planes, points = make()
    p, x = mutate(planes.detach(), points.detach())
    with pytest.raises(exc, match=match):
        triplane_sample(p, x, backend=backend, plane_axes="xy_xz_zy")


@pytest.mark.parametrize("backend", (None, "cpu", "reference"))
@pytest.mark.parametrize("W", (2**24 + 1, 2**25 - 1, 2**31 + 5))
def test_planes_wider_than_float32_texel_coordinates_are_refused(backend, W):
    # an expanded (stride 0) plane costs no memory at any width; beyond 2^24 texels the CPU
    # kernel's float32 coordinates lose the texel (2^25 - 1: zeros) and past 2^31 its 32-bit
    # texel indices overflowed (zeros), without an error
    planes = torch.ones(1, 1, 1, 1, 1).expand(1, 3, 1, 2, W)
    points = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match=rf"planes: expected H, W <= 2\^24 .*, 1, 2, {W}\)"):
        triplane_sample(planes, points, plane_axes="eg3d", backend=backend)
    wide = torch.ones(1, 1, 1, 1, 1).expand(1, 3, 1, 2, 2**24)      # the largest size runs
    out = triplane_sample(wide, points, plane_axes="eg3d", reduce="none", backend=backend)
    assert out.shape == (1, 3, 2, 1) and torch.equal(out, torch.ones_like(out))


@pytest.mark.parametrize("backend", (None, "cpu", "reference"))
def test_render_triplane_refuses_planes_wider_than_the_sampler_takes(backend):
    """render_triplane reaches the same sampling on every backend (the Triton renderer's is
    fused): the limit of triplane_sample, with its message, before any random number is drawn;
    the reference renderer sampled such planes without an error."""
    from pyface.nn import RenderConfig, TriplaneRenderer
    from pyface.ops import render_triplane

    planes = torch.ones(1, 1, 1, 1, 1).expand(1, 3, 1, 2, 2**24 + 1)
    o, d = torch.tensor([[[0.0, 0.0, 3.0]]]), torch.tensor([[[0.0, 0.0, -1.0]]])
    dec = (torch.ones(4, 1), torch.zeros(4), torch.ones(2, 4), torch.zeros(2))
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"planes: expected H, W <= 2\^24 = 16777216 \(texel "
                                         r"coordinates are computed in float32\), got shape "
                                         r"\(1, 3, 1, 2, 16777217\)"):
        render_triplane(planes, o, d, dec, near=2.5, far=3.5, n_coarse=4, n_fine=2,
                        plane_axes="eg3d", backend=backend)
    assert torch.equal(torch.get_rng_state(), state)
    renderer = TriplaneRenderer(RenderConfig.ffhq(depth_resolution=4,
                                                  depth_resolution_importance=2,
                                                  backend=backend))
    from pyface.nn import OSGDecoder

    with pytest.raises(ValueError, match=r"planes: expected H, W <= 2\^24"):
        renderer(planes, OSGDecoder(1, 4, 1), o, d)
    ok = planes[..., :2**24]                                     # the largest size renders
    assert render_triplane(ok, o, d, dec, near=2.5, far=3.5, n_coarse=4, n_fine=2,
                           plane_axes="eg3d", backend=backend)[0].shape == (1, 1, 1)


def test_the_registered_op_refuses_planes_wider_than_float32_texels():
    """torch.ops.pyface.triplane_sample called directly (the C++ kernels' argument checks) and
    its fake kernel (meta tensors, torch.compile) give the public op's error, not zeros."""
    pyface.ops.load_library()
    points = torch.zeros(1, 2, 3)
    for dev in ("cpu", "meta"):
        planes = torch.ones(1, 1, 1, 1, 1, device=dev).expand(1, 3, 1, 2, 2**24 + 1)
        with pytest.raises(ValueError, match=r"planes: expected H, W <= 2\^24 = 16777216 "
                                             r"\(texel coordinates are computed in float32\), "
                                             r"got shape \(1, 3, 1, 2, 16777217\)"):
            torch.ops.pyface.triplane_sample(planes, points.to(dev), "eg3d", 1.0, "none", False)
        with pytest.raises(ValueError, match=r"planes: expected H, W <= 2\^24"):
            torch.ops.pyface.triplane_sample_bwd(torch.zeros(1, 3, 2, 1, device=dev), planes,
                                                 points.to(dev), "eg3d", 1.0, "none", False,
                                                 True, True)
    wide = torch.ones(1, 1, 1, 1, 1).expand(1, 3, 1, 2, 2**24)
    out = torch.ops.pyface.triplane_sample(wide, points, "eg3d", 1.0, "none", False)
    assert torch.equal(out, torch.ones(1, 3, 2, 1))


@pytest.mark.parametrize("kwargs,match", [
    (dict(plane_axes="xyz"), "plane_axes: expected one of .*got 'xyz'"),
    (dict(reduce="max"), "reduce: expected one of .*got 'max'"),
    (dict(box_size=0.0), "box_size: expected a positive finite number, got 0.0"),
    (dict(box_size=float("nan")), "box_size: expected a positive finite number, got nan"),
    # the reference sampled every point at the centre (2 / inf = 0); the C++ kernels refused it
    (dict(box_size=float("inf"), backend="reference"),
     "box_size: expected a positive finite number, got inf"),
    (dict(backend="tpu"), "backend: expected one of"),
])
def test_bad_options(kwargs, match):
    planes, points = make()
    with pytest.raises(ValueError, match=match):
        triplane_sample(planes, points, **{"plane_axes": "xy_xz_zy", **kwargs})


def test_unavailable_backend_is_a_clear_error():
    planes, points = make()
    with pytest.raises(_backend.BackendUnavailableError, match="'cuda' cannot run on cpu tensors"):
        triplane_sample(planes, points, backend="cuda", plane_axes="xy_xz_zy")


@pytest.mark.parametrize("args,match", [
    (lambda p, x: (p[0], x, "eg3d", 1.0, "mean", False), r"planes: expected shape \(B, 3, C, H, W\)"),
    (lambda p, x: (p, x[:1], "eg3d", 1.0, "mean", False), "batch sizes differ"),
    (lambda p, x: (p, x, "zz", 1.0, "mean", False), "plane_axes: expected 'xy_xz_zy' or 'eg3d'"),
    (lambda p, x: (p, x, "eg3d", -1.0, "mean", False), "box_size: expected a positive finite"),
    (lambda p, x: (p, x, "eg3d", 1.0, "avg", False), "reduce: expected 'mean', 'sum' or 'none'"),
    (lambda p, x: (p.int(), x, "eg3d", 1.0, "mean", False), "planes: expected a floating-point"),
])
@pytest.mark.cpp
def test_cpp_entry_points_check_arguments(args, match):
    planes, points = make()
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.pyface.triplane_sample(*args(planes.detach(), points.detach()))


@pytest.mark.cpp
def test_cpp_backward_checks_grad_shape():
    planes, points = make()
    with pytest.raises(ValueError, match=r"grad_out: expected shape \[2, 23, 5\], got \(2, 23, 4\)"):
        torch.ops.pyface.triplane_sample_bwd(torch.randn(2, 23, 4), planes.detach(),
                                             points.detach(), "eg3d", 1.0, "mean", False, True,
                                             True)


# ---------------------------------------------------------------------------------------------
# backend selection, fallback announcement, lazy import
# ---------------------------------------------------------------------------------------------

def test_fallback_is_announced_once(monkeypatch):
    spec = _backend.registered_ops()["triplane_sample"]
    real = _backend.backend_status

    def no_cpp(s, b, d):
        if b == "cpu":
            return False, "pretend the extension is missing"
        return real(s, b, d)

    monkeypatch.setattr(_backend, "backend_status", no_cpp)
    monkeypatch.setattr(_backend, "_warned", set())
    planes, points = make()
    with pytest.warns(_backend.PyfaceFallbackWarning, match="pretend the extension is missing"):
        triplane_sample(planes, points, plane_axes="xy_xz_zy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        triplane_sample(planes, points, plane_axes="xy_xz_zy")  # second call: silent
    assert spec.name == "triplane_sample"


def test_default_backend_on_cpu_is_cpp():
    assert _backend.select_backend("triplane_sample", torch.device("cpu"), None) == "cpu"


def test_import_is_lazy():
    # (torch itself may import triton when it is installed; our kernels must not load)
    code = ("import sys, pyface, pyface.ops; "
            "print('pyface._C' in sys.modules, 'pyface.kernels.triplane' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_info_reports_backends():
    out = subprocess.run([sys.executable, "-m", "pyface.info"], capture_output=True, text=True,
                         check=True).stdout
    assert "triplane_sample:" in out and "cpu   -> cpu" in out
    assert "CUDA kernels: NO" in out or "CUDA kernels: yes" in out
    info = pyface.info.collect()
    assert info["ops"]["triplane_sample"]["default"]["cpu"] == "cpu"


# ---------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) and GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.triton_interpret
@pytest.mark.parametrize("plane_axes", AXES)
@pytest.mark.parametrize("reduce", REDUCE)
@pytest.mark.parametrize("case", [dict(), dict(C=3, layout="channels_last", align_corners=True),
                                  dict(C=33, N=5, layout="strided", spread=2.5)],
                         ids=("default", "cl", "strided"))
def test_triton_interpreter(plane_axes, reduce, case):
    case = dict(case)
    align = case.pop("align_corners", False)
    planes, points = make(**case)
    kw = dict(plane_axes=plane_axes, reduce=reduce, align_corners=align, box_size=1.7)
    out, g, cot = grads(lambda p, x: triplane_sample(p, x, backend="triton", **kw),
                        [planes, points])
    ref, g_ref, _ = grads(lambda p, x: triplane_sample_reference(p, x, **kw), [planes, points],
                          cot)
    assert_close(out[0], ref[0])
    assert_close(g[0], g_ref[0])
    assert_close(g[1], g_ref[1], scale=10)


_DEFINE_FROM_THREADS = """
import threading, time, torch.library
define = torch.library.triton_op
def slow(*args, **kwargs):          # widens the window in which two threads define at once
    time.sleep(0.05)
    return define(*args, **kwargs)
torch.library.triton_op = slow
from pyface._ops import render, triplane, warp
getters = (triplane.triton_op, render.triton_op, warp.triton_ops)
barrier, got, errors = threading.Barrier(4), [], []
def first_use():
    barrier.wait()
    try:
        got.append(tuple(id(get()) for get in getters))
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=first_use) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print(errors, len(got), len(set(got)))
"""


@pytest.mark.triton_interpret
def test_triton_ops_are_defined_once_when_threads_race_on_first_use():
    # nn.DataParallel / thread pools: the lazy definition of the torch.library Triton ops ran
    # in every thread that got there first, and the second definition raised
    out = subprocess.run([sys.executable, "-c", _DEFINE_FROM_THREADS], capture_output=True,
                         text=True, check=True)
    assert out.stdout.split("\n")[-2] == "[] 4 1", out.stdout + out.stderr


def test_lazily_defined_op_lookup_traces_under_compile():
    # the lazy Triton-op getters (pyface._ops.define_once) are traced as a lookup once defined;
    # under functools.lru_cache dynamo traced into the definition itself (fullgraph error)
    from pyface._ops import define_once

    @define_once
    def get():
        @torch.library.custom_op("pyface_test::double", mutates_args=())
        def double(x: torch.Tensor) -> torch.Tensor:
            return x * 2

        double.register_fake(lambda x: torch.empty_like(x))
        return double

    torch._dynamo.reset()
    fn = torch.compile(lambda x: get()(x) + 1, backend="aot_eager")
    assert torch.equal(fn(torch.ones(2)), torch.full((2,), 3.0))       # defines (graph break)
    torch._dynamo.reset()
    fn = torch.compile(lambda x: get()(x) + 1, fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(torch.ones(2)), torch.full((2,), 3.0))


@pytest.mark.triton_interpret
def test_triton_interpreter_empty_and_nan():
    planes, points = make(N=0)
    assert triplane_sample(planes, points, backend="triton",
                           plane_axes="xy_xz_zy").shape == (2, 0, 5)
    planes, points = make(N=3)
    with torch.no_grad():
        points[1, 2, 1] = float("nan")
    out = triplane_sample(planes, points, backend="triton", plane_axes="xy_xz_zy")
    assert torch.isnan(out[1, 2]).all() and torch.isfinite(out[0]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("cuda", "triton"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("layout", ("contiguous", "channels_last", "strided"))
@pytest.mark.parametrize("reduce", REDUCE)
def test_gpu_matches_reference(backend, dtype, layout, reduce):
    planes, points = make(B=3, C=32, H=64, W=48, N=5000, dtype=dtype, layout=layout,
                          device="cuda")
    kw = dict(plane_axes="eg3d", reduce=reduce)
    out, g, cot = grads(lambda p, x: triplane_sample(p, x, backend=backend, **kw),
                        [planes, points])
    ref, g_ref, _ = grads(lambda p, x: triplane_sample_reference(p, x, **kw), [planes, points],
                          cot)
    assert_close(out[0], ref[0])
    assert_close(g[0], g_ref[0], scale=4)
    assert_close(g[1], g_ref[1], dtype=dtype, scale=10)


@pytest.mark.gpu
def test_gpu_gradcheck_float64_and_compile():
    planes, points = make(B=1, C=2, H=4, W=5, N=6, dtype=torch.float64, device="cuda")
    points = points.detach().double().requires_grad_()
    fn = lambda p, x: triplane_sample(p, x, backend="cuda", plane_axes="xy_xz_zy")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (planes, points), eps=1e-6, atol=1e-6,
                                    nondet_tol=1e-12)
    planes, points = make(C=32, device="cuda")
    for backend in ("cuda", "triton"):
        compiled = torch.compile(lambda p, x: triplane_sample(p, x, backend=backend,
                                                              plane_axes="xy_xz_zy"),
                                 fullgraph=True)
        assert_close(compiled(planes, points), triplane_sample_reference(planes, points,
                                                                         plane_axes="xy_xz_zy"))
