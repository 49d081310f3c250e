// Plane axes of a tri-plane: which point coordinates index each plane. Shared by the tri-plane
// sampling and the point-to-tri-plane rasterization kernels (CPU and CUDA). Framework-free.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace pyface {

// How the three planes are indexed by the point coordinates (first component -> width,
// second -> height, exactly as grid_sample).
enum class PlaneAxes : int32_t {
  XY_XZ_ZY = 0,  // plane 0 (x, y), plane 1 (x, z), plane 2 (z, y)
  EG3D = 1,      // plane 0 (x, y), plane 1 (x, z), plane 2 (z, x): EG3D's released checkpoints
};

// Coordinate component (0 = x, 1 = y, 2 = z) that indexes the width (u) / height (v) of `plane`.
PYFACE_HD int axis_u(PlaneAxes axes, int plane) {
  (void)axes;
  return plane == 2 ? 2 : 0;
}
PYFACE_HD int axis_v(PlaneAxes axes, int plane) {
  if (plane == 0) return 1;
  if (plane == 1) return 2;
  return axes == PlaneAxes::EG3D ? 0 : 1;
}

}  // namespace pyface
