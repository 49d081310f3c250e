"""Engine extensions on one process: in-step updates (ctx.update), EMA access, per-phase frozen
modules, per-optimizer / per-group clipping, train.init_from, train.backend. (Two ranks:
tests/test_train_ddp.py.)"""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import yaml

from _train_toys import inverter_trainer
from pyface import checkpoint as ckpt
from pyface.train import Phase, Trainer, TrainableModel, build_experiment
from pyface.train.config import ConfigError
from pyface.train.engine import NonFiniteError
from pyface.train.example import TriplaneAutoencoder
from pyface.train.model import StepContext

TINY = ["model.resolution=16", "model.plane_resolution=8", "model.plane_channels=4",
        "model.encoder_channels=8", "model.hidden=8", "model.depth_samples=4",
        "data.resolution=16", "data.size=16", "train.batch_size=4", "train.progress=false",
        "train.tensorboard=false", "train.image_every=0", "train.log_every=1",
        "train.ckpt_every=0"]


def example(tmp_path, *extra, name="run"):
    M = TriplaneAutoencoder
    return build_experiment("example", M.Config, defaults=M.recipe,
                            overrides=TINY + [f"train.run_dir={tmp_path / name}", *extra])


# ------------------------------------------------------------------------------------------
# in-step updates, EMA access, frozen modules
# ------------------------------------------------------------------------------------------

def test_inner_loop_updates_and_frozen_phase(tmp_path):
    tr = inverter_trainer([f"train.run_dir={tmp_path / 'inv'}", "train.steps=3"], 4)
    m = tr.model
    g0 = {k: v.clone() for k, v in m.G.state_dict().items()}
    e0 = m.E.weight.detach().clone()
    calls = []
    real = tr._apply_update

    def spy(name, loss, **kw):
        calls.append((name, kw["phase"], kw["inner"]))
        return real(name, loss, **kw)

    tr._apply_update = spy
    out = tr.train_step(tr.preview_batch(4))
    # 4 inversion updates, one mid-step G + E update, the phase's G update, then E
    assert calls == [("latent", "invert", True)] * 4 + [(("G", "E"), "invert", True),
                                                       ("G", "invert", False), ("E", "enc", False)]
    assert out["invert/inv_last"] < out["invert/inv_first"]          # the inversion works
    assert out["invert/mid_grad_norm"] > 0 and out["enc/grad_norm"] > 0
    # G frozen only during "enc", and restored after it
    assert m.seen == [("invert", True), ("enc", False)]
    assert all(p.requires_grad for p in m.G.parameters())
    assert not torch.equal(m.E.weight, e0)
    assert all(p.grad is None for p in m.parameters())              # gradients cleared
    # G was stepped twice in "invert" and not in "enc" (its grads were not even computed)
    assert any(not torch.equal(g0[k], v) for k, v in m.G.state_dict().items())
    g1 = {k: v.clone() for k, v in m.G.state_dict().items()}
    tr.phases = [Phase("enc", "E", frozen=("G",))]
    tr.train_step(tr.preview_batch(4))
    assert all(torch.equal(g1[k], v) for k, v in m.G.state_dict().items())


def test_ema_is_readable_from_step(tmp_path):
    tr = inverter_trainer([f"train.run_dir={tmp_path / 'inv'}", "train.steps=2"], 4)
    got = {}
    real_step = tr.model.step

    def step(phase, batch, ctx):
        got[phase] = (ctx.ema("G"), ctx.ema("E"))
        return real_step(phase, batch, ctx)

    tr.model.step = step
    tr.fit()
    g_ema, e_live = got["invert"]
    assert g_ema is tr.ema.modules["G"] and g_ema is not tr.model.G
    assert e_live is tr.model.E                                     # no EMA: the live module
    assert not torch.equal(g_ema[0].weight, tr.model.G[0].weight)   # a real average
    with pytest.raises(ValueError, match=r"ctx.ema: 'H' is not a sub-module of Inverter"):
        tr.ema_module("H")
    with pytest.raises(RuntimeError, match="not attached to a Trainer"):
        StepContext(step=0, images_seen=0, batch_size=1).update("G", torch.zeros(()))


