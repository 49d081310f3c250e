"""Export3D: CLeBS stage and generator on tiny shapes (engine steps, exact resume, stage chaining,
shapes and bad input, the pipeline on a tiny checkpoint)."""
from __future__ import annotations

import pytest
import torch

import pyface.models
from pyface import checkpoint as ckpt
from pyface.data.driving import read_driving, read_source
from pyface.data.synthetic import make_default
from pyface.models.export3d import CLeBS, Export3D, ExpressionEncoder
from pyface.models.export3d.model import Export3DConfig, landmark_boxes
from pyface.train.config import build_experiment
from pyface.train.engine import Trainer
from pyface.train.model import Stage, StepContext, load_pretrained
from _saved_runs import drop_saved_keys

QUIET = ["train.progress=false", "train.tensorboard=false", "train.image_every=0",
         "train.log_every=1", "train.ckpt_every=0"]
CLEBS_TINY = ["model.n=3", "model.dim=8", "model.hidden=[16]", "model.image_stem=8",
              "model.image_widths=[8,16]", "model.image_depths=[1,1]", "model.resolution=32",
              "data.resolution=32", "data.options.frames=4", "data.options.min_gap=2",
              "data.options.repeats=2", "train.batch_size=2"]
GEN_TINY = ["model.resolution=32", "model.stem_widths=[4,8]", "model.vit_dim=16",
            "model.vit_depth=1", "model.vit_heads=2", "model.cond_dim=16", "model.ups=1",
            "model.up_widths=[8]", "model.plane_channels=4", "model.decoder_hidden=8",
            "model.decoder_features=7", "model.depth_samples=4", "model.importance_samples=4",
            "model.sr_widths=[4,4,4]", "model.n=3", "model.code_dim=8", "data.resolution=32",
            "data.options.repeats=1", "train.batch_size=2", "model.density_every=2",
            "train.ema.decay=0.5", "model.w_gan=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_default(str(tmp_path_factory.mktemp("e3d") / "data"), resolution=32)


def _exp(model, cls, run, data, *extra):
    return build_experiment(model, cls.Config, defaults=cls.recipe,
                            overrides=QUIET + [f"train.run_dir={run}", f"data.path={data}",
                                               *extra])


def _assert_resume_refuses(model, cls, run, data, sizes, changed: str, match: str) -> None:
    """A one-step run of ``model`` saved with its defaults, resumed with the setting ``changed``
    (``"model.KEY=VALUE"``), is refused naming the key (``match``)."""
    Trainer(_exp(model, cls, run, data, *sizes, "train.steps=1", "train.ckpt_every=1")).fit()
    c = Trainer(_exp(model, cls, run, data, *sizes, changed, "train.steps=2"))
    with pytest.raises(ckpt.CheckpointError, match=match):
        c.load_checkpoint(ckpt.checkpoint_path(str(run), 1))


@pytest.fixture(scope="module")
def clebs_run(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("e3d") / "clebs"
    Trainer(_exp("export3d_clebs", CLeBS, run, data, *CLEBS_TINY, "train.steps=2")).fit()
    return str(run)


@pytest.fixture(scope="module")
def gen_run(data, clebs_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("e3d") / "gen"
    Trainer(_exp("export3d", Export3D, run, data, *GEN_TINY, "train.steps=2",
                 f"model.clebs_checkpoint={clebs_run}")).fit()
    return str(run)


def test_expression_encoder_basis_and_errors():
    enc = ExpressionEncoder(4, 16, [8])
    q = enc.basis.basis()
    assert torch.allclose(q.t() @ q, torch.eye(4), atol=1e-5)
    lam, beta_p = enc(torch.randn(5, 64))
    assert lam.shape == (5, 4) and beta_p.shape == (5, 16)
    # beta' lies in the span of V, with coordinates lambda
    assert torch.allclose(beta_p @ q, lam, atol=1e-5)
    with pytest.raises(ValueError, match=r"beta: expected .*\(\.\.\., 64\), got \(5, 63\)"):
        enc(torch.randn(5, 63))


def test_clebs_engine_step_learns_signal_and_rejects_bad_clips(data, clebs_run):
    cfg, state = load_pretrained(clebs_run)
    assert cfg["n"] == 3 and "expr.basis.weight" in state and "temperature.log_scale" in state
    m = CLeBS(CLeBS.Config(n=3, dim=8, hidden=[16], image_stem=8, image_widths=[8, 16],
                           image_depths=[1, 1], resolution=32))
    ctx = StepContext(0, 0, 2)
    good = {"image": torch.zeros(2, 4, 3, 32, 32, dtype=torch.uint8),
            "coeffs": torch.randn(2, 4, 257)}
    out = m.step("main", good, ctx)
    out["loss"].backward()
    assert m.temperature.log_scale.grad is not None and m.expr.basis.weight.grad is not None
    with pytest.raises(ValueError, match=r"batch\['image'\]: expected clips of shape"):
        m.step("main", {"image": good["image"][0], "coeffs": good["coeffs"]}, ctx)
    with pytest.raises(ValueError, match=r"expected 32x32 frames"):
        m.step("main", {"image": torch.zeros(2, 4, 3, 16, 16), "coeffs": good["coeffs"]}, ctx)
    with pytest.raises(ValueError, match=r"batch\['coeffs'\]: expected shape \(2, 4, 257\)"):
        m.step("main", {"image": good["image"], "coeffs": torch.randn(2, 4, 80)}, ctx)


def test_stage_chaining_frozen_clebs(clebs_run, gen_run):
    assert Export3D.stages == (Stage("clebs", "export3d_clebs", "clebs_checkpoint"),)
    tensors, meta = ckpt.load_folder(ckpt.latest_checkpoint(gen_run))
    assert meta["experiment"]["model_config"]["clebs_checkpoint"] == clebs_run
    _, s1 = load_pretrained(clebs_run)
    for k, v in s1.items():          # f_e is frozen: bit-identical after stage-2 steps
        if k.startswith("expr."):
            assert torch.equal(tensors[f"model.cond.{k}"], v), k
    assert not any(k.startswith("model.cond.expr.image_encoder") for k in tensors)
    # the generator did train, and the online EMA tri-plane moved
    assert tensors["model.generator.planes_ema"].abs().sum() > 0
    with pytest.raises(ValueError, match="model.clebs_checkpoint: required"):
        Export3D(Export3D.Config(cond="clebs"))
    with pytest.raises(ValueError, match="model.cond: expected one of"):
        Export3D(Export3D.Config(cond="nope"))


def test_generator_exact_resume(data, clebs_run, tmp_path):
    extra = [*GEN_TINY, f"model.clebs_checkpoint={clebs_run}"]
    full = Trainer(_exp("export3d", Export3D, tmp_path / "full", data, *extra, "train.steps=4"))
    full.fit()
    a = Trainer(_exp("export3d", Export3D, tmp_path / "split", data, *extra, "train.steps=2",
                     "train.ckpt_every=2"))
    a.fit()
    b = Trainer(_exp("export3d", Export3D, tmp_path / "split", data, *extra, "train.steps=4"))
    assert b.resume("auto").endswith("ckpt-000002")
    b.fit()
    sb = b.model.state_dict()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, sb[k]), k
    for name, mod in full.ema.modules.items():
        for k, v in mod.state_dict().items():
            assert torch.equal(v, b.ema.modules[name].state_dict()[k]), f"ema.{name}.{k}"


@pytest.mark.parametrize("cond", ["direct", "e2e"])
def test_cond_modes_step_and_shapes(data, cond, tmp_path):
    exp = _exp("export3d", Export3D, tmp_path / cond, data, *GEN_TINY, f"model.cond={cond}",
               "model.w_roi_raw=1")
    m = Export3D(exp.model_config)
    B = 2
    cam = torch.tensor([1., 0, 0, 0, 0, -1, 0, 0, 0, 0, -1, 2.7, 0, 0, 0, 1,
                        4.26, 0, .5, 0, 4.26, .5, 0, 0, 1]).expand(B, 25)
    frame = {"image": torch.randint(0, 255, (B, 3, 32, 32), dtype=torch.uint8),
             "coeffs": torch.randn(B, 257), "camera": cam, "landmarks": torch.rand(B, 68, 2) * 32}
    out = m.step("G", {"source": frame, "driving": frame}, StepContext(0, 0, B))
    out["loss"].backward()
    assert {"l1", "l1_raw", "perceptual", "roi", "roi_raw", "density"} <= set(out)
    assert m.generator.to_planes.weight.grad is not None
    assert (m.cond.expr is None) == (cond == "direct")
    if cond == "e2e":     # trained end to end: the basis gets gradients
        assert m.cond.expr.basis.weight.grad is not None
    res = m(frame["image"].float() / 127.5 - 1, torch.randn(B, 64), cam)
    assert res["image"].shape == (B, 3, 32, 32) and res["image_raw"].shape == (B, 3, 8, 8)
    assert res["planes"].shape == (B, 3, 4, 16, 16)
    with pytest.raises(ValueError, match=r"beta: expected shape \(2, 64\)"):
        m(frame["image"].float(), torch.randn(B, 10), cam)
    with pytest.raises(ValueError, match=r"camera: expected shape \(2, 25\)"):
        m(frame["image"].float(), torch.randn(B, 64), cam[:, :16])
    with pytest.raises(ValueError, match=r"image: expected shape \(B, 3, 32, 32\)"):
        m(torch.zeros(B, 3, 16, 16), torch.randn(B, 64), cam)
    with pytest.raises(ValueError, match=r"batch images: expected \(B, 3, 32, 32\)"):
        m.step("G", {"source": {**frame, "image": torch.zeros(B, 3, 16, 16)}, "driving": frame},
               StepContext(0, 0, B))
    if cond == "direct":
        with pytest.raises(ValueError, match="lam_scale: model.cond='direct'"):
            m.condition(torch.randn(B, 64), torch.ones(3))
        # the optional source input of the super-resolution
        exp = _exp("export3d", Export3D, tmp_path / "src", data, *GEN_TINY, "model.cond=direct",
                   "model.sr_source=true")
        ms = Export3D(exp.model_config)
        res = ms(frame["image"].float() / 127.5 - 1, torch.randn(B, 64), cam)
        assert res["image"].shape == (B, 3, 32, 32)
        with pytest.raises(ValueError, match="source: expected .* with model.sr_source"):
            ms.render(res["planes"], cam)


def test_landmark_boxes():
    lm = torch.zeros(1, 68, 2)
    lm[0, 48:68] = torch.tensor([20.0, 24.0])
    lm[0, 48, 0] = 16.0
    boxes = landmark_boxes(lm, 32)
    x0, y0, x1, y1 = boxes["mouth"][0].tolist()
    assert x0 < 16 < 20 < x1 and y0 < 24 < y1 and set(boxes) == {"mouth", "eye_l", "eye_r"}
    with pytest.raises(ValueError, match=r"landmarks: expected shape \(B, 68, 2\)"):
        landmark_boxes(torch.zeros(1, 5, 2), 32)


def test_load_options_set_the_renderer_samples(data, gen_run):
    """``pyface.models.load("export3d", ..., options=...)`` sets the renderer's samples per ray
    and chunk size on a trained run (the weights and the other fields as saved; the frames
    change with the samples); an architecture key is refused naming it and listing the valid
    ones, a bad value names model.KEY."""
    import os

    default = pyface.models.load("export3d", gen_run, device="cpu")
    pipe = pyface.models.load("export3d", gen_run, device="cpu",
                              options={"depth_samples": 7, "model.importance_samples": "5",
                                       "render_chunk_points": 512})
    rc = pipe.model.renderer.config
    assert (rc.depth_resolution, rc.depth_resolution_importance, rc.chunk_points) == (7, 5, 512)
    assert (default.model.renderer.config.depth_resolution,
            default.model.renderer.config.depth_resolution_importance) == (4, 4)
    assert (rc.ray_start, rc.ray_end, rc.box_warp) == (2.25, 3.3, 1.0)
    ref = default.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in pipe.model.state_dict().items())
    video = os.path.join(data, sorted(v for v in os.listdir(data) if v.startswith("id"))[0])
    source = read_source(video, pipe.resolution)
    driving = {k: v[:2] if isinstance(v, torch.Tensor) else v
               for k, v in read_driving(video, pipe.resolution).items()}
    a = default.animate(source, driving)
    assert torch.equal(a, default.animate(source, driving))
    assert not torch.allclose(a, pipe.animate(source, driving))   # the option is used
    with pytest.raises(ValueError, match=r"options: 'ray_start' is not an inference option of "
                                         r"model 'export3d' .*; valid: model.depth_samples, "
                                         r"model.importance_samples, "
                                         r"model.render_chunk_points$"):
        pyface.models.load("export3d", gen_run, options={"ray_start": 1.0})
    with pytest.raises(ValueError, match=r"model.depth_samples: expected int, got 'many'"):
        pyface.models.load("export3d", gen_run, options={"depth_samples": "many"})
    with pytest.raises(ValueError, match=r"model.depth_samples: expected >= 4 \(with importance "
                                         r"samples\), got 3"):
        pyface.models.load("export3d", gen_run, options={"depth_samples": 3})


def test_load_option_values_are_checked_before_anything_is_read(tmp_path):
    """A sample count or chunk size that no saved config makes valid (fewer than 2 coarse
    samples, negative importance samples, a chunk < 1) is refused by check_options, and by
    load before the checkpoint is read, naming model.KEY (as a wrong type is); only the
    coarse minimum with importance samples waits for the saved config."""
    for opts, msg in [({"depth_samples": 1}, r"model.depth_samples: expected >= 2, got 1"),
                      ({"importance_samples": -1},
                       r"model.importance_samples: expected >= 0 \(0: the coarse pass only\), "
                       r"got -1"),
                      ({"render_chunk_points": 0},
                       r"model.render_chunk_points: expected >= 1 or None \(the renderer's "
                       r"default\), got 0")]:
        with pytest.raises(ValueError, match=msg):
            pyface.models.check_options("export3d", opts)
        with pytest.raises(ValueError, match=msg):
            pyface.models.load("export3d", str(tmp_path / "missing"), options=opts)
    assert pyface.models.check_options("export3d", {"depth_samples": 3}) == {"depth_samples": 3}
    with pytest.raises(ValueError, match=r"model.depth_samples: expected >= 2, got 0"):
        Export3DConfig(depth_samples=0, importance_samples=0)


def test_pipeline_on_a_tiny_checkpoint(data, gen_run):
    import os

    pipe = pyface.models.load("export3d", gen_run, device="cpu")
    video = os.path.join(data, sorted(v for v in os.listdir(data) if v.startswith("id"))[0])
    source = read_source(video, pipe.resolution)
    driving = read_driving(video, pipe.resolution)
    driving = {k: v[:3] if isinstance(v, torch.Tensor) else v for k, v in driving.items()}
    out = pipe.animate(source, driving)
    assert out.shape == (3, 3, 32, 32) and out.abs().max() <= 1
    assert pipe.reconstruct(source).shape == (1, 3, 32, 32)
    state, motion = pipe.encode_source(source), pipe.encode_driving(driving)
    assert motion["lambda"].shape == (3, 3)
    # source features are cached and broadcast: generate == per-frame forward of the model
    m = pipe.model
    direct = m(pipe.prepare(source, batched=False)["image"][None].expand(3, -1, -1, -1),
               motion["beta"], motion["camera"])["image"].clamp(-1, 1)
    assert torch.allclose(pipe.generate(state, motion), direct, atol=1e-5)
    # editing: scaling lambda_i changes the output; scale 1 changes nothing
    same = pipe.generate(state, motion, lam_scale={0: 1.0})
    edit = pipe.generate(state, motion, lam_scale={0: 0.0, 1: 3.0})
    assert torch.equal(same, pipe.generate(state, motion)) and not torch.equal(edit, same)
    assert pipe.generate(state, motion, camera="orbit").shape == (3, 3, 32, 32)
    assert pipe.generate(state, motion, camera="source").shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="lam_scale: index 7 out of range"):
        pipe.generate(state, motion, lam_scale={7: 2.0})
    # (T, n) factors are per frame, sliced with the chunks; other shapes and keys are errors
    per_frame = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 3.0, 1.0]])
    chunked = pipe.generate(state, motion, lam_scale=per_frame, chunk=2)
    torch.testing.assert_close(chunked[0], same[0])
    torch.testing.assert_close(chunked[2], edit[2])
    with pytest.raises(ValueError, match=r"lam_scale: expected .* shape \(3,\) or \(3, 3\), "
                                         r"got \(\)"):
        pipe.generate(state, motion, lam_scale=2.0)
    with pytest.raises(ValueError, match=r"lam_scale: index 'jaw': expected an int"):
        pipe.generate(state, motion, lam_scale={"jaw": 2.0})
    with pytest.raises(ValueError, match=r"chunk: expected an int >= 1, got 0"):
        pipe.generate(state, motion, chunk=0)
    import numpy as np

    torch.testing.assert_close(pipe.generate(state, motion, chunk=np.int64(2)),
                               pipe.generate(state, motion))
    with pytest.raises(ValueError, match="camera: expected one of"):
        pipe.generate(state, motion, camera="side")
    with pytest.raises(ValueError, match=r"driving\['coeffs'\]: missing"):
        pipe.encode_driving({"image": driving["image"]})


