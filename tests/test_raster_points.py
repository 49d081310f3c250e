"""points_to_triplane and splat_points: C++ vs brute force / reference, hand-made cases,
gradients, opcheck, compile, bad input."""
import re

import pytest
import torch

import pyface.ops as ops
from pyface import _backend
from pyface.ops.reference import points_to_triplane_reference, splat_points_reference
from pyface.ops.reference.raster import texel_centres
from pyface.ops.reference.triplane import project_onto_planes
from pyface.testing import assert_close, grads

needs_cpp = pytest.mark.cpp  # fails, never skips, when pyface._C is missing (conftest.py)
BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpp)]


# ---------------------------------------------------------------------------------------------
# points_to_triplane
# ---------------------------------------------------------------------------------------------
def cloud(kind, B=2, N=300, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        p = torch.rand(B, N, 3, generator=g) - 0.5
    elif kind == "clustered":  # a few tight clusters, far apart: long empty stretches
        centres = torch.rand(B, 4, 3, generator=g) - 0.5
        which = torch.randint(0, 4, (B, N), generator=g)
        p = centres.gather(1, which[..., None].expand(-1, -1, 3))
        p = p + 0.01 * torch.randn(B, N, 3, generator=g)
    elif kind == "duplicates":  # few distinct positions, many exact copies
        base = torch.rand(B, 7, 3, generator=g) - 0.5
        which = torch.randint(0, 7, (B, N), generator=g)
        p = base.gather(1, which[..., None].expand(-1, -1, 3))
    elif kind == "outside":  # much of the cloud outside the box
        p = (torch.rand(B, N, 3, generator=g) - 0.5) * 3.0
    elif kind == "surface":  # a depth-map-like sheet (GOHA lifts a 128^2 depth map)
        s = int(N ** 0.5)
        u, v = torch.meshgrid(torch.linspace(-0.4, 0.4, s), torch.linspace(-0.4, 0.4, s),
                              indexing="ij")
        z = 0.1 * torch.sin(3 * u) * torch.cos(2 * v)
        p = torch.stack([u, v, z], -1).reshape(1, -1, 3).expand(B, -1, -1).clone()
        p = p + 1e-3 * torch.randn(p.shape, generator=g)
    else:
        raise ValueError(kind)
    return p.to(dtype)


def brute_force_d2(points, resolution, plane_axes, box_size, align_corners, valid=None):
    """Min squared distance per texel (B, 3, H, W) by cdist + min, float64 (GOHA's method)."""
    H, W = resolution
    uv = project_onto_planes(points.double() * (2.0 / box_size), plane_axes)  # (B, 3, N, 2)
    tv, tu = torch.meshgrid(texel_centres(H, align_corners), texel_centres(W, align_corners),
                            indexing="ij")
    tex = torch.stack([tu.reshape(-1), tv.reshape(-1)], -1)
    d2 = torch.cdist(tex[None, None].expand(*uv.shape[:2], -1, -1), uv,
                     compute_mode="donot_use_mm_for_euclid_dist") ** 2  # (B, 3, HW, N)
    if valid is not None:
        d2 = torch.where(valid[:, None, None], d2, torch.full_like(d2, float("inf")))
    return d2.min(-1).values.view(*uv.shape[:2], H, W), uv


def chosen_d2(index, uv, resolution, align_corners):
    H, W = resolution
    tv, tu = torch.meshgrid(texel_centres(H, align_corners), texel_centres(W, align_corners),
                            indexing="ij")
    B = index.shape[0]
    sel = uv.gather(2, index.clamp(min=0).view(B, 3, -1, 1).expand(-1, -1, -1, 2))
    d2 = (sel[..., 0] - tu.reshape(-1)) ** 2 + (sel[..., 1] - tv.reshape(-1)) ** 2
    return torch.where(index.view(B, 3, -1) >= 0, d2, torch.full_like(d2, float("inf"))).view(
        B, 3, H, W)


def check_against_brute_force(points, features, resolution, backend, valid=None,
                              max_distance=None, **kw):
    kw.setdefault("plane_axes", "xy_xz_zy")
    kw.setdefault("box_size", 1.0)
    kw.setdefault("align_corners", False)
    planes, index = ops.points_to_triplane(points, features, resolution, valid=valid,
                                           max_distance=max_distance, backend=backend, **kw)
    B, N, C = features.shape
    H, W = resolution
    assert planes.shape == (B, 3, C, H, W) and index.shape == (B, 3, H, W)
    assert index.dtype == torch.int64
    best, uv = brute_force_d2(points, resolution, kw["plane_axes"], kw["box_size"],
                              kw["align_corners"], valid)
    got = chosen_d2(index, uv, resolution, kw["align_corners"])
    expect = best.clone()
    if max_distance is not None:
        expect = torch.where(best <= max_distance ** 2, best, torch.full_like(best, float("inf")))
    # the chosen distance equals the minimal distance (near-ties may pick another index)
    fin = torch.isfinite(expect)
    assert torch.equal(torch.isfinite(got), fin)
    torch.testing.assert_close(got[fin], expect[fin], rtol=1e-12, atol=1e-15)
    if valid is not None:
        v = valid[:, None].expand(-1, 3, -1)
        chosen_valid = v.gather(2, index.clamp(min=0).view(B, 3, -1)).view(B, 3, H, W)
        assert chosen_valid[index >= 0].all()
    # planes hold the chosen point's features, zeros where empty
    exp_planes = torch.where(
        (index >= 0)[:, :, None],
        features.gather(1, index.clamp(min=0).view(B, -1, 1).expand(-1, -1, C))
        .view(B, 3, H, W, C).permute(0, 1, 4, 2, 3),
        torch.zeros((), dtype=features.dtype))
    torch.testing.assert_close(planes, exp_planes, rtol=0, atol=0)
    return planes, index


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["uniform", "clustered", "duplicates", "outside", "surface"])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("plane_axes", ["xy_xz_zy", "eg3d"])
def test_p2t_vs_brute_force(backend, kind, align_corners, plane_axes):
    points = cloud(kind, seed=len(kind))
    features = torch.randn(2, points.shape[1], 5)
    check_against_brute_force(points, features, (13, 18), backend, plane_axes=plane_axes,
                              align_corners=align_corners)


