// Rasterization ops: argument checks shared by the CPU and CUDA entry points (defined in
// raster.cpp, next to the op schemas).
#pragma once

#include <ATen/core/Tensor.h>

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

// features (B, N, C) floating and index (B, G, P) int64.
void check_gather(const at::Tensor& features, const at::Tensor& index);

}  // namespace raster
}  // namespace pyface
