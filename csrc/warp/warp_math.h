// 3D-flow warping math shared by the CPU and CUDA kernels. Framework-free: no torch header.
// Trilinear sampling mirrors ATen's grid_sampler_3d (bilinear mode, zero padding): the same
// unnormalisation, the same tap order and the same weight products, so results agree with
// F.grid_sample 5-D to floating-point rounding.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/grid_math.h"
#include "common/macros.h"

namespace pyface {
namespace warp {

using grid::clamp_coord;
using grid::is_nan;
using grid::unnormalize;
using grid::unnormalize_scale;

// Identity-grid coordinate of index i on an axis of n voxels: face-vid2vid's
// make_coordinate_grid (inclusive linspace) when align_corners, voxel centres otherwise.
// A size-1 axis has the coordinate 0.
template <typename T>
PYFACE_HD T identity_coord(int64_t i, int64_t n, bool align_corners) {
  if (n == 1) return T(0);
  return align_corners ? T(2) * (T(i) / T(n - 1)) - T(1) : T(2 * i + 1) / T(n) - T(1);
}

// The eight trilinear taps of one sample. Tap k has x = x0 + (k & 1), y = y0 + ((k >> 1) & 1),
// z = z0 + (k >> 2): grid_sample's order tnw, tne, tsw, tse, bnw, bne, bsw, bse.
template <typename T>
struct Taps3 {
  int64_t x0, y0, z0;
  T wx[2], wy[2], wz[2];  // 1-D weights of the lower / upper neighbour per axis
  bool vx[2], vy[2], vz[2];
  bool nan;  // a coordinate was NaN: the sample (and its gradient) is NaN

