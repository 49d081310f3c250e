"""Where the expression VAE's endpoint error comes from (docs/models/mmfa-measured.md,
"Expression VAE").

    python tools/mmfa_vae_diagnose.py --vae VAE_RUN --data HELDOUT --train TRAIN_FOLDER [--json OUT]

The endpoint check of ``tools/mmfa_eval.py --vae`` takes the two frames of a folder whose
expression features f_exp are farthest apart, reconstructs them through the VAE (z = mu) and
reports the larger delta error over the distance between the two frames' deltas (delta decoded
with the first frame's canonical keypoints). This tool reports, for the held-out folder and for
the training folder (``--train``, e.g. the built-in set the MMFA was trained on):

* ``endpoint``: that check (the two endpoint errors);
* ``all_frames``: the same relative delta error for every frame of the folder (mean, 90th
  percentile, fraction over 10 %): is the endpoint worse than a typical frame?
* ``pca<q>``: the same errors for a linear bottleneck of q dimensions instead of the VAE (the
  principal components of the training folder's standardised features, q = the VAE's latent
  size, twice it, and 16), and ``pca_residual_variance``: the fraction of the folder's
  standardised feature variance outside the training folder's first ``latent`` components.
  A folder whose features lie off the training features' subspace cannot be reconstructed by
  any encoder fitted on them.
* ``norm``: the standardised feature norm of the two endpoints and its median over frames.
"""
from __future__ import annotations

import argparse

import torch

import pyface.models
from mmfa_eval import emit_report, frame_features as features


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vae", required=True, help="an mmfa_vae run")
    ap.add_argument("--data", required=True, help="the held-out folder")
    ap.add_argument("--train", required=True, help="the folder the models were trained on")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    pipe = pyface.models.load("mmfa_vae", args.vae, device="cpu")
    net, vae = pipe.net, pipe.model.vae
    latent = int(pipe.model.cfg.latent)
    f_train, k_train = features(pipe, args.train)
    mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
    z_train = (f_train - mean) / std
    centre = z_train.mean(0)
    _, _, basis = torch.linalg.svd(z_train - centre, full_matrices=False)   # rows: components

    def pca(z, q):
        p = basis[:q].T
        return ((z - centre) @ p) @ p.T + centre

    report = {"vae": args.vae, "latent": latent}
    folders = {"held_out": (args.data, *features(pipe, args.data)),
               "train": (args.train, f_train, k_train)}
    for name, (folder, f, kc) in folders.items():
        d = torch.cdist(f, f)
        i, j = divmod(int(d.argmax()), d.shape[1])
        kci = kc[i:i + 1].expand(f.shape[0], -1, -1)
        own = net.exp_decoder(f, kci)
        span = float((own[j] - own[i]).norm())

        def rel_err(f_rec):
            return (net.exp_decoder(f_rec, kci) - own).flatten(1).norm(dim=1) / span

        def summary(err):
            return {"endpoint": [float(err[i]), float(err[j])], "mean": float(err.mean()),
                    "p90": float(err.quantile(0.9)), "over_10pc": float((err > 0.1).float().mean())}

        mu, _ = vae.encode(f)
        z = (f - mean) / std
        r = {"folder": folder, "frames": int(f.shape[0]), "endpoint_frames": [i, j],
             "vae": summary(rel_err(vae.decode(mu)))}
        for q in sorted({latent, 2 * latent, 16}):
            r[f"pca{q}"] = summary(rel_err(pca(z, q) * std + mean))
        r["pca_residual_variance"] = float((z - pca(z, latent)).square().sum()
                                           / (z - centre).square().sum())
        r["norm"] = {"endpoints": [float(z[i].norm()), float(z[j].norm())],
                     "median": float(z.norm(dim=1).median())}
        report[name] = r
    emit_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