def test_inner_loop_exact_resume(tmp_path):
    def run(name, steps, resume=False):
        tr = inverter_trainer([f"train.run_dir={tmp_path / name}", f"train.steps={steps}"], 4)
        if resume:
            tr.resume()
        tr.fit()
        return tr

    full = run("full", 4)
    run("split", 2)
    b = run("split", 4, resume=True)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    for k, v in full.ema.modules["G"].state_dict().items():
        assert torch.equal(v, b.ema.modules["G"].state_dict()[k]), k


@pytest.mark.parametrize("progress", [False, True])
def test_losses_are_logged_to_log_txt_and_without_a_bar_to_the_console(tmp_path, caplog,
                                                                       progress):
    cfg = example(tmp_path, "train.steps=2", "train.log_every=1", f"train.progress={progress}")
    with caplog.at_level("INFO", logger="pyface"):
        tr = Trainer(cfg)
        tr.fit()
        tr.close()
    lines = (tmp_path / "run" / "log.txt").read_text().splitlines()
    steps = [ln.split(" INFO ", 1)[1] for ln in lines if " INFO step " in ln]
    assert [s.split(":")[0] for s in steps] == ["step 1/2", "step 2/2"]
    assert all(" loss " in s and s.endswith("steps/s)") for s in steps), steps
    console = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(console) == (0 if progress else 2)


def test_in_step_update_guard_names_the_optimizer(tmp_path):
    tr = inverter_trainer([f"train.run_dir={tmp_path / 'inv'}", "train.steps=1"], 4)
    real_step = tr.model.step

    def step(phase, batch, ctx):
        ctx.update("latent", tr.model.latent.sum() * float("nan"))
        return real_step(phase, batch, ctx)

    tr.model.step = step
    with pytest.raises(NonFiniteError, match=r"step 0, phase 'invert' \(in-step update of "
                                             r"'latent'\): loss is nan"):
        tr.train_step(tr.preview_batch(4))
    with pytest.raises(KeyError, match=r"no optimizer 'W'"):
        tr._apply_update("W", torch.zeros(()), phase="invert", inner=True)




class _Two(TrainableModel):
    def __init__(self, group_norm=None, own_updates=False):
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(4))
        self.b = torch.nn.Parameter(torch.ones(4))
        self.c = torch.nn.Parameter(torch.ones(4))
        self.group_norm, self.own = group_norm, own_updates

    def build_optimizers(self):
        groups = [{"params": [self.a]}, {"params": [self.c]}]
        if self.group_norm:
            groups[1]["max_norm"] = self.group_norm
        return {"A": torch.optim.SGD(groups, lr=1.0), "B": torch.optim.SGD([self.b], lr=1.0)}

    def phases(self):
        if self.own:
            return [Phase("both", None)]
        return [Phase("a", "A"), Phase("b", "B")]

    def step(self, phase, batch, ctx):
        x = batch["x"]
        loss = ((self.a + self.b + self.c) * x).sum(-1).mean() * 100
        if self.own:
            ctx.update("A", loss, retain_graph=True)
            ctx.update("B", loss)
        return {"loss": loss}


class _Ones(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"x": torch.ones(4)}


def _two(tmp_path, model, *extra):
    from pyface.train.config import ExperimentConfig, TrainConfig, from_dict, parse_set

    t = from_dict(TrainConfig, parse_set([
        f"run_dir={tmp_path / 'two'}", "batch_size=2", "steps=1", "progress=false",
        "tensorboard=false", "image_every=0", "ckpt_every=0", *extra]))
    return Trainer(ExperimentConfig(model="two", train=t), model=model, dataset=_Ones())


def test_clipping_per_optimizer_and_per_group(tmp_path):
    # each parameter's gradient is 100 * (1, 1, 1, 1): norm 200 per parameter
    tr = _two(tmp_path, _Two(), "grad_clip=1", "grad_clip_per.B=2")
    tr.train_step(tr.preview_batch(2))
    m = tr.model
    # A (a and c together) clipped to 1 by train.grad_clip, B to 2 by grad_clip_per
    assert (1 - m.a).norm().item() ** 2 + (1 - m.c).norm().item() ** 2 == pytest.approx(1, 1e-4)
    assert (1 - m.b).norm().item() == pytest.approx(2, rel=1e-4)
    # a group's max_norm clips that group only; grad_clip_per <= 0 switches clipping off
    tr = _two(tmp_path, _Two(group_norm=0.5), "grad_clip=1", "grad_clip_per.A=0")
    tr.train_step(tr.preview_batch(2))
    m = tr.model
    assert (1 - m.c).norm().item() == pytest.approx(0.5, rel=1e-4)
    assert (1 - m.a).norm().item() == pytest.approx(200, rel=1e-4)
    assert (1 - m.b).norm().item() == pytest.approx(1, rel=1e-4)
    with pytest.raises(ValueError, match=r"train.grad_clip_per: unknown optimizer 'D'"):
        _two(tmp_path, _Two(), "grad_clip_per.D=1")


