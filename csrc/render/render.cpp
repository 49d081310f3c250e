// Volume rendering: op schemas, argument checks, and the C++ CPU kernels.
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

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "render/render_math.h"

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

namespace {

// Global min and max of the depths (EG3D clamps to torch.min/max over the whole tensor).
// An explicit depth_range (2,) = (min, max) lets callers that composite rays in chunks clamp to
// the range of the whole batch.
template <typename scalar_t>
void depth_range(const at::Tensor& depths, const std::optional<at::Tensor>& range, double& dmin,
                 double& dmax) {
  if (range.has_value()) {
    const auto r = range->to(at::kCPU, at::kDouble).contiguous();
    TORCH_CHECK_VALUE(r.numel() == 2, "depth_range: expected 2 values (min, max), got shape ",
                      shape_str(*range));
    dmin = r.const_data_ptr<double>()[0];
    dmax = r.const_data_ptr<double>()[1];
    return;
  }
  auto mm = at::aminmax(depths);
  dmin = static_cast<double>(std::get<0>(mm).item<scalar_t>());
  dmax = static_cast<double>(std::get<1>(mm).item<scalar_t>());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mip_composite_cpu(
    const at::Tensor& features, const at::Tensor& densities, const at::Tensor& depths,
    const std::optional<at::Tensor>& depth_range_, double density_bias, bool white_back) {
  check_composite_inputs(features, densities, depths);
  TORCH_CHECK_VALUE(features.device().is_cpu(), "features: expected a CPU tensor, got ",
                    features.device());
  const int64_t B = features.size(0), R = features.size(1), S = features.size(2),
                C = features.size(3);
  auto out = at::empty({B, R, C}, features.options());
  auto depth = at::empty({B, R, 1}, features.options());
  auto weights = at::empty({B, R, S - 1}, features.options());
  if (B * R == 0) return {out, depth, weights};
  const auto f = features.contiguous();
  const auto s = densities.contiguous();
  const auto t = depths.contiguous();
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "mip_composite_cpu", [&] {
    double dmin, dmax;
    depth_range<scalar_t>(t, depth_range_, dmin, dmax);
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    scalar_t* dp = depth.mutable_data_ptr<scalar_t>();
    scalar_t* wp = weights.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S * (C + 2)));
    at::parallel_for(0, B * R, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(std::max<int64_t>(C, 1));
      for (int64_t r = begin; r < end; ++r) {
        composite_forward_ray<scalar_t, double>(fp + r * S * C, sp + r * S, tp + r * S, S, C,
                                                density_bias, white_back, dmin, dmax, op + r * C,
                                                dp + r, wp + r * (S - 1), acc.data());
      }
    });
  });
  return {out, depth, weights};
}

std::tuple<at::Tensor, at::Tensor> mip_composite_bwd_cpu(
    const at::Tensor& grad_features, const at::Tensor& grad_depth, const at::Tensor& grad_weights,
    const at::Tensor& features, const at::Tensor& densities, const at::Tensor& depths,
    const std::optional<at::Tensor>& depth_range_, double density_bias, bool white_back,
    bool need_features_grad, bool need_densities_grad) {
  check_composite_inputs(features, densities, depths);
  check_composite_grads(grad_features, grad_depth, grad_weights, features);
  TORCH_CHECK_VALUE(features.device().is_cpu(), "features: expected a CPU tensor, got ",
                    features.device());
  const int64_t B = features.size(0), R = features.size(1), S = features.size(2),
                C = features.size(3);
  auto g_feat = at::empty(need_features_grad ? at::IntArrayRef({B, R, S, C}) : at::IntArrayRef({0}),
                          features.options());
  auto g_dens = at::empty(need_densities_grad ? at::IntArrayRef({B, R, S}) : at::IntArrayRef({0}),
                          features.options());
  if (B * R == 0 || !(need_features_grad || need_densities_grad)) return {g_feat, g_dens};
  const auto dt = features.scalar_type();
  const auto f = features.contiguous();
  const auto s = densities.contiguous();
  const auto t = depths.contiguous();
  const auto go = grad_features.to(dt).contiguous();
  const auto gd = grad_depth.to(dt).contiguous();
  const auto gw = grad_weights.to(dt).contiguous();
  AT_DISPATCH_FLOATING_TYPES(dt, "mip_composite_bwd_cpu", [&] {
    double dmin, dmax;
    depth_range<scalar_t>(t, depth_range_, dmin, dmax);
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    const scalar_t* gdp = gd.const_data_ptr<scalar_t>();
    const scalar_t* gwp = gw.const_data_ptr<scalar_t>();
    scalar_t* gfp = need_features_grad ? g_feat.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gsp = need_densities_grad ? g_dens.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, S * (C + 2)));
    at::parallel_for(0, B * R, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> dots(S);
      std::vector<Interval<double>> ivs(S - 1);
      for (int64_t r = begin; r < end; ++r) {
        composite_backward_ray<scalar_t, double>(
            gop + r * C, static_cast<double>(gdp[r]), gwp + r * (S - 1), fp + r * S * C,
            sp + r * S, tp + r * S, S, C, density_bias, white_back, dmin, dmax,
            gfp ? gfp + r * S * C : nullptr, gsp ? gsp + r * S : nullptr, dots.data(),
            ivs.data());
      }
    });
  });
  return {g_feat, g_dens};
}

at::Tensor sample_importance_cpu(const at::Tensor& depths, const at::Tensor& weights,
                                 const at::Tensor& u) {
  check_importance_inputs(depths, weights, u);
  TORCH_CHECK_VALUE(depths.device().is_cpu(), "depths: expected a CPU tensor, got ",
                    depths.device());
  const int64_t B = depths.size(0), R = depths.size(1), S = depths.size(2), M = u.size(2);
  auto out = at::empty({B, R, M}, depths.options());
  if (B * R * M == 0) return out;
  const auto t = depths.contiguous();
  const auto w = weights.contiguous();
  const auto uu = u.contiguous();
  AT_DISPATCH_FLOATING_TYPES(depths.scalar_type(), "sample_importance_cpu", [&] {
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* up = uu.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, S + M));
    at::parallel_for(0, B * R, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> cdf(std::max<int64_t>(S - 2, 1));  // nb + 1 = S - 2 values
      for (int64_t r = begin; r < end; ++r) {
        importance_ray<scalar_t, double>(tp + r * S, wp + r * (S - 1), up + r * M, S, M,
                                         op + r * M, cdf.data());
      }
    });
  });
  return out;
}

}  // namespace

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

TORCH_LIBRARY_IMPL(pyface, CPU, m) {
  m.impl("mip_composite", &mip_composite_cpu);
  m.impl("mip_composite_bwd", &mip_composite_bwd_cpu);
  m.impl("sample_importance", &sample_importance_cpu);
}

}  // namespace render
}  // namespace pyface