  PYFACE_HD T weight(int k) const { return wx[k & 1] * wy[(k >> 1) & 1] * wz[k >> 2]; }
  PYFACE_HD bool valid(int k) const { return vx[k & 1] && vy[(k >> 1) & 1] && vz[k >> 2]; }
  PYFACE_HD int64_t offset(int k, int64_t sd, int64_t sh, int64_t sw) const {
    return (z0 + (k >> 2)) * sd + (y0 + ((k >> 1) & 1)) * sh + (x0 + (k & 1)) * sw;
  }
  // d weight(k) / d(voxel coordinate) along x, y, z.
  PYFACE_HD T dwdx(int k) const { return ((k & 1) ? T(1) : T(-1)) * wy[(k >> 1) & 1] * wz[k >> 2]; }
  PYFACE_HD T dwdy(int k) const { return ((k >> 1) & 1 ? T(1) : T(-1)) * wx[k & 1] * wz[k >> 2]; }
  PYFACE_HD T dwdz(int k) const { return ((k >> 2) ? T(1) : T(-1)) * wx[k & 1] * wy[(k >> 1) & 1]; }
};

// Taps for the normalized coordinate (x, y, z) in a D x H x W volume.
template <typename T>
PYFACE_HD Taps3<T> trilinear_taps(T x, T y, T z, int64_t W, int64_t H, int64_t D,
                                  bool align_corners) {
  Taps3<T> t;
  t.nan = is_nan(x) || is_nan(y) || is_nan(z);
  T ix = unnormalize(x, W, align_corners);
  T iy = unnormalize(y, H, align_corners);
  T iz = unnormalize(z, D, align_corners);
  if (t.nan) ix = iy = iz = T(0);
  ix = clamp_coord(ix, W);
  iy = clamp_coord(iy, H);
  iz = clamp_coord(iz, D);
  const T fx = floor(ix), fy = floor(iy), fz = floor(iz);
  t.x0 = static_cast<int64_t>(fx);
  t.y0 = static_cast<int64_t>(fy);
  t.z0 = static_cast<int64_t>(fz);
  t.wx[0] = (fx + T(1)) - ix;
  t.wx[1] = ix - fx;
  t.wy[0] = (fy + T(1)) - iy;
  t.wy[1] = iy - fy;
  t.wz[0] = (fz + T(1)) - iz;
  t.wz[1] = iz - fz;
  t.vx[0] = t.x0 >= 0 && t.x0 < W;
  t.vx[1] = t.x0 + 1 >= 0 && t.x0 + 1 < W;
  t.vy[0] = t.y0 >= 0 && t.y0 < H;
  t.vy[1] = t.y0 + 1 >= 0 && t.y0 + 1 < H;
  t.vz[0] = t.z0 >= 0 && t.z0 < D;
  t.vz[1] = t.z0 + 1 >= 0 && t.z0 + 1 < D;
  return t;
}

// Sparse motion of keypoint k at identity coordinate (zx, zy, zz):
//   m = J_k (z - kp_driving_k) + kp_source_k   (J_k the identity when jac is null).
// kps, kpd: (K, 3) of one batch item; jac: (K, 3, 3) row-major of one batch item, or null.
template <typename T>
PYFACE_HD void keypoint_motion(const T* kps, const T* kpd, const T* jac, int64_t k, T zx, T zy,
                               T zz, T m[3]) {
  const T ex = zx - kpd[3 * k + 0], ey = zy - kpd[3 * k + 1], ez = zz - kpd[3 * k + 2];
  if (jac != nullptr) {
    const T* J = jac + 9 * k;
    m[0] = (J[0] * ex + J[1] * ey + J[2] * ez) + kps[3 * k + 0];
    m[1] = (J[3] * ex + J[4] * ey + J[5] * ez) + kps[3 * k + 1];
    m[2] = (J[6] * ex + J[7] * ey + J[8] * ez) + kps[3 * k + 2];
  } else {
    m[0] = ex + kps[3 * k + 0];
    m[1] = ey + kps[3 * k + 1];
    m[2] = ez + kps[3 * k + 2];
  }
}

// Adds the gradient of <g, w * motion_k(z)> w.r.t. the keypoints (and jacobian) of keypoint k:
//   d kp_source_k += w g,  d kp_driving_k -= w J^T g,  d J_k += w g (z - kp_driving_k)^T.
// acc holds 15 values per keypoint: [d kp_source (3), d kp_driving (3), d J (9)].
template <typename T>
PYFACE_HD void keypoint_motion_grad(const T* kpd, const T* jac, int64_t k, T zx, T zy, T zz,
                                    T w, const T g[3], T* acc) {
  const T gx = w * g[0], gy = w * g[1], gz = w * g[2];
  acc[0] += gx;
  acc[1] += gy;
  acc[2] += gz;
  if (jac != nullptr) {
    const T* J = jac + 9 * k;
    acc[3] -= J[0] * gx + J[3] * gy + J[6] * gz;
    acc[4] -= J[1] * gx + J[4] * gy + J[7] * gz;
    acc[5] -= J[2] * gx + J[5] * gy + J[8] * gz;
    const T e[3] = {zx - kpd[3 * k + 0], zy - kpd[3 * k + 1], zz - kpd[3 * k + 2]};
    const T gg[3] = {gx, gy, gz};
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) acc[6 + 3 * i + j] += gg[i] * e[j];
  } else {
    acc[3] -= gx;
    acc[4] -= gy;
    acc[5] -= gz;
  }
}

// Keypoint flow at voxel v with identity coordinate z:
//   flow = masks_b[0] z + sum_k masks_b[k + 1] motion_k(z);
// masks_b is (K+1, V) of one batch item, kps / kpd / jac as for keypoint_motion.
template <typename T>
PYFACE_HD void flow_at(const T* masks_b, int64_t V, int64_t v, const T* kps, const T* kpd,
                       const T* jac, int64_t K, T zx, T zy, T zz, T f[3]) {
  const T m0 = masks_b[v];
  f[0] = m0 * zx;
  f[1] = m0 * zy;
  f[2] = m0 * zz;
  for (int64_t k = 0; k < K; ++k) {
    const T mk = masks_b[(k + 1) * V + v];
    T m[3];
    keypoint_motion(kps, kpd, jac, k, zx, zy, zz, m);
    f[0] += mk * m[0];
    f[1] += mk * m[1];
    f[2] += mk * m[2];
  }
}

// Gradient of <g, flow> w.r.t. mask k + 1 (the mask of keypoint k) at identity coordinate z:
// <g, motion_k(z)>. The gradient w.r.t. mask 0 is <g, z>.
template <typename T>
PYFACE_HD T mask_grad(const T* kps, const T* kpd, const T* jac, int64_t k, T zx, T zy, T zz,
                      const T g[3]) {
  T m[3];
  keypoint_motion(kps, kpd, jac, k, zx, zy, zz, m);
  return g[0] * m[0] + g[1] * m[1] + g[2] * m[2];
}

// face-vid2vid's kp2gaussian at identity coordinate z: exp(-0.5 |z - kp|^2 / variance).
template <typename T>
PYFACE_HD T gaussian(const T* kp, T zx, T zy, T zz, T variance) {
  const T dx = zx - kp[0], dy = zy - kp[1], dz = zz - kp[2];
  return exp((T(-0.5) * (dx * dx + dy * dy + dz * dz)) / variance);
}

// Adds the gradient of gh * (gaussian(kpd, z) - gaussian(kps, z)) (motion_field_input's heatmap
// channel of one keypoint) w.r.t. kps and kpd to acc[0..2] and acc[3..5]:
//   d gaussian(kp, z) / d kp = gaussian(kp, z) (z - kp) / variance.
template <typename T>
PYFACE_HD void heatmap_grad(const T* kps, const T* kpd, T zx, T zy, T zz, T variance, T gh,
                            T* acc) {
  const T gd = gh * gaussian(kpd, zx, zy, zz, variance) / variance;
  const T gs = gh * gaussian(kps, zx, zy, zz, variance) / variance;
  acc[0] -= gs * (zx - kps[0]);
  acc[1] -= gs * (zy - kps[1]);
  acc[2] -= gs * (zz - kps[2]);
  acc[3] += gd * (zx - kpd[0]);
  acc[4] += gd * (zy - kpd[1]);
  acc[5] += gd * (zz - kpd[2]);
}

}  // namespace warp
}  // namespace pyface
