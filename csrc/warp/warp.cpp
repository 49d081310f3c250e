// 3D-flow warping: op schemas and the argument checks shared by the CPU and CUDA entry points
// (warp.h). The CPU kernels are in warp_cpu.cpp, the CUDA ones in warp_cuda.cpp / warp_kernels.cu.
//
// Ops (namespace pyface); every `*_bwd` returns empty tensors for gradients not asked for:
//   warp_volume(volume, grid, align_corners) -> out
//   warp_volume_bwd(grad_out, volume, grid, align_corners, need_volume_grad, need_grid_grad)
//       -> (grad_volume, grad_grid)
//   keypoint_flow(kp_source, kp_driving, masks, jacobian?, grid_align_corners) -> flow
//   keypoint_flow_bwd(grad_flow, kp_source, kp_driving, masks, jacobian?, grid_align_corners,
//       need_kp_grad, need_masks_grad, need_jacobian_grad)
//       -> (grad_kp_source, grad_kp_driving, grad_masks, grad_jacobian)
//   warp_by_keypoints(volume, kp_source, kp_driving, masks, jacobian?, align_corners,
//       grid_align_corners) -> out
//   warp_by_keypoints_bwd(grad_out, volume, kp_source, kp_driving, masks, jacobian?,
//       align_corners, grid_align_corners, need_volume_grad, need_kp_grad, need_masks_grad,
//       need_jacobian_grad) -> (grad_volume, grad_kp_source, grad_kp_driving, grad_masks,
//       grad_jacobian)
//   motion_field_input(volume, kp_source, kp_driving, jacobian?, heatmap_variance,
//       align_corners, grid_align_corners) -> out
//   motion_field_input_bwd(grad_out, volume, kp_source, kp_driving, jacobian?, heatmap_variance,
//       align_corners, grid_align_corners, need_volume_grad, need_kp_grad, need_jacobian_grad)
//       -> (grad_volume, grad_kp_source, grad_kp_driving, grad_jacobian)
// Autograd and fake kernels are registered from Python (pyface/_ops/warp.py).

#include "warp/warp.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