def test_clebs_augmentation_keeps_shape_and_is_training_only():
    from pyface.models.export3d.clebs import augment_frames

    x = torch.rand(3, 3, 16, 16) * 2 - 1
    y = augment_frames(x, 0.1)
    assert y.shape == x.shape and not torch.equal(x, y)
    assert torch.allclose(augment_frames(x, 0.0), x, atol=1e-5)


def test_presets_resolve_and_small_presets_use_a_per_step_ema():
    for model, cls in (("export3d_clebs", CLeBS), ("export3d", Export3D)):
        for name in ("tiny", "gpu-short", "full"):
            exp = build_experiment(model, cls.Config, defaults=cls.recipe, preset=name)
            assert exp.model_config.resolution == exp.data.resolution, (cls, name)
    for name in ("tiny", "gpu-short"):    # the recipe's 10 kimg half-life would freeze the EMA
        exp = build_experiment("export3d", Export3D.Config, defaults=Export3D.recipe,
                               preset=name)
        assert exp.train.ema.half_life_kimg is None and exp.train.ema.decay < 1
        assert exp.model_config.w_gan == 0       # GAN: full only (after a 10k-step warm-up)
    full = build_experiment("export3d", Export3D.Config, defaults=Export3D.recipe, preset="full")
    assert full.model_config.w_gan > 0 and full.model_config.gan_start > 0
    tiny = build_experiment("export3d", Export3D.Config, defaults=Export3D.recipe, preset="tiny")
    assert tiny.model_config.expr_planes and tiny.model_config.expr_init == "basis"
    assert full.model_config.expr_init == "orthogonal"      # the default: old checkpoints


def test_gan_after_warmup_with_r1_trains_the_discriminator(data, tmp_path):
    extra = [*GEN_TINY, "model.cond=direct", "model.w_gan=0.1", "model.gan_start=1",
             "model.r1_every=2", "model.d_channel_base=256", "model.d_channel_max=16",
             "train.steps=3"]
    t = Trainer(_exp("export3d", Export3D, tmp_path / "gan", data, *extra))
    m = t.model
    assert [p.name for p in m.phases()] == ["G", "D", "Dreg"]
    assert set(m.build_optimizers()) == {"G", "D"}
    d0 = {k: v.clone() for k, v in m.D.state_dict().items()}
    t.fit()
    changed = [k for k, v in m.D.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, d0[k])]
    assert changed, "the discriminator was never updated"
    ctx = StepContext(0, 0, 2)
    assert not m._gan_on(ctx) and m._gan_on(StepContext(1, 2, 2))
    assert float(m.step("D", {}, ctx)["loss"]) == 0.0
    # the checkpoint holds D; the pipeline loads it
    assert pyface.models.load("export3d", str(tmp_path / "gan"), device="cpu").model.D is not None


