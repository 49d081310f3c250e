# Provenance: _fv2v_get_rotation_matrix transcribes the semantics of face-vid2vid's
# get_rotation_matrix (zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis, commit
# 9511d25, CC BY-NC 4.0); written from its documented behaviour, no upstream code is copied.
"""pyface.nn.motion: DenseMotion on the fused warp ops, keypoint transforms, head-pose decoding."""
import math

import pytest
import torch
import torch.nn.functional as F

from pyface.nn import (FACE_VID2VID_PI, DenseMotion, DenseMotionConfig, KeypointTransformConfig,
                       euler_to_rotation, headpose_to_degrees, transform_keypoints)
from pyface.ops.reference import keypoint_flow_reference, motion_field_input_reference
from pyface.testing import assert_close


def test_headpose_to_degrees():
    assert_close(headpose_to_degrees(torch.zeros(2, 66)), torch.full((2,), 32.5 * 3 - 99))
    logits = torch.full((1, 66), -1e4)
    logits[0, 33] = 0
    assert_close(headpose_to_degrees(logits), torch.zeros(1))
    with pytest.raises(ValueError, match="logits: expected shape"):
        headpose_to_degrees(torch.zeros(2, 65))


def test_euler_to_rotation():
    ang = torch.tensor([10.0, -35.0, 80.0], dtype=torch.float64)
    R = euler_to_rotation(pitch=ang, yaw=ang.flip(0), roll=ang * 0.5)
    eye = torch.eye(3, dtype=torch.float64).expand(3, 3, 3)
    assert_close(R @ R.transpose(1, 2), eye)
    assert_close(torch.linalg.det(R), torch.ones(3, dtype=torch.float64))
    zero = torch.zeros(1)
    assert_close(euler_to_rotation(pitch=zero, yaw=zero, roll=zero), torch.eye(3).unsqueeze(0))
    # pitch rotates about x: y -> z; yaw about y: z -> x; roll about z: x -> y
    ninety = torch.full((1,), 90.0, dtype=torch.float64)
    z1 = torch.zeros(1, dtype=torch.float64)
    y = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    assert_close(euler_to_rotation(pitch=ninety, yaw=z1, roll=z1)[0] @ y,
                 torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), scale=1e3)
    x = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert_close(euler_to_rotation(pitch=z1, yaw=z1, roll=ninety)[0] @ x, y, scale=1e3)
    assert math.isclose(float(euler_to_rotation(pitch=z1, yaw=ninety, roll=z1)[0, 0, 2]), 1.0)


def _fv2v_get_rotation_matrix(yaw, pitch, roll):
    """face-vid2vid's get_rotation_matrix(yaw, pitch, roll), transcribed: degrees * 3.14 / 180,
    R = Rx(pitch) @ Ry(yaw) @ Rz(roll)."""
    y, p, r = (a / 180 * 3.14 for a in (yaw, pitch, roll))
    out = []
    for yi, pi_, ri in zip(y.tolist(), p.tolist(), r.tolist()):
        rx = torch.tensor([[1, 0, 0], [0, math.cos(pi_), -math.sin(pi_)],
                           [0, math.sin(pi_), math.cos(pi_)]], dtype=torch.float64)
        ry = torch.tensor([[math.cos(yi), 0, math.sin(yi)], [0, 1, 0],
                           [-math.sin(yi), 0, math.cos(yi)]], dtype=torch.float64)
        rz = torch.tensor([[math.cos(ri), -math.sin(ri), 0], [math.sin(ri), math.cos(ri), 0],
                           [0, 0, 1]], dtype=torch.float64)
        out.append(rx @ ry @ rz)
    return torch.stack(out)


def test_euler_to_rotation_face_vid2vid_compat():
    yaw = torch.tensor([30.0, -60.0, 5.0], dtype=torch.float64)
    pitch = torch.tensor([-10.0, 20.0, 45.0], dtype=torch.float64)
    roll = torch.tensor([3.0, -80.0, 15.0], dtype=torch.float64)
    want = _fv2v_get_rotation_matrix(yaw, pitch, roll)
    got = euler_to_rotation(pitch=pitch, yaw=yaw, roll=roll, pi=FACE_VID2VID_PI)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    exact = euler_to_rotation(pitch=pitch, yaw=yaw, roll=roll)
    assert (exact - want).abs().max() > 1e-4       # the 3.14 / 180 difference is real
    # the argument-order trap: positional calls are refused
    with pytest.raises(TypeError):
        euler_to_rotation(yaw, pitch, roll)
    with pytest.raises(ValueError, match="pitch, yaw, roll: expected the same shape"):
        euler_to_rotation(pitch=pitch, yaw=yaw[:2], roll=roll)


