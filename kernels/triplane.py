# Provenance: reproduces the tri-plane sampling (sample_from_planes) of EG3D (NVlabs/eg3d, commit
# 7cf1fd1, NVIDIA Source Code License, non-commercial). Our own implementation, written from the
# papers and the upstream's documented behaviour; no upstream code is copied. pyface's code is
# licensed under Apache-2.0 (LICENSE).
"""Triton kernels for tri-plane bilinear sampling (forward and backward).

One program handles BLOCK_N points of one batch item and loops over channel chunks of BLOCK_C:
for each of the 3 planes it gathers the 4 bilinear taps as [BLOCK_N, BLOCK_C] tiles through the
planes' strides, so a channels-last plane layout (channel stride 1) gives coalesced loads. The
backward scatters plane gradients with atomics and reduces point gradients in registers.

Launch through :func:`forward` / :func:`backward`; ``wrap`` is ``torch.library.wrap_triton`` when
called from a ``triton_op`` (so ``torch.compile`` can trace the launch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

AXES = {"xy_xz_zy": 0, "eg3d": 1}
REDUCE = {"mean": 0, "sum": 1, "none": 2}


@triton.jit
def _plane_uv(x, y, z, PLANE: tl.constexpr, AXES_EG3D: tl.constexpr):
    if PLANE == 0:
        return x, y
    elif PLANE == 1:
        return x, z
    else:
        if AXES_EG3D:
            return z, x
        else:
            return z, y


@triton.jit
def _taps(u, v, W, H, ALIGN: tl.constexpr):
    # grid_sampler_unnormalize, then clamp to [-2, size + 1] (all taps invalid beyond)
    if ALIGN:
        ix = (u + 1.0) / 2.0 * (W - 1)
        iy = (v + 1.0) / 2.0 * (H - 1)
    else:
        ix = ((u + 1.0) * W - 1.0) / 2.0
        iy = ((v + 1.0) * H - 1.0) / 2.0
    nan = (ix != ix) | (iy != iy)
    ix = tl.where(nan, 0.0, ix)
    iy = tl.where(nan, 0.0, iy)
    ix = tl.minimum(tl.maximum(ix, -2.0), W + 1.0)
    iy = tl.minimum(tl.maximum(iy, -2.0), H + 1.0)
    fx0 = tl.floor(ix)
    fy0 = tl.floor(iy)
    return ix, iy, fx0, fy0, nan


@triton.jit
def _block_points(points_ptr, N, scale, BLOCK_N: tl.constexpr):
    """This program's block of BLOCK_N points of one batch item: (batch item, point indices,
    which are < N, and the scaled coordinates x, y, z, 0 past N)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    pt = points_ptr + (b * N + offs_n) * 3
    x = tl.load(pt + 0, mask=mask_n, other=0.0).to(tl.float32) * scale
    y = tl.load(pt + 1, mask=mask_n, other=0.0).to(tl.float32) * scale
    z = tl.load(pt + 2, mask=mask_n, other=0.0).to(tl.float32) * scale
    return b, offs_n, mask_n, x, y, z