def test_source_guide_background_and_colour_augmentation(data, tmp_path):
    from pyface.models.export3d.model import joint_colour_augment

    exp = _exp("export3d", Export3D, tmp_path / "g", data, *GEN_TINY, "model.cond=direct",
               "model.sr_guide=true", "model.raw_background=true", "model.augment=0.2")
    m = Export3D(exp.model_config)
    B = 2
    cam = torch.tensor([1., 0, 0, 0, 0, -1, 0, 0, 0, 0, -1, 2.7, 0, 0, 0, 1,
                        4.26, 0, .5, 0, 4.26, .5, 0, 0, 1]).expand(B, 25)
    src = torch.rand(B, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        m.sr.to_rgb.weight.normal_()
        m.decoder.net[2].bias[0] = -30.0          # an empty volume: the raw image is the source
        out = m(src, torch.randn(B, 64), cam)
        small = torch.nn.functional.interpolate(src, size=(8, 8), mode="bilinear",
                                                align_corners=False, antialias=True)
        torch.testing.assert_close(out["image_raw"], small, atol=1e-3, rtol=0)
        other = m(src, torch.randn(B, 64), cam)["image"]
        assert not torch.allclose(m.render(out["planes"], cam, -src)["image"], other)  # guide
    with pytest.raises(ValueError, match="source: expected .* sr_guide"):
        m.render(out["planes"], cam)
    # sr_cond: the expression condition reaches the super-resolution (zero-initialised)
    exp = _exp("export3d", Export3D, tmp_path / "c", data, *GEN_TINY, "model.cond=direct",
               "model.sr_cond=true")
    mc = Export3D(exp.model_config).eval()
    beta = torch.randn(B, 64)
    with torch.no_grad():
        mc.sr.to_rgb.weight.normal_()
        mc.sr.modulation.weight.normal_()
        _, c1 = mc.condition(beta)
        _, c2 = mc.condition(torch.randn(B, 64))
        planes = mc.generator(src, c1)
        assert not torch.allclose(mc.render(planes, cam, src, c1)["image"],
                                  mc.render(planes, cam, src, c2)["image"])
    with pytest.raises(ValueError, match=r"cond: expected \(2, 16\) with model.sr_cond"):
        mc.render(planes, cam, src)
    a, b = torch.rand(2, 3, 4, 4) * 2 - 1, torch.rand(2, 3, 4, 4) * 2 - 1
    rng = torch.get_rng_state()
    a2, b2 = joint_colour_augment(a, a.clone(), 0.3)
    assert torch.equal(a2, b2) and not torch.equal(a2, a) and a2.abs().max() <= 1
    # the same draw with another second image: a's result is unchanged, and b gets the very
    # colour change that a got (the one b alone gets from that draw)
    torch.set_rng_state(rng)
    a3, b3 = joint_colour_augment(a, b, 0.3)
    torch.set_rng_state(rng)
    b4, _ = joint_colour_augment(b, b, 0.3)
    assert torch.equal(a3, a2) and torch.equal(b3, b4) and not torch.equal(b3, b)


def test_clebs_offset_noise_is_one_offset_per_clip_and_training_only():
    m = CLeBS(CLeBS.Config(n=3, dim=8, hidden=[16], image_stem=8, image_widths=[8, 16],
                           image_depths=[1, 1], resolution=32, offset_noise=0.3))

    class Identity(torch.nn.Module):          # lambda = beta: the offset is visible
        def forward(self, beta):
            return beta, beta

    m.expr = Identity()
    img = torch.zeros(2, 4, 3, 32, 32, dtype=torch.uint8)
    coeffs = torch.randn(2, 4, 257)
    m.eval()
    _, _, lam_eval = m.embed(img, coeffs)
    torch.testing.assert_close(lam_eval, coeffs[..., 80:144])
    m.train()
    _, _, lam = m.embed(img, coeffs)
    d = lam - coeffs[..., 80:144]
    assert d.abs().mean() > 0.05                                  # an offset was added
    torch.testing.assert_close(d, d[:, :1].expand_as(d))          # the same for the whole clip
    assert not torch.allclose(d[0], d[1])                         # another one per clip


def test_video_invariance_ratio():
    from pyface.models.export3d.clebs import video_invariance

    torch.manual_seed(0)
    within = torch.randn(6, 8, 3)
    # the same within-video variation; constant per-video offsets raise the ratio
    low = video_invariance(within)
    high = video_invariance(within + 3 * torch.randn(6, 1, 3))
    assert high > 10 * low
    with pytest.raises(ValueError, match="lam: expected \\(B, N, n\\)"):
        video_invariance(torch.randn(1, 8, 3))
    # a shared large within-video component hides a per-video offset from the per-coefficient
    # ratios (e + o, e - o), not from the joint one, which no rotation of lambda changes
    e, o = 4 * torch.randn(8, 8, 1), torch.randn(8, 1, 1).expand(8, 8, 1)
    mixed = torch.cat([e + o, e - o, torch.randn(8, 8, 1)], -1)
    assert video_invariance(mixed) < 1 and video_invariance(mixed, joint=True) > 100
    rot = torch.linalg.qr(torch.randn(3, 3))[0]
    torch.testing.assert_close(video_invariance(mixed @ rot, joint=True),
                               video_invariance(mixed, joint=True), rtol=1e-2, atol=0)
    torch.testing.assert_close(video_invariance(within, joint=True),
                               video_invariance(within @ rot, joint=True), rtol=1e-3, atol=0)
    m = CLeBS(CLeBS.Config(n=3, dim=8, hidden=[16], image_stem=8, image_widths=[8, 16],
                           image_depths=[1, 1], resolution=32, w_invariance=0.5))
    batch = {"image": torch.zeros(2, 4, 3, 32, 32, dtype=torch.uint8),
             "coeffs": torch.randn(2, 4, 257)}
    out = m.step("main", batch, StepContext(0, 0, 1))
    assert "invariance" in out and out["invariance"] > 0
    out["loss"].backward()
    assert m.expr.mlp[0].weight.grad.abs().sum() > 0


def test_online_ema_follows_the_generated_planes_not_itself():
    from pyface.models.export3d.generator import GeneratorConfig, TriplaneGenerator

    torch.manual_seed(0)
    g = TriplaneGenerator(GeneratorConfig(resolution=16, stem_widths=[4, 8], dim=8, depth=1,
                                          heads=2, cond_dim=4, ups=1, up_widths=[8],
                                          plane_channels=2, blur_sigma=0, ema_momentum=0.5))
    img, c = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 4)
    with torch.no_grad():
        gen = g(img, c)                                  # T_EMA = 0: the generated planes
        for _ in range(30):
            g(img, c, update_ema=True)
    # T_EMA converges to mean_B(G) (an EMA of T = G + T_EMA would grow without bound)
    torch.testing.assert_close(g.planes_ema, gen.mean(0, keepdim=True), atol=1e-5, rtol=1e-4)


def test_expression_whitening_by_video_statistics():
    torch.manual_seed(0)
    enc = ExpressionEncoder(3, 8, [], whiten=True, whiten_momentum=0.5)
    offsets = torch.randn(400, 1, 64) * torch.linspace(0.1, 3, 64)    # per-video, anisotropic
    beta = offsets + 0.01 * torch.randn(400, 6, 64)
    for _ in range(5):
        enc.update_video_stats(beta)
    x = (beta - enc.video_mean) @ enc.whitener
    cov = torch.cov(x.mean(1).t())
    # the per-video means are (close to) white after the transform
    assert cov.diagonal().std() < 0.2 * cov.diagonal().mean()
    lam, _ = enc(beta[0])
    torch.testing.assert_close(lam, enc.mlp(x[0]))
    with pytest.raises(ValueError, match="beta: expected \\(B, N, 64\\)"):
        enc.update_video_stats(beta[:1])
    with pytest.raises(ValueError, match="whiten=False"):
        ExpressionEncoder(3, 8, []).update_video_stats(beta)
    # a CLeBS with whiten updates the statistics in training only
    m = CLeBS(CLeBS.Config(n=3, dim=8, hidden=[], image_stem=8, image_widths=[8, 16],
                           image_depths=[1, 1], resolution=32, whiten=True))
    img = torch.zeros(2, 4, 3, 32, 32, dtype=torch.uint8)
    m.eval()
    m.embed(img, torch.randn(2, 4, 257))
    assert int(m.expr.video_batches) == 0
    m.train()
    m.embed(img, torch.randn(2, 4, 257))
    assert int(m.expr.video_batches) == 1 and not torch.equal(m.expr.whitener, torch.eye(64))


def test_condition_normalisation_uses_running_statistics():
    from pyface.models.export3d.model import Conditioner

    torch.manual_seed(0)
    enc = ExpressionEncoder(3, 8, [])
    c = Conditioner("e2e", enc, 6, normalize=True, momentum=0.5)
    # a large constant offset and a small spread, as the contrastive code has
    beta = 5 + 0.01 * torch.randn(64, 64)
    lam = enc.coefficients(beta)
    with torch.no_grad():
        for _ in range(20):
            c.from_code(beta, lam, update_stats=True)
        c.from_code(beta, lam)                       # no update without the flag
    assert int(c.code_batches) == 20
    torch.testing.assert_close(c.code_mean, lam.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c.code_var, lam.var(0, unbiased=False), rtol=1e-3, atol=1e-8)
    # the standardised coefficients have unit spread, whatever the code's offset and scale
    z = c._standardise(lam, False)
    assert (z.std(0) - 1).abs().max() < 0.05 and z.mean(0).abs().max() < 0.05
    # a batch of one is normalised with the running statistics, not its own
    one = c.from_code(beta[:1], lam[:1])
    torch.testing.assert_close(one, c.from_code(beta, lam)[:1])
    # direct: beta itself, 64 coefficients; the model updates the statistics in training only
    exp = build_experiment("export3d", Export3D.Config, defaults=Export3D.recipe,
                           overrides=[o for o in GEN_TINY if not o.startswith(("data.", "train."))]
                           + ["model.cond=direct", "model.cond_norm=true"])
    m = Export3D(exp.model_config)
    assert m.cond.code_mean.shape == (64,)
    cam = torch.tensor([1., 0, 0, 0, 0, -1, 0, 0, 0, 0, -1, 2.7, 0, 0, 0, 1,
                        4.26, 0, .5, 0, 4.26, .5, 0, 0, 1]).expand(2, 25)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    m.eval()
    m(img, torch.randn(2, 64), cam, update_ema=False)
    assert int(m.cond.code_batches) == 0
    m.train()
    m(img, torch.randn(2, 64), cam, update_ema=True)
    assert int(m.cond.code_batches) == 1


