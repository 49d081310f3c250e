"""Benchmark cases of ray marching and volume rendering (EG3D shapes).

* ``mip_composite`` and ``sample_importance``: reference vs the compiled backends.
* ``render_triplane``: the EG3D-style reference renderer (and ``torch.compile`` of it, added by
  the harness), the unfused pyface ops (``unfused``: C++/CUDA ops, everything kept for the
  backward), the fused path (``fused``: the same ops over ray chunks recomputed in the backward;
  on CUDA also ``triton``, the single fused kernel).
"""
from __future__ import annotations

import functools
import math

import torch

from pyface import _backend
from pyface.bench.harness import BenchCase
from pyface.ops import mip_composite, ray_bundle, render_triplane, sample_importance
from pyface.ops.reference import (
    mip_composite_reference,
    render_triplane_reference,
    sample_importance_reference,
)

# EG3D FFHQ: 48 coarse + 48 fine samples, rays 2.25 - 3.3, 32-channel 256^2 planes, B = 4,
# neural rendering resolution 64 (128 after the fade-in).
COMPOSITE = {
    "small": dict(B=1, R=32 * 32, S=96, C=32),
    "eg3d64": dict(B=4, R=64 * 64, S=96, C=32),
    "eg3d128": dict(B=4, R=128 * 128, S=96, C=32),
}
IMPORTANCE = {
    "small": dict(B=1, R=32 * 32, S=48, M=48),
    "eg3d64": dict(B=4, R=64 * 64, S=48, M=48),
    "eg3d128": dict(B=4, R=128 * 128, S=48, M=48),
}
RENDER = {
    "small": dict(B=1, res=32, C=32, HW=128, n_coarse=48, n_fine=48),
    "eg3d64": dict(B=4, res=64, C=32, HW=256, n_coarse=48, n_fine=48),
    "eg3d128": dict(B=4, res=128, C=32, HW=256, n_coarse=48, n_fine=48),
}


def _composite_inputs(p, device, seed):
    gen = torch.Generator().manual_seed(seed)
    f = torch.rand(p["B"], p["R"], p["S"], p["C"], generator=gen)
    s = torch.randn(p["B"], p["R"], p["S"], generator=gen) * 4
    t = 2.25 + torch.sort(torch.rand(p["B"], p["R"], p["S"], generator=gen), -1).values * 1.05
    return [f.to(device).requires_grad_(), s.to(device).requires_grad_(), t.to(device)]


def _importance_inputs(p, device, seed):
    gen = torch.Generator().manual_seed(seed)
    t = 2.25 + torch.sort(torch.rand(p["B"], p["R"], p["S"], generator=gen), -1).values * 1.05
    w = torch.rand(p["B"], p["R"], p["S"] - 1, generator=gen) ** 4
    u = torch.rand(p["B"], p["R"], p["M"], generator=gen)
    return [t.to(device), w.to(device), u.to(device)]


def eg3d_cameras(B: int, gen: torch.Generator) -> torch.Tensor:
    """(B, 25) EG3D labels: radius 2.7 looking at the origin, yaw / pitch within +-0.3 rad."""
    cams = []
    for _ in range(B):
        yaw, pitch = ((torch.rand(2, generator=gen) - 0.5) * 0.6).tolist()
        pos = 2.7 * torch.tensor([math.sin(yaw) * math.cos(pitch), math.sin(pitch),
                                  math.cos(yaw) * math.cos(pitch)])
        fwd = -pos / pos.norm()
        right = torch.nn.functional.normalize(torch.linalg.cross(torch.tensor([0.0, 1, 0]), fwd),
                                              dim=0)
        down = torch.linalg.cross(fwd, right)
        m = torch.eye(4)
        m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, down, fwd, pos
        k = torch.tensor([4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1])
        cams.append(torch.cat([m.flatten(), k]))
    return torch.stack(cams)


def _render_inputs(p, device, seed):
    gen = torch.Generator().manual_seed(seed)
    B, R, C = p["B"], p["res"] ** 2, p["C"]
    planes = torch.randn(B, 3, C, p["HW"], p["HW"], generator=gen)
    o, d = ray_bundle(eg3d_cameras(B, gen), p["res"])
    w1 = torch.randn(64, C, generator=gen) / math.sqrt(C)
    b1 = torch.zeros(64)
    w2 = torch.randn(33, 64, generator=gen) / 8
    b2 = torch.zeros(33)
    noise = torch.rand(B, R, p["n_coarse"], generator=gen)
    u = torch.rand(B, R, p["n_fine"], generator=gen)
    leaves = [x.to(device).requires_grad_() for x in (planes, w1, b1, w2, b2)]
    return leaves[:1] + [o.to(device), d.to(device)] + leaves[1:] + [noise.to(device),
                                                                      u.to(device)]


def _render_fn(p, impl, planes, o, d, w1, b1, w2, b2, noise, u):
    kw = dict(near=2.25, far=3.3, n_coarse=p["n_coarse"], n_fine=p["n_fine"], plane_axes="eg3d",
              box_size=1.0, stratified_noise=noise, importance_u=u)
    if impl == "reference":
        return render_triplane_reference(planes, o, d, (w1, b1, w2, b2), **kw)
    backend, recompute = impl
    return render_triplane(planes, o, d, (w1, b1, w2, b2), backend=backend,
                           recompute=recompute, **kw)


def cases(device: torch.device, size: str) -> list[BenchCase]:
    if size == "small":
        names = ["small"]
    else:
        names = ["small", "eg3d64"] + (["eg3d128"] if device.type == "cuda" else [])
    ops = _backend.registered_ops()
    compiled = "cuda" if device.type == "cuda" else "cpu"
    out = []
    for name in names:
        providers = {"reference": functools.partial(mip_composite_reference)}
        if _backend.backend_status(ops["mip_composite"], compiled, device.type)[0]:
            providers[compiled] = functools.partial(mip_composite, backend=compiled)
        out.append(BenchCase("mip_composite", name, COMPOSITE[name],
                             functools.partial(_composite_inputs, COMPOSITE[name]), providers))
        m = IMPORTANCE[name]["M"]
        providers = {"reference": lambda t, w, u, _m=m: sample_importance_reference(t, w, _m, u)}
        if _backend.backend_status(ops["sample_importance"], compiled, device.type)[0]:
            providers[compiled] = lambda t, w, u, _m=m: sample_importance(t, w, _m, u=u,
                                                                          backend=compiled)
        out.append(BenchCase("sample_importance", name, IMPORTANCE[name],
                             functools.partial(_importance_inputs, IMPORTANCE[name]), providers))
        p = RENDER[name]
        providers = {"reference": functools.partial(_render_fn, p, "reference")}
        if _backend.backend_status(ops["render_triplane"], compiled, device.type)[0]:
            providers["unfused"] = functools.partial(_render_fn, p, (compiled, False))
            providers["fused"] = functools.partial(_render_fn, p, (compiled, True))
        if _backend.backend_status(ops["render_triplane"], "triton", device.type)[0] and \
                device.type == "cuda":
            providers["triton"] = functools.partial(_render_fn, p, ("triton", True))
        out.append(BenchCase("render_triplane", name, p,
                             functools.partial(_render_inputs, p), providers))
    return out
