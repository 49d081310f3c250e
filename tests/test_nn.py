"""pyface.nn building blocks: shapes, semantics against small references, float64 gradcheck,
double backward (R1), torch.compile, errors, and the random-init warning."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import pyface.nn as N
from pyface.nn._pretrained import PretrainedWeightsWarning
from pyface.nn.layers import Conv2dLayer, bias_act, modulated_conv2d
from pyface.nn.losses import GAN_LOSSES
from pyface.nn.resample import blur, downsample2d, setup_filter, upfirdn2d, upsample2d
from pyface.testing import assert_close

D64 = torch.float64


@pytest.fixture
def one_thread():
    """Tiny float64 checks run thousands of small ops; intra-op threads only add overhead (and
    stall badly on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------
# resampling and layers
# ------------------------------------------------------------------------------------------

def _upfirdn_naive(x, f, up, down, pad):
    """Direct definition: zero-insert, pad, true convolution, decimate (loops)."""
    N_, C, H, W = x.shape
    z = torch.zeros(N_, C, H * up, W * up, dtype=x.dtype)
    z[:, :, ::up, ::up] = x
    x0, x1, y0, y1 = pad
    z = F.pad(z, [x0, x1, y0, y1])
    fh, fw = f.shape
    oh, ow = z.shape[2] - fh + 1, z.shape[3] - fw + 1
    out = torch.zeros(N_, C, oh, ow, dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            win = z[:, :, i:i + fh, j:j + fw]
            out[:, :, i, j] = (win * f.flip([0, 1])).sum((-1, -2))
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("up, down, pad", [(1, 1, (1, 2, 0, 1)), (2, 1, (2, 1, 2, 1)),
                                           (1, 2, (1, 1, 1, 1)), (2, 2, (1, 0, 2, 1))])
def test_upfirdn2d_matches_definition(up, down, pad, one_thread):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7, dtype=D64)
    f = torch.randn(3, 4, dtype=D64)
    assert_close(upfirdn2d(x, f, up=up, down=down, padding=pad),
                 _upfirdn_naive(x, f, up, down, pad))


def test_resample_sizes_and_dc_gain():
    f = setup_filter()
    x = torch.ones(1, 2, 8, 8)
    up, dn = upsample2d(x, f), downsample2d(x, f)
    assert up.shape == (1, 2, 16, 16) and dn.shape == (1, 2, 4, 4)
    assert_close(up[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12))   # interior keeps the level
    assert_close(dn[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))
    assert torch.equal(blur(x, 0), x)
    assert blur(x, 1.5).shape == x.shape


def test_conv_layer_down_up_shapes_and_bias_act():
    x = torch.randn(2, 4, 8, 8)
    assert Conv2dLayer(4, 6, 3, down=2)(x).shape == (2, 6, 4, 4)
    assert Conv2dLayer(4, 6, 1, down=2, bias=False)(x).shape == (2, 6, 4, 4)
    assert Conv2dLayer(4, 6, 3, up=2)(x).shape == (2, 6, 16, 16)
    y = bias_act(torch.tensor([[-1.0, 2.0]]), torch.tensor([0.5, 0.0]), act="lrelu", clamp=1.0)
    assert_close(y, torch.tensor([[-0.1 * math.sqrt(2), 1.0]]))
    with pytest.raises(ValueError, match="act: expected one of"):
        bias_act(x, act="gelu2")


def test_modulated_conv_equals_per_sample_conv(one_thread):
    torch.manual_seed(0)
    x, w, s = torch.randn(3, 4, 6, 6, dtype=D64), torch.randn(5, 4, 3, 3, dtype=D64), \
        torch.randn(3, 4, dtype=D64)
    out = modulated_conv2d(x, w, s, padding=1)
    for b in range(3):
        wb = w * s[b].view(1, 4, 1, 1)
        wb = wb / wb.square().sum(dim=[1, 2, 3], keepdim=True).add(1e-8).sqrt()
        assert_close(out[b:b + 1], F.conv2d(x[b:b + 1], wb, padding=1))
    with pytest.raises(ValueError, match=r"styles: expected shape \(3, 4\), got \(3, 5\)"):
        modulated_conv2d(x, w, torch.randn(3, 5, dtype=D64))


def test_gradcheck_and_double_backward_float64(one_thread):
    torch.manual_seed(0)
    x = torch.randn(2, 2, 3, 3, dtype=D64, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, dtype=D64, requires_grad=True)
    s = torch.randn(2, 2, dtype=D64, requires_grad=True)
    f = setup_filter().to(D64)
    fn = lambda x, w, s: modulated_conv2d(x, w, s, up=2, padding=1, resample_filter=f,  # noqa
                                          flip_weight=False)
    assert torch.autograd.gradcheck(fn, (x, w, s))
    assert torch.autograd.gradgradcheck(fn, (x, w, s))
    down = Conv2dLayer(2, 2, 3, down=2, activation="lrelu").double()
    x4 = torch.randn(1, 2, 4, 4, dtype=D64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: down(x), (x4,))


def test_r1_double_backward_through_dual_discriminator(one_thread):
    torch.manual_seed(0)
    D = N.DualDiscriminator(img_resolution=16, channel_base=128, channel_max=16, c_dim=25,
                            mapping_layers=2)
    img = torch.randn(4, 3, 16, 16, requires_grad=True)
    raw = torch.randn(4, 3, 8, 8, requires_grad=True)
    logits = D(img, raw, torch.randn(4, 25))
    assert logits.shape == (4, 1)
    pen = N.r1_penalty(logits, [img, raw])
    assert pen.shape == (4,) and (pen > 0).all()
    pen.mean().backward()
    g = D.b16.fromrgb.weight.grad
    assert g is not None and g.abs().sum() > 0
    # the penalty really is |dD/dx|^2: compare with a finite difference along a direction
    with torch.no_grad():
        v = torch.randn_like(img)
        eps = 1e-3
        fd = (D(img + eps * v, raw, torch.zeros(4, 25)).sum() -
              D(img - eps * v, raw, torch.zeros(4, 25)).sum()) / (2 * eps)
    img2 = img.detach().requires_grad_()
    (gi,) = torch.autograd.grad(D(img2, raw.detach(), torch.zeros(4, 25)).sum(), img2)
    assert (gi * v).sum().item() == pytest.approx(fd.item(), rel=2e-2, abs=1e-3)


def test_torch_compile_fullgraph_synthesis_layer():
    torch.manual_seed(0)
    layer = N.stylegan.SynthesisLayer(4, 6, 8, resolution=8, up=2)
    x, w = torch.randn(2, 4, 4, 4), torch.randn(2, 8)
    eager = layer(x, w, noise_mode="const")
    compiled = torch.compile(lambda x, w: layer(x, w, noise_mode="const"), fullgraph=True)
    assert_close(compiled(x, w), eager, scale=10)


# ------------------------------------------------------------------------------------------
# generator pieces
# ------------------------------------------------------------------------------------------

def _tiny_backbone():
    return N.TriplaneBackbone(N.TriplaneBackboneConfig(
        mapping=N.MappingConfig(z_dim=8, c_dim=25, w_dim=16),
        synthesis=N.SynthesisConfig(w_dim=16, img_resolution=16, img_channels=12,
                                    channel_base=64, channel_max=16),
        plane_channels=4))


def test_mapping_truncation_and_w_avg():
    torch.manual_seed(0)
    m = N.MappingNetwork(z_dim=8, c_dim=25, w_dim=16, num_ws=5)
    z, c = torch.randn(6, 8), torch.randn(6, 25)
    ws = m(z, c, update_emas=True)
    assert ws.shape == (6, 5, 16)
    assert_close(m.w_avg, ws[:, 0].mean(0) * (1 - 0.998))
    t = m(z, c, truncation_psi=0.5, truncation_cutoff=2)
    assert_close(t[:, :2], m.w_avg + 0.5 * (ws[:, :2] - m.w_avg))
    assert_close(t[:, 2:], ws[:, 2:])
    assert_close(m(z, c, truncation_psi=0.0), m.w_avg.expand(6, 5, 16))
    with pytest.raises(ValueError, match=r"c: expected shape \(B, 25\), got \(6, 24\)"):
        m(z, torch.randn(6, 24))


def test_eg3d_backbone_default_shapes():
    """The EG3D FFHQ backbone: 14 ws, planes (B, 3, 32, 256, 256)."""
    torch.manual_seed(0)
    bb = N.TriplaneBackbone()
    assert bb.num_ws == 14
    assert 28e6 < sum(p.numel() for p in bb.parameters()) < 31e6
    with torch.no_grad():
        planes, ws = bb(torch.randn(1, 512), torch.randn(1, 25), noise_mode="none")
    assert planes.shape == (1, 3, 32, 256, 256) and ws.shape == (1, 14, 512)
    assert torch.isfinite(planes).all()


def test_backbone_noise_modes_and_grad():
    torch.manual_seed(0)
    bb = _tiny_backbone()
    z, c = torch.randn(2, 8), torch.randn(2, 25)
    with torch.no_grad():
        for p in bb.parameters():   # noise_strength starts at 0; make noise visible
            if p.ndim == 0:
                p.fill_(0.5)
    a, _ = bb(z, c, noise_mode="const")
    b, _ = bb(z, c, noise_mode="const")
    r, _ = bb(z, c, noise_mode="random")
    assert torch.equal(a, b) and not torch.allclose(a, r)
    assert a.shape == (2, 3, 4, 16, 16)
    a.square().mean().backward()
    no_grad = [n for n, p in bb.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not no_grad, no_grad
    with pytest.raises(ValueError, match="noise_mode: expected one of"):
        bb(z, c, noise_mode="fixed")


@pytest.mark.parametrize("scale, rin, rout", [(2, 64, 128), (4, 128, 256), (8, 128, 512)])
def test_superresolution_sizes(scale, rin, rout):
    sr = N.SuperResolution(scale=scale, channels=4, w_dim=16)
    assert sr.input_resolution == rin and sr.output_resolution == rout
    if scale == 8:  # EG3D's Hybrid8XDC: 256 channels at 256^2, 128 at 512^2 (forward too slow here)
        assert sr.block0.conv1.weight.shape[0] == 256 and sr.block1.conv1.weight.shape[0] == 128
        assert sr.block0.conv0.up == 2 and sr.block1.conv1.resolution == 512
        return
    ws = torch.randn(1, 6, 16)
    with torch.no_grad():
        out = sr(torch.randn(1, 3, 32, 32), torch.randn(1, 4, 32, 32), ws)
    assert out.shape == (1, 3, rout, rout)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_superresolution_noise_drawn_by_the_caller_equals_its_own(dtype):
    """noise_mode="random": draw_noise gives the numbers forward draws itself (same order,
    dtype, shapes), so images with pre-drawn noise equal images drawing their own, bit for bit;
    per-image generators give each image its own noise whatever the batch."""
    sr = N.SuperResolution(scale=2, channels=4, w_dim=16, noise_mode="random",
                           input_resolution=8, block_channels=[8, 4], dtype=dtype)
    for layer in sr.block0.noise_layers() + sr.block1.noise_layers():
        layer.noise_strength.data.fill_(0.5)
    torch.manual_seed(0)
    rgb, x, ws = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 6, 16)
    with torch.no_grad():
        torch.manual_seed(3)
        own = sr(rgb, x, ws)
        torch.manual_seed(3)
        noise = sr.draw_noise(2, x)
        given = sr(rgb, x, ws, noise=noise)
        torch.manual_seed(4)
        other = sr(rgb, x, ws)
    assert len(noise) == 4 and [tuple(n.shape) for n in noise] == [(2, 1, 8, 8)] * 2 + \
        [(2, 1, 16, 16)] * 2
    assert {n.dtype for n in noise} == {torch.bfloat16 if dtype == "bfloat16" else torch.float32}
    assert torch.equal(own, given) and not torch.equal(own, other)
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    pair = sr.draw_noise(2, x, gens)
    alone = sr.draw_noise(1, x, [torch.Generator().manual_seed(8)])
    assert all(torch.equal(a[1:], b) for a, b in zip(pair, alone))
    with pytest.raises(ValueError, match=r"noise: expected 4 tensors \(draw_noise\), got 3"):
        sr(rgb, x, ws, noise=noise[:3])
    with pytest.raises(ValueError, match=r"noise: expected shape \(2, 1, 8, 8\), got "
                                         r"\(1, 1, 8, 8\)"):
        sr(rgb, x, ws, noise=[n[:1] for n in noise])
    with pytest.raises(ValueError, match="generators: expected 2"):
        sr.draw_noise(2, x, gens[:1])
    plain = N.SuperResolution(scale=2, channels=4, w_dim=16, input_resolution=8,
                              block_channels=[8, 4])
    assert plain.draw_noise(2, x) is None
    with pytest.raises(ValueError, match="noise: given, but noise_mode is 'none'"):
        plain(rgb, x, ws, noise=noise)


# ------------------------------------------------------------------------------------------
# discriminators, encoders
# ------------------------------------------------------------------------------------------

def test_patch_discriminator_features_and_spectral_norm():
    torch.manual_seed(0)
    d = N.MultiScalePatchDiscriminator(scales=[1, 0.5], block_expansion=4, max_features=16)
    out = d(torch.randn(2, 3, 128, 128))
    feats, logits = out["1"]
    assert len(feats) == 4 and logits.shape[:2] == (2, 1)
    assert out["0.5"][1].shape[-1] < logits.shape[-1]
    conv = d.discs["1"].blocks[0].conv
    w = conv.weight
    assert torch.linalg.matrix_norm(w.flatten(1), ord=2).item() == pytest.approx(1.0, rel=0.1)
    real = [f.detach() for f in feats]
    assert N.feature_matching_loss(real, feats).item() == 0


def test_segformer_shapes_and_condition():
    torch.manual_seed(0)
    cfg = N.mit_config("b0", depths=[1, 1, 1, 1], cond_dim=6)
    enc = N.MixTransformer(cfg)
    x = torch.randn(2, 3, 64, 64)
    feats = enc(x, torch.zeros(2, 6))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 160, 4, 4),
                                              (2, 256, 2, 2)]
    # zero-initialised ada: conditioning is an identity until trained
    assert_close(enc(x, torch.randn(2, 6))[-1], feats[-1])
    with torch.no_grad():
        enc.block[0][0].layer_norm_1.ada.weight.normal_()
    assert not torch.allclose(enc(x, torch.randn(2, 6))[-1], feats[-1])
    with pytest.raises(ValueError, match="cond: this encoder was built with cond_dim > 0"):
        enc(x)
    for name, d in [("b2", [3, 4, 6, 3]), ("b5", [3, 6, 40, 3])]:
        assert N.mit_config(name).depths == d
    with pytest.raises(ValueError, match="expected one of"):
        N.mit_config("b9")