def test_condition_whitening_equalises_a_shared_component():
    """cond_whiten: a code whose coefficients share one large component (each has unit
    variance, so per-coefficient scaling leaves it) comes out with identity covariance."""
    from pyface.models.export3d.model import Conditioner

    torch.manual_seed(0)
    enc = ExpressionEncoder(4, 8, [])
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(512, 1, generator=g)
    lam = 3 + 0.95 * shared + 0.3 * torch.randn(512, 4, generator=g)     # correlation ~0.9
    beta = torch.zeros(512, 64)
    plain = Conditioner("e2e", enc, 6, normalize=True, momentum=0.5)
    white = Conditioner("e2e", enc, 6, normalize=True, momentum=0.5, whiten=True)
    white.mlp.load_state_dict(plain.mlp.state_dict())
    with torch.no_grad():
        for _ in range(20):
            plain.from_code(beta, lam, update_stats=True)
            white.from_code(beta, lam, update_stats=True)
    assert not hasattr(white, "code_var") and white.code_whitener.shape == (4, 4)
    cov = lambda x: (x - x.mean(0)).t() @ (x - x.mean(0)) / x.shape[0]
    torch.testing.assert_close(white.code_cov, cov(lam), rtol=1e-4, atol=1e-5)
    zp, zw = plain._standardise(lam, False), white._standardise(lam, False)
    # per coefficient: unit variances, but the shared direction keeps ~90 % of the spread
    assert (zp.var(0, unbiased=False) - 1).abs().max() < 0.05
    assert torch.linalg.eigvalsh(cov(zp))[-1] > 3.0
    # whitened: about identity covariance (the 1 % eigenvalue regulariser shrinks the small
    # directions, variance 0.09, by 10 %), zero mean
    ev = torch.linalg.eigvalsh(cov(zw))
    assert ev.min() > 0.85 and ev.max() < 1.001, ev
    assert zw.mean(0).abs().max() < 1e-4
    # a batch of one is whitened with the running statistics, not its own
    torch.testing.assert_close(white.from_code(beta[:1], lam[:1]), white.from_code(beta, lam)[:1])
    with pytest.raises(ValueError, match="cond_whiten: needs model.cond_norm=true"):
        Conditioner("e2e", enc, 6, normalize=False, whiten=True)


def test_ema_moments_mix_two_equal_batches_exactly():
    """With momentum 0.5, two equal batches give the moments of their union (variance and
    covariance forms: the mean shift enters the spread)."""
    from pyface.models.export3d.clebs import ema_moments_

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g) + 2.0
    both = torch.cat([a, b])
    cov = lambda x: (x - x.mean(0)).t() @ (x - x.mean(0)) / x.shape[0]
    for spread_of, want in ((lambda x: x.var(0, unbiased=False), both.var(0, unbiased=False)),
                            (cov, cov(both))):
        mean, spread = torch.zeros(3), torch.zeros_like(want)
        ema_moments_(mean, spread, a.mean(0), spread_of(a), 0.5, first=True)
        torch.testing.assert_close(mean, a.mean(0))
        ema_moments_(mean, spread, b.mean(0), spread_of(b), 0.5, first=False)
        torch.testing.assert_close(mean, both.mean(0))
        torch.testing.assert_close(spread, want)


def test_expression_planes_start_at_zero_are_linear_in_the_code_and_train():
    from pyface.models.export3d.generator import GeneratorConfig, TriplaneGenerator

    torch.manual_seed(0)
    kw = dict(resolution=16, stem_widths=[4, 8], dim=8, depth=1, heads=2, cond_dim=4, ups=1,
              up_widths=[8], plane_channels=2, blur_sigma=0, ema_momentum=1)
    g = TriplaneGenerator(GeneratorConfig(**kw, expr_planes=3, expr_dim=5))
    plain = TriplaneGenerator(GeneratorConfig(**kw))
    plain.load_state_dict({k: v for k, v in g.state_dict().items()
                           if not k.startswith("expr_")})
    img, c = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 4)
    e1, e2 = torch.randn(2, 5), torch.randn(2, 5)
    # E starts at zero: the planes equal the generator's without the directions, for any code
    torch.testing.assert_close(g(img, c, e1), plain(img, c))
    # W is orthogonal: its rows are orthonormal (a white code gives w of unit variance)
    W = g.expr_weights.weight
    torch.testing.assert_close(W @ W.T, torch.eye(3), atol=1e-5, rtol=0)
    # the basis gets the planes' gradient weighted by w(e), and the planes then depend on e
    # linearly: T(e1) - T(e2) = sum_k (w_k(e1) - w_k(e2)) E_k, the same for every source
    (g(img, c, e1) ** 2).sum().backward()
    assert g.expr_basis.grad.abs().sum() > 0
    with torch.no_grad():
        g.expr_basis.normal_()
        d = g(img, c, e1) - g(img, c, e2)
        want = torch.einsum("bk,kchw->bchw", (e1 - e2) @ W.T, g.expr_basis).reshape(d.shape)
        torch.testing.assert_close(d, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"expr: expected shape \(2, 5\) with expr_planes"):
        g(img, c)
    with pytest.raises(ValueError, match="expr_planes: expected >= 0"):
        TriplaneGenerator(GeneratorConfig(**kw, expr_planes=-1))


def test_expression_planes_basis_init_reads_lambda_directly():
    """expr_init=basis: w = W beta' is the (standardised) lambda itself at the start; the
    default orthogonal W sees the code's span only partly; direct has no basis."""
    base = [o for o in GEN_TINY if not o.startswith(("data.", "train."))] + ["model.cond=e2e"]

    def model(*extra):
        torch.manual_seed(0)
        exp = build_experiment("export3d", Export3D.Config, defaults=Export3D.recipe,
                               overrides=base + list(extra))
        return Export3D(exp.model_config)

    lam = torch.randn(5, 3)
    for k in (3, 2, 5):                          # n = 3 (GEN_TINY)
        m = model(f"model.expr_planes={k}", "model.expr_init=basis")
        W = m.generator.expr_weights.weight
        w = m.cond.expr.combine(lam) @ W.t()                 # (5, k)
        torch.testing.assert_close(w[:, :min(k, 3)], lam[:, :min(k, 3)], atol=1e-5, rtol=0)
        torch.testing.assert_close(W @ W.t(), torch.eye(k), atol=1e-5, rtol=0)
        if k > 3:                                            # the other rows see nothing of V
            assert w[:, 3:].abs().max() < 1e-5
    default = model("model.expr_planes=3")
    gains = torch.linalg.svdvals(default.generator.expr_weights.weight
                                 @ default.cond.expr.basis.basis())
    assert gains.max() < 0.99                   # a random W does not pass lambda at full gain
    with pytest.raises(ValueError, match="expr_init='basis': needs a basis"):
        model("model.expr_planes=3", "model.expr_init=basis", "model.cond=direct")
    with pytest.raises(ValueError, match="model.expr_init: expected one of"):
        model("model.expr_planes=3", "model.expr_init=random")


@pytest.mark.parametrize("extra", [(), ("model.expr_relative=true", "model.expr_init=basis",
                                          "model.cond_whiten=true")])
def test_expression_planes_in_the_model_and_pipeline(data, clebs_run, tmp_path, extra):
    import os

    run = tmp_path / "ep"
    Trainer(_exp("export3d", Export3D, run, data, *GEN_TINY, "train.steps=2",
                 f"model.clebs_checkpoint={clebs_run}", "model.expr_planes=2",
                 "model.cond_norm=true", *extra)).fit()
    pipe = pyface.models.load("export3d", str(run), device="cpu")
    m = pipe.model
    assert m.generator.expr_basis.shape == (2, 3 * 4, 16, 16)
    assert m.generator.expr_weights.weight.shape == (2, m.cond.code_dim)
    assert m.generator.expr_basis.abs().sum() > 0            # trained (two steps)
    video = os.path.join(data, sorted(v for v in os.listdir(data) if v.startswith("id"))[0])
    source = read_source(video, pipe.resolution)
    driving = read_driving(video, pipe.resolution)
    driving = {k: v[:3] if isinstance(v, torch.Tensor) else v for k, v in driving.items()}
    state, motion = pipe.encode_source(source), pipe.encode_driving(driving)
    # generate (cached source features) == the model's forward, expression planes included
    direct = m(pipe.prepare(source, batched=False)["image"][None].expand(3, -1, -1, -1),
               motion["beta"], motion["camera"], source_beta=state["beta"])["image"].clamp(-1, 1)
    torch.testing.assert_close(pipe.generate(state, motion), direct, atol=1e-5, rtol=0)
    if extra:       # expr_relative needs the source's coefficients
        with pytest.raises(ValueError, match="source\\['coeffs'\\]: required with"):
            pipe.generate(dict(state, beta=None), motion)
        # refused by encode_source itself, before the encoder runs
        m.generator.encode = None                    # calling it would be a TypeError
        with pytest.raises(ValueError, match="source\\['coeffs'\\]: required with"):
            pipe.encode_source({"image": source["image"]})


def test_relative_expression_planes_add_nothing_at_the_source_expression():
    """expr_relative: the planes move by w(e_D) - w(e_S); at the source's own expression they
    equal the generator's planes without the directions, whatever E holds."""
    torch.manual_seed(0)
    exp = build_experiment("export3d", Export3D.Config, defaults=Export3D.recipe,
                           overrides=[o for o in GEN_TINY if not o.startswith(("data.", "train."))]
                           + ["model.cond=e2e", "model.expr_planes=2",
                              "model.expr_relative=true", "model.blur_sigma=0"])
    m = Export3D(exp.model_config).eval()
    cam = torch.tensor([1., 0, 0, 0, 0, -1, 0, 0, 0, 0, -1, 2.7, 0, 0, 0, 1,
                        4.26, 0, .5, 0, 4.26, .5, 0, 0, 1]).expand(2, 25)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    b_s, b_d = torch.randn(2, 64), torch.randn(2, 64)
    with torch.no_grad():
        m.generator.expr_basis.normal_()
        at_source = m(img, b_s, cam, source_beta=b_s)["planes"]
        moved = m(img, b_d, cam, source_beta=b_s)["planes"]
        basis = m.generator.expr_basis.clone()
        m.generator.expr_basis.zero_()
        plain = m(img, b_s, cam, source_beta=b_s)["planes"]
        m.generator.expr_basis.copy_(basis)
        # the change is sum_k (w_k(e_D) - w_k(e_S)) E_k on top of the driving condition's planes
        own = m(img, b_d, cam, source_beta=b_d)["planes"]
        _, _, c_d = m.condition(b_d, with_code=True)
        _, _, c_s = m.condition(b_s, with_code=True)
        dw = m.generator.expr_weights(c_d - c_s)
    torch.testing.assert_close(at_source, plain, atol=1e-5, rtol=0)
    want = own + torch.einsum("bk,kchw->bchw", dw, basis).reshape(own.shape)
    torch.testing.assert_close(moved, want, atol=1e-4, rtol=1e-4)
    assert (moved - own).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="source_beta: expected shape"):
        m(img, b_d, cam)


