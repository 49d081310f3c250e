"""Benchmark cases of 3D-flow warping (face-vid2vid / LivePortrait shapes).

Volume 16 x 64 x 64 with C = 32 (the appearance volume) for the warps; the dense-motion input
is built from the compressed 4-channel volume as in face-vid2vid (C = 32 in the full set too).
Keypoints are uniform in [-0.8, 0.8]^3, masks a softmax over K+1 of N(0, 1) logits, and the
warp_volume grid the voxel-centre identity plus N(0, 0.05) (a smooth flow, not random gathers).
"""
from __future__ import annotations

import functools

import torch

from pyface import _backend
from pyface.bench.harness import BenchCase
from pyface.ops import keypoint_flow, motion_field_input, warp_by_keypoints, warp_volume
from pyface.ops.reference import (keypoint_flow_reference, motion_field_input_reference,
                                  warp_by_keypoints_reference, warp_volume_reference)
from pyface.ops.reference.warp import make_coordinate_grid

VOLUME = dict(D=16, H=64, W=64)


def _shape(B, C, K):
    return dict(B=B, C=C, K=K, **VOLUME)


SMALL = {
    "warp_by_keypoints": {"B4-K15": _shape(4, 32, 15)},
    "motion_field_input": {"B4-K15-C4": _shape(4, 4, 15)},
    "warp_volume": {"B4": _shape(4, 32, 0)},
    "keypoint_flow": {"B4-K15": _shape(4, 0, 15)},
}
FULL = {
    "warp_by_keypoints": {f"B{B}-K{K}": _shape(B, 32, K) for B in (4, 32) for K in (15, 21)},
    "motion_field_input": {**{f"B{B}-K{K}-C4": _shape(B, 4, K) for B in (4, 32)
                              for K in (15, 21)},
                           "B4-K21-C32": _shape(4, 32, 21)},
    "warp_volume": {"B4": _shape(4, 32, 0), "B32": _shape(32, 32, 0)},
    "keypoint_flow": {f"B{B}-K{K}": _shape(B, 0, K) for B in (4, 32) for K in (15, 21)},
}


def _volume(p, gen):
    return torch.randn(p["B"], p["C"], p["D"], p["H"], p["W"], generator=gen)


def _kps(p, gen):
    return (torch.rand(p["B"], p["K"], 3, generator=gen) * 1.6 - 0.8)


def _masks(p, gen):
    return torch.randn(p["B"], p["K"] + 1, p["D"], p["H"], p["W"], generator=gen).softmax(1)


def _inputs(op, p, device, seed):
    gen = torch.Generator().manual_seed(seed)
    if op == "warp_volume":
        grid = make_coordinate_grid((p["D"], p["H"], p["W"]), align_corners=False)
        grid = grid + 0.05 * torch.randn(p["B"], *grid.shape, generator=gen)
        tensors = [_volume(p, gen), grid]
    elif op == "keypoint_flow":
        tensors = [_kps(p, gen), _kps(p, gen), _masks(p, gen)]
    elif op == "warp_by_keypoints":
        tensors = [_volume(p, gen), _kps(p, gen), _kps(p, gen), _masks(p, gen)]
    else:
        tensors = [_volume(p, gen), _kps(p, gen), _kps(p, gen)]
    return [t.to(device).requires_grad_() for t in tensors]


_FNS = {
    "warp_volume": (warp_volume, warp_volume_reference),
    "keypoint_flow": (keypoint_flow, keypoint_flow_reference),
    "warp_by_keypoints": (warp_by_keypoints, warp_by_keypoints_reference),
    "motion_field_input": (motion_field_input, motion_field_input_reference),
}


def cases(device: torch.device, size: str) -> list[BenchCase]:
    table = SMALL if size == "small" else FULL
    ops = _backend.registered_ops()
    out = []
    for op, shapes in table.items():
        fn, ref = _FNS[op]
        for name, params in shapes.items():
            providers = {"reference": ref}
            for b in ("cpu", "cuda", "triton"):
                if _backend.backend_status(ops[op], b, device.type)[0]:
                    providers[b] = functools.partial(fn, backend=b)
            out.append(BenchCase(op, name, params, functools.partial(_inputs, op, params),
                                 providers))
    return out
