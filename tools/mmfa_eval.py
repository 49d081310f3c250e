"""MMFA's held-out checks (docs/models/mmfa-measured.md, "Measured"): reenactment PSNR against
copy-source and the model-specific keypoint, expression and mouth-region checks.

    python tools/mmfa_eval.py --checkpoint RUN --data HELDOUT [--json OUT.json] [--max-pairs N] [--protocols same,cross]
    python tools/mmfa_eval.py --vae VAE_RUN --data HELDOUT [--json OUT.json]

* same-identity PSNR (whole image and face mask) on the ``moving`` pairs of
  ``pyface.data.reenactment_pairs`` (images in [0, 1] rounded to 8 bits, per-pair PSNR
  averaged), for the model and for copy-source; the same for the cross-identity protocol (the
  pipeline's ``cross_identity=True``: the source's scale and translation; what ``pyface eval``
  runs, :meth:`MMFAPipeline.protocol_controls`), and, as ``model_driving_st`` /
  ``margin_driving_st``, with no controls (the driving frame's scale and translation);
* keypoints on the driving frames: equivariance error (mean |x(D) - T(x(T D))| of the posed 2D
  keypoints under a random affine + TPS warp, sigmas of the training config), mean pairwise
  distance of the posed keypoints (collapse check), mean |x_c(S) - x_c(D)| of the canonical
  keypoints, and cos(f_exp(D), f_exp(T D));
* landmarks: the dense motion's landmark error (:func:`pyface.models.mmfa.model.
  landmark_flow_loss` with unit weights, in pixels, L1 over x and y): the depth-averaged flow at
  the driving frame's 68 landmarks against the source's landmarks, on all 68 and on the mouth
  (48-67), for the model, the model with the source's expression, and no motion (identity);
* expression: mouth-box PSNR (the box of landmarks 48-67, 4 px margin) of the output with the
  driving expression against the output with the source's expression (``expression="source"``),
  on the same-identity pairs whose expression coefficients differ by more than 0.25; the same
  (``jaw_*``) on those of them whose inner-lip opening (landmarks 62-66) changes by more than
  ``JAW_PX`` = 1 px (the issue's "where the jaw changes").
* ``--vae RUN`` (an ``mmfa_vae`` run) instead: on the expression features of every held-out
  frame, the VAE's reconstruction cosine (z = mu), active latent dimensions
  (Var(mu) > 0.01), mean KL in nats, a 9-step interpolation between the two frames of most
  different features (largest step of delta over the mean step; endpoint error of delta relative
  to the endpoints' distance), and the fraction of prior-sample components inside the data's
  per-dimension 5-95 % range.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

import pyface.models
from pyface.data.reenactment import MOVING_EXP_L2, expression_difference, reenactment_pairs
from pyface.models.mmfa.model import landmark_flow_loss
from pyface.models.mmfa.motion import pose_keypoints
from pyface.nn.augment import RandomAffineTPS

#: the mouth check's jaw subset: the inner-lip opening (landmarks 62-66) changes by more than
#: this many pixels between source and target
JAW_PX = 1.0


def to01(img: torch.Tensor) -> torch.Tensor:
    """(.., 3, H, W) in [-1, 1] -> [0, 1] rounded to 8 bits (float64)."""
    return ((img.double().clamp(-1, 1) + 1) * 127.5).round() / 255.0


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """a, b (3, H, W) in [0, 1]; mask (1, H, W) or None."""
    d = (a - b).square()
    if mask is not None:
        m = (mask > 0.5).expand_as(d)
        if m.sum() == 0:
            return float("nan")
        mse = d[m].mean()
    else:
        mse = d.mean()
    return float(10 * torch.log10(1.0 / mse.clamp_min(1e-10)))


def frame(item: dict, key: str, device) -> dict:
    f = item[key]
    return {k: v.to(device) for k, v in f.items() if k in ("image", "coeffs", "landmarks")}


@torch.no_grad()
def keypoint_parts(model, image: torch.Tensor, rotation: torch.Tensor) -> dict:
    kc = model.kp_detector(image)["value"]
    mo = model.motion_of(image)
    delta = model.exp_decoder(mo["f_exp"], kc)
    return {"kc": kc, "f": mo["f_exp"],
            "kp": pose_keypoints(kc, rotation, mo["scale"], mo["translation"], delta)}


def mouth_box(landmarks: torch.Tensor, size: int, margin: int = 4):
    pts = landmarks[48:68]
    x0, y0 = (pts.min(0).values - margin).clamp(0, size - 1).long().tolist()
    x1, y1 = (pts.max(0).values + margin).clamp(1, size).long().tolist()
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


@torch.no_grad()
def frame_features(pipe, folder: str):
    """f_exp (N, exp_dim) and canonical keypoints (N, K, 3) of every frame of ``folder``, in
    batches of 64 through the pipeline's input preparation."""
    from pyface.data.datasets import FrameDataset

    net = pipe.net
    frames = FrameDataset(folder, pipe.resolution)
    fs, ks = [], []
    for s in range(0, len(frames), 64):
        img = torch.stack([frames[i]["image"] for i in range(s, min(s + 64, len(frames)))])
        img = pipe.prepare({"image": img}, batched=True, name="frames")["image"]
        fs.append(net.exp_encoder(img))
        ks.append(net.kp_detector(img)["value"])
    return torch.cat(fs), torch.cat(ks)


