"""`pyface data synth | pairs | cache | check | index | bench` on bad input: every refusal is an
exit code and one message naming the option or file, never a traceback or a half-written set
taken as complete."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest

from pyface.cli import main
from pyface.data import format as fmt
from pyface.data import synthetic as S

TINY = dict(identities=2, videos_per_identity=1, frames=3, resolution=16, workers=1, cross=False)
TINY_ARGS = ["--identities", "2", "--videos-per-identity", "1", "--frames", "3",
             "--resolution", "16", "--workers", "1", "--no-cross", "--quiet"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "tiny")
    S.generate(out, S.SynthConfig(**TINY), progress=False)
    return out


def _files(root):
    """{relative path: bytes} of a generated set, without the timing summary."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            if n != "synth.json":
                out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


@pytest.mark.parametrize("field,value,message", [
    ("fps", 0.0, "fps: expected a finite frame rate"),      # 0 made the blink loop endless
    ("fps", -5.0, "fps: expected a finite frame rate"),
    ("fps", float("nan"), "fps: expected a finite frame rate"),
    ("fps", 1e-9, "fps: expected a finite frame rate"),
    ("seed", -1, "seed: expected >= 0"),
    ("workers", -3, "workers: expected >= 0"),
    ("exp_leak", float("inf"), "exp_leak: expected a finite number"),
    ("resolution", 100_000, "resolution: expected at most 4096"),
])
def test_synth_config_rejects_edge_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        S.SynthConfig(**{**TINY, field: value})


