"""MMFA: angle conversion, shapes and bad input, one engine step, exact resume, the pipeline on a
tiny checkpoint (pyface.models.load and pyface animate)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from pyface.cli import main
from pyface.data import synthetic as S
from pyface.face.cameras import euler_to_rotation as deep3d_rotation
from pyface.models.mmfa import (MMFA, MMFAConfig, deep3d_to_keypoint_degrees,
                                deep3d_to_keypoint_rotation, pose_keypoints)
from pyface.models.mmfa.motion import ExpressionDecoder
from pyface.nn.motion import euler_to_rotation
from pyface.train import Trainer, build_experiment
from _saved_runs import drop_saved_keys

RES = 32
#: a micro MMFA at 32^2: 8^2 x 4 x 8 volume, K = 4
MICRO = {"resolution": RES, "num_kp": 4, "app_block_expansion": 8, "app_max_features": 16,
         "app_channels": 4, "app_depth": 4, "app_resblocks": 1, "kp_scale_factor": 0.25,
         "kp_block_expansion": 8, "kp_max_features": 16, "kp_blocks": 2, "kp_depth": 4,
         "dm_block_expansion": 8, "dm_blocks": 2, "dm_max_features": 16,
         "dec_channels": [16, 8, 8], "enc_channels": [8, 16], "exp_dim": 8, "exp_hidden": 16,
         "d_block_expansion": 8, "d_blocks": 2, "d_scales": [1.0]}


def micro_model(**kw):
    return MMFA(MMFAConfig(**{**MICRO, **kw}))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mmfa") / "ds")
    S.generate(out, S.SynthConfig(identities=2, videos_per_identity=1, frames=4, resolution=RES,
                                  workers=1), progress=False)
    return out


def experiment(run_dir, data_root, *extra):
    sets = [f"model.{k}={v}" for k, v in MICRO.items()] + [
        f"data.path={data_root}", f"data.resolution={RES}", "data.options.repeats=1",
        f"train.run_dir={run_dir}", "train.batch_size=2", "train.progress=false",
        "train.tensorboard=false", "train.image_every=0", "train.video_every=0",
        "train.num_workers=0", "train.device=cpu", *extra]
    sets = [s.replace(" ", "") for s in sets]   # list values as YAML flow sequences
    return build_experiment("mmfa", MMFAConfig, defaults=MMFA.recipe, preset="tiny",
                            overrides=sets)


# ------------------------------------------------------------------------------------------
# angle conventions
# ------------------------------------------------------------------------------------------

def test_angle_conversion_is_the_same_rotation_in_keypoint_axes():
    g = torch.Generator().manual_seed(0)
    angles = (torch.rand(64, 3, generator=g, dtype=torch.float64) - 0.5) * 1.6   # |.| < 46 deg
    rk = deep3d_to_keypoint_rotation(angles)
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    # a point rotated in Deep3D's camera frame, then expressed in the keypoint grid's frame
    p = torch.randn(64, 3, dtype=torch.float64, generator=g)
    a = (flip @ (deep3d_rotation(angles) @ p[..., None]))[..., 0]
    b = (rk @ (flip @ p[..., None]))[..., 0]
    torch.testing.assert_close(a, b)
    # the Rx Ry Rz degrees give the same matrix through pyface.nn.motion.euler_to_rotation
    deg = deep3d_to_keypoint_degrees(angles)
    torch.testing.assert_close(euler_to_rotation(**deg), rk)
    # single-axis cases: pitch keeps its sign, yaw and roll flip (y and z axes are reversed)
    one = torch.tensor([[0.3, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 0.3]], dtype=torch.float64)
    d = deep3d_to_keypoint_degrees(one)
    v = math.degrees(0.3)
    torch.testing.assert_close(torch.stack([d["pitch"], d["yaw"], d["roll"]], 1),
                               torch.tensor([[v, 0, 0], [0, -v, 0], [0, 0, -v]],
                                            dtype=torch.float64))
    # the nose (towards the camera) of a head turned by +yaw moves to +x in the image in both
    nose_kp = rk.new_tensor([0.0, 0.0, -1.0])
    turned = deep3d_to_keypoint_rotation(one[1:2])[0] @ nose_kp
    assert turned[0] > 0.25
    with pytest.raises(ValueError, match=r"angles: expected shape \(\.\.\., 3\)"):
        deep3d_to_keypoint_rotation(torch.zeros(2, 4))


def test_pose_keypoints_is_scaled_orthographic():
    kc = torch.randn(2, 5, 3)
    delta = 0.1 * torch.randn(2, 5, 3)
    rot = deep3d_to_keypoint_rotation(torch.randn(2, 3) * 0.3)
    s = torch.tensor([0.8, 1.2])
    t = torch.tensor([[0.1, -0.2], [0.0, 0.3]])
    out = pose_keypoints(kc, rot, s, t, delta)
    want = s[:, None, None] * torch.einsum("bij,bkj->bki", rot, kc + delta)
    want[..., :2] += t[:, None]
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match=r"translation: expected shape \(2, 2\)"):
        pose_keypoints(kc, rot, s, torch.zeros(2, 3), delta)
    with pytest.raises(ValueError, match=r"scale: expected shape \(2,\)"):
        pose_keypoints(kc, rot, s[:, None], t, delta)


# ------------------------------------------------------------------------------------------
# shapes and bad input
# ------------------------------------------------------------------------------------------

def test_forward_shapes_and_bad_input():
    torch.manual_seed(0)
    m = micro_model().eval()
    B = 2
    src, drv = torch.rand(B, 3, RES, RES) * 2 - 1, torch.rand(B, 3, RES, RES) * 2 - 1
    eye = torch.eye(3).expand(B, 3, 3)
    out = m(src, drv, eye, eye)
    assert [tuple(i.shape) for i in out["images"]] == [(B, 3, 8, 8), (B, 3, 16, 16),
                                                       (B, 3, 32, 32)]
    assert out["kp_canonical"].shape == out["kp_driving"].shape == (B, 4, 3)
    assert out["mask"].shape == (B, 5, 4, 8, 8) and out["occlusion"].shape == (B, 1, 8, 8)
    assert out["f_exp"].shape == (B, 8) and out["scale"].shape == (B,)
    # expression decoder starts at zero deformation; scale at 1 and translation at 0
    assert out["delta_driving"].abs().max() == 0
    torch.testing.assert_close(out["scale"], torch.ones(B))
    with pytest.raises(ValueError, match=r"source: expected shape \(B, 3, 32, 32\), got "
                                         r"\(2, 3, 16, 16\)"):
        m(src[..., :16, :16], drv, eye, eye)
    with pytest.raises(ValueError, match=r"rot_driving: expected shape \(2, 3, 3\)"):
        m(src, drv, eye, eye[:1])
    with pytest.raises(ValueError, match=r"f_exp: expected shape \(B, 8\)"):
        m.exp_decoder(torch.zeros(2, 7), torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match=r"kp_canonical: expected shape \(2, 4, 3\)"):
        ExpressionDecoder(8, 4)(torch.zeros(2, 8), torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="model.rotation: expected one of"):
        micro_model(rotation="posenet")
    with pytest.raises(ValueError, match="model.hopenet_weights: expected a Hopenet weights"):
        micro_model(rotation="hopenet")
    with pytest.raises(ValueError, match="model.landmark_weights: expected 3 weights"):
        micro_model(landmark_weights=[1.0, 2.0])
    # a training batch without the Deep3D angles that rotation='gt' needs
    img = torch.zeros(B, 3, RES, RES, dtype=torch.uint8)
    batch = {"source": {"image": img}, "driving": {"image": img, "coeffs": torch.zeros(B, 257)}}
    with pytest.raises(ValueError, match=r"batch\['source'\]\['coeffs'\]: expected shape "
                                         r"\(2, 257\)"):
        m.preview(batch)
    batch["source"]["image"] = torch.zeros(B, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"batch\['source'\]\['image'\]: expected shape "
                                         r"\(B, 3, 32, 32\)"):
        m.preview(batch)


def test_landmark_flow_loss_measures_the_motion_at_the_landmarks():
    from pyface.models.mmfa.model import landmark_flow_loss, landmark_point_weights, pixels_to_grid

    size, B = 32, 2
    g = torch.Generator().manual_seed(0)
    lm_d = torch.rand(B, 68, 2, generator=g) * 20 + 6                 # pixels
    shift = torch.tensor([[1.5, -2.0], [0.0, 3.0]])                   # pixels, per sample
    lm_s = lm_d + shift[:, None]
    lin = torch.linspace(-1, 1, 8)
    ident = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1).expand(B, 8, 8, 2)
    w = landmark_point_weights([1.0, 2.0, 2.0])
    assert w[0] == 1 and w[36] == w[47] == 2 and w[48] == w[67] == 2 and w[30] == 1
    # the motion that maps every driving point to its source position: no loss
    moved = ident + shift[:, None, None] * (2.0 / (size - 1))
    assert float(landmark_flow_loss(moved, lm_s, lm_d, size, w)) < 1e-5
    # no motion: the landmarks' displacement in grid units (L1 over x, y; mean over samples)
    want = (shift.abs().sum(1) * 2.0 / (size - 1)).mean()
    torch.testing.assert_close(landmark_flow_loss(ident, lm_s, lm_d, size, w), want)
    # part weights: an error on the mouth only counts twice as much as one on the jaw
    one = lm_d.clone()
    one[:, 50] += torch.tensor([2.0, 0.0])
    jaw = lm_d.clone()
    jaw[:, 5] += torch.tensor([2.0, 0.0])
    a = landmark_flow_loss(ident, one, lm_d, size, w)
    b = landmark_flow_loss(ident, jaw, lm_d, size, w)
    torch.testing.assert_close(a, 2 * b)
    # pixel centres: the first and last pixels are the grid's -1 and 1
    torch.testing.assert_close(pixels_to_grid(torch.tensor([0.5, size - 0.5]), size),
                               torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match=r"lm_driving: expected shape \(2, 68, 2\)"):
        landmark_flow_loss(ident, lm_s, lm_d[:, :10], size, w)


def test_mouth_shape_removes_the_similarity_transform_and_follows_the_jaw():
    from pyface.models.mmfa.model import MOUTH_SHAPE_POINTS, expression_landmark_loss, mouth_shape

    g = torch.Generator().manual_seed(0)
    lm = torch.rand(3, 68, 2, generator=g) * 40 + 10
    a = torch.tensor(0.4)
    rot = torch.stack([torch.stack([a.cos(), -a.sin()]), torch.stack([a.sin(), a.cos()])])
    moved = 1.7 * lm @ rot.T + torch.tensor([5.0, -3.0])
    shape = mouth_shape(lm)
    assert shape.shape == (3, 2 * len(MOUTH_SHAPE_POINTS))
    torch.testing.assert_close(mouth_shape(moved), shape, atol=1e-4, rtol=1e-4)
    # eyes level at y = 0, left to right 10 px apart: the lower lip 4 px down -> y grows by 0.4
    flat = lm.clone()
    flat[:, 36:42] = torch.tensor([20.0, 30.0])
    flat[:, 42:48] = torch.tensor([30.0, 30.0])
    open_ = flat.clone()
    open_[:, 57, 1] += 4.0
    diff = mouth_shape(open_) - mouth_shape(flat)
    i = MOUTH_SHAPE_POINTS.index(57)
    torch.testing.assert_close(diff[:, 2 * i + 1], torch.full((3,), 0.4))
    assert diff.abs().sum() == pytest.approx(1.2, abs=1e-5)
    zero = expression_landmark_loss(torch.zeros_like(diff), diff, flat, open_)
    assert float(zero) == pytest.approx(0.0, abs=1e-6)
    assert float(expression_landmark_loss(diff, diff, flat, open_)) > 0
    # no predicted change: L1 is the mean abs target (0.4 in each row of 50 coordinates); the
    # squared error in units of 0.05 is the mean of (target / 0.05)^2 (one 0.4 per row: 8^2 / 50)
    none = torch.zeros_like(diff)
    assert float(expression_landmark_loss(none, none, flat, open_)) == pytest.approx(0.4 / 50)
    assert float(expression_landmark_loss(none, none, flat, open_, "mse")) == pytest.approx(
        64 / 50, rel=1e-5)
    with pytest.raises(ValueError, match="kind"):
        expression_landmark_loss(none, none, flat, open_, "l2")
    with pytest.raises(ValueError, match="exp_landmark_loss"):
        micro_model(w_exp_landmark=1.0, exp_landmark_loss="huber")
    with pytest.raises(ValueError, match="pred_driving"):
        expression_landmark_loss(diff, diff[:, :4], flat, open_)
    with pytest.raises(ValueError, match="landmarks"):
        mouth_shape(lm[:, :60])


def test_mouth_motion_target_is_the_expression_motion_near_each_keypoint():
    from pyface.models.mmfa.model import (MOUTH_MOTION_UNIT, mouth_motion_loss,
                                          mouth_motion_target, pixels_to_grid)

    g = torch.Generator().manual_seed(0)
    lm = torch.rand(2, 68, 2, generator=g) * 40 + 10
    lm[:, 36:42] = torch.tensor([20.0, 30.0])          # eyes level, 10 px apart
    lm[:, 42:48] = torch.tensor([30.0, 30.0])
    lm[:, 48:68] = torch.linspace(20.0, 30.0, 20)[:, None] + torch.tensor([0.0, 20.0])
    lm[:, 6:11] = torch.linspace(20.0, 30.0, 5)[:, None] + torch.tensor([0.0, 40.0])
    drv = lm.clone()
    drv[:, 57, 1] += 4.0                                # the lower lip 4 px down
    kp = torch.zeros(2, 3, 3)
    kp[:, 0, :2] = pixels_to_grid(drv[:, 57], 64)       # on the moved lip
    kp[:, 1, :2] = pixels_to_grid(torch.tensor([25.0, 4.0]), 64)   # far above the eyes
    kp[:, 2, :2] = pixels_to_grid(torch.tensor([60.0, 40.0]), 64)  # between them: partly near
    target, near = mouth_motion_target(kp, lm, drv, 64, sigma=0.02)
    px = 2.0 / 63
    torch.testing.assert_close(target[:, 0], torch.tensor([[0.0, 4 * px]] * 2), atol=1e-4,
                               rtol=1e-3)
    assert float(near[:, 0].min()) == pytest.approx(1.0) and float(near[:, 1].max()) < 1e-6
    # a head that turns in the image plane, grows and moves, without changing its expression,
    # asks for no expression motion
    a = torch.tensor(0.3)
    rot = torch.stack([torch.stack([a.cos(), -a.sin()]), torch.stack([a.sin(), a.cos()])])
    posed = 1.3 * lm @ rot.T + torch.tensor([4.0, -2.0])
    t0, _ = mouth_motion_target(kp, lm, posed, 64, sigma=0.2)
    assert float(t0.abs().max()) < 1e-5
    # ... and a jaw drop in the turned head is the same motion turned with it
    posed_open = 1.3 * drv @ rot.T + torch.tensor([4.0, -2.0])
    kp_t = kp.clone()
    kp_t[:, 0, :2] = pixels_to_grid(posed_open[:, 57], 64)
    t1, _ = mouth_motion_target(kp_t, lm, posed_open, 64, sigma=0.02)
    want = 1.3 * torch.tensor([0.0, 4.0]) @ rot.T * px
    torch.testing.assert_close(t1[:, 0], want.expand(2, 2), atol=1e-5, rtol=1e-4)
    # the loss: zero on the target, the squared error in units of 1/32 grid units, weighted by
    # nearness (the far keypoint's wrong motion does not count)
    motion = target.clone()
    motion[:, 1] = 0.5
    assert float(mouth_motion_loss(motion, kp, lm, drv, 64, 0.02)) == pytest.approx(0, abs=1e-6)
    motion[:, 0, 1] += MOUTH_MOTION_UNIT
    w = near / near.sum()
    assert float(mouth_motion_loss(motion, kp, lm, drv, 64, 0.02)) == pytest.approx(
        float(w[:, 0].sum()), rel=1e-4)
    with pytest.raises(ValueError, match="motion"):
        mouth_motion_loss(motion[:, :2], kp, lm, drv, 64, 0.02)
    with pytest.raises(ValueError, match="lm_driving"):
        mouth_motion_target(kp, lm, drv[:1], 64, 0.02)
    with pytest.raises(ValueError, match="kp_driving"):
        mouth_motion_loss(motion, kp[0], lm, drv, 64, 0.02)
    with pytest.raises(ValueError, match="mouth_motion_sigma"):
        micro_model(mouth_motion_sigma=0.0)


def test_mouth_flow_loss_asks_the_expression_share_of_the_flow_to_follow_the_mouth():
    from pyface.models.mmfa.model import (MOUTH_MOTION_UNIT, MOUTH_SHAPE_POINTS,
                                          mouth_flow_loss)

    g = torch.Generator().manual_seed(1)
    lm = torch.rand(2, 68, 2, generator=g) * 30 + 10
    lm[:, 36:42] = torch.tensor([15.0, 12.0])
    lm[:, 42:48] = torch.tensor([45.0, 12.0])
    drv = lm.clone()
    drv[:, list(MOUTH_SHAPE_POINTS), 1] += 2.0          # mouth and chin 2 px down
    lin = torch.linspace(-1, 1, 16)
    ident = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1)[None].expand(2, -1, -1, -1)
    m = torch.tensor([0.0, 2.0 * 2 / 63])              # the motion in grid units
    # the driving expression's backward flow points 2 px higher than the source expression's
    assert float(mouth_flow_loss(ident - m, ident, lm, drv, 64)) == pytest.approx(0, abs=1e-8)
    assert float(mouth_flow_loss(ident, ident, lm, drv, 64)) == pytest.approx(
        float((m[1] / MOUTH_MOTION_UNIT) ** 2), rel=1e-4)
    # the wrong way round costs four times as much
    assert float(mouth_flow_loss(ident + m, ident, lm, drv, 64)) == pytest.approx(
        4 * float((m[1] / MOUTH_MOTION_UNIT) ** 2), rel=1e-4)
    with pytest.raises(ValueError, match="flow_swap"):
        mouth_flow_loss(ident, ident[:, :8], lm, drv, 64)
    with pytest.raises(ValueError, match="mouth_motion_mode"):
        micro_model(mouth_motion_mode="pixels")


def test_mouth_motion_term_trains_the_expression_decoder_only(data_root):
    from pyface.data.datasets import PairDataset

    ds = PairDataset(data_root, resolution=RES)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    zero = dict(w_rec=0.0, w_landmark=0.0, w_exp_landmark=0.0, w_equivariance=0.0,
                w_exp_consistency=0.0, w_prior=0.0, w_delta=0.0, w_canonical=0.0, w_gan=0.0,
                w_fm=0.0, w_placement=0.0)
    assert "mouth_motion" not in micro_model(**zero).step("G", batch, None)   # off by default
    from pyface.train.model import StepContext
    late = micro_model(w_mouth_motion=10.0, mouth_motion_start=5, **zero)
    assert "mouth_motion" not in late.step("G", batch, StepContext(4, 8, 2))
    assert "mouth_motion" in late.step("G", batch, StepContext(5, 10, 2))
    m = micro_model(w_mouth_motion=10.0, **zero)
    logs = m.step("G", batch, None)
    assert float(logs["mouth_motion"]) > 0          # delta starts at 0; the mouths differ
    logs["loss"].backward()
    assert m.exp_decoder.out.weight.grad.abs().sum() > 0
    g = m.pose_encoder.fc.weight.grad                # s and t are detached in the term
    assert g is None or float(g.abs().sum()) == 0
    for p in m.dense_motion.parameters():            # the term does not touch the motion net
        assert p.grad is None or float(p.grad.abs().sum()) == 0
    # on the dense motion: a second pass with the source's delta; the dense motion trains too
    m = micro_model(w_mouth_motion=10.0, mouth_motion_mode="flow", **zero)
    with torch.no_grad():         # a non-zero decoder output layer, so delta depends on f_exp
        m.exp_decoder.out.weight.normal_(std=0.1)
    logs = m.step("G", batch, None)
    assert float(logs["mouth_motion"]) > 0 and "landmark" not in logs
    logs["loss"].backward()
    assert m.exp_decoder.out.weight.grad.abs().sum() > 0
    assert sum(float(p.grad.abs().sum()) for p in m.dense_motion.parameters()
               if p.grad is not None) > 0


def test_expression_landmark_term_trains_the_expression_encoder(data_root):
    from pyface.data.datasets import PairDataset

    ds = PairDataset(data_root, resolution=RES)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert micro_model(w_exp_landmark=0.0).exp_landmark_head is None
    m = micro_model(w_landmark=0.0, w_exp_landmark=10.0, w_rec=0.0, w_equivariance=0.0,
                    w_exp_consistency=0.0, w_prior=0.0, w_delta=0.0, w_canonical=0.0,
                    w_gan=0.0, w_fm=0.0)
    assert any(p is m.exp_landmark_head.weight for p in m.generator_parameters())
    logs = m.step("G", batch, None)
    assert float(logs["exp_landmark"]) > 0 and "landmark" not in logs
    logs["loss"].backward()
    assert m.exp_encoder.first.conv.weight.grad.abs().sum() > 0
    assert m.exp_landmark_head.weight.grad.abs().sum() > 0
    g = m.pose_encoder.fc.weight.grad         # every other term is weighted 0
    assert g is None or float(g.abs().sum()) == 0


def test_exp_detach_leaves_the_encoder_to_the_expression_landmark_term(data_root):
    from pyface.data.datasets import PairDataset

    ds = PairDataset(data_root, resolution=RES)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    with pytest.raises(ValueError, match="w_exp_landmark"):
        micro_model(exp_detach=True, w_exp_landmark=0.0)
    # only the motion terms on: with exp_detach the encoder gets no gradient, the decoder does
    only_motion = dict(w_exp_landmark=1e-12, w_exp_consistency=0.0, w_gan=0.0, w_fm=0.0)
    grads = {}
    for detach in (False, True):
        torch.manual_seed(0)
        m = micro_model(exp_detach=detach, **only_motion)
        with torch.no_grad():         # a non-zero decoder output layer, so delta depends on f
            m.exp_decoder.out.weight.normal_(std=0.1)
        m.step("G", batch, None)["loss"].backward()
        grads[detach] = (float(m.exp_encoder.first.conv.weight.grad.abs().sum()),
                         float(m.exp_decoder.out.weight.grad.abs().sum()))
    assert grads[False][0] > 1e3 * grads[True][0] and grads[False][0] > 0
    assert grads[True][1] > 0


def test_landmark_term_in_the_step_and_without_landmarks(data_root):
    from pyface.data.datasets import PairDataset

    ds = PairDataset(data_root, resolution=RES)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    m = micro_model(w_landmark=10.0)
    logs = m.step("G", batch, None)
    assert float(logs["landmark"]) > 0
    logs["loss"].backward()
    assert m.pose_encoder.fc.weight.grad.abs().sum() > 0
    for f in ("source", "driving"):
        batch[f].pop("landmarks")
    with pytest.warns(UserWarning, match="landmark terms are off"):
        logs = m.step("G", batch, None)
    assert "landmark" not in logs
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # warned once only
        m.step("G", batch, None)


def test_mouth_term_weights_the_mouth_box_of_the_driving_frame(data_root):
    from pyface.data.datasets import PairDataset
    from pyface.models.mmfa.model import masked_l1, mouth_box_mask

    lm = torch.zeros(2, 68, 2)
    lm[:, 48:68, 0] = torch.linspace(10.0, 20.0, 20)
    lm[:, 48:68, 1] = torch.linspace(22.0, 25.0, 20)
    lm[1, 48:68] += 3.0
    box = mouth_box_mask(lm, RES, 2.0)
    assert box.shape == (2, 1, RES, RES)
    ys, xs = box[0, 0].nonzero().T            # pixel centres i + 0.5 in [8, 22] x [20, 27]
    assert (int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())) == (8, 21, 20, 26)
    torch.testing.assert_close(box[1, 0, 3:, 3:], box[0, 0, :-3, :-3])
    with pytest.raises(ValueError, match="landmarks"):
        mouth_box_mask(lm[:, :60], RES, 2.0)
    pred, tgt = torch.zeros(2, 3, RES, RES), torch.zeros(2, 3, RES, RES)
    tgt[:, :, 0, 0] = 1.0                      # an error outside both boxes does not count
    assert float(masked_l1(pred, tgt, box)) == 0.0
    tgt[0, :, 22, 12] = 1.0
    assert abs(float(masked_l1(pred, tgt, box)) - 0.5 / float(box[0].sum())) < 1e-7
    with pytest.raises(ValueError, match="mask"):
        masked_l1(pred, tgt, box[:, :, :-1])
    ds = PairDataset(data_root, resolution=RES)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    zero = dict(w_rec=0.0, w_landmark=0.0, w_exp_landmark=0.0, w_equivariance=0.0,
                w_exp_consistency=0.0, w_prior=0.0, w_delta=0.0, w_canonical=0.0, w_gan=0.0,
                w_fm=0.0, source_blend=True)
    assert "mouth_l1" not in micro_model(**zero).step("G", batch, None)   # off by default
    m = micro_model(w_mouth=10.0, **zero)
    logs = m.step("G", batch, None)
    assert float(logs["mouth_l1"]) > 0
    logs["loss"].backward()
    assert m.decoder.to_image[-1].weight.grad.abs().sum() > 0
    assert m.pose_encoder.fc.weight.grad.abs().sum() > 0   # the box's content moves with s, t


def test_blend_cap_bounds_the_source_blend_mask(data_root):
    from pyface.data.datasets import PairDataset

    with pytest.raises(ValueError, match="blend_cap"):
        micro_model(source_blend=True, blend_cap=0.0)
    ds = PairDataset(data_root, resolution=RES)
    src = torch.stack([ds[0]["source"]["image"], ds[1]["source"]["image"]]).float() / 127.5 - 1
    rot = torch.eye(3).expand(2, 3, 3)
    for cap in (1.0, 0.9):
        torch.manual_seed(0)
        m = micro_model(source_blend=True, blend_cap=cap).eval()
        with torch.no_grad():
            for conv in m.decoder.to_image:        # a saturated mask: tanh -> 1
                conv.bias[3] = 50.0
            out = m(src, src, rot, rot)
        blend = out["blend"][-1]
        assert float(blend.max()) <= cap + 1e-6 and float(blend.min()) > cap - 1e-3
    # the bound penalty: only the pre-activation beyond +-blend_bound counts, and it has a
    # gradient where the tanh has none
    ds_batch = torch.utils.data.default_collate([ds[0], ds[1]])
    zero = dict(w_rec=0.0, w_landmark=0.0, w_exp_landmark=0.0, w_equivariance=0.0,
                w_exp_consistency=0.0, w_prior=0.0, w_delta=0.0, w_canonical=0.0, w_gan=0.0,
                w_fm=0.0, source_blend=True)
    m = micro_model(w_blend_bound=1.0, blend_bound=3.0, **zero)
    with torch.no_grad():
        for conv in m.decoder.to_image:
            conv.bias[3] = 50.0
    logs = m.step("G", ds_batch, None)
    assert 40.0 < float(logs["blend_bound"]) < 60.0
    logs["loss"].backward()
    # d/d bias of mean(relu(x - 3)) over pixels, averaged over the 3 scales: 1 / 3
    assert abs(float(m.decoder.to_image[-1].bias.grad[3]) - 1 / 3) < 1e-3
    m = micro_model(w_blend_bound=1.0, blend_bound=3.0, **zero)  # bias 2: inside the bound
    assert float(m.step("G", ds_batch, None)["blend_bound"]) < 1e-2


def test_placement_from_label_is_the_projected_head_centre():
    from pyface.face.cameras import FFHQ_FOCAL, deep3d_to_label
    from pyface.models.mmfa.motion import placement_from_label

    g = torch.Generator().manual_seed(0)
    angles = (torch.rand(5, 3, generator=g) - 0.5) * 0.6
    trans = (torch.rand(5, 3, generator=g) - 0.5) * torch.tensor([0.2, 0.2, 1.0])
    log_s, t = placement_from_label(deep3d_to_label(angles, trans))
    # the synthetic engine's camera: the head's origin at depth 10 - t_z (Deep3D units) and
    # focal FFHQ_FOCAL; Deep3D's y points up, the grid's down; rotation does not move the origin
    depth = 10.0 - trans[:, 2]
    torch.testing.assert_close(log_s, torch.log(10.0 / depth), atol=1e-5, rtol=0)
    want = 2 * FFHQ_FOCAL * torch.stack([trans[:, 0], -trans[:, 1]], -1) / depth[:, None]
    torch.testing.assert_close(t, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="label"):
        placement_from_label(torch.zeros(2, 16))


def test_placement_term_trains_the_scale_translation_head(data_root):
    from pyface.data.datasets import PairDataset
    from pyface.models.mmfa.model import placement_loss
    from pyface.models.mmfa.motion import placement_from_label

    ds = PairDataset(data_root, resolution=RES)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    cam = batch["driving"]["camera"].float()
    log_s, t = placement_from_label(cam)
    assert float(placement_loss(log_s.exp(), t, cam)) < 1e-5
    assert abs(float(placement_loss(log_s.exp() * math.exp(0.1), t + 0.2, cam)) - 0.3) < 1e-4
    with pytest.raises(ValueError, match="translation"):
        placement_loss(log_s.exp(), t[:, :1], cam)
    zero = dict(w_rec=0.0, w_landmark=0.0, w_exp_landmark=0.0, w_equivariance=0.0,
                w_exp_consistency=0.0, w_prior=0.0, w_delta=0.0, w_canonical=0.0, w_gan=0.0,
                w_fm=0.0)
    assert "placement" not in micro_model(**zero).step("G", batch, None)   # off by default
    m = micro_model(w_placement=10.0, **zero)
    logs = m.step("G", batch, None)
    assert float(logs["placement"]) > 0
    logs["loss"].backward()
    assert m.pose_encoder.fc.weight.grad.abs().sum() > 0          # only this term is on
    g = m.exp_encoder.first.conv.weight.grad
    assert g is None or float(g.abs().sum()) == 0
    for f in ("source", "driving"):
        batch[f].pop("camera")
    with pytest.warns(UserWarning, match="placement term is off"):
        logs = m.step("G", batch, None)
    assert "placement" not in logs


def test_hopenet_rotation_source_is_frozen(tmp_path, data_root):
    from pyface.checkpoint import save_weights
    from pyface.data.datasets import PairDataset
    from pyface.nn import Hopenet

    torch.manual_seed(0)
    path = save_weights(str(tmp_path / "hopenet"), Hopenet().state_dict(), kind="hopenet")
    m = micro_model(rotation="hopenet", hopenet_weights=path).train()
    assert not m.hopenet.training and m.training
    m.hopenet.input_size = 32                 # keep the ResNet-50 cheap in this test
    before = {k: v.clone() for k, v in m.hopenet.state_dict().items()}
    batch = torch.utils.data.default_collate([PairDataset(data_root, resolution=RES)[i]
                                              for i in range(2)])
    for f in ("source", "driving"):
        batch[f].pop("coeffs")                # images only: the rotation comes from Hopenet
    opt = m.build_optimizers()["G"]
    logs = m.step("G", batch, None)
    logs["loss"].backward()
    opt.step()
    assert all(torch.equal(v, m.hopenet.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in m.hopenet.parameters())
    img = batch["driving"]["image"].float() / 127.5 - 1
    want = m.hopenet.rotation(img)
    torch.testing.assert_close(m.rotation_of(batch["driving"], "driving", 2, "cpu"), want)


def test_presets_build():
    for name, preset in MMFA.presets.items():
        cfg = MMFAConfig(**preset.get("model", {}))
        assert cfg.resolution == preset["data"]["resolution"], name
    tiny = MMFAConfig(**MMFA.presets["tiny"]["model"])
    assert (tiny.resolution, tiny.num_kp, tiny.app_channels, tiny.app_depth) == (64, 10, 16, 8)
    m = MMFA(tiny)
    vol = m.appearance(torch.zeros(1, 3, 64, 64))
    assert vol.shape == (1, 16, 8, 16, 16)


# ------------------------------------------------------------------------------------------
# engine: one step, exact resume
# ------------------------------------------------------------------------------------------

def test_one_engine_step_trains_every_part(tmp_path, data_root):
    tr = Trainer(experiment(tmp_path / "run", data_root, "train.steps=1", "train.ckpt_every=0",
                            "model.w_gan=1.0", "model.w_fm=10.0"))
    before = {k: v.detach().clone() for k, v in tr.model.named_parameters()}
    tr.fit()
    changed = {k.split(".")[0] for k, v in tr.model.named_parameters()
               if not torch.equal(v, before[k])}
    assert {"appearance", "kp_detector", "pose_encoder", "exp_encoder", "exp_decoder",
            "dense_motion", "decoder", "discriminator"} <= changed
    assert set(tr.optimizers) == {"G", "D"}


def test_exact_resume_matches_uninterrupted(tmp_path, data_root):
    extra = ["train.ckpt_every=0", "model.w_gan=1.0", "model.w_fm=10.0"]
    full = Trainer(experiment(tmp_path / "full", data_root, "train.steps=4", *extra))
    full.fit()
    a = Trainer(experiment(tmp_path / "split", data_root, "train.steps=2", *extra))
    a.fit()
    b = Trainer(experiment(tmp_path / "split", data_root, "train.steps=4", *extra))
    assert b.resume("auto").endswith("ckpt-000002")
    b.fit()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    for name in ("G", "D"):
        sa, sb = full.optimizers[name].state_dict(), b.optimizers[name].state_dict()
        for i, st in sa["state"].items():
            for k, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][i][k]))


# ------------------------------------------------------------------------------------------
# pipeline on a tiny checkpoint
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, data_root):
    run = tmp_path_factory.mktemp("mmfa_run") / "run"
    Trainer(experiment(run, data_root, "train.steps=2", "train.ckpt_every=0")).fit()
    return run


def test_pipeline_load_controls_and_animate(micro_run, data_root, tmp_path, capsys):
    import pyface.models
    from pyface.data.driving import read_driving, read_source

    pipe = pyface.models.load("mmfa", str(micro_run), device="cpu")
    video = os.path.join(data_root, sorted(d for d in os.listdir(data_root)
                                           if os.path.isdir(os.path.join(data_root, d))
                                           and d.startswith("id"))[0])
    src = read_source(video, pipe.resolution)
    drv = read_driving(video, pipe.resolution)
    T = drv["image"].shape[0]
    rec = pipe.reconstruct(src)
    assert rec.shape == (1, 3, RES, RES) and rec.abs().max() <= 1
    state = pipe.encode_source(src)
    motion = pipe.encode_driving(drv)
    assert motion["rotation"].shape == (T, 3, 3) and motion["f_exp"].shape == (T, 8)
    out = pipe.generate(state, motion)
    assert out.shape == (T, 3, RES, RES)
    torch.testing.assert_close(out, pipe.animate(src, drv))
    # cross-identity keeps the source's scale and translation
    cross = pipe.generate(state, motion, cross_identity=True)
    same = pipe.generate(state, motion, scale=state["scale"].expand(T),
                         translation=state["translation"].expand(T, 2))
    torch.testing.assert_close(cross, same)
    # pyface eval's cross protocol runs this mode; the same-identity protocol has no controls
    assert pipe.protocol_controls("cross") == {"cross_identity": True}
    assert pipe.protocol_controls("same") == {}
    # overrides change the output; the source's own everything reproduces reconstruct
    moved = pipe.generate(state, motion, angles=(0.0, 25.0, 0.0), scale=1.3,
                          translation=torch.tensor([0.2, 0.0]))
    assert not torch.allclose(moved, out)
    own = pipe.generate(state, motion, rotation="source", scale="source", translation="source",
                        expression="source")
    torch.testing.assert_close(own, rec.expand(T, -1, -1, -1), atol=1e-5, rtol=1e-5)
    # without coeffs the source's rotation is kept
    no_rot = pipe.encode_driving({"image": drv["image"]})
    assert no_rot["rotation"] is None
    pipe.generate(state, no_rot)
    with pytest.raises(ValueError, match=r"scale: expected shape \(\) or \(%d,\)" % T):
        pipe.generate(state, motion, scale=torch.ones(T + 1))
    with pytest.raises(ValueError, match=r"expression: expected 'driving', 'source'"):
        pipe.generate(state, motion, expression="mouth")
    with pytest.raises(ValueError, match=r"cross_identity: expected True or False, got 'yes'"):
        pipe.generate(state, motion, cross_identity="yes")
    with pytest.raises(ValueError, match=r"rotation, angles: give at most one"):
        pipe.generate(state, motion, rotation="source", angles=(0, 0, 0))
    with pytest.raises(ValueError, match=r"driving\['image'\]: expected shape"):
        pipe.encode_driving({"image": torch.zeros(3, RES, RES)})
    # pyface animate mmfa writes an mp4
    mp4 = tmp_path / "out.mp4"
    assert main(["animate", "mmfa", "--checkpoint", str(micro_run), "--source", video,
                 "--driving", video, "--out", str(mp4), "--device", "cpu",
                 "--no-progress"]) == 0
    assert mp4.stat().st_size > 0
    assert f"{T} frames at {RES}x{RES}" in capsys.readouterr().out
    assert np.isfinite(out.numpy()).all()


# ------------------------------------------------------------------------------------------
# the expression VAE stage (mmfa_vae)
# ------------------------------------------------------------------------------------------

def vae_experiment(run_dir, data_root, mmfa_run, *extra):
    from pyface.models.mmfa.vae import MMFAVAE, MMFAVAEConfig

    sets = [f"model.mmfa_checkpoint={mmfa_run}", f"data.path={data_root}",
            f"data.resolution={RES}", "data.options.repeats=1", f"train.run_dir={run_dir}",
            "train.batch_size=2", "train.progress=false", "train.tensorboard=false",
            "train.num_workers=0", "train.device=cpu", "model.hidden=[16]",
            "model.d_hidden=[8]", "model.latent=4", *extra]
    return build_experiment("mmfa_vae", MMFAVAEConfig, defaults=MMFAVAE.recipe, preset="tiny",
                            overrides=sets)


def test_vae_stage_trains_on_frozen_mmfa_and_resumes(micro_run, data_root, tmp_path):
    from pyface.models.mmfa.vae import MMFAVAE

    assert MMFAVAE.stages[0].model == "mmfa"
    assert MMFAVAE.stages[0].checkpoint_key == "mmfa_checkpoint"
    full = Trainer(vae_experiment(tmp_path / "full", data_root, micro_run, "train.steps=4",
                                  "train.ckpt_every=0"))
    frozen = {k: v.clone() for k, v in full.model.mmfa.state_dict().items()}
    vae0 = {k: v.clone() for k, v in full.model.vae.state_dict().items()}
    full.fit()
    # the stage-1 model (weights and BatchNorm statistics) is untouched; the VAE trains
    for k, v in full.model.mmfa.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert any(not torch.equal(v, vae0[k]) for k, v in full.model.vae.state_dict().items())
    # the standardisation saw every feature of the 4 steps (2 per pair: source and driving)
    assert float(full.model.vae.stat_count) == 4 * 2 * full.cfg.train.batch_size
    a = Trainer(vae_experiment(tmp_path / "split", data_root, micro_run, "train.steps=2",
                               "train.ckpt_every=0"))
    a.fit()
    b = Trainer(vae_experiment(tmp_path / "split", data_root, micro_run, "train.steps=4",
                               "train.ckpt_every=0"))
    b.resume("auto")
    b.fit()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    with pytest.raises(ValueError, match="model.mmfa_checkpoint: expected a trained mmfa run"):
        MMFAVAE()


def test_standardized_vae_works_in_units_of_the_observed_spread():
    from pyface.models.mmfa.vae import StandardizedVAE

    torch.manual_seed(0)
    vae = StandardizedVAE(in_dim=4, hidden=(8,), latent=2)
    x = torch.randn(40, 4) * torch.tensor([0.1, 1.0, 5.0, 0.01]) + torch.tensor([3.0, -1, 0, 7])
    # before any observation the standardisation is the identity
    torch.testing.assert_close(vae.standardize(x), x)
    for part in x.split([7, 13, 20]):
        vae.observe(part)
    assert float(vae.stat_count) == 40
    z = vae.standardize(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(vae.unstandardize(z), x, atol=1e-5, rtol=1e-5)
    # encode sees standardised inputs, decode gives x units back
    mu, _ = vae.encode(x)
    torch.testing.assert_close(mu, super(StandardizedVAE, vae).encode(z)[0])
    torch.testing.assert_close(vae.decode(mu), vae.unstandardize(
        super(StandardizedVAE, vae).decode(mu)))
    with pytest.raises(ValueError, match="x: expected shape"):
        vae.observe(x[:, :3])


def test_vae_pipeline_interpolates_and_samples(micro_run, data_root, tmp_path):
    import pyface.models
    from pyface.data.driving import read_driving, read_source

    run = tmp_path / "vae"
    Trainer(vae_experiment(run, data_root, micro_run, "train.steps=2",
                           "train.ckpt_every=0")).fit()
    pipe = pyface.models.load("mmfa_vae", str(run), device="cpu")
    assert pipe.resolution == RES
    video = os.path.join(data_root, sorted(d for d in os.listdir(data_root)
                                           if d.startswith("id"))[0])
    src, drv = read_source(video, RES), read_driving(video, RES)
    state, motion = pipe.encode_source(src), pipe.encode_driving(drv)
    f = motion["f_exp"]
    path = pipe.interpolate_expression(f[0], f[-1], torch.linspace(0, 1, 5))
    assert path.shape == (5, 8)
    mu_a, _ = pipe.model.vae.encode(f[:1])
    torch.testing.assert_close(path[0], pipe.model.vae.decode(mu_a)[0])
    samples = pipe.sample_expression(3, torch.Generator().manual_seed(0))
    assert samples.shape == (3, 8)
    out = pipe.generate(state, {k: (v[:3] if v is not None else None) for k, v in motion.items()},
                        expression=samples)
    assert out.shape == (3, 3, RES, RES)
    torch.testing.assert_close(pipe.reconstruct(src),
                               pyface.models.load("mmfa", str(micro_run),
                                                  device="cpu").reconstruct(src))
    with pytest.raises(ValueError, match=r"f_b: expected shape \(8,\)"):
        pipe.interpolate_expression(f[0], f[:2], [0.5])
    with pytest.raises(ValueError, match=r"n: expected an int >= 1, got -1"):
        pipe.sample_expression(-1)
    # the tensors it makes follow the module and the inputs (no float32 / default-device
    # alphas): a float64 VAE and float64 features, alphas a float64 tensor or a list, give
    # exactly the float64 interpolation (the alphas were rounded to float32)
    vae = pipe.model.vae.double()
    fa, fb = f[0].double(), f[-1].double()
    alphas = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    mu_a, mu_b = vae.encode(fa[None])[0], vae.encode(fb[None])[0]
    want = vae.decode((1 - alphas[:, None]) * mu_a + alphas[:, None] * mu_b)
    for given in (alphas, alphas.tolist()):
        got = pipe.interpolate_expression(fa, fb, given)
        assert got.dtype == torch.float64 and torch.equal(got, want)
    vae.float()


VAE_RANKS = '''
import torch
import torch.distributed as dist
from pyface.models.mmfa.vae import StandardizedVAE

torch.set_num_threads(1)
dist.init_process_group("gloo")
r = dist.get_rank()
torch.manual_seed(0)
batches = [torch.randn(4, 6) * 2 + 3 for _ in range(3)]
vae = StandardizedVAE(in_dim=6)
for x in batches:
    vae.observe(x[2 * r:2 * r + 2])                  # this rank's half of the global batch
x = torch.cat(batches).double()
assert float(vae.stat_count) == 12
torch.testing.assert_close(vae.stat_mean, x.mean(0))
torch.testing.assert_close(vae.stat_m2, (x - x.mean(0)).square().sum(0))
dist.destroy_process_group()
'''


def test_vae_statistics_are_global_under_torchrun(tmp_path):
    """2 gloo ranks, half of each batch each: StandardizedVAE.observe accumulates the whole
    batches' count, mean and squared deviations (as one process does), so the ranks keep the
    same buffers and a resumed run (rank 0's broadcast) continues exactly."""
    from pyface.testing import run_torchrun

    script = tmp_path / "vae_ranks.py"
    script.write_text(VAE_RANKS)
    run_torchrun(script)


def test_gan_and_feature_matching_are_summed_over_scales_and_layers(tmp_path, data_root):  # noqa: F811
    from pyface.models.mmfa.model import images_of
    from pyface.train import Trainer
    from pyface.train.model import StepContext

    tr = Trainer(experiment(tmp_path / "run", data_root, "train.steps=1", "train.ckpt_every=0",
                            "model.w_gan=1.0", "model.w_fm=10.0", "model.d_scales=[1.0,0.5]"))
    m = tr.model.eval()           # spectral norm: no power iteration, the same D twice
    batch = tr._to_device(next(iter(tr._loader())))
    logs = m.step("G", batch, StepContext(step=0, images_seen=0, batch_size=2))
    drv = images_of(batch["driving"], "driving", m.cfg.resolution)
    with torch.no_grad():
        real, fake = m.discriminator(drv), m.discriminator(m._fake)
        fm = sum((f - r).abs().mean() for k in fake for r, f in zip(real[k][0], fake[k][0]))
        g = sum((fake[k][1] - 1).square().mean() for k in fake)
    assert len(fake) == 2 and len(fake["1.0"][0]) == 2
    torch.testing.assert_close(logs["feature_matching"], fm)
    torch.testing.assert_close(logs["gan_g"], g)
    d = m.step("D", batch, StepContext(step=0, images_seen=0, batch_size=2))["gan_d"]
    dr = sum((real[k][1] - 1).square().mean() + fake[k][1].square().mean() for k in real)
    torch.testing.assert_close(d, dr)


# ------------------------------------------------------------------------------------------
# training differences from the paper as options
# ------------------------------------------------------------------------------------------

#: pyface's earlier training, the options' defaults (kept by tiny and runs saved without them)
EARLIER = {"perceptual_outputs": "final", "exp_consistency_warp": "affine_tps",
           "bn_batches": "joint"}


def test_training_options_default_to_the_earlier_training(tmp_path, micro_run, data_root):
    """The defaults are the earlier training: tiny and the recipe keep them, a saved config
    without the keys resolves to them and its run resumes; full and gpu-short set the paper's;
    a resume with a key changed is refused naming it; a bad value names the key."""
    import shutil

    from pyface.checkpoint import CheckpointError
    from pyface.models.mmfa.model import PAPER_TRAINING, TRAINING_CHOICES
    from pyface.train.model import config_from_dict

    def values(cfg, keys=EARLIER):
        return {k: getattr(cfg, k) for k in keys}

    assert values(MMFAConfig()) == EARLIER
    assert set(TRAINING_CHOICES) == set(EARLIER) == set(PAPER_TRAINING)
    assert all(PAPER_TRAINING[k] != v for k, v in EARLIER.items())

    def cfg_of(preset):
        return build_experiment("mmfa", MMFAConfig, defaults=MMFA.recipe, presets=MMFA.presets,
                                preset=preset).model_config
    assert values(cfg_of("tiny")) == EARLIER and values(cfg_of(None)) == EARLIER
    for preset in ("full", "gpu-short"):
        assert values(cfg_of(preset), PAPER_TRAINING) == PAPER_TRAINING, preset
    # a saved config without the keys (a run trained before them)
    saved = {k: v for k, v in vars(MMFAConfig(**MICRO)).items() if k not in EARLIER}
    assert values(config_from_dict(MMFAConfig, saved)) == EARLIER
    # ... and a checkpoint saved without them resumes with the tiny preset
    old = tmp_path / "old"
    shutil.copytree(micro_run, old)
    ckpt = drop_saved_keys(old, EARLIER)[-1]
    t = Trainer(experiment(old, data_root, "train.steps=3"))
    assert t.resume("auto") == ckpt and t.step == 2
    # resuming with a key changed is refused, naming the key
    for k, v in PAPER_TRAINING.items():
        t = Trainer(experiment(old, data_root, "train.steps=3", f"model.{k}={v}"))
        with pytest.raises(CheckpointError, match=f"model.{k}: checkpoint '{EARLIER[k]}' vs "
                                                  f"run '{v}'"):
            t.resume("auto")
    with pytest.raises(ValueError, match="model.perceptual_outputs: expected one of "
                                         r"\('final', 'all'\), got 'coarse'"):
        micro_model(perceptual_outputs="coarse")
    with pytest.raises(ValueError, match="model.exp_consistency_warp: expected one of"):
        micro_model(exp_consistency_warp="tps")
    with pytest.raises(ValueError, match="model.bn_batches: expected one of "
                                         r"\('joint', 'separate'\), got 'per_image'"):
        micro_model(bn_batches="per_image")


def test_perceptual_outputs_all_takes_the_vgg_pyramid_on_every_output(data_root):
    """"final": one VGG pyramid (1, 1/2, 1/4, 1/8) on the final output against the driving
    frame; "all": also on each coarser output, one scale fewer per output, against the driving
    frame resized to it; the logged term is the sum."""
    from pyface.data.datasets import PairDataset
    from pyface.models.mmfa.model import images_of
    from pyface.nn.vgg import PerceptualLoss
    import warnings

    ds = PairDataset(data_root, resolution=RES)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    drv = images_of(batch["driving"], "driving", RES)
    torch.manual_seed(0)
    with warnings.catch_warnings():       # random VGG weights (warned once per process)
        warnings.simplefilter("ignore")
        vgg = PerceptualLoss(layers=["relu1_1", "relu2_1"], scales=[1.0, 0.5, 0.25, 0.125])
    calls = []

    def recording(pred, target, scales=None):
        value = vgg(pred, target, scales=scales)
        calls.append((pred.shape[-1], None if scales is None else tuple(scales), target,
                      float(value.detach())))
        return value

    logs = {}
    for mode in ("final", "all"):
        torch.manual_seed(1)
        with pytest.warns(UserWarning, match="vgg_weights"):
            m = micro_model(w_perceptual=1.0, perceptual_outputs=mode, w_gan=0.0, w_fm=0.0)
        m.perceptual = recording
        calls.clear()
        logs[mode] = float(m.step("G", batch, None)["perceptual"])
        if mode == "final":
            assert [(c[0], c[1]) for c in calls] == [(RES, None)]
            assert torch.equal(calls[0][2], drv)
        else:
            assert [(c[0], c[1]) for c in calls] == [(8, (1.0, 0.5)), (16, (1.0, 0.5, 0.25)),
                                                     (RES, (1.0, 0.5, 0.25, 0.125))]
            for size, _, target, _ in calls[:2]:
                torch.testing.assert_close(target, torch.nn.functional.interpolate(
                    drv, size=(size, size), mode="bilinear", antialias=True,
                    align_corners=False))
            assert torch.equal(calls[2][2], drv)
        assert logs[mode] == pytest.approx(sum(c[3] for c in calls), rel=1e-6)
    # same weights and batch: the final output's term is the same, the coarser ones add to it
    assert calls[2][3] == pytest.approx(logs["final"], rel=1e-6)
    assert logs["all"] > logs["final"] * 1.01
    with pytest.raises(ValueError, match="scales: expected a non-empty list"):
        vgg(drv, drv, scales=[])


def test_exp_consistency_warp_affine_drops_the_tps_part(data_root):
    """"affine_tps": the expression consistency compares f_exp of the driving frame with f_exp of
    the equivariance term's affine + TPS warp of it; "affine": with the same warp's affine part
    alone (the encoder runs on it once more)."""
    from pyface.data.datasets import PairDataset
    from pyface.models.mmfa.model import images_of
    from pyface.nn.augment import AffineTPS

    ds = PairDataset(data_root, resolution=RES)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    drv = images_of(batch["driving"], "driving", RES)
    g = torch.Generator().manual_seed(3)
    theta = torch.eye(2, 3).expand(2, 2, 3) + 0.05 * torch.randn(2, 2, 3, generator=g)
    t = AffineTPS(theta, torch.cartesian_prod(torch.linspace(-1, 1, 5),
                                              torch.linspace(-1, 1, 5)),
                  0.05 * torch.randn(2, 25, 2, generator=g))
    affine = AffineTPS(t.theta, t.control_points, torch.zeros_like(t.control_params))
    cos = {}
    for mode in ("affine_tps", "affine"):
        torch.manual_seed(1)
        m = micro_model(exp_consistency_warp=mode, w_gan=0.0, w_fm=0.0).eval()
        m.augment.sample = lambda *a, **k: t
        logs = m.step("G", batch, None)
        warped = (affine if mode == "affine" else t).warp_image(drv)
        with torch.no_grad():
            want = torch.nn.functional.cosine_similarity(m.exp_encoder(drv),
                                                         m.exp_encoder(warped), dim=1).mean()
        torch.testing.assert_close(logs["exp_cos"], want)
        cos[mode] = float(logs["exp_cos"])
    assert not torch.allclose(affine.warp_image(drv), t.warp_image(drv), atol=1e-2)
    assert cos["affine"] != pytest.approx(cos["affine_tps"], abs=1e-6)


def test_bn_batches_separate_normalises_each_image_set_by_itself(data_root):
    """"joint": the keypoint detector and the pose and expression encoders run once over the 3B
    source, driving and warped driving images, so their BatchNorm layers see batches of 3B and
    update their running statistics once; "separate": one pass per image set, batches of B and
    three updates, the same as running each network on the three sets in turn. In eval mode
    both give the same step."""
    import copy

    from pyface.data.datasets import PairDataset
    from pyface.models.mmfa.model import images_of
    from pyface.nn.augment import AffineTPS

    ds = PairDataset(data_root, resolution=RES)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    src = images_of(batch["source"], "source", RES)
    drv = images_of(batch["driving"], "driving", RES)
    B = src.shape[0]
    g = torch.Generator().manual_seed(3)
    theta = torch.eye(2, 3).expand(B, 2, 3) + 0.05 * torch.randn(B, 2, 3, generator=g)
    t = AffineTPS(theta, torch.cartesian_prod(torch.linspace(-1, 1, 5),
                                              torch.linspace(-1, 1, 5)),
                  0.05 * torch.randn(B, 25, 2, generator=g))
    sets = [src, drv, t.warp_image(drv)]
    nets = ("kp_detector", "pose_encoder", "exp_encoder")

    def model(mode):
        torch.manual_seed(1)
        m = micro_model(bn_batches=mode, w_gan=0.0, w_fm=0.0)
        m.augment.sample = lambda *a, **k: t
        return m

    def buffers(module):
        return {k: v.clone() for k, v in module.named_buffers()
                if "running" in k or "num_batches" in k}

    stats, logs = {}, {}
    for mode in ("joint", "separate"):
        m = model(mode)
        # what each network's BatchNorm layers would hold after the step's passes
        want = {}
        for name in nets:
            ref = copy.deepcopy(getattr(m, name)).train()
            with torch.no_grad():
                for x in (sets if mode == "separate" else [torch.cat(sets)]):
                    ref(x)
            want[name] = buffers(ref)
        seen = []
        hooks = [mod.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0]))
                 for name in nets for mod in getattr(m, name).modules()
                 if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
        logs[mode] = m.step("G", batch, None)
        for h in hooks:
            h.remove()
        assert seen and set(seen) == {B if mode == "separate" else 3 * B}, mode
        stats[mode] = {name: buffers(getattr(m, name)) for name in nets}
        for name in nets:
            assert stats[mode][name].keys() == want[name].keys() and want[name], name
            for k, v in want[name].items():
                torch.testing.assert_close(stats[mode][name][k], v, msg=f"{mode} {name}.{k}")
    for name in nets:
        assert any(not torch.allclose(stats["joint"][name][k], stats["separate"][name][k])
                   for k in stats["joint"][name] if "mean" in k), name
    assert all(int(v) == (3 if mode == "separate" else 1)
               for mode in stats for name in nets
               for k, v in stats[mode][name].items() if "num_batches" in k)
    assert float(logs["joint"]["loss"].detach()) != pytest.approx(
        float(logs["separate"]["loss"].detach()), rel=1e-6)
    # eval mode: the running statistics normalise every pass, the two are the same step
    ev = {mode: model(mode).eval().step("G", batch, None) for mode in ("joint", "separate")}
    assert ev["joint"].keys() == ev["separate"].keys()
    for k in ev["joint"]:
        torch.testing.assert_close(ev["separate"][k], ev["joint"][k], msg=k)
