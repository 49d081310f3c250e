"""GOHA's shared pieces in pyface.nn: GFPGANv1Clean (layout against a transcription of
GFPGANv1.3's published key layout, tiny forward, modulated-conv semantics, converter round trip),
the BiSeNet face parser (layout against a transcription of face-parsing.PyTorch's
79999_iter.pth, tiny forward, converter, expression-region mask) and the 6-channel dual
discriminator."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyface.nn as N
from pyface.checkpoint import CheckpointError
from pyface.convert import ConversionError, convert_gfpgan
from pyface.nn.gfpgan import GFPGANConfig, GFPGANv1Clean, ModulatedConv, load_gfpgan

TINY = dict(out_size=32, narrow=1 / 16, num_style_feat=16, num_mlp=2)


# ------------------------------------------------------------------------------------------
# GFPGANv1Clean
# ------------------------------------------------------------------------------------------

def _gfpgan_v13_layout() -> dict[str, tuple[int, ...]]:
    """GFPGANv1.3 ``params_ema`` keys and shapes, transcribed from GFPGAN's architecture:
    out 512, style width 512, channel multiplier 2, 8 MLP layers, different_w, sft_half.
    Decoder widths 512 at 4..64, 256 at 128, 128 at 256, 64 at 512; the U-Net at half width."""
    dec = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64}
    unet = {r: c // 2 for r, c in dec.items()}
    keys: dict[str, tuple[int, ...]] = {}

    def conv(name, cout, cin, k, bias=True):
        keys[name + ".weight"] = (cout, cin, k, k)
        if bias:
            keys[name + ".bias"] = (cout,)

    def resblock(name, cin, cout):
        conv(name + ".conv1", cin, cin, 3)
        conv(name + ".conv2", cout, cin, 3)
        conv(name + ".skip", cout, cin, 1, bias=False)

    conv("conv_body_first", 32, 3, 1)
    res_down = [512, 256, 128, 64, 32, 16, 8, 4]
    for j in range(7):
        resblock(f"conv_body_down.{j}", unet[res_down[j]], unet[res_down[j + 1]])
    conv("final_conv", 256, 256, 3)
    res_up = [4, 8, 16, 32, 64, 128, 256, 512]
    for j in range(7):
        c = unet[res_up[j + 1]]
        resblock(f"conv_body_up.{j}", unet[res_up[j]], c)
        for side in ("scale", "shift"):
            conv(f"condition_{side}.{j}.0", c, c, 3)
            conv(f"condition_{side}.{j}.2", c, c, 3)          # sft_half: c, not 2c
        conv(f"toRGB.{j}", 3, c, 1)
    keys["final_linear.weight"] = (16 * 512, 256 * 16)          # 16 styles of 512
    keys["final_linear.bias"] = (16 * 512,)
    d = "stylegan_decoder."
    for j in range(1, 16, 2):
        keys[f"{d}style_mlp.{j}.weight"] = (512, 512)
        keys[f"{d}style_mlp.{j}.bias"] = (512,)
    keys[d + "constant_input.weight"] = (1, 512, 4, 4)

    def styleconv(name, cin, cout):
        keys[name + ".modulated_conv.weight"] = (1, cout, cin, 3, 3)
        keys[name + ".modulated_conv.modulation.weight"] = (cin, 512)
        keys[name + ".modulated_conv.modulation.bias"] = (cin,)
        keys[name + ".weight"] = (1,)
        keys[name + ".bias"] = (1, cout, 1, 1)

    def torgb(name, cin):
        keys[name + ".modulated_conv.weight"] = (1, 3, cin, 1, 1)
        keys[name + ".modulated_conv.modulation.weight"] = (cin, 512)
        keys[name + ".modulated_conv.modulation.bias"] = (cin,)
        keys[name + ".bias"] = (1, 3, 1, 1)

    styleconv(d + "style_conv1", 512, 512)
    torgb(d + "to_rgb1", 512)
    for j in range(7):
        cin, cout = dec[res_up[j]], dec[res_up[j + 1]]
        styleconv(f"{d}style_convs.{2 * j}", cin, cout)
        styleconv(f"{d}style_convs.{2 * j + 1}", cout, cout)
        torgb(f"{d}to_rgbs.{j}", cout)
    for k in range(15):
        r = [4, 8, 8, 16, 16, 32, 32, 64, 64, 128, 128, 256, 256, 512, 512][k]
        keys[f"{d}noises.noise{k}"] = (1, 1, r, r)
    return keys


def test_gfpgan_v13_key_layout():
    with torch.device("meta"):
        model = GFPGANv1Clean()                     # the defaults are GFPGANv1.3's
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = _gfpgan_v13_layout()
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    assert len(got) == 285


def test_gfpgan_tiny_forward_and_backward():
    torch.manual_seed(0)
    model = GFPGANv1Clean(**TINY)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y, rgbs = model(x, randomize_noise=False, return_rgbs=True)
    assert y.shape == (2, 3, 32, 32) and torch.isfinite(y).all()
    assert [tuple(r.shape) for r in rgbs] == [(2, 3, 8, 8), (2, 3, 16, 16), (2, 3, 32, 32)]
    assert torch.equal(y, model(x, randomize_noise=False))           # stored noise: repeatable
    # the output depends on each sample's own input only (grouped modulated convs)
    y1 = model(x[1:], randomize_noise=False)
    torch.testing.assert_close(y1, y[1:], atol=1e-5, rtol=1e-5)
    # noise strengths are zero at init; once set, fresh noise changes the output
    for m in model.modules():
        if isinstance(m, N.gfpgan.StyleConv):
            m.weight.data.fill_(0.5)
    assert not torch.allclose(model(x), model(x))
    y.square().mean().backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    # input_is_latent (GFPGANv1.3) skips the style MLP; toRGB are the auxiliary outputs
    assert unused == {n for n, _ in model.named_parameters()
                      if n.startswith(("stylegan_decoder.style_mlp.", "toRGB."))}
    with pytest.raises(ValueError,
                       match=r"x: expected shape \(B, 3, 32, 32\), got \(2, 3, 64, 64\)"):
        model(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="out_size: expected a power of two >= 8, got 48"):
        GFPGANConfig(out_size=48)


def test_gfpgan_noise_argument_and_drawn_noise():
    """forward(noise=[...]) runs the decoder with the given maps: the stored maps passed in equal
    randomize_noise=False; draw_noise gives maps of the stored maps' sides, per item from its
    own generator (independent of the batching) or from torch's; wrong maps are refused."""
    torch.manual_seed(0)
    model = GFPGANv1Clean(**TINY).eval()
    for m in model.modules():                       # noise strengths are zero at init
        if isinstance(m, N.gfpgan.StyleConv):
            m.weight.data.fill_(0.5)
    dec = model.stylegan_decoder
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    stored = [getattr(dec.noises, f"noise{k}") for k in range(dec.num_layers)]
    assert dec.num_layers == 7
    assert dec.noise_shapes(2) == [(2, 1, r, r) for r in (4, 8, 8, 16, 16, 32, 32)]
    assert [tuple(t.shape[1:]) for t in stored] == [s[1:] for s in dec.noise_shapes()]
    with torch.no_grad():
        torch.testing.assert_close(model(x, noise=stored), model(x, randomize_noise=False),
                                   rtol=0, atol=0)
        # GFPGAN's randomize_noise draws (B, 1, r, r) in each injection from torch's generator,
        # in layer order: draw_noise without generators draws the same numbers
        torch.manual_seed(5)
        want = model(x, randomize_noise=True)
        torch.manual_seed(5)
        drawn = dec.draw_noise(2)
        assert [tuple(t.shape) for t in drawn] == dec.noise_shapes(2)
        torch.testing.assert_close(model(x, noise=drawn), want, rtol=0, atol=0)
        assert not torch.allclose(model(x, noise=dec.draw_noise(2)), want)
        # per-item generators: the same seeds give the same maps, batched or not
        def gens(*seeds):
            return [torch.Generator().manual_seed(s) for s in seeds]
        a = dec.draw_noise(2, generators=gens(1, 2))
        b = dec.draw_noise(2, generators=gens(1, 2))
        one = dec.draw_noise(1, generators=gens(2))
        for k in range(dec.num_layers):
            assert torch.equal(a[k], b[k]) and torch.equal(a[k][1:], one[k])
            assert not torch.equal(a[k][0], a[k][1])
        ya = model(x, noise=a)
        assert torch.equal(ya, model(x, noise=b))
        assert not torch.allclose(ya, model(x, noise=dec.draw_noise(2, generators=gens(3, 4))))
    with pytest.raises(ValueError, match=r"generators: expected one per item \(2\), got 1"):
        dec.draw_noise(2, generators=gens(1))
    with pytest.raises(ValueError, match="batch: expected an int >= 1, got 0"):
        dec.draw_noise(0)
    with pytest.raises(ValueError, match=r"noise: expected a list of 7 maps .*got 6"):
        model(x, noise=stored[:6])
    bad = list(stored)
    bad[3] = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"noise\[3\]: expected shape \(2 or 1, 1, 16, 16\), "
                                         r"got \(2, 1, 8, 8\)"):
        model(x, noise=bad)


