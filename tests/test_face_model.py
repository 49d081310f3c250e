"""MorphableModel: the built-in procedural head, bases, linearity, SH lighting, BFM loader."""
import numpy as np
import pytest
import torch

from pyface.face import MorphableModel
from pyface.face.coeffs import merge_coeffs
from pyface.face.morphable import INIT_LIGHT, sh_basis, sh_shading, vertex_normals
from pyface.testing import assert_close


@pytest.fixture(scope="module")
def model():
    return MorphableModel.builtin()


def test_builtin_components(model):
    idb = model.id_basis.view(-1, 3, 80)
    expb = model.exp_basis.view(-1, 3, 64)
    used_id = (idb.abs().amax((0, 1)) > 0)
    used_exp = (expb.abs().amax((0, 1)) > 0)
    assert used_id.sum() >= 40 and used_exp.sum() >= 20
    # used slots first, unused slots exactly zero
    assert used_id[:len(model.id_names)].all() and not used_id[len(model.id_names):].any()
    assert used_exp[:len(model.exp_names)].all() and not used_exp[len(model.exp_names):].any()
    for name in ("jaw_open", "smile", "lip_pucker", "blink_left", "blink_right", "brow_raise",
                 "brow_frown"):
        assert name in model.exp_names
    assert model.landmarks.shape == (68,) and len(set(model.landmarks.tolist())) == 68
    for r in ("face", "hair", "ears", "neck", "eyes", "left_eye", "right_eye", "mouth", "brows", "nose"):
        assert model.region(r).any(), r
    with pytest.raises(KeyError, match="region 'tail'"):
        model.region("tail")


def test_builtin_is_deterministic_and_symmetric(model):
    from pyface.face.procedural import build_head

    assert torch.equal(MorphableModel.builtin().mean_shape, model.mean_shape)
    mirror = model.mirror_index
    flip = torch.tensor([-1.0, 1.0, 1.0])
    assert_close(model.mean_shape[mirror] * flip, model.mean_shape, scale=10)
    assert_close(model.mean_tex[mirror], model.mean_tex)
    # the symmetric identity components (all but the asym_* ones) are mirror symmetric
    idb = model.id_basis.view(-1, 3, 80)
    sym = [i for i, n in enumerate(model.id_names) if not n.startswith("asym")]
    assert_close(idb[mirror][:, :, sym] * flip[None, :, None], idb[:, :, sym], scale=10)
    # left/right expression components are mirror images of each other
    e = {n: i for i, n in enumerate(model.exp_names)}
    expb = model.exp_basis.view(-1, 3, 64)
    assert_close(expb[mirror][:, :, e["blink_left"]] * flip, expb[:, :, e["blink_right"]], scale=10)
    assert_close(expb[mirror][:, :, e["smile_left"]] * flip, expb[:, :, e["smile_right"]], scale=10)
    # a rebuild from code gives the same arrays
    again = build_head()
    assert np.array_equal(again.verts.astype(np.float32), model.mean_shape.numpy())
    assert np.array_equal(again.faces, model.faces.numpy())
    assert np.array_equal(again.landmarks, model.landmarks.numpy())


def test_mesh_is_valid(model):
    f = model.faces
    assert f.min() >= 0 and f.max() < model.num_vertices
    # every vertex is used, normals are finite and mostly outward on the face
    assert torch.unique(f).numel() == model.num_vertices
    n = vertex_normals(model.mean_shape[None], f)[0]
    assert torch.isfinite(n).all()
    face = model.region("face") & ~model.region("eyelids")
    assert (n[face, 2] > 0).float().mean() > 0.9


def test_forward_shapes_and_linearity(model):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 257, generator=g) * 0.5
    b = torch.randn(2, 257, generator=g) * 0.5
    out = model(a)
    V = model.num_vertices
    for k in ("verts", "posed", "normals", "colors"):
        assert out[k].shape == (2, V, 3), k
    assert out["landmarks3d"].shape == (2, 68, 3)
    sa = model.shape(a[:, :80], a[:, 80:144]) - model.mean_shape
    sb = model.shape(b[:, :80], b[:, 80:144]) - model.mean_shape
    s = model.shape(2 * a[:, :80] - 3 * b[:, :80], 2 * a[:, 80:144] - 3 * b[:, 80:144]) - model.mean_shape
    assert_close(s, 2 * sa - 3 * sb, scale=20)
    ta = model.albedo(a[:, 144:224]) - model.mean_tex
    tb = model.albedo(b[:, 144:224]) - model.mean_tex
    assert_close(model.albedo(a[:, 144:224] + b[:, 144:224]) - model.mean_tex, ta + tb, scale=20)
    with pytest.raises(ValueError, match=r"id_coeff: expected shape \(B, 80\), got \(2, 79\)"):
        model.shape(torch.zeros(2, 79), torch.zeros(2, 64))
    with pytest.raises(ValueError, match="coeffs: expected shape"):
        model(torch.zeros(257))


