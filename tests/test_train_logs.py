"""What a run folder records across an interruption and ``--resume``: TensorBoard scalars and
images (no step twice, none out of order), log.txt (a line marking the resume), preview files
(replaced, not duplicated), the learning rates and rates logged per step, and the console line
under ``train.progress=false``."""
from __future__ import annotations

import glob
import logging
import os
import re

import pytest
import torch

from _train_toys import Inverter, VectorData, inverter_trainer

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator")


class Previewed(Inverter):
    """The toy inverter with a preview grid (previews/step-<step>.png and the "preview" image)."""

    def preview(self, batch):
        x = batch["x"][:, :12].reshape(-1, 3, 2, 2).tanh()
        return {"x": x, "recon": self.G(self.E(batch["x"]))[:, :12].reshape(-1, 3, 2, 2).tanh()}


def _trainer(run, *extra):
    from pyface.train import Trainer

    tr = inverter_trainer([f"train.run_dir={run}", "train.tensorboard=true",
                           "train.lr_schedule.kind=linear", "train.lr_schedule.warmup_steps=0",
                           *extra], 4)
    torch.manual_seed(0)
    return Trainer(tr.cfg, model=Previewed(tr.cfg.model_config), dataset=VectorData())


def _crash_at(tr, step: int) -> None:
    """Make ``tr`` fail (as a killed process would stop) when it reaches ``step``: the steps
    before it are logged, those after the last checkpoint are not checkpointed."""
    real = tr.train_step

    def step_or_die(batch):
        if tr.step == step:
            raise RuntimeError("killed")
        return real(batch)

    tr.train_step = step_or_die


def _events(run):
    acc = event_accumulator.EventAccumulator(
        os.path.join(run, "tb"), size_guidance={event_accumulator.SCALARS: 0,
                                                event_accumulator.IMAGES: 0})
    acc.Reload()
    return acc


def _interrupted_and_resumed(tmp_path, *extra, crash=7, ckpt_every=4, steps=10):
    run = str(tmp_path / "run")
    common = [f"train.ckpt_every={ckpt_every}", "train.image_every=2", "train.video_frames=0",
              *extra]
    tr = _trainer(run, f"train.steps={steps}", *common)
    _crash_at(tr, crash)
    with pytest.raises(RuntimeError, match="killed"):
        tr.fit()
    tr.close()
    tr = _trainer(run, f"train.steps={steps}", *common)
    assert tr.resume() is not None and tr.step == ckpt_every
    result = tr.fit()
    tr.close()
    assert result.step == steps
    return run


def test_tensorboard_has_each_step_once_after_a_crash_and_resume(tmp_path):
    # steps 1..7 logged, the checkpoint at step 4, killed in step 8; resumed from step 4
    run = _interrupted_and_resumed(tmp_path)
    acc = _events(run)
    tags = acc.Tags()["scalars"]
    assert "loss/invert/loss" in tags and "loss/enc/grad_norm" not in tags
    for tag in tags:
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)), (tag, steps)             # once each, in order
    assert [e.step for e in acc.Scalars("loss/invert/loss")] == list(range(1, 11))
    # the preview image of step 6 was written before the crash and again after the resume: once
    assert [e.step for e in acc.Images("preview")] == [2, 4, 6, 8, 10]
    # the curves are those of an uninterrupted run (resume is exact on CPU)
    plain = str(tmp_path / "plain")
    tr = _trainer(plain, "train.steps=10", "train.ckpt_every=4", "train.image_every=2",
                  "train.video_frames=0")
    tr.fit()
    tr.close()
    ref = _events(plain)
    for tag in ("loss/invert/loss", "loss/enc/loss", "grad/invert/grad_norm"):
        assert [e.value for e in acc.Scalars(tag)] == [e.value for e in ref.Scalars(tag)], tag


