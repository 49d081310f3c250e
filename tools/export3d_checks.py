"""Export3D's model-specific checks (docs/models/export3d.md), on a held-out synthetic split
written with the expression-identity leak (``pyface data synth --split test --exp-leak A``).

    python tools/export3d_checks.py clebs RUN/stages/clebs --data DIR [--frames 8] [--json OUT]
    python tools/export3d_checks.py mouth RUN --data DIR [--no-ema] [--json OUT]
    python tools/export3d_checks.py diagnose RUN --data DIR [--pairs 64] [--no-ema] [--json OUT]
    python tools/export3d_checks.py render-memory [--resolution 128] [--samples 48] [--json OUT]
    python tools/export3d_checks.py lda-oracle --data DIR [--json OUT]
    python tools/export3d_checks.py sensitivity RUN --data DIR [--no-ema] [--json OUT]
    python tools/export3d_checks.py clip-stats --data DIR [--frames 8] [--min-gap 3] [--json OUT]
    python tools/export3d_checks.py step-memory RUN1 [--set KEY=VALUE ...] [--json OUT]
    python tools/export3d_checks.py code-stats RUN1 --data DIR [--json OUT]
    python tools/export3d_checks.py leak RUN --data DIR [--no-ema] [--json OUT]
    python tools/export3d_checks.py mouth-oracle --data DIR [--json OUT]
    python tools/export3d_checks.py invariance RUN1 --data DIR [--json OUT]
    python tools/export3d_checks.py directions RUN1 --data DIR [--json OUT]
    python tools/export3d_checks.py readout RUN1 --data DIR [--frames 8] [--json OUT]
    python tools/export3d_checks.py visibility --data DIR [--json OUT]
    python tools/export3d_checks.py code-gain RUN --data DIR [--json OUT]

``clebs``: same-video retrieval top-1 (image -> expression, N-frame clips of held-out videos;
chance 1/N; cosine of f_I and the run's contrastive key, which is beta' unless the run has
``sim_gain``; ``retrieval_top1_beta_prime`` against beta' itself); a ridge identity probe
trained on each identity's first video and tested on its
second, on the stored (leaky) expression, on beta' and on lambda (chance 1/identities); ridge R^2
from beta' to the true jaw_open / blink_left / smile (the stored coefficients minus the leak).
A run with ``image_crops`` reads the clips' landmarks (``clebs`` and ``readout``); a run at
another resolution than DIR's (``model.resolution``) reads DIR resized, so check a 128^2 run on
a split rendered at 128^2.

``mouth``: same-video pairs (source frame 0) whose true jaw_open differs by more than 0.2: PSNR
of the mouth box (driving landmarks) when generating with the driving expression vs with the
source expression, both at the driving camera, and of copy-source (the source frame itself).

``diagnose``: on ``pairs`` same-identity moving pairs spread over the split, PSNR (whole / face
mask) of copy-source, of the output, of the raw render against the driving frame resized to the
raw resolution, of the source reconstructed (source expression and camera), and of the output
rendered at the source camera; the mean raw opacity; and the ceiling of a raw-resolution image
(the driving frame resized down to the raw resolution and back up, bilinear).

``lda-oracle``: the identity probe and R^2 of ``clebs`` for a linear leak removal fitted on the
stored coefficients of 8 ... 256 training identities (no images): how many identities removing a
48-direction leak needs (:func:`lda_oracle`).

``sensitivity``: how much the driving expression changes the condition, the tri-plane, the raw
image and the image, next to the size of the tri-plane and of the online EMA tri-plane.

``clip-stats``: what same-video contrast can see in N-frame clips (sampled as the ``clips``
dataset does): for jaw_open, blink_left and smile (true values, leak removed), the standard
deviation over all frames, the mean standard deviation within a clip and the standard deviation
of the video means; and a retrieval ceiling: top-1 of matching each frame of a clip to the
clip's true expressions (the animated coefficients, Euclidean) when the query carries Gaussian
noise of std sigma per coefficient (sigma 0: a perfect image encoder).

``step-memory``: peak memory of one ``tiny`` training step (``RUN1``: the stage-1 run) on the
fused ops and on the reference path, as ``python -m pyface.bench.train`` measures it (profiler
allocation events above the resident weights), with the innermost op running at each peak.

``code-stats``: the scale of what the generator's condition MLP sees, on every frame of DIR:
lambda of the CLeBS run ``RUN1`` (mean, std and mean within-video std per coefficient) and, for
``cond=direct``, beta: mean |beta|, mean |beta - its video's mean| and their ratio, raw and
standardised per coefficient.

``leak``: how much the driving identity's expression leak moves the output, next to how much
the expression does: for a source frame of one identity and driving frames of another (every
identity pair of the split, frames 10 / 20 / 30 of the first video), mean |output with the
driving coefficients as stored (the driving identity's leak) - output with the same true
expression plus the source identity's leak|, and mean |output with the driving expression -
output with the source frame's expression| (both with the source identity's leak; images in
[-1, 1]), at the driving camera.

``mouth-oracle``: how visible the expression is in the mouth box of ``mouth``'s pairs (a
synthetic split written by ``pyface data synth``): each driving frame is rendered again by the
synthetic generator with the source frame's true expression (its own identity, texture, pose,
lighting and background), and the mouth box of that is compared with the driving frame's: the
PSNR a perfect model would reach with the source's expression. The same re-render with the
driving frame's own expression checks that the render reproduces the stored frame.

``invariance``: the CLeBS run's video-invariance objective on every frame of every video of DIR
(any pyface root with ``coeffs.npy``, e.g. the stage-1 training set): the per-coefficient sum of
var(video means of lambda_i) / mean within-video var(lambda_i) (``model.invariance=coefficient``)
and the rotation-invariant ratio trace(W^-1 S) (``joint``; S, W the between- and within-video
covariances of lambda).

``directions``: which coefficient carries what: R^2 (least squares with an intercept on every
frame of DIR, no held-out part) of the true jaw_open / blink_left / smile (stored coefficients
minus the leak) from each lambda_i alone and from lambda_1..k, k = 1 .. n.

``readout``: what limits ``clebs``' retrieval, on the same clips: the retrieval ceiling of the
run's own code (top-1 when the query is the true frame's key, beta' or with ``sim_gain`` the
gained code, with Gaussian noise of std sigma added to each lambda_i before the gains, cosine
as in ``clebs``), and how well f_I reads each lambda_i: the
R^2 of the projection of f_I(X) on the basis (what the cosine compares) against lambda_i, over
all frames and within clips (both sides minus their clip mean), and of a ridge map from f_I(X)
to lambda fitted on each identity's first video and tested on its second; and the top-1 of
a perfect reader of some true parameters only (jaw_open; + blinks; + lips; + mouth_stretch,
lip_pucker, jaw_left; all 13 animated), the rest of lambda at its clip mean.

``readout`` also gives two diagnostics that use the whole clip (not the metric, which compares
one frame's f_I with the N keys): top-1 with f_I and the key each centred on their clip's mean
(``top1_clip_centred``), and with f_I's clip mean replaced by the key's
(``top1_at_key_clip_mean``): whether reading the clip's constant part is what limits retrieval.

``visibility``: how much each animated expression parameter changes the image when it moves by
its within-clip standard deviation (synthetic re-render, as ``mouth-oracle``; 3 frames per
video): mean absolute change in grey levels and pixels changed by at least one level.

``code-gain``: how strongly the expression reaches a stage-2 run's condition, on every frame of
DIR: the code e the condition MLP reads, before the basis (the standardised or whitened lambda;
``direct``: beta), and the expression planes' weights w (``expr_planes``); per unit change of the
true jaw_open / blink_left / smile within a video (least squares of the frames' deviations from
their video's mean on the three parameters' deviations), the norm of the change of e and of w;
the spread of e within videos and between video means (root of the summed variances), and the
eigenvalues of e's covariance.

``render-memory``: peak memory and time of one forward + backward of Export3D's raw render
(``full`` sizes: tri-plane 3 x 32 x 256^2, OSGDecoder 32-64-33, corrected axes) at
``resolution``^2 rays with ``samples`` + ``samples`` samples, batch 1, on the fused renderer (the
device's default backend) against the reference path (``pyface.bench.harness.peak_memory_mb``).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from pyface.data.datasets import ClipDataset, FrameDataset
from pyface.data.synthetic import leak_matrix
from pyface.face.procedural import EXP_NAMES
from pyface.models.export3d import CLeBS
from pyface.models.export3d.clebs import expression_of
from pyface.models.export3d.model import landmark_boxes
from pyface.train.model import config_from_dict, load_pretrained


def _true_exp(coeffs: np.ndarray, leak: float) -> np.ndarray:
    """coeffs (T, 257) with the stored (leaky) expression -> the rendered expression (T, 64)."""
    return coeffs[:, 80:144] - leak * coeffs[:, :80] @ leak_matrix().T


def _ridge(x_tr, y_tr, x_te, alpha=1.0):
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    a, b = (x_tr - mu) / sd, (x_te - mu) / sd
    a = np.concatenate([a, np.ones((len(a), 1))], 1)
    b = np.concatenate([b, np.ones((len(b), 1))], 1)
    w = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ y_tr)
    return b @ w


def _landmarks_of(item):
    """the clip's landmarks (1, N, 68, 2) when it has them (``image_crops`` runs need them)."""
    return item["landmarks"][None] if "landmarks" in item else None


