"""pyface eval: metrics (against scikit-image and known answers), evaluation pairs, the
evaluator with pipelines, and the CLI."""
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

from _eval_data import eval_set

from pyface.data import format as fmt
from pyface.data.reenactment import MOVING_EXP_L2, MOVING_POSE_DEG, reenactment_pairs
from pyface.eval import metrics as M
from pyface.eval.evaluate import CopySource, evaluate, source_key



# ----------------------------------------------------------------------------------------------
# metrics


def _pair(seed, shape=(2, 3, 29, 37), noise=0.15):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    p = (t + noise * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return p, t


def _skimage():
    # a required check (scikit-image is in the `test` extra), not a skip: fails when missing
    import skimage.metrics
    return skimage.metrics


def _sk_ssim(p, t, full=False):
    return _skimage().structural_similarity(t.numpy(), p.numpy(), data_range=1, channel_axis=0,
                                     gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, full=full)


@pytest.mark.parametrize("seed,noise", [(0, 0.05), (1, 0.3)])
def test_psnr_ssim_match_skimage(seed, noise):
    skm = _skimage()
    p, t = _pair(seed, noise=noise)
    ours_psnr, ours_ssim = M.psnr(p, t), M.ssim(p, t)
    for i in range(p.shape[0]):
        assert ours_psnr[i].item() == pytest.approx(
            skm.peak_signal_noise_ratio(t[i].numpy(), p[i].numpy(), data_range=1), abs=1e-9)
        assert ours_ssim[i].item() == pytest.approx(_sk_ssim(p[i], t[i]), abs=1e-9)


def test_masked_metrics_match_skimage_map():
    p, t = _pair(2)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 1, 29, 37, generator=g) > 0.6
    got_ssim, got_psnr = M.ssim(p, t, mask), M.psnr(p, t, mask)
    for i in range(2):
        _, smap = _sk_ssim(p[i], t[i], full=True)           # (3, H, W), borders not valid
        m = mask[i, 0].numpy()[5:-5, 5:-5]
        want = smap[:, 5:-5, 5:-5][:, m].mean()
        assert got_ssim[i].item() == pytest.approx(want, abs=1e-9)
        mse = ((p[i] - t[i]) ** 2).numpy()[:, mask[i, 0].numpy()].mean()
        assert got_psnr[i].item() == pytest.approx(10 * math.log10(1 / mse), abs=1e-9)


def test_known_answers():
    t = torch.full((1, 3, 16, 16), 0.5, dtype=torch.float64)
    assert M.psnr(t + 0.1, t).item() == pytest.approx(20.0, abs=1e-9)      # MSE 0.01
    assert M.psnr(t, t).item() == 100.0                                      # floored MSE
    assert M.ssim(t, t).item() == pytest.approx(1.0, abs=1e-12)
    # constant images: no variance, SSIM = luminance term (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.3, 0.6, 0.01 ** 2
    got = M.ssim(torch.full_like(t, a), torch.full_like(t, b)).item()
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-12)
    # error only outside the face: the face region is perfect, the whole image is not
    t = torch.full((1, 3, 32, 32), 0.5, dtype=torch.float64)
    p = t.clone()
    p[..., :, :4] = 0.0
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[..., 8:24, 16:32] = True            # > 5 px (the window radius) from the error
    assert M.psnr(p, t, mask).item() == 100.0 and M.psnr(p, t).item() < 20
    assert M.ssim(p, t, mask).item() == pytest.approx(1.0) and M.ssim(p, t).item() < 0.9
    # an empty mask (in the valid region) gives NaN, which aggregation skips
    edge = torch.zeros_like(mask)
    edge[..., 0, 0] = True
    assert math.isnan(M.ssim(p, t, edge).item())
    assert math.isnan(M.psnr(p, t, torch.zeros_like(mask)).item())
    assert M.mean_finite([1.0, float("nan"), 3.0]) == 2.0


def test_psnr_is_capped_at_100_db():
    """The MSE floor caps PSNR at 100 dB: below an MSE of 1e-10 the formula's (and skimage's)
    value is not reported; above it they agree."""
    t = torch.zeros(1, 3, 256, 256, dtype=torch.float64)
    p = t.clone()
    p[0, 0, 0, 0] = 1 / 255                        # one level in one value: 101.07 dB
    mse = (1 / 255) ** 2 / t.numel()
    assert 10 * math.log10(1 / mse) == pytest.approx(101.0668, abs=1e-4)
    assert M.psnr(p, t).item() == 100.0 == M.psnr(t, t).item()
    p[0, 0, 0, :2] = 2 / 255                       # two values two levels off: 92.04 dB
    want = _skimage().peak_signal_noise_ratio(t[0].numpy(), p[0].numpy(), data_range=1)
    assert want == pytest.approx(92.0359, abs=1e-4)
    assert M.psnr(p, t).item() == pytest.approx(want, abs=1e-9)


