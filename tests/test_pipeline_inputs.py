"""What a researcher's own script hands the inference pipelines (``pyface.models.load(...)``):
labels that are not tensors, non-finite labels, camera-only driving dicts, and a state or
motion that is not the one ``encode_source`` / ``encode_driving`` returned, are refused with an
error naming the argument, what it expects and what it got, before any network runs (instead
of a traceback from inside torch or frames of NaN). Micro models (tests/test_pipeline_compile.py),
a few seconds in all on CPU."""
from __future__ import annotations

import glob
import os

import pytest
import torch

from test_pipeline_compile import build_model

MODELS = ["eg3d", "otavatar", "goha_s1", "export3d", "mmfa"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from pyface.data.synthetic import SynthConfig, generate

    root = str(tmp_path_factory.mktemp("inputs") / "data")
    generate(root, SynthConfig(identities=2, videos_per_identity=1, frames=2, resolution=32,
                               workers=1, cross=False), progress=False)
    return sorted(os.path.dirname(p) for p in glob.glob(f"{root}/**/coeffs.npy", recursive=True))


@pytest.fixture(scope="module")
def pipes():
    mp = pytest.MonkeyPatch()
    out = {}
    try:
        for name in MODELS:
            torch.manual_seed(0)
            model = build_model(name, mp)
            out[name] = type(model).Pipeline(model, device="cpu")
    finally:
        mp.undo()
    return out


def _frames(pipe, videos):
    from pyface.data.driving import read_driving, read_source

    return read_source(videos[0], 32), read_driving(videos[1], 32, max_frames=2)


def _encode(name, pipe, source):
    with torch.no_grad():
        return pipe.encode_source(source, **({"steps": 1} if name == "eg3d" else {}))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("key", ["camera", "coeffs"])
def test_a_label_that_is_not_a_tensor_is_a_type_error(name, key, pipes, videos):
    """A list (or None) where a (25,) / (257,) tensor goes: a TypeError naming the key, not a
    'list indices must be integers' from inside the stages, nor a label silently ignored."""
    pipe = pipes[name]
    source, driving = _frames(pipe, videos)
    for bad in (source[key].tolist(), None):
        shape = "25" if key == "camera" else "257"
        with pytest.raises(TypeError, match=rf"source\['{key}'\]: expected a torch.Tensor or "
                                            rf"a numpy array of shape \({shape}\), "
                                            rf"got {type(bad).__name__}"):
            _encode(name, pipe, {**source, key: bad})
    with pytest.raises(TypeError, match=rf"driving\['{key}'\]: .* got list"):
        pipe.encode_driving({**driving, key: driving[key].tolist()})


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("key", ["camera", "coeffs", "landmarks"])
def test_non_finite_labels_are_refused(name, key, pipes, videos):
    """NaN in a source or driving label: a ValueError naming it (without the check OTAvatar,
    Export3D and MMFA rendered frames of NaN from NaN driving coefficients)."""
    pipe = pipes[name]
    source, driving = _frames(pipe, videos)
    bad = source[key].clone()
    bad.view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match=rf"source\['{key}'\]: expected finite values, got NaN "
                                         "or inf"):
        _encode(name, pipe, {**source, key: bad})
    bad = driving[key].clone()
    bad[1].view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match=rf"driving\['{key}'\]: expected finite values"):
        pipe.encode_driving({**driving, key: bad})


@pytest.mark.parametrize("camera", ["numpy", "list"])
def test_eg3d_camera_only_driving_is_checked_like_any_frame_dict(camera, pipes):
    """EG3D's documented driving dict is cameras alone: a numpy array is taken as a tensor (as
    in any frame dict), a list is a TypeError naming driving['camera']."""
    pipe = pipes["eg3d"]
    cam = pipe.G.camera(torch.tensor([0.0, 0.2]), 0.0)
    want = pipe.encode_driving({"camera": cam})["camera"]
    if camera == "numpy":
        got = pipe.encode_driving({"camera": cam.numpy()})["camera"]
        assert torch.equal(got, want) and got.dtype == torch.float32
    else:
        with pytest.raises(TypeError, match=r"driving\['camera'\]: expected a torch.Tensor"):
            pipe.encode_driving({"camera": cam.tolist()})
    with pytest.raises(ValueError, match=r"driving\['camera'\]: expected shape \(T, 25\)"):
        pipe.encode_driving({"camera": cam[0]})


