"""``train.compile``: the engine compiles a model's ``compile_modules`` in place before the
first step (pyface.nn.compile_modules), with checkpoints, EMA, resume and DDP unchanged.

The debugging backends (``aot_eager``: graph capture and AOTAutograd, no code generation) keep
compilation to a second or two; one test runs Inductor on the example model."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from pyface.nn.compiling import is_compiled
from pyface.testing import assert_close
from pyface.train import Trainer, build_experiment
from pyface.train.config import ConfigError
from pyface.train.example import TriplaneAutoencoder
from pyface.train.model import ModelDefinitionError, check_model_class

M = TriplaneAutoencoder
TINY = ["model.resolution=16", "model.plane_resolution=8", "model.plane_channels=4",
        "model.encoder_channels=8", "model.hidden=8", "model.depth_samples=4",
        "data.resolution=16", "data.size=32", "train.batch_size=4", "train.progress=false",
        "train.tensorboard=false", "train.image_every=0", "train.log_every=1",
        "train.ckpt_every=0", "train.device=cpu", "train.ema.modules=decoder"]


def trainer(tmp_path, tag: str, *sets: str, model=None) -> Trainer:
    cfg = build_experiment("example", M.Config, defaults=M.recipe,
                           overrides=[*TINY, f"train.run_dir={tmp_path / tag}", *sets])
    return Trainer(cfg, model=model)


def steps(tr: Trainer, n: int) -> list[float]:
    batch = tr.preview_batch(tr.local_batch)
    return [float(tr.train_step(batch)["main/loss"]) for _ in range(n)]


def test_train_compile_values_are_checked_when_the_config_is_built():
    def value(v):
        return build_experiment("example", M.Config, overrides=[f"train.compile={v}"]).train.compile

    assert build_experiment("example", M.Config).train.compile == "off"
    assert value("on") == "default" and value("true") == "default"
    assert value("off") == "off" and value("false") == "off"
    assert value("max-autotune") == "max-autotune" and value("aot_eager") == "aot_eager"
    with pytest.raises(ConfigError, match=r"^train\.compile: expected one of off, default, "
                                          r"reduce-overhead.*got 'defualt'; did you mean "
                                          r"default\?$"):
        value("defualt")
    # a YAML file's on / off arrive as bools
    from pyface.train.config import TrainConfig

    assert TrainConfig(compile=False).compile == "off"
    assert TrainConfig(compile=True).compile == "default"


def test_check_model_class_rejects_compile_modules_that_are_not_a_tuple_of_names():
    class Named(M):
        compile_modules = "encoder"

    with pytest.raises(ModelDefinitionError, match=r"compile_modules must be a tuple of "
                                                   r"sub-module names.*write \('encoder',\)"):
        check_model_class(Named)

    class Listed(M):
        compile_modules = ["encoder", 3]

    with pytest.raises(ModelDefinitionError, match="compile_modules must be a tuple"):
        check_model_class(Listed)
    check_model_class(M)


def test_off_compiles_nothing(tmp_path):
    tr = trainer(tmp_path, "off")
    steps(tr, 1)
    assert tr.compiled == [] and tr.compile_options is None
    assert not any(is_compiled(m) for m in tr.model.modules())


def test_engine_compiles_the_named_modules_in_place(tmp_path, caplog):
    eager = trainer(tmp_path, "eager")
    keys = list(eager.model.state_dict())
    from torch._dynamo.utils import counters

    counters.clear()
    with caplog.at_level(logging.INFO, logger="pyface.train"):
        tr = trainer(tmp_path, "compiled", "train.compile=aot_eager")
        assert tr.compiled is None                  # before the first step
        losses = steps(tr, 3)
    assert tr.compiled == [""] and is_compiled(tr.model)
    assert counters["stats"]["unique_graphs"] >= 1     # TorchDynamo captured the forward
    assert not is_compiled(tr.ema.modules["decoder"])         # EMA copies only where named
    assert list(tr.model.state_dict()) == keys
    lines = [r.getMessage() for r in caplog.records if "train.compile" in r.getMessage()]
    assert lines == ["train.compile=aot_eager: compiling (the model) of TriplaneAutoencoder "
                     "with torch.compile, aot_eager (the first steps compile; new input shapes "
                     "recompile)"]
    # the same steps eagerly: the same losses (aot_eager runs the same kernels)
    ref = steps(eager, 3)
    assert_close(torch.tensor(losses), torch.tensor(ref))
    for (k, a), b in zip(tr.model.state_dict().items(), eager.model.state_dict().values()):
        assert_close(a, b, scale=20, msg=k)


def test_ema_copies_compile_where_the_model_names_them(tmp_path):
    class Calls(torch.nn.Module):          # a module of our own around torch's nn.Sequential
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    class EmaNamed(M):
        compile_modules = ("", "ema.decoder", "ema.encoder")    # the encoder has no EMA here

        def __init__(self, cfg):
            super().__init__(cfg)
            self.decoder = Calls(self.decoder)

    cfg = build_experiment("example", M.Config, defaults=M.recipe,
                           overrides=[*TINY, f"train.run_dir={tmp_path / 'ema'}",
                                      "train.compile=eager"])
    torch.manual_seed(0)
    tr = Trainer(cfg, model=EmaNamed(cfg.model_config))
    steps(tr, 2)
    assert tr.compiled == ["", "ema.decoder"]
    assert is_compiled(tr.ema.modules["decoder"]) and is_compiled(tr.model)


def test_a_model_that_names_no_modules_trains_uncompiled_with_one_warning(tmp_path, caplog):
    class Plain(M):
        compile_modules = ()

    cfg = build_experiment("example", M.Config, defaults=M.recipe,
                           overrides=[*TINY, f"train.run_dir={tmp_path / 'plain'}",
                                      "train.compile=default"])
    tr = Trainer(cfg, model=Plain(cfg.model_config))
    with caplog.at_level(logging.INFO, logger="pyface.train"):
        steps(tr, 2)
    warned = [r for r in caplog.records if "names no modules" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert warned[0].getMessage() == ("train.compile=default: Plain names no modules to compile "
                                      "(its compile_modules is empty); training uncompiled")
    assert tr.compiled == [] and not is_compiled(tr.model)


def test_a_model_wrapped_by_torch_compile_is_refused(tmp_path):
    """torch.compile(model) (an OptimizedModule) prefixes every state_dict key with
    '_orig_mod.', so its checkpoints would not load into the model: the trainer refuses it,
    naming train.compile, which compiles in place and keeps the keys."""
    cfg = build_experiment("example", M.Config, defaults=M.recipe,
                           overrides=[*TINY, f"train.run_dir={tmp_path / 'wrapped'}"])
    wrapped = torch.compile(M(cfg.model_config), backend="eager")
    assert list(wrapped.state_dict())[0].startswith("_orig_mod.")
    with pytest.raises(ValueError, match=r"^model: expected the TriplaneAutoencoder itself, got "
                                         r"torch.compile's wrapper of it \(OptimizedModule\), "
                                         r"whose state_dict keys start with '_orig_mod\.'.*"
                                         r"train.compile"):
        Trainer(cfg, model=wrapped)
    assert not os.path.exists(tmp_path / "wrapped" / "checkpoints")


@pytest.mark.parametrize("first,then", [("aot_eager", "off"), ("off", "aot_eager")])
def test_resume_across_compile_on_and_off(tmp_path, first, then):
    """A run trained compiled resumes uncompiled and vice versa: the checkpoint is the same."""
    const = ["train.lr_schedule.kind=constant", "train.lr_schedule.warmup_steps=0"]
    whole = trainer(tmp_path, "whole", "train.steps=4", *const)
    whole.fit()
    a = trainer(tmp_path, "run", "train.steps=2", *const, f"train.compile={first}")
    a.fit()
    assert a.step == 2 and (a.compiled == [""]) == (first != "off")
    b = trainer(tmp_path, "run", "train.steps=4", *const, f"train.compile={then}")
    assert b.resume() is not None and b.step == 2
    b.fit()
    assert b.step == 4 and (b.compiled == [""]) == (then != "off")
    assert list(b.model.state_dict()) == list(whole.model.state_dict())
    for (k, v), w in zip(b.model.state_dict().items(), whole.model.state_dict().values()):
        assert_close(v, w, scale=20, msg=k)
    for k, v in b.ema.modules["decoder"].state_dict().items():
        assert_close(v, whole.ema.modules["decoder"].state_dict()[k], scale=20, msg=k)


def test_bf16_autocast_compiled(tmp_path):
    eager = trainer(tmp_path, "eager", "train.precision=bf16")
    tr = trainer(tmp_path, "bf16", "train.precision=bf16", "train.compile=aot_eager")
    losses, ref = steps(tr, 2), steps(eager, 2)
    assert tr.compiled == [""]
    assert_close(torch.tensor(losses), torch.tensor(ref), dtype=torch.bfloat16)


@pytest.mark.cpp
def test_inductor_example_steps_match_eager(tmp_path):
    """train.compile=default: Inductor code generation (a C++ compiler on CPU)."""
    eager = trainer(tmp_path, "eager")
    tr = trainer(tmp_path, "inductor", "train.compile=default")
    losses, ref = steps(tr, 2), steps(eager, 2)
    assert tr.compiled == [""] and tr.compile_options.backend == "inductor"
    assert_close(torch.tensor(losses), torch.tensor(ref), scale=20)


def test_every_model_names_modules_that_exist(monkeypatch):
    """Each registered model's compile_modules resolve in its module tree (built at its
    ``gpu-short`` preset under FakeTensorMode, as tests/test_presets_shapes.py does) to modules
    of its own classes (a torch.nn module alone is not traced), and its ``ema.`` names to
    modules with an EMA copy in its presets."""
    from test_presets_shapes import fake_model

    from pyface.train import registry

    for name in sorted(registry.BUILTIN_MODELS):
        cls = registry.model_class(name)
        check_model_class(cls, name)
        names = cls.compile_modules
        assert names, f"{name}: names no modules to compile"
        assert len(set(names)) == len(names), name
        if name == "example":
            continue
        with fake_model(name, "gpu-short", monkeypatch) as (model, cfg, _):
            for full in names:
                path = full
                if full.startswith("ema."):
                    owner = next((k for k in cfg.train.ema.modules
                                  if full[4:] == k or full[4:].startswith(k + ".")), None)
                    assert owner is not None, f"{name}: {full}: no EMA of it in gpu-short"
                    for preset in cls.presets:
                        ema = build_experiment(name, cls.Config, defaults=cls.recipe,
                                               preset=preset).train.ema.modules
                        assert owner in ema, f"{name} --preset {preset}: no EMA of {owner}"
                    path = full[4:]
                m = model
                for part in path.split("."):
                    assert hasattr(m, part), f"{name}: {full}: no {part!r}"
                    m = getattr(m, part)
                    if m is None:
                        break
                if m is None:
                    continue
                assert isinstance(m, torch.nn.Module), f"{name}: {full}"
                assert not type(m).forward.__module__.startswith("torch."), \
                    f"{name}: {full} is a {type(m).__name__}, torch's forward: not traced alone"


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from safetensors.torch import save_file
    from pyface.train import Trainer, build_experiment
    from pyface.train.example import TriplaneAutoencoder as M

    torch.set_num_threads(1)
    out, overrides = sys.argv[1], sys.argv[2:]
    tr = Trainer(build_experiment("example", M.Config, defaults=M.recipe, overrides=overrides))
    res = tr.fit()
    state = {k: v.contiguous() for k, v in tr.model.state_dict().items()}
    save_file(state, os.path.join(out, f"rank{tr.dist.rank}.safetensors"))
    with open(os.path.join(out, f"rank{tr.dist.rank}.json"), "w") as f:
        json.dump({"compiled": tr.compiled, "overlapped": tr.buckets_overlapped,
                   "reductions": tr.reductions}, f)
    tr.close()
""")


def test_two_ranks_compiled_with_the_overlapped_all_reduce(tmp_path):
    """torchrun, 2 ranks on gloo, train.compile=aot_eager with the bucketed all-reduce hooks:
    both ranks compile, the buckets still reduce during the backward, the ranks stay equal and
    match one process with the whole batch."""
    import json

    script = tmp_path / "worker.py"
    script.write_text(DDP_SCRIPT)
    sets = [*TINY, "train.steps=3", "train.bucket_mb=0.002"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path), *sets, f"train.run_dir={tmp_path / 'ddp'}",
         "train.compile=aot_eager"],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
    for r in (0, 1):
        info = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert info["compiled"] == [""]
        assert info["reductions"] == {"bucketed": 3, "flat": 0} and info["overlapped"] > 0
    single = trainer(tmp_path, "one", "train.steps=3")
    single.fit()
    for k, v in single.model.state_dict().items():
        assert_close(r0[k], v, scale=20, msg=k)
