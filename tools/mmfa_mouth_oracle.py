"""Where is MMFA's mouth-region PSNR lost? Oracles on the mouth check's pairs.

    python tools/mmfa_mouth_oracle.py --checkpoint RUN --data HELDOUT [--pairs 60] [--oracle 12] [--json OUT]

On ``--pairs`` pairs spread evenly over those of the mouth check of tools/mmfa_eval.py (same-identity ``moving`` pairs whose
expression coefficients differ by more than ``MOVING_EXP_L2``; mouth box = landmarks 48-67 of
the target, 4 px margin; images rounded to 8 bits), the mouth-box PSNR against the target of:

* ``model`` / ``model_source_expression``: the output with the driving / the source's f_exp
  (the mouth check is their difference);
* ``copy_source``: the source frame itself;
* ``gt_warp``: the source warped by the ground-truth dense correspondence. The synthetic frames'
  ``coeffs`` are exact (``exp_leak`` 0), so the morphable model gives every target pixel's
  surface point and where that point is in the source (the target's mesh is rasterised with the
  source's projected vertex positions as attributes). Background pixels keep their position
  (the background is a static image). No pixel is generated: where the point is hidden in the
  source (``occluded``), the warp still copies whatever the source shows there;
* ``gt_warp_source_expression``: the same warp with the target's pose but the source's
  expression coefficients, i.e. what the mouth check's swap costs a perfect warp;
* ``gt_warp_inpainted``: ``gt_warp`` with the occluded pixels taken from the target (an
  inpainting oracle on top of the perfect warp);
* ``model_gt_warp``: the model's own decoder output and blend mask (``source_blend``), with the
  ground-truth warp in place of the warp by its depth-averaged dense motion;
* ``jaw_changes``: the same means over the pairs whose inner-lip opening (landmarks 62-66)
  changes by more than 1 px;
* ``decoder_share``: the mean of 1 - the blend mask in the mouth box (``source_blend``): how
  much of the output there is the decoder's own colour rather than the warped source;
* ``occluded_fraction``: the share of mouth-box pixels that the source does not show: the
  target's surface point is hidden there (depth test), the target shows background where the
  source shows the head, or the point's triangle has less than a quarter of its target area in
  the source (new surface: the synthetic head's mouth interior, degenerate while the mouth is
  closed, opens with the jaw).

``--oracle N``: for N of the pairs (every pairs / N-th), two delta oracles (the expression
decoder's output replaced by a per-pair optimised delta, everything else fixed; 40 Adam steps,
lr 0.01, from the model's delta):

* ``delta_landmarks``: delta optimised against the dense motion's landmark error (mouth + all
  68, as tools/mmfa_diagnose.py), then rendered;
* ``delta_image``: delta optimised against the output's L1 error in the mouth box: the best this
  decoder, dense motion and K keypoints can do for the mouth by moving the keypoints.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import pyface.models
from pyface.data.reenactment import MOVING_EXP_L2, expression_difference, reenactment_pairs
from pyface.face import cameras as cam
from pyface.face.coeffs import split_coeffs
from pyface.face.morphable import MorphableModel
from pyface.face.render import render_mesh
from pyface.models.mmfa.model import landmark_flow_loss
from pyface.models.mmfa.motion import pose_keypoints
from mmfa_eval import emit_report

OCCLUSION_TOL = 0.01   # EG3D units of camera depth (the head is about 0.5 deep)
STRETCH_RATIO = 0.25   # a target triangle whose source area is below this share is new surface


def to01(img: torch.Tensor) -> torch.Tensor:
    """(.., 3, H, W) in [-1, 1] -> [0, 1] rounded to 8 bits (float64)."""
    return ((img.double().clamp(-1, 1) + 1) * 127.5).round() / 255.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """a, b (3, h, w) in [0, 1]."""
    return float(10 * torch.log10(1.0 / (a - b).square().mean().clamp_min(1e-10)))


def mouth_box(landmarks: torch.Tensor, size: int, margin: int = 4):
    pts = landmarks[48:68]
    x0, y0 = (pts.min(0).values - margin).clamp(0, size - 1).long().tolist()
    x1, y1 = (pts.max(0).values + margin).clamp(1, size).long().tolist()
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def _project(mm: MorphableModel, coeffs: torch.Tensor):
    """coeffs (B, 257) -> uv (B, V, 2) in [0, 1], camera depth (B, V, 1)."""
    c = split_coeffs(coeffs.float())
    world = mm.shape(c["id"], c["exp"]) * cam.BFM_TO_EG3D_SCALE
    return cam.project_label(world, mm.label_of(coeffs))


@torch.no_grad()
def gt_correspondence(mm: MorphableModel, c_source: torch.Tensor, c_target: torch.Tensor,
                      size: int) -> dict:
    """c_source, c_target (1, 257) exact coefficients of two frames of one video -> {"grid"
    (1, size, size, 2): for every target pixel, its position in the source ([-1, 1],
    ``align_corners=False``; background pixels: their own position), "occluded" (1, 1, size,
    size) bool}."""
    uv_s, z_s = _project(mm, c_source)
    uv_t, z_t = _project(mm, c_target)
    src = render_mesh(torch.cat([uv_s * 2 - 1, z_s], -1), mm.faces, size, cull=mm.cull)
    tgt = render_mesh(torch.cat([uv_t * 2 - 1, z_t], -1), mm.faces, size,
                      torch.cat([uv_s * 2 - 1, z_s], -1), cull=mm.cull)
    fg_t = tgt.mask > 0.5                                            # (1, 1, H, W)
    fg_s = src.mask > 0.5
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    ident = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1)[None]   # (1, H, W, 2)
    pos = tgt.attr_image[:, :2].permute(0, 2, 3, 1)
    grid = torch.where(fg_t[:, 0, ..., None], pos, ident)
    # visibility in the source: the point's source depth against the source's depth buffer
    depth_s = torch.where(fg_s, src.depth, torch.full_like(src.depth, 1e4))
    seen = F.grid_sample(depth_s, grid, mode="nearest", padding_mode="border",
                         align_corners=False)
    hidden = fg_t & (tgt.attr_image[:, 2:3] > seen + OCCLUSION_TOL)
    uncovered = ~fg_t & fg_s                                          # background shown now
    # surface that has (almost) no area in the source: the procedural head's mouth interior
    # rows are degenerate while the mouth is closed and open with the jaw
    def area(uv):
        a, b, c = (uv[0, mm.faces[:, k]] * size for k in range(3))
        return 0.5 * ((b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0]).abs()
    ratio = area(uv_s) / area(uv_t).clamp_min(1e-8)                 # (F,)
    fi = tgt.face_index[:, None]                                      # (1, 1, H, W)
    stretched = (fi >= 0) & (ratio[fi.clamp_min(0)] < STRETCH_RATIO)
    return {"grid": grid, "occluded": hidden | uncovered | stretched}


def warp(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """image (1, 3, H, W), grid (1, H, W, 2) ``align_corners=False`` -> (1, 3, H, W)."""
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--pairs", type=int, default=60, help="mouth-check pairs to use")
    ap.add_argument("--oracle", type=int, default=0, help="pairs that also get the delta oracles")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t0 = time.process_time()
    pipe = pyface.models.load("mmfa", args.checkpoint, device="cpu")
    m, R = pipe.model, pipe.resolution
    m.requires_grad_(False)
    mm = MorphableModel.builtin()
    ds = reenactment_pairs(args.data, resolution=R, protocol="same", subset="moving")
    keys = ("model", "model_source_expression", "copy_source", "gt_warp",
            "gt_warp_source_expression", "gt_warp_inpainted", "model_gt_warp")
    rows = {k: [] for k in keys}
    occ, occ_se, opening, painted = [], [], [], []
    oracle = {"model": [], "delta_landmarks": [], "delta_image": [],
              "mouth_lm_before": [], "mouth_lm_after": []}
    # the mouth check's pairs, args.pairs of them spread evenly over the set
    keep = [i for i in range(len(ds)) if expression_difference(
        ds[i]["source"]["coeffs"].numpy(), ds[i]["target"]["coeffs"].numpy()) > MOVING_EXP_L2]
    n = min(len(keep), max(args.pairs, args.oracle))
    for i in [keep[int(j)] for j in np.linspace(0, len(keep) - 1, n).round()]:
        item = ds[i]
        cs, ct = item["source"]["coeffs"], item["target"]["coeffs"]
        with torch.no_grad():
            st = pipe.encode_source({k: v for k, v in item["source"].items()
                                     if k in ("image", "coeffs")})
            mo = pipe.encode_driving({k: v[None] for k, v in item["driving"].items()
                                      if k in ("image", "coeffs")})
            pred = pipe.generate(st, mo)[0]
            own = pipe.generate(st, mo, expression="source")[0]
        tgt = to01(item["target"]["image"].float() / 127.5 - 1)
        x0, y0, x1, y1 = mouth_box(item["target"]["landmarks"].float(), R)
        box = (slice(None), slice(y0, y1), slice(x0, x1))
        src = st["image"]                                             # (1, 3, R, R) [-1, 1]
        gt = gt_correspondence(mm, cs[None].double(), ct[None].double(), R)
        c_se = ct.clone()
        c_se[80:144] = cs[80:144]
        gt_se = gt_correspondence(mm, cs[None].double(), c_se[None].double(), R)
        w_gt = warp(src, gt["grid"])[0]
        w_se = warp(src, gt_se["grid"])[0]
        tgt_pm = item["target"]["image"].float()[None] / 127.5 - 1
        inp = torch.where(gt["occluded"], tgt_pm, w_gt[None])[0]
        # the model's decoder and blend mask with the ground-truth warp
        with torch.no_grad():
            kc, rd = st["kp_canonical"], mo["rotation"] if mo["rotation"] is not None \
                else st["rotation"]
            delta = m.exp_decoder(mo["f_exp"], kc)
            kp_d = pose_keypoints(kc, rd, mo["scale"], mo["translation"], delta)
            dm = m.dense_motion(st["volume"], kp_source=st["kp_source"], kp_driving=kp_d)
            wv = m.dense_motion.warp(st["volume"], kp_source=st["kp_source"], kp_driving=kp_d,
                                     mask=dm["mask"])
            img = m.decoder(wv, dm.get("occlusion_map"))[-1]
            if img.shape[1] == 4:
                blend = m.cfg.blend_cap * (img[:, 3:] + 1) / 2
                mgw = (blend * w_gt[None] + (1 - blend) * img[:, :3])[0]
                painted.append(float(1 - blend[0][box].mean()))
            else:
                mgw = img[0, :3]
        for k, im in (("model", pred), ("model_source_expression", own),
                      ("copy_source", src[0]), ("gt_warp", w_gt),
                      ("gt_warp_source_expression", w_se), ("gt_warp_inpainted", inp),
                      ("model_gt_warp", mgw)):
            rows[k].append(psnr(to01(im)[box], tgt[box]))
        occ.append(float(gt["occluded"][0, 0][box[1:]].float().mean()))
        occ_se.append(float(gt_se["occluded"][0, 0][box[1:]].float().mean()))
        lm_s, lm_t = item["source"]["landmarks"].float(), item["target"]["landmarks"].float()
        opening.append(float(((lm_t[66] - lm_t[62]).norm() - (lm_s[66] - lm_s[62]).norm()).abs()))
        if args.oracle and len(rows["model"]) % max(1, n // args.oracle) == 1 \
                and len(oracle["model"]) < args.oracle:       # every (n / oracle)-th pair
            lms = item["source"]["landmarks"][None].float()
            lmd = item["target"]["landmarks"][None].float()
            wm = torch.zeros(68)
            wm[48:68] = 1
            wa = torch.ones(68)

            def render(d):
                kp = pose_keypoints(kc, rd, mo["scale"], mo["translation"], d)
                return m.render(st["volume"], st["kp_source"], kp, src, flow=True)

            for name in ("delta_landmarks", "delta_image"):
                d = delta.clone().requires_grad_()
                opt = torch.optim.Adam([d], lr=0.01)
                for _ in range(40):
                    opt.zero_grad()
                    out = render(d)
                    if name == "delta_landmarks":
                        loss = (landmark_flow_loss(out["flow"], lms, lmd, R, wm)
                                + landmark_flow_loss(out["flow"], lms, lmd, R, wa))
                    else:
                        loss = (out["images"][-1][0][box] - tgt_pm[0][box]).abs().mean()
                    loss.backward()
                    opt.step()
                with torch.no_grad():
                    out = render(d)
                    oracle[name].append(psnr(to01(out["images"][-1][0].clamp(-1, 1))[box],
                                             tgt[box]))
                    if name == "delta_landmarks":
                        oracle["mouth_lm_after"].append(
                            float(landmark_flow_loss(out["flow"], lms, lmd, R, wm)) * R / 2)
            with torch.no_grad():
                oracle["mouth_lm_before"].append(
                    float(landmark_flow_loss(render(delta)["flow"], lms, lmd, R, wm)) * R / 2)
            oracle["model"].append(rows["model"][-1])
    mean = {k: float(np.mean(v)) for k, v in rows.items()}
    report = {"checkpoint": args.checkpoint, "data": args.data, "pairs": len(rows["model"]),
              "mouth_box_psnr": mean,
              "drop_model": mean["model"] - mean["model_source_expression"],
              "drop_gt_warp": mean["gt_warp"] - mean["gt_warp_source_expression"],
              "occluded_fraction": float(np.mean(occ)),
              "occluded_fraction_source_expression": float(np.mean(occ_se)),
              "decoder_share": float(np.mean(painted)) if painted else None}
    # the pairs where the jaw changes most: the inner-lip opening (landmarks 62-66) changes by
    # more than 1 px between source and target
    big = np.array(opening) > 1.0
    report["jaw_changes"] = {"pairs": int(big.sum()),
                             **{k: float(np.mean(np.array(v)[big])) if big.any() else None
                                for k, v in rows.items()}}
    report["jaw_changes"]["occluded_fraction"] = float(np.mean(np.array(occ)[big])) \
        if big.any() else None
    report["jaw_changes"]["decoder_share"] = float(np.mean(np.array(painted)[big])) \
        if big.any() and painted else None
    report["per_pair"] = {"opening_change_px": opening, "occluded_fraction": occ, **rows}
    if oracle["model"]:
        report["oracle"] = {"pairs": len(oracle["model"]),
                            **{k: float(np.mean(v)) for k, v in oracle.items()}}
    report["cpu_s"] = time.process_time() - t0
    emit_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