def _offset_videos(videos: int, frames: int = 16, seed: int = 0):
    """Synthetic expressions (videos, frames, 64): 3 directions vary within a video (std 1),
    38 others carry a large per-video offset (std 5, constant in a video) - a leak."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(99)))
    expr = torch.randn(videos, frames, 3, generator=g)
    offset = 5 * torch.randn(videos, 1, 38, generator=g).expand(-1, frames, -1)
    noise = 0.01 * torch.randn(videos, frames, 64 - 3 - 38, generator=g)
    z = torch.cat([expr, offset, noise], -1)                  # (V, T, 64) in the q basis
    return z @ q.t(), expr


def test_fisher_init_removes_per_video_offsets():
    from pyface.models.export3d.clebs import fisher_directions, video_invariance

    beta, _ = _offset_videos(200)
    held, expr = _offset_videos(20, seed=1)                  # new videos, new offsets
    enc = ExpressionEncoder(3, 8, [])
    fd = enc.init_fisher(list(beta))
    assert fd["proj"].shape == (64, 3) and fd["ratio"].max() < 0.1
    lam = enc.coefficients(held)                             # (20, 16, 3)
    # the offsets are gone: the held-out video means differ about as much as those of the
    # true expression (16 random frames: 0.17), and the expression is kept
    assert video_invariance(lam) < 2 * video_invariance(expr)
    x = torch.cat([lam.reshape(-1, 3), torch.ones(320, 1)], 1)
    y = expr.reshape(-1, 3)
    res = y - x @ torch.linalg.lstsq(x, y).solution
    assert (res.var(0) / y.var(0)).max() < 0.05                 # R^2 > 0.95
    # on the training frames lambda has zero mean and unit within-video variance
    lam_tr = enc.coefficients(beta)
    torch.testing.assert_close(lam_tr.mean((0, 1)), torch.zeros(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(lam_tr.var(1, unbiased=False).mean(0), torch.ones(3),
                               atol=1e-3, rtol=0)
    # the top principal directions of all frames are the offsets (what the init must avoid)
    flat = beta.reshape(-1, 64)
    pcs = torch.linalg.eigh(torch.cov(flat.t()))[1][:, -3:]
    assert video_invariance(held @ pcs) > 10
    # the whitened encoder computes the same lambda (its statistics set from the same videos)
    encw = ExpressionEncoder(3, 8, [], whiten=True)
    encw.init_fisher(list(beta))
    assert int(encw.video_batches) == 1
    torch.testing.assert_close(encw.coefficients(held), lam, atol=2e-3, rtol=1e-3)
    with pytest.raises(ValueError, match=r"linear f_e \(model.hidden = \[\]\)"):
        ExpressionEncoder(3, 8, [16]).init_fisher(list(beta))
    with pytest.raises(ValueError, match=r"videos\[1\]: expected \(T >= 2, 64\)"):
        fisher_directions([beta[0], beta[1, :1]], 3)
    with pytest.raises(ValueError, match="model.invariance: expected 'coefficient' or 'joint'"):
        CLeBS(CLeBS.Config(invariance="trace"))
    with pytest.raises(ValueError, match="model.fe_init: expected one of"):
        CLeBS(CLeBS.Config(fe_init="pca"))
    with pytest.raises(ValueError, match="needs a linear f_e"):
        CLeBS(CLeBS.Config(fe_init="fisher", hidden=[16]))


def test_clebs_fisher_init_in_the_engine_with_a_frozen_encoder(data, tmp_path):
    over = [o if not o.startswith("model.hidden") else "model.hidden=[]" for o in CLEBS_TINY]
    tr = Trainer(_exp("export3d_clebs", CLeBS, tmp_path / "run", data, *over, "train.steps=2",
                      "model.fe_init=fisher", "model.fe_freeze=true", "model.whiten=true"))
    assert not bool(tr.model.fe_initialised)
    assert not any(p is q for p in tr.model.expr.parameters()
                   for q in tr.model.build_optimizers()["main"].param_groups[0]["params"])
    head0 = tr.model.image_encoder.head[-1].weight.clone()
    ref = CLeBS(tr.model.cfg)
    ref.load_state_dict(tr.model.state_dict())
    tr.fit()
    m = tr.model
    assert bool(m.fe_initialised) and m.init_report["videos"] == len(tr.dataset.clip_videos)
    ref.init_expression(tr.dataset)
    # f_e is the closed-form one, unchanged by training (and its statistics too); f_I trained
    for k, v in ref.expr.state_dict().items():
        torch.testing.assert_close(m.expr.state_dict()[k], v, msg=k)
    assert not torch.equal(m.image_encoder.head[-1].weight, head0)
    # resuming keeps it: the flag is in the checkpoint
    _, state = load_pretrained(str(tmp_path / "run"))
    assert bool(state["fe_initialised"])
    fresh = CLeBS(m.cfg)
    fresh.train()
    with pytest.raises(RuntimeError, match="call model.init_expression"):
        fresh.step("main", {"image": torch.zeros(2, 4, 3, 32, 32, dtype=torch.uint8),
                            "coeffs": torch.randn(2, 4, 257)}, StepContext(0, 0, 2))


def test_image_encoder_without_stem_pool_keeps_twice_the_resolution():
    from pyface.nn.encoders import ResNetEncoder

    kw = dict(stem_channels=8, widths=[8, 16], depths=[1, 1])
    pooled, full = ResNetEncoder(**kw), ResNetEncoder(**kw, stem_pool=False)
    x = torch.randn(2, 3, 32, 32)
    assert [f.shape[-1] for f in pooled.features(x)] == [8, 4]
    assert [f.shape[-1] for f in full.features(x)] == [16, 8]
    # the same parameters: a checkpoint of one loads into the other
    assert pooled.state_dict().keys() == full.state_dict().keys()
    m = CLeBS(CLeBS.Config(n=3, dim=8, hidden=[16], image_stem=8, image_widths=[8, 16],
                           image_depths=[1, 1], resolution=32, image_stem_pool=False))
    assert m.image_encoder.backbone.features(x)[-1].shape[-1] == 8
    assert m.image_encoder(x).shape == (2, 8)


def test_clebs_regression_term_trains_only_the_image_encoder():
    kw = dict(n=3, dim=8, hidden=[16], image_stem=8, image_widths=[8, 16], image_depths=[1, 1],
              resolution=32)
    torch.manual_seed(0)
    batch = {"image": torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8),
             "coeffs": torch.randn(2, 4, 257)}
    grads, outs = [], []
    for w in (0.0, 2.0):
        torch.manual_seed(1)
        m = CLeBS(CLeBS.Config(**kw, w_regress=w))
        out = m.step("main", batch, StepContext(0, 0, 1))
        out["loss"].backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
        outs.append(out)
        f_img, beta_p, _ = m.embed(batch["image"], batch["coeffs"])
    assert "regress" not in outs[0]
    reg = (f_img - beta_p).pow(2).sum(-1).mean() / 3
    torch.testing.assert_close(outs[1]["regress"], reg.detach())
    torch.testing.assert_close(outs[1]["loss"] - outs[0]["loss"], 2 * reg.detach())
    # f_e's gradient is the InfoNCE's alone (beta' is detached); f_I's includes the regression
    for k in grads[0]:
        if k.startswith("expr."):
            torch.testing.assert_close(grads[1][k], grads[0][k], msg=k)
    assert not torch.allclose(grads[1]["image_encoder.head.2.weight"],
                              grads[0]["image_encoder.head.2.weight"])


def test_image_encoder_flattened_head_sees_where_a_feature_is():
    kw = dict(n=3, dim=8, hidden=[16], image_stem=8, image_widths=[8, 16], image_depths=[1, 1],
              resolution=32)
    flat = CLeBS(CLeBS.Config(**kw, image_flatten=True)).image_encoder
    mean = CLeBS(CLeBS.Config(**kw)).image_encoder
    assert flat.head[0].in_features == 16 * 4 * 4 and mean.head[0].in_features == 16
    # the size probe leaves the BatchNorm statistics at their initial values
    for mod in flat.backbone.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            assert int(mod.num_batches_tracked) == 0 and torch.all(mod.running_mean == 0)
    # a map and its mirror image: equal spatial means, different flattened heads
    flat.eval()
    feat = torch.rand(1, 16, 4, 4)
    flat.backbone.features = lambda x: [feat if x.sum() > 0 else feat.flip(-1)]
    a, b = flat(torch.ones(1, 3, 32, 32)), flat(-torch.ones(1, 3, 32, 32))
    assert a.shape == (1, 8) and not torch.allclose(a, b)


def test_clebs_similarity_gain_weights_the_key_and_leaves_f_e_alone():
    kw = dict(n=3, dim=8, hidden=[], image_stem=8, image_widths=[8, 16], image_depths=[1, 1],
              resolution=32, sim_gain=True, fe_freeze=True, lr=1e-3, sim_gain_lr=10.0)
    m = CLeBS(CLeBS.Config(**kw))
    batch = {"image": torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8),
             "coeffs": torch.randn(2, 4, 257)}
    with torch.no_grad():
        m.sim_log_gain.copy_(torch.tensor([0.0, 1.0, -2.0]))
    m.eval()
    _, key, lam = m.embed(batch["image"], batch["coeffs"])
    lam_fe, beta_p = m.expr(batch["coeffs"][..., 80:144])
    torch.testing.assert_close(lam, lam_fe)                       # f_e's output is unchanged
    gained = lam * torch.tensor([1.0, 2.718282, 0.135335])
    torch.testing.assert_close(key @ m.expr.basis.basis(), gained, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(key, beta_p)
    # with f_e frozen the gains still learn, at lr x sim_gain_lr without weight decay
    m.train()
    opt = m.build_optimizers()["main"]
    names = {id(p): k for k, p in m.named_parameters()}
    in_opt = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    assert in_opt.count("sim_log_gain") == 1 and not any(k.startswith("expr.") for k in in_opt)
    group = [g for g in opt.param_groups if g["params"][0] is m.sim_log_gain][0]
    assert group["lr"] == pytest.approx(1e-2) and group["weight_decay"] == 0
    w0, s0 = m.expr.mlp[0].weight.clone(), m.sim_log_gain.detach().clone()
    m.step("main", batch, StepContext(0, 0, 1))["loss"].backward()
    opt.step()
    assert torch.equal(m.expr.mlp[0].weight, w0) and not torch.equal(m.sim_log_gain, s0)
    # off by default: the key is beta' and the state dict has no gain
    m0 = CLeBS(CLeBS.Config(**{**kw, "sim_gain": False}))
    m0.eval()
    _, key0, lam0 = m0.embed(batch["image"], batch["coeffs"])
    torch.testing.assert_close(key0, m0.expr(batch["coeffs"][..., 80:144])[1])
    assert "sim_log_gain" not in m0.state_dict()
    with pytest.raises(ValueError, match=r"model.sim_gain_lr: expected > 0, got 0"):
        CLeBS(CLeBS.Config(**{**kw, "sim_gain_lr": 0}))
    with pytest.raises(ValueError, match=r"model.w_regress: expected >= 0, got -1"):
        CLeBS(CLeBS.Config(**{**kw, "w_regress": -1.0}))


def test_image_encoder_stem_stride_4_reads_twice_the_size_at_the_same_stage_sizes():
    from pyface.nn.encoders import ResNetEncoder

    kw = dict(stem_channels=8, widths=[8, 16], depths=[1, 1])
    s2, s4 = ResNetEncoder(**kw), ResNetEncoder(**kw, stem_stride=4)
    assert [f.shape[-1] for f in s2.features(torch.randn(2, 3, 32, 32))] == [8, 4]
    assert [f.shape[-1] for f in s4.features(torch.randn(2, 3, 64, 64))] == [8, 4]
    assert s2.state_dict().keys() == s4.state_dict().keys()
    with pytest.raises(ValueError, match="stem_stride"):
        ResNetEncoder(**kw, stem_stride=3)
    m = CLeBS(CLeBS.Config(n=3, dim=8, hidden=[], image_stem=8, image_widths=[8, 16],
                           image_depths=[1, 1], resolution=64, image_stem_stride=4))
    assert m.image_encoder.backbone.stem[0].stride == (4, 4)
    assert CLeBS(CLeBS.Config()).image_encoder.backbone.stem[0].stride == (2, 2)
    with pytest.raises(ValueError, match="image_stem_stride"):
        CLeBS(CLeBS.Config(image_stem_stride=8))


def test_landmark_crops_follow_the_mouth_and_eyes():
    from pyface.models.export3d.clebs import landmark_crops

    R = 64
    img = -torch.ones(2, 3, R, R)
    img[0, :, 40:48, 20:28] = 1.0              # a bright patch at (x 24, y 44) in frame 0
    lm = torch.full((2, 68, 2), 32.0)
    lm[0, 48:68] = torch.tensor([24.0, 44.0])  # frame 0: the mouth on the patch
    lm[1, 48:68] = torch.tensor([24.0, 44.0])  # frame 1: the same place, no patch
    lm[:, 36:48] = torch.tensor([32.0, 16.0])  # the eyes: a band 48 x 24 px about y 16
    crops = landmark_crops(img, lm, 16, 0.375)
    assert crops.shape == (2, 6, 16, 16)
    # the mouth window (24 px wide, 16 samples) is centred on the patch: its middle is bright,
    # its corners are not; the eye band (y 4 .. 28) does not reach it
    assert crops[0, :3, 6:10, 6:10].min() > 0.9 and crops[0, :3, 0, 0].max() < -0.9
    assert crops[0, 3:].max() < -0.9 and crops[1].max() < -0.9
    # moving the landmarks moves the window
    lm2 = lm.clone()
    lm2[0, 48:68] = torch.tensor([40.0, 44.0])
    assert landmark_crops(img, lm2, 16, 0.375)[0, :3, 6:10, 6:10].max() < -0.9
    with pytest.raises(ValueError, match="landmarks"):
        landmark_crops(img, lm[:, :60], 16, 0.375)


def test_clebs_landmark_crops_need_landmarks_and_reach_the_head():
    kw = dict(n=3, dim=8, hidden=[], image_stem=8, image_widths=[8, 16], image_depths=[1, 1],
              resolution=32, image_crops=12, augment=0.1)
    m = CLeBS(CLeBS.Config(**kw))
    assert m.image_encoder.crop_backbone is not None
    assert m.image_encoder.head[0].in_features == 2 * 16
    assert CLeBS(CLeBS.Config(**{**kw, "image_crops": 0})).image_encoder.crop_backbone is None
    batch = {"image": torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8),
             "coeffs": torch.randn(2, 4, 257)}
    with pytest.raises(ValueError, match="landmarks"):
        m.step("main", batch, StepContext(0, 0, 1))
    batch["landmarks"] = torch.rand(2, 4, 68, 2) * 16 + 8
    out = m.step("main", batch, StepContext(0, 0, 1))
    out["loss"].backward()
    g = m.image_encoder.crop_backbone.stem[0].weight.grad
    assert g is not None and g.abs().sum() > 0
    # in eval mode the embedding depends on the landmarks (where the crops are taken)
    m.eval()
    with torch.no_grad():
        a = m.embed(batch["image"], batch["coeffs"], batch["landmarks"])[0]
        b = m.embed(batch["image"], batch["coeffs"], batch["landmarks"] + 6)[0]
    assert not torch.allclose(a, b)


def _mouth_landmarks(B: int, cx: float, cy: float, spread: float = 2.0) -> torch.Tensor:
    """(B, 68, 2): every point at the image's top-left corner, the mouth (48-67) around (cx,
    cy) with +-spread in x and y."""
    lm = torch.full((B, 68, 2), 1.0)
    lm[:, 48:68] = torch.tensor([cx, cy])
    lm[:, 48] += torch.tensor([-spread, -spread])
    lm[:, 54] += torch.tensor([spread, spread])
    return lm


def _inside(box, h: int, w: int) -> torch.Tensor:
    """box (4,) -> (h, w) bool: pixels [x, x + 1) x [y, y + 1) meeting the open box."""
    x0, y0, x1, y1 = box.tolist()
    xs, ys = torch.arange(w).float(), torch.arange(h).float()
    return ((ys + 1 > y0) & (ys < y1))[:, None] & ((xs + 1 > x0) & (xs < x1))[None]


def test_mask_mouth_box_fills_the_box_with_its_ring_at_each_resolution():
    from pyface.models.export3d.model import mask_mouth_box

    img = torch.rand(2, 3, 32, 32) * 2 - 1
    box = landmark_boxes(_mouth_landmarks(2, 16.0, 22.0), 32)["mouth"]
    assert box[0].tolist() == [13.0, 19.0, 19.0, 25.0]          # grown by half its size
    for res in (32, 8):                                         # H and the raw resolution
        x = torch.nn.functional.interpolate(img, size=(res, res), mode="area")
        b = box * (res / 32)
        out = mask_mouth_box(x, b)
        inside = _inside(b[0], res, res)
        ring = _inside(torch.stack([b[0, 0].floor() - 1, b[0, 1].floor() - 1,
                                    b[0, 2].ceil() + 1, b[0, 3].ceil() + 1]), res, res) & ~inside
        assert inside.sum() == (36 if res == 32 else 6)         # 6 x 6 at 32^2, 2 x 3 at 8^2
        assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])    # outside untouched
        fill = x[:, :, ring].mean(-1)                           # (2, 3): the ring's mean
        torch.testing.assert_close(out[:, :, inside], fill[..., None].expand(-1, -1, int(
            inside.sum())), atol=1e-6, rtol=0)
    # a box over the whole image: the image's mean; an empty box: unchanged
    whole = mask_mouth_box(img, torch.tensor([[-5.0, -5.0, 40.0, 40.0]] * 2))
    torch.testing.assert_close(whole, img.mean((2, 3), keepdim=True).expand_as(img))
    assert torch.equal(mask_mouth_box(img, torch.tensor([[4.0, 4.0, 4.0, 4.0]] * 2)), img)
    with pytest.raises(ValueError, match=r"box: expected shape \(2, 4\)"):
        mask_mouth_box(img, box[:1])
    with pytest.raises(ValueError, match=r"image: expected shape \(B, 3, h, w\)"):
        mask_mouth_box(img[:, :1], box)


def test_source_mouth_mask_hides_the_source_mouth_from_the_direct_paths(data, tmp_path):
    opts = [*GEN_TINY, "model.cond=direct", "model.sr_guide=true", "model.sr_source=true",
            "model.raw_background=true"]
    torch.manual_seed(0)
    off = Export3D(_exp("export3d", Export3D, tmp_path / "a", data, *opts).model_config).eval()
    torch.manual_seed(0)
    on = Export3D(_exp("export3d", Export3D, tmp_path / "b", data, *opts,
                       "model.source_mouth_mask=true").model_config).eval()
    assert not off.cfg.source_mouth_mask                       # default off
    on.load_state_dict(off.state_dict())                       # no new parameters
    B = 2
    cam = torch.tensor([1., 0, 0, 0, 0, -1, 0, 0, 0, 0, -1, 2.7, 0, 0, 0, 1,
                        4.26, 0, .5, 0, 4.26, .5, 0, 0, 1]).expand(B, 25)
    src, beta = torch.rand(B, 3, 32, 32) * 2 - 1, torch.randn(B, 64)
    lm = _mouth_landmarks(B, 16.0, 22.0)
    inside = _inside(landmark_boxes(lm, 32)["mouth"][0], 32, 32)
    other = src.clone()
    other[:, :, inside] = torch.rand(B, 3, int(inside.sum())) * 2 - 1   # another mouth
    with torch.no_grad():
        on.sr.to_rgb.weight.normal_()
        off.sr.to_rgb.weight.copy_(on.sr.to_rgb.weight)
        # off: the landmarks are ignored, bit for bit
        ref = off(src, beta, cam)
        for k, v in off(src, beta, cam, source_landmarks=lm).items():
            assert torch.equal(v, ref[k]), k
        # on: the same planes render the same image and raw image whatever the source's mouth
        planes = on.generator(src, on.condition(beta)[1])
        a = on.render(planes, cam, src, source_landmarks=lm)
        b = on.render(planes, cam, other, source_landmarks=lm)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image_raw"], b["image_raw"])
        c = off.render(planes, cam, src)
        d = off.render(planes, cam, other)
        assert not torch.equal(c["image"], d["image"]) and not torch.equal(a["image"], c["image"])
        # the generator's own input stays whole: the source's mouth still reaches the planes
        assert not torch.equal(on(src, beta, cam, source_landmarks=lm)["image"],
                               on(other, beta, cam, source_landmarks=lm)["image"])
    # one path at a time: `raw` (raw_background, sr_source) keeps the guide whole, `guide` the
    # raw-resolution paths
    for paths in ("raw", "guide"):
        torch.manual_seed(0)
        part = Export3D(_exp("export3d", Export3D, tmp_path / paths, data, *opts,
                             "model.source_mouth_mask=true",
                             f"model.source_mouth_mask_paths={paths}").model_config).eval()
        part.load_state_dict(on.state_dict())
        with torch.no_grad():
            a = part.render(planes, cam, src, source_landmarks=lm)
            b = part.render(planes, cam, other, source_landmarks=lm)
        assert torch.equal(a["image_raw"], b["image_raw"]) == (paths == "raw")
        assert not torch.equal(a["image"], b["image"])
    with pytest.raises(ValueError, match=r"model.source_mouth_mask_paths: expected one of"):
        Export3D(_exp("export3d", Export3D, tmp_path / "x", data, *opts,
                      "model.source_mouth_mask_paths=sr").model_config)
    with pytest.raises(ValueError, match=r"source_landmarks: expected shape \(2, 68, 2\).*"
                                         r"source_mouth_mask, got None"):
        on(src, beta, cam)
    with pytest.raises(ValueError, match=r"source_landmarks: expected shape \(2, 68, 2\)"):
        on(src, beta, cam, source_landmarks=lm[:, :20])


def test_source_mouth_mask_trains_and_the_pipeline_needs_the_landmarks(data, tmp_path):
    import os

    run = tmp_path / "mm"
    Trainer(_exp("export3d", Export3D, run, data, *GEN_TINY, "train.steps=2",
                 "model.cond=direct", "model.sr_guide=true", "model.raw_background=true",
                 "model.source_mouth_mask=true")).fit()
    pipe = pyface.models.load("export3d", str(run), device="cpu")
    m = pipe.model
    video = os.path.join(data, sorted(v for v in os.listdir(data) if v.startswith("id"))[0])
    source = read_source(video, pipe.resolution)
    driving = read_driving(video, pipe.resolution)
    driving = {k: v[:3] if isinstance(v, torch.Tensor) else v for k, v in driving.items()}
    state, motion = pipe.encode_source(source), pipe.encode_driving(driving)
    assert state["landmarks"].shape == (1, 68, 2)
    src = pipe.prepare(source, batched=False)
    direct = m(src["image"][None].expand(3, -1, -1, -1), motion["beta"], motion["camera"],
               source_landmarks=src["landmarks"][None].expand(3, -1, -1).float())["image"]
    torch.testing.assert_close(pipe.generate(state, motion), direct.clamp(-1, 1), atol=1e-5,
                               rtol=0)
    with pytest.raises(ValueError, match=r"source\['landmarks'\]: expected shape \(68, 2\).*"
                                         r"source_mouth_mask"):
        pipe.encode_source({k: v for k, v in source.items() if k != "landmarks"})


RANK_STATS = '''
import torch
import torch.distributed as dist
from pyface.models.export3d.generator import GeneratorConfig, TriplaneGenerator
from pyface.models.export3d.model import _global_batch_moments

torch.set_num_threads(1)
dist.init_process_group("gloo")
r = dist.get_rank()
torch.manual_seed(0)
x = torch.randn(6, 5) * 3 + 1
mine = x[3 * r:3 * r + 3]
mu, var = _global_batch_moments(mine, False)
torch.testing.assert_close(mu, x.mean(0))
torch.testing.assert_close(var, x.var(0, unbiased=False))
mu, cov = _global_batch_moments(mine, True)
xc = x - x.mean(0)
torch.testing.assert_close(cov, xc.t() @ xc / 6)
g = TriplaneGenerator(GeneratorConfig(resolution=16, stem_widths=[4, 8], dim=8, depth=1,
                                      heads=2, cond_dim=4, ups=1, up_widths=[8],
                                      plane_channels=2, blur_sigma=0, ema_momentum=0.5))
img, c = torch.rand(4, 3, 16, 16) * 2 - 1, torch.randn(4, 4)
with torch.no_grad():
    whole = g(img, c)                                 # T_EMA = 0: the generated planes
    g(img[2 * r:2 * r + 2], c[2 * r:2 * r + 2], update_ema=True)
torch.testing.assert_close(g.planes_ema, 0.5 * whole.mean(0, keepdim=True))
from pyface.models.export3d.clebs import ExpressionEncoder, video_mean_whitener
beta = torch.randn(4, 3, 64) + torch.randn(4, 1, 64)           # 4 videos x 3 frames
enc = ExpressionEncoder(2, 8, hidden=[], whiten=True)
enc.update_video_stats(beta[2 * r:2 * r + 2])                   # this rank's 2 videos
means = beta.mean(1)                                            # one process: all 4 videos
d = means - means.mean(0)
torch.testing.assert_close(enc.video_mean, means.mean(0))
torch.testing.assert_close(enc.video_cov, d.t() @ d / 3)
torch.testing.assert_close(enc.whitener, video_mean_whitener(d.t() @ d / 3).float())
dist.destroy_process_group()
'''


def test_running_statistics_are_global_under_torchrun(tmp_path):
    """2 gloo ranks, half the batch each: the condition's running moments, the generator's
    plane EMA and CLeBS's video whitening statistics (``whiten``) follow the whole batch, as one
    process does, so the ranks keep the same buffers
    (and a resume, which broadcasts rank 0's, continues exactly)."""
    from pyface.testing import run_torchrun

    script = tmp_path / "stats.py"
    script.write_text(RANK_STATS)
    run_torchrun(script)


def test_stream_orbit_is_one_orbit_over_the_stream(data, gen_run):
    """camera="orbit" under stream(): every frame's camera is its place on one orbit over all
    the streamed frames (chunks of 3 and 8 give the same label per frame), the orbit of
    `pyface animate --camera orbit`; the driving cameras (the default) are unchanged."""
    import os

    from pyface.train.animate_cli import orbit_cameras

    pipe = pyface.models.load("export3d", gen_run, device="cpu")
    video = os.path.join(data, sorted(v for v in os.listdir(data) if v.startswith("id"))[0])
    source, driving = read_source(video, 32), read_driving(video, 32)
    T = driving["coeffs"].shape[0]
    assert T > 3
    state = pipe.encode_source(source)
    seen, camera = [], pipe._camera

    def spy(*args):
        seen.append(camera(*args).clone())
        return seen[-1]

    pipe._camera = spy
    labels = {}
    for chunk in (3, 8):
        seen.clear()
        frames = torch.cat([f for _, f in pipe.stream(state, driving, chunk=chunk,
                                                      camera="orbit")])
        assert frames.shape == (T, 3, 32, 32)
        labels[chunk] = torch.cat(seen)
    assert torch.equal(labels[3], labels[8]) and torch.equal(labels[3], orbit_cameras(pipe, T))
    seen.clear()
    list(pipe.stream(state, driving, chunk=3))
    assert torch.equal(torch.cat(seen), driving["camera"])


def test_discriminator_adam_has_the_lazy_regularisation_compensation():
    from pyface.models.export3d import Export3D
    from pyface.train.config import build_experiment
    from pyface.train.schedules import lazy_regularization

    cfg = build_experiment("export3d", Export3D.Config, defaults=Export3D.recipe, overrides=[
        "model.resolution=32", "model.stem_widths=[4,8]", "model.vit_dim=16",
        "model.vit_depth=1", "model.vit_heads=2", "model.cond_dim=16", "model.ups=1",
        "model.up_widths=[8]", "model.plane_channels=4", "model.decoder_hidden=8",
        "model.decoder_features=7", "model.depth_samples=4", "model.importance_samples=4",
        "model.sr_widths=[4,4,4]", "model.n=3", "model.code_dim=8", "data.resolution=32",
        "model.cond=direct", "model.w_gan=0.1", "model.r1_every=16", "model.d_lr=1e-4",
        "model.betas=[0.0,0.99]", "model.d_channel_base=256", "model.d_channel_max=16",
        "data.name=synthetic"]).model_config
    d = Export3D(cfg).build_optimizers()["D"].param_groups[0]
    lr, betas = lazy_regularization(1e-4, (0.0, 0.99), 16)
    assert d["lr"] == pytest.approx(lr) and d["betas"] == pytest.approx(betas)


def _clebs_small(**kw):
    return CLeBS(CLeBS.Config(n=3, dim=8, hidden=[16], image_stem=8, image_widths=[8, 16],
                              image_depths=[1, 1], resolution=32, **kw))


@pytest.mark.parametrize("decay", [False, True])
def test_clebs_temperature_weight_decay_group(decay):
    m = _clebs_small(lr=0.1, weight_decay=0.5, temperature_decay=decay)
    opt = m.build_optimizers()["main"]
    t = m.temperature.log_scale
    (group,) = [g for g in opt.param_groups if any(p is t for p in g["params"])]
    assert group["weight_decay"] == (0.5 if decay else 0.0)
    # every trained parameter once; the others keep the decay
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())
    w = m.expr.basis.weight
    (wg,) = [g for g in opt.param_groups if any(p is w for p in g["params"])]
    assert wg["weight_decay"] == 0.5
    before, w0 = t.detach().clone(), w.detach().clone()
    for p in m.parameters():            # decay alone: zero gradients
        p.grad = torch.zeros_like(p)
    opt.step()
    assert not torch.equal(w, w0)        # the decay does act on the other weights
    if decay:       # runs saved before the option: log(1/tau) shrinks by lr * wd
        assert torch.allclose(t.detach(), before * (1 - 0.1 * 0.5))
    else:
        assert torch.equal(t.detach(), before)


