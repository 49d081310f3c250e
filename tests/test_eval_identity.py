"""CSIM: 68 -> 5 points, Umeyama similarity, the warp, and the ArcFace cosine."""
import math
import os

import pytest
import torch

from pyface.eval import identity as pid
from pyface.eval.weights import MissingWeightsError
from pyface.nn.arcface import IResNet


def _similarity(scale, angle, tx, ty):
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]],
                        dtype=torch.float64)


def _apply(M, pts):
    return pts @ M[:, :2].T + M[:, 2]


def test_umeyama_recovers_a_known_similarity():
    g = torch.Generator().manual_seed(0)
    src = torch.rand(3, 7, 2, generator=g, dtype=torch.float64) * 100
    Ms = [_similarity(1.7, 0.35, 12.0, -4.0), _similarity(0.4, -2.5, 0.0, 30.0),
          _similarity(1.0, 0.0, 0.0, 0.0)]
    dst = torch.stack([_apply(M, p) for M, p in zip(Ms, src)])
    got = pid.umeyama_similarity(src, dst)
    torch.testing.assert_close(got, torch.stack(Ms), rtol=0, atol=1e-9)
    # least squares: noise-free points are reproduced, a reflection is never returned
    flipped = dst * torch.tensor([-1.0, 1.0], dtype=torch.float64)
    assert (torch.linalg.det(pid.umeyama_similarity(src, flipped)[:, :, :2]) > 0).all()
    with pytest.raises(ValueError, match=r"src, dst: expected equal shapes"):
        pid.umeyama_similarity(src, dst[:, :5])


def test_five_points_from_the_68_layout():
    lm = torch.zeros(2, 68, 2)
    lm[:, 36:42] = torch.tensor([30.0, 40.0]) + torch.randn(6, 2)
    lm[:, 36:42] -= lm[:, 36:42].mean(1, keepdim=True) - torch.tensor([30.0, 40.0])
    lm[:, 42:48] = torch.tensor([70.0, 41.0])
    lm[:, 30], lm[:, 48], lm[:, 54] = torch.tensor([50.0, 60.0]), torch.tensor([35.0, 80.0]), \
        torch.tensor([66.0, 81.0])
    want = torch.tensor([[30.0, 40.0], [70.0, 41.0], [50.0, 60.0], [35.0, 80.0], [66.0, 81.0]])
    torch.testing.assert_close(pid.five_points(lm), want.expand(2, 5, 2))
    assert pid.five_points(want) is want
    with pytest.raises(ValueError, match=r"landmarks: expected shape \(\.\.\., 68, 2\)"):
        pid.five_points(torch.zeros(2, 10, 2))


def test_alignment_on_a_known_transform():
    # A linear image f(x, y) is reproduced exactly by bilinear sampling, so the crop must equal
    # f at the template-to-image map of each output pixel.
    H, W = 200, 180
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64),
                            torch.arange(W, dtype=torch.float64), indexing="ij")
    f = lambda x, y: torch.stack([x / W, y / H, (x + y) / (W + H)]) * 2 - 1  # noqa: E731
    image = f(xs, ys)[None].float()
    Minv = _similarity(1.2, -0.3, 0.0, 0.0).clone()  # template pixels -> image pixels
    Minv[:, 2] = torch.tensor([90.0, 100.0], dtype=torch.float64) - _apply(
        Minv, torch.tensor([55.5, 55.5], dtype=torch.float64))   # crop centre -> image centre
    landmarks = _apply(Minv[:2], pid.ARCFACE_TEMPLATE)[None]
    crop = pid.align_faces(image, landmarks)
    assert crop.shape == (1, 3, 112, 112)
    v, u = torch.meshgrid(torch.arange(112, dtype=torch.float64),
                          torch.arange(112, dtype=torch.float64), indexing="ij")
    p = _apply(Minv[:2], torch.stack([u, v], -1))
    inside = (p[..., 0] >= 0) & (p[..., 0] <= W - 1) & (p[..., 1] >= 0) & (p[..., 1] <= H - 1)
    assert inside.all()
    want = f(p[..., 0], p[..., 1]).float()
    torch.testing.assert_close(crop[0], want, rtol=0, atol=1e-4)
    # the same face given as 68 points
    lm68 = torch.zeros(1, 68, 2, dtype=torch.float64)
    lm68[0, 36:42], lm68[0, 42:48] = landmarks[0, 0], landmarks[0, 1]
    lm68[0, 30], lm68[0, 48], lm68[0, 54] = landmarks[0, 2], landmarks[0, 3], landmarks[0, 4]
    torch.testing.assert_close(pid.align_faces(image, lm68), crop)


