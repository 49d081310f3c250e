"""pyface.checkpoint: safetensors + JSON folders, atomic writes, integrity, optimizer state,
weights-only loading of third-party files."""
from __future__ import annotations

import os
import re

import pytest
import torch

from pyface import checkpoint as ckpt


def test_roundtrip_with_shared_and_odd_tensors(tmp_path):
    base = torch.arange(12.0)
    tensors = {"a": base, "view": base[2:8].view(2, 3),            # shares a's storage
               "t": torch.randn(3, 4).t(),                         # non-contiguous
               "i": torch.tensor([1, 2], dtype=torch.int64), "e": torch.zeros(0, 5),
               "h": torch.ones(2, dtype=torch.bfloat16), "s": torch.tensor(3.5)}
    path = ckpt.save_folder(str(tmp_path / "c"), tensors, {"step": 7, "note": "x"})
    out, meta = ckpt.load_folder(path)
    assert meta["step"] == 7 and meta["format"] == ckpt.FORMAT and len(meta["tensors_sha256"]) == 64
    for k, v in tensors.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    assert sorted(os.listdir(path)) == [ckpt.META_FILE, ckpt.TENSORS_FILE]


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path, monkeypatch):
    p = str(tmp_path / "c")
    ckpt.save_folder(p, {"w": torch.ones(3)}, {"step": 1})
    ckpt.save_folder(p, {"w": torch.full((3,), 2.0)}, {"step": 2})
    assert ckpt.load_folder(p)[1]["step"] == 2
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_folder(p, {"w": torch.zeros(3)}, {"step": 3})
    tensors, meta = ckpt.load_folder(p)
    assert meta["step"] == 2 and torch.equal(tensors["w"], torch.full((3,), 2.0))
    assert os.listdir(tmp_path) == ["c"]


def test_save_folder_never_replaces_other_files(tmp_path):
    """An output path that is a file, a folder of other files or below a file is refused and left
    as it was; an empty folder or an earlier checkpoint folder is (re)written."""
    user = tmp_path / "photos"
    user.mkdir()
    (user / "a.jpg").write_bytes(b"keep")
    with pytest.raises(ckpt.CheckpointError, match=r"photos: the folder holds other files"):
        ckpt.save_folder(str(user), {"w": torch.ones(1)}, {})
    assert os.listdir(user) == ["a.jpg"] and (user / "a.jpg").read_bytes() == b"keep"
    f = tmp_path / "clip.mp4"
    f.write_bytes(b"video")
    with pytest.raises(ckpt.CheckpointError, match=r"clip\.mp4: exists and is not a folder"):
        ckpt.save_folder(str(f), {"w": torch.ones(1)}, {})
    with pytest.raises(ckpt.CheckpointError, match=r"clip\.mp4 is a file"):
        ckpt.save_folder(str(f / "sub"), {"w": torch.ones(1)}, {})
    assert f.read_bytes() == b"video"
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4", "photos"]     # no temporaries either
    empty = tmp_path / "empty"
    empty.mkdir()
    ckpt.save_folder(str(empty), {"w": torch.ones(1)}, {"step": 1})
    ckpt.save_folder(str(empty), {"w": torch.ones(1)}, {"step": 2})
    assert ckpt.load_folder(str(empty))[1]["step"] == 2


def test_weights_file_folder_without_meta_is_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(ckpt.CheckpointError, match=r"a folder without meta\.json; expected a "
                                                   r"weights file"):
        ckpt.load_weights_file(str(tmp_path))


