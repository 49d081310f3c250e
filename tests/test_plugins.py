"""A model outside pyface: mistakes in a plugin's model class are errors that name what is
wrong (exit code 2 from ``pyface train``), registration cannot shadow pyface's own names, and
the runnable plugin of docs/train.md (``examples/plugin/toyplane.py``) trains, resumes, chains
its stage, animates, loads and benchmarks through the documented commands."""
from __future__ import annotations

import json
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import pytest
import torch

import pyface.models
from _eval_data import eval_set
from pyface import checkpoint as ckpt
from pyface.cli import main
from pyface.train import registry
from pyface.train.model import ModelDefinitionError, TrainableModel, check_model_class

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "plugin")
QUIET = ["train.progress=false", "train.tensorboard=false", "train.image_every=0",
         "train.device=cpu", "data.size=8"]

BASE = '''
from dataclasses import dataclass
import torch
from torch import nn
from pyface.train import Phase, TrainableModel, register_model

@dataclass
class Cfg:
    resolution: int = 8
    lr: float = 1e-3

class M(TrainableModel):
    Config = Cfg
    recipe = {"data": {"resolution": 8}, "train": {"steps": 1, "batch_size": 2}}
    presets = {"tiny": {"train": {"steps": 1}}}

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.w = nn.Parameter(torch.ones(()))

    def build_optimizers(self):
        return {"main": torch.optim.Adam([self.w], self.cfg.lr)}

    def step(self, phase, batch, ctx):
        return {"loss": (batch["image"] * self.w).abs().mean()}
'''

