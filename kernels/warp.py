"""Triton kernels for 3D-flow warping (forward and backward).

One program handles BLOCK_V consecutive output voxels of one batch item: it computes their sample
positions (a given grid, the keypoint flow computed on the fly from K+1 masks, or one sparse
motion), then loops over channel chunks of BLOCK_C and gathers the 8 trilinear taps as
[BLOCK_V, BLOCK_C] tiles through the volume's strides. Backward kernels scatter the volume
gradient with atomics (float32 accumulator), reduce position gradients over channels in
registers, write mask gradients directly, and write per-program keypoint-gradient partials
(summed on the host, so there are no atomics on the 15 * K keypoint scalars).

Keypoint partial layout: (B, programs, K, 15) = [d kp_source (3), d kp_driving (3), d J (9)].
Launch through the host functions at the bottom; ``wrap`` is ``torch.library.wrap_triton`` when
called from a ``triton_op``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# ------------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------------

@triton.jit
def _icoord(i, n, ALIGN: tl.constexpr):
    """Identity-grid coordinate of index i on an axis of n voxels (0 for n == 1)."""
    fi = i.to(tl.float32)
    if ALIGN:
        c = 2.0 * (fi / tl.maximum(n - 1, 1).to(tl.float32)) - 1.0
    else:
        c = (2.0 * fi + 1.0) / n.to(tl.float32) - 1.0
    return tl.where(n == 1, 0.0, c)


@triton.jit
def _identity(v, Do, Ho, Wo, GRID_ALIGN: tl.constexpr):
    w = v % Wo
    h = (v // Wo) % Ho
    d = v // (Wo * Ho)
    return _icoord(w, Wo, GRID_ALIGN), _icoord(h, Ho, GRID_ALIGN), _icoord(d, Do, GRID_ALIGN)


@triton.jit
def _block(n, BLOCK_V: tl.constexpr):
    """This program's block: (batch item, BLOCK_V voxel indices, which are < n)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    return b, v, v < n


@triton.jit
def _minus_row(kp_ptr, idx, zx, zy, zz):
    """z - kp of keypoint row idx (= b * K + k) of a (B, K, 3) keypoint tensor."""
    return (zx - tl.load(kp_ptr + idx * 3 + 0), zy - tl.load(kp_ptr + idx * 3 + 1),
            zz - tl.load(kp_ptr + idx * 3 + 2))


@triton.jit
def _gauss(dx, dy, dz, inv_var):
    """exp(-|d|^2 / (2 variance))."""
    return tl.exp(-0.5 * (dx * dx + dy * dy + dz * dz) * inv_var)


@triton.jit
def _motion(kps_ptr, kpd_ptr, jac_ptr, idx, zx, zy, zz, HAS_JAC: tl.constexpr):
    """Sparse motion J (z - kp_driving) + kp_source of keypoint row idx (= b * K + k)."""
    ex, ey, ez = _minus_row(kpd_ptr, idx, zx, zy, zz)
    if HAS_JAC:
        j = jac_ptr + idx * 9
        mx = tl.load(j + 0) * ex + tl.load(j + 1) * ey + tl.load(j + 2) * ez
        my = tl.load(j + 3) * ex + tl.load(j + 4) * ey + tl.load(j + 5) * ez
        mz = tl.load(j + 6) * ex + tl.load(j + 7) * ey + tl.load(j + 8) * ez
    else:
        mx = ex
        my = ey
        mz = ez
    return (mx + tl.load(kps_ptr + idx * 3 + 0), my + tl.load(kps_ptr + idx * 3 + 1),
            mz + tl.load(kps_ptr + idx * 3 + 2))


@triton.jit
def _flow(masks_ptr, kps_ptr, kpd_ptr, jac_ptr, b, v, mask_v, zx, zy, zz, Vo,
          K: tl.constexpr, HAS_JAC: tl.constexpr):
    mb = masks_ptr + b * (K + 1) * Vo
    m0 = tl.load(mb + v, mask=mask_v, other=0.0).to(tl.float32)
    fx = m0 * zx
    fy = m0 * zy
    fz = m0 * zz
    for k in range(K):
        mk = tl.load(mb + (k + 1) * Vo + v, mask=mask_v, other=0.0).to(tl.float32)
        mx, my, mz = _motion(kps_ptr, kpd_ptr, jac_ptr, b * K + k, zx, zy, zz, HAS_JAC)
        fx += mk * mx
        fy += mk * my
        fz += mk * mz
    return fx, fy, fz


@triton.jit
def _load_xyz(p, mask):
    """The three components of (..., 3) rows at p (0 where masked)."""
    return (tl.load(p + 0, mask=mask, other=0.0), tl.load(p + 1, mask=mask, other=0.0),
            tl.load(p + 2, mask=mask, other=0.0))


