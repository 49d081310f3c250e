// Volume-rendering CUDA launchers. Framework-free: raw pointers, sizes and a cudaStream_t, so
// this header and render_kernels.cu compile without any torch header. One thread per ray.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"

namespace pyface {
namespace render {
namespace cuda {

// features (rays, S, C), densities / depths (rays, S) contiguous; range: device pointer to
// (min, max) of the depth clamp. Outputs: out (rays, C), depth (rays,), weights (rays, S - 1).
cudaError_t composite_forward(DType dtype, const void* features, const void* densities,
                              const void* depths, const void* range, int64_t rays, int64_t S,
                              int64_t C, double density_bias, bool white_back, void* out,
                              void* depth, void* weights, cudaStream_t stream);

// grad_out (rays, C), grad_depth (rays,), grad_weights (rays, S - 1) contiguous. grad_features
// (rays, S, C) and grad_densities (rays, S) may be null when not needed.
cudaError_t composite_backward(DType dtype, const void* grad_out, const void* grad_depth,
                               const void* grad_weights, const void* features,
                               const void* densities, const void* depths, const void* range,
                               int64_t rays, int64_t S, int64_t C, double density_bias,
                               bool white_back, void* grad_features, void* grad_densities,
                               cudaStream_t stream);

// depths (rays, S), weights (rays, S - 1), u (rays, M) contiguous -> out (rays, M);
// scratch: rays * max(S - 2, 1) values of the dtype.
cudaError_t importance(DType dtype, const void* depths, const void* weights, const void* u,
                       int64_t rays, int64_t S, int64_t M, void* out, void* scratch,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace render
}  // namespace pyface