#: mistake -> (code appended to BASE, a part of the one-line error)
MISTAKES = {
    "no_step": ("del M.step", "does not define step(self, phase, batch, ctx)"),
    "no_build_optimizers": ("del M.build_optimizers", "does not define build_optimizers(self)"),
    "config_not_dataclass": ("class P:\n    lr = 1.0\nM.Config = P",
                             "Config must be a @dataclass class"),
    "config_missing": ("M.Config = None", "Config must be a @dataclass class (its fields are "
                       "the model.* keys); got None"),
    "config_instance": ("M.Config = Cfg()", "got an instance of Cfg, not a class"),
    "init_without_cfg": ("def _init(self):\n    nn.Module.__init__(self)\nM.__init__ = _init",
                         "__init__ must take the config as its one argument"),
    "no_super_init": ("def _init(self, cfg):\n    self.cfg = cfg\nM.__init__ = _init",
                      "__init__ must call super().__init__()"),
    "preset_not_dict": ("M.presets = {'tiny': 3}", "preset 'tiny' must be a dict of sections"),
    "preset_unknown_key": ("M.presets = {'tiny': {'model': {'lrr': 1}}}",
                           "model.lrr: unknown key for Cfg; valid keys: resolution, lr; did you "
                           "mean model.lr?"),
    "stage_key_not_a_field": ("from pyface.train.model import Stage\n"
                              "M.stages = (Stage('s1', 'example', 'stage1_checkpoint'),)",
                              "model.stage1_checkpoint, which is not a field of Cfg"),
    "pipeline_not_a_class": ("M.Pipeline = 3", "Pipeline must be a subclass of "
                             "pyface.train.model.Pipeline"),
    "pipeline_without_generate": (
        "from pyface.train.model import Pipeline\n"
        "class P(Pipeline):\n    def encode_source(self, s): return s\n"
        "    def encode_driving(self, d): return d\nM.Pipeline = P",
        "its Pipeline P does not define generate(self, state, motion, **controls)"),
    "not_a_trainable_model": ("class Q(nn.Module):\n    Config = Cfg\nM = Q",
                              "not a subclass of pyface.train.TrainableModel"),
    "optimizers_list": ("M.build_optimizers = lambda self: [torch.optim.Adam([self.w])]",
                        "build_optimizers() must return a non-empty dict"),
    "optimizer_not_optimizer": ("M.build_optimizers = lambda self: {'main': [self.w]}",
                                "entry 'main' must map a name (str) to a torch.optim.Optimizer"),
    "phases_strings": ("M.phases = lambda self: ['main']",
                       "phases() must return a list of pyface.train.Phase"),
    "step_returns_tensor": ("M.step = lambda self, p, b, c: (b['image'] * self.w).mean()",
                            "step('main') must return a dict {'loss': scalar tensor"),
    "step_returns_none": ("M.step = lambda self, p, b, c: None",
                          "must return a dict {'loss': scalar tensor"),
    "step_without_loss": ("M.step = lambda self, p, b, c: {'l1': (b['image'] * self.w).mean()}",
                          "must return the total loss under 'loss'; got keys ['l1']"),
    "step_float_loss": ("M.step = lambda self, p, b, c: {'loss': 1.0}",
                        "returned 'loss' as float; expected a scalar tensor"),
    "step_loss_not_scalar": ("M.step = lambda self, p, b, c: {'loss': b['image'] * self.w}",
                             "the loss must be a scalar tensor, got (2, 3, 8, 8)"),
    "config_field_without_default": ("@dataclass\nclass C2:\n    lr: float\nM.Config = C2",
                                     "every field of Config (C2) needs a default"),
    "phase_interval_zero": ("M.phases = lambda self: [Phase('main', 'main', interval=0)]",
                            "Phase('main', ...): interval must be an int >= 1"),
    "phase_frozen_string": ("M.phases = lambda self: [Phase('main', 'main', frozen='enc')]",
                            "frozen must be a tuple of sub-module names, got 'enc' (write "
                            "('enc',))"),
    "phases_empty": ("M.phases = lambda self: []", "phases() returned no phase"),
    "phases_same_name": ("M.phases = lambda self: [Phase('main', 'main')] * 2",
                         "two phases are named 'main'"),
    "optimizer_over_a_foreign_tensor": (
        "M.build_optimizers = lambda self: {'main': torch.optim.Adam([nn.Parameter(torch.ones(2))"
        "])}", "optimizer 'main' holds 1 tensor that is not a parameter of the model"),
    "data_transform_not_callable": ("M.data_transform = lambda self: 3",
                                    "data_transform() must return a function"),
    "loss_without_grad": ("M.step = lambda self, p, b, c: {'loss': b['image'].abs().mean()}",
                          "phase 'main': the loss does not require grad"),
    "preview_not_a_dict": ("M.preview = lambda self, b: b['image']\n"
                           "M.recipe = {'data': {'resolution': 8}, 'train': {'steps': 1, "
                           "'batch_size': 2, 'image_every': 1}}",
                           "preview(batch) must return a dict {name: (N, 3, H, W) tensor"),
    "preview_video_not_frames": ("M.preview_video = lambda self, b, f: b['image'][0]\n"
                                 "M.recipe = {'data': {'resolution': 8}, 'train': {'steps': 1, "
                                 "'batch_size': 2, 'video_every': 1, 'video_frames': 2}}",
                                 "preview_video(batch, frames) must return a (T, 3, H, W) tensor"
                                 " in [-1, 1] or None, got (3, 8, 8)"),
    "step_logs_string": ("M.step = lambda self, p, b, c: {'loss': (b['image'] * self.w).mean(), "
                         "'note': 'x'}", "returned 'note' as str; expected a tensor or a number"),
}


