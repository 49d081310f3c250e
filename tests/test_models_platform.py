"""The model platform: presets, stages, load_pretrained, pipelines, pyface.models, plugins
(entry points and --import), driving input and ``pyface animate``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import dataclasses
import textwrap
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

import pyface.models
from pyface import checkpoint as ckpt
from pyface.cli import main
from pyface.data import format as fmt
from pyface.data.driving import (count_driving, iter_driving, read_driving, read_source,
                                 video_fps)
from pyface.face.cameras import camera_yaw_pitch, orbit_labels
from pyface.train import registry
from pyface.train.config import ConfigError, build_experiment
from pyface.train.example import ExamplePipeline, TriplaneAEConfig, TriplaneAutoencoder
from pyface.train.model import (ModelDefinitionError, Pipeline, Stage, StepContext,
                                TrainableModel, check_model_class, config_from_dict,
                                load_pretrained, option_path, read_pretrained, with_options)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.resolution=16", "model.plane_resolution=8", "model.plane_channels=4",
        "model.encoder_channels=8", "model.hidden=8", "model.depth_samples=4",
        "data.resolution=16", "data.size=16", "train.batch_size=4", "train.progress=false",
        "train.tensorboard=false", "train.image_every=0", "train.log_every=1"]
QUIET = ["train.progress=false", "train.tensorboard=false", "train.image_every=0",
         "train.log_every=1"]


def sets(items):
    return sum((["--set", s] for s in items), [])


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """A 3-step example run with an EMA that differs from the live weights."""
    run = tmp_path_factory.mktemp("example") / "run"
    assert main(["train", "example", *sets(TINY), "--set", f"train.run_dir={run}",
                 "--set", "train.steps=3", "--set", "train.ema.decay=0.5"]) == 0
    return run


def write_video_folder(root, name="vid", T=3, size=20, seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (T, size, size, 3), dtype=np.uint8)
    labels = orbit_labels(T, kind="yaw").numpy()
    lms = rng.uniform(0, size, (T, 68, 2)).astype(np.float32)
    masks = rng.integers(0, 2, (T, size, size)).astype(bool)
    fmt.write_video(str(root), name, frames, rng.normal(size=(T, 257)).astype(np.float32), labels,
                    identity="id0", fps=10.0, masks=masks, landmarks=lms)
    return os.path.join(str(root), name), frames, labels, lms, masks


# ------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------

def test_presets_compose_between_recipe_and_config(tmp_path):
    M = TriplaneAutoencoder
    presets = {"small": {"model": {"hidden": 12, "lr": 0.5},
                         "train": {"steps": 7, "batch_size": 2}}}
    y = tmp_path / "c.yaml"
    y.write_text("model: {lr: 0.25}\ntrain: {batch_size: 3}\n")
    cfg = build_experiment("example", M.Config, defaults=M.recipe, preset="small",
                           presets=presets, yaml_path=str(y), overrides=["train.batch_size=5"])
    assert cfg.model_config.hidden == 12           # preset over the dataclass default
    assert cfg.train.steps == 7                     # preset over the recipe's 600
    assert cfg.model_config.lr == 0.25              # YAML over preset
    assert cfg.train.batch_size == 5                # --set over YAML
    assert cfg.data.resolution == 32                # recipe, untouched by the preset
    assert cfg.preset == "small"
    # the registered model's presets by default
    cfg = build_experiment("example", M.Config, defaults=M.recipe, preset="tiny")
    assert cfg.train.steps == M.presets["tiny"]["train"]["steps"]
    with pytest.raises(ConfigError, match=r"--preset 'huge': model 'example' has no such "
                                          r"preset; valid presets: tiny"):
        build_experiment("example", M.Config, preset="huge")
    with pytest.raises(ConfigError, match=r"preset 'bad' of 'example': unknown section opt"):
        build_experiment("example", M.Config, preset="bad", presets={"bad": {"opt": {}}})


def test_cli_preset(tmp_path, capsys):
    assert main(["train", "example", "--preset", "tiny", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "preset: tiny" in out and "steps: 300" in out and "plane_channels: 8" in out
    assert main(["train", "example", "--preset", "nope", "--print-config"]) == 2
    assert "valid presets: tiny" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# load_pretrained
# ------------------------------------------------------------------------------------------

def test_load_pretrained_run_checkpoint_weights_and_ema(example_run, tmp_path):
    latest = ckpt.latest_checkpoint(str(example_run))
    tensors, meta = ckpt.load_folder(latest)
    cfg, state = load_pretrained(str(example_run))                # run folder -> latest
    cfg2, state2 = load_pretrained(latest)                         # the checkpoint itself
    assert cfg == cfg2 == meta["experiment"]["model_config"] and cfg["plane_channels"] == 4
    assert sorted(state) == sorted(TriplaneAutoencoder(config_from_dict(
        TriplaneAutoencoder.Config, cfg)).state_dict())
    for k in state:
        assert torch.equal(state[k], state2[k])
        assert torch.equal(state[k], tensors[f"ema.{k}"])         # encoder/decoder have EMAs
    _, live = load_pretrained(str(example_run), ema=False)
    for k in live:
        assert torch.equal(live[k], tensors[f"model.{k}"])
    assert any(not torch.equal(live[k], state[k]) for k in live)   # decay 0.5: EMA != live
    assert read_pretrained(str(example_run)).model == "example"
    # a converter's weights folder
    w = ckpt.save_weights(str(tmp_path / "w"), live, kind="example", config=cfg)
    cfg3, state3 = load_pretrained(w)
    assert cfg3 == cfg and all(torch.equal(state3[k], live[k]) for k in live)
    pipe = pyface.models.load("example", w, device="cpu")      # a converter's output loads too
    assert all(torch.equal(v, live[k]) for k, v in pipe.model.state_dict().items())
    other = ckpt.save_weights(str(tmp_path / "w2"), live, kind="vgg19", config=cfg)
    with pytest.raises(ValueError, match=r"holds 'vgg19' weights \(kind 'vgg19', not a model\), "
                                         r"not 'example': expected a run folder or training "
                                         r"checkpoint of 'example' \(pyface train example\)$"):
        pyface.models.load("example", other)
    with pytest.raises(ckpt.CheckpointError, match=r"does not exist"):
        load_pretrained(str(tmp_path / "missing"))
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ckpt.CheckpointError, match=r"holds no complete checkpoint"):
        load_pretrained(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------
# pipelines
# ------------------------------------------------------------------------------------------

def test_models_load_and_example_pipeline(example_run):
    assert "example" in pyface.models.names()
    pipe = pyface.models.load("example", str(example_run), device="cpu")
    assert isinstance(pipe, ExamplePipeline) and pipe.resolution == 16
    assert pipe.device == torch.device("cpu") and not pipe.model.training
    _, ema_state = load_pretrained(str(example_run))
    for k, v in pipe.model.state_dict().items():
        assert torch.equal(v, ema_state[k])                           # EMA weights by default
    g = torch.Generator().manual_seed(0)
    big = torch.rand(3, 32, 32, generator=g) * 2 - 1                  # resized by the pipeline
    labels = orbit_labels(5, kind="yaw")                               # yaw -30 .. +30 deg
    source = {"image": big, "camera": labels[2]}                       # frontal
    model = pipe.model
    small = torch.nn.functional.interpolate(big[None], size=(16, 16), mode="bilinear",
                                            antialias=True, align_corners=False)
    with torch.no_grad():
        planes = model.encode(small)
        want_rec = model.render(planes, torch.zeros(1))
        yaw = camera_yaw_pitch(labels[:, :16].view(-1, 4, 4))[0]
        want = model.render(planes.expand(5, -1, -1, -1, -1), yaw)
    rec = pipe.reconstruct(source)
    assert rec.shape == (1, 3, 16, 16) and rec.abs().max() <= 1
    torch.testing.assert_close(rec, want_rec)
    driving = {"image": torch.zeros(5, 3, 16, 16), "camera": labels}
    out = pipe.animate(source, driving)
    assert out.shape == (5, 3, 16, 16)
    torch.testing.assert_close(out, want)
    assert yaw[0] < -0.5 and yaw[4] > 0.5                             # real head turns
    assert not torch.allclose(out[0], out[2], atol=1e-3)
    # the same source seen from the side: yaw is relative to the source's camera
    side = pipe.animate({"image": big, "camera": labels[0]}, driving)
    torch.testing.assert_close(side[0], want_rec[0])
    # cache the source once, stream driving frames in chunks
    state = pipe.encode_source(source)
    chunks = list(pipe.stream(state, driving, chunk=2))
    assert [t for t, _ in chunks] == [0, 2, 4]
    torch.testing.assert_close(torch.cat([c for _, c in chunks]), out)
    with pytest.raises(ValueError, match=r"chunk: expected an int >= 1, got 0"):
        next(pipe.stream(state, driving, chunk=0))
    orbit = pipe.default_motion(6)
    frames = torch.cat([c for _, c in pipe.stream(state, None, motion=orbit, chunk=4)])
    assert frames.shape == (6, 3, 16, 16)
    torch.testing.assert_close(frames[0], want_rec[0])                # orbit starts frontal
    # no_ema gives the live weights
    live = pyface.models.load("example", str(example_run), device="cpu", ema=False)
    _, live_state = load_pretrained(str(example_run), ema=False)
    assert all(torch.equal(v, live_state[k]) for k, v in live.model.state_dict().items())


def test_pipeline_input_checks(example_run):
    pipe = pyface.models.load("example", str(example_run), device="cpu")
    with pytest.raises(ValueError, match=r"source\['image'\]: expected shape \(3, H, W\), got "
                                         r"\(16, 16\)"):
        pipe.reconstruct({"image": torch.zeros(16, 16)})
    with pytest.raises(ValueError, match=r"source\['camera'\]: expected shape \(25\), got \(16,\)"):
        pipe.encode_source({"image": torch.zeros(3, 16, 16), "camera": torch.zeros(16)})
    with pytest.raises(ValueError, match=r"driving\['camera'\]: expected shape \(T, 25\) with "
                                         r"T=4, got \(3, 25\)"):
        pipe.encode_driving({"image": torch.zeros(4, 3, 8, 8), "camera": torch.zeros(3, 25)})
    with pytest.raises(ValueError, match=r"source: expected a dict with an 'image'"):
        pipe.encode_source(torch.zeros(3, 16, 16))
    # uint8 images, landmarks rescaled with the image
    p = pipe.prepare({"image": torch.full((2, 3, 32, 32), 255, dtype=torch.uint8),
                      "landmarks": torch.full((2, 68, 2), 8.0)}, batched=True)
    assert torch.allclose(p["image"], torch.ones(2, 3, 16, 16))
    assert torch.allclose(p["landmarks"], torch.full((2, 68, 2), 4.0))


def test_pipeline_pixel_checks(example_run):
    """Images other than float in [-1, 1] or uint8 (and masks other than float in [0, 1] or
    uint8) are errors naming the key, the expected range or dtype and the actual one; a numpy
    array is checked like a tensor."""
    import numpy as np

    pipe = pyface.models.load("example", str(example_run), device="cpu")
    img = torch.rand(3, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match=r"source\['image'\]: expected float values in \[-1, 1\], "
                                         r"got \[0, 255\] \(0\.\.255 pixels"):
        pipe.encode_source({"image": (img > 0).float() * 255})
    with pytest.raises(ValueError, match=r"driving\['image'\]: expected float in \[-1, 1\] or "
                                         r"uint8 \(0\.\.255\), got dtype int64"):
        pipe.encode_driving({"image": torch.zeros(2, 3, 16, 16, dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"source\['image'\]: expected finite values"):
        pipe.encode_source({"image": img * float("nan")})
    with pytest.raises(ValueError, match=r"source\['mask'\]: expected float values in \[0, 1\], "
                                         r"got \[-1, 1\]"):
        pipe.encode_source({"image": img, "mask": torch.tensor([-1.0, 1.0]).repeat(8)
                            .reshape(1, 4, 4)})
    with pytest.raises(ValueError, match=r"source\['image'\]: expected float values in \[-1, 1\], "
                                         r"got \[-0\.\d+, 2\.5\]"):
        pipe.encode_source({"image": torch.cat([img[:2], torch.full((1, 16, 16), 2.5)])})
    # within range, numpy arrays; a caller's own bicubic resize of a hard-edged image overshoots
    # [-1, 1] and is accepted
    ok = pipe.prepare({"image": (img * 1.005).numpy(), "mask": np.ones((1, 16, 16),
                                                                        np.float32)},
                      batched=False)
    assert isinstance(ok["image"], torch.Tensor) and torch.allclose(ok["image"], img * 1.005)
    edges = torch.nn.functional.interpolate((img > 0).float()[None] * 2 - 1, scale_factor=2,
                                            mode="bicubic")[0]
    assert edges.abs().max() > 1.2
    pipe.encode_source({"image": edges})
    with pytest.raises(ValueError, match=r"source\['image'\]: expected shape \(3, H, W\), got "
                                         r"\(16, 16, 3\)"):
        pipe.encode_source({"image": np.zeros((16, 16, 3), np.uint8)})


def test_models_load_errors(example_run, monkeypatch):
    with pytest.raises(KeyError, match=r"unknown model 'nope'; registered: .*example"):
        pyface.models.load("nope", str(example_run))
    # a CUDA device that is not there (no CUDA at all, or an index past the last) names itself
    n = torch.cuda.device_count()
    missing = f"cuda:{n}"
    with pytest.raises(ValueError, match=rf"device: got '{missing}', but this machine has "
                                         rf"{n} CUDA device{'' if n == 1 else 's'} visible"):
        pyface.models.load("example", str(example_run), device=missing)
    monkeypatch.setitem(registry.MODELS, "toy_stage1", f"{__name__}:Stage1Toy")
    with pytest.raises(ValueError, match=r"model 'toy_stage1' has no inference pipeline"):
        pyface.models.load("toy_stage1", str(example_run))
    monkeypatch.setitem(registry.MODELS, "example2", "pyface.train.example:TriplaneAutoencoder")
    with pytest.raises(ValueError, match=r"holds model 'example' \(a training checkpoint of step "
                                         r"\d+\), not 'example2'"):
        pyface.models.load("example2", str(example_run))


def test_load_options_replace_the_saved_inference_options_only(example_run, monkeypatch):
    """``load(..., options=...)`` sets a declared inference option (with or without ``model.``)
    on the config the model is built from; any other key is refused naming it and listing the
    declared ones, a bad value names ``model.KEY``; the checkpoint's value stays otherwise."""
    saved = pyface.models.load("example", str(example_run), device="cpu").model.cfg
    assert saved.depth_samples == 4
    # the example model declares none: every key is refused
    with pytest.raises(ValueError, match=r"options: 'depth_samples' is not an inference option "
                                         r"of model 'example' .*valid: none"):
        pyface.models.load("example", str(example_run), options={"depth_samples": 2})
    monkeypatch.setattr(TriplaneAutoencoder, "inference_options", ("depth_samples", "hidden"))
    for key in ("depth_samples", "model.depth_samples"):
        pipe = pyface.models.load("example", str(example_run), device="cpu", options={key: 2})
        assert pipe.model.cfg.depth_samples == 2
        assert pipe.model.cfg.plane_channels == saved.plane_channels      # the rest: saved
    assert pyface.models.inference_options("example") == ("depth_samples", "hidden")
    with pytest.raises(ValueError, match=r"options: 'model.plane_channels' is not an inference "
                                         r"option of model 'example' .*valid: "
                                         r"model.depth_samples, model.hidden$"):
        pyface.models.load("example", str(example_run), options={"model.plane_channels": 8})
    with pytest.raises(ValueError, match=r"model.depth_samples: expected int, got 'many'"):
        pyface.models.load("example", str(example_run), options={"depth_samples": "many"})
    with pytest.raises(ValueError, match=r"model.depth_samples given twice"):
        pyface.models.check_options("example", {"depth_samples": 2, "model.depth_samples": 3})
    with pytest.raises(TypeError, match=r"options: expected a dict"):
        pyface.models.load("example", str(example_run), options=["depth_samples=2"])


