"""MMFA's dense-motion part of a training step on fused vs reference ops: peak memory and time.

    python tools/mmfa_motion_bench.py [--volume tiny|full] [--hourglass tiny|full] [--batch B]
                                      [--reps N] [--json bench/results/OUT.json]

One step = ``DenseMotion`` forward (the fused ``motion_field_input`` builds the hourglass input
from the K+1 keypoint motions; the reference builds face-vid2vid's K+1 deformed copies of the
compressed volume), the warp of the appearance volume (fused ``warp_by_keypoints`` against the
reference's materialised deformation + ``grid_sample``), the depth-averaged flow of the source
blend (``keypoint_flow``), and the backward of a loss on the warped volume and the flow. Weights,
volume and keypoints are built once; peak memory is what one step allocates above that
(:func:`pyface.bench.harness.peak_memory_mb`), time the median of ``--reps`` process-CPU
timings (1 thread unless OMP_NUM_THREADS says otherwise).

Volumes: ``tiny`` 16 x 8 x 16^2, K = 10 (MMFA ``tiny``); ``full`` 32 x 16 x 64^2, K = 15
(face-vid2vid / MMFA at 256^2). Hourglass: ``tiny`` (16, 3 blocks, max 128) or ``full``
(32, 5 blocks, max 1024).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from pyface.bench.harness import peak_memory_mb
from pyface.nn.motion import DenseMotion, DenseMotionConfig
from pyface.ops import use_backend

VOLUMES = {"tiny": dict(C=16, D=8, H=16, K=10), "full": dict(C=32, D=16, H=64, K=15)}
HOURGLASS = {"tiny": dict(block_expansion=16, num_blocks=3, max_features=128),
             "full": dict(block_expansion=32, num_blocks=5, max_features=1024)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--volume", default="full", choices=sorted(VOLUMES))
    ap.add_argument("--hourglass", default="tiny", choices=sorted(HOURGLASS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    v, B = VOLUMES[args.volume], args.batch
    torch.manual_seed(0)
    dm = DenseMotion(DenseMotionConfig(num_kp=v["K"], feature_channel=v["C"],
                                       reshape_depth=v["D"], **HOURGLASS[args.hourglass]))
    volume = torch.randn(B, v["C"], v["D"], v["H"], v["H"], requires_grad=True)
    kp_s = (torch.rand(B, v["K"], 3) * 1.6 - 0.8).requires_grad_()
    kp_d = (kp_s.detach() + 0.05 * torch.randn(B, v["K"], 3)).requires_grad_()

    def step():
        out = dm(volume, kp_source=kp_s, kp_driving=kp_d, return_deformation=True)
        warped = dm.warp(volume, kp_source=kp_s, kp_driving=kp_d, mask=out["mask"])
        flow = out["deformation"][..., :2].mean(1)
        loss = warped.square().mean() + flow.square().mean() + out["occlusion_map"].mean()
        loss.backward()
        for t in (volume, kp_s, kp_d, *dm.parameters()):
            t.grad = None

    report = {"volume": args.volume, "hourglass": args.hourglass, "batch": B,
              "shape": {**v, "W": v["H"]}, "threads": torch.get_num_threads(), "results": {}}
    for label, backend in (("fused", None), ("reference", "reference")):
        with use_backend(backend):
            step()                                            # warm-up
            mem = peak_memory_mb(step, torch.device("cpu"))
            times = []
            for _ in range(args.reps):
                t0 = time.process_time()
                step()
                times.append(time.process_time() - t0)
        report["results"][label] = {"peak_mem_mb": mem, "cpu_s_median": statistics.median(times),
                                    "cpu_s": times}
        print(f"{label:9s} peak {mem:8.1f} MB  step {statistics.median(times) * 1e3:8.1f} ms "
              f"CPU (median of {args.reps})")
    f, r = report["results"]["fused"], report["results"]["reference"]
    report["memory_ratio"] = r["peak_mem_mb"] / max(f["peak_mem_mb"], 1e-9)
    report["time_ratio"] = r["cpu_s_median"] / max(f["cpu_s_median"], 1e-9)
    print(f"reference / fused: peak memory x{report['memory_ratio']:.2f}, "
          f"CPU time x{report['time_ratio']:.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
