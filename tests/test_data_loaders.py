"""Datasets over the pyface format, image folders and EG3D dataset.json folders/zips; bad data."""
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from pyface.data import format as fmt
from pyface.data import synthetic as S
from pyface.data.datasets import (MIRROR_68, CrossIdentityDataset, EG3DDataset, FrameDataset,
                                  ImageFolderDataset, MotionWindowDataset, PairDataset,
                                  expression_weights, to_float)
from pyface.face import cameras as cam


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("loaders") / "ds")
    S.generate(out, S.default_config(), progress=False)
    return out


@pytest.fixture
def bad_root(root, tmp_path):
    out = str(tmp_path / "bad")
    shutil.copytree(root, out)
    return out


def test_frame_dataset(root):
    ds = FrameDataset(root)
    assert len(ds) == 32
    it = ds[11]
    assert it["image"].shape == (3, 64, 64) and it["image"].dtype == torch.uint8
    assert it["mask"].shape == (1, 64, 64) and it["camera"].shape == (25,)
    assert set(it["mask"].unique().tolist()) == {0, 255}
    f = FrameDataset(root, image_dtype=torch.float32)[11]
    assert f["image"].dtype == torch.float32 and torch.equal(f["image"], to_float(it["image"]))
    with pytest.raises(ValueError, match="image_dtype: expected torch.uint8 or torch.float32"):
        FrameDataset(root, image_dtype=torch.float16)
    assert it["coeffs"].shape == (257,) and it["landmarks"].shape == (68, 2)
    assert (it["video"].item(), it["frame"].item(), it["identity"].item()) == (1, 3, 0)
    small = FrameDataset(root, resolution=32)[11]
    assert small["image"].shape == (3, 32, 32) and small["image"].dtype == torch.uint8
    # area-like downsampling: close to 2x2 block means
    block = to_float(it["image"]).view(3, 32, 2, 32, 2).mean((2, 4))
    assert (to_float(small["image"]) - block).abs().mean() < 0.02
    torch.testing.assert_close(small["landmarks"], it["landmarks"] / 2)


def test_mirroring(root):
    ds = FrameDataset(root, mirror=True)
    assert len(ds) == 64
    a, m = ds[5], ds[5 + 32]
    assert torch.equal(m["image"], a["image"].flip(-1))
    assert torch.equal(m["camera"], cam.mirror_label(a["camera"]))
    torch.testing.assert_close(m["landmarks"][MIRROR_68][:, 0], 64 - a["landmarks"][:, 0])
    assert m["coeffs"][225] == -a["coeffs"][225] and m["coeffs"][254] == -a["coeffs"][254]
    assert sorted(MIRROR_68.tolist()) == list(range(68))
    assert np.array_equal(MIRROR_68[MIRROR_68], np.arange(68))
    # the mirrored landmarks keep their meaning: 36 (right eye outer corner) stays on the image left
    assert m["landmarks"][36, 0] < m["landmarks"][45, 0]
    # mirrored and plain items collate together
    batch = next(iter(torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [5, 37, 2]), batch_size=3)))
    assert batch["mirrored"].tolist() == [False, True, False]


def test_pairs_modes(root):
    same = PairDataset(root, mode="same_video", min_gap=2)
    for i in range(len(same)):
        it = same[i]
        assert it["source"]["video"] == it["driving"]["video"]
        assert abs(int(it["source"]["frame"]) - int(it["driving"]["frame"])) >= 2
    xv = PairDataset(root, mode="cross_video")
    xi = PairDataset(root, mode="cross_identity")
    for i in range(0, 32, 5):
        a, b = xv[i], xi[i]
        assert a["source"]["video"] != a["driving"]["video"]
        assert a["source"]["identity"] == a["driving"]["identity"]
        assert b["source"]["identity"] != b["driving"]["identity"]
    with pytest.raises(ValueError, match="mode: expected one of"):
        PairDataset(root, mode="random")


