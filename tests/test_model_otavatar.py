"""OTAvatar on tiny shapes: one engine step (inversion through ctx.update), exact resume, shapes
and bad input, the eye-RoI bug flag, the pipeline on a tiny checkpoint, a converted-release
folder, and the inversion loss decreasing."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import pyface.models
from pyface import checkpoint as ckpt
from pyface.data.synthetic import make_default
from pyface.train.config import build_experiment
from pyface.train.engine import Trainer
from _saved_runs import drop_saved_keys, edit_saved_config

QUIET = ["train.progress=false", "train.tensorboard=false", "train.image_every=0",
         "train.log_every=1", "train.ckpt_every=0"]
TINY = ["model.controller.window=9", "model.controller.descriptor=16",
        "model.controller.first_kernel=3", "model.controller.layers=1",
        "model.controller.dilation=2", "model.controller.directions=4",
        "model.invert_iters=3", "model.invert_controller_iters=1",
        "model.density_points=16", "model.invert_steps=3", "model.pti_steps=2", "model.wplus_steps=2", "data.resolution=16",
        "data.options.radius=4", "data.options.repeats=1", "data.options.frames_per_item=2",
        "train.batch_size=2"]
# a model built by hand (not by the Trainer, which derives it from the batch) sets local_batch
BY_HAND = TINY + ["model.local_batch=2"]


def tiny_generator_config():
    from pyface.models.eg3d.config import EG3DGeneratorConfig
    from pyface.nn.render import RenderConfig

    return EG3DGeneratorConfig(
        z_dim=8, w_dim=8, backbone_resolution=8, plane_channels=4, channel_base=64,
        channel_max=8, decoder_hidden=8, decoder_features=4, img_resolution=16,
        neural_rendering_resolution=8, sr_variant="hybrid2x", sr_input_resolution=8,
        sr_block_channels=[8, 8],
        render=RenderConfig.ffhq(depth_resolution=4, depth_resolution_importance=4))


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory):
    """A tiny EG3D generator stored like `pyface convert eg3d` output."""
    from pyface.models.eg3d.generator import EG3DGenerator

    torch.manual_seed(0)
    cfg = tiny_generator_config()
    G = EG3DGenerator(cfg)
    with torch.no_grad():
        G.backbone.mapping.w_avg.normal_()
    state = {k: v for k, v in G.state_dict().items() if k != "rendering_resolution"}
    out = str(tmp_path_factory.mktemp("ota") / "eg3d")
    ckpt.save_weights(out, state, kind="eg3d", config={"generator": dataclasses.asdict(cfg)})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_default(str(tmp_path_factory.mktemp("ota") / "data"), resolution=16)


def _exp(run, data, generator, *extra):
    from pyface.models.otavatar.model import OTAvatar

    return build_experiment("otavatar", OTAvatar.Config, defaults=OTAvatar.presets["tiny"],
                            overrides=QUIET + TINY + [f"train.run_dir={run}",
                                                      f"data.path={data}",
                                                      f"model.generator={generator}", *extra])


@pytest.fixture(scope="module")
def run(data, generator_dir, tmp_path_factory):
    r = tmp_path_factory.mktemp("ota") / "run"
    torch.manual_seed(0)
    res = Trainer(_exp(r, data, generator_dir, "train.steps=2", "train.ckpt_every=2")).fit()
    return str(r), res


def test_engine_step_updates_controller_generator_and_logs_inversion(data, generator_dir,
                                                                     tmp_path):
    from torch.utils.data import default_collate

    tr = Trainer(_exp(tmp_path / "r", data, generator_dir, "train.steps=1"))
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    batch = default_collate([tr.dataset[0], tr.dataset[1]])
    out = tr.train_step(batch)
    for k in ("loss", "invert_first", "invert_last", "invert_ratio", "monotonic", "tv",
              "smooth_l1_raw", "smooth_l1_sr", "mouth", "eyes"):
        assert f"main/{k}" in out and torch.isfinite(out[f"main/{k}"]), k
    after = tr.model.state_dict()
    changed = {k.split(".")[0] for k, v in after.items() if not torch.equal(v, before[k])}
    assert {"controller", "generator", "latent", "intrinsics"} <= changed
    # the inverted latent of each item moved away from w_avg (rank-local, one row per item)
    w_avg = tr.model.w_avg
    assert (after["latent"] - w_avg).abs().amax(dim=(1, 2)).min() > 0
    grid = tr.model.preview(default_collate([tr.dataset[i] for i in range(3)]))
    assert grid["image"].shape == (4, 3, 16, 16)        # the first local_batch items
    ema = tr.ema_module("controller")
    assert not torch.equal(ema.out.weight, tr.model.controller.out.weight)


def test_engine_step_with_every_inversion_iteration_on_the_controller(data, generator_dir,
                                                                     tmp_path):
    """invert_controller_iters == invert_iters (allowed): no W-only iteration, so the step logs
    no inversion losses instead of returning None for them."""
    from torch.utils.data import default_collate

    tr = Trainer(_exp(tmp_path / "r", data, generator_dir, "train.steps=1",
                      "model.invert_iters=2", "model.invert_controller_iters=2"))
    out = tr.train_step(default_collate([tr.dataset[0], tr.dataset[1]]))
    assert torch.isfinite(out["main/loss"])
    assert not {"main/invert_first", "main/invert_last", "main/invert_ratio"} & set(out)


def test_local_batch_follows_the_batch_and_recorded_runs_resume(run, data, generator_dir,
                                                                tmp_path):
    """Left unset, ``model.local_batch`` is the rank's share of the batch (here the whole batch
    of one process), recorded in config.yaml and the checkpoint; a run whose config names it
    resumes from a command that leaves it unset, and from ``--config`` of its config.yaml. An
    explicit value below the share is an error naming both; a larger one keeps working."""
    import os

    import yaml

    from pyface.models.otavatar.model import OTAvatar, OTAvatarConfig

    recorded = yaml.safe_load(open(os.path.join(run[0], "config.yaml")))["model_config"]
    assert recorded["local_batch"] == 2
    meta = ckpt.read_meta(run[1].checkpoint)
    assert meta["experiment"]["model_config"]["local_batch"] == 2
    derived = Trainer(_exp(run[0], data, generator_dir, "train.steps=2"))
    assert derived.model.latent.shape[0] == 2 and derived.cfg.model_config.local_batch == 2
    derived.resume("auto")
    assert derived.step == 2
    from_yaml = Trainer(build_experiment("otavatar", OTAvatar.Config,
                                         yaml_path=os.path.join(run[0], "config.yaml")))
    from_yaml.resume("auto")
    assert from_yaml.step == 2
    with pytest.raises(ValueError, match=r"model\.local_batch=1: smaller than this rank's share "
                                         r"of the batch \(train\.batch_size / ranks = 2 / 1 = 2\)"):
        Trainer(_exp(tmp_path / "small", data, generator_dir, "model.local_batch=1"))
    large = Trainer(_exp(tmp_path / "large", data, generator_dir, "model.local_batch=3",
                         "train.steps=1"))
    assert large.model.latent.shape[0] == 3
    large.fit()
    with pytest.raises(ValueError, match=r"model\.local_batch: None; pyface\.train's Trainer"):
        OTAvatar(OTAvatarConfig(generator=generator_dir))


def test_resume_at_another_share_of_the_batch_restarts_the_rank_local_rows(run, data,
                                                                          generator_dir,
                                                                          tmp_path, caplog):
    """A run resumed with another batch per rank (other ranks or another train.batch_size)
    changes model.local_batch: the latents and intrinsics (rank-local, restarted every batch)
    and their optimizer state start afresh at the new shape, the rest is the checkpoint's."""
    import logging
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    tensors, _ = ckpt.load_folder(ckpt.latest_checkpoint(str(copy)))
    wide = Trainer(_exp(copy, data, generator_dir, "train.batch_size=4", "train.steps=3"))
    with caplog.at_level(logging.WARNING, logger="pyface.train"):
        wide.resume("auto")
    assert wide.step == 2 and wide.model.latent.shape[0] == 4
    assert "resuming with model.local_batch=4, the checkpoint has 2" in caplog.text
    for k, v in wide.model.state_dict().items():
        if k not in ("latent", "intrinsics"):
            assert torch.equal(v, tensors[f"model.{k}"]), k
    assert wide.optimizers["latent"].state_dict()["state"] == {}
    assert wide.optimizers["controller"].state_dict()["state"]            # loaded
    wide.fit()
    assert wide.step == 3
    # the same share is still refused when another model key differs
    with pytest.raises(ckpt.CheckpointError, match=r"model\.invert_iters: checkpoint 3 vs run 4"):
        Trainer(_exp(copy, data, generator_dir, "train.batch_size=4",
                     "model.invert_iters=4")).resume("auto")


def test_exact_resume(data, generator_dir, tmp_path):
    torch.manual_seed(0)
    a = Trainer(_exp(tmp_path / "a", data, generator_dir, "train.steps=2"))
    a.fit()
    torch.manual_seed(0)
    b = Trainer(_exp(tmp_path / "b", data, generator_dir, "train.steps=1",
                     "train.ckpt_every=1"))
    b.fit()
    c = Trainer(_exp(tmp_path / "b", data, generator_dir, "train.steps=2"))
    c.resume("auto")
    c.fit()
    sa, sc = a.model.state_dict(), c.model.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k


