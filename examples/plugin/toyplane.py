"""A model outside pyface, trained by pyface's engine: the plugin of docs/train.md, runnable.

``toyplane`` encodes an image into a tri-plane and renders it back through the fused
:func:`pyface.ops.triplane_sample`, with an EMA encoder and its update applied inside ``step``
(``ctx.update``); ``toyplane_refine`` is a second model built on a trained ``toyplane`` run (a
stage, trained first when its checkpoint is not given). From this folder::

    pyface train toyplane --import toyplane --preset tiny --set train.run_dir=runs/toy
    pyface train toyplane --import toyplane --preset tiny --set train.run_dir=runs/toy \\
        --set train.steps=8 --resume
    pyface train toyplane_refine --import toyplane --preset tiny --set train.run_dir=runs/refine
    pyface animate toyplane --import toyplane --checkpoint runs/toy --source FACE.png \\
        --driving FRAMES_FOLDER
    pyface eval toyplane --import toyplane --checkpoint runs/toy --data HELD_OUT_SET
    python -m pyface.bench.train toyplane --import toyplane --preset tiny --steps 4

(``tests/test_plugins.py`` runs these.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyface.ops import triplane_sample
from pyface.train import Phase, TrainableModel, register_model
from pyface.train.model import Pipeline, Stage, config_from_dict, load_pretrained


@dataclass
class ToyPlaneConfig:
    resolution: int = 16          # image size; data.resolution must match
    channels: int = 8             # tri-plane feature channels
    lr: float = 2e-3


class ToyPlanePipeline(Pipeline):
    """``encode_source`` -> the source's planes; ``encode_driving`` -> the number of frames;
    ``generate`` renders the planes once per frame (the toy has no motion)."""

    def encode_source(self, source: dict) -> torch.Tensor:
        src = self.prepare(source, batched=False)
        return self.model.encode(src["image"][None])

    def encode_driving(self, driving: dict) -> int:
        return self.prepare(driving, batched=True, name="driving")["image"].shape[0]

    def generate(self, state: torch.Tensor, motion: int, **controls) -> torch.Tensor:
        return self.model.render(state).expand(motion, -1, -1, -1)


class ToyPlane(TrainableModel):
    Config = ToyPlaneConfig
    Pipeline = ToyPlanePipeline
    recipe = {"data": {"resolution": 16},
              "train": {"steps": 1000, "batch_size": 4, "ema": {"modules": ["encoder"]}}}
    presets = {"tiny": {"model": {"channels": 4},
                        "train": {"steps": 4, "ckpt_every": 2, "image_every": 4}},
               "small": {"model": {"channels": 8}, "train": {"steps": 200}}}

    def __init__(self, cfg: ToyPlaneConfig):
        super().__init__()                        # before any attribute
        self.cfg = cfg                            # Pipeline reads cfg.resolution
        self.encoder = nn.Conv2d(3, 3 * cfg.channels, 4, stride=4)
        self.decoder = nn.Linear(cfg.channels, 3)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) -> planes (B, 3, C, R/4, R/4)."""
        P = self.cfg.resolution // 4
        return self.encoder(image).view(image.shape[0], 3, self.cfg.channels, P, P)

    def render(self, planes: torch.Tensor) -> torch.Tensor:
        """planes -> (B, 3, R, R) in [-1, 1]: the features at z = 0 of every pixel."""
        B, R = planes.shape[0], self.cfg.resolution
        lin = (torch.arange(R, device=planes.device, dtype=planes.dtype) + 0.5) / R - 0.5
        yy, xx = torch.meshgrid(-lin, lin, indexing="ij")
        pts = torch.stack([xx, yy, torch.zeros_like(xx)], -1).reshape(1, -1, 3).expand(B, -1, -1)
        feats = triplane_sample(planes, pts.contiguous(), plane_axes="xy_xz_zy")
        return torch.tanh(self.decoder(feats)).view(B, R, R, 3).permute(0, 3, 1, 2)

    def build_optimizers(self):
        return {"main": torch.optim.Adam(self.parameters(), self.cfg.lr)}

    def phases(self):
        return [Phase("main", None)]              # step applies its update itself

    def step(self, phase, batch, ctx):
        image = batch["image"]
        loss = (self.render(self.encode(image)) - image).abs().mean()
        ctx.update("main", loss)                  # backward, all-reduce, guard, clip, step
        with torch.no_grad():                     # the EMA encoder after the update
            planes = ctx.ema("encoder")(image).view_as(self.encode(image))
            ema_l1 = (self.render(planes) - image).abs().mean()
        return {"loss": loss.detach(), "ema_l1": ema_l1}

    @torch.no_grad()
    def preview(self, batch):
        return {"input": batch["image"], "reconstruction": self.render(self.encode(batch["image"]))}


@dataclass
class ToyRefineConfig:
    resolution: int = 16
    base_checkpoint: str | None = None            # a toyplane run; trained first when empty
    lr: float = 1e-2


class ToyRefine(TrainableModel):
    """A per-channel gain on the output of a frozen, trained ``toyplane``."""

    Config = ToyRefineConfig
    stages = (Stage(name="base", model="toyplane", checkpoint_key="base_checkpoint"),)
    recipe = {"data": {"resolution": 16}, "train": {"steps": 100, "batch_size": 4}}
    presets = {"tiny": {"train": {"steps": 2}}}

    def __init__(self, cfg: ToyRefineConfig):
        super().__init__()
        self.cfg = cfg
        config, state = load_pretrained(cfg.base_checkpoint)     # EMA weights
        self.base = ToyPlane(config_from_dict(ToyPlane.Config, config))
        self.base.load_state_dict(state)
        self.base.requires_grad_(False)
        self.gain = nn.Parameter(torch.ones(3, 1, 1))

    def build_optimizers(self):
        return {"main": torch.optim.Adam([self.gain], self.cfg.lr)}

    def step(self, phase, batch, ctx):
        image = batch["image"]
        out = self.base.render(self.base.encode(image)) * self.gain
        return {"loss": (out - image).abs().mean()}


register_model("toyplane", "toyplane:ToyPlane")
register_model("toyplane_refine", "toyplane:ToyRefine")