def test_log_txt_marks_the_resume_and_previews_are_replaced(tmp_path):
    run = _interrupted_and_resumed(tmp_path)
    lines = open(os.path.join(run, "log.txt")).read().splitlines()
    starts = [i for i, s in enumerate(lines) if " training inverter from step " in s]
    assert len(starts) == 2, lines
    assert lines[starts[0]].endswith("from step 0 to 10")
    assert re.search(r"from step 4 to 10, resumed from .*ckpt-000004 \(step lines above",
                     lines[starts[1]]), lines[starts[1]]

    def steps(part):
        return [int(m.group(1)) for s in part for m in [re.search(r" INFO step (\d+)/10: ", s)]
                if m]

    # the interrupted run's steps, then after the marker each later step once, in order
    assert steps(lines[:starts[1]]) == list(range(1, 8))
    assert steps(lines[starts[1]:]) == list(range(5, 11))
    # one preview per step, the ones of steps after the checkpoint overwritten in place
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run, "previews", "*")))
    assert names == [f"step-{s:06d}.png" for s in (2, 4, 6, 8, 10)]


def test_previews_after_the_resumed_step_are_deleted(tmp_path, caplog):
    """A run killed at step 7 (previews of steps 2, 4, 6; checkpoint at 4) resumed with
    train.steps=5 never reaches step 6 again: its preview is from the abandoned run and is
    deleted when training starts from step 4, with a log line saying how many."""
    run = str(tmp_path / "run")
    common = ["train.ckpt_every=4", "train.image_every=2", "train.video_frames=0"]
    tr = _trainer(run, "train.steps=10", *common)
    _crash_at(tr, 7)
    with pytest.raises(RuntimeError, match="killed"):
        tr.fit()
    tr.close()
    previews = os.path.join(run, "previews")
    assert sorted(os.listdir(previews)) == [f"step-{s:06d}.png" for s in (2, 4, 6)]
    open(os.path.join(previews, "notes.txt"), "w").close()        # not a preview: kept
    tr = _trainer(run, "train.steps=5", *common)
    assert tr.resume() is not None and tr.step == 4
    with caplog.at_level(logging.INFO, logger="pyface"):
        result = tr.fit()
    tr.close()
    assert result.step == 5
    assert sorted(os.listdir(previews)) == ["notes.txt"] + [f"step-{s:06d}.png"
                                                            for s in (2, 4, 5)]
    assert "deleted 1 preview of steps after step 4 (step-000006.png)" in caplog.text
    assert "deleted 1 preview of steps after step 4" in open(os.path.join(run, "log.txt")).read()


def test_learning_rates_and_rates_logged_are_those_of_the_step(tmp_path):
    run = str(tmp_path / "run")
    # linear decay over 4 steps, logged every 2: the steps with index 1 and 3 are logged
    tr = _trainer(run, "train.steps=4", "train.log_every=2", "train.image_every=0")
    tr.fit()
    tr.close()
    acc = _events(run)
    base = {"lr/latent": 0.05, "lr/G": 1e-2, "lr/E": 0.1}
    for tag, lr in base.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert got == [(2, pytest.approx(lr * 0.75)), (4, pytest.approx(lr * 0.25))], tag
    assert [(e.step, e.value) for e in acc.Scalars("lr_factor")] == [
        (2, pytest.approx(0.75)), (4, pytest.approx(0.25))]
    for tag in ("speed/steps_per_s", "speed/images_per_s", "speed/data_wait_fraction"):
        assert [e.step for e in acc.Scalars(tag)] == [2, 4], tag
    sps = [e.value for e in acc.Scalars("speed/steps_per_s")]
    ips = [e.value for e in acc.Scalars("speed/images_per_s")]
    assert all(v > 0 for v in sps) and ips == pytest.approx([4 * v for v in sps])
    assert all(0 <= e.value <= 1 for e in acc.Scalars("speed/data_wait_fraction"))
    assert "memory/peak_gib" not in acc.Tags()["scalars"]            # CUDA only


