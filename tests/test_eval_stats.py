"""pyface eval's intervals: the cluster bootstrap over sources (pyface.eval.stats), its place in
the evaluator's JSON and in the printed table."""
import json

import numpy as np
import pytest

from _eval_data import eval_set

from pyface.eval import stats as S
from pyface.eval.evaluate import CopySource, evaluate


def _clustered(n_sources=12, per_source=10, spread=2.0, noise=0.1, seed=0):
    """Per-pair values with a strong per-source effect: ``(values, clusters)``."""
    g = np.random.default_rng(seed)
    effect = g.normal(0, spread, n_sources)
    clusters = np.repeat(np.arange(n_sources), per_source)
    return effect[clusters] + g.normal(0, noise, len(clusters)), clusters


def _reference_interval(values, clusters, resamples=S.RESAMPLES, seed=S.SEED, level=S.LEVEL):
    """The cluster bootstrap written out: draw the sources, concatenate their pairs, average."""
    keys = list(dict.fromkeys(clusters.tolist()))
    by = {k: values[clusters == k] for k in keys}
    idx = np.random.default_rng(seed).integers(0, len(keys), size=(resamples, len(keys)))
    means = []
    for row in idx:
        v = np.concatenate([by[keys[i]] for i in row])
        if (~np.isnan(v)).any():
            means.append(np.nanmean(v))
    tail = 50 * (1 - level)
    return np.percentile(means, [tail, 100 - tail])


def test_interval_matches_a_direct_computation():
    v, c = _clustered()
    v[[3, 17, 18]] = np.nan
    w = S.resample_weights(12)
    assert w.shape == (S.RESAMPLES, 12) and np.all(w.sum(1) == 12)
    np.testing.assert_allclose(S.cluster_interval(v, c, w), _reference_interval(v, c), rtol=1e-12)