def _video_split(ds):
    """identity name and video index per video of a pyface root (names ``<identity>_vNN``)."""
    names = [rec.name for rec in ds.videos]
    ident = [n.rsplit("_v", 1)[0] for n in names]
    vid = [int(n.rsplit("_v", 1)[1]) for n in names]
    return ident, vid


@torch.no_grad()
def clebs_checks(run: str, data: str, frames: int = 8, min_gap: int = 3, clips: int = 20) -> dict:
    cfg, state = load_pretrained(run)
    model = CLeBS(config_from_dict(CLeBS.Config, cfg))
    model.load_state_dict(state)
    model.eval()
    R = model.cfg.resolution
    clip_ds = ClipDataset(data, R, frames=frames, min_gap=min_gap, repeats=clips, seed=1,
                          load_masks=False)
    hits, plain = [], []
    for i in range(len(clip_ds)):
        it = clip_ds[i]
        f_img, key, lam = model.embed(it["image"][None], it["coeffs"][None],
                                      _landmarks_of(it))
        q = torch.nn.functional.normalize(f_img[0], dim=-1)
        k = torch.nn.functional.normalize(key[0], dim=-1)
        hits.append(((q @ k.t()).argmax(-1) == torch.arange(frames)).float().mean().item())
        k = torch.nn.functional.normalize(model.expr.combine(lam[0]), dim=-1)     # beta'
        plain.append(((q @ k.t()).argmax(-1) == torch.arange(frames)).float().mean().item())
    frames_ds = FrameDataset(data, R, load_masks=False)
    meta = json.load(open(os.path.join(data, frames_ds.videos[0].name, "meta.json")))
    leak = float(meta.get("exp_leak", 0.0))
    ident, vid = _video_split(frames_ds)
    ids = sorted(set(ident))
    feats = {"exp_stored": [], "beta_prime": [], "lambda": []}
    labels, videos, true = [], [], []
    for v, c in enumerate(frames_ds.coeffs):
        c = np.asarray(c, np.float32)
        lam, bp = model.expr(expression_of(torch.from_numpy(c)))
        feats["exp_stored"].append(c[:, 80:144])
        feats["beta_prime"].append(bp.numpy())
        feats["lambda"].append(lam.numpy())
        labels += [ids.index(ident[v])] * len(c)
        videos += [vid[v]] * len(c)
        true.append(_true_exp(c, leak))
    labels, videos, true = np.array(labels), np.array(videos), np.concatenate(true)
    tr, te = videos == 0, videos == 1
    onehot = np.eye(len(ids))[labels]
    probe, r2 = {}, {}
    for name, f in feats.items():
        x = np.concatenate(f)
        pred = _ridge(x[tr], onehot[tr], x[te])
        probe[name] = float((pred.argmax(1) == labels[te]).mean())
    xb = np.concatenate(feats["beta_prime"])
    for pname in ("jaw_open", "blink_left", "smile"):
        y = true[:, EXP_NAMES.index(pname)]
        pred = _ridge(xb[tr], y[tr, None], xb[te])[:, 0]
        r2[pname] = float(1 - ((pred - y[te]) ** 2).sum() / ((y[te] - y[te].mean()) ** 2).sum())
    return {"retrieval_top1": float(np.mean(hits)), "retrieval_chance": 1.0 / frames,
            "retrieval_top1_beta_prime": float(np.mean(plain)),
            "sim_gain": (model.sim_log_gain.exp().tolist() if model.cfg.sim_gain else None),
            "clips": len(hits), "frames": frames, "min_gap": min_gap, "identity_probe": probe,
            "identity_chance": 1.0 / len(ids), "exp_leak": leak, "r2_from_beta_prime": r2}


