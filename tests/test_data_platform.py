"""Registered datasets and their typed options, the cached built-in synthetic set, the synthetic
options (zoom, expression-identity leak, test split, second camera), image-only videos and the
reenactment evaluation pairs."""
import json
import multiprocessing as mp
import os
import shutil

import numpy as np
import pytest
import torch

from pyface.data import cache as C
from pyface.data import format as fmt
from pyface.data import synthetic as S
from pyface.data.datasets import (ClipDataset, CrossIdentityDataset, FrameDataset,
                                  MotionWindowDataset, MultiViewDataset, PairDataset)
from pyface.data.reenactment import (MOVING_EXP_L2, expression_difference, is_moving,
                                     pose_difference_deg, reenactment_pairs)
from pyface.face import MorphableModel
from pyface.train import registry
from pyface.train.config import ConfigError, DataConfig, build_experiment, experiment_to_dict
from pyface.train.example import TriplaneAutoencoder

RES = 32
TINY_SYNTH = {"identities": 2, "videos_per_identity": 1, "frames": 3, "workers": 1}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """2 identities x 2 videos x 12 frames at 32^2 with the cross-identity set and second views."""
    out = str(tmp_path_factory.mktemp("plat") / "ds")
    S.generate(out, S.SynthConfig(identities=2, videos_per_identity=2, frames=12, resolution=RES,
                                  workers=1, multiview=True), progress=False)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYFACE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def data_cfg(name, path, **options):
    return DataConfig(name=name, path=str(path), resolution=RES, options=options)


# ----------------------------------------------------------------------------------------------
# options


def test_options_from_yaml_and_set(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  name: clips\n  options: {frames: 6, min_gap: 2, synth: {zoom: 0.2}}\n")
    M = TriplaneAutoencoder
    cfg = build_experiment("example", M.Config, yaml_path=str(y), defaults=M.recipe,
                           overrides=["data.options.min_gap=4", "data.options.synth.identities=3"])
    o = cfg.data.options
    assert isinstance(o, ClipDataset.Options)
    assert (o.frames, o.min_gap, o.synth.zoom, o.synth.identities) == (6, 4, 0.2, 3)
    assert o.synth.frames == 48                               # default kept
    # round trip through the run's config.yaml dict
    d = experiment_to_dict(cfg)["data"]
    assert d["options"]["min_gap"] == 4 and d["options"]["synth"]["identities"] == 3
    again = build_experiment("example", M.Config, defaults={"data": d})
    assert again.data.options == o
    # the default options of every registered talking-head dataset
    for name in ("synthetic", "pairs", "cross_identity", "motion_windows", "clips", "multiview"):
        opts = DataConfig(name=name).options
        assert opts == registry.dataset_class(name).Options()
        assert opts.synth.identities >= 8 and opts.synth.videos_per_identity >= 2
        assert opts.synth.frames >= 48
    assert DataConfig().options is None                       # procedural: no options


@pytest.mark.parametrize("overrides, match", [
    (["data.name=clips", "data.options.min_gapp=3"],
     r"data.options.min_gapp: unknown key for ClipDataset.Options; valid keys: frames, min_gap"),
    (["data.name=pairs", "data.options.synth.zoomm=1"],
     r"data.options.synth.zoomm: unknown key for SynthOptions; valid keys: identities"),
    (["data.name=pairs", "data.options.min_gap=abc"], r"data.options.min_gap: expected int"),
    (["data.options.frames=3"], r"dataset 'procedural' takes no options"),
    (["data.name=nope"], r"data.name: unknown dataset 'nope'; registered: clips, cross_identity"),
])
def test_options_errors(overrides, match):
    M = TriplaneAutoencoder
    with pytest.raises(ConfigError, match=match):
        build_experiment("example", M.Config, overrides=overrides)


def test_options_passed_as_instances_and_mismatch():
    o = ClipDataset.Options(frames=3)
    assert DataConfig(name="clips", options=o).options is o
    with pytest.raises(ConfigError, match="expected PairDataset.Options for dataset 'pairs', got "
                                          "ClipDataset.Options"):
        DataConfig(name="pairs", options=o)


@pytest.mark.parametrize("cls", [FrameDataset, PairDataset, MotionWindowDataset, ClipDataset,
                                 MultiViewDataset, CrossIdentityDataset])
def test_each_own_option_is_a_constructor_keyword(cls):
    """from_config passes every option but load_masks and synth (which it uses itself) to the
    constructor under the option's own name, with the option's value."""
    import dataclasses
    import inspect

    own = [f.name for f in dataclasses.fields(cls.Options) if f.name not in ("load_masks", "synth")]
    params = inspect.signature(cls.__init__).parameters
    assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in own)
    values = {f.name: f"value of {f.name}" for f in dataclasses.fields(cls.Options)}
    assert cls._init_kwargs(cls.Options(**values)) == {k: f"value of {k}" for k in own}


