// Coordinate math of grid_sample-style sampling shared by the tri-plane (bilinear) and the 3D-flow
// warping (trilinear) kernels, CPU and CUDA. Framework-free: no torch header. Mirrors ATen's
// grid_sampler (zero padding) so that results agree with F.grid_sample to floating-point rounding.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace pyface {
namespace grid {

// grid_sampler_unnormalize: normalized [-1, 1] coordinate -> pixel / voxel coordinate.
template <typename T>
PYFACE_HD T unnormalize(T coord, int64_t size, bool align_corners) {
  return align_corners ? ((coord + T(1)) / T(2)) * T(size - 1)
                       : ((coord + T(1)) * T(size) - T(1)) / T(2);
}

// d(pixel / voxel coordinate) / d(normalized coordinate).
template <typename T>
PYFACE_HD T unnormalize_scale(int64_t size, bool align_corners) {
  return align_corners ? T(size - 1) / T(2) : T(size) / T(2);
}

template <typename T>
PYFACE_HD bool is_nan(T v) {
  return v != v;
}

template <typename T>
PYFACE_HD T clamp_coord(T v, int64_t size) {
  // Outside [-2, size + 1] every tap is out of bounds anyway; clamping keeps the integer
  // conversion defined for coordinates far outside the plane / volume.
  return v < T(-2) ? T(-2) : (v > T(size + 1) ? T(size + 1) : v);
}

}  // namespace grid
}  // namespace pyface