@triton.jit
def _store_xyz(p, x, y, z, mask):
    """Stores x, y, z as the three components of (..., 3) rows at p."""
    tl.store(p + 0, x, mask=mask)
    tl.store(p + 1, y, mask=mask)
    tl.store(p + 2, z, mask=mask)


@triton.jit
def _zero_outside(mask, x, y, z):
    """x, y, z with 0 where mask is False."""
    return tl.where(mask, x, 0.0), tl.where(mask, y, 0.0), tl.where(mask, z, 0.0)


@triton.jit
def _unnormalize(c, n, ALIGN: tl.constexpr):
    if ALIGN:
        r = (c + 1.0) / 2.0 * (n - 1)
    else:
        r = ((c + 1.0) * n - 1.0) / 2.0
    return r


@triton.jit
def _scale(n, ALIGN: tl.constexpr):
    if ALIGN:
        s = (n - 1) / 2.0
    else:
        s = n / 2.0
    return s


@triton.jit
def _taps(x, y, z, D, H, W, ALIGN: tl.constexpr):
    ix = _unnormalize(x, W, ALIGN)
    iy = _unnormalize(y, H, ALIGN)
    iz = _unnormalize(z, D, ALIGN)
    nan = (ix != ix) | (iy != iy) | (iz != iz)
    ix = tl.minimum(tl.maximum(tl.where(nan, 0.0, ix), -2.0), W + 1.0)
    iy = tl.minimum(tl.maximum(tl.where(nan, 0.0, iy), -2.0), H + 1.0)
    iz = tl.minimum(tl.maximum(tl.where(nan, 0.0, iz), -2.0), D + 1.0)
    return ix, iy, iz, tl.floor(ix), tl.floor(iy), tl.floor(iz), nan


@triton.jit
def _tap_axis(i, f, UPPER: tl.constexpr):
    """The lower (f) or upper (f + 1) neighbour of coordinate i along one axis (f = floor(i)):
    its coordinate, its 1-D weight and d weight / d i."""
    if UPPER:
        c = f + 1.0
        w = i - f
        s = 1.0
    else:
        c = f
        w = f + 1.0 - i
        s = -1.0
    return c, w, s