def test_head_pose_estimator():
    cfg = N.HeadPoseConfig(backbone=N.ResNetConfig(stem_channels=8, widths=[16, 32, 32, 64],
                                                   depths=[1, 1, 1, 1]))
    h = N.HeadPoseExpressionEstimator(cfg)
    out = h(torch.randn(2, 3, 64, 64))
    assert out["yaw"].shape == (2, 66) and out["exp"].shape == (2, 15, 3)
    assert (out["yaw_deg"].abs() <= 99).all()
    uniform = h.angle(torch.zeros(1, 66))
    assert uniform.item() == pytest.approx(66 * 65 / 2 / 66 * 3 - 99)


# ------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------

def test_gan_losses_values():
    r, f = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    assert N.gan_d_loss(r, f, "hinge").item() == pytest.approx(
        (0 + 2) / 2 + (1.5 + 0) / 2)
    assert N.gan_g_loss(f, "hinge").item() == pytest.approx(1.25)
    assert N.gan_d_loss(r, f, "lsgan").item() == pytest.approx((1 + 4) / 2 + (0.25 + 9) / 2)
    assert N.gan_g_loss(f, "logistic").item() == pytest.approx(F.softplus(-f).mean().item())
    with pytest.raises(ValueError, match="kind: expected one of"):
        N.gan_g_loss(f, "wgan")


