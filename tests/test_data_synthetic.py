"""The synthetic ground-truth engine, the on-disk format and `pyface data check`."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from pyface.data import format as fmt
from pyface.data import synthetic as S
from pyface.face import MorphableModel
from pyface.face.coeffs import LAYOUT


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "ds")
    S.generate(out, S.default_config(), progress=False)
    return out


def _files(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f != "synth.json":
                p = os.path.join(d, f)
                out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_layout(root):
    recs = fmt.load_index(root)
    assert [r.name for r in recs] == ["id0000_v00", "id0000_v01", "id0001_v00", "id0001_v01"]
    for r in recs:
        assert r.num_frames == 8 and r.has_masks and r.has_landmarks and r.resolution == [64, 64]
        d = os.path.join(root, r.name)
        assert sorted(os.listdir(os.path.join(d, "frames"))) == [f"{i:05d}.png" for i in range(8)]
        meta = json.load(open(os.path.join(d, "meta.json")))
        assert meta["identity"] == r.identity and meta["fps"] == 25.0 and meta["source"] == "synthetic"
        labels = json.load(open(os.path.join(d, "dataset.json")))["labels"]
        assert labels[3][0] == "frames/00003.png" and len(labels[3][1]) == 25
        assert np.load(os.path.join(d, "coeffs.npy")).shape == (8, 257)
        assert np.load(os.path.join(d, "landmarks.npy")).shape == (8, 68, 2)
    cross = fmt.load_index(os.path.join(root, "cross"))
    assert [r.name for r in cross] == ["id0000_by_id0001_v00", "id0001_by_id0000_v00"]


def test_ground_truth_is_consistent(root):
    """Stored cameras, landmarks and masks are what the stored coefficients render to."""
    model = MorphableModel.builtin()
    rec = fmt.load_index(root)[1]
    c = torch.from_numpy(fmt.load_coeffs(root, rec))
    labels = torch.from_numpy(fmt.load_labels(root, rec))
    torch.testing.assert_close(labels, model.label_of(c), rtol=1e-5, atol=1e-5)
    lms = np.load(rec.path(root, fmt.LANDMARKS))
    torch.testing.assert_close(torch.from_numpy(lms), model.landmarks2d(c, image_size=64), rtol=1e-4, atol=1e-3)
    r = model.render(c[:2], 64)
    mask = np.stack([fmt.read_mask(root, rec, i) for i in range(2)]) > 127
    assert np.array_equal(mask, r.mask[:, 0].numpy() > 0.5)
    # pose and identity ranges
    for rec in fmt.load_index(root):
        c = fmt.load_coeffs(root, rec)
        assert np.abs(c[:, 225]).max() <= S.YAW_LIMIT + 1e-6
        assert np.abs(c[:, 224]).max() <= S.PITCH_LIMIT + 1e-6
        assert np.all(c[:, :80] == c[0, :80]) and np.all(c[:, 144:224] == c[0, 144:224])
        assert np.all(c[:, 80 + 25:144] == 0)      # unused expression slots stay zero


def test_identities_differ_and_videos_share_identity(root):
    recs = fmt.load_index(root)
    c = {r.name: fmt.load_coeffs(root, r) for r in recs}
    assert np.array_equal(c["id0000_v00"][0, :80], c["id0000_v01"][0, :80])
    assert not np.allclose(c["id0000_v00"][0, :80], c["id0001_v00"][0, :80])
    a = fmt.read_frame(root, recs[0], 0).astype(float)
    b = fmt.read_frame(root, recs[2], 0).astype(float)
    assert np.abs(a - b).mean() > 10
    # expressions move over a video
    assert np.ptp(c["id0000_v00"][:, 80], axis=0) > 0.05


def test_cross_identity_ground_truth(root):
    cross_root = os.path.join(root, "cross")
    rec = fmt.load_index(cross_root)[0]
    meta = json.load(open(rec.path(cross_root, "meta.json")))
    assert meta["source_video"] == "id0000_v00" and meta["driving_video"] == "id0001_v00"
    assert meta["driving_identity"] == "id0001" and rec.identity == "id0000"
    cc = fmt.load_coeffs(cross_root, rec)
    src = fmt.load_coeffs(root, fmt.scan_video(root, "id0000_v00"))
    drv = fmt.load_coeffs(root, fmt.scan_video(root, "id0001_v00"))
    sl = LAYOUT
    for k in ("id", "tex"):
        assert np.array_equal(cc[:, sl[k]], src[:, sl[k]])
    for k in ("exp", "angles", "trans"):
        assert np.array_equal(cc[:, sl[k]], drv[:, sl[k]])
    assert np.array_equal(cc[:, sl["gamma"]], np.repeat(src[:1, sl["gamma"]], 8, 0))
    # same background as identity A (corner pixels)
    a = fmt.read_frame(root, fmt.scan_video(root, "id0000_v00"), 0)
    t = fmt.read_frame(cross_root, rec, 0)
    assert np.abs(a[0, 0].astype(int) - t[0, 0].astype(int)).max() <= 1


def test_deterministic_across_runs_and_workers(tmp_path, root):
    out = str(tmp_path / "again")
    S.generate(out, S.default_config(workers=2), progress=False)
    a, b = _files(root), _files(out)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)
    other = S.sample_identity(MorphableModel.builtin(), seed=1, identity=0, resolution=8)[0]
    same = S.sample_identity(MorphableModel.builtin(), seed=0, identity=0, resolution=8)[0]
    assert not np.array_equal(other, same)


def test_task_stream_is_read_as_results_come_back():
    """`pyface data synth` never lists its tasks: _unordered reads an endless task stream only
    as far as the results taken so far plus its window, and raises a task's error."""
    import itertools
    from multiprocessing.pool import ThreadPool

    pulled = []

    def stream():
        for k in itertools.count():
            pulled.append(k)
            yield k

    with ThreadPool(2) as pool:
        got = []
        for r in S._unordered(pool, lambda k: k * k, stream(), window=3):
            got.append(r)
            assert len(pulled) <= len(got) + 3
            if len(got) == 20:
                break
        assert len(set(got)) == 20 and set(got) <= {k * k for k in pulled}

        def boom(k):
            raise ValueError(f"task {k}")
        with pytest.raises(ValueError, match="task "):
            list(S._unordered(pool, boom, range(5), window=2))
        assert list(S._unordered(pool, boom, [], window=2)) == []


