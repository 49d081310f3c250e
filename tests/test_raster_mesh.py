"""rasterize_mesh and project_points: C++ vs reference, hand-made coverage cases, analytic
perspective-correct depth, gradients, compile, bad input."""
import math

import pytest
import torch

import pyface.ops as ops
from pyface.ops.reference import rasterize_mesh_reference
from pyface.testing import assert_close, grads

needs_cpp = pytest.mark.cpp  # fails, never skips, when pyface._C is missing (conftest.py)
BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpp)]


def random_scene(B=2, V=40, F=60, seed=0, dtype=torch.float32, z_range=(0.5, 3.0), C=4):
    g = torch.Generator().manual_seed(seed)
    verts = torch.rand(B, V, 3, generator=g, dtype=torch.float64) * 2.4 - 1.2
    verts[..., 2] = torch.rand(B, V, generator=g, dtype=torch.float64) * (z_range[1] - z_range[0]) \
        + z_range[0]
    faces = torch.randint(0, V, (F, 3), generator=g)
    attrs = torch.randn(B, V, C, generator=g, dtype=torch.float64)
    return verts.to(dtype), faces, attrs.to(dtype)


def px_to_ndc(X, size):
    """Pixel coordinate (centre of pixel j at X = j + 0.5) -> NDC."""
    return 2.0 * X / size - 1.0


def mesh(pts_px, H, W, z=1.0, dtype=torch.float64):
    """(V, 2) pixel coordinates -> (1, V, 3) NDC vertices at depth z."""
    p = torch.as_tensor(pts_px, dtype=dtype)
    x = px_to_ndc(p[:, 0], W)
    y = px_to_ndc(p[:, 1], H)
    zz = torch.full_like(x, z) if not torch.is_tensor(z) else z.to(dtype)
    return torch.stack([x, y, zz], -1)[None]


def compare(a, b, dtype):
    attr, mask, depth, fi, bary = a
    attr2, mask2, depth2, fi2, bary2 = b
    torch.testing.assert_close(fi, fi2, rtol=0, atol=0)
    torch.testing.assert_close(mask, mask2, rtol=0, atol=0)
    assert_close(bary, bary2, dtype=dtype)
    sel = fi >= 0
    assert_close(depth[:, 0][sel], depth2[:, 0][sel], dtype=dtype)
    assert torch.isinf(depth[:, 0][~sel]).all() and torch.isinf(depth2[:, 0][~sel]).all()
    assert_close(attr, attr2, dtype=dtype, scale=4)


# ---------------------------------------------------------------------------------------------
# compiled vs reference on random scenes
# ---------------------------------------------------------------------------------------------
@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [(17, 23), (32, 32), (1, 7)])
@pytest.mark.parametrize("cull", ["none", "cw", "ccw"])
@pytest.mark.parametrize("persp", [True, False])
def test_random_vs_reference(dtype, size, cull, persp):
    verts, faces, attrs = random_scene(dtype=dtype, seed=size[0] + 7 * size[1])
    if not persp:
        verts[..., 2] -= 1.5  # any sign is fine without perspective correction
    args = dict(cull=cull, perspective_correct=persp)
    a = ops.rasterize_mesh(verts, faces, size, attrs, backend="cpu", **args)
    b = rasterize_mesh_reference(verts, faces, size, attrs, **args)
    compare(a, b, dtype)
    assert (a[3] >= 0).any()


@needs_cpp
def test_large_random_scene_vs_reference():
    verts, faces, attrs = random_scene(B=1, V=300, F=500, seed=3)
    verts[..., :2] *= 0.5
    a = ops.rasterize_mesh(verts, faces, (45, 61), attrs, backend="cpu")
    b = rasterize_mesh_reference(verts, faces, (45, 61), attrs)
    compare(a, b, torch.float32)


