"""``pyface train`` under torchrun where ranks could get in each other's way, with two short
2-rank gloo runs: (1) a run made on 1 process resumed on 2 ranks (a warning that it does not
continue exactly), rank 1's log lines prefixed with its rank, the backend chosen without CUDA
logged once, and a rank that hangs in a step: rank 0 stops after ``PYFACE_DIST_TIMEOUT`` with
one message naming the latest checkpoint instead of waiting half an hour, and the checkpoints
stay whole; (2) the synthetic set generated into an empty ``data.path`` by rank 0 alone; (3) a
SIGTERM to rank 1 only: both ranks stop after one step, rank 0 saves, rank 1 says it stops;
(4) rank 0's data preparation and previews taking longer than ``PYFACE_DIST_TIMEOUT``, which the
other ranks wait for; (5) two nodes, each with ``data.path`` on its own disk; (6) each local rank's
GPU (torchrun's environment and a stand-in for CUDA)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pyface import checkpoint as ckpt
from pyface.train import distributed as D

FAULT_TOY = textwrap.dedent('''
    """A 1x1 convolution whose step on rank ``hang_rank`` at step ``hang_step`` sleeps
    ``hang_s`` seconds (a data read that hangs) and every step ``step_s`` seconds, and whose
    preview sleeps ``preview_s`` seconds; its
    constructor warns on every rank and, with ``pid_dir``, writes its process id there
    (``rank<N>.pid``)."""
    import logging
    import os
    import time
    from dataclasses import dataclass

    import torch
    from torch import nn
    from pyface.train import register_model
    from pyface.train.model import TrainableModel

    torch.set_num_threads(1)

    @dataclass
    class Cfg:
        hang_rank: int = 1
        hang_step: int = 1
        hang_s: float = 6.0
        step_s: float = 0.0
        pid_dir: str = ""
        preview_s: float = 0.0

    class FaultToy(TrainableModel):
        Config = Cfg
        recipe = {"data": {"resolution": 8, "size": 16},
                  "train": {"steps": 3, "batch_size": 4, "ckpt_every": 1}}

        def __init__(self, cfg):
            super().__init__()
            self.cfg = cfg
            self.conv = nn.Conv2d(3, 3, 1)
            logging.getLogger("pyface.faulttoy").warning("faulttoy: built without weights")
            if cfg.pid_dir:
                rank = os.environ.get("RANK", "0")
                with open(os.path.join(cfg.pid_dir, f"rank{rank}.pid"), "w") as f:
                    f.write(str(os.getpid()))

        def build_optimizers(self):
            return {"main": torch.optim.Adam(self.parameters(), lr=1e-2)}

        def step(self, phase, batch, ctx):
            if ctx.rank == self.cfg.hang_rank and ctx.step == self.cfg.hang_step:
                time.sleep(self.cfg.hang_s)
            time.sleep(self.cfg.step_s)
            x = batch["image"]
            return {"loss": (self.conv(x) - x.flip(1)).abs().mean()}

        def preview(self, batch):
            time.sleep(self.cfg.preview_s)      # rank 0 only: a slow preview (video) or disk
            return {"image": batch["image"][:2].clamp(-1, 1)}

    register_model("ddp_fault_toy", __name__ + ":FaultToy")
''')

SETS = ["train.device=cpu", "train.progress=false", "train.tensorboard=false",
        "train.image_every=0", "train.log_every=1"]


def _toy_env(tmp_path, **extra):
    """Writes the toy model next to the test and returns the environment of a torchrun of it
    (one thread, no inherited rank variables; ``extra`` added)."""
    (tmp_path / "ddp_fault_toy.py").write_text(FAULT_TOY)
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra,
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def test_resume_on_two_ranks_prefixes_and_a_hung_rank_times_out(tmp_path):
    env = _toy_env(tmp_path, PYFACE_DIST_TIMEOUT="2")
    run = tmp_path / "run"
    sets = sum((["--set", s] for s in SETS + [f"train.run_dir={run}"]), [])
    cmd = ["-m", "pyface", "train", "ddp_fault_toy", "--import", "ddp_fault_toy", *sets]
    one = subprocess.run([sys.executable, *cmd, "--set", "train.steps=1"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "distributed:" not in one.stderr and "[rank" not in one.stderr

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *cmd, "--resume"], env=env, capture_output=True, text=True, timeout=120)
    err = proc.stderr
    assert proc.returncode != 0, err[-3000:]
    # the process group, once, from rank 0: gloo chosen for the CPU, and the timeout
    assert err.count("INFO pyface.train: distributed: 2 ranks, backend gloo on cpu") == 1, err
    assert "a collective fails after waiting 2 s for the other ranks (PYFACE_DIST_TIMEOUT)" in err
    # resumed with another number of ranks: said once (rank 0), not silently
    assert err.count("resuming a run trained on 1 rank with 2: the global batch") == 1, err
    # a warning every rank gives: rank 0's as it is, rank 1's with its rank
    assert err.count("\nWARNING pyface.faulttoy: faulttoy: built without weights") == 1, err
    assert err.count("[rank 1] WARNING pyface.faulttoy: faulttoy: built without weights") == 1
    # rank 1 hangs in step 2: rank 0 stops after 2 s with one message, not a traceback
    assert ("pyface train: rank 0 of 2: a collective failed during step 2 (") in err, err
    assert ("did not answer within PYFACE_DIST_TIMEOUT=2 s (see its messages above); no "
            "checkpoint was written for this step; latest checkpoint: "
            f"{run / 'checkpoints' / 'ckpt-000001'}; run the same command with --resume") in err
    assert "[rank0]: Traceback" not in err, err
    # rank 1, sent SIGTERM by torchrun in its sleep, says that it stops (it writes no
    # checkpoint: rank 0 does), then, once it wakes, the same as rank 0 with its rank
    assert err.count("[rank 1] WARNING pyface.train: received SIGTERM: stopping after this step "
                     "with the other ranks (rank 0 saves the checkpoint)") == 1, err
    assert "received SIGTERM: saving a checkpoint" not in err, err
    assert "[rank 1] pyface train: rank 1 of 2: a collective failed during step 2" in err, err
    # the checkpoint of step 1 is whole and still the latest; nothing half-written is left
    assert sorted(os.listdir(run / "checkpoints")) == ["ckpt-000001", "latest"]
    assert ckpt.latest_checkpoint(str(run)).endswith("ckpt-000001")
    ckpt.load_folder(ckpt.latest_checkpoint(str(run)))


def test_synthetic_set_generated_into_data_path_once(tmp_path):
    """``data.path`` names an empty folder: the synthetic set is generated there by rank 0 while
    rank 1 waits, then both train on it (every rank generating at once made rank 1 fail on the
    folder's lock: "another `pyface data synth` is writing it")."""
    data, run = tmp_path / "data", tmp_path / "run"
    sets = SETS + [f"train.run_dir={run}", f"data.path={data}", "data.name=synthetic",
                   "data.resolution=16", "model.resolution=16", "train.steps=1",
                   "train.batch_size=2", "data.options.synth.identities=2",
                   "data.options.synth.videos_per_identity=1", "data.options.synth.frames=2",
                   "data.options.synth.cross=false", "data.options.synth.multiview=false",
                   "data.options.synth.workers=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pyface", "train", "example", *sum((["--set", s] for s in sets), [])],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "is writing it" not in proc.stderr
    # said once, by rank 0, which generates it (rank 1 then finds the set)
    assert proc.stderr.count(f"WARNING pyface.data: data.path {data} does not exist: generating "
                             "the synthetic set there (data.options.synth: identities=2, "
                             "videos_per_identity=1, frames=2; 16 px; a dataset meant to be "
                             "read from elsewhere: check the path)") == 1, proc.stderr[-3000:]
    assert "[rank 1] WARNING pyface.data" not in proc.stderr
    assert sorted(os.listdir(data)) == ["id0000_v00", "id0001_v00", "index.json", "synth.json"]
    assert ckpt.latest_checkpoint(str(run)).endswith("ckpt-000001")


SLOW_DATA = textwrap.dedent('''
    """The procedural set, built after ``slow_data_s`` seconds on rank 0 (a cache or a synthetic
    set prepared on disk the first time, which can take longer than a collective's timeout)."""
    import dataclasses
    import os
    import time

    from pyface.train import register_dataset, registry

    def slow_procedural(cfg):
        if os.environ.get("RANK", "0") == "0":
            time.sleep(float(os.environ["SLOW_DATA_S"]))
        return registry.build_dataset(dataclasses.replace(cfg, name="procedural"))

    register_dataset("ddp_slow_data", slow_procedural)
''')


def test_other_ranks_wait_for_rank_0_s_data_longer_than_the_collective_timeout(tmp_path):
    """Rank 0 prepares the dataset for 15 s, 3x ``PYFACE_DIST_TIMEOUT=5``: rank 1 waits for it
    (rank 0 itself, building, is in no collective that could time out, so a timeout there would
    only end runs whose data takes long to prepare the first time) and both train. (A 2 s
    timeout failed once on a loaded 2-core machine, rank 1 exiting first; its message was cut.)"""
    env = _toy_env(tmp_path, PYFACE_DIST_TIMEOUT="5", SLOW_DATA_S="15")
    (tmp_path / "ddp_slow_data.py").write_text(SLOW_DATA)
    run = tmp_path / "run"
    sets = SETS + [f"train.run_dir={run}", "data.name=ddp_slow_data", "train.steps=1",
                   "model.hang_s=0"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pyface", "train", "ddp_fault_toy", "--import", "ddp_fault_toy",
         "--import", "ddp_slow_data",
         *sum((["--set", s] for s in sets), [])],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-8000:]        # every rank's message
    assert "a collective failed" not in proc.stderr, proc.stderr[-8000:]
    assert ckpt.latest_checkpoint(str(run)).endswith("ckpt-000001")


