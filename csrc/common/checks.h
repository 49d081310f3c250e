// Input checks for the torch glue of every op (C++ entry points validate their arguments too, so
// direct torch.ops.pyface.* callers get a clear error instead of a crash).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "common/macros.h"

namespace pyface {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    s += std::to_string(t.size(i));
    if (i + 1 < t.dim()) s += ", ";
  }
  if (t.dim() == 1) s += ",";
  return s + ")";
}

inline PlaneAxes parse_plane_axes(const std::string& s) {
  if (s == "xy_xz_zy") return PlaneAxes::XY_XZ_ZY;
  if (s == "eg3d") return PlaneAxes::EG3D;
  TORCH_CHECK_VALUE(false, "plane_axes: expected 'xy_xz_zy' or 'eg3d', got '", s, "'");
}

inline Reduce parse_reduce(const std::string& s) {
  if (s == "mean") return Reduce::MEAN;
  if (s == "sum") return Reduce::SUM;
  if (s == "none") return Reduce::NONE;
  TORCH_CHECK_VALUE(false, "reduce: expected 'mean', 'sum' or 'none', got '", s, "'");
}

}  // namespace pyface

#define PYFACE_CHECK_FLOAT(name, t)                                                           \
  TORCH_CHECK_TYPE(at::isFloatingType((t).scalar_type()), name,                               \
                   ": expected a floating-point tensor, got dtype ", (t).scalar_type())

#define PYFACE_CHECK_DIM(name, t, d, shape_doc)                                               \
  TORCH_CHECK_VALUE((t).dim() == (d), name, ": expected shape ", shape_doc, " (", d,          \
                    " dims), got ", ::pyface::shape_str(t))

#define PYFACE_CHECK_SAME_DEVICE(name_a, a, name_b, b)                                        \
  TORCH_CHECK_VALUE((a).device() == (b).device(), name_a, " and ", name_b,                    \
                    " must be on the same device, got ", (a).device(), " and ", (b).device())