def test_determinism_seed_epoch_and_workers(root):
    a = PairDataset(root, seed=3)
    b = PairDataset(root, seed=3)
    srcs = [a.source_of(i) for i in range(32)]
    assert srcs == [b.source_of(i) for i in range(32)]
    assert srcs != [PairDataset(root, seed=4).source_of(i) for i in range(32)]
    b.set_epoch(1)
    assert srcs != [b.source_of(i) for i in range(32)]
    # a DataLoader with worker processes yields exactly what the main process does
    loader = torch.utils.data.DataLoader(a, batch_size=4, num_workers=2)
    got = torch.cat([batch["source"]["frame"] for batch in loader])
    assert got.tolist() == [f for _, f in srcs]


def test_motion_windows(root):
    ds = MotionWindowDataset(root, frames_per_item=3)
    assert len(ds) == 2
    it = ds[1]
    assert it["image"].shape == (3, 3, 64, 64) and it["motion"].shape == (3, 70, 27)
    assert it["camera"].shape == (3, 25) and it["id_coeffs"].shape == (3, 80)
    assert it["landmarks"].shape == (3, 68, 2) and it["identity"] == 1
    v = int(it["video"])
    c = ds.coeffs[v]
    f0 = int(it["frame"][0])
    assert torch.equal(it["motion"][0][:64, 13], torch.from_numpy(c[f0, 80:144]))
    # clamped at the video ends (8-frame videos, 27-frame windows)
    assert torch.equal(it["motion"][0][:, 0], torch.from_numpy(np.concatenate([c[0, 80:144], c[0, 224:227], c[0, 254:257]])))


def test_expression_weighting():
    c = np.zeros((4, 257), np.float32)
    c[1, 80:82] = [1.0, -1.0]
    c[3, 90] = 6.0
    w = expression_weights(c)
    np.testing.assert_allclose(w, [0, 0.25, 0, 0.75])
    np.testing.assert_allclose(expression_weights(np.zeros((4, 257))), [0.25] * 4)
    # the sampler follows the weights
    rng = np.random.default_rng(0)
    draws = rng.choice(4, size=4000, p=w)
    assert abs((draws == 3).mean() - 0.75) < 0.03 and not (draws == 0).any()


def test_motion_windows_with_one_expressive_frame(bad_root):
    for v in ("id0000_v00", "id0000_v01"):
        p = os.path.join(bad_root, v, "coeffs.npy")
        c = np.load(p)
        c[:, 80:144] = 0
        c[2, 80] = 1.0
        np.save(p, c)
    it = MotionWindowDataset(bad_root, frames_per_item=3)[0]
    assert it["frame"].tolist() == [2, 2, 2]


def test_cross_identity_dataset(root):
    ds = CrossIdentityDataset(root)
    assert len(ds) == 16
    it = ds[10]
    assert it["target"]["identity"] == it["source"]["identity"] != it["driving"]["identity"]
    assert torch.equal(it["target"]["coeffs"][80:144], it["driving"]["coeffs"][80:144])
    assert torch.equal(it["target"]["coeffs"][:80], it["source"]["coeffs"][:80])
    assert torch.equal(it["target"]["camera"], it["driving"]["camera"])


# ---------------------------------------------------------------------------------------------
# bad data


def test_wrong_coeff_length_raises_naming_file(bad_root):
    p = os.path.join(bad_root, "id0001_v00", "coeffs.npy")
    np.save(p, np.zeros((5, 257), np.float32))
    with pytest.raises(fmt.DataError, match=r"id0001_v00/coeffs.npy: expected shape \(8, 257\)"):
        FrameDataset(bad_root)
    with pytest.warns(UserWarning, match="skipping video id0001_v00"):
        ds = FrameDataset(bad_root, skip_bad=True)
    assert len(ds) == 24 and "id0001_v00" not in [v.name for v in ds.videos]


def test_nan_camera_raises_naming_file(bad_root):
    p = os.path.join(bad_root, "id0000_v01", "dataset.json")
    d = json.load(open(p))
    d["labels"][4][1][0] = float("nan")
    json.dump(d, open(p, "w"))
    with pytest.raises(fmt.DataError, match=r"id0000_v01/dataset.json: NaN or inf camera for frame 4"):
        PairDataset(bad_root)


