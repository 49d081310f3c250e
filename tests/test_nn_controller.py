"""pyface.nn.controller: OTAvatar's motion controller (parameter count, temporal receptive
field, tied MLP, global row, codebook output)."""
from __future__ import annotations

import pytest
import torch

import pyface.nn as N

TINY = dict(in_channels=5, window=11, descriptor=8, first_kernel=3, layers=2, dilation=2,
            mlp_layers=3, num_ws=4, directions=3, w_dim=10)


def test_full_size_parameter_count():
    with torch.device("meta"):
        tied = N.MotionController()
        untied = N.MotionController(tie_mlp=False)
        assert tied(torch.empty(2, 70, 27)).shape == (2, 14, 512)
        assert tied.coefficients(torch.empty(2, 70, 27)).shape == (2, 14, 20)
    assert sum(p.numel() for p in tied.parameters()) == 869_420
    assert sum(p.numel() for p in untied.parameters()) == 869_420 + 4 * (256 * 256 + 256)
    assert tied.out_length == 3 and tied.codebook.weight.shape == (512, 20)
    assert tied.out.out_features == 300


def test_output_lies_in_the_codebook_span_and_gradients():
    torch.manual_seed(0)
    ctrl = N.MotionController(**TINY)
    x = torch.randn(2, 5, 11)
    dw = ctrl(x)
    assert dw.shape == (2, 4, 10)
    alpha = ctrl.coefficients(x)
    q = ctrl.codebook.basis()
    torch.testing.assert_close(dw, alpha @ q.t())
    torch.testing.assert_close(ctrl.codebook.project(dw), alpha, atol=1e-6, rtol=1e-5)
    (dw.square().sum() * 1e6).backward()
    missing = [n for n, p in ctrl.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def test_global_row_is_added_to_every_layer():
    torch.manual_seed(1)
    ctrl = N.MotionController(**TINY)
    with torch.no_grad():
        ctrl.out.weight.zero_()
        bias = torch.zeros(5, 3)
        bias[0] = torch.tensor([1.0, 2.0, 3.0])       # global row only
        ctrl.out.bias.copy_(bias.flatten())
    alpha = ctrl.coefficients(torch.randn(2, 5, 11))
    torch.testing.assert_close(alpha, torch.tensor([1.0, 2.0, 3.0]).expand(2, 4, 3))
    no_global = N.MotionController(**TINY, global_row=False)
    assert no_global.out.out_features == 4 * 3


def test_temporal_receptive_field_is_the_whole_window():
    torch.manual_seed(2)
    ctrl = N.MotionController(**TINY)
    with torch.no_grad():
        for p in ctrl.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(1, 5, 11)
    base = ctrl(x)
    for t in (0, 5, 10):             # every frame of the window changes the output
        y = x.clone()
        y[0, :, t] += 1.0
        assert not torch.allclose(ctrl(y), base)


def test_tied_mlp_and_untie():
    torch.manual_seed(3)
    ctrl = N.MotionController(**TINY)
    assert len(ctrl.mlp) == 1 and "mlp.1.weight" not in ctrl.state_dict()
    x = torch.randn(2, 5, 11)
    before = ctrl(x)
    ctrl.untie()
    assert len(ctrl.mlp) == 3 and not ctrl.cfg.tie_mlp
    assert ctrl.mlp[0].weight.data_ptr() != ctrl.mlp[1].weight.data_ptr()
    torch.testing.assert_close(ctrl(x), before)


def test_errors():
    ctrl = N.MotionController(**TINY)
    with pytest.raises(ValueError,
                       match="motion: expected shape \\(B, 5, 11\\), got \\(2, 5, 10\\)"):
        ctrl(torch.randn(2, 5, 10))
    with pytest.raises(ValueError, match="window: expected > 10"):
        N.MotionController(**{**TINY, "window": 10})


def test_controller_runs_an_empty_batch():
    mc = N.MotionController()
    assert mc(torch.zeros(0, 70, 27)).shape == (0, 14, 512)
    assert mc.coefficients(torch.zeros(0, 70, 27)).shape == (0, 14, 20)
