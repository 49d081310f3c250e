"""GOHA (pyface/models/goha): framing, blocks, masks, stage s1's engine step and exact resume,
the s1 -> s1_gan -> s2 chain (one step each), s2's exact resume, pipelines on tiny checkpoints,
bad input, the tiny preset's training set."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyface.models
from pyface.face import cameras as cam
from pyface.face.coeffs import merge_coeffs
from pyface.face.morphable import MorphableModel
from pyface.models.goha import GOHA, Embed2Plane, IDUpsampler, bfm224_label, mode_of
from pyface.models.goha.config import GOHAConfig
from pyface.train import Trainer, build_experiment
from pyface.train.model import load_pretrained
from _saved_runs import drop_saved_keys, edit_saved_config

# the tiny preset, smaller still, with every branch switched on from step 1
FAST = ["model.canonical_until=1", "model.expression_from=1", "model.appearance_from=1",
        "model.tv_points=32", "train.batch_size=2", "train.progress=false",
        "train.tensorboard=false", "train.image_every=0", "train.log_every=1",
        "train.ckpt_every=0", "train.num_workers=0"]


def tiny_config(**over) -> GOHAConfig:
    cfg = build_experiment("goha_s1", GOHA.Config, defaults=GOHA.recipe, presets=GOHA.presets,
                           preset="tiny").model_config
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def random_coeffs(B, seed=0, pose=0.2):
    g = torch.Generator().manual_seed(seed)
    c = torch.zeros(B, 257)
    c[:, :80] = torch.randn(B, 80, generator=g) * 0.5
    c[:, 80:144] = torch.randn(B, 64, generator=g) * 0.5
    c[:, 144:224] = torch.randn(B, 80, generator=g) * 0.5
    c[:, 224:227] = torch.randn(B, 3, generator=g) * pose
    c[:, 254:257] = torch.randn(B, 3, generator=g) * 0.1
    return c


def frame(coeffs, R=64):
    r = MorphableModel.builtin().render(coeffs, R)
    return {"image": (r.image * 255).round().to(torch.uint8), "camera": r.label,
            "coeffs": coeffs, "mask": (r.mask * 255).round().to(torch.uint8)}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from pyface.data.synthetic import SynthConfig, generate

    root = tmp_path_factory.mktemp("goha_data")
    generate(str(root), SynthConfig(identities=2, videos_per_identity=1, frames=4, resolution=64,
                                    workers=1, cross=False), progress=False)
    return root


def experiment(run, data_root, *extra):
    return build_experiment("goha_s1", GOHA.Config, defaults=GOHA.recipe, presets=GOHA.presets,
                            preset="tiny", overrides=FAST + [f"train.run_dir={run}",
                                                             f"data.path={data_root}", *extra])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_root):
    run = tmp_path_factory.mktemp("goha") / "run"
    Trainer(experiment(run, data_root, "train.steps=2")).fit()
    return run


# ------------------------------------------------------------------------------- framing
def test_bfm224_framing_matches_deep3d_projection():
    """The expression pseudo-render's camera is Deep3DFaceRecon's 224 crop: focal 1015 px,
    centre 112 px, camera at distance 10 (pixel x = 1015 X / (10 - Z) + 112, row = 224 - y)."""
    assert (cam.BFM_FOCAL, cam.BFM_CENTER, cam.BFM_IMAGE_SIZE) == (1015.0, 112.0, 224)
    assert cam.BFM_CAMERA_DISTANCE == 10.0
    face = MorphableModel.builtin()
    c = random_coeffs(2, seed=3, pose=0.15)
    angles, trans = c[:, 224:227], c[:, 254:257]
    label = bfm224_label(angles, trans)
    k = label[:, 16:].view(2, 3, 3)
    torch.testing.assert_close(k[:, 0, 0], torch.full((2,), 1015 / 224))
    torch.testing.assert_close(k[:, :2, 2], torch.full((2, 2), 0.5))
    posed = face(c)["landmarks3d"]                         # R v + t in BFM units
    xy, depth = cam.project_bfm(posed)
    # the same points projected through the EG3D label of the pose, at 224 px
    unposed = face.shape(c[:, :80], c[:, 80:144])[:, face.landmarks] * cam.BFM_TO_EG3D_SCALE
    uv, z = cam.project_label(unposed, label)
    px = uv * 224
    torch.testing.assert_close(px[..., 0], xy[..., 0], atol=1e-3, rtol=0)
    torch.testing.assert_close(px[..., 1], 224 - xy[..., 1], atol=1e-3, rtol=0)
    torch.testing.assert_close(z / cam.BFM_TO_EG3D_SCALE, depth, atol=1e-4, rtol=1e-5)
    # the renderer uses that camera: landmarks of the render equal the projection
    r = face.render(c, 224, label=label)
    torch.testing.assert_close(r.landmarks, px, atol=1e-3, rtol=0)


def test_pseudo_render_uses_source_identity_and_driving_expression():
    m = GOHA(tiny_config())
    src = random_coeffs(1, seed=1)
    a = m.pseudo_render(src, torch.zeros(1, 64))
    b = m.pseudo_render(src, random_coeffs(1, seed=2)[:, 80:144])
    assert a.shape == (1, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    assert (a - b).abs().mean() > 1e-3                    # expression changes the render
    # the source's pose does not matter (fixed exemplar pose)
    moved = src.clone()
    moved[:, 224:227] += 0.3
    torch.testing.assert_close(m.pseudo_render(moved, torch.zeros(1, 64)), a)


# ------------------------------------------------------------------------------- blocks
def test_embed2plane_and_upsampler_shapes_and_bad_input():
    e = Embed2Plane(8, 6, 4)
    assert e(torch.randn(2, 8, 5, 7)).shape == (2, 3, 4, 10, 14)
    with pytest.raises(ValueError, match=r"x: expected \(B, 8, h, w\)"):
        e(torch.randn(2, 7, 5, 5))
    u = IDUpsampler(8, 6, 4)
    assert u(torch.randn(2, 3, 8, 5, 5)).shape == (2, 3, 4, 10, 10)
    with pytest.raises(ValueError, match=r"planes: expected \(B, 3, 8, A, A\)"):
        u(torch.randn(2, 2, 8, 5, 5))


def test_upsampler_weight_sharing_flag():
    """GOHA's bug (xz / zy use the xy up-branch) only with share_weights=True; the same
    parameters exist either way (checkpoint compatible)."""
    assert GOHAConfig().share_upsampler_weights is False
    torch.manual_seed(0)
    fixed, shared = IDUpsampler(8, 6, 4), IDUpsampler(8, 6, 4, share_weights=True)
    assert fixed.state_dict().keys() == shared.state_dict().keys()
    shared.load_state_dict(fixed.state_dict())
    x = torch.randn(1, 3, 8, 5, 5)
    a, b = fixed(x), shared(x)
    torch.testing.assert_close(a[:, 0], b[:, 0])              # xy: the same branch
    assert not torch.allclose(a[:, 1], b[:, 1]) and not torch.allclose(a[:, 2], b[:, 2])
    with torch.no_grad():                                     # shared: up_xz / up_zy unused
        for p in list(shared.up_xz.parameters()) + list(shared.up_zy.parameters()):
            p.add_(1.0)
    torch.testing.assert_close(shared(x), b)
    # shared == each plane through up_xy
    want = torch.stack([fixed.__getattr__(f"skip_{p}")(torch.nn.functional.interpolate(
        x[:, i], scale_factor=2, mode="bilinear", align_corners=False)) + fixed.up_xy(x[:, i])
        for i, p in enumerate(("xy", "xz", "zy"))], 1)
    torch.testing.assert_close(b, want)
    cfg = tiny_config(share_upsampler_weights=True)
    assert GOHA(cfg).upsampler.share_weights


def test_mode_cycle():
    cfg = GOHAConfig(canonical_until=12)
    assert {mode_of(cfg, s) for s in range(12)} == {"cano"}
    assert [mode_of(cfg, s) for s in range(12, 18)] == ["src", "tar", "coarse", "coarse",
                                                         "cano", "cano"]


def test_canonical_mask_covers_the_regions_and_dilates_the_eyes():
    m = GOHA(tiny_config(eye_dilation=3, eye_dilation_iters=2))
    c = random_coeffs(2, seed=4, pose=0.05)
    label = MorphableModel.builtin().label_of(c)
    mask = m.region_mask(c, label, 64)
    plain = m.region_mask(c, label, 64, dilate_eyes=False)
    assert mask.shape == (2, 1, 64, 64)
    assert plain.sum() > 20 and (mask >= plain).all() and mask.sum() > plain.sum()
    face = MorphableModel.builtin().render(c, 64, regions=("mouth",))
    assert (mask * face.regions["mouth"]).sum() == face.regions["mouth"].sum()


# ------------------------------------------------------------------------------- model
def test_forward_shapes_batch_and_bad_input():
    m = GOHA(tiny_config()).eval()
    c = random_coeffs(2, seed=5)
    f = frame(c)
    with torch.no_grad():
        out = m(f, f)
        assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
        # batched encoding == one item at a time (batch > 1 is not the reference's batch 1)
        src = m.prepare_frame(f, "source")
        both = m.encode_source(src)
        one = m.encode_source({k: v[1:] for k, v in src.items()})
    torch.testing.assert_close(both["canonical"][1:], one["canonical"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both["appearance"][1:], one["appearance"], atol=1e-5, rtol=1e-4)
    with pytest.raises(KeyError, match=r"source\['coeffs'\]: missing"):
        m({k: v for k, v in f.items() if k != "coeffs"}, f)
    with pytest.raises(ValueError, match=r"driving\['camera'\]: expected shape \(B, 25\)"):
        m(f, {**f, "camera": f["camera"][:, :16]})
    with pytest.raises(ValueError, match=r"source\['image'\]: expected \(B, 3, 64, 64\)"):
        m({**f, "image": f["image"][..., :32, :32]}, f)
    with pytest.raises(ValueError, match="model.resolution"):
        GOHAConfig(resolution=30)
    with pytest.raises(ValueError, match="vgg_path"):
        GOHAConfig(perceptual_weight=1.0)


def test_every_mode_trains_its_branches():
    m = GOHA(tiny_config(canonical_until=0, expression_from=0, appearance_from=0))
    c = random_coeffs(2, seed=6)
    batch = {"source": frame(c), "driving": frame(random_coeffs(2, seed=7))}
    for mode, want in (("cano", {"encoder_canonical"}),
                       ("coarse", {"encoder_canonical", "encoder_expression"}),
                       ("tar", {"encoder_canonical", "encoder_expression",
                                "encoder_appearance", "upsampler"})):
        m.zero_grad(set_to_none=True)
        loss, logs, out = m.s1_losses(batch, 0, mode)
        loss.backward()
        got = {n for n in ("encoder_canonical", "encoder_expression", "encoder_appearance",
                           "upsampler")
               if any(p.grad is not None and p.grad.abs().sum() > 0
                      for p in getattr(m, n).parameters())}
        assert got == want, mode
        assert torch.isfinite(loss) and out.shape == (2, 3, 32, 32)
    assert "neutral_l1" in m.s1_losses(batch, 0, "cano")[1]


def test_matte_supervises_the_opacity_plane_rows_flip_and_gain():
    """mask_weight: L1 of the render's opacity to the target matte (empty space and black fog
    look alike over black); flip_plane_rows flips Embed2Plane's rows, nothing else."""
    torch.manual_seed(0)
    m = GOHA(tiny_config(canonical_until=0, expression_from=0, appearance_from=0, tv_weight=0))
    batch = {"source": frame(random_coeffs(2, seed=6)), "driving": frame(random_coeffs(2, seed=7))}
    torch.manual_seed(1)
    loss, logs, _ = m.s1_losses(batch, 0, "coarse")
    m.cfg.mask_weight = 0.0
    torch.manual_seed(1)
    plain, logs0, _ = m.s1_losses(batch, 0, "coarse")
    assert "mask_l1" in logs and "mask_l1" not in logs0
    torch.testing.assert_close(loss - plain, logs["mask_l1"])
    src = m.prepare_frame(batch["source"], "source")
    mask = m.region_mask(src["coeffs"], src["camera"], 64)
    m.cfg.plane_gain, m.cfg.plane_field, m.cfg.flip_plane_rows = 1.0, None, False
    with torch.no_grad():
        a = m.encode_canonical(src["image"], mask)
        m.cfg.flip_plane_rows = True
        b = m.encode_canonical(src["image"], mask)
    torch.testing.assert_close(b, a.flip(-2))
    # plane_gain scales the branches' planes (canonical and expression), nothing else
    pseudo = m.pseudo_render(src["coeffs"], src["coeffs"][:, 80:144])
    with torch.no_grad():
        m.cfg.flip_plane_rows = False
        e = m.encode_expression(pseudo)
        m.cfg.plane_gain = 10.0
        torch.testing.assert_close(m.encode_canonical(src["image"], mask), 10 * a)
        torch.testing.assert_close(m.encode_expression(pseudo), 10 * e)