def test_missing_and_corrupt_frames(bad_root):
    os.remove(os.path.join(bad_root, "id0000_v00", "frames", "00002.png"))
    with pytest.raises(fmt.DataError, match="id0000_v00/frames/00002.png: missing frame"):
        FrameDataset(bad_root)
    with pytest.warns(UserWarning, match="skipping video id0000_v00"):
        FrameDataset(bad_root, skip_bad=True)
    shutil.copy(os.path.join(bad_root, "id0000_v01", "frames", "00000.png"),
                os.path.join(bad_root, "id0000_v00", "frames", "00002.png"))
    with open(os.path.join(bad_root, "id0001_v01", "frames", "00006.png"), "r+b") as f:
        f.seek(40)
        f.write(b"\x00" * 64)                          # corrupt, truncated-looking PNG
    ds = FrameDataset(bad_root)                        # cheap checks pass; decoding fails
    with pytest.raises(fmt.DataError, match="id0001_v01/frames/00006.png: corrupt or unreadable"):
        ds[30]
    ds = FrameDataset(bad_root, skip_bad=True)
    with pytest.warns(UserWarning, match="skipping bad item 30"):
        it = ds[30]
    assert (int(it["video"]), int(it["frame"])) == (3, 7)


def test_bad_index(bad_root):
    open(os.path.join(bad_root, "index.json"), "w").write("{not json")
    with pytest.raises(fmt.DataError, match="index.json: not valid JSON"):
        FrameDataset(bad_root)
    os.remove(os.path.join(bad_root, "index.json"))
    with pytest.warns(UserWarning, match="index.json not found; scanning"):
        assert len(FrameDataset(bad_root)) == 32
    with pytest.raises(fmt.DataError, match="dataset root not found"):
        FrameDataset(os.path.join(bad_root, "nope"))


def test_item_labels_are_the_items_cameras_without_decoding(root, tmp_path, monkeypatch):
    """item_labels('camera') of the frame and EG3D datasets (the Trainer's label pools) equals
    every item's camera in item order, mirrored copies included, and reads no image; other keys
    and unlabelled folders answer None."""
    d = str(tmp_path / "ffhq")
    _image_folder(d)
    sets = [FrameDataset(root), FrameDataset(root, mirror=True), EG3DDataset(d),
            EG3DDataset(d, mirror=True)]
    want = [torch.stack([ds[i]["camera"] for i in range(len(ds))]) for ds in sets]

    def no_decoding(*a, **k):
        raise AssertionError("item_labels decoded an image")

    monkeypatch.setattr(fmt, "read_frame", no_decoding)
    monkeypatch.setattr(type(sets[2].source), "image", no_decoding)
    for ds, w in zip(sets, want):
        got = ds.item_labels("camera")
        assert got.dtype == torch.float32 and torch.equal(got, w.float())
        assert ds.item_labels("coeffs") is None
    assert ImageFolderDataset(d, labels=False).item_labels("camera") is None
    from pyface.models.eg3d.data import EG3DImages
    from pyface.train.data import SyntheticFrames

    # the registered datasets EG3D trains on ("synthetic", "eg3d") answer with theirs
    assert torch.equal(SyntheticFrames(root, 64, mirror=True).item_labels("camera"), want[1])
    assert torch.equal(EG3DImages(d, 16).item_labels("camera"), want[2])


# ---------------------------------------------------------------------------------------------
# image folders and EG3D dataset.json


