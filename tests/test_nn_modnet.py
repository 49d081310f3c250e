"""MODNet portrait matting (pyface.nn.modnet): the released checkpoint's key layout, forward
shapes and input checks, strict and safe loading."""
import pytest
import torch

from pyface.checkpoint import CheckpointError
from pyface.nn.modnet import MODNet, inference_size, load_modnet, matte_image, modnet_state


def _modnet_release_layout() -> dict[str, tuple[int, ...]]:
    """``modnet_photographic_portrait_matting.ckpt`` keys and shapes, transcribed from MODNet's
    architecture (ZHKKKe/MODNet ``src/models/modnet.py`` and ``backbones/``): saved from
    ``nn.DataParallel`` (``module.`` prefix); the MobileNetV2 backbone (stem 3 -> 32, inverted
    residuals t,c,n,s = 1,16,1,1 / 6,24,2,2 / 6,32,3,2 / 6,64,4,2 / 6,96,3,1 / 6,160,3,2 /
    6,320,1,1, last 1x1 320 -> 1280, no classifier) is stored twice, as ``backbone.model`` and
    ``lr_branch.backbone.model``; every Conv2dIBNormRelu is ``layers.0`` (conv with bias) and
    ``layers.1.bnorm`` (BatchNorm of half the channels; the InstanceNorm has no parameters);
    hr_channels 32, encoder channels 16, 24, 32, 96, 1280."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.{p}"] = (c,)
        keys[f"{name}.num_batches_tracked"] = ()

    def mobilenet(p):
        keys[f"{p}.features.0.0.weight"] = (32, 3, 3, 3)
        bn(f"{p}.features.0.1", 32)
        cin, idx = 32, 1
        for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
            for _ in range(n):
                h = cin * t
                q = f"{p}.features.{idx}.conv"
                if t == 1:
                    keys[f"{q}.0.weight"] = (h, 1, 3, 3)
                    bn(f"{q}.1", h)
                    keys[f"{q}.3.weight"] = (c, h, 1, 1)
                    bn(f"{q}.4", c)
                else:
                    keys[f"{q}.0.weight"] = (h, cin, 1, 1)
                    bn(f"{q}.1", h)
                    keys[f"{q}.3.weight"] = (h, 1, 3, 3)
                    bn(f"{q}.4", h)
                    keys[f"{q}.6.weight"] = (c, h, 1, 1)
                    bn(f"{q}.7", c)
                cin, idx = c, idx + 1
        keys[f"{p}.features.18.0.weight"] = (1280, 320, 1, 1)
        bn(f"{p}.features.18.1", 1280)

    def cibr(name, cin, cout, k, norm=True):
        keys[f"{name}.layers.0.weight"] = (cout, cin, k, k)
        keys[f"{name}.layers.0.bias"] = (cout,)
        if norm:
            bn(f"{name}.layers.1.bnorm", cout // 2)

    m = "module"
    mobilenet(f"{m}.backbone.model")
    mobilenet(f"{m}.lr_branch.backbone.model")
    keys[f"{m}.lr_branch.se_block.fc.0.weight"] = (320, 1280)
    keys[f"{m}.lr_branch.se_block.fc.2.weight"] = (1280, 320)
    cibr(f"{m}.lr_branch.conv_lr16x", 1280, 96, 5)
    cibr(f"{m}.lr_branch.conv_lr8x", 96, 32, 5)
    cibr(f"{m}.lr_branch.conv_lr", 32, 1, 3, norm=False)
    h = f"{m}.hr_branch"
    cibr(f"{h}.tohr_enc2x", 16, 32, 1)
    cibr(f"{h}.conv_enc2x", 35, 32, 3)
    cibr(f"{h}.tohr_enc4x", 24, 32, 1)
    cibr(f"{h}.conv_enc4x", 64, 64, 3)
    for i, (cin, cout) in enumerate([(99, 64), (64, 64), (64, 32)]):
        cibr(f"{h}.conv_hr4x.{i}", cin, cout, 3)
    for i, (cin, cout) in enumerate([(64, 64), (64, 32), (32, 32), (32, 32)]):
        cibr(f"{h}.conv_hr2x.{i}", cin, cout, 3)
    cibr(f"{h}.conv_hr.0", 35, 32, 3)
    cibr(f"{h}.conv_hr.1", 32, 1, 1, norm=False)
    f = f"{m}.f_branch"
    cibr(f"{f}.conv_lr4x", 32, 32, 5)
    cibr(f"{f}.conv_f2x", 64, 32, 3)
    cibr(f"{f}.conv_f.0", 35, 16, 3)
    cibr(f"{f}.conv_f.1", 16, 1, 1, norm=False)
    return keys


def _random_release(seed=0) -> dict[str, torch.Tensor]:
    """A state dict with the release's layout (module. prefixes, both backbone copies) and random
    values, from the transcribed key list (not from our module)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in _modnet_release_layout().items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith("running_mean"):
            state[k] = 0.1 * torch.randn(shape, generator=g)
        elif "bnorm.weight" in k or k.endswith(("1.weight", "4.weight", "7.weight")) and len(shape) == 1:
            state[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            state[k] = torch.randn(shape, generator=g) / fan ** 0.5
    for k in list(state):
        if k.startswith("module.lr_branch.backbone."):
            state[k] = state["module." + k[len("module.lr_branch."):]].clone()
    return state


def test_modnet_matches_release_layout():
    want = {k[len("module."):]: v for k, v in _modnet_release_layout().items()
            if not k.startswith("module.lr_branch.backbone.")}
    got = {k: tuple(v.shape) for k, v in MODNet().state_dict().items()}
    assert sorted(set(want) ^ set(got)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    assert sum(v.numel() for v in MODNet().parameters()) > 6_000_000


def test_modnet_forward_shapes_and_input_errors():
    torch.manual_seed(0)
    model = MODNet().eval()
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        matte = model(x)
        semantic, detail, matte2 = model(x, all_outputs=True)
    assert matte.shape == (2, 1, 64, 96) and detail.shape == (2, 1, 64, 96)
    assert semantic.shape == (2, 1, 4, 6)
    assert float(matte.min()) >= 0 and float(matte.max()) <= 1
    torch.testing.assert_close(matte, matte2)
    # the instance-normalised half makes each image's matte independent of the batch
    with torch.no_grad():
        torch.testing.assert_close(model(x[1:]), matte[1:], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"img: expected shape \(B, 3, H, W\) with H, W positive "
                                         r"multiples of 32, got \(1, 3, 48, 64\)"):
        model(torch.zeros(1, 3, 48, 64))
    with pytest.raises(ValueError, match=r"image: expected \(H, W, 3\) uint8"):
        matte_image(model, torch.zeros(8, 8).numpy())


def test_inference_size_recipe():
    assert inference_size(256, 256) == (512, 512)          # small: short side -> 512
    assert inference_size(512, 512) == (512, 512)
    assert inference_size(1080, 1920) == (512, 896)         # 910 rounded down to 32
    assert inference_size(400, 700) == (384, 672)          # within range: only rounded
    assert inference_size(600, 900) == (512, 768)           # short side above 512


def test_load_modnet_release_file(tmp_path):
    import numpy as np

    raw = _random_release(3)
    torch.save(raw, tmp_path / "modnet.ckpt")
    model = load_modnet(str(tmp_path / "modnet.ckpt"))
    assert not model.training
    sd = model.state_dict()
    for k, v in raw.items():
        if not k.startswith("module.lr_branch.backbone."):
            torch.testing.assert_close(sd[k[len("module."):]], v, atol=0, rtol=0)
    img = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    a = matte_image(model, img)
    assert a.shape == (40, 56) and a.dtype == np.float32 and 0 <= a.min() <= a.max() <= 1
    # without prefixes, without BN counters: the same model
    bare = {k[len("module."):]: v for k, v in raw.items() if not k.endswith("num_batches_tracked")}
    torch.save(bare, tmp_path / "bare.pth")
    m2 = load_modnet(str(tmp_path / "bare.pth"))
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(m2(x), model(x), atol=0, rtol=0)


def test_load_modnet_errors(tmp_path):
    raw = _random_release(4)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_modnet(str(tmp_path / "missing.ckpt"))
    bad = dict(raw)
    bad["module.f_branch.conv_f2x.layers.0.weight"] = torch.zeros(32, 48, 3, 3)
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"f_branch.conv_f2x.layers.0.weight: checkpoint "
                                              r"\(32, 48, 3, 3\) vs model \(32, 64, 3, 3\)"):
        load_modnet(str(tmp_path / "bad.ckpt"))
    twin = dict(raw)
    twin["module.lr_branch.backbone.model.features.0.0.weight"] = torch.zeros(32, 3, 3, 3)
    with pytest.raises(CheckpointError, match="lr_branch.backbone.model.features.0.0.weight "
                                              "differs"):
        modnet_state(twin, "twin.ckpt")
    missing = {k: v for k, v in raw.items() if "conv_hr2x.3" not in k}
    with pytest.raises(CheckpointError, match="missing keys: hr_branch.conv_hr2x.3"):
        modnet_state(missing, "short.ckpt")
    with pytest.raises(CheckpointError, match="not a MODNet state dict"):
        modnet_state({"x": torch.zeros(1)}, "other.ckpt")

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"module.f_branch.conv_f.1.layers.0.weight": torch.zeros(1, 16, 1, 1),
                "x": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_modnet(str(tmp_path / "evil.ckpt"))
    assert not (tmp_path / "pwned").exists()