def test_several_param_groups_are_logged_each(tmp_path):
    run = str(tmp_path / "run")
    tr = _trainer(run, "train.steps=1", "train.image_every=0")
    m = tr.model
    tr.optimizers["G"] = torch.optim.Adam([{"params": m.G[0].parameters()},
                                           {"params": m.G[2].parameters(), "lr": 1e-3}], lr=1e-2)
    tr._base_lrs["G"] = [1e-2, 1e-3]
    tr.fit()
    tr.close()
    tags = _events(run).Tags()["scalars"]
    assert {"lr/G/0", "lr/G/1", "lr/E", "lr/latent"} <= set(tags) and "lr/G" not in tags


def test_the_rate_after_a_resume_does_not_span_the_downtime(tmp_path, monkeypatch):
    import time

    run = str(tmp_path / "run")
    tr = _trainer(run, "train.steps=2", "train.image_every=0", "train.ckpt_every=1")
    tr.fit()
    tr.close()
    real, offset = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real() + offset[0])
    tr = _trainer(run, "train.steps=4", "train.image_every=0")
    tr.resume()
    offset[0] = 3600.0          # an hour between the resume and the first step
    tr.fit()
    tr.close()
    acc = _events(run)
    assert [e.step for e in acc.Scalars("speed/steps_per_s")] == [1, 2, 3, 4]
    assert all(e.value > 0.1 for e in acc.Scalars("speed/steps_per_s"))


TINY = ["model.resolution=16", "model.plane_resolution=8", "model.plane_channels=4",
        "model.encoder_channels=8", "model.hidden=8", "model.depth_samples=4",
        "data.resolution=16", "data.size=16", "train.batch_size=4", "train.progress=false",
        "train.image_every=0", "train.video_frames=0", "train.log_every=1", "train.ckpt_every=0",
        "train.device=cpu"]


def test_a_moved_or_copied_run_resumed_continues_in_its_new_folder(tmp_path):
    import shutil

    import yaml

    from pyface.cli import main

    old, new = tmp_path / "old", tmp_path / "new"
    sets = sum((["--set", s] for s in TINY), [])
    assert main(["train", "example", *sets, "--set", f"train.run_dir={old}",
                 "--set", "train.steps=2"]) == 0
    shutil.copytree(old, new)
    # its config.yaml names the old folder; --resume NEW continues in NEW
    assert main(["train", "example", "--config", str(new / "config.yaml"), "--resume", str(new),
                 "--set", "train.steps=3"]) == 0
    # and so does --resume of a checkpoint inside it
    assert main(["train", "example", "--config", str(new / "config.yaml"), "--resume",
                 str(new / "checkpoints" / "ckpt-000003"), "--set", "train.steps=4"]) == 0
    assert sorted(os.listdir(old / "checkpoints")) == ["ckpt-000002", "latest"]   # untouched
    assert "ckpt-000004" in os.listdir(new / "checkpoints")
    assert yaml.safe_load((new / "config.yaml").read_text())["train"]["run_dir"] == str(new)
    acc = _events(str(new))
    assert [e.step for e in acc.Scalars("loss/main/loss")] == [1, 2, 3, 4]
    assert len(re.findall(r" INFO step \d+/", (new / "log.txt").read_text())) == 4
    # an explicit train.run_dir still wins: a new run folder started from the copied run
    fork = tmp_path / "fork"
    assert main(["train", "example", "--config", str(new / "config.yaml"), "--resume", str(new),
                 "--set", f"train.run_dir={fork}", "--set", "train.steps=5"]) == 0
    assert "ckpt-000005" in os.listdir(fork / "checkpoints")
    assert "ckpt-000005" not in os.listdir(new / "checkpoints")


