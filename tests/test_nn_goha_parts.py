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
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 3, 32, 32\), got \(2, 3, 64, 64\)"):
        model(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="out_size: expected a power of two >= 8, got 48"):
        GFPGANConfig(out_size=48)


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
    with pytest.raises(CheckpointError, match="missing keys: .*stylegan_decoder.style_mlp.5.weight"):
        from pyface.checkpoint import load_module_state, load_weights
        state, _ = load_weights(out, kind="gfpgan")
        load_module_state(GFPGANv1Clean(**{**TINY, "num_mlp": 3}), state, "test")
    bad = dict(src.state_dict())
    bad["final_linear.weight"] = bad["final_linear.weight"][:-1]
    torch.save({"params_ema": bad}, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match="final_linear"):
        convert_gfpgan(str(tmp_path / "bad.pth"), str(tmp_path / "bad"))