@pytest.mark.parametrize("damage, match", [
    ("flip", "corrupt \\(SHA-256"), ("truncate", "corrupt"), ("meta", "meta.json is corrupt"),
    ("format", "format 'other', expected 'pyface-checkpoint'"),
    ("version", "format version 99 is newer"),
    ("list", r"meta\.json is corrupt \(expected a JSON object, got a list\)"),
    ("version_text", r"meta\.json is corrupt \(format_version: expected an integer, got '1'\)"),
])
def test_damaged_checkpoints_raise_clear_errors(tmp_path, damage, match):
    p = ckpt.save_folder(str(tmp_path / "c"), {"w": torch.randn(100)}, {"step": 1})
    tfile, mfile = os.path.join(p, ckpt.TENSORS_FILE), os.path.join(p, ckpt.META_FILE)
    if damage == "flip":
        b = bytearray(open(tfile, "rb").read())
        b[-3] ^= 1
        open(tfile, "wb").write(bytes(b))
    elif damage == "truncate":
        b = open(tfile, "rb").read()
        open(tfile, "wb").write(b[: len(b) // 2])
    elif damage == "meta":
        open(mfile, "w").write("{not json")
    elif damage == "list":
        open(mfile, "w").write('["pyface-checkpoint"]')
    elif damage == "version_text":
        import json

        meta = json.load(open(mfile))
        meta["format_version"] = "1"
        json.dump(meta, open(mfile, "w"))
    else:
        import json

        meta = json.load(open(mfile))
        meta.update({"format": "other"} if damage == "format" else
                    {"format_version": 99})
        json.dump(meta, open(mfile, "w"))
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.load_folder(p)


def test_latest_pointer_and_pruning(tmp_path):
    run = str(tmp_path)
    assert ckpt.latest_checkpoint(run) is None
    for s in (1, 2, 3, 4):
        p = ckpt.save_folder(ckpt.checkpoint_path(run, s), {"w": torch.ones(1) * s}, {"step": s})
        if s != 4:
            ckpt.mark_latest(p)
    # ckpt-4 exists but `latest` was not moved to it (e.g. a crash between the two)
    assert ckpt.latest_checkpoint(run).endswith("ckpt-000003")
    ckpt.prune_checkpoints(run, keep=1)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [3, 4]   # latest is never pruned
    os.remove(os.path.join(run, "checkpoints", ckpt.LATEST_FILE))
    assert ckpt.latest_checkpoint(run).endswith("ckpt-000004")


def test_pruning_cut_short_leaves_no_listed_half_checkpoint(tmp_path, monkeypatch):
    """A kill while an old checkpoint is being deleted: what is left is never listed (nor a
    fallback for a lost ``latest``), and the next save by another process removes it."""
    run = str(tmp_path)
    for s in (1, 2):
        ckpt.mark_latest(ckpt.save_folder(ckpt.checkpoint_path(run, s), {"w": torch.ones(1)},
                                          {"step": s}))

    class Killed(BaseException):
        pass

    def rmtree_cut_short(path, ignore_errors=False):
        os.remove(os.path.join(path, ckpt.TENSORS_FILE))    # meta.json stays behind
        raise Killed

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree_cut_short)
    with pytest.raises(Killed):
        ckpt.prune_checkpoints(run, keep=1)
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    left = [n for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith("ckpt-000001")]
    assert len(left) == 1 and ".old-" in left[0]
    os.rename(os.path.join(run, "checkpoints", left[0]),          # as if another process's
              os.path.join(run, "checkpoints", "ckpt-000001.old-1"))
    ckpt.mark_latest(ckpt.save_folder(ckpt.checkpoint_path(run, 3), {"w": torch.ones(1)},
                                      {"step": 3}))
    ckpt.prune_checkpoints(run, keep=3)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [
        "ckpt-000002", "ckpt-000003", "latest"]


def test_partial_writes_of_a_killed_process_with_this_pid_are_removed(tmp_path):
    """A restarted container often gives the new training process the PID of the killed one:
    what the killed one left under that PID (a checkpoint being written, a pruned checkpoint
    half deleted, a ``latest`` being replaced) is removed by the next save all the same."""
    run = str(tmp_path)
    root = os.path.join(run, "checkpoints")
    pid = os.getpid()
    ckpt.mark_latest(ckpt.save_folder(ckpt.checkpoint_path(run, 2), {"w": torch.ones(1)},
                                      {"step": 2}))
    for name in (f"ckpt-000004.tmp-{pid}", f"ckpt-000001.old-{pid}"):
        os.makedirs(os.path.join(root, name))
        with open(os.path.join(root, name, ckpt.META_FILE), "w") as f:
            f.write("{}")
    with open(os.path.join(root, f".latest.tmp-{pid}"), "w") as f:
        f.write("ckpt-000009\n")
    ckpt.mark_latest(ckpt.save_folder(ckpt.checkpoint_path(run, 3), {"w": torch.ones(1)},
                                      {"step": 3}))
    ckpt.prune_checkpoints(run, keep=3)
    assert sorted(os.listdir(root)) == ["ckpt-000002", "ckpt-000003", "latest"]


def test_optimizer_state_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.5, 0.9), weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    tensors, info = ckpt.optimizer_to_flat(opt, "optim.g")
    p = ckpt.save_folder(str(tmp_path / "o"), tensors, {"opt": info})
    t2, meta = ckpt.load_folder(p)
    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    ckpt.optimizer_from_flat(opt2, t2, meta["opt"], "optim.g", "test")
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"][0]["betas"] == b["param_groups"][0]["betas"] == (0.5, 0.9)
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(torch.as_tensor(a["state"][i][k]), torch.as_tensor(b["state"][i][k]))
    opt3 = torch.optim.AdamW(torch.nn.Linear(4, 3, bias=False).parameters())
    with pytest.raises(ckpt.CheckpointError, match=r"has \[1\] parameters per group, the "
                                                   r"checkpoint has \[2\]"):
        ckpt.optimizer_from_flat(opt3, t2, meta["opt"], "optim.g", "test")