def test_mouth_term_weights_the_driving_mouth_in_tar_and_coarse():
    """model.mouth_weight: the L1 inside the driving frame's mouth + lips (mean over the region)
    added in tar and coarse (the expression plane rendered at the driving frame), not in src or
    cano; its gradient reaches the expression branch."""
    torch.manual_seed(0)
    m = GOHA(tiny_config(canonical_until=0, expression_from=0, appearance_from=0, tv_weight=0,
                         mouth_weight=0.0))
    batch = {"source": frame(random_coeffs(2, seed=6)), "driving": frame(random_coeffs(2, seed=7))}
    drv = m.prepare_frame(batch["driving"], "driving")
    mm = m.mouth_mask(drv["coeffs"], drv["camera"], 32)
    assert mm.shape == (2, 1, 32, 32) and 0 < mm.mean() < 0.1
    target = m._resize(drv["image"])
    for mode in ("src", "tar", "coarse", "cano"):
        m.cfg.mouth_weight = 0.0
        torch.manual_seed(1)
        plain, logs0, _ = m.s1_losses(batch, 0, mode)
        m.cfg.mouth_weight = 2.0
        torch.manual_seed(1)
        loss, logs, out = m.s1_losses(batch, 0, mode)
        if mode in ("src", "cano"):
            assert "mouth_l1" not in logs
            torch.testing.assert_close(loss, plain)
            continue
        want = ((out - target).abs() * mm).sum() / (3 * mm.sum())
        torch.testing.assert_close(logs["mouth_l1"], want.detach())
        torch.testing.assert_close(loss - plain, 2.0 * want, atol=1e-5, rtol=1e-5)
    m.zero_grad(set_to_none=True)
    m.cfg.mouth_weight = 1.0
    _, logs, out = m.s1_losses(batch, 0, "coarse")
    logs_grad = ((out - target).abs() * mm).sum() / (3 * mm.sum())
    logs_grad.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in m.encoder_expression.parameters())
    # off by default (GOHA); 0.25 in the tiny preset (chosen on the validation split)
    assert GOHAConfig().mouth_weight == 0.0 and tiny_config().mouth_weight == 0.25


def test_plane_field_resamples_the_maps_into_the_box():
    """model.plane_field: Embed2Plane's maps cover [-field, field]^3, resampled into the box
    (zero outside); field = box / 2 changes nothing; bad input is an error."""
    from pyface.models.goha.model import field_to_box
    x = torch.randn(2, 3, 4, 8, 8)
    torch.testing.assert_close(field_to_box(x, 0.5, 1.0), x)
    y = field_to_box(x, 0.25, 1.0)             # the map fills the box's middle half
    torch.testing.assert_close(y[..., 2:6, 2:6],
                               F.avg_pool2d(x.flatten(0, 1), 2).view(2, 3, 4, 4, 4))
    inner = torch.zeros(8, 8, dtype=torch.bool)
    inner[2:6, 2:6] = True
    assert y[..., ~inner].abs().max() == 0
    with pytest.raises(ValueError, match="planes"):
        field_to_box(x[:, :2], 0.25, 1.0)
    with pytest.raises(ValueError, match="plane_field"):
        GOHAConfig(plane_field=0.0)
    torch.manual_seed(0)
    m = GOHA(tiny_config(plane_field=0.25))
    src = m.prepare_frame(frame(random_coeffs(2, seed=6)), "source")
    mask = m.region_mask(src["coeffs"], src["camera"], 64)
    with torch.no_grad():
        a = m.encode_canonical(src["image"], mask)
        m.cfg.plane_field = None
        b = m.encode_canonical(src["image"], mask)
    torch.testing.assert_close(a, field_to_box(b, 0.25, 1.0))


def test_render_recompute_decoder_gives_the_same_losses_and_gradients():
    """model.render_recompute="decoder" (tiny) keeps the sampled plane features instead of
    recomputing the sampling in the backward: same losses and gradients as True."""
    batch = {"source": frame(random_coeffs(2, seed=6)), "driving": frame(random_coeffs(2, seed=7))}
    grads = []
    for rec in (True, "decoder"):
        torch.manual_seed(0)
        m = GOHA(tiny_config(canonical_until=0, expression_from=0, appearance_from=0,
                             render_recompute=rec, render_chunk_points=4096))
        assert m.renderer.config.recompute == rec
        torch.manual_seed(1)
        loss, _, _ = m.s1_losses(batch, 0, "tar")
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                      if p.grad is not None}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys() and len(grads[0][1]) > 0
    for k, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][k], g, atol=1e-5, rtol=1e-4, msg=k)
    with pytest.raises(ValueError, match="model.render_recompute"):
        tiny_config(render_recompute="features").__post_init__()


def test_engine_step_and_exact_resume(tmp_path, data_root):
    full = Trainer(experiment(tmp_path / "full", data_root, "train.steps=2"))
    full.fit()
    a = Trainer(experiment(tmp_path / "split", data_root, "train.steps=1", "train.ckpt_every=1"))
    a.fit()
    b = Trainer(experiment(tmp_path / "split", data_root, "train.steps=2"))
    assert b.resume("auto").endswith("ckpt-000001") and b.step == 1
    b.fit()
    sb = b.model.state_dict()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, sb[k]), k
    start = GOHA(full.model.cfg).state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in sb.items()
               if k.startswith("encoder_appearance"))        # step 1 trained the appearance


