"""The ground-truth synthetic talking-head engine (``pyface data synth``).

Renders talking-head videos of :meth:`pyface.face.MorphableModel.builtin` heads and writes them
in the pyface dataset format (:mod:`pyface.data.format`) with exact ground truth: image,
foreground mask, 257-dim coefficients, EG3D camera, 68 landmarks, identity and video ids.

* Per identity: shape (id coefficients), skin / hair / iris / lip colours and procedural
  texture detail (tex coefficients), and a background.
* Per video: smooth expression trajectories (talking jaw and lips, blinks, smiles, brows),
  head pose within yaw +-35 deg and pitch +-20 deg, and lighting (27 SH coefficients).
* Cross-identity ground truth (``cross=True``): for every identity A, a video ``cross/<A>_by_<V>``
  rendering A (shape, texture, background, and the lighting of A's source frame = its first
  video's first frame) with the expression and pose of every frame of video V of another
  identity. ``meta.json`` names the source and driving videos: it is the evaluation set for
  cross-identity reenactment. ``cross/`` is a dataset root of its own.
* Multi-view (``multiview=True``): ``multiview/<video>`` renders every frame of ``<video>`` a
  second time from another camera of a fixed two-camera rig (:func:`sample_rig`); a dataset
  root of its own.
* Options for the models: ``zoom`` (a per-video scale trajectory, :func:`zoom_trajectory`),
  ``exp_leak`` (a deterministic identity term added to the *stored* expression coefficients,
  :func:`leak_matrix`) and ``split="test"`` (held-out identities drawn from random streams that
  training splits never use, named ``test0000`` ...).

Everything is a pure function of ``(seed, split, identity, video)``: the output does not depend on
the number of worker processes or on the order they finish in.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from pyface.data import format as fmt

#: Bump when the generated content changes, so cached datasets (:mod:`pyface.data.cache`) of
#: an older engine are not reused.
GENERATOR_VERSION = 2
SPLITS = ("train", "test")
#: Seed of the fixed expression-identity leak matrix (the same for every dataset and split, like
#: the bias of one coefficient fitter).
LEAK_SEED = 20_241_117

#: Bounds of :class:`SynthConfig` beyond the obvious (> 0): the lowest frame rate and the largest
#: frame side (a guard against typos; one 4096^2 frame batch already takes gigabytes).
MIN_FPS = 0.1
MAX_RESOLUTION = 4096
#: Written into the dataset root (and ``cross/``, ``multiview/``) when a generation starts and
#: removed when it is complete: a set holding it is unfinished, never loaded as a dataset.
PARTIAL = fmt.SYNTH_PARTIAL

YAW_LIMIT = math.radians(35)
PITCH_LIMIT = math.radians(20)
ROLL_LIMIT = math.radians(15)


@dataclass
class SynthConfig:
    """What to generate. ``workers = 0``: all cores (``os.cpu_count()``); 1: in-process."""

    identities: int = 4
    videos_per_identity: int = 2
    frames: int = 32
    resolution: int = 256
    seed: int = 0
    fps: float = 25.0
    cross: bool = True
    workers: int = 0
    batch: int = 8
    masks: bool = True
    split: str = "train"        # "train" | "test" (held-out identities, their own random streams)
    zoom: float = 0.0           # amplitude of the per-video log-scale trajectory (0: none)
    exp_leak: float = 0.0       # strength of the identity leak into the stored exp coefficients
    multiview: bool = False     # also render ROOT/multiview (a second camera per video)

    def __post_init__(self):
        for k in ("identities", "videos_per_identity", "frames", "resolution", "batch"):
            if int(getattr(self, k)) <= 0:
                raise ValueError(f"{k}: expected > 0, got {getattr(self, k)}")
        if int(self.resolution) > MAX_RESOLUTION:
            raise ValueError(f"resolution: expected at most {MAX_RESOLUTION}, got {self.resolution}")
        if int(self.seed) < 0:
            raise ValueError(f"seed: expected >= 0, got {self.seed}")
        if int(self.workers) < 0:
            raise ValueError(f"workers: expected >= 0 (0: all cores), got {self.workers}")
        # the blink schedule steps through the video's duration (frames / fps) in 1.5-4 s steps:
        # a zero, negative or NaN rate would never end it
        if not (math.isfinite(float(self.fps)) and float(self.fps) >= MIN_FPS):
            raise ValueError(f"fps: expected a finite frame rate >= {MIN_FPS}, got {self.fps}")
        if not math.isfinite(float(self.exp_leak)):
            raise ValueError(f"exp_leak: expected a finite number >= 0, got {self.exp_leak}")
        if self.cross and self.identities < 2:
            raise ValueError("cross: cross-identity ground truth needs identities >= 2")
        if self.split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {self.split!r}")
        if self.split == "test" and not self.cross:
            raise ValueError("cross: the test split always writes the cross-identity set "
                             "(cross=True)")
        if not 0.0 <= float(self.zoom) <= 0.5:
            raise ValueError(f"zoom: expected a log-scale amplitude in [0, 0.5], got {self.zoom}")
        if float(self.exp_leak) < 0:
            raise ValueError(f"exp_leak: expected >= 0, got {self.exp_leak}")


def identity_name(i: int, split: str = "train") -> str:
    """``id0000`` for training identities, ``test0000`` for held-out ones."""
    return f"{'id' if split == 'train' else 'test'}{i:04d}"


def video_name(i: int, v: int, split: str = "train") -> str:
    return f"{identity_name(i, split)}_v{v:02d}"


def _stream(split: str, k: int) -> int:
    """Random stream ``k`` of a split: training splits use 0..99, the test split 100..199, so
    held-out identities and motions never come from a training stream, whatever the seed."""
    return k + (100 if split == "test" else 0)


# ----------------------------------------------------------------------------------------------
# sampling


_HAIR = np.array([[0.05, 0.04, 0.04], [0.16, 0.10, 0.07], [0.32, 0.21, 0.12], [0.62, 0.47, 0.27],
                  [0.52, 0.22, 0.10], [0.55, 0.54, 0.52], [0.80, 0.70, 0.50]])
_IRIS = np.array([[0.30, 0.18, 0.09], [0.18, 0.10, 0.05], [0.25, 0.42, 0.62], [0.32, 0.45, 0.30],
                  [0.45, 0.35, 0.20], [0.45, 0.50, 0.55]])
_SKIN_DARK, _SKIN_LIGHT = np.array([0.33, 0.21, 0.15]), np.array([0.95, 0.78, 0.68])


def _names(model, kind):
    names = getattr(model, f"{kind}_names")
    return {n: i for i, n in enumerate(names)}


def sample_identity(model, seed: int, identity: int, resolution: int, split: str = "train"):
    """Returns ``(id (80,), tex (80,), background (3, H, W))`` float32 numpy arrays."""
    rng = np.random.default_rng([seed, _stream(split, 0), identity])
    from pyface.face.procedural import id_prior_std

    idn, texn = _names(model, "id"), _names(model, "tex")
    idc = np.zeros(80, np.float32)
    for n, i in idn.items():
        std = id_prior_std(n)
        idc[i] = np.clip(rng.normal() * std, -2.5, 2.5)
    tex = np.zeros(80, np.float32)
    mean = model.mean_tex.numpy()
    skin_mean = mean[(model.region("skin") & ~model.region("lips") & ~model.region("hair")).numpy()]
    skin_mean = np.median(skin_mean, 0)
    skin = _SKIN_DARK + rng.uniform() * (_SKIN_LIGHT - _SKIN_DARK) + rng.normal(0, 0.02, 3)
    skin_c = (skin - skin_mean) / 0.1
    hair = np.clip(_HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 0.03, 3), 0.02, 0.95)
    iris = np.clip(_IRIS[rng.integers(len(_IRIS))] + rng.normal(0, 0.03, 3), 0.02, 0.95)
    lip = np.clip(skin * np.array([0.92, 0.70, 0.72]) + rng.normal(0, 0.02, 3), 0.05, 0.95)
    hair_mean = np.median(mean[model.region("hair").numpy()], 0)
    iris_mean = np.array([0.36, 0.26, 0.16])
    lip_mean = np.median(mean[model.region("lips").numpy()], 0)
    for ch, c in enumerate("rgb"):
        tex[texn[f"skin_{c}"]] = skin_c[ch]
        tex[texn[f"hair_{c}"]] = (hair[ch] - hair_mean[ch]) / 0.1
        tex[texn[f"iris_{c}"]] = (iris[ch] - iris_mean[ch]) / 0.1
        tex[texn[f"lip_{c}"]] = (lip[ch] - lip_mean[ch] - 0.07 * skin_c[ch]) / 0.1
    tex[texn["cheek_blush"]] = rng.uniform(0, 1.5)
    tex[texn["brow_dark"]] = rng.uniform(-0.5, 1.0)
    for n, i in texn.items():
        if "detail" in n:
            tex[i] = rng.normal()
    return idc, tex, _background(rng, resolution)


def _background(rng, res):
    yy, xx = np.meshgrid(np.linspace(0, 1, res), np.linspace(0, 1, res), indexing="ij")
    c0, c1 = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    ang = rng.uniform(0, 2 * math.pi)
    g = np.clip(0.5 + (xx - 0.5) * math.cos(ang) + (yy - 0.5) * math.sin(ang), 0, 1)
    bg = c0[:, None, None] * (1 - g) + c1[:, None, None] * g
    for _ in range(rng.integers(3, 7)):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
        w = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        bg = bg * (1 - 0.6 * w) + 0.6 * w * rng.uniform(0, 1, 3)[:, None, None]
    return bg.astype(np.float32)


def _smooth(rng, t, fmax, n=4):
    """A smooth random signal of the times ``t`` with values in about [-1, 1]."""
    f = rng.uniform(0.05, fmax, n)
    ph = rng.uniform(0, 2 * math.pi, n)
    a = rng.uniform(0.5, 1.0, n)
    return (a[:, None] * np.sin(2 * math.pi * f[:, None] * t[None] + ph[:, None])).sum(0) / a.sum()


def sample_motion(model, seed: int, identity: int, video: int, frames: int, fps: float,
                  split: str = "train", zoom: float = 0.0):
    """Per-frame ``exp (T, 64)``, ``angles (T, 3)``, ``trans (T, 3)``, ``gamma (T, 27)``.
    ``zoom > 0`` moves the head along the camera axis by :func:`zoom_trajectory`."""
    rng = np.random.default_rng([seed, _stream(split, 1), identity, video])
    t = np.arange(frames) / fps
    en = _names(model, "exp")
    exp = np.zeros((frames, 64), np.float32)
    # talking: syllables at 2.5-4.5 Hz under a slow envelope
    talk = rng.uniform(0.25, 0.8)
    env = np.clip(0.6 + 0.5 * _smooth(rng, t, 0.5), 0, 1)
    syl = 0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(2.5, 4.5) * t + rng.uniform(0, 6.3))
    jaw = talk * env * syl ** 1.5
    exp[:, en["jaw_open"]] = jaw
    exp[:, en["lip_pucker"]] = np.clip(0.3 * _smooth(rng, t, 1.5), 0, None)
    exp[:, en["mouth_stretch"]] = 0.3 * _smooth(rng, t, 1.0)
    exp[:, en["upper_lip_raise"]] = np.clip(0.5 * jaw + 0.2 * _smooth(rng, t, 2.0), 0, 1)
    exp[:, en["lower_lip_down"]] = np.clip(0.4 * jaw + 0.2 * _smooth(rng, t, 2.0), 0, 1)
    exp[:, en["jaw_left"]] = 0.2 * _smooth(rng, t, 0.8)
    # smiles and brows: slow
    exp[:, en["smile"]] = np.clip(rng.uniform(-0.1, 0.6) + 0.3 * _smooth(rng, t, 0.4), 0, 1)
    exp[:, en["smile_left"]] = np.clip(0.15 * _smooth(rng, t, 0.3), 0, None)
    exp[:, en["brow_raise"]] = np.clip(rng.uniform(-0.2, 0.3) + 0.4 * _smooth(rng, t, 0.6), 0, 1)
    exp[:, en["brow_frown"]] = np.clip(rng.uniform(-0.4, 0.2) + 0.3 * _smooth(rng, t, 0.5), 0, 1)
    exp[:, en["cheek_puff"]] = np.clip(0.2 * _smooth(rng, t, 0.3), 0, None)
    # blinks every 1.5-4 s, about 0.2 s long
    blink = np.zeros(frames)
    tb = rng.uniform(0.0, 1.5)
    while tb < t[-1] + 0.2:
        blink = np.maximum(blink, np.exp(-0.5 * ((t - tb) / 0.045) ** 2))
        tb += rng.uniform(1.5, 4.0)
    exp[:, en["blink_left"]] = blink
    exp[:, en["blink_right"]] = blink
    # head pose
    yaw = np.clip(rng.uniform(-0.7, 0.7) * YAW_LIMIT + math.radians(10) * _smooth(rng, t, 0.4),
                  -YAW_LIMIT, YAW_LIMIT)
    pitch = np.clip(rng.uniform(-0.6, 0.6) * PITCH_LIMIT + math.radians(6) * _smooth(rng, t, 0.4),
                    -PITCH_LIMIT, PITCH_LIMIT)
    roll = np.clip(rng.uniform(-0.5, 0.5) * ROLL_LIMIT + math.radians(3) * _smooth(rng, t, 0.4),
                   -ROLL_LIMIT, ROLL_LIMIT)
    angles = np.stack([pitch, yaw, roll], -1).astype(np.float32)
    trans = np.stack([rng.uniform(-0.06, 0.06) + 0.02 * _smooth(rng, t, 0.3),
                      rng.uniform(-0.06, 0.06) + 0.02 * _smooth(rng, t, 0.3),
                      rng.uniform(-0.6, 0.2) + 0.05 * _smooth(rng, t, 0.3)], -1).astype(np.float32)
    # lighting: ambient with a tint plus one directional term, slowly varying
    gamma = np.zeros((frames, 3, 9), np.float32)
    d = rng.normal(size=3)
    d[2] = abs(d[2]) + 0.5        # mostly from the camera side
    d /= np.linalg.norm(d)
    k = rng.uniform(0.15, 0.45)
    tint = rng.uniform(-0.08, 0.08, 3) + rng.uniform(-0.1, 0.2)
    for ch in range(3):
        gamma[:, ch, 0] = tint[ch] + 0.03 * _smooth(rng, t, 0.2)
        gamma[:, ch, 1] = -k * d[1]
        gamma[:, ch, 2] = k * d[2]
        gamma[:, ch, 3] = -k * d[0] + 0.03 * _smooth(rng, t, 0.2)
    gamma[:, :, 4:] = rng.normal(0, 0.03, (1, 1, 5))
    if zoom > 0:
        scale = zoom_trajectory(seed, identity, video, frames, zoom, split)
        # image scale ~ 1 / camera distance: the Deep3DFaceRecon camera sits at z = 10
        d = BFM_CAMERA_DISTANCE - trans[:, 2].astype(np.float64)
        trans[:, 2] = (BFM_CAMERA_DISTANCE - d / scale).astype(np.float32)
    return exp, angles, trans, gamma.reshape(frames, 27)


BFM_CAMERA_DISTANCE = 10.0   # = pyface.face.cameras.BFM_CAMERA_DISTANCE (no torch import here)


def zoom_trajectory(seed: int, identity: int, video: int, frames: int, zoom: float,
                    split: str = "train") -> np.ndarray:
    """The per-frame image scale ``(T,)`` of the zoom option: ``exp(zoom * sin(2 pi t / T +
    phase))`` with a random phase per video, so every video sweeps the scale range
    ``[exp(-zoom), exp(zoom)]`` over one period (one period per video length). The head is
    moved along the camera axis (``trans_z``) so its projected size is the base size times the
    scale; the stored coefficients and cameras are those of the moved head."""
    rng = np.random.default_rng([seed, _stream(split, 3), identity, video])
    phase = rng.uniform(0, 2 * math.pi)
    t = np.arange(frames) / max(frames, 1)
    return np.exp(zoom * np.sin(2 * math.pi * t + phase))


def leak_matrix() -> np.ndarray:
    """``L (64, 80)``: the fixed expression-identity leak. With ``exp_leak = a`` the stored
    expression coefficients of a frame are ``exp + a * L @ id`` (``id`` its identity
    coefficients), while the image is rendered with ``exp``. ``L`` has i.i.d. N(0, 1/80)
    entries from ``default_rng(LEAK_SEED)``, so ``L @ id`` has about unit variance per
    component. The rendered expression is recovered exactly as ``stored - a * L @ id``."""
    return (np.random.default_rng(LEAK_SEED).normal(size=(64, 80)) / math.sqrt(80)).astype(np.float32)


def apply_leak(coeffs: np.ndarray, strength: float) -> np.ndarray:
    """``coeffs (T, 257)`` with :func:`leak_matrix`'s term added to ``exp`` (a copy)."""
    out = np.array(coeffs, np.float32, copy=True)
    if strength:
        out[:, 80:144] += strength * out[:, 0:80] @ leak_matrix().T
    return out


