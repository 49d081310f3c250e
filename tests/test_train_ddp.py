"""Distributed training with 2 CPU processes on gloo, launched through torchrun: parameters stay
identical across ranks and match a one-process run with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from pyface.train import Trainer, build_experiment
from pyface.train.example import TriplaneAutoencoder
from pyface.testing import assert_close

OVERRIDES = ["model.resolution=16", "model.plane_resolution=8", "model.plane_channels=4",
             "model.encoder_channels=8", "model.hidden=8", "model.depth_samples=4",
             "data.resolution=16", "data.size=32", "train.batch_size=4", "train.steps=3",
             "train.progress=false", "train.tensorboard=false", "train.image_every=0",
             "train.log_every=3", "train.ckpt_every=0", "train.device=cpu",
             "train.ema.modules=decoder"]

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from safetensors.torch import save_file
    from pyface.train import Trainer, build_experiment
    from pyface.train.example import TriplaneAutoencoder as M

    torch.set_num_threads(1)
    out, overrides = sys.argv[1], sys.argv[2:]
    tr = Trainer(build_experiment("example", M.Config, defaults=M.recipe, overrides=overrides))
    res = tr.fit()
    rank = tr.dist.rank
    assert tr.dist.world_size == 2 and tr.local_batch == 2
    state = {k: v.contiguous() for k, v in tr.model.state_dict().items()}
    state.update({"ema." + k: v.contiguous() for k, v in tr.ema.modules["decoder"].state_dict().items()})
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res.losses, f)
    tr.close()
""")