def test_load_options_set_goha_inference_options(tiny_run):
    """`pyface.models.load(..., options=...)` sets GOHA's inference options (INFERENCE_CHOICES)
    on a trained run without touching its weights; an architecture key is refused naming it
    and the valid ones, a bad choice names model.KEY."""
    saved = pyface.models.load("goha_s1", str(tiny_run), device="cpu")
    assert (saved.model.cfg.sr_noise, saved.model.cfg.infer_lift_expression) == ("stored",
                                                                                  "source")
    pipe = pyface.models.load("goha_s1", str(tiny_run), device="cpu",
                              options={"model.sr_noise": "random",
                                       "infer_lift_expression": "driving"})
    assert (pipe.model.cfg.sr_noise, pipe.model.cfg.infer_lift_expression) == ("random",
                                                                                "driving")
    want = saved.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in pipe.model.state_dict().items())
    with pytest.raises(ValueError, match=r"options: 'plane_channels' is not an inference option "
                                         r"of model 'goha_s1' .*valid: "
                                         r"model.infer_lift_expression, model.sr_noise, "
                                         r"model.depth_samples, model.depth_samples_importance, "
                                         r"model.lift_samples, model.render_chunk_points, "
                                         r"model.render_recompute$"):
        pyface.models.load("goha_s1", str(tiny_run), options={"plane_channels": 8})
    with pytest.raises(ValueError, match=r"model.sr_noise: expected one of \('stored', "
                                         r"'random'\), got 'fresh'"):
        pyface.models.load("goha_s1", str(tiny_run), options={"sr_noise": "fresh"})


def test_load_options_set_the_renderers_samples_and_execution(tiny_run):
    """GOHA's renderer options on a trained run: the samples per ray of the frames' render and
    of the lift render, the chunk size and the backward's recompute reach the renderers the
    pipeline builds (weights unchanged) and change the frames; too few coarse samples for the
    saved importance samples, too few lift samples and a bad chunk size name model.KEY."""
    saved = pyface.models.load("goha_s1", str(tiny_run), device="cpu")
    base, lift = saved.model.renderer.config, saved.model.lift_renderer.config
    assert (base.depth_resolution, base.depth_resolution_importance,
            lift.depth_resolution) == (12, 12, 12)                      # tiny
    pipe = pyface.models.load("goha_s1", str(tiny_run), device="cpu",
                              options={"depth_samples": 7, "depth_samples_importance": "5",
                                       "model.lift_samples": 6, "render_chunk_points": 4096,
                                       "render_recompute": False})
    rc, lc = pipe.model.renderer.config, pipe.model.lift_renderer.config
    assert (rc.depth_resolution, rc.depth_resolution_importance) == (7, 5)
    assert (lc.depth_resolution, lc.depth_resolution_importance) == (6, 6)
    assert (rc.chunk_points, rc.recompute, lc.chunk_points, lc.recompute) == (4096, False,
                                                                              4096, False)
    assert (rc.ray_start, rc.box_warp) == (base.ray_start, base.box_warp)
    want = saved.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in pipe.model.state_dict().items())
    c = random_coeffs(2, seed=8)
    f = frame(c, R=64)
    source = {"image": f["image"][0].float() / 127.5 - 1, "camera": f["camera"][0],
              "coeffs": c[0], "mask": f["mask"][0].float() / 255}
    driving = {"image": f["image"].float() / 127.5 - 1, "camera": f["camera"], "coeffs": c}

    def animate(p):
        torch.manual_seed(3)
        with torch.no_grad():
            return p.animate(source, driving)

    assert torch.equal(animate(saved), animate(saved))
    assert not torch.allclose(animate(pipe), animate(saved), atol=1e-4)
    for opts, msg in (({"depth_samples": 3}, r"model.depth_samples: expected >= 4 with "
                                             r"importance samples \(depth_samples_importance "
                                             r"12\), got 3"),
                      ({"lift_samples": 3}, r"model.lift_samples: expected >= 4"),
                      ({"depth_samples_importance": -1},
                       r"model.depth_samples_importance: expected an int >= 0"),
                      ({"render_chunk_points": 0},
                       r"model.render_chunk_points: expected an int >= 1 or None"),
                      ({"render_recompute": "all"}, r"model.render_recompute: expected true, "
                                                    r"false or 'decoder'"),
                      ({"ray_start": 2.0}, r"options: 'ray_start' is not an inference option")):
        with pytest.raises(ValueError, match=msg):
            pyface.models.load("goha_s1", str(tiny_run), device="cpu", options=opts)
    fewer = pyface.models.load("goha_s1", str(tiny_run), device="cpu",
                               options={"depth_samples": 3, "depth_samples_importance": 0})
    assert animate(fewer).shape == animate(saved).shape


def test_importance_option_refused_by_saved_coarse_samples_names_its_own_key(
        tiny_run, data_root, tmp_path, capsys):
    """A run saved with 3 coarse samples and no importance samples, loaded with importance
    samples as an option: refused naming the key that was set, model.depth_samples_importance
    (not the saved depth_samples), before the model is built, and pyface animate exits 2 with
    that message; the coarse count, when set with it, is the one named; too few lift samples
    name model.lift_samples."""
    import glob
    import os
    import shutil

    from pyface.cli import main

    copy = tmp_path / "coarse3"
    shutil.copytree(tiny_run, copy)
    edit_saved_config(copy, lambda config: config.update(depth_samples=3,
                                                         depth_samples_importance=0))
    saved = pyface.models.load("goha_s1", str(copy), device="cpu")
    rc = saved.model.renderer.config
    assert (rc.depth_resolution, rc.depth_resolution_importance) == (3, 0)
    want = ("model.depth_samples_importance: expected 0 with fewer than 4 coarse samples "
            "(depth_samples 3), got 5")
    for key in ("depth_samples_importance", "model.depth_samples_importance"):
        with pytest.raises(ValueError) as exc:
            pyface.models.load("goha_s1", str(copy), device="cpu", options={key: 5})
        assert str(exc.value) == want
    for opts, msg in (({"depth_samples": 2, "depth_samples_importance": 5},
                       "model.depth_samples: expected >= 4 with importance samples "
                       "(depth_samples_importance 5), got 2"),
                      ({"lift_samples": 3, "depth_samples_importance": 0},
                       "model.lift_samples: expected >= 4 (the lift render takes as many "
                       "importance samples), got 3")):
        with pytest.raises(ValueError) as exc:
            pyface.models.load("goha_s1", str(copy), device="cpu", options=opts)
        assert str(exc.value) == msg
    videos = sorted(os.path.dirname(p) for p in
                    glob.glob(f"{data_root}/**/coeffs.npy", recursive=True))
    capsys.readouterr()
    assert main(["animate", "goha_s1", "--checkpoint", str(copy), "--source", videos[0],
                 "--driving", videos[-1], "--frames", "2", "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "a.mp4"),
                 "--option", "depth_samples_importance=5"]) == 2
    assert capsys.readouterr().err == f"pyface animate: {want}\n"


def test_pipeline_on_a_tiny_checkpoint(tiny_run):
    pipe = pyface.models.load("goha_s1", str(tiny_run), device="cpu")
    assert pipe.resolution == 32 and pipe.input_resolution == 64
    _, state = load_pretrained(str(tiny_run))
    assert all(torch.equal(v, state[k]) for k, v in pipe.model.state_dict().items())
    c = random_coeffs(3, seed=8)
    f = frame(c, R=80)                                        # resized by the pipeline
    source = {"image": f["image"][0].float() / 127.5 - 1, "camera": f["camera"][0],
              "coeffs": c[0], "mask": f["mask"][0].float() / 255}
    driving = {"image": f["image"].float() / 127.5 - 1, "camera": f["camera"], "coeffs": c}
    with torch.no_grad():
        out = pipe.animate(source, driving)
        rec = pipe.reconstruct(source)
        st = pipe.encode_source(source)
        mo = pipe.encode_driving(driving)
        no_app = pipe.generate(st, mo, appearance=False)
        torch.manual_seed(1)
        comp = pipe.generate(st, mo)
        torch.manual_seed(1)
        plain = pipe.generate(st, mo, composite=False)          # over black, as GOHA
        torch.manual_seed(1)
        alpha = pipe.model.render(pipe.model.animate_planes(
            {k: (v.expand(3, *v.shape[1:]) if torch.is_tensor(v) else v) for k, v in st.items()},
            mo["expression"]), mo["camera"])["weights"]
    assert out.shape == (3, 3, 32, 32) and rec.shape == (1, 3, 32, 32)
    assert out.abs().max() <= 1 and not torch.allclose(out, no_app)
    # inference builds no autograd graph, even outside torch.no_grad (a caller's script)
    st_grad = pipe.encode_source(source)
    assert not any(v.requires_grad for v in st_grad.values() if torch.is_tensor(v))
    assert not pipe.generate(st_grad, pipe.encode_driving(driving)).requires_grad
    # the composite adds the source background where the render is not opaque
    assert st["background"].shape == (1, 3, 32, 32) and not torch.allclose(comp, plain)
    want = ((plain + 1) / 2 + (1 - alpha.clamp(0, 1)) * st["background"]) * 2 - 1
    torch.testing.assert_close(comp, want.clamp(-1, 1), atol=1e-4, rtol=0)
    assert st["canonical"].shape == (1, 3, 16, 32, 32) and mo["expression"].shape == (3, 64)
    with pytest.raises(KeyError, match=r"source\['coeffs'\]"):
        pipe.encode_source({"image": source["image"], "camera": source["camera"]})
    with pytest.raises(KeyError, match=r"driving\['camera'\]"):
        pipe.encode_driving({"image": driving["image"], "coeffs": c})


