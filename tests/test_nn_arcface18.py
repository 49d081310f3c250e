"""pyface.nn.arcface18: 68 -> 5 points, the least-squares similarity, aligned crops, the
ResNetArcFace-18 layout (shapes, key names, strict loading) and the identity loss."""
from __future__ import annotations

import math

import pytest
import torch

from pyface.nn.arcface18 import (TEMPLATE_112, ArcFaceIdentityLoss, ResNetArcFace, align_crops,
                                 five_points, similarity)


def test_five_points_from_68():
    lm = torch.arange(68 * 2, dtype=torch.float32).view(1, 68, 2)
    p = five_points(lm)
    assert p.shape == (1, 5, 2)
    assert torch.equal(p[0, 0], lm[0, 36:42].mean(0))
    assert torch.equal(p[0, 1], lm[0, 42:48].mean(0))
    assert torch.equal(p[0, 2], lm[0, 30]) and torch.equal(p[0, 4], lm[0, 54])
    with pytest.raises(ValueError, match=r"landmarks: expected shape \(\.\.\., 68, 2\) or \(\.\.\., 5, 2\)"):
        five_points(torch.zeros(1, 67, 2))


def test_similarity_recovers_a_known_transform():
    src = torch.rand(2, 5, 2) * 100
    ang, s, t = 0.3, 1.7, torch.tensor([4.0, -2.0])
    R = s * torch.tensor([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    dst = src @ R.t() + t
    M = similarity(src, dst)
    assert torch.allclose(M[:, :, :2], R.expand(2, 2, 2), atol=1e-4)
    assert torch.allclose(M[:, :, 2], t.expand(2, 2), atol=1e-3)


def _blob_image(centre, size, sigma):
    """(1, 3, size, size) float64 Gaussian blob centred at ``centre`` (x, y) in pixel-centre
    coordinates (pixel i's centre at i)."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64),
                            torch.arange(size, dtype=torch.float64), indexing="ij")
    g = torch.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * sigma ** 2))
    return g[None, None].expand(1, 3, size, size)


def _centroid(crop):
    """(S, S) -> its (x, y) centroid, pixel i's centre at i."""
    ys, xs = torch.meshgrid(torch.arange(crop.shape[0], dtype=torch.float64),
                            torch.arange(crop.shape[1], dtype=torch.float64), indexing="ij")
    return torch.stack([(crop * xs).sum(), (crop * ys).sum()]) / crop.sum()


@pytest.mark.parametrize("angle,scale,shift,offset", [(0.0, 1.0, (10.3, -7.6), None),
                                                      (0.25, 0.8, (20.0, -30.0), None),
                                                      (-0.2, 1.1, (-5.3, -20.7), 8.0)])
def test_align_crops_puts_the_points_on_the_template_in_pixel_centres(angle, scale, shift,
                                                                      offset):
    # a known similarity canvas = A image + t (pixel-centre coordinates); the 5 landmarks are the
    # template points mapped back through it, given in pyface's convention (corner at 0: + 0.5).
    # A Gaussian blob at each landmark must land on its template point of the crop (the
    # template's own coordinates by default, as OTAvatar's loss; + offset when given): its
    # centroid there to 1e-4 px, and the crop equal to the blob rendered in the canvas
    c, s = math.cos(angle), math.sin(angle)
    A = scale * torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    t = torch.tensor(shift, dtype=torch.float64)
    tmpl = torch.tensor(TEMPLATE_112, dtype=torch.float64) + (offset or 0.0)
    pts = (tmpl - t) @ torch.linalg.inv(A).T                   # image, pixel centres
    sigma = 4.0
    for k in range(5):
        kw = {} if offset is None else {"offset": offset}
        crop = align_crops(_blob_image(pts[k], 180, sigma), (pts + 0.5)[None], **kw)
        assert crop.shape == (1, 3, 128, 128) and crop.dtype == torch.float64
        assert (_centroid(crop[0, 0]) - tmpl[k]).abs().max() < 1e-4
        # up to the bilinear interpolation error (<= 0.016 here; a crop half a pixel off, the
        # corner-coordinate convention, misses by >= 0.099 and its centroids by 0.5 px)
        direct = _blob_image(tmpl[k], 128, sigma * scale)[0, 0]
        assert (crop[0, 0] - direct).abs().max() < 0.02


def test_resnet_arcface18_layout_and_strict_loading(tmp_path):
    net = ResNetArcFace().eval()
    keys = net.state_dict()
    for k in ("conv1.weight", "bn1.running_mean", "prelu.weight", "layer1.0.bn0.weight",
              "layer2.0.downsample.0.weight", "layer4.1.conv2.weight", "bn4.weight",
              "fc5.weight", "bn5.running_var"):
        assert k in keys, k
    assert keys["fc5.weight"].shape == (512, 512 * 8 * 8)
    assert keys["conv1.weight"].shape == (64, 1, 3, 3)
    assert net(torch.randn(2, 1, 128, 128)).shape == (2, 512)
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 1, 128, 128\)"):
        net(torch.randn(2, 3, 128, 128))
    torch.save({f"module.{k}": v for k, v in keys.items()}, tmp_path / "arc.pth")
    loss = ArcFaceIdentityLoss(weights=str(tmp_path / "arc.pth"))
    assert torch.equal(loss.net.fc5.weight, net.fc5.weight)
    bad = dict(keys)
    bad.pop("bn5.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(Exception, match="bn5.weight"):
        ArcFaceIdentityLoss(weights=str(tmp_path / "bad.pth"))


def test_identity_loss_zero_on_equal_images_and_differentiable():
    torch.manual_seed(0)
    loss = ArcFaceIdentityLoss()
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    lm = torch.rand(2, 68, 2) * 30 + 17
    assert float(loss(img, img, lm)) == pytest.approx(0.0, abs=1e-5)
    pred = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    value = loss(pred, img, lm)
    value.backward()
    assert value > 0 and pred.grad is not None and pred.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pred/target: expected equal shapes"):
        loss(pred[:1], img, lm)


def test_align_crops_uses_the_eye_corner_midpoints_as_otavatar():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 1, 160, 160, generator=g)
    lm = torch.rand(1, 68, 2, generator=g) * 40 + 60
    lm[0, 30] = torch.tensor([80.0, 95.0])
    lm[0, 48], lm[0, 54] = torch.tensor([65.0, 115.0]), torch.tensor([95.0, 116.0])
    lm[0, 36:48, 1] -= 20
    corners = align_crops(img, five_points(lm, eyes="corners"))
    assert torch.equal(align_crops(img, lm), corners)
    assert torch.equal(align_crops(img, lm, eyes="mean"), align_crops(img, five_points(lm)))
    assert not torch.allclose(align_crops(img, lm, eyes="mean"), corners)


def test_align_crops_names_mismatched_landmarks():
    with pytest.raises(ValueError, match=r"landmarks: expected shape \(2, 68, 2\) or \(2, 5, 2\) "
                                         r"\(N of images\), got \(3, 68, 2\)"):
        align_crops(torch.rand(2, 3, 64, 64), torch.rand(3, 68, 2))
    with pytest.raises(ValueError, match=r"landmarks: expected shape \(2, 68, 2\) .*got \(68, 2\)"):
        align_crops(torch.rand(2, 3, 64, 64), torch.rand(68, 2))
    assert align_crops(torch.rand(0, 3, 64, 64), torch.rand(0, 68, 2)).shape == (0, 3, 128, 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_align_crops_gradients_reach_the_images_not_the_landmarks(dtype):
    # OTAvatar's identity loss trains through the crops: the images get a gradient (the crop's
    # pixels are bilinear mixes of theirs), the landmarks none (the alignment is fixed), in
    # either dtype; the crops keep the images' dtype whatever the landmarks' dtype
    g = torch.Generator().manual_seed(4)
    img = torch.rand(2, 3, 96, 96, generator=g, dtype=dtype).requires_grad_(True)
    lm = (torch.rand(2, 68, 2, generator=g, dtype=dtype) * 40 + 28).requires_grad_(True)
    crop = align_crops(img, lm)
    assert crop.dtype == dtype and crop.shape == (2, 3, 128, 128)
    weights = torch.rand(crop.shape, generator=g, dtype=dtype)
    (crop * weights).sum().backward()
    assert img.grad is not None and img.grad.dtype == dtype and img.grad.abs().sum() > 0
    assert lm.grad is None
    assert align_crops(img.detach(), lm.detach().double()).dtype == dtype