def test_check_option_values_sees_the_options_with_the_saved_config_before_the_build(
        example_run, monkeypatch):
    """The generic load calls the model class's ``check_option_values(cfg, options)`` with the
    complete config (options in) and the options alone, before the model is built, only when
    options are given; its ValueError is load's error (the model is never built)."""
    seen, built = [], []
    monkeypatch.setattr(TriplaneAutoencoder, "inference_options", ("depth_samples", "hidden"))

    def check(cls, cfg, options):
        seen.append((cfg.depth_samples, cfg.plane_channels, dict(options)))
        if options.get("hidden") == 3:
            raise ValueError("model.hidden: refused with the saved config")

    init = TriplaneAutoencoder.__init__

    def recording_init(self, *a, **k):
        built.append(1)
        init(self, *a, **k)

    monkeypatch.setattr(TriplaneAutoencoder, "check_option_values", classmethod(check))
    monkeypatch.setattr(TriplaneAutoencoder, "__init__", recording_init)
    pyface.models.load("example", str(example_run), device="cpu")
    assert seen == [] and built == [1]
    saved = pyface.models.load("example", str(example_run), device="cpu").model.cfg
    pyface.models.load("example", str(example_run), device="cpu",
                       options={"model.depth_samples": 2})
    assert seen == [(2, saved.plane_channels, {"depth_samples": 2})] and len(built) == 3
    with pytest.raises(ValueError, match=r"^model.hidden: refused with the saved config$"):
        pyface.models.load("example", str(example_run), device="cpu", options={"hidden": 3})
    assert len(built) == 3                              # refused before the model was built