@pytest.mark.parametrize("offset", [(40.0, 55.0), (-40.0, -25.0)])   # inside; 42 % outside
def test_alignment_matches_skimage_on_noisy_points(offset):
    """The least-squares similarity and the bilinear crop (black outside the image) against
    scikit-image's Umeyama estimate and ``warp(order=1, mode="constant", cval=0)``."""
    import numpy as np
    from skimage import transform as sk

    rng = np.random.default_rng(0)
    tmpl = pid.ARCFACE_TEMPLATE.numpy()
    lm = tmpl @ _similarity(1.6, 0.2, 0, 0).numpy()[:, :2].T + np.array(offset) \
        + rng.normal(0, 2.0, (5, 2))                        # not an exact similarity
    if hasattr(sk.SimilarityTransform, "from_estimate"):     # scikit-image >= 0.26
        ref = sk.SimilarityTransform.from_estimate(lm, tmpl)
    else:
        ref = sk.SimilarityTransform()
        assert ref.estimate(lm, tmpl)
    got = pid.umeyama_similarity(torch.tensor(lm)[None], torch.tensor(tmpl)[None])[0]
    np.testing.assert_allclose(got.numpy(), ref.params[:2], rtol=0, atol=1e-9)
    img = rng.random((3, 150, 140))
    crop = pid.align_faces(torch.tensor(img * 2 - 1)[None].float(), torch.tensor(lm)[None])[0]
    want = sk.warp(img.transpose(1, 2, 0), ref.inverse, output_shape=(112, 112), order=1,
                   mode="constant", cval=0).transpose(2, 0, 1)
    np.testing.assert_allclose((crop.numpy() + 1) / 2, want, rtol=0, atol=1e-4)


def test_template_landmarks_are_the_identity_crop():
    img = torch.rand(2, 3, 112, 112) * 2 - 1
    lm = pid.ARCFACE_TEMPLATE.expand(2, 5, 2)
    torch.testing.assert_close(pid.align_faces(img, lm), img, rtol=0, atol=1e-4)


def test_csim_with_weights(tmp_path):
    torch.manual_seed(0)
    net = IResNet("r18").eval()
    path = os.path.join(tmp_path, "backbone.pth")
    torch.save(net.state_dict(), path)
    m = pid.CSIM(path)
    assert m.arch == "r18"
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 128, 128, generator=g) * 2 - 1
    b = torch.rand(2, 3, 128, 128, generator=g) * 2 - 1
    lm = (pid.ARCFACE_TEMPLATE.float() + 8).expand(2, 5, 2)
    same = m(a, lm, a, lm)
    torch.testing.assert_close(same, torch.ones(2), rtol=0, atol=1e-5)
    got = m(a, lm, b, lm)
    with torch.no_grad():
        ea, eb = net(a[:, :, 8:120, 8:120]), net(b[:, :, 8:120, 8:120])
    want = torch.nn.functional.cosine_similarity(ea, eb)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got < 0.9999).all()
    torch.testing.assert_close(m(b, lm, a, lm), got)


def test_csim_errors(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"--weights csim=PATH.*backbone\.pth"):
        pid.CSIM(None)
    with pytest.raises(MissingWeightsError, match=r"does not exist"):
        pid.CSIM(os.path.join(tmp_path, "none.pth"))
    with pytest.raises(ValueError, match="not an arcface_torch IResNet"):
        pid.CSIM({"layer1.0.bn1.weight": torch.zeros(1)})


def test_pixel_centres_turn_corner_landmarks_into_the_template_convention():
    # pyface's landmarks put the image corner at 0 (pixel i covers [i, i + 1)); the template and
    # the warp put pixel i's centre at i: a 112 px image whose corner-convention landmarks are
    # the template's points + 0.5 is its own crop only after pixel_centres
    img = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    corner = (pid.ARCFACE_TEMPLATE + 0.5)[None]
    torch.testing.assert_close(pid.pixel_centres(corner), pid.ARCFACE_TEMPLATE[None])
    torch.testing.assert_close(pid.align_faces(img, pid.pixel_centres(corner)), img,
                               rtol=0, atol=1e-4)
    assert (pid.align_faces(img, corner) - img).abs().max() > 0.05   # half a pixel off