def test_otavatar_coeffs_only_driving_takes_numpy(pipes, videos):
    """OTAvatar is driven by coefficients alone: numpy coefficients are taken as a tensor (they
    were refused as 'expected motion or coeffs' though the dict had coeffs)."""
    pipe = pipes["otavatar"]
    _, driving = _frames(pipe, videos)
    want = pipe.encode_driving({"coeffs": driving["coeffs"]})["motion"]
    got = pipe.encode_driving({"coeffs": driving["coeffs"].numpy()})["motion"]
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", MODELS)
def test_generate_refuses_what_is_not_its_state_or_motion(name, pipes, videos):
    """``generate(state, motion)`` with a state that is not this pipeline's ``encode_source``
    result (None: animate before encoding a source; another model's state; the arguments
    swapped) or a motion that is not ``encode_driving``'s (raw driving frames): a TypeError /
    ValueError naming the argument and the keys expected, not a KeyError from inside."""
    pipe = pipes[name]
    source, driving = _frames(pipe, videos)
    state = _encode(name, pipe, source)
    motion = pipe.encode_driving(driving)
    want = pipe.generate(state, motion) if name not in ("eg3d", "goha_s1") else None
    with pytest.raises(TypeError, match=r"state: expected the dict .*encode_source returns, "
                                        r"got NoneType"):
        pipe.generate(None, motion)
    with pytest.raises(TypeError, match=r"motion: expected the dict .*encode_driving returns, "
                                        r"got NoneType"):
        pipe.generate(state, None)
    other = "mmfa" if name != "mmfa" else "export3d"
    other_state = _encode(other, pipes[other], source)
    with pytest.raises(ValueError, match=r"state: expected the dict "
                                         rf"{type(pipe).__name__}.encode_source returns \(keys "
                                         r".*\), got a dict with keys"):
        pipe.generate(other_state, motion)
    with pytest.raises(ValueError, match=r"(state|motion): expected the dict"):
        pipe.generate(motion, state)
    if name != "eg3d":                  # EG3D's motion is the driving cameras themselves
        with pytest.raises(ValueError, match=r"motion: expected the dict "
                                             rf"{type(pipe).__name__}.encode_driving returns"):
            pipe.generate(state, driving)
    if want is not None:                # the checks leave valid inputs' frames as they were
        assert torch.equal(pipe.generate(state, motion), want)


def test_load_checks_its_arguments_before_reading_the_checkpoint(tmp_path):
    """``pyface.models.load``'s arguments are checked before the checkpoint is read (a missing
    folder would otherwise be the error), each error naming the argument."""
    import pyface.models

    missing = str(tmp_path / "no-such-run")
    with pytest.raises(ValueError, match=r"device: expected None, 'cpu', 'cuda', 'cuda:N' .*got "
                                         r"'gpu'"):
        pyface.models.load("mmfa", missing, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device: got 'cuda', but this machine has 0 CUDA"):
            pyface.models.load("mmfa", missing, device="cuda")
    with pytest.raises(TypeError, match=r"device: expected None, .* got float"):
        pyface.models.load("mmfa", missing, device=0.5)
    with pytest.raises(TypeError, match=r"checkpoint: expected a path .*got NoneType"):
        pyface.models.load("mmfa", None)
    with pytest.raises(TypeError, match=r"ema: expected True or False, got 'no'"):
        pyface.models.load("mmfa", missing, ema="no")
    from pyface.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):    # valid arguments: the read
        pyface.models.load("mmfa", tmp_path / "no-such-run", device="cpu")