def test_regularisers():
    mu, logvar = torch.zeros(3, 4), torch.zeros(3, 4)
    assert N.kl_divergence(mu, logvar).item() == 0
    assert N.kl_divergence(mu + 1, logvar).item() == pytest.approx(2.0)
    assert N.tv_loss(torch.ones(1, 3, 4, 4)).item() == 0


def test_kl_divergence_of_an_empty_batch_is_zero_with_a_graph():
    """B = 0: a 0 (not the NaN of an empty mean) that backward goes through, giving empty
    gradients; a non-empty batch is unchanged (the mean over the batch)."""
    mu = torch.zeros(0, 4, requires_grad=True)
    logvar = torch.zeros(0, 4, requires_grad=True)
    kl = N.kl_divergence(mu, logvar)
    assert kl.shape == () and kl.item() == 0 and kl.requires_grad
    (kl * 3 + 1).backward()
    assert mu.grad.shape == logvar.grad.shape == (0, 4)
    assert N.GaussianMLPVAE.kl(torch.zeros(0, 2), torch.zeros(0, 2)).item() == 0
    mu, logvar = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    want = (-0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(-1)).mean()
    assert torch.equal(N.kl_divergence(mu, logvar), want)


def _assert_zero_with_a_graph(loss, *inputs):
    """The loss of an empty batch: the scalar 0 (not NaN), part of the graph of ``inputs``;
    backward runs and gives each input a gradient of its own shape, all zeros."""
    assert loss.shape == () and not torch.isnan(loss) and loss.item() == 0
    assert loss.requires_grad
    (loss * 3 + 1).backward()
    for x in inputs:
        assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()


