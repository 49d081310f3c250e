"""``pyface eval`` sharded across processes: :func:`shard_groups` splits the source groups,
``evaluate(shard=...)`` evaluates one rank's, :func:`merge_results` joins the ranks' results
into exactly the one-process result, and under torchrun (2 CPU processes, gloo) rank 0 alone
prints and writes the report, which equals the one-process report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from _eval_data import eval_set

from pyface.eval.evaluate import (CopySource, EvalResult, _groups, evaluate, merge_results,
                                  shard_groups)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("evalshard") / "ds")
    return eval_set(out, 3, identities=2, videos_per_identity=1, frames=4, resolution=16)


class NoisySource(CopySource):
    """Copy-source plus noise drawn from torch's global generator: its predictions depend on
    the seeding of each chunk, so they match one process only if the chunks and seeds do."""

    name = "noisy-source"

    def generate(self, state, motion, **controls):
        out = super().generate(state, motion)
        return (out + 0.2 * torch.randn(out.shape)).clamp(-1, 1)

    def implied_landmarks(self, source, driving):
        lm = super().implied_landmarks(source, driving)
        return None if lm is None else lm + torch.randn(lm.shape)


def _assert_same(merged: EvalResult, one: EvalResult) -> None:
    assert merged.indices == one.indices
    for m, regions in one.values.items():
        assert sorted(regions) == sorted(merged.values[m])
        for r, v in regions.items():
            np.testing.assert_array_equal(merged.values[m][r], v, err_msg=f"{m} {r}")
    np.testing.assert_array_equal(merged.moving, one.moving)
    np.testing.assert_array_equal(merged.clusters, one.clusters)
    assert (merged.frames, merged.sources, merged.has_moving) == \
        (one.frames, one.sources, one.has_moving)
    assert merged.jitter == {**one.jitter}, "jitter triples in another order or different"
    assert merged.jitter_summary() == one.jitter_summary()
    assert merged.sheet_pairs == one.sheet_pairs and len(one.sheet_pairs) == 3
    for k, v in one.sheet.items():
        assert torch.equal(merged.sheet[k], v), k
    a, b = merged.to_dict(), one.to_dict()
    for key in ("subsets", "ci95", "clusters", "pairs", "sources", "frames", "jitter", "seed"):
        assert a[key] == b[key], key


@pytest.mark.parametrize("world", [2, 3, 4])
def test_merged_shards_equal_one_process(root, world):
    """Per-pair values, jitter triples, sheet rows and every summary are those of one process,
    with 2, 3 and 4 ranks (4 > the 3 source groups: a rank with nothing to do takes part)."""
    pipe = NoisySource(16)
    kw = dict(protocol="same", metrics=("psnr", "ssim", "jitter"), batch_size=2, sheet_rows=3,
              detector="none", seed=5)
    one = evaluate(pipe, root, **kw)
    parts = [evaluate(pipe, root, shard=(r, world), **kw) for r in range(world)]
    assert sum(int(p.evaluated.sum()) for p in parts) == len(one.indices)
    assert any(not p.evaluated.any() for p in parts) == (world == 4)
    for p in filter(lambda p: p.evaluated.any(), parts):   # its own rows only, others unfilled
        assert np.isnan(p.values["psnr"]["image"][~p.evaluated]).all()
        assert np.isfinite(p.values["psnr"]["image"][p.evaluated]).all()
    merged = merge_results(parts)
    _assert_same(merged, one)
    assert merged.world_size == world and [r["rank"] for r in merged.ranks] == list(range(world))
    assert sum(r["pairs"] for r in merged.ranks) == len(one.indices)
    rep = merged.to_dict()
    assert rep["fps_aggregation"].startswith("frames of all ranks / generation seconds of the "
                                             "slowest rank") and len(rep["ranks"]) == world
    slowest = max(r["seconds"] for r in merged.ranks)
    assert merged.fps == pytest.approx(merged.frames / slowest)
    other = evaluate(pipe, root, **{**kw, "seed": 6})  # the noise is seeded: a seed changes it
    assert not np.array_equal(other.values["psnr"]["image"], one.values["psnr"]["image"])


def test_shard_groups_balances_pairs_deterministically():
    assert shard_groups([5, 1, 1, 1, 1, 1], 2) == [0, 1, 1, 1, 1, 1]
    assert shard_groups([2, 2, 2, 2], 3) == [0, 1, 2, 0]
    assert shard_groups([3, 1], 4) == [0, 1]
    assert shard_groups([], 2) == []
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=rf"world: expected an int >= 1, got {bad!r}"):
            shard_groups([1], bad)


def test_groups_are_whole_sources(root):
    from pyface.data.reenactment import reenactment_pairs

    data = reenactment_pairs(root, resolution=16, protocol="same")
    groups = _groups(data, list(range(len(data))))
    part = evaluate(CopySource(16), root, metrics=("psnr",), shard=(1, 2), detector="none")
    owner = shard_groups([len(g) for g in groups], 2)
    want = sorted(i for g, r in zip(groups, owner) if r == 1 for i in g)
    assert np.flatnonzero(part.evaluated).tolist() == want
    assert part.sources == owner.count(1) and part.frames == len(want)


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0), [0, 2], (0, 2.0)])
def test_bad_shard_names_the_argument(root, shard):
    with pytest.raises(ValueError, match=r"shard: expected \(rank, world\) with 0 <= rank < "
                                         rf"world, got {__import__('re').escape(repr(shard))}"):
        evaluate(CopySource(16), root, metrics=("psnr",), shard=shard, detector="none")


def test_merge_refuses_overlapping_missing_and_foreign_parts(root):
    kw = dict(protocol="same", metrics=("psnr",), detector="none")
    a, b = (evaluate(CopySource(16), root, shard=(r, 2), **kw) for r in range(2))
    first_b = a.indices[int(np.flatnonzero(b.evaluated)[0])]
    with pytest.raises(ValueError, match=rf"merge_results: pair {first_b} was evaluated by part "
                                         r"0 and by part 1 \(\d+ pairs overlap\): the "
                                         "shards overlap"):
        merge_results([b, b])
    first_missing = a.indices[int(np.flatnonzero(~a.evaluated)[0])]
    with pytest.raises(ValueError, match=rf"merge_results: {int((~a.evaluated).sum())} of "
                                         rf"{len(a.indices)} pairs evaluated by no part "
                                         rf"\(first: pair {first_missing}\): a shard is missing"):
        merge_results([a])
    whole = evaluate(CopySource(16), root, **kw)      # no shard: it evaluated every pair
    with pytest.raises(ValueError, match="the shards overlap"):
        merge_results([whole, a])
    other = evaluate(CopySource(16), root, shard=(1, 2), **{**kw, "seed": 3})
    with pytest.raises(ValueError, match=r"part 1's seed \(3\) differs from part 0's \(0\): "
                                         "not shards of one evaluation"):
        merge_results([a, other])
    with pytest.raises(ValueError, match="is itself merged"):
        merge_results([merge_results([a, b]), a])
    with pytest.raises(ValueError, match=r"expected a list of 1 or more EvalResult, got \[\]"):
        merge_results([])
    assert merge_results([whole]).ranks is None          # one part: a one-process result



def test_merge_refuses_parts_with_another_detector_or_without_jitter(root):
    """Parts whose landmark detector differs, or of which one measured jitter and another did
    not, are not shards of one evaluation: a ValueError naming the part and the attribute."""
    import copy

    kw = dict(protocol="same", detector="none", batch_size=2)
    a = evaluate(CopySource(16), root, shard=(0, 2), metrics=("psnr", "jitter"), **kw)
    b = evaluate(CopySource(16), root, shard=(1, 2), metrics=("psnr",), **kw)
    with pytest.raises(ValueError, match=r"merge_results: part 1's jitter \(none\) differs "
                                         r"from part 0's \(measured\): not shards of one "
                                         "evaluation"):
        merge_results([a, b])
    c = evaluate(CopySource(16), root, shard=(1, 2), metrics=("psnr", "jitter"), **kw)
    d = copy.copy(c)
    d.detector = "mediapipe"
    with pytest.raises(ValueError, match=r"merge_results: part 1's detector \('mediapipe'\) "
                                         r"differs from part 0's \(None\)"):
        merge_results([a, d])
    assert merge_results([a, c]).jitter is not None

# -- under torchrun (2 CPU processes, gloo) ---------------------------------------------------

WRAPPER = textwrap.dedent("""
    # pyface eval under torchrun, recording which files each rank writes
    import json, os, sys
    from pyface.cli import main
    from pyface.eval import cli

    out, argv = sys.argv[1], sys.argv[2:]
    writes = []
    for name in ("_write_json", "_write_sheet", "_write_table"):
        def wrap(*a, _f=getattr(cli, name), _n=name, **k):
            writes.append(_n)
            return _f(*a, **k)
        setattr(cli, name, wrap)
    if os.environ.get("FAIL_ON_RANK") == os.environ["RANK"]:   # this rank's evaluation fails
        from pyface.eval.evaluate import CopySource
        def boom(self, *a, **k):
            raise RuntimeError("generate failed on purpose")
        CopySource.generate = boom
    if os.environ.get("FAIL_MERGE") == os.environ["RANK"]:   # joining the parts fails there
        from pyface.eval import evaluate as E
        def broken(parts):
            raise RuntimeError("merging failed on purpose")
        E.merge_results = broken
    code = main(argv)
    with open(os.path.join(out, "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump({"code": code, "writes": writes}, f)
    sys.exit(code)
""")


def _torchrun(tmp_path, *argv, timeout=240, env=None):
    script = tmp_path / "eval_rank.py"
    script.write_text(WRAPPER)
    logs = tmp_path / "ranks"
    logs.mkdir(exist_ok=True)
    import pyface

    here = os.path.dirname(os.path.dirname(os.path.abspath(pyface.__file__)))   # this pyface
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYFACE_DIST_TIMEOUT="120", PYTHONPATH=path,
               **(env or {}))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(logs), *argv],
        env=env, capture_output=True, text=True, timeout=timeout)
    ranks = [json.loads((logs / f"rank{r}.json").read_text()) if (logs / f"rank{r}.json")
             .is_file() else None for r in range(2)]
    return proc, ranks


BASE = ["--quiet", "--device", "cpu", "--detector", "none", "--metrics", "psnr,ssim,jitter",
        "--batch-size", "2", "--sheet-rows", "3"]


def test_torchrun_report_equals_one_process(root, tmp_path):
    """torchrun --nproc_per_node=2 -m pyface eval copy-source ... --protocol both: one table
    printed, one JSON and one sheet written, by rank 0 only; the JSON's means, intervals and
    jitter equal one process's and the sheet is the same image."""
    from pyface.cli import main

    args = ["eval", "copy-source", "--data", root, *BASE, "--protocol", "both"]
    two = tmp_path / "two"
    proc, ranks = _torchrun(tmp_path, *args, "--json", str(two / "r.json"),
                            "--sheet", str(two / "r.png"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ranks[0] == {"code": 0, "writes": ["_write_json", "_write_sheet"]}
    assert ranks[1] == {"code": 0, "writes": []}
    assert proc.stdout.count("copy-source on ") == 1 and proc.stdout.count("wrote ") == 2
    assert "2 ranks under torchrun" in proc.stdout
    assert main([*args, "--json", str(tmp_path / "one.json"),
                 "--sheet", str(tmp_path / "one.png")]) == 0
    a = json.loads((two / "r.json").read_text())
    b = json.loads((tmp_path / "one.json").read_text())
    assert a["world_size"] == 2 and b["world_size"] == 1
    assert list(a["protocols"]) == list(b["protocols"]) == ["same", "cross"]
    for proto, rb in b["protocols"].items():
        ra = a["protocols"][proto]
        for key in ("subsets", "ci95", "clusters", "pairs", "sources", "frames", "jitter"):
            assert ra[key] == rb[key], (proto, key)
        assert [r["rank"] for r in ra["ranks"]] == [0, 1] and "ranks" not in rb
        assert sum(r["pairs"] for r in ra["ranks"]) == ra["pairs"]
        assert ra["fps_aggregation"].startswith("frames of all ranks")
    assert (two / "r.png").read_bytes() == (tmp_path / "one.png").read_bytes()


def test_torchrun_runs_table_and_a_bad_checkpoint(root, tmp_path):
    """--runs under torchrun: rank 0 writes the folder (baselines only, as one process would);
    a --checkpoint that is no run fails alike on both ranks, each exits 1, nothing written."""
    out = tmp_path / "ev"
    proc, ranks = _torchrun(tmp_path, "eval", "--runs", "--data", root, *BASE, "--protocol",
                            "same", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ranks[1] == {"code": 0, "writes": []} and ranks[0]["code"] == 0
    assert sorted(os.listdir(out)) == ["copy-source.json", "copy-source.png", "report.json",
                                       "table.md", "warp-baseline.json", "warp-baseline.png"]
    assert json.loads((out / "report.json").read_text())["reports"]["copy-source"][
        "world_size"] == 2
    bad = tmp_path / "nope"
    proc, ranks = _torchrun(tmp_path, "eval", "example", "--checkpoint", str(bad), "--data",
                            root, *BASE, "--json", str(tmp_path / "x.json"))
    assert proc.returncode != 0 and [r["code"] for r in ranks] == [1, 1], proc.stderr[-3000:]
    assert ranks[0]["writes"] == ranks[1]["writes"] == []
    said = f"pyface eval: checkpoint '{bad}': expected a run folder (with checkpoints/)"
    assert proc.stderr.count(said) == 2 and f"[rank 1] {said}" in proc.stderr, proc.stderr
    assert "another rank" not in proc.stderr and not (tmp_path / "x.json").exists()


def test_torchrun_a_rank_that_fails_stops_every_rank(root, tmp_path):
    """An evaluation that fails on rank 1 only: rank 1 prints its error, rank 0 says which rank
    failed and why; both exit 1 (no rank waits for the other), nothing is written."""
    proc, ranks = _torchrun(tmp_path, "eval", "copy-source", "--data", root, *BASE,
                            "--protocol", "same", "--json", str(tmp_path / "x.json"),
                            env={"FAIL_ON_RANK": "1"})
    assert proc.returncode != 0 and ranks == [{"code": 1, "writes": []}] * 2, proc.stderr[-3000:]
    assert "[rank 1] pyface eval: generate failed on purpose\n" in proc.stderr
    assert ("pyface eval: the same evaluation of copy-source failed on another rank, so every "
            "rank stops (rank 1 of 2: RuntimeError: generate failed on purpose)\n") in proc.stderr
    assert proc.stdout.count("copy-source on ") == 0 and not (tmp_path / "x.json").exists()


def test_torchrun_a_merge_that_fails_on_rank_0_stops_every_rank(root, tmp_path):
    """Joining the parts fails on rank 0 (an error other than a ValueError): rank 0 prints it,
    rank 1 is told and exits 1 without an error of its own (no rank waits for the other),
    nothing is written."""
    proc, ranks = _torchrun(tmp_path, "eval", "copy-source", "--data", root, *BASE,
                            "--protocol", "same", "--json", str(tmp_path / "x.json"),
                            env={"FAIL_MERGE": "0"})
    assert proc.returncode != 0 and ranks == [{"code": 1, "writes": []}] * 2, proc.stderr[-3000:]
    assert "pyface eval: merging failed on purpose\n" in proc.stderr
    assert "[rank 1]" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "x.json").exists()


def test_pack_sends_only_a_shards_rows(root):
    """What a rank sends to rank 0 holds its own rows only (a fraction of the per-pair arrays,
    fid / kid's 2048 features per pair included); unpacked, it merges as before."""
    from pyface.eval.distributed import pack, unpack

    kw = dict(protocol="same", metrics=("psnr", "ssim"), detector="none")
    parts = [evaluate(CopySource(16), root, shard=(r, 2), **kw) for r in range(2)]
    for p in parts:                                  # as if fid / kid had run
        p.features = {k: np.where(p.evaluated[:, None], 1.0 + np.arange(len(p.indices))[:, None],
                                  np.nan) * np.ones((1, 4)) for k in ("real", "fake")}
    packed = [pack(p) for p in parts]
    for p, q in zip(parts, packed):
        n = int(p.evaluated.sum())
        assert 0 < n < len(p.indices)
        assert q.values["psnr"]["image"].shape == (n,) and q.features["real"].shape == (n, 4)
        assert q.moving.shape == (n,) and p.values["psnr"]["image"].shape == (len(p.indices),)
        u = unpack(q)
        for m, regions in p.values.items():
            for r, v in regions.items():
                np.testing.assert_array_equal(u.values[m][r], v)
        np.testing.assert_array_equal(u.moving, p.moving)
        np.testing.assert_array_equal(u.features["fake"], p.features["fake"])
    merged = merge_results([unpack(q) for q in packed])
    np.testing.assert_array_equal(merged.features["real"][:, 0],
                                  1.0 + np.arange(len(merged.indices)))
    whole = evaluate(CopySource(16), root, **kw)
    assert pack(whole) is whole and unpack(whole) is whole
