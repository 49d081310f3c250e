"""Is MMFA's mouth check limited by the mapping from f_exp to delta? Refit the expression decoder
alone, everything else frozen, and measure the mouth check again.

    python tools/mmfa_delta_refit.py --checkpoint RUN --train TRAIN_SET --data HELDOUT [--steps 200] [--mouth-weight 6]

Only ``exp_decoder`` trains (its BatchNorm in eval mode), on same-video pairs of ``--train``
(batch 4, Adam 1e-3), with the model's L1 error of the final output (weight 10) and the
landmark term (weight 10, part weights rest / eyes / mouth = 1 / 2 / ``--mouth-weight``). Before
and after, on ``--pairs`` mouth-check pairs of ``--data`` spread over the set (as
tools/mmfa_mouth_oracle.py): the mouth-box PSNR with the driving and with the source's f_exp,
and the whole-image PSNR of the output.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pyface.models  # noqa: E402
from mmfa_mouth_oracle import mouth_box, psnr, to01  # noqa: E402
from pyface.data.datasets import PairDataset  # noqa: E402
from pyface.data.reenactment import (MOVING_EXP_L2, expression_difference,  # noqa: E402
                                     reenactment_pairs)
from pyface.models.mmfa.model import (landmark_flow_loss, landmark_point_weights,  # noqa: E402
                                      l1_pyramid)
from pyface.models.mmfa.motion import deep3d_to_keypoint_rotation, pose_keypoints  # noqa: E402
from mmfa_eval import emit_report  # noqa: E402


@torch.no_grad()
def mouth_check(pipe, pairs) -> dict:
    rows = {"driving": [], "source": [], "whole": []}
    for item in pairs:
        st = pipe.encode_source({k: v for k, v in item["source"].items()
                                 if k in ("image", "coeffs")})
        mo = pipe.encode_driving({k: v[None] for k, v in item["driving"].items()
                                  if k in ("image", "coeffs")})
        tgt = to01(item["target"]["image"].float() / 127.5 - 1)
        x0, y0, x1, y1 = mouth_box(item["target"]["landmarks"].float(), pipe.resolution)
        box = (slice(None), slice(y0, y1), slice(x0, x1))
        pred = to01(pipe.generate(st, mo)[0])
        own = to01(pipe.generate(st, mo, expression="source")[0])
        rows["driving"].append(psnr(pred[box], tgt[box]))
        rows["source"].append(psnr(own[box], tgt[box]))
        rows["whole"].append(psnr(pred, tgt))
    out = {k: float(np.mean(v)) for k, v in rows.items()}
    out["drop"] = out["driving"] - out["source"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--mouth-weight", type=float, default=6.0)
    ap.add_argument("--pairs", type=int, default=80)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t0 = time.process_time()
    torch.manual_seed(0)
    pipe = pyface.models.load("mmfa", args.checkpoint, device="cpu")
    m, R = pipe.model, pipe.resolution
    m.eval()
    m.requires_grad_(False)
    m.exp_decoder.requires_grad_(True)
    ds = reenactment_pairs(args.data, resolution=R, protocol="same", subset="moving")
    keep = [i for i in range(len(ds)) if expression_difference(
        ds[i]["source"]["coeffs"].numpy(), ds[i]["target"]["coeffs"].numpy()) > MOVING_EXP_L2]
    n = min(len(keep), args.pairs)
    pairs = [ds[keep[int(j)]] for j in np.linspace(0, len(keep) - 1, n).round()]
    report = {"checkpoint": args.checkpoint, "steps": args.steps,
              "mouth_weight": args.mouth_weight, "pairs": n, "before": mouth_check(pipe, pairs)}
    train = PairDataset(args.train, resolution=R)
    loader = torch.utils.data.DataLoader(train, batch_size=4, shuffle=True, drop_last=True)
    opt = torch.optim.Adam(m.exp_decoder.parameters(), lr=1e-3)
    w = landmark_point_weights([1.0, 2.0, args.mouth_weight])
    step, losses = 0, []
    while step < args.steps:
        for batch in loader:
            src = batch["source"]["image"].float() / 127.5 - 1
            drv = batch["driving"]["image"].float() / 127.5 - 1
            rs = deep3d_to_keypoint_rotation(batch["source"]["coeffs"][:, 224:227].float())
            rd = deep3d_to_keypoint_rotation(batch["driving"]["coeffs"][:, 224:227].float())
            with torch.no_grad():
                vol, kc = m.appearance(src), m.kp_detector(src)["value"]
                mo = m.motion_of(torch.cat([src, drv]))
            B = src.shape[0]
            delta = m.exp_decoder(mo["f_exp"], torch.cat([kc, kc]))
            kp_s = pose_keypoints(kc, rs, mo["scale"][:B], mo["translation"][:B], delta[:B])
            kp_d = pose_keypoints(kc, rd, mo["scale"][B:], mo["translation"][B:], delta[B:])
            out = m.render(vol, kp_s, kp_d, src, flow=True)
            loss = 10 * l1_pyramid(out["images"][-1], drv, 4) + 10 * landmark_flow_loss(
                out["flow"], batch["source"]["landmarks"].float(),
                batch["driving"]["landmarks"].float(), R, w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if step >= args.steps:
                break
    report["train_loss_first_last_10"] = [float(np.mean(losses[:10])), float(np.mean(losses[-10:]))]
    report["after"] = mouth_check(pipe, pairs)
    report["cpu_s"] = time.process_time() - t0
    emit_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
