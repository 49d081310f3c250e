"""Ray marching / volume rendering: every op against its EG3D reference twin."""
from __future__ import annotations

import math

import pytest
import torch

import pyface.ops as ops
from pyface import _backend
from pyface.ops.reference import (
    mip_composite_reference,
    ray_bundle_reference,
    render_triplane_reference,
    sample_importance_reference,
    sample_stratified_reference,
)
from pyface.testing import assert_close, grads

needs_cpp = pytest.mark.cpp  # fails, never skips, when pyface._C is missing (conftest.py)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def eg3d_cameras(B: int, dtype=torch.float64, radius: float = 2.7, seed: int = 0) -> torch.Tensor:
    """(B, 25) EG3D labels: cameras on a sphere looking at the origin, FFHQ intrinsics."""
    gen = torch.Generator().manual_seed(seed)
    cams = []
    for _ in range(B):
        yaw, pitch = (torch.rand(2, generator=gen, dtype=torch.float64) - 0.5) * 0.6
        pos = radius * torch.stack([torch.sin(yaw) * torch.cos(pitch), torch.sin(pitch),
                                    torch.cos(yaw) * torch.cos(pitch)])
        fwd = -pos / pos.norm()
        up = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
        right = torch.linalg.cross(up, fwd)
        right = right / right.norm()
        down = torch.linalg.cross(fwd, right)
        m = torch.eye(4, dtype=torch.float64)
        m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, down, fwd, pos
        k = torch.tensor([4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1], dtype=torch.float64)
        cams.append(torch.cat([m.flatten(), k]))
    return torch.stack(cams).to(dtype)


