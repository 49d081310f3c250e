"""Training engine: config, schedules, EMA, sampler, exact resume, checkpoints, NaN guard,
signals, previews, CLI. (2-process DDP: tests/test_train_ddp.py.)"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import typing
from dataclasses import dataclass

import pytest
import torch

from _train_toys import TinyGAN, TinyGANConfig

from pyface import checkpoint as ckpt
from pyface.train import Phase, Trainer, TrainableModel, build_experiment
from pyface.train.model import Stage
from pyface.train.config import ConfigError, EMAConfig, ScheduleConfig, TrainConfig, parse_set
from pyface.train.distributed import StepBatchSampler
from pyface.train.ema import ema_beta
from pyface.train.engine import NonFiniteError
from pyface.train.example import TriplaneAutoencoder
from pyface.train.schedules import lazy_regularization, lr_factor

TINY = ["model.resolution=16", "model.plane_resolution=8", "model.plane_channels=4",
        "model.encoder_channels=8", "model.hidden=8", "model.depth_samples=4",
        "data.resolution=16", "data.size=64", "train.batch_size=4", "train.progress=false",
        "train.tensorboard=false", "train.image_every=0", "train.log_every=1"]


def tiny(tmp_path, *extra, name="run"):
    M = TriplaneAutoencoder
    return build_experiment("example", M.Config, defaults=M.recipe,
                            overrides=TINY + [f"train.run_dir={tmp_path / name}", *extra])


def params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------

def test_config_yaml_set_and_types(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  steps: 7\n  ema: {decay: 0.5}\nmodel:\n  lr: 0.01\n")
    M = TriplaneAutoencoder
    cfg = build_experiment("example", M.Config, yaml_path=str(y), defaults=M.recipe,
                           overrides=["train.steps=9", "train.grad_clip=1e-1",
                                      "train.lr_schedule.kind=step", "model.betas=0.5,0.9",
                                      "train.ema.modules=encoder"])
    assert cfg.train.steps == 9                      # --set beats YAML
    assert cfg.train.ema.decay == 0.5                # YAML beats recipe
    assert cfg.train.ema.modules == ["encoder"]
    assert cfg.model_config.lr == 0.01
    assert cfg.model_config.betas == [0.5, 0.9]
    assert cfg.train.grad_clip == pytest.approx(0.1)
    assert cfg.data.resolution == 32                 # from the model's recipe
    assert isinstance(cfg.train.lr_schedule, ScheduleConfig)


@pytest.mark.parametrize("bad, match", [
    (["train.stepz=1"], r"train\.stepz: unknown key for TrainConfig; valid keys: run_dir"),
    (["train.steps=abc"], r"train\.steps: expected int, got 'abc'"),
    (["train.progress=maybe"], r"train\.progress: expected a bool"),
    (["nosection.x=1"], r"nosection: unknown section"),
    (["train.steps"], r"expected key=value"),
    # a misspelt key or section names the near matches
    (["train.stepz=1"], r"; did you mean train\.steps\?$"),
    (["model.lrr=1"], r"model\.lrr: unknown key for TriplaneAEConfig; valid keys: .*; did you "
                      r"mean model\.lr\?$"),
    (["train.lr_schedule.kindd=cosine"], r"did you mean train\.lr_schedule\.kind\?$"),
    (["trian.steps=1"], r"trian: unknown section; valid sections: model, data, train, stages; "
                        r"did you mean train\?$"),
    (["preset=tiny"], r"preset: unknown section; valid sections: .*; a preset is chosen with "
                      r"--preset NAME"),
    # values checked when the config is built (so --print-config reports them too)
    (["train.lr_schedule.kind=cosin"], r"train\.lr_schedule\.kind: expected one of constant, "
                                       r"cosine, linear, step, got 'cosin'; did you mean cosine\?"),
    (["train.device=gpu"], r"train\.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["train.precision=fp8"], r"train\.precision: expected 'fp32' or 'bf16', got 'fp8'"),
    (["train.steps=-1"], r"train\.steps: expected an int >= 0, got -1"),
    (["train.batch_size=0"], r"train\.batch_size: expected an int >= 1, got 0"),
])
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        build_experiment("example", TriplaneAutoencoder.Config, overrides=bad)


def test_data_that_does_not_read_exits_1(tmp_path, monkeypatch, capsys):
    """A dataset that is missing or corrupt (DataError while the Trainer or a stage builds it)
    is an input's failure: exit code 1 (README: exit codes), one line; it exited 2, as a
    command-line error does."""
    from pyface.cli import main
    from pyface.data.format import DataError
    from pyface.train import engine, stages

    def corrupt(*a, **k):
        raise DataError(f"{tmp_path}/index.json: not valid JSON")

    monkeypatch.setattr(engine.Trainer, "__init__", corrupt)
    assert main(["train", "example", "--set", f"train.run_dir={tmp_path / 'r'}"]) == 1
    assert capsys.readouterr().err == f"pyface train: {tmp_path}/index.json: not valid JSON\n"
    monkeypatch.setattr(stages, "prepare_stages", corrupt)
    assert main(["train", "otavatar", "--set", f"train.run_dir={tmp_path / 'o'}"]) == 1
    assert capsys.readouterr().err == f"pyface train: {tmp_path}/index.json: not valid JSON\n"


def test_an_init_from_checkpoint_that_is_not_there_exits_1(tmp_path, capsys):
    """train.init_from naming no checkpoint is an input's failure: exit code 1, one line (it
    exited 2, as a command-line error does); nothing is trained."""
    from pyface.cli import main

    gone = tmp_path / "gone"
    assert main(["train", "example", "--preset", "tiny", "--set", f"train.run_dir={tmp_path / 'r'}",
                 "--set", f"train.init_from={gone}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pyface train: checkpoint '{gone}': not a folder") and \
        err.count("\n") == 1, err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_config_file_and_preset_errors_name_the_file_and_near_matches(tmp_path, capsys):
    M = TriplaneAutoencoder
    with pytest.raises(ConfigError, match=r"--preset 'tin': model 'example' has no such preset; "
                                          r"valid presets: tiny; did you mean tiny\?"):
        build_experiment("example", M.Config, preset="tin")
    with pytest.raises(ConfigError, match=r"--config .*none\.yaml: no such file"):
        build_experiment("example", M.Config, yaml_path=str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML at line 3, column 1: "
                                          r"expected ',' or ']'"):
        build_experiment("example", M.Config, yaml_path=str(bad))
    bad.write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: expected a mapping at the top level"):
        build_experiment("example", M.Config, yaml_path=str(bad))
    # a section that is not a mapping: refused, not replaced by a later --set of its keys
    for text, shown in (("train: 5\n", "5"), ("data: [1, 2]\n", r"\[1, 2\]")):
        bad.write_text(text)
        section = text.split(":")[0]
        with pytest.raises(ConfigError, match=rf"--config .*bad\.yaml: {section}: expected a "
                                              rf"mapping of {section}\.\* keys, got {shown}"):
            build_experiment("example", M.Config, yaml_path=str(bad),
                             overrides=[f"{section}.seed=1"])
    # exit codes (README): a --config file that is missing is an input's failure (1), one
    # that reads but holds a wrong section a usage error (2); one line each
    from pyface.cli import main

    capsys.readouterr()
    assert main(["train", "example", "--config", str(tmp_path / "none.yaml")]) == 1
    assert capsys.readouterr().err.endswith(
        f"pyface train: --config {tmp_path / 'none.yaml'}: no such file\n")
    assert main(["train", "example", "--config", str(bad), "--print-config"]) == 2
    assert "expected a mapping of data.* keys" in capsys.readouterr().err
    bad.write_text("train:\n")                     # an empty section: the defaults
    assert build_experiment("example", M.Config, yaml_path=str(bad)).train.steps == \
        TrainConfig().steps
    # a run's config.yaml of another model
    bad.write_text("model: eg3d\npreset: tiny\nmodel_config: {}\ndata: {}\ntrain: {}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: the config of model 'eg3d', not 'example' "
                                          r"\(pyface train eg3d --config"):
        build_experiment("example", M.Config, yaml_path=str(bad))
    with pytest.raises(KeyError, match=r"unknown model 'exmple'; .*did you mean example\?"):
        from pyface.train.registry import model_class

        model_class("exmple")


def _portrait(name, *, preset=None, overrides=(), yaml_path=None):
    from pyface.train.registry import model_class

    cls = model_class(name)
    return build_experiment(name, cls.Config, defaults=cls.recipe, preset=preset,
                            overrides=list(overrides), yaml_path=yaml_path)


@pytest.mark.parametrize("model, preset, old, new, option", [
    ("export3d", "tiny", "pairs", "clips", ("frames", 6)),
    ("export3d", None, "pairs", "clips", ("min_gap", 2)),
    ("otavatar", "tiny", "motion_windows", "clips", ("frames", 6)),
    ("mmfa", "tiny", "pairs", "clips", ("frames", 6)),
    ("export3d_clebs", "tiny", "clips", "pairs", ("mode", "cross_video")),
])
def test_changing_the_dataset_leaves_the_recipe_options_behind(model, preset, old, new, option):
    """``--set data.name=NEW`` on a model whose recipe/preset sets ``data.options`` for its own
    dataset: those options do not follow; the options given for NEW apply (in either order) and
    a wrong one is refused with its near match."""
    from pyface.train.registry import dataset_class

    assert _portrait(model, preset=preset).data.name == old
    key, value = option
    for sets in ([f"data.name={new}"], [f"data.name={new}", f"data.options.{key}={value}"],
                 [f"data.options.{key}={value}", f"data.name={new}"]):
        cfg = _portrait(model, preset=preset, overrides=sets)
        Options = dataset_class(new).Options
        assert cfg.data.name == new and isinstance(cfg.data.options, Options)
        given = {key: value} if len(sets) == 2 else {}
        assert cfg.data.options == Options(**given)
        assert {dataset for _, dataset, _ in cfg.dropped_options} == {old}
        assert cfg.dropped_options[0][0] == "the recipe"
    with pytest.raises(ConfigError, match=rf"data\.options\.{key}x: unknown key for "
                                          rf"{Options.__qualname__}; .*did you mean "
                                          rf"data\.options\.{key}\?"):
        _portrait(model, preset=preset, overrides=[f"data.name={new}", f"data.options.{key}x=1"])


def test_dataset_options_merge_while_the_dataset_stays(tmp_path):
    """Options for the recipe's own dataset still merge with the recipe's; a ``--config`` file's
    options without a ``data.name`` belong to the dataset finally selected; the options of a
    file that names another dataset (a run's config.yaml) are left behind like the recipe's."""
    cfg = _portrait("export3d", preset="tiny", overrides=["data.options.mode=cross_video"])
    assert cfg.data.name == "pairs" and cfg.data.options.mode == "cross_video"
    assert cfg.data.options.synth.exp_leak == 0.5 and cfg.dropped_options == []
    # the same name again keeps the recipe's options
    cfg = _portrait("export3d", preset="tiny", overrides=["data.name=pairs"])
    assert cfg.data.options.synth.exp_leak == 0.5 and cfg.dropped_options == []
    y = tmp_path / "opts.yaml"
    y.write_text("data:\n  options: {frames: 6}\n")
    cfg = _portrait("export3d", preset="tiny", yaml_path=str(y), overrides=["data.name=clips"])
    assert cfg.data.options.frames == 6 and cfg.data.options.synth.exp_leak == 0.0
    # a resolved config of the pairs dataset, then another dataset
    y.write_text("data:\n  name: pairs\n  options: {mode: cross_video, min_gap: 3}\n")
    cfg = _portrait("export3d", yaml_path=str(y), overrides=["data.name=clips"])
    assert cfg.data.options == type(cfg.data.options)()
    assert [s for s, _, _ in cfg.dropped_options] == ["the recipe", f"--config {y}"]


@pytest.mark.parametrize("model", ["export3d", "otavatar"])
def test_print_config_with_another_dataset_round_trips(model, tmp_path, capsys):
    """``--print-config`` after ``--set data.name=clips`` names the options left behind in a
    comment, and ``--config`` of its output (with or without the preset) gives it back."""
    import yaml

    from pyface.cli import main

    assert main(["train", model, "--preset", "tiny", "--set", "data.name=clips", "--set",
                 "data.options.frames=6", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# data.options of the recipe for dataset ")
    assert "not applied to data.name 'clips'" in printed
    first = yaml.safe_load(printed)
    assert first["data"]["name"] == "clips" and first["data"]["options"]["frames"] == 6
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    for preset in ([], ["--preset", "tiny"]):
        assert main(["train", model, *preset, "--config", str(path), "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out) == first


@dataclass
class _Typed:
    count: int = 1
    rate: float = 0.5
    flag: bool = False
    name: str = "a"
    path: str | None = None
    limit: float | None = None
    sizes: list[int] = None
    pair: tuple[float, float] = (0.0, 1.0)
    widths: tuple[int, ...] = (1,)
    mode: typing.Literal["fast", "exact"] = "fast"
    switch: typing.Literal[True, False] = True
    ema: EMAConfig = None
    extra: dict = None
    anything: typing.Any = None


def _typed(*sets):
    from pyface.train.config import from_dict

    return from_dict(_Typed, parse_set(list(sets), texts=True), prefix="model.")


@pytest.mark.parametrize("item, key, value", [
    ("count=3", "count", 3), ("count=-1", "count", -1), ("count=1e3", "count", 1000),
    ("count=3.0", "count", 3), ("count='4'", "count", 4),
    ("rate=1e-3", "rate", 1e-3), ("rate=3", "rate", 3.0), ("rate=-1", "rate", -1.0),
    *[(f"flag={t}", "flag", True) for t in ("true", "True", "yes", "on", "1")],
    *[(f"flag={f}", "flag", False) for f in ("false", "False", "no", "off", "0")],
    # a string field takes the text as written, not YAML's reading of it
    ("name=007", "name", "007"), ("name=0.10", "name", "0.10"), ("name=true", "name", "true"),
    ("name=1:30", "name", "1:30"), ("name=2024-01-01", "name", "2024-01-01"),
    ("name=null", "name", "null"), ("path=null", "path", None), ("path=~", "path", None),
    ("path=1e3", "path", "1e3"), ("limit=null", "limit", None), ("limit=2", "limit", 2.0),
    ("sizes=[1,2]", "sizes", [1, 2]), ("sizes=1,2", "sizes", [1, 2]), ("sizes=3", "sizes", [3]),
    ("sizes=(1, 2)", "sizes", [1, 2]), ("sizes=[]", "sizes", []),
    ("pair=0.5,0.9", "pair", (0.5, 0.9)), ("widths=4", "widths", (4,)),
    ("mode=exact", "mode", "exact"), ("switch=false", "switch", False),
    ("switch=False", "switch", False),
])
def test_set_values_are_read_as_the_field_type(item, key, value):
    got = getattr(_typed(item), key)
    assert got == value and type(got) is type(value), (item, got)


def test_set_values_through_build_experiment():
    """``pyface train --set``: a path keeps its text, list items are stripped, a fraction is not
    an int; a field without a conversion (``dict``, ``Any``) gets the YAML values."""
    assert _typed("sizes=1, 2").sizes == [1, 2]
    typed = _typed("extra.a=1", "extra.b=007", "anything.x=null")
    assert typed.extra == {"a": 1, "b": 7} and type(typed.extra["a"]) is int
    assert type(typed.extra["b"]) is int and typed.anything == {"x": None}
    assert _typed("anything=1.5").anything == 1.5 and _typed("anything=true").anything is True
    cfg = build_experiment("example", TriplaneAutoencoder.Config,
                           overrides=["train.ema.modules=encoder, decoder", "data.path=0.10",
                                      "train.run_dir=1:30", "train.progress=0"])
    assert cfg.train.ema.modules == ["encoder", "decoder"]
    assert (cfg.data.path, cfg.train.run_dir, cfg.train.progress) == ("0.10", "1:30", False)
    with pytest.raises(ConfigError, match=r"train\.steps: expected int \(a whole number\), got "
                                          r"'1e-3'"):
        build_experiment("example", TriplaneAutoencoder.Config, overrides=["train.steps=1e-3"])


@pytest.mark.parametrize("item, match", [
    ("count=1e-3", r"model\.count: expected int \(a whole number\), got '1e-3'"),
    ("count=3.5", r"model\.count: expected int \(a whole number\), got 3\.5"),
    ("count=.inf", r"model\.count: expected int \(a whole number\), got inf"),
    ("count=true", r"model\.count: expected int, got True"),
    ("count=null", r"model\.count: expected int, got None"),
    ("rate=abc", r"model\.rate: expected float, got 'abc'"),
    ("flag=2", r"model\.flag: expected a bool \(true/false, yes/no, on/off, 1/0\), got 2"),
    ("flag=maybe", r"model\.flag: expected a bool .*, got 'maybe'"),
    ("name=[a, b]", r"model\.name: expected a string, got \['a', 'b'\]"),
    ("limit=abc", r"model\.limit: expected float, got 'abc'"),
    ("sizes=null", r"model\.sizes: expected a list \(A,B or \[A, B\]\), got None"),
    ("sizes=1,x", r"model\.sizes\[1\]: expected int, got 'x'"),
    ("pair=1,2,3", r"model\.pair: expected 2 items, got 3"),
    ("mode=exakt", r"model\.mode: expected one of fast, exact, got 'exakt'; did you mean exact\?"),
    ("ema=3", r"model\.ema: expected a mapping for EMAConfig, got 3"),
    ("extra=3", r"model\.extra: expected a mapping, e\.g\. --set model\.extra\.NAME=VALUE, "
                r"got 3"),
    ("ema.decayy=3", r"model\.ema\.decayy: unknown key for EMAConfig; .*did you mean "
                     r"model\.ema\.decay\?"),
])
def test_set_wrong_values_name_the_key_the_type_and_the_value(item, match):
    with pytest.raises(ConfigError, match=match):
        _typed(item)


def test_paths_expand_a_leading_tilde(tmp_path, monkeypatch):
    """``--set train.run_dir=~/runs/x`` (the shell leaves a ``~`` after ``key=`` as it is) is
    the home folder's, not a folder named ``~`` in the current one; so are ``data.path`` and
    ``train.init_from``, from ``--set`` or a YAML file."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = build_experiment("example", TriplaneAutoencoder.Config,
                           overrides=["train.run_dir=~/runs/{model}", "data.path=~/data",
                                      "train.init_from=~/runs/old"])
    assert cfg.train.run_dir == f"{tmp_path}/runs/{{model}}"
    assert (cfg.data.path, cfg.train.init_from) == (f"{tmp_path}/data", f"{tmp_path}/runs/old")