@pytest.mark.parametrize("name", ["otavatar", "goha_s1", "export3d", "mmfa"])
def test_a_state_on_another_device_is_refused(name, pipes, videos):
    """A state encoded by a pipeline on another device (here: its tensors on the meta device,
    as a CUDA state would be for a CPU pipeline) is a ValueError naming the key and both
    devices, not a device mismatch from inside torch. (EG3D moves its latent itself.)"""
    pipe = pipes[name]
    source, driving = _frames(pipe, videos)
    state = _encode(name, pipe, source)
    moved = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"state\['\w+'\]: on meta, but this pipeline runs on "
                                         r"cpu"):
        pipe.generate(moved, pipe.encode_driving(driving))


def test_a_float_image_without_negative_values_is_warned_about(pipes, videos):
    """A float image in [0, 1] (torchvision's to_tensor) lies inside [-1, 1] and cannot be
    refused, but no photo in [-1, 1] lacks every dark pixel while reaching bright ones: a
    UserWarning names the key and the remedy; the frames are those of the image as given. A
    [-1, 1] image, or a flat one (a test's zeros), is not warned about."""
    import warnings

    pipe = pipes["mmfa"]
    source, driving = _frames(pipe, videos)
    assert float(source["image"].min()) < 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.encode_source(source)
        pipe.encode_driving(driving)
        pipe.encode_source({**source, "image": torch.zeros_like(source["image"])})  # flat grey
    with pytest.warns(UserWarning, match=r"source\['image'\]: float values in \[0(\.\d+)?, "
                                         r"[\d.]+\], none negative: .*2 \* image - 1"):
        pipe.encode_source({**source, "image": source["image"] * 0.5 + 0.5})
    with pytest.warns(UserWarning, match=r"driving\['image'\]: float values"):
        pipe.encode_driving({**driving, "image": driving["image"] * 0.5 + 0.5})


def test_mmfa_angles_must_be_three(pipes, videos):
    """MMFA's ``angles`` control is (pitch, yaw, roll): one number is a ValueError naming it
    (it was a TypeError from len()); a (3,) tensor still unpacks into the three angles."""
    pipe = pipes["mmfa"]
    source, driving = _frames(pipe, videos)
    state, motion = pipe.encode_source(source), pipe.encode_driving(driving)
    for bad in (30.0, torch.tensor(30.0), "30,0,0", (30.0, 0.0)):
        with pytest.raises(ValueError, match=r"angles: expected \(pitch, yaw, roll\) in degrees"):
            pipe.generate(state, motion, angles=bad)
    assert torch.equal(pipe.generate(state, motion, angles=torch.tensor([10.0, -5.0, 0.0])),
                       pipe.generate(state, motion, angles=(10.0, -5.0, 0.0)))


def test_otavatar_non_finite_motion_windows_are_refused(pipes, videos):
    """driving['motion'] (T, 70, window) 3DMM windows are checked like the labels: NaN or inf
    is a ValueError naming it (it rendered frames of NaN)."""
    pipe = pipes["otavatar"]
    _, driving = _frames(pipe, videos)
    good = pipe.encode_driving({"coeffs": driving["coeffs"]})["motion"]
    assert torch.equal(pipe.encode_driving({"motion": good})["motion"], good)
    for value in (float("nan"), float("inf")):
        bad = good.clone()
        bad[1, 3, 0] = value
        with pytest.raises(ValueError, match=r"driving\['motion'\]: expected finite values, "
                                             "got NaN or inf"):
            pipe.encode_driving({"motion": bad})


@pytest.mark.parametrize("option", ["rotation", "angles", "scale", "translation", "expression"])
def test_mmfa_non_finite_pose_and_expression_controls_are_refused(option, pipes, videos):
    """MMFA's generate controls R (rotation / angles), s (scale), t (translation) and the
    expression: NaN or inf is a ValueError naming the control, before any network runs (they
    rendered frames of NaN)."""
    pipe = pipes["mmfa"]
    source, driving = _frames(pipe, videos)
    state, motion = pipe.encode_source(source), pipe.encode_driving(driving)
    T = int(motion["f_exp"].shape[0])
    good = {"rotation": torch.eye(3).expand(T, 3, 3).clone(), "angles": [10.0, 0.0, 0.0],
            "scale": torch.ones(T), "translation": torch.zeros(T, 2),
            "expression": motion["f_exp"].clone()}[option]
    pipe.generate(state, motion, **{option: good})              # finite: taken
    if option == "angles":
        bad = [10.0, float("nan"), 0.0]
    else:
        bad = good.clone()
        bad.view(-1)[-1] = float("inf")
    with pytest.raises(ValueError, match=rf"^{option}: expected finite values, got NaN or inf"):
        pipe.generate(state, motion, **{option: bad})