def test_weights_files_are_loaded_without_code(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pth")
    assert torch.equal(ckpt.load_weights_file(str(tmp_path / "ok.pth"))["w"], torch.ones(2))

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"w": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"weights_only=True\) refused"):
        ckpt.load_weights_file(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_weights_file(str(tmp_path / "missing.pth"))
    p = ckpt.save_weights(str(tmp_path / "wf"), {"w": torch.ones(1)}, kind="vgg19")
    with pytest.raises(ckpt.CheckpointError, match="holds 'vgg19' weights, expected 'arcface'"):
        ckpt.load_weights(p, kind="arcface")


@pytest.mark.parametrize("version, expect", [("2.5.1+cu124", "refused"), ("2.4.0", "refused"),
                                              ("1.13.1", "refused"), ("2.6.0", "warned"),
                                              ("2.9.1+cu128", "warned"), ("2.10.0", "loaded"),
                                              ("2.13.0+cpu", "loaded"), ("3.0.0a0", "loaded")])
def test_torch_load_on_a_torch_whose_weights_only_loader_is_unsafe(tmp_path, monkeypatch,
                                                                    version, expect):
    """torch < 2.6's torch.load(weights_only=True) can be made to execute code by a crafted file
    (CVE-2025-32434): a .pth is refused there, saying what to do; torch < 2.10's can be made to
    corrupt memory (CVE-2026-24747): a warning. safetensors files and pyface folders (no
    torch.load) load with any torch."""
    import warnings

    from safetensors.torch import save_file

    from pyface.convert import _storage_from_bytes

    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pth")
    ckpt.save_weights(str(tmp_path / "wf"), {"w": torch.ones(2)}, kind="vgg19")
    save_file({"w": torch.ones(2)}, str(tmp_path / "ok.safetensors"))
    monkeypatch.setattr(torch, "__version__", version)
    if expect == "refused":
        with pytest.raises(ckpt.CheckpointError,
                           match=rf"torch {re.escape(version)}'s .*CVE-2025-32434.*torch >= 2\.6"):
            ckpt.load_weights_file(str(tmp_path / "ok.pth"))
        with pytest.raises(ckpt.CheckpointError, match="storage in the pickle.*CVE-2025-32434"):
            _storage_from_bytes(b"\x80\x02")
    elif expect == "warned":
        with pytest.warns(UserWarning, match=rf"ok\.pth.*torch {re.escape(version)}'s .*"
                                             r"CVE-2026-24747"):
            assert torch.equal(ckpt.load_weights_file(str(tmp_path / "ok.pth"))["w"],
                               torch.ones(2))
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert torch.equal(ckpt.load_weights_file(str(tmp_path / "ok.pth"))["w"],
                               torch.ones(2))
        assert not [w for w in caught if "CVE" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for p in ("ok.safetensors", "wf"):
            assert torch.equal(ckpt.load_weights_file(str(tmp_path / p))["w"], torch.ones(2))
    assert not [w for w in caught if "CVE" in str(w.message)]


def test_check_state_dict_lists_problems():
    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    sd = m.state_dict()
    sd["0.weight"] = torch.zeros(3, 5)
    sd["extra"] = torch.zeros(1)
    del sd["1.bias"]
    with pytest.raises(ckpt.CheckpointError,
                       match=r"where: state does not match the model; missing keys: 1\.bias; "
                             r"unexpected keys: extra; shape mismatches: 0\.weight: checkpoint "
                             r"\(3, 5\) vs model \(3, 2\)"):
        ckpt.load_module_state(m, sd, "where")


@pytest.mark.parametrize("field, value, match", [
    ("step", "x", "step: expected an integer, got 'x'"),
    ("step", True, "step: expected an integer, got True"),
    ("experiment", "nonsense", "experiment: expected an object, got 'nonsense'"),
    ("ema_modules", 5, "ema_modules: expected a list, got 5"),
    ("ema_modules", [1], r"ema_modules: expected a list of module names, got \[1\]"),
    ("experiment", {"model": "example", "model_config": [1]},
     r"experiment\.model_config: expected an object, got \[1\]"),
    ("experiment", {"model": 5}, "experiment.model: expected a string, got 5"),
])
def test_hand_edited_meta_fields_of_the_wrong_type_are_named(tmp_path, field, value, match):
    """A meta.json edited by hand: a field that loaders read, of another JSON type, is refused
    by read_meta with the field, what it should be and what it is (no traceback later)."""
    import json
    import re

    p = ckpt.save_folder(str(tmp_path / "c"), {"w": torch.ones(2)},
                         {"step": 1, "kind": "train", "ema_modules": ["m"],
                          "experiment": {"model": "example", "model_config": {}}})
    mfile = os.path.join(p, ckpt.META_FILE)
    meta = json.load(open(mfile))
    meta[field] = value
    json.dump(meta, open(mfile, "w"))
    with pytest.raises(ckpt.CheckpointError,
                       match=re.escape(f"meta.json is corrupt (") + match):
        ckpt.read_meta(p)
    meta[field] = {"step": 3, "experiment": {"model": "example"},
                   "ema_modules": ["a", "b"]}[field]       # the same field, of the right type
    json.dump(meta, open(mfile, "w"))
    assert ckpt.read_meta(p)[field] == meta[field]