@triton.jit
def _tap(ix, iy, iz, fx, fy, fz, D, H, W, k: tl.constexpr):
    """Tap k (x + (k & 1), y + ((k >> 1) & 1), z + (k >> 2)): indices, weight, d weight / d i*."""
    xk, wx, sx = _tap_axis(ix, fx, k % 2 == 1)
    yk, wy, sy = _tap_axis(iy, fy, (k // 2) % 2 == 1)
    zk, wz, sz = _tap_axis(iz, fz, k // 4 == 1)
    xi = xk.to(tl.int64)
    yi = yk.to(tl.int64)
    zi = zk.to(tl.int64)
    valid = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H) & (zi >= 0) & (zi < D)
    return xi, yi, zi, wx * wy * wz, sx * wy * wz, sy * wx * wz, sz * wx * wy, valid


@triton.jit
def _sample_store(vol_ptr, out_ptr, b, v, mask_v, x, y, z, out_stride_c, out_base,
                  s_b, s_c, s_d, s_h, s_w, D, H, W,
                  C: tl.constexpr, ALIGN: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[out_base + c * out_stride_c + v] = trilinear sample of channel c at (x, y, z)."""
    ix, iy, iz, fx, fy, fz, nan = _taps(x, y, z, D, H, W, ALIGN)
    vb = vol_ptr + b * s_b
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        m2 = mask_v[:, None] & mask_c[None, :]
        coff = offs_c.to(tl.int64)[None, :] * s_c
        acc = tl.zeros((v.shape[0], BLOCK_C), dtype=tl.float32)
        for k in tl.static_range(8):
            xi, yi, zi, w, dx, dy, dz, valid = _tap(ix, iy, iz, fx, fy, fz, D, H, W, k)
            ptrs = vb + (zi * s_d + yi * s_h + xi * s_w)[:, None] + coff
            val = tl.load(ptrs, mask=m2 & valid[:, None], other=0.0).to(tl.float32)
            acc += val * w[:, None]
        acc = tl.where(nan[:, None], float("nan"), acc)
        optr = out_ptr + out_base + offs_c.to(tl.int64)[None, :] * out_stride_c + v[:, None]
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _sample_bwd(vol_ptr, go_ptr, gvol_ptr, b, v, mask_v, x, y, z, go_stride_c, go_base,
                s_b, s_c, s_d, s_h, s_w, D, H, W,
                C: tl.constexpr, ALIGN: tl.constexpr, NEED_VOL: tl.constexpr,
                NEED_POS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Scatters go * weight into gvol (contiguous (B, C, D, H, W) float32) and returns the
    gradient w.r.t. the normalized position (x, y, z)."""
    ix, iy, iz, fx, fy, fz, nan = _taps(x, y, z, D, H, W, ALIGN)
    vb = vol_ptr + b * s_b
    DHW = D * H * W
    gb = gvol_ptr + b * C * DHW
    gx = tl.zeros((v.shape[0],), dtype=tl.float32)
    gy = tl.zeros((v.shape[0],), dtype=tl.float32)
    gz = tl.zeros((v.shape[0],), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        m2 = mask_v[:, None] & mask_c[None, :]
        gptr = go_ptr + go_base + offs_c.to(tl.int64)[None, :] * go_stride_c + v[:, None]
        go = tl.load(gptr, mask=m2, other=0.0).to(tl.float32)
        for k in tl.static_range(8):
            xi, yi, zi, w, dx, dy, dz, valid = _tap(ix, iy, iz, fx, fy, fz, D, H, W, k)
            mk = m2 & (valid & ~nan)[:, None]
            if NEED_VOL:
                gp = gb + offs_c.to(tl.int64)[None, :] * DHW + \
                    ((zi * H + yi) * W + xi)[:, None]
                tl.atomic_add(gp, go * w[:, None], mask=mk)
            if NEED_POS:
                ptrs = vb + (zi * s_d + yi * s_h + xi * s_w)[:, None] + \
                    offs_c.to(tl.int64)[None, :] * s_c
                val = tl.load(ptrs, mask=mk, other=0.0).to(tl.float32)
                dot = tl.sum(val * go, axis=1)
                gx += dx * dot
                gy += dy * dot
                gz += dz * dot
    gx = tl.where(nan, float("nan"), gx * _scale(W, ALIGN))
    gy = tl.where(nan, float("nan"), gy * _scale(H, ALIGN))
    gz = tl.where(nan, float("nan"), gz * _scale(D, ALIGN))
    return gx, gy, gz


@triton.jit
def _store_kp_partials(part_ptr, row, w, gx, gy, gz, ex, ey, ez, jac_ptr, idx, extra_s, extra_d,
                       HAS_JAC: tl.constexpr, NEED_JAC: tl.constexpr):
    """part[row, 0:15] = sums over the block of the keypoint gradients of <g, w * motion>, plus
    extra_s / extra_d (3-tuples of block sums) added to the kp_source / kp_driving terms."""
    ax = w * gx
    ay = w * gy
    az = w * gz
    p = part_ptr + row * 15
    sx = tl.sum(ax, axis=0)
    sy = tl.sum(ay, axis=0)
    sz = tl.sum(az, axis=0)
    tl.store(p + 0, sx + extra_s[0])
    tl.store(p + 1, sy + extra_s[1])
    tl.store(p + 2, sz + extra_s[2])
    if HAS_JAC:
        j = jac_ptr + idx * 9
        tl.store(p + 3, extra_d[0] - (tl.load(j + 0) * sx + tl.load(j + 3) * sy
                                      + tl.load(j + 6) * sz))
        tl.store(p + 4, extra_d[1] - (tl.load(j + 1) * sx + tl.load(j + 4) * sy
                                      + tl.load(j + 7) * sz))
        tl.store(p + 5, extra_d[2] - (tl.load(j + 2) * sx + tl.load(j + 5) * sy
                                      + tl.load(j + 8) * sz))
        if NEED_JAC:
            tl.store(p + 6, tl.sum(ax * ex, axis=0))
            tl.store(p + 7, tl.sum(ax * ey, axis=0))
            tl.store(p + 8, tl.sum(ax * ez, axis=0))
            tl.store(p + 9, tl.sum(ay * ex, axis=0))
            tl.store(p + 10, tl.sum(ay * ey, axis=0))
            tl.store(p + 11, tl.sum(ay * ez, axis=0))
            tl.store(p + 12, tl.sum(az * ex, axis=0))
            tl.store(p + 13, tl.sum(az * ey, axis=0))
            tl.store(p + 14, tl.sum(az * ez, axis=0))
    else:
        tl.store(p + 3, extra_d[0] - sx)
        tl.store(p + 4, extra_d[1] - sy)
        tl.store(p + 5, extra_d[2] - sz)


@triton.jit
def _flow_bwd_tail(masks_ptr, kps_ptr, kpd_ptr, jac_ptr, gmasks_ptr, part_ptr, b, pid, nprog,
                   v, mask_v, zx, zy, zz, gx, gy, gz, Vo,
                   K: tl.constexpr, HAS_JAC: tl.constexpr, NEED_MASKS: tl.constexpr,
                   NEED_KP: tl.constexpr, NEED_JAC: tl.constexpr):
    """Mask and keypoint gradients given the flow gradient (gx, gy, gz) of the block."""
    gx, gy, gz = _zero_outside(mask_v, gx, gy, gz)
    mb = masks_ptr + b * (K + 1) * Vo
    gmb = gmasks_ptr + b * (K + 1) * Vo
    if NEED_MASKS:
        tl.store(gmb + v, gx * zx + gy * zy + gz * zz, mask=mask_v)
    for k in range(K):
        idx = b * K + k
        if NEED_MASKS:
            mx, my, mz = _motion(kps_ptr, kpd_ptr, jac_ptr, idx, zx, zy, zz, HAS_JAC)
            tl.store(gmb + (k + 1) * Vo + v, gx * mx + gy * my + gz * mz, mask=mask_v)
        if NEED_KP or NEED_JAC:
            mk = tl.load(mb + (k + 1) * Vo + v, mask=mask_v, other=0.0).to(tl.float32)
            ex, ey, ez = _minus_row(kpd_ptr, idx, zx, zy, zz)
            _store_kp_partials(part_ptr, (b * nprog + pid) * K + k, mk, gx, gy, gz, ex, ey, ez,
                               jac_ptr, idx, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), HAS_JAC, NEED_JAC)


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _warp_volume_fwd(vol_ptr, grid_ptr, out_ptr, Vo, s_b, s_c, s_d, s_h, s_w, D, H, W,
                     C: tl.constexpr, ALIGN: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    b, v, mask_v = _block(Vo, BLOCK_V)
    x, y, z = _load_xyz(grid_ptr + (b * Vo + v) * 3, mask_v)
    _sample_store(vol_ptr, out_ptr, b, v, mask_v, x, y, z, Vo, b * C * Vo,
                  s_b, s_c, s_d, s_h, s_w, D, H, W, C, ALIGN, BLOCK_C)


@triton.jit
def _warp_volume_bwd(vol_ptr, grid_ptr, go_ptr, gvol_ptr, ggrid_ptr, Vo,
                     s_b, s_c, s_d, s_h, s_w, D, H, W,
                     C: tl.constexpr, ALIGN: tl.constexpr, NEED_VOL: tl.constexpr,
                     NEED_GRID: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    b, v, mask_v = _block(Vo, BLOCK_V)
    x, y, z = _load_xyz(grid_ptr + (b * Vo + v) * 3, mask_v)
    gx, gy, gz = _sample_bwd(vol_ptr, go_ptr, gvol_ptr, b, v, mask_v, x, y, z, Vo, b * C * Vo,
                             s_b, s_c, s_d, s_h, s_w, D, H, W, C, ALIGN, NEED_VOL, NEED_GRID,
                             BLOCK_C)
    if NEED_GRID:
        _store_xyz(ggrid_ptr + (b * Vo + v) * 3, gx, gy, gz, mask_v)


@triton.jit
def _keypoint_flow_fwd(masks_ptr, kps_ptr, kpd_ptr, jac_ptr, flow_ptr, Vo, Do, Ho, Wo,
                       K: tl.constexpr, HAS_JAC: tl.constexpr, GRID_ALIGN: tl.constexpr,
                       BLOCK_V: tl.constexpr):
    b, v, mask_v = _block(Vo, BLOCK_V)
    zx, zy, zz = _identity(v, Do, Ho, Wo, GRID_ALIGN)
    fx, fy, fz = _flow(masks_ptr, kps_ptr, kpd_ptr, jac_ptr, b, v, mask_v, zx, zy, zz, Vo, K,
                       HAS_JAC)
    _store_xyz(flow_ptr + (b * Vo + v) * 3, fx, fy, fz, mask_v)


@triton.jit
def _keypoint_flow_bwd(gflow_ptr, masks_ptr, kps_ptr, kpd_ptr, jac_ptr, gmasks_ptr, part_ptr,
                       Vo, Do, Ho, Wo,
                       K: tl.constexpr, HAS_JAC: tl.constexpr, GRID_ALIGN: tl.constexpr,
                       NEED_MASKS: tl.constexpr, NEED_KP: tl.constexpr, NEED_JAC: tl.constexpr,
                       BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    b, v, mask_v = _block(Vo, BLOCK_V)
    zx, zy, zz = _identity(v, Do, Ho, Wo, GRID_ALIGN)
    gx, gy, gz = _load_xyz(gflow_ptr + (b * Vo + v) * 3, mask_v)
    _flow_bwd_tail(masks_ptr, kps_ptr, kpd_ptr, jac_ptr, gmasks_ptr, part_ptr, b, pid, nprog,
                   v, mask_v, zx, zy, zz, gx, gy, gz, Vo, K, HAS_JAC, NEED_MASKS, NEED_KP,
                   NEED_JAC)


@triton.jit
def _warp_by_keypoints_fwd(vol_ptr, masks_ptr, kps_ptr, kpd_ptr, jac_ptr, out_ptr,
                           Vo, Do, Ho, Wo, s_b, s_c, s_d, s_h, s_w, D, H, W,
                           C: tl.constexpr, K: tl.constexpr, HAS_JAC: tl.constexpr,
                           ALIGN: tl.constexpr, GRID_ALIGN: tl.constexpr,
                           BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    b, v, mask_v = _block(Vo, BLOCK_V)
    zx, zy, zz = _identity(v, Do, Ho, Wo, GRID_ALIGN)
    fx, fy, fz = _flow(masks_ptr, kps_ptr, kpd_ptr, jac_ptr, b, v, mask_v, zx, zy, zz, Vo, K,
                       HAS_JAC)
    _sample_store(vol_ptr, out_ptr, b, v, mask_v, fx, fy, fz, Vo, b * C * Vo,
                  s_b, s_c, s_d, s_h, s_w, D, H, W, C, ALIGN, BLOCK_C)


@triton.jit
def _warp_by_keypoints_bwd(vol_ptr, masks_ptr, kps_ptr, kpd_ptr, jac_ptr, go_ptr, gvol_ptr,
                           gmasks_ptr, part_ptr, Vo, Do, Ho, Wo, s_b, s_c, s_d, s_h, s_w, D, H, W,
                           C: tl.constexpr, K: tl.constexpr, HAS_JAC: tl.constexpr,
                           ALIGN: tl.constexpr, GRID_ALIGN: tl.constexpr,
                           NEED_VOL: tl.constexpr, NEED_MASKS: tl.constexpr,
                           NEED_KP: tl.constexpr, NEED_JAC: tl.constexpr,
                           BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    b, v, mask_v = _block(Vo, BLOCK_V)
    zx, zy, zz = _identity(v, Do, Ho, Wo, GRID_ALIGN)
    fx, fy, fz = _flow(masks_ptr, kps_ptr, kpd_ptr, jac_ptr, b, v, mask_v, zx, zy, zz, Vo, K,
                       HAS_JAC)
    NEED_POS: tl.constexpr = NEED_MASKS or NEED_KP or NEED_JAC
    gx, gy, gz = _sample_bwd(vol_ptr, go_ptr, gvol_ptr, b, v, mask_v, fx, fy, fz, Vo,
                             b * C * Vo, s_b, s_c, s_d, s_h, s_w, D, H, W, C, ALIGN, NEED_VOL,
                             NEED_POS, BLOCK_C)
    if NEED_POS:
        _flow_bwd_tail(masks_ptr, kps_ptr, kpd_ptr, jac_ptr, gmasks_ptr, part_ptr, b, pid,
                       nprog, v, mask_v, zx, zy, zz, gx, gy, gz, Vo, K, HAS_JAC, NEED_MASKS,
                       NEED_KP, NEED_JAC)


@triton.jit
def _motion_field_input_fwd(vol_ptr, kps_ptr, kpd_ptr, jac_ptr, out_ptr, V, inv_var,
                            s_b, s_c, s_d, s_h, s_w, D, H, W,
                            C: tl.constexpr, K: tl.constexpr, HAS_JAC: tl.constexpr,
                            ALIGN: tl.constexpr, GRID_ALIGN: tl.constexpr,
                            BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    b, v, mask_v = _block(V, BLOCK_V)
    zx, zy, zz = _identity(v, D, H, W, GRID_ALIGN)
    ob = b * (K + 1) * (C + 1) * V
    tl.store(out_ptr + ob + v, tl.zeros((BLOCK_V,), dtype=tl.float32).to(
        out_ptr.dtype.element_ty), mask=mask_v)
    _sample_store(vol_ptr, out_ptr, b, v, mask_v, zx, zy, zz, V, ob + V,
                  s_b, s_c, s_d, s_h, s_w, D, H, W, C, ALIGN, BLOCK_C)
    for k in range(K):
        idx = b * K + k
        mx, my, mz = _motion(kps_ptr, kpd_ptr, jac_ptr, idx, zx, zy, zz, HAS_JAC)
        dx, dy, dz = _minus_row(kpd_ptr, idx, zx, zy, zz)
        sx, sy, sz = _minus_row(kps_ptr, idx, zx, zy, zz)
        heat = _gauss(dx, dy, dz, inv_var) - _gauss(sx, sy, sz, inv_var)
        base = ob + (k + 1) * (C + 1) * V
        tl.store(out_ptr + base + v, heat.to(out_ptr.dtype.element_ty), mask=mask_v)
        _sample_store(vol_ptr, out_ptr, b, v, mask_v, mx, my, mz, V, base + V,
                      s_b, s_c, s_d, s_h, s_w, D, H, W, C, ALIGN, BLOCK_C)


@triton.jit
def _motion_field_input_bwd(vol_ptr, kps_ptr, kpd_ptr, jac_ptr, go_ptr, gvol_ptr, part_ptr, V,
                            inv_var, s_b, s_c, s_d, s_h, s_w, D, H, W,
                            C: tl.constexpr, K: tl.constexpr, HAS_JAC: tl.constexpr,
                            ALIGN: tl.constexpr, GRID_ALIGN: tl.constexpr,
                            NEED_VOL: tl.constexpr, NEED_KP: tl.constexpr,
                            NEED_JAC: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    b, v, mask_v = _block(V, BLOCK_V)
    zx, zy, zz = _identity(v, D, H, W, GRID_ALIGN)
    ob = b * (K + 1) * (C + 1) * V
    NEED_POS: tl.constexpr = NEED_KP or NEED_JAC
    if NEED_VOL:
        _sample_bwd(vol_ptr, go_ptr, gvol_ptr, b, v, mask_v, zx, zy, zz, V, ob + V,
                    s_b, s_c, s_d, s_h, s_w, D, H, W, C, ALIGN, NEED_VOL, False, BLOCK_C)
    for k in range(K):
        idx = b * K + k
        base = ob + (k + 1) * (C + 1) * V
        mx, my, mz = _motion(kps_ptr, kpd_ptr, jac_ptr, idx, zx, zy, zz, HAS_JAC)
        gx, gy, gz = _sample_bwd(vol_ptr, go_ptr, gvol_ptr, b, v, mask_v, mx, my, mz, V,
                                 base + V, s_b, s_c, s_d, s_h, s_w, D, H, W, C, ALIGN, NEED_VOL,
                                 NEED_POS, BLOCK_C)
        if NEED_POS:
            gx, gy, gz = _zero_outside(mask_v, gx, gy, gz)
            ex, ey, ez = _minus_row(kpd_ptr, idx, zx, zy, zz)
            sx, sy, sz = _minus_row(kps_ptr, idx, zx, zy, zz)
            gh = tl.load(go_ptr + base + v, mask=mask_v, other=0.0).to(tl.float32)
            gh = tl.where(mask_v, gh, 0.0)
            gd = gh * _gauss(ex, ey, ez, inv_var) * inv_var
            gs = gh * _gauss(sx, sy, sz, inv_var) * inv_var
            # heatmap terms: d kp_driving += gd (z - kp_d), d kp_source -= gs (z - kp_s)
            heat_s = (-tl.sum(gs * sx, axis=0), -tl.sum(gs * sy, axis=0),
                      -tl.sum(gs * sz, axis=0))
            heat_d = (tl.sum(gd * ex, axis=0), tl.sum(gd * ey, axis=0), tl.sum(gd * ez, axis=0))
            _store_kp_partials(part_ptr, (b * nprog + pid) * K + k, 1.0, gx, gy, gz, ex, ey, ez,
                               jac_ptr, idx, heat_s, heat_d, HAS_JAC, NEED_JAC)


# ------------------------------------------------------------------------------------------------
# host launchers
# ------------------------------------------------------------------------------------------------

def _identity_wrap(kernel):
    return kernel


def _blocks(C: int, interpret: bool) -> tuple[int, int]:
    block_c = min(32, triton.next_power_of_2(max(C, 1)))
    block_v = 16 if interpret else 128
    return block_v, block_c


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _kp_args(kps, kpd, jac):
    """kp_source, kp_driving and the jacobian (kp_source in its place when None) as the float32
    contiguous kernel arguments."""
    return _f32(kps), _f32(kpd), _f32(jac) if jac is not None else kps


def warp_volume_fwd(volume, grid, align_corners, *, wrap=_identity_wrap, interpret=False):
    B, C, D, H, W = volume.shape
    Do, Ho, Wo = grid.shape[1:4]
    Vo = Do * Ho * Wo
    out = torch.empty((B, C, Do, Ho, Wo), device=volume.device, dtype=volume.dtype)
    if out.numel() == 0:
        return out
    bv, bc = _blocks(C, interpret)
    wrap(_warp_volume_fwd)[(triton.cdiv(Vo, bv), B)](
        volume, _f32(grid), out, Vo, *volume.stride(), D, H, W, C=C, ALIGN=bool(align_corners),
        BLOCK_V=bv, BLOCK_C=bc)
    return out


def warp_volume_bwd(grad_out, volume, grid, align_corners, need_volume, need_grid, *,
                    wrap=_identity_wrap, interpret=False):
    B, C, D, H, W = volume.shape
    Do, Ho, Wo = grid.shape[1:4]
    Vo = Do * Ho * Wo
    dev = volume.device
    gvol = torch.zeros(volume.shape if need_volume else (0,), device=dev, dtype=torch.float32)
    ggrid = torch.zeros(grid.shape if need_grid else (0,), device=dev, dtype=torch.float32)
    if B * Vo > 0 and (need_volume or need_grid):
        bv, bc = _blocks(C, interpret)
        wrap(_warp_volume_bwd)[(triton.cdiv(Vo, bv), B)](
            volume, _f32(grid), grad_out.contiguous(), gvol, ggrid, Vo, *volume.stride(),
            D, H, W, C=C, ALIGN=bool(align_corners), NEED_VOL=bool(need_volume),
            NEED_GRID=bool(need_grid), BLOCK_V=bv, BLOCK_C=bc)
    return gvol.to(volume.dtype), ggrid.to(grid.dtype)


def _split_partials(part, B, K, kps, kpd, jac, need_kp, need_jac):
    total = part.sum(1)  # (B, K, 15), a fixed-order reduction over the programs
    dev = kps.device
    g_kps = total[..., 0:3].to(kps.dtype) if need_kp else torch.empty(0, device=dev,
                                                                      dtype=kps.dtype)
    g_kpd = total[..., 3:6].to(kpd.dtype) if need_kp else torch.empty(0, device=dev,
                                                                      dtype=kpd.dtype)
    if need_jac and jac is not None:
        g_jac = total[..., 6:15].reshape(B, K, 3, 3).to(jac.dtype)
    else:
        g_jac = torch.empty(0, device=dev, dtype=jac.dtype if jac is not None else kps.dtype)
    # fresh tensors: slices of one buffer (or empty tensors) must not alias each other
    return (g_kps.clone(memory_format=torch.contiguous_format),
            g_kpd.clone(memory_format=torch.contiguous_format),
            g_jac.clone(memory_format=torch.contiguous_format))


def keypoint_flow_fwd(kps, kpd, masks, jac, grid_align_corners, *, wrap=_identity_wrap,
                      interpret=False):
    B, K1, Do, Ho, Wo = masks.shape
    Vo = Do * Ho * Wo
    flow = torch.empty((B, Do, Ho, Wo, 3), device=masks.device, dtype=torch.float32)
    if flow.numel() > 0:
        bv, _ = _blocks(1, interpret)
        wrap(_keypoint_flow_fwd)[(triton.cdiv(Vo, bv), B)](
            masks.contiguous(), *_kp_args(kps, kpd, jac), flow, Vo, Do, Ho,
            Wo, K=K1 - 1, HAS_JAC=jac is not None, GRID_ALIGN=bool(grid_align_corners),
            BLOCK_V=bv)
    return flow.to(masks.dtype)


def keypoint_flow_bwd(grad_flow, kps, kpd, masks, jac, grid_align_corners, need_kp, need_masks,
                      need_jac, *, wrap=_identity_wrap, interpret=False):
    B, K1, Do, Ho, Wo = masks.shape
    K = K1 - 1
    Vo = Do * Ho * Wo
    dev = masks.device
    bv, _ = _blocks(1, interpret)
    nprog = triton.cdiv(Vo, bv)
    need_jac = bool(need_jac and jac is not None)
    gmasks = torch.zeros(masks.shape if need_masks else (0,), device=dev, dtype=torch.float32)
    part = torch.zeros((B, nprog, K, 15), device=dev, dtype=torch.float32)
    if B * Vo > 0 and (need_kp or need_masks or need_jac):
        wrap(_keypoint_flow_bwd)[(nprog, B)](
            _f32(grad_flow), masks.contiguous(), *_kp_args(kps, kpd, jac),
            gmasks, part, Vo, Do, Ho, Wo, K=K, HAS_JAC=jac is not None,
            GRID_ALIGN=bool(grid_align_corners), NEED_MASKS=bool(need_masks),
            NEED_KP=bool(need_kp), NEED_JAC=need_jac, BLOCK_V=bv)
    g_kps, g_kpd, g_jac = _split_partials(part, B, K, kps, kpd, jac, need_kp, need_jac)
    return g_kps, g_kpd, gmasks.to(masks.dtype), g_jac


def warp_by_keypoints_fwd(volume, kps, kpd, masks, jac, align_corners, grid_align_corners, *,
                          wrap=_identity_wrap, interpret=False):
    B, C, D, H, W = volume.shape
    K1, Do, Ho, Wo = masks.shape[1:]
    Vo = Do * Ho * Wo
    out = torch.empty((B, C, Do, Ho, Wo), device=volume.device, dtype=volume.dtype)
    if out.numel() == 0:
        return out
    bv, bc = _blocks(C, interpret)
    wrap(_warp_by_keypoints_fwd)[(triton.cdiv(Vo, bv), B)](
        volume, masks.contiguous(), *_kp_args(kps, kpd, jac), out,
        Vo, Do, Ho, Wo, *volume.stride(), D, H, W, C=C, K=K1 - 1, HAS_JAC=jac is not None,
        ALIGN=bool(align_corners), GRID_ALIGN=bool(grid_align_corners), BLOCK_V=bv, BLOCK_C=bc)
    return out


def warp_by_keypoints_bwd(grad_out, volume, kps, kpd, masks, jac, align_corners,
                          grid_align_corners, need_volume, need_kp, need_masks, need_jac, *,
                          wrap=_identity_wrap, interpret=False):
    B, C, D, H, W = volume.shape
    K1, Do, Ho, Wo = masks.shape[1:]
    K = K1 - 1
    Vo = Do * Ho * Wo
    dev = volume.device
    bv, bc = _blocks(C, interpret)
    nprog = triton.cdiv(Vo, bv)
    need_jac = bool(need_jac and jac is not None)
    gvol = torch.zeros(volume.shape if need_volume else (0,), device=dev, dtype=torch.float32)
    gmasks = torch.zeros(masks.shape if need_masks else (0,), device=dev, dtype=torch.float32)
    part = torch.zeros((B, nprog, K, 15), device=dev, dtype=torch.float32)
    if B * Vo > 0 and (need_volume or need_kp or need_masks or need_jac):
        wrap(_warp_by_keypoints_bwd)[(nprog, B)](
            volume, masks.contiguous(), *_kp_args(kps, kpd, jac),
            grad_out.contiguous(), gvol, gmasks, part, Vo, Do, Ho, Wo, *volume.stride(), D, H, W,
            C=C, K=K, HAS_JAC=jac is not None, ALIGN=bool(align_corners),
            GRID_ALIGN=bool(grid_align_corners), NEED_VOL=bool(need_volume),
            NEED_MASKS=bool(need_masks), NEED_KP=bool(need_kp), NEED_JAC=need_jac,
            BLOCK_V=bv, BLOCK_C=bc)
    g_kps, g_kpd, g_jac = _split_partials(part, B, K, kps, kpd, jac, need_kp, need_jac)
    return gvol.to(volume.dtype), g_kps, g_kpd, gmasks.to(masks.dtype), g_jac


def motion_field_input_fwd(volume, kps, kpd, jac, heatmap_variance, align_corners,
                           grid_align_corners, *, wrap=_identity_wrap, interpret=False):
    B, C, D, H, W = volume.shape
    K = kps.shape[1]
    V = D * H * W
    out = torch.empty((B, (K + 1) * (C + 1), D, H, W), device=volume.device, dtype=volume.dtype)
    if out.numel() == 0:
        return out
    bv, bc = _blocks(C, interpret)
    wrap(_motion_field_input_fwd)[(triton.cdiv(V, bv), B)](
        volume, *_kp_args(kps, kpd, jac), out, V,
        1.0 / float(heatmap_variance), *volume.stride(), D, H, W, C=C, K=K,
        HAS_JAC=jac is not None, ALIGN=bool(align_corners), GRID_ALIGN=bool(grid_align_corners),
        BLOCK_V=bv, BLOCK_C=bc)
    return out


def motion_field_input_bwd(grad_out, volume, kps, kpd, jac, heatmap_variance, align_corners,
                           grid_align_corners, need_volume, need_kp, need_jac, *,
                           wrap=_identity_wrap, interpret=False):
    B, C, D, H, W = volume.shape
    K = kps.shape[1]
    V = D * H * W
    dev = volume.device
    bv, bc = _blocks(C, interpret)
    nprog = triton.cdiv(V, bv)
    need_jac = bool(need_jac and jac is not None)
    gvol = torch.zeros(volume.shape if need_volume else (0,), device=dev, dtype=torch.float32)
    part = torch.zeros((B, nprog, K, 15), device=dev, dtype=torch.float32)
    if B * V > 0 and (need_volume or need_kp or need_jac):
        wrap(_motion_field_input_bwd)[(nprog, B)](
            volume, *_kp_args(kps, kpd, jac), grad_out.contiguous(), gvol,
            part, V, 1.0 / float(heatmap_variance), *volume.stride(), D, H, W, C=C, K=K,
            HAS_JAC=jac is not None, ALIGN=bool(align_corners),
            GRID_ALIGN=bool(grid_align_corners), NEED_VOL=bool(need_volume),
            NEED_KP=bool(need_kp), NEED_JAC=need_jac, BLOCK_V=bv, BLOCK_C=bc)
    g_kps, g_kpd, g_jac = _split_partials(part, B, K, kps, kpd, jac, need_kp, need_jac)
    return gvol.to(volume.dtype), g_kps, g_kpd, g_jac
