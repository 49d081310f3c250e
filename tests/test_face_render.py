"""Rendering: the render_mesh entry point and MorphableModel renders of the built-in head."""
import pytest
import torch

from pyface.face import MorphableModel, render_mesh
from pyface.face import cameras as cam
from pyface.testing import assert_close

RES = 96


@pytest.fixture(scope="module")
def model():
    return MorphableModel.builtin()


def _coeffs(model, n=1, **exp):
    c = torch.zeros(n, 257)
    for name, val in exp.items():
        c[:, 80 + model.exp_names.index(name)] = val
    return c


# ---------------------------------------------------------------------------------------------
# render_mesh


def _quad(z=(1.0, 1.0, 1.0, 1.0)):
    v = torch.tensor([[[-1.0, -1.0, z[0]], [1.0, -1.0, z[1]], [1.0, 1.0, z[2]], [-1.0, 1.0, z[3]]]])
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    return v, f


@pytest.mark.parametrize("size", [(1, 1), (7, 5), (16, 16)])
def test_quad_covers_every_pixel(size):
    v, f = _quad()
    out = render_mesh(v, f, size)
    assert out.mask.shape == (1, 1, *size) and out.face_index.shape == (1, *size)
    assert (out.mask == 1).all() and (out.face_index >= 0).all()
    assert_close(out.bary.sum(-1), torch.ones(1, *size))
    assert (out.bary >= -1e-6).all()
    # the diagonal from top-left to bottom-right splits the two faces
    h, w = size
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    strictly_upper = (j + 0.5) / w > (i + 0.5) / h + 1e-6
    strictly_lower = (j + 0.5) / w < (i + 0.5) / h - 1e-6
    assert (out.face_index[0][strictly_upper] == 0).all()
    assert (out.face_index[0][strictly_lower] == 1).all()


def test_depth_order_and_perspective_interpolation():
    # a far triangle and a near one overlapping the image centre; the near one wins
    v = torch.tensor([[[-1.0, -1.0, 5.0], [1.0, -1.0, 5.0], [0.0, 1.0, 5.0],
                       [-0.5, -0.5, 2.0], [0.5, -0.5, 2.0], [0.0, 0.6, 2.0]]])
    f = torch.tensor([[3, 4, 5], [0, 1, 2]])
    attrs = torch.tensor([[[1.0], [1.0], [1.0], [2.0], [2.0], [2.0]]])
    out = render_mesh(v, f, 32, attrs)
    assert out.face_index[0, 16, 16] == 0 and out.attr_image[0, 0, 16, 16] == 2.0
    assert out.face_index[0, 30, 16] == 1 and out.depth[0, 0, 30, 16] == 5.0
    # perspective-correct: along a slanted quad the interpolated depth is 1 / lerp(1 / z)
    v, f = _quad(z=(1.0, 3.0, 3.0, 1.0))
    out = render_mesh(v, f, (4, 64), attributes=v[..., 2:])
    x = (torch.arange(64) + 0.5) / 64
    want = 1.0 / ((1 - x) / 1.0 + x / 3.0)
    assert_close(out.depth[0, 0, 2], want, scale=10)
    assert_close(out.attr_image[0, 0, 2], want, scale=10)


def test_faces_behind_camera_and_degenerate_are_dropped():
    v = torch.tensor([[[-1.0, -1.0, -1.0], [1.0, -1.0, 1.0], [0.0, 1.0, 1.0],
                       [0.0, 0.0, 1.0], [0.5, 0.5, 1.0], [1.0, 1.0, 1.0]]])
    out = render_mesh(v, torch.tensor([[0, 1, 2], [3, 4, 5]]), 16)
    assert (out.face_index == -1).all() and (out.mask == 0).all()
    empty = render_mesh(v, torch.zeros(0, 3, dtype=torch.long), 8, attributes=torch.ones(1, 6, 2))
    assert (empty.mask == 0).all() and empty.attr_image.shape == (1, 2, 8, 8)


def test_attribute_gradient():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(2, 9, 3, generator=g, dtype=torch.float64) * 2 - 1
    v[..., 2] = v[..., 2] + 3
    f = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 4, 8]])
    a = torch.rand(2, 9, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: render_mesh(v, f, 6, a).attr_image, (a,))