def sample_rig(seed: int, identity: int, video: int, mean_yaw: float, split: str = "train"):
    """The second camera of a video's two-camera rig: ``(yaw, pitch)`` offsets in radians of
    camera 1 orbiting camera 0 about the world origin (the head). ``|yaw|`` is drawn in
    [15, 30] degrees, on the side that brings the camera towards the frontal view
    (opposite to the sign of the video's mean head yaw); pitch in [-10, 10] degrees."""
    rng = np.random.default_rng([seed, _stream(split, 2), identity, video])
    mag = math.radians(rng.uniform(15, 30))
    sign = 1.0 if mean_yaw > 0 else -1.0    # camera yaw = -head yaw: turn towards the face
    return sign * mag, math.radians(rng.uniform(-10, 10))


# ----------------------------------------------------------------------------------------------
# rendering and writing


def render_video(model, idc, tex, background, exp, angles, trans, gamma, resolution, batch=8):
    """Renders one video; returns frames (T, H, W, 3) uint8, masks (T, H, W) bool, coeffs
    (T, 257), labels (T, 25), landmarks (T, 68, 2)."""
    import torch

    from pyface.face.coeffs import merge_coeffs

    T = exp.shape[0]
    coeffs = merge_coeffs(torch.from_numpy(idc).expand(T, 80), torch.from_numpy(exp),
                          torch.from_numpy(tex).expand(T, 80), torch.from_numpy(angles),
                          torch.from_numpy(gamma), torch.from_numpy(trans))
    bg = torch.from_numpy(background)
    frames, masks, labels, lms = [], [], [], []
    with torch.no_grad():
        for s in range(0, T, batch):
            r = model.render(coeffs[s:s + batch], resolution, background=bg.expand(min(batch, T - s), -1, -1, -1))
            frames.append((r.image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1))
            masks.append(r.mask[:, 0] > 0.5)
            labels.append(r.label)
            lms.append(r.landmarks)
    cat = lambda xs: torch.cat(xs).numpy()
    return cat(frames), cat(masks), coeffs.numpy(), cat(labels), cat(lms)