@needs_cpp
def test_noncontiguous_and_int32_faces():
    verts, faces, attrs = random_scene(seed=5)
    v_nc = verts.transpose(0, 1).contiguous().transpose(0, 1)
    f_nc = faces.t().contiguous().t().to(torch.int32)
    a_nc = attrs.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not v_nc.is_contiguous() and not f_nc.is_contiguous() and not a_nc.is_contiguous()
    a = ops.rasterize_mesh(v_nc, f_nc, 19, a_nc, backend="cpu")
    b = rasterize_mesh_reference(verts, faces, 19, attrs)
    compare(a, b, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    verts, faces, attrs = random_scene()
    out = ops.rasterize_mesh(verts, faces[:0], (5, 6), attrs, backend=backend)
    assert out[0].shape == (2, 4, 5, 6) and (out[0] == 0).all()
    assert (out[3] == -1).all() and (out[1] == 0).all() and torch.isinf(out[2]).all()
    out = ops.rasterize_mesh(verts[:0], faces, (5, 6), attrs[:0], backend=backend)
    assert out[0].shape == (0, 4, 5, 6) and out[3].shape == (0, 5, 6)
    assert out[4].shape == (0, 5, 6, 3)
    out = ops.rasterize_mesh(verts, faces, (5, 6), None, backend=backend)
    assert out[0].shape == (2, 0, 5, 6)
    out = ops.rasterize_mesh(verts, faces, (5, 6), attrs[..., :0], backend=backend)
    assert out[0].shape == (2, 0, 5, 6)
    # the attribute image of an empty mesh is still in the graph of the attributes, on every
    # backend (the reference returned a constant: autograd.grad raised "does not require grad")
    a = attrs.detach().clone()
    a[0, 0, 0] = float("inf")       # an empty mesh reads no attribute: no NaN from inf * 0
    a.requires_grad_()
    out = ops.rasterize_mesh(verts, faces[:0], (5, 6), a, backend=backend)
    (g,) = torch.autograd.grad(out[0].sum(), a)
    assert not g.any() and not out[0].isnan().any()


# ---------------------------------------------------------------------------------------------
# hand-made cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_quad_on_pixel_centres_top_left_rule(backend):
    # quad with corners on pixel centres (2.5, 2.5) .. (10.5, 10.5), split on its diagonal, which
    # runs through the pixel centres (k + 0.5, k + 0.5): every pixel is covered exactly once and
    # the top-left rule keeps the left column / top row, drops the right column / bottom row
    H = W = 14
    verts = mesh([(2.5, 2.5), (10.5, 2.5), (10.5, 10.5), (2.5, 10.5)], H, W)
    for faces in (torch.tensor([[0, 1, 2], [0, 2, 3]]), torch.tensor([[0, 2, 1], [3, 2, 0]])):
        m = [ops.rasterize_mesh(verts, faces[k:k + 1], (H, W), backend=backend)[1][0, 0]
             for k in range(2)]
        cover = m[0] + m[1]
        expected = torch.zeros(H, W, dtype=cover.dtype)
        expected[2:10, 2:10] = 1
        torch.testing.assert_close(cover, expected, rtol=0, atol=0)
        both = ops.rasterize_mesh(verts, faces, (H, W), backend=backend)
        torch.testing.assert_close(both[1][0, 0], expected, rtol=0, atol=0)
        diag = torch.arange(2, 10)
        assert (both[3][0, diag, diag] >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fan_around_shared_vertex_covers_once(backend):
    # 12 triangles around a vertex on a pixel centre, random outer ring: the union has no holes
    # and no pixel is drawn twice
    H = W = 24
    n = 12
    ang = torch.linspace(0, 2 * math.pi, n + 1)[:-1]
    g = torch.Generator().manual_seed(1)
    r = 6 + 4 * torch.rand(n, generator=g, dtype=torch.float64)
    pts = [(12.5, 12.5)] + [(12.5 + float(r[k] * ang[k].cos()), 12.5 + float(r[k] * ang[k].sin()))
                            for k in range(n)]
    verts = mesh(pts, H, W)
    faces = torch.tensor([[0, 1 + k, 1 + (k + 1) % n] for k in range(n)])
    total = sum(ops.rasterize_mesh(verts, faces[k:k + 1], (H, W), backend=backend)[1]
                for k in range(n))
    assert total.max() == 1
    assert total[0, 0, 12, 12] == 1 and total[0, 0, 9:16, 9:16].min() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_depth_order(backend):
    H = W = 16
    # triangle A (index 0) far, triangle B (index 1) near, overlapping; then swapped indices
    a = mesh([(1, 1), (15, 1), (1, 15)], H, W, z=3.0)
    b = mesh([(15, 15), (15, 2), (2, 15)], H, W, z=2.0)
    verts = torch.cat([a, b], 1)
    for faces, near in ((torch.tensor([[0, 1, 2], [3, 4, 5]]), 1),
                        (torch.tensor([[3, 4, 5], [0, 1, 2]]), 0)):
        attrs = torch.tensor([0.0] * 3 + [1.0] * 3, dtype=torch.float64).view(1, 6, 1)
        attr, mask, depth, fi, _ = ops.rasterize_mesh(verts, faces, (H, W), attrs, backend=backend)
        both = (fi == near) & (depth[:, 0] == 2.0)
        assert both.sum() > 20
        # where the near triangle covers, it wins
        near_only = ops.rasterize_mesh(verts, faces[near:near + 1], (H, W), backend=backend)[1]
        torch.testing.assert_close((fi[0] == near).double(), near_only[0, 0], rtol=0, atol=0)
        sel = attr[0, 0][fi[0] == near]
        torch.testing.assert_close(sel, torch.ones_like(sel))


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_depth_lowest_face_wins(backend):
    verts = mesh([(1, 1), (9, 1), (1, 9)], 10, 10, z=2.0)
    faces = torch.tensor([[0, 1, 2], [0, 1, 2], [2, 0, 1]])
    fi = ops.rasterize_mesh(verts, faces, 10, backend=backend)[3]
    assert ((fi == 0) | (fi == -1)).all() and (fi == 0).sum() > 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_and_behind_camera(backend):
    H = W = 12
    pts = [(1, 1), (11, 1), (1, 11), (6, 6), (11, 11)]
    z = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    verts = mesh(pts, H, W, z=z)
    degenerate = torch.tensor([[0, 3, 4],  # collinear
                               [0, 0, 1],  # repeated vertex
                               [2, 2, 2]])
    out = ops.rasterize_mesh(verts, degenerate, (H, W), backend=backend)
    assert (out[3] == -1).all()
    for zbad in (-1.0, 0.0, float("nan"), float("inf")):
        zz = z.clone()
        zz[1] = zbad
        v = mesh(pts, H, W, z=zz)
        out = ops.rasterize_mesh(v, torch.tensor([[0, 1, 2]]), (H, W), backend=backend)
        assert (out[3] == -1).all(), zbad
    # without perspective correction negative depths are drawn
    zz = z.clone() - 5
    out = ops.rasterize_mesh(mesh(pts, H, W, z=zz), torch.tensor([[0, 1, 2]]), (H, W),
                             perspective_correct=False, backend=backend)
    d = out[2][0, 0][out[3][0] == 0]
    assert d.numel() > 10
    torch.testing.assert_close(d, torch.full_like(d, -4.0))
    # a vertex far outside the guard band: not drawn (no overflow)
    v = mesh(pts, H, W)
    v[0, 1, 0] = 1e9
    out = ops.rasterize_mesh(v, torch.tensor([[0, 1, 2]]), (H, W), backend=backend)
    assert (out[3] == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_culling(backend):
    H = W = 10
    verts = mesh([(1, 1), (9, 1), (1, 9)], H, W)  # clockwise on the displayed image
    cw = torch.tensor([[0, 1, 2]])
    ccw = torch.tensor([[0, 2, 1]])
    for faces, culled_by in ((cw, "cw"), (ccw, "ccw")):
        for cull in ("none", "cw", "ccw"):
            fi = ops.rasterize_mesh(verts, faces, (H, W), cull=cull, backend=backend)[3]
            assert (fi >= 0).any() == (cull != culled_by)


@pytest.mark.parametrize("backend", BACKENDS)
def test_perspective_correct_matches_ray_cast(backend):
    # a 3D triangle seen by an EG3D-style camera at the origin: the rendered depth and an
    # interpolated world coordinate must equal the ray-plane intersection at each pixel centre
    H, W = 20, 28
    tri = torch.tensor([[-0.6, -0.5, 1.5], [0.7, -0.3, 4.0], [0.1, 0.6, 2.2]], dtype=torch.float64)
    cam = torch.zeros(25, dtype=torch.float64)
    cam[:16] = torch.eye(4, dtype=torch.float64).reshape(-1)
    cam[16:] = torch.tensor([0.9, 0, 0.5, 0, 1.1, 0.45, 0, 0, 1], dtype=torch.float64)
    verts = ops.project_points(tri[None], cam)
    attr, mask, depth, fi, bary = ops.rasterize_mesh(verts, torch.tensor([[0, 1, 2]]), (H, W),
                                                     tri[None], backend=backend)
    i, j = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    u = (j + 0.5) / W
    v = (i + 0.5) / H
    d = torch.stack([(u - 0.5) / 0.9, (v - 0.45) / 1.1, torch.ones_like(u)], -1).double()
    n = torch.linalg.cross(tri[1] - tri[0], tri[2] - tri[0])
    t = (n @ tri[0]) / (d @ n)
    sel = fi[0] == 0
    assert sel.sum() > 30
    # barycentrics come from the vertices snapped to 1/256 pixel: on a triangle ~20 pixels wide
    # that moves them by up to ~1e-4 relative
    torch.testing.assert_close(depth[0, 0][sel], t[sel], rtol=5e-4, atol=0)
    hit = t[..., None] * d
    torch.testing.assert_close(attr[0].permute(1, 2, 0)[sel], hit[sel], rtol=0, atol=1e-3)
    # vertices already on the 1/256 grid: no snapping error, a 100x tighter match
    ndc = verts.clone()
    for k, size in ((0, W), (1, H)):
        ndc[..., k] = (torch.round((ndc[..., k] + 1) * size / 2 * 256) / 256) * 2 / size - 1
    # re-derive the 3D triangle whose projection is the snapped one (same depths)
    X = (ndc[0, :, 0] + 1) / 2
    Y = (ndc[0, :, 1] + 1) / 2
    z = ndc[0, :, 2]
    tri2 = torch.stack([(X - 0.5) / 0.9 * z, (Y - 0.45) / 1.1 * z, z], -1)
    attr, mask, depth, fi, bary = ops.rasterize_mesh(ndc, torch.tensor([[0, 1, 2]]), (H, W),
                                                     tri2[None], backend=backend)
    n = torch.linalg.cross(tri2[1] - tri2[0], tri2[2] - tri2[0])
    t = (n @ tri2[0]) / (d @ n)
    sel = fi[0] == 0
    torch.testing.assert_close(depth[0, 0][sel], t[sel], rtol=1e-6, atol=0)
    torch.testing.assert_close(attr[0].permute(1, 2, 0)[sel], (t[..., None] * d)[sel], rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(bary.sum(-1)[0][sel], torch.ones_like(t[sel]))


# ---------------------------------------------------------------------------------------------
# gradients, opcheck, compile
# ---------------------------------------------------------------------------------------------
@needs_cpp
def test_backward_vs_reference():
    verts, faces, attrs = random_scene(seed=11)
    attrs.requires_grad_(True)
    verts.requires_grad_(True)
    (a,), (g_v, g_f, g_a), cot = grads(
        lambda v, f, x: ops.rasterize_mesh(v, f, (15, 19), x, backend="cpu")[0],
        [verts, faces, attrs])
    (b,), (_, _, g_a_ref), _ = grads(
        lambda v, f, x: rasterize_mesh_reference(v, f, (15, 19), x)[0], [verts, faces, attrs],
        cot)
    assert_close(a, b)
    assert_close(g_a, g_a_ref)
    assert g_v is None or (g_v == 0).all()


@needs_cpp
def test_gradcheck_float64():
    verts, faces, attrs = random_scene(B=1, V=10, F=8, seed=2, dtype=torch.float64, C=2)
    attrs.requires_grad_(True)
    fn = lambda x: ops.rasterize_mesh(verts, faces, (6, 7), x, backend="cpu")[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (attrs,))


@needs_cpp
def test_opcheck():
    verts, faces, attrs = random_scene(B=1, V=12, F=10, seed=4, C=3)
    torch.library.opcheck(torch.ops.pyface.raster_mesh.default,
                          (verts, faces, 9, 11, "none", True))
    fi, bary, _ = torch.ops.pyface.raster_mesh(verts, faces, 9, 11, "none", True)
    torch.library.opcheck(torch.ops.pyface.mesh_interpolate.default,
                          (attrs.requires_grad_(True), faces, fi, bary))


@needs_cpp
def test_torch_compile_fullgraph():
    verts, faces, attrs = random_scene(seed=6)

    def fn(v, f, x):
        fi, bary, depth = torch.ops.pyface.raster_mesh(v, f, 13, 17, "none", True)
        return torch.ops.pyface.mesh_interpolate(x, f, fi, bary), depth

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a = compiled(verts, faces, attrs)
    b = rasterize_mesh_reference(verts, faces, (13, 17), attrs)
    assert_close(a[0], b[0], scale=4)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    verts, faces, attrs = random_scene(V=10, F=5)
    r = lambda *a, **k: ops.rasterize_mesh(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(IndexError, match=r"faces: vertex indices must lie in \[0, V\)"):
        r(verts, torch.tensor([[0, 1, 10]]), 8)
    with pytest.raises(IndexError, match="faces"):
        r(verts, torch.tensor([[0, -1, 2]]), 8)
    with pytest.raises(TypeError, match="faces: expected dtype"):
        r(verts, faces.float(), 8)
    with pytest.raises(ValueError, match=r"verts_ndc: expected shape \(B, V, 3\)"):
        r(verts[..., :2], faces, 8)
    with pytest.raises(TypeError, match="verts_ndc: expected a floating-point"):
        r(verts.long(), faces, 8)
    with pytest.raises(ValueError, match="faces: expected shape"):
        r(verts, faces[:, :2], 8)
    for size in (0, -3, (4, 0), (4,), 2.5, True):
        with pytest.raises(ValueError, match="image_size"):
            r(verts, faces, size)
    with pytest.raises(ValueError, match="attributes: expected shape"):
        r(verts, faces, 8, attrs[:1])
    with pytest.raises(ValueError, match="cull"):
        r(verts, faces, 8, cull="back")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_attribute_stays_on_its_faces(backend, bad):
    # empty pixels are 0 whatever the attributes hold: the reference read face 0's attributes
    # there with weight 0, and 0 * NaN / inf put NaN on every empty pixel (the kernels gave 0)
    verts, faces, attrs = random_scene(V=10, F=5)
    attrs = attrs.clone()
    attrs[:, faces[0, 0]] = bad
    img, mask, _, face_index, _ = ops.rasterize_mesh(verts, faces, 16, attrs, backend=backend)
    empty = (face_index < 0).unsqueeze(1).expand_as(img)
    assert empty.any() and bool((img[empty] == 0).all())
    uses = (faces == faces[0, 0]).any(1)
    untouched = ~uses[face_index.clamp(min=0)] & (face_index >= 0)
    assert untouched.any()
    assert bool(img.isfinite().all(1)[untouched].all())


@needs_cpp
def test_forward_mode_and_func_grad_raise_naming_the_op():
    # forward-mode AD through the fused interpolation would silently give a zero tangent
    verts, faces, attrs = random_scene(seed=3)

    def fn(a):
        return ops.rasterize_mesh(verts, faces, (9, 11), a, backend="cpu")[0]

    with pytest.raises(RuntimeError, match=r"pyface.ops.rasterize_mesh: forward-mode AD"):
        torch.func.jvp(fn, (attrs,), (torch.ones_like(attrs),))
    with pytest.raises(RuntimeError, match=r"pyface.ops.rasterize_mesh: torch.func.grad"):
        torch.func.grad(lambda a: fn(a).sum())(attrs)


@needs_cpp
def test_bad_input_direct_op():
    verts, faces, _ = random_scene(V=10, F=5)
    with pytest.raises(IndexError, match="faces"):
        torch.ops.pyface.raster_mesh(verts, faces + 10, 8, 8, "none", True)
    with pytest.raises(ValueError, match="image_size"):
        torch.ops.pyface.raster_mesh(verts, faces, 0, 8, "none", True)
    with pytest.raises(ValueError, match="cull"):
        torch.ops.pyface.raster_mesh(verts, faces, 8, 8, "front", True)
    fi, bary, _ = torch.ops.pyface.raster_mesh(verts, faces, 8, 8, "none", True)
    attrs = torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match=r"attributes: expected shape \(B, V, C\)"):
        torch.ops.pyface.mesh_interpolate(attrs[0], faces, fi, bary)
    with pytest.raises(ValueError, match="attributes: expected batch size 2"):
        torch.ops.pyface.mesh_interpolate(attrs[:1], faces, fi, bary)
    with pytest.raises(TypeError, match="grad: expected a floating-point tensor"):
        torch.ops.pyface.mesh_interpolate_bwd(torch.ones(2, 3, 8, 8, dtype=torch.long), faces,
                                              fi, bary, 10)
    with pytest.raises(ValueError, match=r"grad: expected shape \(B, C, H, W\) matching"):
        torch.ops.pyface.mesh_interpolate_bwd(torch.randn(2, 3, 8, 7), faces, fi, bary, 10)
    # indices the kernels follow are range-checked (a face index >= F crashed the process, a
    # vertex index >= V read / wrote out of bounds)
    bad = fi.clone()
    bad[1, 7, 7] = 5
    with pytest.raises(IndexError, match=r"face_index: expected face indices < F = 5 .*got 5"):
        torch.ops.pyface.mesh_interpolate(attrs, faces, bad, bary)
    with pytest.raises(IndexError, match=r"faces: vertex indices must lie in \[0, V\) = \[0, 10\)"):
        torch.ops.pyface.mesh_interpolate(attrs, faces + 10, fi, bary)
    with pytest.raises(IndexError, match=r"faces: vertex indices must lie in \[0, V\) = \[0, 3\)"):
        torch.ops.pyface.mesh_interpolate_bwd(torch.randn(2, 3, 8, 8), faces, fi, bary, 3)
    with pytest.raises(IndexError, match="face_index: expected face indices < F = 5"):
        torch.ops.pyface.mesh_interpolate_bwd(torch.randn(2, 3, 8, 8), faces, fi + 5, bary, 10)
    with pytest.raises(ValueError, match="num_verts: expected a count >= 0, got -1"):
        torch.ops.pyface.mesh_interpolate_bwd(torch.randn(2, 3, 8, 8), faces, fi, bary, -1)
    # negative face indices are empty pixels: all -1 interpolates to zeros
    empty = torch.full_like(fi, -1)
    assert not torch.ops.pyface.mesh_interpolate(attrs, faces, empty, bary).any()


# ---------------------------------------------------------------------------------------------
# project_points
# ---------------------------------------------------------------------------------------------
def test_project_points_bfm():
    verts = torch.tensor([[[0.0, 0.0, 0.0], [0.5, 0.25, 1.0], [-0.3, -0.2, -0.5]]],
                         dtype=torch.float64)
    out = ops.project_points(verts, "bfm")
    assert out.shape == (1, 3, 3)
    depth = 10.0 - verts[..., 2]
    # Deep3DFaceRecon: x_img = 1015 x / (10 - z) + 112 (from the left edge), y up -> flipped
    x_img = 1015 * verts[..., 0] / depth + 112
    y_img = 224 - (1015 * verts[..., 1] / depth + 112)
    torch.testing.assert_close(out[..., 0], x_img / 112 - 1)
    torch.testing.assert_close(out[..., 1], y_img / 112 - 1)
    torch.testing.assert_close(out[..., 2], depth)
    torch.testing.assert_close(ops.project_points(verts, ops.BFMCamera()), out)


def test_project_points_eg3d():
    g = torch.Generator().manual_seed(0)
    # a camera at radius 2.7 looking at the origin (OpenCV axes), FFHQ intrinsics
    eye = torch.tensor([0.4, -0.3, 2.6], dtype=torch.float64)
    fwd = -eye / eye.norm()
    right = torch.linalg.cross(fwd, torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64))
    right = right / right.norm()
    down = torch.linalg.cross(fwd, right)
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, fwd, eye
    K = torch.tensor([4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1], dtype=torch.float64)
    cam = torch.cat([c2w.reshape(-1), K])
    pts = torch.rand(2, 5, 3, generator=g, dtype=torch.float64) - 0.5
    out = ops.project_points(pts, torch.stack([cam, cam]))
    pc = (pts - eye) @ c2w[:3, :3]
    u = 4.2647 * pc[..., 0] / pc[..., 2] + 0.5
    v = 4.2647 * pc[..., 1] / pc[..., 2] + 0.5
    torch.testing.assert_close(out, torch.stack([2 * u - 1, 2 * v - 1, pc[..., 2]], -1))
    torch.testing.assert_close(ops.project_points(pts, cam), out)
    origin = ops.project_points(torch.zeros(1, 1, 3, dtype=torch.float64), cam)
    torch.testing.assert_close(origin[0, 0, :2], torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="cameras"):
        ops.project_points(pts, cam[:24])
    with pytest.raises(ValueError, match="cameras"):
        ops.project_points(pts, "opengl")
    with pytest.raises(ValueError, match="verts"):
        ops.project_points(pts[..., :2], cam)


@needs_cpp
def test_head_scale_smoke():
    # a closed 35k-vertex / 70k-face surface at 512^2 (the timing lives in the bench)
    nu, nv = 250, 140
    th = torch.linspace(0, math.pi, nv)
    ph = torch.linspace(0, 2 * math.pi, nu + 1)[:-1]
    t, p = torch.meshgrid(th, ph, indexing="ij")
    v = torch.stack([t.sin() * p.cos() * 0.7, -t.cos() * 0.9, t.sin() * p.sin() * 0.8], -1)
    v = v.reshape(1, -1, 3)
    i = torch.arange(nv - 1)[:, None]
    j = torch.arange(nu)[None]
    a, b = i * nu + j, i * nu + (j + 1) % nu
    c, d = (i + 1) * nu + j, (i + 1) * nu + (j + 1) % nu
    faces = torch.cat([torch.stack([a, b, c], -1).reshape(-1, 3),
                       torch.stack([b, d, c], -1).reshape(-1, 3)])
    verts = ops.project_points(v, "bfm")
    attr, mask, depth, fi, bary = ops.rasterize_mesh(verts, faces, 512, v, backend="cpu")
    # closed surface: the front and back layers are both drawn without cull; with back-face
    # culling the silhouette is the same and there are no holes inside it
    attr_c, mask_c, depth_c, fi_c, _ = ops.rasterize_mesh(verts, faces, 512, v, cull="ccw",
                                                          backend="cpu")
    torch.testing.assert_close(mask_c, mask)
    torch.testing.assert_close(depth_c, depth)
    assert mask.mean() > 0.2


@needs_cpp
def test_torch_compile_public_api():
    verts, faces, attrs = random_scene(seed=8)
    attrs.requires_grad_(True)

    def fn(v, f, x):
        attr, mask, depth, fi, bary = ops.rasterize_mesh(v, f, (11, 14), x, backend="cpu")
        return (attr * mask).square().sum()

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(verts, faces, attrs)
    g = torch.autograd.grad(out, attrs)[0]
    ref = fn(verts, faces, attrs)
    assert_close(out, ref)
    assert_close(g, torch.autograd.grad(ref, attrs)[0])
    # inductor, end to end
    compiled = torch.compile(lambda v, f, x: ops.rasterize_mesh(v, f, (11, 14), x, backend="cpu"),
                             fullgraph=True)
    a = compiled(verts, faces, attrs.detach())
    b = rasterize_mesh_reference(verts, faces, (11, 14), attrs.detach())
    compare(a, b, torch.float32)


@needs_cpp
def test_torch_compile_dynamic_vertex_count_reuses_the_graph():
    # the backward's vertex count is a SymInt in the schema of mesh_interpolate_bwd; as an int
    # it was specialised under dynamic=True: one graph per vertex count
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()

    def fn(v, f, x):
        attr, mask, _, _, _ = ops.rasterize_mesh(v, f, (11, 14), x, backend="cpu")
        return (attr * mask).square().sum()

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for seed, V in enumerate((40, 47, 53)):
        verts, faces, attrs = random_scene(V=V, seed=seed)
        attrs.requires_grad_(True)
        out = compiled(verts, faces, attrs)
        ref = fn(verts, faces, attrs)
        assert_close(out, ref)
        assert_close(torch.autograd.grad(out, attrs)[0], torch.autograd.grad(ref, attrs)[0])
    assert counters["stats"]["unique_graphs"] == 1