def test_shapes_and_bad_input(generator_dir):
    from pyface.models.otavatar.model import OTAvatar, OTAvatarConfig, apply_intrinsics

    cfg = build_experiment("otavatar", OTAvatarConfig, defaults=OTAvatar.presets["tiny"],
                           overrides=BY_HAND + [f"model.generator={generator_dir}"]).model_config
    m = OTAvatar(cfg)
    w = m.w_avg.expand(3, m.generator.num_ws, -1)
    cam = m.generator.camera(torch.zeros(3), torch.zeros(3))
    out = m(w, torch.zeros(3, 70, 9), cam)
    assert out["image"].shape == (3, 3, 16, 16) and out["image_raw"].shape == (3, 3, 8, 8)
    assert out["planes"].shape == (3, 3, 4, 8, 8)
    with pytest.raises(ValueError, match=r"motion: expected shape \(3, 70, 9\)"):
        m(w, torch.zeros(2, 70, 9), cam)
    with pytest.raises(ValueError, match=r"motion: expected shape \(B, 70, 9\), got \(3, 70, 8\)"):
        m(w, torch.zeros(3, 70, 8), cam)
    with pytest.raises(ValueError, match=r"bias: expected shape \(3, 18\)"):
        apply_intrinsics(cam, torch.zeros(3, 9))
    # zero bias keeps the camera; the bias scales and shifts the intrinsics only
    assert torch.equal(apply_intrinsics(cam, torch.zeros(3, 18)), cam)
    bad = {"image": torch.zeros(2, 2, 3, 16, 16), "motion": torch.zeros(2, 2, 70, 7),
           "camera": torch.zeros(2, 2, 25)}
    with pytest.raises(ValueError, match=r"batch\['motion'\]: expected \(2, 2, 70, 9\)"):
        m.step("main", bad, None)
    bad["motion"] = torch.zeros(2, 2, 70, 9)
    bad["image"] = torch.zeros(2, 2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"batch\['image'\]: expected \(B, K, 3, 16, 16\)"):
        m.step("main", bad, None)
    with pytest.raises(ValueError, match="model.generator: required"):
        OTAvatar(OTAvatarConfig())


def test_eye_roi_bug_flag():
    from pyface.models.otavatar.losses import OTAvatarLoss

    torch.manual_seed(0)
    lm = torch.rand(2, 68, 2) * 40 + 12
    pred, tgt = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    fixed = OTAvatarLoss(w_perceptual=0, w_identity=0).roi(pred, tgt, lm)
    bug = OTAvatarLoss(w_perceptual=0, w_identity=0, eye_roi_bug=True).roi(pred, tgt, lm)
    assert fixed["eye_l"] > 0 and fixed["eye_r"] > 0
    assert bug["eye_l"] == 0 and bug["eye_r"] == 0          # the reference's zero eye term
    assert torch.equal(bug["mouth"], fixed["mouth"])


def test_identity_term_with_arcface_weights(tmp_path):
    from pyface.models.otavatar.losses import OTAvatarLoss
    from pyface.nn.arcface18 import ResNetArcFace

    torch.manual_seed(0)
    torch.save(ResNetArcFace().state_dict(), tmp_path / "arc.pth")
    loss = OTAvatarLoss(w_perceptual=0, arcface_weights=str(tmp_path / "arc.pth"))
    assert "arcface" not in dict(loss.named_modules())       # not in the model's state dict
    tgt = torch.rand(2, 3, 32, 32) * 2 - 1
    lm = torch.rand(2, 68, 2) * 16 + 8
    raw = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    total, logs = loss({"image_raw": raw}, tgt, lm, sr=False)
    assert logs["identity"] > 0
    total.backward()
    assert raw.grad.abs().sum() > 0
    # without weights the term is off
    _, logs = OTAvatarLoss(w_perceptual=0)({"image_raw": raw}, tgt, lm, sr=False)
    assert "identity" not in logs


def test_pipeline_on_a_tiny_checkpoint(run, data):
    from pyface.data.driving import read_driving, read_source

    r, _ = run
    pipe = pyface.models.load("otavatar", r, device="cpu")
    assert pipe.resolution == 16
    import glob
    import os

    folders = sorted(os.path.dirname(p) for p in glob.glob(f"{data}/**/coeffs.npy",
                                                            recursive=True))
    src = read_source(folders[0], 16)
    drv = read_driving(folders[0], 16, max_frames=5)
    state = pipe.encode_source(src)
    assert state["w"].shape == (1, pipe.model.generator.num_ws, 8) and len(state["loss"]) == 3
    # one w repeated over the layers; PTI tuned a copy of the generator, the model's is unchanged
    assert torch.equal(state["w"][:, 0], state["w"][:, -1])
    assert len(state["pti_loss"]) == 2 and state["generator"] is not pipe.model.generator
    assert not torch.equal(state["generator"].decoder.net[0].weight,
                           pipe.model.generator.decoder.net[0].weight)
    plus = pipe.encode_source(src, space="w+", pti_steps=0)
    assert "generator" not in plus and len(plus["loss"]) == 3 + 2
    assert not torch.equal(plus["w"][:, 0], plus["w"][:, -1])      # W+: one w per layer
    motion = pipe.encode_driving(drv)
    assert motion["motion"].shape == (5, 70, 9)
    for cam in ("driving", "source", "orbit"):
        frames = pipe.generate(state, motion, camera=cam)
        assert frames.shape == (5, 3, 16, 16) and frames.abs().max() <= 1
    # the driving windows change the output; the same window gives the same frame
    a = pipe.generate(state, motion, camera="source")
    assert not torch.allclose(a[0], a[-1]) or torch.equal(drv["coeffs"][0], drv["coeffs"][-1])
    orbit = pipe.generate(state, pipe.default_motion(4))
    assert orbit.shape == (4, 3, 16, 16)
    torch.testing.assert_close(pipe.generate(state, pipe.default_motion(4), camera="orbit"),
                               orbit)
    with pytest.raises(ValueError, match=r"camera: default_motion's frames follow the orbit"):
        pipe.generate(state, pipe.default_motion(4), camera="source")
    with pytest.raises(ValueError, match=r"driving\['coeffs'\]: expected shape \(T, 257\)"):
        pipe.encode_driving({"coeffs": torch.zeros(5, 70)})
    with pytest.raises(ValueError, match="camera: expected one of"):
        pipe.generate(state, motion, camera="fixed")
    with pytest.raises(KeyError, match="camera"):
        pipe.encode_source({"image": src["image"]})
    # options are checked: a misspelt control or inversion space is an error, not ignored
    with pytest.raises(TypeError, match="camra"):
        pipe.generate(state, motion, camra="source")
    with pytest.raises(ValueError, match=r"space: expected 'w' or 'w\+', got 'W\+'"):
        pipe.encode_source(src, space="W+")
    with pytest.raises(ValueError, match=r"pti_steps: expected an int >= 0, got -1"):
        pipe.encode_source(src, pti_steps=-1)
    with pytest.raises(ValueError, match=r"pti_metric: expected a callable .* got 'lpips'"):
        pipe.encode_source(src, pti_metric="lpips")
    import numpy as np

    assert len(pipe.encode_source(src, steps=np.int64(1), pti_steps=0)["loss"]) == 1


def test_pipeline_names_a_missing_generator(run, tmp_path):
    """A run whose EG3D generator folder is gone (and not under RUN/stages/eg3d) is an error
    naming model.generator and both paths, not a bare 'not a folder' of an unnamed path."""
    import json
    import shutil

    r, _ = run
    moved = tmp_path / "run"
    shutil.copytree(r, moved)
    latest = ckpt.latest_checkpoint(str(moved))
    meta_path = f"{latest}/meta.json"
    with open(meta_path) as f:
        meta = json.load(f)
    meta["experiment"]["model_config"]["generator"] = str(tmp_path / "gone")
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ckpt.CheckpointError, match=r"its EG3D generator \(model\.generator = "
                                                  r"'.*gone'\) does not exist, nor does "
                                                  r"'.*stages/eg3d'"):
        pyface.models.load("otavatar", str(moved), device="cpu")


def test_inversion_loss_decreases(generator_dir):
    """W inversion of an image the generator rendered from a perturbed latent."""
    from pyface.models.otavatar.model import OTAvatar, OTAvatarConfig
    from pyface.models.otavatar.pipeline import invert

    cfg = build_experiment("otavatar", OTAvatarConfig, defaults=OTAvatar.presets["tiny"],
                           overrides=BY_HAND + [f"model.generator={generator_dir}",
                                             "model.invert_lr=0.1"]).model_config
    m = OTAvatar(cfg).eval()
    torch.manual_seed(1)
    cam = m.generator.camera(0.0, 0.0)
    motion = torch.zeros(1, 70, 9)
    with torch.no_grad():
        w_true = m.w_avg.expand(1, m.generator.num_ws, -1) + torch.randn(1, 1, 8)
        target = m(w_true, motion, cam)["image"].clamp(-1, 1)
    _, _, losses = invert(m, target, cam, motion, steps=60, sr_steps=0)
    assert losses[-1] <= 0.7 * losses[0], losses


def test_load_options_set_the_inference_options_of_a_trained_run(run):
    """`pyface.models.load("otavatar", RUN, options=...)` (OTAvatar's own load_pipeline): the
    inversion / PTI / profile options replace the saved ones before the model is built, the
    weights and every other field stay the checkpoint's; a training field is refused naming it
    and listing the inference options, a bad value names model.KEY."""
    r, _ = run
    saved = pyface.models.load("otavatar", r, device="cpu")
    assert (saved.model.cfg.pti_steps, saved.model.cfg.drive_pose) == (2, True)   # tiny
    pipe = pyface.models.load("otavatar", r, device="cpu",
                              options={"model.pti_steps": 3, "drive_pose": "false",
                                       "inference": "reference"})
    cfg = pipe.model.cfg
    assert (cfg.pti_steps, cfg.drive_pose, cfg.inference) == (3, False, "reference")
    assert cfg.controller_lr == saved.model.cfg.controller_lr
    assert cfg.roi_box == saved.model.cfg.roi_box
    want = saved.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in pipe.model.state_dict().items())
    with pytest.raises(ValueError, match=r"options: 'model.controller_lr' is not an inference "
                                         r"option of model 'otavatar' .*valid: "
                                         r"model.invert_steps, .*model.pti_steps"):
        pyface.models.load("otavatar", r, device="cpu", options={"model.controller_lr": 1.0})
    with pytest.raises(ValueError, match=r"model.pti_steps: expected int, got 'lots'"):
        pyface.models.load("otavatar", r, device="cpu", options={"pti_steps": "lots"})
    with pytest.raises(ValueError, match=r"model.invert_space"):
        pyface.models.load("otavatar", r, device="cpu", options={"invert_space": "z"})


