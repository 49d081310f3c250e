// Rasterization ops: schemas and the argument checks shared by the CPU and CUDA entry points
// (raster.h). The CPU kernels are in raster_cpu.cpp, the CUDA ones in raster_cuda.cpp /
// raster_kernels.cu.
//
// Ops (namespace pyface); none of the geometry ops is differentiable, the two gathers are:
//   raster_mesh(verts, faces, height, width, cull, perspective_correct)
//       -> (face_index (B, H, W) int64, bary (B, H, W, 3), depth (B, 1, H, W))
//   mesh_interpolate(attributes, faces, face_index, bary) -> (B, C, H, W)
//   mesh_interpolate_bwd(grad, faces, face_index, bary, num_verts) -> (B, V, C)
//   splat_points_index(points, height, width, radius) -> (index (B, H, W), depth (B, 1, H, W))
//   points_to_triplane_index(points, valid, height, width, plane_axes, box_size, align_corners,
//                            max_distance) -> index (B, 3, H, W)
//   gather_features(features, index, background) -> (B, G, C, P)   [index (B, G, P)]
//   gather_features_bwd(grad, index, num_points) -> (B, N, C)
// Autograd and fake kernels are registered from Python (pyface/_ops/raster.py).

#include "raster/raster.h"

#include <ATen/ops/aminmax.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "common/checks.h"