def test_seeded_frames_do_not_depend_on_the_chunking(tiny_run, monkeypatch):
    """With a seed, frame i's ray samples come from a generator of (seed, i) alone: chunks of 1
    and of 3 (and animate) render every frame with the same samples, another seed with others;
    the frames differ only by the rounding of the batched networks."""
    import pyface.ops.render as render_ops

    drawn = []
    uniforms = render_ops.render_uniforms

    def record(*a, **k):
        out = uniforms(*a, **k)
        drawn.append(out)
        return out

    monkeypatch.setattr(render_ops, "render_uniforms", record)
    pipe = pyface.models.load("goha_s1", str(tiny_run), device="cpu")
    c = random_coeffs(4, seed=8)
    f = frame(c, R=64)
    source = {"image": f["image"][0].float() / 127.5 - 1, "camera": f["camera"][0],
              "coeffs": c[0], "mask": f["mask"][0].float() / 255}
    driving = {"image": f["image"].float() / 127.5 - 1, "camera": f["camera"], "coeffs": c}
    st = pipe.encode_source(source)

    def frames(chunk, seed=3):
        drawn.clear()
        out = torch.cat([x for _, x in pipe.stream(st, driving, chunk=chunk, seed=seed)])
        return out, [torch.cat(u) for u in zip(*drawn)]          # (noise, importance) per frame

    one, u1 = frames(1)
    three, u3 = frames(3)
    assert u1[0].shape[0] == 4 and all(torch.equal(a, b) for a, b in zip(u1, u3))
    torch.testing.assert_close(three, one, atol=1e-5, rtol=0)
    other, u = frames(1, seed=4)
    assert not torch.equal(u[0], u1[0]) and not torch.allclose(other, one, atol=1e-3)
    drawn.clear()
    torch.testing.assert_close(pipe.animate(source, driving, seed=3), one, atol=1e-5, rtol=0)
    assert torch.equal(drawn[-1][0], u1[0]) and torch.equal(drawn[-1][1], u1[1])


def test_unseeded_generate_draws_the_ray_samples_before_the_render(monkeypatch):
    """GOHAPipeline.generate without a seed draws the frames' ray samples from torch's generator
    before the renderer (out of a compiled renderer): the numbers the renderer draws itself, so
    the frames equal those of renders that draw their own, bit for bit."""
    import pyface.models.goha.model as goha_model
    from pyface.nn.render import TriplaneRenderer

    torch.manual_seed(0)
    model = GOHA(tiny_config())
    pipe = GOHA.Pipeline(model, device="cpu")
    c = random_coeffs(3, seed=8)
    f = frame(c)
    st = pipe.encode_source({"image": f["image"][0].float() / 127.5 - 1,
                             "camera": f["camera"][0], "coeffs": c[0]})
    mo = pipe.encode_driving({"image": f["image"].float() / 127.5 - 1, "camera": f["camera"],
                              "coeffs": c})
    given, forward = [], TriplaneRenderer.forward

    def recording(self, *args, **kw):
        if self is model.renderer:                    # not the lift's fixed samples
            given.append((kw.get("stratified_noise"), kw.get("importance_u")))
        return forward(self, *args, **kw)

    monkeypatch.setattr(TriplaneRenderer, "forward", recording)
    torch.manual_seed(4)
    drawn = pipe.generate(st, mo)
    assert len(given) == 1 and given[0][0].shape == (3, 32 * 32, 12)
    assert given[0][1].shape == (3, 32 * 32, 12)
    given.clear()
    monkeypatch.setattr(goha_model, "renderer_uniforms",     # the renderer draws its own
                        lambda *a: {"stratified_noise": None, "importance_u": None})
    torch.manual_seed(4)
    own = pipe.generate(st, mo)
    assert len(given) == 1 and given[0] == (None, None)
    assert torch.equal(own, drawn) and drawn.shape == (3, 3, 32, 32)
    torch.manual_seed(5)
    assert not torch.equal(pipe.generate(st, mo), drawn)      # the samples are random
    planes, cam_ = st["canonical"], st["camera"]
    with pytest.raises(ValueError, match="uniforms: expected a dict of 'stratified_noise'"):
        model.render(planes, cam_, uniforms={"stratified_noise": None})
    with pytest.raises(ValueError, match="uniforms: expected None with lift=True"):
        model.render(planes, cam_, lift=True, uniforms=model.ray_samples(planes))
    with pytest.raises(ValueError, match=r"generators: expected one per item \(1\), got 2"):
        model.ray_samples(planes, generators=[torch.Generator()] * 2)


def test_segformer_path_initialises_the_encoders_with_fresh_stems(tmp_path):
    """An HF segformer-b0 (ADE layout, random weights) initialises the three encoders; the
    expression stem and the 6-channel appearance stem stay fresh; BatchNorm and classifier of
    the file's decode head are dropped (GOHA's encoders)."""
    from test_convert import _B0, _hf_folder, _hf_random_state, _hf_segformer_shapes

    sd = {k: v.float() for k, v in _hf_random_state(_hf_segformer_shapes(_B0, num_labels=150)).items()}
    path = _hf_folder(tmp_path / "hf", _B0, sd)
    m = GOHA(tiny_config(encoder="b0", encoder_width=256, segformer_path=path))
    stem = "segformer.encoder.patch_embeddings.0.proj.weight"
    assert torch.equal(m.encoder_canonical.encoder.patch_embeddings[0].proj.weight, sd[stem])
    assert m.encoder_appearance.encoder.patch_embeddings[0].proj.weight.shape == (32, 6, 7, 7)
    assert not torch.equal(m.encoder_expression.encoder.patch_embeddings[0].proj.weight, sd[stem])
    for enc in (m.encoder_expression, m.encoder_appearance):
        k = "segformer.encoder.block.1.0.attention.self.query.weight"
        assert torch.equal(enc.state_dict()["encoder.block.1.0.attention.self.query.weight"],
                           sd[k])
    assert m.encoder_canonical.decode_head.batch_norm is None
    assert m.encoder_canonical.decode_head.classifier is None


# ------------------------------------------------------------------------------- stages
def _stage_train_fn(data_root):
    """Trains a stage config for one step (D and R1 phases included) instead of its preset's
    steps; records the stage models in order."""
    seen = []

    def train_fn(cfg):
        seen.append(cfg.model)
        cfg.train.steps = 1
        cfg.train.ckpt_every = 1
        cfg.train.image_every = 0
        cfg.train.batch_size = 2
        cfg.model_config.tv_points = 32
        cfg.model_config.r1_interval = 1
        cfg.model_config.d_interval = 1
        t = Trainer(cfg)
        t.fit()
        seen.append(t)
    return train_fn, seen


@pytest.fixture(scope="module")
def chain(tmp_path_factory, data_root):
    """`pyface train goha --preset tiny`'s stage chain (s1, then s1_gan), one step each, then s2
    for one step."""
    from pyface.models.goha import GOHASR
    from pyface.train.stages import prepare_stages

    run = tmp_path_factory.mktemp("goha_chain") / "run"
    shared = ["train.progress=false", "train.tensorboard=false", "train.num_workers=0",
              f"data.path={data_root}"]
    cfg = build_experiment("goha", GOHASR.Config, defaults=GOHASR.recipe,
                           presets=GOHASR.presets, preset="tiny",
                           overrides=shared + [f"train.run_dir={run}", "train.steps=2",
                                               "train.ckpt_every=1", "train.image_every=0",
                                               "model.tv_points=32", "model.r1_interval=2"])
    train_fn, seen = _stage_train_fn(data_root)
    filled = prepare_stages(GOHASR, cfg, overrides=shared, train_fn=train_fn)
    final = Trainer(cfg)
    final.fit()
    return {"run": run, "filled": filled, "stages": seen, "final": final}


def test_train_goha_chains_s1_s1gan_s2(chain):
    from pyface.models.goha import GOHAGAN, GOHASR

    names = [s for s in chain["stages"] if isinstance(s, str)]
    s1, s1_gan = [t for t in chain["stages"] if not isinstance(t, str)]
    assert names == ["goha_s1", "goha_s1_gan"]
    assert set(chain["filled"]) == {"s1_gan_checkpoint"}
    assert type(s1.model) is GOHA and type(s1_gan.model) is GOHAGAN
    assert s1_gan.model.cfg.s1_checkpoint.endswith("stages/s1")
    final = chain["final"].model
    assert type(final) is GOHASR and final.cfg.s1_gan_checkpoint.endswith("stages/s1_gan")
    _, st1 = load_pretrained(str(chain["run"] / "stages" / "s1_gan" / "stages" / "s1"))
    _, st2 = load_pretrained(str(chain["run"] / "stages" / "s1_gan"))
    # s1_gan: the canonical branch is frozen, the expression branch and the decoder train, D
    # trained (its D phase ran)
    for k, v in st1.items():
        if k.startswith(("encoder_canonical.", "embed_canonical.")):
            assert torch.equal(v, st2[k]), k
    for prefix in ("encoder_expression.", "decoder.", "discriminator."):
        start = st1 if prefix != "discriminator." else GOHAGAN(s1_gan.model.cfg).state_dict()
        assert any(not torch.equal(v, start[k]) for k, v in st2.items()
                   if k.startswith(prefix)), prefix
    # s2: every tri-plane tensor is s1_gan's, only the SR and the dual D train; the dual D
    # keeps s1_gan's D except its fresh 6-channel first conv
    sf = final.state_dict()
    for k, v in st2.items():
        if not k.startswith("discriminator."):
            assert torch.equal(v, sf[k]), k
    fresh = GOHASR(final.cfg).state_dict()   # s1_gan's weights plus fresh SR / first D conv
    assert any(not torch.equal(v, fresh[k]) for k, v in sf.items() if k.startswith("sr."))
    assert sf["discriminator.conv_body.0.0.weight"].shape[1] == 6
    assert st2["discriminator.conv_body.0.0.weight"].shape[1] == 3
    assert torch.equal(fresh["discriminator.final_linear.1.weight"],
                       st2["discriminator.final_linear.1.weight"])