def test_transform_keypoints():
    B, K = 2, 4
    kp = torch.randn(B, K, 3, dtype=torch.float64)
    p, y, r = torch.randn(3, B, dtype=torch.float64) * 30
    R = euler_to_rotation(pitch=p, yaw=y, roll=r)
    t = torch.randn(B, 3, dtype=torch.float64)
    d = torch.randn(B, K * 3, dtype=torch.float64)
    out = transform_keypoints(kp, R, t, d)
    expect = (R.unsqueeze(1) @ kp.unsqueeze(-1)).squeeze(-1) + t.unsqueeze(1) + d.view(B, K, 3)
    assert_close(out, expect)
    s = torch.rand(B, dtype=torch.float64) + 0.5
    cfg = KeypointTransformConfig(mode="scaled", orthographic=True)
    jac = torch.randn(B, K, 3, 3, dtype=torch.float64)
    out, j = transform_keypoints(kp, R, t, d, scale=s, config=cfg, jacobian=jac)
    t0 = t.clone()
    t0[:, 2] = 0
    expect = s.view(B, 1, 1) * (R.unsqueeze(1) @ (kp + d.view(B, K, 3)).unsqueeze(-1)).squeeze(-1)
    assert_close(out, expect + t0.unsqueeze(1))
    assert_close(j, s.view(B, 1, 1, 1) * (R.unsqueeze(1) @ jac))
    with pytest.raises(ValueError, match="scale: required"):
        transform_keypoints(kp, R, t, d, config=KeypointTransformConfig(mode="scaled"))
    with pytest.raises(ValueError, match="rotation: expected shape"):
        transform_keypoints(kp, R[:, :2], t, d)


def test_default_config_is_face_vid2vid():
    m = DenseMotion()
    # hourglass input (K+1)(compress+1) = 80 channels, out_filters 32 + 80 = 112; occlusion conv
    # over 112 * 16 = 1792 channels
    assert m.hourglass.out_filters == 112
    assert m.occlusion.in_channels == 1792
    assert m.mask.out_channels == 16 and m.mask.kernel_size == (7, 7, 7)


SMALL = DenseMotionConfig(num_kp=3, feature_channel=6, block_expansion=4, num_blocks=2,
                          max_features=16, reshape_depth=4, compress=2)


def _inputs(B=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feature = torch.randn(B, 6, 4, 8, 8, generator=gen, requires_grad=True)
    kps = (torch.rand(B, 3, 3, generator=gen) * 2 - 1).requires_grad_()
    kpd = (torch.rand(B, 3, 3, generator=gen) * 2 - 1).requires_grad_()
    return feature, kps, kpd


def test_dense_motion_matches_face_vid2vid_composition():
    torch.manual_seed(0)
    m = DenseMotion(SMALL).eval()
    feature, kps, kpd = _inputs()
    out = m(feature, kp_source=kps, kp_driving=kpd, return_deformation=True)
    assert out["mask"].shape == (2, 4, 4, 8, 8)
    assert out["occlusion_map"].shape == (2, 1, 8, 8)
    assert_close(out["mask"].sum(1), torch.ones(2, 4, 8, 8))
    # the same network with the reference (explicit K+1 copies) dense-motion input
    x = F.relu(m.norm(m.compress(feature)))
    x = motion_field_input_reference(x, kps, kpd, heatmap_variance=SMALL.heatmap_variance)
    pred = m.hourglass(x)
    mask = F.softmax(m.mask(pred), dim=1)
    assert_close(out["mask"], mask, scale=10)
    assert_close(out["deformation"], keypoint_flow_reference(kps, kpd, mask), scale=10)
    assert_close(out["occlusion_map"], torch.sigmoid(m.occlusion(pred.reshape(2, -1, 8, 8))),
                 scale=10)


def test_dense_motion_trains():
    torch.manual_seed(0)
    m = DenseMotion(SMALL)
    feature, kps, kpd = _inputs()
    out = m(feature, kp_source=kps, kp_driving=kpd)
    warped = m.warp(feature, kp_source=kps, kp_driving=kpd, mask=out["mask"])
    assert warped.shape == feature.shape
    (warped.square().mean() + out["occlusion_map"].mean()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert kps.grad.abs().sum() > 0 and feature.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="feature: expected shape"):
        m(feature[:, :5], kp_source=kps, kp_driving=kpd)
    with pytest.raises(ValueError, match="kp_driving: expected shape"):
        m(feature, kp_source=kps, kp_driving=kpd[:, :2])
    # face-vid2vid's forward(feature, kp_driving, kp_source) order cannot be used by mistake
    with pytest.raises(TypeError):
        m(feature, kpd, kps)
    with pytest.raises(TypeError):
        m.warp(feature, kps, kpd, out["mask"])