def test_set_same_key_twice_last_wins():
    assert _typed("count=1", "count=2").count == 2
    ema = _typed("ema={decay: 0.5}", "ema.start_step=4").ema
    assert (ema.decay, ema.start_step) == (0.5, 4)
    ema = _typed("ema.decay=0.5", "ema={start_step: 4}").ema     # the whole mapping replaces it
    assert (ema.decay, ema.start_step) == (EMAConfig().decay, 4)
    with pytest.raises(ConfigError, match=r"--set 'count.x=1': count is set to a value and used "
                                          r"as a section"):
        _typed("count=1", "count.x=1")
    with pytest.raises(ConfigError, match=r"--set 'ema..decay=1': empty part in the key"):
        _typed("ema..decay=1")


def test_parse_set_nested():
    assert parse_set(["a.b.c=1", "a.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": "x"},
                                                         "e": [1, 2]}


# ------------------------------------------------------------------------------------------
# schedules, EMA, sampler
# ------------------------------------------------------------------------------------------

def test_lr_schedules():
    c = ScheduleConfig(kind="cosine", warmup_steps=10, min_factor=0.1)
    assert lr_factor(c, 0, 110) == pytest.approx(0.1)
    assert lr_factor(c, 9, 110) == pytest.approx(1.0)
    assert lr_factor(c, 60, 110) == pytest.approx(0.55)
    assert lr_factor(c, 110, 110) == pytest.approx(0.1)
    s = ScheduleConfig(kind="step", step_size=10, gamma=0.5)
    assert [lr_factor(s, i, 100) for i in (0, 9, 10, 25)] == [1, 1, 0.5, 0.25]
    lin = ScheduleConfig(kind="linear")
    assert lr_factor(lin, 50, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_schedule.kind"):
        lr_factor(ScheduleConfig(kind="exp"), 0, 1)
    lr, betas = lazy_regularization(0.002, (0.0, 0.99), 16)
    assert lr == pytest.approx(0.002 * 16 / 17) and betas[1] == pytest.approx(0.99 ** (16 / 17))


def test_ema_beta_half_life_and_rampup():
    cfg = EMAConfig(half_life_kimg=10.0)
    assert ema_beta(cfg, 32, 10**6) == pytest.approx(0.5 ** (32 / 10000))
    ramp = EMAConfig(half_life_kimg=10.0, rampup=0.05)
    assert ema_beta(ramp, 32, 1000) == pytest.approx(0.5 ** (32 / 50))
    assert ema_beta(EMAConfig(decay=0.9), 32, 0) == 0.9


def test_sampler_shards_partition_the_global_batch():
    one = StepBatchSampler(10, 4, seed=3)
    r0 = StepBatchSampler(10, 4, rank=0, world_size=2, seed=3)
    r1 = StepBatchSampler(10, 4, rank=1, world_size=2, seed=3)
    for step in range(7):  # crosses epochs
        assert one.batch_indices(step) == r0.batch_indices(step) + r1.batch_indices(step)
    seen = sum((one.batch_indices(s) for s in range(5)), [])
    assert sorted(seen[:10]) == list(range(10))      # an epoch is a permutation
    resumed = StepBatchSampler(10, 4, seed=3, start_step=4, steps=6)
    assert list(resumed) == [one.batch_indices(4), one.batch_indices(5)]
    with pytest.raises(ValueError, match="not divisible"):
        StepBatchSampler(10, 3, world_size=2)


# ------------------------------------------------------------------------------------------
# end to end, resume, checkpoints
# ------------------------------------------------------------------------------------------

def test_run_without_imageio_finishes_without_its_preview_clip(tmp_path, monkeypatch, caplog):
    # the `prepare` extra alone has no imageio: the run still ends, with the PNG previews
    import sys

    monkeypatch.setitem(sys.modules, "imageio", None)
    monkeypatch.setitem(sys.modules, "imageio.v2", None)
    cfg = tiny(tmp_path, "train.steps=2", "train.image_every=0", "train.video_frames=2")
    with caplog.at_level("WARNING", logger="pyface"):
        res = Trainer(cfg).fit()
    assert res.step == 2 and res.previews == [str(tmp_path / "run" / "previews" /
                                                  "step-000002.png")]
    assert sorted(os.listdir(tmp_path / "run" / "previews")) == ["step-000002.png"]
    assert any("preview video" in r.getMessage() and "imageio" in r.getMessage()
               and ".[train]" in r.getMessage() for r in caplog.records)


def test_check_choice_names_the_key_the_choices_and_the_value():
    # pyface.train.model.check_choice, the check model packages use for a field that takes one
    # of a fixed set of values, is the ops' check: one message, choices shown as a tuple
    from pyface.ops._checks import check_choice as ops_check_choice
    from pyface.train.model import check_choice

    assert check_choice("model.cond", "e2e", ("direct", "e2e")) is None
    assert check_choice("model.flag", False, (True, False)) is None
    for choices in (("a", "b"), ["a", "b"], {"a": 1, "b": 2}, iter("ab")):
        with pytest.raises(ValueError, match=r"^model\.x: expected one of \('a', 'b'\), got 'c'$"):
            check_choice("model.x", "c", choices)
    with pytest.raises(ValueError, match=r"^model\.x: expected one of \('a', 'b'\), got \['a'\]$"):
        check_choice("model.x", ["a"], {"a": 1, "b": 2})      # unhashable: the same ValueError
    with pytest.raises(ValueError) as ours:
        check_choice("mode", None, ("fast", "exact"))
    with pytest.raises(ValueError) as ops:
        ops_check_choice("mode", None, ("fast", "exact"))
    assert str(ours.value) == str(ops.value) == "mode: expected one of ('fast', 'exact'), got None"


def test_resolve_device_names_the_option_and_value(monkeypatch):
    from pyface.train.cli import resolve_device

    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"--device: expected cpu, cuda or cuda:N, got 'gpu0'"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"
    with pytest.raises(ValueError, match=r"--device: got 'cuda', but CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(ValueError, match=r"got 'cuda:1', but there is 1 CUDA device \(cuda:0\)$"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"got 'cuda:2', but there are 2 CUDA devices \(cuda:0.."
                                         r"cuda:1\)$"):
        resolve_device("cuda:2")


def test_cli_animate_and_eval_refuse_an_unavailable_device(tmp_path, capsys, monkeypatch):
    from pyface.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["animate", "example", "--checkpoint", str(tmp_path), "--source", "x.png",
                 "--device", "cuda"]) == 2
    assert main(["eval", "copy-source", "--data", str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("pyface animate: --device: got 'cuda', but CUDA is not available")
    assert err[1].startswith("pyface eval: --device: got 'cuda', but CUDA is not available")


def test_example_end_to_end_writes_run_folder(tmp_path):
    cfg = tiny(tmp_path, "train.steps=4", "train.tensorboard=true", "train.image_every=2",
               "train.video_frames=4", "train.ckpt_every=2")
    tr = Trainer(cfg)
    res = tr.fit()
    run = tmp_path / "run"
    assert res.step == 4 and not res.interrupted
    assert math.isfinite(res.losses["main/loss"])
    assert (run / "config.yaml").is_file() and (run / "log.txt").is_file()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tb"))
    assert sorted(os.listdir(run / "previews")) == ["step-000002.png", "step-000004.mp4",
                                                    "step-000004.png"]
    import imageio.v2 as imageio

    frames = imageio.mimread(str(run / "previews" / "step-000004.mp4"))
    assert len(frames) == 4 and frames[0].shape == (16, 64, 3)   # 4 items side by side
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run / "tb"))
    ev.Reload()
    assert "loss/main/loss" in ev.Tags()["scalars"] and "preview" in ev.Tags()["images"]
    assert [e.step for e in ev.Scalars("loss/main/loss")] == [1, 2, 3, 4]
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [2, 4]
    assert ckpt.latest_checkpoint(str(run)).endswith("ckpt-000004")


def test_training_reduces_the_loss(tmp_path):
    cfg = tiny(tmp_path, "train.steps=40", "train.log_every=40", "train.ckpt_every=0",
               "model.lr=0.01", "train.lr_schedule.kind=constant", "train.lr_schedule.warmup_steps=0")
    tr = Trainer(cfg)
    batch = tr.preview_batch(4)
    with torch.no_grad():
        before = (tr.model(batch["image"])[0] - batch["image"]).abs().mean().item()
    tr.fit()
    with torch.no_grad():
        after = (tr.model(batch["image"])[0] - batch["image"]).abs().mean().item()
    assert after < 0.8 * before


def test_exact_resume_matches_uninterrupted(tmp_path):
    """2N steps == N steps + resume + N steps, bit for bit (weights, EMA, optimizer)."""
    extra = ["train.ckpt_every=0", "train.ema.modules=encoder,decoder", "train.ema.decay=0.7"]
    full = Trainer(tiny(tmp_path, "train.steps=6", *extra, name="full"))
    full.fit()
    a = Trainer(tiny(tmp_path, "train.steps=3", *extra, name="split"))
    a.fit()
    b = Trainer(tiny(tmp_path, "train.steps=6", *extra, name="split"))
    assert b.resume("auto").endswith("ckpt-000003")
    assert b.step == 3
    b.fit()
    for k, v in params(full.model).items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    for name in ("encoder", "decoder"):
        for k, v in full.ema.modules[name].state_dict().items():
            assert torch.equal(v, b.ema.modules[name].state_dict()[k]), f"ema.{name}.{k}"
    sa, sb = full.optimizers["main"].state_dict(), b.optimizers["main"].state_dict()
    for i, st in sa["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][i][k]))
    # and the uninterrupted EMA moved away from the weights (the test would catch a no-op EMA)
    assert not torch.equal(full.ema.modules["decoder"].state_dict()["0.weight"],
                           full.model.decoder.state_dict()["0.weight"])


def test_corrupt_checkpoint_is_refused(tmp_path):
    tr = Trainer(tiny(tmp_path, "train.steps=2", "train.ckpt_every=1"))
    path = tr.fit().checkpoint
    tfile = os.path.join(path, ckpt.TENSORS_FILE)
    data = bytearray(open(tfile, "rb").read())
    data[-5] ^= 0xFF
    open(tfile, "wb").write(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        Trainer(tiny(tmp_path, "train.steps=2")).resume(path)
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)corrupt.*Other checkpoints of this run "
                                                   r".*ckpt-000001"):
        Trainer(tiny(tmp_path, "train.steps=3")).resume("auto")
    os.remove(tfile)
    with pytest.raises(ckpt.CheckpointError, match="tensors.safetensors is missing"):
        ckpt.load_folder(path)
    with pytest.raises(ckpt.CheckpointError, match="not a folder"):
        ckpt.load_folder(str(tmp_path / "nope"))


def test_mismatched_checkpoint_is_refused(tmp_path):
    path = Trainer(tiny(tmp_path, "train.steps=1")).fit().checkpoint
    other = Trainer(tiny(tmp_path, "train.steps=2", "model.hidden=16", name="other"))
    with pytest.raises(ckpt.CheckpointError, match=r"model\.hidden: checkpoint 8 vs run 16"):
        other.load_checkpoint(path)
    # same config but a different architecture in the state: names the keys and shapes
    tensors, meta = ckpt.load_folder(path)
    tensors["model.decoder.0.weight"] = torch.zeros(3, 3)
    del tensors["model.decoder.2.bias"]
    ckpt.save_folder(str(tmp_path / "edited"), tensors, meta)
    fresh = Trainer(tiny(tmp_path, "train.steps=2", name="fresh"))
    with pytest.raises(ckpt.CheckpointError,
                       match=r"missing keys: decoder\.2\.bias.*shape mismatches: decoder\.0\.weight:"
                             r" checkpoint \(3, 3\) vs model \(8, 4\)"):
        fresh.load_checkpoint(str(tmp_path / "edited"))


def test_resume_takes_a_model_key_the_checkpoint_lacks_as_its_default(tmp_path):
    """A checkpoint written before a model field existed resumes when this run keeps the
    field's default (as a finished stage run is reused), and is refused when it does not."""
    path = Trainer(tiny(tmp_path, "train.steps=1")).fit().checkpoint
    tensors, meta = ckpt.load_folder(path)
    del meta["experiment"]["model_config"]["plane_reg"]
    ckpt.save_folder(str(tmp_path / "older"), tensors, meta)
    again = Trainer(tiny(tmp_path, "train.steps=2", name="again"))
    again.load_checkpoint(str(tmp_path / "older"))
    assert again.step == 1
    other = Trainer(tiny(tmp_path, "train.steps=2", "model.plane_reg=0.5", name="other"))
    with pytest.raises(ckpt.CheckpointError, match=r"model\.plane_reg: checkpoint 0\.0001 vs "
                                                   r"run 0\.5"):
        other.load_checkpoint(str(tmp_path / "older"))


def test_saved_config_gives_missing_fixed_fields_their_earlier_values():
    """A field whose default changed training lists the earlier value in ``saved_before``: a
    saved config without it gets that value, one with it keeps its own, a new config (the
    dataclass) gets the default; classes without ``saved_before`` are unchanged."""
    from pyface.train.config import from_dict, saved_config
    from pyface.train.model import config_from_dict

    @dataclass
    class Fixed:
        a: int = 1
        fix: bool = False
        saved_before: typing.ClassVar[dict] = {"fix": True}

    @dataclass
    class Plain:
        a: int = 1

    assert saved_config(Fixed, {"a": 2}) == {"fix": True, "a": 2}
    assert saved_config(Fixed, {"fix": False}) == {"fix": False}
    assert saved_config(Plain, {"a": 2}) == {"a": 2}
    assert saved_config(Fixed, None) is None
    assert config_from_dict(Fixed, {"a": 2}) == Fixed(a=2, fix=True)
    assert config_from_dict(Fixed, {"a": 2, "fix": False}) == Fixed(a=2, fix=False)
    assert from_dict(Fixed, {"a": 2}) == Fixed(a=2) and Fixed().fix is False
    assert [f.name for f in dataclasses.fields(Fixed)] == ["a", "fix"]


def test_cli_resume_errors_and_changed_settings(tmp_path, capsys, caplog):
    """``--resume`` of another model's run, or with another model config (a forgotten
    ``--preset``), stops with exit code 1 naming the difference and the way out; changed train /
    data settings apply and are listed in a warning."""
    import logging

    from pyface.cli import main

    run = tmp_path / "run"
    sets = sum((["--set", s] for s in TINY + [f"train.run_dir={run}"]), [])
    assert main(["train", "example", *sets, "--set", "train.steps=1"]) == 0
    capsys.readouterr()
    assert main(["train", "example", *sets, "--set", "train.steps=2", "--set",
                 "model.hidden=16", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "model config differs (model.hidden: checkpoint 8 vs run 16)" in err
    assert "--config RUN/config.yaml --resume" in err
    # another model's run: its checkpoint names the model it trained
    tensors, meta = ckpt.load_folder(ckpt.latest_checkpoint(str(run)))
    meta["experiment"]["model"] = "eg3d"
    ckpt.save_folder(str(tmp_path / "eg3d-ckpt"), tensors, meta)
    assert main(["train", "example", *sets, "--set", "train.steps=2", "--resume",
                 str(tmp_path / "eg3d-ckpt")]) == 1
    assert "trained model 'eg3d', this run trains 'example'" in capsys.readouterr().err
    # the command's train/data values apply on resume, listed in a warning
    with caplog.at_level(logging.WARNING, logger="pyface.train"):
        assert main(["train", "example", *sets, "--set", "train.steps=2", "--set",
                     "train.log_every=2", "--resume"]) == 0
    warned = [r.getMessage() for r in caplog.records
              if "differ from the checkpoint" in r.getMessage()]
    assert len(warned) == 1 and "(this command's values apply from step 1 on)" in warned[0]
    assert "train.steps: 1 -> 2" in warned[0]
    assert "train.log_every: 1 -> 2" in warned[0]
    assert "run_dir" not in warned[0]
    # --config of the run's config.yaml resumes it unchanged: no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyface.train"):
        assert main(["train", "example", "--config", str(run / "config.yaml"), "--resume"]) == 0
    assert not [r for r in caplog.records if "differ from the checkpoint" in r.getMessage()]



def test_resume_with_another_number_of_ranks_warns(tmp_path, caplog):
    """A checkpoint written by a 2-rank run resumed on one process: the run continues (same
    global batch, same data order) with a warning that it does not continue exactly as on 2
    ranks; the same number of ranks gives no such warning."""
    import logging

    a = Trainer(tiny(tmp_path, "train.steps=1", "train.ckpt_every=1"))
    first = a.fit().checkpoint
    assert ckpt.read_meta(first)["world_size"] == 1
    tensors, meta = ckpt.load_folder(first)
    ckpt.save_folder(str(tmp_path / "two-ranks"), tensors, dict(meta, world_size=2))
    for where, warned in ((first, False), (str(tmp_path / "two-ranks"), True)):
        b = Trainer(tiny(tmp_path, "train.steps=2", name="resumed"))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pyface.train"):
            b.resume(where)
        got = [r.getMessage() for r in caplog.records if "resuming a run" in r.getMessage()]
        assert got == ([
            "resuming a run trained on 2 ranks with 1: the global batch (train.batch_size) "
            "and the data order are kept, but randomness drawn inside step (seeded per rank), "
            "batch statistics (taken per rank) and the gradient summation order change, so the "
            "run does not continue exactly as it would have on 2; resume with the same number "
            "of ranks for that"] if warned else []), where
        assert b.step == 1
        b.fit()

def test_failed_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    tr = Trainer(tiny(tmp_path, "train.steps=2", "train.ckpt_every=1"))
    tr.fit()
    run = str(tmp_path / "run")
    good = ckpt.latest_checkpoint(run)
    before = open(os.path.join(good, ckpt.TENSORS_FILE), "rb").read()

    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        tr.save_checkpoint()              # step 2 again: would replace ckpt-000002
    with pytest.raises(OSError, match="disk full"):
        tr.save_checkpoint(ckpt.checkpoint_path(run, 3))
    assert ckpt.latest_checkpoint(run) == good
    assert open(os.path.join(good, ckpt.TENSORS_FILE), "rb").read() == before
    assert not any(".tmp-" in n for n in os.listdir(os.path.join(run, "checkpoints")))
    ckpt.load_folder(good)


class _Toy(TrainableModel):
    """y = w x with an optional NaN at a chosen step, a lazy phase and a signal hook."""

    @dataclass
    class Config:
        nan_at: int = -1
        kill_at: int = -1

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.w = torch.nn.Parameter(torch.ones(3))
        self.calls: list[tuple[int, str]] = []

    def build_optimizers(self):
        return {"opt": torch.optim.SGD(self.parameters(), lr=0.1)}

    def phases(self):
        return [Phase("main", "opt"), Phase("reg", "opt", interval=3)]

    def step(self, phase, batch, ctx):
        self.calls.append((ctx.step, phase))
        if ctx.step == self.cfg.kill_at and phase == "main":
            os.kill(os.getpid(), signal.SIGTERM)
        loss = (self.w * batch["x"]).sum(-1).square().mean()
        if phase == "reg":
            loss = 3 * 1e-3 * self.w.square().sum()
        if ctx.step == self.cfg.nan_at:
            loss = loss * float("nan")
        return {"loss": loss}


class _Data(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"x": torch.full((3,), float(i) / 16)}


def _toy(tmp_path, cfg, *extra):
    exp = build_experiment("toy", _Toy.Config,
                           overrides=[f"train.run_dir={tmp_path / 'toy'}", "train.batch_size=2",
                                      "train.progress=false", "train.tensorboard=false",
                                      "train.image_every=0", *extra])
    exp.model_config = cfg
    return Trainer(exp, model=_Toy(cfg), dataset=_Data())


def test_lazy_phases_run_on_their_interval(tmp_path):
    tr = _toy(tmp_path, _Toy.Config(), "train.steps=7", "train.ckpt_every=0")
    tr.fit()
    assert [s for s, p in tr.model.calls if p == "reg"] == [0, 3, 6]
    assert [s for s, p in tr.model.calls if p == "main"] == list(range(7))


def test_nan_guard_stops_before_the_update(tmp_path):
    tr = _toy(tmp_path, _Toy.Config(nan_at=5), "train.steps=10", "train.ckpt_every=2")
    with pytest.raises(NonFiniteError, match=r"step 5, phase 'main': loss is nan; stopped before "
                                             r"applying the update\. Last good checkpoint: .*ckpt-000004"):
        tr.fit()
    assert torch.isfinite(tr.model.w).all()
    assert ckpt.latest_checkpoint(str(tmp_path / "toy")).endswith("ckpt-000004")


def test_grad_norm_guard(tmp_path):
    tr = _toy(tmp_path, _Toy.Config(), "train.steps=3", "train.max_grad_norm=1e-9")
    with pytest.raises(NonFiniteError, match="exceeds train.max_grad_norm"):
        tr.fit()


def test_sigterm_checkpoints_and_stops(tmp_path):
    tr = _toy(tmp_path, _Toy.Config(kill_at=2), "train.steps=50", "train.ckpt_every=0")
    before = signal.getsignal(signal.SIGTERM)
    res = tr.fit()
    assert signal.getsignal(signal.SIGTERM) is before          # handlers restored
    assert res.interrupted and res.step == 3
    assert res.checkpoint.endswith("ckpt-000003")
    again = _toy(tmp_path, _Toy.Config(kill_at=2), "train.steps=5", "train.ckpt_every=0")
    again.resume()
    assert again.step == 3
    assert not again.fit().interrupted


def test_a_stop_signal_after_a_stopped_fit_exits_at_once_with_the_given_code(tmp_path,
                                                                             monkeypatch):
    """pyface train sets exit_after_stop=143: once a stop signal has ended fit, a further one
    (torchrun's SIGTERM to a rank on its way out after another exited) exits at once with 143;
    the handlers that were there before fit (the default action, exit code -15) are not put
    back. A fit that was not stopped, or a Trainer without exit_after_stop, restores them."""
    from pyface.train import engine

    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    saved = {s: signal.getsignal(s) for s in engine.STOP_SIGNALS}
    try:
        done = _toy(tmp_path, _Toy.Config(), "train.steps=2", "train.ckpt_every=0")
        done.exit_after_stop = 143
        assert not done.fit().interrupted
        assert all(signal.getsignal(s) is h for s, h in saved.items())    # not stopped
        tr = _toy(tmp_path / "b", _Toy.Config(kill_at=1), "train.steps=50",
                  "train.ckpt_every=0")
        tr.exit_after_stop = 143
        assert tr.fit().interrupted
        for s in engine.STOP_SIGNALS:
            handler = signal.getsignal(s)
            assert handler is not saved[s]
            with pytest.raises(SystemExit):
                handler(s, None)
        assert exits == [143] * len(engine.STOP_SIGNALS)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_grad_clip_limits_the_update(tmp_path):
    tr = _toy(tmp_path, _Toy.Config(), "train.steps=1", "train.grad_clip=1e-3",
              "train.ckpt_every=0")
    w0 = tr.model.w.detach().clone()
    tr.fit()
    # two clipped SGD updates at step 0 (main and the lazy phase), both along (1, 1, 1)
    assert (tr.model.w - w0).norm().item() == pytest.approx(2 * 0.1 * 1e-3, rel=2e-3)  # fp32 ulp at 1.0


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

def test_cli_train_resume_and_animate(tmp_path, capsys):
    from pyface.cli import main

    run = tmp_path / "cli"
    args = ["train", "example", *sum((["--set", s] for s in TINY), []),
            "--set", f"train.run_dir={run}", "--set", "train.steps=2"]
    assert main(args) == 0
    assert (run / "checkpoints" / "ckpt-000002").is_dir()
    assert main(args[:-1] + ["train.steps=3", "--resume"]) == 0
    assert ckpt.latest_checkpoint(str(run)).endswith("ckpt-000003")
    assert main(["train", "example", "--set", "train.nope=1"]) == 2
    assert "train.nope: unknown key" in capsys.readouterr().err
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "src.png")
    out = tmp_path / "anim.mp4"
    assert main(["animate", "example", "--checkpoint", str(run), "--source",
                 str(tmp_path / "src.png"), "--out", str(out), "--frames", "4", "--ema"]) == 0
    assert out.stat().st_size > 0
    assert main(["animate", "nosuchmodel", "--checkpoint", str(run), "--source", "x.png"]) == 2
    assert main(["animate", "example", "--checkpoint", str(tmp_path / "none"), "--source",
                 str(tmp_path / "src.png")]) == 1
    assert main(["train", "example", "--set", "train.batch_size=3", "--set",
                 f"train.run_dir={run}", "--set", "train.precision=fp8"]) == 2
    err = capsys.readouterr().err
    assert "it does not exist" in err and "train.precision: expected 'fp32' or 'bf16'" in err


@pytest.mark.parametrize("cmd", [[], ["train"], ["animate"], ["convert"], ["convert", "eg3d"]])
def test_cli_help(cmd, capsys):
    from pyface.cli import main

    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    assert "usage: pyface" in capsys.readouterr().out


def test_resuming_a_finished_run_does_not_rewrite_its_checkpoint(tmp_path):
    """No step to run: the checkpoint resumed from stays as it is (not replaced by an equal
    copy, which would open a window where a kill leaves no checkpoint of that step)."""
    path = Trainer(tiny(tmp_path, "train.steps=2", "train.ckpt_every=0")).fit().checkpoint
    tensors = os.path.join(path, ckpt.TENSORS_FILE)
    before = os.stat(tensors)
    again = Trainer(tiny(tmp_path, "train.steps=2"))
    again.resume("auto")
    res = again.fit()
    assert res.step == 2 and res.checkpoint == path
    after = os.stat(tensors)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_resume_from_a_run_folder_takes_its_latest_checkpoint(tmp_path):
    Trainer(tiny(tmp_path, "train.steps=2", "train.ckpt_every=1")).fit()
    other = Trainer(tiny(tmp_path, "train.steps=3", name="other"))
    assert other.resume(str(tmp_path / "run")).endswith("ckpt-000002") and other.step == 2
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ckpt.CheckpointError, match="empty: a run folder without a complete"):
        other.resume(str(tmp_path / "empty"))


def test_checkpoints_after_the_resumed_step_are_set_aside(tmp_path, caplog):
    """A 6-step run (checkpoints 2, 4, 6) resumed from ckpt-000002: its checkpoints 4 and 6 are
    from an abandoned future; they move to checkpoints/abandoned/ when training starts, so
    `--resume RUN` continues the new run (also when it was killed before its first checkpoint,
    where `latest` still named ckpt-000006), and the pruning keeps the new run's checkpoints."""
    import logging

    from _train_toys import inverter_trainer

    run = str(tmp_path / "run")
    root = os.path.join(run, "checkpoints")
    trainer = lambda *a: inverter_trainer([f"train.run_dir={run}", "train.ckpt_every=2",  # noqa
                                           "train.keep_ckpts=3", *a], 4)
    tr = trainer("train.steps=6")
    tr.fit()
    w6 = params(tr.model)
    tr = trainer("train.steps=6")
    assert tr.resume(ckpt.checkpoint_path(run, 2)) and tr.step == 2
    real = tr.train_step

    def killed_at_3(batch):
        if tr.step == 3:
            raise RuntimeError("killed")
        return real(batch)

    tr.train_step = killed_at_3
    with caplog.at_level(logging.WARNING, logger="pyface"), pytest.raises(RuntimeError):
        tr.fit()
    assert ("moved 2 checkpoints of steps after step 2 to checkpoints/abandoned "
            "(ckpt-000004, ckpt-000006)") in caplog.text
    assert sorted(os.listdir(root)) == ["abandoned", "ckpt-000002", "latest"]
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_path(run, 2)
    tr = trainer("train.steps=3")
    assert tr.resume() == ckpt.checkpoint_path(run, 2) and tr.step == 2
    assert tr.fit().step == 3
    # the new run's checkpoints are kept (ckpt-000002 was pruned before ckpt-000004 and 6)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 3]
    assert trainer("train.steps=3").resume() == ckpt.checkpoint_path(run, 3)
    # the abandoned weights are kept, never listed; a name taken there gets a suffix
    tr = trainer("train.steps=6")
    tr.resume(ckpt.checkpoint_path(run, 2))
    tr.fit()
    tr = trainer("train.steps=6")
    tr.resume(ckpt.checkpoint_path(run, 2))
    tr.fit()
    assert sorted(os.listdir(os.path.join(root, "abandoned"))) == [
        "ckpt-000003", "ckpt-000004", "ckpt-000004.1", "ckpt-000006", "ckpt-000006.1"]
    tensors, meta = ckpt.load_folder(os.path.join(root, "abandoned", "ckpt-000006"))
    assert meta["step"] == 6 and all(torch.equal(tensors[f"model.{k}"], v)
                                     for k, v in w6.items())
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4, 6]
    # `--resume RUN/checkpoints/abandoned/ckpt-N` continues in RUN
    from pyface.train.cli import _resumed_run_dir

    assert _resumed_run_dir(os.path.join(root, "abandoned", "ckpt-000003")) == run
    tr = trainer("train.steps=6")
    assert tr.resume(os.path.join(root, "abandoned", "ckpt-000003")) and tr.step == 3


