"""tools/metric_variants.py (quoted by docs/eval.md, "Against the standard definitions") on a
tiny synthetic set: each printed number against the same quantity computed here directly with
NumPy and scikit-image on the stored uint8 frames (scikit-image is in the `test` extra: a
required check, not a skip)."""
import importlib.util
import math
import os
import re

import numpy as np
import pytest

from pyface.data import format as fmt
from pyface.data import reenactment_pairs
from pyface.data import synthetic as S

_TOOL = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "metric_variants.py")
GREY = np.array([0.2989, 0.5870, 0.1140])
LINES = {"psnr": r"psnr \(pyface: per pair, mean of dB\)",
         "pooled": r"psnr pooled \(MSE over all pairs\)",
         "ssim": r"ssim \(pyface: Wang's window, RGB\)",
         "skimage": r"ssim skimage defaults \(7x7 uniform\)",
         "grey": r"ssim grey \(Wang's window, luma\)"}


def _tool():
    spec = importlib.util.spec_from_file_location("metric_variants", _TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("variants") / "data")
    S.generate(out, S.default_config(identities=2, videos_per_identity=1, frames=3,
                                     resolution=32), progress=False)
    return out


def _run(capsys, *argv) -> tuple[str, dict[str, float]]:
    assert _tool().main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    values = {}
    for key, label in LINES.items():
        m = re.search(rf"^{label} +(\S+)$", out, re.M)
        assert m, f"no line {label!r} in:\n{out}"
        values[key] = float(m.group(1))
    return out.splitlines()[0], values


def _expected(root, protocol, n=None) -> dict[str, float]:
    """The tool's numbers from their definitions: HWC uint8 frames, scikit-image's own psnr and
    ssim, the pooled MSE in NumPy."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ds = reenactment_pairs(root, protocol=protocol)
    n = len(ds) if n is None else n
    rows = {k: [] for k in ("psnr", "mse", "ssim", "skimage", "grey")}
    for i in range(n):
        item = ds[i]
        p = item["source"]["image"].permute(1, 2, 0).numpy()     # copy-source: the prediction
        t = item["target"]["image"].permute(1, 2, 0).numpy()
        assert p.dtype == np.uint8 and t.dtype == np.uint8
        rows["psnr"].append(peak_signal_noise_ratio(t, p, data_range=255))
        pf, tf = p / 255.0, t / 255.0
        rows["mse"].append(np.mean((pf - tf) ** 2))
        rows["ssim"].append(structural_similarity(
            tf, pf, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False))
        rows["skimage"].append(structural_similarity(tf, pf, data_range=1.0, channel_axis=-1))
        rows["grey"].append(structural_similarity(
            tf @ GREY, pf @ GREY, data_range=1.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False))
    mean = {k: float(np.mean(v)) for k, v in rows.items()}
    mean["pooled"] = 10 * math.log10(1 / mean.pop("mse"))
    return mean


def _assert_printed(values, expected):
    """Printed with 2 (psnr) or 4 (ssim) decimals: equal up to that rounding."""
    for key, v in values.items():
        digits = 2 if key in ("psnr", "pooled") else 4
        assert abs(v - expected[key]) <= 0.5 * 10 ** -digits + 1e-9, (key, v, expected[key])


@pytest.mark.parametrize("protocol,pairs", [("same", 4), ("cross", 6)])
def test_prints_each_variant_of_the_copy_source_pairs(root, capsys, protocol, pairs):
    head, values = _run(capsys, root, "--protocol", protocol)
    assert head == f"{protocol}: {pairs} copy-source pairs of {root}"
    expected = _expected(root, protocol)
    _assert_printed(values, expected)
    # the frames differ: finite values below the caps, and (-log is convex) the mean of the
    # per-pair PSNRs is at least the PSNR of the pooled MSE
    assert 0 < values["pooled"] <= values["psnr"] < 100
    assert all(0 < values[k] < 1 for k in ("ssim", "skimage", "grey"))


def test_max_pairs_takes_the_first_pairs(root, capsys):
    head, values = _run(capsys, root, "--max-pairs", 2)
    assert head == f"same: 2 copy-source pairs of {root}"
    _assert_printed(values, _expected(root, "same", 2))
    _, all_pairs = _run(capsys, root)
    assert values != all_pairs


def test_no_pairs_is_a_message(root):
    with pytest.raises(SystemExit, match="^data: expected at least one same pair, got none$"):
        _tool().main([root, "--max-pairs", "0"])


def test_identical_pairs_give_the_psnr_cap_not_a_division_by_zero(root, tmp_path, capsys):
    """A set whose source and target frames are equal (a still video): per-pair PSNR is capped
    at 100 dB (pyface's MSE floor) and so is the pooled one, not 10 log10(1 / 0)."""
    rec = fmt.load_index(root)[0]
    frame = fmt.read_frame(root, rec, 0)
    c, lab = fmt.load_coeffs(root, rec)[:1], fmt.load_labels(root, rec)[:1]
    still = str(tmp_path / "still")
    fmt.write_video(still, "still", np.repeat(frame[None], 3, 0), np.repeat(c, 3, 0),
                    np.repeat(lab, 3, 0), identity="still")
    fmt.write_index(still)
    head, values = _run(capsys, still)
    assert head == f"same: 2 copy-source pairs of {still}"
    assert values == {"psnr": 100.0, "pooled": 100.0, "ssim": 1.0, "skimage": 1.0, "grey": 1.0}