def test_writers_of_one_process_within_one_second_are_read_in_order(tmp_path, monkeypatch):
    """Event files are read in name order and their names end in a per-process counter: the
    writer numbered 10 must not sort before the one numbered 9 (the resumed run's purge would
    then come first); Board waits for the next second instead."""
    from pyface.train.monitor import Board

    efw = pytest.importorskip("tensorboard.summary.writer.event_file_writer")
    if not hasattr(efw, "_global_uid") or not hasattr(efw, "AtomicCounter"):
        pytest.skip("tensorboard names its event files differently")
    monkeypatch.setattr(efw, "_global_uid", efw.AtomicCounter(9))
    run = str(tmp_path / "run")
    for purge, steps in ((1, (1, 2, 3)), (3, (3, 4))):        # a run, then its resume at 2
        b = Board(os.path.join(run, "tb"), purge_step=purge)
        for s in steps:
            b.scalars({"loss": float(10 * purge + s)}, s)
        b.close()
    assert [(e.step, e.value) for e in _events(run).Scalars("loss")] == [
        (1, 11.0), (2, 12.0), (3, 33.0), (4, 34.0)]


def test_a_finished_run_resumed_adds_no_step_to_tensorboard(tmp_path):
    run = str(tmp_path / "run")
    for _ in range(2):                      # the run, then --resume of the finished run
        tr = _trainer(run, "train.steps=2", "train.image_every=1", "train.video_frames=0")
        tr.resume()
        tr.fit()
        tr.close()
    acc = _events(run)
    assert [e.step for e in acc.Images("preview")] == [1, 2]
    assert [e.step for e in acc.Scalars("loss/invert/loss")] == [1, 2]
    assert sorted(os.listdir(os.path.join(run, "previews"))) == ["step-000001.png",
                                                                 "step-000002.png"]
    log_txt = open(os.path.join(run, "log.txt")).read()
    assert "from step 2 to 2, resumed from " in log_txt and "(finished: no step runs" in log_txt


def test_two_ranks_only_rank_0_writes_the_logs(tmp_path):
    """torchrun, 2 gloo ranks: one event file per command, each step once in TensorBoard and in
    log.txt, one preview per step; the second command resumes."""
    import subprocess
    import sys

    run = tmp_path / "ddp"
    sets = sum((["--set", s] for s in TINY + [f"train.run_dir={run}", "train.image_every=1"]),
               [])
    for steps, extra in ((3, []), (4, ["--resume"])):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", "-m", "pyface", "train", "example", *sets,
             "--set", f"train.steps={steps}", *extra],
            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
            timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(os.listdir(run / "tb")) == 2
    acc = _events(str(run))
    assert [e.step for e in acc.Scalars("loss/main/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Images("preview")] == [1, 2, 3, 4]
    assert re.findall(r" INFO step (\d+)/", (run / "log.txt").read_text()) == ["1", "2", "3",
                                                                               "4"]
    assert sorted(os.listdir(run / "previews")) == [f"step-{s:06d}.png" for s in (1, 2, 3, 4)]


def test_tensorboard_is_flushed_at_each_checkpoint(tmp_path, monkeypatch):
    """A killed process loses the events its writer still buffers (TensorBoard's writer flushes
    every 2 minutes): those up to the last checkpoint, which a resume does not log again, are
    flushed with it."""
    from pyface.train import monitor

    run = str(tmp_path / "run")
    tr = _trainer(run, "train.steps=5", "train.ckpt_every=2", "train.image_every=0")
    at = []
    real = monitor.Board.flush
    monkeypatch.setattr(monitor.Board, "flush", lambda self: (at.append(tr.step), real(self)))
    tr.fit()
    tr.close()
    assert at[:2] == [2, 4]


def test_console_log_lines_do_not_break_the_progress_bar(tmp_path, capsys):
    """train.progress=true: a log line on the console (a checkpoint saved) is written above the
    bar, not appended to the bar's line."""
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        tr = _trainer(str(tmp_path / "run"), "train.steps=4", "train.ckpt_every=2",
                      "train.image_every=0", "train.progress=true", "train.tensorboard=false")
        tr.fit()
        tr.close()
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "4/4" in err                                                  # the bar was drawn
    saved = [s for s in re.split(r"[\r\n]", err) if "saved checkpoint" in s]
    assert len(saved) == 2 and all(s.startswith("INFO pyface.train: saved") for s in saved), \
        saved