def test_clebs_config_without_temperature_decay_is_an_earlier_run(tmp_path):
    from pyface.train.config import experiment_yaml
    from pyface.train.model import config_from_dict

    assert CLeBS.Config().temperature_decay is False            # new runs
    assert _exp("export3d_clebs", CLeBS, tmp_path / "r", "d").model_config \
        .temperature_decay is False
    # a saved config (checkpoint / config.yaml) without the key: the earlier grouping
    assert config_from_dict(CLeBS.Config, {"n": 3}).temperature_decay is True
    assert config_from_dict(CLeBS.Config, {"temperature_decay": False}) \
        .temperature_decay is False
    cfg = _exp("export3d_clebs", CLeBS, tmp_path / "r", "d")
    text = experiment_yaml(cfg)
    assert "temperature_decay: false" in text
    for written, expected in ((text, False),
                              (text.replace("  temperature_decay: false\n", ""), True)):
        path = tmp_path / "config.yaml"
        path.write_text(written)
        again = build_experiment("export3d_clebs", CLeBS.Config, defaults=CLeBS.recipe,
                                 yaml_path=str(path))
        assert again.model_config.temperature_decay is expected
    # a hand-written YAML of sections is not a saved config: the default applies
    path.write_text("model: {n: 3}\n")
    assert build_experiment("export3d_clebs", CLeBS.Config, defaults=CLeBS.recipe,
                            yaml_path=str(path)).model_config.temperature_decay is False


