"""pyface.nn.vae: the Gaussian MLP VAE (KL closed form, reparameterisation, interpolation),
the KL warm-up and the active-unit count."""
from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import pyface.nn as N

TINY = dict(in_dim=6, hidden=(16,), latent=3)


def test_shapes_and_modes():
    torch.manual_seed(0)
    vae = N.GaussianMLPVAE(**TINY)
    x = torch.randn(4, 6)
    out = vae(x)
    assert out["recon"].shape == (4, 6)
    assert out["mu"].shape == out["logvar"].shape == out["z"].shape == (4, 3)
    assert not torch.equal(out["z"], out["mu"])                       # training: sampled
    vae.eval()
    out = vae(x)
    torch.testing.assert_close(out["z"], out["mu"])                    # eval: the mean
    torch.testing.assert_close(out["recon"], vae.decode(out["mu"]))
    assert vae.sample_prior(5).shape == (5, 6)


def test_kl_matches_the_closed_form():
    torch.manual_seed(1)
    mu, logvar = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1).mean()
    torch.testing.assert_close(N.GaussianMLPVAE.kl(mu, logvar), ref)
    zero = torch.zeros(2, 3)
    torch.testing.assert_close(N.GaussianMLPVAE.kl(zero, zero), torch.tensor(0.0))


def test_reparameterisation_statistics_and_gradients():
    g = torch.Generator().manual_seed(2)
    mu = torch.tensor([[1.0, -2.0, 0.5]]).expand(20000, 3).clone().requires_grad_(True)
    logvar = torch.tensor([[0.0, 1.0, -2.0]]).expand(20000, 3).clone().requires_grad_(True)
    z = N.GaussianMLPVAE.reparameterize(mu, logvar, g)
    torch.testing.assert_close(z.mean(0), mu[0].detach(), atol=0.05, rtol=0)
    torch.testing.assert_close(z.std(0), (0.5 * logvar[0]).exp().detach(), atol=0.03, rtol=0)
    z.square().sum().backward()
    assert mu.grad.abs().sum() > 0 and logvar.grad.abs().sum() > 0


def test_training_reduces_reconstruction_and_keeps_active_dims():
    torch.manual_seed(3)
    vae = N.GaussianMLPVAE(in_dim=6, hidden=(32,), latent=3)
    basis = torch.randn(2, 6)
    data = torch.randn(256, 2) @ basis                   # 2 underlying factors
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    first = None
    for step in range(150):
        out = vae(data)
        rec = (out["recon"] - data).square().mean()
        loss = rec + N.kl_warmup(step, 100) * 1e-3 * vae.kl(out["mu"], out["logvar"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = rec.item() if first is None else first
    assert rec.item() < 0.3 * first
    vae.eval()
    assert N.active_dims(vae.encode(data)[0]) >= 2


def test_interpolation_endpoints_and_errors():
    torch.manual_seed(4)
    vae = N.GaussianMLPVAE(**TINY).eval()
    xa, xb = torch.randn(2, 6), torch.randn(2, 6)
    path = vae.interpolate(xa, xb, torch.linspace(0, 1, 5))
    assert path.shape == (5, 2, 6)
    torch.testing.assert_close(path[0], vae(xa)["recon"])
    torch.testing.assert_close(path[-1], vae(xb)["recon"])
    with pytest.raises(ValueError, match="x: expected shape \\(B, 6\\), got \\(2, 5\\)"):
        vae(torch.randn(2, 5))
    with pytest.raises(ValueError, match="z: expected shape \\(B, 3\\)"):
        vae.decode(torch.randn(2, 4))
    with pytest.raises(ValueError, match="x_b: expected the shape of x_a"):
        vae.interpolate(xa, xb[:1], torch.linspace(0, 1, 3))
    with pytest.raises(ValueError, match="logvar: expected the shape of mu"):
        vae.reparameterize(torch.zeros(2, 3), torch.zeros(2, 2))


def test_kl_warmup_and_active_dims():
    assert N.kl_warmup(0, 10) == 0.0
    assert N.kl_warmup(5, 10, max_weight=2.0) == 1.0
    assert N.kl_warmup(50, 10) == 1.0
    assert N.kl_warmup(3, 10, delay=5) == 0.0 and N.kl_warmup(10, 10, delay=5) == 0.5
    assert N.kl_warmup(5, 0, delay=5) == 1.0
    with pytest.raises(ValueError, match="warmup, delay: expected >= 0"):
        N.kl_warmup(0, -1)
    mu = torch.stack([torch.linspace(-1, 1, 10), torch.zeros(10), 0.01 * torch.ones(10)], 1)
    assert N.active_dims(mu) == 1
    with pytest.raises(ValueError, match="mu: expected shape \\(N, latent\\) with N >= 2"):
        N.active_dims(mu[:1])


def test_feature_discriminator():
    torch.manual_seed(5)
    d = N.FeatureDiscriminator(6, (8,))
    x = torch.randn(3, 6, requires_grad=True)
    out = d(x)
    assert out.shape == (3, 1)
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="x: expected shape \\(B, 6\\)"):
        d(torch.randn(3, 5))


def test_vae_bad_input_names_the_argument():
    vae = N.GaussianMLPVAE(in_dim=8, hidden=(16,), latent=4)
    with pytest.raises(ValueError, match=r"logvar: expected the shape of mu \(2, 4\), got \(2, 5\)"):
        vae.kl(torch.rand(2, 4), torch.rand(2, 5))
    with pytest.raises(ValueError, match="n: expected an integer >= 0, got -1"):
        vae.sample_prior(-1)
    assert vae.sample_prior(0).shape == (0, 8)