def _task(args):
    import time

    c0 = time.process_time()
    kind, rec = _render_task(*args)
    return kind, rec, time.process_time() - c0


def render_second_view(model, coeffs, yaw: float, pitch: float, background, resolution, batch=8):
    """Renders ``coeffs (T, 257)`` from the rig's second camera: camera 0 (the coefficients'
    own camera) orbited by ``yaw`` about the world y axis, then ``pitch`` about x, around the
    world origin. Vertex colours are shaded as camera 0 sees them (the lighting belongs to
    the scene, so both views show the same surface colours). Returns frames, masks, coeffs
    (the second camera's pose as Deep3DFaceRecon ``angles``/``trans``; id/exp/tex/gamma
    unchanged), labels and landmarks, as :func:`render_video`."""
    import torch

    from pyface.face import cameras as cam
    from pyface.face.coeffs import split_coeffs
    from pyface.face.morphable import sh_shading, vertex_normals
    from pyface.face.render import render_mesh

    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float32)
    rx = torch.tensor([[1, 0, 0], [0, cp, -sp], [0, sp, cp]], dtype=torch.float32)
    orbit = rx @ ry
    T = coeffs.shape[0]
    frames, masks, out_c, labels, lms = [], [], [], [], []
    with torch.no_grad():
        for s in range(0, T, batch):
            c = coeffs[s:s + batch].float()
            b = c.shape[0]
            parts = split_coeffs(c)
            label0 = model.label_of(c)
            c2w0, k = cam.split_label(label0)
            c2w1 = c2w0.clone()
            c2w1[:, :3, :3] = orbit @ c2w0[:, :3, :3]
            c2w1[:, :3, 3] = c2w0[:, :3, 3] @ orbit.T
            label1 = cam.make_label(c2w1, k)
            verts = model.shape(parts["id"], parts["exp"])
            flip = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
            rot0 = (c2w0[:, :3, :3] @ flip).transpose(1, 2)
            normals = vertex_normals(verts, model.faces) @ rot0.transpose(1, 2)
            shading = sh_shading(normals, parts["gamma"])
            colors = (model.albedo(parts["tex"]).clamp(0, 1) * shading).clamp(0, 1)
            world = verts * cam.BFM_TO_EG3D_SCALE
            uv, z = cam.project_label(world, label1)
            r = render_mesh(torch.cat([uv * 2 - 1, z], -1), model.faces, resolution, colors, cull=model.cull)
            bg = background.expand(b, -1, -1, -1)
            img = r.attr_image[:, :3] * r.mask + bg * (1 - r.mask)
            frames.append((img.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1))
            masks.append(r.mask[:, 0] > 0.5)
            lm_uv, _ = cam.project_label(world[:, model.landmarks], label1)
            lms.append(lm_uv * resolution)
            angles, trans = cam.cam2world_to_deep3d(c2w1)
            c1 = c.clone()
            c1[:, 224:227] = angles
            c1[:, 254:257] = trans
            out_c.append(c1)
            labels.append(label1)
    cat = lambda xs: torch.cat(xs).numpy()
    return cat(frames), cat(masks), cat(out_c), cat(labels), cat(lms)


