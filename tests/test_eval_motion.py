"""akd, aed, apd, aed_id and the detector-based jitter: known answers of the formulas, of
pyface's 3DMM fit, and of the evaluator with injected landmark detectors (synthetic protocol with
ground truth, and the real-clip protocol on a folder in `pyface data prepare`'s format)."""
import json
import math
import os

import numpy as np
import pytest
import torch

from _eval_data import eval_set

from pyface.data import format as fmt
from pyface.eval import landmarks as L
from pyface.eval import motion as mo
from pyface.eval.evaluate import CopySource, evaluate
from pyface.eval.weights import MissingWeightsError

RES = 64


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """2 synthetic videos of 4 frames at 64 px (+ cross) and a static video (frame 0 x 4)."""
    out = str(tmp_path_factory.mktemp("evalm") / "ds")
    return eval_set(out, 4, identities=2, videos_per_identity=1, frames=4)


def _key(images: torch.Tensor) -> list[bytes]:
    """8-bit content keys of ``images (N, 3, H, W)`` in [-1, 1]."""
    x = ((images.double().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [v.numpy().tobytes() for v in x]


class OracleDetector:
    """Returns the stored landmarks of the frame an image equals (plus ``offset`` pixels), from
    a table of every frame of the data; ``missing`` images (by key) are not found."""

    name = "oracle"
    convention = "model"          # the synthetic landmarks are the head model's own vertices

    def __init__(self, root, offset=(0.0, 0.0), missing=()):
        self.table, self.offset, self.missing = {}, torch.tensor(offset, dtype=torch.float64), \
            set(missing)
        for d in (root, os.path.join(root, "cross")):
            if not os.path.isfile(os.path.join(d, fmt.INDEX)):
                continue
            for rec in fmt.load_index(d):
                lms = torch.from_numpy(fmt.load_landmarks(d, rec)).double()
                for i in range(rec.num_frames):
                    img = torch.from_numpy(fmt.read_frame(d, rec, i)).permute(2, 0, 1)
                    self.table[_key(img[None].double() / 127.5 - 1)[0]] = lms[i]
        self.calls = 0

    def detect(self, images):
        self.calls += images.shape[0]
        out = torch.full((images.shape[0], 68, 2), float("nan"), dtype=torch.float64)
        found = torch.zeros(images.shape[0], dtype=torch.bool)
        for j, k in enumerate(_key(images)):
            if k in self.table and k not in self.missing:
                out[j], found[j] = self.table[k] + self.offset, True
        return out, found


class CopyDriving:
    """The prediction is the driving frame (a perfect same-identity output)."""

    def __init__(self, resolution):
        self.resolution, self.device = resolution, torch.device("cpu")

    def encode_source(self, source):
        return None

    def encode_driving(self, driving):
        return driving["image"]

    def generate(self, state, motion):
        return motion


def _pairs(root, protocol="same"):
    """(source landmarks, target landmarks, target coeffs, video name) of every pair."""
    from pyface.data.reenactment import reenactment_pairs
    ds = reenactment_pairs(root, protocol=protocol)
    out = []
    for i in range(len(ds)):
        it = ds[i]
        out.append((it["source"]["landmarks"].double(), it["target"]["landmarks"].double(),
                    it["target"]["coeffs"].double(), int(it["source"]["video"])))
    return out


# ----------------------------------------------------------------------------------------------
# formulas


def test_formulas_known_answers():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 68, 2, generator=g, dtype=torch.float64) * 64
    assert torch.equal(mo.akd(a, a), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(mo.akd(a + torch.tensor([3.0, 4.0], dtype=torch.float64), a),
                               torch.full((3,), 5.0, dtype=torch.float64), rtol=0, atol=1e-12)
    b = a.clone()
    b[0, 0] = float("nan")
    assert math.isnan(mo.akd(b, a)[0]) and not math.isnan(mo.akd(b, a)[1])
    c = torch.zeros(2, 257, dtype=torch.float64)
    d = c.clone()
    d[:, 80:144] = 0.5                       # every expression coefficient off by 0.5
    d[0, 224:227] = torch.tensor([0.3, 0.0, 0.0])
    d[1, 224:227] = torch.tensor([0.1, -0.2, 0.3])
    d[:, 254:257] = 7.0                      # translation is not part of apd
    d[:, :80] = 9.0                          # nor identity part of aed
    torch.testing.assert_close(mo.aed(d, c), torch.full((2,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(mo.apd(d, c), torch.tensor([0.1, 0.2], dtype=torch.float64))
    torch.testing.assert_close(mo.apd(c, d), mo.apd(d, c))          # symmetric
    e = torch.eye(4, dtype=torch.float64)[:2]
    torch.testing.assert_close(mo.identity_distance(e, e), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(mo.identity_distance(3 * e, e.flip(0)),
                               torch.full((2,), math.sqrt(2), dtype=torch.float64))
    with pytest.raises(ValueError, match=r"ref: expected shape \(3, 68, 2\)"):
        mo.akd(a, a[:, :5])
    with pytest.raises(ValueError, match=r"pred: expected shape \(N, 257\)"):
        mo.aed(c[:, :100], c[:, :100])


def _render_landmarks(angles, exp_scale=0.0):
    """Landmarks (T, 68, 2) at 64 px of the built-in head with ``angles (T, 3)``."""
    from pyface.face.fit import project_landmarks
    model, _ = mo.fit_model("model")
    t = angles.shape[0]
    g = torch.Generator().manual_seed(1)
    exp = exp_scale * torch.randn(t, model.exp_basis.shape[1], generator=g)
    trans = torch.zeros(t, 3)
    with torch.no_grad():
        return project_landmarks(model, torch.zeros(model.id_basis.shape[1]), exp,
                                 angles.float(), trans, RES).double()


def test_fit_known_answers():
    angles = torch.tensor([[0.0, 0.1, 0.0], [0.05, -0.2, 0.0]])
    lm = _render_landmarks(angles)
    fit = mo.fit_coefficients(lm, RES, convention="model", steps=60)
    # the same landmarks fit the same coefficients: aed = apd = 0
    assert torch.equal(mo.aed(fit, fit), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(fit[:, 224:227], angles.double(), rtol=0, atol=0.01)
    # a known yaw offset (0.15 rad on one of three angles) shows up in apd as 0.15 / 3
    moved = angles + torch.tensor([0.0, 0.15, 0.0])
    fit2 = mo.fit_coefficients(_render_landmarks(moved), RES, convention="model", steps=60)
    torch.testing.assert_close(mo.apd(fit2, fit), torch.full((2,), 0.05, dtype=torch.float64),
                               rtol=0, atol=0.006)
    torch.testing.assert_close(mo.apd(fit, fit2), mo.apd(fit2, fit))
    # frames without landmarks are left out (NaN rows), the others are fitted
    lm[1] = float("nan")
    part = mo.fit_coefficients(lm, RES, convention="model", steps=60)
    assert torch.isnan(part[1]).all() and torch.isfinite(part[0]).all()
    assert torch.isnan(mo.fit_coefficients(lm[1:], RES, convention="model")).all()
    with pytest.raises(ValueError, match=r"landmarks: expected shape \(T, 68, 2\)"):
        mo.fit_coefficients(lm[:, :5], RES)
    with pytest.raises(ValueError, match="convention: expected"):
        mo.fit_model("dlib")


# ----------------------------------------------------------------------------------------------
# detector interface


def test_detector_interface_and_missing_extra(monkeypatch):
    monkeypatch.setattr(L, "have_mediapipe", lambda: False)
    for spec in ("auto", "mediapipe"):
        with pytest.raises(L.MissingDetectorError, match=r"'akd' needs a 68-point.*\.\[prepare\]"):
            L.get_detector(spec, required_by=["akd"])
    assert L.get_detector("auto") is None             # jitter alone: no detector, no error
    with pytest.raises(L.MissingDetectorError, match="turned off"):
        L.get_detector("none", required_by=["aed", "apd"])
    assert L.get_detector("none") is None
    with pytest.raises(ValueError, match="detector: expected 'auto'"):
        L.get_detector("dlib")

    class NoConvention:
        def detect(self, images):
            return torch.zeros(images.shape[0], 68, 2), torch.ones(images.shape[0], dtype=bool)
    with pytest.raises(ValueError, match="detector.convention: expected one of"):
        L.get_detector(NoConvention())
    with pytest.raises(TypeError, match="detect"):
        L.get_detector(object())
    NoConvention.convention = "model"
    lm, found = L.detect(NoConvention(), torch.zeros(2, 3, 8, 8))
    assert lm.dtype == torch.float64 and found.all()

    class Bad(NoConvention):
        def detect(self, images):
            return torch.zeros(images.shape[0], 5, 2), torch.ones(images.shape[0], dtype=bool)
    with pytest.raises(ValueError, match=r"expected landmarks of shape \(2, 68, 2\)"):
        L.detect(Bad(), torch.zeros(2, 3, 8, 8))


def test_evaluator_without_detector_fails_clearly(root, monkeypatch, capsys):
    from pyface.cli import main

    monkeypatch.setattr(L, "have_mediapipe", lambda: False)
    for name in ("akd", "aed", "apd"):
        with pytest.raises(L.MissingDetectorError, match=f"'{name}' needs a 68-point"):
            evaluate(CopySource(RES), root, metrics=["psnr", name])
        assert main(["eval", "copy-source", "--data", root, "--metrics", f"psnr,{name}",
                     "--quiet"]) == 1
        err = capsys.readouterr().err
        assert f"'{name}' needs a 68-point landmark detector" in err and "[prepare]" in err
    # jitter alone still runs (the baseline's implied landmarks)
    res = evaluate(CopySource(RES), root, metrics=["jitter"])
    assert res.detector is None and res.jitter_summary()["output_landmarks"] == "implied"


# ----------------------------------------------------------------------------------------------
# the evaluator with injected detectors: synthetic protocol (ground truth)


def test_akd_known_answers(root):
    pairs = _pairs(root)
    det = OracleDetector(root, offset=(3.0, 4.0))
    res = evaluate(CopySource(RES), root, metrics=["psnr", "akd"], detector=det)
    v = res.values["akd"]
    # the detector on the target is off by exactly 5 px from the ground truth
    np.testing.assert_allclose(v["floor"], 5.0, rtol=0, atol=1e-12)
    assert (v["detected"] == 1).all()
    # copy-source: the detected source (+ offset) against the target's ground truth
    want = [mo.akd((s + torch.tensor([3.0, 4.0], dtype=torch.float64))[None], t[None]).item()
            for s, t, _, _ in pairs]
    np.testing.assert_allclose(v["image"], want, rtol=0, atol=1e-9)
    static = [k for k, p in enumerate(pairs) if p[3] == 2]        # the static video: exactly 5
    assert len(static) == 3
    np.testing.assert_allclose(v["image"][static], 5.0, rtol=0, atol=1e-12)
    s = res.to_dict()
    assert s["detector"] == "oracle" and s["ground_truth"] is True
    assert s["subsets"]["all"]["akd"]["detected"] == 1.0
    assert s["subsets"]["all"]["akd"]["floor"] == pytest.approx(5.0, abs=1e-12)
    # the perfect output scores the floor; undetected outputs are left out and counted
    res = evaluate(CopyDriving(RES), root, metrics=["akd"],
                   detector=OracleDetector(root, offset=(3.0, 4.0)))
    np.testing.assert_allclose(res.values["akd"]["image"], 5.0, rtol=0, atol=1e-12)
    miss = OracleDetector(root)
    first = next(iter(miss.table))
    miss.missing.add(first)
    res = evaluate(CopyDriving(RES), root, metrics=["akd"], detector=miss)
    d = res.values["akd"]["detected"]
    assert 0 < (d == 0).sum() and (np.isnan(res.values["akd"]["image"]) == (d == 0)).all()


def test_aed_apd_known_answers(root, monkeypatch):
    monkeypatch.setattr(mo, "FIT_STEPS", 30)         # the answers below hold for any fit
    det = OracleDetector(root)
    cache = {}
    res = evaluate(CopyDriving(RES), root, metrics=["aed", "apd"], detector=det, cache=cache)
    for name in ("aed", "apd"):
        v = res.values[name]
        # the output's landmarks are the target's: identical fits
        assert (v["image"] == 0).all() and (v["detected"] == 1).all()
        # and so the same distance to the exact coefficients as the target's fit
        np.testing.assert_array_equal(v["gt"], v["floor"])
        assert np.isfinite(v["gt"]).all() and (v["gt"] > 0).any()
    calls = det.calls
    res2 = evaluate(CopySource(RES), root, metrics=["aed", "apd"], detector=det, cache=cache)
    # the targets' detections and fits came from the cache: only the outputs were detected
    assert det.calls == calls + len(res2.indices)
    static = [k for k, p in enumerate(_pairs(root)) if p[3] == 2]
    for name in ("aed", "apd"):
        v = res2.values[name]
        np.testing.assert_array_equal(v["image"][static], 0.0)    # source = every target there
        moving = [k for k in range(len(v["image"])) if k not in static]
        assert (v["image"][moving] > 0).all()
        np.testing.assert_array_equal(v["floor"], res.values[name]["floor"])
    # ground-truth coefficients are required with ground truth
    s = res2.to_dict()["subsets"]["all"]
    assert set(s["aed"]) == {"image", "detected", "gt", "floor"}


def test_detector_jitter(root):
    res = evaluate(CopyDriving(RES), root, metrics=["jitter"], detector=OracleDetector(root))
    j = res.jitter_summary()
    assert j["output_landmarks"] == "detector"
    # the output is the driving frame and the oracle returns its stored landmarks
    assert j["output"] == pytest.approx(j["driving"], abs=1e-12)
    assert j["target_detector"] == pytest.approx(j["driving"], abs=1e-12) and j["driving"] > 0
    res = evaluate(CopySource(RES), root, metrics=["jitter"], detector=OracleDetector(root))
    assert res.jitter_summary()["output"] == 0.0


def test_aed_id(root, tmp_path):
    from pyface.eval.identity import CSIM
    from pyface.nn.arcface import IResNet

    with pytest.raises(MissingWeightsError, match=r"--weights aed_id=PATH.*backbone\.pth"):
        evaluate(CopySource(RES), root, metrics=["aed_id"])
    torch.manual_seed(0)
    path = str(tmp_path / "arcface.pth")
    torch.save(IResNet("r18").state_dict(), path)
    res = evaluate(CopyDriving(RES), root, metrics=["aed_id"], weights={"aed_id": path})
    np.testing.assert_allclose(res.values["aed_id"]["image"], 0.0, atol=1e-6)   # same images
    res = evaluate(CopySource(RES), root, metrics=["aed_id"], weights={"csim": path})
    got = res.values["aed_id"]["image"]
    # known answer: the distance of the unit embeddings of source and target, both aligned with
    # the target's landmarks in pixel-centre coordinates (the source is every copy-source output)
    from pyface.data.reenactment import reenactment_pairs
    from pyface.eval.identity import pixel_centres
    ds = reenactment_pairs(root)
    net = CSIM(path)
    want = []
    check = [0, 4, 8]
    for i in check:
        it = ds[i]
        s = it["source"]["image"][None].float() / 127.5 - 1
        t = it["target"]["image"][None].float() / 127.5 - 1
        lm = pixel_centres(it["target"]["landmarks"][None].double())
        e1, e2 = net.embed(s, lm), net.embed(t, lm)
        want.append(math.sqrt(max(0.0, 2 - 2 * float((e1 * e2).sum()))))
    np.testing.assert_allclose(got[check], want, rtol=0, atol=2e-3)
    static = [k for k, p in enumerate(_pairs(root)) if p[3] == 2]
    np.testing.assert_allclose(got[static], 0.0, atol=1e-6)
    assert (np.delete(got, static) > 1e-3).all()


# ----------------------------------------------------------------------------------------------
# real clips: a folder in `pyface data prepare`'s format


@pytest.fixture(scope="module")
def real_root(root, tmp_path_factory):
    """The synthetic videos rewritten as `pyface data prepare` writes them (its meta.json
    fields; landmarks and coefficients are then a detector's and a fit's, not ground truth)."""
    out = str(tmp_path_factory.mktemp("real") / "clips")
    for rec in fmt.load_index(root):
        t = rec.num_frames
        frames = np.stack([fmt.read_frame(root, rec, i) for i in range(t)])
        masks = np.stack([fmt.read_mask(root, rec, i) for i in range(t)])
        fmt.write_video(out, f"clip_{rec.name}", frames, fmt.load_coeffs(root, rec),
                        fmt.load_labels(root, rec), identity=f"clip_{rec.name}", masks=masks,
                        landmarks=fmt.load_landmarks(root, rec), source=f"{rec.name}.mp4",
                        extra_meta={"generator": "pyface.data.prepare", "crop": "eg3d",
                                    "source_num_frames": t, "source_frames": list(range(t)),
                                    "no_face_frames": [], "confidence": [1.0] * t})
    fmt.write_index(out)
    return out


def test_real_clip_protocol(real_root, root, tmp_path, capsys, monkeypatch):
    from pyface.cli import main

    monkeypatch.setattr(mo, "FIT_STEPS", 20)
    from pyface.eval.cli import protocols_of
    from pyface.eval.evaluate import data_kind

    assert main(["data", "check", real_root]) == 0
    capsys.readouterr()
    assert data_kind(real_root) == "real" and data_kind(root) == "synthetic"
    assert protocols_of("auto", real_root) == ("real",)
    assert protocols_of("auto", root) == ("same", "cross")
    assert protocols_of("real", root) == ("real",)
    # the detector runs on both: the offset cancels, copy-source's akd is the landmark motion
    res = evaluate(CopySource(RES), real_root, protocol="real", metrics=["akd", "aed", "apd"],
                   detector=OracleDetector(real_root, offset=(3.0, 4.0)))
    assert res.ground_truth is False
    want = [mo.akd(s[None], t[None]).item() for s, t, _, _ in _pairs(real_root)]
    np.testing.assert_allclose(res.values["akd"]["image"], want, rtol=0, atol=1e-9)
    assert set(res.values["akd"]) == {"image", "detected"}               # no ground truth
    assert set(res.values["aed"]) == {"image", "detected"}
    # the CLI: auto -> the real protocol; first frame of each video = the source
    out = tmp_path / "real.json"
    assert main(["eval", "copy-source", "--data", real_root, "--json", str(out), "--quiet",
                 "--detector", "none"]) == 0
    rep = json.loads(out.read_text())
    assert list(rep["protocols"]) == ["real"]
    r = rep["protocols"]["real"]
    assert r["pairs"] == 9 and r["sources"] == 3 and r["ground_truth"] is False
    assert r["jitter"]["output"] == 0.0 and "real" in capsys.readouterr().out


def test_runs_table_with_a_detector(root, tmp_path, monkeypatch, capsys):
    from pyface.cli import main

    monkeypatch.setattr(mo, "FIT_STEPS", 20)
    det = OracleDetector(root, offset=(3.0, 4.0))
    monkeypatch.setattr(L, "get_detector", lambda spec, required_by=(): det)
    out = tmp_path / "t"
    assert main(["eval", "--runs", "--data", root, "--out", str(out), "--protocol", "same",
                 "--metrics", "psnr,akd,aed,apd,jitter", "--quiet"]) == 0
    capsys.readouterr()
    lines = (out / "table.md").read_text().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    for col in ("same/all akd", "same/all aed", "same/all aed gt", "same/all apd gt",
                "same jitter"):
        assert col in head
    rows = {r.strip("|").split("|")[0].strip(): [c.strip() for c in r.strip("|").split("|")]
            for r in lines[2:]}
    assert set(rows) == {"copy-source", "warp-baseline", "driving (ground truth)",
                         "target (detector floor)"}
    floor = rows["target (detector floor)"]
    assert floor[head.index("same/all akd")] == "5.000"        # the detector's offset
    assert floor[head.index("same/all aed")] == "-"             # 0 by construction: not shown
    rep = json.loads((out / "copy-source.json").read_text())["protocols"]["same"]
    assert rep["detector"] == "oracle" and rep["jitter"]["output_landmarks"] == "detector"
    # the targets were detected once for both baselines
    assert det.calls == 2 * 9 + 9


def test_sharded_detector_metrics_equal_one_process(root, monkeypatch):
    """akd, aed / apd (fitted per source group) and the detector's jitter (of the outputs and of
    the targets) from 2 shards joined by merge_results are exactly one process's."""
    from pyface.eval.evaluate import merge_results

    monkeypatch.setattr(mo, "FIT_STEPS", 30)
    det = OracleDetector(root, offset=(0.5, -0.25))
    kw = dict(protocol="same", metrics=["psnr", "akd", "aed", "apd", "jitter"], detector=det,
              batch_size=3)
    one = evaluate(CopyDriving(RES), root, **kw)
    merged = merge_results([evaluate(CopyDriving(RES), root, shard=(r, 2), **kw)
                            for r in range(2)])
    for m, regions in one.values.items():
        assert sorted(regions) == sorted(merged.values[m])
        for r, v in regions.items():
            np.testing.assert_array_equal(merged.values[m][r], v, err_msg=f"{m} {r}")
    assert np.isfinite(one.values["aed"]["gt"]).all()
    assert one.jitter["target"] and merged.jitter == one.jitter
    assert merged.to_dict()["jitter"] == one.to_dict()["jitter"]
    assert merged.to_dict()["subsets"] == one.to_dict()["subsets"]
