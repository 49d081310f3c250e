"""pyface.nn.augment: random affine + TPS warps (identity, translation, keypoint equivariance,
jacobians) and the keypoint prior."""
from __future__ import annotations

import pytest
import torch

import pyface.nn as N
from pyface.nn.augment import AffineTPS


def _blob(B, H, W, centres, sigma=0.08):
    ys = torch.linspace(-1, 1, H)
    xs = torch.linspace(-1, 1, W)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    img = [torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2)) for cx, cy in centres]
    return torch.stack(img).view(B, 1, H, W), xx, yy


def _soft_argmax(img, xx, yy):
    w = img.flatten(1)
    w = w / w.sum(1, keepdim=True)
    return torch.stack([(w * xx.flatten()).sum(1), (w * yy.flatten()).sum(1)], -1)


def test_zero_sigmas_are_the_identity():
    aug = N.RandomAffineTPS(0.0, 0.0)
    img = torch.randn(2, 3, 9, 7)
    out, t = aug(img)
    torch.testing.assert_close(out, img, atol=1e-5, rtol=0)
    kp = torch.rand(2, 4, 3) * 2 - 1
    torch.testing.assert_close(t.warp_keypoints(kp), kp)
    torch.testing.assert_close(t.jacobian(kp[..., :2]), torch.eye(2).expand(2, 4, 2, 2))


def test_translation_shifts_pixels():
    W = 9
    theta = torch.tensor([[[1.0, 0.0, 2 * 2 / (W - 1)], [0.0, 1.0, 0.0]]])    # +2 pixels in x
    t = AffineTPS(theta, torch.zeros(1, 2), torch.zeros(1, 1, 2))
    img = torch.randn(1, 1, 5, W)
    out = t.warp_image(img)
    torch.testing.assert_close(out[..., :-2], img[..., 2:], atol=1e-5, rtol=0)  # out(p) = x(p+2)


def test_keypoint_equivariance_on_blobs():
    """A blob at q in x appears at p in the warped image with T(p) = q."""
    g = torch.Generator().manual_seed(0)
    aug = N.RandomAffineTPS(0.1, 0.02)
    centres = [(0.3, -0.2), (-0.4, 0.25)]
    x, xx, yy = _blob(2, 64, 64, centres)
    y, t = aug(x, generator=g)
    assert t.control_params.abs().max() > 0 and not torch.allclose(y, x)
    p = _soft_argmax(y, xx, yy)                                  # blob centres in the warped image
    q = t.warp_keypoints(p.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(q, torch.tensor(centres), atol=0.01, rtol=0)
    # the same keypoints without the warp are off by much more
    assert (p - torch.tensor(centres)).abs().max() > 0.03


def test_jacobian_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    t = N.RandomAffineTPS(0.1, 0.05).sample(2, generator=g, dtype=torch.float64)
    p = torch.rand(2, 3, 2, dtype=torch.float64, generator=g) * 2 - 1
    jac = t.jacobian(p)
    assert jac.shape == (2, 3, 2, 2)
    eps = 1e-6
    for j in range(2):
        d = torch.zeros(2)
        d[j] = eps
        fd = (t.warp_coordinates(p + d.double()) - t.warp_coordinates(p - d.double())) / (2 * eps)
        torch.testing.assert_close(jac[..., :, j], fd, atol=1e-7, rtol=1e-6)


def test_warp_is_differentiable_and_errors():
    t = N.RandomAffineTPS().sample(2)
    img = torch.randn(2, 3, 8, 8, requires_grad=True)
    t.warp_image(img).sum().backward()
    assert img.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="coords: expected shape \\(2, N, 2\\)"):
        t.warp_coordinates(torch.zeros(3, 4, 2))
    with pytest.raises(ValueError, match="kp: expected shape \\(2, K, 2 or 3\\)"):
        t.warp_keypoints(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="image: expected shape \\(2, C, H, W\\)"):
        t.warp_image(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="sigma_tps: expected >= 0"):
        N.RandomAffineTPS(0.05, -1.0)


def test_keypoint_prior_known_answer():
    kp = torch.tensor([[[0.0, 0.0, 0.3], [0.1, 0.0, 0.4], [1.0, 1.0, 0.2]]])
    # pairs: |x0 - x1|^2 = 0.02 -> 0.08 twice; the far point adds nothing; depth mean 0.3 -> 0.03
    torch.testing.assert_close(N.keypoint_prior_loss(kp), torch.tensor(0.16 + 0.03))
    torch.testing.assert_close(N.keypoint_prior_loss(kp, include_self=True),
                               torch.tensor(0.16 + 0.03 + 3 * 0.1))
    spread = torch.tensor([[[-0.5, -0.5, 0.33], [0.5, 0.5, 0.33]]])
    torch.testing.assert_close(N.keypoint_prior_loss(spread), torch.tensor(0.0))
    # the gradient pushes close keypoints apart
    kp = kp.clone().requires_grad_(True)
    N.keypoint_prior_loss(kp).backward()
    assert kp.grad[0, 0, 0] > 0 > kp.grad[0, 1, 0]
    with pytest.raises(ValueError, match="kp: expected shape \\(B, K, 3\\)"):
        N.keypoint_prior_loss(torch.zeros(1, 3, 2))


def test_equivariance_loss_is_zero_for_an_equivariant_detector():
    g = torch.Generator().manual_seed(5)
    t = N.RandomAffineTPS(0.1, 0.02).sample(2, generator=g)
    kp_y = torch.rand(2, 4, 3, generator=g) * 1.2 - 0.6
    kp_x = t.warp_keypoints(kp_y)               # what an exactly equivariant detector returns
    torch.testing.assert_close(N.equivariance_loss(kp_x, kp_y, t), torch.tensor(0.0))
    assert N.equivariance_loss(kp_y, kp_y, t) > 1e-3
    with pytest.raises(ValueError, match="kp_warped: expected the shape of kp"):
        N.equivariance_loss(kp_x, kp_y[:, :3], t)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(6)
    t = N.RandomAffineTPS(0.1, 0.05).sample(1, generator=g, dtype=torch.float64)
    p = (torch.rand(1, 3, 2, dtype=torch.float64, generator=g) * 2 - 1).requires_grad_(True)
    assert torch.autograd.gradcheck(t.warp_coordinates, (p,))
    kp = torch.rand(2, 3, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    assert torch.autograd.gradcheck(N.keypoint_prior_loss, (kp,))


def test_bad_warps_and_images_name_the_argument():
    with pytest.raises(ValueError, match=r"theta: expected shape \(B, 2, 3\), got \(2, 3, 3\)"):
        AffineTPS(torch.zeros(2, 3, 3), torch.zeros(5, 2), torch.zeros(2, 5, 2))
    with pytest.raises(ValueError, match=r"control_points: expected shape \(P, 2\), got \(5, 3\)"):
        AffineTPS(torch.zeros(2, 2, 3), torch.zeros(5, 3), torch.zeros(2, 5, 2))
    with pytest.raises(ValueError, match=r"control_params: expected shape \(2, 5, 2\) \(B of theta, "
                                         r"P of control_points\), got \(3, 5, 2\)"):
        AffineTPS(torch.zeros(2, 2, 3), torch.zeros(5, 2), torch.zeros(3, 5, 2))
    with pytest.raises(TypeError, match="image: expected a floating-point tensor, got dtype uint8"):
        N.RandomAffineTPS()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    warped, t = N.RandomAffineTPS()(torch.rand(0, 3, 8, 8))
    assert warped.shape == (0, 3, 8, 8) and t.batch == 0
