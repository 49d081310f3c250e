"""`pyface invert eg3d` on a converted EG3D pickle: the round trip convert -> invert -> animate,
one seed gives one latent, a non-square or small image is fitted with a note, each error names
its argument (IMAGE, --checkpoint, --seed, --out), and a failed write leaves no half file."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from pyface import checkpoint as ckpt
from pyface.cli import main
from test_convert import _eg3d_pickle


@pytest.fixture
def converted(tmp_path, eg3d_modules):
    """`pyface convert eg3d` of an EG3D-structured pickle (tests/test_convert.py)."""
    pers, EasyDict = eg3d_modules
    _eg3d_pickle(tmp_path / "net.pkl", pers, EasyDict, tmp_path / "pwned")
    assert main(["convert", "eg3d", str(tmp_path / "net.pkl"), str(tmp_path / "eg3d")]) == 0
    assert not (tmp_path / "pwned").exists()
    return str(tmp_path / "eg3d")


def _png(path, h, w):
    data = np.random.default_rng(0).integers(0, 255, (h, w, 3)).astype(np.uint8)
    Image.fromarray(data).save(path)
    return str(path)


def _invert(image, ckpt_path, out, *extra):
    return main(["invert", "eg3d", image, "--checkpoint", ckpt_path, "--steps", "1",
                 "--no-progress", "--device", "cpu", "--out", str(out), *extra])


def test_same_seed_same_latent_and_the_seed_is_recorded(converted, tmp_path, capsys):
    img = _png(tmp_path / "face.png", 32, 32)
    assert _invert(img, converted, tmp_path / "a") == 0
    assert _invert(img, converted, tmp_path / "b") == 0
    assert _invert(img, converted, tmp_path / "c", "--seed", "1") == 0
    a, meta = ckpt.load_weights(str(tmp_path / "a" / "latent"), kind="eg3d-latent")
    b, _ = ckpt.load_weights(str(tmp_path / "b" / "latent"))
    c, meta_c = ckpt.load_weights(str(tmp_path / "c" / "latent"))
    assert torch.equal(a["ws"], b["ws"])
    assert not torch.equal(a["ws"], c["ws"])
    assert meta["config"]["seed"] == 0 and meta_c["config"]["seed"] == 1
    # the round trip goes on: the converted folder animates
    assert main(["animate", "eg3d", "--checkpoint", converted, "--seeds", "0", "--frames", "2",
                 "--out", str(tmp_path / "orbit.mp4"), "--no-progress"]) == 0
    assert (tmp_path / "orbit.mp4").stat().st_size > 0


def test_non_square_and_small_images_are_fitted_with_a_note(converted, tmp_path, capsys):
    wide = _png(tmp_path / "wide.png", 4, 300)
    assert _invert(wide, converted, tmp_path / "o") == 0
    err = capsys.readouterr().err
    assert f"note: IMAGE {wide} is 300x4, not square: its centre 4x4 is fitted" in err
    assert "the target is 4x4, upsampled to the generator's 128x128" in err
    assert _invert(_png(tmp_path / "ok.png", 128, 128), converted, tmp_path / "o") == 0
    assert "note:" not in capsys.readouterr().err


def test_errors_name_their_argument(converted, tmp_path, capsys):
    good = _png(tmp_path / "face.png", 32, 32)
    (tmp_path / "broken.png").write_bytes((tmp_path / "face.png").read_bytes()[:60])
    (tmp_path / "notes.png").write_text("not an image")
    cases = [([str(tmp_path / "broken.png"), converted], 1, "IMAGE "),
             ([str(tmp_path / "notes.png"), converted], 1, "IMAGE "),
             ([good, str(tmp_path / "missing")], 1,
              f"--checkpoint '{tmp_path / 'missing'}': not a folder"),
             ([good, str(tmp_path / "net.pkl")], 1, "it is a file: third-party weights"),
             ([good, converted, "--seed", "-2"], 2, "--seed: expected an integer >= 0, got -2"),
             ([good, converted, "--out", converted], 2,
              f"--out {converted}: a pyface checkpoint or weights folder (meta.json)")]
    for args, code, words in cases:
        assert main(["invert", "eg3d", args[0], "--checkpoint", args[1], "--steps", "1",
                     "--no-progress", "--device", "cpu", "--out", str(tmp_path / "x"),
                     *args[2:]]) == code, args
        err = capsys.readouterr().err
        assert err.startswith("pyface invert: ") and words in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "x").exists()
    assert sorted(os.listdir(converted)) == ["meta.json", "tensors.safetensors"]


def test_a_failed_write_names_out_and_leaves_no_half_file(converted, tmp_path, capsys,
                                                          monkeypatch):
    """reconstruction.png is written under a temporary name and renamed: a write that fails
    midway leaves the earlier file as it was, and the error is one line naming --out."""
    from PIL import Image as PILImage

    img = _png(tmp_path / "face.png", 32, 32)
    out = tmp_path / "inv"
    assert _invert(img, converted, out) == 0
    before = (out / "reconstruction.png").read_bytes()

    def full_disk(self, fp, *a, **k):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PILImage.Image, "save", full_disk)
    capsys.readouterr()
    assert _invert(img, converted, out, "--seed", "3") == 1
    err = capsys.readouterr().err
    assert err.endswith(f"pyface invert: --out {out}: cannot write reconstruction.png (No space "
                        "left on device)\n"), err
    assert (out / "reconstruction.png").read_bytes() == before
    assert sorted(os.listdir(out)) == ["latent", "reconstruction.png"]


# -- --option: the model's inference options ---------------------------------------------------

def test_option_reaches_a_converted_generator_and_is_recorded(converted, tmp_path,
                                                              monkeypatch):
    """--option builds the converted release's generator with the given samples per ray (what
    its renderer marches) and the latent's metadata records them as model.KEY; without it the
    saved counts are used and the record is empty."""
    from pyface.nn import render

    marched, march = [], render.render_triplane
    monkeypatch.setattr(render, "render_triplane", lambda *a, **kw: (
        marched.append((kw["n_coarse"], kw["n_fine"])), march(*a, **kw))[1])
    img = _png(tmp_path / "face.png", 32, 32)
    assert _invert(img, converted, tmp_path / "a", "--option",
                   "generator.render.depth_resolution=7", "--option",
                   "model.generator.render.depth_resolution_importance=5") == 0
    assert marched and set(marched) == {(7, 5)}
    _, meta = ckpt.load_weights(str(tmp_path / "a" / "latent"), kind="eg3d-latent")
    assert meta["config"]["options"] == {"model.generator.render.depth_resolution": 7,
                                         "model.generator.render.depth_resolution_importance": 5}
    saved = ckpt.read_meta(converted)["config"]["generator"]["render"]
    marched.clear()
    assert _invert(img, converted, tmp_path / "b") == 0
    assert set(marched) == {(saved["depth_resolution"], saved["depth_resolution_importance"])}
    assert (saved["depth_resolution"], saved["depth_resolution_importance"]) != (7, 5)
    _, meta = ckpt.load_weights(str(tmp_path / "b" / "latent"))
    assert meta["config"]["options"] == {}


@pytest.mark.parametrize("item, msg", [
    ("generator.render.ray_start=2",
     "options: 'generator.render.ray_start' is not an inference option of model 'eg3d' (set when "
     "it was trained; only the inference options may change on a trained model); valid: "
     "model.generator.render.depth_resolution, "
     "model.generator.render.depth_resolution_importance, model.generator.render.backend, "
     "model.generator.render.recompute, model.generator.render.chunk_points, "
     "model.generator.sr_noise_mode\n"),
    ("pti_steps=2", "options: 'pti_steps' is not an inference option of model 'eg3d'"),
    ("generator.render.depth_resolution=many",
     "model.generator.render.depth_resolution: expected int, got 'many'"),
    ("model.generator.render.depth_resolution=1",
     "model.generator.render.depth_resolution: expected an int >= 2, got 1"),
    ("generator.sr_noise_mode=fresh", "model.generator.sr_noise_mode: expected one of"),
    ("generator.render.depth_resolution", "--option 'generator.render.depth_resolution': "
                                          "expected key=value"),
])
def test_a_bad_option_exits_2_naming_it_before_anything_is_read(tmp_path, capsys, monkeypatch,
                                                                item, msg):
    """A key that is no inference option lists the valid ones, a bad value names model.KEY:
    exit 2, one line, before the image or the checkpoint is read (neither exists here)."""
    from pyface.models.eg3d import pipeline

    monkeypatch.setattr(pipeline, "load_generator", lambda *a, **kw: pytest.fail("loaded"))
    assert _invert(str(tmp_path / "missing.png"), str(tmp_path / "missing"), tmp_path / "inv",
                   "--option", item) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyface invert: ") and msg in err and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "inv").exists()


def test_help_explains_option(capsys):
    with pytest.raises(SystemExit):
        main(["invert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--option KEY=VALUE" in text and "pyface invert exits 2 for a bad key or value" in text
    assert ("pyface invert eg3d face.png --checkpoint runs/eg3d --option "
            "generator.render.depth_resolution=96") in text
