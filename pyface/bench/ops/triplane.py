"""Benchmark cases of tri-plane sampling."""
from __future__ import annotations

import functools

import torch

from pyface import _backend
from pyface.bench.harness import BenchCase
from pyface.ops import triplane_sample
from pyface.ops.reference import triplane_sample_reference

# EG3D training: B=4, 32 channels at 256^2, 64x64 rays x 96 samples (48 coarse + 48 fine).
SHAPES = {
    "small": dict(B=2, C=32, H=128, W=128, rays=32, samples=16),
    "eg3d": dict(B=4, C=32, H=256, W=256, rays=64, samples=96),
}


def ray_points(B: int, rays: int, samples: int, gen: torch.Generator) -> torch.Tensor:
    """(B, rays*rays*samples, 3) sample points along EG3D-like camera rays: cameras on a sphere
    of radius 2.7 around the head (yaw/pitch within +-0.4 rad), FFHQ focal length 4.2647,
    depths evenly spread over [2.25, 3.3] - the access pattern of the renderer."""
    yaw = (torch.rand(B, generator=gen) - 0.5) * 0.8
    pitch = (torch.rand(B, generator=gen) - 0.5) * 0.8
    origin = 2.7 * torch.stack([torch.sin(yaw) * torch.cos(pitch), torch.sin(pitch),
                                torch.cos(yaw) * torch.cos(pitch)], -1)
    forward = -origin / origin.norm(dim=-1, keepdim=True)
    right = torch.nn.functional.normalize(torch.cross(forward, torch.tensor([[0.0, 1.0, 0.0]]).expand(B, 3), dim=-1), dim=-1)
    up = torch.cross(right, forward, dim=-1)
    s = (torch.arange(rays) + 0.5) / rays - 0.5
    v, u = torch.meshgrid(s, s, indexing="ij")
    d = (forward[:, None] + (u.reshape(1, -1, 1) * right[:, None] + v.reshape(1, -1, 1) * up[:, None])
         / 4.2647)
    d = d / d.norm(dim=-1, keepdim=True)
    t = torch.linspace(2.25, 3.3, samples)
    pts = origin[:, None, None] + d[:, :, None] * t[None, None, :, None]
    return pts.reshape(B, -1, 3)


def _inputs(p: dict, dtype: torch.dtype, channels_last: bool, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if channels_last:
        planes = torch.randn(p["B"], 3, p["H"], p["W"], p["C"], generator=gen)
        planes = planes.to(device, dtype).permute(0, 1, 4, 2, 3)
    else:
        planes = torch.randn(p["B"], 3, p["C"], p["H"], p["W"], generator=gen).to(device, dtype)
    points = ray_points(p["B"], p["rays"], p["samples"], gen).to(device)
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
