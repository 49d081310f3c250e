"""Peak memory and time of GOHA's appearance lift-and-raster at GOHA's size on CPU.

One source (B=1): a 128^2 depth render lifted to N = 16,384 points (``o + depth * dir``) with
C = 256 appearance features each, rasterised to three 128^2 planes (nearest point per texel,
``align_corners=True``, ``xy_xz_zy``), forward + backward to the features. Three paths:

* ``fused``: ``pyface.ops.points_to_triplane`` (grid-binned search, O(N + H W));
* ``reference``: ``points_to_triplane(..., backend="reference")`` (exact brute force, in texel
  chunks of 2^22 distances);
* ``goha-cdist``: GOHA's method, one dense (H W, N) ``torch.cdist`` per plane
  (``pyface.bench.ops.raster.goha_cdist``).

``peak``: the allocator peak (profiler events, calling thread) above the inputs (the encoder's
features exist before); ``work``: the peak minus the output planes (3 x C x 128^2 float32 =
48 MiB) and, with the backward, minus the features' gradient (16 MiB): what the lift-and-raster
needs on top of its inputs and outputs.
The times are one run each under the profiler (the reference is slow on CPU by design).

Usage: ``python tools/bench_goha_lift.py [--json OUT.json]``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from pyface.bench.harness import peak_memory_mb
from pyface.bench.ops.raster import goha_cdist
from pyface.ops import points_to_triplane, ray_bundle
from pyface.face.cameras import default_label


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--lift", type=int, default=128)
    ap.add_argument("--planes", type=int, default=128)
    ap.add_argument("--paths", default="fused,reference,goha-cdist")
    args = ap.parse_args()
    torch.manual_seed(0)
    L, A, C = args.lift, args.planes, args.channels
    cam = default_label()[None].float()
    o, d = ray_bundle(cam, L)
    # a head-like depth map: a bumpy ellipsoid around 2.7 in front of the camera
    u = torch.linspace(-1, 1, L)
    yy, xx = torch.meshgrid(u, u, indexing="ij")
    depth = (2.7 - 0.25 * (1 - 0.6 * xx ** 2 - 0.6 * yy ** 2).clamp_min(0).sqrt()
             + 0.01 * torch.randn(L, L)).reshape(1, L * L, 1)
    feats0 = torch.randn(1, L * L, C)
    cot = torch.randn(1, 3, C, A, A)

    def run(kind, backward):
        feats = feats0.clone().requires_grad_(backward)          # the encoder's output

        def fn():
            points = o + depth * d                               # the lift
            if kind == "goha-cdist":
                planes = goha_cdist(points, feats, A)
            else:
                planes, _ = points_to_triplane(points, feats, A, plane_axes="xy_xz_zy",
                                               align_corners=True,
                                               backend=None if kind == "fused" else "reference")
            if backward:
                planes.backward(cot)
            result.append(planes.detach())
        return fn

    out_mb = 3 * C * A * A * 4 / 2**20                           # the planes themselves
    grad_mb = L * L * C * 4 / 2**20                              # the features' gradient
    out = {}
    ref = None
    for kind in args.paths.split(","):
        res = {}
        for backward in (False, True):
            result = []
            t = time.perf_counter()
            mb = peak_memory_mb(run(kind, backward), torch.device("cpu"))
            dt = time.perf_counter() - t
            key = "fwd+bwd" if backward else "fwd"
            work = mb - out_mb - (grad_mb if backward else 0.0)
            res[key] = {"peak_mb": round(mb, 1), "work_mb": round(work, 1),
                        "seconds_profiled": round(dt, 3)}
            print(f"{kind:11s} {key:7s} peak {mb:8.1f} MB  work {work:8.1f} MB  "
                  f"{dt:7.2f} s (under the profiler)", flush=True)
        planes = result[0]
        if ref is None:
            ref = planes
        res["texels_equal_to_fused"] = float((planes == ref).all(1).float().mean())
        out[kind] = res
    for k in [p for p in out if p != "fused" and "fused" in out]:
        for key in ("fwd", "fwd+bwd"):
            print(f"{k} / fused, {key}: peak {out[k][key]['peak_mb'] / out['fused'][key]['peak_mb']:.1f}x"
                  f", work {out[k][key]['work_mb'] / max(out['fused'][key]['work_mb'], 1e-3):.0f}x")
        print(f"{k}: texels equal to the fused planes: {out[k]['texels_equal_to_fused']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"N": L * L, "planes": A, "C": C, "threads": torch.get_num_threads(),
                       "results": out}, f, indent=1)


if __name__ == "__main__":
    main()