@triton.jit
def _tap(K: tl.constexpr, ix, iy, fx0, fy0, x0, y0, W, H):
    """Tap K (0 nw, 1 ne, 2 sw, 3 se): coordinates, validity, weight and its derivatives."""
    xk = x0 + (K % 2)
    yk = y0 + (K // 2)
    wx = (ix - fx0) if K % 2 == 1 else (fx0 + 1.0 - ix)
    wy = (iy - fy0) if K // 2 == 1 else (fy0 + 1.0 - iy)
    sx = 1.0 if K % 2 == 1 else -1.0
    sy = 1.0 if K // 2 == 1 else -1.0
    valid = (xk >= 0) & (xk < W) & (yk >= 0) & (yk < H)
    return xk, yk, valid, wx * wy, sx * wy, sy * wx


@triton.jit
def _plane_fwd_tile(base, ix, iy, fx0, fy0, nan, W, H, coff, s_ph, s_pw, m2):
    """Bilinear sample of one plane (base, strides) for a [points, channels] tile; ``coff`` is
    the channel offsets (1, BLOCK_C), ``m2`` the tile mask. Taps outside the plane read zeros;
    a NaN coordinate (``nan``) gives NaN features."""
    x0 = fx0.to(tl.int64)
    y0 = fy0.to(tl.int64)
    val = tl.zeros(m2.shape, dtype=tl.float32)
    for k in tl.static_range(4):
        xk, yk, valid, w, _, _ = _tap(k, ix, iy, fx0, fy0, x0, y0, W, H)
        ptrs = base + (yk * s_ph + xk * s_pw)[:, None] + coff
        tap = tl.load(ptrs, mask=m2 & valid[:, None], other=0.0).to(tl.float32)
        val += tap * w[:, None]
    return tl.where(nan[:, None], float("nan"), val)


@triton.jit
def _plane_bwd_tile(base, gbase, ix, iy, fx0, fy0, nan, W, H, offs_c, s_ph, s_pw, s_pc, g, m2,
                    NEED_PLANES: tl.constexpr, NEED_POINTS: tl.constexpr):
    """Backward of one plane's bilinear sample for a [points, channels] tile of cotangents ``g``:
    scatters ``w * g`` into the contiguous (C, H, W) plane gradient at ``gbase`` (atomics) and
    returns the derivatives w.r.t. the pixel coordinates (ix, iy) of every point."""
    x0 = fx0.to(tl.int64)
    y0 = fy0.to(tl.int64)
    oc = offs_c.to(tl.int64)[None, :]
    gx = tl.zeros_like(ix)
    gy = tl.zeros_like(iy)
    for k in tl.static_range(4):
        xk, yk, valid, w, dwdx, dwdy = _tap(k, ix, iy, fx0, fy0, x0, y0, W, H)
        mk = m2 & (valid & (~nan))[:, None]
        if NEED_PLANES:
            tl.atomic_add(gbase + oc * (H * W) + (yk * W + xk)[:, None], g * w[:, None], mask=mk)
        if NEED_POINTS:
            ptrs = base + (yk * s_ph + xk * s_pw)[:, None] + oc * s_pc
            tap = tl.load(ptrs, mask=mk, other=0.0).to(tl.float32)
            dot = tl.sum(tap * g, axis=1)
            gx += dwdx * dot
            gy += dwdy * dot
    return gx, gy


@triton.jit
def _point_grad(gx, gy, nan, W, H, scale, gpx, gpy, gpz, PLANE: tl.constexpr,
                AXES_EG3D: tl.constexpr, ALIGN: tl.constexpr):
    """Chain rule from one plane's pixel coordinates (ix, iy) to the point (x, y, z), added to
    (gpx, gpy, gpz): d(pixel)/d(world) is (size - 1) / 2 * scale with ``align_corners`` and
    size / 2 * scale without, routed to the plane's two axes (``_plane_uv``). A NaN coordinate
    gives a NaN gradient, as its forward gives NaN features (the taps were evaluated at 0)."""
    if ALIGN:
        gx = gx * ((W - 1) / 2.0) * scale
        gy = gy * ((H - 1) / 2.0) * scale
    else:
        gx = gx * (W / 2.0) * scale
        gy = gy * (H / 2.0) * scale
    gx = tl.where(nan, float("nan"), gx)
    gy = tl.where(nan, float("nan"), gy)
    if PLANE == 0:
        gpx += gx
        gpy += gy
    elif PLANE == 1:
        gpx += gx
        gpz += gy
    else:
        gpz += gx
        if AXES_EG3D:
            gpx += gy
        else:
            gpy += gy
    return gpx, gpy, gpz


@triton.jit
def _triplane_fwd_kernel(
    planes_ptr, points_ptr, out_ptr,
    N, H, W,
    s_pb, s_pp, s_pc, s_ph, s_pw,
    scale,
    C: tl.constexpr,
    AXES_EG3D: tl.constexpr, ALIGN: tl.constexpr, REDUCE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, offs_n, mask_n, x, y, z = _block_points(points_ptr, N, scale, BLOCK_N)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        coff = offs_c.to(tl.int64)[None, :] * s_pc
        m2 = mask_n[:, None] & mask_c[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for plane in tl.static_range(3):
            u, v = _plane_uv(x, y, z, plane, AXES_EG3D)
            ix, iy, fx0, fy0, nan = _taps(u, v, W, H, ALIGN)
            base = planes_ptr + b * s_pb + plane * s_pp
            val = _plane_fwd_tile(base, ix, iy, fx0, fy0, nan, W, H, coff, s_ph, s_pw, m2)
            if REDUCE == 2:
                optr = out_ptr + ((b * 3 + plane) * N + offs_n)[:, None] * C + offs_c[None, :]
                tl.store(optr, val.to(out_ptr.dtype.element_ty), mask=m2)
            else:
                acc += val
        if REDUCE != 2:
            if REDUCE == 0:
                acc = acc / 3.0
            optr = out_ptr + (b * N + offs_n)[:, None] * C + offs_c[None, :]
            tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _triplane_bwd_kernel(
    grad_out_ptr, planes_ptr, points_ptr, grad_planes_ptr, grad_points_ptr,
    N, H, W,
    s_pb, s_pp, s_pc, s_ph, s_pw,
    scale,
    C: tl.constexpr,
    AXES_EG3D: tl.constexpr, ALIGN: tl.constexpr, REDUCE: tl.constexpr,
    NEED_PLANES: tl.constexpr, NEED_POINTS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, offs_n, mask_n, x, y, z = _block_points(points_ptr, N, scale, BLOCK_N)
    gpx = tl.zeros((BLOCK_N,), dtype=tl.float32)
    gpy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    gpz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    HW = H * W
    for plane in tl.static_range(3):
        u, v = _plane_uv(x, y, z, plane, AXES_EG3D)
        ix, iy, fx0, fy0, nan = _taps(u, v, W, H, ALIGN)
        base = planes_ptr + b * s_pb + plane * s_pp
        gbase = grad_planes_ptr + (b * 3 + plane) * C * HW  # contiguous (B, 3, C, H, W)
        gx = tl.zeros((BLOCK_N,), dtype=tl.float32)
        gy = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            m2 = mask_n[:, None] & mask_c[None, :]
            if REDUCE == 2:
                gptr = grad_out_ptr + ((b * 3 + plane) * N + offs_n)[:, None] * C + offs_c[None, :]
            else:
                gptr = grad_out_ptr + (b * N + offs_n)[:, None] * C + offs_c[None, :]
            go = tl.load(gptr, mask=m2, other=0.0).to(tl.float32)
            if REDUCE == 0:
                go = go / 3.0
            dgx, dgy = _plane_bwd_tile(base, gbase, ix, iy, fx0, fy0, nan, W, H, offs_c, s_ph, s_pw,
                                       s_pc, go, m2, NEED_PLANES, NEED_POINTS)
            gx += dgx
            gy += dgy
        if NEED_POINTS:
            gpx, gpy, gpz = _point_grad(gx, gy, nan, W, H, scale, gpx, gpy, gpz, plane,
                                        AXES_EG3D, ALIGN)
    if NEED_POINTS:
        gpt = grad_points_ptr + (b * N + offs_n) * 3
        tl.store(gpt + 0, gpx, mask=mask_n)
        tl.store(gpt + 1, gpy, mask=mask_n)
        tl.store(gpt + 2, gpz, mask=mask_n)


def _blocks(C: int, interpret: bool) -> tuple[int, int]:
    block_c = min(64, triton.next_power_of_2(max(C, 1)))
    block_n = 16 if interpret else max(16, 4096 // block_c // 4)
    return block_n, block_c


def _identity(kernel):
    return kernel


def forward(planes: torch.Tensor, points: torch.Tensor, plane_axes: str, box_size: float,
            reduce: str, align_corners: bool, *, wrap=_identity, interpret: bool = False
            ) -> torch.Tensor:
    """planes (B, 3, C, H, W) any strides; points (B, N, 3) float32 contiguous."""
    B, _, C, H, W = planes.shape
    N = points.shape[1]
    shape = (B, 3, N, C) if reduce == "none" else (B, N, C)
    out = torch.empty(shape, device=planes.device, dtype=planes.dtype)
    if out.numel() == 0:
        return out
    block_n, block_c = _blocks(C, interpret)
    grid = (triton.cdiv(N, block_n), B)
    wrap(_triplane_fwd_kernel)[grid](
        planes, points, out, N, H, W, *planes.stride(), 2.0 / box_size, C=C,
        AXES_EG3D=AXES[plane_axes] == 1, ALIGN=bool(align_corners), REDUCE=REDUCE[reduce],
        BLOCK_N=block_n, BLOCK_C=block_c)
    return out


def backward(grad_out: torch.Tensor, planes: torch.Tensor, points: torch.Tensor, plane_axes: str,
             box_size: float, reduce: str, align_corners: bool, need_planes: bool,
             need_points: bool, *, wrap=_identity, interpret: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (grad_planes (B, 3, C, H, W) float32 contiguous or empty, grad_points float32)."""
    B, _, C, H, W = planes.shape
    N = points.shape[1]
    dev = planes.device
    grad_planes = (torch.zeros(planes.shape, device=dev, dtype=torch.float32) if need_planes
                   else torch.empty(0, device=dev, dtype=torch.float32))
    grad_points = (torch.zeros(points.shape, device=dev, dtype=torch.float32) if need_points
                   else torch.empty(0, device=dev, dtype=torch.float32))
    if B * N == 0 or not (need_planes or need_points):
        return grad_planes, grad_points
    block_n, block_c = _blocks(C, interpret)
    grid = (triton.cdiv(N, block_n), B)
    wrap(_triplane_bwd_kernel)[grid](
        grad_out, planes, points, grad_planes, grad_points, N, H, W, *planes.stride(),
        2.0 / box_size, C=C,
        AXES_EG3D=AXES[plane_axes] == 1, ALIGN=bool(align_corners), REDUCE=REDUCE[reduce],
        NEED_PLANES=bool(need_planes), NEED_POINTS=bool(need_points),
        BLOCK_N=block_n, BLOCK_C=block_c)
    return grad_planes, grad_points
