"""Hopenet: the upstream key layout (transcribed), `pyface convert hopenet`, the expected-angle
read-out, the keypoint-space rotation, and MMFA's frozen ``rotation="hopenet"``."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from pyface.cli import main
from pyface.convert import ConversionError, ConversionWarning, convert_hopenet
from pyface.nn import Hopenet, hopenet_key, load_hopenet
from pyface.nn.motion import euler_to_rotation


def _hopenet_shapes(num_batches_tracked: bool = False) -> dict[str, tuple]:
    """Upstream state-dict names and shapes, transcribed from natanielruiz/deep-head-pose
    code/hopenet.py: ``Hopenet(torchvision Bottleneck, [3, 4, 6, 3], 66)``. Stem ``conv1``
    (64, 3, 7, 7) + ``bn1``; ``_make_layer(planes, blocks, stride)`` for planes 64/128/256/512:
    each Bottleneck has conv1 1x1 (planes), conv2 3x3 (planes), conv3 1x1 (4 planes), each with
    a BatchNorm; the first block of a stage has ``downsample`` (1x1 conv + BN) because the
    input width changes; ``fc_yaw`` / ``fc_pitch`` / ``fc_roll`` Linear(2048, 66) and the
    vestigial ``fc_finetune`` Linear(2048 + 3, 3). The released files are 2017 state dicts: no
    ``num_batches_tracked``."""
    def bn(p, c):
        d = {p + "weight": (c,), p + "bias": (c,), p + "running_mean": (c,),
             p + "running_var": (c,)}
        if num_batches_tracked:
            d[p + "num_batches_tracked"] = ()
        return d

    out = {"conv1.weight": (64, 3, 7, 7), **bn("bn1.", 64)}
    inplanes = 64
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
        for i in range(blocks):
            p = f"layer{layer}.{i}."
            out[p + "conv1.weight"] = (planes, inplanes, 1, 1)
            out.update(bn(p + "bn1.", planes))
            out[p + "conv2.weight"] = (planes, planes, 3, 3)
            out.update(bn(p + "bn2.", planes))
            out[p + "conv3.weight"] = (planes * 4, planes, 1, 1)
            out.update(bn(p + "bn3.", planes * 4))
            if i == 0:
                out[p + "downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                out.update(bn(p + "downsample.1.", planes * 4))
            inplanes = planes * 4
    for head in ("fc_yaw", "fc_pitch", "fc_roll"):
        out[head + ".weight"], out[head + ".bias"] = (66, 2048), (66,)
    out["fc_finetune.weight"], out["fc_finetune.bias"] = (3, 2051), (3,)
    return out


def _upstream_state(seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in _hopenet_shapes(**kw).items():
        if k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("weight") and len(shape) == 4:
            fan = shape[1] * shape[2] * shape[3]
            sd[k] = torch.randn(shape, generator=g) * (2.0 / fan) ** 0.5
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.1
    return sd


def _upstream_features(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """Upstream's ResNet-50 trunk (eval mode) written out from its layer description, up to the
    pooled 2048 features: conv1-bn1-relu-maxpool, Bottlenecks (stride on the 3x3 conv), mean."""
    def bn(x, p):
        return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"],
                            sd[p + "bias"], False, 0.0, 1e-5)

    x = F.max_pool2d(F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1.")),
                     3, 2, 1)
    for layer, blocks in enumerate((3, 4, 6, 3), 1):
        for i in range(blocks):
            p = f"layer{layer}.{i}."
            stride = 2 if (i == 0 and layer > 1) else 1
            y = F.relu(bn(F.conv2d(x, sd[p + "conv1.weight"]), p + "bn1."))
            y = F.relu(bn(F.conv2d(y, sd[p + "conv2.weight"], stride=stride, padding=1),
                          p + "bn2."))
            y = bn(F.conv2d(y, sd[p + "conv3.weight"]), p + "bn3.")
            skip = x
            if p + "downsample.0.weight" in sd:
                skip = bn(F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride),
                          p + "downsample.1.")
            x = F.relu(y + skip)
    return x.mean((2, 3))


def test_transcribed_keys_map_onto_hopenet():
    shapes = _hopenet_shapes()
    # ResNet-50: 53 convolutions and 53 BatchNorms (4 tensors each), then the four heads
    assert len([k for k in shapes if not k.startswith("fc_")]) == 53 + 53 * 4
    assert shapes["layer3.0.downsample.0.weight"] == (1024, 512, 1, 1)
    assert shapes["layer4.2.bn3.running_var"] == (2048,)
    assert shapes["layer2.0.conv1.weight"] == (128, 256, 1, 1)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in Hopenet().state_dict().items()
                if not k.endswith("num_batches_tracked")}
    mapped = {hopenet_key(k): v for k, v in shapes.items() if hopenet_key(k) is not None}
    assert mapped == ours
    assert hopenet_key("fc_finetune.weight") is None
    assert hopenet_key("layer1.0.downsample.1.running_mean") == \
        "backbone.stages.0.0.skip.1.running_mean"
    assert hopenet_key("bn1.bias") == "backbone.stem.1.bias"
    with pytest.raises(KeyError):
        hopenet_key("fc.weight")


@pytest.mark.parametrize("prefix", ["", "module."])
def test_convert_hopenet_matches_the_upstream_computation(tmp_path, prefix):
    sd = _upstream_state()
    path = tmp_path / "hopenet_robust_alpha1.pkl"
    torch.save({prefix + k: v for k, v in sd.items()}, path)
    with pytest.warns(ConversionWarning, match="fc_finetune"):
        out = convert_hopenet(str(path), str(tmp_path / "hopenet"))
    for src in (out, str(path)):          # the folder, or the upstream file directly
        net = load_hopenet(src)
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
        net.input_size = 64               # keep the reference cheap: no resize
        got = net(x)
        xn = ((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
            / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        f = _upstream_features(sd, xn)
        for head in ("yaw", "pitch", "roll"):
            logits = F.linear(f, sd[f"fc_{head}.weight"], sd[f"fc_{head}.bias"])
            torch.testing.assert_close(got[head], logits, rtol=1e-4, atol=1e-4)
            deg = (logits.softmax(-1) * torch.arange(66.0)).sum(-1) * 3 - 99
            torch.testing.assert_close(got[f"{head}_deg"], deg, rtol=1e-4, atol=1e-3)


def test_convert_hopenet_cli_and_errors(tmp_path, capsys):
    sd = _upstream_state(num_batches_tracked=True)
    good = tmp_path / "h.pth"
    torch.save(sd, good)
    assert main(["convert", "hopenet", str(good), str(tmp_path / "out")]) == 0
    assert "fc_finetune" in capsys.readouterr().err
    bad = dict(sd)
    bad["layer2.1.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match=r"layer|stages\.1\.1\.conv2\.weight"):
        convert_hopenet(str(tmp_path / "bad.pth"), str(tmp_path / "o2"))
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, tmp_path / "resnet.pth")
    with pytest.raises(ConversionError, match="fc.weight"):
        convert_hopenet(str(tmp_path / "resnet.pth"), str(tmp_path / "o3"))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"conv1.weight": Evil()}, f)
    with pytest.raises(ConversionError, match="weights_only"):
        convert_hopenet(str(tmp_path / "evil.pkl"), str(tmp_path / "o4"))
    assert "pwned" not in capsys.readouterr().out


def test_expected_angle_and_keypoint_rotation():
    net = Hopenet().eval()
    for head, deg in (("fc_yaw", 30.0), ("fc_pitch", -12.0), ("fc_roll", 6.0)):
        lin = getattr(net, head)
        with torch.no_grad():
            lin.weight.zero_()
            lin.bias.fill_(-50.0)
            lin.bias[int((deg + 99) / 3)] = 50.0      # one-hot on the bin of `deg`
    x = torch.zeros(1, 3, 32, 32)
    net.input_size = 32
    out = net(x)
    assert float(out["yaw_deg"].detach()) == pytest.approx(30.0, abs=1e-3)
    assert float(out["pitch_deg"].detach()) == pytest.approx(-12.0, abs=1e-3)
    want = euler_to_rotation(pitch=torch.tensor([-12.0]), yaw=torch.tensor([30.0]),
                             roll=torch.tensor([6.0]))
    torch.testing.assert_close(net.rotation(x), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="image"):
        net(torch.zeros(1, 1, 32, 32))