def _drop_temperature_decay(run):
    """Rewrite run's config.yaml and checkpoints as a run saved before the option."""
    drop_saved_keys(run, ["temperature_decay"])
    cy = run / "config.yaml"
    text = cy.read_text()
    assert "  temperature_decay: true\n" in text
    cy.write_text(text.replace("  temperature_decay: true\n", ""))


def test_clebs_run_saved_before_temperature_decay_resumes_exactly(data, tmp_path):
    old = [*CLEBS_TINY, "model.temperature_decay=true", "model.lr=0.01"]
    full = Trainer(_exp("export3d_clebs", CLeBS, tmp_path / "full", data, *old,
                        "train.steps=4"))
    full.fit()
    a = Trainer(_exp("export3d_clebs", CLeBS, tmp_path / "split", data, *old, "train.steps=2",
                     "train.ckpt_every=2"))
    a.fit()
    a.close()
    _drop_temperature_decay(tmp_path / "split")
    # its config.yaml resumes it with the grouping it was trained with, exactly
    cfg = build_experiment("export3d_clebs", CLeBS.Config, defaults=CLeBS.recipe,
                           yaml_path=str(tmp_path / "split" / "config.yaml"),
                           overrides=["train.steps=4"])
    assert cfg.model_config.temperature_decay is True
    b = Trainer(cfg)
    assert b.resume("auto").endswith("ckpt-000002")
    assert len(b.optimizers["main"].param_groups) == 1
    b.fit()
    sb = b.model.state_dict()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, sb[k]), k
    # the same command with the new default is refused, naming the option
    new = [o for o in old if "temperature_decay" not in o]
    c = Trainer(_exp("export3d_clebs", CLeBS, tmp_path / "split", data, *new,
                     "train.steps=4"))
    with pytest.raises(ckpt.CheckpointError,
                       match=r"model.temperature_decay: checkpoint True vs run False"):
        c.load_checkpoint(ckpt.checkpoint_path(str(tmp_path / "split"), 2))
    # as an unfinished stage of `pyface train export3d`: the error names the --set that
    # continues it; with that setting it is resumed
    from pyface.train.config import ConfigError
    from pyface.train.stages import _check_reuse

    stage, latest = Export3D.stages[0], ckpt.latest_checkpoint(str(tmp_path / "split"))
    with pytest.raises(ConfigError, match=r"model.temperature_decay: unfinished run True vs this "
                       r"command False.*--set stages.clebs.model.temperature_decay=true"):
        _check_reuse(stage, CLeBS, c.cfg, latest, finished=False)
    _check_reuse(stage, CLeBS, b.cfg, latest, finished=False)