def test_synth_cli_names_the_option(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["data", "synth", "--out", out, *TINY_ARGS, "--fps", "0"]) == 2
    assert "pyface data synth: --fps: expected a finite frame rate >= 0.1, got 0.0" in \
        capsys.readouterr().err
    assert main(["data", "synth", "--out", out, *TINY_ARGS, "--seed", "-1"]) == 2
    assert "--seed: expected >= 0" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_synth_out_refusals(tmp_path, tiny, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [(str(afile), "exists and is not a folder"),
             (str(foreign), "not empty (notes.txt) and not written by `pyface data synth`"),
             (os.path.join(tiny, "inner"), f"inside the dataset {os.path.abspath(tiny)}"),
             (os.path.join(tiny, "id0000_v00", "x"), "inside the dataset"),
             (str(afile / "sub"), f"cannot create its folder: {afile} is a file")]
    for out, message in cases:
        assert main(["data", "synth", "--out", out, *TINY_ARGS]) == 2, out
        err = capsys.readouterr().err
        assert f"pyface data synth: --out {out}: {message}" in err, err
        assert "Traceback" not in err and err.count("\n") == 1, err
    assert os.listdir(foreign) == ["notes.txt"]
    assert not os.path.exists(os.path.join(tiny, "inner"))
    # another config over a complete set: refused, naming what differs; the same: nothing to do
    before = _files(tiny)
    assert main(["data", "synth", "--out", tiny, *TINY_ARGS, "--frames", "4"]) == 2
    assert "holds a synthetic dataset with other options (frames 3 -> 4)" in \
        capsys.readouterr().err
    assert main(["data", "synth", "--out", tiny, *TINY_ARGS]) == 0
    assert "already holds this dataset" in capsys.readouterr().out
    assert _files(tiny) == before


def _interrupted_copy(tiny, dst):
    """The state a kill leaves: marker present, no index or summary, the last video without
    meta.json and with a truncated frame."""
    shutil.copytree(tiny, dst)
    with open(os.path.join(dst, "synth.json")) as f:
        cfg = S.SynthConfig(**json.load(f)["config"])
    from pyface.data.cache import content_key
    fmt._dump(os.path.join(dst, S.PARTIAL), {"config": content_key(cfg)})
    os.remove(os.path.join(dst, "synth.json"))
    os.remove(os.path.join(dst, fmt.INDEX))
    os.remove(os.path.join(dst, "id0001_v00", fmt.META))
    with open(os.path.join(dst, "id0001_v00", "frames", "00002.png"), "r+b") as f:
        f.truncate(10)
    return dst


def test_unfinished_set_is_refused_then_resumed(tmp_path, tiny, capsys):
    from pyface.data.datasets import PairDataset

    part = _interrupted_copy(tiny, str(tmp_path / "part"))
    with pytest.raises(fmt.DataError, match="unfinished `pyface data synth`"):
        PairDataset(part)
    with pytest.raises(fmt.DataError, match="unfinished"):
        fmt.write_index(part)
    records, problems = fmt.check_dataset(part)
    assert records == [] and len(problems) == 1 and S.PARTIAL in problems[0]
    assert main(["data", "check", part]) == 1
    assert main(["data", "index", part]) == 1
    assert main(["data", "pairs", part]) == 1
    assert not os.path.exists(os.path.join(part, fmt.INDEX))
    capsys.readouterr()
    # other options: refused, naming the difference; the same: finishes, keeping the finished video
    with pytest.raises(fmt.DataError, match=r"unfinished .* other options \(seed 0 -> 1\)"):
        S.generate(part, S.SynthConfig(**{**TINY, "seed": 1}), progress=False)
    kept = os.stat(os.path.join(part, "id0000_v00", fmt.META)).st_mtime_ns
    s = S.generate(part, S.SynthConfig(**TINY), progress=False)
    assert s["resumed_videos"] == 1 and s["videos"] == 2
    assert os.stat(os.path.join(part, "id0000_v00", fmt.META)).st_mtime_ns == kept
    assert not os.path.exists(os.path.join(part, S.PARTIAL))
    assert _files(part) == _files(tiny)
    assert fmt.check_dataset(part)[1] == []


def _run_synth(out, extra, *, until, sig):
    """Starts `pyface data synth` in its own session and sends ``sig`` once ``until()``."""
    cmd = [sys.executable, "-m", "pyface", "data", "synth", "--out", out, "--identities", "3",
           "--videos-per-identity", "1", "--frames", "24", "--resolution", "32", "--workers",
           "1", "--no-cross", "--quiet", *extra]
    p = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while p.poll() is None and not until() and time.time() - t0 < 120:
        time.sleep(0.02)
    if p.poll() is None:
        os.killpg(p.pid, sig)
    out_, err = p.communicate(timeout=120)
    return p.returncode, out_, err


def test_synth_sigint_and_sigkill_then_rerun(tmp_path):
    out = str(tmp_path / "set")
    frames = os.path.join(out, "id0000_v00", "frames")
    rc, _, err = _run_synth(out, [], until=lambda: os.path.isdir(frames), sig=signal.SIGINT)
    finished = (os.path.isfile(os.path.join(out, fmt.INDEX))
                and not os.path.isfile(os.path.join(out, S.PARTIAL)))
    # it may finish first (a fast machine; or a loaded one, where the signal lands during the
    # interpreter's exit); then there is nothing to check
    if rc != 0 and not finished:
        assert rc == 130, err
        assert "interrupted:" in err and "Traceback" not in err
        assert os.path.isfile(os.path.join(out, S.PARTIAL))
        assert not os.path.isfile(os.path.join(out, fmt.INDEX))
    first = os.path.join(out, "id0000_v00", fmt.META)
    rc, _, err = _run_synth(out, [], until=lambda: os.path.isfile(first), sig=signal.SIGKILL)
    if rc != 0:
        assert rc == -signal.SIGKILL
        assert os.path.isfile(os.path.join(out, S.PARTIAL))
        assert fmt.check_dataset(out)[1][0].endswith("run the same command again to finish "
                                                     "it, or delete the folder")
    rc, stdout, err = _run_synth(out, [], until=lambda: False, sig=signal.SIGKILL)
    assert rc == 0, err
    ref = str(tmp_path / "ref")
    S.generate(ref, S.SynthConfig(identities=3, videos_per_identity=1, frames=24, resolution=32,
                                  workers=1, cross=False), progress=False)
    assert _files(out) == _files(ref)


def test_index_refuses_what_is_not_a_dataset_root(tmp_path, tiny, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "index", str(empty)]) == 1
    assert "no video folders" in capsys.readouterr().err
    assert not (empty / fmt.INDEX).exists()         # an empty index.json made it look like a set
    video = os.path.join(tiny, "id0000_v00")
    assert main(["data", "index", video]) == 1
    assert "a video folder (meta.json or frames/), not a dataset root" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(video, fmt.INDEX))
    assert main(["data", "index", str(tmp_path / "missing")]) == 1
    assert "dataset root not found" in capsys.readouterr().err
    assert main(["data", "check", video]) == 1
    assert "not a dataset root" in capsys.readouterr().out