# ----------------------------------------------------------------------------------------------
# registered datasets over an existing root


def test_pairs(root):
    ds = registry.build_dataset(data_cfg("pairs", root, repeats=3, min_gap=5))
    assert isinstance(ds, PairDataset) and len(ds) == 4 * 12 * 3
    n = ds.num_frames_total
    for i in (0, 7, n + 7, 2 * n + 30):
        it = ds[i]
        s, d = it["source"], it["driving"]
        assert s["image"].shape == (3, RES, RES) and s["image"].dtype == torch.uint8
        assert int(d["video"]) == int(s["video"]) and abs(int(d["frame"]) - int(s["frame"])) >= 5
        assert (int(d["video"]), int(d["frame"])) == ds.locate(i % n)
        for k in ("mask", "camera", "coeffs", "landmarks", "identity"):
            assert k in s and k in d
    # repeats of one driving frame draw their own sources
    assert len({ds.source_of(7 + r * n) for r in range(3)} | {ds.source_of(7 + 3 * n)}) > 1


def test_cross_identity(root):
    ds = registry.build_dataset(data_cfg("cross_identity", root, load_masks=False))
    assert isinstance(ds, CrossIdentityDataset) and len(ds) == 2 * 12
    it = ds[13]
    assert set(it) == {"source", "driving", "target"} and "mask" not in it["target"]
    assert torch.equal(it["target"]["coeffs"][80:144], it["driving"]["coeffs"][80:144])
    assert torch.equal(it["target"]["coeffs"][:80], it["source"]["coeffs"][:80])
    assert int(it["source"]["identity"]) != int(it["driving"]["identity"])


def test_motion_windows(root):
    ds = registry.build_dataset(data_cfg("motion_windows", root, frames_per_item=3, repeats=5))
    assert isinstance(ds, MotionWindowDataset) and len(ds) == 2 * 5
    it = ds[3]
    assert int(it["identity"]) == 1
    assert it["image"].shape == (3, 3, RES, RES) and it["motion"].shape == (3, 70, 27)
    assert it["coeffs"].shape == (3, 257) and it["mask"].shape == (3, 1, RES, RES)
    c = torch.from_numpy(ds.coeffs[int(it["video"])])
    f = it["frame"]
    torch.testing.assert_close(it["motion"][:, :64, 13], c[f, 80:144])   # centre of the window
    assert not torch.equal(ds[1]["frame"], ds[3]["frame"]) or int(ds[1]["video"]) != int(ds[3]["video"])