def test_phase_without_optimizer_applies_its_own_updates(tmp_path):
    tr = _two(tmp_path, _Two(own_updates=True), "grad_clip_per.B=2")
    out = tr.train_step(tr.preview_batch(2))
    m = tr.model
    assert set(out) == {"both/loss"}
    assert (1 - m.a).norm().item() == pytest.approx(200, rel=1e-4)
    assert (1 - m.b).norm().item() == pytest.approx(2, rel=1e-4)


class _Scaled(_Two):
    """A (groups a, c) stepped at lr 1 x ``scale`` by an in-step update, B at its own lr 1."""

    def __init__(self, scale):
        super().__init__(own_updates=True)
        self.scale = scale

    def step(self, phase, batch, ctx):
        loss = ((self.a + self.b + self.c) * batch["x"]).sum(-1).mean()   # gradients 1
        ctx.update("A", loss, retain_graph=True, lr_scale=self.scale)
        ctx.update("B", loss)
        return {"loss": loss.detach()}


def test_in_step_update_lr_scale_applies_to_that_step_only(tmp_path):
    """ctx.update(..., lr_scale=s) steps every group of the optimizer at s x its lr (SGD: s x
    the move), then puts the rates back (also when the step fails), so the optimizer state a
    checkpoint saves keeps the schedule's rates; other optimizers are untouched; a scale that is
    not a finite number > 0 is refused naming lr_scale."""
    tr = _two(tmp_path, _Scaled(0.25))
    seen = []
    opt = tr.optimizers["A"]
    real = opt.step
    opt.step = lambda *a, **k: seen.append([g["lr"] for g in opt.param_groups]) or real(*a, **k)
    tr.train_step(tr.preview_batch(2))
    m = tr.model
    assert seen == [[0.25, 0.25]]
    assert torch.allclose(1 - m.a, torch.full((4,), 0.25)) and torch.equal(m.a, m.c)
    assert torch.allclose(1 - m.b, torch.ones(4))                  # B at its own lr
    assert [g["lr"] for g in opt.param_groups] == [1.0, 1.0]
    assert [g["lr"] for g in opt.state_dict()["param_groups"]] == [1.0, 1.0]

    def fail(*a, **k):
        raise RuntimeError("step failed")

    opt.step = fail
    with pytest.raises(RuntimeError, match="step failed"):
        tr.train_step(tr.preview_batch(2))
    assert [g["lr"] for g in opt.param_groups] == [1.0, 1.0]
    for bad in (0, -1.0, float("nan"), float("inf"), True, "2"):
        tr = _two(tmp_path, _Scaled(bad))
        with pytest.raises(ValueError, match=r"in-step update of 'A'\): lr_scale: expected a "
                                             r"finite number > 0 .*got " + re.escape(repr(bad))):
            tr.train_step(tr.preview_batch(2))


def test_grad_clip_per_from_set_and_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  grad_clip_per: {G: 1.0}\n")
    M = TriplaneAutoencoder
    cfg = build_experiment("example", M.Config, yaml_path=str(y),
                           overrides=["train.grad_clip_per.D=10", "train.backend=reference"])
    assert cfg.train.grad_clip_per == {"G": 1.0, "D": 10.0}
    assert cfg.train.backend == "reference"
    with pytest.raises(ConfigError, match=r"train.grad_clip_per.D: expected float, got 'x'"):
        build_experiment("example", M.Config, overrides=["train.grad_clip_per.D=x"])
    with pytest.raises(ConfigError, match=r"train.grad_clip_per: expected a mapping"):
        build_experiment("example", M.Config, overrides=["train.grad_clip_per=3"])


# ------------------------------------------------------------------------------------------
# init_from, backend
# ------------------------------------------------------------------------------------------