namespace pyface {
namespace raster {

Cull parse_cull(const std::string& s) {
  if (s == "none") return Cull::NONE;
  if (s == "cw") return Cull::CW;
  if (s == "ccw") return Cull::CCW;
  TORCH_CHECK_VALUE(false, "cull: expected 'none', 'cw' or 'ccw', got '", s, "'");
}

static void check_size(int64_t height, int64_t width) {
  TORCH_CHECK_VALUE(height >= 1 && width >= 1,
                    "image_size: expected positive height and width, got (", height, ", ", width,
                    ")");
}

void check_mesh(const at::Tensor& verts, const at::Tensor& faces, int64_t height, int64_t width) {
  PYFACE_CHECK_DIM("verts_ndc", verts, 3, "(B, V, 3)");
  PYFACE_CHECK_FLOAT("verts_ndc", verts);
  TORCH_CHECK_VALUE(verts.size(2) == 3, "verts_ndc: expected shape (B, V, 3), got ",
                    shape_str(verts), " (dim 2 must be 3)");
  PYFACE_CHECK_DIM("faces", faces, 2, "(F, 3)");
  TORCH_CHECK_TYPE(faces.scalar_type() == at::kLong || faces.scalar_type() == at::kInt,
                   "faces: expected dtype int32 or int64, got ", faces.scalar_type());
  TORCH_CHECK_VALUE(faces.size(1) == 3, "faces: expected shape (F, 3), got ", shape_str(faces),
                    " (dim 1 must be 3)");
  PYFACE_CHECK_SAME_DEVICE("verts_ndc", verts, "faces", faces);
  check_size(height, width);
  if (faces.numel() > 0) {
    const auto mm = at::aminmax(faces);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK_INDEX(lo >= 0 && hi < verts.size(1),
                      "faces: vertex indices must lie in [0, V) = [0, ", verts.size(1),
                      "), got values in [", lo, ", ", hi, "]");
  }
}

void check_points(const char* name, const at::Tensor& points, int64_t height, int64_t width) {
  PYFACE_CHECK_DIM(name, points, 3, "(B, N, 3)");
  PYFACE_CHECK_FLOAT(name, points);
  TORCH_CHECK_VALUE(points.size(2) == 3, name, ": expected shape (B, N, 3), got ",
                    shape_str(points), " (dim 2 must be 3)");
  TORCH_CHECK_VALUE(points.size(1) >= 1, name, ": expected at least one point (N >= 1), got ",
                    shape_str(points));
  TORCH_CHECK_VALUE(points.size(1) < (int64_t(1) << 31), name,
                    ": at most 2^31 - 1 points per batch item, got ", points.size(1));
  check_size(height, width);
}

void check_gather(const at::Tensor& features, const at::Tensor& index) {
  PYFACE_CHECK_DIM("features", features, 3, "(B, N, C)");
  PYFACE_CHECK_FLOAT("features", features);
  PYFACE_CHECK_DIM("index", index, 3, "(B, G, P)");
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "index: expected dtype int64, got ",
                   index.scalar_type());
  TORCH_CHECK_VALUE(features.size(0) == index.size(0), "features and index: batch sizes differ, ",
                    shape_str(features), " vs ", shape_str(index));
  PYFACE_CHECK_SAME_DEVICE("features", features, "index", index);
}

void check_interp(const at::Tensor& faces, const at::Tensor& face_index, const at::Tensor& bary) {
  PYFACE_CHECK_DIM("faces", faces, 2, "(F, 3)");
  PYFACE_CHECK_DIM("face_index", face_index, 3, "(B, H, W)");
  PYFACE_CHECK_DIM("bary", bary, 4, "(B, H, W, 3)");
  TORCH_CHECK_TYPE(face_index.scalar_type() == at::kLong, "face_index: expected dtype int64, got ",
                   face_index.scalar_type());
  TORCH_CHECK_VALUE(bary.size(0) == face_index.size(0) && bary.size(1) == face_index.size(1) &&
                        bary.size(2) == face_index.size(2) && bary.size(3) == 3,
                    "bary: expected shape (B, H, W, 3) matching face_index ",
                    shape_str(face_index), ", got ", shape_str(bary));
}

void check_max_distance(double max_distance) {
  TORCH_CHECK_VALUE(!std::isnan(max_distance),
                    "max_distance: expected a number >= 0 (negative: no limit), got ",
                    max_distance);
}

void check_count(const char* name, int64_t n) {
  TORCH_CHECK_VALUE(n >= 0, name, ": expected a count >= 0, got ", n);
}

void check_interp_indices(const at::Tensor& faces, const at::Tensor& face_index,
                          int64_t num_verts) {
  check_count("num_verts", num_verts);
  if (faces.numel() == 0 && face_index.numel() == 0) return;
  // the three extremes in one tensor: one device-to-host copy (one sync on CUDA)
  const auto none = at::full({1}, -1, face_index.options());
  at::Tensor ext;
  if (faces.numel() > 0) {
    const auto mm = at::aminmax(faces.to(at::kLong));
    ext = at::cat({std::get<0>(mm).reshape({1}), std::get<1>(mm).reshape({1}),
                   face_index.numel() > 0 ? face_index.max().reshape({1}) : none});
  } else {
    ext = at::cat({at::zeros_like(none), none, face_index.max().reshape({1})});
  }
  ext = ext.cpu();
  const int64_t* e = ext.const_data_ptr<int64_t>();
  TORCH_CHECK_INDEX(e[0] >= 0 && e[1] < num_verts,
                    "faces: vertex indices must lie in [0, V) = [0, ", num_verts,
                    "), got values in [", e[0], ", ", e[1], "]");
  TORCH_CHECK_INDEX(e[2] < faces.size(0), "face_index: expected face indices < F = ",
                    faces.size(0), " (the number of faces; negative: empty pixel), got ", e[2]);
}

void check_gather_grad(const at::Tensor& grad, const at::Tensor& index, DeviceCheck device) {
  PYFACE_CHECK_DIM("grad", grad, 4, "(B, G, C, P)");
  PYFACE_CHECK_FLOAT("grad", grad);
  PYFACE_CHECK_DIM("index", index, 3, "(B, G, P)");
  device("grad", grad);
  device("index", index);
  TORCH_CHECK_VALUE(grad.size(0) == index.size(0) && grad.size(1) == index.size(1) &&
                        grad.size(3) == index.size(2),
                    "grad: expected shape (B, G, C, P) matching index ", shape_str(index),
                    ", got ", shape_str(grad));
}

void check_interp_attributes(const at::Tensor& attributes, const at::Tensor& face_index,
                             DeviceCheck device) {
  PYFACE_CHECK_DIM("attributes", attributes, 3, "(B, V, C)");
  PYFACE_CHECK_FLOAT("attributes", attributes);
  device("attributes", attributes);
  TORCH_CHECK_VALUE(attributes.size(0) == face_index.size(0), "attributes: expected batch size ",
                    face_index.size(0), ", got ", shape_str(attributes));
}

void check_interp_grad(const at::Tensor& grad, const at::Tensor& face_index, DeviceCheck device) {
  PYFACE_CHECK_DIM("grad", grad, 4, "(B, C, H, W)");
  PYFACE_CHECK_FLOAT("grad", grad);
  device("grad", grad);
  TORCH_CHECK_VALUE(grad.size(0) == face_index.size(0) && grad.size(2) == face_index.size(1) &&
                        grad.size(3) == face_index.size(2),
                    "grad: expected shape (B, C, H, W) matching face_index ",
                    shape_str(face_index), ", got ", shape_str(grad));
}

void check_splat(const at::Tensor& points, int64_t height, int64_t width, double radius,
                 DeviceCheck device) {
  check_points("points_ndc", points, height, width);
  device("points_ndc", points);
  TORCH_CHECK_VALUE(radius >= 0 && std::isfinite(radius),
                    "radius: expected a finite number >= 0, got ", radius);
}

TriplaneIndexArgs check_points_to_triplane(const at::Tensor& points,
                                           const c10::optional<at::Tensor>& valid,
                                           int64_t height, int64_t width,
                                           c10::string_view plane_axes, double box_size,
                                           DeviceCheck device) {
  check_points("points", points, height, width);
  device("points", points);
  TriplaneIndexArgs args{parse_plane_axes(std::string(plane_axes)), at::Tensor()};
  TORCH_CHECK_VALUE(box_size > 0 && std::isfinite(box_size),
                    "box_size: expected a positive finite number, got ", box_size);
  if (valid.has_value()) {
    const int64_t B = points.size(0), N = points.size(1);
    const auto& v = *valid;
    TORCH_CHECK_TYPE(v.scalar_type() == at::kBool, "valid: expected dtype bool, got ",
                     v.scalar_type());
    TORCH_CHECK_VALUE(v.dim() == 2 && v.size(0) == B && v.size(1) == N,
                      "valid: expected shape (B, N) = (", B, ", ", N, "), got ", shape_str(v));
    PYFACE_CHECK_SAME_DEVICE("points", points, "valid", v);
    args.valid = v.contiguous();
  }
  return args;
}

TORCH_LIBRARY_FRAGMENT(pyface, m) {
  m.def("raster_mesh(Tensor verts, Tensor faces, int height, int width, str cull, "
        "bool perspective_correct) -> (Tensor, Tensor, Tensor)");
  m.def("mesh_interpolate(Tensor attributes, Tensor faces, Tensor face_index, Tensor bary) "
        "-> Tensor");
  m.def("mesh_interpolate_bwd(Tensor grad, Tensor faces, Tensor face_index, Tensor bary, "
        "SymInt num_verts) -> Tensor");
  m.def("splat_points_index(Tensor points, int height, int width, float radius) "
        "-> (Tensor, Tensor)");
  m.def("points_to_triplane_index(Tensor points, Tensor? valid, int height, int width, "
        "str plane_axes, float box_size, bool align_corners, float max_distance) -> Tensor");
  m.def("gather_features(Tensor features, Tensor index, float background) -> Tensor");
  m.def("gather_features_bwd(Tensor grad, Tensor index, SymInt num_points) -> Tensor");
}

}  // namespace raster
}  // namespace pyface