@torch.no_grad()
def readout(run: str, data: str, frames: int = 8, min_gap: int = 3, clips: int = 20,
            sigmas=(0.0, 0.1, 0.2, 0.3, 0.5, 1.0)) -> dict:
    cfg, state = load_pretrained(run)
    model = CLeBS(config_from_dict(CLeBS.Config, cfg))
    model.load_state_dict(state)
    model.eval()
    clip_ds = ClipDataset(data, model.cfg.resolution, frames=frames, min_gap=min_gap,
                          repeats=clips, seed=1, load_masks=False)
    _, vid_no = _video_split(clip_ds)
    V = model.expr.basis.basis()                                          # (d, n)
    gain = model.sim_log_gain.exp() if model.cfg.sim_gain else torch.ones(model.cfg.n)
    g = torch.Generator().manual_seed(0)
    hits = {s: [] for s in sigmas}
    meta = json.load(open(os.path.join(data, clip_ds.videos[0].name, "meta.json")))
    leak = float(meta.get("exp_leak", 0.0))
    proj, lams, feats, second, trues = [], [], [], [], []
    clip_diag = {"centred": [], "key_clip_mean": []}
    for i in range(len(clip_ds)):
        it = clip_ds[i]
        trues.append(torch.from_numpy(_true_exp(it["coeffs"].numpy(), leak)).float())
        f_img, beta_p, lam = model.embed(it["image"][None], it["coeffs"][None],
                                         _landmarks_of(it))
        f_img, lam = f_img[0], lam[0]
        k = torch.nn.functional.normalize(beta_p[0], dim=-1)         # the contrastive key
        # diagnostics (they use the whole clip, unlike the metric): both sides centred on
        # their clip means; f_I moved to the key's clip mean
        fc, kc = f_img - f_img.mean(0), beta_p[0] - beta_p[0].mean(0)
        for name, a, b in (("centred", fc, kc), ("key_clip_mean", fc + beta_p[0].mean(0), k)):
            a = torch.nn.functional.normalize(a, dim=-1)
            b = torch.nn.functional.normalize(b, dim=-1)
            clip_diag[name].append(((a @ b.t()).argmax(-1) == torch.arange(frames)).float()
                                   .mean().item())
        for s in sigmas:
            q = torch.nn.functional.normalize(
                ((lam + s * torch.randn(lam.shape, generator=g)) * gain) @ V.t(), dim=-1)
            hits[s].append(((q @ k.t()).argmax(-1) == torch.arange(frames)).float().mean().item())
        proj.append((f_img @ V).numpy())
        lams.append(lam.numpy())
        feats.append(f_img.numpy())
        second.append(np.full(frames, vid_no[clip_ds.clip_frames(i)[0]] == 1))
    P, L, X = np.stack(proj), np.stack(lams), np.stack(feats)               # (C, N, n / d)
    # a perfect reader of some true parameters: lambda's clip mean plus the least-squares map
    # of the parameters' within-clip deviations to lambda's (fitted on these clips)
    Lt, T = torch.from_numpy(L), torch.stack(trues)
    Lm = Lt.mean(1, keepdim=True)
    keys = torch.nn.functional.normalize((Lt * gain) @ V.t(), dim=-1)
    readers = {"jaw_open": ["jaw_open"], "+blink": ["jaw_open", "blink_left", "blink_right"],
               "+lips": ["jaw_open", "blink_left", "blink_right", "upper_lip_raise",
                         "lower_lip_down"],
               "+stretch,pucker,jaw_left": ["jaw_open", "blink_left", "blink_right",
                                            "upper_lip_raise", "lower_lip_down", "mouth_stretch",
                                            "lip_pucker", "jaw_left"],
               "all animated": [n for j, n in enumerate(EXP_NAMES) if T[..., j].std() > 1e-6]}
    reader_top1 = {}
    for name, params in readers.items():
        idx = [EXP_NAMES.index(p) for p in params]
        dev = T[..., idx] - T[..., idx].mean(1, keepdim=True)
        # SVD least squares in float64: blink_left and blink_right are equal in the synthetic
        # motion, so the system is rank-deficient
        w = torch.linalg.lstsq(dev.flatten(0, 1).double(), (Lt - Lm).flatten(0, 1).double(),
                               driver="gelsd").solution.float()
        q = torch.nn.functional.normalize(((Lm + dev @ w) * gain) @ V.t(), dim=-1)
        reader_top1[name] = float(((q @ keys.transpose(1, 2)).argmax(-1)
                                   == torch.arange(frames)).float().mean())

    def r2(pred, y):                 # per coefficient, the best affine fit of pred to y
        out = []
        for j in range(y.shape[-1]):
            a = np.stack([pred[:, j], np.ones(len(y))], 1)
            w = np.linalg.lstsq(a, y[:, j], rcond=None)[0]
            res, tot = ((a @ w - y[:, j]) ** 2).sum(), ((y[:, j] - y[:, j].mean()) ** 2).sum()
            out.append(float(1 - res / tot))
        return out

    n = L.shape[-1]
    flat = lambda a: a.reshape(-1, a.shape[-1])
    within = lambda a: flat(a - a.mean(1, keepdims=True))
    sec = np.concatenate(second)
    ridge = _ridge(flat(X)[~sec], flat(L)[~sec], flat(X)[sec])
    y = flat(L)[sec]
    ridge_r2 = [float(1 - ((ridge[:, j] - y[:, j]) ** 2).sum()
                      / ((y[:, j] - y[:, j].mean()) ** 2).sum()) for j in range(n)]
    return {"retrieval_ceiling": {str(s): float(np.mean(h)) for s, h in hits.items()},
            "clips": len(clip_ds), "frames": frames, "perfect_reader_top1": reader_top1,
            "top1_clip_centred": float(np.mean(clip_diag["centred"])),
            "top1_at_key_clip_mean": float(np.mean(clip_diag["key_clip_mean"])),
            "r2_projection_all": r2(flat(P), flat(L)),
            "r2_projection_within_clip": r2(within(P), within(L)),
            "r2_ridge_held_out_video": ridge_r2,
            "lambda_std_all": flat(L).std(0).tolist(),
            "lambda_std_within_clip": within(L).std(0).tolist()}