def test_init_from_loads_weights_only_and_reports(tmp_path):
    src = Trainer(example(tmp_path, "train.steps=2", "train.ema.modules=decoder", name="src"))
    path = src.fit().checkpoint
    # a different config: a wider decoder (its first layer and the last weight no longer fit)
    dst = Trainer(example(tmp_path, "train.steps=1", "model.hidden=16", "train.lr_schedule."
                          "kind=constant", f"train.init_from={tmp_path / 'src'}",
                          "train.ema.modules=encoder,decoder", name="dst"))
    rep = dst.init_report
    assert rep["checkpoint"] == path and rep["checkpoint_step"] == 2
    assert rep["mismatched"] == ["decoder.0.weight: checkpoint (8, 4) vs model (16, 4)",
                                 "decoder.0.bias: checkpoint (8,) vs model (16,)",
                                 "decoder.2.weight: checkpoint (4, 8) vs model (4, 16)"]
    assert rep["missing"] == [] and rep["unexpected"] == []
    for k, v in src.model.encoder.state_dict().items():
        assert torch.equal(dst.model.encoder.state_dict()[k], v), k
    assert torch.equal(dst.model.decoder[2].bias, src.model.decoder[2].bias)
    # EMA: the encoder's copy starts from the loaded weights (the source had no EMA of it)
    assert torch.equal(dst.ema.modules["encoder"][0].weight, src.model.encoder[0].weight)
    assert rep["ema_from_checkpoint"] == []
    assert dst.step == 0 and not dst.optimizers["main"].state           # weights only
    dst.fit()
    saved = yaml.safe_load(open(tmp_path / "dst" / "config.yaml"))
    assert saved["train"]["init_from"] == path                          # recorded, resolved
    assert json.load(open(tmp_path / "dst" / "init_from.json"))["mismatched"] == rep["mismatched"]
    # same architecture: everything loads, the EMA copy comes from the checkpoint's EMA
    same = Trainer(example(tmp_path, f"train.init_from={path}", "train.ema.modules=decoder",
                           name="same"))
    assert same.init_report["loaded"] == len(src.model.state_dict())
    assert same.init_report["ema_from_checkpoint"] == ["decoder"]
    assert torch.equal(same.ema.modules["decoder"][0].weight,
                       src.ema.modules["decoder"][0].weight)
    # a weights-only folder (unprefixed keys), e.g. written by a converter
    w = ckpt.save_weights(str(tmp_path / "weights"), {k: v + 1 for k, v in
                                                     src.model.state_dict().items()},
                          kind="example")
    conv = Trainer(example(tmp_path, f"train.init_from={w}", name="conv"))
    assert conv.init_report["loaded"] == len(src.model.state_dict())
    assert torch.equal(conv.model.decoder[0].weight, src.model.decoder[0].weight + 1)
    with pytest.raises(ckpt.CheckpointError, match="a folder without a checkpoint"):
        Trainer(example(tmp_path, f"train.init_from={tmp_path}", name="x"))


def test_init_from_with_nothing_matching_is_an_error(tmp_path):
    path = inverter_trainer([f"train.run_dir={tmp_path / 'inv'}", "train.steps=1"],
                            4).fit().checkpoint
    with pytest.raises(ckpt.CheckpointError, match=r"no tensor of .* matches the model"):
        Trainer(example(tmp_path, f"train.init_from={path}"))


def test_train_backend_forces_the_ops(tmp_path, monkeypatch):
    from pyface import _backend

    seen = []
    real = _backend.select_backend

    def spy(op, device, backend, dtype=None):
        name = real(op, device, backend, dtype)
        seen.append(name)
        return name

    monkeypatch.setattr(_backend, "select_backend", spy)
    monkeypatch.delenv("PYFACE_BACKEND", raising=False)
    tr = Trainer(example(tmp_path, "train.steps=1", "train.backend=reference"))
    tr.fit()
    assert seen and set(seen) == {"reference"}
    assert _backend._forced is None                                     # restored after
    with pytest.raises(ValueError, match=r"train.backend: expected one of"):
        Trainer(example(tmp_path, "train.backend=fast"))


# ------------------------------------------------------------------------------------------
# python -m pyface.bench.train MODEL
# ------------------------------------------------------------------------------------------