def test_sh_lighting():
    n = torch.nn.functional.normalize(torch.randn(2, 50, 3), dim=-1)
    zero = torch.zeros(2, 27)
    amb = sh_shading(n, zero)
    # Deep3DFaceRecon's default light is the ambient 0.8 on band 0: a constant
    assert_close(amb, torch.full_like(amb, INIT_LIGHT * sh_basis(n)[0, 0, 0].item()))
    g1, g2 = torch.randn(2, 27), torch.randn(2, 27)
    assert_close(sh_shading(n, g1 + g2) - amb, (sh_shading(n, g1) - amb) + (sh_shading(n, g2) - amb), scale=10)
    # colour-major layout: red uses gamma[0:9] only
    g = torch.zeros(2, 27)
    g[:, 9:] = torch.randn(2, 18)
    assert_close(sh_shading(n, g)[..., 0], amb[..., 0])


def _write_bfm(path, v=12, f=10, seed=0):
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(1, 3 * v))
    m = {"meanshape": mean, "idBase": rng.normal(size=(3 * v, 80)),
         "exBase": rng.normal(size=(3 * v, 64)), "meantex": rng.uniform(0, 255, (1, 3 * v)),
         "texBase": rng.normal(size=(3 * v, 80)),
         "tri": rng.integers(1, v + 1, (f, 3)).astype(np.float64),
         "keypoints": rng.integers(1, v + 1, (1, 68)).astype(np.float64),
         "point_buf": np.ones((v, 8)), "skinmask": (rng.uniform(size=(1, v)) > 0.5).astype(np.float64)}
    savemat(path, m)
    return m


def test_from_bfm_roundtrip(tmp_path):
    path = tmp_path / "BFM_model_front.mat"
    m = _write_bfm(path)
    model = MorphableModel.from_bfm(path)
    v = 12
    mean = m["meanshape"].reshape(-1, 3)
    mean_c = mean - mean.mean(0)
    assert_close(model.mean_shape, torch.from_numpy(mean_c).float())
    assert torch.equal(model.faces, torch.from_numpy(m["tri"].astype(np.int64) - 1))
    assert torch.equal(model.landmarks, torch.from_numpy(m["keypoints"].astype(np.int64).ravel() - 1))
    assert_close(model.mean_tex, torch.from_numpy(m["meantex"].reshape(-1, 3) / 255).float())
    assert torch.equal(model.region("skin"), torch.from_numpy(m["skinmask"].ravel() > 0))
    for k in ("face", "eyes", "left_eye", "mouth", "brows"):
        assert model.region(k).shape == (v,) and model.region(k).dtype == torch.bool
    g = torch.Generator().manual_seed(1)
    idc, expc, texc = torch.randn(1, 80, generator=g), torch.randn(1, 64, generator=g), torch.randn(1, 80, generator=g)
    want = mean_c.reshape(-1) + m["idBase"] @ idc[0].double().numpy() + m["exBase"] @ expc[0].double().numpy()
    assert_close(model.shape(idc, expc)[0], torch.from_numpy(want.reshape(v, 3)).float(), scale=100)
    want_t = (m["meantex"].reshape(-1) + m["texBase"] @ texc[0].double().numpy()) / 255
    assert_close(model.albedo(texc)[0], torch.from_numpy(want_t.reshape(v, 3)).float(), scale=100)
    assert torch.equal(MorphableModel.from_bfm(path, recenter=False).mean_shape,
                       torch.from_numpy(mean).float())


def test_regions_from_landmarks(model):
    from pyface.face.morphable import regions_from_landmarks

    r = regions_from_landmarks(model.mean_shape, model.faces, model.landmarks)
    face = model.region("face")
    for k in ("left_eye", "right_eye", "mouth", "left_brow", "right_brow"):
        a, b = r[k], model.region(k)
        assert a.sum() > 10, k
        assert not (a & ~face).any(), k
        assert (a & b).sum() / (a | b).sum() > 0.4, k       # agrees with the hand-made regions
    assert torch.equal(r["eyes"], r["left_eye"] | r["right_eye"])
    # left is +x (image right)
    assert model.mean_shape[r["left_eye"], 0].min() > 0 > model.mean_shape[r["right_eye"], 0].max()


def test_from_bfm_errors(tmp_path):
    from scipy.io import savemat

    with pytest.raises(FileNotFoundError, match="nope.mat"):
        MorphableModel.from_bfm(tmp_path / "nope.mat")
    p = tmp_path / "partial.mat"
    savemat(p, {"meanshape": np.zeros((1, 6))})
    with pytest.raises(ValueError, match=r"partial.mat: missing BFM fields \['idBase'"):
        MorphableModel.from_bfm(p)
    m = _write_bfm(tmp_path / "ok.mat")
    m["exBase"] = m["exBase"][:, :63]
    savemat(tmp_path / "bad.mat", m)
    with pytest.raises(ValueError, match=r"bad.mat: exBase has shape \(36, 63\), expected \(36, 64\)"):
        MorphableModel.from_bfm(tmp_path / "bad.mat")
    (tmp_path / "garbage.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(ValueError, match="garbage.mat"):
        MorphableModel.from_bfm(tmp_path / "garbage.mat")


def test_coeffs_merge_with_model_dims(model):
    c = merge_coeffs(torch.zeros(80), torch.zeros(64), torch.zeros(80), torch.zeros(3),
                     torch.zeros(27), torch.zeros(3))
    out = model(c[None])
    assert_close(out["verts"][0], model.mean_shape)