def test_s2_exact_resume(tmp_path, chain, data_root):
    from pyface.models.goha import GOHASR

    def exp(run, *extra):
        return build_experiment("goha", GOHASR.Config, defaults=GOHASR.recipe,
                                presets=GOHASR.presets, preset="tiny", overrides=FAST + [
                                    f"train.run_dir={run}", f"data.path={data_root}",
                                    "model.r1_interval=2",
                                    f"model.s1_gan_checkpoint={chain['run']}/stages/s1_gan",
                                    *extra])
    full = Trainer(exp(tmp_path / "full", "train.steps=2"))
    full.fit()
    a = Trainer(exp(tmp_path / "split", "train.steps=1", "train.ckpt_every=1"))
    a.fit()
    b = Trainer(exp(tmp_path / "split", "train.steps=2"))
    assert b.resume("auto").endswith("ckpt-000001")
    b.fit()
    sb = b.model.state_dict()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, sb[k]), k


def test_s2_pipeline_super_resolves(chain):
    from pyface.models.goha import GOHASR

    pipe = pyface.models.load("goha", str(chain["run"]), device="cpu")
    assert type(pipe.model) is GOHASR
    assert pipe.resolution == 64 and pipe.input_resolution == 64
    c = random_coeffs(2, seed=9)
    f = frame(c)
    source = {"image": f["image"][0].float() / 127.5 - 1, "camera": f["camera"][0],
              "coeffs": c[0], "mask": f["mask"][0].float() / 255}
    driving = {"image": f["image"].float() / 127.5 - 1, "camera": f["camera"], "coeffs": c}
    with torch.no_grad():
        out = pipe.animate(source, driving)
        again = pipe.animate(source, driving, composite=False)
        rec = pipe.reconstruct(source)
        st, mo = pipe.encode_source(source), pipe.encode_driving(driving)
        torch.manual_seed(1)
        comp = pipe.generate(st, mo)
        torch.manual_seed(1)
        plain = pipe.generate(st, mo, composite=False)
        torch.manual_seed(1)
        planes = pipe.model.animate_planes(
            {k: (v.expand(2, *v.shape[1:]) if torch.is_tensor(v) else v) for k, v in st.items()},
            mo["expression"])
        rend = pipe.model.render(planes, mo["camera"])
        alpha = torch.nn.functional.interpolate(rend["weights"].clamp(0, 1), size=(64, 64),
                                                mode="bilinear", align_corners=False)
        up = torch.nn.functional.interpolate(rend["image"], size=(64, 64), mode="bilinear",
                                             align_corners=False)
    assert out.shape == (2, 3, 64, 64) and rec.shape == (1, 3, 64, 64)
    assert out.abs().max() <= 1 and torch.isfinite(out).all()
    assert not torch.allclose(out, again)          # composited over the source background
    # the tiny preset's residual SR: its residual over the upsampled render is kept inside
    # the render's opacity, the background fills the rest
    assert pipe.model.cfg.sr_residual
    fg = ((up + (plain - up) * alpha + 1) / 2).clamp(0, 1)
    want = (fg + (1 - alpha) * st["background"]) * 2 - 1
    torch.testing.assert_close(comp, want.clamp(-1, 1), atol=1e-4, rtol=0)
    # GOHA's SR (no residual): the whole SR image is kept inside the opacity
    img = plain[:1]
    torch.testing.assert_close(GOHASR.foreground(_NoResidual(), rend["image"][:1], img,
                                                 alpha[:1]),
                               ((img + 1) / 2).clamp(0, 1) * alpha[:1])
    with pytest.raises(ValueError, match="power of two"):
        GOHASR(tiny_config(resolution=48))


def test_s2_residual_super_resolution_starts_at_the_bilinear_upsampling():
    """model.sr_residual (the goha tiny preset): SR image = bilinear upsampling (pixel centres)
    + sr_gain x GFPGAN(upsampling), sr_gain a parameter starting at 0; off (GOHA), GFPGAN's
    image itself and no extra tensor."""
    from pyface.models.goha import GOHASR

    cfg = build_experiment("goha", GOHASR.Config, defaults=GOHASR.recipe,
                           presets=GOHASR.presets, preset="tiny").model_config
    assert cfg.sr_residual and not GOHASR.Config().sr_residual
    assert "sr_gain" not in GOHASR(tiny_config()).state_dict()
    torch.manual_seed(0)
    m = GOHASR(tiny_config(sr_residual=True)).eval()
    assert "sr_gain" in m.state_dict() and float(m.sr_gain.detach()) == 0
    opt = m.build_optimizers()["G"]
    assert any(p is m.sr_gain for g in opt.param_groups for p in g["params"])
    raw = torch.rand(2, 3, 32, 32) * 2 - 1
    up = torch.nn.functional.interpolate(raw, size=(64, 64), mode="bilinear",
                                         align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(m.finish(raw), up)
        m.sr_gain.fill_(0.5)
        torch.testing.assert_close(m.finish(raw), up + 0.5 * m.sr(up, randomize_noise=False))
    # the gain's gradient is GFPGAN's image against the loss's gradient: nonzero at 0
    m.sr_gain.data.zero_()
    m.finish(raw).square().sum().backward()
    assert m.sr_gain.grad is not None and float(m.sr_gain.grad.abs()) > 0


class _NoResidual:
    sr_gain = None


def test_static_multiview_pairs_train_s1(tmp_path):
    """The platform's `multiview` dataset (one instant from two cameras) feeds GOHA as is:
    `--set data.name=multiview` (data rendered with `pyface data synth --multiview`)."""
    from pyface.data.synthetic import SynthConfig, generate

    root = tmp_path / "mv"
    generate(str(root), SynthConfig(identities=1, videos_per_identity=1, frames=2, resolution=64,
                                    workers=1, cross=False, multiview=True), progress=False)
    from pyface.data.datasets import MultiViewDataset

    item = MultiViewDataset(root, 64)[0]
    assert not torch.equal(item["source"]["camera"], item["driving"]["camera"])
    assert torch.equal(item["source"]["coeffs"][80:144], item["driving"]["coeffs"][80:144])
    t = Trainer(experiment(tmp_path / "run", root, "train.steps=1", "data.name=multiview"))
    t.fit()
    assert t.step == 1


def test_mixture_of_pairs_and_multiview_trains_s1(tmp_path):
    """GOHA's data: same-video pairs and static multi-view pairs in one run (the ``mixture``
    dataset, 2 : 1); the data-side renders are made for items of both, which collate into one
    batch (every item of the 3-item epoch in the batch of 3); exact resume."""
    from pyface.data.synthetic import SynthConfig, generate

    root = tmp_path / "mv"
    generate(str(root), SynthConfig(identities=1, videos_per_identity=1, frames=2, resolution=64,
                                    workers=1, cross=False, multiview=True), progress=False)
    mix = ["train.batch_size=3", "data.name=mixture", "data.options.length=3",
           "data.options.components.pairs.weight=2", "data.options.components.multiview.weight=1"]
    t = Trainer(experiment(tmp_path / "run", root, "train.steps=2", *mix))
    ds = t.dataset.dataset
    assert [ds.locate(i)[0] for i in range(3)].count(1) == 1 and len(ds) == 3
    items = [t.dataset[i] for i in range(3)]
    assert all("goha_pseudo" in it["driving"] and "view" in it["driving"] for it in items)
    t.fit()
    assert t.step == 2
    # exact resume on the mixture: 1 step, then the second from the checkpoint
    Trainer(experiment(tmp_path / "split", root, "train.steps=1", "train.ckpt_every=1",
                       *mix)).fit()
    b = Trainer(experiment(tmp_path / "split", root, "train.steps=2", *mix))
    assert b.resume("auto").endswith("ckpt-000001")
    b.fit()
    sb = b.model.state_dict()
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, sb[k]), k


def _moving_fraction(synth, identities: int) -> float:
    """Fraction of the moving pairs (``pyface.data.reenactment.is_moving``) among the
    same-video (source, driving) pairs of distinct frames of the first ``identities``
    identities of the built-in set ``synth`` (its motion only, nothing rendered)."""
    import numpy as np

    from pyface.data.reenactment import is_moving
    from pyface.data.synthetic import sample_motion

    face = MorphableModel.builtin()
    moving = total = 0
    for i in range(identities):
        for v in range(synth.videos_per_identity):
            exp, ang, tr, gam = sample_motion(face, synth.seed, i, v, synth.frames, synth.fps)
            T = synth.frames
            c = merge_coeffs(torch.zeros(T, 80), torch.from_numpy(exp), torch.zeros(T, 80),
                             torch.from_numpy(ang), torch.from_numpy(gam),
                             torch.from_numpy(tr)).numpy()
            s, d = np.meshgrid(np.arange(T), np.arange(T))
            s, d = s[s != d], d[s != d]
            m = is_moving(c[s], c[d])
            moving, total = moving + int(m.sum()), total + m.size
    return moving / total


