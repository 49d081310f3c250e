# Provenance: reproduces the GAN losses and the R1 penalty as used by EG3D (NVlabs/eg3d, commit
# 7cf1fd1, NVIDIA Source Code License, non-commercial). Our own implementation, written from the
# papers and the upstream's documented behaviour; no upstream code is copied. pyface's code is
# licensed under Apache-2.0 (LICENSE).
"""Losses and regularisers shared by the models. Perceptual (VGG19): :mod:`pyface.nn.vgg`;
identity (ArcFace): :mod:`pyface.nn.arcface`; RoI L1: :mod:`pyface.nn.roi`."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pyface.nn._reduce import l1_or_zero, mean_or_zero
from pyface.nn.arcface import IdentityLoss  # noqa: F401  (re-exported)
from pyface.nn.roi import roi_l1_loss  # noqa: F401
from pyface.nn.vgg import PerceptualLoss  # noqa: F401

GAN_LOSSES = ("logistic", "hinge", "lsgan")


def gan_g_loss(fake_logits: torch.Tensor, kind: str = "logistic") -> torch.Tensor:
    """Generator loss on D(fake): non-saturating logistic ``softplus(-D)``, hinge ``-D`` or
    least squares ``(D - 1)^2``; mean over ``fake_logits`` (B, ...) (any shape). An empty batch
    gives 0, still connected to ``fake_logits`` (backward gives an empty gradient)."""
    if kind == "logistic":
        return mean_or_zero(F.softplus(-fake_logits))
    if kind == "hinge":
        return mean_or_zero(-fake_logits)
    if kind == "lsgan":
        return mean_or_zero((fake_logits - 1).square())
    raise ValueError(f"kind: expected one of {GAN_LOSSES}, got {kind!r}")


def gan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
               kind: str = "logistic") -> torch.Tensor:
    """Discriminator loss: logistic ``softplus(-D(real)) + softplus(D(fake))``, hinge
    ``relu(1 - D(real)) + relu(1 + D(fake))`` or least squares ``(D(real)-1)^2 + D(fake)^2``;
    ``real_logits`` (B, ...) and ``fake_logits`` (B', ...) are averaged separately (their
    batch sizes may differ); the term of an empty batch is 0, still connected to its logits."""
    if kind == "logistic":
        return mean_or_zero(F.softplus(-real_logits)) + mean_or_zero(F.softplus(fake_logits))
    if kind == "hinge":
        return mean_or_zero(F.relu(1 - real_logits)) + mean_or_zero(F.relu(1 + fake_logits))
    if kind == "lsgan":
        return mean_or_zero((real_logits - 1).square()) + mean_or_zero(fake_logits.square())
    raise ValueError(f"kind: expected one of {GAN_LOSSES}, got {kind!r}")


def r1_penalty(real_logits: torch.Tensor, real_inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample R1: ``sum_i |d D(real) / d input_i|^2`` -> (B,). Inputs must require grad;
    the graph is kept (``create_graph``) so the penalty trains D (double backward). EG3D's loss is
    ``r1_penalty(...) * (gamma / 2)``, times the lazy interval.

    real_logits: (B, ...) computed from ``real_inputs``, each (B, ...) with ``requires_grad``."""
    real_inputs = list(real_inputs)
    for i, x in enumerate(real_inputs):
        if not isinstance(x, torch.Tensor) or not x.requires_grad:
            raise ValueError(f"real_inputs[{i}]: expected a tensor with requires_grad=True (call "
                             f"requires_grad_() on it before the discriminator sees it)")
    if not real_logits.requires_grad:
        raise ValueError("real_logits: expected a tensor computed from real_inputs (it does not "
                         "require grad)")
    grads = torch.autograd.grad(real_logits.sum(), list(real_inputs), create_graph=True)
    return sum(g.square().flatten(1).sum(1) for g in grads)


def feature_matching_loss(real_feats: Sequence[torch.Tensor],
                          fake_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean L1 between discriminator features of real (detached) and fake images: two lists of
    equal length whose i-th tensors have the same shape (e.g. (B, C_i, H_i, W_i)); the mean
    over the list of each pair's mean L1. The term of an empty pair (B = 0) is 0, still
    connected to ``fake_feats``. Two empty lists (no features) give a 0-dim zero tensor (not a
    Python number) of the default dtype on the CPU: there is no input to connect it to or to
    take a device from; it still adds to a loss on any device (a 0-dim CPU tensor combines with
    tensors on any device)."""
    if len(real_feats) != len(fake_feats):
        raise ValueError(f"feature lists differ in length: {len(real_feats)} vs {len(fake_feats)}")
    if not len(fake_feats):
        return torch.zeros(())
    return sum(l1_or_zero(f, r.detach()) for r, f in zip(real_feats, fake_feats)) / max(
        len(real_feats), 1)


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    """Total variation of (B, C, H, W) images or (B, P, C, H, W) planes (mean absolute
    differences along H and W). An empty batch gives 0, still connected to ``x``; so does each
    term with no differences to take (H = 1 or W = 1)."""
    return mean_or_zero((x[..., 1:, :] - x[..., :-1, :]).abs()) + \
        mean_or_zero((x[..., :, 1:] - x[..., :, :-1]).abs())


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over features, mean over the batch: a scalar.
    mu, logvar: (B, D). An empty batch (B = 0) gives 0 (an empty sum, not the NaN of an empty
    mean), still connected to ``mu`` and ``logvar``: backward gives them empty gradients."""
    if mu.shape != logvar.shape:
        raise ValueError(f"logvar: expected the shape of mu {tuple(mu.shape)}, got "
                         f"{tuple(logvar.shape)}")
    kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(dim=-1)
    return mean_or_zero(kl)