def clip_stats(data: str, frames: int = 8, min_gap: int = 3, clips: int = 20,
               sigmas=(0.0, 0.01, 0.02, 0.05, 0.1)) -> dict:
    frames_ds = FrameDataset(data, 64, load_masks=False)
    meta = json.load(open(os.path.join(data, frames_ds.videos[0].name, "meta.json")))
    leak = float(meta.get("exp_leak", 0.0))
    clip_ds = ClipDataset(data, 64, frames=frames, min_gap=min_gap, repeats=clips, seed=1,
                          load_masks=False)
    true = [_true_exp(np.asarray(c, np.float32), leak) for c in frames_ds.coeffs]
    allf = np.concatenate(true)
    animated = np.nonzero(allf.std(0) > 1e-6)[0]
    rng = np.random.default_rng(0)
    params, hits = {}, {s: [] for s in sigmas}
    within = {p: [] for p in ("jaw_open", "blink_left", "smile")}
    for i in range(len(clip_ds)):
        v, idx = clip_ds.clip_frames(i)
        e = true[v][idx][:, animated]
        for p in within:
            within[p].append(true[v][idx, EXP_NAMES.index(p)].std())
        for s in sigmas:
            q = e + rng.normal(0, s, e.shape)
            d = ((q[:, None] - e[None]) ** 2).sum(-1)
            hits[s].append((d.argmin(1) == np.arange(frames)).mean())
    for p in within:
        j = EXP_NAMES.index(p)
        params[p] = {"std_all": float(allf[:, j].std()),
                     "std_within_clip": float(np.mean(within[p])),
                     "std_video_means": float(np.std([t[:, j].mean() for t in true]))}
    return {"frames": frames, "min_gap": min_gap, "clips": len(clip_ds),
            "animated_coefficients": int(len(animated)), "params": params,
            "retrieval_ceiling": {str(s): float(np.mean(h)) for s, h in hits.items()}}


def _probe_and_r2(feats: list, coeffs: list, ident: list, vid: list, leak: float) -> tuple:
    """The ``clebs`` check's identity probe and R^2 on per-video features (T, k)."""
    ids = sorted(set(ident))
    x = np.concatenate(feats)
    labels = np.concatenate([[ids.index(i)] * len(f) for i, f in zip(ident, feats)])
    videos = np.concatenate([[v] * len(f) for v, f in zip(vid, feats)])
    true = np.concatenate([_true_exp(c, leak) for c in coeffs])
    tr, te = videos == 0, videos == 1
    pred = _ridge(x[tr], np.eye(len(ids))[labels][tr], x[te])
    probe = float((pred.argmax(1) == labels[te]).mean())
    r2 = {}
    for pname in ("jaw_open", "blink_left", "smile"):
        y = true[:, EXP_NAMES.index(pname)]
        p = _ridge(x[tr], y[tr, None], x[te])[:, 0]
        r2[pname] = float(1 - ((p - y[te]) ** 2).sum() / ((y[te] - y[te].mean()) ** 2).sum())
    return probe, r2


def lda_oracle(data: str, identities=(8, 32, 64, 128, 256), ks=(6, 10), videos: int = 2,
               frames: int = 32) -> dict:
    """How many training identities a LINEAR leak removal needs (no images, no training): the
    stored expression coefficients of ``identities`` synthetic training identities (sampled as
    ``pyface data synth`` does, with the held-out split's ``exp_leak``) give the k directions
    that maximise the within-video variance over the variance of the video means
    (LDA-style generalised eigenvectors); the identity probe and R^2 of the ``clebs`` check are
    then computed on the held-out split projected on them."""
    import scipy.linalg

    from pyface.data.synthetic import apply_leak, sample_identity, sample_motion
    from pyface.face import MorphableModel

    frames_ds = FrameDataset(data, 64, load_masks=False)
    meta = json.load(open(os.path.join(data, frames_ds.videos[0].name, "meta.json")))
    leak = float(meta.get("exp_leak", 0.0))
    ident, vid = _video_split(frames_ds)
    test = [np.asarray(c, np.float32) for c in frames_ds.coeffs]
    model = MorphableModel.builtin()
    res = {"exp_leak": leak, "identity_chance": 1.0 / len(set(ident)), "rows": []}
    for n in identities:
        train = []
        for i in range(n):
            idc, _, _ = sample_identity(model, 0, i, 8, "train")
            for v in range(videos):
                exp = sample_motion(model, 0, i, v, frames, 25.0, "train")[0]
                c = np.zeros((frames, 257), np.float32)
                c[:, :80], c[:, 80:144] = idc, exp
                train.append(apply_leak(c, leak)[:, 80:144])
        means = np.stack([t.mean(0) for t in train])
        sb = np.cov(means.T)
        w = np.concatenate([t - t.mean(0) for t in train])
        sw = w.T @ w / len(w)
        _, vecs = scipy.linalg.eigh(sw, sb + 1e-3 * np.eye(EXP_DIM_))
        for k in ks:
            a = vecs[:, ::-1][:, :k]
            probe, r2 = _probe_and_r2([c[:, 80:144] @ a for c in test], test, ident, vid, leak)
            res["rows"].append({"identities": n, "k": k, "identity_probe": probe, "r2": r2})
    return res


EXP_DIM_ = 64


def _psnr(a, b):
    mse = ((a - b) ** 2).mean().clamp_min(1e-10)
    return float(10 * torch.log10(4.0 / mse))     # images in [-1, 1]: peak-to-peak 2


@torch.no_grad()
def mouth_check(run: str, data: str, threshold: float = 0.2, ema: bool = True) -> dict:
    import pyface.models
    from pyface.nn.roi import roi_align

    pipe = pyface.models.load("export3d", run, device="cpu", ema=ema)
    R = pipe.resolution
    ds = FrameDataset(data, R)
    meta = json.load(open(os.path.join(data, ds.videos[0].name, "meta.json")))
    leak = float(meta.get("exp_leak", 0.0))
    jaw = EXP_NAMES.index("jaw_open")
    gains, n = [], 0
    for v, rec in enumerate(ds.videos):
        c = np.asarray(ds.coeffs[v], np.float32)
        tj = _true_exp(c, leak)[:, jaw]
        src = ds.frame(v, 0)
        src = {"image": src["image"].float() / 127.5 - 1, "coeffs": src["coeffs"],
               "camera": src["camera"], "landmarks": src["landmarks"]}
        state = pipe.encode_source(src)
        for f in np.nonzero(np.abs(tj - tj[0]) > threshold)[0]:
            d = ds.frame(v, int(f))
            drv = {"image": (d["image"].float() / 127.5 - 1)[None], "coeffs": d["coeffs"][None],
                   "camera": d["camera"][None]}
            motion = pipe.encode_driving(drv)
            with_drv = pipe.generate(state, motion)
            motion_src = dict(motion, beta=state["beta"], lambda_=None)
            with_src = pipe.generate(state, motion_src)
            box = landmark_boxes(d["landmarks"][None].float(), R)["mouth"]
            rois = torch.cat([torch.zeros(1, 1), box], 1)
            tgt = roi_align(drv["image"], rois, 16)
            gains.append((_psnr(roi_align(with_drv, rois, 16), tgt),
                          _psnr(roi_align(with_src, rois, 16), tgt),
                          _psnr(roi_align(src["image"][None], rois, 16), tgt)))
            n += 1
    g = np.array(gains)
    return {"pairs": n, "mouth_psnr_driving_exp": float(g[:, 0].mean()),
            "mouth_psnr_source_exp": float(g[:, 1].mean()),
            "mouth_psnr_copy_source": float(g[:, 2].mean()),
            "gain_db": float((g[:, 0] - g[:, 1]).mean()), "jaw_threshold": threshold}