def test_tiny_preset_trains_on_more_identities_at_the_default_cost():
    """The tiny preset's set (every stage the same): more identities than the built-in 8, the
    default's frame count (its generation cost), and videos spanning the default's motion, so
    the same-video sampler still draws moving pairs at about the default's rate (at 25 fps the
    6-frame videos of all 64 identities: 0.37 against 0.76)."""
    from pyface.data.builtin import SynthOptions
    from pyface.models.goha import GOHAGAN, GOHASR

    synths = [build_experiment(n, c.Config, defaults=c.recipe, presets=c.presets,
                               preset="tiny").data.options.synth
              for n, c in (("goha_s1", GOHA), ("goha_s1_gan", GOHAGAN), ("goha", GOHASR))]
    tiny, default = synths[0], SynthOptions()
    assert synths[1] == tiny and synths[2] == tiny
    assert tiny.identities > default.identities
    frames = lambda o: o.identities * o.videos_per_identity * o.frames  # noqa: E731
    assert frames(tiny) == frames(default)
    assert tiny.frames / tiny.fps == pytest.approx(default.frames / default.fps, rel=0.1)
    ref = _moving_fraction(default, default.identities)
    assert _moving_fraction(tiny, 16) >= 0.9 * ref


# ------------------------------------------------- training differences from GOHA's scripts
EARLIER = {"cano_terms": "sum", "gan_in_coarse": True, "d_fakes": "g_phase",
           "sr_raw_terms": False, "r1_inputs": "raw", "s2_disc_init": "s1_gan",
           "lift_grad": False, "tar_lift_expression": "source"}


class _FakeLoss:
    """A stand-in perceptual / VGG loss: mean squared difference, every value recorded."""

    def __init__(self):
        self.values = []

    def to(self, device):
        return self

    def __call__(self, pred, target):
        v = (pred - target).square().mean()
        self.values.append(v)
        return v


def _pairs_batch(seed=6):
    return {"source": frame(random_coeffs(2, seed=seed)),
            "driving": frame(random_coeffs(2, seed=seed + 1))}


def test_training_options_default_to_the_earlier_training(tmp_path, tiny_run, data_root):
    """The options' defaults are the earlier training: the tiny presets and the recipe keep
    them, a config dict (or a saved run) without the keys resolves to them; full and gpu-short
    set GOHA's; a bad value names the key."""
    from pyface.models.goha import GOHAGAN, GOHASR
    from pyface.models.goha.config import GOHA_TRAINING
    from pyface.train.model import config_from_dict

    def values(cfg, keys=EARLIER):
        return {k: getattr(cfg, k) for k in keys}

    assert values(GOHAConfig()) == EARLIER
    assert set(GOHA_TRAINING) - {"neutral_weight"} == set(EARLIER)
    assert all(GOHA_TRAINING[k] != v for k, v in EARLIER.items())
    for cls, name in ((GOHA, "goha_s1"), (GOHAGAN, "goha_s1_gan"), (GOHASR, "goha")):
        def cfg_of(preset):
            return build_experiment(name, cls.Config, defaults=cls.recipe, presets=cls.presets,
                                    preset=preset).model_config
        assert values(cfg_of("tiny")) == EARLIER and values(cfg_of(None)) == EARLIER, name
        for preset in ("full", "gpu-short"):
            assert values(cfg_of(preset), GOHA_TRAINING) == GOHA_TRAINING, (name, preset)
    # a saved config without the keys (a run trained before them)
    saved = {k: v for k, v in vars(tiny_config()).items() if k not in EARLIER}
    assert values(config_from_dict(GOHAConfig, saved)) == EARLIER
    # ... and a checkpoint saved without them resumes with the tiny preset
    import shutil


    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    ckpt = drop_saved_keys(old, EARLIER)[-1]
    t = Trainer(experiment(old, data_root, "train.steps=3"))
    assert t.resume("auto") == ckpt and t.step == 2
    with pytest.raises(ValueError, match="model.r1_inputs: expected one of"):
        GOHAConfig(r1_inputs="6ch")
    with pytest.raises(ValueError, match="model.cano_terms: expected one of .*'avg'"):
        tiny_config(cano_terms="avg").__post_init__()


def test_cano_terms_mean_halves_and_weighs_only_the_neutral_perceptual():
    """model.cano_terms: "sum", neutral_weight x neutral L1 + masked L1 (+ 3 x neutral +
    masked perceptual); "mean" (GOHA), (neutral L1 + masked L1) / 2 + (neutral_weight x neutral
    + masked perceptual) / 2."""
    torch.manual_seed(0)
    m = GOHA(tiny_config(tv_weight=0, mask_weight=0))
    assert m.cfg.neutral_weight == 3.0
    batch = _pairs_batch()
    got = {}
    for terms in ("sum", "mean"):
        for pw in (0.0, 0.5):
            m.cfg.cano_terms, m.cfg.perceptual_weight = terms, pw
            m._perceptual = [_FakeLoss()] if pw else None
            torch.manual_seed(1)
            loss, logs, _ = m.s1_losses(batch, 0, "cano")
            n, k = logs["neutral_l1"], logs["masked_l1"]
            got[terms, pw] = loss.detach()
            if terms == "sum":
                want = 3 * n + k
            else:
                want = (n + k) / 2
            if pw:
                pn, pk = m._perceptual[0].values
                want = want + pw * ((3 * pn + pk) if terms == "sum" else (3 * pn + pk) / 2)
            torch.testing.assert_close(loss.detach(), want.detach())
    assert not torch.allclose(got["sum", 0.0], got["mean", 0.0])
    # neutral_weight weighs the neutral L1 with "sum", only the perceptual term with "mean"
    m.cfg.neutral_weight, m.cfg.perceptual_weight, m._perceptual = 1.0, 0.0, None
    torch.manual_seed(1)
    assert torch.equal(m.s1_losses(batch, 0, "cano")[0].detach(), got["mean", 0.0])


def test_s1_gan_gan_only_in_full_modes_and_d_sees_a_separate_tar_render():
    """model.gan_in_coarse=false (GOHA): no GAN term in s1_gan's coarse G mode, still in src /
    tar; model.d_fakes="tar" (GOHA): the D phases see a separate no-grad render of the driving
    frame in mode tar (once per step), not the G phase's fakes."""
    from types import SimpleNamespace

    from pyface.models.goha import GOHAGAN
    from pyface.models.goha.stages import s1_gan_mode

    torch.manual_seed(0)
    m = GOHAGAN(tiny_config(tv_weight=0, vgg_weight=0))
    batch = _pairs_batch()
    assert s1_gan_mode(1) == "tar" and s1_gan_mode(2) == "coarse"
    for step in (1, 2):
        out = {}
        for flag in (True, False):
            m.cfg.gan_in_coarse = flag
            torch.manual_seed(3)
            out[flag] = m.step("G", batch, SimpleNamespace(step=step))
        torch.testing.assert_close(out[True]["loss"] - 0.1 * out[True]["gan"],
                                   out[False]["loss"] - (0.1 * out[False]["gan"]
                                                         if step == 1 else 0))
        assert ("gan" in out[False]) == (step == 1)
    # the D phases at a coarse step: the G phase's fakes, or a separate tar render
    m.cfg.gan_in_coarse = True
    torch.manual_seed(3)
    m.step("G", batch, SimpleNamespace(step=2))
    g_fake = m._cache["fake"]
    assert torch.equal(m._d_pair(batch, 2)[0], g_fake)
    m.cfg.d_fakes = "tar"
    torch.manual_seed(4)
    fake, real = m._d_pair(batch, 2)
    torch.manual_seed(4)
    with torch.no_grad():
        _, _, want_fake, want_real = m._fake_real(batch, 2, "tar", vgg=False)
    assert torch.equal(fake, want_fake) and torch.equal(real, want_real)
    assert not fake.requires_grad and not torch.allclose(fake, g_fake)
    assert m._d_pair(batch, 2)[0] is fake                    # rendered once per step
    assert m._d_pair(batch, 3)[0] is not fake
    d = m.step("D", batch, SimpleNamespace(step=4))
    assert torch.isfinite(d["loss"]) and m._d_cache[0] == 4


def _s2(**over):
    from pyface.models.goha import GOHASR

    cfg = build_experiment("goha", GOHASR.Config, defaults=GOHASR.recipe, presets=GOHASR.presets,
                           preset="tiny").model_config
    for k, v in over.items():
        setattr(cfg, k, v)
    return GOHASR(cfg)


def test_s2_sr_raw_terms_take_the_mean_over_the_sr_image_and_the_upsampled_render():
    """model.sr_raw_terms (GOHA): s2's L1 / VGG are the mean over the SR image and the raw
    render upsampled as the dual D sees it (against the target at r, upsampled the same way):
    the raw half is a constant (the render is frozen), the SR image's gradient halves."""
    torch.manual_seed(0)
    m = _s2()
    batch = _pairs_batch()
    res = {}
    for flag in (False, True):
        m.cfg.sr_raw_terms = flag
        m._vgg = [_FakeLoss()]
        m.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        total, logs, (img, raw), (target, real_raw) = m._fake_real(batch, 1)
        total.backward()
        res[flag] = (total.detach(), logs, m._vgg[0].values,
                     [p.grad.clone() for p in m.sr.parameters() if p.grad is not None],
                     m.sr_gain.grad.clone())
    t0, logs0, v0, g0, gain0 = res[False]
    t1, logs1, v1, g1, gain1 = res[True]
    assert "raw_l1" not in logs0 and len(v0) == 1 and len(v1) == 2
    up = F.interpolate(raw, size=(64, 64), mode="bilinear", align_corners=True)
    up_real = F.interpolate(real_raw, size=(64, 64), mode="bilinear", align_corners=True)
    torch.testing.assert_close(logs1["raw_l1"], (up - up_real).abs().mean())
    torch.testing.assert_close(logs1["l1"], logs0["l1"])
    torch.testing.assert_close(t0, logs0["l1"] + v0[0].detach())
    torch.testing.assert_close(t1, (logs1["l1"] + logs1["raw_l1"]) / 2
                               + (v1[0] + v1[1]).detach() / 2)
    assert not torch.allclose(t0, t1)
    torch.testing.assert_close(gain1, gain0 / 2)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a / 2)


