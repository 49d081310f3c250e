"""What a model supplies to the training engine.

A trainable model is an ``nn.Module`` subclass of :class:`TrainableModel` that provides

* ``Config``: its typed config dataclass (``model.*`` keys in YAML / ``--set``);
* ``build_optimizers()``: named optimizers over its parameters;
* ``phases()``: the optimisation phases of one step (default: one phase ``"main"``), each with its
  optimizer, an interval for lazy regularisation (EG3D: ``Phase("Dreg", "D", interval=16)``) and
  the sub-modules it freezes;
* ``step(phase, batch, ctx)``: the losses of one phase, a dict with the total under ``"loss"``
  (other entries are logged); inner loops apply updates with ``ctx.update(optimizer, loss)`` and
  read EMA copies with ``ctx.ema(name)``;
* optionally ``preview(batch)`` (image grids) and ``preview_video(batch)`` (a short clip).

The engine does everything else: devices, distribution, precision, clipping, NaN guard, EMA,
schedules, checkpoints, logging and previews.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Phase:
    """One optimisation phase: ``step(name, ...)`` runs every ``interval`` steps and the
    ``"loss"`` it returns updates ``optimizer``. A lazy regulariser should scale its loss by
    ``interval`` itself.

    Attributes:
        name: passed to ``step``; prefixes the logged values.
        optimizer: the optimizer the returned ``"loss"`` updates (a tuple of names: several,
            from one backward), or None when ``step`` applies all its updates itself through
            ``ctx.update`` (``"loss"`` is then only logged).
        interval: run every ``interval`` steps.
        frozen: names of sub-modules (``model.get_submodule``) whose parameters do not require
            grad during this phase (restored after it): they get no gradients and are neither
            all-reduced nor updated.
        overlap: on several ranks, let the gradient all-reduce overlap the backward (bucketed
            hooks, ``train.overlap_grad_reduce``); False forces one flat all-reduce after it.
            Results are identical either way.
    """
    name: str
    optimizer: str | tuple[str, ...] | None
    interval: int = 1
    frozen: tuple[str, ...] = ()
    overlap: bool = True


@dataclass
class StepContext:
    """What ``step`` may need besides the batch.

    Inside the engine it also applies in-step updates (``update``) and hands out EMA copies
    (``ema``); a context built by hand (``engine=None``) has neither.
    """
    step: int
    images_seen: int          # global images before this step (EG3D's cur_nimg)
    batch_size: int           # global batch size
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    phase: str = ""           # the phase being run
    engine: Any = field(default=None, repr=False, compare=False)

    @property
    def kimg(self) -> float:
        return self.images_seen / 1000.0

    def update(self, optimizer: str | tuple[str, ...], loss: torch.Tensor, *,
               retain_graph: bool = False) -> torch.Tensor:
        """Apply one update of optimizer ``optimizer`` now, inside ``step``.

        ``optimizer``: a name, or a tuple of names to step several optimizers from one backward
        (e.g. OTAvatar's latent and intrinsics, or its controller and generator: stepping one
        and then back-propagating the same graph into the other would find the first one's
        parameters modified in place).
        ``loss``: a scalar tensor (this rank's share of the batch). The engine back-propagates it
        into that optimizer's parameters only (other parameters' ``.grad`` stay untouched),
        averages the gradients over ranks, applies the NaN / grad-norm guard, the group and
        optimizer clipping, steps the optimizer and sets its gradients to None, exactly as for a
        phase's final loss. ``retain_graph=True`` keeps the graph for another backward through it.

        Parameters of a param group with ``"local": True`` are rank-local (e.g. one latent per
        sample of this rank's share of the batch): they are not averaged over ranks; their
        gradient is divided by the number of ranks (the gradient of the global loss, the mean of
        the ranks' losses) and their norm, for the guard and for clipping, is taken over all
        ranks, so N ranks compute what one process does with the whole batch.

        Returns the gradient norm before clipping (a 0-dim tensor; over all the named
        optimizers' parameters, after averaging over ranks).
        """
        if self.engine is None:
            raise RuntimeError("ctx.update: this StepContext is not attached to a Trainer; "
                               "in-step updates run inside Trainer.train_step only")
        return self.engine._apply_update(optimizer, loss, phase=self.phase, inner=True,
                                         retain_graph=retain_graph)

    def reset_optimizer(self, optimizer: str) -> None:
        """Clear optimizer ``optimizer``'s state (moments, step counts), e.g. before an inner
        loop that starts afresh on every batch."""
        if self.engine is None:
            raise RuntimeError("ctx.reset_optimizer: this StepContext is not attached to a "
                               "Trainer")
        self.engine.reset_optimizer(optimizer)

    def ema(self, name: str) -> nn.Module:
        """The EMA copy of sub-module ``name`` (``train.ema.modules``), or the live sub-module
        when it has no EMA. The copy is in eval mode and does not require grad; gradients
        still flow through it to its inputs (e.g. a latent inverted with the EMA generator)."""
        if self.engine is None:
            raise RuntimeError("ctx.ema: this StepContext is not attached to a Trainer")
        return self.engine.ema_module(name)


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