@needs_cpp
@pytest.mark.parametrize("kind", ["uniform", "clustered", "duplicates", "surface"])
def test_p2t_cpu_equals_reference_index(kind):
    # both compute the same float64 distances: identical choices, ties included
    points = cloud(kind, N=400, seed=3)
    features = torch.randn(2, 400, 3)
    for kw in (dict(plane_axes="xy_xz_zy"), dict(align_corners=True, plane_axes="eg3d",
                                                 box_size=1.3),
               dict(plane_axes="xy_xz_zy", max_distance=0.05)):
        a = ops.points_to_triplane(points, features, (16, 11), backend="cpu", **kw)
        b = points_to_triplane_reference(points, features, (16, 11), **kw)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_p2t_ties_lowest_index(backend):
    # every point duplicated: the chosen index is always the first copy
    base = torch.rand(1, 50, 3) - 0.5
    points = torch.cat([base, base, base], 1)
    features = torch.randn(1, 150, 2)
    _, index = ops.points_to_triplane(points, features, 12, backend=backend, plane_axes="xy_xz_zy")
    assert (index < 50).all()
    # two points symmetric about a texel centre: equal distances -> lower index
    p = torch.tensor([[[0.1, 0.0, 0.0], [-0.1, 0.0, 0.0]]])  # plane xy, texel at u = 0 (W odd)
    _, index = ops.points_to_triplane(p, torch.randn(1, 2, 1), 5, backend=backend,
                                      align_corners=True, plane_axes="xy_xz_zy")
    assert index[0, 0, 2, 2] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_p2t_single_point_all_invalid_max_distance(backend):
    p = torch.tensor([[[0.2, -0.1, 0.3]]])
    f = torch.tensor([[[1.0, 2.0]]])
    planes, index = ops.points_to_triplane(p, f, (4, 6), backend=backend, plane_axes="xy_xz_zy")
    assert (index == 0).all() and (planes[:, :, 0] == 1).all() and (planes[:, :, 1] == 2).all()
    points = cloud("uniform", N=40)
    feats = torch.randn(2, 40, 3)
    valid = torch.zeros(2, 40, dtype=torch.bool)
    planes, index = ops.points_to_triplane(points, feats, 7, valid=valid, backend=backend,
                                           plane_axes="xy_xz_zy")
    assert (index == -1).all() and (planes == 0).all()
    valid[0, ::3] = True
    check_against_brute_force(points, feats, (7, 9), backend, valid=valid)
    for md in (0.0, 0.05, 0.3):
        check_against_brute_force(points, feats, (10, 9), backend, max_distance=md)
    # non-finite points never win
    bad = points.clone()
    bad[0, 0] = float("nan")
    bad[1, 1, 2] = float("inf")
    _, index = ops.points_to_triplane(bad, feats, 9, backend=backend, plane_axes="xy_xz_zy")
    assert (index[0] != 0).all() and (index[1, 1:] != 1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_p2t_goha_configuration(backend):
    # GOHA: linspace texel grid (align_corners=True), coordinates x2 (box 1), planes xy, xz, zy,
    # every texel filled, 128^2 planes (small here) from a lifted depth map
    points = cloud("surface", B=1, N=900, seed=2)
    feats = torch.randn(1, 900, 4)
    planes, index = check_against_brute_force(points, feats, (24, 24), backend, align_corners=True)
    assert (index >= 0).all()


@needs_cpp
def test_p2t_noncontiguous_and_dtypes():
    points = cloud("uniform", N=60).transpose(0, 1).contiguous().transpose(0, 1)
    feats = torch.randn(5, 2, 60).permute(1, 2, 0)
    assert not points.is_contiguous() and not feats.is_contiguous()
    a = ops.points_to_triplane(points, feats, 9, backend="cpu", plane_axes="xy_xz_zy")
    b = points_to_triplane_reference(points.contiguous(), feats.contiguous(), 9,
                                     plane_axes="xy_xz_zy")
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    for dt in (torch.float64, torch.float16, torch.bfloat16):
        a = ops.points_to_triplane(points.to(dt), feats.to(dt), 9, backend="cpu",
                                   plane_axes="xy_xz_zy")
        b = points_to_triplane_reference(points.to(dt), feats.to(dt), 9, plane_axes="xy_xz_zy")
        assert a[0].dtype == dt
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


@needs_cpp
def test_p2t_backward_gradcheck_opcheck_compile():
    points = cloud("clustered", N=80)
    feats = torch.randn(2, 80, 3, requires_grad=True)
    (pa, _), (_, ga), cot = grads(lambda p, f: ops.points_to_triplane(p, f, (7, 8), backend="cpu",
                                                                      plane_axes="xy_xz_zy"),
                                  [points, feats])
    (pb, _), (_, gb), _ = grads(lambda p, f: points_to_triplane_reference(p, f, (7, 8),
                                                                          plane_axes="xy_xz_zy"),
                                [points, feats], cot)
    assert_close(pa, pb)
    assert_close(ga, gb)
    f64 = torch.randn(1, 20, 2, dtype=torch.float64, requires_grad=True)
    p64 = cloud("uniform", B=1, N=20, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda f: ops.points_to_triplane(p64, f, (5, 4), backend="cpu",
                                         plane_axes="xy_xz_zy")[0], (f64,))
    valid = torch.rand(2, 80) > 0.3
    torch.library.opcheck(torch.ops.pyface.points_to_triplane_index.default,
                          (points, valid, 6, 7, "eg3d", 1.0, True, 0.2))
    torch.library.opcheck(torch.ops.pyface.points_to_triplane_index.default,
                          (points, None, 6, 7, "xy_xz_zy", 1.0, False, -1.0))
    index = torch.ops.pyface.points_to_triplane_index(points, None, 6, 7, "xy_xz_zy", 1.0, False,
                                                      -1.0)
    torch.library.opcheck(torch.ops.pyface.gather_features.default,
                          (feats, index.view(2, 3, 42), 0.0))

    def fn(p, f):
        idx = torch.ops.pyface.points_to_triplane_index(p, None, 6, 7, "xy_xz_zy", 1.0, False, -1.0)
        return torch.ops.pyface.gather_features(f, idx.view(2, 3, 42), 0.0)

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(points, feats)
    ref = points_to_triplane_reference(points, feats, (6, 7), plane_axes="xy_xz_zy")[0]
    assert_close(out.view(2, 3, 3, 6, 7), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_p2t_bad_input(backend):
    points = cloud("uniform", N=10)
    feats = torch.randn(2, 10, 3)
    f = lambda *a, **k: ops.points_to_triplane(  # noqa: E731
        *a, backend=backend, **{"plane_axes": "xy_xz_zy", **k})
    with pytest.raises(ValueError, match=r"features: expected shape \(B, N, C\)"):
        f(points, feats[:, :5], 8)
    with pytest.raises(ValueError, match=r"points: expected shape \(B, N, 3\)"):
        f(points[..., :2], feats, 8)
    with pytest.raises(TypeError, match="valid: expected dtype"):
        f(points, feats, 8, valid=torch.ones(2, 10))
    with pytest.raises(ValueError, match="valid: expected shape"):
        f(points, feats, 8, valid=torch.ones(2, 9, dtype=torch.bool))
    for res in (0, (8, -1), "8"):
        with pytest.raises(ValueError, match="resolution"):
            f(points, feats, res)
    # triplane_sample's plane size limit (a torch "storage size overflowed" error, or an
    # allocation of that size, naming nothing before)
    for res in (2**24 + 1, (4, 2**31)):
        with pytest.raises(ValueError, match=r"resolution: expected H, W <= 2\^24 = 16777216 "
                                             r".*got " + re.escape(repr(res))):
            f(points, feats, res)
    with pytest.raises(ValueError, match="max_distance"):
        f(points, feats, 8, max_distance=-0.1)
    with pytest.raises(ValueError, match="plane_axes"):
        f(points, feats, 8, plane_axes="xyz")
    with pytest.raises(ValueError, match="box_size"):
        f(points, feats, 8, box_size=0)
    with pytest.raises(TypeError, match="features: expected a floating-point"):
        f(points, feats.long(), 8)


@needs_cpp
def test_p2t_bad_input_direct_op():
    points = cloud("uniform", N=10)
    with pytest.raises(ValueError, match="at least one point"):
        torch.ops.pyface.points_to_triplane_index(points[:, :0], None, 4, 4, "eg3d", 1.0, False,
                                                  -1.0)
    with pytest.raises(ValueError, match="image_size"):
        torch.ops.pyface.points_to_triplane_index(points, None, 0, 4, "eg3d", 1.0, False, -1.0)
    with pytest.raises(ValueError, match="plane_axes"):
        torch.ops.pyface.points_to_triplane_index(points, None, 4, 4, "xyz", 1.0, False, -1.0)
    with pytest.raises(ValueError, match="box_size: expected a positive finite number, got 0"):
        torch.ops.pyface.points_to_triplane_index(points, None, 4, 4, "eg3d", 0.0, False, -1.0)
    # NaN is no limit's -1 for the kernels' comparison: refused as the public op refuses it
    with pytest.raises(ValueError, match="max_distance: expected a number >= 0 .*got nan"):
        torch.ops.pyface.points_to_triplane_index(points, None, 4, 4, "eg3d", 1.0, False,
                                                  float("nan"))
    with pytest.raises(TypeError, match="valid: expected dtype bool"):
        torch.ops.pyface.points_to_triplane_index(points, torch.ones(2, 10), 4, 4, "eg3d", 1.0,
                                                  False, -1.0)
    with pytest.raises(ValueError, match=r"valid: expected shape \(B, N\) = \(2, 10\)"):
        torch.ops.pyface.points_to_triplane_index(points, torch.ones(2, 9, dtype=torch.bool), 4, 4,
                                                  "eg3d", 1.0, False, -1.0)
    with pytest.raises(ValueError, match="radius: expected a finite number >= 0, got -1"):
        torch.ops.pyface.splat_points_index(points, 4, 4, -1.0)
    with pytest.raises(ValueError, match="image_size"):
        torch.ops.pyface.splat_points_index(points, 4, 0, 1.0)
    index = torch.zeros(2, 3, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"grad: expected shape \(B, G, C, P\) matching index"):
        torch.ops.pyface.gather_features_bwd(torch.randn(2, 3, 4, 6), index, 10)
    with pytest.raises(TypeError, match="grad: expected a floating-point tensor"):
        torch.ops.pyface.gather_features_bwd(torch.ones(2, 3, 4, 5, dtype=torch.long), index, 10)
    with pytest.raises(ValueError, match="num_points: expected a count >= 0, got -1"):
        torch.ops.pyface.gather_features_bwd(torch.randn(2, 3, 4, 5), index, -1)


# ---------------------------------------------------------------------------------------------
# splat_points
# ---------------------------------------------------------------------------------------------
def ndc_of(px, size):
    """Pixel-centre coordinate (centre of pixel j at j) -> NDC."""
    return (2.0 * px + 1.0) / size - 1.0


@needs_cpp
@pytest.mark.parametrize("radius", [0.0, 0.5, 1.3, 2.0])
@pytest.mark.parametrize("size", [(9, 13), (16, 16), (1, 5)])
def test_splat_vs_reference(radius, size):
    g = torch.Generator().manual_seed(int(radius * 10) + size[0])
    points = torch.rand(2, 200, 3, generator=g) * 2.4 - 1.2
    feats = torch.randn(2, 200, 4, generator=g)
    a = ops.splat_points(points, feats, size, radius=radius, background=-1.0, backend="cpu")
    b = splat_points_reference(points, feats, size, radius=radius, background=-1.0)
    torch.testing.assert_close(a[2], b[2], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    if radius >= 0.5:
        assert (a[2] >= 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_splat_hand_made(backend):
    H, W = 6, 8
    # point 0 at pixel (2, 3) depth 2, point 1 same pixel nearer, point 2 elsewhere, point 3
    # equal depth to point 4 at the same place (-> 3), point 5 outside, point 6 NaN
    pts = torch.tensor([[[ndc_of(3, W), ndc_of(2, H), 2.0],
                         [ndc_of(3.2, W), ndc_of(2.1, H), 1.0],
                         [ndc_of(6, W), ndc_of(4, H), 5.0],
                         [ndc_of(1, W), ndc_of(1, H), 3.0],
                         [ndc_of(1, W), ndc_of(1, H), 3.0],
                         [3.0, 0.0, 0.1],
                         [float("nan"), 0.0, 0.1]]])
    feats = torch.arange(7.0).view(1, 7, 1)
    image, depth, index = ops.splat_points(pts, feats, (H, W), radius=0.5, background=-1,
                                           backend=backend)
    expect = torch.full((H, W), -1, dtype=torch.int64)
    expect[2, 3], expect[4, 6], expect[1, 1] = 1, 2, 3
    torch.testing.assert_close(index[0], expect, rtol=0, atol=0)
    assert depth[0, 0, 2, 3] == 1.0 and torch.isinf(depth[0, 0, 0, 0])
    assert image[0, 0, 2, 3] == 1.0 and image[0, 0, 0, 0] == -1
    # radius 1 around a pixel centre: the pixel and its 4 neighbours (diagonals are sqrt(2) away)
    _, _, index = ops.splat_points(pts[:, 2:3], feats[:, 2:3], (H, W), radius=1.0,
                                   backend=backend)
    assert (index >= 0).sum() == 5
    assert (index[0, 3:6, 6] == 0).all() and (index[0, 4, 5:8] == 0).all()


@needs_cpp
def test_splat_backward_gradcheck_opcheck_compile():
    g = torch.Generator().manual_seed(0)
    points = torch.rand(2, 60, 3, generator=g) * 2 - 1
    feats = torch.randn(2, 60, 3, generator=g, requires_grad=True)
    (ia, _, _), (_, ga), cot = grads(lambda p, f: ops.splat_points(p, f, 10, radius=1.0,
                                                                   backend="cpu"), [points, feats])
    (ib, _, _), (_, gb), _ = grads(lambda p, f: splat_points_reference(p, f, 10, radius=1.0),
                                   [points, feats], cot)
    assert_close(ia, ib)
    assert_close(ga, gb)
    f64 = feats.detach().double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda f: ops.splat_points(points.double(), f, 7, radius=1.5, backend="cpu")[0], (f64,))
    torch.library.opcheck(torch.ops.pyface.splat_points_index.default, (points, 7, 9, 1.2))
    index, _ = torch.ops.pyface.splat_points_index(points, 7, 9, 1.2)
    torch.library.opcheck(torch.ops.pyface.gather_features.default,
                          (feats, index.view(2, 1, 63), 0.5))

    def fn(p, f):
        idx, depth = torch.ops.pyface.splat_points_index(p, 7, 9, 1.2)
        return torch.ops.pyface.gather_features(f, idx.view(2, 1, 63), 0.0), depth

    out, depth = torch.compile(fn, fullgraph=True, backend="aot_eager")(points, feats)
    ref = splat_points_reference(points, feats, (7, 9), radius=1.2)
    assert_close(out.view(2, 3, 7, 9), ref[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_splat_bad_input(backend):
    points = torch.rand(2, 10, 3)
    feats = torch.randn(2, 10, 3)
    f = lambda *a, **k: ops.splat_points(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"features: expected shape \(B, N, C\)"):
        f(points, feats[:1], 8)
    with pytest.raises(ValueError, match="image_size"):
        f(points, feats, (0, 3))
    for r in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="radius"):
            f(points, feats, 8, radius=r)
    with pytest.raises(TypeError, match="points_ndc: expected a floating-point"):
        f(points.long(), feats, 8)


@needs_cpp
def test_forward_mode_and_func_grad_raise_naming_the_op():
    # forward-mode AD through the fused gather would silently give a zero tangent
    points = torch.rand(2, 9, 3) - 0.5
    feats = torch.randn(2, 9, 3)
    for name, fn in (("splat_points", lambda x: ops.splat_points(points, x, 5, backend="cpu")[0]),
                     ("points_to_triplane", lambda x: ops.points_to_triplane(
                         points, x, 4, plane_axes="eg3d", backend="cpu")[0])):
        with pytest.raises(RuntimeError, match=rf"pyface.ops.{name}: forward-mode AD"):
            torch.func.jvp(fn, (feats,), (torch.ones_like(feats),))
        with pytest.raises(RuntimeError, match=rf"pyface.ops.{name}: torch.func.grad"):
            torch.func.grad(lambda x: fn(x).sum())(feats)


@pytest.mark.parametrize("backend", BACKENDS)
def test_splat_and_p2t_empty_batch_and_channels(backend):
    # B = 0 (the reference's reshape(B, -1) used to fail: "cannot reshape tensor of 0 elements")
    points = torch.rand(0, 4, 3)
    out = ops.splat_points(points, torch.randn(0, 4, 2), 5, backend=backend)
    assert out[0].shape == (0, 2, 5, 5) and out[1].shape == (0, 1, 5, 5)
    assert out[2].shape == (0, 5, 5)
    out = ops.splat_points(torch.rand(1, 4, 3), torch.randn(1, 4, 0), 5, backend=backend)
    assert out[0].shape == (1, 0, 5, 5)
    planes, index = ops.points_to_triplane(points, torch.randn(0, 4, 2), (3, 5),
                                           plane_axes="eg3d", backend=backend)
    assert planes.shape == (0, 3, 2, 3, 5) and index.shape == (0, 3, 3, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_splat_radius_beyond_the_image(backend):
    # a radius far larger than the image covers every pixel, also from a point far outside
    # (the reference used to build int(radius)-sized offset windows: OverflowError at 1e30)
    points = torch.tensor([[[0.3, -0.2, 2.0], [-50.0, 40.0, 1.0], [0.9, 0.9, 3.0]]])
    feats = torch.arange(3.0).view(1, 3, 1)
    for radius in (200.0, 1e6, 1e30):
        image, depth, index = ops.splat_points(points, feats, (4, 5), radius=radius,
                                               backend=backend)
        assert (index == 1).all() and (depth == 1.0).all() and (image == 1.0).all()
    # 2.0 pixels: the far point covers nothing, the others their neighbourhoods as before
    _, _, index = ops.splat_points(points, feats, (4, 5), radius=2.0, backend=backend)
    assert not (index == 1).any() and (index == 0).any() and (index == 2).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plane_axes", ["xy_xz_zy", "eg3d"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_p2t_consistent_with_triplane_sample(backend, plane_axes, align_corners):
    # points placed on texel centres of all three planes: triplane_sample (same plane_axes,
    # box_size and align_corners) reads each point's own features back from the lifted planes
    R, box = 9, 1.3
    g = torch.Generator().manual_seed(0)
    centres = texel_centres(R, align_corners, dtype=torch.float32)
    pick = torch.randperm(R, generator=g)[:3]
    grid = torch.stack(torch.meshgrid(centres[pick], centres[pick], centres[pick], indexing="ij"),
                       -1).reshape(1, -1, 3)
    points = grid * (box / 2)
    feats = torch.randn(1, points.shape[1], 4, generator=g)
    planes, index = ops.points_to_triplane(points, feats, R, plane_axes=plane_axes, box_size=box,
                                           align_corners=align_corners, max_distance=1e-4,
                                           backend=backend)
    sampled = ops.triplane_sample(planes, points, plane_axes=plane_axes, box_size=box,
                                  reduce="none", align_corners=align_corners, backend="reference")
    # several points share each texel of a plane: the texel holds the lowest index among them
    for pl in range(3):
        chosen = sampled[0, pl]  # (N, C)
        owner = index[0, pl][index[0, pl] >= 0]
        assert owner.numel() == 9  # 3 x 3 distinct texels per plane
        winners = torch.isclose(chosen, feats[0], atol=1e-6).all(-1)
        assert winners.sum() == 9 and set(torch.nonzero(winners)[:, 0].tolist()) == set(
            owner.tolist())


@needs_cpp
def test_torch_compile_public_api():
    points = cloud("uniform", N=50)
    feats = torch.randn(2, 50, 3, requires_grad=True)

    def fn(p, f):
        planes, _ = ops.points_to_triplane(p, f, (6, 5), max_distance=0.5, backend="cpu",
                                           plane_axes="xy_xz_zy")
        image, _, _ = ops.splat_points(p, f, (7, 9), radius=1.0, backend="cpu")
        return planes.square().sum() + image.sin().sum()

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(points, feats)
    g = torch.autograd.grad(out, feats)[0]
    ref = fn(points, feats)
    assert_close(out, ref)
    assert_close(g, torch.autograd.grad(ref, feats)[0])


@needs_cpp
def test_torch_compile_dynamic_shapes_fullgraph():
    # dynamic=True traces the default box_size as a SymFloat: its check must not graph-break;
    # a new point count reuses the graph (the backward's point count is a SymInt in the
    # schema of gather_features_bwd; as an int it was specialised: one graph per N)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()

    def fn(points, feats):
        planes, _ = ops.points_to_triplane(points, feats, 6, plane_axes="eg3d")
        image, _, _ = ops.splat_points(points, feats, (5, 7))
        return planes.square().sum() + image.square().sum()

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for k, N in enumerate([10, 13, 17]):
        gen = torch.Generator().manual_seed(k)
        points = torch.rand(2, N, 3, generator=gen) - 0.5
        feats = torch.randn(2, N, 3, generator=gen, requires_grad=True)
        out = compiled(points, feats)
        ref = fn(points, feats)
        assert_close(out, ref)
        assert_close(torch.autograd.grad(out, feats)[0], torch.autograd.grad(ref, feats)[0])
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_points_give_empty_outputs(backend):
    """N = 0 is not an error: the outputs are those of a cloud with no valid point (planes 0,
    index -1; image = background, depth inf), and the backward reaches the empty features."""
    points = cloud("uniform", N=10)
    feats = torch.randn(2, 10, 3)
    none = ops.points_to_triplane(points, feats, (6, 7), plane_axes="eg3d", backend=backend,
                                  valid=torch.zeros(2, 10, dtype=torch.bool))
    empty_feats = feats[:, :0].clone().requires_grad_()
    planes, index = ops.points_to_triplane(points[:, :0], empty_feats, (6, 7),
                                           plane_axes="eg3d", backend=backend)
    assert torch.equal(planes, none[0]) and torch.equal(index, none[1])
    planes.sum().backward()
    assert empty_feats.grad is not None and empty_feats.grad.shape == (2, 0, 3)
    image, depth, idx = ops.splat_points(torch.rand(2, 0, 3), feats[:, :0], (5, 4),
                                         background=0.5, backend=backend)
    assert image.shape == (2, 3, 5, 4) and (image == 0.5).all()
    assert depth.shape == (2, 1, 5, 4) and torch.isinf(depth).all()
    assert idx.shape == (2, 5, 4) and (idx == -1).all() and idx.dtype == torch.int64
    with pytest.raises(ValueError, match="resolution"):     # other arguments still checked
        ops.points_to_triplane(points[:, :0], feats[:, :0], 0, plane_axes="eg3d",
                               backend=backend)
    # ... the backend too (an unknown or unavailable one was accepted when N = 0)
    with pytest.raises(ValueError, match="backend: expected one of"):
        ops.splat_points(torch.rand(2, 0, 3), feats[:, :0], 4, backend="bogus")
    with pytest.raises(_backend.BackendUnavailableError, match="points_to_triplane: backend "
                                                               "'cuda' cannot run on cpu"):
        ops.points_to_triplane(points[:, :0], feats[:, :0], 4, plane_axes="eg3d",
                               backend="cuda")