def _render_task(kind, cfg, root, i, v, extra):
    import torch

    from pyface.face import MorphableModel

    torch.set_num_threads(1)
    model = MorphableModel.builtin()
    sp = cfg.split
    idc, tex, bg = sample_identity(model, cfg.seed, i, cfg.resolution, sp)
    motion = lambda ident, vid: sample_motion(model, cfg.seed, ident, vid, cfg.frames, cfg.fps,  # noqa: E731
                                              sp, cfg.zoom)
    if kind in ("video", "view"):
        exp, ang, tr, gam = motion(i, v)
        name, meta = video_name(i, v, sp), {"video_index": v}
    else:  # cross: identity i driven by video v of identity j, lit like i's source frame
        j = extra
        exp, ang, tr, _ = motion(j, v)
        _, _, _, gam_src = motion(i, 0)
        gam = np.repeat(gam_src[:1], cfg.frames, 0)
        name = f"{identity_name(i, sp)}_by_{video_name(j, v, sp)}"
        meta = {"source_video": video_name(i, 0, sp), "source_frame": 0,
                "driving_video": video_name(j, v, sp), "driving_identity": identity_name(j, sp)}
    if kind == "view":
        from pyface.face.coeffs import merge_coeffs

        T = cfg.frames
        coeffs = merge_coeffs(torch.from_numpy(idc).expand(T, 80), torch.from_numpy(exp),
                              torch.from_numpy(tex).expand(T, 80), torch.from_numpy(ang),
                              torch.from_numpy(gam), torch.from_numpy(tr))
        yaw, pitch = sample_rig(cfg.seed, i, v, float(ang[:, 1].mean()), sp)
        frames, masks, coeffs, labels, lms = render_second_view(
            model, coeffs, yaw, pitch, torch.from_numpy(bg), cfg.resolution, cfg.batch)
        meta.update({"view_of": name, "camera": 1, "rig_yaw_deg": math.degrees(yaw),
                     "rig_pitch_deg": math.degrees(pitch)})
    else:
        frames, masks, coeffs, labels, lms = render_video(model, idc, tex, bg, exp, ang, tr, gam,
                                                          cfg.resolution, cfg.batch)
    if cfg.exp_leak:
        coeffs = apply_leak(coeffs, cfg.exp_leak)
        meta["exp_leak"] = float(cfg.exp_leak)
    if cfg.zoom:
        meta["zoom"] = float(cfg.zoom)
    meta.update({"seed": cfg.seed, "generator": "pyface.data.synthetic"})
    if sp != "train":
        meta["split"] = sp
    source = {"video": "synthetic", "cross": "synthetic-cross", "view": "synthetic-view"}[kind]
    rec = fmt.write_video(root, name, frames, coeffs, labels, identity=identity_name(i, sp),
                          fps=cfg.fps, source=source,
                          masks=masks if cfg.masks else None, landmarks=lms, extra_meta=meta)
    return kind, rec


