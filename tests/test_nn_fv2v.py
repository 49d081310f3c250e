"""pyface.nn.fv2v: face-vid2vid blocks, appearance extractor, canonical keypoint detector and the
multi-scale decoder (tiny shapes; full-size shapes on the meta device)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pyface.nn as N
from pyface.nn.fv2v import (antialias_downsample, expected_coordinates,
                            make_coordinate_grid)


def _grads_everywhere(module, loss):
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, f"no gradient reaches {missing}"


def test_blocks_shapes_and_residual_identity():
    torch.manual_seed(0)
    x2, x3 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 2, 8, 8)
    assert N.DownBlock2d(4, 6)(x2).shape == (2, 6, 4, 4)
    assert N.UpBlock2d(4, 6)(x2).shape == (2, 6, 16, 16)
    assert N.SameBlock2d(4, 6, kernel_size=7, padding=3)(x2).shape == (2, 6, 8, 8)
    assert N.SameBlock2d(4, 6, lrelu=True)(x2).min() < 0 <= N.SameBlock2d(4, 6)(x2).min()
    assert N.UpBlock3d(4, 6)(x3).shape == (2, 6, 2, 16, 16)
    assert N.DownBlock3d(4, 6)(x3).shape == (2, 6, 2, 4, 4)
    for block, x in ((N.ResBlock2d(4), x2), (N.ResBlock3d(4), x3)):
        assert block(x).shape == x.shape
        nn.init.zeros_(block.conv2.weight)
        nn.init.zeros_(block.conv2.bias)
        torch.testing.assert_close(block(x), x)       # the residual branch alone is the identity


def test_hourglass_uses_the_shared_3d_blocks():
    hg = N.Hourglass3d(4, 3, num_blocks=2, max_features=16)
    assert all(isinstance(b, N.DownBlock3d) for b in hg.down)
    assert all(isinstance(b, N.UpBlock3d) for b in hg.up)


def test_antialias_downsample():
    x = torch.ones(1, 2, 32, 32)
    y = antialias_downsample(x, 0.25)
    assert y.shape == (1, 2, 8, 8)
    torch.testing.assert_close(y[..., 2:-2, 2:-2], torch.ones(1, 2, 4, 4))   # interior kept
    assert antialias_downsample(x, 1.0) is x
    with pytest.raises(ValueError, match="scale: expected 0 < scale <= 1"):
        antialias_downsample(x, 2.0)


def test_expected_coordinates_of_a_delta_heatmap():
    D, H, W = 3, 5, 4
    grid = make_coordinate_grid(D, H, W)
    assert grid.shape == (D, H, W, 3)
    hm = torch.zeros(1, 2, D, H, W)
    hm[0, 0, 2, 1, 3] = 1          # z index 2 of 3 -> 1; y index 1 of 5 -> -0.5; x 3 of 4 -> 1
    hm[0, 1, 1, 2, 0] = 0.5
    hm[0, 1, 1, 2, 3] = 0.5        # halfway between x = -1 and x = 1
    kp = expected_coordinates(hm)
    torch.testing.assert_close(kp, torch.tensor([[[1.0, -0.5, 1.0], [0.0, 0.0, 0.0]]]))
    with pytest.raises(ValueError, match="heatmap: expected shape"):
        expected_coordinates(hm[0])


TINY_KP = dict(num_kp=3, block_expansion=4, max_features=16, num_blocks=2, reshape_depth=4,
               scale_factor=0.5)


class _FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1, -1, -1, -1)


def test_keypoint_detector_shapes_gradients_and_known_answers():
    torch.manual_seed(1)
    det = N.CanonicalKeypointDetector(**TINY_KP)
    img = torch.randn(2, 3, 16, 16)
    out = det(img)
    assert out["value"].shape == (2, 3, 3) and "jacobian" not in out
    assert out["heatmap"].shape == (2, 3, 4, 8, 8)
    torch.testing.assert_close(out["heatmap"].sum((2, 3, 4)), torch.ones(2, 3))
    assert out["value"].abs().max() <= 1
    _grads_everywhere(det, out["value"].square().sum())
    # constant logits: a uniform heatmap, keypoints at the centre
    nn.init.zeros_(det.kp.weight)
    nn.init.zeros_(det.kp.bias)
    torch.testing.assert_close(det(img)["value"], torch.zeros(2, 3, 3), atol=1e-6, rtol=0)
    # a peak of height 2 over 0 elsewhere: softmax(logits / 0.1) is nearly a delta at the peak
    logits = torch.zeros(1, 3, 4, 8, 8)
    logits[0, 0, 3, 0, 7] = 2.0
    logits[0, 1, 0, 7, 0] = 2.0
    logits[0, 2, 1, 3, 4] = 2.0
    det.kp = _FixedLogits(logits)
    grid = make_coordinate_grid(4, 8, 8)
    expected = torch.stack([grid[3, 0, 7], grid[0, 7, 0], grid[1, 3, 4]])
    torch.testing.assert_close(det(img)["value"], expected.expand(2, 3, 3), atol=0.03, rtol=0)
    # temperature 1 blurs the same logits towards the centre
    det_t1 = N.CanonicalKeypointDetector(**{**TINY_KP, "temperature": 1.0})
    det_t1.kp = _FixedLogits(logits)
    assert det_t1(img)["value"][0, 0, 0] < 0.5 * expected[0, 0]


def test_keypoint_detector_jacobian_is_identity_at_init_and_errors():
    det = N.CanonicalKeypointDetector(**TINY_KP, estimate_jacobian=True)
    jac = det(torch.randn(2, 3, 16, 16))["jacobian"]
    torch.testing.assert_close(jac, torch.eye(3).expand(2, 3, 3, 3))
    with pytest.raises(ValueError, match="image: expected shape \\(B, 3, H, W\\)"):
        det(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples of 4"):
        det(torch.randn(2, 3, 12, 12))
    with pytest.raises(ValueError, match="temperature: expected > 0"):
        N.CanonicalKeypointDetector(**TINY_KP, temperature=0.0)


def test_appearance_extractor_tiny_and_errors():
    torch.manual_seed(2)
    app = N.AppearanceFeatureExtractor(block_expansion=8, max_features=16, reshape_channel=4,
                                       reshape_depth=4, num_resblocks=1)
    vol = app(torch.randn(2, 3, 16, 16))
    assert vol.shape == (2, 4, 4, 4, 4)
    _grads_everywhere(app, vol.square().mean())
    with pytest.raises(ValueError, match="image: expected shape \\(B, 3, H, W\\) with H, W "
                                         "divisible by 4"):
        app(torch.randn(2, 3, 18, 16))


def test_full_size_shapes_on_meta():
    with torch.device("meta"):
        app = N.AppearanceFeatureExtractor()
        det = N.CanonicalKeypointDetector()
        dec = N.MultiScaleDecoder()
        img = torch.empty(2, 3, 256, 256)
        vol = app(img)
        assert vol.shape == (2, 32, 16, 64, 64)
        out = det(img)
        assert out["value"].shape == (2, 15, 3) and out["heatmap"].shape == (2, 15, 16, 64, 64)
        images = dec(vol, torch.empty(2, 1, 64, 64))
    assert [tuple(i.shape) for i in images] == [(2, 3, 64, 64), (2, 3, 128, 128), (2, 3, 256, 256)]
    assert det.reshape_channel == 1024 and det.conv.out_channels == 1024 * 16


def test_multiscale_decoder_tiny():
    torch.manual_seed(3)
    dec = N.MultiScaleDecoder(in_channels=4 * 2, channels=(16, 8, 4), res_blocks=(2, 1, 1))
    vol = torch.randn(2, 4, 2, 8, 8)
    images = dec(vol, torch.rand(2, 1, 8, 8))
    assert [tuple(i.shape) for i in images] == [(2, 3, 8, 8), (2, 3, 16, 16), (2, 3, 32, 32)]
    assert all(i.abs().max() <= 1 for i in images)
    _grads_everywhere(dec, sum(i.square().mean() for i in images))
    # a flat (B, C*D, H, W) input is the same as the volume
    dec.eval()
    torch.testing.assert_close(dec(vol)[2], dec(vol.flatten(1, 2))[2])
    # a zero occlusion map hides the input entirely
    a = dec(vol, torch.zeros(2, 1, 8, 8))
    b = dec(torch.randn(2, 4, 2, 8, 8), torch.zeros(2, 1, 8, 8))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert not torch.allclose(dec(vol)[2], dec(torch.randn(2, 4, 2, 8, 8))[2])
    # the pre-activations: tanh of them is the output
    images, logits = dec(vol, return_logits=True)
    for img, x in zip(images, logits):
        torch.testing.assert_close(img, torch.tanh(x))
        assert x.abs().max() > 0
    with pytest.raises(ValueError, match="volume: expected shape"):
        dec(torch.randn(2, 3, 2, 8, 8))
    with pytest.raises(ValueError, match="occlusion: expected shape \\(2, 1, 8, 8\\)"):
        dec(vol, torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="res_blocks: expected one number or 3"):
        N.MultiScaleDecoder(channels=(16, 8, 4), res_blocks=(1, 1))
    sig = N.MultiScaleDecoder(in_channels=8, channels=(8,), output="sigmoid")
    assert len(sig(vol)) == 1 and sig(vol)[0].min() >= 0


def test_blocks_compose_with_dense_motion_and_the_keypoint_transform():
    """Source image -> volume + canonical keypoints -> posed keypoints -> dense motion -> warp ->
    multi-scale decoder, at tiny sizes (the MMFA generator's data flow)."""
    torch.manual_seed(4)
    K = 3
    app = N.AppearanceFeatureExtractor(block_expansion=8, max_features=16, reshape_channel=4,
                                       reshape_depth=4, num_resblocks=1)
    det = N.CanonicalKeypointDetector(num_kp=K, block_expansion=4, max_features=16, num_blocks=2,
                                      reshape_depth=4, scale_factor=0.25)
    dm = N.DenseMotion(N.DenseMotionConfig(num_kp=K, feature_channel=4, block_expansion=4,
                                           num_blocks=2, max_features=16, reshape_depth=4,
                                           compress=2))
    dec = N.MultiScaleDecoder(in_channels=16, channels=(16, 8, 4))
    src, drv = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    vol = app(src)
    kp_c = det(src)["value"]
    assert vol.shape == (2, 4, 4, 8, 8) and det(src)["heatmap"].shape[2:] == vol.shape[2:]
    cfg = N.KeypointTransformConfig("scaled", orthographic=True)
    rot = N.euler_to_rotation(pitch=torch.zeros(2), yaw=torch.full((2,), 10.0),
                              roll=torch.zeros(2))
    kp_s = N.transform_keypoints(kp_c, torch.eye(3).expand(2, 3, 3), torch.zeros(2, 3),
                                 torch.zeros(2, K, 3), scale=torch.ones(2), config=cfg)
    kp_d = N.transform_keypoints(det(drv)["value"], rot, torch.zeros(2, 3),
                                 torch.zeros(2, K, 3), scale=torch.ones(2), config=cfg)
    motion = dm(vol, kp_source=kp_s, kp_driving=kp_d)
    warped = dm.warp(vol, kp_source=kp_s, kp_driving=kp_d, mask=motion["mask"])
    images = dec(warped, motion["occlusion_map"])
    assert [tuple(i.shape) for i in images] == [(2, 3, 8, 8), (2, 3, 16, 16), (2, 3, 32, 32)]
    images[-1].mean().backward()
    for m in (app, det, dec):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_coordinate_grid_refuses_empty_sizes():
    for args, name in (((0, 4, 4), "depth"), ((4, 0, 4), "height"), ((4, 4, -1), "width")):
        with pytest.raises(ValueError, match=f"{name}: expected an integer >= 1"):
            make_coordinate_grid(*args)
    assert make_coordinate_grid(1, 2, 3).shape == (1, 2, 3, 3)