@pytest.mark.parametrize("name", ["eg3d", "export3d", "mmfa", "goha", "otavatar"])
def test_declared_inference_options_are_fields_of_the_config(name):
    """Every declared inference option is a field of the model's config that the default
    config accepts as it is (check_options converts it like a config value)."""
    from pyface.train.model import option_value

    cls = pyface.models.model_class(name)
    default = cls.Config()
    declared = pyface.models.inference_options(name)
    assert len(set(declared)) == len(declared)
    values = {k: option_value(default, k) for k in declared}
    meta = {f.name: f.metadata for f in dataclasses.fields(cls.Config)}
    for k in declared:      # a key of a keys_of mapping (OTAvatar's render.*) that the
        head, _, rest = k.partition(".")        # default leaves out: its class's default
        target = meta.get(head, {}).get("keys_of")
        if target is not None and rest not in getattr(default, head):
            values[k] = {f.name: f for f in dataclasses.fields(target)}[rest].default
    assert pyface.models.check_options(name, values) == values
    if name in ("goha", "otavatar", "eg3d", "export3d"):
        assert declared
    if name == "mmfa":      # every MMFA field shapes its networks or their training
        assert declared == ()
    with pytest.raises(ValueError, match=r"is not an inference option"):
        pyface.models.check_options(name, {"resolution": 8})


@dataclass
class _Sampling:
    depth_samples: int = 8
    mode: str = "mid"


@dataclass
class _NestedAEConfig(TriplaneAEConfig):
    sampling: _Sampling = field(default_factory=_Sampling)


