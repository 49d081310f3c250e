# Provenance: reproduces the generator EMA half-life rule of EG3D (NVlabs/eg3d, commit 7cf1fd1,
# NVIDIA Source Code License, non-commercial). Our own implementation, written from the papers and
# the upstream's documented behaviour; no upstream code is copied. pyface's code is licensed under
# Apache-2.0 (LICENSE).
"""Exponential moving averages of modules (EG3D-style half-life in kimg, or a plain decay)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from pyface.train.config import EMAConfig


def ema_beta(cfg: EMAConfig, batch_size: int, images_seen: int) -> float:
    """Decay for this step: ``0.5 ** (batch / half_life_images)`` (with ramp-up) or ``decay``."""
    if cfg.half_life_kimg is not None:
        nimg = cfg.half_life_kimg * 1000.0
        if cfg.rampup is not None:
            nimg = min(nimg, images_seen * cfg.rampup)
        return 0.5 ** (batch_size / max(nimg, 1e-8))
    return float(cfg.decay)


class EMA:
    """Shadow copies of named sub-modules. Floating parameters and buffers are averaged;
    other buffers (counters) are copied."""

    def __init__(self, model: nn.Module, cfg: EMAConfig):
        self.cfg = cfg
        self.modules: dict[str, nn.Module] = {}
        for name in cfg.modules:
            try:
                src = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"train.ema.modules: {name!r} is not a sub-module of "
                                 f"{type(model).__name__}") from None
            shadow = copy.deepcopy(src).eval().requires_grad_(False)
            self.modules[name] = shadow
        self._model = model

    def __bool__(self) -> bool:
        return bool(self.modules)

    @torch.no_grad()
    def update(self, step: int, batch_size: int, images_seen: int) -> None:
        if not self.modules:
            return
        beta = 0.0 if step < self.cfg.start_step else ema_beta(self.cfg, batch_size, images_seen)
        for name, shadow in self.modules.items():
            src = self._model.get_submodule(name)
            p_src = [p for p in src.parameters()]
            p_dst = [p for p in shadow.parameters()]
            torch._foreach_lerp_(p_dst, p_src, 1.0 - beta) if p_dst else None
            for b_dst, b_src in zip(shadow.buffers(), src.buffers()):
                if b_dst.is_floating_point():
                    b_dst.lerp_(b_src, 1.0 - beta)
                else:
                    b_dst.copy_(b_src)
