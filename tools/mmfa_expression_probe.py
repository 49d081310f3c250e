"""Does MMFA's expression feature carry the mouth? Linear probes of f_exp and delta per frame.

    python tools/mmfa_expression_probe.py --checkpoint RUN --data FOLDER [--json OUT]
        [--fit-encoder TRAIN_FOLDER --steps 800 --fit-loss l1]

For every frame of ``FOLDER`` (a ``pyface data synth`` folder: 2 videos x 48 frames per
identity), the run's expression feature f_exp (B, exp_dim) and deformation delta (B, K, 3) are
computed, and a ridge regression (the best of 5 strengths) predicts from them, leaving one
identity out at a time, with features and targets centred per identity (so only the
within-identity change counts):

* ``mouth_open``: inner-lip distance (landmarks 62-66) over the eye-corner distance (36-45);
* ``mouth_width``: lip-corner distance (48-54) over the same;
* ``exp64``: the frame's 64 stored expression coefficients (synthetic ground truth).

R^2 is reported per feature (1: fully predictable, 0 or below: nothing), next to the same probe
on a freshly initialised encoder (``f_exp_untrained``) and on the 16 x 16 average-pooled pixels.
``spread``: for f_exp and delta, the norm of the per-dimension standard deviation within a video
(averaged over videos) and between the identities' means: what the feature varies with.

``--fit-encoder TRAIN_FOLDER``: a fresh expression encoder of the run's size and a linear head,
trained alone (no MMFA around them) on the expression-landmark target of
:func:`pyface.models.mmfa.model.expression_landmark_loss` (L1 of the pair difference of
:func:`~pyface.models.mmfa.model.mouth_shape`) over same-video pairs of ``TRAIN_FOLDER``'s frames
(8 pairs a step, Adam 1e-3, betas 0.5 / 0.999; ``--fit-loss``: the term's ``kind``, ``l1`` or
``mse``); the mouth-opening R^2 of its feature on
``FOLDER`` and on ``TRAIN_FOLDER`` every 200 steps (``fit_encoder``): how well this encoder can
learn to read the mouth at all from those identities.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import pyface.models
from pyface.data.datasets import FrameDataset
from pyface.models.mmfa.model import MMFA, MMFAConfig, expression_landmark_loss
from pyface.models.mmfa.motion import ImageEncoder
from mmfa_eval import emit_report


def ridge_r2(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Leave-one-group-out R^2 of a ridge regression x (N, F) -> y (N,) or (N, T), with x and y
    centred per group; the best of 5 ridge strengths."""
    x, y = x.astype(np.float64).copy(), y.astype(np.float64).copy()
    for g in np.unique(groups):
        x[groups == g] -= x[groups == g].mean(0)
        y[groups == g] -= y[groups == g].mean(0)
    x = x / (x.std(0) + 1e-6)
    best = -np.inf
    for lam in (1e-3, 1e-2, 1e-1, 1.0, 10.0):
        pred = np.zeros_like(y)
        for g in np.unique(groups):
            tr, te = groups != g, groups == g
            a = np.c_[x[tr], np.ones(tr.sum())]
            w = np.linalg.solve(a.T @ a + lam * len(a) * np.eye(a.shape[1]), a.T @ y[tr])
            pred[te] = np.c_[x[te], np.ones(te.sum())] @ w
        best = max(best, 1 - float(((y - pred) ** 2).sum() / (y ** 2).sum()))
    return best


def frames_of(pipe, root: str):
    """-> images (N, 3, R, R) in [-1, 1], landmarks (N, 68, 2), coeffs (N, 257), identity (N,),
    video (N,) of every frame of ``root``."""
    frames = FrameDataset(root, pipe.resolution)
    items = [frames[i] for i in range(len(frames))]
    img = pipe.prepare({"image": torch.stack([f["image"] for f in items])}, batched=True,
                       name="frames")["image"]
    return (img, torch.stack([f["landmarks"].float() for f in items]),
            torch.stack([f["coeffs"].float() for f in items]),
            np.array([int(f["identity"]) for f in items]),
            np.array([hash((int(f["identity"]), str(f["video"]))) for f in items]))


def mouth_open(lms: np.ndarray) -> np.ndarray:
    """(N, 68, 2) -> (N,) inner-lip distance over the eye-corner distance."""
    return (np.linalg.norm(lms[:, 66] - lms[:, 62], axis=1)
            / np.linalg.norm(lms[:, 45] - lms[:, 36], axis=1))