def _empty(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype, requires_grad=True)


def test_mean_reductions_of_nothing_are_zero_with_a_graph():
    from pyface.nn._reduce import l1_or_zero, mean_or_zero, mse_or_zero

    for reduce in (mean_or_zero, lambda x: l1_or_zero(x, x.detach() + 1),
                   lambda x: mse_or_zero(x, x.detach() + 1)):
        x = _empty(0, 3)
        _assert_zero_with_a_graph(reduce(x), x)
    a, b = torch.randn(4, 5, dtype=D64), torch.randn(4, 5, dtype=D64)
    assert torch.equal(mean_or_zero(a), a.mean())
    assert torch.equal(l1_or_zero(a, b), F.l1_loss(a, b))
    assert torch.equal(mse_or_zero(a, b), F.mse_loss(a, b))


@pytest.mark.parametrize("kind", GAN_LOSSES)
def test_gan_losses_of_an_empty_batch_are_zero_with_a_graph(kind):
    f = _empty(0, 1)
    _assert_zero_with_a_graph(N.gan_g_loss(f, kind), f)
    r, f = _empty(0, 1), _empty(0, 1)
    _assert_zero_with_a_graph(N.gan_d_loss(r, f, kind), r, f)
    # non-empty batches: exactly the means as before; an empty side adds 0 to the other's mean
    r, f = torch.randn(3, 1, 2, dtype=D64), torch.randn(5, 1, 2, dtype=D64)
    old_fake = {"logistic": F.softplus(f).mean(), "hinge": F.relu(1 + f).mean(),
                "lsgan": f.square().mean()}[kind]
    assert torch.equal(N.gan_d_loss(r[:0], f, kind), old_fake)
    old_g = {"logistic": F.softplus(-f).mean(), "hinge": (-f).mean(),
             "lsgan": (f - 1).square().mean()}[kind]
    old_d = {"logistic": F.softplus(-r).mean() + F.softplus(f).mean(),
             "hinge": F.relu(1 - r).mean() + F.relu(1 + f).mean(),
             "lsgan": (r - 1).square().mean() + f.square().mean()}[kind]
    assert torch.equal(N.gan_g_loss(f, kind), old_g)
    assert torch.equal(N.gan_d_loss(r, f, kind), old_d)