def test_prepare_and_errors():
    x = torch.tensor([[-2.0, -1.0, 0.0, 0.999]])
    assert torch.equal(M.prepare(x), torch.tensor([[0.0, 0.0, 128 / 255, 1.0]], dtype=torch.float64))
    assert torch.equal(M.prepare(torch.tensor([0, 255], dtype=torch.uint8)),
                       torch.tensor([0.0, 1.0], dtype=torch.float64))
    # data frames: uint8 / 255, float read in [0, 1] (not as a pipeline's [-1, 1])
    assert torch.equal(M.prepare_data(torch.tensor([0, 51, 255], dtype=torch.uint8)),
                       torch.tensor([0.0, 0.2, 1.0], dtype=torch.float64))
    assert torch.equal(M.prepare_data(torch.tensor([-0.5, 0.25, 1.5])),
                       torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="images: expected uint8 or float frames, got torch.int64"):
        M.prepare_data(torch.tensor([1, 2]))
    a = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"target: expected shape \(1, 3, 16, 16\)"):
        M.psnr(a, torch.zeros(1, 3, 16, 15))
    with pytest.raises(ValueError, match="pred: expected"):
        M.ssim(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="mask: expected shape"):
        M.ssim(a, a, torch.ones(1, 3, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 11"):
        M.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    for name in ("akd", "aed", "apd", "aed_id"):     # computed by the evaluator
        assert M.check_name(name) == name
        with pytest.raises(ValueError, match=f"'{name}' is not a per-pair image metric"):
            M.get(name)
    with pytest.raises(ValueError, match="'lpips' is not a per-pair image metric"):
        M.get("lpips")              # computed by the evaluator with its network
    assert [M.check_name(n) for n in ("lpips", "csim", "fid", "kid", "jitter", "fps")]
    with pytest.raises(ValueError, match="expected one of"):
        M.get("nope")
    assert set(M.METRICS) == {"psnr", "ssim"}


# ----------------------------------------------------------------------------------------------
# data: tiny synthetic set (2 identities x 2 videos x 8 frames, 64 px) plus a static video


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval") / "ds")
    return eval_set(out, 6)


def test_source_keys_group_pairs_by_source(root):
    """The evaluator groups pairs by source without loading them; the keys agree with the
    items' source frames."""
    from pyface.eval.evaluate import _groups

    same = reenactment_pairs(root, protocol="same")
    groups = _groups(same, list(range(len(same))))
    assert [len(g) for g in groups] == [7, 7, 7, 7, 5]      # 4 synthetic videos + static
    for g in groups:
        src = [(int(same[i]["source"]["video"]), int(same[i]["source"]["frame"])) for i in (g[0], g[-1])]
        assert src[0] == src[1] and src[0][1] == 0
    assert len({source_key(same, g[0]) for g in groups}) == 5
    cross = reenactment_pairs(root, protocol="cross", subset="moving")
    groups = _groups(cross, list(range(len(cross))))
    assert sum(map(len, groups)) == len(cross) and len(groups) == 2
    for g in groups:
        imgs = [cross[i]["source"]["image"] for i in (g[0], g[-1])]
        assert torch.equal(*imgs)
    assert not torch.equal(cross[groups[0][0]]["source"]["image"], cross[groups[1][0]]["source"]["image"])


# ----------------------------------------------------------------------------------------------
# evaluator


def test_copy_source(root):
    res = evaluate(CopySource(64), root, protocol="same")
    psnr, ssim = res.values["psnr"], res.values["ssim"]
    static = np.arange(len(res.indices)) >= 28          # the static video's pairs come last
    assert np.all(psnr["image"][static] == 100.0) and np.all(psnr["face"][static] == 100.0)
    assert np.allclose(ssim["image"][static], 1.0) and np.allclose(ssim["face"][static], 1.0)
    assert np.all(np.isfinite(psnr["image"])) and np.all(psnr["image"][~static] < 50)
    assert np.all(ssim["face"][~static] < 0.999)
    assert not res.moving[static].any()
    s = res.to_dict()
    assert s["subsets"]["all"]["count"] == 33 and s["subsets"]["moving"]["count"] == res.moving.sum()
    assert s["subsets"]["all"]["psnr"]["image"] == pytest.approx(psnr["image"].mean())
    assert s["sources"] == 5 and s["frames"] == 33 and s["fps"] > 0
    # moving pairs are harder for copy-source than the average pair
    assert s["subsets"]["moving"]["psnr"]["image"] < s["subsets"]["all"]["psnr"]["image"]
    assert set(res.sheet) == {"source", "driving", "target", "prediction"}
    assert res.sheet["prediction"].shape == (5, 3, 64, 64)
    torch.testing.assert_close(res.sheet["prediction"], res.sheet["source"])
    cross = evaluate(CopySource(64), root, protocol="cross", subset="moving")
    assert 10 < cross.to_dict()["subsets"]["moving"]["psnr"]["image"] < 50
    assert list(cross.to_dict()["subsets"]) == ["moving"]


def test_evaluator_values_match_skimage_on_the_stored_frames(root):
    """End to end: the evaluator's per-pair PSNR / SSIM of copy-source equal scikit-image's on
    the stored uint8 frames (source as prediction, driving frame as target, both / 255), and the
    report's mean is the plain mean of those per-pair values."""
    skm = _skimage()
    res = evaluate(CopySource(64), root, protocol="same", max_pairs=6)   # the last: static
    data = reenactment_pairs(root, resolution=64, protocol="same")
    psnr, ssim = [], []
    for i in res.indices:
        item = data[i]
        p = item["source"]["image"].double().numpy() / 255
        t = item["target"]["image"].double().numpy() / 255
        with np.errstate(divide="ignore"):                 # identical frames: inf
            psnr.append(skm.peak_signal_noise_ratio(t, p, data_range=1))
        ssim.append(skm.structural_similarity(t, p, data_range=1, channel_axis=0,
                                              gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False))
    psnr = np.minimum(psnr, 100.0)          # the static video's identical frames: inf -> 100
    assert len(psnr) == 6 and (psnr < 50).sum() == 5 and psnr[-1] == 100
    np.testing.assert_allclose(res.values["psnr"]["image"], psnr, rtol=0, atol=1e-9)
    np.testing.assert_allclose(res.values["ssim"]["image"], ssim, rtol=0, atol=1e-9)
    summary = res.to_dict()["subsets"]["all"]
    assert summary["psnr"]["image"] == pytest.approx(np.mean(psnr), abs=1e-9)
    assert summary["ssim"]["image"] == pytest.approx(np.mean(ssim), abs=1e-9)


class CopyDriving:
    """A pipeline whose prediction is the driving frame; counts its calls."""

    def __init__(self, resolution):
        self.resolution, self.device = resolution, torch.device("cpu")
        self.sources, self.driving_sizes = 0, []

    def encode_source(self, source):
        assert source["image"].shape == (3, self.resolution, self.resolution)
        assert source["image"].dtype == torch.float32 and source["image"].min() >= -1
        assert source["coeffs"].shape == (257,) and source["mask"].max() <= 1
        self.sources += 1
        return source["image"]

    def encode_driving(self, driving):
        assert driving["image"].dim() == 4 and driving["camera"].shape[1:] == (25,)
        self.driving_sizes.append(driving["image"].shape[0])
        return driving["image"]

    def generate(self, state, motion):
        return motion


def test_pipeline_groups_and_batches(root):
    pipe = CopyDriving(48)
    res = evaluate(pipe, root, protocol="same", batch_size=3)
    assert pipe.sources == 5                             # each source encoded once
    assert pipe.driving_sizes == [3, 3, 1] * 4 + [3, 2]  # chunks never cross a source
    # driving = target in the same-identity protocol: perfect at the pipeline's resolution
    assert np.all(res.values["psnr"]["image"] == 100.0) and res.resolution == 48
    assert res.sheet["target"].shape[-1] == 48
    cross = evaluate(CopyDriving(48), root, protocol="cross", max_pairs=5)
    assert cross.indices == [0, 4, 8, 11, 15]
    assert np.all(cross.values["psnr"]["image"] < 50)


def test_pipeline_protocol_controls_reach_generate(root):
    """A pipeline's protocol_controls(protocol) are passed to generate and recorded."""
    class WithControls(CopyDriving):
        seen = []

        def protocol_controls(self, protocol):
            return {"cross_identity": True} if protocol == "cross" else {}

        def generate(self, state, motion, **kw):
            self.seen.append(kw)
            return motion if not kw else state[None].expand_as(motion)

    pipe = WithControls(48)
    same = evaluate(pipe, root, protocol="same", max_pairs=4)
    assert pipe.seen and all(kw == {} for kw in pipe.seen)
    assert "controls" not in same.to_dict() and np.all(same.values["psnr"]["image"] == 100.0)
    pipe.seen.clear()
    cross = evaluate(pipe, root, protocol="cross", max_pairs=4)
    assert pipe.seen and all(kw == {"cross_identity": True} for kw in pipe.seen)
    assert cross.to_dict()["controls"] == {"cross_identity": True}
    copy = evaluate(CopySource(48), root, protocol="cross", max_pairs=4)
    np.testing.assert_allclose(cross.values["psnr"]["image"], copy.values["psnr"]["image"])


def test_evaluation_is_reproducible_and_keeps_the_callers_random_state(root):
    """A pipeline that draws random numbers gives the same values on every seeded evaluation;
    the caller's random state is left as it was; seed=None draws from the caller's state."""
    class Noisy(CopyDriving):
        def encode_source(self, source):
            return super().encode_source(source) + 0.1 * torch.randn(1)

        def generate(self, state, motion):
            return (state[None] + 0.1 * torch.rand(motion.shape[0], 1, 1, 1)).clamp(-1, 1)

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = evaluate(Noisy(48), root, protocol="same", max_pairs=6, batch_size=2)
    assert torch.equal(torch.rand(3), expected)              # the caller's state is untouched
    b = evaluate(Noisy(48), root, protocol="same", max_pairs=6, batch_size=2)
    np.testing.assert_array_equal(a.values["psnr"]["image"], b.values["psnr"]["image"])
    assert a.to_dict()["seed"] == 0
    c = evaluate(Noisy(48), root, protocol="same", max_pairs=6, batch_size=2, seed=1)
    assert not np.array_equal(a.values["psnr"]["image"], c.values["psnr"]["image"])
    d = evaluate(Noisy(48), root, protocol="same", max_pairs=6, batch_size=2, seed=None)
    e = evaluate(Noisy(48), root, protocol="same", max_pairs=6, batch_size=2, seed=None)
    assert not np.array_equal(d.values["psnr"]["image"], e.values["psnr"]["image"])
    assert d.to_dict()["seed"] is None
    with pytest.raises(ValueError, match="seed must be a non-negative int or None, got -1"):
        evaluate(Noisy(48), root, protocol="same", max_pairs=2, seed=-1)


def test_a_bad_seed_is_refused_before_any_work(root):
    """The seed is checked with the other arguments, before the metrics' networks load (here
    lpips without its weights would fail first), a detector starts or a progress bar opens."""
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match=rf"^evaluate: seed must be a non-negative int or "
                                             rf"None, got {bad!r}$"):
            evaluate(CopySource(48), root, protocol="same", metrics=("psnr", "lpips"),
                     seed=bad, progress=True)


def test_bad_pipeline_output(root):
    class Bad(CopySource):
        def generate(self, state, motion, **kw):
            return state[None]
    with pytest.raises(ValueError, match=r"pipeline.generate: expected \(T=4, 3, H, W\)"):
        evaluate(Bad(32), root, batch_size=4)


def test_non_finite_predictions_are_refused_not_skipped(root):
    """A NaN output would make its pair's PSNR / SSIM NaN, which the means skip (as an empty
    face mask): the model would be scored on its good frames only. The evaluator refuses it,
    naming the pairs."""
    class Broken(CopySource):
        def generate(self, state, motion, **kw):
            out = super().generate(state, motion, **kw).clone()
            out[-1, 0, 3, 5] = float("nan")
            return out
    with pytest.raises(ValueError, match=r"pipeline.generate: expected finite values, got NaN "
                                         r"or infinity in the prediction of pair 3$"):
        evaluate(Broken(32), root, batch_size=4, metrics=["psnr"])


def test_image_only_data_has_no_moving_subset(root, tmp_path):
    import shutil

    d = str(tmp_path / "img")
    shutil.copytree(root, d, ignore=shutil.ignore_patterns("cross", "multiview"))
    for name in fmt.video_names(d):
        for f in ("coeffs.npy", "dataset.json", "landmarks.npy", "meta.json"):
            os.remove(os.path.join(d, name, f))
    os.remove(os.path.join(d, fmt.INDEX))
    fmt.write_index(d)
    res = evaluate(CopySource(32), d, protocol="same")
    assert list(res.to_dict()["subsets"]) == ["all"] and res.to_dict()["subsets"]["all"]["count"] == 33
    assert not res.has_moving


def test_example_model_pipeline(root):
    """The example model's own pipeline (tri-plane reconstruction of the source, turned by the
    driving camera's yaw) at its 32 px output resolution, on 64 px data."""
    from pyface.train.example import ExamplePipeline, TriplaneAEConfig, TriplaneAutoencoder

    torch.manual_seed(0)
    model = TriplaneAutoencoder(TriplaneAEConfig(resolution=32, plane_resolution=16,
                                                 plane_channels=4, encoder_channels=8,
                                                 hidden=8, depth_samples=4))
    res = evaluate(ExamplePipeline(model, device="cpu"), root, protocol="cross", max_pairs=6)
    d = res.to_dict()
    assert d["frames"] == 6 and d["sources"] == 2 and res.resolution == 32
    v = d["subsets"]["all"]
    assert 0 < v["psnr"]["image"] < 40 and -1 < v["ssim"]["face"] < 1
    assert res.sheet["prediction"].shape == (2, 3, 32, 32)


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_copy_source(root, tmp_path, capsys):
    from PIL import Image

    from pyface.cli import main
    from pyface.eval.cli import data_hash

    out, sheet = tmp_path / "r" / "cs.json", tmp_path / "cs.png"
    rc = main(["eval", "copy-source", "--data", root, "--json", str(out), "--sheet", str(sheet),
               "--quiet", "--sheet-rows", "2", "--resolution", "32"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "same" in text and "cross" in text and "psnr face" in text
    rep = json.loads(out.read_text())
    assert rep["model"] == "copy-source" and rep["checkpoint"] is None
    assert rep["resolution"] == 32 and rep["data_hash"] == data_hash(root)
    assert set(rep["versions"]) >= {"pyface", "torch", "python"} and rep["device"].startswith("cpu")
    assert rep["moving"] == {"rule": "coefficients", "pose_deg": MOVING_POSE_DEG,
                             "exp_l2": MOVING_EXP_L2}
    same = rep["protocols"]["same"]
    assert same["subsets"]["all"]["count"] == 33 and same["fps"] > 0
    assert set(same["subsets"]["all"]) == {"count", "psnr", "ssim"}
    assert set(same["subsets"]["all"]["psnr"]) == {"image", "face"}
    assert rep["protocols"]["cross"]["subsets"]["all"]["count"] == 16
    # 2 rows per protocol, 4 columns of 32 px with 2 px padding
    assert Image.open(sheet).size == (4 * 34 + 2, 4 * 34 + 2)


def test_cli_trained_example(root, tmp_path):
    """`pyface eval example --checkpoint RUN`: a 2-step run of the example model, loaded by
    pyface.models.load, evaluated at its 16 px output resolution."""
    from pyface.cli import main

    run = tmp_path / "run"
    sets = ["model.resolution=16", "model.plane_resolution=8", "model.plane_channels=4",
            "model.encoder_channels=8", "model.hidden=8", "model.depth_samples=4",
            "data.resolution=16", f"data.path={root}", "train.batch_size=4",
            "train.progress=false", "train.tensorboard=false", "train.image_every=0",
            f"train.run_dir={run}", "train.steps=2"]
    assert main(["train", "example", *sum((["--set", x] for x in sets), [])]) == 0
    out = tmp_path / "ex.json"
    assert main(["eval", "example", "--checkpoint", str(run), "--data", root, "--device", "cpu",
                 "--json", str(out), "--sheet", str(tmp_path / "ex.png"), "--max-pairs", "8",
                 "--quiet"]) == 0
    rep = json.loads(out.read_text())
    assert rep["model"] == "example" and rep["resolution"] == 16
    for proto in ("same", "cross"):
        r = rep["protocols"][proto]
        assert r["subsets"]["all"]["count"] == 8 and r["fps"] > 0
        assert 0 < r["subsets"]["all"]["psnr"]["face"] < 40
    assert os.path.getsize(tmp_path / "ex.png") > 0


def test_cli_model_loads_through_pyface_models(root, tmp_path, monkeypatch, capsys):
    from pyface.cli import main

    calls = []

    def load(name, checkpoint, *, device=None, ema=True):
        calls.append((name, checkpoint, str(device), ema))
        return CopyDriving(32)

    monkeypatch.setitem(sys.modules, "pyface.models", types.SimpleNamespace(load=load))
    out = tmp_path / "m.json"
    rc = main(["eval", "example", "--checkpoint", str(tmp_path), "--data", root, "--protocol",
               "same", "--subset", "moving", "--device", "cpu", "--no-ema", "--json", str(out),
               "--quiet", "--max-pairs", "4"])
    assert rc == 0 and calls == [("example", str(tmp_path), "cpu", False)]
    rep = json.loads(out.read_text())
    assert list(rep["protocols"]) == ["same"] and rep["checkpoint"] == os.path.abspath(tmp_path)
    assert rep["protocols"]["same"]["subsets"]["moving"]["psnr"]["image"] == 100.0
    assert rep["protocols"]["same"]["subsets"]["moving"]["count"] == 4
    assert main(["eval", "example", "--data", root, "--quiet"]) == 2
    assert "--checkpoint: required" in capsys.readouterr().err
    # a detector metric with the detector turned off: options that contradict each other (2),
    # refused before anything loads, in one line naming both options
    assert main(["eval", "copy-source", "--data", root, "--metrics", "psnr,akd", "--quiet",
                 "--detector", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--metrics psnr,akd: 'akd' needs a landmark detector" in err
    assert "--detector none" in err
    # a metric without the --weights it needs: the command line lacks an option (2)
    assert main(["eval", "copy-source", "--data", root, "--metrics", "psnr,fid", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "metric 'fid' needs" in err and "--weights fid=PATH" in err
    assert main(["eval", "copy-source", "--data", root, "--metrics", "psnr,bogus", "--quiet"]) == 2
    assert "metric: expected one of psnr, ssim" in capsys.readouterr().err


def test_data_hash(root, tmp_path):
    import shutil

    from pyface.eval.cli import data_hash

    h = data_hash(root)
    assert len(h) == 16 and data_hash(root) == h
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    assert data_hash(copy) == h                        # a moved copy keeps its hash
    c = np.load(os.path.join(copy, "static", "coeffs.npy"))
    np.save(os.path.join(copy, "static", "coeffs.npy"), c + 1)
    assert data_hash(copy) != h


def test_cli_help(capsys):
    from pyface.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: pyface eval" in out and "copy-source" in out and "--max-pairs" in out


@pytest.mark.gpu
def test_cuda_matches_cpu(root):
    cpu = evaluate(CopyDriving(48), root, protocol="cross", max_pairs=6)
    pipe = CopySource(48, device="cuda")
    gpu = evaluate(pipe, root, protocol="cross", max_pairs=6)
    ref = evaluate(CopySource(48), root, protocol="cross", max_pairs=6)
    for name in ("psnr", "ssim"):
        for region in ("image", "face"):
            np.testing.assert_array_equal(gpu.values[name][region], ref.values[name][region])
    assert gpu.frames == cpu.frames == 6
    assert gpu.to_dict()["memory_peak_mb"] > 0 and ref.to_dict()["memory_peak_mb"] is None


class FixedImage:
    """A pipeline whose every prediction is one fixed image at ``resolution``, whatever the size
    of its input frames."""

    def __init__(self, resolution):
        self.resolution, self.device = resolution, torch.device("cpu")
        g = torch.Generator().manual_seed(3)
        self.image = torch.rand(3, resolution, resolution, generator=g) * 2 - 1

    def encode_source(self, source):
        return None

    def encode_driving(self, driving):
        return int(driving["image"].shape[0])

    def generate(self, state, motion, **controls):
        return self.image.expand(motion, -1, -1, -1).clone()


def test_targets_resized_by_the_evaluator_are_8_bit_as_the_loaders_are(root):
    """The targets are 8-bit images whichever path resizes them: a dataset root is loaded at the
    evaluation resolution (the loader rounds the resized frames to uint8), and a dataset object
    of larger frames is resized by the evaluator, which rounds them to 8 bits too; the two give
    the same metrics and the same sheet (the prediction here does not depend on the input)."""
    want = evaluate(FixedImage(32), root, protocol="same", metrics=["psnr", "ssim"])
    data = reenactment_pairs(root, protocol="same")
    assert data[0]["target"]["image"].shape[-1] == 64
    got = evaluate(FixedImage(32), data, protocol="same", metrics=["psnr", "ssim"])
    for m in ("psnr", "ssim"):
        for r in ("image", "face"):
            np.testing.assert_allclose(got.values[m][r], want.values[m][r], rtol=0, atol=1e-12)
    for k in ("source", "driving", "target"):
        levels = (got.sheet[k].double() + 1) / 2 * 255
        assert got.sheet[k].shape[-1] == 32
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
        torch.testing.assert_close(got.sheet[k], want.sheet[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("src,dst", [(96, 64), (50, 32), (64, 96), (32, 50)])
def test_evaluator_resize_is_the_loaders_when_shrinking_and_enlarging(src, dst):
    """The evaluator's own resize of frames and masks (a dataset object of frames of another
    size) gives what pyface's uint8 loader gives at the evaluation resolution, shrinking and
    enlarging alike: the same 8-bit frames, the same mask pixels (a uint8 mask; the float
    mask of the float32 loader but at exact ties); a frame resized without the 8-bit rounding,
    or a mask thresholded before its resize, differs."""
    from pyface.data.datasets import _to_image, _to_mask
    from pyface.eval.evaluate import _resize_frames, _resize_mask

    rng = np.random.default_rng(src * 100 + dst)
    arr = rng.integers(0, 256, (src, src, 3), dtype=np.uint8)
    ys, xs = np.mgrid[:src, :src]
    mask = np.clip((xs + ys) * 255 / (2 * src) + rng.normal(0, 25, (src, src)), 0,
                   255).astype(np.uint8)       # graded: many pixels near the threshold
    want = M.prepare_data(_to_image(arr, dst)[None])
    got = _resize_frames(M.prepare_data(_to_image(arr, None)[None]), (dst, dst))
    assert got.dtype == torch.float64 and torch.equal(got, want)
    unrounded = torch.nn.functional.interpolate(M.prepare_data(_to_image(arr, None)[None]),
                                                size=(dst, dst), mode="bilinear",
                                                antialias=True, align_corners=False)
    assert not torch.allclose(unrounded, want, rtol=0, atol=1e-3)
    want = M.prepare_mask(_to_mask(mask, dst)[None])
    got = _resize_mask(_to_mask(mask, None)[None], (dst, dst))
    assert got.dtype == torch.bool and got.shape == (1, 1, dst, dst)
    assert torch.equal(got, want)
    # the float mask (values in [0, 1], resized as values): the float32 loader's pixels but
    # those whose resized level is a tie, 127.5 to float rounding (enlarging by 1.5 makes them)
    want = M.prepare_mask(_to_mask(mask, dst, torch.float32)[None])
    got = _resize_mask(_to_mask(mask, None, torch.float32)[None], (dst, dst))
    levels = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(),
                                             size=(dst, dst), mode="bilinear", antialias=True,
                                             align_corners=False)
    away = (levels - 127.5).abs() > 1e-3
    assert got.dtype == torch.bool and torch.equal(got[away], want[away])
    early = torch.nn.functional.interpolate(
        M.prepare_mask(_to_mask(mask, None)[None]).double(), size=(dst, dst), mode="bilinear",
        antialias=True, align_corners=False) > 0.5
    assert not torch.equal(early, M.prepare_mask(_to_mask(mask, dst)[None]))


def test_float_frames_in_0_1_score_as_their_uint8_originals(root):
    """A dataset with float frames in [0, 1] (``image_dtype=torch.float32``) gives the metrics
    of the same frames stored as uint8: targets (and CSIM sources, sheets) are read in [0, 1],
    as the pipeline's inputs are."""
    want = evaluate(CopySource(64), root, protocol="same", metrics=["psnr", "ssim"])
    data = reenactment_pairs(root, resolution=64, protocol="same", image_dtype=torch.float32)
    assert data[0]["target"]["image"].dtype == torch.float32
    got = evaluate(CopySource(64), data, protocol="same", metrics=["psnr", "ssim"])
    for m in ("psnr", "ssim"):
        for r in ("image", "face"):
            np.testing.assert_allclose(got.values[m][r], want.values[m][r], rtol=0, atol=1e-6)
    torch.testing.assert_close(got.sheet["target"], want.sheet["target"], rtol=0, atol=1e-6)