class NestedAE(TriplaneAutoencoder):
    """The example model with its samples per ray in a nested config (``sampling``)."""
    Config = _NestedAEConfig
    inference_options = ("sampling.depth_samples",)

    def __init__(self, cfg: _NestedAEConfig | None = None):
        cfg = cfg or _NestedAEConfig()
        cfg.depth_samples = cfg.sampling.depth_samples      # what render() reads
        super().__init__(cfg)


def test_nested_inference_options_reach_the_generic_load(tmp_path, monkeypatch):
    """A dotted key (``sampling.depth_samples``, with or without ``model.``) names a field of
    a nested config: converted like a config value (errors name ``model.sampling.KEY``), merged
    into the saved nested config (its other saved fields stay) before the model is built, and
    the rendered frames change with it; the saved run's value otherwise."""
    monkeypatch.setitem(registry.MODELS, "nested_ae", f"{__name__}:NestedAE")
    run = tmp_path / "run"
    tiny = [s for s in TINY if not s.startswith("model.depth_samples")]
    assert main(["train", "nested_ae", *sets(tiny), "--set", f"train.run_dir={run}",
                 "--set", "train.steps=2", "--set", "model.sampling.depth_samples=4",
                 "--set", "model.sampling.mode=saved"]) == 0
    saved = pyface.models.load("nested_ae", str(run), device="cpu")
    assert saved.model.cfg.sampling == _Sampling(4, "saved")
    assert pyface.models.check_options("nested_ae", {"model.sampling.depth_samples": "6"}) == \
        {"sampling.depth_samples": 6}
    pipe = pyface.models.load("nested_ae", str(run), device="cpu",
                              options={"sampling.depth_samples": "6"})
    assert pipe.model.cfg.sampling == _Sampling(6, "saved")       # the rest as saved
    assert pipe.model.cfg.depth_samples == 6
    src = {"image": torch.rand(3, 16, 16) * 2 - 1}
    drv = {"image": torch.rand(2, 3, 16, 16) * 2 - 1}
    a, b = saved.animate(src, drv), pipe.animate(src, drv)
    assert torch.equal(saved.animate(src, drv), a)
    assert not torch.allclose(a, b)                  # the option is used, not ignored
    with pytest.raises(ValueError, match=r"options: 'model.sampling.mode' is not an inference "
                                         r"option of model 'nested_ae' .*valid: "
                                         r"model.sampling.depth_samples$"):
        pyface.models.load("nested_ae", str(run), options={"model.sampling.mode": "x"})
    with pytest.raises(ValueError, match=r"options: 'sampling' is not an inference option"):
        pyface.models.check_options("nested_ae", {"sampling": {"depth_samples": 2}})
    with pytest.raises(ConfigError, match=r"model.sampling.depth_samples: expected int, got "
                                          r"'many'"):
        pyface.models.load("nested_ae", str(run), options={"sampling.depth_samples": "many"})


def test_option_paths_and_the_declaration_check():
    """option_path walks nested config dataclasses (a part that is not a field, or a step
    through a field that is not a config dataclass, names both); with_options copies the dicts
    on its way; check_model_class refuses a declaration that is not a tuple of field paths or
    names a field and one inside it."""
    assert option_path(_NestedAEConfig, "sampling.depth_samples") == ("sampling",
                                                                      "depth_samples")
    with pytest.raises(ValueError, match=r"'sampling.depth': 'depth' is not a field of "
                                         r"_Sampling; its fields: depth_samples, mode"):
        option_path(_NestedAEConfig, "sampling.depth")
    with pytest.raises(ValueError, match=r"'hidden.x': hidden is not a config dataclass"):
        option_path(_NestedAEConfig, "hidden.x")
    saved = {"sampling": {"depth_samples": 4, "mode": "saved"}, "hidden": 8}
    out = with_options(saved, {"sampling.depth_samples": 6, "lr": 0.1})
    assert out == {"sampling": {"depth_samples": 6, "mode": "saved"}, "hidden": 8, "lr": 0.1}
    assert saved["sampling"]["depth_samples"] == 4                # not changed
    assert with_options({}, {"sampling.mode": "x"}) == {"sampling": {"mode": "x"}}
    with pytest.raises(ValueError, match=r"'sampling.mode': the saved config's sampling is 3"):
        with_options({"sampling": 3}, {"sampling.mode": "x"})
    check_model_class(NestedAE)
    for bad, msg in [(("sampling.depth",), r"'depth' is not a field of _Sampling"),
                     ("sampling.mode", r"inference_options must be a tuple .* \(write "
                                       r"\('sampling.mode',\)\)"),
                     (("sampling", "sampling.mode"), r"inference option 'sampling' contains "
                                                     r"the inference option 'sampling.mode'")]:
        cls = type("Bad", (NestedAE,), {"inference_options": bad})
        with pytest.raises(ModelDefinitionError, match=msg):
            check_model_class(cls)


@dataclass
class _OverridesConfig:
    """A config with a mapping of a dataclass's fields (as OTAvatar's ``render``)."""
    over: dict = field(default_factory=dict,
                       metadata={"keys_of": _Sampling, "fixed": ("mode",)})
    lr: float = 0.1


def test_option_paths_into_a_keys_of_mapping():
    """A dotted key into a mapping field that declares ``keys_of`` names a field of that
    dataclass (not a fixed one); its value comes from the mapping (None when absent) and
    with_options merges it into the saved mapping, which from_dict converts and checks."""
    from pyface.train.config import from_dict
    from pyface.train.model import option_value

    assert option_path(_OverridesConfig, "over.depth_samples") == ("over", "depth_samples")
    with pytest.raises(ValueError, match=r"'over.mode': 'mode' is not a field of _Sampling "
                                         r"\(fixed: it cannot be overridden\); its fields: "
                                         r"depth_samples$"):
        option_path(_OverridesConfig, "over.mode")
    with pytest.raises(ValueError, match=r"'over.depth': 'depth' is not a field of _Sampling"):
        option_path(_OverridesConfig, "over.depth")
    with pytest.raises(ValueError, match=r"'lr.x': lr is not a config dataclass"):
        option_path(_OverridesConfig, "lr.x")
    assert option_value(_OverridesConfig(), "over.depth_samples") is None
    saved = {"over": {"other": 1}, "lr": 0.5}
    merged = with_options(saved, {"over.depth_samples": "6"})
    assert merged == {"over": {"other": 1, "depth_samples": "6"}, "lr": 0.5}
    assert saved == {"over": {"other": 1}, "lr": 0.5}                # not changed
    cfg = from_dict(_OverridesConfig, with_options({"lr": 0.5}, {"over.depth_samples": "6"}),
                    prefix="model.")
    assert cfg.over == {"depth_samples": 6} and option_value(cfg, "over.depth_samples") == 6
    with pytest.raises(ConfigError, match=r"model.over.depth_samples: expected int, got 'x'"):
        from_dict(_OverridesConfig, with_options({}, {"over.depth_samples": "x"}),
                  prefix="model.")
    ota = pyface.models.model_class("otavatar")
    check_model_class(ota)                  # its render.* options pass the declaration check
    bad = type("Bad", (ota,), {"inference_options": ("render.plane_axes",)})
    with pytest.raises(ModelDefinitionError, match=r"'plane_axes' is not a field of "
                                                   r"RenderConfig \(fixed"):
        check_model_class(bad)