def test_clips(root):
    ds = registry.build_dataset(data_cfg("clips", root, frames=4, min_gap=3, repeats=2))
    assert isinstance(ds, ClipDataset) and len(ds) == 4 * 2
    seen = set()
    for i in range(len(ds)):
        it = ds[i]
        f = it["frame"].numpy()
        assert it["image"].shape == (4, 3, RES, RES) and it["coeffs"].shape == (4, 257)
        assert it["camera"].shape == (4, 25) and it["landmarks"].shape == (4, 68, 2)
        assert (np.diff(f) >= 3).all() and f.min() >= 0 and f.max() < 12
        assert int(it["video"]) == i % 4
        v = int(it["video"])
        torch.testing.assert_close(it["coeffs"], torch.from_numpy(ds.coeffs[v][f]))
        seen.add(tuple(f))
    assert len(seen) > 1
    # the tightest clip fits exactly; a longer one needs a longer video
    tight = ClipDataset(root, RES, frames=4, min_gap=3, load_masks=False)
    assert (np.diff(tight.clip_frames(0)[1]) >= 3).all()
    ClipDataset(root, RES, frames=4, min_gap=11 // 3)
    with pytest.raises(fmt.DataError, match=r"id0000_v00/meta.json: 12 frames, a clip of 5 frames "
                                            r"with min_gap 3 needs 13"):
        ClipDataset(root, RES, frames=5, min_gap=3)


def test_clip_frames_are_uniform_over_valid_sets(root):
    ds = ClipDataset(root, None, frames=2, min_gap=10, repeats=400)
    sets = {tuple(ds.clip_frames(i)[1]) for i in range(0, len(ds), 4)}   # video 0 only
    assert sets == {(0, 10), (0, 11), (1, 11)}


def test_multiview(root):
    ds = registry.build_dataset(data_cfg("multiview", root, swap=False))
    assert isinstance(ds, MultiViewDataset) and len(ds) == 4 * 12
    it = ds[14]
    s, d = it["source"], it["driving"]
    assert int(s["view"]) == 0 and int(d["view"]) == 1
    assert int(s["frame"]) == int(d["frame"]) == 2 and int(s["video"]) == int(d["video"]) == 1
    assert torch.equal(s["coeffs"][:224], d["coeffs"][:224])         # same head and expression
    assert not torch.allclose(s["camera"], d["camera"])              # another camera
    # the two cameras are 15-30 degrees apart, both looking at the head
    a = pose_difference_deg(s["coeffs"].numpy(), d["coeffs"].numpy())
    assert 15 - 1e-3 <= a <= np.hypot(30, 10) + 1e-3
    swapped = registry.build_dataset(data_cfg("multiview", root, swap=True))
    views = [int(swapped[i]["source"]["view"]) for i in range(12)]
    assert 0 < sum(views) < 12


def test_second_view_ground_truth_is_consistent(root):
    """The second view's stored camera, coefficients, mask and landmarks agree."""
    model = MorphableModel.builtin()
    vroot = os.path.join(root, "multiview")
    rec = fmt.load_index(vroot)[2]
    c = torch.from_numpy(fmt.load_coeffs(vroot, rec))
    torch.testing.assert_close(torch.from_numpy(fmt.load_labels(vroot, rec)), model.label_of(c),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(np.load(rec.path(vroot, fmt.LANDMARKS))),
                               model.landmarks2d(c, image_size=RES), rtol=1e-4, atol=1e-3)
    r = model.render(c[:3], RES)
    stored = np.stack([fmt.read_mask(vroot, rec, i) for i in range(3)]) > 127
    assert ((r.mask[:, 0] > 0.5).numpy() == stored).mean() > 0.995
    meta = json.load(open(rec.path(vroot, fmt.META)))
    assert meta["view_of"] == rec.name and meta["camera"] == 1
    assert 15 <= abs(meta["rig_yaw_deg"]) <= 30


def test_synthetic_frames_registered(root):
    ds = registry.build_dataset(data_cfg("synthetic", root, mirror=True))
    assert len(ds) == 2 * 4 * 12
    it = ds[0]
    assert it["image"].dtype == torch.float32 and -1 <= it["image"].min() and it["image"].max() <= 1


def test_multiview_needs_the_second_views(tmp_path):
    out = str(tmp_path / "nv")
    S.generate(out, S.SynthConfig(identities=1, videos_per_identity=1, frames=2, resolution=16,
                                  cross=False, workers=1), progress=False)
    with pytest.raises(fmt.DataError, match=r"nv/multiview: missing; .* multiview=True"):
        MultiViewDataset(out)


# ----------------------------------------------------------------------------------------------
# the cached built-in set


def test_unset_path_uses_the_cache(cache, monkeypatch):
    cfg = DataConfig(name="pairs", resolution=16, options={"synth": TINY_SYNTH, "repeats": 1})
    ds = registry.build_dataset(cfg)
    roots = os.listdir(cache / "synthetic")
    assert [r for r in roots if not r.endswith(".lock")] == [os.path.basename(ds.root)]
    assert ds.root.startswith(str(cache)) and len(ds) == 2 * 3
    assert os.path.basename(ds.root).startswith("2x1x3-16px-")
    s = json.load(open(os.path.join(ds.root, "synth.json")))
    assert s["config"]["multiview"] and s["config"]["cross"]
    # a hit: nothing is generated again, for any dataset over the same set
    monkeypatch.setattr(S, "generate", lambda *a, **k: pytest.fail("regenerated"))
    for name in ("clips", "multiview", "cross_identity", "motion_windows", "synthetic"):
        opts = {"synth": TINY_SYNTH} | ({"frames": 2, "min_gap": 1} if name == "clips" else {})
        d = registry.build_dataset(DataConfig(name=name, resolution=16, options=opts))
        assert len(d) > 0
    # another config is another entry (a miss)
    monkeypatch.undo()
    monkeypatch.setenv("PYFACE_CACHE", str(cache))
    other = registry.build_dataset(DataConfig(name="pairs", resolution=16,
                                              options={"synth": TINY_SYNTH | {"seed": 1}}))
    assert other.root != ds.root


def test_config_hash_ignores_workers_and_tracks_content():
    a = S.SynthConfig(identities=2, workers=1)
    assert C.config_hash(a) == C.config_hash(S.SynthConfig(identities=2, workers=4, batch=2))
    for change in ({"zoom": 0.1}, {"exp_leak": 0.1}, {"split": "test"}, {"multiview": True},
                   {"seed": 3}, {"resolution": 128}, {"frames": 31}):
        assert C.config_hash(S.SynthConfig(identities=2, **change)) != C.config_hash(a), change


def _cached_in_child(cfg, log_path):
    def log(msg):
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()} {msg}\n")
    print(C.cached(cfg, log=log))