def test_load_options_set_the_renderers_samples_and_execution(run):
    """``render.KEY`` options (OTAvatar's model.render overrides, checked as RenderConfig
    fields): the samples per ray replace the saved ones in the generator the pipeline renders
    with, merged into the saved overrides (tiny's recompute / chunk_points stay), and change
    the image; an undeclared or fixed render key is refused listing the valid ones, a bad
    value names model.render.KEY, too few coarse samples for the importance pass are refused
    naming the key that was set."""
    r, _ = run
    saved = pyface.models.load("otavatar", r, device="cpu")
    pipe = pyface.models.load("otavatar", r, device="cpu",
                              options={"render.depth_resolution": 7,
                                       "model.render.depth_resolution_importance": "5",
                                       "render.chunk_points": 4096})
    rc, base = pipe.model.generator.renderer.config, saved.model.generator.renderer.config
    assert (base.depth_resolution, base.depth_resolution_importance) == (4, 4)   # the fixture's
    assert (rc.depth_resolution, rc.depth_resolution_importance) == (7, 5)
    assert pipe.model.generator.cfg.render is rc
    assert (rc.recompute, rc.chunk_points) == ("decoder", 4096)   # tiny's recompute kept
    assert pipe.model.cfg.render == {"recompute": "decoder", "chunk_points": 4096,
                                     "depth_resolution": 7, "depth_resolution_importance": 5}
    assert (rc.plane_axes, rc.box_warp, rc.ray_start) == (base.plane_axes, base.box_warp,
                                                          base.ray_start)
    want = saved.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in pipe.model.state_dict().items())

    def render(p):
        G = p.model.generator
        w = G.backbone.mapping.w_avg.expand(1, G.num_ws, -1)
        torch.manual_seed(5)
        with torch.no_grad():
            return p.model(w, torch.zeros(1, 70, 9), G.camera(0.2, 0.0))["image"]

    assert torch.equal(render(saved), render(saved))     # the same samples: the same image
    assert not torch.allclose(render(pipe), render(saved), atol=1e-4)
    for key in ("render.box_warp", "render.plane_axes", "render.nope"):
        with pytest.raises(ValueError, match=rf"options: '{key}' is not an inference option of "
                                             r"model 'otavatar' .*valid: .*"
                                             r"model.render.depth_resolution, "
                                             r"model.render.depth_resolution_importance, "
                                             r"model.render.backend, model.render.recompute, "
                                             r"model.render.chunk_points"):
            pyface.models.load("otavatar", r, device="cpu", options={key: 1.0})
    for opts, msg in (({"render.depth_resolution": "many"},
                       r"model.render.depth_resolution: expected int, got 'many'"),
                      ({"render.depth_resolution": 1},
                       r"model.render.depth_resolution: expected an int >= 2, got 1"),
                      ({"render.recompute": "sometimes"},
                       r"model.render.recompute: expected true, false or 'decoder'"),
                      ({"render.recompute": None},
                       r"model.render.recompute: expected true, false or 'decoder', got None$"),
                      ({"render.recompute": 2},
                       r"model.render.recompute: expected true, false or 'decoder', got 2$"),
                      ({"render.backend": "fast"},
                       r"model.render.backend: expected one of \['reference', 'cpu', 'cuda', "
                       r"'triton'\] or None \(the default for the device\), got 'fast'"),
                      ({"render.chunk_points": 0},
                       r"model.render.chunk_points: expected an int >= 1 or None"),
                      ({"render.depth_resolution": 3},     # the saved 4 importance samples
                       r"model.render.depth_resolution: expected >= 4 with importance "
                       r"samples \(depth_resolution_importance 4\), got 3")):
        with pytest.raises(ValueError, match=msg):
            pyface.models.load("otavatar", r, device="cpu", options=opts)
    coarse = pyface.models.load("otavatar", r, device="cpu",
                                options={"render.depth_resolution": 3,
                                         "render.depth_resolution_importance": 0})
    rc = coarse.model.generator.renderer.config
    assert (rc.depth_resolution, rc.depth_resolution_importance) == (3, 0)
    assert render(coarse).shape == render(saved).shape


def test_importance_option_refused_by_saved_coarse_samples_names_its_own_key(run, data,
                                                                            tmp_path, capsys):
    """A run saved with render overrides of 3 coarse samples and no importance samples, loaded
    with importance samples as an option: refused naming the key that was set,
    model.render.depth_resolution_importance (not the saved depth_resolution), and pyface
    animate exits 2 with that message; the coarse count, when set with it, is the one named."""
    import shutil

    from pyface.cli import main

    r, _ = run
    copy = tmp_path / "coarse3"
    shutil.copytree(r, copy)
    edit_saved_config(copy, lambda config: config.update(render={
        **(config.get("render") or {}), "depth_resolution": 3,
        "depth_resolution_importance": 0}))
    saved = pyface.models.load("otavatar", str(copy), device="cpu")
    rc = saved.model.generator.renderer.config
    assert (rc.depth_resolution, rc.depth_resolution_importance) == (3, 0)
    want = ("model.render.depth_resolution_importance: expected 0 with fewer than 4 coarse "
            "samples (depth_resolution 3), got 5")
    for key in ("render.depth_resolution_importance", "model.render.depth_resolution_importance"):
        with pytest.raises(ValueError) as exc:
            pyface.models.load("otavatar", str(copy), device="cpu", options={key: 5})
        assert str(exc.value) == want
    with pytest.raises(ValueError, match=r"^model.render.depth_resolution: expected >= 4 with "
                                         r"importance samples \(depth_resolution_importance "
                                         r"5\), got 2$"):
        pyface.models.load("otavatar", str(copy), device="cpu",
                           options={"render.depth_resolution": 2,
                                    "render.depth_resolution_importance": 5})
    folders = _folders(data)
    capsys.readouterr()
    assert main(["animate", "otavatar", "--checkpoint", str(copy), "--source", folders[0],
                 "--driving", folders[1], "--frames", "2", "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "a.mp4"),
                 "--option", "render.depth_resolution_importance=5"]) == 2
    assert capsys.readouterr().err == f"pyface animate: {want}\n"


def test_pipeline_from_a_converted_release(tmp_path):
    """`pyface.models.load("otavatar", FOLDER)` on a `pyface convert otavatar` folder: the
    release's controller (full size) drives the release's generator."""
    from test_convert_otavatar import write_release

    from pyface.convert import convert_otavatar
    from pyface.models.otavatar.convert import load_controller

    write_release(tmp_path / "r.pt")
    out = convert_otavatar(str(tmp_path / "r.pt"), str(tmp_path / "conv"))
    pipe = pyface.models.load("otavatar", out, device="cpu")
    # the render options reach the release's generator too (its own: 48 + 48 samples)
    fewer = pyface.models.load("otavatar", out, device="cpu",
                               options={"render.depth_resolution": 6,
                                        "render.depth_resolution_importance": 2,
                                        "render.recompute": False})
    rc = fewer.model.generator.renderer.config
    assert (rc.depth_resolution, rc.depth_resolution_importance, rc.recompute) == (6, 2, False)
    assert fewer.model.cfg.render == {"depth_resolution": 6, "depth_resolution_importance": 2,
                                      "recompute": False}
    assert pipe.model.generator.renderer.config.depth_resolution == 48
    with pytest.raises(ValueError, match=r"model.render.depth_resolution: expected >= 4 with "
                                         r"importance samples \(depth_resolution_importance "
                                         r"48\), got 3"):
        pyface.models.load("otavatar", out, device="cpu",
                           options={"render.depth_resolution": 3})
    ref = load_controller(out)
    for k, v in ref.state_dict().items():
        assert torch.equal(pipe.model.controller.state_dict()[k], v), k
    R = pipe.resolution                      # OTAvatar's 512 (this generator has no SR)
    assert R == 512 and pipe.model.controller.cfg.window == 27
    G = pipe.model.generator
    G.rendering_resolution.fill_(8)          # a small render keeps the test fast
    pipe.model.generator.renderer.config.depth_resolution = 4
    pipe.model.generator.renderer.config.depth_resolution_importance = 4
    cam = G.camera(0.0, 0.0)[0]
    state = pipe.encode_source({"image": torch.zeros(3, 64, 64), "camera": cam}, steps=1,
                               pti_steps=0)
    assert state["w"].shape == (1, 14, 512)
    frames = pipe.generate(state, {"motion": torch.randn(2, 70, 27) * 0.1,
                                   "camera": cam.expand(2, -1)})
    assert frames.shape == (2, 3, R, R)


def test_presets_resolve_and_full_keeps_the_reference_recipe():
    from pyface.models.otavatar.model import OTAvatar

    for name in ("tiny", "gpu-short", "full"):
        exp = build_experiment("otavatar", OTAvatar.Config, defaults=OTAvatar.recipe,
                               preset=name, presets=OTAvatar.presets)
        cfg = exp.model_config
        assert exp.data.name == "motion_windows"
        assert cfg.controller.window == 2 * exp.data.options.radius + 1, name
        assert cfg.local_batch is None, name        # the Trainer derives it from the batch
        assert sorted(exp.train.ema.modules) == ["controller", "generator"]
        assert exp.train.ema.decay == 0.95 and exp.train.ema.half_life_kimg is None
    full = build_experiment("otavatar", OTAvatar.Config, defaults=OTAvatar.recipe,
                            preset="full", presets=OTAvatar.presets).model_config
    assert (full.invert_iters, full.invert_controller_iters, full.invert_lr) == (100, 10, 0.01)
    assert (full.controller_lr, full.controller_wd, full.generator_lr) == (1e-3, 1.0, 1e-4)
    assert (full.style_weight, full.w_mouth, full.w_tv, full.w_clamp) == (250.0, 10.0, 0.25, 5.0)
    assert not full.eye_roi_bug and full.controller.window == 27 and full.controller.tie_mlp