def test_render_mesh_bad_input():
    v, f = _quad()
    with pytest.raises(ValueError, match=r"verts_ndc: expected shape \(B, V, 3\)"):
        render_mesh(v[0], f, 8)
    with pytest.raises(ValueError, match=r"faces: indices must be in \[0, 3\]"):
        render_mesh(v, f + 1, 8)
    with pytest.raises(ValueError, match="faces: expected an integer tensor"):
        render_mesh(v, f.float(), 8)
    with pytest.raises(ValueError, match="image_size: expected positive"):
        render_mesh(v, f, (0, 8))
    with pytest.raises(ValueError, match=r"attributes: expected shape \(B, V, C\) = \(1, 4, C\)"):
        render_mesh(v, f, 8, torch.zeros(1, 3, 2))


# ---------------------------------------------------------------------------------------------
# MorphableModel renders


def test_render_outputs(model):
    c = _coeffs(model, 2)
    c[1, 225] = 0.4
    bg = torch.tensor([0.2, 0.5, 0.9])
    r = model.render(c, RES, background=bg)
    assert r.image.shape == (2, 3, RES, RES) and r.mask.shape == (2, 1, RES, RES)
    assert r.depth.shape == (2, 1, RES, RES) and r.landmarks.shape == (2, 68, 2)
    assert 0.2 < r.mask.mean() < 0.9
    assert_close(r.image[0, :, 0, 0], bg)                      # background outside the head
    assert_close(r.label, model.label_of(c))
    # the rendered label is the pose's EG3D camera
    assert_close(model.render(c, RES, label=r.label, background=bg).image, r.image)
    with pytest.raises(ValueError, match=r"label: expected shape \(2, 25\)"):
        model.render(c, RES, label=torch.zeros(25))


def test_frontal_render_is_left_right_symmetric(model):
    c = _coeffs(model)
    for name, val in (("head_width", 1.0), ("nose_projection", -1.0), ("jaw_width", 0.7)):
        c[0, model.id_names.index(name)] = val
    c[0, 227 + 2] = c[0, 227 + 11] = c[0, 227 + 20] = 0.3        # light from the camera side
    r = model.render(c, RES, regions=("face", "eyes"))
    img, mask = r.image[0], r.mask[0]
    assert (mask != mask.flip(-1)).float().mean() < 0.005
    assert (img - img.flip(-1)).abs().mean() < 0.01
    eyes = r.regions["eyes"][0]
    assert (eyes != eyes.flip(-1)).float().sum() <= 0.1 * eyes.sum()
    # an asymmetric identity is not symmetric
    c[0, model.id_names.index("asym_0")] = 2.5
    c[0, 80 + model.exp_names.index("smile_left")] = 1.0
    img2 = model.render(c, RES).image[0]
    assert (img2 - img2.flip(-1)).abs().mean() > 2 * (img - img.flip(-1)).abs().mean()


def test_jaw_open_changes_only_the_lower_face(model):
    neutral = model.render(_coeffs(model), RES)
    opened = model.render(_coeffs(model, jaw_open=1.0), RES)
    changed = (neutral.image - opened.image).abs().amax(1)[0] > 0.02
    assert changed.sum() > 20
    rows = changed.nonzero()[:, 0]
    nose_tip_row = neutral.landmarks[0, 30, 1]
    assert rows.min() > nose_tip_row
    # the inner lips separate
    gap = opened.landmarks[0, 66, 1] - opened.landmarks[0, 62, 1]
    assert gap > 3 and neutral.landmarks[0, 66, 1] - neutral.landmarks[0, 62, 1] < 0.5


def test_blinks_close_one_eye(model):
    open_ = model.render(_coeffs(model), RES, regions=("left_eye", "right_eye"))
    left = model.render(_coeffs(model, blink_left=1.0), RES, regions=("left_eye", "right_eye"))
    lo, ro = open_.regions["left_eye"].sum(), open_.regions["right_eye"].sum()
    assert lo > 10 and ro > 10
    assert left.regions["left_eye"].sum() < 0.1 * lo
    assert left.regions["right_eye"].sum() == ro
    # the left eye is on the image right (the subject faces the camera)
    assert open_.regions["left_eye"][0, 0].nonzero()[:, 1].float().mean() > RES / 2


