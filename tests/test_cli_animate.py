"""``pyface animate`` with the inputs users have: where --out goes, the numeric options' ranges,
images PIL reads in other modes (16-bit grey, EXIF-rotated) and files that are not videos. Every
wrong input is one line naming the option and the value, never a traceback."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

from pyface.cli import main
from pyface.data.driving import read_driving, read_source
from pyface.data.format import DataError

TINY = ["model.resolution=16", "model.plane_resolution=8", "model.plane_channels=4",
        "model.encoder_channels=8", "model.hidden=8", "model.depth_samples=4",
        "data.resolution=16", "data.size=16", "train.batch_size=4", "train.progress=false",
        "train.tensorboard=false", "train.image_every=0", "train.log_every=1"]


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("example") / "run"
    sets = sum((["--set", s] for s in TINY), [])
    assert main(["train", "example", *sets, "--set", f"train.run_dir={run}",
                 "--set", "train.steps=1"]) == 0
    return str(run)


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return str(d)


def _animate(run, frames, *extra):
    return main(["animate", "example", "--checkpoint", run, "--source", frames, "--driving",
                 frames, "--device", "cpu", "--no-progress", *extra])


def test_out_folder_gets_the_default_name(example_run, frames_dir, tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    assert _animate(example_run, frames_dir, "--out", str(tmp_path / "videos")) == 0
    assert os.listdir(tmp_path / "videos") == ["animation.mp4"]
    capsys.readouterr()
    assert _animate(example_run, frames_dir, "--out", str(tmp_path / "new") + os.sep) == 0
    assert os.listdir(tmp_path / "new") == ["animation.mp4"]
    assert capsys.readouterr().out.startswith(os.path.join(str(tmp_path / "new"),
                                                           "animation.mp4"))


@pytest.mark.parametrize("out, msg", [
    ("noext", "--out: expected a video file name ending in .mp4"),
    ("still.png", "--out: expected a video file name ending in .mp4"),
    ("afile/x.mp4", "cannot create its folder: "),
])
def test_out_that_cannot_be_a_video_is_refused_before_any_work(example_run, frames_dir,
                                                               tmp_path, capsys, out, msg):
    (tmp_path / "afile").write_text("x")
    assert _animate(example_run, frames_dir, "--out", str(tmp_path / out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyface animate: ") and msg in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["afile"]                 # nothing written


@pytest.mark.parametrize("option, value, msg", [
    ("--fps", "0", "--fps: expected a frame rate > 0, got 0.0"),
    ("--fps", "-5", "--fps: expected a frame rate > 0, got -5.0"),
    ("--fps", "nan", "--fps: expected a frame rate > 0, got nan"),
    ("--fps", "inf", "--fps: expected a frame rate > 0, got inf"),
    ("--frames", "0", "--frames: expected an integer >= 1, got 0"),
    ("--stride", "-1", "--stride: expected an integer >= 1, got -1"),
    ("--batch", "0", "--batch: expected an integer >= 1, got 0"),
    ("--truncation", "nan", "--truncation: expected a finite number, got nan"),
    ("--driving", "", "--driving: expected a path, got ''"),
])
def test_numeric_options_name_the_option_and_value(example_run, frames_dir, tmp_path, capsys,
                                                   option, value, msg):
    assert _animate(example_run, frames_dir, "--out", str(tmp_path / "a.mp4"), option,
                    value) == 2
    assert capsys.readouterr().err == f"pyface animate: {msg}\n"
    assert not (tmp_path / "a.mp4").exists()


def test_frames_and_stride_beyond_the_clip_use_what_there_is(example_run, frames_dir, tmp_path,
                                                             capsys):
    assert _animate(example_run, frames_dir, "--out", str(tmp_path / "a.mp4"), "--frames", "100",
                    "--stride", "2", "--batch", "100") == 0
    assert "2 frames at 16x16" in capsys.readouterr().out


def test_a_file_that_is_not_a_video_says_so(example_run, frames_dir, tmp_path, capsys):
    pytest.importorskip("imageio_ffmpeg")
    (tmp_path / "notes.mp4").write_text("hello")
    assert main(["animate", "example", "--checkpoint", example_run, "--source", frames_dir,
                 "--driving", str(tmp_path / "notes.mp4"), "--device", "cpu",
                 "--out", str(tmp_path / "a.mp4")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyface animate: ") and "notes.mp4: not a video file ffmpeg can read" \
        in err and "pip install" not in err and err.count("\n") == 1


def test_16_bit_grey_png_keeps_its_tones(tmp_path):
    """PIL converts I;16 to RGB by clipping at 255 (the image turns white); the reader scales."""
    a = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "deep.png")
    img = read_source(str(tmp_path / "deep.png"), None)["image"]
    want = np.round(a / 257.0) / 127.5 - 1
    np.testing.assert_allclose(img[0].numpy(), want, atol=1e-6)
    assert float(img.mean()) == pytest.approx(0.0, abs=0.01)


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored landscape with orientation 6 (rotate 90 degrees clockwise) is read
    upright, as `pyface data prepare` reads it."""
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = 255                                  # left half white in storage
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    img = read_source(str(tmp_path / "phone.jpg"), None)["image"]
    assert img.shape == (3, 10, 10)                  # upright 20x10, centre-cropped to 10x10
    top, bottom = img[:, :2].mean(), img[:, -2:].mean()
    assert top > 0.9 and bottom < -0.9               # white half rotated to the top
    assert read_driving(str(tmp_path / "phone.jpg"), None)["image"].shape == (1, 3, 10, 10)