def test_tiny_trains_its_eg3d_stage_on_backgrounds(tmp_path):
    """``pyface train otavatar --preset tiny`` trains its EG3D stage with OTAvatar's additions to
    EG3D's ``tiny`` (``Stage.presets``: the data's backgrounds, a longer run) while EG3D's own
    ``tiny`` preset is unchanged; ``stages.eg3d.*`` overrides still apply above them."""
    from pyface.models.eg3d.model import EG3D
    from pyface.models.otavatar.model import OTAvatar
    from pyface.train.stages import prepare_stages

    class Stop(Exception):
        pass

    seen = []

    def train_fn(cfg):
        seen.append(cfg)
        raise Stop

    def stage_cfg(*overrides):
        cfg = build_experiment("otavatar", OTAvatar.Config, defaults=OTAvatar.recipe,
                               preset="tiny", presets=OTAvatar.presets,
                               overrides=[f"train.run_dir={tmp_path}"])
        with pytest.raises(Stop):
            prepare_stages(OTAvatar, cfg, overrides=list(overrides), train_fn=train_fn)
        return seen[-1]

    own = build_experiment("eg3d", EG3D.Config, defaults=EG3D.recipe, preset="tiny",
                           presets=EG3D.presets)
    st = stage_cfg()
    assert st.model == "eg3d" and st.train.run_dir == str(tmp_path / "stages" / "eg3d")
    assert own.model_config.background == "white" and st.model_config.background == "data"
    assert (own.train.steps, st.train.steps) == (400, 1200)
    assert st.model_config.generator == own.model_config.generator      # same architecture
    assert stage_cfg("stages.eg3d.train.steps=7").train.steps == 7


RANK_SCRIPT = """
import os, sys
import torch
from safetensors.torch import save_file
from pyface.train.config import build_experiment
from pyface.train.engine import Trainer
from pyface.models.otavatar.model import OTAvatar

torch.set_num_threads(1)
out, overrides = sys.argv[1], sys.argv[2:]
tr = Trainer(build_experiment("otavatar", OTAvatar.Config, defaults=OTAvatar.presets["tiny"],
                              overrides=overrides))
tr.fit()
# model.local_batch is not set: each rank's latents have train.batch_size / ranks rows
assert tr.dist.world_size == 2 and tr.local_batch == 1 and tr.model.cfg.local_batch == 1
assert tr.model.latent.shape[0] == 1 and tr.cfg.model_config.local_batch == 1
state = {k: v.contiguous() for k, v in tr.model.state_dict().items()}
state.update({f"ema.{n}." + k: v.contiguous() for n, m in tr.ema.modules.items()
              for k, v in m.state_dict().items()})
save_file(state, os.path.join(out, f"rank{tr.dist.rank}.safetensors"))
tr.close()
"""


def test_two_ranks_match_one_process(data, generator_dir, tmp_path):
    """2 gloo ranks (one item each) train what one process does with the whole batch: the
    inversion's rank-local latents and intrinsics are each rank's rows of the one-process
    tensors; the controller, the generator and their EMAs agree on both ranks and with the
    one-process run. The renderer's uniforms and the density points are drawn per (step, item),
    so they do not depend on the split."""
    from safetensors.torch import load_file

    from pyface.testing import assert_close, run_torchrun

    script = tmp_path / "worker.py"
    script.write_text(RANK_SCRIPT)
    sets = QUIET + TINY + [f"data.path={data}", f"model.generator={generator_dir}",
                           "train.steps=2", "train.device=cpu", "model.center_motion=false"]
    run_torchrun(script, tmp_path, *sets, f"train.run_dir={tmp_path / 'two'}", timeout=240)
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    torch.manual_seed(0)
    one = Trainer(_exp(tmp_path / "one", data, generator_dir, "train.steps=2",
                       "train.device=cpu", "model.center_motion=false"))
    before = {k: v.clone() for k, v in one.model.state_dict().items()}
    one.fit()
    state = one.model.state_dict()
    state.update({f"ema.{n}." + k: v for n, m in one.ema.modules.items()
                  for k, v in m.state_dict().items()})
    for k, v in state.items():
        if k in ("latent", "intrinsics"):                 # rank-local rows
            got = torch.cat([r0[k], r1[k]])
        else:
            assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
            got = r0[k]
        if not v.is_floating_point():
            assert torch.equal(got, v), k
            continue
        # the mean of two half-batch gradients equals the whole batch's up to fp32 order
        assert_close(got, v, scale=50, msg=k)
    for part in ("controller.", "generator.", "latent", "intrinsics"):
        assert any(not torch.allclose(before[k], r0[k]) for k in before if k.startswith(part))


def test_center_motion_and_render_overrides(generator_dir):
    """``center_motion``: each item's offsets over its K frames sum to zero (only frame-to-frame
    differences act); ``model.render`` overrides the generator's renderer options and refuses
    plane_axes and unknown names."""
    from pyface.models.otavatar.model import OTAvatar, OTAvatarConfig

    def make(*extra):
        return OTAvatar(build_experiment("otavatar", OTAvatarConfig,
                                         defaults=OTAvatar.presets["tiny"],
                                         overrides=BY_HAND + [f"model.generator={generator_dir}",
                                                           *extra]).model_config)

    torch.manual_seed(0)
    m = make("model.center_motion=true", "model.controller.init_gain=1.0")
    motion = torch.randn(6, 70, 9)
    raw, cen = m.controller(motion), m._offsets(motion, 3)
    assert raw.abs().amax() > 1e-3
    assert cen.unflatten(0, (2, 3)).sum(1).abs().amax() < 1e-5
    assert torch.allclose(cen[1] - cen[0], raw[1] - raw[0], atol=1e-6)
    m.cfg.center_motion = False
    assert torch.equal(m._offsets(motion, 3), raw)                 # the reference: raw offsets
    r = make().generator.renderer.config                               # the tiny preset's
    assert (r.recompute, r.chunk_points) == ("decoder", 65536)
    assert make("model.render.recompute=false").generator.renderer.config.recompute is False
    with pytest.raises(ValueError, match="model.render.plane_axes"):
        make("model.render.plane_axes=xy_xz_zy")
    with pytest.raises(ValueError, match="model.render.nope"):
        make("model.render.nope=1")


def test_drive_pose_off_keeps_the_source_pose_rows(run, data):
    """``drive_pose=False``: the driving windows' angle and translation rows (64-69) are
    replaced by the source's, so a frame depends on the driving expression only (the pose acts
    through the camera); with the default the pose rows move the controller's offset."""
    import glob
    import os

    from pyface.data.driving import read_source

    pipe = pyface.models.load("otavatar", run[0], device="cpu")
    torch.manual_seed(0)
    for p in pipe.model.controller.parameters():            # a controller that reads every row
        p.data.normal_(0, 0.5)
    folder = os.path.dirname(sorted(glob.glob(f"{data}/**/coeffs.npy", recursive=True))[0])
    state = pipe.encode_source(read_source(folder, 16), pti_steps=0)
    src = state["motion"]                                   # (1, 70, 9)
    pose = src.expand(2, -1, -1).clone()
    pose[:, 64:] += torch.tensor([0.5, -0.5])[:, None, None]      # pose rows moved only
    exp = pose.clone()
    exp[:, :64] += 0.5
    go = lambda m: pipe.generate(state, {"motion": m}, camera="source")  # noqa: E731
    assert pipe.model.cfg.drive_pose
    assert (go(pose) - go(src.expand(2, -1, -1))).abs().amax() > 1e-4
    pipe.model.cfg.drive_pose = False
    assert torch.equal(go(pose), go(src.expand(2, -1, -1)))
    assert torch.equal(go(exp), go(torch.cat([exp[:, :64], src[:, 64:].expand(2, -1, -1)], 1)))
    assert (go(exp) - go(pose)).abs().amax() > 1e-4        # the expression still drives


def test_pti_stops_by_a_perceptual_metric(run, data):
    """With a metric (LPIPS in practice) pivotal tuning stops once it is <= pti_stop_metric,
    OTAvatar's rule; without one the SmoothL1 rule (here: every iteration) applies."""
    import glob
    import os

    from pyface.data.driving import read_source

    pipe = pyface.models.load("otavatar", run[0], device="cpu")
    pipe.model.cfg.pti_steps = 6
    folder = os.path.dirname(sorted(glob.glob(f"{data}/**/coeffs.npy", recursive=True))[0])
    src = read_source(folder, 16)
    seen = []

    def metric(pred, target):                   # 0.5, 0.5, then below OTAvatar's 0.06
        assert pred.shape == target.shape == (1, 3, 16, 16)
        seen.append(1)
        return torch.full((1,), 0.5 if len(seen) < 3 else 0.01)

    state = pipe.encode_source(src, pti_metric=metric)
    assert state["pti_rule"] == "metric" and state["pti_loss"] == pytest.approx([0.5, 0.5, 0.01])
    pipe.pti_metric = lambda p, t: torch.ones(1)          # never reached: every iteration
    assert len(pipe.encode_source(src)["pti_loss"]) == 6
    pipe.pti_metric = None
    state = pipe.encode_source(src)
    assert state["pti_rule"] == "smooth_l1" and len(state["pti_loss"]) == 6


def test_relative_outputs_cancel_an_error_every_frame_shares():
    """``controller_loss=relative``: the loss of the relative predictions sees each frame's error
    minus its item's mean error, so an image added to every frame's prediction of an item (the
    shared blur of a short inversion) leaves it unchanged, while the reconstruction loss moves;
    a difference between the frames (motion) still changes it."""
    from pyface.models.otavatar.losses import OTAvatarLoss
    from pyface.models.otavatar.model import item_mean, relative_outputs

    torch.manual_seed(0)
    B, K = 2, 3
    loss = OTAvatarLoss(w_identity=0.0)
    x = torch.rand(B * K, 3, 16, 16) * 2 - 1
    lm = torch.rand(B * K, 68, 2) * 8 + 4
    out = {"image_raw": torch.rand(B * K, 3, 8, 8), "image": torch.rand(B * K, 3, 16, 16)}

    def both(o):
        means = {k: item_mean(v, K) for k, v in o.items()}
        rel = loss(relative_outputs(o, means, item_mean(x, K)), x, lm, sr=True)[0]
        return float(rel), float(loss(o, x, lm, sr=True)[0])

    rel0, abs0 = both(out)
    shared = {k: v + torch.randn(B, 1, *v.shape[1:]).expand(-1, K, -1, -1, -1).flatten(0, 1)
              for k, v in out.items()}                     # one image per item, every frame
    rel1, abs1 = both(shared)
    assert abs(rel1 - rel0) < 1e-5 and abs(abs1 - abs0) > 0.1
    moved = {k: v.clone() for k, v in out.items()}
    moved["image"][1] += 0.5                               # one frame differs from the others
    assert abs(both(moved)[0] - rel0) > 1e-3
    means = {k: item_mean(v, K) for k, v in out.items()}
    r = relative_outputs(out, means, item_mean(x, K))
    assert torch.allclose(item_mean(r["image"], K), item_mean(x, K), atol=1e-6)
    with pytest.raises(ValueError, match="pred_mean"):
        relative_outputs(out, {"image_raw": means["image_raw"][:1], "image": means["image"]},
                         item_mean(x, K))


