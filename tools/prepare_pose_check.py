"""How well ``pyface data prepare``'s output carries the head's relative rotation between two
frames of a video, the pose half of the ``moving`` rule (:mod:`pyface.data.reenactment`).

On a quality folder written by ``python -m pyface.data.prepare_quality --out DIR`` (the
synthetic ground truth in ``DIR/synth``, the prepared set in ``DIR/prepared``; the prepared
frames keep their source index in ``meta.json["source_frames"]``), for every pair of frames of
the same video it compares the angle of the relative rotation

* ``coeffs``: from the fitted Deep3DFaceRecon angles (``coeffs[224:227]``,
  :func:`pyface.data.reenactment.pose_difference_deg`, what the rule uses);
* ``cameras``: from the prepared cameras (the cam2world rotations of the 25-number EG3D labels
  in ``dataset.json``);

and, with ``--refit``, two refits that tell where a shrunk rotation comes from:

* ``landmark_fit``: the landmark fit alone (:func:`pyface.face.fit.fit_landmarks`, default
  settings, no photometric refinement) on the detector's points (``mesh.npy``, static jaw
  contour, as ``prepare`` fits them);
* ``oracle``: the same fit on the generator's exact 68 landmarks in the crop (the head's own
  landmark vertices; the fit's own floor);

with the ground truth's: its coefficients (the source camera; the moving rule's truth), its
cameras (the synthetic labels), and its angles seen from each crop's camera
(:func:`pyface.data.prepare_quality.crop_view_angles`, what a prepared label describes). Per
estimate: the least-squares slope through 0 of estimated on true angle, the median absolute
error, the median signed error per bin of true angle (0-5, 5-10, 10-20, >= 20 deg), and the
confusion of the pose half at :data:`~pyface.data.reenactment.MOVING_POSE_DEG` against the
ground truth's pose flag (TP/FP/FN/TN), over all same-video pairs and over the evaluation's
pairs (source = first frame, :class:`~pyface.data.reenactment.ReenactmentPairs`); and per
axis (pitch, yaw, roll) the slope through 0 of the estimate's Euler-angle difference on the
ground truth's (coefficients), which tells which rotation is shrunk.

    python -m pyface.data.prepare_quality --out DIR --identities 4 --frames 48 --workers 2
    python tools/prepare_pose_check.py DIR [--json OUT]
"""
import argparse
import json
import os

import numpy as np

BINS = ((0.0, 5.0), (5.0, 10.0), (10.0, 20.0), (20.0, 180.0))


