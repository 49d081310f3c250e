// Tri-plane sampling CUDA launchers. Framework-free: raw pointers, sizes and a cudaStream_t, so
// this header and triplane_kernels.cu compile without any torch header.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"

namespace pyface {
namespace triplane {
namespace cuda {

struct Problem {
  int64_t B, N, C, H, W;
  int64_t sb, sp, sc, sh, sw;        // planes strides (elements)
  int64_t gsb, gsp, gsc, gsh, gsw;   // grad_planes strides (elements), backward only
  int32_t axes;                      // pyface::PlaneAxes
  int32_t reduce;                    // pyface::Reduce
  double scale;                      // 2 / box_size
  bool align_corners;
};

// out: (B, N, C) or (B, 3, N, C) contiguous, dtype `dtype`.
// points: (B, N, 3) contiguous in the accumulation type (float64 for F64 planes, else float32).
cudaError_t forward(DType dtype, const void* planes, const void* points, void* out,
                    const Problem& p, cudaStream_t stream);

// grad_out: like out (contiguous). grad_planes: zero-initialised, accumulation type, strides
// p.gs*; grad_points: zero-initialised (B, N, 3) accumulation type. Either may be null when not
// needed.
cudaError_t backward(DType dtype, const void* grad_out, const void* planes, const void* points,
                     void* grad_planes, void* grad_points, const Problem& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace triplane
}  // namespace pyface