def test_feature_matching_and_tv_of_an_empty_batch_are_zero_with_a_graph():
    real = [torch.zeros(0, 4, 8, 8), torch.zeros(0, 8, 4, 4)]
    fake = [_empty(0, 4, 8, 8), _empty(0, 8, 4, 4)]
    _assert_zero_with_a_graph(N.feature_matching_loss(real, fake), *fake)
    x = _empty(0, 3, 8, 8)
    _assert_zero_with_a_graph(N.tv_loss(x), x)
    planes = _empty(0, 3, 4, 8, 8)
    _assert_zero_with_a_graph(N.tv_loss(planes), planes)
    torch.manual_seed(0)
    real = [torch.randn(2, 4, 8, 8, dtype=D64), torch.randn(2, 8, 4, 4, dtype=D64)]
    fake = [torch.randn(2, 4, 8, 8, dtype=D64), torch.randn(2, 8, 4, 4, dtype=D64)]
    old = sum(F.l1_loss(f, r) for r, f in zip(real, fake)) / 2
    assert torch.equal(N.feature_matching_loss(real, fake), old)
    x = torch.randn(2, 3, 3, 6, 5, dtype=D64)
    old = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + \
        (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    assert torch.equal(N.tv_loss(x), old)
    row = torch.randn(2, 3, 1, 5, dtype=D64)       # H = 1: no vertical neighbours, that term is 0
    assert torch.equal(N.tv_loss(row), (row[..., 1:] - row[..., :-1]).abs().mean())


def test_feature_matching_of_no_features_is_a_zero_tensor():
    """Empty lists: a 0-dim tensor zero (not the Python number ``sum([])`` gives) that a total
    loss can add, detach and backward through; non-empty lists are unchanged (above)."""
    loss = N.feature_matching_loss([], [])
    assert isinstance(loss, torch.Tensor) and loss.shape == () and loss.item() == 0
    assert loss.dtype == torch.get_default_dtype() and loss.device.type == "cpu"
    assert loss.detach().item() == 0                  # what MMFA logs
    x = _empty(3)
    total = x.sum() + 2 * loss
    total.backward()
    assert torch.equal(x.grad, torch.ones(3))
    with pytest.raises(ValueError, match="differ in length: 0 vs 1"):
        N.feature_matching_loss([], [torch.zeros(1)])


def test_roi_l1_loss_of_an_empty_batch_is_zero_with_a_graph():
    pred, target = _empty(0, 3, 16, 16), torch.zeros(0, 3, 16, 16)
    boxes = {"mouth": torch.zeros(0, 4), "eye_l": torch.zeros(0, 4)}
    _assert_zero_with_a_graph(N.roi_l1_loss(pred, target, boxes, 8, {"mouth": 2.0}), pred)
    # no boxes at all: an empty result that backward still reaches x through (zero gradient)
    x = torch.randn(2, 3, 9, 11, requires_grad=True)
    out = N.roi_align(x, torch.zeros(0, 5), (3, 4))
    assert out.shape == (0, 3, 3, 4) and out.requires_grad
    out.sum().backward()
    assert x.grad.shape == x.shape and not x.grad.any()
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 16, 16, dtype=D64), torch.randn(2, 3, 16, 16, dtype=D64)
    boxes = {"mouth": torch.tensor([[2.0, 3.0, 12.0, 9.0], [1.0, 1.0, 15.0, 14.0]]),
             "eye_l": torch.tensor([[0.0, 0.0, 6.0, 5.0], [4.0, 2.0, 10.0, 8.0]])}
    rois = {k: torch.cat([torch.arange(2.0)[:, None], b], 1).double() for k, b in boxes.items()}
    old = 2.0 * F.l1_loss(N.roi_align(pred, rois["mouth"], 8), N.roi_align(target, rois["mouth"], 8)) \
        + 1.0 * F.l1_loss(N.roi_align(pred, rois["eye_l"], 8), N.roi_align(target, rois["eye_l"], 8))
    assert torch.equal(N.roi_l1_loss(pred, target, boxes, 8, {"mouth": 2.0}),
                       pred.new_zeros(()) + old)


def test_roi_l1_loss_without_boxes_is_zero_with_a_graph():
    pred, target = _empty(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    _assert_zero_with_a_graph(N.roi_l1_loss(pred, target, {}), pred)
    pred = _empty(2, 3, 16, 16, dtype=D64)
    loss = N.roi_l1_loss(pred, target.double(), {}, weights={"mouth": 2.0})
    assert loss.dtype == D64
    _assert_zero_with_a_graph(loss, pred)
    with pytest.raises(ValueError, match="pred/target: shapes differ"):
        N.roi_l1_loss(pred, target[:1], {})


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_perceptual_loss_of_an_empty_batch_is_zero_with_a_graph(criterion):
    """Random weights (no file needed): the empty batch only goes through the reductions."""
    from pyface.nn.vgg import gram

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PretrainedWeightsWarning)
        p = N.PerceptualLoss(layers=["relu1_1", "relu2_1"], layer_weights=[1.0, 0.5],
                             scales=[1.0, 0.5], style_weight=10.0, criterion=criterion)
    pred = _empty(0, 3, 16, 16)
    _assert_zero_with_a_graph(p(pred, torch.zeros(0, 3, 16, 16)), pred)
    torch.manual_seed(0)
    pred, target = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    dist = F.l1_loss if criterion == "l1" else F.mse_loss
    old = pred.new_zeros(())
    for si, s in enumerate([1.0, 0.5]):
        pp, tt = pred, target
        if s != 1:
            pp = F.interpolate(pred, scale_factor=s, mode="bilinear", align_corners=False,
                               antialias=True)
            tt = F.interpolate(target, scale_factor=s, mode="bilinear", align_corners=False,
                               antialias=True)
        fp, ft = p.vgg(pp), p.vgg(tt)
        for name, w in zip(["relu1_1", "relu2_1"], [1.0, 0.5]):
            old = old + w * dist(fp[name], ft[name])
            if si < 1:
                old = old + 10.0 * F.l1_loss(gram(fp[name]), gram(ft[name]))
    assert torch.equal(p(pred, target), old)


def test_identity_losses_of_an_empty_batch_are_zero_with_a_graph():
    """Both ArcFace losses with random weights (no file needed)."""
    from pyface.nn.arcface18 import ArcFaceIdentityLoss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PretrainedWeightsWarning)
        idl, idl18 = N.IdentityLoss(arch="r18"), ArcFaceIdentityLoss()
    pred = _empty(0, 3, 64, 64)
    _assert_zero_with_a_graph(idl(pred, torch.zeros(0, 3, 64, 64)), pred)
    pred = _empty(0, 3, 64, 64)
    _assert_zero_with_a_graph(idl18(pred, torch.zeros(0, 3, 64, 64), torch.zeros(0, 68, 2)),
                              pred)
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    lm = torch.rand(2, 68, 2) * 30 + 17
    assert torch.equal(idl(a, b), (1 - (idl.embed(a) * idl.embed(b)).sum(1)).mean())
    assert torch.equal(idl18(a, b, lm),
                       (1 - (idl18.embed(a, lm) * idl18.embed(b, lm)).sum(1)).mean())