def test_bench_train_model_fused_vs_reference(tmp_path, capsys):
    from pyface import _backend
    from pyface.bench.train import main

    out = tmp_path / "b.json"
    sets = sum((["--set", s] for s in TINY[:-1]), [])
    assert main(["example", "--steps", "2", "--warmup", "1", "--device", "cpu", *sets,
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["environment"]["device_type"] == "cpu" and data["environment"]["torch"]
    r = data["results"][0]
    assert r["bench"] == "train_backends" and r["model"] == "example" and r["batch_size"] == 4
    fused, ref = r["results"]["fused"], r["results"]["reference"]
    assert ref["ops"] == {"triplane_sample": {"reference": 1}}       # one step's op calls
    expected = _backend.select_backend("triplane_sample", torch.device("cpu"), None)
    assert fused["ops"] == {"triplane_sample": {expected: 1}}
    for x in (fused, ref):
        assert x["steps"] == 2 and x["p20_p80_s"][0] <= x["median_s"] <= x["p20_p80_s"][1]
        assert x["peak_mem_mb"] > 0
    assert r["speedup"] == pytest.approx(ref["median_s"] / fused["median_s"])
    assert all(x["cpu_median_s"] > 0 for x in (fused, ref))
    assert r["speedup_cpu"] == pytest.approx(ref["cpu_median_s"] / fused["cpu_median_s"])
    printed = capsys.readouterr().out
    assert "reference / fused" in printed
    for label, x in (("fused", fused), ("reference", ref)):   # the table is the JSON's numbers
        assert (f"example {label:9s} step {x['median_s'] * 1e3:8.1f} ms "
                f"[{x['p20_p80_s'][0] * 1e3:.1f}, {x['p20_p80_s'][1] * 1e3:.1f}]") in printed
        assert f"peak {x['peak_mem_mb']:8.1f} MB" in printed


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--steps: expected an integer >= 1, got 0"),    # was taken as the default
    (["--steps", "-2"], "--steps: expected an integer >= 1, got -2"),
    (["--warmup", "-1"], "--warmup: expected an integer >= 0, got -1"),
    (["--preset", "no-such"],
     "--preset 'no-such': model 'example' has no such preset; valid presets: tiny"),
    (["--set", "train.no_such=1"], "train.no_such: unknown key for TrainConfig"),
    (["--json", "OUT/r.txt"], "--json: expected a file ending in .json or a folder"),
    (["--json", "OUT/a_file/r.json"],
     "--json OUT/a_file/r.json: cannot create its folder: OUT/a_file is a file\n"),
])
def test_bench_train_option_errors_exit_2_before_running(tmp_path, capsys, monkeypatch, argv,
                                                         message):
    from pyface.bench import train

    (tmp_path / "a_file").write_text("x")
    monkeypatch.chdir(tmp_path)           # a default JSON would land in tmp_path/bench/results
    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    ran = []
    real = train.model_backends
    monkeypatch.setattr(train, "model_backends",
                        lambda *a, **k: ran.append(1) or real(*a, **{**k, "steps": 1}))
    assert train.main(["example", "--device", "cpu", *argv]) == 2
    assert message.replace("OUT", str(tmp_path)) in capsys.readouterr().err
    assert not (tmp_path / "bench").exists() and ran == []   # refused before anything ran


def test_bucket_layout():
    from pyface.train.distributed import BucketedAllReduce

    ps = [torch.nn.Parameter(torch.zeros(n, dtype=dt)) for n, dt in
          ((300_000, torch.float32), (10, torch.float32), (100, torch.float64),
           (400_000, torch.float32), (5, torch.float32))]
    r = BucketedAllReduce(ps, world_size=2, bucket_mb=1.0)
    # reverse order; the first bucket closes at 1 MiB, then at bucket_mb; dtypes never mix
    assert [[p.numel() for p in b] for b in r.buckets] == [[5, 400_000], [100], [10, 300_000]]
    r.mark_ready(ps[4])
    assert r._next == 0                       # the first bucket waits for its second gradient


class _Pair(TrainableModel):
    """loss = mean(sum((w * k * x)^2)): w is saved for k's gradient and vice versa."""

    def __init__(self, mode):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 4))
        self.k = torch.nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.mode = mode

    def build_optimizers(self):
        return {"W": torch.optim.SGD([self.w], lr=0.1), "K": torch.optim.SGD([self.k], lr=0.1)}

    def phases(self):
        return [Phase("main", ("W", "K") if self.mode == "phase" else None)]

    def loss(self, x):
        return (self.w * self.k * x).square().sum(-1).mean()

    def step(self, phase, batch, ctx):
        loss = self.loss(batch["x"])
        if self.mode == "sequential":
            ctx.update("W", loss, retain_graph=True)
            ctx.update("K", loss)
        elif self.mode == "tuple":
            ctx.update(("W", "K"), loss)
        return {"loss": loss}


