// Input checks for the torch glue of every op (C++ entry points validate their arguments too, so
// direct torch.ops.pyface.* callers get a clear error instead of a crash).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

#include "common/macros.h"
#include "common/plane_axes.h"

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

// Accumulation type of the kernels: float64 for float64 tensors, else float32 (the CUDA kernels
// use the same rule, Acc<T> in common/cuda_types.cuh). acc_type<scalar_t> is the C++ type.
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}
inline at::ScalarType acc_dtype(const at::Tensor& t) { return acc_dtype(t.scalar_type()); }

// Device check of the CPU entry points (the CUDA glue has check_cuda, common/cuda_glue.h);
// `name`: the argument named in the error.
inline void check_cpu(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
}

// The device check of an entry point (check_cpu, or check_cuda of common/cuda_glue.h), for argument
// checks shared by the CPU and CUDA entry points.
using DeviceCheck = void (*)(const char* name, const at::Tensor& t);

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
