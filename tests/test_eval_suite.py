"""The full evaluation: weight-dependent metrics (lpips, csim, fid, kid) inside the evaluator
and ``pyface eval --weights`` on random-weight files, and ``pyface eval --runs`` with a trained
example model and the baselines."""
import json
import os

import numpy as np
import pytest
import torch

from _eval_data import eval_set

from pyface.eval.evaluate import CopySource, evaluate, load_networks
from pyface.eval.weights import MissingWeightsError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """2 videos of 4 frames at 64 px and a static video (every frame = frame 0)."""
    out = str(tmp_path_factory.mktemp("evals") / "ds")
    return eval_set(out, 4, identities=2, videos_per_identity=1, frames=4)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random-weight files in the layouts of the real ones."""
    from pyface.eval.fid import FIDInception
    from pyface.eval.lpips import CHANNELS, alexnet_features
    from pyface.nn.arcface import IResNet

    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    paths = {k: str(d / f"{k}.pth") for k in ("lpips", "lpips_heads", "csim", "fid")}
    torch.save({f"features.{k}": v for k, v in alexnet_features().state_dict().items()},
               paths["lpips"])
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1)
                for i, c in enumerate(CHANNELS["alex"])}, paths["lpips_heads"])
    torch.save(IResNet("r18").state_dict(), paths["csim"])
    torch.save(FIDInception(require_weights=False).state_dict(), paths["fid"])
    return paths


def test_missing_weights_fail_clearly(root, tmp_path, capsys):
    from pyface.cli import main

    for name in ("lpips", "csim", "fid", "kid"):
        with pytest.raises(MissingWeightsError, match=f"--weights {name}=PATH"):
            evaluate(CopySource(32), root, metrics=["psnr", name])
        assert main(["eval", "copy-source", "--data", root, "--metrics", f"psnr,{name}",
                     "--quiet"]) == 2            # no --weights for it: a usage error
        err = capsys.readouterr().err
        assert f"metric '{name}' needs" in err and "never downloads" in err
    missing = str(tmp_path / "nope.pth")
    assert main(["eval", "copy-source", "--data", root, "--metrics", "lpips", "--weights",
                 f"lpips={missing}", "--quiet"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "copy-source", "--data", root, "--weights", "lpips", "--quiet"]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
    assert main(["eval", "copy-source", "--data", root, "--weights", "foo=x", "--quiet"]) == 2
    assert "--weights: expected NAME in ['aed_id', 'csim', 'fid', 'kid', 'lpips', " \
        "'lpips_heads'], got 'foo'" in capsys.readouterr().err


def test_weighted_metrics_in_the_evaluator(root, weights):
    nets = load_networks(["lpips", "csim", "fid", "kid"], weights)
    assert set(nets) == {"lpips", "csim", "fid"}          # one Inception for fid and kid
    res = evaluate(CopySource(32), root, protocol="same", max_pairs=5,
                   metrics=["psnr", "lpips", "csim", "fid", "kid"], networks=nets)
    assert res.indices == [0, 2, 4, 6, 8]
    static = np.array(res.indices) >= 6                   # the static video's pairs come last
    lp, cs = res.values["lpips"]["image"], res.values["csim"]["image"]
    assert np.all(lp[static] == 0) and np.all(lp[~static] > 0)
    # the same image aligned with the same landmarks: cosine 1; moved faces: less
    np.testing.assert_allclose(cs[static], 1.0, atol=1e-5)
    assert np.all(cs[~static] < 1 - 1e-4)
    d = res.to_dict()["subsets"]["all"]
    assert d["lpips"]["image"] == pytest.approx(lp.mean())
    assert d["fid"]["image"] > 0 and np.isfinite(d["kid"]["image"]) and "image_std" in d["kid"]
    # the FID of the static pairs alone (prediction = target) is 0
    from pyface.eval.fid import fid_from_features
    f = res.features
    assert fid_from_features(f["real"][static], f["fake"][static]) == pytest.approx(0, abs=1e-6)
    np.testing.assert_allclose(f["real"][static], f["fake"][static])


def test_cli_with_weights(root, weights, tmp_path, capsys):
    from pyface.cli import main

    out = tmp_path / "cs.json"
    args = ["eval", "copy-source", "--data", root, "--protocol", "same", "--resolution", "32",
            "--metrics", "psnr,lpips,csim,fid,kid", "--quiet", "--json", str(out),
            "--max-pairs", "3"]
    for k in ("lpips", "lpips_heads", "csim", "fid"):
        args += ["--weights", f"{k}={weights[k]}"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert all(c in text for c in ("lpips", "csim", "fid", "kid"))
    rep = json.loads(out.read_text())
    s = rep["protocols"]["same"]["subsets"]["all"]
    assert set(s) == {"count", "psnr", "lpips", "csim", "fid", "kid"} and s["count"] == 3
    assert 0 < s["lpips"]["image"] and 0 < s["csim"]["image"] <= 1 + 1e-6
    assert s["fid"]["image"] > 0 and np.isfinite(s["kid"]["image"])
    assert rep["metrics"] == ["psnr", "lpips", "csim", "fid", "kid"]
    # which networks measured them (LPIPS of another backbone, or another ArcFace, differs)
    from pyface.eval.evaluate import FID_NETWORK
    assert rep["metric_networks"] == {"lpips": "alex", "csim": "r18", "fid": FID_NETWORK}
    out2 = tmp_path / "plain.json"
    assert main(["eval", "copy-source", "--data", root, "--protocol", "same", "--resolution",
                 "32", "--metrics", "psnr", "--quiet", "--json", str(out2),
                 "--max-pairs", "2"]) == 0
    capsys.readouterr()
    assert json.loads(out2.read_text())["metric_networks"] == {}


def test_runs_table(root, tmp_path, capsys):
    """`pyface eval --runs example=RUN --out DIR`: a 2-step example run and the baselines."""
    from PIL import Image

    from pyface.cli import main

    run = tmp_path / "run"
    sets = ["model.resolution=16", "model.plane_resolution=8", "model.plane_channels=4",
            "model.encoder_channels=8", "model.hidden=8", "model.depth_samples=4",
            "data.resolution=16", f"data.path={root}", "train.batch_size=4",
            "train.progress=false", "train.tensorboard=false", "train.image_every=0",
            f"train.run_dir={run}", "train.steps=2"]
    assert main(["train", "example", *sum((["--set", x] for x in sets), [])]) == 0
    out = tmp_path / "out"
    assert main(["eval", "--runs", f"example={run}", "--data", root, "--out", str(out),
                 "--device", "cpu", "--quiet", "--sheet-rows", "2"]) == 0
    table = (out / "table.md").read_text().strip().splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head[:3] == ["model", "res", "same/all psnr"] and "cross/moving ssim face" in head
    assert head[-2:] == ["same jitter", "cross jitter"]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")]
            for r in table[2:]}
    assert list(rows) == ["example", "copy-source", "warp-baseline", "driving (ground truth)"]
    assert all(r[1] == "16" for r in rows.values())
    assert rows["example"][-1] == "-" and rows["copy-source"][-1] == "0.000"
    assert rows["warp-baseline"][-1] == rows["driving (ground truth)"][-1] != "-"
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["reports"]) == ["example", "copy-source", "warp-baseline"]
    ex = json.loads((out / "example.json").read_text())
    assert ex["checkpoint"] == os.path.abspath(run) and ex["resolution"] == 16
    assert float(rows["example"][2]) == pytest.approx(
        ex["protocols"]["same"]["subsets"]["all"]["psnr"]["image"], abs=0.006)
    for name in ("example", "copy-source", "warp-baseline"):
        assert Image.open(out / f"{name}.png").size == (4 * 18 + 2, 4 * 18 + 2)
    assert "driving (ground truth)" in capsys.readouterr().out
    # bad --runs
    assert main(["eval", "--runs", "example", "--data", root, "--quiet"]) == 2
    assert "expected MODEL=RUN" in capsys.readouterr().err
    assert main(["eval", "copy-source", "--runs", f"example={run}", "--data", root]) == 2