def test_two_process_gloo_matches_single_process(tmp_path):
    script = tmp_path / "ddp_worker.py"
    script.write_text(SCRIPT)
    run_dir = tmp_path / "ddp"
    overrides = OVERRIDES + [f"train.run_dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path), *overrides],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
    # only rank 0 writes the run folder
    assert os.listdir(run_dir / "checkpoints") == ["ckpt-000003", "latest"] or \
        sorted(os.listdir(run_dir / "checkpoints")) == ["ckpt-000003", "latest"]

    M = TriplaneAutoencoder
    single = Trainer(build_experiment("example", M.Config, defaults=M.recipe,
                                      overrides=OVERRIDES + [f"train.run_dir={tmp_path / 'one'}"]))
    res = single.fit()
    state = single.model.state_dict()
    state.update({"ema." + k: v for k, v in single.ema.modules["decoder"].state_dict().items()})
    for k, v in state.items():
        # the mean of two half-batch gradients equals the full-batch gradient up to fp32
        # summation order; Adam amplifies that slightly in its first steps
        assert_close(r0[k], v, scale=20, msg=k)
    torch.manual_seed(single.cfg.train.seed)   # the engine's initialisation
    init = TriplaneAutoencoder(single.cfg.model_config).state_dict()
    assert all(not torch.allclose(init[k], r0[k]) for k in init), "training did not move"
    import json

    losses = json.loads((tmp_path / "rank0.json").read_text())
    assert losses["main/loss"] == pytest.approx(res.losses["main/loss"], rel=1e-5)


def test_torchrun_cli_smoke(tmp_path):
    """The documented command: torchrun --nproc_per_node=2 -m pyface train example ..."""
    run_dir = tmp_path / "cli"
    sets = sum((["--set", s] for s in OVERRIDES + [f"train.run_dir={run_dir}",
                                                    "train.steps=2"]), [])
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pyface", "train", "example", *sets],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "ckpt-000002" / "tensors.safetensors").is_file()
    assert proc.stdout.count("run folder:") == 1          # rank 0 reports, rank 1 stays quiet


# ------------------------------------------------------------------------------------------
# in-step updates, rank-local parameters, overlapped all-reduce (2 ranks)
# ------------------------------------------------------------------------------------------

SCENARIOS = textwrap.dedent("""
    import json, os, sys
    import torch
    from safetensors.torch import save_file
    from pyface.train import Trainer, build_experiment
    from pyface.train.example import TriplaneAutoencoder as M
    from _train_toys import gan_trainer, inverter_trainer

    torch.set_num_threads(1)
    out, example_overrides = sys.argv[1], sys.argv[2:]
    trainers = []
    def run(tag, tr):
        trainers.append(tr)
        res = tr.fit()
        state = {k: v.contiguous() for k, v in tr.model.state_dict().items()}
        for name, m in tr.ema.modules.items():
            state.update({f"ema.{name}." + k: v.contiguous() for k, v in m.state_dict().items()})
        save_file(state, os.path.join(out, f"{tag}-rank{tr.dist.rank}.safetensors"))
        with open(os.path.join(out, f"{tag}-rank{tr.dist.rank}.json"), "w") as f:
            json.dump({"losses": res.losses, "overlapped": tr.buckets_overlapped,
                       "reductions": tr.reductions}, f)
    for tag, extra in (("overlap", ["train.bucket_mb=0.002"]),
                       ("flat", ["train.overlap_grad_reduce=false"])):
        run("inv-" + tag, inverter_trainer(
            [f"train.run_dir={out}/inv-{tag}", "train.steps=3", *extra], 2))
        run("gan-" + tag, gan_trainer(
            [f"train.run_dir={out}/gan-{tag}", "train.steps=3", *extra]))
        run("ex-" + tag, Trainer(build_experiment("example", M.Config, defaults=M.recipe,
            overrides=example_overrides + [f"train.run_dir={out}/ex-{tag}", *extra])))
    for tr in reversed(trainers):
        tr.close()
""")


def test_two_ranks_inner_loop_overlap_and_flat(tmp_path):
    """Inner loops with rank-local latents, lazy R1 (double backward) and the example model:
    the overlapped (bucketed) all-reduce gives bit-identical results to the flat one, both
    ranks end identical, and the inner-loop model equals a one-process run."""
    script = tmp_path / "scenarios.py"
    script.write_text(SCENARIOS)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path), *OVERRIDES],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    def load(tag, rank):
        return (load_file(str(tmp_path / f"{tag}-rank{rank}.safetensors")),
                json.loads((tmp_path / f"{tag}-rank{rank}.json").read_text()))

    for model in ("inv", "gan", "ex"):
        (o0, j0), (o1, _), (f0, _), (f1, _) = (load(f"{model}-overlap", 0),
                                               load(f"{model}-overlap", 1),
                                               load(f"{model}-flat", 0), load(f"{model}-flat", 1))
        assert j0["overlapped"] > 0, model              # buckets did start inside the backward
        assert load(f"{model}-flat", 0)[1]["reductions"]["bucketed"] == 0
        # GAN: 3 steps x (G, D) overlapped + R1 at steps 0 and 2 on the flat path
        assert j0["reductions"] == ({"bucketed": 6, "flat": 2} if model == "gan" else
                                    {"bucketed": j0["reductions"]["bucketed"], "flat": 0})
        for k in o0:
            assert torch.equal(o0[k], f0[k]) and torch.equal(o1[k], f1[k]), f"{model}: {k}"
            if k != "latent":                           # the only rank-local tensor
                assert torch.equal(o0[k], o1[k]), f"{model}: {k} differs between ranks"

    from _train_toys import inverter_trainer

    one = inverter_trainer([f"train.run_dir={tmp_path / 'inv-one'}", "train.steps=3"], 4)
    res = one.fit()
    (r0, j0), (r1, _) = load("inv-overlap", 0), load("inv-overlap", 1)
    state = one.model.state_dict()
    state.update({"ema.G." + k: v for k, v in one.ema.modules["G"].state_dict().items()})
    for k, v in state.items():
        got = torch.cat([r0[k], r1[k]]) if k == "latent" else r0[k]   # rank 0's rows, rank 1's
        assert_close(got, v, scale=20, msg=k)
    torch.manual_seed(0)
    from _train_toys import Inverter

    init = Inverter(one.cfg.model_config).state_dict()
    assert all(not torch.allclose(init[k], r0[k]) for k in init if k != "latent")
    assert j0["losses"]["invert/loss"] == pytest.approx(res.losses["invert/loss"], rel=1e-5)


# ------------------------------------------------------------------------------------------
# multi-stage models under torchrun (one command trains the stages, then the model)
# ------------------------------------------------------------------------------------------

STAGE_TOYS = textwrap.dedent('''
    """Three chained toy stages (like GOHA's s1 -> s1_gan -> s2); stage a logs a measure on
    rank 0 only (like EG3D's depth measures)."""
    from dataclasses import dataclass
    import torch
    from torch import nn
    from pyface.train import register_model
    from pyface.train.model import Stage, TrainableModel, config_from_dict, load_pretrained

    torch.set_num_threads(1)

    @dataclass
    class Cfg:
        prev_checkpoint: str | None = None
        lr: float = 1e-2

    class Base(TrainableModel):
        Config = Cfg
        recipe = {"data": {"resolution": 8, "size": 16},
                  "train": {"steps": 2, "batch_size": 4, "ckpt_every": 1}}

        def __init__(self, cfg):
            super().__init__()
            self.cfg = cfg
            self.conv = nn.Conv2d(3, 3, 1)
            if cfg.prev_checkpoint:      # the earlier stage's run, written by rank 0
                _, state = load_pretrained(cfg.prev_checkpoint)
                self.conv.load_state_dict({k[5:]: v for k, v in state.items()
                                           if k.startswith("conv.")})

        def build_optimizers(self):
            return {"main": torch.optim.Adam(self.parameters(), lr=self.cfg.lr)}

        def step(self, phase, batch, ctx):
            x = batch["image"]
            loss = (self.conv(x) - x.flip(1)).abs().mean()
            out = {"loss": loss}
            if ctx.rank == 0 and type(self).__name__ == "A":
                out["rank0_measure"] = loss.detach() * 2
            return out

    class A(Base):
        pass

    class B(Base):
        stages = (Stage("a", "ddp_toy_a", "prev_checkpoint"),)

    class C(Base):
        stages = (Stage("b", "ddp_toy_b", "prev_checkpoint"),)

    register_model("ddp_toy_a", __name__ + ":A")
    register_model("ddp_toy_b", __name__ + ":B")
    register_model("ddp_toy_c", __name__ + ":C")
''')