def test_corrupt_meta_json_is_reported(tmp_path, tiny, capsys):
    bad = str(tmp_path / "bad")
    shutil.copytree(tiny, bad)
    meta = os.path.join(bad, "id0000_v00", fmt.META)
    with open(meta, "w") as f:
        f.write("{bad")
    assert main(["data", "check", bad]) == 1
    assert f"ERROR {meta}: not valid JSON" in capsys.readouterr().out
    assert main(["data", "pairs", bad]) == 1        # was a JSONDecodeError traceback
    err = capsys.readouterr().err
    assert err.startswith(f"pyface data pairs: {meta}: not valid JSON"), err


def test_pairs_and_bench_errors_are_one_line(tmp_path, tiny, capsys):
    notds = tmp_path / "notds"
    notds.mkdir()
    (notds / "readme.txt").write_text("x")
    why = ("no usable videos (no index.json and no video folders, folders with meta.json or "
           "frames/: not a pyface dataset root)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no index warning before the error
        assert main(["data", "pairs", str(notds)]) == 1
        assert capsys.readouterr().err.strip() == f"pyface data pairs: {notds}: {why}"
        assert main(["data", "bench", "--root", str(notds)]) == 1
        out = capsys.readouterr()
        assert out.err.strip() == f"pyface data bench: {notds}: {why}" and out.out == ""
    for option, value in (("--samples", "0"), ("--batch-size", "0"), ("--workers", "-1")):
        assert main(["data", "bench", "--root", tiny, option, value]) == 2
        assert f"pyface data bench: {option}: expected >=" in capsys.readouterr().err
    assert main(["data", "bench", "--frames", "0"]) == 2
    assert "pyface data bench: --frames: expected > 0, got 0" in capsys.readouterr().err


def test_cache_bad_build_options(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYFACE_CACHE", str(tmp_path))
    assert main(["data", "cache", "--build", "0"]) == 2
    assert "pyface data cache: --build: expected > 0, got 0" in capsys.readouterr().err
    assert main(["data", "cache", "--build", "16", "--set", "zoom=5"]) == 2
    assert "--set zoom: expected a log-scale amplitude" in capsys.readouterr().err
    assert main(["data", "cache", "--build", "16", "--set", "frames=abc"]) == 2
    assert "--set frames" in capsys.readouterr().err
    assert not (tmp_path / "synthetic").exists()
    junk = tmp_path / "synthetic" / "junk"
    junk.mkdir(parents=True)
    (junk / "synth.json").write_text("{")
    (junk / fmt.INDEX).write_text("{}")
    (tmp_path / "synthetic" / ".2x1x3-16px-0123.tmp-abc").mkdir()    # a killed generation's
    assert main(["data", "cache"]) == 0
    out = capsys.readouterr().out
    assert "junk  (unreadable synth.json" in out
    assert ".2x1x3-16px-0123.tmp-abc  (temporary folder of an interrupted generation" in out


def test_data_path_that_is_a_file_or_unfinished(tmp_path, tiny):
    from pyface.data.builtin import SynthOptions, resolve_root
    from pyface.train.config import DataConfig

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(fmt.DataError, match="data.path: .*afile: not a folder"):
        resolve_root(DataConfig(path=str(afile), resolution=16), SynthOptions())
    # an interrupted generation into data.path is finished, not loaded half-written
    opts = SynthOptions(identities=2, videos_per_identity=1, frames=3, cross=False,
                        multiview=False, workers=1)
    root = str(tmp_path / "gen")
    S.generate(root, opts.synth_config(16), progress=False)
    part = _interrupted_copy(root, str(tmp_path / "part"))
    assert resolve_root(DataConfig(path=part, resolution=16), opts) == part
    assert fmt.check_dataset(part)[1] == []
    assert len(fmt.load_index(part)) == 2



def test_absent_data_path_is_said_and_a_missing_parent_refused(tmp_path, caplog):
    """An absent ``data.path`` gets the synthetic set generated into it, as documented, with a
    warning naming it (a mistyped path to a dataset used to be filled silently); an empty one
    with an info line; an absent one whose parent folder does not exist (a typo in a parent) is
    refused before anything is written."""
    import logging

    from pyface.data.builtin import SynthOptions, resolve_root
    from pyface.train.config import DataConfig

    opts = SynthOptions(identities=2, videos_per_identity=1, frames=2, cross=False,
                        multiview=False, workers=1)
    typo = tmp_path / "no_such_dir" / "set"
    with pytest.raises(fmt.DataError, match=re.escape(
            f"data.path {typo}: neither it nor its parent folder {typo.parent} exists (a typo?); "
            "the synthetic set is generated into an empty or absent data.path whose parent "
            "folder exists")):
        resolve_root(DataConfig(path=str(typo), resolution=16), opts)
    assert not typo.parent.exists()
    absent, empty = tmp_path / "absent", tmp_path / "empty"
    empty.mkdir()
    with caplog.at_level(logging.INFO, logger="pyface.data"):
        assert resolve_root(DataConfig(path=str(absent), resolution=16), opts) == str(absent)
        assert resolve_root(DataConfig(path=str(empty), resolution=16), opts) == str(empty)
        assert resolve_root(DataConfig(path=str(empty), resolution=16), opts) == str(empty)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "pyface.data"]
    what = "data.options.synth: identities=2, videos_per_identity=1, frames=2; 16 px"
    assert said == [
        ("WARNING", f"data.path {absent} does not exist: generating the synthetic set there "
                    f"({what}; a dataset meant to be read from elsewhere: check the path)"),
        ("INFO", f"data.path {empty} is empty: generating the synthetic set there ({what})")]
    assert len(fmt.load_index(str(absent))) == len(fmt.load_index(str(empty))) == 2

# ------------------------------------------------------------------------------------------
# training data keys: a dataset without the labels the model reads fails before any step
# ------------------------------------------------------------------------------------------

def _image_only(src, dst):
    shutil.copytree(src, dst)
    for d in os.listdir(dst):
        for f in ("coeffs.npy", "dataset.json", "landmarks.npy"):
            p = os.path.join(dst, d, f)
            if os.path.isfile(p):
                os.remove(p)
    fmt.write_index(dst)
    return dst


def test_missing_labels_are_named_before_training(tmp_path, tiny):
    from pyface.train.config import DataConfig
    from pyface.train.engine import check_data_keys
    from pyface.train.registry import build_dataset

    class NeedsCamera:
        def data_keys(self):
            return {"image": None, "camera": None}

    class NeedsDrivingCoeffs:
        def data_keys(self):
            return {"source": {"image": None}, "driving": {"image": None, "coeffs": None}}

    root = _image_only(tiny, str(tmp_path / "io"))
    frames = build_dataset(DataConfig(name="synthetic", path=root, resolution=16))
    with pytest.raises(fmt.DataError) as e:
        check_data_keys(NeedsCamera(), frames)
    msg = str(e.value)
    assert "model NeedsCamera needs item['camera'], from each video's dataset.json" in msg
    assert "the dataset's items have frame, identity, image, index" in msg
    pairs = build_dataset(DataConfig(name="pairs", path=root, resolution=16))
    with pytest.raises(fmt.DataError, match=r"needs item\['driving'\]\['coeffs'\], from each "
                                            r"video's coeffs.npy .*; the dataset's "
                                            r"item\['driving'\] has frame, identity, image"):
        check_data_keys(NeedsDrivingCoeffs(), pairs)
    check_data_keys(NeedsCamera(), build_dataset(DataConfig(name="synthetic", path=tiny,
                                                            resolution=16)))


def test_engine_checks_the_model_data_keys_before_the_first_step(tmp_path, monkeypatch):
    from pyface.train import Trainer, build_experiment
    from pyface.train.example import TriplaneAutoencoder as M

    monkeypatch.setattr(M, "data_keys", lambda self: {"image": None, "camera": None},
                        raising=False)
    cfg = build_experiment("example", M.Config, defaults=M.recipe, overrides=[
        "model.resolution=16", "model.plane_resolution=8", "model.plane_channels=4",
        "model.encoder_channels=8", "model.hidden=8", "model.depth_samples=4", "data.resolution=16", "data.size=8", "train.batch_size=2", "train.steps=1",
        f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(fmt.DataError, match=r"data \(data.name=procedural, data.path=unset: the "
                                            r"built-in set\): model example needs "
                                            r"item\['camera'\].*items have image, index"):
        Trainer(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_portrait_models_declare_the_labels_they_read():
    from pyface.train import registry

    def keys(name, **cfg):
        cls = registry.model_class(name)
        model = cls.__new__(cls)            # the declaration reads the config only
        model.cfg = cls.Config(**cfg)
        return model.data_keys()

    assert keys("eg3d") == {"image": None, "camera": None}
    assert keys("otavatar") == {"image": None, "motion": None, "camera": None}
    assert keys("export3d_clebs") == {"image": None, "coeffs": None}
    assert keys("export3d")["driving"] == {"image": None, "coeffs": None, "camera": None}
    assert "coeffs" in keys("mmfa")["source"]
    assert "coeffs" not in keys("mmfa", rotation="none")["source"]
    assert keys("goha_s1")["source"] == {"image": None, "camera": None, "coeffs": None}


def test_cross_identity_without_cross_names_what_writes_it(tiny):
    from pyface.data.datasets import CrossIdentityDataset

    with pytest.raises(fmt.DataError, match=r"/cross: missing; the cross-identity ground truth "
                                            r"is written by the synthetic engine with cross=True"):
        CrossIdentityDataset(tiny)      # generated with --no-cross


def test_zipped_video_set_is_named_as_such(tmp_path, tiny, capsys):
    import zipfile

    z = str(tmp_path / "set.zip")
    with zipfile.ZipFile(z, "w") as f:
        for d, _, names in os.walk(tiny):
            for n in names:
                f.write(os.path.join(d, n), os.path.relpath(os.path.join(d, n), tiny))
    for cmd, stream in ((["check", z], "out"), (["index", z], "err"), (["pairs", z], "err"),
                        (["bench", "--root", z], "err")):
        assert main(["data", *cmd]) == 1
        text = getattr(capsys.readouterr(), stream)
        assert f"{z}: a zip file; a pyface video dataset is a folder (unzip it" in text, cmd


def test_pairs_resolution_and_single_frame_videos(tmp_path, tiny, capsys):
    assert main(["data", "pairs", tiny, "--resolution", "0"]) == 2     # was a torch traceback
    assert "pyface data pairs: --resolution: expected > 0, got 0" in capsys.readouterr().err
    one = str(tmp_path / "one")
    S.generate(one, S.SynthConfig(**{**TINY, "frames": 1}), progress=False)
    assert main(["data", "pairs", one]) == 0
    assert capsys.readouterr().out == "same : 0 pairs (every video has a single frame)\n"


def test_cache_set_without_build_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYFACE_CACHE", str(tmp_path))
    assert main(["data", "cache", "--set", "zoom=0.2"]) == 2    # was ignored silently
    assert "--set needs --build RESOLUTION" in capsys.readouterr().err


def test_synth_refuses_a_folder_another_run_is_writing(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)          # what a running generation holds
        with pytest.raises(fmt.DataError, match="another `pyface data synth` is writing it"):
            S.generate(str(out), S.SynthConfig(**TINY), progress=False)
    finally:
        os.close(fd)
    assert os.listdir(out) == []
    S.generate(str(out), S.SynthConfig(**TINY), progress=False)     # the lock is gone
    assert fmt.check_dataset(str(out))[1] == []


@pytest.mark.parametrize("synth,resolution,message", [
    ({"fps": 0.0}, 16, "data.options.synth.fps: expected a finite frame rate >= 0.1, got 0.0"),
    ({"frames": 0}, 16, "data.options.synth.frames: expected > 0, got 0"),
    ({}, 0, "data.resolution: expected > 0, got 0"),
    ({"resolution": 5000}, 16, "data.options.synth.resolution: expected at most 4096"),
])
def test_bad_builtin_set_options_name_their_key(tmp_path, monkeypatch, synth, resolution,
                                                message):
    from pyface.data.builtin import SynthOptions, resolve_root
    from pyface.train.config import DataConfig

    monkeypatch.setenv("PYFACE_CACHE", str(tmp_path / "cache"))
    for path in (None, str(tmp_path / "gen")):      # the cached set, or generated into data.path
        with pytest.raises(fmt.DataError, match=re.escape(message)):
            resolve_root(DataConfig(path=path, resolution=resolution), SynthOptions(**synth))
    assert not (tmp_path / "gen").exists()


@pytest.mark.parametrize("name,key,value,low", [("pairs", "min_gap", -1, 0),
                                                ("pairs", "repeats", 0, 1),
                                                ("clips", "min_gap", 0, 1),
                                                ("motion_windows", "frames_per_item", 0, 1)])
def test_bad_dataset_options_are_named_before_any_generation(tmp_path, name, key, value, low):
    from pyface.train.config import DataConfig
    from pyface.train.registry import build_dataset

    gen = tmp_path / "gen"              # empty data.path: the built-in set would be rendered here
    with pytest.raises(fmt.DataError, match=rf"data.options.{key}: expected >= {low} for "
                                            rf"\w+, got {value}"):
        build_dataset(DataConfig(name=name, path=str(gen), resolution=16,
                                 options={key: value}))
    assert not gen.exists()


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch, capsys):
    """Ctrl-C in a command without its own handling (here `pyface data check`) prints one line
    naming the command and exits with 130, not a traceback."""
    import pyface.data.cli as data_cli
    from pyface.cli import main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_cli, "_check", interrupted)
    assert main(["data", "check", "anywhere"]) == 130
    assert capsys.readouterr().err == "\npyface data check: interrupted\n"


def test_counts_of_one_are_singular(tmp_path, capsys):
    """`pyface data synth` / `check` / `index` print '1 video', '1 frame', not '1 videos'."""
    from pyface.cli import main, plural

    assert (plural(1, "frame"), plural(0, "frame"), plural(3, "video")) == \
        ("1 frame", "0 frames", "3 videos")
    out = str(tmp_path / "one")
    assert main(["data", "synth", "--out", out, "--identities", "1", "--videos-per-identity",
                 "1", "--frames", "1", "--resolution", "16", "--no-cross", "--quiet"]) == 0
    assert "wrote 1 video + 0 cross-identity videos (1 frame) to " in capsys.readouterr().out
    assert main(["data", "check", out]) == 0
    assert f"{out}: 1 video, 1 frame: OK" in capsys.readouterr().out
    assert main(["data", "index", out]) == 0
    assert capsys.readouterr().out.strip().endswith("index.json: 1 video")


def test_bench_with_no_workers_loads_in_the_main_process(capsys):
    """`pyface data bench --workers 0`: generation on every core, loading in the main process -
    said so, and the loading's CPU time is the main process's (there are no loader workers)."""
    import re

    assert main(["data", "bench", "--workers", "0", "--identities", "1", "--videos-per-identity",
                 "1", "--frames", "4", "--resolution", "16", "--batch-size", "1",
                 "--samples", "4"]) == 0
    out = capsys.readouterr().out
    gen = re.search(r"\(no cross\), (\d+) workers?: ", out)
    assert gen and int(gen.group(1)) >= 1 and " 1 workers" not in out
    load = re.search(r"batch 1, loaded in the main process: .* pairs/s .*; CPU time of the main "
                     r"process ([\d.]+) ms/pair", out)
    assert load and float(load.group(1)) > 0, out
    assert "0 workers" not in out and "loader workers" not in out


@pytest.mark.parametrize("command", ["synth", "prepare"])
def test_synth_and_prepare_under_torchrun_are_refused(tmp_path, monkeypatch, capsys, command):
    """Launched by torchrun (WORLD_SIZE=2), every rank would write the same --out folder (rank 1
    stopped on its lock): rank 0 says once to run it without torchrun, naming --workers, every
    rank exits with code 2 and nothing is written."""
    out = tmp_path / "out"
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    args = (["data", "synth", "--out", str(out), *TINY_ARGS] if command == "synth" else
            ["data", "prepare", str(video), "--out", str(out), "--workers", "2"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert not out.exists()
        if rank == "1":
            assert err == ""
            continue
        assert err.count("\n") == 1 and err.startswith(
            f"pyface data {command}: runs as one process, not under torchrun (WORLD_SIZE=2: every "
            "rank would run all of it and write the same files); run the same command without "
            "torchrun (--workers N "), err


def test_check_counts_its_problems_in_words(tiny, tmp_path, capsys):
    """`pyface data check`: "1 problem", "2 problems" (it said "1 problem(s)")."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    masks = sorted((bad / "id0000_v00" / "masks").iterdir())
    masks[0].unlink()
    assert main(["data", "check", str(bad)]) == 1
    assert capsys.readouterr().out.rstrip().endswith("frames: 1 problem")
    masks[1].unlink()
    assert main(["data", "check", str(bad)]) == 1
    assert capsys.readouterr().out.rstrip().endswith("frames: 2 problems")
