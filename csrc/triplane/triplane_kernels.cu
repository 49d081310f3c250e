// Tri-plane sampling CUDA kernels (framework-free: no torch header).
//
// One thread handles one point and a group of CPT consecutive channels, for all 3 planes and 4
// bilinear taps (the tap set-up is shared math from triplane_math.h). The thread index puts the
// channel group fastest when the planes are channels-last (channel stride 1: a warp reads
// contiguous channels of the same texels, and output rows are written contiguously), and the
// point fastest otherwise (neighbouring points hit neighbouring texels). The backward
// accumulates plane gradients with atomics on the same mapping (float32/float64 accumulators)
// and point gradients with one atomic per plane coordinate and channel group.

#include <cstdint>
#include <type_traits>

#include "common/cuda_types.cuh"
#include "triplane/triplane_kernels.h"
#include "triplane/triplane_math.h"

namespace pyface {
namespace triplane {
namespace cuda {
namespace {

constexpr int CPT = 4;  // channels per thread
constexpr int THREADS = 256;

// Decodes a flat thread index into (point index b*N+n, first channel c0).
__device__ __forceinline__ void decode(int64_t idx, int64_t points, int64_t groups,
                                       bool channel_fastest, int64_t& i, int64_t& c0) {
  if (channel_fastest) {
    i = idx / groups;
    c0 = (idx % groups) * CPT;
  } else {
    i = idx % points;
    c0 = (idx / points) * CPT;
  }
}

template <typename acc_t>
__device__ __forceinline__ Taps<acc_t> plane_taps(const acc_t* pt, const Problem& p, int plane) {
  const PlaneAxes axes = static_cast<PlaneAxes>(p.axes);
  const acc_t s = static_cast<acc_t>(p.scale);
  const acc_t u = pt[axis_u(axes, plane)] * s;
  const acc_t v = pt[axis_v(axes, plane)] * s;
  return bilinear_taps(u, v, p.W, p.H, p.align_corners);
}

// VEC: float32 channels-last planes whose every tap row is 16-byte aligned and C % 4 == 0, so a
// thread's 4 channels are one float4 load (and, on sm_90+, one vector atomic in the backward).
template <typename scalar_t, bool VEC>
__global__ void __launch_bounds__(THREADS)
forward_kernel(const scalar_t* __restrict__ planes, const typename Acc<scalar_t>::type* __restrict__ points,
               scalar_t* __restrict__ out, const Problem p, bool channel_fastest) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t groups = (p.C + CPT - 1) / CPT;
  const int64_t n_points = p.B * p.N;
  const int64_t total = n_points * groups;
  const Reduce reduce = static_cast<Reduce>(p.reduce);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t i, c0;
    decode(idx, n_points, groups, channel_fastest, i, c0);
    const int64_t b = i / p.N, n = i % p.N;
    const acc_t* pt = points + i * 3;
    acc_t acc[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) acc[j] = acc_t(0);
#pragma unroll
    for (int plane = 0; plane < 3; ++plane) {
      const Taps<acc_t> t = plane_taps(pt, p, plane);
      const scalar_t* base = planes + b * p.sb + plane * p.sp;
      acc_t val[CPT];
#pragma unroll
      for (int j = 0; j < CPT; ++j) val[j] = acc_t(0);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (!t.valid[k]) continue;
        const scalar_t* tap = base + tap_offset(t, k, p.sh, p.sw);
        if constexpr (VEC) {
          const float4 v = *reinterpret_cast<const float4*>(tap + c0);
          val[0] += v.x * t.w[k];
          val[1] += v.y * t.w[k];
          val[2] += v.z * t.w[k];
          val[3] += v.w * t.w[k];
        } else {
#pragma unroll
          for (int j = 0; j < CPT; ++j) {
            if (c0 + j < p.C) val[j] += to_acc(tap[(c0 + j) * p.sc]) * t.w[k];
          }
        }
      }
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        if (t.nan) val[j] = quiet_nan<acc_t>();
        if (reduce == Reduce::NONE) {
          if (c0 + j < p.C) out[((b * 3 + plane) * p.N + n) * p.C + c0 + j] = from_acc<scalar_t>(val[j]);
        } else {
          acc[j] += val[j];
        }
      }
    }
    if (reduce != Reduce::NONE) {
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        if (c0 + j >= p.C) continue;
        const acc_t v = reduce == Reduce::MEAN ? acc[j] / acc_t(3) : acc[j];
        out[i * p.C + c0 + j] = from_acc<scalar_t>(v);
      }
    }
  }
}