def test_s2_r1_inputs_take_the_penalty_on_the_raw_render_or_the_six_channel_input():
    """model.r1_inputs: "raw", R1 w.r.t. the real SR-size image and the real raw render at r
    (before the D's upsampling); "input" (GOHA), w.r.t. the 6-channel D input at R: its raw
    channels' gradient is the one at r before the upsampling's adjoint, so the penalties
    differ."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    m = _s2()
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    raw = F.interpolate(img, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    real = (img, raw)
    ins_raw, logits_raw = m._r1_logits(real)
    assert [tuple(x.shape) for x in ins_raw] == [(2, 3, 64, 64), (2, 3, 32, 32)]
    g_img, g_raw = torch.autograd.grad(logits_raw.sum(), ins_raw)
    m.cfg.r1_inputs = "input"
    (x,), logits_in = m._r1_logits(real)
    assert x.shape == (2, 6, 64, 64)
    torch.testing.assert_close(logits_in, logits_raw)        # the same D output
    (g_x,) = torch.autograd.grad(logits_in.sum(), [x])
    torch.testing.assert_close(g_x[:, :3], g_img)
    # the raw render's gradient = the upsampling's adjoint applied to the input's raw channels
    r = raw.detach().requires_grad_(True)
    up = F.interpolate(r, size=(64, 64), mode="bilinear", align_corners=True)
    (adj,) = torch.autograd.grad(up, [r], grad_outputs=g_x[:, 3:])
    torch.testing.assert_close(adj, g_raw, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(g_x[:, 3:].square().sum(), g_raw.square().sum(), rtol=0.05)
    # through the Dreg phase: the logged penalty is the one w.r.t. the 6-channel input
    m._cache = {"fake": (img, raw), "real": (img, raw)}
    pen_in = m.step("Dreg", {}, SimpleNamespace(step=0))["r1_penalty"]
    torch.testing.assert_close(pen_in, g_x.square().flatten(1).sum(1).mean())
    m.cfg.r1_inputs = "raw"
    pen_raw = m.step("Dreg", {}, SimpleNamespace(step=0))["r1_penalty"]
    torch.testing.assert_close(pen_raw, (g_img.square().flatten(1).sum(1)
                                         + g_raw.square().flatten(1).sum(1)).mean())


def test_s2_disc_init_gfpgan_keeps_gfpgan_net_d(tmp_path, chain):
    """model.s2_disc_init="gfpgan" with model.disc_path (GOHA): s2's D is GFPGAN's net_d with a
    fresh 6-channel first conv, s1_gan's D is not loaded; "s1_gan", or no disc_path: s1_gan's
    D (its fresh first conv aside)."""
    import pyface.nn as N

    previous = str(chain["run"] / "stages" / "s1_gan")
    _, st = load_pretrained(previous)
    torch.manual_seed(5)
    net_d = N.GFPGANDiscriminator(out_size=64, narrow=0.03125)
    torch.save({"params": net_d.state_dict()}, tmp_path / "net_d.pth")
    gd = net_d.state_dict()
    first = "conv_body.0.0.weight"
    for init, path, want in (("gfpgan", str(tmp_path / "net_d.pth"), "gfpgan"),
                             ("s1_gan", str(tmp_path / "net_d.pth"), "s1_gan"),
                             ("gfpgan", None, "s1_gan")):
        m = _s2(s2_disc_init=init, disc_path=path, s1_gan_checkpoint=previous)
        d = m.discriminator.state_dict()
        src = gd if want == "gfpgan" else {k[len("discriminator."):]: v for k, v in st.items()
                                           if k.startswith("discriminator.")}
        assert all(torch.equal(v, src[k]) for k, v in d.items() if k != first), (init, path)
        assert d[first].shape[1] == 6
        sd = m.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in st.items()
                   if not k.startswith("discriminator.")), (init, path)
    assert not torch.equal(gd["final_linear.1.weight"],
                           st["discriminator.final_linear.1.weight"])


def test_lift_grad_backpropagates_through_the_lift_render():
    """model.lift_grad (GOHA): the lift render's image, fed to the appearance encoder, keeps its
    gradient to the canonical + expression planes and the decoder; without it (the default) the
    appearance planes have no gradient there. The forward values are the same."""
    torch.manual_seed(0)
    m = GOHA(tiny_config())
    src = m.prepare_frame(frame(random_coeffs(2, seed=6)), "source")
    mask = m._source_mask(src)
    regions = m._source_regions_neutral(src)
    with torch.no_grad():
        base0 = m.encode_canonical(src["image"], mask)
    out, grads = {}, {}
    for flag in (False, True):
        m.cfg.lift_grad = flag
        m.zero_grad(set_to_none=True)
        base = base0.clone().requires_grad_(True)
        app = m.encode_appearance(src["image"], mask, base, src["camera"], regions)
        app.square().sum().backward()
        out[flag] = app.detach()
        grads[flag] = (base.grad, [p.grad for p in m.decoder.parameters()],
                       [p.grad for p in m.encoder_appearance.parameters()])
    torch.testing.assert_close(out[True], out[False])
    assert grads[False][0] is None and all(g is None for g in grads[False][1])
    assert grads[True][0] is not None and grads[True][0].abs().sum() > 0
    assert any(g is not None and g.abs().sum() > 0 for g in grads[True][1])
    for flag in (False, True):                  # the appearance encoder trains either way
        assert any(g is not None and g.abs().sum() > 0 for g in grads[flag][2])
    # through s1's tar mode: the expression encoder gets the lift's gradient too
    m.cfg.lift_grad = True
    m.cfg.tar_lift_expression = "driving"
    batch = _pairs_batch()
    g = {}
    for flag in (False, True):
        m.cfg.lift_grad = flag
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss, _, _ = m.s1_losses(batch, 10_000, "tar")
        loss.backward()
        g[flag] = [p.grad.clone() for p in m.encoder_expression.parameters()
                   if p.grad is not None]
    assert g[False] and len(g[False]) == len(g[True])
    assert not all(torch.allclose(a, b) for a, b in zip(g[False], g[True]))


def _record_lifted_planes(monkeypatch, m, batch):
    """``(seen, want)``: ``seen`` collects the base planes every ``encode_appearance`` call
    lifts from; ``want`` the canonical + source-expression (``"source"``) and canonical +
    driving-expression (``"driving"``) planes of ``batch``, which differ."""
    seen = []
    orig = GOHA.encode_appearance

    def record(self, image, region_mask, base_planes, camera, canonical_regions):
        seen.append(base_planes.detach())
        return orig(self, image, region_mask, base_planes, camera, canonical_regions)

    monkeypatch.setattr(GOHA, "encode_appearance", record)
    src = m.prepare_frame(batch["source"], "source")
    drv = m.prepare_frame(batch["driving"], "driving")
    with torch.no_grad():
        cano = m.encode_canonical(src["image"], m._source_mask(src))
        want = {"source": cano + m.encode_expression(m._pseudo(src, src)),
                "driving": cano + m.encode_expression(m._pseudo(src, drv))}
    assert not torch.allclose(want["source"], want["driving"])
    return seen, want


def test_tar_lift_expression_driving_lifts_the_driving_expression_planes(monkeypatch):
    """model.tar_lift_expression: "source" (default), tar lifts the canonical + the source's
    expression planes (as inference, the avatar encoded once per source); "driving" (GOHA), the
    canonical + the driving expression's planes. src mode and inference are the same either
    way; s2's tar render follows the option too."""
    torch.manual_seed(0)
    m = GOHA(tiny_config(tv_weight=0))
    batch = _pairs_batch()
    seen, want = _record_lifted_planes(monkeypatch, m, batch)
    loss = {}
    for mode in ("tar", "src"):
        for which in ("source", "driving"):
            m.cfg.tar_lift_expression = which
            seen.clear()
            torch.manual_seed(1)
            with torch.no_grad():
                loss[mode, which] = m.s1_losses(batch, 10_000, mode)[0]
            torch.testing.assert_close(seen[0], want[which if mode == "tar" else "source"])
    assert not torch.allclose(loss["tar", "source"], loss["tar", "driving"])
    torch.testing.assert_close(loss["src", "source"], loss["src", "driving"])
    # inference lifts the source's expression whatever the option
    fw = {}
    for which in ("source", "driving"):
        m.cfg.tar_lift_expression = which
        seen.clear()
        torch.manual_seed(2)
        with torch.no_grad():
            fw[which] = m(batch["source"], batch["driving"])
        torch.testing.assert_close(seen[0], want["source"])
    torch.testing.assert_close(fw["source"], fw["driving"])
    # s2's tar render
    s2 = _s2()
    s2.load_state_dict(m.state_dict(), strict=False)
    raws = {}
    for which in ("source", "driving"):
        s2.cfg.tar_lift_expression = which
        seen.clear()
        torch.manual_seed(3)
        raws[which] = s2._fake_real(batch, 1, "tar", vgg=False)[2][1]
        torch.testing.assert_close(seen[0], want[which])
    assert not torch.allclose(raws["source"], raws["driving"])