@torch.no_grad()
def vae_checks(run: str, data: str, device) -> dict:
    from pyface.nn.vae import active_dims

    pipe = pyface.models.load("mmfa_vae", run, device=device)
    net, vae = pipe.net, pipe.model.vae
    f, kc = frame_features(pipe, data)
    mu, logvar = vae.encode(f)
    rec = vae.decode(mu)
    out = {"frames": int(f.shape[0]),
           "rec_cos": float(F.cosine_similarity(rec, f, dim=1).mean()),
           "active_dims": active_dims(mu), "latent": int(mu.shape[1]),
           "kl_nats": float(vae.kl(mu, logvar))}
    # interpolation between the two most different features (of one identity's first frame)
    d = torch.cdist(f, f)
    i, j = divmod(int(d.argmax()), d.shape[1])
    path = pipe.interpolate_expression(f[i], f[j], torch.linspace(0, 1, 9))
    delta = net.exp_decoder(path, kc[i:i + 1].expand(9, -1, -1))
    steps = (delta[1:] - delta[:-1]).flatten(1).norm(dim=1)
    ends = net.exp_decoder(torch.stack([f[i], f[j]]), kc[i:i + 1].expand(2, -1, -1))
    span = (ends[1] - ends[0]).norm()
    out["interp_max_over_mean_step"] = float(steps.max() / steps.mean())
    out["interp_endpoint_error"] = float(torch.stack([(delta[0] - ends[0]).norm(),
                                                      (delta[-1] - ends[1]).norm()]).max() / span)
    g = torch.Generator(device=f.device).manual_seed(0)
    samples = pipe.sample_expression(1000, g)
    lo, hi = torch.quantile(f, 0.05, dim=0), torch.quantile(f, 0.95, dim=0)
    out["prior_in_5_95"] = float(((samples >= lo) & (samples <= hi)).float().mean())
    return out