def test_relative_controller_loss_trains_and_checks_its_options(data, generator_dir, tmp_path):
    """One engine step with ``controller_loss=relative``: the controller and the generator are
    updated, the relative term is logged; bad values are refused."""
    from torch.utils.data import default_collate

    from pyface.models.otavatar.model import OTAvatar

    tr = Trainer(_exp(tmp_path / "r", data, generator_dir, "train.steps=1",
                      "model.controller_loss=relative"))
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    out = tr.train_step(default_collate([tr.dataset[0], tr.dataset[1]]))
    assert torch.isfinite(out["main/relative"]) and float(out["main/relative"]) > 0
    after = tr.model.state_dict()
    changed = {k.split(".")[0] for k, v in after.items() if not torch.equal(v, before[k])}
    assert {"controller", "generator", "latent", "intrinsics"} <= changed
    cfg = _exp(tmp_path / "s", data, generator_dir).model_config
    with pytest.raises(ValueError, match="model.controller_loss"):
        OTAvatar(dataclasses.replace(cfg, controller_loss="diff"))
    with pytest.raises(ValueError, match="model.invert_controller_iters"):
        OTAvatar(dataclasses.replace(cfg, controller_loss="relative", invert_controller_iters=0))


def test_motion_pose_off_zeroes_the_pose_rows_everywhere(generator_dir):
    """``motion_pose=false``: the controller's offset ignores the windows' angle and translation
    rows (64-69), in the model's controller and in a copy of it (the EMA, the pipeline); the
    expression rows still act. The default keeps the reference's pose input."""
    import copy

    from pyface.models.otavatar.model import OTAvatar, OTAvatarConfig

    def make(*extra):
        return OTAvatar(build_experiment("otavatar", OTAvatarConfig,
                                         defaults=OTAvatar.presets["tiny"],
                                         overrides=BY_HAND + [f"model.generator={generator_dir}",
                                                           "model.controller.init_gain=1.0",
                                                           *extra]).model_config)

    torch.manual_seed(0)
    m = torch.randn(3, 70, 9)
    pose = m.clone()
    pose[:, 64:] += torch.randn(3, 6, 9)
    expr = m.clone()
    expr[:, :64] += torch.randn(3, 64, 9)
    torch.manual_seed(1)
    off = make("model.motion_pose=false").controller
    for ctrl in (off, copy.deepcopy(off)):
        assert torch.equal(ctrl(pose), ctrl(m))
        assert (ctrl(expr) - ctrl(m)).abs().amax() > 1e-3
    torch.manual_seed(1)
    on = make().controller
    assert (on(pose) - on(m)).abs().amax() > 1e-3


def test_controller_mouth_weight_is_the_controllers_only(data, generator_dir, tmp_path):
    """``controller_w_mouth``: the controller's loss has its own mouth weight, the generator's
    keeps ``w_mouth``; a step with it updates both and differs from the default's controller."""
    from torch.utils.data import default_collate

    def step(*extra):
        torch.manual_seed(0)
        tr = Trainer(_exp(tmp_path / f"r{len(extra)}", data, generator_dir, "train.steps=1",
                          *extra))
        tr.train_step(default_collate([tr.dataset[0], tr.dataset[1]]))
        return tr.model

    m = step("model.controller_w_mouth=0.0", "model.w_mouth=10.0")
    assert (m.controller_loss.w_mouth, m.loss.w_mouth) == (0.0, 10.0)
    ref = step()
    assert ref.controller_loss is ref.loss
    assert not torch.equal(m.controller.out.weight, ref.controller.out.weight)


def test_inference_says_once_which_inversion_terms_lack_weights(run, data, tmp_path, caplog):
    """The inversion optimises the training loss, so unset vgg_weights / arcface_weights do
    change it: loading logs no training warning, the first inversion one line saying what runs
    without them and how to add them (PTI uses neither); given weights leave their term out."""
    import glob
    import logging
    import os

    from pyface.data.driving import read_source
    from pyface.models.otavatar.pipeline import OTAvatarPipeline
    from pyface.nn.arcface18 import ResNetArcFace

    r, _ = run
    caplog.set_level(logging.WARNING, logger="pyface")
    pipe = pyface.models.load("otavatar", r, device="cpu")
    assert not any("is not set" in m for m in caplog.messages), caplog.messages  # no training note
    folder = sorted(os.path.dirname(p) for p in glob.glob(f"{data}/**/coeffs.npy",
                                                          recursive=True))[0]
    src = read_source(folder, 16)
    pipe.encode_source(src, pti_steps=0, steps=0)             # no inversion: nothing to say
    assert caplog.messages == []
    for _ in range(2):
        pipe.encode_source(src, pti_steps=0, steps=1)
    assert caplog.messages == [
        "otavatar: the source inversion runs without the VGG19 perceptual term (an image-pyramid "
        "L1 replaces it; model.vgg_weights is not set) and without the ArcFace identity term "
        "(model.arcface_weights is not set): pass vgg=PATH (pyface convert vgg19) / "
        "arcface=PATH (ResNetArcFace-18 .pth) (pyface animate --weights NAME=PATH, or "
        "pyface.models.load(..., weights={NAME: PATH})) to use them (PTI uses neither)"]
    caplog.clear()
    torch.save(ResNetArcFace().state_dict(), tmp_path / "arc.pth")
    pipe = OTAvatarPipeline.from_checkpoint(r, device="cpu",
                                            arcface_weights=str(tmp_path / "arc.pth"))
    assert pipe.model.loss.missing_terms() == ["vgg"]
    pipe.encode_source(src, pti_steps=0, steps=1)
    assert len(caplog.messages) == 1 and "ArcFace" not in caplog.messages[0]
    assert caplog.messages[0].endswith("to use it (PTI uses neither)")
    # the same through pyface.models.load(weights=) and pyface animate --weights
    pipe = pyface.models.load("otavatar", r, device="cpu",
                              weights={"arcface": str(tmp_path / "arc.pth")})
    assert pipe.model.loss.missing_terms() == ["vgg"]
    with pytest.raises(ValueError, match=r"weights: expected names in \['arcface', 'vgg'\].*"
                                         r"\['lpips'\]"):
        pyface.models.load("otavatar", r, device="cpu", weights={"lpips": "x"})
    with pytest.raises(ValueError, match="'example''s pipeline uses no pretrained networks"):
        pyface.models.load("example", r, device="cpu", weights={"vgg": "x"})


def _folders(data):
    import glob
    import os

    return sorted(os.path.dirname(p) for p in glob.glob(f"{data}/**/coeffs.npy", recursive=True))


def test_animate_seed_gives_the_same_video_on_every_run(run, data, tmp_path):
    """The source inversion samples rays at random: `pyface animate` seeds torch (--seed,
    default 0), so the same command writes the same bytes and another seed other frames;
    Pipeline.animate(seed=) likewise, leaving the caller's random state as it was."""
    from pyface.cli import main
    from pyface.data.driving import read_driving, read_source

    r, _ = run
    folders = _folders(data)
    args = ["animate", "otavatar", "--checkpoint", r, "--source", folders[0], "--driving",
            folders[1], "--frames", "4", "--batch", "2", "--device", "cpu", "--no-progress"]
    videos = []
    for i, extra in enumerate(([], [], ["--seed", "0"], ["--seed", "7"])):
        out = tmp_path / f"a{i}.mp4"
        assert main(args + ["--out", str(out), *extra]) == 0
        videos.append(out.read_bytes())
    assert videos[0] == videos[1] == videos[2] and videos[3] != videos[0]
    pipe = pyface.models.load("otavatar", r, device="cpu")
    src, drv = read_source(folders[0], 16), read_driving(folders[1], 16, max_frames=4)
    state = torch.get_rng_state()
    a, b, c = (pipe.animate(src, drv, seed=s) for s in (0, 0, 7))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)           # the caller's random state
    with pytest.raises(ValueError, match=r"seed: expected an int >= 0 or None, got -1"):
        pipe.animate(src, drv, seed=-1)


def test_stream_orbit_is_one_orbit_over_the_stream(run, data, monkeypatch):
    """camera="orbit" under stream(): every frame's camera is its place on one orbit over all
    the streamed frames, so chunks of 3 and 8 give the same label per frame, the labels of
    `pyface animate --camera orbit`; default_motion's orbit turns once over its frames too."""
    import pyface.models.otavatar.model as ota_model
    from pyface.data.driving import read_driving, read_source
    from pyface.train.animate_cli import orbit_cameras

    r, _ = run
    pipe = pyface.models.load("otavatar", r, device="cpu")
    folders = _folders(data)
    drv = read_driving(folders[1], 16)
    T = drv["coeffs"].shape[0]
    assert T > 3
    state = pipe.encode_source(read_source(folders[0], 16), pti_steps=0)
    seen, apply = [], ota_model.apply_intrinsics

    def spy(cam, bias):                       # the labels generate renders, before intrinsics
        seen.append(cam.clone())
        return apply(cam, bias)

    monkeypatch.setattr(ota_model, "apply_intrinsics", spy)
    labels = {}
    for chunk in (3, 8):
        seen.clear()
        frames = torch.cat([f for _, f in pipe.stream(state, drv, chunk=chunk, camera="orbit")])
        assert frames.shape == (T, 3, 16, 16)
        labels[chunk] = torch.cat(seen)
    assert torch.equal(labels[3], labels[8])
    assert torch.equal(labels[3], orbit_cameras(pipe, T))
    seen.clear()
    list(pipe.stream(state, None, motion=pipe.default_motion(T), chunk=3))
    assert torch.equal(torch.cat(seen), orbit_cameras(pipe, T))
    seen.clear()                               # one generate call: one orbit over its frames
    pipe.generate(state, pipe.encode_driving(drv), camera="orbit")
    assert torch.equal(torch.cat(seen), orbit_cameras(pipe, T))