def test_unreadable_image_source_is_a_data_error(tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(DataError, match=r"x\.png: not a readable image"):
        read_source(str(tmp_path / "x.png"), 16)


def test_checkpoint_that_is_a_weights_file_points_to_convert(frames_dir, tmp_path, capsys):
    (tmp_path / "net.pth").write_bytes(b"x")
    assert main(["animate", "example", "--checkpoint", str(tmp_path / "net.pth"), "--source",
                 frames_dir, "--device", "cpu", "--out", str(tmp_path / "a.mp4")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyface animate: checkpoint ") and "it is a file" in err
    assert "pyface convert FORMAT FILE OUT" in err and err.count("\n") == 1


def test_out_that_is_the_driving_video_is_refused(example_run, frames_dir, tmp_path, capsys):
    import imageio.v2 as iio

    video = tmp_path / "drive.mp4"
    iio.mimwrite(str(video), list(np.full((3, 16, 16, 3), 90, np.uint8)), fps=5,
                 macro_block_size=1)
    before = video.read_bytes()
    assert main(["animate", "example", "--checkpoint", example_run, "--source", frames_dir,
                 "--driving", str(video), "--device", "cpu", "--out", str(video)]) == 2
    assert "the same file as --driving" in capsys.readouterr().err
    assert video.read_bytes() == before


@pytest.mark.parametrize("stop, code, msg", [
    (KeyboardInterrupt, 130, "pyface animate: interrupted"),
    (lambda: DataError("frame 1: unreadable"), 1, "pyface animate: frame 1: unreadable"),
])
@pytest.mark.parametrize("before", [False, True])
def test_a_stopped_animation_leaves_no_partial_video(example_run, frames_dir, tmp_path, capsys,
                                                     monkeypatch, stop, code, msg, before):
    """Ctrl-C, or a bad driving frame, after some frames were written: --out is neither a
    partial video nor replaced (an earlier animation there is kept), and no temporary is left."""
    from pyface.train.example import ExamplePipeline

    generate, calls = ExamplePipeline.generate, []

    def gen(self, state, motion, **controls):
        calls.append(1)
        if len(calls) == 2:                     # the second chunk: the first one is written
            raise stop()
        return generate(self, state, motion, **controls)

    out = tmp_path / "vids" / "a.mp4"
    if before:
        out.parent.mkdir()
        out.write_bytes(b"an earlier animation")
    monkeypatch.setattr(ExamplePipeline, "generate", gen)
    assert main(["animate", "example", "--checkpoint", example_run, "--source", frames_dir,
                 "--driving", frames_dir, "--device", "cpu", "--no-progress", "--batch", "1",
                 "--out", str(out)]) == code
    assert len(calls) == 2
    assert capsys.readouterr().err.strip() == msg
    assert sorted(os.listdir(out.parent)) == (["a.mp4"] if before else [])
    if before:
        assert out.read_bytes() == b"an earlier animation"


def _zero_frame_mp4(path) -> str:
    """An mp4 container written with no frames (ffmpeg -frames:v 0): it has no stream."""
    import subprocess

    ffmpeg = pytest.importorskip("imageio_ffmpeg").get_ffmpeg_exe()
    subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "color=c=black:s=16x16:r=5", "-frames:v", "0", "-c:v", "libx264",
                    str(path)], check=True)
    assert os.path.getsize(path) > 0
    return str(path)


@pytest.mark.parametrize("role", ["--driving", "--source"])
def test_a_zero_frame_video_says_it_has_no_frames(example_run, frames_dir, tmp_path, capsys,
                                                  role):
    empty = _zero_frame_mp4(tmp_path / "empty.mp4")
    inputs = {"--source": frames_dir, "--driving": frames_dir, role: empty}
    assert main(["animate", "example", "--checkpoint", example_run, *sum(inputs.items(), ()),
                 "--device", "cpu", "--no-progress", "--out", str(tmp_path / "a.mp4")]) == 1
    err = capsys.readouterr().err
    assert err == f"pyface animate: {empty}: the video has no frames (ffmpeg finds no video " \
                  "stream in it)\n"
    assert not (tmp_path / "a.mp4").exists()


def test_one_frame_is_counted_in_the_singular(example_run, frames_dir, tmp_path, capsys):
    assert _animate(example_run, frames_dir, "--out", str(tmp_path / "a.mp4"), "--frames",
                    "1") == 0
    out = capsys.readouterr().out
    assert "\n  1 frame at 16x16; " in out
    assert not re.search(r"(?<![\d.])1 frames", out)   # not "813.1 frames/s" of the fps


@pytest.mark.parametrize("extra, named", [
    (["--stride", "2"], "--stride"),
    (["--batch", "4"], "--batch"),
    (["--stride", "1", "--batch", "8"], "--stride or --batch"),      # defaults given explicitly
])
def test_seeds_refuse_stride_and_batch(tmp_path, capsys, extra, named):
    """EG3D's seed orbit renders every frame itself: --stride and --batch would be ignored."""
    assert main(["animate", "eg3d", "--checkpoint", str(tmp_path / "none"), "--seeds", "0",
                 "--out", str(tmp_path / "a.mp4"), *extra]) == 2
    assert capsys.readouterr().err == (f"pyface animate: --seeds renders every orbit frame and "
                                       f"takes no {named} (they pick and batch driving "
                                       "frames)\n")
    assert os.listdir(tmp_path) == []


def _video_folder(root, name, *, drop=()) -> str:
    """A 3-frame pyface video folder (frames, coeffs, cameras, landmarks) without ``drop``."""
    from pyface.data import format as fmt

    cam = np.concatenate([np.eye(4).reshape(-1), [4.26, 0, 0.5, 0, 4.26, 0.5, 0, 0, 1]])
    fmt.write_video(str(root), name, np.full((3, 16, 16, 3), 100, np.uint8),
                    np.zeros((3, 257), np.float32), np.tile(cam, (3, 1)).astype(np.float32),
                    identity=name, fps=5.0, landmarks=np.full((3, 68, 2), 8.0, np.float32))
    for f in drop:
        os.remove(os.path.join(root, name, f))
    return os.path.join(str(root), name)


@pytest.mark.parametrize("model, inputs, msg", [
    ("eg3d", ("frames", "frames"), "source['camera'] missing: EG3D inversion needs the image's "
                                   "EG3D camera label (25,)"),
    ("eg3d", ("video", "frames"), "driving['camera']: expected (T, 25) EG3D labels, got None"),
    ("otavatar", ("frames", "video"), "source['camera']: missing; OTAvatar's inversion needs "
                                      "the source's EG3D camera label (25,)"),
    ("otavatar", ("video", "frames"), "driving: expected 'motion' (T, 70, W) windows or "
                                      "'coeffs' (T, 257)"),
    ("goha", ("nocoeffs", "video"), "source['coeffs']: missing; GOHA needs the source's camera"),
    ("goha", ("video", "nocamera"), "driving['camera']: missing; GOHA is driven by per-frame "
                                    "cameras"),
    ("export3d", ("video", "frames"), "driving['coeffs']: missing; Export3D is driven by 3DMM"),
])
def test_a_missing_label_is_refused_before_the_model_loads(frames_dir, tmp_path, capsys, model,
                                                           inputs, msg):
    """The checkpoint does not exist: the label error comes first, from the inputs' files
    alone, with the message the pipeline's stage would raise after loading (and, for EG3D and
    OTAvatar, after minutes of source inversion)."""
    paths = {"frames": frames_dir, "video": _video_folder(tmp_path, "v"),
             "nocoeffs": _video_folder(tmp_path, "nc", drop=["coeffs.npy"]),
             "nocamera": _video_folder(tmp_path, "ncam", drop=["dataset.json"])}
    src, drv = (paths[k] for k in inputs)
    assert main(["animate", model, "--checkpoint", str(tmp_path / "missing"), "--source", src,
                 "--driving", drv, "--device", "cpu", "--out", str(tmp_path / "a.mp4")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pyface animate: {msg}") and err.count("\n") == 1
    assert ("pyface data prepare" in err) == (frames_dir in (src, drv))
    assert not (tmp_path / "a.mp4").exists()


@pytest.mark.parametrize("model", ["eg3d", "export3d", "goha", "mmfa"])
def test_a_model_without_default_motion_needs_driving_before_it_loads(frames_dir, tmp_path,
                                                                     capsys, model):
    assert main(["animate", model, "--checkpoint", str(tmp_path / "missing"), "--source",
                 frames_dir, "--device", "cpu", "--out", str(tmp_path / "a.mp4")]) == 2
    assert capsys.readouterr().err == (f"pyface animate: model {model!r} needs --driving (a "
                                       "video folder, video file or frame folder)\n")


def test_inputs_that_carry_the_labels_reach_the_checkpoint(tmp_path, capsys):
    """The early check refuses nothing a model can use: with every label present the next
    error is the missing checkpoint."""
    video = _video_folder(tmp_path, "v")
    assert main(["animate", "goha", "--checkpoint", str(tmp_path / "missing"), "--source",
                 video, "--driving", video, "--device", "cpu",
                 "--out", str(tmp_path / "a.mp4")]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "GOHA" not in err and "needs" not in err


def test_frame_labels_name_what_the_readers_give(frames_dir, tmp_path):
    from pyface.data.driving import frame_labels

    full = _video_folder(tmp_path, "v")
    part = _video_folder(tmp_path, "p", drop=["coeffs.npy", "landmarks.npy"])
    assert frame_labels(full) == set(read_source(full, None)) == set(read_driving(full, None)) \
        == {"image", "camera", "coeffs", "landmarks"}
    assert frame_labels(part) == {"image", "camera"}
    assert frame_labels(frames_dir) == set(read_source(frames_dir, None)) == {"image"}
    with pytest.raises(DataError, match=r"nowhere: not found"):
        frame_labels(str(tmp_path / "nowhere"))


def test_a_missing_source_is_named_before_the_checkpoint_is_read(tmp_path, capsys):
    assert main(["animate", "example", "--checkpoint", str(tmp_path / "none"), "--source",
                 str(tmp_path / "x.png"), "--out", str(tmp_path / "a.mp4")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pyface animate: {tmp_path / 'x.png'}: not found") and \
        "none" not in err and err.count("\n") == 1


@pytest.mark.parametrize("item, message, code", [
    ("vgg", "--weights: expected NAME=PATH, got 'vgg'", 2),
    ("vgg=MISSING", "--weights vgg=MISSING: no such file", 1),
    ("vgg=FILE", "weights: model 'example''s pipeline uses no pretrained networks, got ['vgg']",
     2),
])
def test_weights_are_checked_before_any_work(example_run, frames_dir, tmp_path, capsys, item,
                                             message, code):
    """--weights NAME=PATH (OTAvatar's inversion networks): a malformed item and a model whose
    pipeline uses no pretrained network are one line with exit code 2 (usage), a missing file
    one line with exit code 1 (an input), all before any work."""
    (tmp_path / "vgg.pth").write_bytes(b"")
    item = item.replace("MISSING", str(tmp_path / "nope.pth")).replace("FILE",
                                                                      str(tmp_path / "vgg.pth"))
    message = message.replace("MISSING", str(tmp_path / "nope.pth"))
    assert _animate(example_run, frames_dir, "--out", str(tmp_path / "a.mp4"), "--weights",
                    item) == code
    assert capsys.readouterr().err == f"pyface animate: {message}\n"
    assert not (tmp_path / "a.mp4").exists()


# -- --camera and --control ------------------------------------------------------------------

def _orbit_video(root, name, n=5) -> str:
    """A pyface video folder whose ``n`` frames look at the head from different yaws."""
    import math

    from pyface.data import format as fmt
    from pyface.face.cameras import orbit_labels

    cams = orbit_labels(n, math.radians(25), 0.0, kind="yaw").numpy().astype(np.float32)
    rng = np.random.default_rng(1)
    fmt.write_video(str(root), name, rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
                    np.zeros((n, 257), np.float32), cams, identity=name, fps=5.0,
                    landmarks=np.full((n, 68, 2), 8.0, np.float32))
    return os.path.join(str(root), name)


@pytest.fixture
def recorded(monkeypatch):
    """Records what `pyface animate` hands the example pipeline: the driving cameras reaching
    encode_driving, the controls of every generate call and the frames written."""
    import torch

    from pyface.train import animate_cli
    from pyface.train.example import ExamplePipeline

    seen = {"cameras": [], "controls": [], "frames": []}
    encode, generate = ExamplePipeline.encode_driving, ExamplePipeline.generate
    columns = animate_cli.side_by_side

    def encode_driving(self, driving):
        seen["cameras"].append(driving.get("camera"))
        return encode(self, driving)

    def gen(self, state, motion, **controls):
        seen["controls"].append(controls)
        return generate(self, state, motion, **controls)

    def side_by_side(*cols):
        seen["frames"].append(cols[-1].clone())
        return columns(*cols)

    monkeypatch.setattr(ExamplePipeline, "encode_driving", encode_driving)
    monkeypatch.setattr(ExamplePipeline, "generate", gen)
    monkeypatch.setattr(animate_cli, "side_by_side", side_by_side)
    seen["cat"] = lambda key: torch.cat(seen[key])
    return seen


def test_without_camera_the_frames_are_the_pipelines_own(example_run, tmp_path, recorded):
    """The default path is unchanged: the frames are, bit for bit, those of the pipeline called
    by hand, and --camera driving (the default view) gives the same bytes."""
    import torch

    import pyface.models

    video = _orbit_video(tmp_path, "v")
    args = ["animate", "example", "--checkpoint", example_run, "--source", video, "--driving",
            video, "--device", "cpu", "--no-progress", "--batch", "2"]
    assert main(args + ["--out", str(tmp_path / "a.mp4")]) == 0
    default = recorded["cat"]("frames")
    assert recorded["controls"] == [{}, {}, {}]
    pipe = pyface.models.load("example", example_run, device="cpu")
    with torch.no_grad():
        want = pipe.animate(read_source(video, 16), read_driving(video, 16))
    assert torch.equal(default, want)
    recorded["frames"].clear()
    assert main(args + ["--camera", "driving", "--out", str(tmp_path / "b.mp4")]) == 0
    assert torch.equal(recorded["cat"]("frames"), default)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_camera_orbit_and_source_replace_the_driving_cameras(example_run, tmp_path, recorded):
    """orbit: every chunk's cameras are its frames' slice of one orbit over the whole clip
    (OTAvatar's); source: every frame at the source's camera (the example then renders the
    source view throughout). Both change the frames."""
    import math

    import torch

    from pyface.face.cameras import orbit_labels

    video = _orbit_video(tmp_path, "v")
    source = _video_folder(tmp_path, "s")
    args = ["animate", "example", "--checkpoint", example_run, "--source", source, "--driving",
            video, "--device", "cpu", "--no-progress", "--batch", "2",
            "--out", str(tmp_path / "a.mp4")]
    assert main(args) == 0
    default = recorded["cat"]("frames")
    assert torch.equal(recorded["cat"]("cameras"), read_driving(video, None)["camera"])
    for k in ("cameras", "frames"):
        recorded[k].clear()
    assert main(args + ["--camera", "orbit"]) == 0
    assert [c.shape[0] for c in recorded["cameras"]] == [2, 2, 1]
    orbit = orbit_labels(5, math.radians(20), math.radians(8))
    assert torch.equal(recorded["cat"]("cameras"), orbit)
    frames = recorded["cat"]("frames")
    assert frames.shape == default.shape and not torch.equal(frames, default)
    for k in ("cameras", "frames"):
        recorded[k].clear()
    assert main(args + ["--camera", "source"]) == 0
    cams = recorded["cat"]("cameras")
    assert torch.equal(cams, read_source(source, None)["camera"].expand(5, 25))
    frames = recorded["cat"]("frames")
    assert all(torch.equal(f, frames[0]) for f in frames)          # one view: the source's
    assert not torch.equal(frames, default)


class _Ota:
    """What OTAvatar's generate reads before it renders: the generator's orbit radius and
    pivot (not FFHQ's, so the conventions are seen to be read) and drive_pose; it checks its
    state and motion (Pipeline.check_state)."""

    from pyface.train.model import Pipeline as _Pipeline

    check_state = _Pipeline.check_state

    def __init__(self, radius=2.5, pivot=(0.0, 0.05, 0.15)):
        from types import SimpleNamespace

        gcfg = SimpleNamespace(avg_camera_radius=radius, avg_camera_pivot=list(pivot))
        self.model = SimpleNamespace(cfg=SimpleNamespace(drive_pose=True),
                                     generator=SimpleNamespace(cfg=gcfg))
        self.device = "cpu"


def _otavatar_orbit(monkeypatch, pipe, T, motion=None):
    """The (T, 25) labels OTAvatar's own generate(camera="orbit") renders T driving frames
    from (captured where it applies the inverted intrinsics, before any rendering)."""
    import torch

    import pyface.models.otavatar.model as ota_model
    from pyface.models.otavatar.pipeline import OTAvatarPipeline

    class Seen(Exception):
        pass

    def capture(cam, bias):
        raise Seen(cam)

    monkeypatch.setattr(ota_model, "apply_intrinsics", capture)
    state = {"motion": torch.zeros(1, 70, 9), "camera": torch.zeros(1, 25),
             "intrinsics": torch.zeros(1, 18), "w": torch.zeros(1, 1, 8)}
    with pytest.raises(Seen) as got:
        OTAvatarPipeline.generate(pipe, state, motion or {"motion": torch.zeros(T, 70, 9)},
                                  camera="orbit")
    return got.value.args[0]


def test_every_model_orbits_on_otavatars_orbit(monkeypatch):
    """--camera orbit gives every model the labels OTAvatar's own orbit mode renders: its
    generator's radius and pivot are read, and with EG3D's FFHQ conventions (EG3D's default
    generator config, GOHA, Export3D and the example, which have none) all agree frame by
    frame."""
    from types import SimpleNamespace

    import torch

    from pyface.train.animate_cli import orbit_cameras

    T = 7
    ota = _Ota()
    assert torch.equal(orbit_cameras(ota, T), _otavatar_orbit(monkeypatch, ota, T))
    ffhq = _Ota(2.7, (0.0, 0.0, 0.2))
    want = _otavatar_orbit(monkeypatch, ffhq, T)
    from pyface.models.eg3d.config import EG3DGeneratorConfig

    eg3d = SimpleNamespace(G=SimpleNamespace(cfg=EG3DGeneratorConfig()))
    plain = SimpleNamespace(model=torch.nn.Identity())           # GOHA, Export3D, the example
    for pipe in (ffhq, eg3d, plain):
        assert torch.equal(orbit_cameras(pipe, T), want)
    assert not torch.equal(orbit_cameras(ota, T), want)
    # Export3D's own orbit mode (FFHQ conventions) renders the same labels
    from pyface.models.export3d.pipeline import Export3DPipeline

    e3d = SimpleNamespace(model=SimpleNamespace(generator=torch.nn.Identity()), device="cpu")
    assert torch.equal(Export3DPipeline._camera(e3d, {}, {}, T, "orbit"), want)
    # frames 2 .. 4 of a 7-frame stream (Pipeline.locate): rows 2 .. 4 of that orbit
    from pyface.train.model import locate_frames

    part = locate_frames({"motion": torch.zeros(3, 70, 9)}, 2, T)
    assert torch.equal(Export3DPipeline._camera(e3d, {}, part, 3, "orbit"), want[2:5])
    assert torch.equal(_otavatar_orbit(monkeypatch, ffhq, 3, part), want[2:5])


def test_a_generate_camera_control_is_passed_through(tmp_path, monkeypatch):
    """A pipeline whose generate has a camera control (OTAvatar, Export3D) gets --camera as
    that control; orbit: camera='driving' with the driving cameras replaced by the orbit, so
    the orbit runs once over the clip whatever --batch (their own orbit mode needs to be told
    each chunk's place, Pipeline.locate). --control values reach every call."""
    import torch

    import pyface.models
    from pyface.train.animate_cli import orbit_cameras
    from pyface.train.model import Pipeline

    calls = []

    class Cam(Pipeline):
        resolution = 16

        def encode_source(self, source):
            return {}

        def encode_driving(self, driving):
            return {"camera": driving["camera"], "T": driving["image"].shape[0]}

        def generate(self, state, motion, *, camera: str = "driving", gain: float = 1.0):
            calls.append((camera, motion["camera"], gain))
            return torch.zeros(motion["T"], 3, 16, 16)

    model = type("M", (), {"Pipeline": Cam})
    monkeypatch.setattr(pyface.models, "model_class", lambda name: model)
    monkeypatch.setattr(pyface.models, "load",
                        lambda *a, **k: Cam(torch.nn.Identity(), device="cpu"))
    video = _orbit_video(tmp_path, "v")
    args = ["animate", "cam", "--checkpoint", "x", "--source", video, "--driving", video,
            "--device", "cpu", "--no-progress", "--batch", "2", "--out", str(tmp_path / "a.mp4")]
    assert main(args) == 0
    assert [c[0] for c in calls] == ["driving"] * 3 and {c[2] for c in calls} == {1.0}
    for mode in ("source", "driving"):
        calls.clear()
        assert main(args + ["--camera", mode, "--control", "gain=0.5"]) == 0
        assert [(c[0], c[2]) for c in calls] == [(mode, 0.5)] * 3
        assert torch.equal(torch.cat([c[1] for c in calls]), read_driving(video, None)["camera"])
    calls.clear()
    assert main(args + ["--camera", "orbit"]) == 0
    assert [c[0] for c in calls] == ["driving"] * 3
    assert torch.equal(torch.cat([c[1] for c in calls]), orbit_cameras(None, 5))


def test_camera_is_refused_before_the_model_loads(frames_dir, tmp_path, capsys):
    """A model without a camera (mmfa) names the models that take one; no --driving, and a
    --camera driving / source whose frames have no camera label, are refused; the checkpoint
    does not exist, so each error comes before any loading."""
    missing = str(tmp_path / "missing")
    video = _video_folder(tmp_path, "v")
    out = ["--device", "cpu", "--out", str(tmp_path / "a.mp4")]
    assert main(["animate", "mmfa", "--checkpoint", missing, "--source", frames_dir,
                 "--driving", frames_dir, "--camera", "orbit", *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyface animate: --camera: model 'mmfa' has no camera") and \
        err.count("\n") == 1
    named = err.split("models that take --camera: ")[1].strip().split(", ")
    assert {"eg3d", "example", "export3d", "goha", "goha_s1", "otavatar"} <= set(named)
    assert "mmfa" not in named
    assert main(["animate", "otavatar", "--checkpoint", missing, "--source", video,
                 "--camera", "orbit", *out]) == 2
    assert capsys.readouterr().err.startswith("pyface animate: --camera orbit: sets the camera "
                                              "of the driving frames; give --driving")
    nocam = _video_folder(tmp_path, "ncam", drop=["dataset.json"])
    for model, driving in (("export3d", nocam), ("example", frames_dir)):
        assert main(["animate", model, "--checkpoint", missing, "--source", video,
                     "--driving", driving, "--camera", "driving", *out]) == 1
        err = capsys.readouterr().err
        assert err.startswith("pyface animate: driving['camera']: missing; --camera driving") \
            and err.count("\n") == 1
        assert ("pyface data prepare" in err) == (driving == frames_dir)
    assert main(["animate", "example", "--checkpoint", missing, "--source", frames_dir,
                 "--driving", video, "--camera", "source", *out]) == 1
    assert capsys.readouterr().err.startswith("pyface animate: source['camera']: missing; "
                                              "--camera source")
    assert main(["animate", "eg3d", "--checkpoint", missing, "--seeds", "0", "--camera",
                 "orbit", *out]) == 2
    assert "takes no --camera" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["animate", "example", "--checkpoint", missing, "--source", frames_dir,
              "--driving", frames_dir, "--camera", "free", *out])
    assert "invalid choice: 'free' (choose from 'driving', 'source', 'orbit')" in \
        capsys.readouterr().err
    assert not (tmp_path / "a.mp4").exists()


def test_controls_reach_every_generate_call_and_change_the_frames(example_run, tmp_path,
                                                                  recorded):
    """--control yaw_scale=0 (the example's control): every chunk's generate gets it, and every
    frame is then the source's view."""
    import torch

    video = _orbit_video(tmp_path, "v")
    args = ["animate", "example", "--checkpoint", example_run, "--source", video, "--driving",
            video, "--device", "cpu", "--batch", "2", "--out", str(tmp_path / "a.mp4")]
    assert main(args + ["--no-progress"]) == 0
    default = recorded["cat"]("frames")
    recorded["frames"].clear()
    assert main(args + ["--control", "yaw_scale=0"]) == 0          # with the progress bar
    assert recorded["controls"][3:] == [{"yaw_scale": 0.0}] * 3
    frames = recorded["cat"]("frames")
    assert not torch.equal(frames, default) and all(torch.equal(f, frames[0]) for f in frames)


@pytest.mark.parametrize("item, msg", [
    ("yaw_scale", "--control: expected NAME=VALUE, got 'yaw_scale'"),
    ("yaw_scale=", "--control: expected NAME=VALUE, got 'yaw_scale='"),
    ("yaw_scale=fast", "--control yaw_scale=fast: expected a float, got 'fast'"),
    ("yaw_scale=nan", "--control yaw_scale=nan: expected a float, got 'nan'"),
    ("yaw=2", "--control yaw: model 'example' has no generate control 'yaw'; its controls: "
              "yaw_scale (a float, default 1.0)"),
    ("camera=orbit", "--control camera: use --camera {driving,source,orbit}"),
])
def test_a_bad_control_is_refused_before_the_model_loads(frames_dir, tmp_path, capsys, item,
                                                         msg):
    assert main(["animate", "example", "--checkpoint", str(tmp_path / "missing"), "--source",
                 frames_dir, "--driving", frames_dir, "--device", "cpu", "--control", item,
                 "--out", str(tmp_path / "a.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pyface animate: {msg}") and err.count("\n") == 1
    assert not (tmp_path / "a.mp4").exists()


def test_controls_are_parsed_by_the_generate_signature():
    """bool / int / float / str / Literal annotations and untyped controls (a Python literal,
    else text), read from the models' own generate signatures."""
    from typing import Literal

    import torch

    from pyface.models.export3d.pipeline import Export3DPipeline
    from pyface.models.goha.model import GOHAPipeline
    from pyface.models.mmfa.pipeline import MMFAPipeline
    from pyface.train.animate_cli import parse_controls
    from pyface.train.model import Pipeline

    assert parse_controls(["expression=false", "appearance=True", "composite=0"],
                          GOHAPipeline, "goha") == {"expression": False, "appearance": True,
                                                    "composite": False}
    assert parse_controls(["angles=0,20,0", "rotation=source", "scale=1.5",
                           "cross_identity=yes", "expression=source"], MMFAPipeline, "mmfa") \
        == {"angles": (0, 20, 0), "rotation": "source", "scale": 1.5, "cross_identity": True,
            "expression": "source"}
    assert parse_controls(["lam_scale={3: 2.0}", "chunk=4"], Export3DPipeline, "export3d") \
        == {"lam_scale": {3: 2.0}, "chunk": 4}
    with pytest.raises(ValueError, match=r"^--control chunk=4\.5: expected an int, got '4\.5'$"):
        parse_controls(["chunk=4.5"], Export3DPipeline, "export3d")
    with pytest.raises(ValueError, match=r"expected a bool \(true/false\), got 'maybe'"):
        parse_controls(["composite=maybe"], GOHAPipeline, "goha")
    with pytest.raises(ValueError, match=r"model 'eg3d' has no generate control 'x'; it takes "
                                         r"none$"):
        from pyface.models.eg3d.pipeline import EG3DPipeline

        parse_controls(["x=1"], EG3DPipeline, "eg3d")

    class Modes(Pipeline):
        def generate(self, state, motion, *, mode: Literal["a", "b"] = "a",
                     steps: int | None = None, **more) -> torch.Tensor:
            raise NotImplementedError

    assert parse_controls(["mode=b", "steps=none", "extra=[1, 2]"], Modes, "m") == \
        {"mode": "b", "steps": None, "extra": [1, 2]}
    with pytest.raises(ValueError, match=r"^--control mode=c: expected one of 'a', 'b', got "
                                         r"'c'$"):
        parse_controls(["mode=c"], Modes, "m")


def test_help_explains_camera_and_control(capsys):
    with pytest.raises(SystemExit):
        main(["animate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--camera {driving,source,orbit}" in text and "Example: --camera orbit" in text
    assert "--control NAME=VALUE" in text and "Example: --control yaw_scale=0.5" in text


def test_option_reaches_load_and_bad_ones_exit_2_before_it(example_run, frames_dir, tmp_path,
                                                           capsys, monkeypatch):
    """--option KEY=VALUE (repeatable; with or without model.) reaches pyface.models.load's
    options, read like a --set value; an undeclared key or a bad value exits 2 naming it
    before the model loads."""
    import pyface.models
    from pyface.train.example import TriplaneAutoencoder

    monkeypatch.setattr(TriplaneAutoencoder, "inference_options", ("depth_samples", "hidden"))
    seen = []
    load = pyface.models.load

    def recording(*a, **k):
        seen.append(k.get("options"))
        pipe = load(*a, **k)
        seen.append(pipe.model.cfg.depth_samples)
        return pipe

    monkeypatch.setattr(pyface.models, "load", recording)
    out = ["--out", str(tmp_path / "a.mp4")]
    assert _animate(example_run, frames_dir, *out, "--option", "model.depth_samples=2") == 0
    assert seen == [{"depth_samples": 2}, 2]
    seen.clear()
    assert _animate(example_run, frames_dir, *out) == 0
    assert seen == [None, 4]                  # the checkpoint's value
    capsys.readouterr()
    seen.clear()
    for item, msg in [("plane_channels=2", "options: 'plane_channels' is not an inference option "
                       "of model 'example' (set when it was trained; only the inference options "
                       "may change on a trained model); valid: model.depth_samples, "
                       "model.hidden"),
                      ("model.depth_samples=lots", "model.depth_samples: expected int, got "
                       "'lots'"),
                      ("depth_samples", "--option 'depth_samples': expected key=value")]:
        assert _animate(example_run, frames_dir, *out, "--option", item) == 2
        err = capsys.readouterr().err
        assert err.startswith("pyface animate: ") and msg in err and "Traceback" not in err
    assert seen == []
    # a seed animation checks them too (EG3D's: tests/test_model_eg3d.py), before the load
    assert main(["animate", "eg3d", "--checkpoint", "x", "--option", "pti_steps=2",
                 "--out", str(tmp_path / "s.mp4")]) == 2
    assert "options: 'pti_steps' is not an inference option of model 'eg3d'" in \
        capsys.readouterr().err


def test_otavatar_render_options_reach_load(tmp_path, capsys, monkeypatch):
    """``pyface animate otavatar --option render.KEY=VALUE``: OTAvatar's renderer options
    (keys of its model.render overrides) reach pyface.models.load converted; an undeclared or
    fixed render key and a bad value exit 2 naming model.render.KEY before it loads."""
    import pyface.models
    from pyface.checkpoint import CheckpointError

    seen = []

    def recording(*a, **k):
        seen.append(k.get("options"))
        raise CheckpointError("not loaded here")

    monkeypatch.setattr(pyface.models, "load", recording)
    video = _video_folder(tmp_path, "v")
    cmd = ["animate", "otavatar", "--checkpoint", str(tmp_path / "missing"), "--source", video,
           "--driving", video, "--device", "cpu", "--out", str(tmp_path / "a.mp4")]
    assert main(cmd + ["--option", "render.depth_resolution=7", "--option",
                       "model.render.depth_resolution_importance=5", "--option",
                       "render.recompute=decoder", "--option", "render.chunk_points=null"]) == 1
    assert seen == [{"render.depth_resolution": 7, "render.depth_resolution_importance": 5,
                     "render.recompute": "decoder", "render.chunk_points": None}]
    assert "not loaded here" in capsys.readouterr().err
    seen.clear()
    for item, msg in [("render.box_warp=2", "options: 'render.box_warp' is not an inference "
                       "option of model 'otavatar'"),
                      ("render.plane_axes=eg3d", "options: 'render.plane_axes' is not an "
                       "inference option of model 'otavatar'"),
                      ("render.depth_resolution=many", "model.render.depth_resolution: "
                       "expected int, got 'many'"),
                      ("render.depth_resolution=1", "model.render.depth_resolution: expected "
                       "an int >= 2, got 1")]:
        assert main(cmd + ["--option", item]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pyface animate: ") and msg in err and "Traceback" not in err
        if "inference option" in msg:
            assert "valid: " in err and "model.render.depth_resolution, model.render." \
                "depth_resolution_importance, model.render.backend, model.render.recompute, " \
                "model.render.chunk_points" in err
    assert seen == []


def test_help_explains_option(capsys):
    with pytest.raises(SystemExit):
        main(["animate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--option KEY=VALUE" in text and "--option model.pti_steps=50" in text
    assert "--option generator.render.depth_resolution=96 (eg3d: a field of a nested config" \
        in text
    assert "otavatar's renderer: render.depth_resolution=96, a key of its model.render " \
        "overrides" in text


# -- --seed ----------------------------------------------------------------------------------

def _dice_pipeline(seen):
    """A stochastic pipeline class: frames of torch.rand; ``seen`` gets the seed torch had at
    each stage."""
    import torch

    from pyface.train.model import Pipeline

    class Dice(Pipeline):
        resolution = 16

        def encode_source(self, source):
            seen.append(("source", torch.initial_seed()))
            return {"offset": torch.rand(())}

        def encode_driving(self, driving):
            return {"T": driving["image"].shape[0]}

        def generate(self, state, motion):
            seen.append(("generate", torch.initial_seed()))
            return torch.rand(motion["T"], 3, 16, 16) * 2 - 1 + 0 * state["offset"]

    return Dice


def test_seed_seeds_the_source_and_every_chunk(tmp_path, monkeypatch):
    """--seed N seeds torch with N before the source encoding and with N + t before the chunk
    whose first frame is t (default 0): two runs write the same bytes, another seed other
    frames; --seed none leaves torch's state alone. Pipeline.stream(seed=) seeds its chunks
    alike and gives the caller its random state back between them."""
    import torch

    import pyface.models

    seen = []
    Dice = _dice_pipeline(seen)
    model = type("M", (), {"Pipeline": Dice})
    monkeypatch.setattr(pyface.models, "model_class", lambda name: model)
    monkeypatch.setattr(pyface.models, "load",
                        lambda *a, **k: Dice(torch.nn.Identity(), device="cpu"))
    video = _orbit_video(tmp_path, "v")
    args = ["animate", "dice", "--checkpoint", "x", "--source", video, "--driving", video,
            "--device", "cpu", "--no-progress", "--batch", "2"]
    videos = []
    for i, extra in enumerate(([], [], ["--seed", "10"])):
        seen.clear()
        assert main(args + ["--out", str(tmp_path / f"{i}.mp4"), *extra]) == 0
        s = 10 if extra else 0
        assert seen == [("source", s), ("generate", s), ("generate", s + 2),
                        ("generate", s + 4)]
        videos.append((tmp_path / f"{i}.mp4").read_bytes())
    assert videos[0] == videos[1] != videos[2]
    torch.manual_seed(1234)
    seen.clear()
    assert main(args + ["--out", str(tmp_path / "n.mp4"), "--seed", "none"]) == 0
    assert {s for _, s in seen} == {1234}                        # not seeded
    pipe, drv = Dice(torch.nn.Identity(), device="cpu"), read_driving(video, None)
    state = torch.get_rng_state()
    chunks = []
    for t, frames in pipe.stream({"offset": 0}, drv, chunk=2, seed=3):
        assert torch.equal(torch.get_rng_state(), state)        # between chunks: the caller's
        chunks.append(frames)
    for t, frames in zip((0, 2, 4), chunks):
        torch.manual_seed(3 + t)
        assert torch.equal(frames, torch.rand(frames.shape[0], 3, 16, 16) * 2 - 1)
    # a stochastic model's frames depend on the chunking: frames 2 and 3 are drawn after seed 3
    # + 2 in chunks of 2, after frames 0 and 1 from seed 3 in chunks of 4
    four = torch.cat([f for _, f in pipe.stream({"offset": 0}, drv, chunk=4, seed=3)])
    assert torch.equal(four[:2], chunks[0]) and not torch.equal(four[2:4], chunks[1])
    with pytest.raises(ValueError, match=r"seed: expected an int >= 0 or None, got True"):
        next(pipe.stream({}, drv, seed=True))


@pytest.mark.parametrize("value", ["-1", "x", "1.5"])
def test_a_bad_seed_is_refused_before_any_work(tmp_path, capsys, value):
    assert main(["animate", "example", "--checkpoint", str(tmp_path / "none"), "--source", "x",
                 "--seed", value, "--out", str(tmp_path / "a.mp4")]) == 2
    assert capsys.readouterr().err == (f"pyface animate: --seed: expected an integer >= 0 or "
                                       f"'none', got {value!r}\n")


def _other_models_checkpoints(tmp_path):
    """A converted GOHA folder and run folders of 'goha' and 'mmfa' (meta as written; the model
    check reads the meta before any weight)."""
    import torch

    from pyface import checkpoint as ckpt

    conv = ckpt.save_weights(str(tmp_path / "goha-converted"), {"a": torch.zeros(1)},
                             kind="goha")
    runs = {}
    for model in ("goha", "mmfa"):
        run = tmp_path / f"{model}-run"
        folder = ckpt.save_folder(ckpt.checkpoint_path(str(run), 5), {"model.a": torch.zeros(1)},
                                  {"kind": "train", "step": 5,
                                   "experiment": {"model": model, "model_config": {}}})
        ckpt.mark_latest(folder)
        runs[model] = (str(run), folder)
    return conv, runs


EG3D_TAKES = ("a run folder or training checkpoint of 'eg3d' (pyface train eg3d) or a pyface "
              "convert eg3d folder (converted from the official EG3D network pickle (.pkl)) or a "
              "pyface convert otavatar folder (the EG3D generator of OTAvatar's release)")


@pytest.mark.parametrize("model,takes", [
    ("eg3d", EG3D_TAKES),
    ("otavatar", "a run folder or training checkpoint of 'otavatar' (pyface train otavatar) or a "
                 "pyface convert otavatar folder (converted from the OTAvatar release checkpoint "
                 "(net_Warp_ema / net_G_ema))"),
    ("goha", "a run folder or training checkpoint of 'goha' (pyface train goha) or a pyface "
             "convert goha folder (converted from the GOHA release checkpoint "
             "(logs/s3/checkpoint825000.ckpt))"),
    ("export3d", "a run folder or training checkpoint of 'export3d' (pyface train export3d)"),
    ("mmfa", "a run folder or training checkpoint of 'mmfa' (pyface train mmfa)"),
])
def test_another_models_checkpoint_says_what_it_holds_and_what_the_model_takes(tmp_path, model,
                                                                             takes):
    """EG3D's loader said `got kind 'goha' of model None`, the others `holds model 'goha', not
    'mmfa'`: every model's loader names what the folder holds and what the model takes."""
    import pyface.models
    from pyface import checkpoint as ckpt
    from pyface.train.model import WrongModelError

    conv, runs = _other_models_checkpoints(tmp_path)
    cases = ([(conv, "model 'goha' (converted weights, kind 'goha')"),
              (runs["goha"][1], "model 'goha' (a training checkpoint of step 5)")]
             if model != "goha" else
             [(runs["mmfa"][1], "model 'mmfa' (a training checkpoint of step 5)")])
    for folder, holds in cases:
        with pytest.raises(WrongModelError) as caught:
            pyface.models.load(model, folder, device="cpu")
        assert str(caught.value) == f"checkpoint {folder!r} holds {holds}, not {model!r}: " \
                                    f"expected {takes}"
        assert isinstance(caught.value, ValueError)       # what pyface.models.load documents
        assert isinstance(caught.value, ckpt.CheckpointError)
    vgg = ckpt.save_weights(str(tmp_path / "vgg"), {"a": __import__("torch").zeros(1)},
                            kind="vgg19")
    with pytest.raises(WrongModelError, match=r"holds 'vgg19' weights \(kind 'vgg19', not a "
                                              rf"model\), not '{model}': expected a run folder"):
        pyface.models.load(model, vgg, device="cpu")


def test_animate_and_invert_name_checkpoint_and_what_the_command_takes(tmp_path, capsys):
    conv, runs = _other_models_checkpoints(tmp_path)
    run, latest = runs["goha"]
    image = tmp_path / "face.png"
    Image.new("RGB", (16, 16)).save(image)
    holds = "holds model 'goha' (a training checkpoint of step 5), not 'eg3d'"
    for argv, said in (
            (["animate", "eg3d", "--checkpoint", run, "--seeds", "0", "--out",
              str(tmp_path / "o.mp4")], "pyface animate eg3d"),
            (["invert", "eg3d", str(image), "--checkpoint", run, "--out", str(tmp_path / "inv"),
              "--steps", "1"], "pyface invert")):
        assert main(argv) == 1
        assert capsys.readouterr().err == (
            f"{said}: --checkpoint {run} (its latest checkpoint {latest}): {holds}: expected "
            f"{EG3D_TAKES}\n")
    # an input of the wrong kind: exit code 1 for every command (README: exit codes)
    assert main(["animate", "mmfa", "--checkpoint", conv, "--source", str(image), "--driving",
                 str(image), "--out", str(tmp_path / "o.mp4")]) == 1
    assert capsys.readouterr().err == (
        f"pyface animate: --checkpoint {conv}: holds model 'goha' (converted weights, kind "
        "'goha'), not 'mmfa': expected a run folder or training checkpoint of 'mmfa' (pyface "
        "train mmfa)\n")
    assert sorted(os.listdir(tmp_path)) == ["face.png", "goha-converted", "goha-run",
                                            "mmfa-run"]


# -- --compile -------------------------------------------------------------------------------

def test_compile_mode_is_checked_before_the_model_loads(frames_dir, tmp_path, capsys):
    assert main(["animate", "example", "--checkpoint", str(tmp_path / "none"), "--source",
                 frames_dir, "--out", str(tmp_path / "a.mp4"), "--compile", "fast"]) == 2
    assert capsys.readouterr().err == (
        "pyface animate: --compile: expected one of off, default, reduce-overhead, max-autotune, "
        "max-autotune-no-cudagraphs, aot_eager, eager, got 'fast'\n")
    # --seeds (the generator compiled without a pipeline) and pyface invert: the same check
    assert main(["animate", "eg3d", "--checkpoint", str(tmp_path / "none"), "--seeds", "0",
                 "--out", str(tmp_path / "a.mp4"), "--compile", "fast"]) == 2
    assert capsys.readouterr().err == (
        "pyface animate: --compile: expected one of off, default, reduce-overhead, max-autotune, "
        "max-autotune-no-cudagraphs, aot_eager, eager, got 'fast'\n")
    assert main(["invert", "eg3d", str(tmp_path / "face.png"), "--checkpoint",
                 str(tmp_path / "none"), "--out", str(tmp_path / "inv"), "--compile",
                 "Fast"]) == 2
    assert capsys.readouterr().err == (
        "pyface invert: --compile: expected one of off, default, reduce-overhead, max-autotune, "
        "max-autotune-no-cudagraphs, aot_eager, eager, got 'Fast'\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("extra, mode", [([], None), (["--compile"], "default"),
                                         (["--compile", "eager"], "eager"),
                                         (["--compile", "off"], None)])
def test_compile_reaches_the_pipeline(example_run, frames_dir, tmp_path, capsys, monkeypatch,
                                      extra, mode):
    """--compile alone means default (Inductor); the mode reaches Pipeline.compile through
    pyface.models.load, and the report names what was compiled."""
    from pyface.train.example import ExamplePipeline

    seen = []
    monkeypatch.setattr(ExamplePipeline, "compile",
                        lambda self, options: seen.append(options.describe()) or [])
    assert _animate(example_run, frames_dir, "--out", str(tmp_path / "a.mp4"), *extra) == 0
    out = capsys.readouterr().out
    if mode is None:
        assert seen == [] and "--compile" not in out
    else:
        assert seen == ["inductor (default)" if mode == "default" else mode]
        assert f"--compile {mode}: compiled nothing (the pipeline names no modules to " \
               "compile); no chunk compiled" in out


def test_chunks_that_compile_are_left_out_of_the_frames_per_second(example_run, frames_dir,
                                                                    tmp_path, capsys,
                                                                    monkeypatch):
    """The chunks during which torch.compile compiled (here: the first, its generate taking
    1.5 s longer) are reported apart, and the frames per second are those of the others (3
    frames over more than 1.5 s would be under 2 frames/s)."""
    import time

    import pyface.train.model as model_mod
    from pyface.train.example import ExamplePipeline

    graphs = {"n": 0}
    generate = ExamplePipeline.generate

    def slow_first(self, state, motion, **kw):
        if graphs["n"] == 0:
            graphs["n"] = 1                    # "compiled a graph"
            time.sleep(1.5)
        return generate(self, state, motion, **kw)

    monkeypatch.setattr(model_mod, "compiled_graphs", lambda: graphs["n"])
    monkeypatch.setattr(ExamplePipeline, "generate", slow_first)
    assert _animate(example_run, frames_dir, "--out", str(tmp_path / "a.mp4"), "--batch", "1",
                    "--compile", "eager") == 0
    out = capsys.readouterr().out
    fps = float(re.search(r"animate: ([\d.]+) frames/s", out).group(1))
    assert fps > 2
    assert re.search(r"1 chunk compiled \(1 frames, 1\.\d s with the compilation\), left out "
                     r"of the frames per second", out), out
    # every chunk compiling: the rate includes compilation, and says so
    graphs["n"] = 0
    monkeypatch.setattr(model_mod, "compiled_graphs", lambda: graphs.__setitem__(
        "n", graphs["n"] + 1) or graphs["n"])
    assert _animate(example_run, frames_dir, "--out", str(tmp_path / "b.mp4"), "--batch", "3",
                    "--compile", "eager") == 0
    assert "every chunk compiled, so the frames per second include compilation" in \
        capsys.readouterr().out


def test_help_explains_compile(capsys):
    with pytest.raises(SystemExit):
        main(["animate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--compile [MODE]" in text and "--compile alone means default (Inductor)" in text
    assert "first frames are slow while the modules compile" in text
    assert "needs a C++ compiler" in text
    assert "--seeds" in text and "--truncation, --seed and --compile apply" in text


def test_invert_help_explains_compile(capsys):
    with pytest.raises(SystemExit):
        main(["invert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--compile [MODE]" in text and "--compile alone means default (Inductor)" in text
    assert "first steps are slow while the modules compile" in text
    assert "gradients flow through the compiled modules to the latent" in text
    assert "The latent and the loss are those of the uncompiled generator to float rounding" \
        in text
