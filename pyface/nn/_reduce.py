"""Mean reductions for the losses in :mod:`pyface.nn` that give 0, not NaN, over no elements.

``x.mean()`` of an empty tensor is NaN (0 / 0), so a loss averaged over an empty batch (B = 0)
would poison the total it is added to. These return the empty *sum* instead: 0, still part of
the autograd graph of the inputs, so backward runs and gives them empty (or zero) gradients. A
non-empty input takes the usual ``mean`` / ``F.l1_loss`` / ``F.mse_loss`` path, bit for bit."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_or_zero(x: torch.Tensor) -> torch.Tensor:
    """``x.mean()``; 0 (the empty sum, with a graph) when ``x`` has no elements."""
    return x.sum() if x.numel() == 0 else x.mean()


def l1_or_zero(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.l1_loss(pred, target)`` (mean absolute difference); 0 with a graph when empty."""
    if pred.numel() == 0 or target.numel() == 0:
        return (pred - target).abs().sum()
    return F.l1_loss(pred, target)


def mse_or_zero(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.mse_loss(pred, target)`` (mean squared difference); 0 with a graph when empty."""
    if pred.numel() == 0 or target.numel() == 0:
        return (pred - target).square().sum()
    return F.mse_loss(pred, target)