def test_dist_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv("PYFACE_DIST_TIMEOUT", raising=False)
    assert D.dist_timeout() == D.DEFAULT_TIMEOUT_S == 1800
    monkeypatch.setenv("PYFACE_DIST_TIMEOUT", "90")
    assert D.dist_timeout() == 90.0
    for bad in ("0", "-5", "soon", "inf", "nan"):
        monkeypatch.setenv("PYFACE_DIST_TIMEOUT", bad)
        with pytest.raises(ValueError, match=r"PYFACE_DIST_TIMEOUT: expected a number of "
                                             rf"seconds > 0, got '{bad}'"):
            D.dist_timeout()


def test_collective_failures_are_told_from_a_rank_s_own_errors(monkeypatch):
    monkeypatch.delenv("PYFACE_DIST_TIMEOUT", raising=False)
    gone = RuntimeError("[/x/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
                        "by peer [127.0.0.1]:28546. This is typically caused by a remote worker "
                        "crashing.")
    late = RuntimeError("[/x/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms "
                        "for recv operation to complete")
    own = RuntimeError("The size of tensor a (4) must match the size of tensor b (3) at non-"
                       "singleton dimension 1")
    assert D.collective_failure(gone) and D.collective_failure(late)
    assert not D.collective_failure(own) and not D.collective_failure(OSError("no such file"))
    assert not D.collective_failure(RuntimeError("DataLoader timed out after 5 seconds"))
    info = D.DistInfo(rank=1, world_size=2)
    msg = D.peer_failure_message(gone, info, 4, "runs/x/checkpoints/ckpt-000004")
    assert msg.startswith("rank 1 of 2: a collective failed during step 5 ([/x/third_party/gloo")
    assert msg.endswith("latest checkpoint: runs/x/checkpoints/ckpt-000004; run the same "
                        "command with --resume to continue")
    assert D.peer_failure_message(late, info, stage=True).endswith(
        "see its messages above); run the same command again to continue (an unfinished stage "
        "resumes from its latest checkpoint)")
    assert D.peer_failure_message(gone, info).startswith(
        "rank 1 of 2: a collective failed before training ([/x/third_party/gloo")
    assert D.peer_failure_message(gone, info).endswith("; run the same command again")
    assert D.peer_failure_message(late, info, 0, None).endswith(
        "during step 1 ([/x/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms "
        "for recv operation to complete): another rank exited, was killed or did not answer "
        "within PYFACE_DIST_TIMEOUT=1800 s (see its messages above); no checkpoint was written "
        "yet; run the same command again")