@torch.no_grad()
def mouth_oracle(data: str, threshold: float = 0.2) -> dict:
    from pyface.data.synthetic import sample_identity
    from pyface.face import MorphableModel
    from pyface.nn.roi import roi_align

    model = MorphableModel.builtin()
    ds = FrameDataset(data, None)
    jaw = EXP_NAMES.index("jaw_open")
    rows = []
    for v, rec in enumerate(ds.videos):
        meta = json.load(open(os.path.join(data, rec.name, "meta.json")))
        leak = float(meta.get("exp_leak", 0.0))
        c = np.asarray(ds.coeffs[v], np.float32)
        true = _true_exp(c, leak)
        frames = np.nonzero(np.abs(true[:, jaw] - true[0, jaw]) > threshold)[0]
        if not len(frames):
            continue
        ident = int(meta["identity"][len(meta.get("split", "train")):])
        R = ds.frame(v, 0)["image"].shape[-1]
        _, _, bg = sample_identity(model, int(meta.get("seed", 0)), ident, R,
                                   meta.get("split", "train"))
        bg = torch.from_numpy(bg)[None]
        for f in frames:
            d = ds.frame(v, int(f))
            tgt = d["image"].float()[None] / 127.5 - 1
            co = torch.from_numpy(c[[f, f]]).clone()
            co[:, 80:144] = torch.from_numpy(true[[f, 0]])     # own / the source's expression
            img = model.render(co, R, background=bg.expand(2, -1, -1, -1)).image
            img = (img.clamp(0, 1) * 255 + 0.5).floor() / 127.5 - 1
            box = landmark_boxes(d["landmarks"][None].float(), R)["mouth"]
            rois = torch.cat([torch.zeros(1, 1), box], 1)
            t = roi_align(tgt, rois, 16)
            rows.append((_psnr(roi_align(img[:1], rois, 16), t),
                         _psnr(roi_align(img[1:], rois, 16), t)))
    g = np.array(rows)
    return {"pairs": len(g), "rerender_own_expression_psnr": float(g[:, 0].mean()),
            "source_expression_psnr": float(g[:, 1].mean()),
            "source_expression_psnr_median": float(np.median(g[:, 1])),
            "jaw_threshold": threshold}


@torch.no_grad()
def visibility(data: str, frames_per_video: int = 3) -> dict:
    """How visible each animated expression parameter is at the split's resolution: frames of
    every video are rendered again by the synthetic generator with their true expression, and
    with one parameter moved by its within-clip standard deviation (N = 8, min gap 3); mean
    absolute change of the 8-bit image (grey levels, over the whole frame) and the number of
    pixels that change by at least one grey level."""
    from pyface.data.synthetic import sample_identity
    from pyface.face import MorphableModel

    model = MorphableModel.builtin()
    ds = FrameDataset(data, None)
    stats = clip_stats(data)
    trues, metas = [], []
    for v, rec in enumerate(ds.videos):
        meta = json.load(open(os.path.join(data, rec.name, "meta.json")))
        trues.append(_true_exp(np.asarray(ds.coeffs[v], np.float32),
                               float(meta.get("exp_leak", 0.0))))
        metas.append(meta)
    allf = np.concatenate(trues)
    animated = [j for j in range(64) if allf[:, j].std() > 1e-6]
    # within-clip std per parameter, as clip_stats samples clips
    clip_ds = ClipDataset(data, 64, frames=8, min_gap=3, repeats=20, seed=1, load_masks=False)
    within = np.zeros(64)
    for i in range(len(clip_ds)):
        v, idx = clip_ds.clip_frames(i)
        within += trues[v][idx].std(0) / len(clip_ds)
    change = {EXP_NAMES[j]: [] for j in animated}
    changed_px = {EXP_NAMES[j]: [] for j in animated}
    for v, rec in enumerate(ds.videos):
        meta = metas[v]
        ident = int(meta["identity"][len(meta.get("split", "train")):])
        R = ds.frame(v, 0)["image"].shape[-1]
        _, _, bg = sample_identity(model, int(meta.get("seed", 0)), ident, R,
                                   meta.get("split", "train"))
        bg = torch.from_numpy(bg)[None]
        c = np.asarray(ds.coeffs[v], np.float32)
        for f in np.linspace(0, len(c) - 1, frames_per_video).astype(int):
            co = torch.from_numpy(c[[f] * (1 + len(animated))]).clone()
            co[:, 80:144] = torch.from_numpy(trues[v][f])
            for k, j in enumerate(animated):
                co[1 + k, 80 + j] += float(within[j])
            img = model.render(co, R, background=bg.expand(len(co), -1, -1, -1)).image
            img = (img.clamp(0, 1) * 255 + 0.5).floor()
            for k, j in enumerate(animated):
                d = (img[1 + k] - img[0]).abs()
                change[EXP_NAMES[j]].append(float(d.mean()))
                changed_px[EXP_NAMES[j]].append(float((d.amax(0) >= 1).sum()))
    return {"within_clip_std": {EXP_NAMES[j]: float(within[j]) for j in animated},
            "mean_abs_change_grey_levels": {k: float(np.mean(v)) for k, v in change.items()},
            "pixels_changed": {k: float(np.mean(v)) for k, v in changed_px.items()},
            "frames": len(next(iter(change.values()))), "clip_stats": stats}