@torch.no_grad()
def emit_report(report: dict, path: str | None) -> None:
    """Print ``report`` as JSON and, when ``path`` is given, write it there too (every MMFA tool's
    output)."""
    print(json.dumps(report, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--vae", default=None, help="an mmfa_vae run: the VAE checks only")
    ap.add_argument("--data", required=True)
    ap.add_argument("--json", default=None)
    ap.add_argument("--max-pairs", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--protocols", default="same,cross",
                    help="comma-separated: same, cross (a folder without cross/: same)")
    args = ap.parse_args(argv)
    if args.vae:
        report = vae_checks(args.vae, args.data, args.device)
        emit_report(report, args.json)
        return 0
    if not args.checkpoint:
        ap.error("--checkpoint or --vae is required")

    pipe = pyface.models.load("mmfa", args.checkpoint, device=args.device)
    model, dev, R = pipe.model, pipe.device, pipe.resolution
    report = {"checkpoint": args.checkpoint, "data": args.data, "resolution": R}
    gen = torch.Generator().manual_seed(args.seed)
    aug = RandomAffineTPS(model.cfg.sigma_affine, model.cfg.sigma_tps)
    t_model = 0.0
    n_frames = 0
    kp_stats = {"equivariance": [], "pairwise": [], "canonical": [], "exp_cos": []}
    mouth = {"driving": [], "source": [], "jaw": []}
    lm_err = {f"{w}_{p}": [] for w in ("model", "source_expression", "identity")
              for p in ("all", "mouth")}
    part_w = {"all": torch.ones(68, device=dev), "mouth": torch.zeros(68, device=dev)}
    part_w["mouth"][48:68] = 1
    protocols = [p for p in args.protocols.split(",") if p]
    if not protocols or any(p not in ("same", "cross") for p in protocols):
        ap.error(f"--protocols: expected a comma-separated subset of same,cross, got "
                 f"{args.protocols!r}")
    for protocol in protocols:
        ds = reenactment_pairs(args.data, resolution=R, protocol=protocol, subset="moving")
        n = len(ds) if args.max_pairs is None else min(len(ds), args.max_pairs)
        idx = np.linspace(0, len(ds) - 1, n).round().astype(int) if n < len(ds) else range(n)
        rows = {"model": [], "model_face": [], "copy": [], "copy_face": []}
        if protocol == "cross":
            rows.update(model_driving_st=[], model_driving_st_face=[])
        cache = {}
        for i in idx:
            item = ds[int(i)]
            src, drv = frame(item, "source", dev), frame(item, "driving", dev)
            key = (int(item["source"]["video"]) if torch.is_tensor(item["source"]["video"])
                   else str(item["source"]["video"]), int(item["source"]["frame"]))
            if key not in cache:
                cache = {key: pipe.encode_source(src)}
            state = cache[key]
            d1 = {k: v[None] for k, v in drv.items()}
            t0 = time.perf_counter()
            motion = pipe.encode_driving(d1)
            out = pipe.generate(state, motion, cross_identity=protocol == "cross")
            t_model += time.perf_counter() - t0
            n_frames += 1
            tgt = to01(item["target"]["image"].float().to(dev) / 127.5 - 1)
            mask = item["target"].get("mask")
            pred = to01(out[0])
            cpy = to01(pipe.prepare(src, batched=False)["image"])
            rows["model"].append(psnr(pred, tgt))
            rows["copy"].append(psnr(cpy, tgt))
            if mask is not None:
                rows["model_face"].append(psnr(pred, tgt, mask.to(dev)))
                rows["copy_face"].append(psnr(cpy, tgt, mask.to(dev)))
            if protocol != "same":
                # no controls: the driving frame's scale and translation
                plain = to01(pipe.generate(state, motion)[0])
                rows["model_driving_st"].append(psnr(plain, tgt))
                if mask is not None:
                    rows["model_driving_st_face"].append(psnr(plain, tgt, mask.to(dev)))
                continue
            # keypoint checks on the driving frame (and the source's canonical keypoints)
            img = pipe.prepare(d1, batched=True, name="driving")["image"]
            rot = motion["rotation"] if motion["rotation"] is not None else state["rotation"]
            t = aug.sample(1, generator=gen)
            t = type(t)(t.theta.to(dev), t.control_points.to(dev), t.control_params.to(dev))
            a = keypoint_parts(model, img, rot)
            b = keypoint_parts(model, t.warp_image(img), rot)
            back = t.warp_keypoints(b["kp"])
            kp_stats["equivariance"].append(float((a["kp"][..., :2] - back[..., :2]).abs().mean()))
            kp = a["kp"][0]
            dist = (kp[:, None] - kp[None]).norm(dim=-1)
            K = kp.shape[0]
            kp_stats["pairwise"].append(float(dist.sum() / (K * (K - 1))))
            kp_stats["canonical"].append(float((a["kc"] - state["kp_canonical"]).abs().mean()))
            kp_stats["exp_cos"].append(float(F.cosine_similarity(a["f"], b["f"]).mean()))
            # landmark error of the dense motion
            if "landmarks" in item["source"] and "landmarks" in item["target"]:
                lms = item["source"]["landmarks"][None].float().to(dev)
                lmd = item["target"]["landmarks"][None].float().to(dev)
                kc = state["kp_canonical"]
                for who, f_exp in (("model", motion["f_exp"]), ("source_expression",
                                                                 state["f_exp"])):
                    kp_d = pose_keypoints(kc, rot, motion["scale"], motion["translation"],
                                          model.exp_decoder(f_exp, kc))
                    flow = model.render(state["volume"], state["kp_source"], kp_d,
                                        state["image"], flow=True)["flow"]
                    for p, w in part_w.items():
                        lm_err[f"{who}_{p}"].append(
                            float(landmark_flow_loss(flow, lms, lmd, R, w)) * R / 2)
                lin = torch.linspace(-1, 1, flow.shape[1], device=dev)
                ident = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1)[None]
                for p, w in part_w.items():
                    lm_err[f"identity_{p}"].append(
                        float(landmark_flow_loss(ident, lms, lmd, R, w)) * R / 2)
            # mouth region: the driving expression vs the source's
            ed = expression_difference(item["source"]["coeffs"].numpy(),
                                       item["target"]["coeffs"].numpy())
            if ed > MOVING_EXP_L2 and "landmarks" in item["target"]:
                x0, y0, x1, y1 = mouth_box(item["target"]["landmarks"].float(), R)
                crop = (slice(None), slice(y0, y1), slice(x0, x1))
                own = to01(pipe.generate(state, motion, expression="source")[0])
                mouth["driving"].append(psnr(pred[crop], tgt[crop]))
                mouth["source"].append(psnr(own[crop], tgt[crop]))
                lm_s = item["source"]["landmarks"].float()
                lm_t = item["target"]["landmarks"].float()
                mouth["jaw"].append(bool(abs(float((lm_t[66] - lm_t[62]).norm()
                                                   - (lm_s[66] - lm_s[62]).norm())) > JAW_PX))
        report[protocol] = {"pairs": len(rows["model"]),
                            **{k: float(np.nanmean(v)) if v else None for k, v in rows.items()}}
        r = report[protocol]
        r["margin"] = r["model"] - r["copy"]
        if r["model_face"] is not None:
            r["margin_face"] = r["model_face"] - r["copy_face"]
        if r.get("model_driving_st") is not None:
            r["margin_driving_st"] = r["model_driving_st"] - r["copy"]
            if r.get("model_driving_st_face") is not None:
                r["margin_driving_st_face"] = r["model_driving_st_face"] - r["copy_face"]
    report["keypoints"] = {k: float(np.mean(v)) for k, v in kp_stats.items()}
    report["landmark_error_px"] = {k: float(np.mean(v)) for k, v in lm_err.items() if v}
    report["mouth"] = {"pairs": len(mouth["driving"]),
                       "psnr_driving_expression": float(np.mean(mouth["driving"])),
                       "psnr_source_expression": float(np.mean(mouth["source"])),
                       "drop": float(np.mean(mouth["driving"]) - np.mean(mouth["source"]))}
    jaw = np.array(mouth["jaw"], bool)
    if jaw.any():
        d, s_ = np.array(mouth["driving"])[jaw], np.array(mouth["source"])[jaw]
        report["mouth"].update(jaw_pairs=int(jaw.sum()),
                               jaw_psnr_driving_expression=float(d.mean()),
                               jaw_psnr_source_expression=float(s_.mean()),
                               jaw_drop=float(d.mean() - s_.mean()))
    report["fps_per_frame_unbatched"] = n_frames / t_model
    emit_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
