"""Learning-rate schedules as pure functions of the step (nothing to save: exact on resume)."""
from __future__ import annotations

import math

from pyface.train.config import ScheduleConfig

KINDS = ("constant", "cosine", "linear", "step")


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Factor applied to every parameter group's base learning rate at ``step`` (0-based)."""
    if cfg.kind not in KINDS:
        raise ValueError(f"train.lr_schedule.kind: expected one of {KINDS}, got {cfg.kind!r}")
    warm = 1.0
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        warm = (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return warm
    if cfg.kind == "step":
        return warm * cfg.gamma ** (step // max(1, cfg.step_size))
    span = max(1, total_steps - cfg.warmup_steps)
    t = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    if cfg.kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        shape = 1.0 - t
    return warm * (cfg.min_factor + (1.0 - cfg.min_factor) * shape)


def lazy_regularization(lr: float, betas: tuple[float, float],
                        interval: int) -> tuple[float, tuple[float, float]]:
    """EG3D/StyleGAN2 lazy-regularisation compensation: with a regulariser applied every
    ``interval`` steps in a separate phase of the same optimizer, scale lr and betas by
    ``interval / (interval + 1)``."""
    if interval <= 1:
        return lr, betas
    r = interval / (interval + 1)
    return lr * r, (betas[0] ** r, betas[1] ** r)