def test_keypoint_and_contrastive_losses_of_an_empty_batch_are_zero_with_a_graph():
    kp = _empty(0, 5, 3)
    _assert_zero_with_a_graph(N.keypoint_prior_loss(kp), kp)
    t = N.RandomAffineTPS(0.1, 0.02).sample(0)
    kp, kp_w = _empty(0, 5, 3), _empty(0, 5, 3)
    _assert_zero_with_a_graph(N.equivariance_loss(kp, kp_w, t), kp, kp_w)
    q, k = _empty(0, 4, 8), _empty(0, 4, 8)
    _assert_zero_with_a_graph(N.info_nce(q, k, 0.1), q, k)
    assert N.info_nce(q, k, 0.1, reduction="none").shape == (0, 4)
    g = torch.Generator().manual_seed(3)
    kp = torch.rand(3, 5, 3, generator=g, dtype=D64)
    sq = (kp.unsqueeze(2) - kp.unsqueeze(1)).square().sum(-1)
    spread = F.relu(0.1 - sq) * (1 - torch.eye(5, dtype=D64))
    old = (spread.sum((1, 2)) + (kp[..., 2].mean(-1) - 0.33).abs()).mean()
    assert torch.equal(N.keypoint_prior_loss(kp), old)
    t = N.RandomAffineTPS(0.1, 0.02).sample(3, generator=g)
    kp_w = torch.rand(3, 5, 3, generator=g, dtype=D64)
    old = (kp[..., :2] - t.warp_keypoints(kp_w)[..., :2]).abs().mean()
    assert torch.equal(N.equivariance_loss(kp, kp_w, t), old)
    q, k = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    assert torch.equal(N.info_nce(q, k, 0.1), N.info_nce(q, k, 0.1, reduction="none").mean())


def test_density_regularizers_of_an_empty_batch_are_zero_with_a_graph():
    dec = N.OSGDecoder(8, 16, 4)
    planes = _empty(0, 3, 8, 16, 16)
    _assert_zero_with_a_graph(N.density_l1_regularizer(planes, dec, n_points=10,
                                                       plane_axes="eg3d"), planes)
    planes = _empty(0, 3, 8, 16, 16)
    _assert_zero_with_a_graph(N.density_monotonic_regularizer(planes, dec, n_points=10,
                                                              plane_axes="eg3d"), planes)
    torch.manual_seed(0)
    planes = torch.randn(2, 3, 8, 16, 16)
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(2, 10, 3, generator=gen) * 2 - 1
    y = x + torch.randn(x.shape, generator=gen) * 0.004
    s = N.query_density(planes, dec, torch.cat([x, y], 1), plane_axes="eg3d")
    assert torch.equal(N.density_l1_regularizer(planes, dec, n_points=10, plane_axes="eg3d",
                                                generator=torch.Generator().manual_seed(7)),
                       F.l1_loss(s[:, :10], s[:, 10:]))
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(2, 10, 3, generator=gen) * 2 - 1
    y = x + torch.tensor([0.0, 0.0, -1.0]) * (1 / 256)
    s = N.query_density(planes, dec, torch.cat([x, y], 1), plane_axes="eg3d")
    assert torch.equal(N.density_monotonic_regularizer(
        planes, dec, n_points=10, plane_axes="eg3d", generator=torch.Generator().manual_seed(7)),
        torch.relu(s[:, :10].detach() - s[:, 10:]).mean() * 10.0)

def _roi_naive(x, box, oh, ow, sr):
    """Per-sample bilinear (clamped to the border) average over bins, loops."""
    _, x0, y0, x1, y1 = [float(v) for v in box]
    C, H, W = x.shape[1:]
    out = torch.zeros(C, oh, ow, dtype=x.dtype)
    bh, bw = (y1 - y0) / oh, (x1 - x0) / ow
    for i in range(oh):
        for j in range(ow):
            acc = 0
            for a in range(sr):
                for b in range(sr):
                    y = min(max(y0 - 0.5 + (i + (a + 0.5) / sr) * bh, 0), H - 1)
                    xx = min(max(x0 - 0.5 + (j + (b + 0.5) / sr) * bw, 0), W - 1)
                    yl, xl = int(math.floor(y)), int(math.floor(xx))
                    yh, xh = min(yl + 1, H - 1), min(xl + 1, W - 1)
                    ly, lx = y - yl, xx - xl
                    img = x[int(box[0])]
                    acc = acc + img[:, yl, xl] * (1 - ly) * (1 - lx) + img[:, yl, xh] * (1 - ly) * lx \
                        + img[:, yh, xl] * ly * (1 - lx) + img[:, yh, xh] * ly * lx
            out[:, i, j] = acc / sr ** 2
    return out


def test_roi_align_matches_definition_and_grads(one_thread):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 11, dtype=D64, requires_grad=True)
    boxes = torch.tensor([[0, 1.0, 2.0, 7.5, 8.0], [1, 0.0, 0.0, 11.0, 9.0],
                          [1, -2.0, 3.0, 4.0, 12.0]], dtype=D64)
    out = N.roi_align(x, boxes, (3, 4), sampling_ratio=2)
    assert out.shape == (3, 3, 3, 4)
    for k in range(3):
        assert_close(out[k], _roi_naive(x.detach(), boxes[k], 3, 4, 2))
    small = torch.randn(2, 1, 5, 6, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: N.roi_align(x, boxes[:2] / 2, 2, 2), (small,))
    assert N.roi_align(x, boxes[:0], 2).shape == (0, 3, 2, 2)
    with pytest.raises(ValueError, match=r"boxes: expected shape \(K, 5\)"):
        N.roi_align(x, boxes[:, :4], 2)
    with pytest.raises(ValueError, match=r"boxes\[:, 0\]: batch indices must be in \[0, 2\)"):
        N.roi_align(x, torch.tensor([[2, 0, 0, 1, 1.0]], dtype=D64), 2)