# ------------------------------------------------ inference differences from GOHA's scripts
def test_infer_lift_expression_driving_lifts_each_driving_frames_expression(monkeypatch):
    """model.infer_lift_expression: "source" (default), inference lifts the canonical + the
    source's expression planes once per source; "driving" (GOHA's demo / test scripts), the
    appearance planes are lifted for every driving frame from the canonical + that frame's
    expression planes: in forward and in the pipeline, whose frames then equal forward's."""
    torch.manual_seed(0)
    m = GOHA(tiny_config(tv_weight=0))
    assert GOHAConfig().infer_lift_expression == "source"
    batch = _pairs_batch()
    for f in batch.values():
        f.pop("mask")
    seen, want = _record_lifted_planes(monkeypatch, m, batch)
    fw = {}
    for which in ("source", "driving"):
        m.cfg.infer_lift_expression = which
        seen.clear()
        torch.manual_seed(2)
        with torch.no_grad():
            fw[which] = m(batch["source"], batch["driving"])
        assert len(seen) == 1
        torch.testing.assert_close(seen[0], want[which])
    assert not torch.allclose(fw["source"], fw["driving"])
    # the pipeline: one source, two driving frames, each lifted with its own expression
    pipe = GOHA.Pipeline(m, device="cpu")
    one = {k: v[:1] for k, v in batch["source"].items()}
    st = pipe.encode_source({"image": one["image"][0].float() / 127.5 - 1,
                             "camera": one["camera"][0], "coeffs": one["coeffs"][0]})
    assert st["appearance"] is None and st["lift_image"].shape == (1, 3, 64, 64)
    d = batch["driving"]
    mo = pipe.encode_driving({"camera": d["camera"], "coeffs": d["coeffs"]})
    seen.clear()
    torch.manual_seed(3)
    frames = pipe.generate(st, mo, composite=False)
    assert len(seen) == 1 and seen[0].shape[0] == 2
    lifted = seen[0]
    assert not torch.allclose(lifted[0], lifted[1])        # each frame's own expression
    both = {k: v.expand(2, *v.shape[1:]) for k, v in one.items()}
    torch.manual_seed(3)
    with torch.no_grad():
        ref = m(both, d).clamp(-1, 1)
    torch.testing.assert_close(frames, ref, atol=1e-5, rtol=1e-5)
    # without the expression plane in the sum the lift still uses the driving expression
    seen.clear()
    torch.manual_seed(3)
    pipe.generate(st, mo, expression=False, composite=False)
    torch.testing.assert_close(seen[0], lifted)
    m.cfg.infer_lift_expression = "source"
    st = pipe.encode_source({"image": one["image"][0].float() / 127.5 - 1,
                             "camera": one["camera"][0], "coeffs": one["coeffs"][0]})
    assert st["appearance"] is not None and "lift_image" not in st


def test_infer_lift_expression_defaults_presets_saved_configs_and_resume(tmp_path, tiny_run,
                                                                        data_root):
    """The defaults (tiny, the recipe, a saved config without the keys) are the earlier
    inference, infer_lift_expression "source" and sr_noise "stored"; full and gpu-short set
    GOHA's "driving" / "random" in every stage; a bad value names the key; a run resumed with
    a key changed is refused naming it."""
    from pyface.checkpoint import CheckpointError
    from pyface.models.goha import GOHAGAN, GOHASR
    from pyface.models.goha.config import GOHA_INFERENCE
    from pyface.train.model import config_from_dict

    assert GOHA_INFERENCE == {"infer_lift_expression": "driving", "sr_noise": "random"}
    for cls, name in ((GOHA, "goha_s1"), (GOHAGAN, "goha_s1_gan"), (GOHASR, "goha")):
        def cfg_of(preset):
            return build_experiment(name, cls.Config, defaults=cls.recipe, presets=cls.presets,
                                    preset=preset).model_config
        for preset in ("tiny", None):
            c = cfg_of(preset)
            assert (c.infer_lift_expression, c.sr_noise) == ("source", "stored"), name
        for preset in ("full", "gpu-short"):
            c = cfg_of(preset)
            assert (c.infer_lift_expression, c.sr_noise) == ("driving", "random"), (name, preset)
    saved = {k: v for k, v in vars(tiny_config()).items()
             if k not in ("infer_lift_expression", "sr_noise")}
    c = config_from_dict(GOHAConfig, saved)
    assert (c.infer_lift_expression, c.sr_noise) == ("source", "stored")
    with pytest.raises(ValueError, match="model.infer_lift_expression: expected one of "
                                         r"\('source', 'driving'\), got 'target'"):
        GOHAConfig(infer_lift_expression="target")
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    for key, was, new in (("infer_lift_expression", "source", "driving"),
                          ("sr_noise", "stored", "random")):
        with pytest.raises(CheckpointError, match=rf"model\.{key}: checkpoint "
                                                  rf"'?{was}'? vs run '?{new}'?"):
            Trainer(experiment(old, data_root, "train.steps=3",
                               f"model.{key}={new}")).resume("auto")


def test_sr_noise_random_draws_fresh_maps_repeatable_with_a_seed(monkeypatch):
    """model.sr_noise: "stored" (default) runs s2's SR outside training with the stored noise
    maps; "random" (GOHA's GFPUpsampler) with fresh maps of the stored maps' shapes, drawn before
    the SR runs: from torch's generator (differing between calls, repeatable after
    torch.manual_seed), or per frame from the pipeline's seeded generators (repeatable, not
    depending on the chunking, and the same through a compiled SR). Training draws fresh maps
    inside the SR either way."""
    from pyface.models.goha import GOHASR
    from pyface.nn.compiling import compile_modules, parse_compile
    from pyface.nn.gfpgan import StyleConv

    assert GOHAConfig().sr_noise == "stored"
    torch.manual_seed(0)
    m = GOHASR(tiny_config(tv_weight=0)).eval()
    for mod in m.sr.modules():                      # noise strengths are zero at init
        if isinstance(mod, StyleConv):
            mod.weight.data.fill_(0.5)
    calls = []
    sr_forward = m.sr.forward

    def record(x, **kw):
        calls.append(kw)
        return sr_forward(x, **kw)

    monkeypatch.setattr(m.sr, "forward", record)
    raw = torch.rand(2, 3, 32, 32) * 2 - 1
    up = F.interpolate(raw, size=(64, 64), mode="bilinear", align_corners=True)
    dec = m.sr.stylegan_decoder
    with torch.no_grad():
        stored = m.finish(raw)
        assert calls[-1] == {"randomize_noise": False}
        assert torch.equal(stored, m.finish(raw))
        torch.testing.assert_close(stored, sr_forward(up, randomize_noise=False), rtol=0, atol=0)
        m.cfg.sr_noise = "random"
        r1, r2 = m.finish(raw), m.finish(raw)
        assert [tuple(t.shape) for t in calls[-1]["noise"]] == dec.noise_shapes(2)
        assert [tuple(t.shape[-2:]) for t in calls[-1]["noise"]] == \
            [tuple(getattr(dec.noises, f"noise{k}").shape[-2:]) for k in range(dec.num_layers)]
        assert not torch.allclose(r1, r2) and not torch.allclose(r1, stored)
        torch.manual_seed(7)
        s1 = m.finish(raw)
        torch.manual_seed(7)
        assert torch.equal(s1, m.finish(raw))

        def gens(*seeds):
            return [torch.Generator().manual_seed(s) for s in seeds]

        g12 = m.finish(raw, generators=gens(1, 2))
        assert torch.equal(g12, m.finish(raw, generators=gens(1, 2)))
        assert not torch.allclose(g12, m.finish(raw, generators=gens(3, 4)))
        torch.testing.assert_close(m.finish(raw[1:], generators=gens(2)), g12[1:], atol=1e-5,
                                   rtol=0)
    m.train()
    m.finish(raw)
    assert calls[-1] == {"randomize_noise": True}              # training: unchanged
    m.eval()
    # the pipeline: frame i's maps follow its ray samples in its generator of (seed, i)
    pipe = GOHA.Pipeline(m, device="cpu")
    c = random_coeffs(3, seed=9)
    f = frame(c)
    source = {"image": f["image"][0].float() / 127.5 - 1, "camera": f["camera"][0],
              "coeffs": c[0]}
    driving = {"image": f["image"].float() / 127.5 - 1, "camera": f["camera"], "coeffs": c}
    st = pipe.encode_source(source)

    def frames(chunk, seed=3):
        return torch.cat([x for _, x in pipe.stream(st, driving, chunk=chunk, seed=seed)])

    one = frames(1)
    torch.testing.assert_close(frames(3), one, atol=1e-5, rtol=0)
    assert not torch.allclose(frames(1, seed=4), one, atol=1e-3)
    assert not torch.allclose(pipe.animate(source, driving), pipe.animate(source, driving))
    m.cfg.sr_noise = "stored"
    assert not torch.allclose(frames(1), one, atol=1e-3)       # same samples, other SR noise
    m.cfg.sr_noise = "random"
    # a compiled SR gets the same maps (drawn outside it) and gives the same frames
    compile_modules(m, ("sr",), parse_compile("aot_eager"))
    torch.testing.assert_close(frames(1), one, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"model.sr_noise: expected one of \('stored', "
                                         r"'random'\), got 'fresh'"):
        GOHAConfig(sr_noise="fresh")
