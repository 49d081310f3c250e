"""Does MMFA's expression feature carry the mouth? Linear probes of f_exp and delta per frame.

    python tools/mmfa_expression_probe.py --checkpoint RUN --data FOLDER [--json OUT]

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
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import pyface.models
from pyface.data.datasets import FrameDataset
from pyface.models.mmfa.model import MMFA, MMFAConfig


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


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--json", default=None)
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
    report = {"checkpoint": args.checkpoint, "data": args.data, "frames": len(items),
              "r2": {fn: {tn: round(ridge_r2(fx, t, groups), 3) for tn, t in targets.items()}
                     for fn, fx in feats.items()}}
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
