"""Toy trainable models for the engine tests (imported by tests and by their torchrun workers).

``Inverter`` mimics OTAvatar's step: per batch, a latent per sample (a rank-local parameter) is
inverted for a few iterations through the EMA generator with ``ctx.update``, then the generator is
updated (once mid-step together with the encoder, from one backward, and once by the phase's
loss), then the encoder is trained through the frozen generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyface.train import Phase, TrainableModel, build_experiment


@dataclass
class InverterConfig:
    local_batch: int = 4      # samples per rank (the latent is one row per sample)
    iters: int = 4            # inversion iterations per batch
    dim: int = 16


class Inverter(TrainableModel):
    Config = InverterConfig

    def __init__(self, cfg: InverterConfig):
        super().__init__()
        self.cfg = cfg
        self.G = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, cfg.dim))
        self.E = nn.Linear(cfg.dim, 8)
        self.latent = nn.Parameter(torch.zeros(cfg.local_batch, 8))
        self.seen: list[tuple[str, bool]] = []        # (phase, G requires grad) per call

    def build_optimizers(self):
        return {"latent": torch.optim.Adam([{"params": [self.latent], "local": True,
                                             "max_norm": 0.05}], lr=0.05),
                "G": torch.optim.Adam(self.G.parameters(), lr=1e-2),
                "E": torch.optim.SGD(self.E.parameters(), lr=0.1)}

    def phases(self):
        return [Phase("invert", "G"), Phase("enc", "E", frozen=("G",))]

    def step(self, phase, batch, ctx):
        x = batch["x"]
        self.seen.append((phase, self.G[0].weight.requires_grad))
        if phase == "enc":
            return {"loss": (self.G(self.E(x)) - x).square().mean()}
        with torch.no_grad():
            self.latent.copy_(self.E(x))
        ctx.reset_optimizer("latent")
        g_ema = ctx.ema("G")
        first = last = None
        for _ in range(self.cfg.iters):
            inv = (g_ema(self.latent) - x).square().mean()
            ctx.update("latent", inv)
            first = inv.detach() if first is None else first
            last = inv.detach()
        # generator and encoder (regressing the inverted latent) from one backward
        w = self.latent.detach()
        gn = ctx.update(("G", "E"), (self.G(w) - x).square().mean()
                        + (self.E(x) - w).square().mean())
        loss = (self.G(self.latent.detach()) - x).square().mean()
        return {"loss": loss, "inv_first": first, "inv_last": last, "mid_grad_norm": gn}


class VectorData(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, dim: int = 16):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, dim, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i]}


def inverter_trainer(overrides: list[str], local_batch: int):
    exp = build_experiment("inverter", InverterConfig, overrides=[
        "train.batch_size=4", "train.progress=false", "train.tensorboard=false",
        "train.image_every=0", "train.ckpt_every=0", "train.log_every=1",
        "train.device=cpu", "train.ema.modules=G", "train.ema.decay=0.5",
        f"model.local_batch={local_batch}", *overrides])
    from pyface.train import Trainer

    torch.manual_seed(0)
    return Trainer(exp, model=Inverter(exp.model_config), dataset=VectorData())


@dataclass
class TinyGANConfig:
    r1_gamma: float = 1.0
    r1_interval: int = 2


class TinyGAN(TrainableModel):
    """G / D / lazy R1 (a double backward through D) from pyface.nn, 8x8 images."""

    Config = TinyGANConfig

    def __init__(self, cfg: TinyGANConfig):
        super().__init__()
        import pyface.nn as N

        self.cfg = cfg
        self.G = N.SynthesisNetwork(w_dim=8, img_resolution=8, img_channels=3, channel_base=32,
                                    channel_max=8)
        self.D = N.StyleGAN2Discriminator(c_dim=0, img_resolution=8, channel_base=32,
                                          channel_max=8, mbstd_group_size=2)

    def build_optimizers(self):
        return {"G": torch.optim.Adam(self.G.parameters(), 2e-3, betas=(0.0, 0.99)),
                "D": torch.optim.Adam(self.D.parameters(), 2e-3, betas=(0.0, 0.99))}

    def phases(self):
        # R1 on the flat all-reduce (Phase.overlap=False), the others overlapped
        return [Phase("G", "G", frozen=("D",)), Phase("D", "D"),
                Phase("Dreg", "D", self.cfg.r1_interval, overlap=False)]

    def step(self, phase, batch, ctx):
        import pyface.nn as N

        real = batch["image"]
        ws = torch.randn(real.shape[0], self.G.num_ws, 8, device=real.device)
        if phase == "G":
            return {"loss": N.gan_g_loss(self.D(self.G(ws)))}
        if phase == "D":
            with torch.no_grad():
                fake = self.G(ws)
            return {"loss": N.gan_d_loss(self.D(real), self.D(fake))}
        real = real.detach().requires_grad_(True)
        r1 = N.r1_penalty(self.D(real), [real]).mean()
        return {"loss": r1 * (self.cfg.r1_gamma / 2) * self.cfg.r1_interval, "r1": r1}


def gan_trainer(overrides: list[str]):
    from pyface.train import Trainer
    from pyface.train.data import ProceduralFaces

    exp = build_experiment("gan", TinyGANConfig, overrides=[
        "train.batch_size=4", "train.progress=false", "train.tensorboard=false",
        "train.image_every=0", "train.ckpt_every=0", "train.log_every=1", "train.device=cpu",
        *overrides])
    torch.manual_seed(0)
    return Trainer(exp, model=TinyGAN(exp.model_config),
                   dataset=ProceduralFaces(size=16, resolution=8))