def _tasks(cfg, out: str, cross_root: str, view_root: str):
    """The render tasks of ``cfg`` in order (a generator): its videos, then the cross-identity
    videos and the second views."""
    for i in range(cfg.identities):
        for v in range(cfg.videos_per_identity):
            yield ("video", cfg, out, i, v, None)
    if cfg.cross:
        for i in range(cfg.identities):
            yield ("cross", cfg, cross_root, i, 0, (i + 1) % cfg.identities)
    if cfg.multiview:
        for i in range(cfg.identities):
            for v in range(cfg.videos_per_identity):
                yield ("view", cfg, view_root, i, v, None)


def _task_count(cfg) -> int:
    """How many tasks :func:`_tasks` yields."""
    videos = cfg.identities * cfg.videos_per_identity
    return videos + (cfg.identities if cfg.cross else 0) + (videos if cfg.multiview else 0)


def _unordered(pool, fn, tasks, window: int):
    """``pool.imap_unordered(fn, tasks)`` that reads ``tasks`` (any iterable, a generator
    included) only as results come back: at most ``window`` tasks are submitted and not yet
    returned (``imap_unordered`` reads the whole iterable ahead). The first task error is
    raised."""
    import queue

    returned = queue.SimpleQueue()
    tasks = iter(tasks)
    pending = 0

    def submit() -> bool:
        nonlocal pending
        for t in tasks:
            pool.apply_async(fn, (t,), callback=lambda r: returned.put((True, r)),
                             error_callback=lambda e: returned.put((False, e)))
            pending += 1
            return True
        return False

    while pending < window and submit():
        pass
    while pending:
        ok, r = returned.get()
        pending -= 1
        if not ok:
            raise r
        submit()
        yield r


