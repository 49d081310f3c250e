"""`pyface convert` given the wrong thing: each mistake is one line that names SRC or OUT, says what
was expected and what the file or folder is; nothing in a file is run; OUT is never half-written
and never replaces something that is not a weights folder."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from pyface import checkpoint as ckpt
from pyface.cli import main
from pyface.convert import ConversionError, convert_eg3d, convert_goha, convert_otavatar


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _vgg_like(tmp_path, n=40):
    path = tmp_path / "plain.pth"
    torch.save({f"features.{i}.weight": torch.zeros(1) for i in range(n)}, path)
    return str(path)


# --------------------------------------------------------------------------------------------
# what a file that is not weights holds
# --------------------------------------------------------------------------------------------

def _files(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (path, expected words in the error)."""
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "notes.pth").write_text("model weights are on the lab server\n")
    (tmp_path / "clip.pth").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(64))
    (tmp_path / "face.pth").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    torch.save({"w": torch.zeros(1000)}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    return {"empty": (str(tmp_path / "empty.pth"), "an empty file (0 bytes)"),
            "text": (str(tmp_path / "notes.pth"),
                     "a text file (it starts with 'model weights are on the lab server')"),
            "video": (str(tmp_path / "clip.pth"), "an MP4 / MOV video"),
            "image": (str(tmp_path / "face.pth"), "a PNG image"),
            "truncated": (str(tmp_path / "cut.pth"), "a truncated or damaged torch.save archive")}


@pytest.mark.parametrize("kind", ["empty", "text", "video", "image", "truncated"])
def test_a_file_that_is_not_weights_is_named_for_what_it_is(tmp_path, kind):
    path, words = _files(tmp_path)[kind]
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_weights_file(path)
    msg = str(info.value)
    assert words in msg and "expected a torch.save checkpoint" in msg, msg
    assert "Traceback" not in msg and "\n" not in msg


def test_a_pickle_with_objects_is_refused_by_name_and_never_runs(tmp_path):
    """Protocol-4 pickles are not read by torch's weights-only loader at all; the message still
    names the global the file would call, found without running it."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"w": _Evil(marker)}, protocol=4))
    with pytest.raises(ckpt.CheckpointError,
                       match=r"weights_only=True\) refused it: a pickle that holds Python "
                             r"objects, not only tensors \(global posix\.system\)"):
        ckpt.load_weights_file(str(path))
    assert not marker.exists()


def test_an_eg3d_pickle_given_to_a_pth_converter_points_at_convert_eg3d(tmp_path,
                                                                       eg3d_modules):
    pers, _ = eg3d_modules
    meta = dict(type="class", version=4, module_src="raise SystemExit", class_name="x",
                state={"_parameters": {}, "_buffers": {}, "_modules": {}})

    class Net:
        pass

    class P(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, Net):
                return pers._reconstruct_persistent_obj, (meta,)
            return NotImplemented

    with open(tmp_path / "net.pkl", "wb") as f:
        P(f, protocol=4).dump({"G_ema": Net()})
    assert main(["convert", "otavatar", str(tmp_path / "net.pkl"), str(tmp_path / "o")]) == 1
    with pytest.raises(ckpt.CheckpointError, match=r"EG3D-style network pickle .*: convert it "
                                                   r"with `pyface convert eg3d`"):
        ckpt.load_weights_file(str(tmp_path / "net.pkl"))


def test_safetensors_content_loads_whatever_the_extension(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.arange(3.0)}, str(tmp_path / "weights.pth"))
    assert torch.equal(ckpt.load_weights_file(str(tmp_path / "weights.pth"))["w"],
                       torch.arange(3.0))


@pytest.mark.parametrize("kind", ["empty", "text", "video", "truncated"])
def test_convert_eg3d_says_what_the_file_is(tmp_path, kind):
    path, words = _files(tmp_path)[kind]
    with pytest.raises(ConversionError) as info:
        convert_eg3d(path, str(tmp_path / "o"))
    assert f"not an EG3D network pickle: {words}" in str(info.value)
    assert not (tmp_path / "o").exists()


def test_convert_eg3d_says_a_pickle_is_cut_short(tmp_path):
    data = pickle.dumps({"G_ema": {"w": list(range(2000))}}, protocol=4)
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"not an EG3D network pickle: a truncated or "
                                              r"damaged pickle \(\d+ bytes; "):
        convert_eg3d(str(tmp_path / "cut.pkl"), str(tmp_path / "o"))


# --------------------------------------------------------------------------------------------
# another model's release
# --------------------------------------------------------------------------------------------

def test_another_models_release_names_its_converter(tmp_path):
    torch.save({"iter": 1, "model_state_dict": {"x": torch.zeros(1)}, "discriminator_dict": {}},
               tmp_path / "goha.ckpt")
    torch.save({"net_Warp_ema": {"x": torch.zeros(1)}, "net_G_ema": None}, tmp_path / "ota.pt")
    with pytest.raises(ConversionError, match=r"expected key 'net_Warp_ema' .* \(the file looks "
                                              r"like a GOHA release .*: pyface convert goha "
                                              r"SRC OUT\)"):
        convert_otavatar(str(tmp_path / "goha.ckpt"), str(tmp_path / "o"))
    with pytest.raises(ConversionError, match=r"no 'model_state_dict' .*\(the file looks like an "
                                              r"OTAvatar release .*: pyface convert otavatar"):
        convert_goha(str(tmp_path / "ota.pt"), str(tmp_path / "o"))
    from pyface.convert import convert_hopenet

    with pytest.raises(ConversionError, match=r"expected Hopenet's state dict of tensors, got a "
                                              r"dict with entries discriminator_dict, iter, "
                                              r"model_state_dict \(the file looks like a GOHA"):
        convert_hopenet(str(tmp_path / "goha.ckpt"), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_a_long_key_list_is_cut_to_a_few(tmp_path):
    with pytest.raises(ConversionError) as info:
        convert_otavatar(_vgg_like(tmp_path), str(tmp_path / "o"))
    assert "... (40 in all)" in str(info.value) and "features.9.weight" not in str(info.value)


# --------------------------------------------------------------------------------------------
# SRC and OUT on the command line
# --------------------------------------------------------------------------------------------

def test_cli_names_src_and_out(tmp_path, capsys):
    src = _vgg_like(tmp_path)
    assert main(["convert", "otavatar", str(tmp_path / "missing.pt"), str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.startswith("pyface convert otavatar: SRC ")
    (tmp_path / "f").write_text("x")
    assert main(["convert", "otavatar", src, str(tmp_path / "f")]) == 2     # OUT cannot be one
    assert capsys.readouterr().err.startswith(f"pyface convert otavatar: OUT {tmp_path / 'f'}: "
                                              "exists and is not a folder")
    assert main(["convert", "otavatar", src, src]) == 2     # SRC given again as OUT
    assert capsys.readouterr().err == (f"pyface convert otavatar: SRC {src}: the same path as "
                                       "OUT; expected a released weights file and a different "
                                       "output folder\n")


def test_out_that_is_a_training_checkpoint_is_refused(tmp_path, capsys):
    """A training checkpoint holds the optimizer and the step; a conversion never replaces it
    (an earlier weights folder still is replaced)."""
    torch.save({"net_Warp_ema": {"x": torch.zeros(1)}}, tmp_path / "ota.pt")
    run = ckpt.save_folder(str(tmp_path / "ckpt-000100"), {"w": torch.ones(2)},
                           {"kind": "train", "step": 100})
    before = ckpt.read_meta(run)["tensors_sha256"]
    assert main(["convert", "otavatar", str(tmp_path / "ota.pt"), run]) == 2
    err = capsys.readouterr().err
    assert f"OUT {run}: a pyface training checkpoint (step 100), not a weights folder" in err
    assert ckpt.read_meta(run)["tensors_sha256"] == before


def test_src_that_is_already_converted_or_is_out_is_refused(tmp_path, capsys):
    done = ckpt.save_weights(str(tmp_path / "done"), {"w": torch.ones(1)}, kind="otavatar")
    assert main(["convert", "goha", done, str(tmp_path / "o")]) == 1
    assert (f"SRC {done}: already a pyface weights folder (kind 'otavatar')"
            in capsys.readouterr().err)
    # SRC given again as OUT is a wrong command line (2), whatever SRC holds or whether it
    # exists: spelled alike, or another name of the same folder
    os.symlink(tmp_path, tmp_path / "again")
    for src, out in ((done, done), (done, str(tmp_path / "again" / "done")),
                     (str(tmp_path / "gone.pt"), str(tmp_path / "gone.pt"))):
        assert main(["convert", "otavatar", src, out]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"SRC {src}: the same path as OUT; expected" in err
    assert ckpt.read_meta(done)["kind"] == "otavatar"
    assert sorted(os.listdir(tmp_path)) == ["again", "done"]


@pytest.mark.parametrize("fail", [PermissionError(13, "Permission denied"), KeyboardInterrupt()])
def test_a_write_that_fails_leaves_out_as_it_was(tmp_path, monkeypatch, capsys, fail):
    """The folder is written under a temporary name and renamed: a failed or interrupted write
    leaves no half folder, and an earlier weights folder at OUT keeps its tensors."""
    import safetensors.torch

    from test_convert_otavatar import write_release

    write_release(tmp_path / "ota.pt", gen=None)
    out = ckpt.save_weights(str(tmp_path / "out"), {"old": torch.ones(1)}, kind="otavatar")

    def broken(tensors, filename, *a, **k):
        if isinstance(fail, OSError):
            raise type(fail)(fail.errno, fail.strerror, filename)
        raise fail

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    rc = main(["convert", "otavatar", str(tmp_path / "ota.pt"), out])
    err = capsys.readouterr().err
    if isinstance(fail, OSError):
        assert rc == 1 and f"OUT {out}: cannot write the weights folder there (Permission " \
                           "denied)" in err, err
    else:
        assert rc == 130 and "interrupted" in err
    assert sorted(os.listdir(tmp_path)) == ["ota.pt", "out"]       # no temporaries
    assert list(ckpt.load_weights(out)[0]) == ["old"]


def test_cli_says_what_a_state_dict_converter_got_and_which_converter_fits(tmp_path, capsys):
    torch.save({"iter": 1, "model_state_dict": {"x": torch.zeros(1)}, "discriminator_dict": {}},
               tmp_path / "goha.ckpt")
    src = str(tmp_path / "goha.ckpt")
    for fmt in ("vgg19", "face-parser", "dense-motion"):
        assert main(["convert", fmt, src, str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err
        assert ("expected a state dict of tensors; the file holds a dict with entries "
                "discriminator_dict, iter, model_state_dict (the file looks like a GOHA release "
                "(model_state_dict / discriminator_dict): pyface convert goha SRC OUT)") in err, err
    assert main(["convert", "eg3d", src, str(tmp_path / "o")]) == 1
    assert "not an EG3D network pickle (.pkl)" in (err := capsys.readouterr().err) and \
        "pyface convert goha SRC OUT" in err
    assert not (tmp_path / "o").exists()


def test_identify_release_by_entry_and_key_names():
    from pyface.convert import identify_release

    z = torch.zeros(1)
    assert identify_release({"params": {"conv_body.0.0.weight": z, "final_linear.weight": z}}
                            )[0] == "gfpgan-d"
    assert identify_release({"params_ema": {}})[0] == "gfpgan"
    assert identify_release({"module.fc_yaw.weight": z})[0] == "hopenet"
    assert identify_release({"state_dict": {"cp.resnet.conv1.weight": z}})[0] == "face-parser"
    assert identify_release({"G_ema": None})[0] == "eg3d"
    assert identify_release({"weight": z}) is None and identify_release([z]) is None


def test_render_resolution_is_checked_before_src_is_read(tmp_path, capsys):
    assert main(["convert", "goha", "--render-resolution", "0", str(tmp_path / "missing.ckpt"),
                 str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == ("pyface convert goha: --render-resolution: expected an "
                                       "integer >= 1, got 0\n")


def test_replacing_an_earlier_weights_folder_is_said(tmp_path, capsys):
    from test_convert_otavatar import write_release

    write_release(tmp_path / "ota.pt", gen=None)
    old = ckpt.save_weights(str(tmp_path / "w"), {"x": torch.ones(1)}, kind="eg3d",
                            extra={"source": "net.pkl"})
    assert main(["convert", "otavatar", str(tmp_path / "ota.pt"), old]) == 0
    err = capsys.readouterr().err
    assert (f"note: OUT {old}: replaced the earlier 'eg3d' weights folder (converted from "
            "net.pkl)") in err
    assert ckpt.read_meta(old)["kind"] == "otavatar"
    assert main(["convert", "otavatar", str(tmp_path / "ota.pt"), str(tmp_path / "new")]) == 0
    assert "replaced" not in capsys.readouterr().err


def test_no_ema_on_a_file_with_only_the_ema_weights_says_so(tmp_path):
    torch.save({"net_Warp_ema": {"x": torch.zeros(1)}, "net_G_ema": None}, tmp_path / "e.pt")
    with pytest.raises(ConversionError, match=r"expected key 'net_Warp' .* \(the EMA weights "
                                              r"only: drop ema=False, --no-ema\)"):
        convert_otavatar(str(tmp_path / "e.pt"), str(tmp_path / "o"), ema=False)


def test_an_empty_out_never_replaces_the_working_directory(tmp_path, monkeypatch, capsys):
    """os.path.abspath("") is the working directory: an empty OUT used to be taken as a new
    folder there, and the working directory was replaced by the weights folder."""
    torch.save({"net_Warp_ema": {"x": torch.zeros(1)}}, tmp_path / "ota.pt")
    (tmp_path / "mine.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "otavatar", "ota.pt", ""]) == 2
    assert capsys.readouterr().err == ("pyface convert otavatar: OUT expected a folder path, got "
                                       "'' (an empty path would name the working directory)\n")
    assert sorted(os.listdir(tmp_path)) == ["mine.txt", "ota.pt"]
    with pytest.raises(ckpt.CheckpointError, match="expected a folder path, got ''"):
        ckpt.save_weights("", {"x": torch.zeros(1)}, kind="test")
    assert sorted(os.listdir(tmp_path)) == ["mine.txt", "ota.pt"]


def test_a_weights_folder_that_holds_src_or_other_files_is_not_replaced(tmp_path, capsys):
    """Converting a file kept inside its earlier output folder used to delete that file with the
    folder it replaced."""
    from test_convert_otavatar import write_release

    out = tmp_path / "w"
    write_release(tmp_path / "ota.pt", gen=None)
    assert main(["convert", "otavatar", str(tmp_path / "ota.pt"), str(out)]) == 0
    os.replace(tmp_path / "ota.pt", out / "ota.pt")
    assert main(["convert", "otavatar", str(out / "ota.pt"), str(out)]) == 2
    assert (f"OUT {out}: a pyface folder that also holds other files (ota.pt), which replacing "
            "it would delete") in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["meta.json", "ota.pt", "tensors.safetensors"]
    with pytest.raises(ckpt.CheckpointError, match=r"also holds other files \(ota\.pt\)"):
        ckpt.save_weights(str(out), {"x": torch.zeros(1)}, kind="test")
    assert (out / "ota.pt").is_file()


def test_the_content_decides_safetensors_or_torch_save(tmp_path):
    from safetensors.torch import save_file

    torch.save({"w": torch.ones(2)}, tmp_path / "named.safetensors")      # a torch.save archive
    assert torch.equal(ckpt.load_weights_file(str(tmp_path / "named.safetensors"))["w"],
                       torch.ones(2))
    save_file({"w": torch.zeros(4096)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:40])
    with pytest.raises(ckpt.CheckpointError, match=r"not a readable weights file: a truncated "
                                                   r"safetensors file \(its header alone is \d+ "
                                                   r"bytes, the file 40\)"):
        ckpt.load_weights_file(str(tmp_path / "cut.safetensors"))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=r"an empty file \(0 bytes\)"):
        ckpt.load_weights_file(str(tmp_path / "empty.safetensors"))


def test_a_pipe_is_not_called_missing(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ckpt.CheckpointError, match=r"not a regular file \(a device, pipe or "
                                                   r"socket\); expected a torch.save"):
        ckpt.load_weights_file(str(tmp_path / "pipe"))
    with pytest.raises(ConversionError, match=r"pipe: not a regular file"):
        convert_eg3d(str(tmp_path / "pipe"), str(tmp_path / "o"))


def test_convert_without_format_says_what_is_expected(capsys):
    assert main(["convert"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.startswith("usage: pyface convert")
    assert ("pyface convert: FORMAT: expected one of eg3d, vgg19, arcface, gfpgan, segformer, "
            "gfpgan-d, face-parser, dense-motion, hopenet, otavatar, goha, got none") in cap.err


def test_out_that_is_a_symbolic_link_is_refused(tmp_path, capsys):
    """OUT, a link to an earlier weights folder, used to be renamed aside as OUT.old-PID (a stray
    link left behind: rmtree does not remove a link) and replaced by a new folder, the linked
    folder untouched: a link is refused, naming the folder it points to; nothing changes."""
    from test_convert_otavatar import write_release

    write_release(tmp_path / "ota.pt", gen=None)
    real = ckpt.save_weights(str(tmp_path / "real"), {"x": torch.ones(1)}, kind="eg3d")
    before = (tmp_path / "real" / "tensors.safetensors").read_bytes()
    for target in ("real", "gone"):        # an earlier folder, and a link to nothing
        os.symlink(target, tmp_path / "out")
        assert main(["convert", "otavatar", str(tmp_path / "ota.pt"), str(tmp_path / "out")]) == 2
        where = str(tmp_path / target) + ("" if target == "real" else ", absent")
        assert capsys.readouterr().err == (
            f"pyface convert otavatar: OUT {tmp_path / 'out'}: a symbolic link (to {where}); "
            "pyface writes the new folder and renames it into the path's place, which would "
            "replace the link, not the folder it points to: give "
            f"{tmp_path / target} itself to replace that folder, or remove the link to write a "
            "new folder in its place\n")
        assert sorted(os.listdir(tmp_path)) == ["ota.pt", "out", "real"]
        assert os.readlink(tmp_path / "out") == target
        os.remove(tmp_path / "out")
    assert (tmp_path / "real" / "tensors.safetensors").read_bytes() == before
    os.symlink(str(tmp_path / "real"), tmp_path / "out")
    with pytest.raises(ckpt.CheckpointError, match="a symbolic link"):
        ckpt.save_folder(str(tmp_path / "out"), {"x": torch.zeros(1)}, {})
    assert main(["convert", "otavatar", str(tmp_path / "ota.pt"), real]) == 0   # the folder
    assert ckpt.read_meta(real)["kind"] == "otavatar"
    assert sorted(os.listdir(tmp_path)) == ["ota.pt", "out", "real"]