namespace pyface {
namespace warp {

void check_volume(const at::Tensor& volume, const char* name) {
  PYFACE_CHECK_DIM(name, volume, 5, "(B, C, D, H, W)");
  PYFACE_CHECK_FLOAT(name, volume);
  TORCH_CHECK_VALUE(volume.size(1) >= 1 && volume.size(2) >= 1 && volume.size(3) >= 1 &&
                        volume.size(4) >= 1,
                    name, ": C, D, H and W must be >= 1, got ", shape_str(volume));
}

void check_warp_volume(const at::Tensor& volume, const at::Tensor& grid) {
  check_volume(volume, "volume");
  PYFACE_CHECK_DIM("grid", grid, 5, "(B, D', H', W', 3)");
  PYFACE_CHECK_FLOAT("grid", grid);
  TORCH_CHECK_VALUE(grid.size(4) == 3, "grid: expected shape (B, D', H', W', 3), got ",
                    shape_str(grid), " (dim 4 must be 3)");
  TORCH_CHECK_VALUE(grid.size(0) == volume.size(0), "volume and grid: batch sizes differ, volume ",
                    shape_str(volume), " vs grid ", shape_str(grid));
  PYFACE_CHECK_SAME_DEVICE("volume", volume, "grid", grid);
}

int64_t check_keypoints(const at::Tensor& kp_source, const at::Tensor& kp_driving,
                        const std::optional<at::Tensor>& jacobian, int64_t batch) {
  PYFACE_CHECK_DIM("kp_source", kp_source, 3, "(B, K, 3)");
  PYFACE_CHECK_DIM("kp_driving", kp_driving, 3, "(B, K, 3)");
  PYFACE_CHECK_FLOAT("kp_source", kp_source);
  PYFACE_CHECK_FLOAT("kp_driving", kp_driving);
  TORCH_CHECK_VALUE(kp_source.size(2) == 3, "kp_source: expected shape (B, K, 3), got ",
                    shape_str(kp_source), " (dim 2 must be 3)");
  TORCH_CHECK_VALUE(kp_driving.sizes() == kp_source.sizes(), "kp_driving: expected shape ",
                    shape_str(kp_source), " (the shape of kp_source), got ", shape_str(kp_driving));
  TORCH_CHECK_VALUE(batch < 0 || kp_source.size(0) == batch, "kp_source: expected batch size ",
                    batch, ", got ", shape_str(kp_source));
  PYFACE_CHECK_SAME_DEVICE("kp_source", kp_source, "kp_driving", kp_driving);
  const int64_t K = kp_source.size(1);
  if (jacobian.has_value()) {
    const at::Tensor& j = *jacobian;
    PYFACE_CHECK_DIM("jacobian", j, 4, "(B, K, 3, 3)");
    PYFACE_CHECK_FLOAT("jacobian", j);
    TORCH_CHECK_VALUE(j.size(0) == kp_source.size(0) && j.size(1) == K && j.size(2) == 3 &&
                          j.size(3) == 3,
                      "jacobian: expected shape (", kp_source.size(0), ", ", K, ", 3, 3), got ",
                      shape_str(j));
    PYFACE_CHECK_SAME_DEVICE("jacobian", j, "kp_source", kp_source);
  }
  return K;
}

void check_masks(const at::Tensor& masks, int64_t batch, int64_t num_kp) {
  PYFACE_CHECK_DIM("masks", masks, 5, "(B, K+1, D, H, W)");
  PYFACE_CHECK_FLOAT("masks", masks);
  TORCH_CHECK_VALUE(masks.size(0) == batch && masks.size(1) == num_kp + 1,
                    "masks: expected shape (", batch, ", ", num_kp + 1,
                    ", D, H, W) (B, K+1 of the keypoints), got ", shape_str(masks));
}

void check_grad(const at::Tensor& grad, const char* name, at::IntArrayRef expected,
                const at::Tensor& like) {
  TORCH_CHECK_VALUE(grad.sizes() == expected, name, ": expected shape ", expected, ", got ",
                    shape_str(grad));
  PYFACE_CHECK_FLOAT(name, grad);
  TORCH_CHECK_VALUE(grad.device() == like.device(), name, ": expected a tensor on ",
                    like.device(), ", got ", grad.device());
}

int64_t check_warp_by_keypoints(const at::Tensor& volume, const at::Tensor& kp_source,
                                const at::Tensor& kp_driving, const at::Tensor& masks,
                                const std::optional<at::Tensor>& jacobian) {
  check_volume(volume, "volume");
  const int64_t K = check_keypoints(kp_source, kp_driving, jacobian, volume.size(0));
  check_masks(masks, volume.size(0), K);
  PYFACE_CHECK_SAME_DEVICE("kp_source", kp_source, "volume", volume);
  PYFACE_CHECK_SAME_DEVICE("masks", masks, "volume", volume);
  return K;
}

int64_t check_motion_field_input(const at::Tensor& volume, const at::Tensor& kp_source,
                                 const at::Tensor& kp_driving,
                                 const std::optional<at::Tensor>& jacobian, double variance) {
  check_volume(volume, "volume");
  const int64_t K = check_keypoints(kp_source, kp_driving, jacobian, volume.size(0));
  PYFACE_CHECK_SAME_DEVICE("kp_source", kp_source, "volume", volume);
  TORCH_CHECK_VALUE(variance > 0 && std::isfinite(variance),
                    "heatmap_variance: expected a positive finite number, got ", variance);
  return K;
}

at::Tensor none_like(const at::Tensor& t) { return at::empty({0}, t.options()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> kp_grads(
    const at::Tensor& total, int64_t B, int64_t K, const at::Tensor& kp_source,
    const at::Tensor& kp_driving, const std::optional<at::Tensor>& jacobian,
    const at::Tensor& like, bool need_kp, bool need_jac) {
  at::Tensor g_kps = none_like(kp_source), g_kpd = none_like(kp_driving);
  at::Tensor g_jac = jacobian.has_value() ? none_like(*jacobian) : none_like(like);
  if (need_kp) {
    g_kps = total.narrow(2, 0, 3).to(kp_source.scalar_type()).contiguous();
    g_kpd = total.narrow(2, 3, 3).to(kp_driving.scalar_type()).contiguous();
  }
  if (need_jac && jacobian.has_value()) {
    g_jac = total.narrow(2, 6, 9).reshape({B, K, 3, 3}).to(jacobian->scalar_type()).contiguous();
  }
  return {g_kps, g_kpd, g_jac};
}

TORCH_LIBRARY_FRAGMENT(pyface, m) {
  m.def("warp_volume(Tensor volume, Tensor grid, bool align_corners) -> Tensor");
  m.def(
      "warp_volume_bwd(Tensor grad_out, Tensor volume, Tensor grid, bool align_corners, "
      "bool need_volume_grad, bool need_grid_grad) -> (Tensor, Tensor)");
  m.def(
      "keypoint_flow(Tensor kp_source, Tensor kp_driving, Tensor masks, Tensor? jacobian, "
      "bool grid_align_corners) -> Tensor");
  m.def(
      "keypoint_flow_bwd(Tensor grad_flow, Tensor kp_source, Tensor kp_driving, Tensor masks, "
      "Tensor? jacobian, bool grid_align_corners, bool need_kp_grad, bool need_masks_grad, "
      "bool need_jacobian_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "warp_by_keypoints(Tensor volume, Tensor kp_source, Tensor kp_driving, Tensor masks, "
      "Tensor? jacobian, bool align_corners, bool grid_align_corners) -> Tensor");
  m.def(
      "warp_by_keypoints_bwd(Tensor grad_out, Tensor volume, Tensor kp_source, "
      "Tensor kp_driving, Tensor masks, Tensor? jacobian, bool align_corners, "
      "bool grid_align_corners, bool need_volume_grad, bool need_kp_grad, bool need_masks_grad, "
      "bool need_jacobian_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "motion_field_input(Tensor volume, Tensor kp_source, Tensor kp_driving, Tensor? jacobian, "
      "float heatmap_variance, bool align_corners, bool grid_align_corners) -> Tensor");
  m.def(
      "motion_field_input_bwd(Tensor grad_out, Tensor volume, Tensor kp_source, "
      "Tensor kp_driving, Tensor? jacobian, float heatmap_variance, bool align_corners, "
      "bool grid_align_corners, bool need_volume_grad, bool need_kp_grad, "
      "bool need_jacobian_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace warp
}  // namespace pyface