def test_generate_streams_its_tasks(tmp_path, monkeypatch):
    """The render tasks reach the pool as a generator through the bounded window (no list of
    every video), and the set is the same, file for file, as with one worker; _task_count
    counts what _tasks yields."""
    import inspect

    for kw in ({}, {"cross": False}, {"multiview": True}, {"identities": 3, "multiview": True,
                                                          "cross": False}):
        cfg = S.default_config(**kw)
        assert S._task_count(cfg) == len(list(S._tasks(cfg, "a", "b", "c")))
    seen = []
    real = S._unordered

    def spy(pool, fn, tasks, window):
        seen.append((inspect.isgenerator(tasks), window))
        return real(pool, fn, tasks, window)

    monkeypatch.setattr(S, "_unordered", spy)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    S.generate(one, S.default_config(frames=2, resolution=16, multiview=True), progress=False)
    S.generate(two, S.default_config(frames=2, resolution=16, multiview=True, workers=2),
               progress=False)
    assert seen == [(True, 2 * S.SUBMIT_AHEAD)]
    a, b = _files(one), _files(two)
    assert a.keys() == b.keys() and len(a) > 0 and all(a[k] == b[k] for k in a)


def test_motion_ranges_and_blinks():
    model = MorphableModel.builtin()
    exp, ang, tr, gam = S.sample_motion(model, 0, 3, 1, frames=250, fps=25.0)
    assert exp.shape == (250, 64) and ang.shape == (250, 3) and tr.shape == (250, 3) and gam.shape == (250, 27)
    assert np.abs(ang[:, 1]).max() <= math.radians(35) + 1e-6
    assert np.abs(ang[:, 0]).max() <= math.radians(20) + 1e-6
    blink = exp[:, model.exp_names.index("blink_left")]
    assert blink.max() > 0.9 and (blink > 0.5).mean() < 0.2       # 10 s: several short blinks
    # smooth: no jumps larger than a small fraction of the range between frames
    assert np.abs(np.diff(ang, axis=0)).max() < math.radians(3)