def test_stream_and_reconstruct_take_numpy_frames(pipes, videos):
    """Frame dicts of numpy arrays are taken as tensors (docs/train.md): ``animate`` took them,
    ``stream`` refused them ('expected a dict of (T, ...) tensors') and ``reconstruct`` left
    the source unbatched (a driving shape error). Same frames as from tensors."""
    pipe = pipes["mmfa"]
    source, driving = _frames(pipe, videos)
    as_np = {k: v.numpy() for k, v in driving.items()}
    state = pipe.encode_source(source)
    want = torch.cat([f for _, f in pipe.stream(state, driving, chunk=1)])
    got = torch.cat([f for _, f in pipe.stream(state, as_np, chunk=1)])
    assert torch.equal(got, want) and got.shape[0] == driving["image"].shape[0]
    assert torch.equal(pipe.reconstruct({k: v.numpy() for k, v in source.items()}),
                       pipe.reconstruct(source))


def test_stream_refuses_driving_keys_of_different_lengths(pipes, videos):
    """``stream`` took the frame count from the first key: driving coefficients for fewer
    frames than the images silently dropped frames (or failed in a later chunk with a
    misleading T); now a ValueError naming every key's length."""
    pipe = pipes["mmfa"]
    source, driving = _frames(pipe, videos)
    state = pipe.encode_source(source)
    short = {"coeffs": driving["coeffs"][:1], **driving}
    short["coeffs"] = driving["coeffs"][:1]
    with pytest.raises(ValueError, match=r"driving: expected the same number of frames T for "
                                         r"every per-frame key, got .*'coeffs': 1.*'image': 2"):
        list(pipe.stream(state, short, chunk=1))
    with pytest.raises(TypeError, match=r"driving: expected a dict of \(T, \.\.\.\) tensors, "
                                        r"got Tensor"):
        list(pipe.stream(state, driving["image"], chunk=1))


def test_eg3d_inversion_steps_are_checked(pipes, videos):
    """EG3D's ``encode_source(steps=...)``: a negative count inverted nothing (the mean latent,
    silently) and a float was a TypeError from range(); both a ValueError naming ``steps``."""
    pipe = pipes["eg3d"]
    source, _ = _frames(pipe, videos)
    for bad in (-1, 1.5, "10", True):
        with pytest.raises(ValueError, match=rf"steps: expected an int >= 0 \(inversion steps\), "
                                             rf"got {bad!r}"):
            pipe.encode_source(source, steps=bad)
    assert len(pipe.encode_source(source, steps=1)["loss"]) == 1


@pytest.mark.parametrize("name", ["goha_s1", "export3d"])
def test_label_only_driving_for_models_that_read_labels_only(name, pipes, videos):
    """GOHA's and Export3D's driving motion comes from the driving ``coeffs`` / ``camera``
    alone (docs/models/goha.md): a driving dict without images is taken (it was refused for
    its missing image), and gives the motion the full frames give; without ``coeffs`` it is
    still refused, naming the key."""
    pipe = pipes[name]
    source, driving = _frames(pipe, videos)
    labels = {k: driving[k] for k in ("camera", "coeffs")}
    want, got = pipe.encode_driving(driving), pipe.encode_driving(labels)
    assert sorted(want) == sorted(got)
    assert all(torch.equal(want[k], got[k]) for k in want if torch.is_tensor(want[k]))
    state = _encode(name, pipe, source)
    torch.manual_seed(0)
    frames = pipe.generate(state, pipe.seed_frames(want, 0, 0))
    torch.manual_seed(0)
    assert torch.equal(pipe.generate(state, pipe.seed_frames(got, 0, 0)), frames)
    with pytest.raises((KeyError, ValueError), match=r"driving\['coeffs'\]: missing"):
        pipe.encode_driving({"camera": driving["camera"]})


