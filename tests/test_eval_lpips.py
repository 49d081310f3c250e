"""LPIPS: pyface's backbones and heads against the `lpips` package on random backbones."""
import os

import pytest
import torch

from pyface.eval import lpips as plp
from pyface.eval.weights import MissingWeightsError
from _reference_packages import reference

# lpips calls torchvision with the deprecated pretrained= argument
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torchvision")


def _torchvision_state(ref) -> dict:
    # lpips keeps torchvision's layer index in its slices: slice<k>.<idx>.<rest>
    out = {}
    for k, v in ref.net.state_dict().items():
        _, idx, *rest = k.split(".")
        out[".".join(["features", idx, *rest])] = v.clone()
    return out


@pytest.mark.parametrize("net", plp.NETS)
def test_matches_lpips_package_on_random_backbone(net, tmp_path):
    lpips = reference("lpips")
    torch.manual_seed(0)
    ref = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
    path = os.path.join(tmp_path, f"{net}.pth")
    torch.save(_torchvision_state(ref), path)
    ours = plp.LPIPS(path)                       # heads: the installed package's files
    assert ours.net_name == net
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 64, 48, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, 64, 48, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        want = ref(x, y).flatten()
        got = ours(x, y)
    assert got.shape == (3,)
    assert (want > 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours(x, x), torch.zeros(3))


@pytest.mark.parametrize("net,build", [("alex", "alexnet"), ("squeeze", "squeezenet1_1")])
def test_full_torchvision_state_dict_loads(net, build):
    tv = reference("torchvision.models")
    torch.manual_seed(0)
    model = getattr(tv, build)(weights=None)
    ours = plp.LPIPS(model.state_dict())         # classifier keys are ignored
    assert ours.net_name == net
    for k, v in ours.backbone.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    scaled = (x - ours.shift) / ours.scale
    last = max(plp.TAPS[net])
    with torch.no_grad():
        torch.testing.assert_close(ours.backbone(scaled)[-1], model.features[:last + 1](scaled))


def test_missing_weights_say_what_to_pass(tmp_path, monkeypatch):
    for bad in (None, os.path.join(tmp_path, "nope.pth")):
        with pytest.raises(MissingWeightsError, match=r"--weights lpips=PATH.*alexnet-owt"):
            plp.LPIPS(bad)
    state = {k: torch.zeros_like(v) for k, v in plp.Backbone("alex").state_dict().items()}
    monkeypatch.setattr(plp, "default_heads_path", lambda net: None)
    with pytest.raises(MissingWeightsError, match=r"pip install lpips.*lpips_heads=PATH"):
        plp.LPIPS(state)


def test_bad_backbone_and_inputs():
    state = {k: torch.zeros_like(v) for k, v in plp.Backbone("squeeze").state_dict().items()}
    with pytest.raises(ValueError, match="'vgg' requested.*'squeeze'"):
        plp.LPIPS(state, net="vgg")
    with pytest.raises(ValueError, match="not a torchvision AlexNet"):
        plp.LPIPS({"fc.weight": torch.zeros(2, 2)})
    m = plp.LPIPS(state)
    with pytest.raises(ValueError, match=r"x, y: expected equal shapes"):
        m(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 32))
    with pytest.raises(ValueError, match=r"H, W >= 32"):
        m(torch.zeros(1, 3, 16, 64), torch.zeros(1, 3, 16, 64))


def test_heads_from_a_path_or_mapping(tmp_path):
    state = {k: torch.zeros_like(v) for k, v in plp.Backbone("alex").state_dict().items()}
    heads = {f"lin{i}.model.0.weight": torch.rand(1, c, 1, 1)     # lpips without dropout
             for i, c in enumerate(plp.CHANNELS["alex"])}
    path = os.path.join(tmp_path, "alex_heads.pth")
    torch.save({k.replace("model.0", "model.1"): v for k, v in heads.items()}, path)
    for h in (heads, path):
        m = plp.LPIPS(state, heads=h)
        for i, conv in enumerate(m.heads):
            assert torch.equal(conv.weight, heads[f"lin{i}.model.0.weight"])
    with pytest.raises(Exception, match="missing keys"):
        plp.LPIPS(state, heads={"lin0.model.1.weight": torch.rand(1, 64, 1, 1)})
