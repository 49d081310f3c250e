// CUDA launchers of the rasterization ops. Framework-free (raw pointers, sizes, cudaStream_t);
// the torch glue in raster_cuda.cpp allocates every buffer and checks every argument.
//
// Element types: scalar_t in {float, double, __half, __nv_bfloat16} via the DType tag; index
// tensors are int64; geometry inputs (verts, points) are passed as contiguous float64 copies so
// that the coverage / nearest-point decisions use the same arithmetic as the CPU kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "raster/raster_math.h"

namespace pyface {
namespace raster {
namespace cuda {

// Mesh rasterization. zbuf: B*H*W uint64 workspace. Outputs face_index (B, H, W), bary
// (B, H, W, 3) and depth (B, 1, H, W) in `out_dtype`.
cudaError_t raster_mesh(const double* verts, const int64_t* faces, int64_t B, int64_t V, int64_t F,
                        int64_t H, int64_t W, Cull cull, bool perspective_correct,
                        unsigned long long* zbuf, int64_t* face_index, void* bary, void* depth,
                        DType out_dtype, cudaStream_t stream);

// attr_image (B, C, H, W) from attributes (B, V, C) contiguous, bary in the attributes' dtype.
cudaError_t mesh_interpolate(const void* attributes, const int64_t* faces,
                             const int64_t* face_index, const void* bary, void* out, int64_t B,
                             int64_t V, int64_t C, int64_t P, DType dtype, cudaStream_t stream);

// grad_attributes (B, V, C) accumulated (atomics) into `gacc` (float, or double for F64),
// which the caller zero-fills.
cudaError_t mesh_interpolate_bwd(const void* grad, const int64_t* faces, const int64_t* face_index,
                                 const void* bary, void* gacc, int64_t B, int64_t V, int64_t C,
                                 int64_t P, DType dtype, cudaStream_t stream);

// Point splatting. zbuf: B*H*W uint64 workspace. index (B, H, W), depth (B, 1, H, W).
cudaError_t splat_points(const double* points, int64_t B, int64_t N, int64_t H, int64_t W,
                         double radius, unsigned long long* zbuf, int64_t* index, void* depth,
                         DType out_dtype, cudaStream_t stream);

// Workspace of points_to_triplane_index, in bytes, for B batch items of N points and a grid of
// gx * gy cells per plane.
size_t points_to_triplane_workspace(int64_t B, int64_t N, int32_t gx, int32_t gy);

// Nearest valid point per texel (B, 3, H, W). valid may be null. max_d2 < 0: unbounded.
// `workspace` holds points_to_triplane_workspace(...) bytes, 256-byte aligned.
cudaError_t points_to_triplane_index(const double* points, const bool* valid, int64_t B,
                                     int64_t N, int64_t H, int64_t W, PlaneAxes axes,
                                     double scale, bool align_corners, double max_d2, int32_t gx,
                                     int32_t gy, void* workspace, int64_t* index,
                                     cudaStream_t stream);

// out (B, G, C, P) = features (B, N, C)[b, index (B, G, P)], `background` where index < 0.
cudaError_t gather_features(const void* features, const int64_t* index, void* out, int64_t B,
                            int64_t N, int64_t C, int64_t G, int64_t P, double background,
                            DType dtype, cudaStream_t stream);

// gacc (B, N, C) (float, or double for F64; zero-filled by the caller) += scatter of grad.
cudaError_t gather_features_bwd(const void* grad, const int64_t* index, void* gacc, int64_t B,
                                int64_t N, int64_t C, int64_t G, int64_t P, DType dtype,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace raster
}  // namespace pyface
