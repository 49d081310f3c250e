"""Preemption of ``pyface train`` in a subprocess: SIGTERM, SIGINT and SIGUSR1 (SLURM's
preemption, Ctrl-C, SLURM's warning before the time limit) finish the step, write a checkpoint
and exit with code 143, and ``--resume`` continues bit-exactly; a SIGKILL in the middle of a
checkpoint write leaves the previous checkpoint as the one ``--resume`` reads."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyface import checkpoint as ckpt

# the example model at 16x16 with a constant learning rate (the schedule does not depend on
# train.steps, so a run stopped early and resumed with fewer steps can match an uninterrupted one)
TINY = ["model.resolution=16", "model.plane_resolution=8", "model.plane_channels=4",
        "model.encoder_channels=8", "model.hidden=8", "model.depth_samples=4",
        "data.resolution=16", "data.size=64", "train.batch_size=4", "train.progress=false",
        "train.tensorboard=false", "train.image_every=0", "train.log_every=1",
        "train.ckpt_every=0", "train.video_frames=0", "train.lr_schedule.kind=constant",
        "train.lr_schedule.warmup_steps=0", "train.device=cpu"]


def _cmd(run, *extra: str) -> list[str]:
    sets = [*TINY, f"train.run_dir={run}", *extra]
    return [sys.executable, "-m", "pyface", "train", "example", *sum((["--set", s] for s in sets),
                                                                     [])]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _wait_for_step(run, proc, step: int, timeout: float = 120.0) -> None:
    """Until the run's log.txt has a loss line of ``step`` or later (training is under way)."""
    log = os.path.join(run, "log.txt")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if os.path.exists(log):
            steps = [int(m.group(1)) for m in re.finditer(r" INFO step (\d+)/", open(log).read())]
            if steps and max(steps) >= step:
                return
        time.sleep(0.1)
    raise AssertionError(f"no step {step} in {log} after {timeout} s")


def _state(path: str) -> dict[str, torch.Tensor]:
    tensors, _ = ckpt.load_folder(path)
    return tensors


SLOW_DATA = """
import time
from pyface.train.data import ProceduralFaces
from pyface.train.registry import register_dataset


class SlowFaces(ProceduralFaces):
    def __getitem__(self, index):
        time.sleep(0.05)                # loading dominates: the main process waits for batches
        return super().__getitem__(index)


register_dataset("slow_faces", "slowfaces:SlowFaces")
"""


