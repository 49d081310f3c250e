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