@torch.no_grad()
def diagnose(run: str, data: str, pairs: int = 64, ema: bool = True) -> dict:
    import torch.nn.functional as F

    import pyface.models
    from pyface.data.reenactment import reenactment_pairs
    from pyface.eval.evaluate import to_pipeline_frame

    pipe = pyface.models.load("export3d", run, device="cpu", ema=ema)
    m = pipe.model.eval()
    ds = reenactment_pairs(data, resolution=pipe.resolution, protocol="same", subset="moving")
    items = [ds[i] for i in np.linspace(0, len(ds) - 1, min(pairs, len(ds))).astype(int)]
    frames = {k: [to_pipeline_frame(it[k], "cpu") for it in items] for k in ("source", "target")}
    S = torch.stack([f["image"] for f in frames["source"]])
    D = torch.stack([f["image"] for f in frames["target"]])
    M = torch.stack([f["mask"] for f in frames["target"]]).reshape(len(items), 1, *D.shape[-2:])
    coeffs = {k: torch.stack([it[k]["coeffs"] for it in items]).float() for k in ("source",
                                                                                 "driving")}
    cams = {k: torch.stack([it[k]["camera"] for it in items]).float() for k in ("source",
                                                                               "driving")}

    def psnr(a, b, mask=None):
        d = (a - b) ** 2
        if mask is None:
            mse = d.mean((1, 2, 3))
        else:
            mse = (d * mask).sum((1, 2, 3)) / (mask.sum((1, 2, 3)) * 3).clamp_min(1)
        return float((10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean())

    sb = expression_of(coeffs["source"])          # the source's expression (expr_relative)
    out = m(S, expression_of(coeffs["driving"]), cams["driving"], source_beta=sb)
    rec = m(S, sb, cams["source"], source_beta=sb)
    at_src = m(S, expression_of(coeffs["driving"]), cams["source"], source_beta=sb)
    r = out["image_raw"].shape[-1]

    def small(x):
        return F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)

    up = F.interpolate(small(D), size=D.shape[-2:], mode="bilinear", align_corners=False)
    return {"pairs": len(items), "raw_resolution": r,
            "copy_source": [psnr(S, D), psnr(S, D, M)],
            "output": [psnr(out["image"], D), psnr(out["image"], D, M)],
            "raw_vs_driving_small": [psnr(out["image_raw"], small(D)),
                                     psnr(out["image_raw"], small(D), small(M))],
            "copy_source_small": psnr(small(S), small(D)),
            "reconstruct_source": psnr(rec["image"], S),
            "output_at_source_camera": [psnr(at_src["image"], D), psnr(at_src["image"], D, M)],
            "raw_opacity": float(out["image_opacity"].mean()),
            "raw_resolution_ceiling": psnr(up, D)}