def test_one_pair_per_source_is_the_ordinary_bootstrap():
    """With one pair per source the cluster bootstrap is scipy's percentile bootstrap of the
    mean (different random draws: equal within the resampling noise)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    v = np.random.default_rng(3).normal(5, 1, 60)
    c = np.arange(60)
    w = S.resample_weights(60, resamples=20000)
    ours = S.cluster_interval(v, c, w)
    ref = scipy_stats.bootstrap((v,), np.mean, n_resamples=20000, method="percentile",
                                random_state=np.random.default_rng(1)).confidence_interval
    se = v.std(ddof=1) / np.sqrt(60)
    assert abs(ours[0] - ref.low) < 0.05 * se and abs(ours[1] - ref.high) < 0.05 * se
    assert ours[1] - ours[0] == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_duplicated_pairs_within_sources_do_not_narrow_the_interval():
    """Every source's pairs repeated k times: the same sources, the same interval (a per-pair
    bootstrap would shrink it by sqrt(k))."""
    v, c = _clustered(per_source=3)
    w = S.resample_weights(12)
    once = S.cluster_interval(v, c, w)
    for k in (2, 5):
        assert S.cluster_interval(np.tile(v, k), np.tile(c, k), w) == pytest.approx(once,
                                                                                   rel=1e-12)
    naive = S.cluster_interval(np.tile(v, 5), np.arange(len(v) * 5),
                               S.resample_weights(len(v) * 5))
    assert naive[1] - naive[0] < 0.6 * (once[1] - once[0])


def test_correlated_pairs_give_a_wider_interval_than_the_naive_one():
    v, c = _clustered(n_sources=10, per_source=20)
    clustered = S.cluster_interval(v, c, S.resample_weights(10))
    naive = S.cluster_interval(v, np.arange(len(v)), S.resample_weights(len(v)))
    assert clustered[0] < v.mean() < clustered[1]
    # the per-source effect dominates: ~sqrt(20) wider
    assert clustered[1] - clustered[0] > 3 * (naive[1] - naive[0])


def test_nan_handling_and_too_few_sources():
    v, c = _clustered(n_sources=4, per_source=5)
    w = S.resample_weights(4)
    ref = S.cluster_interval(v, c, w)
    # NaN values are left out, as in the means; a source with only NaNs still gets drawn
    with_nan = v.copy()
    with_nan[c == 3] = np.nan
    lo, hi = S.cluster_interval(with_nan, c, w)
    assert np.isfinite([lo, hi]).all() and [lo, hi] != ref
    np.testing.assert_allclose([lo, hi], _reference_interval(with_nan, c), rtol=1e-12)
    only_one = np.where(c == 0, v, np.nan)
    assert S.cluster_interval(only_one, c, w) is None
    assert S.cluster_interval(np.full(20, np.nan), c, w) is None
    assert S.cluster_interval(np.where(c == 1, np.inf, v), c, w) is None
    ci, n = S.summary_intervals({"m": {"image": v}}, c == 2, c)
    assert ci is None and n == 1
    ci, n = S.summary_intervals({"m": {"image": v}}, np.zeros(len(v), bool), c)
    assert ci is None and n == 0


def test_summary_intervals_relabel_the_kept_sources():
    v, c = _clustered(n_sources=6, per_source=4)
    keep = c % 2 == 0
    ci, n = S.summary_intervals({"m": {"image": v, "face": v + 1}}, keep, c * 7)
    assert n == 3
    np.testing.assert_allclose(ci["m"]["image"], _reference_interval(v[keep], c[keep]),
                               rtol=1e-12)
    np.testing.assert_allclose(ci["m"]["face"], np.add(ci["m"]["image"], 1), rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# the evaluator and the CLI


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return eval_set(str(tmp_path_factory.mktemp("stats") / "ds"), 6)


def test_evaluation_reports_intervals_beside_the_means(root):
    res = evaluate(CopySource(32), root, protocol="same")
    d = res.to_dict()
    assert d["clusters"] == {"all": 5, "moving": int(len(set(res.clusters[res.moving])))}
    assert d["bootstrap"] == {"method": "cluster bootstrap over sources, percentile interval",
                              "level": 0.95, "resamples": 1000, "seed": 0}
    for subset, s in d["subsets"].items():
        keep = np.ones(len(res.indices), bool) if subset == "all" else res.moving
        ci = d["ci95"][subset]
        assert set(ci) == set(s) - {"count"}
        for name, regions in ci.items():
            assert set(regions) == set(s[name])
            for region, (lo, hi) in regions.items():
                assert lo <= s[name][region] <= hi
                ref = _reference_interval(res.values[name][region][keep], res.clusters[keep])
                np.testing.assert_allclose([lo, hi], ref, rtol=1e-12)
    # the sources of the pairs: 4 synthetic videos and the static one, 7 + 7 + 7 + 7 + 5 pairs
    assert np.array_equal(np.bincount(res.clusters), [7, 7, 7, 7, 5])
    again = evaluate(CopySource(32), root, protocol="same").to_dict()
    assert json.dumps(again["ci95"]) == json.dumps(d["ci95"])


def test_cross_pairs_cluster_by_source_image(root):
    from pyface.data.reenactment import reenactment_pairs

    res = evaluate(CopySource(32), root, protocol="cross")
    pairs = reenactment_pairs(root, resolution=32, protocol="cross")
    for k in range(len(res.clusters)):
        for j in range(len(res.clusters)):
            same_image = bool((pairs[k]["source"]["image"] == pairs[j]["source"]["image"]).all())
            assert (res.clusters[k] == res.clusters[j]) == same_image
    assert res.to_dict()["clusters"]["all"] == len(set(res.clusters)) == 2


def test_one_source_has_no_interval_said_once(root, tmp_path, capsys):
    from pyface.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", "copy-source", "--data", root, "--resolution", "32", "--quiet",
                 "--protocol", "same", "--max-pairs", "1", "--metrics", "psnr",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rep = json.loads(out.read_text())["protocols"]["same"]
    assert rep["ci95"] == {"all": None, "moving": None} or rep["ci95"] == {"all": None}
    assert set(rep["clusters"].values()) == {1}
    assert text.count("fewer than 2 sources") == 1


def test_cli_prints_the_intervals_of_the_json(root, tmp_path, capsys):
    from pyface.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", "copy-source", "--data", root, "--resolution", "32", "--quiet",
                 "--metrics", "psnr,ssim", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rep = json.loads(out.read_text())
    rows = {line.split()[0]: line for line in text.splitlines()
            if line.split()[:1] and "/" in line.split()[0]}
    for proto, r in rep["protocols"].items():
        for subset in r["subsets"]:
            ci = r["ci95"][subset]
            line = rows[f"{proto}/{subset}"]
            assert line.split()[1] == str(r["clusters"][subset])
            assert f"[{ci['psnr']['image'][0]:.2f}, {ci['psnr']['image'][1]:.2f}]" in line
            assert f"[{ci['ssim']['face'][0]:.4f}, {ci['ssim']['face'][1]:.4f}]" in line
    out2 = tmp_path / "r2.json"
    assert main(["eval", "copy-source", "--data", root, "--resolution", "32", "--quiet",
                 "--metrics", "psnr,ssim", "--json", str(out2)]) == 0
    rep2 = json.loads(out2.read_text())
    assert all(rep2["protocols"][p]["ci95"] == rep["protocols"][p]["ci95"]
               for p in rep["protocols"])


# ----------------------------------------------------------------------------------------------
# paired differences (pyface eval --runs)


def _result(values, clusters, moving=None, resolution=32):
    from pyface.eval.evaluate import EvalResult

    n = len(clusters)
    moving = np.ones(n, bool) if moving is None else moving
    return EvalResult("same", "all", resolution, list(range(n)), moving,
                      {"psnr": {"image": np.asarray(values, np.float64)}},
                      clusters=np.asarray(clusters))


def test_paired_difference_of_a_constant_shift_is_exact():
    """b = a + 0.3 on every pair: the difference is 0.3 in every resample, though the values
    themselves vary by source far more (the unpaired intervals overlap)."""
    from pyface.eval.cli import differences

    a, c = _clustered(n_sources=8, per_source=6, spread=3.0)
    ra, rb = _result(a, c), _result(a + 0.3, c)
    d = differences({"a": {"same": ra}, "b": {"same": rb}}, "a")
    got = d["models"]["b"]["same"]["subsets"]["all"]["psnr"]["image"]
    assert got["mean"] == pytest.approx(0.3) and got["pairs"] == 48
    assert got["ci95"] == pytest.approx([0.3, 0.3])
    assert d["models"]["b"]["same"]["clusters"] == {"all": 8, "moving": 8}
    ia, ib = ra.intervals("all")[0]["psnr"]["image"], rb.intervals("all")[0]["psnr"]["image"]
    assert ib[0] < ia[1]                     # unpaired: no separation
    assert S.excludes_zero(got["ci95"]) and not S.excludes_zero([-0.1, 0.2])


def test_paired_difference_matches_a_direct_computation():
    """A known mean difference with source-level noise in the difference: the same bootstrap
    written out on the per-pair differences; NaN pairs of either run left out; a second
    model with no difference is not marked."""
    from pyface.eval.cli import _fmt_diff, differences

    a, c = _clustered(n_sources=10, per_source=5)
    g = np.random.default_rng(7)
    delta = 0.5 + g.normal(0, 0.4, 10)[c] + g.normal(0, 0.05, len(c))
    b = a + delta
    a_nan = a.copy()
    a_nan[[0, 11]] = np.nan
    b[[2]] = np.nan
    moving = np.arange(len(c)) % 2 == 0
    d = differences({"a": {"same": _result(a_nan, c, moving)},
                     "b": {"same": _result(b, c, moving)},
                     "same-as-a": {"same": _result(a_nan + g.normal(0, 1e-3, len(c)), c,
                                                   moving)}}, "a")
    diff = b - a_nan
    for subset, keep in (("all", np.ones(len(c), bool)), ("moving", moving)):
        got = d["models"]["b"]["same"]["subsets"][subset]["psnr"]["image"]
        assert got["pairs"] == int((~np.isnan(diff[keep])).sum())
        assert got["mean"] == pytest.approx(np.nanmean(diff[keep]), rel=1e-12)
        np.testing.assert_allclose(got["ci95"], _reference_interval(diff[keep], c[keep]),
                                   rtol=1e-12)
        assert got["ci95"][0] > 0 and _fmt_diff("psnr", got).endswith(" *")
    none = d["models"]["same-as-a"]["same"]["subsets"]["all"]["psnr"]["image"]
    assert none["ci95"][0] < 0 < none["ci95"][1] and not _fmt_diff("psnr", none).endswith("*")


def test_runs_on_other_pairs_are_not_compared():
    from pyface.eval.cli import differences

    a, c = _clustered(n_sources=4, per_source=3)
    d = differences({"a": {"same": _result(a, c)}, "b": {"same": _result(a, c, resolution=64)},
                     "c": {"same": _result(a[:-1], c[:-1])}}, "a")
    assert d["models"] == {} and set(d["skipped"]) == {"b", "c"}
    assert "64 px" in d["skipped"]["b"] and "not the pairs of a" in d["skipped"]["c"]


def test_cli_runs_report_the_differences_vs_the_first_row(root, tmp_path, capsys):
    """--runs with the baselines only: copy-source is the first row; warp-baseline's mean
    difference is the difference of the two reports' means (no NaN: the same pairs)."""
    from pyface.cli import main

    out = tmp_path / "ev"
    assert main(["eval", "--runs", "--data", root, "--quiet", "--metrics", "psnr,ssim",
                 "--sheet-rows", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    d = rep["differences"]
    assert d["reference"] == "copy-source" and list(d["models"]) == ["warp-baseline"]
    ws, cs = rep["reports"]["warp-baseline"]["protocols"], rep["reports"]["copy-source"]["protocols"]
    assert "model - copy-source" not in (out / "table.md").read_text()   # one table there
    assert "| model - copy-source |" in printed
    row = next(line for line in printed.splitlines() if line.startswith("| warp-baseline | +")
               or line.startswith("| warp-baseline | -"))
    cells = [x.strip() for x in row.strip("|").split("|")][1:]
    k = 0
    for proto, r in cs.items():
        for subset in r["subsets"]:
            for name in ("psnr", "ssim"):
                for region in ("image", "face"):
                    got = d["models"]["warp-baseline"][proto]["subsets"][subset][name][region]
                    assert got["mean"] == pytest.approx(
                        ws[proto]["subsets"][subset][name][region]
                        - r["subsets"][subset][name][region], abs=1e-9)
                    assert cells[k].endswith(" *") == S.excludes_zero(got["ci95"])
                    k += 1
    assert k == len(cells)