def test_region_masks_inside_face_mask(model):
    c = _coeffs(model, 3)
    c[1, 225], c[2, 224] = 0.5, -0.3
    c[2, 80 + model.exp_names.index("jaw_open")] = 0.8
    regions = ("face", "eyes", "mouth", "brows", "nose", "lips")
    r = model.render(c, RES, regions=regions)
    face = r.regions["face"]
    assert (face <= r.mask).all()
    for name in regions[1:]:
        m = r.regions[name]
        assert m[0].sum() > 0, name
        assert (m <= face).all(), name


def test_landmarks_match_rendered_mesh(model):
    c = _coeffs(model, 2)
    c[1, 225], c[1, 224], c[1, 254] = -0.35, 0.15, 0.05
    r = model.render(c, RES)
    assert_close(r.landmarks, model.landmarks2d(c, image_size=RES))
    # the surface point rendered at a visible landmark's pixel is the landmark vertex (within
    # one pixel footprint): rasterize the world positions as attributes
    verts = model.shape(c[:, :80], c[:, 80:144]) * cam.BFM_TO_EG3D_SCALE
    label = model.label_of(c)
    uv, z = cam.project_label(verts, label)
    out = render_mesh(torch.cat([uv * 2 - 1, z], -1), model.faces, RES, verts)
    lm3 = verts[:, model.landmarks]
    visible = [8, 30, 33, 36, 39, 42, 45, 48, 51, 54, 57]
    for b in range(2):
        for k in visible:
            if b == 1 and k in (0, 1, 36):   # turned away in the yawed view
                continue
            x, y = r.landmarks[b, k]
            i, j = int(y), int(x)
            assert out.mask[b, 0, i, j] == 1, (b, k)
            p = out.attr_image[b, :, i, j]
            footprint = z[b, model.landmarks[k], 0] / (cam.FFHQ_FOCAL * RES)
            assert (p - lm3[b, k]).norm() < 2.5 * footprint, (b, k)


def test_canonical_render_ignores_pose(model):
    c = _coeffs(model, 1, smile=0.7)
    posed = c.clone()
    posed[0, 224:227] = torch.tensor([0.2, -0.5, 0.1])
    posed[0, 254:257] = torch.tensor([0.05, -0.02, 0.3])
    assert torch.equal(model.render_canonical(posed, 48).image, model.render(c, 48).image)


def test_render_gradient_to_texture(model):
    c = _coeffs(model)
    c.requires_grad_(True)
    r = model.render(c, 32)
    r.image.sum().backward()
    assert c.grad[0, 144:147].abs().sum() > 0          # skin colour
    assert c.grad[0, 227] != 0                         # ambient light


def test_culling(model):
    # a face is front-facing (kept by "cw") when its signed area in y-down NDC is negative
    v = torch.tensor([[[-0.5, 0.5, 1.0], [0.5, 0.5, 1.0], [0.0, -0.5, 1.0]]])
    f = torch.tensor([[0, 1, 2]])
    area = (v[0, 1, 0] - v[0, 0, 0]) * (v[0, 2, 1] - v[0, 0, 1]) - (v[0, 2, 0] - v[0, 0, 0]) * (v[0, 1, 1] - v[0, 0, 1])
    assert area < 0
    assert render_mesh(v, f, 8, cull="cw").mask.sum() > 0
    assert render_mesh(v, f, 8, cull="ccw").mask.sum() == 0
    assert render_mesh(v, f[:, [0, 2, 1]], 8, cull="cw").mask.sum() == 0
    with pytest.raises(ValueError, match="cull: expected one of"):
        render_mesh(v, f, 8, cull="back")
    # the built-in head is closed and outward-oriented: culling its back faces changes nothing
    assert model.cull == "cw"
    c = _coeffs(model, 2, jaw_open=0.7, blink_left=0.5)
    c[1, 225], c[1, 224] = 0.55, -0.3
    culled = model.render(c, RES)
    model.cull = "none"
    try:
        full = model.render(c, RES)
    finally:
        model.cull = "cw"
    assert (culled.face_index != full.face_index).float().mean() < 0.002
    assert (culled.image - full.image).abs().amax(1).gt(0.05).float().mean() < 0.002