def test_cache_concurrent_processes_generate_once(cache, tmp_path):
    cfg = S.SynthConfig(identities=2, videos_per_identity=1, frames=2, resolution=16, workers=1)
    log = str(tmp_path / "log.txt")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_cached_in_child, args=(cfg, log)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(open(log).read().splitlines()) == 1                  # generated by one process
    root = C.cache_path(cfg)
    assert C.is_complete(root) and len(fmt.load_index(root)) == 2
    assert not [n for n in os.listdir(os.path.dirname(root)) if ".tmp-" in n]


def test_cache_rename_race_and_stale_folders(cache, monkeypatch):
    cfg = S.SynthConfig(identities=2, videos_per_identity=1, frames=2, resolution=16, workers=1,
                        cross=False)
    root = C.cache_path(cfg)
    # a crashed writer left an incomplete final folder: it is regenerated
    os.makedirs(os.path.join(root, "junk"))
    assert C.cached(cfg, log=lambda m: None) == root and C.is_complete(root)
    assert not os.path.exists(os.path.join(root, "junk"))
    # no lock (another host): the winner of the rename race is kept, the loser's copy removed
    shutil.rmtree(root)
    real = S.generate
    monkeypatch.setattr(C, "_lock", lambda path: __import__("contextlib").nullcontext())

    def racing(out, c, progress=False):
        real(out, c, progress=progress)
        real(root, c, progress=progress)        # the other process finishes first
        with open(os.path.join(root, "winner"), "w"):
            pass
    monkeypatch.setattr(S, "generate", racing)
    assert C.cached(cfg, log=lambda m: None) == root
    assert os.path.exists(os.path.join(root, "winner"))
    assert not [n for n in os.listdir(os.path.dirname(root)) if ".tmp-" in n]


def test_failed_generation_leaves_nothing(cache, monkeypatch):
    cfg = S.SynthConfig(identities=2, videos_per_identity=1, frames=2, resolution=16, workers=1)

    def boom(out, c, progress=False):
        os.makedirs(os.path.join(out, "half"))
        raise KeyboardInterrupt
    monkeypatch.setattr(S, "generate", boom)
    with pytest.raises(KeyboardInterrupt):
        C.cached(cfg, log=lambda m: None)
    left = [n for n in os.listdir(os.path.dirname(C.cache_path(cfg))) if not n.endswith(".lock")]
    assert left == []


def test_trainer_on_the_cached_default(cache, tmp_path):
    from pyface.train import Trainer

    M = TriplaneAutoencoder
    over = ["model.resolution=16", "model.plane_resolution=8", "model.plane_channels=4",
            "model.encoder_channels=8", "model.hidden=8", "model.depth_samples=4",
            "data.resolution=16", "data.name=synthetic", "train.batch_size=2",
            "train.progress=false", "train.tensorboard=false", "train.image_every=0",
            "train.steps=1", "train.ckpt_every=0", f"train.run_dir={tmp_path / 'run'}"]
    over += [f"data.options.synth.{k}={v}" for k, v in TINY_SYNTH.items()]
    tr = Trainer(build_experiment("example", M.Config, defaults=M.recipe, overrides=over))
    assert tr.dataset.frames.root.startswith(str(cache)) and len(tr.dataset) == 6
    assert tr.fit().step == 1


def test_path_to_an_empty_folder_gets_the_builtin_set(tmp_path):
    ds = registry.build_dataset(data_cfg("multiview", tmp_path / "new", synth=TINY_SYNTH))
    assert ds.root == str(tmp_path / "new") and len(ds) == 2 * 3
    assert json.load(open(tmp_path / "new" / "synth.json"))["config"]["identities"] == 2


def test_path_to_an_unrelated_folder_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(fmt.DataError, match="refusing to generate"):
        registry.build_dataset(data_cfg("pairs", tmp_path / "x", synth=TINY_SYNTH))


# ----------------------------------------------------------------------------------------------
# synthetic options


