"""What a model supplies to the training engine.

A trainable model is an ``nn.Module`` subclass of :class:`TrainableModel` that provides

* ``Config``: its typed config dataclass (``model.*`` keys in YAML / ``--set``);
* ``build_optimizers()``: named optimizers over its parameters;
* ``phases()``: the optimisation phases of one step (default: one phase ``"main"``), each with its
  optimizer and an interval for lazy regularisation (EG3D: ``Phase("Dreg", "D", interval=16)``);
* ``step(phase, batch, ctx)``: the losses of one phase, a dict with the total under ``"loss"``
  (other entries are logged);
* optionally ``preview(batch)`` (image grids) and ``preview_video(batch)`` (a short clip).

The engine does everything else: devices, distribution, precision, clipping, NaN guard, EMA,
schedules, checkpoints, logging and previews.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Phase:
    """One optimisation phase: ``step(name, ...)`` is back-propagated and ``optimizer`` stepped
    every ``interval`` steps. A lazy regulariser should scale its loss by ``interval`` itself."""
    name: str
    optimizer: str
    interval: int = 1


@dataclass
class StepContext:
    """What ``step`` may need besides the batch."""
    step: int
    images_seen: int          # global images before this step (EG3D's cur_nimg)
    batch_size: int           # global batch size
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def kimg(self) -> float:
        return self.images_seen / 1000.0


class TrainableModel(nn.Module):
    """Base class of models trained by :class:`pyface.train.Trainer`."""

    Config: type = None  # the config dataclass
    #: experiment defaults of this model's recipe (``{"data": {...}, "train": {...}}``), applied
    #: below the YAML file and ``--set`` overrides.
    recipe: dict = {}

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        return [Phase("main", "main")]

    def step(self, phase: str, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        """Named image batches (N, 3, H, W) in [-1, 1] shown side by side as one grid per row."""
        return {}

    @torch.no_grad()
    def preview_video(self, batch: dict, frames: int) -> torch.Tensor | None:
        """(T, 3, H, W) in [-1, 1], or None."""
        return None
