"""pyface.nn.codebook: the QR-orthonormal direction codebook, InfoNCE and its learnable
temperature."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pyface.nn as N


def test_orthogonal_basis_is_orthonormal_and_spans_w():
    torch.manual_seed(0)
    basis = N.OrthogonalBasis(64, 6)
    q = basis.basis()
    assert q.shape == (64, 6)
    torch.testing.assert_close(q.t() @ q, torch.eye(6), atol=1e-5, rtol=0)
    # Q spans the columns of W: projecting W onto span(Q) leaves it unchanged
    w = basis.weight.detach()
    torch.testing.assert_close(q @ (q.t() @ w), w, atol=1e-4, rtol=1e-4)
    # forward is sum_i coeffs_i q_i; project inverts it on the span
    c = torch.randn(3, 5, 6)
    x = basis(c)
    assert x.shape == (3, 5, 64)
    torch.testing.assert_close(x[1, 2], (c[1, 2, :, None] * q.t()).sum(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(basis.project(x), c, atol=1e-5, rtol=1e-5)
    # orthonormal columns preserve the norm of the coefficients
    torch.testing.assert_close(x.norm(dim=-1), c.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_orthogonal_basis_gradient_reaches_w_and_stays_orthonormal():
    torch.manual_seed(1)
    basis = N.OrthogonalBasis(16, 4, init_std=0.02)
    opt = torch.optim.SGD(basis.parameters(), lr=1.0)
    target = torch.randn(16)
    for _ in range(3):
        loss = (basis(torch.ones(4)) - target).square().sum()
        opt.zero_grad()
        loss.backward()
        assert basis.weight.grad is not None and basis.weight.grad.abs().sum() > 0
        opt.step()
    q = basis.basis()
    torch.testing.assert_close(q.t() @ q, torch.eye(4), atol=1e-5, rtol=0)


def test_orthogonal_basis_otavatar_size_and_errors():
    basis = N.OrthogonalBasis(512, 20)
    assert sum(p.numel() for p in basis.parameters()) == 512 * 20
    assert basis(torch.randn(2, 14, 20)).shape == (2, 14, 512)
    with pytest.raises(ValueError, match="coeffs: expected shape \\(..., 20\\)"):
        basis(torch.randn(2, 14, 19))
    with pytest.raises(ValueError, match="x: expected shape"):
        basis.project(torch.randn(3, 20))
    with pytest.raises(ValueError, match="n: expected 1 <= n <= dim"):
        N.OrthogonalBasis(4, 5)


def _info_nce_loops(q, k, t):
    n = q.shape[0]
    s = [[F.cosine_similarity(q[i], k[j], dim=0).item() / t for j in range(n)] for i in range(n)]
    rows = [-(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(n)))) for i in range(n)]
    cols = [-(s[j][j] - math.log(sum(math.exp(s[i][j]) for i in range(n)))) for j in range(n)]
    return rows, cols


def test_info_nce_known_answer():
    torch.manual_seed(2)
    q, k = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    per_row = N.info_nce(q, k, 0.1, symmetric=False, reduction="none")
    sym = N.info_nce(q, k, 0.1, reduction="none")
    assert per_row.shape == (2, 5)
    for g in range(2):
        rows, cols = _info_nce_loops(q[g], k[g], 0.1)
        torch.testing.assert_close(per_row[g], torch.tensor(rows, dtype=torch.float64))
        torch.testing.assert_close(sym[g], 0.5 * (torch.tensor(rows) + torch.tensor(cols)).double())
    torch.testing.assert_close(N.info_nce(q, k, 0.1), sym.mean())


def test_info_nce_aligned_pairs_beat_shuffled_and_scale_invariant():
    torch.manual_seed(3)
    q = torch.randn(8, 16)
    aligned = N.info_nce(q, q * 3.0, 0.07)       # cosine: scale does not matter
    assert aligned < 0.01
    assert N.info_nce(q, q.roll(1, 0), 0.07) > math.log(8)
    with pytest.raises(ValueError, match="key: expected the shape of query"):
        N.info_nce(q, q[:7])
    with pytest.raises(ValueError, match="temperature: expected one value > 0"):
        N.info_nce(q, q, 0.0)
    with pytest.raises(ValueError, match="query: expected N >= 2"):
        N.info_nce(q[:1], q[:1])


def test_learnable_temperature_gradient_and_clamp():
    temp = N.LearnableTemperature(0.07)
    torch.testing.assert_close(temp(), torch.tensor(0.07))
    torch.manual_seed(4)
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    N.info_nce(q, k, temp()).backward()
    assert temp.log_scale.grad is not None and temp.log_scale.grad != 0
    with torch.no_grad():
        temp.log_scale.fill_(10.0)              # 1 / tau = e^10 > 100: clamped
    torch.testing.assert_close(temp(), torch.tensor(0.01))
    with pytest.raises(ValueError, match="init: expected a temperature > 0"):
        N.LearnableTemperature(0.0)


def test_gradcheck_float64():
    torch.manual_seed(5)
    q = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: N.info_nce(a, b, c), (q, k, t))
    basis = N.OrthogonalBasis(5, 3).double()
    c = torch.randn(2, 3, dtype=torch.float64)
    w = basis.weight.detach().clone().requires_grad_(True)

    def f(weight):
        qm, _ = torch.linalg.qr(weight + basis.eps)
        return c @ qm.t()
    assert torch.autograd.gradcheck(f, (w,))
    torch.testing.assert_close(basis(c), f(basis.weight))


def test_info_nce_tensor_temperature():
    q = torch.randn(4, 3)
    torch.testing.assert_close(N.info_nce(q, q.flip(0), torch.tensor([0.5])),
                               N.info_nce(q, q.flip(0), 0.5))
    with pytest.raises(ValueError, match="temperature: expected one value > 0, got shape"):
        N.info_nce(q, q, torch.ones(2))
