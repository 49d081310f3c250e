// Volume-rendering CUDA kernels: compositing (forward, recomputing backward) and importance
// sampling, one thread per ray, on the shared math of render_math.h. No torch header.
#include "render/render_kernels.h"

#include "common/cuda_types.cuh"
#include "render/render_math.h"

namespace pyface {
namespace render {
namespace cuda {
namespace {

constexpr int THREADS = 128;

template <typename S>
__global__ void __launch_bounds__(THREADS)
composite_forward_kernel(const S* __restrict__ feat, const S* __restrict__ dens,
                         const S* __restrict__ dep, const S* __restrict__ range, int64_t rays,
                         int64_t n, int64_t C, S bias, bool white_back, S* __restrict__ out,
                         S* __restrict__ depth, S* __restrict__ weights) {
  const S dmin = range[0], dmax = range[1];
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rays;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    composite_forward_ray<S, S>(feat + r * n * C, dens + r * n, dep + r * n, n, C, bias,
                                white_back, dmin, dmax, out + r * C, depth + r,
                                weights + r * (n - 1));
  }
}

template <typename S>
__global__ void __launch_bounds__(THREADS)
composite_backward_kernel(const S* __restrict__ g_out, const S* __restrict__ g_depth,
                          const S* __restrict__ g_w, const S* __restrict__ feat,
                          const S* __restrict__ dens, const S* __restrict__ dep,
                          const S* __restrict__ range, int64_t rays, int64_t n, int64_t C, S bias,
                          bool white_back, S* g_feat, S* g_dens) {
  const S dmin = range[0], dmax = range[1];
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rays;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    composite_backward_ray<S, S>(g_out + r * C, g_depth[r], g_w + r * (n - 1), feat + r * n * C,
                                 dens + r * n, dep + r * n, n, C, bias, white_back, dmin, dmax,
                                 g_feat ? g_feat + r * n * C : nullptr,
                                 g_dens ? g_dens + r * n : nullptr);
  }
}

template <typename S>
__global__ void __launch_bounds__(THREADS)
importance_kernel(const S* __restrict__ dep, const S* __restrict__ w, const S* __restrict__ u,
                  int64_t rays, int64_t n, int64_t m, S* __restrict__ out, S* scratch) {
  const int64_t stride = n - 2 > 1 ? n - 2 : 1;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rays;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    importance_ray<S, S>(dep + r * n, w + r * (n - 1), u + r * m, n, m, out + r * m,
                         scratch + r * stride);
  }
}

template <typename S>
cudaError_t composite_forward_t(const void* f, const void* s, const void* t, const void* range,
                                int64_t rays, int64_t n, int64_t C, double bias, bool wb,
                                void* out, void* depth, void* weights, cudaStream_t stream) {
  if (rays == 0) return cudaSuccess;
  composite_forward_kernel<S><<<grid_stride_blocks(rays, THREADS), THREADS, 0, stream>>>(
      static_cast<const S*>(f), static_cast<const S*>(s), static_cast<const S*>(t),
      static_cast<const S*>(range), rays, n, C, static_cast<S>(bias), wb, static_cast<S*>(out),
      static_cast<S*>(depth), static_cast<S*>(weights));
  return cudaGetLastError();
}

template <typename S>
cudaError_t composite_backward_t(const void* go, const void* gd, const void* gw, const void* f,
                                 const void* s, const void* t, const void* range, int64_t rays,
                                 int64_t n, int64_t C, double bias, bool wb, void* gf, void* gs,
                                 cudaStream_t stream) {
  if (rays == 0 || (!gf && !gs)) return cudaSuccess;
  composite_backward_kernel<S><<<grid_stride_blocks(rays, THREADS), THREADS, 0, stream>>>(
      static_cast<const S*>(go), static_cast<const S*>(gd), static_cast<const S*>(gw),
      static_cast<const S*>(f), static_cast<const S*>(s), static_cast<const S*>(t),
      static_cast<const S*>(range), rays, n, C, static_cast<S>(bias), wb, static_cast<S*>(gf),
      static_cast<S*>(gs));
  return cudaGetLastError();
}

template <typename S>
cudaError_t importance_t(const void* t, const void* w, const void* u, int64_t rays, int64_t n,
                         int64_t m, void* out, void* scratch, cudaStream_t stream) {
  if (rays == 0 || m == 0) return cudaSuccess;
  importance_kernel<S><<<grid_stride_blocks(rays, THREADS), THREADS, 0, stream>>>(
      static_cast<const S*>(t), static_cast<const S*>(w), static_cast<const S*>(u), rays, n, m,
      static_cast<S*>(out), static_cast<S*>(scratch));
  return cudaGetLastError();
}

}  // namespace

cudaError_t composite_forward(DType dtype, const void* features, const void* densities,
                              const void* depths, const void* range, int64_t rays, int64_t S,
                              int64_t C, double density_bias, bool white_back, void* out,
                              void* depth, void* weights, cudaStream_t stream) {
  switch (dtype) {
    case DType::F32:
      return composite_forward_t<float>(features, densities, depths, range, rays, S, C,
                                        density_bias, white_back, out, depth, weights, stream);
    case DType::F64:
      return composite_forward_t<double>(features, densities, depths, range, rays, S, C,
                                         density_bias, white_back, out, depth, weights, stream);
    case DType::F16:
    case DType::BF16:
      break;  // the render kernels are float32 / float64 only
  }
  return cudaErrorInvalidValue;
}

cudaError_t composite_backward(DType dtype, const void* grad_out, const void* grad_depth,
                               const void* grad_weights, const void* features,
                               const void* densities, const void* depths, const void* range,
                               int64_t rays, int64_t S, int64_t C, double density_bias,
                               bool white_back, void* grad_features, void* grad_densities,
                               cudaStream_t stream) {
  switch (dtype) {
    case DType::F32:
      return composite_backward_t<float>(grad_out, grad_depth, grad_weights, features, densities,
                                         depths, range, rays, S, C, density_bias, white_back,
                                         grad_features, grad_densities, stream);
    case DType::F64:
      return composite_backward_t<double>(grad_out, grad_depth, grad_weights, features,
                                          densities, depths, range, rays, S, C, density_bias,
                                          white_back, grad_features, grad_densities, stream);
    case DType::F16:
    case DType::BF16:
      break;  // the render kernels are float32 / float64 only
  }
  return cudaErrorInvalidValue;
}

cudaError_t importance(DType dtype, const void* depths, const void* weights, const void* u,
                       int64_t rays, int64_t S, int64_t M, void* out, void* scratch,
                       cudaStream_t stream) {
  switch (dtype) {
    case DType::F32:
      return importance_t<float>(depths, weights, u, rays, S, M, out, scratch, stream);
    case DType::F64:
      return importance_t<double>(depths, weights, u, rays, S, M, out, scratch, stream);
    case DType::F16:
    case DType::BF16:
      break;  // the render kernels are float32 / float64 only
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace render
}  // namespace pyface