@pytest.mark.parametrize("mode", ["tuple", "phase"])
def test_one_backward_steps_several_optimizers(tmp_path, mode):
    m = _Pair(mode)
    x = torch.ones(2, 4)
    gw, gk = torch.autograd.grad(m.loss(x), [m.w, m.k])
    w1, k1 = m.w.detach() - 0.1 * gw, m.k.detach() - 0.1 * gk
    tr = _two(tmp_path, m, "grad_clip_per.K=0")
    out = tr.train_step(tr.preview_batch(2))
    torch.testing.assert_close(m.w.detach(), w1)
    torch.testing.assert_close(m.k.detach(), k1)
    if mode == "phase":
        assert out["main/grad_norm"] == pytest.approx(torch.cat([gw.flatten(), gk]).norm().item(),
                                                      rel=1e-5)


def test_sequential_updates_of_one_graph_need_the_tuple_form(tmp_path):
    # stepping W in place, then back-propagating the same graph into K, cannot work
    tr = _two(tmp_path, _Pair("sequential"))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        tr.train_step(tr.preview_batch(2))


def test_bench_train_ctrl_c_exits_130_and_writes_no_json(tmp_path, capsys, monkeypatch):
    from pyface.bench import train

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "model_backends", interrupted)
    out = tmp_path / "r.json"
    assert train.main(["example", "--device", "cpu", "--json", str(out)]) == 130
    assert "interrupted; no JSON written" in capsys.readouterr().err and not out.exists()


def test_a_failed_init_leaves_the_process_group_it_joined_and_only_that(tmp_path, monkeypatch):
    """Trainer() raising after it joined a process group (a config error found after
    init_process_group) destroys that group; a group the caller joined is left as it was.
    A one-process gloo group (file:// rendezvous)."""
    import torch.distributed as dist

    from pyface.train import distributed as D

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    bad = example(tmp_path, "train.backend=nope")       # refused after the group is joined

    def join(device_pref="auto"):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                world_size=1)
        return D.DistInfo(initialized_here=True), torch.device("cpu")

    with monkeypatch.context() as m:
        m.setattr(D, "init_distributed", join)
        try:
            with pytest.raises(ValueError, match="train.backend: expected one of"):
                Trainer(bad)
            assert not dist.is_initialized()
        finally:                    # the next tests run without a group, whatever happened
            if dist.is_initialized():
                dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0,
                            world_size=1)
    try:
        with pytest.raises(ValueError, match="train.backend: expected one of"):
            Trainer(bad)
        assert dist.is_initialized()                    # the caller's: not the Trainer's
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# label pools (TrainableModel.label_pools)
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _PoolToyConfig:
    width: int = 4


class _PoolToy(TrainableModel):
    """Regresses x; ``pools`` (a class attribute) are the item keys it asks the pools of."""

    Config = _PoolToyConfig
    pools: tuple[str, ...] = ()

    def __init__(self, cfg=None):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.drawn = []

    def label_pools(self):
        return self.pools

    def build_optimizers(self):
        return {"main": torch.optim.SGD(self.lin.parameters(), lr=0.1)}

    def step(self, phase, batch, ctx):
        pool = self.label_pool("tag")
        if pool is not None:
            self.drawn.append(pool[ctx.step % len(pool)].clone())
        return {"loss": (self.lin(batch["x"]) - batch["x"]).square().mean()}


class _Tagged(torch.utils.data.Dataset):
    """Items ``x`` (4,) and ``tag`` (2,) = (i, -i); ``item_labels`` optional; counts reads."""

    def __init__(self, n=6, cheap=True, bad=None):
        self.n, self.reads, self.bad = n, 0, bad
        if cheap:
            self.item_labels = lambda key: (self._tags() if key == "tag" else None)

    def _tags(self):
        t = torch.stack([torch.arange(self.n), -torch.arange(self.n)], 1).float()
        if self.bad is not None:
            t[self.bad, 1] = float("nan")
        return t

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        return {"x": torch.full((4,), float(i)), "tag": self._tags()[i]}


