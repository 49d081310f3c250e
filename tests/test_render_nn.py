"""pyface.nn render modules: OSGDecoder, TriplaneRenderer, density regularisers."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pyface.nn import (
    OSGDecoder,
    RenderConfig,
    TriplaneRenderer,
    density_l1_regularizer,
    density_monotonic_regularizer,
)
from pyface.ops.reference import render_triplane_reference, triplane_sample_reference
from pyface.testing import assert_close

needs_cpp = pytest.mark.cpp  # fails, never skips, when pyface._C is missing (conftest.py)


def _cameras(B):
    m = torch.eye(4, dtype=torch.float64)
    m[1, 1], m[2, 2], m[2, 3] = -1.0, -1.0, 2.7  # at z = 2.7 looking down -z, y down
    k = torch.tensor([4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1], dtype=torch.float64)
    return torch.cat([m.flatten(), k]).expand(B, 25).clone()


def test_osg_decoder_is_eg3d():
    torch.manual_seed(0)
    dec = OSGDecoder(8, 16, 5, lr_multiplier=0.5).double()
    feats = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    out = dec(feats)
    # EG3D: FullyConnectedLayer weight gain lr_mul / sqrt(in), bias gain lr_mul
    l0, l2 = dec.net[0], dec.net[2]
    x = feats.mean(1).reshape(14, 8)
    h = F.softplus(x @ (l0.weight * 0.5 / math.sqrt(8)).t() + l0.bias * 0.5)
    y = (h @ (l2.weight * 0.5 / math.sqrt(16)).t() + l2.bias * 0.5).reshape(2, 7, 6)
    assert_close(out["sigma"], y[..., :1])
    assert_close(out["rgb"], torch.sigmoid(y[..., 1:]) * 1.002 - 0.001)
    assert set(dict(dec.named_parameters())) == {"net.0.weight", "net.0.bias", "net.2.weight",
                                                 "net.2.bias"}
    assert tuple(dec.net[0].weight.shape) == (16, 8)


def test_render_config_defaults_are_eg3d_ffhq():
    cfg = RenderConfig.ffhq()
    assert (cfg.depth_resolution, cfg.depth_resolution_importance) == (48, 48)
    assert (cfg.ray_start, cfg.ray_end, cfg.box_warp, cfg.plane_axes) == (2.25, 3.3, 1.0, "eg3d")
    assert RenderConfig.ffhq_corrected_axes().plane_axes == "xy_xz_zy"
    assert dataclasses.replace(cfg, white_back=True).white_back


@needs_cpp
@pytest.mark.parametrize("plane_axes", ["eg3d", "xy_xz_zy"])
def test_triplane_renderer_matches_eg3d_renderer(plane_axes):
    from pyface.ops import ray_bundle

    torch.manual_seed(0)
    B, res, C = 2, 4, 8
    planes = torch.randn(B, 3, C, 16, 16, dtype=torch.float64, requires_grad=True)
    dec = OSGDecoder(C, 16, 4).double()
    o, d = ray_bundle(_cameras(B), res)
    cfg = RenderConfig(depth_resolution=8, depth_resolution_importance=6, plane_axes=plane_axes,
                       chunk_points=40)
    noise = torch.rand(B, res * res, 8, dtype=torch.float64)
    u = torch.rand(B, res * res, 6, dtype=torch.float64)
    out = TriplaneRenderer(cfg)(planes, dec, o, d, stratified_noise=noise, importance_u=u)
    ref = render_triplane_reference(planes, o, d, dec, near=2.25, far=3.3, n_coarse=8, n_fine=6,
                                    plane_axes=plane_axes, stratified_noise=noise,
                                    importance_u=u)
    assert_close(out.features, ref[0] * 2 - 1)
    assert_close(out.depth, ref[1])
    assert_close(out.weights_sum, ref[2])
    imgs = out.images(res)
    assert imgs["feature_image"].shape == (B, 4, res, res)
    assert imgs["image_raw"].shape == (B, 3, res, res)
    assert_close(imgs["image_depth"][:, 0, 1, 2], out.depth[:, 1 * res + 2, 0])
    # gradients reach the decoder's parameters through the fused path
    loss = out.features.square().mean() + out.depth.mean()
    g = torch.autograd.grad(loss, [planes, *dec.parameters()])
    ref_loss = (ref[0] * 2 - 1).square().mean() + ref[1].mean()
    g_ref = torch.autograd.grad(ref_loss, [planes, *dec.parameters()])
    for a, b in zip(g, g_ref):
        assert_close(a, b)


@needs_cpp
def test_density_regularizers_match_eg3d_loss():
    torch.manual_seed(0)
    planes = torch.randn(2, 3, 8, 16, 16, dtype=torch.float64, requires_grad=True)
    dec = OSGDecoder(8, 16, 4).double()

    def sigma(points):
        return dec(triplane_sample_reference(planes, points, plane_axes="eg3d",
                                             reduce="none"))["sigma"][..., 0]

    gen = torch.Generator().manual_seed(7)
    loss = density_l1_regularizer(planes, dec, n_points=50, p_dist=0.004, generator=gen)
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(2, 50, 3, dtype=torch.float64, generator=gen) * 2 - 1
    y = x + torch.randn(x.shape, dtype=torch.float64, generator=gen) * 0.004
    s = sigma(torch.cat([x, y], 1))
    assert_close(loss, F.l1_loss(s[:, :50], s[:, 50:]))
    assert loss > 0
    (g,) = torch.autograd.grad(loss, planes)
    assert g.abs().sum() > 0

    for detach in (True, False):
        gen = torch.Generator().manual_seed(3)
        loss = density_monotonic_regularizer(planes, dec, n_points=60, detach=detach,
                                             generator=gen)
        gen = torch.Generator().manual_seed(3)
        x = torch.rand(2, 60, 3, dtype=torch.float64, generator=gen) * 2 - 1
        y = x + torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64) / 256
        s = sigma(torch.cat([x, y], 1))
        front = s[:, :60].detach() if detach else s[:, :60]
        assert_close(loss, torch.relu(front - s[:, 60:]).mean() * 10)
    # works with a plain callable decoder and with the raw weights too
    w = dec.effective_weights()
    gen = torch.Generator().manual_seed(7)
    assert_close(density_l1_regularizer(planes, w, n_points=50, generator=gen),
                 density_l1_regularizer(planes, dec, n_points=50,
                                        generator=torch.Generator().manual_seed(7)))