def test_roi_align_one_box_per_image_in_order():
    # the RoI losses' case (box k on image k) samples x itself; same values and gradients as
    # the gathered copy the general case uses
    torch.manual_seed(1)
    x = torch.randn(2, 3, 9, 11, dtype=D64, requires_grad=True)
    boxes = torch.tensor([[0, 1.0, 2.0, 7.5, 8.0], [1, -2.0, 3.0, 4.0, 12.0]], dtype=D64)
    out = N.roi_align(x, boxes, (3, 4), sampling_ratio=2)
    for k in range(2):
        assert_close(out[k], _roi_naive(x.detach(), boxes[k], 3, 4, 2))
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    flipped = N.roi_align(x, boxes.flip(0), (3, 4), sampling_ratio=2)   # gathered path
    (gx2,) = torch.autograd.grad(flipped, x, g.flip(0))
    assert_close(gx, gx2)


def test_roi_l1_loss_only_sees_the_boxes():
    pred, target = torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 32)
    pred[..., 0:4, 0:4] = 1.0                                   # outside the mouth box
    boxes = {"mouth": torch.tensor([[8.0, 20.0, 24.0, 28.0]] * 2)}
    assert N.roi_l1_loss(pred, target, boxes).item() == 0
    pred[..., 22:26, 10:20] = 1.0
    assert N.roi_l1_loss(pred, target, boxes, weights={"mouth": 2.0}).item() > 0


def test_perceptual_and_identity_warn_once_without_weights(recwarn):
    from pyface.nn import _pretrained

    _pretrained._warned.discard("PerceptualLoss (VGG19)")
    with pytest.warns(PretrainedWeightsWarning, match="RANDOM initialisation"):
        p = N.PerceptualLoss(layers=["relu1_1", "relu2_1"], scales=[1, 0.5], style_weight=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PretrainedWeightsWarning)
        N.PerceptualLoss(layers=["relu1_1"])                  # second time: silent
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).requires_grad_()
    assert p(x, x).item() == 0
    loss = p(y, x)
    loss.backward()
    assert loss.item() > 0 and y.grad.abs().sum() > 0
    assert all(q.grad is None for q in p.vgg.parameters())   # frozen
    p.train()
    assert not p.vgg.training
    with pytest.raises(ValueError, match="layers: unknown VGG19 layer 'relu6_1'"):
        N.PerceptualLoss(layers=["relu6_1"])
    idl = N.IdentityLoss(arch="r18")
    a = torch.rand(2, 3, 64, 64) * 2 - 1
    assert idl(a, a).item() == pytest.approx(0.0, abs=1e-5)
    assert idl(a, a.flip(-1)).item() > 0


def test_perceptual_scales_argument_replaces_the_pyramid_for_one_call():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PretrainedWeightsWarning)
        torch.manual_seed(0)
        p = N.PerceptualLoss(layers=["relu1_1", "relu2_1"], scales=[1.0, 0.5, 0.25])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    one = p(x, y, scales=[1.0])
    half = p(x, y, scales=[0.5])
    assert one.item() > 0 and half.item() > 0
    torch.testing.assert_close(p(x, y, scales=[1.0, 0.5]), one + half)
    torch.testing.assert_close(p(x, y), p(x, y, scales=[1.0, 0.5, 0.25]))
    assert p(x, y).item() > (one + half).item()        # the configured pyramid is unchanged
    for bad in ([], [0.0], [2.0]):
        with pytest.raises(ValueError, match="scales: expected a non-empty list of factors"):
            p(x, y, scales=bad)


def test_vgg_layer_names_match_torchvision_indices():
    from pyface.nn.vgg import LAYERS

    assert [LAYERS[n] for n in ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")] == \
        [1, 6, 11, 20, 29]
    keys = [k for k in N.VGG19().state_dict() if k.endswith(".weight")]
    assert keys[0] == "features.0.weight" and keys[-1] == "features.34.weight" and len(keys) == 16


def test_iresnet_keys_match_insightface_layout():
    sd = N.IResNet("r18").state_dict()
    for k in ("conv1.weight", "bn1.running_mean", "prelu.weight", "layer1.0.bn1.weight",
              "layer1.0.conv1.weight", "layer1.0.prelu.weight", "layer1.0.downsample.0.weight",
              "layer4.1.bn3.weight", "bn2.weight", "fc.weight", "features.weight"):
        assert k in sd, k
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 3, 112, 112\)"):
        N.IResNet("r18")(torch.randn(1, 3, 64, 64))


def test_r1_double_backward_through_patch_discriminator(one_thread):
    torch.manual_seed(0)
    d = N.MultiScalePatchDiscriminator(scales=[1], block_expansion=4, max_features=8)
    x = torch.randn(2, 3, 128, 128, requires_grad=True)
    _, logits = d(x)["1"]
    pen = N.r1_penalty(logits.flatten(1).mean(1), [x])
    pen.mean().backward()
    g = d.discs["1"].blocks[1].conv.parametrizations.weight.original.grad
    assert g is not None and g.abs().sum() > 0