def test_zoom_varies_the_scale_within_a_video():
    model = MorphableModel.builtin()

    def spans(zoom):
        exp, ang, tr, gam = S.sample_motion(model, 0, 1, 0, 48, 25.0, zoom=zoom)
        idc, tex, _ = S.sample_identity(model, 0, 1, 16)
        from pyface.face.coeffs import merge_coeffs
        T = len(exp)
        c = merge_coeffs(torch.from_numpy(idc).expand(T, 80), torch.from_numpy(exp),
                         torch.from_numpy(tex).expand(T, 80), torch.from_numpy(ang),
                         torch.from_numpy(gam), torch.from_numpy(tr))
        lm = model.landmarks2d(c, image_size=256)
        size = (lm[:, 36] - lm[:, 45]).norm(dim=-1)        # outer eye corners
        return float(size.max() / size.min()), tr
    plain, tr0 = spans(0.0)
    zoomed, tr1 = spans(0.25)
    assert plain < 1.12 and zoomed > 1.45
    s = S.zoom_trajectory(0, 1, 0, 48, 0.25)
    assert s.min() == pytest.approx(np.exp(-0.25), abs=0.01) and s.max() == pytest.approx(np.exp(0.25), abs=0.01)
    np.testing.assert_array_equal(tr0[:, :2], tr1[:, :2])      # only the depth moves


def test_expression_leak_is_exact_and_changes_only_the_stored_exp(tmp_path):
    kw = dict(identities=2, videos_per_identity=1, frames=2, resolution=16, cross=False, workers=1)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    S.generate(a, S.SynthConfig(**kw), progress=False)
    S.generate(b, S.SynthConfig(exp_leak=0.5, **kw), progress=False)
    L = S.leak_matrix()
    assert L.shape == (64, 80) and np.array_equal(L, S.leak_matrix())
    offsets = []
    for rec in fmt.load_index(a):
        ca, cb = fmt.load_coeffs(a, rec), fmt.load_coeffs(b, rec)
        np.testing.assert_allclose(cb[:, 80:144] - ca[:, 80:144], 0.5 * ca[:, :80] @ L.T, atol=1e-5)
        np.testing.assert_array_equal(np.delete(cb, np.s_[80:144], 1), np.delete(ca, np.s_[80:144], 1))
        for i in range(2):   # the rendered image does not change
            assert np.array_equal(fmt.read_frame(a, rec, i), fmt.read_frame(b, rec, i))
        offsets.append((cb - ca)[0, 80:144])
        assert json.load(open(rec.path(b, fmt.META)))["exp_leak"] == 0.5
    # the leak is an identity-specific constant of about unit size per component at strength 1
    assert np.linalg.norm(offsets[0] - offsets[1]) > 0.5 * 0.5 * np.sqrt(64)


def _identity_probe_accuracy(leak, identities=8):
    """Ridge probe from the stored expression coefficients to the identity, trained on video 0
    of every identity and tested on video 1 (coefficients only, nothing rendered)."""
    model = MorphableModel.builtin()
    X, Y, V = [], [], []
    for i in range(identities):
        idc = S.sample_identity(model, 0, i, 8)[0]
        for v in range(2):
            c = np.zeros((48, 257), np.float32)
            c[:, :80] = idc
            c[:, 80:144] = S.sample_motion(model, 0, i, v, 48, 25.0)[0]
            X.append(S.apply_leak(c, leak)[:, 80:144])
            Y += [i] * 48
            V += [v] * 48
    X = np.c_[np.concatenate(X), np.ones(len(Y))]
    Y, V = np.array(Y), np.array(V)
    tr, te = V == 0, V == 1
    W = np.linalg.solve(X[tr].T @ X[tr] + 1e-2 * np.eye(65), X[tr].T @ np.eye(identities)[Y[tr]])
    return float(((X[te] @ W).argmax(1) == Y[te]).mean())


def test_leak_makes_the_identity_decodable_from_the_stored_expression():
    assert _identity_probe_accuracy(0.0) < 0.3           # chance 0.125: synthetic exp is clean
    assert _identity_probe_accuracy(0.1) > 0.95


def test_test_split_is_disjoint_and_has_the_cross_set(tmp_path):
    model = MorphableModel.builtin()
    train = np.stack([S.sample_identity(model, 0, i, 8)[0] for i in range(16)])
    test = np.stack([S.sample_identity(model, 0, i, 8, split="test")[0] for i in range(16)])
    d = np.abs(train[:, None] - test[None]).sum(-1)
    assert d.min() > 1.0
    out = str(tmp_path / "test")
    S.generate(out, S.SynthConfig(identities=2, videos_per_identity=1, frames=2, resolution=16,
                                  workers=1, split="test"), progress=False)
    recs = fmt.load_index(out)
    assert [r.name for r in recs] == ["test0000_v00", "test0001_v00"]
    assert {r.identity for r in recs} == {"test0000", "test0001"}
    assert [r.name for r in fmt.load_index(os.path.join(out, "cross"))] == [
        "test0000_by_test0001_v00", "test0001_by_test0000_v00"]
    ids = fmt.load_coeffs(out, recs[0])[0, :80]
    np.testing.assert_allclose(ids, test[0], atol=1e-6)
    assert json.load(open(recs[0].path(out, fmt.META)))["split"] == "test"
    with pytest.raises(ValueError, match="test split always writes the cross-identity set"):
        S.SynthConfig(split="test", cross=False)
    with pytest.raises(ValueError, match="split: expected one of"):
        S.SynthConfig(split="val")


