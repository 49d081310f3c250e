// Torch glue for the 3D-flow warping CUDA kernels: argument checks, dtype conversion of the small
// inputs, allocation, the current stream, and TORCH_LIBRARY_IMPL(pyface, CUDA). Built only
// against a CUDA build of torch.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "common/cuda_glue.h"
#include "warp/warp.h"
#include "warp/warp_kernels.h"

namespace pyface {
namespace warp {
namespace {

cuda::Volume volume_desc(const at::Tensor& v) {
  return {v.size(0),   v.size(1),   v.size(2),   v.size(3),   v.size(4),
          v.stride(0), v.stride(1), v.stride(2), v.stride(3), v.stride(4)};
}

struct KpTensors {
  at::Tensor kps, kpd, jac;
  cuda::Keypoints desc() const {
    return {kps.const_data_ptr(), kpd.const_data_ptr(),
            jac.defined() ? jac.const_data_ptr() : nullptr, kps.size(1)};
  }
};

KpTensors kp_tensors(const at::Tensor& kps, const at::Tensor& kpd,
                     const std::optional<at::Tensor>& jac, at::ScalarType acc) {
  KpTensors k{kps.to(acc).contiguous(), kpd.to(acc).contiguous(), at::Tensor()};
  if (jac.has_value()) k.jac = jac->to(acc).contiguous();
  return k;
}

at::Tensor warp_volume_cuda(const at::Tensor& volume, const at::Tensor& grid, bool align_corners) {
  check_warp_volume(volume, grid);
  check_cuda("volume", volume);
  const c10::cuda::CUDAGuard guard(volume.device());
  const cuda::Output o{grid.size(1), grid.size(2), grid.size(3)};
  auto out = at::empty({volume.size(0), volume.size(1), o.Do, o.Ho, o.Wo}, volume.options());
  if (out.numel() == 0) return out;
  const auto gr = grid.to(acc_dtype(volume)).contiguous();
  C10_CUDA_CHECK(cuda::warp_volume_forward(dtype_of("volume", volume),
                                           volume.const_data_ptr(), gr.const_data_ptr(),
                                           out.mutable_data_ptr(), volume_desc(volume), o,
                                           align_corners, current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> warp_volume_bwd_cuda(const at::Tensor& grad_out,
                                                        const at::Tensor& volume,
                                                        const at::Tensor& grid, bool align_corners,
                                                        bool need_volume_grad,
                                                        bool need_grid_grad) {
  check_warp_volume(volume, grid);
  check_cuda("volume", volume);
  const c10::cuda::CUDAGuard guard(volume.device());
  const cuda::Output o{grid.size(1), grid.size(2), grid.size(3)};
  check_grad(grad_out, "grad_out", {volume.size(0), volume.size(1), o.Do, o.Ho, o.Wo}, volume);
  const auto acc = acc_dtype(volume);
  const auto gr = grid.to(acc).contiguous();
  const auto go = grad_out.to(acc).contiguous();
  at::Tensor gv, gg;
  if (need_volume_grad) gv = at::zeros(volume.sizes(), volume.options().dtype(acc));
  if (need_grid_grad) gg = at::zeros(grid.sizes(), grid.options().dtype(acc));
  C10_CUDA_CHECK(cuda::warp_volume_backward(
      dtype_of("volume", volume), go.const_data_ptr(), volume.const_data_ptr(),
      gr.const_data_ptr(), gv.defined() ? gv.mutable_data_ptr() : nullptr,
      gg.defined() ? gg.mutable_data_ptr() : nullptr, volume_desc(volume), o, align_corners,
      current_stream()));
  return {gv.defined() ? gv.to(volume.scalar_type()) : none_like(volume),
          gg.defined() ? gg.to(grid.scalar_type()) : none_like(grid)};
}

at::Tensor keypoint_flow_cuda(const at::Tensor& kp_source, const at::Tensor& kp_driving,
                              const at::Tensor& masks, const std::optional<at::Tensor>& jacobian,
                              bool grid_align_corners) {
  const int64_t K = check_keypoints(kp_source, kp_driving, jacobian, -1);
  const int64_t B = kp_source.size(0);
  check_masks(masks, B, K);
  PYFACE_CHECK_SAME_DEVICE("masks", masks, "kp_source", kp_source);
  check_cuda("masks", masks);
  const c10::cuda::CUDAGuard guard(masks.device());
  const auto acc = acc_dtype(masks);
  const cuda::Output o{masks.size(2), masks.size(3), masks.size(4)};
  auto flow = at::empty({B, o.Do, o.Ho, o.Wo, 3}, masks.options().dtype(acc));
  if (flow.numel() > 0) {
    const KpTensors kp = kp_tensors(kp_source, kp_driving, jacobian, acc);
    const auto m = masks.to(acc).contiguous();
    C10_CUDA_CHECK(cuda::keypoint_flow_forward(dtype_of("masks", acc), m.const_data_ptr(),
                                               kp.desc(), flow.mutable_data_ptr(), B, o,
                                               grid_align_corners, current_stream()));
  }
  return flow.to(masks.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> keypoint_flow_bwd_cuda(
    const at::Tensor& grad_flow, const at::Tensor& kp_source, const at::Tensor& kp_driving,
    const at::Tensor& masks, const std::optional<at::Tensor>& jacobian, bool grid_align_corners,
    bool need_kp_grad, bool need_masks_grad, bool need_jacobian_grad) {
  const int64_t K = check_keypoints(kp_source, kp_driving, jacobian, -1);
  const int64_t B = kp_source.size(0);
  check_masks(masks, B, K);
  PYFACE_CHECK_SAME_DEVICE("masks", masks, "kp_source", kp_source);
  check_cuda("masks", masks);
  const c10::cuda::CUDAGuard guard(masks.device());
  const cuda::Output o{masks.size(2), masks.size(3), masks.size(4)};
  check_grad(grad_flow, "grad_flow", {B, o.Do, o.Ho, o.Wo, 3}, masks);
  need_jacobian_grad = need_jacobian_grad && jacobian.has_value();
  const auto acc = acc_dtype(masks);
  const KpTensors kp = kp_tensors(kp_source, kp_driving, jacobian, acc);
  const auto m = masks.to(acc).contiguous();
  const auto gf = grad_flow.to(acc).contiguous();
  const bool need_part = need_kp_grad || need_jacobian_grad;
  const int64_t nparts = cuda::num_partials(o.Do * o.Ho * o.Wo);
  at::Tensor gm, part = at::zeros({B, nparts, K, 15}, masks.options().dtype(acc));
  if (need_masks_grad) gm = at::zeros(masks.sizes(), masks.options().dtype(acc));
  C10_CUDA_CHECK(cuda::keypoint_flow_backward(
      dtype_of("masks", acc), gf.const_data_ptr(), m.const_data_ptr(), kp.desc(),
      gm.defined() ? gm.mutable_data_ptr() : nullptr,
      need_part ? part.mutable_data_ptr() : nullptr, B, o, grid_align_corners, current_stream()));
  const auto [g_kps, g_kpd, g_jac] = kp_grads(part.sum(1), B, K, kp_source, kp_driving, jacobian,
                                              masks, need_kp_grad, need_jacobian_grad);
  return {g_kps, g_kpd, gm.defined() ? gm.to(masks.scalar_type()) : none_like(masks), g_jac};
}

at::Tensor warp_by_keypoints_cuda(const at::Tensor& volume, const at::Tensor& kp_source,
                                  const at::Tensor& kp_driving, const at::Tensor& masks,
                                  const std::optional<at::Tensor>& jacobian, bool align_corners,
                                  bool grid_align_corners) {
  check_warp_by_keypoints(volume, kp_source, kp_driving, masks, jacobian);
  check_cuda("volume", volume);
  const c10::cuda::CUDAGuard guard(volume.device());
  const cuda::Output o{masks.size(2), masks.size(3), masks.size(4)};
  auto out = at::empty({volume.size(0), volume.size(1), o.Do, o.Ho, o.Wo}, volume.options());
  if (out.numel() == 0) return out;
  const auto acc = acc_dtype(volume);
  const KpTensors kp = kp_tensors(kp_source, kp_driving, jacobian, acc);
  const auto m = masks.to(acc).contiguous();
  C10_CUDA_CHECK(cuda::warp_by_keypoints_forward(
      dtype_of("volume", volume), volume.const_data_ptr(), m.const_data_ptr(), kp.desc(),
      out.mutable_data_ptr(), volume_desc(volume), o, align_corners, grid_align_corners,
      current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> warp_by_keypoints_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& volume, const at::Tensor& kp_source,
    const at::Tensor& kp_driving, const at::Tensor& masks,
    const std::optional<at::Tensor>& jacobian, bool align_corners, bool grid_align_corners,
    bool need_volume_grad, bool need_kp_grad, bool need_masks_grad, bool need_jacobian_grad) {
  check_warp_by_keypoints(volume, kp_source, kp_driving, masks, jacobian);
  check_cuda("volume", volume);
  const c10::cuda::CUDAGuard guard(volume.device());
  const int64_t B = volume.size(0), K = kp_source.size(1);
  const cuda::Output o{masks.size(2), masks.size(3), masks.size(4)};
  check_grad(grad_out, "grad_out", {B, volume.size(1), o.Do, o.Ho, o.Wo}, volume);
  need_jacobian_grad = need_jacobian_grad && jacobian.has_value();
  const auto acc = acc_dtype(volume);
  const KpTensors kp = kp_tensors(kp_source, kp_driving, jacobian, acc);
  const auto m = masks.to(acc).contiguous();
  const auto go = grad_out.to(acc).contiguous();
  const bool need_part = need_kp_grad || need_jacobian_grad;
  const int64_t nparts = cuda::num_partials(o.Do * o.Ho * o.Wo);
  at::Tensor gv, gm, part = at::zeros({B, nparts, K, 15}, volume.options().dtype(acc));
  if (need_volume_grad) gv = at::zeros(volume.sizes(), volume.options().dtype(acc));
  if (need_masks_grad) gm = at::zeros(masks.sizes(), masks.options().dtype(acc));
  C10_CUDA_CHECK(cuda::warp_by_keypoints_backward(
      dtype_of("volume", volume), go.const_data_ptr(), volume.const_data_ptr(),
      m.const_data_ptr(), kp.desc(), gv.defined() ? gv.mutable_data_ptr() : nullptr,
      gm.defined() ? gm.mutable_data_ptr() : nullptr,
      need_part ? part.mutable_data_ptr() : nullptr, volume_desc(volume), o, align_corners,
      grid_align_corners, current_stream()));
  const auto [g_kps, g_kpd, g_jac] = kp_grads(part.sum(1), B, K, kp_source, kp_driving, jacobian,
                                              masks, need_kp_grad, need_jacobian_grad);
  return {gv.defined() ? gv.to(volume.scalar_type()) : none_like(volume), g_kps, g_kpd,
          gm.defined() ? gm.to(masks.scalar_type()) : none_like(masks), g_jac};
}

at::Tensor motion_field_input_cuda(const at::Tensor& volume, const at::Tensor& kp_source,
                                   const at::Tensor& kp_driving,
                                   const std::optional<at::Tensor>& jacobian,
                                   double heatmap_variance, bool align_corners,
                                   bool grid_align_corners) {
  check_motion_field_input(volume, kp_source, kp_driving, jacobian, heatmap_variance);
  check_cuda("volume", volume);
  const c10::cuda::CUDAGuard guard(volume.device());
  const int64_t B = volume.size(0), C = volume.size(1), K = kp_source.size(1);
  auto out = at::empty({B, (K + 1) * (C + 1), volume.size(2), volume.size(3), volume.size(4)},
                       volume.options());
  if (out.numel() == 0) return out;
  const KpTensors kp = kp_tensors(kp_source, kp_driving, jacobian, acc_dtype(volume));
  C10_CUDA_CHECK(cuda::motion_field_input_forward(
      dtype_of("volume", volume), volume.const_data_ptr(), kp.desc(), out.mutable_data_ptr(),
      volume_desc(volume), heatmap_variance, align_corners, grid_align_corners, current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> motion_field_input_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& volume, const at::Tensor& kp_source,
    const at::Tensor& kp_driving, const std::optional<at::Tensor>& jacobian,
    double heatmap_variance, bool align_corners, bool grid_align_corners, bool need_volume_grad,
    bool need_kp_grad, bool need_jacobian_grad) {
  check_motion_field_input(volume, kp_source, kp_driving, jacobian, heatmap_variance);
  check_cuda("volume", volume);
  const c10::cuda::CUDAGuard guard(volume.device());
  const int64_t B = volume.size(0), C = volume.size(1), K = kp_source.size(1);
  const int64_t D = volume.size(2), H = volume.size(3), W = volume.size(4);
  check_grad(grad_out, "grad_out", {B, (K + 1) * (C + 1), D, H, W}, volume);
  need_jacobian_grad = need_jacobian_grad && jacobian.has_value();
  const auto acc = acc_dtype(volume);
  const KpTensors kp = kp_tensors(kp_source, kp_driving, jacobian, acc);
  const auto go = grad_out.to(acc).contiguous();
  const bool need_part = need_kp_grad || need_jacobian_grad;
  const int64_t nparts = cuda::num_partials(D * H * W);
  at::Tensor gv, part = at::zeros({B, nparts, K, 15}, volume.options().dtype(acc));
  if (need_volume_grad) gv = at::zeros(volume.sizes(), volume.options().dtype(acc));
  C10_CUDA_CHECK(cuda::motion_field_input_backward(
      dtype_of("volume", volume), go.const_data_ptr(), volume.const_data_ptr(), kp.desc(),
      gv.defined() ? gv.mutable_data_ptr() : nullptr,
      need_part ? part.mutable_data_ptr() : nullptr, volume_desc(volume), heatmap_variance,
      align_corners, grid_align_corners, current_stream()));
  const auto [g_kps, g_kpd, g_jac] = kp_grads(part.sum(1), B, K, kp_source, kp_driving, jacobian,
                                              volume, need_kp_grad, need_jacobian_grad);
  return {gv.defined() ? gv.to(volume.scalar_type()) : none_like(volume), g_kps, g_kpd, g_jac};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyface, CUDA, m) {
  m.impl("warp_volume", &warp_volume_cuda);
  m.impl("warp_volume_bwd", &warp_volume_bwd_cuda);
  m.impl("keypoint_flow", &keypoint_flow_cuda);
  m.impl("keypoint_flow_bwd", &keypoint_flow_bwd_cuda);
  m.impl("warp_by_keypoints", &warp_by_keypoints_cuda);
  m.impl("warp_by_keypoints_bwd", &warp_by_keypoints_bwd_cuda);
  m.impl("motion_field_input", &motion_field_input_cuda);
  m.impl("motion_field_input_bwd", &motion_field_input_bwd_cuda);
}

}  // namespace warp
}  // namespace pyface
