"""pyface.nn.vit: the single-scale conditioned MiT stack (EAdaLN) and the plain super-resolution."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyface.nn as N

TINY = dict(dim=16, depth=2, heads=2, cond_dim=6, mlp_ratio=2.0)


def test_mit_stack_shapes_and_token_layout():
    torch.manual_seed(0)
    stack = N.MiTStack(**TINY).eval()
    x, cond = torch.randn(2, 16, 4, 5), torch.randn(2, 6)
    y = stack(x, cond)
    assert y.shape == (2, 16, 4, 5)
    tokens = stack(x.flatten(2).transpose(1, 2), cond, hw=(4, 5))
    assert tokens.shape == (2, 20, 16)
    torch.testing.assert_close(tokens.transpose(1, 2).reshape(2, 16, 4, 5), y)
    assert len(stack.blocks) == 2 and all(isinstance(b, N.MiTBlock) for b in stack.blocks)


def test_mit_stack_eadaln_is_identity_at_init_then_learns_the_condition():
    torch.manual_seed(1)
    cond_stack = N.MiTStack(**TINY)
    plain = N.MiTStack(**{**TINY, "cond_dim": 0})
    missing, unexpected = plain.load_state_dict(cond_stack.state_dict(), strict=False)
    assert not missing and all(".ada." in k for k in unexpected) and unexpected
    x = torch.randn(2, 16, 4, 4)
    c1, c2 = torch.randn(2, 6), torch.randn(2, 6)
    y1 = cond_stack(x, c1)
    torch.testing.assert_close(y1, cond_stack(x, c2))         # the condition is ignored at init
    torch.testing.assert_close(y1, plain(x))                  # and equals the plain stack
    y1.square().mean().backward()
    grads = [p.grad for n, p in cond_stack.named_parameters() if ".ada." in n]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    with torch.no_grad():
        for n, p in cond_stack.named_parameters():
            if ".ada." in n:
                p.add_(torch.randn_like(p) * 0.1)
    assert not torch.allclose(cond_stack(x, c1), cond_stack(x, c2))


def test_mit_stack_errors():
    stack = N.MiTStack(**TINY)
    x = torch.randn(2, 16, 4, 4)
    with pytest.raises(ValueError, match="cond: expected shape \\(2, 6\\), got None"):
        stack(x)
    with pytest.raises(ValueError, match="cond: expected shape \\(2, 6\\), got \\(2, 5\\)"):
        stack(x, torch.randn(2, 5))
    with pytest.raises(ValueError, match="x: expected shape \\(B, 16, h, w\\)"):
        stack(torch.randn(2, 8, 4, 4), torch.randn(2, 6))
    with pytest.raises(ValueError, match="x: expected tokens of shape \\(B, 12, 16\\)"):
        stack(torch.randn(2, 16, 16), torch.randn(2, 6), hw=(3, 4))
    with pytest.raises(ValueError, match="cond: this stack was built with cond_dim=0"):
        N.MiTStack(**{**TINY, "cond_dim": 0})(x, torch.randn(2, 6))
    with pytest.raises(ValueError, match="heads: dim 16 is not divisible by 3"):
        N.MiTStack(**{**TINY, "heads": 3})


def test_plain_super_resolution():
    torch.manual_seed(2)
    sr = N.PlainSuperResolution(channels=5, widths=(8, 8, 4))
    assert sr.scale == 4
    rgb, feat = torch.randn(2, 3, 6, 6), torch.randn(2, 5, 6, 6)
    out = sr(rgb, feat)
    assert out.shape == (2, 3, 24, 24)
    # zero-initialised to_rgb: the output starts as the bilinearly upsampled raw RGB
    torch.testing.assert_close(out, F.interpolate(rgb, scale_factor=4, mode="bilinear",
                                                  align_corners=False))
    out.square().mean().backward()
    assert sr.to_rgb.weight.grad.abs().sum() > 0
    with torch.no_grad():
        sr.to_rgb.weight.normal_()
    out2 = sr(rgb, feat)
    out2.square().mean().backward()
    missing = [n for n, p in sr.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing
    assert not torch.allclose(out2, sr(rgb, torch.randn(2, 5, 6, 6)))   # features matter
    assert N.PlainSuperResolution(channels=5, widths=(8,))(rgb, feat).shape == (2, 3, 6, 6)
    with pytest.raises(ValueError, match="features: expected shape \\(2, 5, 6, 6\\)"):
        sr(rgb, torch.randn(2, 5, 5, 6))
    with pytest.raises(ValueError, match="rgb: expected shape \\(B, 3, r, r\\)"):
        sr(torch.randn(2, 4, 6, 6), feat)
    with pytest.raises(ValueError, match="guide: this super-resolution was built with"):
        sr(rgb, feat, torch.randn(2, 3, 24, 24))


def test_plain_super_resolution_guide():
    torch.manual_seed(3)
    sr = N.PlainSuperResolution(channels=5, widths=(8, 4), guide_channels=3)
    rgb, feat, guide = torch.randn(2, 3, 6, 6), torch.randn(2, 5, 6, 6), torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        sr.to_rgb.weight.normal_()
    out = sr(rgb, feat, guide)
    assert out.shape == (2, 3, 12, 12)
    assert not torch.allclose(out, sr(rgb, feat, torch.randn(2, 3, 12, 12)))   # guide matters
    out.square().mean().backward()
    assert sr.guide.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="guide: expected shape \\(2, 3, 12, 12\\)"):
        sr(rgb, feat, torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match="guide: expected shape"):
        sr(rgb, feat)
    with torch.device("meta"):
        full = N.PlainSuperResolution()
        assert full(torch.empty(1, 3, 128, 128), torch.empty(1, 32, 128, 128)).shape == \
            (1, 3, 512, 512)


def test_plain_super_resolution_condition():
    torch.manual_seed(4)
    sr = N.PlainSuperResolution(channels=5, widths=(8, 4), cond_dim=6)
    rgb, feat, c = torch.randn(2, 3, 6, 6), torch.randn(2, 5, 6, 6), torch.randn(2, 6)
    with torch.no_grad():
        sr.to_rgb.weight.normal_()
    base = sr(rgb, feat, cond=c)
    # zero-initialised modulation: at init the condition has no effect
    torch.testing.assert_close(base, sr(rgb, feat, cond=torch.randn(2, 6)))
    base.square().mean().backward()
    assert sr.modulation.weight.grad.abs().sum() > 0
    with torch.no_grad():
        sr.modulation.weight.normal_()
    assert not torch.allclose(sr(rgb, feat, cond=c), sr(rgb, feat, cond=torch.randn(2, 6)))
    with pytest.raises(ValueError, match="cond: expected shape \\(2, 6\\)"):
        sr(rgb, feat)
    with pytest.raises(ValueError, match="cond: this super-resolution was built with cond_dim=0"):
        N.PlainSuperResolution(channels=5, widths=(8, 4))(rgb, feat, cond=c)


def test_plain_super_resolution_channels_last_matches_contiguous():
    torch.manual_seed(5)
    kw = dict(channels=5, widths=(8, 4), guide_channels=3, cond_dim=6)
    a = N.PlainSuperResolution(**kw, channels_last=True)
    b = N.PlainSuperResolution(**kw, channels_last=False)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0, 0.3)
    b.load_state_dict(a.state_dict())
    args = (torch.randn(2, 3, 6, 6), torch.randn(2, 5, 6, 6), torch.randn(2, 3, 12, 12),
            torch.randn(2, 6))
    out_a, out_b = a(*args), b(*args)
    assert out_a.is_contiguous() and out_b.is_contiguous()
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out_a)
    out_a.backward(g)
    out_b.backward(g)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-3, msg=n)   # grads ~100


def test_mit_stack_runs_an_empty_batch():
    st = N.MiTStack(dim=16, depth=1, heads=2, cond_dim=8, sr_ratio=2)
    assert st(torch.rand(0, 16, 4, 4), torch.rand(0, 8)).shape == (0, 16, 4, 4)
    assert st(torch.rand(0, 16, 16), torch.rand(0, 8), hw=(4, 4)).shape == (0, 16, 16)
