"""Benchmark cases of the rasterization family.

* ``points_to_triplane``: against GOHA's method (``goha_cdist``: per sample and plane, the full
  texel x point ``torch.cdist`` matrix, ``argmin``, gather), B=4, N=16384 points, C=32.
* ``splat_points``: against the pure-PyTorch reference (every point x covered-pixel pair
  materialised, ``scatter_reduce``).
* ``rasterize_mesh``: a closed 35k-vertex / 69.5k-face surface (a head-sized UV ellipsoid, the
  size of a BFM head) projected with the BFM camera at 512^2, plus a small case with the
  reference (the dense reference is far too slow at head size).
"""
from __future__ import annotations

import functools
import math

import torch

from pyface import _backend
from pyface.bench.harness import BenchCase
from pyface.ops import points_to_triplane, project_points, rasterize_mesh, splat_points
from pyface.ops.reference import rasterize_mesh_reference, splat_points_reference
from pyface.ops.reference.triplane import project_onto_planes

P2T_SHAPES = {
    "128": dict(B=4, N=16384, C=32, R=128),
    "256": dict(B=4, N=16384, C=32, R=256),
}
SPLAT_SHAPES = {
    "small": dict(B=4, N=16384, C=32, H=128, W=128, radius=0.5),
    "256": dict(B=4, N=65536, C=32, H=256, W=256, radius=0.5),
}
MESH_SHAPES = {
    "small": dict(B=1, nu=40, nv=26, C=3, H=96, W=96),
    "head512": dict(B=1, nu=250, nv=140, C=3, H=512, W=512),
}


def goha_cdist(points: torch.Tensor, features: torch.Tensor, resolution: int):
    """GOHA's construct_planes lifting (``align_corners=True`` texel grid, coordinates x2): one
    dense (R^2, N) ``torch.cdist`` per sample and plane, ``argmin``, gather.
    -> (B, 3, C, R, R)."""
    B, N, C = features.shape
    lin = torch.linspace(-1.0, 1.0, resolution, device=points.device, dtype=points.dtype)
    v, u = torch.meshgrid(lin, lin, indexing="ij")
    uv = torch.stack([u.reshape(-1), v.reshape(-1)], -1)
    coords = project_onto_planes(points * 2.0, "xy_xz_zy")  # (B, 3, N, 2)
    out = []
    for b in range(B):
        planes = []
        for p in range(3):
            idx = torch.cdist(uv, coords[b, p]).argmin(-1)  # (R^2,)
            planes.append(features[b, idx].t().reshape(C, resolution, resolution))
        out.append(torch.stack(planes))
    return torch.stack(out)


def _depth_cloud(p: dict, device, seed):
    """A GOHA-like cloud: a 128^2 depth map of a bumpy surface lifted to 3D, plus features."""
    gen = torch.Generator().manual_seed(seed)
    s = int(math.isqrt(p["N"]))
    u, v = torch.meshgrid(torch.linspace(-0.35, 0.35, s), torch.linspace(-0.45, 0.45, s),
                          indexing="ij")
    pts = []
    for _ in range(p["B"]):
        z = 0.15 * torch.cos(2.5 * u) * torch.cos(2.0 * v) + 0.02 * torch.randn(s, s, generator=gen)
        pts.append(torch.stack([u, v, z], -1).reshape(-1, 3))
    points = torch.stack(pts).to(device)
    feats = torch.randn(p["B"], s * s, p["C"], generator=gen).to(device)
    return [points, feats.requires_grad_()]


def _splat_inputs(p: dict, device, seed):
    gen = torch.Generator().manual_seed(seed)
    pts = torch.rand(p["B"], p["N"], 3, generator=gen) * 2 - 1
    pts[..., 2] += 2.0
    feats = torch.randn(p["B"], p["N"], p["C"], generator=gen)
    return [pts.to(device), feats.to(device).requires_grad_()]


def head_mesh(nu: int = 250, nv: int = 140):
    """(V, 3) vertices and (F, 3) faces of a closed head-sized UV ellipsoid (BFM units: metres
    x 10, centred at the origin), 35,000 vertices / 69,500 faces at the default size."""
    th = torch.linspace(0, math.pi, nv)
    ph = torch.linspace(0, 2 * math.pi, nu + 1)[:-1]
    t, q = torch.meshgrid(th, ph, indexing="ij")
    verts = torch.stack([t.sin() * q.cos() * 0.8, -t.cos() * 1.0, t.sin() * q.sin() * 0.9], -1)
    i = torch.arange(nv - 1)[:, None]
    j = torch.arange(nu)[None]
    a, b = i * nu + j, i * nu + (j + 1) % nu
    c, d = (i + 1) * nu + j, (i + 1) * nu + (j + 1) % nu
    faces = torch.cat([torch.stack([a, b, c], -1).reshape(-1, 3),
                       torch.stack([b, d, c], -1).reshape(-1, 3)])
    return verts.reshape(-1, 3), faces


def _mesh_inputs(p: dict, device, seed):
    gen = torch.Generator().manual_seed(seed)
    verts, faces = head_mesh(p["nu"], p["nv"])
    ndc = project_points(verts[None].expand(p["B"], -1, -1), "bfm")
    attrs = torch.rand(p["B"], verts.shape[0], p["C"], generator=gen)
    return [ndc.to(device), faces.to(device), attrs.to(device).requires_grad_()]


def _first(fn):
    @functools.wraps(fn)
    def wrapped(*args):
        return fn(*args)[0]
    return wrapped


def _providers(op: str, device, fn) -> dict:
    spec = _backend.registered_ops()[op]
    out = {}
    for b in ("cpu", "cuda"):
        if _backend.backend_status(spec, b, device.type)[0]:
            out[b] = _first(functools.partial(fn, backend=b))
    return out


def cases(device: torch.device, size: str) -> list[BenchCase]:
    out = []
    p2t = ["128"] if size == "small" else ["128", "256"]
    for name in p2t:
        p = P2T_SHAPES[name]
        R = p["R"]
        providers = {"reference": functools.partial(goha_cdist, resolution=R)}
        providers.update(_providers(
            "points_to_triplane", device,
            lambda pts, f, backend, R=R: points_to_triplane(pts, f, R, plane_axes="xy_xz_zy",
                                                            align_corners=True,
                                                            backend=backend)))
        out.append(BenchCase("points_to_triplane", name, p,
                             functools.partial(_depth_cloud, p), providers))
    for name in (["small"] if size == "small" else ["small", "256"]):
        p = SPLAT_SHAPES[name]
        size_hw = (p["H"], p["W"])
        providers = {"reference": _first(functools.partial(splat_points_reference,
                                                           image_size=size_hw,
                                                           radius=p["radius"]))}
        providers.update(_providers(
            "splat_points", device,
            lambda pts, f, backend, hw=size_hw, r=p["radius"]: splat_points(
                pts, f, hw, radius=r, backend=backend)))
        out.append(BenchCase("splat_points", name, p, functools.partial(_splat_inputs, p),
                             providers))
    for name in ("small", "head512"):
        p = MESH_SHAPES[name]
        hw = (p["H"], p["W"])
        providers = {}
        if name == "small":
            providers["reference"] = _first(
                lambda v, f, a, hw=hw: rasterize_mesh_reference(v, f, hw, a))
        providers.update(_providers(
            "rasterize_mesh", device,
            lambda v, f, a, backend, hw=hw: rasterize_mesh(v, f, hw, a, backend=backend)))
        out.append(BenchCase("rasterize_mesh", name, p, functools.partial(_mesh_inputs, p),
                             providers))
    return out