def sensitivity(run: str, data: str, ema: bool = True) -> dict:
    """How much the driving expression moves the generator: 8 held-out videos, source frame 0,
    driving frames 10, 20, 30 at the driving camera; mean |.| of the tri-plane T, of the online
    EMA tri-plane T_EMA and of the condition c, and the mean |difference| of c, T, the raw image
    and the image between the driving and the source expression (images in [-1, 1]); the
    gradient norm of L1(image, driving frame) on the EAdaLN modulations, the super-resolution's
    modulation, the condition MLP, the expression tri-plane directions (``expr_planes``) and all
    parameters."""
    import pyface.models

    pipe = pyface.models.load("export3d", run, device="cpu", ema=ema)
    m = pipe.model.eval()
    ds = FrameDataset(data, pipe.resolution, load_masks=False)
    src, drv, b_s, b_d, cam, lms = [], [], [], [], [], []
    for v in range(0, len(ds.videos), max(1, len(ds.videos) // 8)):
        a = ds.frame(v, 0)
        for f in (10, 20, 30):
            b = ds.frame(v, min(f, len(ds.coeffs[v]) - 1))
            src.append(a["image"].float() / 127.5 - 1)
            lms.append(a["landmarks"].float())
            drv.append(b["image"].float() / 127.5 - 1)
            b_s.append(a["coeffs"])
            b_d.append(b["coeffs"])
            cam.append(b["camera"])
    S, cam, lms = torch.stack(src), torch.stack(cam).float(), torch.stack(lms)
    D = torch.stack(drv)
    b_s, b_d = expression_of(torch.stack(b_s)), expression_of(torch.stack(b_d))
    # gradient norms of L1(image, driving frame) per parameter group (expression paths vs all)
    m.zero_grad(set_to_none=True)
    out = m(S, b_d, cam, source_beta=b_s, source_landmarks=lms)
    (out["image"] - D).abs().mean().backward()
    groups = {"eadaln": [], "sr_modulation": [], "cond_mlp": [], "expr_planes": [], "all": []}
    for name, p in m.named_parameters():
        if p.grad is None:
            continue
        g = float(p.grad.norm()) ** 2
        groups["all"].append(g)
        if ".ada." in name:
            groups["eadaln"].append(g)
        elif name.startswith("sr.modulation"):
            groups["sr_modulation"].append(g)
        elif name.startswith("cond.mlp"):
            groups["cond_mlp"].append(g)
        elif name.startswith("generator.expr_"):
            groups["expr_planes"].append(g)
    grad = {k: float(np.sqrt(sum(v))) for k, v in groups.items()}
    m.zero_grad(set_to_none=True)
    with torch.no_grad():
        o_d = m(S, b_d, cam, source_beta=b_s, source_landmarks=lms)
        o_s = m(S, b_s, cam, source_beta=b_s, source_landmarks=lms)
        c_d, c_s = m.condition(b_d)[1], m.condition(b_s)[1]

    def mad(x):
        return float(x.abs().mean())

    return {"pairs": len(S), "grad_norm": grad, "planes_abs": mad(o_d["planes"]),
            "planes_ema_abs": mad(m.generator.planes_ema), "cond_abs": mad(c_d),
            "cond_diff": mad(c_d - c_s), "planes_diff": mad(o_d["planes"] - o_s["planes"]),
            "raw_diff": mad(o_d["image_raw"] - o_s["image_raw"]),
            "image_diff": mad(o_d["image"] - o_s["image"])}


@torch.no_grad()
def leak_sensitivity(run: str, data: str, ema: bool = True) -> dict:
    import pyface.models
    from pyface.data.synthetic import apply_leak

    pipe = pyface.models.load("export3d", run, device="cpu", ema=ema)
    m = pipe.model.eval()
    ds = FrameDataset(data, pipe.resolution, load_masks=False)
    meta = json.load(open(os.path.join(data, ds.videos[0].name, "meta.json")))
    leak = float(meta.get("exp_leak", 0.0))
    ident, vid = _video_split(ds)
    first = {i: v for v, (i, k) in enumerate(zip(ident, vid)) if k == 0}
    ids = sorted(first)
    S, stored, own, src_exp, cam, lms = [], [], [], [], [], []
    for a in ids:
        fa = ds.frame(first[a], 0)
        ca = np.asarray(fa["coeffs"], np.float32)[None]
        for b in ids:
            if b == a:
                continue
            for f in (10, 20, 30):
                fb = ds.frame(first[b], f)
                cb = np.asarray(fb["coeffs"], np.float32)[None]
                true = cb.copy()
                true[:, 80:144] = _true_exp(cb, leak)
                mixed = true.copy()
                mixed[:, :80] = ca[:, :80]        # the source identity's leak on the same expression
                S.append(fa["image"].float() / 127.5 - 1)
                lms.append(fa["landmarks"].float())
                stored.append(cb[0, 80:144])
                own.append(apply_leak(mixed, leak)[0, 80:144])
                src_exp.append(ca[0, 80:144])
                cam.append(fb["camera"])
    S, cam, lms = torch.stack(S), torch.stack(cam).float(), torch.stack(lms)
    sb = torch.from_numpy(np.stack(src_exp))      # the source's expression (expr_relative)
    outs = {}
    for name, beta in (("stored", stored), ("own", own), ("source", src_exp)):
        beta = torch.from_numpy(np.stack(beta))
        outs[name] = torch.cat([m(S[i:i + 16], beta[i:i + 16], cam[i:i + 16],
                                  source_beta=sb[i:i + 16],
                                  source_landmarks=lms[i:i + 16])["image"]
                                for i in range(0, len(S), 16)])
    return {"pairs": len(S), "exp_leak": leak,
            "leak_effect": float((outs["stored"] - outs["own"]).abs().mean()),
            "expression_effect": float((outs["own"] - outs["source"]).abs().mean())}


@torch.no_grad()
def code_stats(run: str, data: str) -> dict:
    cfg, state = load_pretrained(run)
    model = CLeBS(config_from_dict(CLeBS.Config, cfg))
    model.load_state_dict(state)
    model.eval()
    ds = FrameDataset(data, 64, load_masks=False)
    betas = [np.asarray(c, np.float32)[:, 80:144] for c in ds.coeffs]
    lams = [model.expr.coefficients(torch.from_numpy(b)).numpy() for b in betas]
    lam = np.concatenate(lams)
    res = {"frames": int(len(lam)), "videos": len(lams),
           "lambda_mean": lam.mean(0).tolist(), "lambda_std": lam.std(0).tolist(),
           "lambda_within_video_std": np.mean([x.std(0) for x in lams], 0).tolist()}
    allb = np.concatenate(betas)
    sd = allb.std(0)
    for name, xs in (("beta", betas),
                     ("beta_standardised", [(b - allb.mean(0)) / np.sqrt(sd ** 2 + 1e-3 *
                                                                          (sd ** 2).mean())
                                            for b in betas])):
        mag = float(np.abs(np.concatenate(xs)).mean())
        within = float(np.mean([np.abs(x - x.mean(0)).mean() for x in xs]))
        res[name] = {"mean_abs": mag, "mean_abs_within_video": within, "ratio": within / mag}
    return res


def _clebs_lambdas(run: str, data: str) -> tuple[list, list, float]:
    """lambda (T, n) of a CLeBS run's f_e and the stored coefficients (T, 257), per video of
    DIR, and the split's exp_leak."""
    cfg, state = load_pretrained(run)
    model = CLeBS(config_from_dict(CLeBS.Config, cfg))
    model.load_state_dict(state)
    model.eval()
    ds = FrameDataset(data, 64, load_masks=False)
    meta = json.load(open(os.path.join(data, ds.videos[0].name, "meta.json")))
    coeffs = [np.asarray(c, np.float32) for c in ds.coeffs]
    with torch.no_grad():
        lams = [model.expr.coefficients(expression_of(torch.from_numpy(c))).double()
                for c in coeffs]
    return lams, coeffs, float(meta.get("exp_leak", 0.0))


def invariance(run: str, data: str) -> dict:
    lams, _, _ = _clebs_lambdas(run, data)
    means = torch.stack([x.mean(0) for x in lams])
    within = torch.stack([x.var(0, unbiased=False) for x in lams]).mean(0)
    cen = torch.cat([x - x.mean(0) for x in lams])
    sw = cen.t() @ cen / len(cen)
    sb = torch.cov(means.t())
    return {"videos": len(lams), "frames": int(len(cen)),
            "per_coefficient": (means.var(0) / within).tolist(),
            "coefficient_sum": float((means.var(0) / within).sum()),
            "joint": float(torch.linalg.solve(sw, sb).trace())}


def directions(run: str, data: str) -> dict:
    lams, coeffs, leak = _clebs_lambdas(run, data)
    lam = torch.cat(lams).numpy()
    true = np.concatenate([_true_exp(c, leak) for c in coeffs])

    def r2(x, y):
        x = np.concatenate([x, np.ones((len(x), 1))], 1)
        p = x @ np.linalg.lstsq(x, y, rcond=None)[0]
        return float(1 - ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum())

    res = {"frames": int(len(lam)), "exp_leak": leak}
    for name in ("jaw_open", "blink_left", "smile"):
        y = true[:, EXP_NAMES.index(name)]
        res[name] = {"single": [r2(lam[:, [i]], y) for i in range(lam.shape[1])],
                     "first_k": [r2(lam[:, :k], y) for k in range(1, lam.shape[1] + 1)]}
    return res


def step_memory(clebs_run: str, sets: list[str] | None = None, warmup: int = 2) -> dict:
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    from pyface.models.export3d import Export3D
    from pyface.train import Trainer
    from pyface.train.config import build_experiment

    res = {"overrides": list(sets or [])}
    for label, backend in (("fused", "null"), ("reference", "reference")):
        cfg = build_experiment("export3d", Export3D.Config, defaults=dict(Export3D.recipe),
                               preset="tiny", overrides=[
                                   f"model.clebs_checkpoint={clebs_run}",
                                   f"train.run_dir={tempfile.mkdtemp(prefix='e3d-mem-')}",
                                   "train.progress=false", "train.tensorboard=false",
                                   "train.device=cpu", f"train.backend={backend}",
                                   *(sets or [])])
        tr = Trainer(cfg)
        batch = tr.preview_batch(tr.local_batch)
        for _ in range(warmup):
            tr.train_step(batch)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            tr.train_step(batch)
        events = list(prof.profiler.kineto_results.events())
        mem = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
        cur = peak = 0
        t_peak = None
        for e in mem:
            cur += e.nbytes()
            if cur > peak:
                peak, t_peak = cur, e.start_ns()
        at = sorted((e for e in events if e.name() != "[memory]"
                     and e.start_ns() <= t_peak <= e.end_ns()), key=lambda e: e.start_ns())
        res[label] = {"peak_mb": peak / 2**20, "at_peak": [e.name() for e in at[-4:]]}
    res["memory_ratio"] = res["reference"]["peak_mb"] / max(res["fused"]["peak_mb"], 1e-9)
    return res


def render_memory(resolution: int = 128, samples: int = 48, device: str = "cpu") -> dict:
    import time

    from pyface.bench.harness import peak_memory_mb
    from pyface.face.cameras import default_label
    from pyface.nn.render import OSGDecoder, RenderConfig, TriplaneRenderer
    from pyface.ops.render import ray_bundle

    dev = torch.device(device)
    torch.manual_seed(0)
    planes = (torch.randn(1, 3, 32, 256, 256, device=dev) * 0.5).requires_grad_(True)
    decoder = OSGDecoder(32, 64, 32).to(dev)
    origins, dirs = ray_bundle(default_label().reshape(1, 25).to(dev), resolution)
    res = {"resolution": resolution, "samples": f"{samples}+{samples}", "device": device}
    for name, backend in (("fused", None), ("reference", "reference")):
        r = TriplaneRenderer(RenderConfig.ffhq_corrected_axes(
            depth_resolution=samples, depth_resolution_importance=samples, backend=backend))

        def run():
            out = r(planes, decoder, origins, dirs)
            (out.features.square().mean() + out.depth.mean()).backward()
            planes.grad = None
            decoder.zero_grad(set_to_none=True)

        run()                                   # warm-up (compilation, caches)
        t0 = time.perf_counter()
        run()
        seconds = time.perf_counter() - t0
        res[name] = {"peak_mb": peak_memory_mb(run, dev), "seconds": seconds}
    res["memory_ratio"] = res["reference"]["peak_mb"] / max(res["fused"]["peak_mb"], 1e-9)
    return res


@torch.no_grad()
def code_gain(run: str, data: str, ema: bool = True) -> dict:
    import pyface.models

    m = pyface.models.load("export3d", run, device="cpu", ema=ema).model.eval()
    cond = m.cond
    ds = FrameDataset(data, m.cfg.resolution, load_masks=False)
    meta = json.load(open(os.path.join(data, ds.videos[0].name, "meta.json")))
    leak = float(meta.get("exp_leak", 0.0))
    idx = [EXP_NAMES.index(n) for n in ("jaw_open", "blink_left", "smile")]
    es, ws, ts = [], [], []
    for c in ds.coeffs:
        c = np.asarray(c, np.float32)
        beta = expression_of(torch.from_numpy(c))
        lam = cond.coefficients(beta)
        x = beta.float() if lam is None else lam
        e = cond._standardise(x, False) if cond.normalize else x
        es.append(e.double().numpy())
        if m.generator.expr_weights is not None:
            ws.append(m.generator.expr_weights(cond.code(beta, lam)).double().numpy())
        ts.append(_true_exp(c, leak)[:, idx].astype(np.float64))
    tc = np.concatenate([t - t.mean(0) for t in ts])

    def gain(xs):
        xc = np.concatenate([x - x.mean(0) for x in xs])
        b = np.linalg.lstsq(tc, xc, rcond=None)[0]                   # (3, k)
        return dict(zip(("jaw_open", "blink_left", "smile"), np.linalg.norm(b, axis=1).tolist()))

    e = np.concatenate(es)
    within = np.mean([x.var(0) for x in es], 0)
    between = np.stack([x.mean(0) for x in es]).var(0)
    res = {"frames": int(len(e)), "exp_leak": leak, "code_per_unit": gain(es),
           "code_within_spread": float(np.sqrt(within.sum())),
           "code_between_spread": float(np.sqrt(between.sum())),
           "code_cov_eigenvalues": np.linalg.eigvalsh(np.cov(e.T))[::-1].tolist()}
    if ws:
        res["weights_per_unit"] = gain(ws)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("check", choices=["clebs", "mouth", "mouth-oracle", "diagnose",
                                     "render-memory", "lda-oracle", "sensitivity", "clip-stats",
                                     "step-memory", "code-stats", "leak", "invariance",
                                     "directions", "readout", "visibility", "code-gain"])
    p.add_argument("run", nargs="?")
    p.add_argument("--data")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--device", default="cpu")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--min-gap", type=int, default=3, help="clebs, clip-stats")
    p.add_argument("--json")
    p.add_argument("--set", action="append", default=[], help="step-memory: config overrides")
    p.add_argument("--no-ema", action="store_true", help="mouth, diagnose: the live weights")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    if a.check == "render-memory":
        res = render_memory(a.resolution, a.samples, a.device)
    elif a.check == "lda-oracle":
        if not a.data:
            p.error("lda-oracle: --data is required")
        res = lda_oracle(a.data)
    elif a.check == "clip-stats":
        if not a.data:
            p.error("clip-stats: --data is required")
        res = clip_stats(a.data, a.frames, a.min_gap)
    elif a.check == "visibility":
        if not a.data:
            p.error("visibility: --data is required")
        res = visibility(a.data)
    elif a.check == "mouth-oracle":
        if not a.data:
            p.error("mouth-oracle: --data is required")
        res = mouth_oracle(a.data)
    elif a.check == "step-memory":
        if not a.run:
            p.error("step-memory: RUN1 (the stage-1 run) is required")
        res = step_memory(a.run, a.set)
    elif not a.run or not a.data:
        p.error(f"{a.check}: RUN and --data are required")
    elif a.check == "leak":
        res = leak_sensitivity(a.run, a.data, ema=not a.no_ema)
    elif a.check == "code-stats":
        res = code_stats(a.run, a.data)
    elif a.check == "invariance":
        res = invariance(a.run, a.data)
    elif a.check == "directions":
        res = directions(a.run, a.data)
    elif a.check == "readout":
        res = readout(a.run, a.data, a.frames, a.min_gap)
    elif a.check == "code-gain":
        res = code_gain(a.run, a.data, ema=not a.no_ema)
    elif a.check == "clebs":
        res = clebs_checks(a.run, a.data, a.frames, a.min_gap)
    elif a.check == "sensitivity":
        res = sensitivity(a.run, a.data, ema=not a.no_ema)
    elif a.check == "diagnose":
        res = diagnose(a.run, a.data, a.pairs, ema=not a.no_ema)
    else:
        res = mouth_check(a.run, a.data, ema=not a.no_ema)
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
