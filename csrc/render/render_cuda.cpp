// Torch glue for the volume-rendering CUDA kernels: argument checks, allocation, the current
// stream, and TORCH_LIBRARY_IMPL(pyface, CUDA). Built only against a CUDA build of torch.
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common/cuda_glue.h"
#include "render/render.h"
#include "render/render_kernels.h"

namespace pyface {
namespace render {
namespace {

// (min, max) of the depth clamp on the device, without a host synchronisation.
at::Tensor clamp_range(const at::Tensor& depths, const std::optional<at::Tensor>& range) {
  if (range.has_value()) {
    TORCH_CHECK_VALUE(range->numel() == 2, "depth_range: expected 2 values (min, max), got shape ",
                      shape_str(*range));
    return range->to(depths.device(), depths.scalar_type()).contiguous();
  }
  auto mm = at::aminmax(depths);
  return at::stack({std::get<0>(mm), std::get<1>(mm)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mip_composite_cuda(
    const at::Tensor& features, const at::Tensor& densities, const at::Tensor& depths,
    const std::optional<at::Tensor>& depth_range, double density_bias, bool white_back) {
  check_composite_inputs(features, densities, depths);
  check_cuda("features", features);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), R = features.size(1), S = features.size(2),
                C = features.size(3);
  at::Tensor out, depth, weights;
  std::tie(out, depth, weights) = composite_outputs(features);
  if (B * R == 0) return {out, depth, weights};
  const auto f = features.contiguous();
  const auto s = densities.contiguous();
  const auto t = depths.contiguous();
  const auto range = clamp_range(t, depth_range);
  C10_CUDA_CHECK(cuda::composite_forward(
      dtype_of("features", features), f.const_data_ptr(), s.const_data_ptr(), t.const_data_ptr(),
      range.const_data_ptr(), B * R, S, C, density_bias, white_back, out.mutable_data_ptr(),
      depth.mutable_data_ptr(), weights.mutable_data_ptr(),
      current_stream()));
  return {out, depth, weights};
}

std::tuple<at::Tensor, at::Tensor> mip_composite_bwd_cuda(
    const at::Tensor& grad_features, const at::Tensor& grad_depth, const at::Tensor& grad_weights,
    const at::Tensor& features, const at::Tensor& densities, const at::Tensor& depths,
    const std::optional<at::Tensor>& depth_range, double density_bias, bool white_back,
    bool need_features_grad, bool need_densities_grad) {
  check_composite_inputs(features, densities, depths);
  check_composite_grads(grad_features, grad_depth, grad_weights, features);
  check_cuda("features", features);
  const c10::cuda::CUDAGuard guard(features.device());
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
  const auto range = clamp_range(t, depth_range);
  C10_CUDA_CHECK(cuda::composite_backward(
      dtype_of("features", features), go.const_data_ptr(), gd.const_data_ptr(), gw.const_data_ptr(),
      f.const_data_ptr(), s.const_data_ptr(), t.const_data_ptr(), range.const_data_ptr(), B * R,
      S, C, density_bias, white_back,
      need_features_grad ? g_feat.mutable_data_ptr() : nullptr,
      need_densities_grad ? g_dens.mutable_data_ptr() : nullptr,
      current_stream()));
  return {g_feat, g_dens};
}

at::Tensor sample_importance_cuda(const at::Tensor& depths, const at::Tensor& weights,
                                  const at::Tensor& u) {
  check_importance_inputs(depths, weights, u);
  check_cuda("depths", depths);
  const c10::cuda::CUDAGuard guard(depths.device());
  const int64_t B = depths.size(0), R = depths.size(1), S = depths.size(2), M = u.size(2);
  auto out = at::empty({B, R, M}, depths.options());
  if (B * R * M == 0) return out;
  const auto t = depths.contiguous();
  const auto w = weights.contiguous();
  const auto uu = u.contiguous();
  auto scratch = at::empty({B * R * std::max<int64_t>(S - 2, 1)}, depths.options());
  C10_CUDA_CHECK(cuda::importance(dtype_of("depths", depths), t.const_data_ptr(),
                                  w.const_data_ptr(), uu.const_data_ptr(), B * R, S, M,
                                  out.mutable_data_ptr(), scratch.mutable_data_ptr(),
                                  current_stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyface, CUDA, m) {
  m.impl("mip_composite", &mip_composite_cuda);
  m.impl("mip_composite_bwd", &mip_composite_bwd_cuda);
  m.impl("sample_importance", &sample_importance_cuda);
}

}  // namespace render
}  // namespace pyface