def test_evaluator_aligns_csim_and_aed_id_in_pixel_centres():
    """The evaluator's csim and aed_id give the ArcFace the data's landmarks (corner at 0),
    scaled to the prediction, in pixel-centre coordinates: minus half a pixel."""
    from pyface.eval import evaluate as E

    class Recorder:
        def __init__(self):
            self.landmarks = []

        def __call__(self, source, source_lm, output, output_lm):
            self.landmarks += [source_lm, output_lm]
            return torch.ones(source.shape[0])

        def embed(self, images, lm):
            self.landmarks.append(lm)
            return torch.nn.functional.normalize(torch.ones(images.shape[0], 4), dim=1)

    g = torch.Generator().manual_seed(0)
    src_lm, tgt_lm = torch.rand(2, 68, 2, generator=g) * 60, torch.rand(2, 68, 2, generator=g) * 60
    batch = {"source": {"image": torch.zeros(2, 3, 64, 64, dtype=torch.uint8),
                        "landmarks": src_lm},
             "target": {"image": torch.zeros(2, 3, 64, 64, dtype=torch.uint8),
                        "landmarks": tgt_lm}}
    p = torch.rand(2, 3, 32, 32, generator=g)        # predictions at half the data's size
    scale = torch.tensor([0.5, 0.5])
    rec = Recorder()
    E._csim(rec, batch, p, (32, 32), scale, "cpu")
    E._aed_id(rec, batch, p, p, scale, "cpu")
    want_s, want_t = src_lm.double() * 0.5 - 0.5, tgt_lm.double() * 0.5 - 0.5
    for got, want in zip(rec.landmarks, [want_s, want_t, want_t, want_t]):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-12)


def test_align_faces_puts_a_blob_at_a_landmark_on_its_template_point():
    # a known similarity crop = A image + t in pixel-centre coordinates; a Gaussian blob at each
    # landmark (the template point mapped back) must have its centroid on the template point
    # to 1e-4 px (half a pixel off, as corner coordinates would put it, fails)
    A = _similarity(0.8, 0.25, 20.0, -30.0)
    tmpl = pid.ARCFACE_TEMPLATE
    pts = (tmpl - A[:, 2]) @ torch.linalg.inv(A[:, :2]).T
    ys, xs = torch.meshgrid(torch.arange(180, dtype=torch.float64),
                            torch.arange(180, dtype=torch.float64), indexing="ij")
    gy, gx = torch.meshgrid(torch.arange(112, dtype=torch.float64),
                            torch.arange(112, dtype=torch.float64), indexing="ij")
    for k in range(5):
        blob = torch.exp(-((xs - pts[k, 0]) ** 2 + (ys - pts[k, 1]) ** 2) / (2 * 4.0 ** 2))
        crop = (pid.align_faces(blob.expand(1, 3, 180, 180) * 2 - 1, pts[None])[0, 0].double()
                + 1) / 2
        centroid = torch.stack([(crop * gx).sum(), (crop * gy).sum()]) / crop.sum()
        assert (centroid - tmpl[k]).abs().max() < 1e-4


def test_align_faces_and_arcface18_crops_share_the_convention():
    # pyface.nn.arcface18.align_crops on pyface's (corner at 0) landmarks with the 112 canvas and
    # no offset is the csim crop of the same landmarks moved by pixel_centres
    from pyface.nn.arcface18 import align_crops
    g = torch.Generator().manual_seed(3)
    img = torch.rand(2, 3, 150, 150, generator=g)
    lm = torch.tensor([[[52.3, 61.8], [97.1, 60.2], [75.6, 86.9], [57.0, 112.4], [94.2, 111.0]],
                       [[40.0, 70.5], [88.9, 55.1], [70.2, 90.3], [58.8, 118.6], [101.7, 103.9]]])
    want = (pid.align_faces(img * 2 - 1, pid.pixel_centres(lm)) + 1) / 2
    got = align_crops(img, lm, size=112, offset=0.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