D_SMALL = ["model.resolution=32", "model.stem_widths=[4,8]", "model.vit_dim=16",
           "model.vit_depth=1", "model.vit_heads=2", "model.cond_dim=16", "model.ups=1",
           "model.up_widths=[8]", "model.plane_channels=4", "model.decoder_hidden=8",
           "model.decoder_features=7", "model.depth_samples=4", "model.importance_samples=4",
           "model.sr_widths=[4,4,4]", "model.n=3", "model.code_dim=8", "data.resolution=32",
           "model.cond=direct", "model.w_gan=0.1", "model.r1_every=16", "model.d_lr=1e-4",
           "model.betas=[0.0,0.99]", "model.d_channel_base=256", "model.d_channel_max=16"]


@pytest.mark.parametrize("gamma", [0.0, 10.0])
def test_discriminator_without_r1_has_no_lazy_phase_nor_compensation(gamma):
    from pyface.train.schedules import lazy_regularization

    cfg = build_experiment("export3d", Export3D.Config, defaults=Export3D.recipe,
                           overrides=[*D_SMALL, f"model.r1_gamma={gamma}"]).model_config
    m = Export3D(cfg)
    d = m.build_optimizers()["D"].param_groups[0]
    phases = m.phases()
    if gamma == 0:          # as EG3D: no R1 phase, so D's Adam is not compensated for one
        assert [p.name for p in phases] == ["G", "D"]
        assert d["lr"] == pytest.approx(1e-4) and d["betas"] == pytest.approx((0.0, 0.99))
    else:
        assert [(p.name, p.interval) for p in phases] == [("G", 1), ("D", 1), ("Dreg", 16)]
        lr, betas = lazy_regularization(1e-4, (0.0, 0.99), 16)
        assert d["lr"] == pytest.approx(lr) and d["betas"] == pytest.approx(betas)
    for bad, match in (({"r1_gamma": -1.0}, r"model.r1_gamma: expected >= 0 \(0: no R1\), "
                                            r"got -1.0"),
                       ({"r1_every": 0}, r"model.r1_every: expected >= 1, got 0")):
        with pytest.raises(ValueError, match=match):
            Export3D(Export3D.Config(**{**cfg.__dict__, **bad}))


def test_gan_without_r1_never_runs_the_lazy_phase(data, tmp_path):
    extra = [*GEN_TINY, "model.cond=direct", "model.w_gan=0.1", "model.gan_start=1",
             "model.r1_every=2", "model.r1_gamma=0", "model.d_channel_base=256",
             "model.d_channel_max=16", "train.steps=3"]
    t = Trainer(_exp("export3d", Export3D, tmp_path / "gan", data, *extra))
    m = t.model
    seen, step = [], m.step
    m.step = lambda phase, batch, ctx: (seen.append(phase), step(phase, batch, ctx))[1]
    d0 = {k: v.clone() for k, v in m.D.state_dict().items()}
    t.fit()
    assert seen and "Dreg" not in seen and seen.count("D") == 3
    assert any(v.dtype.is_floating_point and not torch.equal(v, d0[k])
               for k, v in m.D.state_dict().items()), "the discriminator was never updated"


DENSITY_SMALL = [*GEN_TINY, "model.cond=direct", "model.w_density=0.5", "model.density_every=2",
                 "model.betas=[0.5,0.99]", "model.lr=1e-3"]


@pytest.mark.parametrize("own_phase", [False, True])
def test_density_regulariser_in_its_own_lazy_phase(data, tmp_path, own_phase):
    from pyface.train.schedules import lazy_regularization

    t = Trainer(_exp("export3d", Export3D, tmp_path / "run", data, *DENSITY_SMALL,
                     f"model.density_phase={str(own_phase).lower()}", "train.steps=3"))
    m = t.model
    assert [(p.name, p.interval) for p in m.phases()] == \
        ([("G", 1), ("Greg", 2)] if own_phase else [("G", 1)])
    g = t.optimizers["G"].param_groups[0]
    lr, betas = lazy_regularization(1e-3, (0.5, 0.99), 2) if own_phase else (1e-3, (0.5, 0.99))
    assert g["initial_lr" if "initial_lr" in g else "lr"] == pytest.approx(lr)
    assert g["betas"] == pytest.approx(betas)
    seen, step = [], m.step
    m.step = lambda phase, batch, ctx: (seen.append((ctx.step, phase, sorted(out := step(
        phase, batch, ctx)))), out)[1]
    t.fit()
    # steps 0 and 2 regularise: inside G (no own phase) or as Greg (own phase, G without it)
    if own_phase:
        assert [(s, p) for s, p, _ in seen] == [(0, "G"), (0, "Greg"), (1, "G"), (2, "G"),
                                                (2, "Greg")]
        assert all("density" not in keys for _, p, keys in seen if p == "G")
        assert all(keys == ["density", "loss"] for _, p, keys in seen if p == "Greg")
    else:
        assert [(s, p) for s, p, _ in seen] == [(0, "G"), (1, "G"), (2, "G")]
        assert [("density" in keys) for _, _, keys in seen] == [True, False, True]
    # the Greg loss is the regulariser alone, scaled by its interval, and reaches the generator
    batch = next(iter(torch.utils.data.DataLoader(t.dataset, batch_size=2)))
    out = Export3D._greg_step(m, batch)
    assert out["loss"].item() == pytest.approx(0.5 * 2 * out["density"].item(), rel=1e-5)
    m.zero_grad(set_to_none=True)
    out["loss"].backward()
    assert m.generator.to_planes.weight.grad.abs().sum() > 0


def test_density_phase_default_is_the_earlier_training_and_a_changed_key_is_refused(
        data, tmp_path):
    from pyface.train.model import config_from_dict

    assert Export3D.Config().density_phase is False
    assert config_from_dict(Export3D.Config, {"w_density": 0.25}).density_phase is False
    for name, want in (("tiny", False), ("gpu-short", True), ("full", True)):
        exp = build_experiment("export3d", Export3D.Config, defaults=Export3D.recipe, preset=name)
        assert exp.model_config.density_phase is want, name
    with pytest.raises(ValueError, match=r"model.density_every: expected >= 1 with "
                                         r"model.density_phase .*got 0"):
        Export3D(Export3D.Config(cond="direct", density_phase=True, density_every=0))
    # a run saved with the earlier training does not resume with the Greg phase
    _assert_resume_refuses("export3d", Export3D, tmp_path / "run", data, DENSITY_SMALL,
                           "model.density_phase=true",
                           r"model.density_phase: checkpoint False vs run True")


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_clebs_image_head_linear_is_one_projection(head):
    torch.manual_seed(0)
    m = _clebs_small(image_head=head).eval()
    img = torch.rand(3, 3, 32, 32) * 2 - 1
    feats = m.image_encoder.backbone(img)                          # (3, 16) pooled
    linears = [x for x in m.image_encoder.head if isinstance(x, torch.nn.Linear)]
    out = m.image_encoder(img)
    if head == "linear":     # the design study's ResNetEncoder + one Linear to d
        assert [(x.in_features, x.out_features) for x in linears] == [(16, 8)]
        torch.testing.assert_close(out, linears[0](feats))
        # linear in the pooled features: the code of a sum is the sum of the codes
        a, b = feats[:1], feats[1:2]
        torch.testing.assert_close(m.image_encoder.head(a + b) - m.image_encoder.head(b),
                                   m.image_encoder.head(a) - linears[0].bias, rtol=1e-5,
                                   atol=1e-5)
    else:
        assert [(x.in_features, x.out_features) for x in linears] == [(16, 16), (16, 8)]
        assert len(m.image_encoder.head) == 3
    assert out.shape == (3, 8)


def test_clebs_image_head_default_is_the_earlier_head_and_a_changed_key_is_refused(
        data, tmp_path):
    from pyface.train.model import config_from_dict

    assert CLeBS.Config().image_head == "mlp"
    assert config_from_dict(CLeBS.Config, {"n": 3}).image_head == "mlp"
    for name, want in (("tiny", "mlp"), ("gpu-short", "linear"), ("full", "linear")):
        exp = build_experiment("export3d_clebs", CLeBS.Config, defaults=CLeBS.recipe,
                               preset=name)
        assert exp.model_config.image_head == want, name
    with pytest.raises(ValueError, match=r"model.image_head: expected one of \('mlp', "
                                         r"'linear'\), got 'conv'"):
        _clebs_small(image_head="conv")
    _assert_resume_refuses("export3d_clebs", CLeBS, tmp_path / "run", data, CLEBS_TINY,
                           "model.image_head=linear",
                           r"model.image_head: checkpoint 'mlp' vs run 'linear'")