@pytest.mark.parametrize("args, message", [
    (["--identities", "1"], "--identities: cross-identity ground truth needs identities >= 2 "
                            "(or --no-cross), got 1"),
    (["--frames", "0"], "--frames: expected > 0, got 0"),
    (["--zoom", "2"], "--zoom: expected a log-scale amplitude in [0, 0.5], got 2.0"),
    (["--exp-leak", "-1"], "--exp-leak: expected >= 0, got -1.0"),
])
def test_synth_cli_bad_option_is_a_message_naming_it(tmp_path, capsys, args, message):
    from pyface.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "x"), *args]) == 2
    assert capsys.readouterr().err == f"pyface data synth: {message}\n"
    assert not (tmp_path / "x").exists()


def test_synth_cli_split_and_options(tmp_path, capsys):
    from pyface.cli import main

    out = str(tmp_path / "c")
    assert main(["data", "synth", "--out", out, "--identities", "2", "--videos-per-identity", "1",
                 "--frames", "2", "--resolution", "16", "--workers", "1", "--quiet", "--split",
                 "test", "--zoom", "0.1", "--exp-leak", "0.2", "--multiview"]) == 0
    assert "wrote 2 videos + 2 cross-identity videos (12 frames), 2 second views, split test" \
        in capsys.readouterr().out
    s = json.load(open(os.path.join(out, "synth.json")))["config"]
    assert (s["split"], s["zoom"], s["exp_leak"], s["multiview"]) == ("test", 0.1, 0.2, True)
    assert len(fmt.load_index(os.path.join(out, "multiview"))) == 2


# ----------------------------------------------------------------------------------------------
# image-only videos


def _image_only_copy(root, dst):
    shutil.copytree(root, dst, ignore=shutil.ignore_patterns("cross", "multiview"))
    for name in fmt.video_names(dst):
        for f in ("coeffs.npy", "dataset.json", "landmarks.npy", "meta.json"):
            os.remove(os.path.join(dst, name, f))
    os.remove(os.path.join(dst, fmt.INDEX))
    fmt.write_index(dst)
    return dst


def test_image_only_videos_load(root, tmp_path):
    d = _image_only_copy(root, str(tmp_path / "img"))
    recs = fmt.load_index(d)
    assert [r.identity for r in recs] == [r.name for r in recs] and not recs[0].has_landmarks
    it = FrameDataset(d, 16)[5]
    assert it["image"].shape == (3, 16, 16) and "mask" in it
    assert not {"coeffs", "camera", "landmarks"} & set(it)
    pair = registry.build_dataset(data_cfg("pairs", d))[3]
    assert not {"coeffs", "camera"} & set(pair["source"])
    clip = ClipDataset(d, 16, frames=3, min_gap=2)[0]
    assert clip["image"].shape == (3, 3, 16, 16) and "coeffs" not in clip
    with pytest.raises(fmt.DataError, match=r"coeffs.npy: missing \(MotionWindowDataset needs"):
        MotionWindowDataset(d)
    _, problems = fmt.check_dataset(d)
    assert problems == []
    # present files are still checked
    np.save(os.path.join(d, recs[0].name, "coeffs.npy"), np.zeros((3, 257), np.float32))
    with pytest.raises(fmt.DataError, match=r"coeffs.npy: expected shape \(12, 257\)"):
        FrameDataset(d)


# ----------------------------------------------------------------------------------------------
# evaluation pairs


def test_pose_and_expression_differences():
    a = np.zeros(257)
    b = a.copy()
    b[225] = np.radians(12)                        # yaw
    assert pose_difference_deg(a, b) == pytest.approx(12, abs=1e-6)
    c = b.copy()
    c[224] = np.radians(5)                         # the relative rotation, not angle sums
    r = pose_difference_deg(b, c)
    assert 4.9 < r < 5.1
    e = a.copy()
    e[80] = MOVING_EXP_L2 * 1.01
    assert expression_difference(a, e) == pytest.approx(MOVING_EXP_L2 * 1.01)
    assert is_moving(a, e) and not is_moving(a, a) and is_moving(a, b)
    b2 = a.copy()
    b2[225] = np.radians(9.9)
    assert not is_moving(a, b2)