def test_video_frames_zero_writes_no_preview_clip(tmp_path):
    res = Trainer(tiny(tmp_path, "train.steps=1", "train.video_frames=0")).fit()
    assert res.previews and not [p for p in res.previews if p.endswith(".mp4")]


def test_resolution_mismatch_is_a_clear_error(tmp_path):
    tr = Trainer(tiny(tmp_path, "train.steps=1", "data.resolution=32"))
    with pytest.raises(ValueError, match=r"batch\['image'\]: expected \(B, 3, 16, 16\)"):
        tr.fit()


def test_bf16_autocast_step(tmp_path):
    tr = Trainer(tiny(tmp_path, "train.steps=2", "train.precision=bf16", "train.ckpt_every=0"))
    res = tr.fit()
    assert math.isfinite(res.losses["main/loss"])
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    with pytest.raises(ValueError, match="train.precision: expected 'fp32' or 'bf16'"):
        Trainer(tiny(tmp_path, "train.precision=fp16"))


class _TinyGAN(TinyGAN):
    """The toy GAN of ``_train_toys`` (G / D / lazy-R1 phases, a double backward through D)
    with EG3D's lazy-regularisation compensation of D's Adam and single-process phases."""

    Config = TinyGANConfig

    def build_optimizers(self):
        lr, betas = lazy_regularization(2e-3, (0.0, 0.99), self.cfg.r1_interval)
        return {"G": torch.optim.Adam(self.G.parameters(), 2e-3, betas=(0.0, 0.99)),
                "D": torch.optim.Adam(self.D.parameters(), lr, betas=betas)}

    def phases(self):
        return [Phase("G", "G"), Phase("D", "D"), Phase("Dreg", "D", self.cfg.r1_interval)]