def test_up_conv_is_transposed_conv_then_filter(one_thread):
    """EG3D's up-sampling conv: transposed conv (stride 2, true convolution) then the FIR filter
    with gain 4; equal, away from the borders, to filtering a zero-upsampled input and
    convolving with the flipped kernel; modulated (grouped) and plain paths agree."""
    from pyface.nn.layers import conv2d_resample

    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 6, 5, dtype=D64), torch.randn(4, 3, 3, 3, dtype=D64)
    f = setup_filter().to(D64)
    ref = upfirdn2d(F.conv_transpose2d(x, w.transpose(0, 1), stride=2), f,
                    padding=[1, 1, 1, 1], gain=4)
    out = conv2d_resample(x, w, f, up=2, padding=1, flip_weight=False)
    assert out.shape == (2, 4, 12, 10)
    assert_close(out, ref)
    interior = F.conv2d(upsample2d(x, f), w.flip([2, 3]), padding=1)
    assert_close(out[..., 2:-2, 2:-2], interior[..., 2:-2, 2:-2])
    s = torch.ones(2, 3, dtype=D64)
    mod = modulated_conv2d(x, w, s, demodulate=False, up=2, padding=1, resample_filter=f,
                           flip_weight=False)
    assert_close(mod, ref)


@pytest.mark.parametrize("act, clamp", [("lrelu", None), ("lrelu", 0.5), ("relu", None)])
def test_bias_act_keeps_only_its_output(act, clamp, one_thread):
    """Fused path: the same values and (double) gradients as PyTorch's composition (the reference
    path), with one activation-sized tensor saved for a bias_act -> conv chain instead of two."""
    from pyface.ops import use_backend

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, b):
        return bias_act(x, b, act=act, clamp=clamp)

    assert torch.autograd.gradcheck(f, (x, b)) and torch.autograd.gradgradcheck(f, (x, b))
    y = f(x, b)
    with use_backend("reference"):
        r = f(x, b)
    torch.testing.assert_close(y, r, rtol=0, atol=0)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, [x, b], g),
                               torch.autograd.grad(r, [x, b], g), rtol=1e-14, atol=1e-14)

    def saved_storages(fn):
        ptrs = set()

        def pack(t):
            if t.numel() >= x.numel():
                ptrs.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            F.conv2d(fn(x, b), w, padding=1).sum()
        return len(ptrs)

    with use_backend("reference"):
        assert saved_storages(f) >= 2          # pre-activation (slope), pre-clamp, output
    assert saved_storages(f) == 1              # output only


def test_blur_equals_the_padded_fir_filter():
    from pyface.nn.resample import blur, setup_filter, upfirdn2d

    x = torch.randn(2, 5, 9, 11)
    for sigma in (0.5, 1.0):
        r = int(3 * sigma + 0.5)
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
        ref = upfirdn2d(x, setup_filter(k / k.sum()), padding=[r, r, r, r])
        torch.testing.assert_close(blur(x, sigma), ref)
    assert blur(x, 0) is x


def test_bad_input_to_shared_blocks_names_the_argument():
    with pytest.raises(ValueError, match=r"x: expected a tensor of shape \(N, C, H, W\), got \(3, 8, 8\)"):
        N.filtered_resize(torch.rand(3, 8, 8), 4)
    with pytest.raises(ValueError, match=r"size: expected a positive integer or \(H, W\) .*got \(0, 0\)"):
        N.filtered_resize(torch.rand(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match=r"real_inputs\[0\]: expected a tensor with requires_grad=True"):
        N.r1_penalty(torch.rand(2, 1), [torch.rand(2, 3)])
    with pytest.raises(ValueError, match=r"logvar: expected the shape of mu \(2, 4\), got \(2, 5\)"):
        N.kl_divergence(torch.rand(2, 4), torch.rand(2, 5))
    m = N.MappingNetwork(z_dim=8, c_dim=25, w_dim=16, num_ws=5)
    with pytest.raises(ValueError, match=r"c: expected shape \(2, 25\) \(B of z\), got \(3, 25\)"):
        m(torch.rand(2, 8), torch.rand(3, 25))
    D = N.DualDiscriminator(img_resolution=16, channel_base=128, channel_max=16, c_dim=25)
    with pytest.raises(ValueError, match=r"image_raw: expected shape \(2, 3, r, r\) \(B and channels of "
                                         r"image \(2, 3, 16, 16\)\), got \(3, 3, 8, 8\)"):
        D(torch.rand(2, 3, 16, 16), torch.rand(3, 3, 8, 8), torch.rand(2, 25))


def test_empty_batches_through_shared_blocks():
    assert N.filtered_resize(torch.rand(0, 3, 8, 8), 4).shape == (0, 3, 4, 4)
    w, x = torch.randn(5, 4, 3, 3), torch.randn(0, 4, 8, 8)
    assert modulated_conv2d(x, w, torch.randn(0, 4), padding=1).shape == (0, 5, 8, 8)
    assert modulated_conv2d(x, w, torch.randn(0, 4), padding=1, up=2,
                            resample_filter=setup_filter([1, 3, 3, 1])).shape == (0, 5, 16, 16)
    sr = N.SuperResolution(scale=2, channels=4, w_dim=16)
    assert sr(torch.rand(0, 3, 64, 64), torch.rand(0, 4, 64, 64),
              torch.rand(0, 14, 16)).shape == (0, 3, 128, 128)
    cfg = N.HeadPoseConfig(backbone=N.ResNetConfig(stem_channels=8, widths=[16, 32, 32, 64],
                                                   depths=[1, 1, 1, 1]))
    out = N.HeadPoseExpressionEstimator(cfg)(torch.randn(0, 3, 64, 64))
    assert out["exp"].shape == (0, 15, 3) and out["yaw_deg"].shape == (0,)