def test_reenactment_pairs_same(root):
    import pyface.data

    ds = pyface.data.reenactment_pairs(root, resolution=16, protocol="same")
    assert len(ds) == 4 * 11
    it = ds[12]                                        # video 1, frame 2
    assert int(it["source"]["frame"]) == 0 and int(it["driving"]["frame"]) == 2
    assert int(it["source"]["video"]) == int(it["driving"]["video"]) == 1
    assert torch.equal(it["target"]["image"], it["driving"]["image"])
    assert it["source"]["image"].shape == (3, 16, 16)
    expect = is_moving(it["source"]["coeffs"].numpy(), it["target"]["coeffs"].numpy())
    assert it["moving"].dtype == torch.bool and bool(it["moving"]) == bool(expect)
    mv = reenactment_pairs(root, protocol="same", subset="moving")
    assert 0 < len(mv) <= len(ds) and all(bool(mv[i]["moving"]) for i in range(len(mv)))
    assert len(mv) == int(ds.moving.sum())
    batch = torch.utils.data.default_collate([ds[i] for i in range(3)])
    assert batch["moving"].shape == (3,) and batch["target"]["image"].shape == (3, 3, 16, 16)


def test_reenactment_pairs_cross(root):
    ds = reenactment_pairs(root, protocol="cross")
    assert len(ds) == 2 * 12
    it = ds[3]
    assert set(it) == {"source", "driving", "target", "moving"}
    assert torch.equal(it["target"]["coeffs"][80:144], it["driving"]["coeffs"][80:144])
    expect = is_moving(it["source"]["coeffs"].numpy(), it["target"]["coeffs"].numpy())
    assert bool(it["moving"]) == bool(expect)
    with pytest.raises(ValueError, match="protocol: expected one of"):
        reenactment_pairs(root, protocol="both")


def test_synthetic_moving_flags_follow_the_coefficient_rule(root):
    """Ground truth keeps the coefficient rule, flag for flag; the landmark rule would differ on
    these pairs, so a switch of rule is caught."""
    from pyface.data.reenactment import is_moving_landmarks, moving_criterion

    ds = reenactment_pairs(root, protocol="same")
    assert ds.moving_rule == "coefficients"
    assert moving_criterion(root) == {"rule": "coefficients", "pose_deg": 10.0, "exp_l2": 0.25}
    recs = fmt.load_index(root)
    c = [fmt.load_coeffs(root, r) for r in recs]
    lm = [fmt.load_landmarks(root, r) for r in recs]
    src = np.stack([c[v][s] for v, s, _ in ds.pairs])
    drv = np.stack([c[v][f] for v, _, f in ds.pairs])
    expect = is_moving(src, drv)
    assert ds.moving.dtype == bool and np.array_equal(ds.moving, expect)
    by_lm = is_moving_landmarks(src, drv, np.stack([lm[v][s] for v, s, _ in ds.pairs]),
                                np.stack([lm[v][f] for v, _, f in ds.pairs]))
    assert not np.array_equal(by_lm, expect)


def _prepared_like(root, dst, *, mouth_from=None, frames=12, seed=0):
    """A ``pyface data prepare``-like set of one video: the first synthetic frame's 68
    landmarks moved by a small in-plane head motion (scale, rotation, translation) plus 0.2 px
    noise, and fitted-like coefficients: small pose jitter (< 3 deg) and jittery expression
    coefficients (L2 to the first frame ~ 1, like a 3DMM fit's). ``mouth_from``: from that frame
    on the mouth opens (lower lip and chin down by 0.3 inter-ocular distances)."""
    rng = np.random.default_rng(seed)
    rec = fmt.load_index(root)[0]
    base = fmt.load_landmarks(root, rec)[0].astype(np.float64) * 4       # 128 px frame
    iod = np.linalg.norm(base[45] - base[36])
    lms, coeffs = [], np.zeros((frames, 257))
    for t in range(frames):
        p = base.copy()
        if mouth_from is not None and t >= mouth_from:
            p[[7, 8, 9, 56, 57, 58, 65, 66, 67], 1] += 0.3 * iod
        a, k = np.radians(rng.uniform(-4, 4)), rng.uniform(0.95, 1.05)
        rot = k * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        c = base.mean(0)
        lms.append((p - c) @ rot.T + c + rng.uniform(-3, 3, 2) + rng.normal(0, 0.2, p.shape))
        coeffs[t, 80:144] = rng.normal(0, 0.12, 64)
        coeffs[t, 224:227] = np.radians(rng.uniform(-1.5, 1.5, 3))
    fmt.write_video(dst, "clip", np.zeros((frames, 16, 16, 3), np.uint8), coeffs,
                    np.repeat(fmt.load_labels(root, rec)[:1], frames, 0), identity="clip",
                    landmarks=np.stack(lms),
                    extra_meta={"generator": "pyface.data.prepare"})
    fmt.write_index(dst)
    return dst, coeffs