def _pool_trainer(tmp_path, model, data, steps=2):
    exp = build_experiment("pooltoy", _PoolToyConfig, overrides=[
        "train.batch_size=2", "train.progress=false", "train.tensorboard=false",
        "train.image_every=0", "train.ckpt_every=1", "train.log_every=1", "train.device=cpu",
        f"train.steps={steps}", f"train.run_dir={tmp_path / 'run'}"])
    return Trainer(exp, model=model, dataset=data)


def test_label_pool_is_handed_to_a_model_that_asks_and_not_saved(tmp_path):
    """A model whose label_pools() names a key gets every item's value of it, in item order,
    as a non-persistent buffer (read without indexing the items when the dataset has
    item_labels); it is not in the checkpoint; a model that asks for none gets none."""
    m = _PoolToy()
    m.pools = ("tag",)
    data = _Tagged()
    tr = _pool_trainer(tmp_path, m, data)
    want = torch.stack([torch.arange(6), -torch.arange(6)], 1).float()
    assert torch.equal(m.label_pool("tag"), want)
    assert data.reads == 1                  # item 0 only (its shape): no item decoded for the pool
    assert "label_pool_tag" in dict(m.named_buffers())
    assert not any("label_pool" in k for k in m.state_dict())
    tr.fit()
    assert [int(d[0]) for d in m.drawn] == [0, 1]
    tensors, _ = ckpt.load_folder(ckpt.latest_checkpoint(str(tmp_path / "run")))
    assert tensors and not any("label_pool" in k for k in tensors)
    other = _PoolToy()
    _pool_trainer(tmp_path / "b", other, _Tagged())
    assert other.label_pool("tag") is None and not list(other.buffers())


def test_label_pool_reads_the_items_without_item_labels_and_checks_them(tmp_path):
    """A dataset without item_labels is read item by item (the same pool); NaN values, a
    missing key and a model asking for a pool by hand without one are errors naming them."""
    from pyface.data.format import DataError
    from pyface.train.engine import label_pool_of

    m = _PoolToy()
    m.pools = ("tag",)
    data = _Tagged(cheap=False)
    _pool_trainer(tmp_path, m, data)
    assert data.reads == 6
    assert torch.equal(m.label_pool("tag"), _Tagged()._tags())
    for cheap in (True, False):
        with pytest.raises(DataError, match=r"data \(data.name=.*\): label pool 'tag': NaN or "
                                            r"inf values in 1 item\(s\), the first item 3"):
            m2 = _PoolToy()
            m2.pools = ("tag",)
            _pool_trainer(tmp_path / f"bad{cheap}", m2, _Tagged(cheap=cheap, bad=3))
    with pytest.raises(DataError, match=r"data \(_Tagged\): the model draws from every item's "
                                        r"'nope' \(label_pools\), the dataset's items have "
                                        r"\['tag', 'x'\]"):
        label_pool_of(_Tagged(), "nope")
    from pyface.train.model import ModelDefinitionError

    odd = _PoolToy()
    odd.pools = "tag"
    with pytest.raises(ModelDefinitionError, match=r"_PoolToy\.label_pools\(\) must return a "
                                                   r"tuple of item keys \(strings\), got 'tag'"):
        _pool_trainer(tmp_path / "odd", odd, _Tagged())
    with pytest.raises(ValueError,
                       match=r"set_label_pool\('tag'\): expected a tensor \(N, \.\.\.\)"):
        _PoolToy().set_label_pool("tag", torch.zeros(0, 2))


def test_label_pool_shape_is_checked_on_the_first_item_before_the_others_are_read(tmp_path):
    """A model's label_pool_shape(key) is checked on item 0: a dataset whose items hold
    another shape is refused naming the key, both shapes and the dataset, with no other item
    read (a dataset of clips is not decoded in full first); the declared shape builds."""
    from pyface.data.format import DataError

    class _Shaped(_PoolToy):
        def label_pool_shape(self, key):
            return self.want

    m = _Shaped()
    m.pools, m.want = ("tag",), (25,)
    data = _Tagged(cheap=False)
    with pytest.raises(DataError, match=r"data \(data.name=.*\): the model draws from every "
                                        r"item's 'tag' \(label_pools\), expected of shape "
                                        r"\(25,\), item 0's has shape \(2,\)"):
        _pool_trainer(tmp_path / "bad", m, data)
    assert data.reads == 1
    ok = _Shaped()
    ok.pools, ok.want = ("tag",), (2,)
    _pool_trainer(tmp_path / "ok", ok, _Tagged(cheap=False))
    assert ok.label_pool("tag").shape == (6, 2)