def test_torchrun_chains_stages(tmp_path):
    """``torchrun -m pyface train`` of a model with nested stages: every stage and the final
    model train in one process group (rank 0 writes each stage's checkpoint before the next
    stage loads it), a measure logged on rank 0 only is reduced over the ranks that logged it,
    and rank 1 does not repeat rank 0's progress messages."""
    (tmp_path / "ddp_stage_toys.py").write_text(STAGE_TOYS)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    sets = sum((["--set", s] for s in ["train.progress=false", "train.tensorboard=false",
                                      "train.image_every=0", "train.log_every=1",
                                      "train.device=cpu", f"train.run_dir={run}"]), [])
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pyface", "train", "ddp_toy_c", "--import", "ddp_stage_toys", *sets],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from pyface import checkpoint as ckpt

    a, b = run / "stages" / "b" / "stages" / "a", run / "stages" / "b"
    for folder in (a, b, run):
        assert ckpt.latest_checkpoint(str(folder)).endswith("ckpt-000002"), folder
    assert proc.stderr.count("stage run: model.prev_checkpoint=") == 1
    assert proc.stderr.count("stage 'a': training ddp_toy_a") == 1
    assert proc.stdout.count("run folder:") == 1


INDIVISIBLE = textwrap.dedent("""
    import contextlib, io, sys
    from pyface.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", "example", *sum((["--set", s] for s in sys.argv[1:]), [])])
    assert rc == 2, (rc, err.getvalue()[-2000:])
    assert ("train.batch_size=3 is not divisible by the 2 ranks (the global batch is split "
            "into equal shares); use a multiple of the number of ranks") in err.getvalue()
""")


def test_torchrun_batch_that_does_not_divide_is_a_clear_error(tmp_path):
    """``pyface train`` on 2 ranks with a global batch of 3: both ranks exit with code 2 and a
    message naming the batch, the number of ranks and the fix."""
    from pyface.testing import run_torchrun

    script = tmp_path / "indivisible.py"
    script.write_text(INDIVISIBLE)
    run_torchrun(script, *OVERRIDES, f"train.run_dir={tmp_path / 'run'}", "train.batch_size=3")


EG3D_POOL_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from test_model_eg3d import _Frames, _experiment
    from pyface.train import Trainer

    torch.set_num_threads(1)
    out = sys.argv[1]
    exp = _experiment(os.path.join(out, "run"), 2)
    exp.model_config.gen_c_source, exp.model_config.gen_c_per_phase = "dataset", True
    tr = Trainer(exp, dataset=_Frames())
    m, seen = tr.model, []
    cond = m._c_cond

    def record(c, swapping_prob):
        seen.append(c.detach().clone())
        return cond(c, swapping_prob)

    m._c_cond = record
    tr.fit()
    rank = tr.dist.rank if tr.dist.enabled else "one"
    torch.save({"pool": m.label_pool("camera"), "seen": seen}, os.path.join(out, f"{rank}.pt"))
    tr.close()
""")


def test_two_ranks_draw_eg3d_dataset_cameras_as_one_process(tmp_path):
    """EG3D's gen_c_source=dataset on 2 gloo ranks: each rank builds the same label pool, and
    the cameras the two ranks' generators render at (Gmain, Greg, Dmain of every step) are
    together those one process renders for the whole batch."""
    script = tmp_path / "eg3d_pool_worker.py"
    script.write_text(EG3D_POOL_SCRIPT)
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for launch in (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], []):
        proc = subprocess.run([sys.executable, *launch, str(script), str(tmp_path), tests],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1, one = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1, "one"))
    assert torch.equal(r0["pool"], one["pool"]) and torch.equal(r1["pool"], one["pool"])
    # step 0: Gmain, Greg, Dmain; step 1: Gmain, Dmain (Greg every 2 steps)
    assert len(one["seen"]) == len(r0["seen"]) == len(r1["seen"]) == 5
    for a, b, whole in zip(r0["seen"], r1["seen"], one["seen"]):
        assert a.shape == (2, 25) and torch.equal(torch.cat([a, b]), whole)
