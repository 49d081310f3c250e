"""MMFA's expression VAE (registered as ``mmfa_vae``): a Gaussian VAE on the expression features
f_exp of a trained, frozen MMFA, so that expressions can be interpolated and sampled.

MMFA (Li et al. 2026; no code released); built from the paper's description, our own code.

* Stage: ``mmfa`` (``model.mmfa_checkpoint``): ``pyface train mmfa_vae --preset tiny`` first
  trains ``mmfa`` with the same preset (or takes ``--set model.mmfa_checkpoint=RUN``), then the
  VAE on the expression features of the source and driving frames of each pair.
* Standardised features (``standardize``, on in every preset; :class:`StandardizedVAE`): the VAE
  encodes ``(f - mean) / std`` and decodes back to f, with the per-dimension mean and standard
  deviation of every feature seen in training (running totals, saved with the checkpoint). The
  reconstruction MSE and the feature discriminator work in these units, so the balance against
  the KL does not depend on how large f_exp's spread is (at ``tiny`` its within-video spread is
  about 0.16, and raw MSE against the KL let the posterior fall back to the prior).
* Losses: reconstruction MSE (``w_rec`` 1) + KL (``w_kl`` 1e-3, linear warm-up over
  ``kl_warmup`` steps) + LSGAN against a feature discriminator (``w_adv`` 0.1); phases
  ``VAE`` then ``Dfeat``.
* ``MMFAVAEPipeline``: :class:`~pyface.models.mmfa.pipeline.MMFAPipeline` plus
  ``interpolate_expression(f_a, f_b, alphas)`` and ``sample_expression(n)``, whose f_exp go to
  ``generate(..., expression=f)``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pyface.nn.losses import gan_d_loss, gan_g_loss
from pyface.nn.vae import FeatureDiscriminator, GaussianMLPVAE, kl_warmup
from pyface.train.model import (Phase, Stage, StepContext, TrainableModel, config_from_dict,
                                load_pretrained)

from .model import MMFA, MMFAConfig, images_of
from .pipeline import MMFAPipeline


class StandardizedVAE(GaussianMLPVAE):
    """:class:`~pyface.nn.vae.GaussianMLPVAE` on standardised inputs: ``encode(x)`` encodes
    ``standardize(x) = (x - mean) / std``, ``decode(z)`` returns ``x`` units (``unstandardize``),
    so ``forward``, ``interpolate`` and ``sample_prior`` take and give x (B, in_dim) as before.
    ``observe(x)`` (x (B, in_dim)) adds a batch to the running per-dimension count, mean and sum
    of squared deviations (buffers, saved with the state); before any, mean 0 and std 1. Under
    torchrun ``observe`` is a collective: every rank passes its share of the global batch."""

    def __init__(self, cfg=None, **overrides):
        super().__init__(cfg, **overrides)
        d = self.cfg.in_dim
        self.register_buffer("stat_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("stat_mean", torch.zeros(d, dtype=torch.float64))
        self.register_buffer("stat_m2", torch.zeros(d, dtype=torch.float64))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        self._check("x", x, self.cfg.in_dim)
        x = x.detach().to(torch.float64)
        n, mean = float(x.shape[0]), x.mean(0)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # under torchrun (every rank calls this with its share of the global batch): the
            # whole batch's moments, so every rank keeps the same statistics as one process
            s = torch.cat([x.sum(0), x.new_tensor([n])])
            dist.all_reduce(s)
            n, mean = float(s[-1]), s[:-1] / s[-1]
            m2 = (x - mean).square().sum(0)
            dist.all_reduce(m2)
        else:
            m2 = (x - mean).square().sum(0)
        total = float(self.stat_count) + n
        delta = mean - self.stat_mean
        self.stat_m2 += m2 + delta.square() * float(self.stat_count) * n / total
        self.stat_mean += delta * n / total
        self.stat_count.fill_(total)

    def _moments(self, like: torch.Tensor):
        if float(self.stat_count) < 2:
            return torch.zeros_like(like[0]), torch.ones_like(like[0])
        std = (self.stat_m2 / self.stat_count).sqrt().clamp_min(1e-6)
        return self.stat_mean.to(like), std.to(like)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._moments(x)
        return (x - mean) / std

    def unstandardize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._moments(x)
        return x * std + mean

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check("x", x, self.cfg.in_dim)
        return super().encode(self.standardize(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.unstandardize(super().decode(z))


@dataclass
class MMFAVAEConfig:
    """``mmfa_checkpoint``: the trained MMFA (run folder or checkpoint; the ``mmfa`` stage fills
    it). ``latent`` / ``hidden``: the VAE; ``d_hidden``: the feature discriminator;
    ``standardize``: the VAE and the discriminator work on standardised features
    (:class:`StandardizedVAE`; on in every preset, off by default so that runs from before it
    load as they were)."""

    mmfa_checkpoint: str | None = None
    standardize: bool = False
    latent: int = 32
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    d_hidden: list[int] = field(default_factory=lambda: [256, 256])
    w_rec: float = 1.0
    w_kl: float = 1e-3
    kl_warmup: int = 2000
    w_adv: float = 0.1
    lr: float = 1e-4
    lr_d: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])


class MMFAVAEPipeline(MMFAPipeline):
    """MMFA's pipeline (the frozen stage-1 model) plus the VAE's expression controls."""

    #: MMFA's modules, inside the VAE model's frozen ``mmfa``
    compile_modules = tuple(f"mmfa.{n}" for n in MMFAPipeline.compile_modules)

    def __init__(self, model, *, device=None):
        self.resolution = int(model.mmfa.cfg.resolution)
        super().__init__(model, device=device)

    @property
    def net(self) -> MMFA:
        return self.model.mmfa

    @torch.no_grad()
    def interpolate_expression(self, f_a: torch.Tensor, f_b: torch.Tensor,
                               alphas) -> torch.Tensor:
        """f_a, f_b: (exp_dim,) expression features (e.g. ``encode_driving(...)["f_exp"][i]``);
        alphas: (S,) -> (S, exp_dim) = Dec((1 - alpha) mu_a + alpha mu_b). The features are
        taken to the VAE's device; the alphas on that device in the features' dtype."""
        d = self.net.cfg.exp_dim
        for name, f in (("f_a", f_a), ("f_b", f_b)):
            if f.shape != (d,):
                raise ValueError(f"{name}: expected shape ({d},), got {tuple(f.shape)}")
        dev = next(self.model.vae.parameters()).device
        f_a, f_b = f_a.to(dev), f_b.to(dev)
        a = torch.as_tensor(alphas, dtype=f_a.dtype if f_a.is_floating_point() else None,
                            device=dev).reshape(-1)
        return self.model.vae.interpolate(f_a[None], f_b[None], a)[:, 0]

    @torch.no_grad()
    def sample_expression(self, n: int, generator: torch.Generator | None = None):
        """(n, exp_dim) expression features decoded from z ~ N(0, I)."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n: expected an int >= 1, got {n!r}")
        return self.model.vae.sample_prior(int(n), generator=generator)