def test_base_pipeline_reconstruct_is_animate_with_the_source():
    class Mean(Pipeline):
        resolution = 8

        def encode_source(self, source):
            return self.prepare(source, batched=False)["image"]

        def encode_driving(self, driving):
            return self.prepare(driving, batched=True, name="driving")["image"].mean((1, 2, 3))

        def generate(self, state, motion, gain=1.0):
            return state[None] * motion.view(-1, 1, 1, 1) * gain

    pipe = Mean(nn.Identity(), device="cpu")
    img = torch.linspace(-1, 1, 3 * 8 * 8).view(3, 8, 8)
    rec = pipe.reconstruct({"image": img})
    torch.testing.assert_close(rec, img[None] * img.mean())
    out = pipe.animate({"image": img}, {"image": torch.stack([img, -img])}, gain=2.0)
    torch.testing.assert_close(out, torch.stack([img, -img]) * img.mean() * 2)
    assert pipe.default_motion(4) is None


# ------------------------------------------------------------------------------------------
# driving input
# ------------------------------------------------------------------------------------------

def test_read_driving_and_source_from_a_video_folder(tmp_path):
    path, frames, labels, lms, masks = write_video_folder(tmp_path)
    d = read_driving(path, 10)
    assert d["image"].shape == (3, 3, 10, 10) and d["image"].dtype == torch.float32
    assert -1 <= d["image"].min() and d["image"].max() <= 1
    assert d["camera"].shape == (3, 25) and torch.allclose(d["camera"], torch.from_numpy(labels))
    assert d["coeffs"].shape == (3, 257)
    torch.testing.assert_close(d["landmarks"], torch.from_numpy(lms) * 0.5)
    assert d["mask"].shape == (3, 1, 10, 10) and 0 <= d["mask"].min() and d["mask"].max() <= 1
    full = read_driving(path, None)
    torch.testing.assert_close(full["image"], torch.from_numpy(frames).permute(0, 3, 1, 2)
                               .float() / 127.5 - 1)
    s = read_source(path, None)
    assert s["image"].shape == (3, 20, 20) and s["camera"].shape == (25,)
    torch.testing.assert_close(s["image"], full["image"][0])
    assert read_driving(path, 10, stride=2)["camera"].shape == (2, 25)
    assert read_driving(path, 10, max_frames=1)["image"].shape == (1, 3, 10, 10)
    assert video_fps(path) == 10.0
    parts = list(iter_driving(path, 10, chunk=2))
    assert [p["image"].shape[0] for p in parts] == [2, 1] and count_driving(path) == 3
    for k, v in d.items():
        torch.testing.assert_close(torch.cat([p[k] for p in parts]), v)
    assert count_driving(path, stride=2) == 2 and count_driving(path, max_frames=1) == 1


