// Rasterization ops: argument checks shared by the CPU and CUDA entry points (defined in
// raster.cpp, next to the op schemas).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <string>

#include "common/checks.h"
#include "raster/raster_math.h"

namespace pyface {
namespace raster {

Cull parse_cull(const std::string& s);

// verts (B, V, 3) floating, faces (F, 3) int32/int64 with values in [0, V) (checked on CPU
// tensors; device tensors are checked by the caller in Python), height/width >= 1.
void check_mesh(const at::Tensor& verts, const at::Tensor& faces, int64_t height, int64_t width);

// points (B, N, 3) floating with N >= 1, height/width >= 1.
void check_points(const char* name, const at::Tensor& points, int64_t height, int64_t width);

// mesh_interpolate: faces (F, 3), face_index (B, H, W) int64 and bary (B, H, W, 3).
void check_interp(const at::Tensor& faces, const at::Tensor& face_index, const at::Tensor& bary);

// mesh_interpolate{,_bwd}: the indices the kernels follow lie in range (they would read / write
// out of bounds otherwise): faces in [0, num_verts), face_index < F (negative: empty pixel),
// num_verts >= 0. One aminmax per index tensor (a host sync on CUDA, as check_mesh's).
void check_interp_indices(const at::Tensor& faces, const at::Tensor& face_index,
                          int64_t num_verts);

// points_to_triplane_index's max_distance: a number (negative: no limit), not NaN.
void check_max_distance(double max_distance);

// a count argument (num_points, num_verts) >= 0.
void check_count(const char* name, int64_t n);

// mesh_interpolate's attributes (B, V, C) floating on the `device`, B matching face_index.
void check_interp_attributes(const at::Tensor& attributes, const at::Tensor& face_index,
                             DeviceCheck device);

// mesh_interpolate_bwd's grad (B, C, H, W) floating on the `device`, (B, H, W) matching face_index.
void check_interp_grad(const at::Tensor& grad, const at::Tensor& face_index, DeviceCheck device);

// splat_points_index: points_ndc as check_points on the `device`, radius finite and >= 0.
void check_splat(const at::Tensor& points, int64_t height, int64_t width, double radius,
                 DeviceCheck device);

// points_to_triplane_index: points as check_points on the `device`, plane_axes, box_size > 0
// finite and valid (B, N) bool if given.
struct TriplaneIndexArgs {
  PlaneAxes axes;
  at::Tensor valid;  // contiguous, or undefined when not given
};
TriplaneIndexArgs check_points_to_triplane(const at::Tensor& points,
                                           const c10::optional<at::Tensor>& valid,
                                           int64_t height, int64_t width,
                                           c10::string_view plane_axes, double box_size,
                                           DeviceCheck device);

// features (B, N, C) floating and index (B, G, P) int64.
void check_gather(const at::Tensor& features, const at::Tensor& index);

// gather_features_bwd: grad (B, G, C, P) floating and index (B, G, P), both on the `device`.
void check_gather_grad(const at::Tensor& grad, const at::Tensor& index, DeviceCheck device);

}  // namespace raster
}  // namespace pyface