template <typename scalar_t, bool VEC>
__global__ void __launch_bounds__(THREADS)
backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ planes,
                const typename Acc<scalar_t>::type* __restrict__ points,
                typename Acc<scalar_t>::type* __restrict__ grad_planes,
                typename Acc<scalar_t>::type* __restrict__ grad_points, const Problem p,
                bool channel_fastest) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t groups = (p.C + CPT - 1) / CPT;
  const int64_t n_points = p.B * p.N;
  const int64_t total = n_points * groups;
  const Reduce reduce = static_cast<Reduce>(p.reduce);
  const PlaneAxes axes = static_cast<PlaneAxes>(p.axes);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t i, c0;
    decode(idx, n_points, groups, channel_fastest, i, c0);
    const int64_t b = i / p.N, n = i % p.N;
    const acc_t* pt = points + i * 3;
    acc_t go_mean[CPT];
    if (reduce != Reduce::NONE) {
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const acc_t g = c0 + j < p.C ? to_acc(grad_out[i * p.C + c0 + j]) : acc_t(0);
        go_mean[j] = reduce == Reduce::MEAN ? g / acc_t(3) : g;
      }
    }
    acc_t gp[3] = {0, 0, 0};
#pragma unroll
    for (int plane = 0; plane < 3; ++plane) {
      const Taps<acc_t> t = plane_taps(pt, p, plane);
      if (t.nan) {
        if (grad_points) gp[0] = gp[1] = gp[2] = quiet_nan<acc_t>();
        continue;
      }
      acc_t go[CPT];
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        if (reduce == Reduce::NONE) {
          go[j] = c0 + j < p.C ? to_acc(grad_out[((b * 3 + plane) * p.N + n) * p.C + c0 + j])
                               : acc_t(0);
        } else {
          go[j] = go_mean[j];
        }
      }
      acc_t dwdx[4], dwdy[4];
      weight_grads(t, dwdx, dwdy);
      const scalar_t* base = planes + b * p.sb + plane * p.sp;
      acc_t* gbase = grad_planes ? grad_planes + b * p.gsb + plane * p.gsp : nullptr;
      acc_t gx = 0, gy = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (!t.valid[k]) continue;
        if (gbase) {
          acc_t* gtap = gbase + tap_offset(t, k, p.gsh, p.gsw);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
          if constexpr (VEC) {
            atomicAdd(reinterpret_cast<float4*>(gtap + c0),
                      make_float4(t.w[k] * go[0], t.w[k] * go[1], t.w[k] * go[2], t.w[k] * go[3]));
          } else
#endif
          {
#pragma unroll
            for (int j = 0; j < CPT; ++j) {
              if (c0 + j < p.C) atomicAdd(gtap + (c0 + j) * p.gsc, t.w[k] * go[j]);
            }
          }
        }
        if (grad_points) {
          const scalar_t* tap = base + tap_offset(t, k, p.sh, p.sw);
          acc_t dot = 0;
          if constexpr (VEC) {
            const float4 v = *reinterpret_cast<const float4*>(tap + c0);
            dot = v.x * go[0] + v.y * go[1] + v.z * go[2] + v.w * go[3];
          } else {
#pragma unroll
            for (int j = 0; j < CPT; ++j) {
              if (c0 + j < p.C) dot += to_acc(tap[(c0 + j) * p.sc]) * go[j];
            }
          }
          gx += dwdx[k] * dot;
          gy += dwdy[k] * dot;
        }
      }
      const acc_t s = static_cast<acc_t>(p.scale);
      gp[axis_u(axes, plane)] += gx * unnormalize_scale<acc_t>(p.W, p.align_corners) * s;
      gp[axis_v(axes, plane)] += gy * unnormalize_scale<acc_t>(p.H, p.align_corners) * s;
    }
    if (grad_points) {
#pragma unroll
      for (int d = 0; d < 3; ++d) {
        if (gp[d] != acc_t(0)) atomicAdd(grad_points + i * 3 + d, gp[d]);
      }
    }
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// Whether float4 access applies: float32, channel stride 1, and every row start a multiple of
// 4 elements from a 16-byte aligned base.
bool vectorizable(const void* base, int64_t C, int64_t sc, int64_t sh, int64_t sw, int64_t sp,
                  int64_t sb) {
  return sc == 1 && C % 4 == 0 && sw % 4 == 0 && sh % 4 == 0 && sp % 4 == 0 && sb % 4 == 0 &&
         aligned16(base);
}

