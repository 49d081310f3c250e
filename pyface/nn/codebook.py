# Provenance: reproduces the semantics of the learned orthonormal motion directions of LIA
# (Wang et al. 2022) as used by OTAvatar's motion controller (theEricMa/OTAvatar, commit c8c484f,
# CC BY-NC-SA 4.0; the "Direction" codebook: Q of the QR decomposition of a learnable (512, 20)
# matrix) and Export3D's CLeBS basis (Ki et al. 2024, no code released), and the symmetric InfoNCE
# of CLIP (Radford et al. 2021). Our own implementation, written from the papers and the
# upstream's documented behaviour; no upstream code is copied. pyface's code is licensed under
# Apache-2.0 (LICENSE).
"""Orthonormal direction codebooks and the contrastive (InfoNCE) loss.

* :class:`OrthogonalBasis`: a learnable ``(dim, n)`` matrix W whose QR decomposition gives n
  orthonormal directions Q, recomputed on every forward so gradients reach W;
  ``coeffs (..., n) -> coeffs @ Q^T (..., dim)``.
* :func:`info_nce`: InfoNCE over the rows of two embedding sets, with cosine similarity and a
  temperature; symmetric (CLIP) by default; batched over leading dimensions (one N x N problem per
  group, e.g. per video).
* :class:`LearnableTemperature`: a positive temperature stored as ``log(1 / tau)``, clamped like
  CLIP's logit scale.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pyface.nn._reduce import mean_or_zero


class OrthogonalBasis(nn.Module):
    """n orthonormal directions in R^dim: ``Q = QR(W + eps).Q`` with a learnable W (dim, n).

    OTAvatar's codebook is ``OrthogonalBasis(512, 20)``; Export3D's CLeBS basis
    ``OrthogonalBasis(d, n)`` with n << d.

    Args:
        dim: d, the dimension of the space (rows of W).
        n: number of directions (columns), ``1 <= n <= dim``.
        eps: added to W before the decomposition (OTAvatar: 1e-8).
        init_std: W is initialised N(0, init_std^2). Q does not depend on W's scale; the scale
            only sets how fast W's directions move under a given learning rate.

    ``forward(coeffs)``: coeffs (..., n) -> (..., dim), ``sum_i coeffs_i q_i``.
    ``basis()``: Q, (dim, n), ``Q^T Q = I``. ``project(x)``: x (..., dim) -> coefficients
    (..., n), ``x @ Q`` (the inverse of forward on the span).
    """

    def __init__(self, dim: int, n: int, *, eps: float = 1e-8, init_std: float = 1.0):
        super().__init__()
        if not 1 <= n <= dim:
            raise ValueError(f"n: expected 1 <= n <= dim ({dim}), got {n}")
        self.dim, self.n, self.eps = dim, n, eps
        self.weight = nn.Parameter(torch.randn(dim, n) * init_std)

    def basis(self) -> torch.Tensor:
        """Q (dim, n) with orthonormal columns (computed in float32 at least; QR of half
        precision is not supported)."""
        w = self.weight
        dt = torch.promote_types(w.dtype, torch.float32)
        q, _ = torch.linalg.qr(w.to(dt) + self.eps, mode="reduced")
        return q.to(w.dtype)

    def forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        if coeffs.dim() < 1 or coeffs.shape[-1] != self.n:
            raise ValueError(f"coeffs: expected shape (..., {self.n}), got "
                             f"{tuple(coeffs.shape)}")
        q = self.basis()
        return coeffs @ q.to(coeffs.dtype).t()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (..., {self.dim}), got {tuple(x.shape)}")
        return x @ self.basis().to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n={self.n}, eps={self.eps}"


class LearnableTemperature(nn.Module):
    """A learnable temperature tau > 0, stored as ``log_scale = log(1 / tau)`` (CLIP).

    ``forward()`` returns tau (a 0-d tensor), with the logit scale ``1 / tau`` clamped to at most
    ``max_scale`` (CLIP: 100), so tau never drops below ``1 / max_scale``.

    Args:
        init: initial tau (CLIP and Export3D's CLeBS choice: 0.07).
        max_scale: upper bound of 1 / tau.
    """

    def __init__(self, init: float = 0.07, *, max_scale: float = 100.0):
        super().__init__()
        if not init > 0:
            raise ValueError(f"init: expected a temperature > 0, got {init}")
        if not max_scale > 0:
            raise ValueError(f"max_scale: expected > 0, got {max_scale}")
        self.max_scale = max_scale
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init)))

    def forward(self) -> torch.Tensor:
        return 1.0 / self.log_scale.clamp(max=math.log(self.max_scale)).exp()


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: torch.Tensor | float = 0.07,
             *, symmetric: bool = True, reduction: str = "mean") -> torch.Tensor:
    """InfoNCE with cosine similarity: row i of ``query`` and row i of ``key`` are the positive
    pair, every other row of the same group is a negative.

    ``logits[..., i, j] = cos(query_i, key_j) / temperature``; the loss is the cross-entropy of
    each row against its diagonal, averaged with that of each column when ``symmetric`` (CLIP).

    Args:
        query: (..., N, D), e.g. image embeddings of N frames of one video (leading dims: groups,
            such as videos, each its own N x N problem).
        key: (..., N, D), e.g. expression codes of the same frames.
        temperature: float > 0, or a one-element tensor (e.g. :class:`LearnableTemperature`
            ``()``; its value is not checked, to avoid a device sync).
        symmetric: average query->key and key->query cross-entropies.
        reduction: ``"mean"`` (over groups and rows) or ``"none"`` (per row, shape (..., N)).
    Returns:
        a scalar, or (..., N) for ``reduction="none"``. No groups (a leading dim of 0) give 0
        for ``"mean"``, still connected to ``query`` and ``key``.
    """
    if query.dim() < 2:
        raise ValueError(f"query: expected shape (..., N, D), got {tuple(query.shape)}")
    if key.shape != query.shape:
        raise ValueError(f"key: expected the shape of query {tuple(query.shape)}, got "
                         f"{tuple(key.shape)}")
    if query.shape[-2] < 2:
        raise ValueError(f"query: expected N >= 2 rows (one positive and at least one negative), "
                         f"got shape {tuple(query.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:    # values of tensors are not read (no device sync)
            raise ValueError(f"temperature: expected one value > 0, got shape "
                             f"{tuple(temperature.shape)}")
    elif not temperature > 0:
        raise ValueError(f"temperature: expected one value > 0, got {temperature}")
    t = torch.as_tensor(temperature, dtype=query.dtype, device=query.device).reshape(())
    q = F.normalize(query, dim=-1)
    k = F.normalize(key, dim=-1)
    logits = q @ k.transpose(-1, -2) / t
    n = logits.shape[-1]
    flat = logits.reshape(-1, n, n)
    target = torch.arange(n, device=logits.device).expand(flat.shape[0], n)
    loss = F.cross_entropy(flat.transpose(1, 2), target, reduction="none")     # rows: q -> k
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(flat, target, reduction="none"))  # columns: k -> q
    loss = loss.reshape(logits.shape[:-1])
    return mean_or_zero(loss) if reduction == "mean" else loss