def test_export3d_lam_scale_factors_are_numbers(pipes, videos):
    """Export3D's ``lam_scale={index: factor}`` edit: a factor that is not a finite number was
    'could not convert string to float' (or NaN frames); now a ValueError naming lam_scale and
    the index. A valid edit renders as before."""
    pipe = pipes["export3d"]
    source, driving = _frames(pipe, videos)
    state, motion = pipe.encode_source(source), pipe.encode_driving(driving)
    for bad in ("x", None, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"lam_scale: index 0: expected a finite number"):
            pipe.generate(state, motion, lam_scale={0: bad})
    n = pipe.model.cond.n
    scale = torch.ones(n)
    scale[0] = 2.0
    assert torch.equal(pipe.generate(state, motion, lam_scale={0: 2}),
                       pipe.generate(state, motion, lam_scale=scale))


def test_a_non_square_image_is_warned_about(pipes, videos):
    """``prepare`` resizes any image to the square resolution: a non-square one is stretched,
    so a UserWarning names the key, its size and the remedy (the frames are those of the
    stretched image, as before). A square image of another size is resized silently."""
    import warnings

    pipe = pipes["mmfa"]
    source, _ = _frames(pipe, videos)
    wide = torch.nn.functional.interpolate(source["image"][None], size=(32, 48))[0]
    with pytest.warns(UserWarning, match=r"source\['image'\]: 32x48 \(H x W\) is not square; "
                                         r"resized to 32x32 .*crop it to a square first"):
        pipe.encode_source({"image": wide})
    big = torch.nn.functional.interpolate(source["image"][None], size=(48, 48))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.encode_source({"image": big})


@pytest.mark.parametrize("name", ["eg3d", "otavatar"])
def test_an_inversion_leaves_a_requires_grad_source_alone(name, pipes, videos):
    """EG3D's and OTAvatar's source encodings optimise under enable_grad: a source image that
    requires grad had the inversion's gradients accumulated into its ``.grad``. The inputs are
    detached: no gradient reaches the caller's tensor, and the state is the one of a plain
    image."""
    pipe = pipes[name]
    source, _ = _frames(pipe, videos)
    image = source["image"].clone().requires_grad_(True)
    kw = {"steps": 2}
    torch.manual_seed(0)
    got = pipe.encode_source({**source, "image": image}, **kw)
    assert image.grad is None
    torch.manual_seed(0)
    want = pipe.encode_source(source, **kw)
    key = "ws" if name == "eg3d" else "w"
    assert torch.equal(got[key], want[key]) and not got[key].requires_grad


def test_the_example_pipeline_checks_its_state_too(videos):
    """The engine's example model (``pyface.models.load("example", ...)``) refuses a missing
    state or another model's, as the five portrait models do."""
    mp = pytest.MonkeyPatch()
    try:
        model = build_model("example", mp)
    finally:
        mp.undo()
    pipe = type(model).Pipeline(model, device="cpu")
    source, driving = _frames(pipe, videos)
    state, motion = pipe.encode_source(source), pipe.encode_driving(driving)
    want = pipe.generate(state, motion)
    with pytest.raises(TypeError, match=r"state: expected the dict ExamplePipeline.encode_source "
                                        r"returns, got NoneType \(call encode_source first\)"):
        pipe.generate(None, motion)
    with pytest.raises(ValueError, match=r"motion: expected the dict ExamplePipeline."
                                         r"encode_driving returns \(keys \['yaw'\]\)"):
        pipe.generate(state, driving)
    # default_motion (an orbit without driving frames) is a motion generate takes
    assert pipe.generate(state, pipe.default_motion(3)).shape == (3, *want.shape[1:])
    assert torch.equal(pipe.generate(state, motion), want)
