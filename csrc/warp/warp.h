// 3D-flow warping: argument checks shared by the CPU and CUDA entry points (defined in warp.cpp,
// next to the op schemas).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "common/checks.h"

namespace pyface {
namespace warp {

// volume (B, C, D, H, W) and grid (B, D', H', W', 3).
void check_warp_volume(const at::Tensor& volume, const at::Tensor& grid);

// kp_source, kp_driving (B, K, 3), jacobian (B, K, 3, 3) if given; B and K checked against
// batch / num_kp when those are >= 0. Returns K.
int64_t check_keypoints(const at::Tensor& kp_source, const at::Tensor& kp_driving,
                        const std::optional<at::Tensor>& jacobian, int64_t batch);

// masks (B, K+1, D, H, W) against keypoints with K keypoints.
void check_masks(const at::Tensor& masks, int64_t batch, int64_t num_kp);

// volume (B, C, D, H, W) with C, D, H, W >= 1.
void check_volume(const at::Tensor& volume, const char* name);

// warp_by_keypoints: volume (B, C, D, H, W), keypoints (B, K, 3) (+ jacobian (B, K, 3, 3)),
// masks (B, K+1, D', H', W') on the volume's device. Returns K.
int64_t check_warp_by_keypoints(const at::Tensor& volume, const at::Tensor& kp_source,
                                const at::Tensor& kp_driving, const at::Tensor& masks,
                                const std::optional<at::Tensor>& jacobian);

// motion_field_input: volume and keypoints as above, heatmap variance > 0. Returns K.
int64_t check_motion_field_input(const at::Tensor& volume, const at::Tensor& kp_source,
                                 const at::Tensor& kp_driving,
                                 const std::optional<at::Tensor>& jacobian, double variance);

// grad_out against an expected shape.
void check_grad(const at::Tensor& grad, const char* name, at::IntArrayRef expected,
                const at::Tensor& like);

// An empty tensor with t's options: what a `*_bwd` op returns for a gradient not asked for.
at::Tensor none_like(const at::Tensor& t);

// (grad_kp_source, grad_kp_driving, grad_jacobian) of a `*_bwd` op from the keypoint partials
// summed over the voxel blocks, total (B, K, 15) = [d kp_source (3), d kp_driving (3),
// d jacobian (9)] in the accumulation dtype (read only for the gradients asked for). Gradients
// not asked for are none_like(kp_source / kp_driving / jacobian, or `like` without a jacobian).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kp_grads(
    const at::Tensor& total, int64_t B, int64_t K, const at::Tensor& kp_source,
    const at::Tensor& kp_driving, const std::optional<at::Tensor>& jacobian,
    const at::Tensor& like, bool need_kp, bool need_jac);

}  // namespace warp
}  // namespace pyface
