"""Benchmark cases of tri-plane sampling."""
from __future__ import annotations

import functools

import torch

from pyface import _backend
from pyface.bench.harness import BenchCase
from pyface.ops import triplane_sample
from pyface.ops.reference import triplane_sample_reference

# EG3D training: B=4, 32 channels at 256^2, 4096 rays x 96 samples (48 coarse + 48 fine).
SHAPES = {
    "small": dict(B=2, C=32, H=128, W=128, N=16384),
    "eg3d": dict(B=4, C=32, H=256, W=256, N=4096 * 96),
}


def _inputs(p: dict, dtype: torch.dtype, channels_last: bool, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if channels_last:
        planes = torch.randn(p["B"], 3, p["H"], p["W"], p["C"], generator=gen)
        planes = planes.to(device, dtype).permute(0, 1, 4, 2, 3)
    else:
        planes = torch.randn(p["B"], 3, p["C"], p["H"], p["W"], generator=gen).to(device, dtype)
    points = (torch.rand(p["B"], p["N"], 3, generator=gen) - 0.5).to(device)
    return [planes.requires_grad_(), points.requires_grad_()]


def cases(device: torch.device, size: str) -> list[BenchCase]:
    names = ["small"] if size == "small" else ["small", "eg3d"]
    spec = _backend.registered_ops()["triplane_sample"]
    out = []
    for name in names:
        providers = {"reference": functools.partial(triplane_sample_reference, plane_axes="eg3d")}
        for b in ("cpu", "cuda", "triton"):
            if _backend.backend_status(spec, b, device.type)[0]:
                providers[b] = functools.partial(triplane_sample, plane_axes="eg3d", backend=b)
        out.append(BenchCase("triplane_sample", name, SHAPES[name],
                             functools.partial(_inputs, SHAPES[name], torch.float32, False),
                             providers))
        if device.type == "cuda":
            cl = {k: v for k, v in providers.items() if k != "reference"}
            out.append(BenchCase("triplane_sample", name + "-nhwc", SHAPES[name],
                                 functools.partial(_inputs, SHAPES[name], torch.float32, True),
                                 cl))
    return out