def _image_folder(path, n=5, labels=True):
    os.makedirs(os.path.join(path, "sub"), exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"sub/img{i:05d}.png" if i % 2 else f"img{i:05d}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(os.path.join(path, name))
        names.append(name)
    if labels:
        lab = cam.orbit_labels(n).tolist()
        json.dump({"labels": [[nm, lab[i]] for i, nm in enumerate(names)]},
                  open(os.path.join(path, "dataset.json"), "w"))
    return names


def test_image_folder_and_eg3d(tmp_path):
    d = str(tmp_path / "ffhq")
    names = _image_folder(d)
    plain = ImageFolderDataset(d, labels=False)
    assert len(plain) == 5 and "camera" not in plain[0]
    ds = EG3DDataset(d, mirror=True)
    assert len(ds) == 10
    lab = torch.tensor(json.load(open(os.path.join(d, "dataset.json")))["labels"][1][1])
    i = ds.files.index(names[1])
    torch.testing.assert_close(ds[i]["camera"], lab)
    assert torch.equal(ds[i + 5]["image"], ds[i]["image"].flip(-1))
    torch.testing.assert_close(ds[i + 5]["camera"], cam.mirror_label(lab))
    assert ImageFolderDataset(d, resolution=8)[0]["image"].shape == (3, 8, 8)
    # the same as a zip (EG3D's dataset_tool output)
    z = str(tmp_path / "ffhq.zip")
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_STORED) as zf:
        for nm in names + ["dataset.json"]:
            zf.write(os.path.join(d, nm), nm)
    dz = EG3DDataset(z)
    assert dz.files == ds.files
    assert torch.equal(dz[3]["image"], ds[3]["image"]) and torch.equal(dz[3]["camera"], ds[3]["camera"])
    loader = torch.utils.data.DataLoader(dz, batch_size=5, num_workers=2)
    assert next(iter(loader))["image"].shape == (5, 3, 16, 16)


def test_image_folder_bad_data(tmp_path):
    d = str(tmp_path / "bad")
    names = _image_folder(d)
    p = os.path.join(d, "dataset.json")
    lab = json.load(open(p))
    lab["labels"][2][1][7] = float("nan")
    lab["labels"] = lab["labels"][:4]                  # no label for the last image
    json.dump(lab, open(p, "w"))
    with pytest.raises(fmt.DataError, match=f"dataset.json: NaN or inf camera for {names[2]}"):
        EG3DDataset(d)
    with pytest.warns(UserWarning, match="skipping"):
        ds = EG3DDataset(d, skip_bad=True)
    assert len(ds) == 3 and names[2] not in ds.files and names[4] not in ds.files
    open(os.path.join(d, names[0]), "wb").write(b"garbage")
    with pytest.raises(fmt.DataError, match=f"{names[0]}: corrupt or unreadable image"):
        ImageFolderDataset(d, labels=False)[ImageFolderDataset(d, labels=False).files.index(names[0])]
    os.makedirs(tmp_path / "empty")
    with pytest.raises(fmt.DataError, match="empty: no images"):
        ImageFolderDataset(str(tmp_path / "empty"))
    with pytest.raises(fmt.DataError, match="dataset.json: missing"):
        EG3DDataset(str(tmp_path / "bad" / "sub"))


def test_skip_bad_items_warn_at_the_caller_and_run_out(tmp_path):
    """skip_bad: a bad item is skipped for the next one with a warning attributed to the line
    that indexed the dataset; when none reads, a DataError names the root."""
    d = str(tmp_path / "imgs")
    names = _image_folder(d, labels=False)
    ds = ImageFolderDataset(d, skip_bad=True)
    k = ds.files.index(names[0])
    open(os.path.join(d, names[0]), "wb").write(b"garbage")
    with pytest.warns(UserWarning, match=f"skipping bad item {k}: .*corrupt or unreadable") as w:
        it = ds[k]
    assert w[0].filename == __file__
    assert int(it["index"]) == (k + 1) % 5
    for nm in names:
        open(os.path.join(d, nm), "wb").write(b"garbage")
    with pytest.warns(UserWarning), \
            pytest.raises(fmt.DataError, match="imgs: no readable image left"):
        ds[0]

    v = str(tmp_path / "videos")
    S.generate(v, S.SynthConfig(identities=1, videos_per_identity=1, frames=2, resolution=16,
                                cross=False, workers=1), progress=False)
    frames = FrameDataset(v, skip_bad=True)
    rec = frames.videos[0]
    open(rec.frame_path(v, 0), "wb").write(b"garbage")
    with pytest.warns(UserWarning, match="skipping bad item 0: .*corrupt or unreadable") as w:
        it = frames[0]
    assert w[0].filename == __file__ and int(it["frame"]) == 1
    open(rec.frame_path(v, 1), "wb").write(b"garbage")
    with pytest.warns(UserWarning), \
            pytest.raises(fmt.DataError, match="videos: no readable item left"):
        frames[1]