@pytest.mark.parametrize("sig, group, workers", [
    (signal.SIGTERM, False, 0),      # SLURM's preemption / torchrun's shutdown of a worker
    (signal.SIGUSR1, False, 0),      # SLURM's --signal=USR1@SECONDS before the time limit
    # scancel or Ctrl-C signal the whole process group: the DataLoader workers (which the main
    # process waits for) too; they ignore it and deliver the batch of the step that finishes
    (signal.SIGTERM, True, 2),
    (signal.SIGINT, True, 2),
], ids=["SIGTERM", "SIGUSR1", "SIGTERM-group-workers", "SIGINT-group-workers"])
def test_signal_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, sig, group,
                                                                   workers):
    run = str(tmp_path / "run")
    extra, env = [f"train.num_workers={workers}"], _env()
    if workers:
        (tmp_path / "slowfaces.py").write_text(SLOW_DATA)
        extra += ["data.name=slow_faces"]
        env.update(PYFACE_PLUGINS="slowfaces", PYTHONPATH=os.pathsep.join(
            [str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(_cmd(run, "train.steps=100000", *extra), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=group)
    try:
        _wait_for_step(run, proc, 2)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert f"received {signal.Signals(sig).name}: saving a checkpoint after this step" in err
    latest = ckpt.latest_checkpoint(run)
    stopped = ckpt.read_meta(latest)["step"]
    assert latest.endswith(f"ckpt-{stopped:06d}") and 2 <= stopped < 100000
    assert f"stopped at step {stopped}; resume with --resume" in err
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [
        os.path.basename(latest), "latest"]                      # one complete checkpoint
    # --resume continues exactly: the same weights, EMA and Adam moments as an uninterrupted run
    end = stopped + 2
    _run(_cmd(run, f"train.steps={end}", *extra) + ["--resume"], env)
    _run(_cmd(tmp_path / "straight", f"train.steps={end}", *extra), env)
    resumed = _state(ckpt.latest_checkpoint(run))
    straight = _state(ckpt.latest_checkpoint(str(tmp_path / "straight")))
    assert ckpt.read_meta(ckpt.latest_checkpoint(run))["step"] == end
    assert sorted(resumed) == sorted(straight)
    assert any(k.startswith("ema.") for k in straight) and any(".exp_avg" in k for k in straight)
    for k, v in straight.items():
        assert torch.equal(resumed[k], v), k


KILL_SCRIPT = """
import os, signal, sys
import safetensors.torch as st

real, kill_at = st.save_file, sys.argv[1]

def save_file(tensors, path, *args, **kwargs):
    real(tensors, path, *args, **kwargs)            # the tensors on disk, meta.json not yet
    if os.path.basename(os.path.dirname(path)).startswith(kill_at + ".tmp-"):
        os.kill(os.getpid(), signal.SIGKILL)

st.save_file = save_file
from pyface.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    """SIGKILL while ckpt-000004 is being written: ``latest`` and ``--resume`` keep ckpt-000002
    (the partial folder is never read as a checkpoint, and the next save removes it); the
    resumed run ends where an uninterrupted one does."""
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    run = str(tmp_path / "run")
    cmd = _cmd(run, "train.steps=6", "train.ckpt_every=2")
    proc = subprocess.run([sys.executable, str(script), "ckpt-000004", *cmd[3:]], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    names = sorted(os.listdir(os.path.join(run, "checkpoints")))
    partial = [n for n in names if n.startswith("ckpt-000004.tmp-")]
    assert len(partial) == 1 and names == ["ckpt-000002", partial[0], "latest"]
    assert os.path.isfile(os.path.join(run, "checkpoints", partial[0], ckpt.TENSORS_FILE))
    assert ckpt.latest_checkpoint(run).endswith("ckpt-000002")
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    _run(cmd + ["--resume"])
    assert not any(".tmp-" in n for n in os.listdir(os.path.join(run, "checkpoints")))
    _run(_cmd(tmp_path / "straight", "train.steps=6", "train.ckpt_every=2"))
    resumed = _state(ckpt.latest_checkpoint(run))
    straight = _state(ckpt.latest_checkpoint(str(tmp_path / "straight")))
    for k, v in straight.items():
        assert torch.equal(resumed[k], v), k


CLI_SCRIPT = """
import sys
from pyface.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigusr1_to_torchrun_stops_both_ranks_at_one_step_and_resumes_exactly(tmp_path):
    """``torchrun --signals-to-handle=SIGTERM,SIGINT,SIGUSR1``: SIGUSR1 to torchrun reaches both
    gloo ranks, which stop after the same step with one checkpoint; ``--resume`` under torchrun
    ends where an uninterrupted 2-rank run does."""
    from pyface.testing import run_torchrun

    script = tmp_path / "cli.py"
    script.write_text(CLI_SCRIPT)
    run = str(tmp_path / "run")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc_per_node=2", "--signals-to-handle=SIGTERM,SIGINT,SIGUSR1"]
    proc = subprocess.Popen(launch + [str(script), *_cmd(run, "train.steps=100000")[3:]],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        _wait_for_step(run, proc, 2)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # rank 0 saves; rank 1 stops with it and says so (only rank 0 writes checkpoints)
    assert out.count("received SIGUSR1: saving a checkpoint after this step") == 1, out[-3000:]
    assert out.count("[rank 1] WARNING pyface.train: received SIGUSR1: stopping after this step "
                     "with the other ranks (rank 0 saves the checkpoint)") == 1, out[-3000:]
    latest = ckpt.latest_checkpoint(run)
    stopped = ckpt.read_meta(latest)["step"]
    assert f"stopped at step {stopped}; resume with --resume" in out
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [stopped]
    end = stopped + 2
    run_torchrun(script, *_cmd(run, f"train.steps={end}")[3:], "--resume")
    run_torchrun(script, *_cmd(tmp_path / "straight", f"train.steps={end}")[3:])
    resumed = _state(ckpt.latest_checkpoint(run))
    straight = _state(ckpt.latest_checkpoint(str(tmp_path / "straight")))
    assert ckpt.read_meta(ckpt.latest_checkpoint(run))["step"] == end
    for k, v in straight.items():
        assert torch.equal(resumed[k], v), k


SLOW_MODEL = """
import time
from pyface.train.example import TriplaneAutoencoder
from pyface.train.registry import register_model


class SlowSteps(TriplaneAutoencoder):
    def step(self, phase, batch, ctx):
        if ctx.step >= 2:
            time.sleep(2.0)             # a long step: the signals arrive inside it
        return super().step(phase, batch, ctx)


register_model("slow_steps", "slowsteps:SlowSteps")
"""


def test_second_signal_stops_at_once_naming_the_latest_checkpoint(tmp_path):
    """Two SIGTERMs inside one step: the second stops at once (exit code 143) and the message
    names the latest checkpoint, which ``--resume`` continues from."""
    (tmp_path / "slowsteps.py").write_text(SLOW_MODEL)
    env = dict(_env(), PYFACE_PLUGINS="slowsteps",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    run = str(tmp_path / "run")
    cmd = _cmd(run, "train.steps=100000", "train.ckpt_every=2")
    cmd[cmd.index("example")] = "slow_steps"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for_step(run, proc, 2)
        end = time.monotonic() + 60
        while not (ckpt.latest_checkpoint(run) or "").endswith("ckpt-000002"):
            assert time.monotonic() < end
            time.sleep(0.05)
        time.sleep(0.3)                 # into step 2 (log line, then checkpoint, then step)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert ("pyface train: a second signal (SIGTERM) stopped training at once during step 2; "
            f"the latest checkpoint: {os.path.join(run, 'checkpoints', 'ckpt-000002')}; resume "
            "with --resume") in err
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
