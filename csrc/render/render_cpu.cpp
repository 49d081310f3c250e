// Volume rendering: the C++ CPU kernels and TORCH_LIBRARY_IMPL(pyface, CPU) of the ops declared
// in render.cpp (schemas and argument checks) and documented there.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "render/render.h"
#include "render/render_math.h"

namespace pyface {
namespace render {

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
  check_cpu("features", features);
  const int64_t B = features.size(0), R = features.size(1), S = features.size(2),
                C = features.size(3);
  at::Tensor out, depth, weights;
  std::tie(out, depth, weights) = composite_outputs(features);
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
  check_cpu("features", features);
  const int64_t B = features.size(0), R = features.size(1), S = features.size(2),
                C = features.size(3);
  at::Tensor g_feat, g_dens;
  std::tie(g_feat, g_dens) = composite_grads(features, need_features_grad, need_densities_grad);
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
  check_cpu("depths", depths);
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

TORCH_LIBRARY_IMPL(pyface, CPU, m) {
  m.impl("mip_composite", &mip_composite_cpu);
  m.impl("mip_composite_bwd", &mip_composite_bwd_cpu);
  m.impl("sample_importance", &sample_importance_cpu);
}

}  // namespace render
}  // namespace pyface