def test_mp4_videos(root, tmp_path):
    """A video stored as frames.mp4 instead of PNG frames reads the same (up to compression)."""
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v2 as iio

    out = str(tmp_path / "mp4")
    shutil.copytree(root, out)
    d = os.path.join(out, "id0000_v00")
    frames = [np.array(Image.open(os.path.join(d, "frames", f"{i:05d}.png"))) for i in range(8)]
    w = iio.get_writer(os.path.join(d, "frames.mp4"), fps=25, codec="libx264", quality=10,
                       macro_block_size=16, ffmpeg_log_level="error")
    for f in frames:
        w.append_data(f)
    w.close()
    shutil.rmtree(os.path.join(d, "frames"))
    fmt.write_index(out)
    rec = fmt.load_index(out)[0]
    assert rec.frames == "mp4" and rec.num_frames == 8
    assert fmt.check_dataset(out)[1] == []
    ds = FrameDataset(out)
    for i in (0, 5, 7):
        img = ds[i]["image"].permute(1, 2, 0).numpy().astype(float)
        assert np.abs(img - frames[i]).mean() < 6


def test_sixteen_bit_grey_images_keep_their_tones(tmp_path):
    """Every image reader goes through ``format.rgb8``: a 16-bit grey PNG (Pillow mode ``I`` /
    ``I;16``) is scaled by 255/65535 instead of clipped at 255 (which made it nearly white)."""
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)
    want = np.repeat((ramp // 257).astype(np.uint8)[..., None], 3, -1)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
        np.testing.assert_array_equal(fmt.rgb8(im), want)
    with Image.open(path) as im:                       # Pillow's own conversion clips
        assert (np.array(im.convert("RGB")) == 255).mean() > 0.9
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0                # alpha dropped, colour under it kept
    assert fmt.rgb8(Image.fromarray(rgba, "RGBA"))[0, 0].tolist() == [200, 0, 0]
    # the EG3D image-folder loader
    d = tmp_path / "folder"
    d.mkdir()
    Image.fromarray(ramp).save(d / "img00000.png")
    img = ImageFolderDataset(str(d), labels=False)[0]["image"]
    np.testing.assert_array_equal(img[0].numpy(), want[..., 0])      # (3, H, W) in 0..255


def test_driving_inputs_missing_path_and_video_folder(root, tmp_path):
    """pyface.data.driving: a missing input is one DataError naming it, the same from every
    reader; a pyface video folder is read through its record (frames, stride, labels)."""
    from pyface.data import driving as D

    missing = str(tmp_path / "nope")
    msg = (f"{missing}: not found (expected a pyface video folder, a video file or a folder of "
           "images)")
    for call in (lambda: D.read_driving(missing, 16), lambda: list(D.iter_driving(missing, 16)),
                 lambda: D.count_driving(missing)):
        with pytest.raises(fmt.DataError) as e:
            call()
        assert str(e.value) == msg
    with pytest.raises(fmt.DataError, match="a video file, an image or a folder of images"):
        D.frame_labels(missing)
    folder = os.path.join(root, fmt.load_index(root)[0].name)
    assert D.count_driving(folder, stride=3) == 3 and D.count_driving(folder, max_frames=2) == 2
    d = D.read_driving(folder, 16, stride=3)
    chunks = list(D.iter_driving(folder, 16, stride=3, chunk=2))
    assert d["image"].shape == (3, 3, 16, 16) and [c["image"].shape[0] for c in chunks] == [2, 1]
    assert torch.equal(torch.cat([c["image"] for c in chunks]), d["image"])
    assert {"image", "camera", "coeffs", "landmarks", "mask"} <= D.frame_labels(folder)