def test_inversion_and_pti_draw_the_ray_samples_before_each_render(generator_dir, monkeypatch):
    """The inversion and PTI pass every render its ray samples, drawn before the call from
    torch's generator (a renderer compiled by Inductor, which would draw others, renders the
    same samples): they are the numbers the renderer draws itself, so the latent, intrinsics,
    losses and tuned weights equal those of renders that draw their own, bit for bit."""
    import pyface.models.otavatar.pipeline as ota
    from pyface.models.otavatar.model import OTAvatar, OTAvatarConfig
    from pyface.nn.render import TriplaneRenderer

    cfg = build_experiment("otavatar", OTAvatarConfig, defaults=OTAvatar.presets["tiny"],
                           overrides=BY_HAND + [f"model.generator={generator_dir}"]
                           ).model_config
    m = OTAvatar(cfg).eval()
    torch.manual_seed(1)
    cam, motion = m.generator.camera(0.2, 0.0), torch.zeros(1, 70, 9)
    target = torch.rand(1, 3, 16, 16) * 2 - 1
    given, forward = [], TriplaneRenderer.forward

    def recording(self, *args, **kw):
        given.append((kw.get("stratified_noise"), kw.get("importance_u")))
        return forward(self, *args, **kw)

    monkeypatch.setattr(TriplaneRenderer, "forward", recording)

    def run():
        given.clear()
        torch.manual_seed(5)
        w, kb, losses = ota.invert(m, target, cam, motion, steps=3, sr_steps=1)
        G, pti = ota.pivotal_tuning(m, w, cam, target, steps=2, lr=1e-2)
        return [w, kb, torch.tensor(losses + pti)] + list(G.parameters()), list(given)

    drawn, calls = run()
    assert len(calls) == 5                      # 3 inversion steps, 2 PTI steps
    assert all(n is not None and n.shape == (1, 64, 4) and u.shape == (1, 64, 4)
               for n, u in calls)
    monkeypatch.setattr(ota, "drawn_samples", lambda G, like, sr=True: {})  # the renderer draws
    own, calls = run()
    assert len(calls) == 5 and all(n is None and u is None for n, u in calls)
    assert len(own) == len(drawn)
    assert all(torch.equal(a, b) for a, b in zip(own, drawn))
    assert any(not torch.equal(a, b)                          # PTI moved the copy
               for a, b in zip(own[3:], m.generator.parameters()))


def test_inversion_includes_the_density_regularisers(data, generator_dir, tmp_path):
    """The reference adds the monotonic and TV density terms of both frames to every training
    inversion iteration (with the EMA generator's planes): their weights move the inverted
    latent."""
    from torch.utils.data import default_collate

    latents = {}
    for on in ("true", "false"):          # tiny: false (refinement only)
        for w in ("0", "10"):
            torch.manual_seed(0)
            tr = Trainer(_exp(tmp_path / f"r{on}{w}", data, generator_dir, "train.steps=1",
                              f"model.w_tv={w}", f"model.w_monotonic={w}",
                              f"model.inversion_density={on}"))
            tr.train_step(default_collate([tr.dataset[0], tr.dataset[1]]))
            latents[on, w] = tr.model.latent.detach().clone()
    assert torch.isfinite(latents["true", "10"]).all()
    assert not torch.equal(latents["true", "0"], latents["true", "10"])
    assert torch.equal(latents["false", "0"], latents["false", "10"])


def _landmarks() -> torch.Tensor:
    lm = torch.full((1, 68, 2), 32.0)
    lm[0, 48:68, 0] = torch.linspace(20, 40, 20)      # mouth: x 20..40, y 44..48
    lm[0, 48:68, 1] = torch.linspace(44, 48, 20)
    lm[0, 36:42, 0] = torch.linspace(10, 16, 6)       # left eye: x 10..16, y 20..22
    lm[0, 36:42, 1] = torch.linspace(20, 22, 6)
    lm[0, 42:48, 0] = torch.linspace(48, 54, 6)       # right eye: x 48..54, y 20..22
    lm[0, 42:48, 1] = torch.linspace(20, 22, 6)
    return lm


def _roi(changed: tuple[slice, slice]) -> dict[str, torch.Tensor]:
    from pyface.models.otavatar.losses import OTAvatarLoss

    tgt = torch.zeros(1, 3, 64, 64)
    pred = tgt.clone()
    pred[0, :, changed[0], changed[1]] = 1.0
    return OTAvatarLoss(w_perceptual=0, w_identity=0).roi(pred, tgt, _landmarks())


def test_mouth_roi_is_the_landmark_box_with_its_padding():
    # at 64^2 the mouth box is x 19..41, y 43..49 (padding int(10/512 * 64) = 1)
    assert _roi((slice(44, 49), slice(19, 21)))["mouth"] > 0      # the mouth corners count
    assert _roi((slice(51, 55), slice(25, 35)))["mouth"] == 0      # the chin below does not


def test_eye_rois_have_the_reference_padding():
    # left eye box x 8..18, y 18..24 (padding int(20/512 * 64) = 2)
    assert _roi((slice(18, 20), slice(8, 10)))["eye_l"] > 0
    assert _roi((slice(26, 30), slice(10, 16)))["eye_l"] == 0


def test_sr_pass_keeps_the_raw_renders_mouth_term():
    from pyface.models.otavatar.losses import OTAvatarLoss

    torch.manual_seed(0)
    loss = OTAvatarLoss(w_perceptual=0, w_smooth_l1=0, w_eyes=0, w_identity=0)
    tgt = torch.rand(2, 3, 32, 32) * 2 - 1
    lm = torch.rand(2, 68, 2) * 16 + 8
    raw = torch.rand(2, 3, 16, 16) * 2 - 1            # wrong everywhere
    sr = tgt.clone()                                   # exact
    total, logs = loss({"image_raw": raw, "image": sr}, tgt, lm, sr=True)
    raw_only, _ = loss({"image_raw": raw}, tgt, lm, sr=False)
    assert raw_only > 0
    torch.testing.assert_close(total, raw_only)       # the SR mouth term is 0, the raw one counts
    torch.testing.assert_close(logs["mouth"], raw_only / 10)
    # raw_terms=False (tiny): the RoI terms on the pass's final image only
    final_only = OTAvatarLoss(w_perceptual=0, w_smooth_l1=0, w_eyes=0, w_identity=0,
                              raw_terms=False)
    assert final_only({"image_raw": raw, "image": sr}, tgt, lm, sr=True)[0] == 0
    torch.testing.assert_close(final_only({"image_raw": raw}, tgt, lm, sr=False)[0], raw_only)


def test_square_roi_boxes_are_the_earlier_boxes():
    """roi_box="square" (tiny): a 120/512 H square around the part's centre, int(10/512 H)
    padding, round(120/512 H) bins; the reference's landmark boxes otherwise; others refused."""
    import pytest

    from pyface.models.otavatar.losses import MOUTH, OTAvatarLoss, landmark_box
    from pyface.nn.roi import roi_align

    torch.manual_seed(0)
    pred, tgt = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    lm = _landmarks()
    box = torch.cat([torch.zeros(1, 1), landmark_box(lm, MOUTH, 120 / 512 * 64, 1)], 1)
    want = torch.nn.functional.l1_loss(roi_align(pred, box, 15), roi_align(tgt, box, 15))
    square = OTAvatarLoss(w_perceptual=0, w_identity=0, roi_box="square").roi(pred, tgt, lm)
    torch.testing.assert_close(square["mouth"], want)
    assert OTAvatarLoss(w_perceptual=0, w_identity=0).roi(pred, tgt, lm)["mouth"] != want
    with pytest.raises(ValueError, match="roi_box: expected one of"):
        OTAvatarLoss(w_perceptual=0, w_identity=0, roi_box="circle")


def test_runs_saved_before_the_loss_options_load_with_the_earlier_losses(run, tmp_path):
    """A checkpoint whose config has no roi_box / raw_terms / inversion_density (saved before
    those options) loads with the losses it was trained with, not the reference's defaults; a
    checkpoint that holds them keeps its values."""
    import json
    import shutil

    from pyface.models.otavatar.pipeline import OTAvatarPipeline

    old = tmp_path / "old"
    shutil.copytree(run[0], old)
    for meta_path in old.glob("checkpoints/*/meta.json"):
        meta = json.loads(meta_path.read_text())
        mc = meta["experiment"]["model_config"]
        assert mc["roi_box"] == "square"                      # tiny's, saved with the run
        for key in ("roi_box", "raw_terms", "inversion_density"):
            del mc[key]
        mc["w_mouth"] = 10.0
        meta_path.write_text(json.dumps(meta))
    cfg = OTAvatarPipeline.from_checkpoint(str(old), device="cpu").model.cfg
    assert (cfg.roi_box, cfg.raw_terms, cfg.inversion_density) == ("square", False, False)
    # the training engine (resume, stage reuse) reads a saved config the same way
    from pyface.models.otavatar.config import OTAvatarConfig
    from pyface.train.config import saved_config
    saved = saved_config(OTAvatarConfig, {"w_mouth": 10.0})
    assert (saved["roi_box"], saved["raw_terms"], saved["inversion_density"]) == \
        ("square", False, False)
    assert saved_config(OTAvatarConfig, {"roi_box": "landmarks"})["roi_box"] == "landmarks"
    for meta_path in old.glob("checkpoints/*/meta.json"):
        meta = json.loads(meta_path.read_text())
        meta["experiment"]["model_config"].update(roi_box="landmarks", raw_terms=True)
        meta_path.write_text(json.dumps(meta))
    loss = OTAvatarPipeline.from_checkpoint(str(old), device="cpu").model.loss
    assert (loss.roi_box, loss.raw_terms) == ("landmarks", True)



def test_inversion_frames_sum_is_k_times_the_frame_mean(data, generator_dir, tmp_path):
    """model.inversion_frames=sum (the reference adds each frame's inversion terms) optimises K
    times the mean over the item's K frames (mean, the default): the first inversion loss of
    the same batch, with the same draws, is exactly K times as large; a bad value is refused."""
    from torch.utils.data import default_collate

    first = {}
    for how in ("mean", "sum"):
        torch.manual_seed(0)
        tr = Trainer(_exp(tmp_path / how, data, generator_dir, "train.steps=1",
                          f"model.inversion_frames={how}"))
        assert tr.model.cfg.inversion_frames == how
        batch = default_collate([tr.dataset[0], tr.dataset[1]])
        K = batch["image"].shape[1]
        out = tr.train_step(batch)
        first[how] = out["main/invert_first"]
    assert K == 2 and float(first["mean"]) > 0
    torch.testing.assert_close(first["sum"], K * first["mean"], rtol=1e-6, atol=0)
    from pyface.models.otavatar.model import OTAvatar

    bad = _exp(tmp_path / "bad", data, generator_dir, "model.local_batch=2",
               "model.inversion_frames=median").model_config
    with pytest.raises(ValueError, match="model.inversion_frames: expected one of"):
        OTAvatar(bad)