def _task_name(kind, cfg, i, v, extra) -> str:
    """The folder name :func:`_render_task` writes for a task."""
    if kind == "cross":
        return f"{identity_name(i, cfg.split)}_by_{video_name(extra, v, cfg.split)}"
    return video_name(i, v, cfg.split)


def _dataset_root_above(path: str) -> str | None:
    """The nearest folder above ``path`` that is a pyface dataset root (a ``pyface-video``
    ``index.json``, or an unfinished synthetic set), or None."""
    d = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.isfile(os.path.join(d, PARTIAL)):
            return d
        index = os.path.join(d, fmt.INDEX)
        if os.path.isfile(index):
            try:
                if fmt._load_json(index).get("format") == fmt.FORMAT:
                    return d
            except (fmt.DataError, AttributeError):
                pass
        up = os.path.dirname(d)
        if up == d:
            return None
        d = up


def _differences(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys
                     if old.get(k) != new.get(k))


def _check_out(out: str, cfg) -> str:
    """What :func:`generate` does with ``out``: ``"new"`` (absent or empty), ``"resume"`` (an
    unfinished set of the same content) or ``"done"`` (this set, complete). Raises
    :class:`~pyface.data.format.DataError` naming the reason for anything else."""
    import json

    from pyface.data.cache import content_key

    if os.path.exists(out) and not os.path.isdir(out):
        raise fmt.DataError(f"{out}: exists and is not a folder")
    above = _dataset_root_above(out)
    if above is not None:
        raise fmt.DataError(f"{out}: inside the dataset {above}; write the new set outside it "
                            "(its index and loaders would not see it, or mix it in)")
    if not os.path.isdir(out) or not os.listdir(out):
        return "new"
    key = json.loads(json.dumps(content_key(cfg), default=str))
    partial = os.path.join(out, PARTIAL)
    if os.path.isfile(partial):
        try:
            old = fmt._load_json(partial)["config"]
        except (fmt.DataError, KeyError, TypeError):
            old = None
        if old != key:
            why = _differences(old, key) if isinstance(old, dict) else f"{partial} unreadable"
            raise fmt.DataError(f"{out}: an unfinished `pyface data synth` with other options "
                                f"({why}); run it again with its own options to finish it, or "
                                "delete the folder")
        return "resume"
    summary = os.path.join(out, "synth.json")
    if os.path.isfile(summary) and os.path.isfile(os.path.join(out, fmt.INDEX)):
        try:
            s = fmt._load_json(summary)
            from pyface.data.cache import _NOT_CONTENT

            old = {k: v for k, v in s["config"].items() if k not in _NOT_CONTENT}
            old["generator_version"] = s["generator_version"]
        except (fmt.DataError, KeyError, TypeError, AttributeError):
            old = None
        if old == key:
            return "done"
        why = _differences(old, key) if isinstance(old, dict) else f"{summary} unreadable"
        raise fmt.DataError(f"{out}: holds a synthetic dataset with other options ({why}); "
                            "choose another folder or delete it")
    entries = sorted(os.listdir(out))
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise fmt.DataError(f"{out}: not empty ({shown}) and not written by `pyface data synth`; "
                        "choose a new or empty folder")