def test_camera_projection_matches_library_op():
    """pyface.face.cameras and pyface.ops.project_points agree on EG3D labels and on the
    Deep3DFaceRecon camera (what render_mesh is fed)."""
    from pyface.ops import project_points

    g = torch.Generator().manual_seed(0)
    pts = torch.rand(3, 20, 3, generator=g, dtype=torch.float64) * 0.4 - 0.2
    yaw = torch.tensor([-0.5, 0.0, 0.4], dtype=torch.float64)
    label = cam.make_label(cam.orbit_camera(yaw, 0.3 * yaw), cam.intrinsics_from_focal(dtype=torch.float64))
    uv, z = cam.project_label(pts, label)
    assert_close(project_points(pts, label), torch.cat([uv * 2 - 1, z], -1), scale=100)
    xy, depth = cam.project_bfm(pts * 4)
    ndc = project_points(pts * 4, "bfm")
    assert_close(ndc[..., 0], xy[..., 0] / 112 - 1, scale=100)
    assert_close(ndc[..., 1], (224 - xy[..., 1]) / 112 - 1, scale=100)
    assert_close(ndc[..., 2:], depth, scale=100)


@pytest.mark.gpu
def test_render_on_cuda_matches_cpu(model):
    c = _coeffs(model, 2, jaw_open=0.5)
    c[1, 225] = 0.4
    cpu = model.render(c, RES, regions=("face",))
    gpu = MorphableModel.builtin().to("cuda").render(c.cuda(), RES, regions=("face",))
    assert (gpu.face_index.cpu() != cpu.face_index).float().mean() < 1e-3
    assert (gpu.image.cpu() - cpu.image).abs().amax(1).gt(1e-3).float().mean() < 1e-3
    assert_close(gpu.landmarks.cpu(), cpu.landmarks, scale=100)


def test_model_render_bad_input_names_the_argument(model):
    c = torch.zeros(2, 257)
    with pytest.raises(ValueError, match=r"exp_coeff: expected shape \(2, 64\) \(B of id_coeff\), got \(3, 64\)"):
        model.shape(torch.zeros(2, 80), torch.zeros(3, 64))
    with pytest.raises(ValueError, match=r"background: expected shape \(2, 3, 16, 16\) or \(3,\), got \(4,\)"):
        model.render(c, 16, background=torch.zeros(4))
    with pytest.raises(ValueError, match=r"background: expected shape \(2, 3, 16, 16\) or \(3,\), got \(2, 3, 8, 8\)"):
        model.render(c, 16, background=torch.zeros(2, 3, 8, 8))
    with pytest.raises(TypeError, match="regions: expected a tuple of region names, got the string 'mouth'"):
        model.render(c, 16, regions="mouth")
    with pytest.raises(KeyError, match="region 'nose2' is not defined"):
        model.render(c, 16, regions=("nose2",))
    nan = c.clone()
    nan[1, 225] = float("nan")
    with pytest.raises(ValueError, match=r"coeffs \(the camera of its angles 224:227 and trans 254:257\): contains NaN"):
        model.render(nan, 16)
    with pytest.raises(ValueError, match=r"coeffs: expected shape \(B, 257\), got \(257,\)"):
        model.render_canonical(torch.zeros(257), 16)
    with pytest.raises(ValueError, match=r"label: expected a tensor of shape \(2, 25\), got \(3, 25\)"):
        model.landmarks2d(c, torch.zeros(3, 25))
    with pytest.raises(ValueError, match=r"image_size: expected positive integers H or \(H, W\), got \(16,\)"):
        model.landmarks2d(c, None, (16,))
    v, f = torch.rand(1, 4, 3), torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match="image_size: expected positive integers H or .*, got 8.5"):
        render_mesh(v, f, 8.5)
    with pytest.raises(ValueError, match=r"faces: expected an integer tensor of shape \(F, 3\)"):
        render_mesh(v, f.bool(), 8)


def test_model_renders_an_empty_batch(model):
    e = torch.zeros(0, 257)
    assert model(e)["posed"].shape == (0, model.num_vertices, 3)
    r = model.render(e, 16, regions=("mouth",))
    assert r.image.shape == (0, 3, 16, 16) and r.landmarks.shape == (0, 68, 2)
    assert r.regions["mouth"].shape == (0, 1, 16, 16)
    assert model.render_canonical(e, 16).image.shape == (0, 3, 16, 16)
    assert model.landmarks2d(e).shape == (0, 68, 2)