def test_inversion_frames_presets_and_configs_without_the_key(run, tmp_path):
    """tiny keeps the frame mean, full / gpu-short / the recipe take the reference's sum; a
    config or a saved run without the key resolves to the mean (it trained with it)."""
    import shutil

    from pyface.models.otavatar.model import OTAvatar
    from pyface.models.otavatar.pipeline import OTAvatarPipeline
    from pyface.train.model import config_from_dict

    got = {name: build_experiment("otavatar", OTAvatar.Config, defaults=OTAvatar.recipe,
                                  preset=name, presets=OTAvatar.presets).model_config
           for name in ("tiny", "gpu-short", "full")}
    got["recipe"] = build_experiment("otavatar", OTAvatar.Config,
                                     defaults=OTAvatar.recipe).model_config
    assert {k: c.inversion_frames for k, c in got.items()} == {
        "tiny": "mean", "gpu-short": "sum", "full": "sum", "recipe": "sum"}
    assert config_from_dict(OTAvatar.Config, {"generator": "g"}).inversion_frames == "mean"
    old = tmp_path / "old"
    shutil.copytree(run[0], old)
    drop_saved_keys(old, ["inversion_frames"])
    cfg = OTAvatarPipeline.from_checkpoint(str(old), device="cpu").model.cfg
    assert cfg.inversion_frames == "mean"


def _inference_pipe(run, data):
    import glob
    import os

    from pyface.data.driving import read_source

    pipe = pyface.models.load("otavatar", run[0], device="cpu")
    folder = os.path.dirname(sorted(glob.glob(f"{data}/**/coeffs.npy", recursive=True))[0])
    return pipe, read_source(folder, 16)


def test_inference_option_clip_turns_the_inversions_gradient_clip_off(run, data, monkeypatch):
    """``clip=False`` (the reference's inference): no grad-norm clip of w in the W and W+
    passes; the default clips every iteration at ``invert_clip``."""
    import pyface.models.otavatar.pipeline as ota

    pipe, src = _inference_pipe(run, data)
    pipe.model.cfg.invert_clip = 1e-4                     # binds whatever the gradient
    seen, real = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, c, *a, **k: seen.append(c) or real(params, c, *a, **k))

    def encode(**kw):
        seen.clear()
        torch.manual_seed(0)
        return pipe.encode_source(src, space="w+", pti_steps=0, **kw), list(seen)

    (on, on_calls), (off, off_calls) = encode(), encode(clip=False)
    assert on["inference"]["clip"] and on_calls == [1e-4] * (3 + 2)
    assert not off["inference"]["clip"] and off_calls == []
    assert not torch.equal(on["w"], off["w"])
    assert ota.INFERENCE_PROFILES["reference"]["clip"] is False


def test_inference_option_clamp_keeps_the_rendered_ws_in_the_training_box(run, data,
                                                                          monkeypatch):
    """``clamp=True``: the inversion's and PTI's renders see ws within ``w_avg +- w_clamp``
    (a small box here, so it binds); the default renders them unclamped."""
    pipe, src = _inference_pipe(run, data)
    m = pipe.model
    m.cfg.w_clamp = 1e-3
    seen, G = [], type(m.generator)                     # PTI's copy is of the same class
    real = G.synthesis
    monkeypatch.setattr(G, "synthesis", lambda self, ws, *a, **k:
                        seen.append(ws.detach().clone()) or real(self, ws, *a, **k))

    def spread(**kw):
        seen.clear()
        torch.manual_seed(0)
        state = pipe.encode_source(src, **kw)
        assert len(seen) == 3 + 2                           # 3 inversion, 2 PTI renders
        return max(float((ws - m.w_avg).abs().amax()) for ws in seen), state

    free, state = spread()
    assert free > 1e-2 and not state["inference"]["clamp"]
    boxed, state = spread(clamp=True)
    assert boxed <= 1e-3 + 1e-6 and state["inference"]["clamp"]
    # the animation never clamps: the state keeps the unclamped w
    assert float((state["w"] - m.w_avg).abs().amax()) > 1e-3


def test_inference_option_wplus_keep_intrinsics_starts_wplus_at_the_w_bias(run, data,
                                                                          monkeypatch):
    """``wplus_keep_intrinsics=True``: the W+ pass starts from the W pass's intrinsics bias
    (the reference); the default restarts it at 0."""
    import pyface.models.otavatar.pipeline as ota

    pipe, src = _inference_pipe(run, data)
    calls, real = [], ota.invert

    def recording(*a, **k):
        out = real(*a, **k)
        calls.append((k.get("intrinsics_init"), out[1]))
        return out

    monkeypatch.setattr(ota, "invert", recording)

    def encode(**kw):
        calls.clear()
        torch.manual_seed(0)
        return pipe.encode_source(src, space="w+", pti_steps=0, **kw)

    restart = encode()
    assert len(calls) == 2 and calls[1][0] is None
    keep = encode(wplus_keep_intrinsics=True)
    assert len(calls) == 2 and torch.equal(calls[1][0], calls[0][1])
    assert calls[0][1].abs().amax() > 0                     # the W pass moved the bias
    assert not torch.equal(keep["intrinsics"], restart["intrinsics"])
    # invert itself: zero iterations from a given bias return it
    m, kb0 = pipe.model, torch.full((1, 18), 0.25)
    cam = src["camera"][None].float()
    _, kb, _ = real(m, src["image"][None].float() / 127.5 - 1, cam,
                    torch.zeros(1, 70, 9), steps=0, intrinsics_init=kb0)
    assert torch.equal(kb, kb0)


def test_inference_option_pti_mode_reference(run, data, monkeypatch):
    """``pti_mode="reference"``: PTI fits the raw render alone (no super-resolution pass, so
    the super-resolution weights stay), the metric sees the raw render nearest-upsampled to
    the target's size, and the rule is checked after the update (one update more than
    pyface's, which stops before it)."""
    pipe, src = _inference_pipe(run, data)
    G0 = pipe.model.generator
    shapes = []

    def met_at_once(pred, target):
        shapes.append(pred)
        return torch.full((1,), 0.01)

    def changed(state, part):
        return any(not torch.equal(a, b) for a, b in
                   zip(getattr(state["generator"], part).parameters(),
                       getattr(G0, part).parameters()))

    torch.manual_seed(0)
    py = pipe.encode_source(src, pti_metric=met_at_once)
    # pyface stops before the update
    assert py["pti_loss"] == pytest.approx([0.01]) and not changed(py, "decoder")
    torch.manual_seed(0)
    ref = pipe.encode_source(src, pti_metric=met_at_once, pti_mode="reference")
    assert ref["pti_loss"] == pytest.approx([0.01]) and changed(ref, "decoder")  # one update
    up = shapes[-1]
    assert up.shape == (1, 3, 16, 16)                  # the 8^2 raw render, nearest-upsampled
    assert torch.equal(up, up[..., ::2, ::2].repeat_interleave(2, -2).repeat_interleave(2, -1))
    # without a metric: every iteration; the raw render alone trains, not the SR network
    torch.manual_seed(0)
    ref = pipe.encode_source(src, pti_mode="reference")
    assert len(ref["pti_loss"]) == 2 and ref["inference"]["pti_mode"] == "reference"
    assert changed(ref, "decoder") and not changed(ref, "superresolution")
    torch.manual_seed(0)
    py = pipe.encode_source(src)
    assert changed(py, "superresolution")


def test_inference_profiles_and_bad_options(run, data, generator_dir):
    """``profile="reference"`` (or ``model.inference: reference``) sets the four options to
    the reference's; an option given explicitly wins; bad values name the option."""
    from pyface.models.otavatar.model import OTAvatar, OTAvatarConfig
    from pyface.models.otavatar.pipeline import INFERENCE_PROFILES

    pipe, src = _inference_pipe(run, data)
    cfg = pipe.model.cfg
    assert cfg.inference == "pyface"
    def enc(**kw):
        return pipe.encode_source(src, steps=1, pti_steps=0, **kw)["inference"]

    assert enc() == INFERENCE_PROFILES["pyface"] == {
        "clip": True, "clamp": False, "wplus_keep_intrinsics": False, "pti_mode": "pyface"}
    assert enc(profile="reference") == {"clip": False, "clamp": True,
                                        "wplus_keep_intrinsics": True, "pti_mode": "reference"}
    assert enc(profile="reference", clip=True)["clip"] is True
    cfg.inference = "reference"
    assert enc() == INFERENCE_PROFILES["reference"]
    cfg.inference_clamp = False                          # a config field over its profile
    assert enc()["clamp"] is False and enc(profile="reference")["clamp"] is True
    cfg.inference, cfg.inference_clamp = "pyface", None
    for kw, msg in (({"profile": "ref"}, r"profile: expected one of \('pyface', 'reference'\), "
                                         r"got 'ref'"),
                    ({"clip": "no"}, r"clip: expected true or false, got 'no'"),
                    ({"clamp": 1}, r"clamp: expected true or false, got 1"),
                    ({"wplus_keep_intrinsics": "yes"},
                     r"wplus_keep_intrinsics: expected true or false, got 'yes'"),
                    ({"pti_mode": "raw"}, r"pti_mode: expected one of \('pyface', "
                                          r"'reference'\), got 'raw'")):
        with pytest.raises(ValueError, match=msg):
            enc(**kw)
    for key, value, msg in (("inference", "ref", r"model\.inference: expected one of"),
                            ("pti_mode", "raw", r"model\.pti_mode: expected one of"),
                            ("inference_clip", "off", r"model\.inference_clip: expected "
                                                      r"true or false, got 'off'")):
        c = build_experiment("otavatar", OTAvatarConfig, defaults=OTAvatar.presets["tiny"],
                             overrides=BY_HAND + [f"model.generator={generator_dir}"]
                             ).model_config
        setattr(c, key, value)
        with pytest.raises(ValueError, match=msg):
            OTAvatar(c)


