"""Quality of ``pyface data prepare`` on exact ground truth.

Renders synthetic videos (:mod:`pyface.data.synthetic`), encodes them to H.264 mp4 (PyAV),
prepares them, and compares with the ground truth, frame by frame (the prepared frames keep
their source index in ``meta.json["source_frames"]``):

* camera yaw and pitch error in degrees: the fitted Deep3DFaceRecon angles against the
  generator's, seen from the crop's camera (:func:`crop_view_angles`): an EG3D label
  describes the crop with its principal point at the crop's centre, i.e. a camera turned from
  the source camera towards the crop's centre, so the generator's head rotation is expressed
  in that turned camera (the crop centre sits up to ~25 px off the source's centre, 1-1.5 deg);
  the errors against the source camera's angles are kept as ``*_source``;
* landmark error in pixels at the prepared resolution: prepared 68 landmarks (the detector's
  ``landmarks.npy``, and the fitted model's own ``landmarks_fit.npy``) against the
  generator's 68 landmarks mapped into the same crop, per group (jaw, brows, nose, eyes, mouth),
  over the 51 inner points (17-67) and over the 32 eye and mouth points; the jaw also with the
  static contour (the generator's jaw landmarks are fixed vertices, not the visible outline);
  and, as a diagnostic of how much of the error is a fixed per-point offset (a difference of
  definition), the error left after subtracting each point's mean offset over the set;
* expression correlation: Pearson correlation over frames of the fitted and true ``jaw_open``,
  ``smile`` and ``blink`` (mean of left/right) coefficients of the built-in model, per video
  (``exp_corr_mean``: their mean) and over all frames of the set (``exp_pooled``: correlation,
  the slope of fitted on true, and the median within-video standard deviation of the truth; a
  coefficient that barely moves within a video has a per-video correlation of noise);
* mask IoU inside the crop's part of the source image (the generator's head mask, cropped the
  same way, against the prepared mask);
* the albedo/lighting fit's RMS colour residual on skin pixels (0..255, from ``meta.json``);
* with ``--oracle``, the fit's own error floor: the camera error of the same landmark fit run on
  the generator's exact landmarks (in the crop, with the head's own 68 landmark vertices), so
  fit and camera convention are checked apart from the detector's landmark definitions (the
  default :class:`pyface.face.fit.FitConfig`, noise level estimated from the data).

``--compare-only`` re-runs the comparison on an existing ``DIR/prepared`` (no preparation).

``python -m pyface.data.prepare_quality --out DIR [--identities 2 --frames 48 ...]`` prints and
writes ``DIR/quality.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from pyface.data import format as fmt
from pyface.data.landmarks import GROUPS, mesh_to_68


def encode_mp4(frames: np.ndarray, path: str, fps: float = 25.0, crf: int = 18) -> None:
    """Encodes ``frames: (T, H, W, 3)`` uint8 RGB to an H.264 mp4 (yuv420p) with PyAV."""
    import av
    from fractions import Fraction

    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt = "yuv420p"
        s.options = {"crf": str(crf), "preset": "veryfast"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def synth_to_mp4(synth_root: str, video_dir: str) -> list[str]:
    """Encodes every video of a synthetic dataset root to ``video_dir/<name>.mp4``."""
    os.makedirs(video_dir, exist_ok=True)
    paths = []
    for rec in fmt.load_index(synth_root):
        frames = np.stack([fmt.read_frame(synth_root, rec, i) for i in range(rec.num_frames)])
        p = os.path.join(video_dir, f"{rec.name}.mp4")
        encode_mp4(frames, p)
        paths.append(p)
    return paths


def convention_landmarks(coeffs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The generator's heads' 68 landmarks placed by the standard 68-point (iBUG / 300-W)
    definitions, from the mesh and the camera of ``coeffs: (T, 257)`` (built-in head, rendered
    at ``size = (W, H)``); returns ``(T, 68, 2)`` source pixels. Only for the quality comparison:
    the dataset's ``landmarks.npy`` keeps the head's fixed landmark vertices.

    * jaw 0-5 and 11-16: the visible outline. Each point moves along its mesh row (the head's
      horizontal ring through the fixed landmark vertex), on its side of the face (15-100 deg
      from the midline), to the vertex farthest out in the image along the jaw line's direction:
      the row's contour point, which moves with the pose (outwards on the side turned to the
      camera, inwards on the other); chin points 6-10 stay at their fixed vertices (the
      head's chin has no silhouette in front views);
    * nose 27-30: 30 the pronasale, the most protruding midline point of the frame's shape (max
      z in the head frame), 27 the nasion, the deepest midline point between the eyes and the
      brow ridge, 28 and 29 the midline vertices at 1/3 and 2/3 of the height between them;
    * nose 31-35: 33 the subnasale, the deepest midline point between the tip and the upper lip;
      31, 32, 34, 35 the fixed vertices' head-frame positions moved down with it;
    * brows, eyes and mouth: the fixed vertices (they lie on the painted brows, the lid margins
      and eye corners and the lip contours: already the convention).
    """
    import torch

    from pyface.face import MorphableModel
    from pyface.face import cameras as cam
    from pyface.face.procedural import BROW_Y, EYE_C, MOUTH_Y, _theta_of_s

    m = MorphableModel.builtin()
    cols = 144                                   # build_head's default grid
    c = torch.as_tensor(np.asarray(coeffs), dtype=torch.float32)
    with torch.no_grad():
        verts = m.shape(c[:, :80], c[:, 80:144])                               # (T, V, 3)
        uv, _ = cam.project_label(verts * cam.BFM_TO_EG3D_SCALE, m.label_of(c))
    uv = (uv.double() * uv.new_tensor(size).double()).numpy()                  # (T, V, 2)
    vh = verts.double().numpy()                                                # head frame
    lm = m.landmarks.numpy()
    t = len(c)
    out = uv[:, lm].copy()
    n_sheet = int((~(m.region("ears") | m.region("eyelids"))).sum())   # the sheet comes first
    if n_sheet % cols or n_sheet > m.num_vertices:
        raise RuntimeError(f"the built-in head's sheet is not a {cols}-column grid")
    theta = _theta_of_s(-1.0 + 2.0 * np.arange(cols) / cols)
    across = out[:, 16] - out[:, 0]
    across /= np.linalg.norm(across, axis=-1, keepdims=True)                   # (T, 2)
    for k in list(range(0, 6)) + list(range(11, 17)):
        row, col = divmod(int(lm[k]), cols)
        side = np.sign(theta[col])
        cand = row * cols + np.nonzero((np.sign(theta) == side) & (np.abs(theta) >= np.radians(15))
                                       & (np.abs(theta) <= np.radians(100)))[0]
        score = side * (uv[:, cand] @ across[..., None])[..., 0]              # (T, C)
        out[:, k] = uv[np.arange(t), cand[score.argmax(1)]]
    mid = np.arange(n_sheet // cols) * cols + cols // 2                        # midline column
    y0 = vh[0, mid, 1]
    ti = np.arange(t)[:, None]

    def pick(lo, hi, key):
        sel = mid[(y0 > lo) & (y0 < hi)]
        return sel[key(vh[:, sel, 2], axis=1)]                               # (T,)

    tip = pick(-0.25, 0.45, np.argmax)
    nasion = pick(EYE_C[1] - 0.05, BROW_Y, np.argmin)
    sub = pick(MOUTH_Y + 0.1, -0.05, np.argmin)
    out[:, 30], out[:, 27], out[:, 33] = uv[ti[:, 0], tip], uv[ti[:, 0], nasion], uv[ti[:, 0], sub]
    for k, f in ((28, 1 / 3), (29, 2 / 3)):
        yk = vh[ti[:, 0], nasion, 1] * (1 - f) + vh[ti[:, 0], tip, 1] * f      # (T,)
        j = np.abs(vh[:, mid, 1] - yk[:, None]).argmin(1)
        out[:, k] = uv[ti[:, 0], mid[j]]
    dy = vh[ti[:, 0], sub, 1] - vh[ti[:, 0], lm[33], 1]                        # (T,)
    front = np.nonzero(np.abs(theta) < np.radians(60))[0]
    near = (np.arange(n_sheet // cols)[:, None] * cols + front[None]).ravel()
    for k in (31, 32, 34, 35):
        goal = vh[ti[:, 0], lm[k], :2] + np.stack([np.zeros(t), dy], -1)      # (T, 2)
        j = np.linalg.norm(vh[:, near, :2] - goal[:, None], axis=-1).argmin(1)
        out[:, k] = uv[ti[:, 0], near[j]]
    return out


def crop_view_angles(angles: np.ndarray, boxes: np.ndarray, size: tuple[int, int],
                     focal: float | None = None) -> np.ndarray:
    """Deep3DFaceRecon ``angles: (T, 3)`` (radians) of a head seen by a source camera with EG3D's
    normalised ``focal`` (default FFHQ's) and its principal point at the centre of a ``size =
    (W, H)`` image, re-expressed in the camera turned (by the smallest rotation) to look
    through the centre of each crop, ``boxes: (T, 3)`` = (cx, cy, side) in source pixels; the
    camera an EG3D label of the crop describes. Returns ``(T, 3)`` radians."""
    import torch

    from pyface.face import cameras as cam

    f = cam.FFHQ_FOCAL if focal is None else focal
    a = torch.as_tensor(np.asarray(angles), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(boxes), dtype=torch.float64)
    if a.dim() != 2 or a.shape[1] != 3:
        raise ValueError(f"angles: expected shape (T, 3), got {tuple(a.shape)}")
    if b.dim() != 2 or b.shape[1] != 3 or b.shape[0] != a.shape[0]:
        raise ValueError(f"boxes: expected shape ({a.shape[0]}, 3), got {tuple(b.shape)}")
    # ray through the crop centre in the Deep3DFaceRecon camera frame (x right, y up, looking -z)
    d = torch.stack([(b[:, 0] / size[0] - 0.5) / f, -(b[:, 1] / size[1] - 0.5) / f,
                     -torch.ones(len(b), dtype=torch.float64)], -1)
    d = d / d.norm(dim=-1, keepdim=True)
    z = d.new_tensor([0.0, 0.0, -1.0]).expand_as(d)
    axis = torch.linalg.cross(z, d, dim=-1)
    sin, cos = axis.norm(dim=-1), (z * d).sum(-1)
    k = axis / sin.clamp_min(1e-12)[:, None]
    kx = torch.zeros(len(b), 3, 3, dtype=torch.float64)
    kx[:, 0, 1], kx[:, 0, 2], kx[:, 1, 2] = -k[:, 2], k[:, 1], -k[:, 0]
    kx = kx - kx.transpose(1, 2)
    turn = torch.eye(3, dtype=torch.float64) + sin[:, None, None] * kx \
        + (1 - cos)[:, None, None] * (kx @ kx)                           # Rodrigues
    rot = turn.transpose(1, 2) @ cam.euler_to_rotation(a)
    return cam.rotation_to_euler(rot).numpy()


def compare_video(synth_root: str, prepared_root: str, name: str, oracle: bool = False,
                  fit_steps: int = 100) -> dict:
    """Per-frame errors of one prepared video against its synthetic ground truth (``oracle``:
    also fit the exact landmarks; see the module docstring)."""
    from pyface.data.prepare import crop_image, to_crop
    from pyface.face.procedural import EXP_NAMES

    g = fmt.scan_video(synth_root, name)
    p = fmt.scan_video(prepared_root, name)
    meta = json.load(open(os.path.join(prepared_root, name, fmt.META)))
    src = np.asarray(meta["source_frames"], np.int64)
    boxes = np.asarray(meta["crop_boxes"], np.float64)
    r = meta["resolution"][0]
    gc = fmt.load_coeffs(synth_root, g)[src]
    pc = fmt.load_coeffs(prepared_root, p)
    src_size = fmt.read_frame(synth_root, g, 0).shape[1::-1]             # (W, H)
    gs = np.degrees(gc[:, 224:227])                                      # source camera
    ga = np.degrees(crop_view_angles(gc[:, 224:227], boxes, src_size))   # the crop's camera
    pa = np.degrees(pc[:, 224:227])
    out = {"name": name, "frames": int(len(src)), "source_frames": int(g.num_frames),
           "pitch_err_deg": np.abs(pa[:, 0] - ga[:, 0]).tolist(),
           "yaw_err_deg": np.abs(pa[:, 1] - ga[:, 1]).tolist(),
           "pitch_err_deg_source": np.abs(pa[:, 0] - gs[:, 0]).tolist(),
           "yaw_err_deg_source": np.abs(pa[:, 1] - gs[:, 1]).tolist()}
    glm = to_crop(fmt.load_landmarks(synth_root, g)[src], boxes, r)
    plm = fmt.load_landmarks(prepared_root, p)
    err = np.linalg.norm(plm - glm, axis=-1)                               # (T, 68)
    out["landmark_err_px"] = err.mean(1).tolist()
    out["landmark_err_px_inner51"] = err[:, 17:].mean(1).tolist()
    out["landmark_err_px_eyes_mouth"] = err[:, 36:].mean(1).tolist()
    out["landmark_offset_px"] = (plm - glm).astype(np.float64).tolist()    # (T, 68, 2)
    mesh_file = os.path.join(prepared_root, name, "mesh.npy")
    if os.path.isfile(mesh_file):
        static = mesh_to_68(np.load(mesh_file), contour="static")[:, :17]
        out["jaw_static_err_px"] = np.linalg.norm(static - glm[:, :17], axis=-1).mean(1).tolist()
    out["landmark_err_px_by_group"] = {k: float(err[:, list(v)].mean()) for k, v in GROUPS.items()}
    clm = to_crop(convention_landmarks(gc, fmt.read_frame(synth_root, g, 0).shape[1::-1]), boxes, r)
    cerr = np.linalg.norm(plm - clm, axis=-1)                              # (T, 68)
    out["landmark_err_px_convention"] = cerr.mean(1).tolist()
    out["landmark_err_px_convention_inner51"] = cerr[:, 17:].mean(1).tolist()
    out["landmark_err_px_convention_by_group"] = {k: float(cerr[:, list(v)].mean())
                                                  for k, v in GROUPS.items()}
    out["landmark_offset_px_convention"] = (plm - clm).astype(np.float64).tolist()
    fit_file = os.path.join(prepared_root, name, "landmarks_fit.npy")
    if os.path.isfile(fit_file):        # the fitted model's own landmarks (its landmark vertices)
        flm = np.load(fit_file)
        for tag, truth in (("", glm), ("_convention", clm)):
            ferr = np.linalg.norm(flm - truth, axis=-1)                    # (T, 68)
            out[f"landmark_fit_err_px{tag}"] = ferr.mean(1).tolist()
            out[f"landmark_fit_err_px{tag}_eyes_mouth"] = ferr[:, 36:].mean(1).tolist()
            out[f"landmark_fit_err_px{tag}_by_group"] = {k: float(ferr[:, list(v)].mean())
                                                          for k, v in GROUPS.items()}
    ious = []
    for k, i in enumerate(src):
        gm = fmt.read_mask(synth_root, g, int(i))
        gm3 = np.repeat(gm[..., None], 3, -1)
        gcrop, valid = crop_image(gm3, boxes[k], r)
        gmask = gcrop[..., 0] > 127
        pm = fmt.read_mask(prepared_root, p, k) > 127
        inter = (gmask & pm & valid).sum()
        union = ((gmask | pm) & valid).sum()
        ious.append(float(inter / max(union, 1)))
    out["mask_iou"] = ious
    idx = {n: i for i, n in enumerate(EXP_NAMES)}
    corr, series = {}, {}
    for key, names in (("jaw", ["jaw_open"]), ("smile", ["smile"]),
                       ("blink", ["blink_left", "blink_right"])):
        ge = gc[:, [80 + idx[n] for n in names]].mean(1)
        pe = pc[:, [80 + idx[n] for n in names]].mean(1)
        corr[key] = float(np.corrcoef(ge, pe)[0, 1]) if ge.std() > 1e-6 and pe.std() > 1e-6 else None
        series[key] = {"true": ge.astype(np.float64).tolist(), "fit": pe.astype(np.float64).tolist()}
    out["exp_corr"] = corr
    out["exp_series"] = series
    if oracle:
        import torch

        from pyface.data.prepare import runs
        from pyface.face import MorphableModel
        from pyface.face.fit import FitConfig, fit_landmarks

        for tag, cfg in (("oracle", FitConfig(steps=fit_steps)),):
            res = fit_landmarks(MorphableModel.builtin(), torch.from_numpy(glm), r,
                                segments=torch.from_numpy(runs(src)), config=cfg)
            oa = np.degrees(res.coeffs.numpy()[:, 224:227])
            out[f"{tag}_pitch_err_deg"] = np.abs(oa[:, 0] - ga[:, 0]).tolist()
            out[f"{tag}_yaw_err_deg"] = np.abs(oa[:, 1] - ga[:, 1]).tolist()
            out[f"{tag}_residual_px"] = res.residual.numpy().tolist()
    out["pitch_signed_median_deg"] = float(np.median(pa[:, 0] - ga[:, 0]))
    out["yaw_signed_median_deg"] = float(np.median(pa[:, 1] - ga[:, 1]))
    out["photometric_rms"] = [x for x in meta.get("photometric_rms", []) if x is not None]
    return out


def error_causes(offsets: list[np.ndarray]) -> dict:
    """Splits landmark offsets (prepared minus truth), one ``(T_v, 68, 2)`` array per video, into
    three parts per point: the mean offset over the whole set (a difference of definition
    between the detector's points and the truth's), each video's mean offset minus it (a
    placement that depends on the face: identity, pose range) and each frame's offset minus its
    video's mean (noise and motion). Returns, per landmark group and ``"all"``, the mean length
    in pixels of each part (``"definition"``, ``"per_video"``, ``"per_frame"``) and of the
    whole offset (``"total"``)."""
    cat = np.concatenate(offsets)                                          # (N, 68, 2)
    glob = cat.mean(0)                                                     # (68, 2)
    vid = np.concatenate([np.broadcast_to(o.mean(0) - glob, o.shape) for o in offsets])
    frame = np.concatenate([o - o.mean(0) for o in offsets])
    parts = {"definition": np.broadcast_to(glob, cat.shape), "per_video": vid,
             "per_frame": frame, "total": cat}
    out = {}
    for g, idx in {**{k: list(v) for k, v in GROUPS.items()}, "all": list(range(68))}.items():
        out[g] = {k: round(float(np.linalg.norm(x[:, idx], axis=-1).mean()), 2)
                  for k, x in parts.items()}
    return out


def summarize(per_video: list[dict]) -> dict:
    cat = lambda k: np.concatenate([np.asarray(v[k], np.float64) for v in per_video])
    groups = {k: float(np.mean([v["landmark_err_px_by_group"][k] for v in per_video]))
              for k in GROUPS}
    corr = {}
    for k in ("jaw", "smile", "blink"):
        vals = [v["exp_corr"][k] for v in per_video if v["exp_corr"][k] is not None]
        corr[k] = float(np.mean(vals)) if vals else None
    pooled = {}
    if all("exp_series" in v for v in per_video):
        for k in ("jaw", "smile", "blink"):
            gt = np.concatenate([v["exp_series"][k]["true"] for v in per_video])
            fit = np.concatenate([v["exp_series"][k]["fit"] for v in per_video])
            ok = gt.std() > 1e-6 and fit.std() > 1e-6
            pooled[k] = {"corr": float(np.corrcoef(gt, fit)[0, 1]) if ok else None,
                         "slope": float(np.polyfit(gt, fit, 1)[0]) if ok else None,
                         "true_std_within_video_median": float(np.median(
                             [np.std(v["exp_series"][k]["true"]) for v in per_video]))}
    off = np.concatenate([np.asarray(v["landmark_offset_px"], np.float64) for v in per_video])
    resid = np.linalg.norm(off - off.mean(0), axis=-1).mean(1)               # (frames,)
    coff = np.concatenate([np.asarray(v["landmark_offset_px_convention"], np.float64)
                           for v in per_video])
    cresid = np.linalg.norm(coff - coff.mean(0), axis=-1).mean(1)
    extra = {}
    if all("jaw_static_err_px" in v for v in per_video):
        extra["jaw_static_err_px_mean"] = float(np.mean(cat("jaw_static_err_px")))
    for tag in ("oracle",):
        if all(f"{tag}_yaw_err_deg" in v for v in per_video):
            extra[tag] = {"yaw_err_deg_median": float(np.median(cat(f"{tag}_yaw_err_deg"))),
                          "pitch_err_deg_median": float(np.median(cat(f"{tag}_pitch_err_deg"))),
                          "residual_px_median": float(np.median(cat(f"{tag}_residual_px")))}
    for tag in ("", "_convention"):
        if all(f"landmark_fit_err_px{tag}" in v for v in per_video):
            extra[f"landmark_fit_err_px_median{tag}"] = float(np.median(cat(f"landmark_fit_err_px{tag}")))
            extra[f"landmark_fit_err_px_median{tag}_eyes_mouth"] = float(
                np.median(cat(f"landmark_fit_err_px{tag}_eyes_mouth")))
            extra[f"landmark_fit_err_px_mean_by_group{tag}"] = {
                k: float(np.mean([v[f"landmark_fit_err_px{tag}_by_group"][k] for v in per_video]))
                for k in GROUPS}
    extra["landmark_err_px_by_cause"] = error_causes(
        [np.asarray(v["landmark_offset_px"], np.float64) for v in per_video])
    extra["landmark_err_px_by_cause_convention"] = error_causes(
        [np.asarray(v["landmark_offset_px_convention"], np.float64) for v in per_video])
    extra["landmark_mean_offset_px"] = np.round(off.mean(0), 2).tolist()   # (68, 2) x, y
    extra["landmark_mean_offset_px_convention"] = np.round(coff.mean(0), 2).tolist()
    return {"videos": len(per_video), "frames": int(sum(v["frames"] for v in per_video)),
            "source_frames": int(sum(v["source_frames"] for v in per_video)),
            "yaw_err_deg_median": float(np.median(cat("yaw_err_deg"))),
            "pitch_err_deg_median": float(np.median(cat("pitch_err_deg"))),
            "yaw_err_deg_median_source": float(np.median(cat("yaw_err_deg_source"))),
            "pitch_err_deg_median_source": float(np.median(cat("pitch_err_deg_source"))),
            "landmark_err_px_median": float(np.median(cat("landmark_err_px"))),
            "landmark_err_px_median_inner51": float(np.median(cat("landmark_err_px_inner51"))),
            "landmark_err_px_median_eyes_mouth": float(np.median(cat("landmark_err_px_eyes_mouth"))),
            "landmark_err_px_median_offset_removed": float(np.median(resid)),
            "landmark_err_px_mean_by_group": groups,
            "landmark_err_px_median_convention": float(np.median(cat("landmark_err_px_convention"))),
            "landmark_err_px_median_convention_inner51":
                float(np.median(cat("landmark_err_px_convention_inner51"))),
            "landmark_err_px_median_convention_offset_removed": float(np.median(cresid)),
            "landmark_err_px_mean_by_group_convention":
                {k: float(np.mean([v["landmark_err_px_convention_by_group"][k] for v in per_video]))
                 for k in GROUPS}, **extra,
            "pitch_signed_median_deg_by_video": [round(v["pitch_signed_median_deg"], 2) for v in per_video],
            "yaw_signed_median_deg_by_video": [round(v["yaw_signed_median_deg"], 2) for v in per_video],
            "mask_iou_median": float(np.median(cat("mask_iou"))),
            "photometric_rms_median": (float(np.median(cat("photometric_rms")))
                                       if any(v["photometric_rms"] for v in per_video) else None),
            "exp_corr_mean": corr, "exp_pooled": pooled}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyface.data.prepare_quality",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="work folder (synthetic set, mp4s, prepared set)")
    ap.add_argument("--identities", type=int, default=2)
    ap.add_argument("--videos-per-identity", type=int, default=1)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--synth-resolution", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=256, choices=(256, 512))
    ap.add_argument("--crop", default="eg3d", choices=("eg3d", "fomm"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--fit-steps", type=int, default=100)
    ap.add_argument("--no-photometric", action="store_true",
                    help="prepare with the landmark fit alone (e.g. to refit the detections with "
                         "tools/prepare_photometric_sweep.py)")
    ap.add_argument("--oracle", action="store_true",
                    help="also fit the exact landmarks (the fit's own error floor)")
    ap.add_argument("--compare-only", action="store_true",
                    help="compare an existing OUT/prepared again, without preparing")
    a = ap.parse_args(argv)
    from pyface.data.prepare import PrepareConfig, prepare
    from pyface.data.synthetic import SynthConfig, generate

    synth = os.path.join(a.out, "synth")
    prepared = os.path.join(a.out, "prepared")
    if a.compare_only:
        names = [r.name for r in fmt.load_index(prepared)]
        per = [compare_video(synth, prepared, n, a.oracle, a.fit_steps) for n in names]
        summary = summarize(per)
        for v in per:
            v.pop("landmark_offset_px", None)
            v.pop("landmark_offset_px_convention", None)
        old = os.path.join(a.out, "quality.json")
        if os.path.isfile(old):             # keep the timing of the run that prepared the set
            prev = json.load(open(old))["summary"]
            summary.update({k: prev[k] for k in ("prepare_seconds", "prepare_fps", "timing_s",
                                                 "load_average", "jitter_px") if k in prev})
            summary["prepared_with"] = prev.get("prepared_with", prev.get("args"))
        summary.update({"args": vars(a), "cpu_count": os.cpu_count()})
        fmt._dump(old, {"summary": summary, "videos": per})
        print(json.dumps(summary, indent=1))
        return 0
    if not os.path.isfile(os.path.join(synth, fmt.INDEX)):
        generate(synth, SynthConfig(identities=a.identities, videos_per_identity=a.videos_per_identity,
                                    frames=a.frames, resolution=a.synth_resolution, seed=a.seed,
                                    cross=False, workers=a.workers), progress=False)
    videos = synth_to_mp4(synth, os.path.join(a.out, "mp4"))
    t0 = time.perf_counter()
    s = prepare(videos, PrepareConfig(out=prepared, crop=a.crop, resolution=a.resolution,
                                      workers=a.workers, fit_steps=a.fit_steps, progress=False,
                                      photometric=not a.no_photometric))
    seconds = time.perf_counter() - t0
    per = [compare_video(synth, prepared, r["name"], a.oracle, a.fit_steps) for r in s["results"]]
    summary = summarize(per)
    for v in per:                       # per-point offsets only feed the summary's diagnostic
        v.pop("landmark_offset_px", None)
        v.pop("landmark_offset_px_convention", None)
    summary.update({"prepare_seconds": round(seconds, 2),
                    "prepare_fps": round(summary["frames"] / seconds, 2),
                    "timing_s": {k: round(sum(r["timing_s"].get(k, 0.0) for r in s["results"]), 2)
                                 for k in s["results"][0]["timing_s"]},
                    "load_average": os.getloadavg()[0],
                    "jitter_px": {k: float(np.mean([r["jitter_px"][k] for r in s["results"]]))
                                  for k in ("before", "after")},
                    "args": vars(a), "cpu_count": os.cpu_count()})
    fmt._dump(os.path.join(a.out, "quality.json"), {"summary": summary, "videos": per})
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
