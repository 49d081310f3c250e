"""The warping baseline (our thin-plate spline) and the jitter metric: known answers, and both
inside the evaluator and ``pyface eval warp-baseline``."""
import json
import math

import numpy as np
import pytest
import torch

from pyface.data import synthetic as S
from pyface.eval import metrics as M
from pyface.eval.evaluate import CopySource, evaluate
from pyface.eval.warp_baseline import WarpBaseline, tps_apply, tps_solve, tps_warp


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("evalb") / "ds")
    S.generate(out, S.default_config(), progress=False)
    return out


def _landmarks(B=2, H=32, W=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 68, 2, generator=g, dtype=torch.float64) * torch.tensor([W, H])


def test_tps_interpolates_and_reproduces_affine_maps():
    ctrl = torch.rand(3, 10, 2, dtype=torch.float64) * 2 - 1
    vals = torch.rand(3, 10, 2, dtype=torch.float64) * 2 - 1
    params = tps_solve(ctrl, vals, reg=0.0)
    torch.testing.assert_close(tps_apply(params, ctrl, ctrl), vals, atol=1e-9, rtol=0)
    # an affine map is reproduced exactly everywhere (no bending)
    A = torch.tensor([[1.1, 0.2], [-0.3, 0.9]], dtype=torch.float64)
    b = torch.tensor([0.05, -0.1], dtype=torch.float64)
    params = tps_solve(ctrl, ctrl @ A.T + b)
    pts = torch.rand(3, 50, 2, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(tps_apply(params, ctrl, pts), pts @ A.T + b, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"ctrl: expected shape \(B, K >= 3, 2\)"):
        tps_solve(ctrl[:, :2], vals[:, :2])
    with pytest.raises(ValueError, match="values: expected shape"):
        tps_solve(ctrl, vals[:, :5])


def test_warp_identity_when_landmarks_are_equal():
    img = torch.rand(2, 3, 32, 40, dtype=torch.float64)
    lm = _landmarks()
    torch.testing.assert_close(tps_warp(img, lm, lm), img, atol=1e-10, rtol=0)


def test_warp_known_translation():
    """Driving landmarks = source landmarks - (3, 2) px: the output is the source moved by
    (-3, -2), i.e. out[y, x] = src[y + 2, x + 3] (border pixels repeat)."""
    img = torch.rand(2, 3, 32, 40, dtype=torch.float64)
    src = _landmarks()
    d = torch.tensor([3.0, 2.0], dtype=torch.float64)
    out = tps_warp(img, src, src - d)
    torch.testing.assert_close(out[..., :-2, :-3], img[..., 2:, 3:], atol=1e-10, rtol=0)
    torch.testing.assert_close(out[..., -1, :-3], img[..., -1, 3:], atol=1e-10, rtol=0)
    # and a half-pixel shift is the bilinear average of neighbours
    out = tps_warp(img, src, src - torch.tensor([0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out[..., :-1], (img[..., :-1] + img[..., 1:]) / 2, atol=1e-10,
                               rtol=0)
    with pytest.raises(ValueError, match=r"dst_landmarks: expected shape \(2, K, 2\)"):
        tps_warp(img, src, src[:1])


def test_jitter_known_answers():
    t = torch.arange(6, dtype=torch.float64)
    still = torch.zeros(6, 68, 2, dtype=torch.float64)
    assert M.jitter(still).item() == 0.0
    # constant velocity: no acceleration
    lin = still + torch.stack([2 * t, -t], -1)[:, None]
    assert M.jitter(lin).item() == pytest.approx(0.0, abs=1e-12)
    # x = t^2 / 2 on every point: second difference 1 px everywhere
    quad = still + torch.stack([t * t / 2, 0 * t], -1)[:, None]
    assert M.jitter(quad).item() == pytest.approx(1.0, abs=1e-12)
    # alternating +-1 px in x and y on one of two points: |(+-4, +-4)| = 4 sqrt 2 on that point
    zig = torch.zeros(5, 2, 2, dtype=torch.float64)
    zig[:, 0] = torch.tensor([1.0, -1, 1, -1, 1])[:, None]
    assert M.jitter(zig).item() == pytest.approx(4 * math.sqrt(2) / 2, abs=1e-12)
    with pytest.raises(ValueError, match=r"landmarks: expected shape \(T >= 3, K, 2\)"):
        M.jitter(still[:2])


def test_baselines_in_the_evaluator(root):
    metrics = ["psnr", "ssim", "jitter"]
    warp = evaluate(WarpBaseline(64), root, protocol="same", metrics=metrics)
    copy = evaluate(CopySource(64), root, protocol="same", metrics=metrics)
    jw, jc = warp.to_dict()["jitter"], copy.to_dict()["jitter"]
    # 4 videos of 7 driving frames (1..7): 5 triples each
    assert jw["triples"] == jc["triples"] == 20
    assert jc["output"] == 0.0 and jc["driving"] > 0          # copy-source never moves
    assert jw["output"] == pytest.approx(jw["driving"]) == pytest.approx(jc["driving"])
    # the driving jitter is the metric on each driving sequence, in pixels at 64 px
    from pyface.data import format as fmt
    rec = fmt.load_index(root)[0]
    lm = torch.from_numpy(fmt.load_landmarks(root, rec)[1:]).double()
    diffs = [M.second_differences(torch.from_numpy(fmt.load_landmarks(root, r)[1:]).double())
             for r in fmt.load_index(root)]
    assert jw["driving"] == pytest.approx(torch.cat(diffs).mean().item(), rel=1e-6)
    assert M.jitter(lm).item() == pytest.approx(diffs[0].mean().item())
    # the warp moves the face with the driving landmarks: better than copying on moving pairs
    mw, mc = warp.to_dict()["subsets"]["moving"], copy.to_dict()["subsets"]["moving"]
    assert mw["psnr"]["face"] > mc["psnr"]["face"] and mw["ssim"]["face"] > mc["ssim"]["face"]
    # fewer pairs: only runs of consecutive driving frames count
    few = evaluate(CopySource(32), root, protocol="cross", metrics=metrics, max_pairs=5)
    assert few.to_dict()["jitter"]["triples"] < 12


def test_jitter_of_a_model_without_landmarks_is_null(root):
    class Driving(CopySource):          # a model: predicts, but implies no landmarks
        implied_landmarks = None

        def generate(self, state, motion, **kw):
            return state[None].expand(motion, -1, -1, -1)

    d = evaluate(Driving(32), root, protocol="same", metrics=["jitter"]).to_dict()["jitter"]
    assert d["output"] is None and d["driving"] > 0


def test_cli_warp_baseline(root, tmp_path, capsys):
    from pyface.cli import main

    out = tmp_path / "w.json"
    assert main(["eval", "warp-baseline", "--data", root, "--resolution", "32", "--quiet",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "jitter driving" in text
    rep = json.loads(out.read_text())
    assert rep["model"] == "warp-baseline" and rep["metrics"] == ["psnr", "ssim", "jitter"]
    for proto in ("same", "cross"):
        j = rep["protocols"][proto]["jitter"]
        assert j["output"] == pytest.approx(j["driving"]) and j["triples"] > 0
    assert np.isfinite(rep["protocols"]["cross"]["subsets"]["all"]["psnr"]["face"])


def test_cli_runs_baselines_only(root, tmp_path):
    from pyface.cli import main

    out = tmp_path / "b"
    assert main(["eval", "--runs", "--data", root, "--resolution", "32", "--protocol", "cross",
                 "--out", str(out), "--quiet"]) == 0
    lines = (out / "table.md").read_text().splitlines()
    assert [r.split("|")[1].strip() for r in lines[2:]] == [
        "copy-source", "warp-baseline", "driving (ground truth)"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["reports"]["warp-baseline"]["resolution"] == 32
    assert list(rep["reports"]["copy-source"]["protocols"]) == ["cross"]


@pytest.mark.gpu
def test_warp_baseline_cuda_matches_cpu(root):
    cpu = evaluate(WarpBaseline(48), root, protocol="same", metrics=["psnr", "jitter"])
    gpu = evaluate(WarpBaseline(48, device="cuda"), root, protocol="same",
                   metrics=["psnr", "jitter"])
    np.testing.assert_allclose(gpu.values["psnr"]["image"], cpu.values["psnr"]["image"],
                               rtol=1e-4)
    assert gpu.to_dict()["jitter"] == pytest.approx(cpu.to_dict()["jitter"])