def test_inversion_density_decoder_trained_reads_the_trained_generators_decoder(
        data, generator_dir, tmp_path, monkeypatch):
    """model.inversion_density_decoder=trained (the reference's regulariser reads the trained
    generator) evaluates the inversion's density terms through the trained generator's decoder,
    on the planes the EMA generator rendered; ema (the default) through the EMA generator's.
    With a decoder that differs between the two (the trained one scaled here) the first
    inversion loss changes under trained only; with equal decoders (the first step) the two
    are identical. A bad value is refused naming the key."""
    from torch.utils.data import default_collate

    from pyface.models.otavatar.model import OTAvatar

    real = OTAvatar._inversion_density
    seen = []

    def spy(self, ctx, G, planes, *a):
        value = real(self, ctx, G, planes, *a)
        seen.append((G, planes.detach().clone(), value.detach()))
        return value

    monkeypatch.setattr(OTAvatar, "_inversion_density", spy)
    first, planes, density = {}, {}, {}
    for how in ("ema", "trained"):
        for scaled in (False, True):
            torch.manual_seed(0)
            tr = Trainer(_exp(tmp_path / f"{how}{scaled}", data, generator_dir, "train.steps=1",
                              "model.inversion_density=true",
                              f"model.inversion_density_decoder={how}"))
            assert tr.model.cfg.inversion_density_decoder == how
            if scaled:          # the trained decoder no longer equals the EMA copy's
                with torch.no_grad():
                    for p in tr.model.generator.decoder.parameters():
                        p.mul_(1.5)
            seen.clear()
            out = tr.train_step(default_collate([tr.dataset[0], tr.dataset[1]]))
            want = tr.model.generator if how == "trained" else tr.ema_module("generator")
            assert len(seen) == 3 and all(G is want for G, _, _ in seen)    # 3 iterations
            first[how, scaled] = out["main/invert_first"]
            planes[how, scaled], density[how, scaled] = seen[0][1:]
    assert float(density["ema", False]) > 0
    assert torch.equal(first["ema", True], first["ema", False])
    assert torch.equal(density["ema", True], density["ema", False])
    assert torch.equal(first["trained", False], first["ema", False])
    assert torch.equal(density["trained", False], density["ema", False])
    # the first inversion loss moves by the density term's change only (here 5.5e-4 ->
    # 1.3e-3 in a loss of about 21, whose float32 rounding is 2e-6 per sum)
    d = density["trained", True] - density["ema", True]
    assert abs(float(d)) > 0.05 * float(density["ema", True])
    torch.testing.assert_close(first["trained", True] - first["ema", True], d, rtol=0,
                               atol=4e-6)
    # the planes are the EMA generator's render, whichever decoder reads them
    assert torch.equal(planes["trained", True], planes["ema", True])
    bad = _exp(tmp_path / "bad", data, generator_dir, "model.local_batch=2",
               "model.inversion_density_decoder=live").model_config
    with pytest.raises(ValueError, match=r"model\.inversion_density_decoder: expected one of "
                                         r"\('ema', 'trained'\), got 'live'"):
        OTAvatar(bad)


def _controller_lrs(tr, batch) -> tuple[list[float], dict]:
    """The controller optimizer's rates at each of its steps in one training step of batch, and
    the step's logs."""
    opt = tr.optimizers["controller"]
    real, seen = opt.step, []
    opt.step = lambda *a, **k: seen.append(opt.param_groups[0]["lr"]) or real(*a, **k)
    try:
        out = tr.train_step(batch)
    finally:
        del opt.step
    return seen, out


def test_inversion_controller_lr_reference_rule_in_the_inversion_only(data, generator_dir,
                                                                     tmp_path):
    """model.inversion_controller_lr=reference steps the controller at controller_lr x 100 /
    invert_iters in the inversion's controller iterations and at controller_lr in the
    refinement (the reference's rule); fixed (the default) at controller_lr in every update.
    The optimizer's rate is restored after each scaled update, so a checkpoint holds
    controller_lr and a run split by a resume ends with the uninterrupted run's weights. A bad
    value is refused naming the key."""
    from torch.utils.data import default_collate

    from pyface.models.otavatar.model import OTAvatar

    lrs, ctrl = {}, {}
    for how in ("fixed", "reference"):
        torch.manual_seed(0)
        tr = Trainer(_exp(tmp_path / how, data, generator_dir, "train.steps=1",
                          f"model.inversion_controller_lr={how}"))
        cfg = tr.model.cfg
        assert (cfg.inversion_controller_lr, cfg.invert_iters, cfg.invert_controller_iters,
                cfg.controller_lr) == (how, 3, 1, 1e-3)
        lrs[how], _ = _controller_lrs(tr, default_collate([tr.dataset[0], tr.dataset[1]]))
        opt = tr.optimizers["controller"]
        assert opt.param_groups[0]["lr"] == 1e-3
        assert opt.state_dict()["param_groups"][0]["lr"] == 1e-3
        ctrl[how] = {k: v.clone() for k, v in tr.model.controller.state_dict().items()}
    # 1 controller iteration of the inversion, then the refinement's 2 frames
    assert lrs["fixed"] == [1e-3] * 3
    assert lrs["reference"] == pytest.approx([1e-3 * 100 / 3, 1e-3, 1e-3], rel=1e-12)
    assert any(not torch.equal(v, ctrl["reference"][k]) for k, v in ctrl["fixed"].items())
    # exact resume under the rule: 2 steps == 1 step, checkpoint, resume, 1 step
    opts = ["model.inversion_controller_lr=reference"]
    torch.manual_seed(0)
    a = Trainer(_exp(tmp_path / "a", data, generator_dir, "train.steps=2", *opts))
    a.fit()
    torch.manual_seed(0)
    Trainer(_exp(tmp_path / "b", data, generator_dir, "train.steps=1", "train.ckpt_every=1",
                 *opts)).fit()
    meta = ckpt.read_meta(ckpt.latest_checkpoint(str(tmp_path / "b")))
    assert meta["experiment"]["model_config"]["inversion_controller_lr"] == "reference"
    c = Trainer(_exp(tmp_path / "b", data, generator_dir, "train.steps=2", *opts))
    c.resume("auto")
    assert c.optimizers["controller"].param_groups[0]["lr"] == 1e-3
    c.fit()
    sa, sc = a.model.state_dict(), c.model.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    bad = _exp(tmp_path / "bad", data, generator_dir, "model.local_batch=2",
               "model.inversion_controller_lr=scaled").model_config
    with pytest.raises(ValueError, match=r"model\.inversion_controller_lr: expected one of "
                                         r"\('fixed', 'reference'\), got 'scaled'"):
        OTAvatar(bad)


def test_inversion_controller_lr_reference_without_an_inversion(data, generator_dir, tmp_path):
    """model.invert_iters=0 (no training inversion: the refinement from w_avg) under the
    reference's rate rule steps the controller at controller_lr in the refinement (the rule has
    no inversion iterations to scale), as under fixed, instead of dividing by zero."""
    import math

    from torch.utils.data import default_collate

    lrs = {}
    for how in ("fixed", "reference"):
        torch.manual_seed(0)
        tr = Trainer(_exp(tmp_path / how, data, generator_dir, "train.steps=1",
                          "model.invert_iters=0", "model.invert_controller_iters=0",
                          f"model.inversion_controller_lr={how}"))
        lrs[how], out = _controller_lrs(tr, default_collate([tr.dataset[0], tr.dataset[1]]))
        assert all(math.isfinite(float(v)) for v in out.values())
    assert lrs["fixed"] == lrs["reference"] == [1e-3, 1e-3]


def test_inversion_reference_options_presets_saved_runs_and_resume(run, data, generator_dir,
                                                                   tmp_path):
    """tiny keeps the EMA decoder and the fixed controller rate; full / gpu-short / the recipe
    take the reference's (the trained decoder, the rate rule). A config or a saved run without
    the keys resolves to the earlier behaviour (it trained with it); a resume that changes
    either key is refused naming it, and one that keeps the earlier values resumes."""
    import shutil

    from pyface.models.otavatar.model import OTAvatar
    from pyface.models.otavatar.pipeline import OTAvatarPipeline
    from pyface.train.config import saved_config
    from pyface.train.model import config_from_dict

    keys = ("inversion_density_decoder", "inversion_controller_lr")
    got = {name: build_experiment("otavatar", OTAvatar.Config, defaults=OTAvatar.recipe,
                                  preset=name, presets=OTAvatar.presets).model_config
           for name in ("tiny", "gpu-short", "full")}
    got["recipe"] = build_experiment("otavatar", OTAvatar.Config,
                                     defaults=OTAvatar.recipe).model_config
    assert {k: tuple(getattr(c, f) for f in keys) for k, c in got.items()} == {
        "tiny": ("ema", "fixed"), "gpu-short": ("trained", "reference"),
        "full": ("trained", "reference"), "recipe": ("trained", "reference")}
    old_values = {"inversion_density_decoder": "ema", "inversion_controller_lr": "fixed"}
    assert {f: getattr(config_from_dict(OTAvatar.Config, {"generator": "g"}), f)
            for f in keys} == old_values
    assert {f: saved_config(OTAvatar.Config, {"generator": "g"}).get(f, getattr(
        OTAvatar.Config, f)) for f in keys} == old_values
    old = tmp_path / "old"
    shutil.copytree(run[0], old)
    drop_saved_keys(old, keys)
    cfg = OTAvatarPipeline.from_checkpoint(str(old), device="cpu").model.cfg
    assert {f: getattr(cfg, f) for f in keys} == old_values
    for key, value, before in (("inversion_controller_lr", "reference", "fixed"),
                               ("inversion_density_decoder", "trained", "ema")):
        for folder in (run[0], old):         # a saved key, and a key the run lacks
            with pytest.raises(ckpt.CheckpointError,
                               match=rf"model\.{key}: checkpoint '{before}' vs run '{value}'"):
                Trainer(_exp(folder, data, generator_dir, "train.steps=3",
                             f"model.{key}={value}")).resume("auto")
    resumed = Trainer(_exp(old, data, generator_dir, "train.steps=3"))
    resumed.resume("auto")
    assert resumed.step == 2