def write_plugin(tmp_path, monkeypatch, module: str, code: str, name: str) -> None:
    (tmp_path / f"{module}.py").write_text(
        BASE + textwrap.dedent(code) + f"\nregister_model({name!r}, '{module}:M')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(registry.MODELS, name, raising=False)


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_plugin_mistake_is_one_line_naming_it(mistake, tmp_path, monkeypatch, capsys):
    code, expected = MISTAKES[mistake]
    module, name = f"plugin_mistake_{mistake}", f"mistake_{mistake}"
    write_plugin(tmp_path, monkeypatch, module, code, name)
    try:
        rc = main(["train", name, "--import", module, "--preset", "tiny",
                   "--set", f"train.run_dir={tmp_path / 'run'}",
                   *sum((["--set", s] for s in QUIET), []),
                   *(["--set", "train.image_every=1"] if mistake.startswith("preview") else [])])
    finally:
        registry.MODELS.pop(name, None)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expected in err, err
    assert "Traceback" not in err


def test_the_plugin_without_mistakes_trains(tmp_path, monkeypatch, capsys):
    """The control of the test above: BASE itself trains."""
    write_plugin(tmp_path, monkeypatch, "plugin_mistake_none", "", "mistake_none")
    try:
        rc = main(["train", "mistake_none", "--import", "plugin_mistake_none", "--preset", "tiny",
                   "--set", f"train.run_dir={tmp_path / 'run'}",
                   *sum((["--set", s] for s in QUIET), [])])
    finally:
        registry.MODELS.pop("mistake_none", None)
    assert rc == 0, capsys.readouterr().err
    assert ckpt.latest_checkpoint(str(tmp_path / "run")).endswith("ckpt-000001")


def test_every_registered_model_passes_the_class_check():
    for name in sorted(registry.BUILTIN_MODELS):
        check_model_class(registry.model_class(name), name)


def test_a_target_that_does_not_exist_names_the_registry_entry(tmp_path, monkeypatch, capsys):
    (tmp_path / "plugin_badtarget.py").write_text(
        "from pyface.train import register_model\n"
        "register_model('badtarget', 'plugin_badtarget:Missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert main(["train", "badtarget", "--import", "plugin_badtarget"]) == 2
    finally:
        registry.MODELS.pop("badtarget", None)
    err = capsys.readouterr().err
    assert ("model 'badtarget' is registered as 'plugin_badtarget:Missing', but module "
            "'plugin_badtarget' has no attribute 'Missing'") in err


def test_registration_cannot_shadow_a_builtin_or_another_plugin(tmp_path, monkeypatch, capsys):
    target = registry.MODELS["example"]
    with pytest.raises(registry.RegistryError, match=r"'example' is pyface's own model"):
        registry.register_model("example", "mypackage:Mine")
    with pytest.raises(registry.RegistryError, match=r"'procedural' is pyface's own dataset"):
        registry.register_dataset("procedural", "mypackage:Data")
    assert registry.MODELS["example"] == target
    monkeypatch.delitem(registry.MODELS, "shadow_test", raising=False)
    registry.register_model("shadow_test", "a:A")
    registry.register_model("shadow_test", "a:A")            # the same again: fine
    with pytest.raises(registry.RegistryError, match=r"already registered as 'a:A'"):
        registry.register_model("shadow_test", "b:B")
    registry.register_model("shadow_test", "b:B", replace=True)
    assert registry.MODELS["shadow_test"] == "b:B"
    with pytest.raises(registry.RegistryError, match=r"'package.module:Class'"):
        registry.register_model("shadow_test2", "no_colon")
    registry.MODELS.pop("shadow_test")
    from pyface.train.example import TriplaneAutoencoder

    registry.register_model("shadow_test", TriplaneAutoencoder)      # a class: its path
    assert registry.MODELS.pop("shadow_test") == "pyface.train.example:TriplaneAutoencoder"
    # through pyface train: one line, exit code 2
    (tmp_path / "plugin_clash.py").write_text(
        "from pyface.train import register_model\n"
        "register_model('example', 'plugin_clash:Mine')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["train", "example", "--import", "plugin_clash", "--print-config"]) == 2
    assert "'example' is pyface's own model" in capsys.readouterr().err
    assert registry.MODELS["example"] == target


def test_import_finds_a_module_in_the_current_directory(tmp_path, monkeypatch):
    """The ``pyface`` console script does not put the current directory on sys.path; --import
    still finds a module there, as ``python -m`` would."""
    (tmp_path / "plugin_in_cwd.py").write_text(
        "from pyface.train import register_model\n"
        "register_model('in_cwd', 'pyface.train.example:TriplaneAutoencoder')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        registry.import_plugins(["plugin_in_cwd"])
        assert registry.MODELS["in_cwd"] == "pyface.train.example:TriplaneAutoencoder"
    finally:
        registry.MODELS.pop("in_cwd", None)
    with pytest.raises(ImportError, match=r"plugin module 'no_such_plugin_xyz'.*current "
                                          r"directory, PYTHONPATH"):
        registry.import_plugins(["no_such_plugin_xyz"])


def test_a_hand_built_model_passes_the_check():
    from pyface.train.example import TriplaneAutoencoder

    check_model_class(TriplaneAutoencoder)
    with pytest.raises(ModelDefinitionError, match=r"does not define build_optimizers"):
        check_model_class(type("Bare", (TrainableModel,), {"Config": TriplaneAutoencoder.Config}))


# ------------------------------------------------------------------------------------------
# the runnable plugin of docs/train.md
# ------------------------------------------------------------------------------------------

def test_example_plugin_trains_resumes_chains_loads_and_benchmarks(tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.syspath_prepend(EXAMPLE)
    monkeypatch.delitem(registry.MODELS, "toyplane", raising=False)
    monkeypatch.delitem(registry.MODELS, "toyplane_refine", raising=False)
    quiet = sum((["--set", s] for s in QUIET), [])
    run = tmp_path / "toy"
    base = ["train", "toyplane", "--import", "toyplane", "--preset", "tiny",
            "--set", f"train.run_dir={run}", *quiet]
    assert main(base + ["--print-config"]) == 0
    out = capsys.readouterr().out
    assert "channels: 4" in out and "preset: tiny" in out
    assert main(base + ["--set", "train.steps=2"]) == 0, capsys.readouterr().err
    assert ckpt.latest_checkpoint(str(run)).endswith("ckpt-000002")
    assert main(base + ["--resume"]) == 0, capsys.readouterr().err       # to the preset's 4
    assert ckpt.latest_checkpoint(str(run)).endswith("ckpt-000004")
    pipe = pyface.models.load("toyplane", str(run), device="cpu")
    frames = pipe.animate({"image": torch.zeros(3, 32, 32)}, {"image": torch.zeros(2, 3, 16, 16)})
    assert frames.shape == (2, 3, 16, 16) and bool(frames.abs().le(1).all())
    # pyface animate through the plugin's Pipeline (a source image, a folder of driving frames)
    import imageio.v3 as iio

    (tmp_path / "drv").mkdir()
    face = (torch.rand(20, 20, 3) * 255).to(torch.uint8).numpy()
    iio.imwrite(tmp_path / "src.png", face)
    for i in range(2):
        iio.imwrite(tmp_path / "drv" / f"{i:03d}.png", face)
    video = tmp_path / "out.mp4"
    assert main(["animate", "toyplane", "--import", "toyplane", "--checkpoint", str(run),
                 "--source", str(tmp_path / "src.png"), "--driving", str(tmp_path / "drv"),
                 "--out", str(video), "--device", "cpu"]) == 0, capsys.readouterr().err
    assert video.stat().st_size > 0
    # the stage chain: toyplane_refine trains its toyplane stage first, then itself
    refine = tmp_path / "refine"
    assert main(["train", "toyplane_refine", "--import", "toyplane", "--preset", "tiny",
                 "--set", f"train.run_dir={refine}", *quiet]) == 0, capsys.readouterr().err
    assert ckpt.latest_checkpoint(str(refine / "stages" / "base")).endswith("ckpt-000004")
    assert ckpt.latest_checkpoint(str(refine)).endswith("ckpt-000002")
    # pyface eval finds the plugin through --import too
    data = eval_set(str(tmp_path / "eval_set"), 4)
    report = tmp_path / "eval.json"
    assert main(["eval", "toyplane", "--import", "toyplane", "--checkpoint", str(run),
                 "--data", data, "--device", "cpu", "--max-pairs", "2", "--quiet",
                 "--json", str(report)]) == 0, capsys.readouterr().err
    assert json.loads(report.read_text())["model"] == "toyplane"
    assert main(["eval", "toyplan", "--import", "toyplane", "--checkpoint", str(run),
                 "--data", data, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'toyplan'" in err and "did you mean toyplane" in err
    assert main(["eval", "toyplane", "--import", "no_such_plugin_xyz", "--checkpoint", str(run),
                 "--data", data, "--device", "cpu"]) == 2
    assert "plugin module 'no_such_plugin_xyz'" in capsys.readouterr().err
    # an unfinished stage run started with another model config: the stage's own remedy
    other = tmp_path / "other"
    started = ["train", "toyplane_refine", "--import", "toyplane", "--preset", "tiny",
               "--set", f"train.run_dir={other}", *quiet]
    assert main(started + ["--set", "stages.base.train.steps=2",
                           "--set", "stages.base.model.channels=2"]) == 0
    capsys.readouterr()
    assert main(started) == 2       # the finished final run is kept: --resume or --overwrite
    assert "holds a run (latest checkpoint ckpt-" in capsys.readouterr().err
    started.append("--overwrite")
    assert main(started) == 2
    err = capsys.readouterr().err
    assert ("stage 'base': the unfinished run" in err and "model.channels: unfinished run 2 vs "
            "this command 4" in err and "--set stages.base.model.channels=2" in err), err
    assert main(started + ["--set", "stages.base.model.channels=2"]) == 0, \
        capsys.readouterr().err
    assert ckpt.latest_checkpoint(str(other / "stages" / "base")).endswith("ckpt-000004")
    # the fused-vs-reference benchmark takes the plugin through --import
    from pyface.bench.train import main as bench_main

    out_json = tmp_path / "bench.json"
    assert bench_main(["toyplane", "--import", "toyplane", "--preset", "tiny", "--steps", "1",
                       "--warmup", "0", "--device", "cpu", "--json", str(out_json)]) == 0
    assert out_json.exists()
    assert bench_main(["toyplan", "--import", "toyplane"]) == 2
    assert "did you mean toyplane" in capsys.readouterr().err


TORCHRUN = """
import sys
sys.path.insert(0, {example!r})
from pyface.cli import main
sys.exit(main(["train", "toyplane", "--import", "toyplane", "--preset", "tiny",
               "--set", "train.run_dir={run}", "--set", "train.steps=2", *{quiet!r}]))
"""


def test_example_plugin_under_torchrun_two_gloo_ranks(tmp_path):
    from pyface.testing import run_torchrun

    script = tmp_path / "launch.py"
    run = tmp_path / "run"
    script.write_text(TORCHRUN.format(example=EXAMPLE, run=str(run),
                                      quiet=sum((["--set", s] for s in QUIET), [])))
    run_torchrun(str(script), nproc=2, timeout=300)
    assert ckpt.latest_checkpoint(str(run)).endswith("ckpt-000002")


def test_an_entry_point_with_a_builtin_name_is_ignored_with_a_warning(tmp_path, monkeypatch):
    dist = tmp_path / "clashplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: clashplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[pyface.models]\nexample = clashplugin:Mine\nclash_free = clashplugin:Other\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    target = registry.MODELS["example"]
    try:
        with pytest.warns(UserWarning, match=r"entry point example = 'clashplugin:Mine' of "
                                             r"clashplugin \(group pyface.models\) is ignored: "
                                             r"'example' is pyface's own model"):
            registry.load_entry_points(force=True)
        assert registry.MODELS["example"] == target
        assert registry.MODELS["clash_free"] == "clashplugin:Other"
    finally:
        registry.MODELS.pop("clash_free", None)


@dataclass
class LitConfig:
    mode: Literal["fast", "exact"] = "fast"
    levels: Literal[1, 2, 4] = 1
    extra: Optional[Literal["a", "b"]] = None


def test_a_literal_config_field_takes_only_its_values():
    from pyface.train.config import ConfigError, build_experiment

    cfg = build_experiment("lit", LitConfig, overrides=["model.mode=exact", "model.levels=4",
                                                        "model.extra=null"])
    assert (cfg.model_config.mode, cfg.model_config.levels, cfg.model_config.extra) == \
        ("exact", 4, None)
    with pytest.raises(ConfigError, match=r"model.mode: expected one of fast, exact, got "
                                          r"'exakt'; did you mean exact\?"):
        build_experiment("lit", LitConfig, overrides=["model.mode=exakt"])
    with pytest.raises(ConfigError, match=r"model.levels: expected one of 1, 2, 4, got 3"):
        build_experiment("lit", LitConfig, overrides=["model.levels=3"])
    with pytest.raises(ConfigError, match=r"model.extra: expected one of a, b, got 'c'"):
        build_experiment("lit", LitConfig, overrides=["model.extra=c"])


def test_animate_reports_a_broken_plugin_in_one_line(tmp_path, monkeypatch, capsys):
    import imageio.v3 as iio

    write_plugin(tmp_path, monkeypatch, "plugin_broken_cli", "del M.step", "broken_cli")
    src = tmp_path / "src.png"
    iio.imwrite(src, np.zeros((8, 8, 3), np.uint8))
    try:
        assert main(["animate", "broken_cli", "--import", "plugin_broken_cli", "--checkpoint",
                     str(tmp_path), "--source", str(src), "--driving", str(tmp_path),
                     "--out", str(tmp_path / "o.mp4"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "model 'broken_cli' (M): does not define step" in err and "Traceback" not in err
    finally:
        registry.MODELS.pop("broken_cli", None)
