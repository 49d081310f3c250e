// Volume rendering: op schemas and the argument checks shared by the CPU and CUDA entry points
// (render.h). The CPU kernels are in render_cpu.cpp, the CUDA ones in render_cuda.cpp /
// render_kernels.cu.
//
// Ops (namespace pyface):
//   mip_composite(features, densities, depths, depth_range, density_bias, white_back)
//       -> (features_out (B, R, C), depth (B, R, 1), weights (B, R, S - 1))
//   mip_composite_bwd(grad_features, grad_depth, grad_weights, features, densities, depths,
//                     depth_range, density_bias, white_back, need_features_grad,
//                     need_densities_grad)
//       -> (grad_features_in (B, R, S, C) or (0,), grad_densities (B, R, S) or (0,))
//   sample_importance(depths, weights, u) -> (B, R, M)
// Autograd and fake (meta) kernels are registered from Python (pyface/_ops/render.py).

#include "render/render.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace pyface {
namespace render {

namespace {

void check_same(const char* name_a, const at::Tensor& a, const char* name_b, const at::Tensor& b) {
  PYFACE_CHECK_SAME_DEVICE(name_a, a, name_b, b);
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), name_a, " and ", name_b,
                   " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

void check_float_or_double(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   ": expected dtype float32 or float64, got ", t.scalar_type());
}

}  // namespace

void check_composite_inputs(const at::Tensor& features, const at::Tensor& densities,
                            const at::Tensor& depths) {
  PYFACE_CHECK_DIM("features", features, 4, "(B, R, S, C)");
  PYFACE_CHECK_DIM("densities", densities, 3, "(B, R, S)");
  PYFACE_CHECK_DIM("depths", depths, 3, "(B, R, S)");
  check_float_or_double("features", features);
  check_same("features", features, "densities", densities);
  check_same("features", features, "depths", depths);
  TORCH_CHECK_VALUE(densities.sizes() == features.sizes().slice(0, 3),
                    "densities: expected shape (B, R, S) matching features ",
                    shape_str(features), ", got ", shape_str(densities));
  TORCH_CHECK_VALUE(depths.sizes() == features.sizes().slice(0, 3),
                    "depths: expected shape (B, R, S) matching features ", shape_str(features),
                    ", got ", shape_str(depths));
  TORCH_CHECK_VALUE(features.size(2) >= 2, "features: expected S >= 2 samples per ray, got ",
                    shape_str(features));
}

void check_composite_grads(const at::Tensor& grad_features, const at::Tensor& grad_depth,
                           const at::Tensor& grad_weights, const at::Tensor& features) {
  const int64_t B = features.size(0), R = features.size(1), S = features.size(2),
                C = features.size(3);
  TORCH_CHECK_VALUE(grad_features.sizes() == at::IntArrayRef({B, R, C}),
                    "grad_features: expected shape ", at::IntArrayRef({B, R, C}), ", got ",
                    shape_str(grad_features));
  TORCH_CHECK_VALUE(grad_depth.sizes() == at::IntArrayRef({B, R, 1}),
                    "grad_depth: expected shape ", at::IntArrayRef({B, R, 1}), ", got ",
                    shape_str(grad_depth));
  TORCH_CHECK_VALUE(grad_weights.sizes() == at::IntArrayRef({B, R, S - 1}),
                    "grad_weights: expected shape ", at::IntArrayRef({B, R, S - 1}), ", got ",
                    shape_str(grad_weights));
  PYFACE_CHECK_SAME_DEVICE("grad_features", grad_features, "features", features);
  PYFACE_CHECK_SAME_DEVICE("grad_depth", grad_depth, "features", features);
  PYFACE_CHECK_SAME_DEVICE("grad_weights", grad_weights, "features", features);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> composite_outputs(const at::Tensor& features) {
  const int64_t B = features.size(0), R = features.size(1), S = features.size(2),
                C = features.size(3);
  return {at::empty({B, R, C}, features.options()), at::empty({B, R, 1}, features.options()),
          at::empty({B, R, S - 1}, features.options())};
}

std::tuple<at::Tensor, at::Tensor> composite_grads(const at::Tensor& features,
                                                   bool need_features_grad,
                                                   bool need_densities_grad) {
  const int64_t B = features.size(0), R = features.size(1), S = features.size(2),
                C = features.size(3);
  return {at::empty(need_features_grad ? at::IntArrayRef({B, R, S, C}) : at::IntArrayRef({0}),
                    features.options()),
          at::empty(need_densities_grad ? at::IntArrayRef({B, R, S}) : at::IntArrayRef({0}),
                    features.options())};
}

void check_importance_inputs(const at::Tensor& depths, const at::Tensor& weights,
                             const at::Tensor& u) {
  PYFACE_CHECK_DIM("depths", depths, 3, "(B, R, S)");
  PYFACE_CHECK_DIM("weights", weights, 3, "(B, R, S - 1)");
  PYFACE_CHECK_DIM("u", u, 3, "(B, R, M)");
  check_float_or_double("depths", depths);
  check_same("depths", depths, "weights", weights);
  check_same("depths", depths, "u", u);
  TORCH_CHECK_VALUE(depths.size(2) >= 4,
                    "depths: expected S >= 4 samples per ray (the pdf is built over the S - 3 "
                    "inner smoothed weights), got ", shape_str(depths));
  TORCH_CHECK_VALUE(weights.size(0) == depths.size(0) && weights.size(1) == depths.size(1) &&
                        weights.size(2) == depths.size(2) - 1,
                    "weights: expected shape (B, R, S - 1) = (", depths.size(0), ", ",
                    depths.size(1), ", ", depths.size(2) - 1, "), got ", shape_str(weights));
  TORCH_CHECK_VALUE(u.size(0) == depths.size(0) && u.size(1) == depths.size(1),
                    "u: expected shape (B, R, M) with (B, R) = (", depths.size(0), ", ",
                    depths.size(1), "), got ", shape_str(u));
}

TORCH_LIBRARY_FRAGMENT(pyface, m) {
  m.def(
      "mip_composite(Tensor features, Tensor densities, Tensor depths, Tensor? depth_range, "
      "float density_bias, bool white_back) -> (Tensor, Tensor, Tensor)");
  m.def(
      "mip_composite_bwd(Tensor grad_features, Tensor grad_depth, Tensor grad_weights, "
      "Tensor features, Tensor densities, Tensor depths, Tensor? depth_range, float density_bias, "
      "bool white_back, "
      "bool need_features_grad, bool need_densities_grad) -> (Tensor, Tensor)");
  m.def("sample_importance(Tensor depths, Tensor weights, Tensor u) -> Tensor");
}

}  // namespace render
}  // namespace pyface