def fit_encoder(cfg, train, test, steps: int, kind: str = "l1") -> list[dict]:
    """Trains a fresh ImageEncoder + linear head on the expression-landmark target (see the
    module docstring) -> the mouth-opening R^2 on ``test`` and ``train`` every 200 steps."""
    torch.manual_seed(0)
    enc = ImageEncoder(list(cfg.enc_channels), cfg.exp_dim)
    head = torch.nn.Linear(cfg.exp_dim, 50)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-3, betas=(0.5, 0.999))
    img, lm, _, _, video = train
    vids = [np.flatnonzero(video == v) for v in np.unique(video)]
    out = []
    for it in range(steps + 1):
        if it % 200 == 0:
            enc.eval()
            with torch.no_grad():
                r = {"step": it}
                for name, (x, l, _, g, _) in (("heldout", test), ("train", train)):
                    f = torch.cat([enc(x[s:s + 128]) for s in range(0, len(x), 128)]).numpy()
                    r[name] = round(ridge_r2(f, mouth_open(l.numpy()), g), 3)
            enc.train()
            out.append(r)
            print(r, flush=True)
        if it == steps:
            break
        pick = [vids[i] for i in np.random.randint(0, len(vids), 8)]
        a = torch.as_tensor([np.random.choice(v) for v in pick])
        b = torch.as_tensor([np.random.choice(v) for v in pick])
        p = head(enc(torch.cat([img[a], img[b]])))
        loss = expression_landmark_loss(p[:8], p[8:], lm[a], lm[b], kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--json", default=None)
    ap.add_argument("--fit-encoder", default=None, metavar="TRAIN_FOLDER")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--fit-loss", choices=("l1", "mse"), default="l1")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    pipe = pyface.models.load("mmfa", args.checkpoint, device="cpu")
    net = pipe.model.eval()
    frames = FrameDataset(args.data, pipe.resolution)
    items = [frames[i] for i in range(len(frames))]
    img = pipe.prepare({"image": torch.stack([f["image"] for f in items])}, batched=True,
                       name="frames")["image"]
    lms = torch.stack([f["landmarks"].float() for f in items]).numpy()
    exp = torch.stack([f["coeffs"].float() for f in items]).numpy()[:, 80:144]
    groups = np.array([int(f["identity"]) for f in items])
    untrained = MMFA(MMFAConfig(**vars(net.cfg))).eval()
    f, d, f0 = [], [], []
    with torch.no_grad():
        for s in range(0, len(img), 128):
            x = img[s:s + 128]
            fe = net.exp_encoder(x)
            f.append(fe)
            d.append(net.exp_decoder(fe, net.kp_detector(x)["value"]).flatten(1))
            f0.append(untrained.exp_encoder(x))
    eye = np.linalg.norm(lms[:, 45] - lms[:, 36], axis=1)
    targets = {"mouth_open": np.linalg.norm(lms[:, 66] - lms[:, 62], axis=1) / eye,
               "mouth_width": np.linalg.norm(lms[:, 54] - lms[:, 48], axis=1) / eye,
               "exp64": exp}
    feats = {"f_exp": torch.cat(f).numpy(), "delta": torch.cat(d).numpy(),
             "f_exp_untrained": torch.cat(f0).numpy(),
             "pixels_16x16": torch.nn.functional.avg_pool2d(img, img.shape[-1] // 16)
             .flatten(1).numpy()}
    videos = np.array([hash((int(f["identity"]), str(f["video"]))) for f in items])
    spread = {}
    for fn in ("f_exp", "delta"):
        fx = feats[fn]
        within = np.mean([fx[videos == v].std(0) for v in np.unique(videos)], 0)
        between = np.array([fx[groups == g].mean(0) for g in np.unique(groups)]).std(0)
        spread[fn] = {"within_video": round(float(np.linalg.norm(within)), 4),
                      "between_identities": round(float(np.linalg.norm(between)), 4)}
    report = {"checkpoint": args.checkpoint, "data": args.data, "frames": len(items),
              "spread": spread,
              "r2": {fn: {tn: round(ridge_r2(fx, t, groups), 3) for tn, t in targets.items()}
                     for fn, fx in feats.items()}}
    if args.fit_encoder:
        np.random.seed(0)
        report["fit_encoder"] = fit_encoder(
            net.cfg, frames_of(pipe, args.fit_encoder),
            (img, torch.as_tensor(lms), None, groups, None), args.steps, args.fit_loss)
    emit_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