def generate(out: str, cfg: SynthConfig | None = None, progress: bool = True) -> dict:
    """Generates a dataset under ``out`` (videos at the root, cross-identity ground truth under
    ``out/cross``), writes the indexes and a ``synth.json`` with the config. Returns a summary.

    ``out`` must be absent or empty, outside any other dataset. While generating, ``out`` holds
    :data:`PARTIAL` (the content config): loaders, ``pyface data index`` and ``check`` refuse
    such a set. Generating again into an unfinished set of the same content finishes it (the
    complete videos are kept: the output is a pure function of the config), into a complete one
    of the same content does nothing (the summary has ``"existing": True``); any other
    non-empty ``out`` raises :class:`~pyface.data.format.DataError` naming the reason, and so
    does a folder another generation is writing (an exclusive ``flock`` on ``out``).
    """
    cfg = cfg or SynthConfig()
    _check_out(out, cfg)            # refuse before creating anything
    os.makedirs(out, exist_ok=True)
    with _exclusive(out):
        return _generate(out, cfg, _check_out(out, cfg), progress)   # again, under the lock


@contextlib.contextmanager
def _exclusive(out: str):
    """An exclusive ``flock`` on the folder ``out`` itself (held by the render processes too),
    so that two runs never write one set; without ``fcntl`` (non-POSIX) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise fmt.DataError(f"{out}: another `pyface data synth` is writing it (it holds the "
                                "folder's lock); wait for it to end or stop it") from None
        yield
    finally:
        os.close(fd)


#: Render tasks submitted per worker ahead of the results (:func:`_unordered`).
SUBMIT_AHEAD = 4


def _generate(out: str, cfg: SynthConfig, state: str, progress: bool) -> dict:
    import json
    import multiprocessing as mp
    import time

    from pyface.data.cache import content_key

    if state == "done":
        with open(os.path.join(out, "synth.json")) as f:
            return {**json.load(f), "existing": True}
    cross_root = os.path.join(out, "cross")
    view_root = os.path.join(out, "multiview")
    roots = [out] + ([cross_root] if cfg.cross else []) + ([view_root] if cfg.multiview else [])
    marker = {"config": content_key(cfg)}
    for r in roots:
        os.makedirs(r, exist_ok=True)
        fmt._dump(os.path.join(r, PARTIAL), marker)
    def finished(t):        # a video's meta.json is written last: with it the folder is complete
        return os.path.isfile(os.path.join(t[2], _task_name(t[0], cfg, *t[3:]), fmt.META))

    results = []
    if state == "resume":
        results = [(t[0], fmt.scan_video(t[2], _task_name(t[0], cfg, *t[3:])), 0.0)
                   for t in _tasks(cfg, out, cross_root, view_root) if finished(t)]
    resumed = len(results)
    # generated as the workers take them: a large set is never listed whole
    todo = (t for t in _tasks(cfg, out, cross_root, view_root) if not (resumed and finished(t)))
    count = _task_count(cfg) - resumed
    workers = cfg.workers or os.cpu_count() or 1
    workers = max(1, min(workers, count))
    t0 = time.perf_counter()
    if count:
        from pyface.face import MorphableModel
        MorphableModel.builtin()  # build once; forked workers inherit it
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=(count + resumed) * cfg.frames, initial=resumed * cfg.frames,
                   unit="frame", desc="pyface data synth")
    if workers == 1:
        it = map(_task, todo)
        pool = None
    else:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        pool = ctx.Pool(workers)
        it = _unordered(pool, _task, todo, window=SUBMIT_AHEAD * workers)
    try:
        for r in it:
            results.append(r)
            if bar is not None:
                bar.update(cfg.frames)
    except BaseException:
        if pool is not None:        # an error or Ctrl-C: do not wait for the other videos
            pool.terminate()
            pool.join()
            pool = None
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    fmt.write_index(out, [rec for kind, rec, _ in results if kind == "video"])
    if cfg.cross:
        fmt.write_index(cross_root, [rec for kind, rec, _ in results if kind == "cross"])
    if cfg.multiview:
        fmt.write_index(view_root, [rec for kind, rec, _ in results if kind == "view"])
    seconds = time.perf_counter() - t0
    summary = {"config": asdict(cfg), "generator_version": GENERATOR_VERSION,
               "videos": sum(k == "video" for k, _, _ in results),
               "cross_videos": sum(k == "cross" for k, _, _ in results),
               "view_videos": sum(k == "view" for k, _, _ in results),
               "frames": len(results) * cfg.frames, "seconds": round(seconds, 2),
               "render_cpu_seconds": round(sum(c for _, _, c in results), 2),
               "workers": workers}
    if resumed:
        summary["resumed_videos"] = resumed
    fmt._dump(os.path.join(out, "synth.json"), summary)
    for r in roots[::-1]:           # the top-level marker last: it is what marks the set unfinished
        with contextlib.suppress(FileNotFoundError):    # another run on the same folder finished
            os.remove(os.path.join(r, PARTIAL))
    return summary


def default_config(**overrides) -> SynthConfig:
    """A small dataset for tests and demos: 2 identities x 2 videos x 8 frames at 64^2."""
    kw = dict(identities=2, videos_per_identity=2, frames=8, resolution=64, workers=1)
    kw.update(overrides)
    return SynthConfig(**kw)


def make_default(out: str, **overrides) -> str:
    """Generates :func:`default_config` into ``out`` (unless already there) and returns it."""
    if not os.path.isfile(os.path.join(out, fmt.INDEX)):
        generate(out, default_config(**overrides), progress=False)
    return out