def test_prepared_moving_subset_uses_the_landmarks(root, tmp_path, capsys):
    from pyface.data.reenactment import MOVING_LANDMARK_EXP, moving_criterion

    # static expression, jittery fitted coefficients: the coefficient rule calls every pair
    # moving, the landmark rule none
    d, c = _prepared_like(root, str(tmp_path / "static"))
    assert is_moving(c[:1], c[1:]).all()
    ds = reenactment_pairs(d)
    assert ds.moving_rule == "landmarks" and len(ds) == 11
    assert not ds.moving.any()
    assert moving_criterion(d) == {"rule": "landmarks", "pose_deg": 10.0,
                                   "landmark_exp": MOVING_LANDMARK_EXP}
    # the mouth opens from frame 6 on: exactly those pairs are moving
    d, c = _prepared_like(root, str(tmp_path / "mouth"), mouth_from=6, seed=1)
    ds = reenactment_pairs(d)
    assert [f for _, _, f in ds.pairs] == list(range(1, 12))
    assert ds.moving.tolist() == [False] * 5 + [True] * 6
    mv = reenactment_pairs(d, subset="moving")
    assert [f for _, _, f in mv.pairs] == list(range(6, 12))
    from pyface.cli import main
    assert main(["data", "pairs", d]) == 0
    out = capsys.readouterr().out
    assert "moving 6 " in out and "static 5 " in out and "[moving by the landmarks rule]" in out


def test_eval_json_records_the_landmark_rule(root, tmp_path):
    from pyface.cli import main
    from pyface.data.reenactment import MOVING_LANDMARK_EXP

    d, _ = _prepared_like(root, str(tmp_path / "mouth"), mouth_from=6, seed=1)
    out = tmp_path / "cs.json"
    assert main(["eval", "copy-source", "--data", d, "--json", str(out), "--quiet",
                 "--resolution", "16", "--metrics", "psnr"]) == 0
    rep = json.loads(out.read_text())
    assert rep["moving"] == {"rule": "landmarks", "pose_deg": 10.0,
                             "landmark_exp": MOVING_LANDMARK_EXP}
    assert rep["protocols"]["real"]["subsets"]["moving"]["count"] == 6


def test_data_bench_with_fewer_pairs_than_a_batch_is_an_error(root, capsys):
    import re

    from pyface.cli import main

    assert main(["data", "bench", "--root", root, "--workers", "0", "--batch-size", "8",
                 "--samples", "16"]) == 0
    assert "pairs/s" in capsys.readouterr().out
    # the loader drops the incomplete batch: it would yield nothing, and the timing loop waited
    assert main(["data", "bench", "--root", root, "--workers", "0", "--batch-size", "100000",
                 "--samples", "4"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"--batch-size 100000 needs at least that many pairs, got \d+ in ", err)


def test_pairs_and_cache_commands(root, cache, capsys):
    from pyface.cli import main

    assert main(["data", "check", root, "--fast"]) == 0
    assert "(+ 2 cross-identity videos, 24 frames) (+ 4 second views, 48 frames): OK" in \
        capsys.readouterr().out

    assert main(["data", "pairs", root, "--resolution", "16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("same : 44 pairs, copy-source PSNR") and "moving" in out[0]
    assert out[1].startswith("cross: 24 pairs")
    sets = [f"--set={k}={v}" for k, v in TINY_SYNTH.items()]
    assert main(["data", "cache", "--build", "16"] + sets) == 0
    built = capsys.readouterr().out.split()[0]
    assert C.is_complete(built) and built.startswith(str(cache))
    assert main(["data", "cache"]) == 0
    listing = capsys.readouterr().out
    assert ": 1 dataset\n" in listing and os.path.basename(built) in listing
    assert main(["data", "cache", "--build", "16", "--set", "bogus=1"]) == 2


def test_reenactment_pairs_image_only(root, tmp_path):
    d = _image_only_copy(root, str(tmp_path / "img"))
    ds = reenactment_pairs(d)
    assert len(ds) == 44 and "moving" not in ds[0]
    with pytest.raises(fmt.DataError, match="subset='moving' needs coeffs.npy"):
        reenactment_pairs(d, subset="moving")


def test_builtin_set_options_cross_and_multiview():
    from pyface.data.builtin import SynthOptions
    from pyface.data.cache import config_hash

    default = SynthOptions().synth_config(64)
    assert default.cross and default.multiview          # the default set is unchanged
    off = SynthOptions(cross=False, multiview=False).synth_config(64)
    assert not off.cross and not off.multiview
    assert config_hash(off) != config_hash(default)     # a different cached set
    assert not SynthOptions(identities=1).synth_config(64).cross