def rot_angle_deg(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """Angle of ``ra^T rb`` (degrees) for rotations ``(..., 3, 3)``."""
    tr = np.einsum("...ij,...ij->...", ra, rb)
    return np.degrees(np.arccos(np.clip((tr - 1) / 2, -1.0, 1.0)))


def label_rotations(root: str, rec) -> np.ndarray:
    """cam2world rotations ``(T, 3, 3)`` of a video's EG3D labels."""
    from pyface.data import format as fmt

    lab = np.asarray(fmt.load_labels(root, rec), np.float64)
    return lab[:, :16].reshape(-1, 4, 4)[:, :3, :3]


def video_angles(pq: str, name: str, refit: bool = False) -> dict:
    """Per-frame rotations ``(T, 3, 3)`` of one prepared video and of its ground truth."""
    from pyface.data import format as fmt
    from pyface.data.prepare_quality import crop_view_angles
    from pyface.data.reenactment import _rotation

    synth, prepared = os.path.join(pq, "synth"), os.path.join(pq, "prepared")
    g = fmt.scan_video(synth, name)
    p = fmt.scan_video(prepared, name)
    meta = json.load(open(os.path.join(prepared, name, fmt.META)))
    src = np.asarray(meta["source_frames"], np.int64)
    boxes = np.asarray(meta["crop_boxes"], np.float64)
    gc = fmt.load_coeffs(synth, g)[src].astype(np.float64)
    pc = fmt.load_coeffs(prepared, p).astype(np.float64)
    size = fmt.read_frame(synth, g, 0).shape[1::-1]
    out = {}
    if refit:
        import torch

        from pyface.data.landmarks import mesh_to_68
        from pyface.data.prepare import fit_model, runs, to_crop
        from pyface.face import MorphableModel
        from pyface.face.fit import fit_landmarks

        r = meta["resolution"][0]
        seg = torch.from_numpy(runs(src))
        glm = to_crop(fmt.load_landmarks(synth, g)[src], boxes, r)
        res = fit_landmarks(MorphableModel.builtin(), torch.from_numpy(glm), r, segments=seg)
        out["oracle"] = _rotation(res.coeffs.numpy().astype(np.float64)[:, 224:227])
        det = mesh_to_68(np.load(os.path.join(prepared, name, "mesh.npy")), contour="static")
        model, index = fit_model()
        res = fit_landmarks(model, torch.from_numpy(np.ascontiguousarray(det)), r, segments=seg,
                            landmark_index=index)
        out["landmark_fit"] = _rotation(res.coeffs.numpy().astype(np.float64)[:, 224:227])
    return out | {"true_coeffs": _rotation(gc[:, 224:227]),
            "true_cameras": label_rotations(synth, g)[src],
            "true_crop": _rotation(crop_view_angles(gc[:, 224:227], boxes, size)),
            "coeffs": _rotation(pc[:, 224:227]),
            "cameras": label_rotations(prepared, p)}


def axis_slopes(est: np.ndarray, true: np.ndarray) -> dict:
    """Per-axis slope through 0 of Euler-angle differences ``(N, 3)`` (pitch, yaw, roll)."""
    return {k: float((est[:, n] * true[:, n]).sum() / max((true[:, n] ** 2).sum(), 1e-12))
            for n, k in enumerate(("pitch", "yaw", "roll"))}


def stats(est: np.ndarray, true: np.ndarray, thr: float) -> dict:
    err = est - true
    out = {"pairs": int(len(true)),
           "slope": float((est * true).sum() / max((true * true).sum(), 1e-12)),
           "median_abs_err_deg": float(np.median(np.abs(err))),
           "bins": {}}
    for lo, hi in BINS:
        m = (true >= lo) & (true < hi)
        if m.any():
            out["bins"][f"{lo:g}-{hi:g}"] = {
                "pairs": int(m.sum()), "median_err_deg": float(np.median(err[m])),
                "median_abs_err_deg": float(np.median(np.abs(err[m]))),
                "median_ratio": float(np.median(est[m] / np.maximum(true[m], 1e-9)))}
    f, t = est >= thr, true >= thr
    out["confusion"] = {"TP": int((f & t).sum()), "FP": int((f & ~t).sum()),
                        "FN": int((~f & t).sum()), "TN": int((~f & ~t).sum())}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pq", help="a prepare_quality folder (synth/ and prepared/)")
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--refit", action="store_true",
                    help="also refit: the landmark fit alone on the detector's points, and on "
                         "the exact ones")
    a = ap.parse_args(argv)
    from pyface.data import format as fmt
    import torch

    from pyface.data.reenactment import MOVING_POSE_DEG
    from pyface.face.cameras import rotation_to_euler

    ests = ("coeffs", "cameras") + (("landmark_fit", "oracle") if a.refit else ())
    truths = ("true_coeffs", "true_cameras", "true_crop")
    keys = ests + truths
    allp = {k: [] for k in keys}
    evalp = {k: [] for k in keys}
    eul = {k: [] for k in keys}
    for rec in fmt.load_index(os.path.join(a.pq, "prepared")):
        rots = video_angles(a.pq, rec.name, a.refit)
        i, j = np.triu_indices(len(rots["coeffs"]), 1)
        for k in keys:
            ang = rot_angle_deg(rots[k][i], rots[k][j])
            allp[k].append(ang)
            evalp[k].append(ang[i == 0])
            e = rotation_to_euler(torch.from_numpy(rots[k])).numpy()
            eul[k].append(np.degrees(e[j] - e[i]))
    report = {"pose_deg": MOVING_POSE_DEG}
    for tag, d in (("all_pairs", allp), ("eval_pairs", evalp)):
        d = {k: np.concatenate(v) for k, v in d.items()}
        report[tag] = {
            "true_cameras_vs_true_coeffs_max_abs_deg":
                float(np.abs(d["true_cameras"] - d["true_coeffs"]).max()),
            "cameras_vs_coeffs_max_abs_deg": float(np.abs(d["cameras"] - d["coeffs"]).max())}
        for e in ests:
            for t in truths:
                report[tag][f"{e}_vs_{t}"] = stats(d[e], d[t], MOVING_POSE_DEG)
        report[tag]["true_crop_vs_true_coeffs"] = stats(d["true_crop"], d["true_coeffs"],
                                                        MOVING_POSE_DEG)
    eul = {k: np.concatenate(v) for k, v in eul.items()}
    report["all_pairs"]["axis_slope_vs_true_coeffs"] = {
        e: axis_slopes(eul[e], eul["true_coeffs"]) for e in ests if e != "cameras"}
    report["all_pairs"]["true_axis_diff_std_deg"] = dict(zip(
        ("pitch", "yaw", "roll"), np.std(eul["true_coeffs"], 0).tolist()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