def test_config_validation():
    with pytest.raises(ValueError, match="frames: expected > 0"):
        S.SynthConfig(frames=0)
    with pytest.raises(ValueError, match="identities >= 2"):
        S.SynthConfig(identities=1, cross=True)


def test_check_command_reports_bad_files(root, tmp_path, capsys):
    from pyface.cli import main

    assert main(["data", "check", root]) == 0
    assert "OK" in capsys.readouterr().out
    bad = str(tmp_path / "bad")
    shutil.copytree(root, bad)
    v0, v1 = os.path.join(bad, "id0000_v00"), os.path.join(bad, "id0001_v00")
    open(os.path.join(v0, "frames", "00003.png"), "wb").write(b"\x89PNG garbage")
    os.remove(os.path.join(v0, "masks", "00005.png"))
    np.save(os.path.join(v1, "coeffs.npy"), np.zeros((7, 257), np.float32))
    lab = json.load(open(os.path.join(v1, "dataset.json")))
    lab["labels"][2][1][5] = float("nan")
    json.dump(lab, open(os.path.join(v1, "dataset.json"), "w"))
    assert main(["data", "check", bad]) == 1
    out = capsys.readouterr().out
    assert "id0000_v00/frames/00003.png: corrupt or unreadable frame" in out
    assert "id0000_v00/masks/00005.png: missing mask" in out
    assert "id0001_v00/coeffs.npy: expected shape (8, 257) for 8 frames, got (7, 257)" in out
    assert "id0001_v00/dataset.json: NaN or inf camera for frame 2" in out
    assert out.rstrip().endswith(": 4 problems"), out
    # the fast mode finds missing but not corrupt files
    assert main(["data", "check", "--fast", bad]) == 1
    assert "00003.png" not in capsys.readouterr().out
    # an unindexed folder is reported, `pyface data index` fixes it
    shutil.copytree(os.path.join(root, "id0000_v01"), os.path.join(bad, "extra_video"))
    main(["data", "check", "--fast", bad])
    assert "extra_video: video folder not in index.json" in capsys.readouterr().out
    assert main(["data", "index", bad]) == 0
    assert "extra_video" in [r.name for r in fmt.load_index(bad)]


def test_synth_command(tmp_path, capsys):
    from pyface.cli import main

    out = str(tmp_path / "cli")
    assert main(["data", "synth", "--out", out, "--identities", "2", "--videos-per-identity", "1",
                 "--frames", "3", "--resolution", "32", "--workers", "1", "--quiet"]) == 0
    assert "wrote 2 videos + 2 cross-identity videos (12 frames)" in capsys.readouterr().out
    assert main(["data", "check", out]) == 0


def test_make_default(tmp_path):
    out = str(tmp_path / "demo")
    assert S.make_default(out, frames=2, resolution=32) == out
    recs = fmt.load_index(out)
    assert len(recs) == 4 and recs[0].num_frames == 2 and recs[0].resolution == [32, 32]
    stamp = os.path.getmtime(os.path.join(out, fmt.INDEX))
    S.make_default(out)                      # already there: not regenerated
    assert os.path.getmtime(os.path.join(out, fmt.INDEX)) == stamp