class MMFAVAE(TrainableModel):
    """The expression VAE on a frozen MMFA (see the module docstring)."""

    Config = MMFAVAEConfig
    #: train.compile: the frozen MMFA's expression encoder (the features) and the VAE
    compile_modules = ("mmfa.exp_encoder", "vae")
    Pipeline = MMFAVAEPipeline
    stages = (Stage(name="mmfa", model="mmfa", checkpoint_key="mmfa_checkpoint"),)
    recipe = {"data": {"name": "pairs", "resolution": 256,
                       "options": {"mode": "same_video", "synth": {"zoom": 0.2}}},
              "train": {"steps": 20000, "batch_size": 32, "ckpt_every": 5000,
                        "image_every": 0, "video_every": 0}}
    presets = {"tiny": {"model": {"latent": 8, "hidden": [64, 64], "d_hidden": [64],
                                  "kl_warmup": 300, "lr": 1e-3, "lr_d": 1e-3,
                                  "standardize": True},
                        "data": {"resolution": 64},
                        "train": {"steps": 1000, "batch_size": 16, "ckpt_every": 500}},
               "gpu-short": {"model": {"kl_warmup": 500, "lr": 5e-4, "lr_d": 5e-4,
                                       "standardize": True},
                             "data": {"resolution": 256},
                             "train": {"steps": 2000, "batch_size": 64}},
               "full": {"model": {"standardize": True}, "data": {"resolution": 256},
                        "train": {"steps": 20000}}}

    def __init__(self, cfg: MMFAVAEConfig | None = None):
        super().__init__()
        cfg = cfg or MMFAVAEConfig()
        if not cfg.mmfa_checkpoint:
            raise ValueError("model.mmfa_checkpoint: expected a trained mmfa run or checkpoint "
                             "(the 'mmfa' stage sets it), got None")
        self.cfg = cfg
        c, state = load_pretrained(cfg.mmfa_checkpoint)
        self.mmfa = MMFA(config_from_dict(MMFAConfig, c))
        self.mmfa.load_state_dict(state)
        self.mmfa.requires_grad_(False)
        self.mmfa.eval()
        d = self.mmfa.cfg.exp_dim
        vae = StandardizedVAE if cfg.standardize else GaussianMLPVAE
        self.vae = vae(in_dim=d, hidden=tuple(cfg.hidden), latent=cfg.latent)
        self.feature_discriminator = FeatureDiscriminator(d, tuple(cfg.d_hidden))
        self._fake = None

    def train(self, mode: bool = True):
        super().train(mode)
        self.mmfa.eval()            # frozen: BatchNorm statistics stay those of stage 1
        return self

    @torch.no_grad()
    def features(self, batch: dict) -> torch.Tensor:
        """f_exp (2B, exp_dim) of the source and driving images of a pairs batch."""
        R = self.mmfa.cfg.resolution
        imgs = [images_of(batch.get(k), k, R) for k in ("source", "driving")]
        return self.mmfa.exp_encoder(torch.cat(imgs))

    def build_optimizers(self):
        c = self.cfg
        return {"VAE": torch.optim.Adam(self.vae.parameters(), lr=c.lr, betas=tuple(c.betas)),
                "Dfeat": torch.optim.Adam(self.feature_discriminator.parameters(), lr=c.lr_d,
                                          betas=tuple(c.betas))}

    def phases(self):
        return [Phase("VAE", "VAE", frozen=("feature_discriminator",)),
                Phase("Dfeat", "Dfeat")]

    def data_keys(self) -> dict:
        """Item keys a training step reads (checked before training by the engine)."""
        return {"source": {"image": None}, "driving": {"image": None}}

    def step(self, phase: str, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        c = self.cfg
        if phase == "Dfeat":
            if self._fake is None:
                raise RuntimeError("MMFAVAE: the Dfeat phase runs after the VAE phase")
            real, fake = self._fake
            self._fake = None
            d = gan_d_loss(self.feature_discriminator(real), self.feature_discriminator(fake),
                           "lsgan")
            return {"loss": d, "d_feat": d.detach()}
        f = self.features(batch)
        std = (lambda x: x)
        if c.standardize:
            if self.training:
                self.vae.observe(f)
            std = self.vae.standardize
        out = self.vae(f)
        rec = F.mse_loss(std(out["recon"]), std(f))
        kl = self.vae.kl(out["mu"], out["logvar"])
        w = c.w_kl * kl_warmup(ctx.step, c.kl_warmup)
        adv = gan_g_loss(self.feature_discriminator(std(out["recon"])), "lsgan")
        self._fake = (std(f).detach(), std(out["recon"]).detach())
        loss = c.w_rec * rec + w * kl + c.w_adv * adv
        with torch.no_grad():
            cos = F.cosine_similarity(out["recon"], f, dim=1).mean()
        return {"loss": loss, "rec_mse": rec.detach(), "kl": kl.detach(), "adv": adv.detach(),
                "kl_weight": torch.tensor(w), "rec_cos": cos}

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        return {}

    def preview_video(self, batch: dict, frames: int):
        return None
