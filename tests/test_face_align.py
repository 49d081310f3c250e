"""pyface.face.align: the 68 -> 5 ArcFace points and the least-squares similarity shared by the
identity networks and the identity metrics."""
from __future__ import annotations

import math
import re

import pytest
import torch

from pyface.face.align import (ARCFACE_TEMPLATE, five_points, pixel_centres, umeyama_similarity,
                               warp_affine)


def test_five_points_layout_and_passthrough():
    lm = torch.randn(3, 68, 2)
    p = five_points(lm)
    assert p.shape == (3, 5, 2)
    torch.testing.assert_close(p[:, 0], lm[:, 36:42].mean(1))
    torch.testing.assert_close(p[:, 1], lm[:, 42:48].mean(1))
    assert torch.equal(p[:, 2], lm[:, 30]) and torch.equal(p[:, 3], lm[:, 48])
    assert torch.equal(p[:, 4], lm[:, 54])
    five = torch.randn(2, 5, 2)
    assert five_points(five) is five
    with pytest.raises(ValueError, match=r"landmarks: expected shape .* got \(2, 10, 2\)"):
        five_points(torch.zeros(2, 10, 2))
    # OTAvatar's eye centres: the midpoints of the eye corners
    c = five_points(lm, eyes="corners")
    torch.testing.assert_close(c[:, 0], (lm[:, 36] + lm[:, 39]) / 2)
    torch.testing.assert_close(c[:, 1], (lm[:, 42] + lm[:, 45]) / 2)
    assert torch.equal(c[:, 2:], p[:, 2:]) and not torch.allclose(c[:, :2], p[:, :2])
    assert five_points(five, eyes="corners") is five
    with pytest.raises(ValueError,
                       match=r"eyes: expected one of \['mean', 'corners'\], got 'pupils'"):
        five_points(lm, eyes="pupils")


def test_umeyama_recovers_a_similarity_and_refuses_reflections():
    src = torch.rand(2, 5, 2, dtype=torch.float64) * 100
    ang, s, t = 0.4, 1.3, torch.tensor([5.0, -7.0], dtype=torch.float64)
    A = s * torch.tensor([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]],
                         dtype=torch.float64)
    M = umeyama_similarity(src, src @ A.T + t)
    torch.testing.assert_close(M[:, :, :2], A.expand(2, 2, 2))
    torch.testing.assert_close(M[:, :, 2], t.expand(2, 2))
    mirrored = src * torch.tensor([-1.0, 1.0], dtype=torch.float64)
    assert (torch.linalg.det(umeyama_similarity(src, mirrored)[:, :, :2]) > 0).all()
    with pytest.raises(ValueError, match="src, dst: expected equal shapes"):
        umeyama_similarity(src, src[:, :4])
    assert ARCFACE_TEMPLATE.shape == (5, 2)


def test_bad_alignment_input_names_the_argument():
    with pytest.raises(TypeError, match="landmarks: expected a torch.Tensor"):
        five_points([[0.0, 0.0]] * 5)
    bad = torch.rand(1, 5, 2)
    bad[0, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="src, dst: expected finite points, got NaN or inf"):
        umeyama_similarity(bad, torch.rand(1, 5, 2))
    # empty batches
    assert five_points(torch.zeros(0, 68, 2)).shape == (0, 5, 2)
    assert umeyama_similarity(torch.zeros(0, 5, 2), torch.zeros(0, 5, 2)).shape == (0, 2, 3)


def test_warp_affine_puts_pixel_centres_at_integers():
    # a translation by whole pixels moves the image by those pixels (zeros shifted in); by half a
    # pixel, the mean of neighbours: pixel i's centre is at i in both images
    img = torch.rand(1, 2, 9, 11, generator=torch.Generator().manual_seed(0),
                     dtype=torch.float64)
    M = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]], dtype=torch.float64)
    out = warp_affine(img, M, (9, 11))
    torch.testing.assert_close(out[..., :-1, 2:], img[..., 1:, :-2])
    assert out[..., :, :2].abs().max() < 1e-12 and out[..., -1, :].abs().max() < 1e-12
    half = warp_affine(img, torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]],
                                         dtype=torch.float64), (9, 11))
    torch.testing.assert_close(half[..., 1:], (img[..., 1:] + img[..., :-1]) / 2)
    torch.testing.assert_close(pixel_centres(torch.tensor([[0.5, 3.0]])),
                               torch.tensor([[0.0, 2.5]]))
    with pytest.raises(ValueError, match=r"matrix: expected shape \(1, 2, 3\), got \(2, 3\)"):
        warp_affine(img, M[0], (4, 4))
    with pytest.raises(ValueError,
                       match=r"images: expected shape \(B, C, H, W\), got \(2, 9, 11\)"):
        warp_affine(img[0], M, (4, 4))
    assert warp_affine(img[:0], M[:0], (4, 5)).shape == (0, 2, 4, 5)


def test_warp_affine_size_is_a_square_int_or_a_pair_and_bad_arguments_are_named():
    img = torch.rand(2, 3, 6, 7, generator=torch.Generator().manual_seed(1))
    M = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]]).expand(2, 2, 3)
    square = warp_affine(img, M, 5)
    assert square.shape == (2, 3, 5, 5)
    assert torch.equal(square, warp_affine(img, M, (5, 5)))
    for bad in (0, -3, True, (4,), (4, 5, 6), (4, 0), (4.0, 5), "5", None):
        with pytest.raises(ValueError, match=r"size: expected a positive integer n or a pair of "
                                             r"positive integers \(h, w\), got "
                                             + re.escape(repr(bad))):
            warp_affine(img, M, bad)
    with pytest.raises(TypeError, match=r"images: expected a torch.Tensor .* got ndarray"):
        warp_affine(img.numpy(), M, 5)
    with pytest.raises(TypeError, match=r"matrix: expected a torch.Tensor of shape \(2, 2, 3\), "
                                        r"got list"):
        warp_affine(img, M.tolist(), 5)
