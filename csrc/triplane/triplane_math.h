// Tri-plane bilinear sampling math shared by the CPU and CUDA kernels (and the C++ unit tests).
// Framework-free: no torch header. Every function mirrors ATen's grid_sampler_2d (bilinear,
// zero padding) so that results agree with F.grid_sample to floating-point rounding.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/grid_math.h"
#include "common/macros.h"
#include "common/plane_axes.h"

namespace pyface {
namespace triplane {

using grid::clamp_coord;
using grid::is_nan;
using grid::unnormalize;
using grid::unnormalize_scale;

// The four bilinear taps of one plane for one point.
// Tap order follows grid_sample: 0 = nw (x0, y0), 1 = ne (x1, y0), 2 = sw (x0, y1), 3 = se (x1, y1).
template <typename T>
struct Taps {
  int64_t x0, y0;  // top-left corner (may lie outside the plane)
  T ix, iy;        // pixel coordinates
  T w[4];          // bilinear weights
  bool valid[4];   // tap inside the plane (zero padding otherwise)
  bool nan;        // a coordinate was NaN: the sample is NaN
};

// Sets up the taps for normalized coordinates (u, v) on a W x H plane.
// Coordinates far outside the plane are clamped before the integer conversion (so the cast is
// always defined); all taps of such a point are invalid, which is what zero padding gives.
template <typename T>
PYFACE_HD Taps<T> bilinear_taps(T u, T v, int64_t W, int64_t H, bool align_corners) {
  Taps<T> t;
  t.nan = is_nan(u) || is_nan(v);
  T ix = unnormalize(u, W, align_corners);
  T iy = unnormalize(v, H, align_corners);
  if (t.nan) {
    ix = T(0);
    iy = T(0);
  }
  ix = clamp_coord(ix, W);
  iy = clamp_coord(iy, H);
  t.ix = ix;
  t.iy = iy;
  const T fx0 = floor(ix);
  const T fy0 = floor(iy);
  const T fx1 = fx0 + T(1);
  const T fy1 = fy0 + T(1);
  t.x0 = static_cast<int64_t>(fx0);
  t.y0 = static_cast<int64_t>(fy0);
  t.w[0] = (fx1 - ix) * (fy1 - iy);
  t.w[1] = (ix - fx0) * (fy1 - iy);
  t.w[2] = (fx1 - ix) * (iy - fy0);
  t.w[3] = (ix - fx0) * (iy - fy0);
  const bool x0_in = t.x0 >= 0 && t.x0 < W;
  const bool x1_in = t.x0 + 1 >= 0 && t.x0 + 1 < W;
  const bool y0_in = t.y0 >= 0 && t.y0 < H;
  const bool y1_in = t.y0 + 1 >= 0 && t.y0 + 1 < H;
  t.valid[0] = x0_in && y0_in;
  t.valid[1] = x1_in && y0_in;
  t.valid[2] = x0_in && y1_in;
  t.valid[3] = x1_in && y1_in;
  return t;
}

// Offset of tap k relative to the plane base, given the plane's height/width strides.
template <typename T>
PYFACE_HD int64_t tap_offset(const Taps<T>& t, int k, int64_t stride_h, int64_t stride_w) {
  const int64_t x = t.x0 + (k & 1);
  const int64_t y = t.y0 + (k >> 1);
  return y * stride_h + x * stride_w;
}

// d(weight_k)/d(ix) and d(weight_k)/d(iy), in grid_sample's formulation.
template <typename T>
PYFACE_HD void weight_grads(const Taps<T>& t, T dwdx[4], T dwdy[4]) {
  const T fx0 = T(t.x0), fy0 = T(t.y0);
  const T fx1 = fx0 + T(1), fy1 = fy0 + T(1);
  dwdx[0] = -(fy1 - t.iy);
  dwdx[1] = (fy1 - t.iy);
  dwdx[2] = -(t.iy - fy0);
  dwdx[3] = (t.iy - fy0);
  dwdy[0] = -(fx1 - t.ix);
  dwdy[1] = -(t.ix - fx0);
  dwdy[2] = (fx1 - t.ix);
  dwdy[3] = (t.ix - fx0);
}

}  // namespace triplane
}  // namespace pyface