def test_gfpgan_style_mlp_when_not_latent():
    torch.manual_seed(0)
    model = GFPGANv1Clean(**TINY, input_is_latent=False, different_w=False)
    assert model.final_linear.out_features == 16
    model(torch.zeros(1, 3, 32, 32)).sum().backward()
    assert model.stylegan_decoder.style_mlp[1].weight.grad is not None


def _modconv_reference(x, weight, style_lin, style, demod, up):
    """Per-sample direct definition: scale the kernel's input channels by the style, normalise
    each output filter, (bilinearly up-sample), convolve."""
    outs = []
    for b in range(x.shape[0]):
        s = style_lin(style[b:b + 1])[0]                           # (Cin,)
        w = weight[0] * s[None, :, None, None]                     # (O, Cin, k, k)
        if demod:
            w = w / torch.sqrt((w ** 2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        xb = x[b:b + 1]
        if up:
            xb = F.interpolate(xb, scale_factor=2, mode="bilinear", align_corners=False)
        outs.append(F.conv2d(xb, w, padding=w.shape[-1] // 2))
    return torch.cat(outs)


@pytest.mark.parametrize("demod,up,k", [(True, False, 3), (True, True, 3), (False, False, 1)])
def test_modulated_conv_matches_direct_definition(demod, up, k):
    torch.manual_seed(1)
    m = ModulatedConv(5, 4, k, 6, demodulate=demod, upsample=up).double()
    x, s = torch.randn(3, 5, 6, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    ref = _modconv_reference(x, m.weight, m.modulation, s, demod, up)
    torch.testing.assert_close(m(x, s), ref, atol=1e-12, rtol=1e-10)


def test_gfpgan_sft_half_modulates_the_second_half():
    """Identity conditions (scale 1, shift 0) give the same image with and without sft_half
    (same weights), and a condition on the second half changes the image."""
    torch.manual_seed(2)
    half = GFPGANv1Clean(**TINY, sft_half=True).double()
    full = GFPGANv1Clean(**TINY, sft_half=False).double()
    dec_h, dec_f = half.stylegan_decoder, full.stylegan_decoder
    dec_f.load_state_dict(dec_h.state_dict())
    styles = torch.randn(2, half.cfg.num_latent, 16, dtype=torch.float64)
    chans = [half.cfg.decoder_channels(r) for r in (8, 16, 32)]
    res = (8, 16, 32)

    def conds(c_of, fill):
        out = []
        for c, r in zip(chans, res):
            out += [torch.full((2, c_of(c), r, r), fill[0], dtype=torch.float64),
                    torch.full((2, c_of(c), r, r), fill[1], dtype=torch.float64)]
        return out

    ident_h = dec_h(styles, conds(lambda c: c // 2, (1.0, 0.0)), randomize_noise=False)
    ident_f = dec_f(styles, conds(lambda c: c, (1.0, 0.0)), randomize_noise=False)
    torch.testing.assert_close(ident_h, ident_f, atol=1e-12, rtol=1e-10)
    # full-width conditions equal to identity on the first half and (2, 0.5) on the second
    # reproduce sft_half with (2, 0.5)
    shifted_h = dec_h(styles, conds(lambda c: c // 2, (2.0, 0.5)), randomize_noise=False)
    cf = []
    for c, r in zip(chans, res):
        sc = torch.ones(2, c, r, r, dtype=torch.float64)
        sh = torch.zeros(2, c, r, r, dtype=torch.float64)
        sc[:, c // 2:], sh[:, c // 2:] = 2.0, 0.5
        cf += [sc, sh]
    torch.testing.assert_close(shifted_h, dec_f(styles, cf, randomize_noise=False),
                               atol=1e-12, rtol=1e-10)
    assert (shifted_h - ident_h).abs().max() > 1e-3
    with pytest.raises(ValueError, match="conditions: expected 6 maps"):
        dec_h(styles, [], randomize_noise=False)
    with pytest.raises(ValueError, match=r"conditions\[0\] \(scale at 8x8\): expected shape "
                                         r"\(B, 16, 8, 8\), got \(2, 32, 8, 8\)"):
        dec_h(styles, conds(lambda c: c, (1.0, 0.0)), randomize_noise=False)


def _gfpgan_reference(sd, x, cfg, noises):
    """Functional transcription of GFPGANv1Clean's documented forward, read from the state
    dict (GFPGAN key names); ``noises[i]`` is the noise of decoder layer i."""
    lrelu = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
    resize = lambda t, f: F.interpolate(t, scale_factor=f, mode="bilinear",  # noqa: E731
                                        align_corners=False)

    def conv(t, n, pad=0):
        return F.conv2d(t, sd[n + ".weight"], sd.get(n + ".bias"), padding=pad)

    def res(t, n, f):
        h = lrelu(conv(resize(lrelu(conv(t, n + ".conv1", 1)), f), n + ".conv2", 1))
        return h + F.conv2d(resize(t, f), sd[n + ".skip.weight"])

    def modconv(t, n, style, demod, up):
        outs = []
        for b in range(t.shape[0]):
            s = F.linear(style[b], sd[n + ".modulation.weight"], sd[n + ".modulation.bias"])
            w = sd[n + ".weight"][0] * s[None, :, None, None]
            if demod:
                w = w / torch.sqrt((w ** 2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
            tb = resize(t[b:b + 1], 2) if up else t[b:b + 1]
            outs.append(F.conv2d(tb, w, padding=w.shape[-1] // 2))
        return torch.cat(outs)

    def styleconv(t, n, style, noise, up=False):
        h = modconv(t, n + ".modulated_conv", style, True, up) * 2 ** 0.5
        return lrelu(h + sd[n + ".weight"] * noise + sd[n + ".bias"])

    def torgb(t, n, style, skip):
        h = modconv(t, n + ".modulated_conv", style, False, False) + sd[n + ".bias"]
        return h if skip is None else h + resize(skip, 2)

    L = int(torch.log2(torch.tensor(float(cfg.out_size))))
    feat = lrelu(conv(x, "conv_body_first"))
    skips = []
    for j in range(L - 2):
        feat = res(feat, f"conv_body_down.{j}", 0.5)
        skips.append(feat)
    feat = lrelu(conv(feat, "final_conv", 1))
    w = F.linear(feat.flatten(1), sd["final_linear.weight"], sd["final_linear.bias"])
    w = w.view(x.shape[0], 2 * L - 2, -1)
    conds = []
    for j in range(L - 2):
        feat = res(feat + skips[L - 3 - j], f"conv_body_up.{j}", 2)
        for side in ("scale", "shift"):
            n = f"condition_{side}.{j}"
            conds.append(conv(lrelu(conv(feat, n + ".0", 1)), n + ".2", 1))
    d = "stylegan_decoder."
    h = sd[d + "constant_input.weight"].expand(x.shape[0], -1, -1, -1)
    h = styleconv(h, d + "style_conv1", w[:, 0], noises[0])
    img = torgb(h, d + "to_rgb1", w[:, 1], None)
    for j in range(L - 2):
        i = 2 * j + 1
        h = styleconv(h, f"{d}style_convs.{2 * j}", w[:, i], noises[i], up=True)
        c = h.shape[1] // 2
        h = torch.cat([h[:, :c], h[:, c:] * conds[2 * j] + conds[2 * j + 1]], 1)   # sft_half
        h = styleconv(h, f"{d}style_convs.{2 * j + 1}", w[:, i + 1], noises[i + 1])
        img = torgb(h, f"{d}to_rgbs.{j}", w[:, i + 2], img)
    return img


def test_gfpgan_forward_matches_reference():
    torch.manual_seed(11)
    model = GFPGANv1Clean(**TINY).double()
    for m in model.modules():                       # non-zero noise strengths and biases
        if isinstance(m, N.gfpgan.StyleConv):
            m.weight.data.uniform_(0.1, 0.5)
            m.bias.data.normal_(0, 0.1)
    sd = model.state_dict()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    noises = [sd[f"stylegan_decoder.noises.noise{i}"] for i in range(7)]
    torch.testing.assert_close(model(x, randomize_noise=False),
                               _gfpgan_reference(sd, x, model.cfg, noises),
                               atol=1e-10, rtol=1e-8)


def test_gfpgan_converter_output_loads_strictly(tmp_path):
    torch.manual_seed(3)
    src = GFPGANv1Clean(**TINY)
    other = {k: torch.zeros_like(v) for k, v in src.state_dict().items()}
    torch.save({"params_ema": src.state_dict(), "params": other}, tmp_path / "GFPGANv1.3.pth")
    out = convert_gfpgan(str(tmp_path / "GFPGANv1.3.pth"), str(tmp_path / "gfpgan"))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    want = src(x, randomize_noise=False)
    for path in (out, str(tmp_path / "GFPGANv1.3.pth")):           # folder, or the .pth itself
        model = load_gfpgan(path)
        assert model.cfg == src.cfg
        assert torch.equal(model(x, randomize_noise=False), want)  # params_ema, not params
    # strict: a module of another shape refuses the weights, naming the key
    with pytest.raises(CheckpointError,
                       match="missing keys: .*stylegan_decoder.style_mlp.5.weight"):
        from pyface.checkpoint import load_module_state, load_weights
        state, _ = load_weights(out, kind="gfpgan")
        load_module_state(GFPGANv1Clean(**{**TINY, "num_mlp": 3}), state, "test")
    bad = dict(src.state_dict())
    bad["final_linear.weight"] = bad["final_linear.weight"][:-1]
    torch.save({"params_ema": bad}, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match="final_linear"):
        convert_gfpgan(str(tmp_path / "bad.pth"), str(tmp_path / "bad"))


# ------------------------------------------------------------------------------------------
# Face parser (BiSeNet, face-parsing.PyTorch layout)
# ------------------------------------------------------------------------------------------

def _bisenet_79999_layout() -> dict[str, tuple[int, ...]]:
    """face-parsing.PyTorch ``79999_iter.pth`` keys and shapes, transcribed from its
    architecture: ResNet-18 context path (``cp.resnet``), attention refinement on the 1/16 (256
    ch) and 1/32 (512 ch) features to 128, 128-ch heads, a 1x1 global-average conv, feature
    fusion 256 -> 256 (gate 256 -> 64 -> 256), output heads 256 -> 256 -> 19 and two auxiliary
    128 -> 64 -> 19. BatchNorms carry weight, bias, running stats and num_batches_tracked."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.{p}"] = (c,)
        keys[f"{name}.num_batches_tracked"] = ()

    def cbr(name, cout, cin, k):
        keys[f"{name}.conv.weight"] = (cout, cin, k, k)
        bn(f"{name}.bn", cout)

    r = "cp.resnet"
    keys[f"{r}.conv1.weight"] = (64, 3, 7, 7)
    bn(f"{r}.bn1", 64)
    for i, (cin, cout) in enumerate([(64, 64), (64, 128), (128, 256), (256, 512)], start=1):
        for b in range(2):
            name, ci = f"{r}.layer{i}.{b}", cin if b == 0 else cout
            keys[f"{name}.conv1.weight"] = (cout, ci, 3, 3)
            bn(f"{name}.bn1", cout)
            keys[f"{name}.conv2.weight"] = (cout, cout, 3, 3)
            bn(f"{name}.bn2", cout)
            if b == 0 and i > 1:
                keys[f"{name}.downsample.0.weight"] = (cout, cin, 1, 1)
                bn(f"{name}.downsample.1", cout)
    for name, cin in (("cp.arm16", 256), ("cp.arm32", 512)):
        cbr(f"{name}.conv", 128, cin, 3)
        keys[f"{name}.conv_atten.weight"] = (128, 128, 1, 1)
        bn(f"{name}.bn_atten", 128)
    cbr("cp.conv_head32", 128, 128, 3)
    cbr("cp.conv_head16", 128, 128, 3)
    cbr("cp.conv_avg", 128, 512, 1)
    cbr("ffm.convblk", 256, 256, 1)
    keys["ffm.conv1.weight"] = (64, 256, 1, 1)
    keys["ffm.conv2.weight"] = (256, 64, 1, 1)
    for name, cin, mid in (("conv_out", 256, 256), ("conv_out16", 128, 64),
                           ("conv_out32", 128, 64)):
        cbr(f"{name}.conv", mid, cin, 3)
        keys[f"{name}.conv_out.weight"] = (19, mid, 1, 1)
    return keys


def test_face_parser_key_layout():
    got = {k: tuple(v.shape) for k, v in N.FaceParser().state_dict().items()}
    want = _bisenet_79999_layout()
    assert sorted(set(want) ^ set(got)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}


def _bisenet_reference(sd, x):
    """Functional transcription of the documented BiSeNet forward (eval-mode BatchNorm), read
    straight from the state dict; x already ImageNet-normalised."""
    def bn(t, n):
        return F.batch_norm(t, sd[n + ".running_mean"], sd[n + ".running_var"], sd[n + ".weight"],
                            sd[n + ".bias"], False, 0.0, 1e-5)

    def cbr(t, n, pad):
        return F.relu(bn(F.conv2d(t, sd[n + ".conv.weight"], padding=pad), n + ".bn"))

    def block(t, n, stride):
        h = F.relu(bn(F.conv2d(t, sd[n + ".conv1.weight"], stride=stride, padding=1), n + ".bn1"))
        h = bn(F.conv2d(h, sd[n + ".conv2.weight"], padding=1), n + ".bn2")
        if n + ".downsample.0.weight" in sd:
            t = bn(F.conv2d(t, sd[n + ".downsample.0.weight"], stride=stride), n + ".downsample.1")
        return F.relu(t + h)

    r = "cp.resnet"
    t = F.relu(bn(F.conv2d(x, sd[r + ".conv1.weight"], stride=2, padding=3), r + ".bn1"))
    t = F.max_pool2d(t, 3, 2, 1)
    feats = []
    for i in range(1, 5):
        t = block(block(t, f"{r}.layer{i}.0", 1 if i == 1 else 2), f"{r}.layer{i}.1", 1)
        feats.append(t)
    f8, f16, f32 = feats[1:]

    def arm(t, n):
        f = cbr(t, n + ".conv", 1)
        g = F.adaptive_avg_pool2d(f, 1)
        return f * torch.sigmoid(bn(F.conv2d(g, sd[n + ".conv_atten.weight"]), n + ".bn_atten"))

    avg = cbr(F.adaptive_avg_pool2d(f32, 1), "cp.conv_avg", 0)
    s32 = arm(f32, "cp.arm32") + F.interpolate(avg, size=f32.shape[-2:], mode="nearest")
    up32 = cbr(F.interpolate(s32, size=f16.shape[-2:], mode="nearest"), "cp.conv_head32", 1)
    s16 = arm(f16, "cp.arm16") + up32
    up16 = cbr(F.interpolate(s16, size=f8.shape[-2:], mode="nearest"), "cp.conv_head16", 1)
    fused = cbr(torch.cat([f8, up16], 1), "ffm.convblk", 0)
    g = F.adaptive_avg_pool2d(fused, 1)
    g = torch.sigmoid(F.conv2d(F.relu(F.conv2d(g, sd["ffm.conv1.weight"])), sd["ffm.conv2.weight"]))
    fused = fused * g + fused

    def head(t, n):
        return F.conv2d(cbr(t, n + ".conv", 1), sd[n + ".conv_out.weight"])

    up = lambda t: F.interpolate(t, size=x.shape[-2:], mode="bilinear", align_corners=True)  # noqa
    return up(head(fused, "conv_out")), up(head(up16, "conv_out16")), up(head(up32, "conv_out32"))


def _randomise_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def test_face_parser_forward_matches_reference():
    torch.manual_seed(4)
    model = _randomise_bn(N.FaceParser(), 5).double().eval()
    x = torch.rand(2, 3, 64, 48, dtype=torch.float64) * 2 - 1
    out = model(x, aux=True)
    assert [tuple(o.shape) for o in out] == [(2, 19, 64, 48)] * 3
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    ref = _bisenet_reference(model.state_dict(), ((x + 1) / 2 - mean) / std)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(model(x), out[0])
    small = N.FaceParser(size=64).eval()
    small.load_state_dict(model.float().state_dict())
    x64 = torch.cat([x, x[..., :16]], dim=-1).float()        # (2, 3, 64, 64): parsed as is
    assert torch.equal(small.parse(x64), small(x64).argmax(1))
    labels = small.parse(x64[:, :, :48, :40])                 # resized to cfg.size and back
    assert labels.shape == (2, 48, 40) and labels.dtype == torch.int64
    assert 0 <= int(labels.min()) and int(labels.max()) < 19
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 3, H, W\) with H, W >= 32, "
                                         r"got \(1, 3, 16, 16\)"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.float64))


def test_face_parser_converter_and_safe_loading(tmp_path, capsys):
    from pyface.cli import main
    from pyface.convert import convert_face_parser

    torch.manual_seed(6)
    src = _randomise_bn(N.FaceParser(), 7).eval()
    # as released: bare state dict; here with DataParallel prefixes and no BN counters
    raw = {"module." + k: v for k, v in src.state_dict().items()
           if not k.endswith("num_batches_tracked")}
    torch.save(raw, tmp_path / "79999_iter.pth")
    assert main(["convert", "face-parser", str(tmp_path / "79999_iter.pth"),
                 str(tmp_path / "parser")]) == 0
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    want = src(x)
    for path in (str(tmp_path / "parser"), str(tmp_path / "79999_iter.pth")):
        model = N.load_face_parser(path)
        assert not model.training
        torch.testing.assert_close(model(x), want, atol=0, rtol=0)
    bad = dict(raw)
    bad["module.ffm.conv1.weight"] = torch.zeros(32, 256, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match=r"ffm.conv1.weight: checkpoint \(32, 256, 1, 1\) vs "
                                              r"model \(64, 256, 1, 1\)"):
        convert_face_parser(str(tmp_path / "bad.pth"), str(tmp_path / "bad"))
    capsys.readouterr()
    assert main(["convert", "face-parser", str(tmp_path / "bad.pth"), str(tmp_path / "b2")]) == 1
    assert "ffm.conv1.weight" in capsys.readouterr().err

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"conv_out.conv_out.weight": torch.zeros(19, 256, 1, 1), "x": Payload()},
               tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert_face_parser(str(tmp_path / "evil.pth"), str(tmp_path / "evil"))
    assert not (tmp_path / "pwned").exists()


def test_expression_region_mask():
    labels = torch.ones(1, 40, 40, dtype=torch.long)                    # skin
    labels[0, 5, 5] = 2                                                 # l_brow
    labels[0, 20, 20] = 4                                               # l_eye (one pixel)
    labels[0, 30, 10:14] = 12                                           # u_lip
    labels[0, 31, 10:14] = 13                                           # l_lip
    labels[0, 32, 11:13] = 11                                           # mouth
    labels[0, 35, 35] = 10                                              # nose: not masked
    labels[0, 2, 30] = 6                                                # glasses: not masked
    m = N.expression_region_mask(labels)
    assert m.shape == (1, 1, 40, 40) and m.dtype == torch.float32
    eye = m[0, 0, 12:29, 12:29]
    # twice 7x7 -> a 13x13 square around the eye (rows / columns 14 .. 26)
    assert eye[2:15, 2:15].eq(1).all() and eye.sum() == 13 * 13
    assert m[0, 0, 5, 5] == 1 and m[0, 0, 5, 4] == 0 and m[0, 0, 4, 5] == 0   # brows: not dilated
    assert m[0, 0, 30:32, 10:14].eq(1).all() and m[0, 0, 32, 11:13].eq(1).all()
    assert m[0, 0, 35, 35] == 0 and m[0, 0, 2, 30] == 0
    assert m.sum() == 13 * 13 + 1 + 8 + 2
    assert N.expression_region_mask(labels[:, None], dilate_eyes=0).sum() == 1 + 1 + 8 + 2
    assert N.expression_region_mask(labels, dilate_eyes=1, kernel=3).sum() == 9 + 1 + 8 + 2
    with pytest.raises(ValueError, match="parsing: expected integer labels"):
        N.expression_region_mask(labels.float())


# ------------------------------------------------------------------------------------------
# GFPGAN / BasicSR StyleGAN2 discriminator (GOHA's s1_gan D and 6-channel dual D)
# ------------------------------------------------------------------------------------------

def _gfpgan_net_d_layout(in_channels=3) -> dict[str, tuple[int, ...]]:
    """GFPGANv1_net_d keys and shapes, transcribed from BasicSR's StyleGAN2 discriminator at
    out 512, channel multiplier 1: widths 32 (512), 64, 128, 256 (64), 512 (32 .. 4); ConvLayer
    = [blur,] equalised conv weight, fused-LeakyReLU bias; minibatch std adds one channel."""
    ch = {512: 32, 256: 64, 128: 128, 64: 256, 32: 512, 16: 512, 8: 512, 4: 512}
    keys = {"conv_body.0.0.weight": (32, in_channels, 1, 1), "conv_body.0.1.bias": (32,)}
    for j, r in enumerate([512, 256, 128, 64, 32, 16, 8], start=1):
        cin, cout = ch[r], ch[r // 2]
        keys[f"conv_body.{j}.conv1.0.weight"] = (cin, cin, 3, 3)
        keys[f"conv_body.{j}.conv1.1.bias"] = (cin,)
        keys[f"conv_body.{j}.conv2.1.weight"] = (cout, cin, 3, 3)
        keys[f"conv_body.{j}.conv2.2.bias"] = (cout,)
        keys[f"conv_body.{j}.skip.1.weight"] = (cout, cin, 1, 1)
    keys.update({"final_conv.0.weight": (512, 513, 3, 3), "final_conv.1.bias": (512,),
                 "final_linear.0.weight": (512, 512 * 16), "final_linear.0.bias": (512,),
                 "final_linear.1.weight": (1, 512), "final_linear.1.bias": (1,)})
    return keys


@pytest.mark.parametrize("in_channels", [3, 6])
def test_gfpgan_discriminator_key_layout(in_channels):
    with torch.device("meta"):
        d = N.GFPGANDiscriminator(in_channels=in_channels)
    got = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    assert got == _gfpgan_net_d_layout(in_channels)


def test_gfpgan_discriminator_minibatch_std_groups():
    torch.manual_seed(8)
    d = N.GFPGANDiscriminator(out_size=16, narrow=1 / 32).double()
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    y = d(x)
    assert y.shape == (8, 1)
    x2 = x.clone()
    x2[1] += 1.0
    changed = (d(x2) - y).abs()[:, 0] > 1e-12
    # group size 4 over a batch of 8: sample n shares its std feature with n + 2, n + 4, n + 6
    assert changed.tolist() == [False, True] * 4
    with pytest.raises(ValueError, match=r"must be a multiple of the minibatch-std group \(4\)"):
        d(x[:6])
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 3, 16, 16\)"):
        d(x[:, :2])


def test_gfpgan_discriminator_blur_downsample_keeps_constants():
    """[1, 3, 3, 1] blur + stride-2 conv: on a constant image the interior equals the plain
    convolution of that constant (unit DC gain), and the output halves the size."""
    from pyface.nn.gfpgan import _EqualConv
    conv = _EqualConv(2, 3, 3, down=True, act=False).double()
    x = torch.full((1, 2, 16, 16), 0.7, dtype=torch.float64)
    out = conv(x)
    assert out.shape == (1, 3, 8, 8)
    want = (conv._modules["1"].weight * conv.scale).sum(dim=(1, 2, 3)) * 0.7
    torch.testing.assert_close(out[0, :, 2:-2, 2:-2],
                               want.view(3, 1, 1).expand(3, 4, 4), atol=1e-12, rtol=0)


def test_gfpgan_discriminator_dual_loading(tmp_path):
    torch.manual_seed(9)
    src = N.GFPGANDiscriminator(out_size=32, narrow=1 / 16).eval()
    torch.save({"params": src.state_dict()}, tmp_path / "net_d.pth")
    same = N.load_gfpgan_discriminator(str(tmp_path / "net_d.pth"))
    assert same.cfg == src.cfg
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(same(x), src(x))
    dual = N.load_gfpgan_discriminator(str(tmp_path / "net_d.pth"), in_channels=6)
    assert dual.conv_body[0]._modules["0"].weight.shape == (32, 6, 1, 1)   # fresh 6-ch stem
    s_src, s_dual = src.state_dict(), dual.state_dict()
    assert all(torch.equal(s_src[k], v) for k, v in s_dual.items()
               if k != "conv_body.0.0.weight")
    img, raw = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 14, 14)
    up = F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=True)
    torch.testing.assert_close(dual.dual(img, raw), dual(torch.cat([img, up], 1)))
    with pytest.raises(ValueError, match="dual: needs in_channels 6"):
        same.dual(img, raw)
    torch.save({"params": {"x": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="not a GFPGAN / BasicSR StyleGAN2 discriminator"):
        N.load_gfpgan_discriminator(str(tmp_path / "bad.pth"))
    # pyface convert gfpgan-d: a folder that loads the same way
    from pyface.cli import main
    from pyface.convert import convert_gfpgan_discriminator

    assert main(["convert", "gfpgan-d", str(tmp_path / "net_d.pth"), str(tmp_path / "d")]) == 0
    folder = N.load_gfpgan_discriminator(str(tmp_path / "d"))
    assert folder.cfg == src.cfg and torch.equal(folder(x), src(x))
    assert N.load_gfpgan_discriminator(str(tmp_path / "d"), in_channels=6).cfg == dual.cfg
    broken = dict(src.state_dict())
    broken["final_linear.0.weight"] = broken["final_linear.0.weight"][:, :-1]
    torch.save({"params": broken}, tmp_path / "broken.pth")
    with pytest.raises(ConversionError, match=r"final_linear.0.weight: checkpoint \(32, 511\)"):
        convert_gfpgan_discriminator(str(tmp_path / "broken.pth"), str(tmp_path / "d2"))
    big = N.GFPGANDiscriminator(out_size=128, narrow=1 / 16, channel_multiplier=2)
    torch.save(big.state_dict(), tmp_path / "big.pth")
    assert N.load_gfpgan_discriminator(str(tmp_path / "big.pth")).cfg == big.cfg


def test_gfpgan_discriminator_r1_double_backward():
    """R1 on the dual D trains it (double backward through blur, stride-2 convs and the
    minibatch std), and matches a finite difference of the penalty's direction."""
    torch.manual_seed(10)
    d = N.GFPGANDiscriminator(out_size=16, narrow=1 / 32, in_channels=6).double()
    img = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    raw = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    pen = N.r1_penalty(d.dual(img, raw), [img])
    assert pen.shape == (2,) and (pen > 0).all()
    pen.sum().backward()
    # every weight is trained by R1 (a bias right before a piecewise-linear activation or the
    # output only moves the activation's kinks, so its R1 gradient is zero or None)
    for n, p in d.named_parameters():
        if n.endswith("weight"):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, n
    # directional finite difference on the final linear's weight
    w = d.final_linear[1].weight
    v = torch.randn_like(w)

    def penalty():
        x = img.detach().requires_grad_(True)
        return N.r1_penalty(d.dual(x, raw), [x]).sum()

    eps = 1e-6
    with torch.no_grad():
        w += eps * v
    up = penalty().item()
    with torch.no_grad():
        w -= 2 * eps * v
    down = penalty().item()
    with torch.no_grad():
        w += eps * v
    assert abs((up - down) / (2 * eps) - float((w.grad * v).sum())) < 1e-5 * max(
        1.0, abs((up - down) / (2 * eps)))


def test_region_mask_and_morphology():
    labels = torch.zeros(1, 24, 24, dtype=torch.long)
    labels[0, 3:9, 3:9] = 1                                             # skin square
    labels[0, 5, 5] = 10                                                # nose
    assert N.region_mask(labels, ["skin"]).sum() == 35
    face = N.region_mask(labels[:, None], [1, "nose"])
    assert face.shape == (1, 1, 24, 24) and face.sum() == 36
    # erosion by 3x3 shrinks the 6x6 square to 4x4; dilation grows it to 8x8
    assert N.erode_mask(face, 3).sum() == 16 and N.dilate_mask(face, 3).sum() == 64
    assert N.dilate_mask(face, 3, iterations=2).sum() == 100
    # borders: a full mask does not erode from outside the image
    assert N.erode_mask(torch.ones(1, 1, 5, 5), 7, 2).eq(1).all()
    # GOHA's appearance mask erode7((1 - M_render) * (1 - M_source)): the face (rows and
    # columns 3 .. 8) clears every pixel within 3 of it, i.e. the block 0 .. 11
    m = N.erode_mask((1 - face) * (1 - N.region_mask(labels, ["nose"])), 7)
    assert m[0, 0, :12, :12].sum() == 0
    assert m[0, 0, 12:].eq(1).all() and m[0, 0, :, 12:].eq(1).all()
    with pytest.raises(ValueError, match="classes: unknown class 'teeth'"):
        N.region_mask(labels, ["teeth"])
    with pytest.raises(ValueError, match="kernel: expected an odd size >= 1"):
        N.dilate_mask(face, 4)


def test_face_parser_refuses_integer_images():
    parser = N.FaceParser(size=64).eval()
    with pytest.raises(TypeError, match=r"x: expected a floating-point image in \[-1, 1\].*uint8"):
        parser(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert parser.parse(torch.zeros(0, 3, 64, 64)).shape == (0, 64, 64)


def test_gfpgan_dual_input_is_what_the_dual_discriminator_sees():
    """GFPGANDiscriminator.dual_input: image || bilinear(raw -> S, align_corners=True), the
    tensor ``dual`` discriminates; bad input names the argument."""
    torch.manual_seed(11)
    d = N.GFPGANDiscriminator(out_size=16, narrow=1 / 32, in_channels=6)
    img, raw = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)
    x = d.dual_input(img, raw)
    up = F.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=True)
    assert torch.equal(x, torch.cat([img, up], 1))
    assert torch.equal(d.dual(img, raw), d(x))
    with pytest.raises(ValueError, match=r"image: expected shape \(B, 3, 16, 16\), got "
                                         r"\(2, 3, 8, 8\)"):
        d.dual_input(raw, raw)
    with pytest.raises(ValueError, match=r"image_raw: expected shape \(B, 3, r, r\)"):
        d.dual_input(img, raw[:, :1])
    with pytest.raises(ValueError, match="dual_input: needs in_channels 6"):
        N.GFPGANDiscriminator(out_size=16, narrow=1 / 32).dual_input(img, raw)