def test_gan_with_lazy_r1_trains_through_the_engine(tmp_path):
    from pyface.train.data import ProceduralFaces

    exp = build_experiment("gan", _TinyGAN.Config, overrides=[
        f"train.run_dir={tmp_path / 'gan'}", "train.batch_size=4", "train.steps=4",
        "train.progress=false", "train.tensorboard=false", "train.image_every=0",
        "train.log_every=2", "train.ema.modules=G", "train.ema.half_life_kimg=0.01",
        "train.ema.rampup=0.05"])
    model = _TinyGAN(exp.model_config)
    d0 = {k: v.clone() for k, v in model.D.state_dict().items()}
    tr = Trainer(exp, model=model, dataset=ProceduralFaces(size=16, resolution=8))
    res = tr.fit()
    # the last log window (steps 2, 3) holds one R1 step (step 2; interval 2)
    assert {"G/loss", "D/loss", "Dreg/loss", "Dreg/r1"} <= set(res.losses)
    assert res.losses["Dreg/loss"] == pytest.approx(res.losses["Dreg/r1"] * 0.5 * 2)
    assert res.losses["Dreg/r1"] > 0
    assert any(not torch.equal(d0[k], v) for k, v in model.D.state_dict().items())
    assert tr.ema.modules["G"].b8.conv1.weight.shape == model.G.b8.conv1.weight.shape


