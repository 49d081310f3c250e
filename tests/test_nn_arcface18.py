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


def test_align_crops_puts_the_points_on_the_template():
    # an image whose value at each pixel is its own x (channel 0) and y (channel 1) coordinate:
    # the crop's value at a template point is the source point it came from
    H = W = 200
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    img = torch.stack([xs, ys]).float()[None]
    pts = torch.tensor([[[70.0, 80.0], [130.0, 82.0], [100.0, 110.0], [75.0, 140.0],
                         [125.0, 141.0]]])
    crop = align_crops(img, pts)
    assert crop.shape == (1, 2, 128, 128)
    M = similarity(pts, torch.tensor(TEMPLATE_112) + 8)
    fitted = pts @ M[0, :, :2].t() + M[0, :, 2]          # where the points land in the crop
    for k in range(5):
        x, y = fitted[0, k]
        v = crop[0, :, int(y), int(x)]
        # the crop pixel holds the image coordinate that maps there, close to the point
        back = torch.linalg.solve(M[0, :, :2], torch.stack([x.floor() + 0.5, y.floor() + 0.5])
                                  - M[0, :, 2])
        assert torch.allclose(v, back, atol=0.05)
    assert (fitted[0] - (torch.tensor(TEMPLATE_112) + 8)).abs().max() < 6


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


def test_align_crops_names_mismatched_landmarks():
    with pytest.raises(ValueError, match=r"landmarks: expected shape \(2, 68, 2\) or \(2, 5, 2\) "
                                         r"\(N of images\), got \(3, 68, 2\)"):
        align_crops(torch.rand(2, 3, 64, 64), torch.rand(3, 68, 2))
    with pytest.raises(ValueError, match=r"landmarks: expected shape \(2, 68, 2\) .*got \(68, 2\)"):
        align_crops(torch.rand(2, 3, 64, 64), torch.rand(68, 2))
    assert align_crops(torch.rand(0, 3, 64, 64), torch.rand(0, 68, 2)).shape == (0, 3, 128, 128)