template <typename scalar_t>
cudaError_t forward_t(const void* planes, const void* points, void* out, const Problem& p,
                      cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t total = p.B * p.N * ((p.C + CPT - 1) / CPT);
  if (total == 0) return cudaSuccess;
  auto* kernel = forward_kernel<scalar_t, false>;
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (vectorizable(planes, p.C, p.sc, p.sh, p.sw, p.sp, p.sb)) kernel = forward_kernel<float, true>;
  }
  kernel<<<grid_stride_blocks(total, THREADS), THREADS, 0, stream>>>(
      static_cast<const scalar_t*>(planes), static_cast<const acc_t*>(points),
      static_cast<scalar_t*>(out), p, p.sc == 1);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t backward_t(const void* grad_out, const void* planes, const void* points,
                       void* grad_planes, void* grad_points, const Problem& p,
                       cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t total = p.B * p.N * ((p.C + CPT - 1) / CPT);
  if (total == 0 || (!grad_planes && !grad_points)) return cudaSuccess;
  auto* kernel = backward_kernel<scalar_t, false>;
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (vectorizable(planes, p.C, p.sc, p.sh, p.sw, p.sp, p.sb) &&
        (!grad_planes ||
         vectorizable(grad_planes, p.C, p.gsc, p.gsh, p.gsw, p.gsp, p.gsb))) {
      kernel = backward_kernel<float, true>;
    }
  }
  kernel<<<grid_stride_blocks(total, THREADS), THREADS, 0, stream>>>(
      static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(planes),
      static_cast<const acc_t*>(points), static_cast<acc_t*>(grad_planes),
      static_cast<acc_t*>(grad_points), p, p.sc == 1);
  return cudaGetLastError();
}

}  // namespace

cudaError_t forward(DType dtype, const void* planes, const void* points, void* out,
                    const Problem& p, cudaStream_t stream) {
  switch (dtype) {
    case DType::F32: return forward_t<float>(planes, points, out, p, stream);
    case DType::F64: return forward_t<double>(planes, points, out, p, stream);
    case DType::F16: return forward_t<__half>(planes, points, out, p, stream);
    case DType::BF16: return forward_t<__nv_bfloat16>(planes, points, out, p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward(DType dtype, const void* grad_out, const void* planes, const void* points,
                     void* grad_planes, void* grad_points, const Problem& p, cudaStream_t stream) {
  switch (dtype) {
    case DType::F32:
      return backward_t<float>(grad_out, planes, points, grad_planes, grad_points, p, stream);
    case DType::F64:
      return backward_t<double>(grad_out, planes, points, grad_planes, grad_points, p, stream);
    case DType::F16:
      return backward_t<__half>(grad_out, planes, points, grad_planes, grad_points, p, stream);
    case DType::BF16:
      return backward_t<__nv_bfloat16>(grad_out, planes, points, grad_planes, grad_points, p,
                                       stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace triplane
}  // namespace pyface