def test_gan_exact_resume_with_random_latents(tmp_path):
    """Random latents, two optimizers, a lazy phase and EMA: N + resume + N == 2N bit for bit."""
    from pyface.train.data import ProceduralFaces

    def make(name, steps):
        exp = build_experiment("gan", _TinyGAN.Config, overrides=[
            f"train.run_dir={tmp_path / name}", "train.batch_size=4", f"train.steps={steps}",
            "train.progress=false", "train.tensorboard=false", "train.image_every=0",
            "train.ckpt_every=0", "train.ema.modules=G", "train.ema.decay=0.5"])
        torch.manual_seed(0)   # a model passed in is initialised by the caller
        return Trainer(exp, model=_TinyGAN(exp.model_config),
                       dataset=ProceduralFaces(size=16, resolution=8))

    full = make("full", 5)
    full.fit()
    a = make("split", 3)
    a.fit()
    b = make("split", 5)
    b.resume()
    b.fit()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    for k, v in full.ema.modules["G"].state_dict().items():
        assert torch.equal(v, b.ema.modules["G"].state_dict()[k]), k


def test_example_trains_on_the_synthetic_data(tmp_path):
    from pyface.data.synthetic import SynthConfig, generate

    root = tmp_path / "synth"
    generate(str(root), SynthConfig(identities=1, videos_per_identity=1, frames=4, resolution=16,
                                    cross=False, workers=1), progress=False)
    tr = Trainer(tiny(tmp_path, "train.steps=2", "train.ckpt_every=0", "data.name=synthetic",
                      f"data.path={root}"))
    item = tr.dataset[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1 and item["camera"].shape == (25,)
    res = tr.fit()
    assert res.step == 2 and math.isfinite(res.losses["main/loss"])


def test_skip_bad_option_reaches_the_dataset(tmp_path):
    from pyface.data.format import DataError
    from pyface.data.synthetic import SynthConfig, generate

    root = tmp_path / "synth"
    generate(str(root), SynthConfig(identities=2, videos_per_identity=1, frames=3, resolution=16,
                                    cross=False, workers=1), progress=False)
    bad = sorted(p for p in root.iterdir() if p.is_dir())[0]
    (bad / "coeffs.npy").write_bytes(b"not a numpy file")
    args = ("train.steps=1", "data.name=synthetic", f"data.path={root}")
    with pytest.raises(DataError, match="coeffs.npy"):
        Trainer(tiny(tmp_path, *args))
    with pytest.warns(UserWarning, match="coeffs.npy"):
        tr = Trainer(tiny(tmp_path, *args, "data.skip_bad=true", name="skip"))
    assert len(tr.dataset) == 3  # the good video's frames only


def test_print_config_round_trips_through_config_for_every_model(tmp_path, capsys):
    """``pyface train M [--preset P] --print-config`` output given back with ``--config``
    prints the same config, preset included (a staged model's stages train with it), for every
    registered model and preset."""
    import yaml

    from pyface.cli import main
    from pyface.train.registry import MODELS, model_class

    checked = 0
    for name in sorted(MODELS):
        for preset in [None, *sorted(getattr(model_class(name), "presets", None) or {})]:
            first = ["train", name, "--print-config"] + (["--preset", preset] if preset else [])
            assert main(first) == 0, (name, preset)
            printed = capsys.readouterr().out
            path = tmp_path / f"{name}-{preset}.yaml"
            path.write_text(printed)
            assert main(["train", name, "--print-config", "--config", str(path)]) == 0
            again = capsys.readouterr().out
            assert yaml.safe_load(again) == yaml.safe_load(printed), (name, preset)
            assert yaml.safe_load(again)["preset"] == preset
            checked += 1
    assert checked >= 10 + 3 * 9      # every model, the portrait models' three presets


def test_run_dir_of_another_model_or_a_file_is_refused(tmp_path, capsys):
    """``pyface train M`` (and ``--print-config``) into a run folder whose checkpoints are another
    model's, into a file, or with a placeholder other than ``{model}`` exits with code 2 naming
    it; nothing is written there."""
    from pyface.cli import main

    other = tmp_path / "other"
    ckpt.save_folder(ckpt.checkpoint_path(str(other), 3), {"w": torch.zeros(1)},
                     {"kind": "train", "step": 3, "experiment": {"model": "eg3d"}})
    before = sorted(p.name for p in other.rglob("*"))
    for extra in ([], ["--print-config"], ["--resume"]):
        assert main(["train", "example", *sum((["--set", s] for s in TINY), []), "--set",
                     f"train.run_dir={other}", "--set", "train.steps=1", *extra]) == 2
        err = capsys.readouterr().err
        assert (f"train.run_dir={other}: holds a run of model 'eg3d' (latest checkpoint "
                f"ckpt-000003); training 'example' there would overwrite it" in err), err
    assert sorted(p.name for p in other.rglob("*")) == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train", "example", "--set", f"train.run_dir={afile}", "--print-config"]) == 2
    assert f"train.run_dir={afile}: a file, not a folder" in capsys.readouterr().err
    for extra in ([], ["--print-config"]):   # below a file: one line, not a NotADirectoryError
        assert main(["train", "example", "--set", f"train.run_dir={afile / 'run'}",
                     *extra]) == 2
        assert capsys.readouterr().err == (f"pyface train: train.run_dir={afile / 'run'}: "
                                           f"cannot create its folder: {afile} is a file\n")
    with pytest.raises(ConfigError, match=r"train\.run_dir: only \{model\} is replaced .*got "
                                          r"'runs/\{name\}'"):
        build_experiment("example", TriplaneAutoencoder.Config,
                         overrides=["train.run_dir=runs/{name}"])


def test_resume_without_a_checkpoint_warns(tmp_path, caplog):
    import logging

    from pyface.cli import main

    with caplog.at_level(logging.WARNING, logger="pyface.train"):
        assert main(["train", "example", *sum((["--set", s] for s in TINY), []), "--set",
                     f"train.run_dir={tmp_path / 'new'}", "--set", "train.steps=1",
                     "--resume"]) == 0
    assert any(f"--resume: {tmp_path / 'new'} holds no checkpoint; training from scratch"
               in r.getMessage() for r in caplog.records)


def test_preset_with_a_resolved_config_of_another_preset_is_refused(tmp_path, capsys):
    """``--preset P --config FILE`` where FILE is ``--print-config`` output of another preset
    (or of none): FILE's values would replace P's, so P would only relabel the run (and its
    stages); refused. The same preset, or a plain YAML of sections, is taken."""
    from pyface.cli import main

    assert main(["train", "goha", "--preset", "gpu-short", "--print-config"]) == 0
    path = tmp_path / "gpu-short.yaml"
    path.write_text(capsys.readouterr().out)
    assert main(["train", "goha", "--preset", "tiny", "--config", str(path),
                 "--print-config"]) == 2
    assert (f"--preset 'tiny': --config {path} is a resolved config built with preset "
            f"'gpu-short', whose values replace the preset's; leave out --preset"
            in capsys.readouterr().err)
    assert main(["train", "goha", "--preset", "gpu-short", "--config", str(path),
                 "--print-config"]) == 0
    capsys.readouterr()
    plain = tmp_path / "plain.yaml"
    plain.write_text("train: {steps: 7}\n")
    cfg = _portrait("goha", preset="tiny", yaml_path=str(plain))
    assert (cfg.preset, cfg.train.steps) == ("tiny", 7)


def test_a_stage_run_dir_override_is_refused(capsys):
    """A stage trains in ``<run_dir>/stages/<name>``: ``stages.<name>.train.run_dir`` (which the
    stage's folder replaced silently) is refused, naming the checkpoint key that takes a run
    from elsewhere."""
    from pyface.cli import main

    assert main(["train", "mmfa_vae", "--preset", "tiny", "--set",
                 "stages.mmfa.train.run_dir=/elsewhere", "--print-config"]) == 2
    assert ("stage 'mmfa' trains in the run folder's stages/mmfa; to use a run of 'mmfa' from "
            "elsewhere, pass it as --set model.mmfa_checkpoint=RUN" in capsys.readouterr().err)
    assert main(["train", "goha", "--preset", "tiny", "--set", "stages.s1.train.run_dir=/x",
                 "--print-config"]) == 2
    assert "--set stages.s1_gan.model.s1_checkpoint=RUN" in capsys.readouterr().err


def _stage_configs(monkeypatch, model, argv):
    """The configs ``pyface train MODEL ARGV --print-config`` builds for MODEL's stages."""
    import pyface.train.config as C
    from pyface.cli import main

    built, real = [], C.build_experiment

    def spy(name, *args, **kwargs):
        cfg = real(name, *args, **kwargs)
        if kwargs.get("stage") is not None:
            built.append(cfg)
        return cfg

    monkeypatch.setattr(C, "build_experiment", spy)
    assert main(["train", model, *argv, "--print-config"]) == 0
    return {c.model: c for c in built}


def test_stage_settings_round_trip_through_print_config(tmp_path, capsys, monkeypatch):
    """``--set stages.<name>.*`` is printed as a ``stages:`` section, which ``--config`` takes
    back (a YAML file's ``stages:`` configures the stages as those --set items do), so the
    printed config retrains the same stages."""
    import yaml

    from pyface.cli import main

    sets = ["--set", "stages.s1.train.steps=800", "--set", "stages.s1.model.neutral_weight=5",
            "--set", "stages.s1_gan.data.path=007", "--set", "train.steps=9"]
    first = _stage_configs(monkeypatch, "goha", ["--preset", "tiny", *sets])
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["stages"] == {"s1": {"train": {"steps": 800},
                                                        "model": {"neutral_weight": 5}},
                                                 "s1_gan": {"data": {"path": "007"}}}
    path = tmp_path / "goha.yaml"
    path.write_text(printed)
    again = _stage_configs(monkeypatch, "goha", ["--config", str(path)])
    assert capsys.readouterr().out == printed
    for cfgs in (first, again):
        s1, s1_gan = cfgs["goha_s1"], cfgs["goha_s1_gan"]
        assert (s1.train.steps, s1.model_config.neutral_weight) == (800, 5.0)
        assert (s1_gan.data.path, s1.data.path) == ("007", None)
        assert s1.preset == s1_gan.preset == "tiny"
    # --set stages.* wins over the file's
    later = _stage_configs(monkeypatch, "goha", ["--config", str(path), "--set",
                                                 "stages.s1.train.steps=7"])
    assert later["goha_s1"].train.steps == 7
    assert later["goha_s1"].model_config.neutral_weight == 5.0
    capsys.readouterr()
    # a file's stages section is checked like the --set items
    for text, message in [
            ("stages: {s3: {train: {steps: 1}}}", "stages.s3: not a stage of 'goha' (s1_gan, s1)"),
            ("stages: {s1: {trian: {steps: 1}}}", "stages.s1.trian: unknown section; valid "
                                                  "sections: model, data, train; did you mean "
                                                  "train?"),
            ("stages: {s1: 3}", "stages: expected a mapping {stage name: {model: ..., data: "
                                "..., train: ...}}"),
            ("stages: {s1: {train: {run_dir: x}}}", "stages.s1.train.run_dir: stage 's1' trains "
                                                    "in the run folder's stages/s1")]:
        path.write_text(text + "\n")
        assert main(["train", "goha", "--config", str(path), "--print-config"]) == 2
        assert message in capsys.readouterr().err, text
    path.write_text("stages: {s1: {train: {steps: 1}}}\n")
    assert main(["train", "eg3d", "--config", str(path), "--print-config"]) == 2
    assert "stages.s1: not a stage of 'eg3d' (it has none)" in capsys.readouterr().err


def test_print_config_checks_the_stage_keys_without_training(tmp_path, capsys):
    """``--print-config`` of a staged model builds its stages' configs (a misspelt
    ``stages.<name>.<key>`` is the error the training command gives) and trains nothing."""
    import yaml

    from pyface.cli import main

    run = ["--set", f"train.run_dir={tmp_path / 'run'}"]
    assert main(["train", "otavatar", "--preset", "tiny", *run, "--set",
                 "stages.eg3d.train.stepz=3", "--print-config"]) == 2
    assert ("stage 'eg3d' (eg3d): train.stepz: unknown key for TrainConfig; valid keys: "
            in capsys.readouterr().err)
    assert main(["train", "otavatar", "--preset", "tiny", *run, "--set",
                 "stages.eg3d.train.steps=3", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model_config"]["generator"] is None
    assert not (tmp_path / "run").exists()


def test_run_wide_keys_of_a_config_file_reach_the_stages(tmp_path, capsys, monkeypatch):
    """The run-wide keys (``SHARED_KEYS``) in a ``--config`` YAML of sections reach a staged
    model's stages (OTAvatar tiny's EG3D stage; GOHA's stage of a stage) as the same ``--set``
    items do; ``--print-config`` records them as ``run_wide:``, which ``--config`` gives back,
    so the printed config builds the same stages; a later ``--set`` of a run-wide key wins."""
    import yaml

    from pyface.cli import main
    from pyface.train.config import experiment_to_dict

    sets = ["train.device=cpu", "train.seed=3", "train.log_every=7", "data.skip_bad=true",
            "data.path=007"]
    by_set = _stage_configs(monkeypatch, "otavatar",
                            ["--preset", "tiny", *sum((["--set", s] for s in sets), [])])
    printed = capsys.readouterr().out
    sections = tmp_path / "sections.yaml"
    sections.write_text("train: {device: cpu, seed: 3, log_every: 7}\n"
                        "data: {skip_bad: true, path: '007'}\n")
    by_file = _stage_configs(monkeypatch, "otavatar", ["--preset", "tiny", "--config",
                                                       str(sections)])
    assert capsys.readouterr().out == printed
    eg3d = by_file["eg3d"]
    assert (eg3d.train.device, eg3d.train.seed, eg3d.train.log_every) == ("cpu", 3, 7)
    assert (eg3d.data.skip_bad, eg3d.data.path, eg3d.train.steps) == (True, "007", 1200)
    assert experiment_to_dict(eg3d) == experiment_to_dict(by_set["eg3d"])
    assert yaml.safe_load(printed)["run_wide"] == {
        "train": {"device": "cpu", "seed": 3, "log_every": 7},
        "data": {"skip_bad": True, "path": "007"}}
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(printed)
    again = _stage_configs(monkeypatch, "otavatar", ["--config", str(resolved)])
    assert capsys.readouterr().out == printed
    assert experiment_to_dict(again["eg3d"]) == experiment_to_dict(eg3d)
    later = _stage_configs(monkeypatch, "otavatar", ["--config", str(resolved), "--set",
                                                     "train.device=cuda:1"])
    assert later["eg3d"].train.device == "cuda:1"
    assert yaml.safe_load(capsys.readouterr().out)["run_wide"]["train"]["device"] == "cuda:1"
    # train.compile is run-wide: every stage of a staged model compiles
    capsys.readouterr()
    compiled = _stage_configs(monkeypatch, "goha", ["--preset", "tiny", "--set",
                                                    "train.compile=eager"])
    assert {c.train.compile for c in compiled.values()} == {"eager"} and len(compiled) >= 2
    # the stages of a stage too; a preset's values are not run-wide settings
    goha = _stage_configs(monkeypatch, "goha", ["--preset", "tiny", "--config",
                                                str(sections)])
    assert goha["goha_s1"].train.device == goha["goha_s1_gan"].train.device == "cpu"
    capsys.readouterr()
    assert main(["train", "otavatar", "--preset", "gpu-short", "--print-config"]) == 0
    assert "run_wide" not in yaml.safe_load(capsys.readouterr().out)
    # a model without stages records none
    assert main(["train", "eg3d", "--config", str(sections), "--print-config"]) == 0
    assert "run_wide" not in yaml.safe_load(capsys.readouterr().out)
    # a record of another key, in a run's config is refused naming the run-wide keys
    resolved.write_text(printed.replace("run_wide:\n  train:\n", "run_wide:\n  train:\n"
                                                                 "    steps: 3\n"))
    assert main(["train", "otavatar", "--config", str(resolved), "--print-config"]) == 2
    assert (f"--config {resolved}: run_wide.train.steps: not a run-wide key; run-wide keys: "
            "train.device" in capsys.readouterr().err)


@pytest.mark.parametrize("item, match", [
    ("chunk_pointz=8192", r"model\.render\.chunk_pointz: unknown key for RenderConfig "
                          r"\(overrides\); valid keys: depth_resolution, .*chunk_points; did you "
                          r"mean model\.render\.chunk_points\?"),
    ("plane_axes=eg3d", r"model\.render\.plane_axes: RenderConfig\.plane_axes cannot be "
                        r"overridden here"),
    ("chunk_points=abc", r"model\.render\.chunk_points: expected int, got 'abc'"),
])
def test_otavatar_render_keys_are_checked_when_the_config_is_built(item, match):
    with pytest.raises(ConfigError, match=match):
        _portrait("otavatar", preset="tiny", overrides=[f"model.render.{item}"])


def test_mapping_fields_of_model_configs_declare_their_keys():
    """Every bare ``dict`` field of a registered model's config declares the dataclass whose
    fields are its keys (``keys_of``), so a misspelt key stops the config (OTAvatar's
    ``model.render``: the RenderConfig fields but ``plane_axes``); values take those fields'
    types."""
    import dataclasses

    from pyface.nn.render import RenderConfig
    from pyface.train.registry import MODELS, model_class

    bare, seen = [], set()

    def walk(cls, path):
        if cls in seen:
            return
        seen.add(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{path}.{f.name}")
            elif hints[f.name] in (dict, typing.Any) and not f.metadata.get("keys_of"):
                bare.append(f"{path}.{f.name}")

    for name in sorted(MODELS):
        walk(model_class(name).Config, name)
    assert bare == []
    render = {f.name: f for f in dataclasses.fields(model_class("otavatar").Config)}["render"]
    assert render.metadata["keys_of"] is RenderConfig
    cfg = _portrait("otavatar", preset="tiny", overrides=["model.render.chunk_points=4096",
                                                          "model.render.ray_start=2"])
    assert cfg.model_config.render == {"recompute": "decoder", "chunk_points": 4096,
                                       "ray_start": 2.0}
    assert type(cfg.model_config.render["ray_start"]) is float


@dataclass
class _StagedAEConfig(TriplaneAutoencoder.Config):
    stage1_checkpoint: str | None = None


class _StagedAE(TriplaneAutoencoder):
    """The example model on top of an ``example`` stage whose ``tiny`` addition trains on clips
    (options for clips)."""
    Config = _StagedAEConfig
    stages = (Stage("s1", "example", "stage1_checkpoint",
                    presets={"tiny": {"data": {"name": "clips", "options": {"frames": 6}}}}),)


def test_a_stage_config_names_the_data_options_it_left_out(tmp_path, capsys, monkeypatch):
    """A stage whose ``data.name`` is set to another dataset than the one its recipe, preset or
    ``Stage.presets`` gave options for leaves those options out, and its run's ``config.yaml``
    names them in comment lines as the final model's does; ``--print-config`` of the final
    model lists them with the stage's name above the config."""
    from pyface.cli import main
    from pyface.train import registry

    monkeypatch.setitem(registry.MODELS, "staged_example", f"{__name__}:_StagedAE")
    run = tmp_path / "run"
    stage = {k.split("=")[0]: k.split("=")[1] for k in TINY}
    argv = ["train", "staged_example", "--preset", "tiny", "--set", f"train.run_dir={run}",
            *sum((["--set", s] for s in TINY + ["train.steps=1"]), []),
            *sum((["--set", f"stages.s1.{k}={v}"] for k, v in stage.items()
                  if k.split(".")[0] in ("model", "data")), []),
            "--set", "stages.s1.data.name=procedural", "--set", "stages.s1.train.steps=1",
            "--set", "stages.s1.train.batch_size=4", "--set", "stages.s1.train.image_every=0"]
    note = ("data.options of preset 'tiny' for dataset 'clips' not applied to data.name "
            "'procedural': frames\n")
    assert main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"# stage 's1' (example): {note}model: staged_example\n")
    assert main(argv) == 0
    capsys.readouterr()
    assert (run / "stages" / "s1" / "config.yaml").read_text().startswith(
        f"# {note}model: example\n")
    assert (run / "config.yaml").read_text().startswith("model: staged_example\n")


def test_a_run_folder_with_checkpoints_needs_resume_or_overwrite(tmp_path, capsys):
    from pyface import checkpoint as ckpt
    from pyface.cli import main

    run = tmp_path / "run"
    base = ["train", "example", "--preset", "tiny", "--set", f"train.run_dir={run}",
            "--set", "train.progress=false"]
    assert main(base + ["--set", "train.steps=2"]) == 0, capsys.readouterr().err
    first = ckpt.latest_checkpoint(str(run))
    assert first.endswith("ckpt-000002")
    capsys.readouterr()
    # the same command again: refused before anything is built, the run kept as it was
    assert main(base + ["--set", "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert (f"train.run_dir={run}: holds a run (latest checkpoint ckpt-000002): --resume "
            "continues it" in err and "--overwrite starts over" in err), err
    assert ckpt.latest_checkpoint(str(run)) == first
    assert main(base + ["--overwrite", "--resume"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert main(base + ["--print-config"]) == 0          # prints, trains nothing
    capsys.readouterr()
    # --overwrite: the old checkpoints and previews are gone, the new run's are there
    assert (run / "previews" / "step-000002.png").is_file()
    assert main(base + ["--set", "train.steps=1", "--overwrite"]) == 0, capsys.readouterr().err
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [1]
    assert sorted(p.name for p in (run / "previews").glob("*.png")) == ["step-000001.png"]
    assert ckpt.latest_checkpoint(str(run)).endswith("ckpt-000001")


def test_a_data_path_the_dataset_does_not_read_is_warned_about(tmp_path, caplog):
    """data.path given to a dataset that generates its items (procedural, the example model's):
    a warning naming data.path and the dataset, not a silent run on other data."""
    import logging

    from pyface.train.config import DataConfig
    from pyface.train.registry import build_dataset

    with caplog.at_level(logging.WARNING, logger="pyface"):
        ds = build_dataset(DataConfig(name="procedural", path=str(tmp_path), size=4,
                                      resolution=8))
    assert len(ds) == 4
    assert f"data.path={tmp_path} is ignored: dataset 'procedural' reads no files" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyface"):
        build_dataset(DataConfig(name="procedural", size=4, resolution=8))
    assert "data.path" not in caplog.text
