"""The registry of metrics that need user weights, and its messages."""
import os

import pytest
import torch

from pyface.eval import weights as w
from pyface.nn.arcface import IResNet


def test_every_metric_says_what_to_pass(tmp_path):
    assert set(w.METRICS_NEEDING_WEIGHTS) == {"lpips", "fid", "kid", "csim", "aed_id"}
    for name, spec in w.METRICS_NEEDING_WEIGHTS.items():
        msg = w.missing_weights_message(name)
        assert f"--weights {name}=PATH" in msg and spec.file in msg and "never downloads" in msg
        with pytest.raises(w.MissingWeightsError, match=f"metric '{name}'"):
            w.require_weights(name, None)
        with pytest.raises(w.MissingWeightsError, match="does not exist"):
            w.require_weights(name, os.path.join(tmp_path, "missing.pth"))
        with pytest.raises(w.MissingWeightsError, match=f"--weights {name}=PATH"):
            w.load_weighted_metric(name, {})
    p = os.path.join(tmp_path, "x.pth")
    open(p, "wb").close()
    assert w.require_weights("fid", p) == p
    with pytest.raises(KeyError, match="metric: expected one of"):
        w.missing_weights_message("psnr")


def test_parse_weights_and_load(tmp_path):
    assert w.parse_weights(["fid=a.pth", "lpips=b.pth", "lpips_heads=c.pth"]) == {
        "fid": "a.pth", "kid": "a.pth", "lpips": "b.pth", "lpips_heads": "c.pth"}
    assert w.parse_weights(None) == {}
    with pytest.raises(ValueError, match="expected NAME=PATH, got 'lpips'"):
        w.parse_weights(["lpips"])
    with pytest.raises(ValueError, match="expected NAME in .* got 'ssim'"):
        w.parse_weights(["ssim=x"])
    path = os.path.join(tmp_path, "arcface.pth")
    torch.save(IResNet("r18").state_dict(), path)
    m = w.load_weighted_metric("csim", w.parse_weights([f"csim={path}"]))
    assert m.arch == "r18" and not m.training
    # csim and aed_id name one ArcFace file: either key sets both
    assert w.parse_weights([f"aed_id={path}"]) == {"aed_id": path, "csim": path}
    assert w.parse_weights([f"csim={path}"]) == {"aed_id": path, "csim": path}
    m = w.load_weighted_metric("aed_id", w.parse_weights([f"aed_id={path}"]))
    assert m.arch == "r18"