def test_read_driving_from_frames_and_video_files(tmp_path):
    from PIL import Image
    import imageio.v2 as iio

    folder = tmp_path / "frames"
    folder.mkdir()
    arr = np.zeros((4, 20, 30, 3), np.uint8)
    arr[:, :, 5:25] = 200                                    # the centre square is bright
    for i in range(4):
        Image.fromarray(arr[i]).save(folder / f"{i:03d}.png")
    d = read_driving(str(folder), 8)
    assert set(d) == {"image"} and d["image"].shape == (4, 3, 8, 8)
    torch.testing.assert_close(d["image"], torch.full((4, 3, 8, 8), 200 / 127.5 - 1))  # cropped
    assert read_source(str(folder / "000.png"), 8)["image"].shape == (3, 8, 8)
    assert read_source(str(folder), None)["image"].shape == (3, 20, 20)
    video = tmp_path / "v.mp4"
    iio.mimwrite(str(video), list(np.full((5, 16, 16, 3), 128, np.uint8)), fps=5,
                 macro_block_size=1)
    v = read_driving(str(video), 8, max_frames=3)
    assert set(v) == {"image"} and v["image"].shape == (3, 3, 8, 8)
    assert v["image"].abs().max() < 0.1                      # mid grey
    assert read_source(str(video), 8)["image"].shape == (3, 8, 8)
    for p in (str(folder), str(video)):
        whole = read_driving(p, 8, stride=2)["image"]
        parts = list(iter_driving(p, 8, chunk=1, stride=2))
        assert count_driving(p, stride=2) == len(parts) == whole.shape[0]
        torch.testing.assert_close(torch.cat([q["image"] for q in parts]), whole)
    with pytest.raises(fmt.DataError, match=r"nope: not found"):
        read_driving(str(tmp_path / "nope"), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(fmt.DataError, match=r"empty: no image files"):
        read_driving(str(tmp_path / "empty"), 8)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(fmt.DataError, match=r"bad.png: not a readable image"):
        read_source(str(tmp_path / "bad.png"), 8)
    with pytest.raises(ValueError, match=r"resolution: expected a positive int"):
        read_source(str(folder), 0)
    with pytest.raises(ValueError, match=r"resolution: expected a positive int or None, got True"):
        read_source(str(folder), True)
    # frame counts are ints: a float stride or max_frames is an error naming it
    with pytest.raises(ValueError, match=r"stride: expected an int >= 1, got 2\.0"):
        read_driving(str(folder), 8, stride=2.0)
    with pytest.raises(ValueError, match=r"max_frames: expected an int >= 1 or None, got 2\.5"):
        next(iter_driving(str(video), 8, max_frames=2.5))
    with pytest.raises(ValueError, match=r"chunk: expected an int >= 1, got 0"):
        next(iter_driving(str(video), 8, chunk=0))
    with pytest.raises(ValueError, match=r"stride: expected an int >= 1, got 0"):
        count_driving(str(video), stride=0)


# ------------------------------------------------------------------------------------------
# pyface animate
# ------------------------------------------------------------------------------------------

def test_cli_animate_missing_driving_fails_before_any_progress_output(example_run, tmp_path,
                                                                     capsys):
    path, *_ = write_video_folder(tmp_path, T=2)
    with pytest.raises(fmt.DataError, match=r"nope\.mp4: not found \(expected a pyface video"):
        count_driving(str(tmp_path / "nope.mp4"))
    assert main(["animate", "example", "--checkpoint", str(example_run), "--source", path,
                 "--driving", str(tmp_path / "nope"), "--out", str(tmp_path / "a.mp4"),
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyface animate: ") and "nope: not found" in err and "frame" not in \
        err.split("not found")[0]


def test_cli_animate(example_run, tmp_path, capsys):
    import imageio.v2 as iio

    path, *_ = write_video_folder(tmp_path, T=5)
    out = tmp_path / "a.mp4"
    assert main(["animate", "example", "--checkpoint", str(example_run), "--source", path,
                 "--driving", path, "--out", str(out), "--device", "cpu", "--batch", "2",
                 "--no-progress"]) == 0
    assert "5 frames at 16x16; animate:" in capsys.readouterr().out
    with iio.get_reader(str(out)) as r:
        frames = [np.asarray(f) for f in r]
    assert len(frames) == 5 and frames[0].shape == (16, 48, 3)   # source | driving | result
    out2 = tmp_path / "orbit.mp4"
    assert main(["animate", "example", "--checkpoint", str(example_run), "--source", path,
                 "--out", str(out2), "--frames", "4", "--no-ema", "--no-progress"]) == 0
    with iio.get_reader(str(out2)) as r:
        frames = [np.asarray(f) for f in r]
    assert len(frames) == 4 and frames[0].shape == (16, 32, 3)   # source | result
    video = tmp_path / "drive.mp4"                      # a video file: images only
    iio.mimwrite(str(video), list(np.full((6, 24, 24, 3), 90, np.uint8)), fps=5,
                 macro_block_size=1)
    out3 = tmp_path / "v.mp4"
    assert main(["animate", "example", "--checkpoint", str(example_run), "--source", path,
                 "--driving", str(video), "--stride", "2", "--out", str(out3),
                 "--no-progress"]) == 0
    with iio.get_reader(str(out3)) as r:
        assert r.get_meta_data()["fps"] == 2.5              # the driving video's 5 / stride
        frames = [np.asarray(f) for f in r]
    assert len(frames) == 3 and frames[0].shape == (16, 48, 3)
    capsys.readouterr()
    assert main(["animate", "example", "--checkpoint", str(example_run), "--source", path,
                 "--driving", str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "missing: not found" in capsys.readouterr().err
    assert main(["animate", "nope", "--checkpoint", str(example_run), "--source", path]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_side_by_side_resizes_to_the_result():
    from pyface.train.animate_cli import side_by_side

    out = side_by_side(torch.ones(3, 4, 4), torch.zeros(2, 3, 8, 8), -torch.ones(2, 3, 2, 2))
    assert out.shape == (2, 3, 2, 6)
    assert (out[..., :2] == 1).all() and (out[..., 2:4] == 0).all() and (out[..., 4:] == -1).all()


# ------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------

@dataclass
class S1Config:
    resolution: int = 8
    width: int = 4
    lr: float = 1e-2


class Stage1Toy(TrainableModel):
    """1x1-conv autoencoder (stage 1 of the toy pair)."""
    Config = S1Config
    recipe = {"data": {"resolution": 8, "size": 16}, "train": {"steps": 50, "batch_size": 4}}
    presets = {"tiny": {"train": {"steps": 3, "ckpt_every": 0}}}

    def __init__(self, cfg: S1Config):
        super().__init__()
        self.cfg = cfg
        self.enc, self.dec = nn.Conv2d(3, cfg.width, 1), nn.Conv2d(cfg.width, 3, 1)

    def build_optimizers(self):
        return {"main": torch.optim.Adam(self.parameters(), lr=self.cfg.lr)}

    def step(self, phase, batch, ctx: StepContext):
        x = batch["image"]
        return {"loss": (self.dec(self.enc(x)) - x).abs().mean()}


@dataclass
class S2Config:
    stage1_checkpoint: str | None = None
    lr: float = 1e-2


class Stage2Pipeline(Pipeline):
    resolution = 8

    def encode_source(self, source):
        return None

    def encode_driving(self, driving):
        return self.prepare(driving, batched=True, name="driving")["image"]

    def generate(self, state, motion):
        m = self.model
        return m.head(m.stage1.dec(m.stage1.enc(motion)))


class Stage2Toy(TrainableModel):
    """A head on top of the frozen stage 1, which it loads through load_pretrained."""
    Config = S2Config
    Pipeline = Stage2Pipeline
    recipe = {"data": {"resolution": 8, "size": 16}, "train": {"steps": 50, "batch_size": 4}}
    presets = {"tiny": {"train": {"steps": 2, "ckpt_every": 0}}}
    stages = (Stage("s1", "toy_stage1", "stage1_checkpoint"),)

    def __init__(self, cfg: S2Config):
        super().__init__()
        if not cfg.stage1_checkpoint:
            raise ValueError("model.stage1_checkpoint: expected a stage-1 run, got None")
        c, state = load_pretrained(cfg.stage1_checkpoint)
        self.stage1 = Stage1Toy(config_from_dict(S1Config, c))
        self.stage1.load_state_dict(state)
        self.stage1.requires_grad_(False)
        self.cfg = cfg
        self.head = nn.Conv2d(3, 3, 1)

    def build_optimizers(self):
        return {"main": torch.optim.Adam(self.head.parameters(), lr=self.cfg.lr)}

    def step(self, phase, batch, ctx):
        x = batch["image"]
        return {"loss": (self.head(self.stage1.dec(self.stage1.enc(x))) - x).abs().mean()}


def test_stages_train_first_then_are_reused(tmp_path, monkeypatch, caplog, capsys):
    import logging

    monkeypatch.setitem(registry.MODELS, "toy_stage1", f"{__name__}:Stage1Toy")
    monkeypatch.setitem(registry.MODELS, "toy_stage2", f"{__name__}:Stage2Toy")
    run = tmp_path / "run"
    stage_dir = run / "stages" / "s1"
    args = ["train", "toy_stage2", "--preset", "tiny", "--set", f"train.run_dir={run}",
            *sets(QUIET)]
    # an interrupted stage-1 run (2 of its 3 steps) is resumed, not restarted
    s1 = build_experiment("toy_stage1", Stage1Toy.Config, defaults=Stage1Toy.recipe,
                          preset="tiny", overrides=QUIET + [f"train.run_dir={stage_dir}",
                                                            "train.steps=2"])
    from pyface.train.engine import Trainer

    Trainer(s1).fit()
    caplog.set_level(logging.INFO, logger="pyface")
    capsys.readouterr()
    assert main(args) == 0
    assert "resumed from" in caplog.text and str(stage_dir) in caplog.text
    # before any work: what each run trains and how to change it (--set train.steps=N sets the
    # final model's steps only)
    err = capsys.readouterr().err
    assert ("pyface train toy_stage2: its stages train first, each for its own train.steps:\n"
            f"  stage 's1' (toy_stage1): 3 steps, resumed from step 2 (--set "
            f"stages.s1.train.steps=N) in {stage_dir}\n"
            f"  toy_stage2: 2 steps (--set train.steps=N) in {run}\n") in err, err
    assert ckpt.latest_checkpoint(str(stage_dir)).endswith("ckpt-000003")   # stage-1 preset
    final = ckpt.latest_checkpoint(str(run))
    assert final.endswith("ckpt-000002")                                    # stage-2 preset
    tensors, meta = ckpt.load_folder(final)
    assert meta["experiment"]["model_config"]["stage1_checkpoint"] == str(stage_dir)
    assert meta["experiment"]["preset"] == "tiny"
    _, s1_state = load_pretrained(str(stage_dir))
    for k, v in s1_state.items():                     # frozen: stage 1 unchanged by stage 2
        assert torch.equal(tensors[f"model.stage1.{k}"], v)
    # a second run reuses the finished stage
    caplog.clear()
    stamp = os.path.getmtime(os.path.join(ckpt.latest_checkpoint(str(stage_dir)), "meta.json"))
    assert main(args) == 2                       # the final run's checkpoints are kept
    capsys.readouterr()
    assert main(args + ["--overwrite"]) == 0     # the final model starts over, the stage stays
    assert "reusing the finished run" in caplog.text
    assert (f"  stage 's1' (toy_stage1): finished (3 steps), reused from {stage_dir}\n"
            in capsys.readouterr().err)
    assert os.path.getmtime(os.path.join(ckpt.latest_checkpoint(str(stage_dir)),
                                         "meta.json")) == stamp
    # a given stage checkpoint skips the stage
    other = tmp_path / "other"
    assert main(args[:5] + [f"train.run_dir={other}", "--set",
                            f"model.stage1_checkpoint={stage_dir}", *sets(QUIET)]) == 0
    assert not (other / "stages").exists()
    # the run is self-contained: moved elsewhere, its stage is found under RUN/stages/
    import shutil

    moved = tmp_path / "moved"
    shutil.move(str(run), str(moved))
    pipe = pyface.models.load("toy_stage2", str(moved), device="cpu")
    assert pipe.model.cfg.stage1_checkpoint == str(moved / "stages" / "s1")
    for k, v in pipe.model.state_dict().items():
        assert torch.equal(v, tensors[f"model.{k}"])
    assert pipe.animate({"image": torch.zeros(3, 8, 8)},
                        {"image": torch.zeros(2, 3, 8, 8)}).shape == (2, 3, 8, 8)
    # the stage gone from both places: the error names the stage, its key and both paths
    shutil.move(str(moved / "stages"), str(tmp_path / "elsewhere"))
    with pytest.raises(ckpt.CheckpointError, match=r"its stage 's1' \(model\.stage1_checkpoint = "
                                                  r".*\) does not exist, nor does .*stages/s1"):
        pyface.models.load("toy_stage2", str(moved), device="cpu")


def test_resuming_a_stage_checkpoint_of_a_staged_run_is_refused(tmp_path, monkeypatch, capsys):
    """--resume RUN/stages/s1/checkpoints/ckpt-N of the staged model used to make the stage's
    folder the final model's run folder (or, with train.run_dir, resume the stage's checkpoint
    as the final model's after training the stages): refused before anything is built, saying
    that a staged run resumes as a whole (--resume RUN) and how to resume the stage on its own;
    that command resumes it."""
    monkeypatch.setitem(registry.MODELS, "toy_stage1", f"{__name__}:Stage1Toy")
    monkeypatch.setitem(registry.MODELS, "toy_stage2", f"{__name__}:Stage2Toy")
    run = tmp_path / "run"
    stage = run / "stages" / "s1"
    args = ["train", "toy_stage2", "--preset", "tiny", "--set", "stages.s1.train.ckpt_every=1",
            *sets(QUIET)]
    assert main(args + ["--set", f"train.run_dir={run}"]) == 0
    capsys.readouterr()

    def tree():
        return sorted(str(p.relative_to(run)) for p in run.rglob("*")
                      if p.name not in ("log.txt", "latest"))

    before = tree()
    first = stage / "checkpoints" / "ckpt-000001"
    for given, what in ((first, "a checkpoint"), (stage, "the run")):
        for run_dir in ([], ["--set", f"train.run_dir={run}"]):
            assert main(args + run_dir + ["--resume", str(given)]) == 2
            err = capsys.readouterr().err
            assert err == (
                f"pyface train: --resume {given}: {what} of stage 's1' (toy_stage1) in the staged "
                f"run {run}, not a run of 'toy_stage2': a staged run is resumed as a whole with "
                f"--resume {run} (each stage from its latest checkpoint, a finished stage reused)"
                f"; to resume the stage from {'this checkpoint' if given == first else 'it'}, "
                f"train it on its own: pyface train toy_stage1 --config {stage / 'config.yaml'} "
                f"--resume {given}\n"), err
            assert tree() == before
    # the command it names resumes the stage from that checkpoint in its own folder
    assert main(["train", "toy_stage1", "--config", str(stage / "config.yaml"),
                 "--resume", str(first)]) == 0
    assert sorted(os.listdir(stage / "checkpoints" / "abandoned")) == ["ckpt-000002",
                                                                      "ckpt-000003"]
    assert ckpt.latest_checkpoint(str(stage)).endswith("ckpt-000003")
    assert main(args + ["--resume", str(run)]) == 0     # the staged run, as a whole


def test_stage_overrides_reach_their_stage_and_stale_stages_are_refused(tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setitem(registry.MODELS, "toy_stage1", f"{__name__}:Stage1Toy")
    monkeypatch.setitem(registry.MODELS, "toy_stage2", f"{__name__}:Stage2Toy")
    run = tmp_path / "run"
    stage_dir = run / "stages" / "s1"
    base = ["train", "toy_stage2", "--preset", "tiny", "--set", f"train.run_dir={run}",
            *sets(QUIET)]
    # stages.s1.* configures stage 1 only; model.lr the final model only
    assert main(base + ["--set", "stages.s1.model.width=6", "--set", "model.lr=0.5"]) == 0
    s1_meta = ckpt.read_meta(ckpt.latest_checkpoint(str(stage_dir)))["experiment"]
    final = ckpt.read_meta(ckpt.latest_checkpoint(str(run)))["experiment"]
    assert s1_meta["model_config"]["width"] == 6 and s1_meta["model_config"]["lr"] == 1e-2
    assert final["model_config"]["lr"] == 0.5
    stamp = os.path.getmtime(os.path.join(ckpt.latest_checkpoint(str(stage_dir)), "meta.json"))
    base.append("--overwrite")      # the final model starts over in its run folder each time
    # the same stage settings reuse the finished stage; other ones are refused, naming the key
    assert main(base + ["--set", "stages.s1.model.width=6"]) == 0
    capsys.readouterr()
    assert main(base + ["--set", "stages.s1.model.width=5"]) == 2
    err = capsys.readouterr().err
    assert "stage 's1'" in err and "model.width: finished run 6 vs this command 5" in err
    assert os.path.getmtime(os.path.join(ckpt.latest_checkpoint(str(stage_dir)),
                                         "meta.json")) == stamp
    # a field the finished run's config lacks (added since) counts as its default
    meta_path = os.path.join(ckpt.latest_checkpoint(str(stage_dir)), "meta.json")
    meta = json.load(open(meta_path))
    del meta["experiment"]["model_config"]["lr"]
    json.dump(meta, open(meta_path, "w"))
    assert main(base + ["--set", "stages.s1.model.width=6"]) == 0
    capsys.readouterr()
    assert main(base + ["--set", "stages.s1.model.width=6", "--set", "stages.s1.model.lr=0.1"]) == 2
    assert "model.lr: finished run 0.01 vs this command 0.1" in capsys.readouterr().err
    # bad addresses name the stage, the valid stages or the key
    assert main(base + ["--set", "stages.s9.model.width=5"]) == 2
    err = capsys.readouterr().err
    assert "stages.s9.model.width" in err and "a stage of 'toy_stage2' (s1)" in err
    assert main(base + ["--set", "stages.s1.model.depth=5"]) == 2
    err = capsys.readouterr().err
    assert "stage 's1' (toy_stage1)" in err and "model.depth" in err


# ------------------------------------------------------------------------------------------
# plugins
# ------------------------------------------------------------------------------------------

PLUGIN = '''
from pyface.train.example import TriplaneAutoencoder

class Mine(TriplaneAutoencoder):
    """A third-party model (the example's network under another name)."""
'''


def test_plugin_by_import_option(tmp_path, monkeypatch):
    (tmp_path / "myplugin_mod.py").write_text(PLUGIN + textwrap.dedent('''
        from pyface.train import register_model
        register_model("mine_imported", "myplugin_mod:Mine")
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    argv = ["train", "mine_imported", *sets(TINY), "--set", f"train.run_dir={run}", "--set",
            "train.steps=1"]
    assert main(argv) == 2                                  # not registered without the import
    assert main(argv + ["--import", "myplugin_mod"]) == 0
    assert ckpt.latest_checkpoint(str(run)).endswith("ckpt-000001")
    monkeypatch.delitem(registry.MODELS, "mine_imported")


def test_plugin_by_environment_variable(tmp_path, monkeypatch):
    (tmp_path / "myplugin_env.py").write_text(PLUGIN + textwrap.dedent('''
        from pyface.train import register_model
        register_model("mine_env", "myplugin_env:Mine")
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYFACE_PLUGINS", "myplugin_env, ")
    try:
        assert "mine_env" in pyface.models.names()
        assert registry.model_class("mine_env").__module__ == "myplugin_env"
        monkeypatch.setenv("PYFACE_PLUGINS", "no_such_plugin_module")
        with pytest.raises(ImportError, match=r"plugin module 'no_such_plugin_module'"):
            registry.model_class("still_unknown")
    finally:
        registry.MODELS.pop("mine_env", None)


def test_plugin_by_entry_point_in_a_fresh_process(tmp_path):
    """docs/train.md's plugin recipe: a package with an entry point in group pyface.models is
    found by `pyface train` and `pyface.models.load` without being imported beforehand; listing
    the commands (`pyface --help`) imports no model."""
    (tmp_path / "myplugin").mkdir()
    (tmp_path / "myplugin" / "__init__.py").write_text(PLUGIN)
    dist = tmp_path / "myplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[pyface.models]\nmine = myplugin:Mine\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]),
               OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    script = textwrap.dedent(f'''
        import sys
        from pyface.cli import build_parser, main
        build_parser()
        loaded = [m for m in sys.modules if m.startswith(("myplugin", "pyface.train.example",
                                                          "pyface.models."))]
        assert not loaded, loaded
        from pyface.train import registry
        registry.model_class("example")
        assert not registry._entry_points_loaded      # a known name reads no entry point
        assert main(["train", "mine", "--set", "train.steps=1", "--set", "train.run_dir={run}"]
                    + {sum((["--set", s] for s in TINY), [])!r}) == 0
        import pyface.models
        assert "mine" in pyface.models.names()
        pipe = pyface.models.load("mine", "{run}", device="cpu")
        print(type(pipe).__name__, type(pipe.model).__module__)
    ''')
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ExamplePipeline myplugin" in r.stdout
    assert ckpt.latest_checkpoint(str(run)).endswith("ckpt-000001")


def test_a_runs_config_yaml_is_reusable_with_config(example_run):
    M = TriplaneAutoencoder
    cfg = build_experiment("example", M.Config, defaults=M.recipe,
                           yaml_path=str(example_run / "config.yaml"), overrides=["train.steps=9"])
    assert cfg.model_config.plane_channels == 4 and cfg.train.ema.decay == 0.5
    assert cfg.train.steps == 9 and cfg.data.resolution == 16