def test_errors_before_the_process_group_carry_the_rank(monkeypatch, capsys):
    """Every rank checks the command before joining the process group: rank 1's copy of an error
    is prefixed with its rank, rank 0's is not."""
    from pyface.cli import main

    for rank, prefix in (("1", "[rank 1] pyface train: "), ("0", "pyface train: ")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(["train", "example", "--set", "train.no_such_key=1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(prefix) and "no_such_key" in err, err


def test_print_config_under_torchrun_prints_once(monkeypatch, capsys):
    """``--print-config`` launched on 2 ranks: rank 0 prints the YAML, rank 1 nothing."""
    from pyface.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "example", "--print-config"]) == 0
        out = capsys.readouterr().out
        assert ("model: example" in out) is printed and (out != "") is printed, (rank, out)


def test_sigterm_to_one_rank_stops_every_rank_after_one_step(tmp_path):
    """SIGTERM to rank 1's process only (a node's preemption, a ``kill`` of one worker): the stop
    flag is all-reduced, so both ranks stop after the same step; rank 1 says that it stops and
    that rank 0 saves (it writes no checkpoint), rank 0 writes the one checkpoint. Both ranks
    exit with code 143, also the one that torchrun sends SIGTERM once the other exited (after
    its fit, pyface train's handler exits at once with 143)."""
    import re
    import signal
    import time

    import pyface

    env = _toy_env(tmp_path)
    run, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    sets = SETS + [f"train.run_dir={run}", "train.steps=100000", "train.ckpt_every=0",
                   "model.hang_rank=-1", "model.step_s=0.2", f"model.pid_dir={pids}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pyface", "train", "ddp_fault_toy", "--import", "ddp_fault_toy",
         *sum((["--set", s] for s in sets), [])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = run / "log.txt"
    try:
        end = time.monotonic() + 90
        while not (log.is_file() and re.search(r" INFO step [2-9]\d*/", log.read_text())):
            assert proc.poll() is None and time.monotonic() < end, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        os.kill(int((pids / "rank1.pid").read_text()), signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out[-3000:]
    assert out.count("[rank 1] WARNING pyface.train: received SIGTERM: stopping after this step "
                     "with the other ranks (rank 0 saves the checkpoint)") == 1, out[-3000:]
    assert "[rank 1] WARNING pyface.train: received SIGTERM: saving" not in out
    # one checkpoint, whole, of the last step rank 0 logged: both ranks stopped after it
    steps = [s for s, _ in ckpt.list_checkpoints(str(run))]
    assert len(steps) == 1 and steps[0] >= 2, (steps, out[-3000:])
    assert max(int(m) for m in re.findall(r" INFO step (\d+)/", log.read_text())) == steps[0]
    ckpt.load_folder(ckpt.latest_checkpoint(str(run)))
    # torchrun's report of its workers: both 143 (the rank that exits second, sent SIGTERM by
    # torchrun once the first exited, used to be ended by it, -15, after its stop handler was
    # gone)
    codes = re.findall(r"exitcode\s*:\s*(-?\d+) ", out)
    assert codes and set(codes) == {"143"}, out[-3000:]
    assert "a collective failed" not in out, out[-3000:]
    assert os.path.dirname(pyface.__file__) not in out, out[-3000:]     # no pyface traceback


def _fake_cuda_ranks(monkeypatch, *, local_rank: int, local_world: int, gpus: int):
    """torchrun's environment for ``local_rank`` of ``local_world`` processes on a node with
    ``gpus`` CUDA devices; joining the process group raises (the device check comes before)."""
    import torch

    for k, v in {"WORLD_SIZE": str(2 * local_world), "RANK": str(local_rank),
                 "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_world)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(d))

    def joined(*a, **k):
        raise RuntimeError("joined the process group")

    monkeypatch.setattr(D.dist, "init_process_group", joined)
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    return chosen


def test_each_local_rank_takes_its_own_gpu_or_a_clear_error(monkeypatch):
    import torch

    # auto / cuda: rank 1 of a node takes cuda:LOCAL_RANK (not cuda:RANK)
    for pref in ("auto", "cuda"):
        chosen = _fake_cuda_ranks(monkeypatch, local_rank=1, local_world=2, gpus=2)
        monkeypatch.setenv("RANK", "3")          # the second node's second rank
        with pytest.raises(RuntimeError, match="joined the process group"):
            D.init_distributed(pref)
        assert chosen == [torch.device("cuda:1")]
    # an explicit cuda:N with several processes per node would put them all on one GPU
    chosen = _fake_cuda_ranks(monkeypatch, local_rank=1, local_world=2, gpus=2)
    with pytest.raises(ValueError, match=r"train.device='cuda:0': under torchrun with 2 processes "
                                         r"on this node \(LOCAL_WORLD_SIZE=2\) every one would "
                                         r"use cuda:0; use train.device=cuda or auto \(each "
                                         r"rank takes cuda:LOCAL_RANK\)"):
        D.init_distributed("cuda:0")
    assert chosen == []
    # one process per node: cuda:N is that process's GPU
    chosen = _fake_cuda_ranks(monkeypatch, local_rank=0, local_world=1, gpus=2)
    with pytest.raises(RuntimeError, match="joined the process group"):
        D.init_distributed("cuda:1")
    assert chosen == [torch.device("cuda:1")]
    # more processes on a node than its GPUs: named, before any CUDA call
    chosen = _fake_cuda_ranks(monkeypatch, local_rank=2, local_world=3, gpus=2)
    with pytest.raises(ValueError, match=r"LOCAL_RANK=2 but this node has 2 CUDA devices "
                                         r"\(torch.cuda.device_count\(\)\): start at most 2 "
                                         r"processes per node \(--nproc_per_node\)"):
        D.init_distributed("auto")
    assert chosen == []
    chosen = _fake_cuda_ranks(monkeypatch, local_rank=0, local_world=1, gpus=2)
    with pytest.raises(ValueError, match=r"^train.device='cuda:2' but this node has 2 CUDA "
                                         r"devices \(torch.cuda.device_count\(\)\)$"):
        D.init_distributed("cuda:2")
    assert chosen == []


def test_a_data_path_on_each_node_s_own_disk_is_generated_once_per_node(tmp_path):
    """Two nodes of 2 ranks (two torchrun agents on this machine, each in its own folder, so the
    relative ``data.path`` is on each node's own disk): rank 0 generates node 0's synthetic set,
    then rank 2 (node 1's first) node 1's, then the others read them (node 1's two ranks used to
    generate it at once after rank 0: rank 3 stopped on the folder's lock, "another `pyface data
    synth` is writing it")."""
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = [s for s in SETS if s != "train.log_every=1"] + [
        "train.run_dir=run", "data.path=data", "data.name=synthetic", "data.resolution=16",
        "model.resolution=16", "train.steps=1", "train.batch_size=4",
        "data.options.synth.identities=2", "data.options.synth.videos_per_identity=1",
        "data.options.synth.frames=2", "data.options.synth.cross=false",
        "data.options.synth.multiview=false", "data.options.synth.workers=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    procs = []
    for node in (0, 1):
        (tmp_path / f"node{node}").mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
             "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}", "-m",
             "pyface", "train", "example", *sum((["--set", s] for s in sets), [])],
            cwd=tmp_path / f"node{node}", env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "is writing it" not in err
    # generated by the first rank of each node, each node's copy the same
    assert outs[0][1].count("WARNING pyface.data: data.path data does not exist: generating") == 1
    assert outs[1][1].count("[rank 2] WARNING pyface.data: data.path data does not exist: "
                            "generating") == 1
    assert "[rank 3] WARNING pyface.data" not in outs[1][1]
    index = [json.loads((tmp_path / f"node{n}" / "data" / "index.json").read_text())
             for n in (0, 1)]
    assert index[0] == index[1]
    # only rank 0 writes the run folder
    assert ckpt.latest_checkpoint(str(tmp_path / "node0" / "run")).endswith("ckpt-000001")
    assert not (tmp_path / "node1" / "run").exists()


def test_other_ranks_wait_for_rank_0_s_checkpoints_and_previews_past_the_timeout(tmp_path):
    """Rank 0 writes its previews of step 1 for 5 s (a preview video of a large model, a slow
    disk), longer than ``PYFACE_DIST_TIMEOUT=2``: rank 1 waits for it, as for a step, and both
    go on (rank 1 used to fail in the next step's collective after 2 s, and torchrun stopped
    rank 0: a low timeout, set to catch hung ranks early, ended runs whose previews or
    checkpoints took longer)."""
    env = _toy_env(tmp_path, PYFACE_DIST_TIMEOUT="2")
    run = tmp_path / "run"
    sets = [s for s in SETS if s != "train.image_every=0"] + [
        f"train.run_dir={run}", "train.steps=2", "train.image_every=1", "train.video_every=0",
        "model.hang_s=0", "model.preview_s=5"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pyface", "train", "ddp_fault_toy", "--import", "ddp_fault_toy",
         *sum((["--set", s] for s in sets), [])],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-8000:]        # every rank's message
    assert "a collective failed" not in proc.stderr, proc.stderr[-8000:]
    assert sorted(os.listdir(run / "previews")) == ["step-000001.png", "step-000002.png"]
    assert ckpt.latest_checkpoint(str(run)).endswith("ckpt-000002")
