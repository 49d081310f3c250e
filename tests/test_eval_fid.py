"""FID / KID: Frechet distance and KID known answers, the FID Inception against pytorch-fid."""
import os

import numpy as np
import pytest
import torch
from scipy import linalg

from pyface.eval import fid as pfid
from pyface.eval.weights import MissingWeightsError
from _reference_packages import reference

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")


def _random_rotation(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def test_frechet_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert pfid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, 1e-12)
    q = _random_rotation(d, rng)        # commuting covariances: same closed form
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert pfid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)
    assert pfid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-10)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert pfid.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1)


def test_frechet_matches_sqrtm_on_non_commuting_covariances():
    rng = np.random.default_rng(1)
    d = 8
    x1, x2 = rng.standard_normal((3 * d, d)), rng.standard_normal((3 * d, d)) @ \
        rng.standard_normal((d, d))
    (m1, s1), (m2, s2) = pfid.feature_statistics(x1), pfid.feature_statistics(x2)
    covmean = linalg.sqrtm(s1 @ s2).real
    want = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert pfid.frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-9)
    assert pfid.fid_from_features(x1, x2) == pytest.approx(want, rel=1e-9)
    ref = reference("pytorch_fid.fid_score")
    assert pfid.frechet_distance(m1, s1, m2, s2) == pytest.approx(
        ref.calculate_frechet_distance(m1, s1, m2, s2), rel=1e-9)


def test_frechet_singular_covariances_and_bad_shapes():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((5, 16)), rng.standard_normal((5, 16)) + 0.5   # N < D
    v = pfid.fid_from_features(x, y)
    assert np.isfinite(v) and v > 0
    assert pfid.fid_from_features(x, x) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match=r"sigma2: expected shape \(3, 3\)"):
        pfid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match=r"features: expected features \(N >= 2, D\)"):
        pfid.feature_statistics(np.zeros((1, 4)))


def test_fid_with_fewer_images_than_dimensions_matches_pytorch_fid():
    """The usual case (N < 2048: singular covariances), where pyface takes the nuclear-norm path
    and pytorch-fid takes scipy's sqrtm of the singular product."""
    ref = reference("pytorch_fid.fid_score")
    rng = np.random.default_rng(4)
    x = np.abs(rng.standard_normal((20, 64)))
    y = 1.1 * np.abs(rng.standard_normal((30, 64))) + 0.05
    (m1, s1), (m2, s2) = pfid.feature_statistics(x), pfid.feature_statistics(y)
    want = ref.calculate_frechet_distance(m1, s1, m2, s2)
    assert want > 1
    assert pfid.fid_from_features(x, y) == pytest.approx(want, rel=1e-6)


def test_kid_known_answer():
    x, y = np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]])
    # k = (xy + 1)^3: XX off-diagonal 1, YY off-diagonal 27, XY mean (1 + 1 + 8 + 27) / 4
    assert pfid.polynomial_mmd2(x, y) == pytest.approx(1 + 27 - 2 * 37 / 4)
    assert pfid.kid_from_features(x, y) == (pytest.approx(9.5), 0.0)


def test_kid_subsets_match_brute_force():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((12, 3)), rng.standard_normal((10, 3)) + 1

    def brute(a, b):
        k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
        m = len(a)
        xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        return xx + yy - 2 * sum(k(u, v) for u in a for v in b) / m ** 2

    r = np.random.default_rng(7)
    want = [brute(x[r.choice(12, 4, replace=False)], y[r.choice(10, 4, replace=False)])
            for _ in range(5)]
    mean, std = pfid.kid_from_features(x, y, subsets=5, subset_size=4, seed=7)
    assert mean == pytest.approx(np.mean(want)) and std == pytest.approx(np.std(want))
    same = pfid.kid_from_features(x, rng.standard_normal((10, 3)), subsets=50, subset_size=8)[0]
    assert same < mean
    with pytest.raises(ValueError, match="fake: expected feature dimension 3, got 2"):
        pfid.kid_from_features(x, y[:, :2])


# Transcribed from pytorch-fid's weight-file layout (torchvision Inception3 names, 1008 classes).
FILE_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
}


def _randomised(seed=0) -> pfid.FIDInception:
    torch.manual_seed(seed)
    m = pfid.FIDInception(require_weights=False)
    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
        elif isinstance(mod, torch.nn.BatchNorm2d):
            for t, lo, hi in ((mod.weight, 0.8, 1.2), (mod.bias, -0.1, 0.1),
                              (mod.running_mean, -0.1, 0.1), (mod.running_var, 0.8, 1.2)):
                t.data.uniform_(lo, hi)
    return m


def test_inception_layout_and_shapes():
    m = pfid.FIDInception(require_weights=False)
    own = m.state_dict()
    for k, shape in FILE_KEYS.items():
        assert tuple(own[k].shape) == shape, k
    x = torch.rand(2, 3, 40, 56) * 2 - 1
    assert m(x).shape == (2, 2048)
    feats = m.features(x, batch_size=1)
    assert feats.shape == (2, 2048) and feats.dtype == np.float64
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 3, H, W\)"):
        m(torch.zeros(2, 1, 8, 8))


def test_matches_pytorch_fid_on_random_weights(monkeypatch, tmp_path):
    pf = reference("pytorch_fid.inception")
    ours = _randomised()
    state = dict(ours.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048), torch.zeros(1008)
    # pytorch-fid builds its FID Inception and strict-loads this state: the key layout matches
    monkeypatch.setattr(pf, "load_state_dict_from_url", lambda *a, **k: state)
    ref = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    # the same file, saved without num_batches_tracked, loads into ours
    path = os.path.join(tmp_path, "pt_inception.pth")
    torch.save({k: v for k, v in state.items() if "num_batches" not in k}, path)
    loaded = pfid.FIDInception(path)
    x = torch.rand(2, 3, 72, 64)
    with torch.no_grad():
        want = ref(x)[0].flatten(1)
        got = loaded(x * 2 - 1)
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_missing_weights_say_what_to_pass(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"--weights fid=PATH.*pt_inception-2015-12-05"):
        pfid.FIDInception()
    with pytest.raises(MissingWeightsError, match=r"does not exist.*--weights kid=PATH"):
        pfid.FIDInception(os.path.join(tmp_path, "x.pth"), metric="kid")


def test_fid_from_few_features_matches_the_statistics_path():
    """Fewer images than dimensions: the nuclear-norm path equals the D x D eigen path."""
    rng = np.random.default_rng(5)
    for n1, n2, d in ((6, 9, 40), (12, 12, 12), (3, 2, 30)):
        real = rng.normal(size=(n1, d)) @ rng.normal(size=(d, d))
        fake = rng.normal(size=(n2, d)) * 2 + 0.5
        want = pfid.frechet_distance(*pfid.feature_statistics(real),
                                     *pfid.feature_statistics(fake))
        assert pfid.fid_from_features(real, fake) == pytest.approx(want, rel=1e-9, abs=1e-9)
    x = rng.normal(size=(5, 20))
    assert pfid.fid_from_features(x, x) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="fake: expected feature dimension 20"):
        pfid.fid_from_features(x, x[:, :10])
