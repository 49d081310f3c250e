// 3D-flow warping CUDA launchers. Framework-free: raw pointers, sizes and a cudaStream_t, so this
// header and warp_kernels.cu compile without any torch header.
//
// Conventions: the volume is read through its strides; every other input (grid, masks,
// keypoints, jacobian, grad_out) is contiguous in the accumulation type (float64 for float64
// volumes, else float32); gradients are zero-initialised contiguous buffers in the accumulation
// type. Keypoint gradients are written as per-block partials (B, num_partials(Vo), K, 15) =
// [d kp_source (3), d kp_driving (3), d jacobian (9)] that the caller sums over dim 1.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"

namespace pyface {
namespace warp {
namespace cuda {

constexpr int kThreads = 256;

// Number of keypoint-gradient partials per batch item for an output of Vo voxels.
inline int64_t num_partials(int64_t Vo) { return (Vo + kThreads - 1) / kThreads; }

struct Volume {
  int64_t B, C, D, H, W;
  int64_t sb, sc, sd, sh, sw;  // strides (elements)
};

struct Keypoints {
  const void* kp_source;   // (B, K, 3)
  const void* kp_driving;  // (B, K, 3)
  const void* jacobian;    // (B, K, 3, 3) or null
  int64_t K;
};

struct Output {
  int64_t Do, Ho, Wo;  // output (and masks) spatial size
};

// out (B, C, Do, Ho, Wo) contiguous in the volume dtype; grid (B, Do, Ho, Wo, 3).
cudaError_t warp_volume_forward(DType dtype, const void* volume, const void* grid, void* out,
                                const Volume& v, const Output& o, bool align_corners,
                                cudaStream_t stream);
// grad_volume (B, C, D, H, W) and grad_grid (B, Do, Ho, Wo, 3) may be null.
cudaError_t warp_volume_backward(DType dtype, const void* grad_out, const void* volume,
                                 const void* grid, void* grad_volume, void* grad_grid,
                                 const Volume& v, const Output& o, bool align_corners,
                                 cudaStream_t stream);

// flow (B, Do, Ho, Wo, 3) in the accumulation type `acc` (F32 or F64); masks (B, K+1, ...).
cudaError_t keypoint_flow_forward(DType acc, const void* masks, const Keypoints& kp, void* flow,
                                  int64_t B, const Output& o, bool grid_align_corners,
                                  cudaStream_t stream);
// grad_masks and partials may be null.
cudaError_t keypoint_flow_backward(DType acc, const void* grad_flow, const void* masks,
                                   const Keypoints& kp, void* grad_masks, void* partials,
                                   int64_t B, const Output& o, bool grid_align_corners,
                                   cudaStream_t stream);

cudaError_t warp_by_keypoints_forward(DType dtype, const void* volume, const void* masks,
                                      const Keypoints& kp, void* out, const Volume& v,
                                      const Output& o, bool align_corners,
                                      bool grid_align_corners, cudaStream_t stream);
// grad_volume, grad_masks and partials may be null.
cudaError_t warp_by_keypoints_backward(DType dtype, const void* grad_out, const void* volume,
                                       const void* masks, const Keypoints& kp, void* grad_volume,
                                       void* grad_masks, void* partials, const Volume& v,
                                       const Output& o, bool align_corners,
                                       bool grid_align_corners, cudaStream_t stream);

// out (B, (K+1)(C+1), D, H, W) contiguous in the volume dtype; the output grid is the volume's.
cudaError_t motion_field_input_forward(DType dtype, const void* volume, const Keypoints& kp,
                                       void* out, const Volume& v, double heatmap_variance,
                                       bool align_corners, bool grid_align_corners,
                                       cudaStream_t stream);
// grad_volume and partials (B, num_partials(D*H*W), K, 15) may be null.
cudaError_t motion_field_input_backward(DType dtype, const void* grad_out, const void* volume,
                                        const Keypoints& kp, void* grad_volume, void* partials,
                                        const Volume& v, double heatmap_variance,
                                        bool align_corners, bool grid_align_corners,
                                        cudaStream_t stream);

}  // namespace cuda
}  // namespace warp
}  // namespace pyface
