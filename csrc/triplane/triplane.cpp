// Tri-plane bilinear sampling: op schemas and the argument checks shared by the CPU and CUDA
// entry points (triplane.h). The CPU kernels are in triplane_cpu.cpp, the CUDA ones in
// triplane_cuda.cpp / triplane_kernels.cu.
//
// Ops (namespace pyface):
//   triplane_sample(planes, points, plane_axes, box_size, reduce, align_corners) -> out
//   triplane_sample_bwd(grad_out, planes, points, plane_axes, box_size, reduce, align_corners,
//                       need_planes_grad, need_points_grad) -> (grad_planes, grad_points)
// Autograd and fake (meta) kernels are registered from Python (pyface/_ops/triplane.py).

#include "triplane/triplane.h"

#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

namespace pyface {
namespace triplane {

Args check_inputs(const at::Tensor& planes, const at::Tensor& points, const std::string& plane_axes,
                  double box_size, const std::string& reduce, bool align_corners) {
  PYFACE_CHECK_DIM("planes", planes, 5, "(B, 3, C, H, W)");
  PYFACE_CHECK_DIM("points", points, 3, "(B, N, 3)");
  PYFACE_CHECK_FLOAT("planes", planes);
  PYFACE_CHECK_FLOAT("points", points);
  TORCH_CHECK_VALUE(planes.size(1) == 3, "planes: expected shape (B, 3, C, H, W), got ",
                    shape_str(planes), " (dim 1 must be 3)");
  TORCH_CHECK_VALUE(points.size(2) == 3, "points: expected shape (B, N, 3), got ",
                    shape_str(points), " (dim 2 must be 3)");
  TORCH_CHECK_VALUE(planes.size(0) == points.size(0), "planes and points: batch sizes differ, ",
                    "planes ", shape_str(planes), " vs points ", shape_str(points));
  TORCH_CHECK_VALUE(planes.size(2) >= 1 && planes.size(3) >= 1 && planes.size(4) >= 1,
                    "planes: C, H and W must be >= 1, got ", shape_str(planes));
  // pyface.ops.triplane.MAX_PLANE_SIZE: texel coordinates are float32 in every kernel (exact
  // integers up to 2^24); checked here too for callers of the registered op itself
  constexpr int64_t kMaxPlaneSize = int64_t(1) << 24;
  TORCH_CHECK_VALUE(planes.size(3) <= kMaxPlaneSize && planes.size(4) <= kMaxPlaneSize,
                    "planes: expected H, W <= 2^24 = ", kMaxPlaneSize,
                    " (texel coordinates are computed in float32), got shape ", shape_str(planes));
  PYFACE_CHECK_SAME_DEVICE("planes", planes, "points", points);
  TORCH_CHECK_VALUE(box_size > 0 && std::isfinite(box_size),
                    "box_size: expected a positive finite number, got ", box_size);
  return Args{parse_plane_axes(plane_axes), parse_reduce(reduce), 2.0 / box_size, align_corners};
}

std::vector<int64_t> output_shape(const at::Tensor& planes, const at::Tensor& points,
                                  Reduce reduce) {
  const int64_t B = planes.size(0), C = planes.size(2), N = points.size(1);
  if (reduce == Reduce::NONE) return {B, 3, N, C};
  return {B, N, C};
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& planes, const at::Tensor& points,
                    Reduce reduce) {
  const auto expected = output_shape(planes, points, reduce);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(expected), "grad_out: expected shape ",
                    at::IntArrayRef(expected), ", got ", shape_str(grad_out));
  PYFACE_CHECK_SAME_DEVICE("grad_out", grad_out, "planes", planes);
  PYFACE_CHECK_FLOAT("grad_out", grad_out);
}

TORCH_LIBRARY_FRAGMENT(pyface, m) {
  m.def(
      "triplane_sample(Tensor planes, Tensor points, str plane_axes, float box_size, str reduce, "
      "bool align_corners) -> Tensor");
  m.def(
      "triplane_sample_bwd(Tensor grad_out, Tensor planes, Tensor points, str plane_axes, "
      "float box_size, str reduce, bool align_corners, bool need_planes_grad, "
      "bool need_points_grad) -> (Tensor, Tensor)");
}

}  // namespace triplane
}  // namespace pyface
