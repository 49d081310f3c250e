# Provenance: a Gaussian variational auto-encoder (Kingma & Welling 2014) with MLP encoder and
# decoder, as MMFA (Li et al. 2026, no code released) uses on its expression features; the KL
# warm-up follows Bowman et al. 2016 and the active-unit count Burda et al. 2016. Our own
# implementation; no upstream code is copied. pyface's code is licensed under Apache-2.0 (LICENSE).
"""Gaussian MLP VAE for feature vectors (MMFA's expression VAE), its KL warm-up schedule and a
posterior-collapse check."""
from __future__ import annotations

import dataclasses
import numbers

import torch
from torch import nn

from pyface.nn.compiling import generator_kwargs
from pyface.nn.losses import kl_divergence

__all__ = ["GaussianMLPVAE", "VAEConfig", "FeatureDiscriminator", "kl_warmup", "active_dims"]


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """:class:`GaussianMLPVAE`.

    Attributes:
        in_dim: feature size (MMFA's expression feature: 128, our reading).
        hidden: widths of the encoder's hidden layers; the decoder mirrors them.
        latent: z size (32).
        negative_slope: of the LeakyReLU activations.
        logvar_min, logvar_max: the encoder's log-variance is clamped to this range (keeps exp
            finite early in training).
    """

    in_dim: int = 128
    hidden: tuple[int, ...] = (256, 256)
    latent: int = 32
    negative_slope: float = 0.2
    logvar_min: float = -30.0
    logvar_max: float = 20.0


def _mlp(sizes, slope):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(slope))
    return nn.Sequential(*layers)


class GaussianMLPVAE(nn.Module):
    """x -> q(z | x) = N(mu, diag(exp(logvar))) -> z -> reconstruction.

    * ``encode(x)``: x (B, in_dim) -> (mu, logvar), each (B, latent).
    * ``reparameterize(mu, logvar, generator=None)``: z = mu + exp(logvar / 2) * eps, (B, latent).
    * ``decode(z)``: z (B, latent) -> (B, in_dim).
    * ``forward(x, sample=None)`` -> dict ``recon`` (B, in_dim), ``mu``, ``logvar``, ``z``
      (B, latent); z is sampled when ``sample`` (default: in training mode), else z = mu.
    * ``kl(mu, logvar)``: KL(q || N(0, I)) summed over latent dims, mean over the batch.
    * ``sample_prior(n, generator=None)``: decoded z ~ N(0, I), (n, in_dim).
    * ``interpolate(x_a, x_b, alphas)``: x_a, x_b (B, in_dim), alphas (S,) ->
      (S, B, in_dim) = decode((1 - alpha) mu_a + alpha mu_b).
    """

    def __init__(self, cfg: VAEConfig | None = None, **overrides):
        super().__init__()
        if cfg is None:
            cfg = VAEConfig(**overrides)
        elif overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        self.cfg = c = cfg
        if c.latent < 1 or c.in_dim < 1:
            raise ValueError(f"latent, in_dim: expected >= 1, got {c.latent}, {c.in_dim}")
        self.encoder = _mlp((c.in_dim, *c.hidden, 2 * c.latent), c.negative_slope)
        self.decoder = _mlp((c.latent, *reversed(c.hidden), c.in_dim), c.negative_slope)

    def _check(self, name, t, dim):
        if t.dim() != 2 or t.shape[1] != dim:
            raise ValueError(f"{name}: expected shape (B, {dim}), got {tuple(t.shape)}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check("x", x, self.cfg.in_dim)
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar.clamp(self.cfg.logvar_min, self.cfg.logvar_max)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        if logvar.shape != mu.shape:
            raise ValueError(f"logvar: expected the shape of mu {tuple(mu.shape)}, got "
                             f"{tuple(logvar.shape)}")
        eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, **generator_kwargs(generator))
        return mu + (0.5 * logvar).exp() * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check("z", z, self.cfg.latent)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        mu, logvar = self.encode(x)
        if sample is None:
            sample = self.training
        z = self.reparameterize(mu, logvar, generator) if sample else mu
        return {"recon": self.decode(z), "mu": mu, "logvar": logvar, "z": z}

    @staticmethod
    def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return kl_divergence(mu, logvar)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` (>= 0) decoded samples of the prior N(0, I): (n, in_dim)."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"n: expected an integer >= 0, got {n!r}")
        p = next(self.parameters())
        z = torch.randn(n, self.cfg.latent, device=p.device, dtype=p.dtype, **generator_kwargs(generator))
        return self.decode(z)

    def interpolate(self, x_a: torch.Tensor, x_b: torch.Tensor,
                    alphas: torch.Tensor) -> torch.Tensor:
        if x_b.shape != x_a.shape:
            raise ValueError(f"x_b: expected the shape of x_a {tuple(x_a.shape)}, got "
                             f"{tuple(x_b.shape)}")
        if alphas.dim() != 1:
            raise ValueError(f"alphas: expected shape (S,), got {tuple(alphas.shape)}")
        mu_a, _ = self.encode(x_a)
        mu_b, _ = self.encode(x_b)
        a = alphas.to(mu_a).view(-1, 1, 1)
        z = (1 - a) * mu_a + a * mu_b                                   # (S, B, latent)
        S, B = z.shape[:2]
        return self.decode(z.reshape(S * B, -1)).view(S, B, -1)


class FeatureDiscriminator(nn.Module):
    """MLP critic on feature vectors (the VAE's adversarial term: real features against
    reconstructions or prior samples). x (B, in_dim) -> logits (B, 1); LeakyReLU between the
    ``hidden`` layers."""

    def __init__(self, in_dim: int = 128, hidden: tuple[int, ...] = (256, 256),
                 negative_slope: float = 0.2):
        super().__init__()
        self.in_dim = in_dim
        self.net = _mlp((in_dim, *hidden, 1), negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x: expected shape (B, {self.in_dim}), got {tuple(x.shape)}")
        return self.net(x)


def kl_warmup(step: int, warmup: int, *, delay: int = 0, max_weight: float = 1.0) -> float:
    """KL weight schedule: 0 for ``step < delay``, then rising linearly to ``max_weight`` over
    ``warmup`` steps, constant after (``warmup = 0``: a step at ``delay``)."""
    if warmup < 0 or delay < 0:
        raise ValueError(f"warmup, delay: expected >= 0, got {warmup}, {delay}")
    if step < delay:
        return 0.0
    if warmup == 0:
        return float(max_weight)
    return float(max_weight) * min(1.0, (step - delay) / warmup)


def active_dims(mu: torch.Tensor, threshold: float = 1e-2) -> int:
    """Active latent units: dimensions whose posterior mean varies over the data,
    ``Var_x(mu_j(x)) > threshold``. mu: (N, latent), N >= 2 encoded samples."""
    if mu.dim() != 2 or mu.shape[0] < 2:
        raise ValueError(f"mu: expected shape (N, latent) with N >= 2, got {tuple(mu.shape)}")
    return int((mu.detach().var(dim=0) > threshold).sum())