def rand_composite_inputs(B, R, S, C, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.rand(B, R, S, C, generator=gen, dtype=torch.float64).to(dtype)
    s = (torch.randn(B, R, S, generator=gen, dtype=torch.float64) * 4).to(dtype)
    t = 2.0 + torch.sort(torch.rand(B, R, S, generator=gen, dtype=torch.float64), -1).values
    return f.requires_grad_(), s.requires_grad_(), t.to(dtype)


def osg_weights(C, hidden, c_out, dtype=torch.float64, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    w = [torch.randn(hidden, C, generator=gen, dtype=torch.float64) / math.sqrt(C),
         torch.randn(hidden, generator=gen, dtype=torch.float64) * 0.1,
         torch.randn(1 + c_out, hidden, generator=gen, dtype=torch.float64) / math.sqrt(hidden),
         torch.randn(1 + c_out, generator=gen, dtype=torch.float64) * 0.1]
    w[3][0] += 2.0  # some density
    return [x.to(dtype).requires_grad_(requires_grad) for x in w]


def scene(B=2, res=4, C=8, HW=16, dtype=torch.float64, seed=0, hidden=16, c_out=5):
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randn(B, 3, C, HW, HW, generator=gen, dtype=torch.float64).to(dtype)
    o, d = ray_bundle_reference(eg3d_cameras(B, dtype, seed=seed), res)
    return planes.requires_grad_(), o, d, osg_weights(C, hidden, c_out, dtype, seed)


# ---------------------------------------------------------------------------------------------
# ray_bundle / sample_stratified
# ---------------------------------------------------------------------------------------------

def test_ray_bundle_matches_reference_and_geometry():
    cams = eg3d_cameras(3)
    o, d = ops.ray_bundle(cams, 5)
    o_ref, d_ref = ray_bundle_reference(cams, 5)
    assert o.shape == (3, 25, 3) and d.shape == (3, 25, 3)
    assert torch.equal(o, o_ref) and torch.equal(d, d_ref)
    assert_close(d.norm(dim=-1), torch.ones(3, 25, dtype=torch.float64))
    # principal point (0.5, 0.5) is the centre pixel of a 5x5 image: its ray hits the origin
    centre = d[:, 12]
    to_origin = -o[:, 12] / o[:, 12].norm(dim=-1, keepdim=True)
    assert_close(centre, to_origin, scale=1e3)
    # row-major pixel order: ray 1 is one pixel to the right (+x camera) of ray 0
    right = cams[:, :16].reshape(3, 4, 4)[:, :3, 0]
    assert ((d[:, 1] - d[:, 0]) * right).sum(-1).gt(0).all()


def test_ray_bundle_bad_input():
    with pytest.raises(ValueError, match=r"cameras: expected shape \(B, 25\)"):
        ops.ray_bundle(torch.zeros(2, 16), 4)
    cams = eg3d_cameras(2)
    cams[1, 3] = float("nan")
    with pytest.raises(ValueError, match="cameras: expected finite values.*\\[1\\]"):
        ops.ray_bundle(cams, 4)
    with pytest.raises(ValueError, match="resolution"):
        ops.ray_bundle(eg3d_cameras(1), 0)


def test_sample_stratified():
    o = torch.zeros(2, 3, 3)
    t = ops.sample_stratified(o, o, 2.25, 3.3, 48)
    assert t.shape == (2, 3, 48)
    assert torch.equal(t[1, 2], torch.linspace(2.25, 3.3, 48))
    noise = torch.rand(2, 3, 48)
    t = ops.sample_stratified(o, o, 2.25, 3.3, 48, noise=noise)
    assert_close(t, torch.linspace(2.25, 3.3, 48) + noise * (1.05 / 47))
    assert torch.equal(t, sample_stratified_reference(o, 2.25, 3.3, 48, noise))
    assert (t[..., 1:] > t[..., :-1]).all()
    with pytest.raises(ValueError, match="near < far"):
        ops.sample_stratified(o, o, 3.0, 3.0, 8)
    with pytest.raises(ValueError, match="n_samples: expected an integer >= 2"):
        ops.sample_stratified(o, o, 2.0, 3.0, 1)
    with pytest.raises(ValueError, match="far: expected a finite number"):
        ops.sample_stratified(o, o, 2.0, float("inf"), 8)
    with pytest.raises(ValueError, match=r"noise: expected shape \(B, R, S\)"):
        ops.sample_stratified(o, o, 2.0, 3.0, 8, noise=torch.rand(2, 3, 7))


def test_sample_stratified_compiles_with_symbolic_near_far():
    # under dynamic=True, near and far passed as arguments are traced as SymFloat: the range
    # check must not graph-break on them (math.isfinite did)
    torch._dynamo.reset()

    def fn(o, near, far):
        return ops.sample_stratified(o, o, near, far, 8)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    o = torch.zeros(2, 3, 3)
    for near, far in [(2.25, 3.3), (1.5, 2.5)]:
        assert torch.equal(compiled(o, near, far), fn(o, near, far))


# ---------------------------------------------------------------------------------------------
# mip_composite
# ---------------------------------------------------------------------------------------------

@needs_cpp
@pytest.mark.parametrize("white_back", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 3, 2, 1), (3, 4, 33, 4), (1, 2, 6, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mip_composite_vs_reference(shape, white_back, dtype):
    f, s, t = rand_composite_inputs(*shape, dtype=dtype)
    kw = dict(white_back=white_back, density_bias=-1.0)
    out, g, cot = grads(lambda f, s: ops.mip_composite(f, s, t, backend="cpu", **kw), [f, s])
    ref, g_ref, _ = grads(lambda f, s: mip_composite_reference(f, s, t, **kw), [f, s], cot)
    for a, b in zip(out, ref):
        assert_close(a, b)
    for a, b in zip(g, g_ref):
        # float32: the running-sum backward differs from the reference's cumprod graph by
        # cancellation in sum_{j>i} G_j w_j, a few ulps of the ray's total
        assert_close(a, b, scale=20 if dtype == torch.float32 else 1)


@needs_cpp
def test_mip_composite_grad_weights_cotangent_and_bias():
    f, s, t = rand_composite_inputs(2, 3, 9, 2, dtype=torch.float64)
    cot = [torch.zeros(2, 3, 2, dtype=torch.float64), torch.zeros(2, 3, 1, dtype=torch.float64),
           torch.randn(2, 3, 8, dtype=torch.float64)]
    out, g, _ = grads(lambda f, s: ops.mip_composite(f, s, t, density_bias=0.3), [f, s], cot)
    ref, g_ref, _ = grads(lambda f, s: mip_composite_reference(f, s, t, density_bias=0.3), [f, s],
                          cot)
    assert_close(g[1], g_ref[1])
    assert g[1].abs().max() > 0


@needs_cpp
@pytest.mark.parametrize("white_back", [False, True])
def test_mip_composite_gradcheck(white_back):
    f, s, t = rand_composite_inputs(2, 3, 6, 2, dtype=torch.float64)
    # includes a nearly transparent ray (with -30, alpha = 1 - exp(-x) rounds in float64)
    s.data[0, 0] = -8.0
    assert torch.autograd.gradcheck(
        lambda f, s: ops.mip_composite(f, s, t, white_back=white_back, backend="cpu"), (f, s))


@needs_cpp
def test_mip_composite_depth_clamp_and_zero_weight():
    f, s, t = rand_composite_inputs(2, 3, 5, 2)
    s = s.detach().clone()
    s[1, 2] = -200.0  # softplus underflows to 0: zero weight, depth NaN -> inf -> global max
    out = ops.mip_composite(f, s, t, backend="cpu")
    ref = mip_composite_reference(f, s, t)
    for a, b in zip(out, ref):
        assert_close(a, b)
    assert out[2][1, 2].eq(0).all() and out[1][1, 2, 0] == t.max()
    # the other rays' depths lie inside their own samples
    assert (out[1][0, :, 0] >= t[0].min(-1).values).all()


@needs_cpp
@pytest.mark.parametrize("white_back", [False, True])
def test_mip_composite_zero_weight_ray_backward_is_finite(white_back):
    # a fully transparent ray (softplus underflows to 0: total weight 0, depth 0/0) must give
    # finite gradients when the depth is unused (EG3D's generator loss), as the unfused graph does
    f, s, t = rand_composite_inputs(2, 3, 5, 2, dtype=torch.float64)
    s = s.detach().clone()
    s[1, 2] = -800.0
    cf, cw = torch.randn(2, 3, 2, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    grads_ = []
    for fn in (lambda f, s: ops.mip_composite(f, s, t, backend="cpu", white_back=white_back),
               lambda f, s: mip_composite_reference(f, s, t, white_back=white_back)):
        f_, s_ = f.detach().requires_grad_(), s.detach().requires_grad_()
        out, _, w = fn(f_, s_)
        ((out * cf).sum() + (w * cw).sum()).backward()
        grads_.append((f_.grad, s_.grad))
    (gf, gs), (gf_ref, gs_ref) = grads_
    assert torch.isfinite(gf).all() and torch.isfinite(gs).all()
    assert_close(gf, gf_ref)
    assert_close(gs, gs_ref)


@needs_cpp
def test_mip_composite_noncontiguous_and_empty():
    f, s, t = rand_composite_inputs(4, 6, 5, 3)
    fn = f.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    tn = t.transpose(0, 1).contiguous().transpose(0, 1)
    assert not fn.is_contiguous()
    out = ops.mip_composite(fn[:, ::2], s[:, ::2], tn[:, ::2], backend="cpu")
    ref = mip_composite_reference(fn[:, ::2], s[:, ::2], tn[:, ::2])
    for a, b in zip(out, ref):
        assert_close(a, b)
    f0, s0, t0 = rand_composite_inputs(2, 0, 5, 3)
    out = ops.mip_composite(f0, s0, t0, backend="cpu")
    assert [tuple(x.shape) for x in out] == [(2, 0, 3), (2, 0, 1), (2, 0, 4)]
    out[0].sum().backward()
    assert f0.grad.shape == f0.shape
    # every backend keeps the empty outputs in the graph of densities (the reference's depth
    # was a constant: autograd.grad of it raised "does not require grad")
    for backend in ("cpu", "reference"):
        s0 = s0.detach().requires_grad_()
        out = ops.mip_composite(f0, s0, t0, backend=backend)
        gs = torch.autograd.grad([x.sum() for x in out], s0)
        assert gs[0].shape == s0.shape


@needs_cpp
def test_forward_mode_and_func_grad_raise_naming_the_op():
    # forward-mode AD through the fused kernels would silently give a zero tangent
    f, s, t = (x.detach().double() for x in rand_composite_inputs(2, 3, 6, 4))
    planes, o, d, w = _tiny_scene()
    kw = _render_kw(1, 4, nc=6, nf=4)

    def comp(f):
        return ops.mip_composite(f, s, t, backend="cpu")[0]

    def render(p):
        return ops.render_triplane(p, o, d, w, backend="cpu", **kw)[0]

    for fn, x, name in ((comp, f, "mip_composite"), (render, planes.detach(), "render_triplane")):
        with pytest.raises(RuntimeError, match=rf"pyface.ops.{name}: forward-mode AD"):
            torch.func.jvp(fn, (x,), (torch.ones_like(x),))
        with pytest.raises(RuntimeError, match=rf"pyface.ops.{name}: torch.func.grad"):
            torch.func.grad(lambda x: fn(x).sum())(x)
    # an op on constants of the differentiated function (lifted by the transform, not
    # requiring grad) runs as a constant
    out = comp(f)
    g = torch.func.grad(lambda w: (comp(f * 1.0) * w).sum())(torch.ones_like(out))
    assert torch.equal(g, out)
    # the reference composite is plain PyTorch: forward mode works there
    _, tangent = torch.func.jvp(lambda f: ops.mip_composite(f, s, t, backend="reference")[0],
                                (f,), (torch.ones_like(f),))
    assert tangent.abs().sum() > 0


@needs_cpp
def test_mip_composite_opcheck_and_compile():
    f, s, t = rand_composite_inputs(2, 3, 6, 4)
    torch.library.opcheck(torch.ops.pyface.mip_composite, (f, s, t, None, -1.0, True))
    go, gd, gw = torch.randn(2, 3, 4), torch.randn(2, 3, 1), torch.randn(2, 3, 5)
    torch.library.opcheck(torch.ops.pyface.mip_composite_bwd,
                          (go, gd, gw, f.detach(), s.detach(), t, None, -1.0, False, True, True),
                          test_utils=("test_schema", "test_faketensor"))

    def fn(f, s, t):
        out, depth, w = ops.mip_composite(f, s, t, backend="cpu")
        return out.sum() + depth.sum() + w.square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    g = torch.autograd.grad(compiled(f, s, t), (f, s))
    g_ref = torch.autograd.grad(fn(f, s, t), (f, s))
    for a, b in zip(g, g_ref):
        assert_close(a, b)


@needs_cpp
def test_mip_composite_bad_input():
    f, s, t = rand_composite_inputs(2, 3, 5, 4)
    with pytest.raises(ValueError, match=r"densities: expected shape \(B, R, S\).*S = 4"):
        ops.mip_composite(f, s[..., :4], t)
    with pytest.raises(ValueError, match="expected S >= 2"):
        ops.mip_composite(f[:, :, :1], s[..., :1], t[..., :1])
    with pytest.raises(TypeError, match="depths: expected dtype torch.float32"):
        ops.mip_composite(f, s, t.double())
    # the dtype passed is named, not the float32 that float16 / bfloat16 are computed in
    with pytest.raises(TypeError, match=r"densities: expected dtype torch.float64 \(the dtype "
                                        r"of features\), got torch.float16"):
        ops.mip_composite(f.double(), s.half(), t.double())
    with pytest.raises(TypeError, match=r"densities: expected dtype torch.float32, torch.float16 "
                                        r"or torch.bfloat16 .*torch.bfloat16\), got torch.float64"):
        ops.mip_composite(f.bfloat16(), s.double(), t.bfloat16())
    out = ops.mip_composite(f.half(), s.bfloat16(), t)          # all computed in float32
    assert out[0].dtype == torch.float16
    # density_bias is a finite number (a NaN bias silently gave NaN images, a string float()'s
    # error without the argument's name)
    for bad in (float("nan"), float("inf"), "x", None, True):
        err = ValueError if isinstance(bad, float) else TypeError
        with pytest.raises(err, match=f"density_bias: expected a finite number, got {bad!r}"):
            ops.mip_composite(f, s, t, density_bias=bad)
    with pytest.raises(TypeError, match="features: expected a floating-point tensor"):
        ops.mip_composite(f.int(), s, t)
    # depth_range is a finite (min, max), min <= max (the backends disagreed: the reference
    # clamped every depth to NaN, or to max when min > max; the kernels ignored a NaN bound and
    # clamped to min)
    for backend in ("reference", "cpu"):
        for lo, hi in ((math.nan, 3.0), (2.0, math.nan), (2.0, math.inf), (-math.inf, 3.0),
                       (3.0, 2.0)):
            with pytest.raises(ValueError, match=r"depth_range: expected finite \(min, max\) "
                                                 rf"with min <= max, got \({lo}, {hi}\)"):
                ops.mip_composite(f, s, t, depth_range=torch.tensor([lo, hi]), backend=backend)
        out = ops.mip_composite(f, s, t, depth_range=torch.tensor([2.5, 2.5]), backend=backend)
        assert bool((out[1] == 2.5).all())
    with pytest.raises(ValueError, match=r"densities: expected shape \(B, R, S\)"):
        torch.ops.pyface.mip_composite(f, s[:1], t, None, -1.0, False)
    # float16 / bfloat16 are computed in float32 (not refused, not sent to the reference)
    for dt in (torch.float16, torch.bfloat16):
        fh, sh, th = f.detach().to(dt), s.detach().to(dt), t.to(dt)
        out = ops.mip_composite(fh, sh, th, backend="cpu")
        ref = ops.mip_composite(fh.float(), sh.float(), th.float(), backend="cpu")
        assert all(a.dtype == dt and torch.equal(a, b.to(dt)) for a, b in zip(out, ref))
        u = torch.rand(2, 3, 3)
        imp = ops.sample_importance(th, ref[2].detach().to(dt)[..., :4], 3, u=u,
                                    backend="cpu")
        assert imp.dtype == dt


# ---------------------------------------------------------------------------------------------
# sample_importance
# ---------------------------------------------------------------------------------------------

@needs_cpp
@pytest.mark.parametrize("S,M", [(4, 5), (7, 3), (48, 48), (13, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_importance_vs_reference(S, M, dtype):
    f, s, t = rand_composite_inputs(2, 6, S, 1, dtype=dtype, seed=S)
    _, _, w = mip_composite_reference(f, s, t)
    w = w.detach()
    w[0, 0] = 0  # a ray with zero weights: the +0.01 smoothing makes it uniform
    u = torch.rand(2, 6, M, dtype=dtype)
    u[0, 1, 0] = 0.0
    out = ops.sample_importance(t, w, M, u=u, backend="cpu")
    ref = sample_importance_reference(t, w, M, u)
    assert out.shape == (2, 6, M) and not out.requires_grad
    assert_close(out, ref, scale=10)
    mids = 0.5 * (t[..., 1:] + t[..., :-1])
    assert (out >= mids[..., :1] - 1e-6).all() and (out <= mids[..., -1:] + 1e-6).all()


@needs_cpp
def test_sample_importance_draws_like_eg3d():
    f, s, t = rand_composite_inputs(2, 5, 9, 1)
    _, _, w = mip_composite_reference(f, s, t)
    torch.manual_seed(3)
    out = ops.sample_importance(t, w, 7, backend="cpu")
    torch.manual_seed(3)
    u = torch.rand(2 * 5, 7)  # EG3D: torch.rand(N_rays, N_importance)
    assert_close(out, sample_importance_reference(t, w.detach(), 7, u.view(2, 5, 7)))


@needs_cpp
def test_sample_importance_concentrates_on_weights():
    t = torch.linspace(2.0, 3.0, 32).expand(1, 1, 32).contiguous()
    w = torch.zeros(1, 1, 31)
    w[..., 20] = 1.0
    out = ops.sample_importance(t, w, 64, u=torch.rand(1, 1, 64), backend="cpu")
    frac = ((out > t[0, 0, 19]) & (out < t[0, 0, 22])).float().mean()
    assert frac > 0.5


@needs_cpp
def test_sample_importance_opcheck_compile_empty():
    f, s, t = rand_composite_inputs(2, 3, 8, 1)
    w = mip_composite_reference(f, s, t)[2].detach()
    u = torch.rand(2, 3, 5)
    torch.library.opcheck(torch.ops.pyface.sample_importance, (t, w, u))
    compiled = torch.compile(lambda t, w, u: ops.sample_importance(t, w, 5, u=u, backend="cpu"),
                             fullgraph=True, backend="aot_eager")
    assert_close(compiled(t, w, u), sample_importance_reference(t, w, 5, u))
    empty = ops.sample_importance(t[:, :0], w[:, :0], 5, u=u[:, :0], backend="cpu")
    assert empty.shape == (2, 0, 5)


@needs_cpp
@needs_cpp
def test_sample_importance_nan_weight_gives_nan_ray_on_every_backend():
    # the reference's smoothing (max_pool1d, as EG3D) spreads a NaN weight over the ray's pdf;
    # the kernels' max dropped a NaN first weight and sampled as if it were absent
    t = 2.0 + torch.rand(2, 3, 8).sort(-1).values
    w, u = torch.rand(2, 3, 7), torch.rand(2, 3, 4)
    for i in (0, 3, 6):
        wn = w.clone()
        wn[1, 2, i] = math.nan
        out = ops.sample_importance(t, wn, 4, u=u, backend="cpu")
        ref = ops.sample_importance(t, wn, 4, u=u, backend="reference")
        assert bool(out[1, 2].isnan().all()) and bool(ref[1, 2].isnan().all())
        keep = torch.ones(2, 3, dtype=torch.bool)
        keep[1, 2] = False
        assert_close(out[keep], ref[keep])
        assert torch.equal(out[keep], ops.sample_importance(t, w, 4, u=u, backend="cpu")[keep])


def test_sample_importance_bad_input():
    t = torch.rand(2, 3, 8).sort(-1).values
    w = torch.rand(2, 3, 7)
    with pytest.raises(ValueError, match=r"weights: expected shape \(B, R, S-1\)"):
        ops.sample_importance(t, w[..., :6], 4)
    with pytest.raises(ValueError, match="S >= 4"):
        ops.sample_importance(t[..., :3], w[..., :2], 4)
    with pytest.raises(ValueError, match=r"u: expected shape \(B, R, M\)"):
        ops.sample_importance(t, w, 4, u=torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="n_importance"):
        ops.sample_importance(t, w, 0)
    with pytest.raises(TypeError, match=r"weights: expected dtype torch.float64 \(the dtype "
                                        r"of depths\), got torch.bfloat16"):
        ops.sample_importance(t.double(), w.bfloat16(), 4)
    with pytest.raises(ValueError, match="S >= 4"):
        torch.ops.pyface.sample_importance(t[..., :3], w[..., :2], torch.rand(2, 3, 4))


# ---------------------------------------------------------------------------------------------
# render_triplane
# ---------------------------------------------------------------------------------------------

def _render_kw(B, R, nc=8, nf=6, seed=0, dtype=torch.float64, plane_axes="eg3d", **kw):
    gen = torch.Generator().manual_seed(seed + 100)
    return dict(near=2.25, far=3.3, n_coarse=nc, n_fine=nf, plane_axes=plane_axes,
                stratified_noise=torch.rand(B, R, nc, generator=gen, dtype=dtype),
                importance_u=torch.rand(B, R, nf, generator=gen, dtype=dtype) if nf else None,
                **kw)


def _compare_render(out, ref, leaves, dtype, scale=1.0):
    out_t = [o for o in out]
    for a, b in zip(out_t, ref):
        assert_close(a, b, scale=scale)
    gen = torch.Generator().manual_seed(1)
    cot = [torch.randn(r.shape, generator=gen, dtype=torch.float64).to(dtype) for r in ref]
    g = torch.autograd.grad(out, leaves, cot, retain_graph=True, allow_unused=True)
    g_ref = torch.autograd.grad(ref, leaves, cot, retain_graph=True, allow_unused=True)
    for a, b in zip(g, g_ref):
        assert_close(a, b, scale=scale)


@needs_cpp
@pytest.mark.parametrize("plane_axes", ["eg3d", "xy_xz_zy"])
@pytest.mark.parametrize("white_back", [False, True])
@pytest.mark.parametrize("recompute", [True, False, "decoder"])
def test_render_triplane_compiled_vs_reference(plane_axes, white_back, recompute):
    planes, o, d, w = scene()
    kw = _render_kw(2, 16, plane_axes=plane_axes, white_back=white_back)
    ref = render_triplane_reference(planes, o, d, w, **kw)
    out = ops.render_triplane(planes, o, d, w, backend="cpu", recompute=recompute,
                              chunk_points=50, **kw)
    assert [tuple(x.shape) for x in out] == [(2, 16, 5), (2, 16, 1), (2, 16, 1)]
    _compare_render(out, ref, [planes, *w], torch.float64)


@needs_cpp
def test_render_triplane_ray_grads_and_coarse_only():
    planes, o, d, w = scene()
    o, d = o.clone().requires_grad_(), d.clone().requires_grad_()
    for nf in (0, 6):
        kw = _render_kw(2, 16, nf=nf)
        ref = render_triplane_reference(planes, o, d, w, **kw)
        for recompute in (True, "decoder"):
            out = ops.render_triplane(planes, o, d, w, backend="cpu", chunk_points=64,
                                      recompute=recompute, **kw)
            _compare_render(out, ref, [planes, o, d, *w], torch.float64)


@needs_cpp
@pytest.mark.parametrize("block", [1, 7, 40])
def test_render_triplane_decoder_blocks_match_reference(monkeypatch, block):
    # the OSG decoder runs in blocks of CPU_DECODER_BLOCK samples (rounded to whole rays in the
    # recompute="decoder" backward): blocks of one ray, of a ragged number of samples and of
    # several rays give the reference's values and gradients (planes, rays and weights)
    import pyface.ops.render as render_mod

    monkeypatch.setattr(render_mod, "CPU_DECODER_BLOCK", block)
    planes, o, d, w = scene()
    o, d = o.clone().requires_grad_(), d.clone().requires_grad_()
    kw = _render_kw(2, 16, plane_axes="eg3d", white_back=True)
    ref = render_triplane_reference(planes, o, d, w, **kw)
    for recompute in ("decoder", True):
        for chunk in (None, 100):
            out = ops.render_triplane(planes, o, d, w, backend="cpu", recompute=recompute,
                                      chunk_points=chunk, **kw)
            _compare_render(out, ref, [planes, o, d, *w], torch.float64)


@needs_cpp
def test_render_triplane_float32_and_random_draws():
    planes, o, d, w = scene(dtype=torch.float32)
    kw = dict(near=2.25, far=3.3, n_coarse=12, n_fine=12, plane_axes="eg3d")
    torch.manual_seed(5)
    ref = render_triplane_reference(planes, o, d, w, **kw)
    torch.manual_seed(5)
    out = ops.render_triplane(planes, o, d, w, backend="cpu", **kw)
    _compare_render(out, ref, [planes, *w], torch.float32, scale=20)


@needs_cpp
def test_render_triplane_arbitrary_decoder_identical_to_fused():
    from pyface.nn import OSGDecoder

    planes, o, d, _ = scene()
    dec = OSGDecoder(8, 16, 5).double()
    kw = _render_kw(2, 16)
    fused = ops.render_triplane(planes, o, d, dec.effective_weights(), backend="cpu", **kw)
    module = ops.render_triplane(planes, o, d, dec, backend="cpu", recompute=False, **kw)
    module_rc = ops.render_triplane(planes, o, d, dec, backend="cpu", chunk_points=50, **kw)
    ref = render_triplane_reference(planes, o, d, dec, **kw)
    for a, b, c, e in zip(fused, module, ref, module_rc):
        assert_close(a, b)
        assert_close(a, c)
        assert_close(a, e)
    leaves = [planes, *dec.parameters()]
    cot = [torch.randn_like(x) for x in fused]
    g1 = torch.autograd.grad(fused, leaves, cot)
    g2 = torch.autograd.grad(module, leaves, cot)
    g3 = torch.autograd.grad(module_rc, leaves, cot)
    for a, b, c in zip(g1, g2, g3):
        assert_close(a, b)
        assert_close(a, c)


@needs_cpp
def test_render_triplane_rays_missing_box_and_empty():
    planes, o, d, w = scene()
    # rays starting far away pointing away from the box: every sample reads zero features
    o_miss = o + 10.0
    kw = _render_kw(2, 16)
    out = ops.render_triplane(planes, o_miss, -d, w, backend="cpu", **kw)
    ref = render_triplane_reference(planes, o_miss, -d, w, **kw)
    for a, b in zip(out, ref):
        assert_close(a, b)
    # zero features everywhere: one constant colour, so features = colour * weights_sum
    colour = out[0] / out[2]
    assert_close(colour, colour[:1, :1].expand_as(colour), scale=1e3)
    g = torch.autograd.grad(out[0].sum(), planes, allow_unused=True)[0]
    assert g is None or g.abs().max() == 0
    empty = ops.render_triplane(planes, o[:, :0], d[:, :0], w, backend="cpu",
                                **_render_kw(2, 0))
    assert [tuple(x.shape) for x in empty] == [(2, 0, 5), (2, 0, 1), (2, 0, 1)]


@needs_cpp
def test_render_triplane_two_coarse_samples():
    planes, o, d, w = scene()
    kw = _render_kw(2, 16, nc=2, nf=0)
    ref = render_triplane_reference(planes, o, d, w, **kw)
    out = ops.render_triplane(planes, o, d, w, backend="cpu", **kw)
    _compare_render(out, ref, [planes, *w], torch.float64)


def test_render_triplane_bad_input():
    planes, o, d, w = scene()
    kw = dict(near=2.25, far=3.3, n_coarse=8, n_fine=4, plane_axes="eg3d")
    with pytest.raises(ValueError, match="ray_origins: expected a tensor on meta"):
        ops.render_triplane(planes.to("meta"), o, d, w, **kw)
    with pytest.raises(ValueError, match="decoder: expected tensors on meta"):
        ops.render_triplane(planes.to("meta"), o.to("meta"), d.to("meta"), w, **kw)
    with pytest.raises(ValueError, match=r"ray_dirs: expected shape \(B, R, 3\)"):
        ops.render_triplane(planes, o, d[:, :3], w, **kw)
    with pytest.raises(ValueError, match="near < far"):
        ops.render_triplane(planes, o, d, w, **{**kw, "near": 3.3})
    with pytest.raises(ValueError, match="n_coarse"):
        ops.render_triplane(planes, o, d, w, **{**kw, "n_coarse": 1})
    with pytest.raises(ValueError, match="n_coarse: expected >= 4 when n_fine > 0"):
        ops.render_triplane(planes, o, d, w, **{**kw, "n_coarse": 3})
    with pytest.raises(ValueError, match=r"decoder w1: expected shape \(HID, C\)"):
        ops.render_triplane(planes, o, d, [w[0][:, :4], *w[1:]], **kw)
    with pytest.raises(TypeError, match="ray_origins: expected dtype torch.float64"):
        ops.render_triplane(planes, o.float(), d, w, **kw)
    with pytest.raises(ValueError, match=r"importance_u: expected shape \(B, R, M\)"):
        ops.render_triplane(planes, o, d, w, importance_u=torch.rand(2, 16, 3), **kw)
    with pytest.raises(TypeError, match="decoder: expected"):
        ops.render_triplane(planes, o, d, 3, **kw)
    with pytest.raises(ValueError, match="density_bias: expected a finite number, got nan"):
        ops.render_triplane(planes, o, d, w, density_bias=float("nan"), **kw)
    with pytest.raises(TypeError, match="density_bias: expected a finite number, got '-1'"):
        ops.render_triplane(planes, o, d, w, density_bias="-1", **kw)
    # empty planes, every backend alike (the reference raised grid_sample's words, naming no
    # argument)
    for backend in ("reference", "cpu"):
        for sl in ((slice(None),) * 3 + (slice(0, 0),), (slice(None),) * 4 + (slice(0, 0),)):
            with pytest.raises(ValueError, match=r"planes: expected shape \(B, 3, C, H, W\) with "
                                                 r"C, H, W >= 1, got \(2, 3, 8, "):
                ops.render_triplane(planes[sl], o, d, w, backend=backend, **kw)


@needs_cpp
@pytest.mark.parametrize("what", ["stratified_noise", "importance_u", "ray_origins"])
def test_render_triplane_nan_input_depth_as_reference(what):
    # a NaN depth sample makes the reference's depth clamp (min / max of all depths, as EG3D)
    # NaN, so its whole depth map is NaN; the compiled path clamped its ray chunks to a NaN
    # depth_range that the kernels ignore, and gave finite depths
    planes, o, d, w = scene()
    kw = _render_kw(2, 16, nc=8, nf=4)
    args = {"ray_origins": o.clone(), **kw}
    args[what] = args[what].clone()
    args[what][1, 5, 0] = math.nan
    o2 = args.pop("ray_origins")
    with torch.no_grad():
        out = ops.render_triplane(planes, o2, d, w, backend="cpu", **args)
        ref = render_triplane_reference(planes, o2, d, w, **args)
    assert bool(ref[1].isnan().all()) and bool(out[1].isnan().all())
    for a, b in ((out[0], ref[0]), (out[2], ref[2])):
        assert torch.equal(a.isnan(), b.isnan())
        assert_close(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpp)])
def test_render_triplane_checks_the_callable_decoders_outputs(backend):
    # a callable decoder's outputs are checked against its contract (a reshape error deep in
    # the renderer before, or a flattened rgb silently taken)
    planes, o, d, _ = scene()
    kw = dict(near=2.25, far=3.3, n_coarse=8, n_fine=4, plane_axes="eg3d")
    for bad in (lambda f: (f.mean(1).flatten(0, 1), f.mean(1)[..., :1]),
                lambda f: (f.mean(1), f.mean(1)),
                lambda f: {"rgb": f.mean(1)[:, 1:], "sigma": f.mean(1)[:, 1:, :1]}):
        with pytest.raises(ValueError, match=r"decoder: expected rgb \(B, N, C_out\) = "
                                             r"\(2, \d+, C_out\) and sigma"):
            ops.render_triplane(planes.detach(), o, d, bad, backend=backend, **kw)
    good = lambda f: {"rgb": f.mean(1), "sigma": f.mean(1)[..., :1]}  # noqa: E731
    out = ops.render_triplane(planes.detach(), o, d, good, backend=backend, **kw)
    assert out[0].shape == (2, 16, 8)


# ---------------------------------------------------------------------------------------------
# fused Triton renderer (interpreter, tiny shapes)
# ---------------------------------------------------------------------------------------------

@pytest.mark.triton_interpret
@pytest.mark.parametrize("plane_axes,white_back,nf", [("eg3d", False, 8), ("xy_xz_zy", True, 5),
                                                      ("eg3d", True, 0)])
def test_render_triplane_triton_vs_reference(plane_axes, white_back, nf):
    planes, o, d, w = scene(B=2, res=2, C=8, HW=8, dtype=torch.float32)
    o, d = o.clone().requires_grad_(), d.clone().requires_grad_()
    kw = _render_kw(2, 4, nc=8, nf=nf, dtype=torch.float32, plane_axes=plane_axes,
                    white_back=white_back)
    out = ops.render_triplane(planes, o, d, w, backend="triton", **kw)
    ref = render_triplane_reference(planes, o, d, w, **kw)
    # float32 kernel vs float32 reference: summation order differs (tile reductions)
    _compare_render(out, ref, [planes, o, d, *w], torch.float32, scale=20)


@pytest.mark.triton_interpret
def test_render_triplane_triton_edge_cases():
    planes, o, d, w = scene(B=1, res=2, C=4, HW=8, dtype=torch.float32, hidden=8, c_out=3)
    # rays that miss the box, a ray that sees nothing (huge negative density bias: zero
    # weights, depth = the global max), and S = 2 coarse samples
    kw = _render_kw(1, 4, nc=2, nf=0, dtype=torch.float32)
    out = ops.render_triplane(planes, o + 10.0, -d, w, backend="triton", **kw)
    ref = render_triplane_reference(planes, o + 10.0, -d, w, **kw)
    _compare_render(out, ref, [planes, *w], torch.float32, scale=20)
    kw = _render_kw(1, 4, nc=6, nf=4, dtype=torch.float32, density_bias=-300.0)
    out = ops.render_triplane(planes, o, d, [x.detach() for x in w], backend="triton", **kw)
    ref = render_triplane_reference(planes, o, d, [x.detach() for x in w], **kw)
    for a, b in zip(out, ref):
        assert_close(a, b)
    assert out[2].eq(0).all() and out[1].eq(ref[1].max()).all()
    empty = ops.render_triplane(planes, o[:, :0], d[:, :0], w, backend="triton",
                                **_render_kw(1, 0, dtype=torch.float32))
    assert [tuple(x.shape) for x in empty] == [(1, 0, 3), (1, 0, 1), (1, 0, 1)]


def test_render_triplane_triton_refuses_what_it_cannot_do():
    planes, o, d, w = scene(dtype=torch.float32)
    kw = _render_kw(2, 16, dtype=torch.float32)
    with pytest.raises(_backend.BackendUnavailableError):
        ops.render_triplane(planes, o, d, lambda f: (f.mean(1), f.mean(1)[..., 0]),
                            backend="triton", **kw)
    big = [torch.zeros(200, 8), torch.zeros(200), torch.zeros(6, 200), torch.zeros(6)]
    with pytest.raises(_backend.BackendUnavailableError, match="up to 128"):
        ops.render_triplane(planes, o, d, big, backend="triton", **kw)


@pytest.mark.triton_interpret
def test_render_triplane_forced_triton_refuses_what_it_cannot_do(monkeypatch):
    # use_backend("triton") / PYFACE_BACKEND=triton force the backend as an explicit backend=
    # does: a callable decoder (or too wide a one) raises instead of silently rendering with
    # another backend (the reference, which the forcing was meant to compare against)
    planes, o, d, w = scene(dtype=torch.float32)
    kw = _render_kw(2, 16, dtype=torch.float32)
    decoder = lambda f: (f.mean(1), f.mean(1)[..., 0])  # noqa: E731
    big = [torch.zeros(200, 8), torch.zeros(200), torch.zeros(6, 200), torch.zeros(6)]
    with ops.use_backend("triton"):
        with pytest.raises(_backend.BackendUnavailableError,
                           match="render_triplane: backend 'triton'.*not a callable"):
            ops.render_triplane(planes, o, d, decoder, **kw)
        with pytest.raises(_backend.BackendUnavailableError, match="up to 128"):
            ops.render_triplane(planes, o, d, big, **kw)
    monkeypatch.setenv("PYFACE_BACKEND", "triton")
    with pytest.raises(_backend.BackendUnavailableError, match="not a callable"):
        ops.render_triplane(planes, o, d, decoder, **kw)


# ---------------------------------------------------------------------------------------------
# render_triplane: gradcheck, compile, opcheck, random numbers, precision
# ---------------------------------------------------------------------------------------------

def _tiny_scene(dtype=torch.float64):
    return scene(B=1, res=2, C=4, HW=6, dtype=dtype, hidden=8, c_out=2)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpp)])
def test_render_triplane_gradcheck_float64(backend):
    # coarse pass only: the importance samples are detached (EG3D), so a finite difference
    # through them would not match the analytic gradient by design
    planes, o, d, w = _tiny_scene()
    o, d = o.clone().requires_grad_(), d.clone().requires_grad_()
    kw = _render_kw(1, 4, nc=5, nf=0)

    def fn(p, o, d, *w, recompute=True):
        return ops.render_triplane(p, o, d, list(w), backend=backend, chunk_points=8,
                                   recompute=recompute, **kw)

    assert torch.autograd.gradcheck(fn, (planes, o, d, *w), eps=1e-6, atol=1e-6, fast_mode=True)
    if backend == "cpu":
        assert torch.autograd.gradcheck(lambda *a: fn(*a, recompute="decoder"),
                                        (planes, o, d, *w), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("backend,recompute", [
    ("reference", True), pytest.param("cpu", True, marks=needs_cpp),
    pytest.param("cpu", "decoder", marks=needs_cpp)])
def test_render_triplane_torch_compile_fullgraph(backend, recompute):
    torch._dynamo.reset()
    planes, o, d, w = _tiny_scene()
    kw = _render_kw(1, 4, nc=6, nf=4)

    def fn(p, *w):
        return ops.render_triplane(p, o, d, list(w), backend=backend, recompute=recompute, **kw)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _compare_render(compiled(planes, *w), render_triplane_reference(planes, o, d, w, **kw),
                    [planes, *w], torch.float64)


@needs_cpp
def test_render_triplane_compiles_once_for_any_ray_count():
    # the chunk loop runs over the number of chunks, not over range(0, R, chunk): under
    # dynamic=True a new ray count R reuses the graph (it was specialised: one graph per R)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    planes, _, _, w = scene(B=2, res=3, C=4, HW=6, hidden=8, c_out=2)

    def fn(p, o, d, noise, u, *w):
        return ops.render_triplane(p, o, d, list(w), near=2.25, far=3.3, n_coarse=6, n_fine=4,
                                   plane_axes="eg3d", stratified_noise=noise, importance_u=u,
                                   backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    _render_new_ray_counts(compiled, fn, planes, w)
    assert counters["stats"]["unique_graphs"] == 1


@needs_cpp
def test_render_triplane_several_chunks_recompile_per_chunk_count_only():
    # torch.compile's automatic dynamic shapes: after one recompile R is symbolic, and ray
    # counts with the same number of chunks (3 chunks of at most 5 rays here) share the graph
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    planes, _, _, w = scene(B=2, res=3, C=4, HW=6, hidden=8, c_out=2)

    def fn(p, o, d, noise, u, *w):
        return ops.render_triplane(p, o, d, list(w), near=2.25, far=3.3, n_coarse=6, n_fine=4,
                                   plane_axes="eg3d", stratified_noise=noise, importance_u=u,
                                   backend="cpu", chunk_points=100)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _render_new_ray_counts(compiled, fn, planes, w, (11, 13, 15))
    assert counters["stats"]["unique_graphs"] == 2


def _render_new_ray_counts(compiled, fn, planes, w, ray_counts=(9, 16)):
    cams = eg3d_cameras(2, torch.float64)
    for R in ray_counts:
        o, d = (x[:, :R].contiguous() for x in ray_bundle_reference(cams, 4))
        gen = torch.Generator().manual_seed(R)
        noise = torch.rand(2, R, 6, generator=gen, dtype=torch.float64)
        u = torch.rand(2, R, 4, generator=gen, dtype=torch.float64)
        out, ref = compiled(planes, o, d, noise, u, *w), fn(planes, o, d, noise, u, *w)
        for a, b in zip(out, ref):
            assert_close(a, b)
        g = torch.autograd.grad(sum(x.square().sum() for x in out), [planes, *w])
        g_ref = torch.autograd.grad(sum(x.square().sum() for x in ref), [planes, *w])
        for a, b in zip(g, g_ref):
            assert_close(a, b)


@pytest.mark.triton_interpret
def test_render_triplane_triton_op_opcheck():
    # schema and autograd registration of the triton_op; the fake-tensor and compile checks need
    # compiled kernels (the interpreter reads real memory): test_gpu_render_triplane_triton_op
    from pyface._ops.render import triton_op

    planes, o, d, w = _tiny_scene(torch.float32)
    kw = _render_kw(1, 4, nc=6, nf=4, dtype=torch.float32)
    triton_op()
    tc = sample_stratified_reference(o, 2.25, 3.3, 6, kw["stratified_noise"])
    args = (planes, *w, o, d, tc, kw["importance_u"], "eg3d", 1.0, -1.0, False)
    torch.library.opcheck(torch.ops.pyface.render_triplane_triton.default, args,
                          test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpp),
                                     pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_render_triplane_draws_eg3d_random_numbers_once(backend):
    planes, o, d, w = _tiny_scene(torch.float32)
    kw = dict(near=2.25, far=3.3, n_coarse=6, n_fine=4, plane_axes="eg3d")
    torch.manual_seed(3)
    noise, u = torch.rand(1, 4, 6), torch.rand(1, 4, 4)
    after = torch.rand(8)
    ref = render_triplane_reference(planes, o, d, w, stratified_noise=noise, importance_u=u, **kw)
    torch.manual_seed(3)
    out = ops.render_triplane(planes, o, d, w, backend=backend, **kw)
    assert torch.equal(torch.rand(8), after)  # exactly those draws, in EG3D's order
    for a, b in zip(out, ref):
        assert_close(a, b, scale=20)


@pytest.mark.triton_interpret
def test_render_triplane_triton_nan_ray_gets_nan_gradient():
    # the shared tap and plane-to-point gradient helpers propagate NaN coordinates (as the
    # tri-plane kernel always did, and as the reference does); other rays are unaffected
    planes, o, d, w = scene(B=1, res=2, C=8, HW=8, dtype=torch.float32)
    o = o.clone()
    o[0, 1, 0] = float("nan")
    o.requires_grad_()
    kw = _render_kw(1, 4, nc=6, nf=0, dtype=torch.float32)
    out = ops.render_triplane(planes, o, d, w, backend="triton", **kw)
    ref = render_triplane_reference(planes, o, d, w, **kw)
    (g,) = torch.autograd.grad(out[0].sum(), o)
    (g_ref,) = torch.autograd.grad(ref[0].sum(), o)
    assert torch.isnan(g[0, 1]).all() and torch.isnan(out[0][0, 1]).all()
    assert torch.isnan(ref[0][0, 1]).all() and torch.isnan(g_ref[0, 1]).all()
    assert_close(out[1], ref[1])  # a NaN ray's depth is the clamp's upper end, as EG3D's
    keep = [0, 2, 3]
    assert_close(g[0, keep], g_ref[0, keep], scale=20)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpp),
                                     pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_render_triplane_half_precision_computes_in_float32(dtype, backend):
    planes, o, d, w = scene(B=1, res=2, C=8, HW=8, dtype=torch.float32)
    half = planes.detach().to(dtype).requires_grad_()
    w = [x.detach().requires_grad_() for x in w]
    kw = _render_kw(1, 4, nc=6, nf=4, dtype=torch.float32)
    out = ops.render_triplane(half, o, d, w, backend=backend, **kw)
    assert [x.dtype for x in out] == [dtype] * 3
    planes32 = half.detach().float().requires_grad_()
    ref = ops.render_triplane(planes32, o, d, w, backend=backend, **kw)
    for a, b in zip(out, ref):
        assert torch.equal(a, b.to(dtype))
    (g,) = torch.autograd.grad(out[0].float().sum(), half)
    (g_ref,) = torch.autograd.grad(ref[0].to(dtype).float().sum(), planes32)
    assert g.dtype == dtype
    assert_close(g.float(), g_ref.to(dtype).float())


@needs_cpp
def test_render_triplane_under_autocast_runs_the_compiled_path(monkeypatch):
    from pyface.nn import OSGDecoder

    chosen = []
    select = _backend.select_backend

    def spy(op, device, backend, dtype=None):
        chosen.append((op, select(op, device, backend, dtype)))
        return chosen[-1][1]

    monkeypatch.setattr(_backend, "select_backend", spy)
    planes, o, d, w = scene(B=1, res=2, C=8, HW=8, dtype=torch.float32)
    kw = _render_kw(1, 4, nc=6, nf=4, dtype=torch.float32)
    ref = ops.render_triplane(planes, o, d, w, **kw)
    chosen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.render_triplane(planes.to(torch.bfloat16), o, d, w, **kw)
        # a decoder module runs under the caller's autocast (bfloat16 matmuls)
        dec = OSGDecoder(8, 16, 5)
        out_m = ops.render_triplane(planes, o, d, dec, **kw)
    assert chosen and all(b == "cpu" for _, b in chosen)
    assert [x.dtype for x in out] == [torch.bfloat16] * 3 and out_m[0].dtype == torch.float32
    for a, b in zip(out, ref):
        assert_close(a.float(), b.to(torch.bfloat16).float(), scale=1e4)
    torch.autograd.grad(out_m[0].sum(), list(dec.parameters()))
    # the compositing ops under autocast: float32 in, float32 out, no dtype error
    f, s, t = rand_composite_inputs(1, 3, 6, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        comp = ops.mip_composite(f.to(torch.bfloat16), s, t)
        direct = torch.ops.pyface.mip_composite(f.to(torch.bfloat16), s.to(torch.bfloat16), t,
                                                None, -1.0, False)
    assert comp[0].dtype == torch.float32 and direct[0].dtype == torch.float32
    assert_close(comp[0], mip_composite_reference(f.to(torch.bfloat16).float(), s, t)[0])


@needs_cpp
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compositing_ops_keep_float64_under_autocast(backend):
    # autocast's float32 rule (registered for the compiled ops) leaves float64 alone, so the
    # public ops return float64 for float64 inputs under autocast too, the values they return
    # without it (they used to come back cast down to float32)
    f, s, t = (x.detach() for x in rand_composite_inputs(1, 3, 6, 2, dtype=torch.float64))
    w = torch.rand(1, 3, 5, dtype=torch.float64)
    u = torch.rand(1, 3, 4, dtype=torch.float64)
    plain = ops.mip_composite(f, s, t, backend=backend)
    plain_u = ops.sample_importance(t, w, 4, u=u, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        comp = ops.mip_composite(f, s, t, backend=backend)
        imp = ops.sample_importance(t, w, 4, u=u, backend=backend)
    assert [x.dtype for x in comp] == [torch.float64] * 3 and imp.dtype == torch.float64
    for a, b in zip((*comp, imp), (*plain, plain_u)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("white_back", [False, True])
def test_gpu_composite_and_importance_vs_reference(white_back):
    f, s, t = rand_composite_inputs(3, 257, 96, 32)
    f, s, t = (x.detach().cuda().requires_grad_(x.requires_grad) for x in (f, s, t))
    out, g, cot = grads(lambda f, s: ops.mip_composite(f, s, t, white_back=white_back,
                                                       backend="cuda"), [f, s])
    ref, g_ref, _ = grads(lambda f, s: mip_composite_reference(f, s, t, white_back=white_back),
                          [f, s], cot)
    for a, b in zip(out, ref):
        assert_close(a, b, scale=10)
    for a, b in zip(g, g_ref):
        assert_close(a, b, scale=50)
    w = ref[2].detach()[..., :47].contiguous()
    u = torch.rand(3, 257, 48, device="cuda")
    tc = t[..., :48].contiguous()
    assert_close(ops.sample_importance(tc, w, 48, u=u, backend="cuda"),
                 sample_importance_reference(tc, w, 48, u), scale=10)


@pytest.mark.gpu
def test_gpu_render_triplane_triton_op():
    from pyface._ops.render import triton_op

    torch._dynamo.reset()
    planes, o, d, w = scene(B=1, res=4, C=16, HW=16, dtype=torch.float32, hidden=16, c_out=4)
    planes, o, d = planes.detach().cuda().requires_grad_(), o.cuda(), d.cuda()
    w = [x.detach().cuda().requires_grad_() for x in w]
    kw = _render_kw(1, 16, nc=8, nf=8, dtype=torch.float32)
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    triton_op()
    tc = sample_stratified_reference(o, 2.25, 3.3, 8, kw["stratified_noise"])
    torch.library.opcheck(torch.ops.pyface.render_triplane_triton.default,
                          (planes, *w, o, d, tc, kw["importance_u"], "eg3d", 1.0, -1.0, False))
    fn = torch.compile(lambda p, *w: ops.render_triplane(p, o, d, list(w), backend="triton",
                                                         **kw), fullgraph=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    _compare_render(fn(planes, *w), render_triplane_reference(planes, o, d, w, **kw),
                    [planes, *w], torch.float32, scale=100)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_render_triplane_vs_reference(backend):
    planes, o, d, w = scene(B=2, res=8, C=32, HW=64, dtype=torch.float32, hidden=64, c_out=32)
    planes = planes.detach().cuda().requires_grad_()
    o, d = o.cuda(), d.cuda()
    w = [x.detach().cuda().requires_grad_() for x in w]
    kw = _render_kw(2, 64, nc=48, nf=48, dtype=torch.float32)
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    torch.backends.cuda.matmul.allow_tf32 = False
    out = ops.render_triplane(planes, o, d, w, backend=backend, **kw)
    ref = render_triplane_reference(planes, o, d, w, **kw)
    _compare_render(out, ref, [planes, *w], torch.float32, scale=100)


@needs_cpp
def test_render_triplane_recompute_decoder_double_backward_names_the_op():
    planes, o, d, w = _tiny_scene()
    planes = planes.clone().requires_grad_()
    kw = _render_kw(1, 4, nc=5, nf=0)
    out = ops.render_triplane(planes, o, d, list(w), backend="cpu", recompute="decoder", **kw)
    (g,) = torch.autograd.grad(out[0].square().sum(), planes, create_graph=True)
    with pytest.raises(RuntimeError, match="render_triplane \\(cpu backend\\): double backward"):
        torch.autograd.grad(g.square().sum(), planes)
    with pytest.raises(ValueError, match="recompute: expected True, False or 'decoder'"):
        ops.render_triplane(planes, o, d, list(w), backend="cpu", recompute="all", **kw)


@needs_cpp
@pytest.mark.parametrize("recompute", [True, False, "decoder"])
def test_render_triplane_create_graph_first_order_then_double_backward_names_an_op(recompute):
    # first-order gradients under create_graph=True (the first half of an R1-style penalty) are
    # those without it, also through the checkpointed chunks of recompute=True (the fused
    # backwards once read their saved tensors twice, which torch.utils.checkpoint refuses);
    # the second differentiation then raises the error that names the fused op
    planes, o, d, w = _tiny_scene()
    planes = planes.clone().requires_grad_()
    kw = _render_kw(1, 4, nc=5, nf=2)
    out = ops.render_triplane(planes, o, d, list(w), backend="cpu", recompute=recompute, **kw)
    (g,) = torch.autograd.grad(out[0].square().sum(), planes, create_graph=True)
    out = ops.render_triplane(planes, o, d, list(w), backend="cpu", recompute=recompute, **kw)
    (g_plain,) = torch.autograd.grad(out[0].square().sum(), planes)
    torch.testing.assert_close(g, g_plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="\\(cpu backend\\): double backward"):
        torch.autograd.grad(g.square().sum(), planes)
