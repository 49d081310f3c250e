// 3D-flow warping CUDA kernels (framework-free: no torch header).
//
// One thread handles one output voxel and loops over the channels: neighbouring threads sample
// neighbouring positions (smooth flows keep the 8-tap gathers of a warp local) and write
// neighbouring outputs of each channel row. The keypoint flow is computed per thread from the
// K+1 masks; nothing per keypoint is materialised. The backward scatters the volume gradient
// with atomics, writes mask gradients directly, and reduces keypoint gradients per block
// (warp shuffles, then shared memory) into per-block partials, never atomics on 15 K scalars.

#include <cstdint>

#include "common/cuda_types.cuh"
#include "warp/warp_kernels.h"
#include "warp/warp_math.h"

namespace pyface {
namespace warp {
namespace cuda {
namespace {

template <typename A>
__device__ __forceinline__ void identity_at(int64_t v, const Output& o, bool align, A& zx, A& zy,
                                            A& zz) {
  zx = identity_coord<A>(v % o.Wo, o.Wo, align);
  zy = identity_coord<A>((v / o.Wo) % o.Ho, o.Ho, align);
  zz = identity_coord<A>(v / (o.Wo * o.Ho), o.Do, align);
}

// out[c * ostride] = sample of channel c at (x, y, z), every channel.
template <typename scalar_t, typename A>
__device__ __forceinline__ void sample(const scalar_t* vol_b, const Volume& g, A x, A y, A z,
                                       bool align, scalar_t* out, int64_t ostride) {
  const Taps3<A> t = trilinear_taps<A>(x, y, z, g.W, g.H, g.D, align);
  int64_t off[8];
  A w[8];
  int n = 0;
  for (int k = 0; k < 8; ++k) {
    if (!t.valid(k)) continue;
    off[n] = t.offset(k, g.sd, g.sh, g.sw);
    w[n++] = t.weight(k);
  }
  for (int64_t c = 0; c < g.C; ++c) {
    const scalar_t* p = vol_b + c * g.sc;
    A acc = 0;
    for (int i = 0; i < n; ++i) acc += to_acc(p[off[i]]) * w[i];
    out[c * ostride] = from_acc<scalar_t>(t.nan ? quiet_nan<A>() : acc);
  }
}

// Scatters go[c * gstride] * weight into gvol_b (contiguous (C, D, H, W)) when gvol_b is not
// null, and returns the gradient w.r.t. the normalized position in gpos when it is not null.
template <typename scalar_t, typename A>
__device__ __forceinline__ void sample_backward(const scalar_t* vol_b, const Volume& g, A x, A y,
                                                A z, bool align, const A* go, int64_t gstride,
                                                A* gvol_b, A* gpos) {
  const Taps3<A> t = trilinear_taps<A>(x, y, z, g.W, g.H, g.D, align);
  if (t.nan) {
    if (gpos) gpos[0] = gpos[1] = gpos[2] = quiet_nan<A>();
    return;
  }
  const int64_t hw = g.H * g.W, dhw = g.D * hw;
  A gx = 0, gy = 0, gz = 0;
  for (int64_t c = 0; c < g.C; ++c) {
    const A goc = go[c * gstride];
    const scalar_t* p = vol_b + c * g.sc;
    for (int k = 0; k < 8; ++k) {
      if (!t.valid(k)) continue;
      if (gvol_b) atomicAdd(gvol_b + c * dhw + t.offset(k, hw, g.W, 1), t.weight(k) * goc);
      if (gpos) {
        const A val = to_acc(p[t.offset(k, g.sd, g.sh, g.sw)]) * goc;
        gx += t.dwdx(k) * val;
        gy += t.dwdy(k) * val;
        gz += t.dwdz(k) * val;
      }
    }
  }
  if (gpos) {
    gpos[0] = gx * unnormalize_scale<A>(g.W, align);
    gpos[1] = gy * unnormalize_scale<A>(g.H, align);
    gpos[2] = gz * unnormalize_scale<A>(g.D, align);
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sums vals[0..14] over the block and writes the sums to out[0..14] (thread 0's warp).
template <typename A>
__device__ __forceinline__ void block_sum15(A (&vals)[15], A* smem, A* out) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int j = 0; j < 15; ++j) vals[j] = warp_sum(vals[j]);
  if (lane == 0)
    for (int j = 0; j < 15; ++j) smem[j * 32 + wid] = vals[j];
  __syncthreads();
  if (wid == 0) {
    for (int j = 0; j < 15; ++j) {
      A s = warp_sum(lane < nw ? smem[j * 32 + lane] : A(0));
      if (lane == 0) out[j] = s;
    }
  }
  __syncthreads();
}

// Mask gradients (written) and keypoint partials (block-reduced) from the flow gradient g of
// this thread's voxel (g = 0 and active = false for threads past the end).
template <typename A>
__device__ void flow_backward(const A* masks_b, int64_t Vo, int64_t v, bool active,
                              const A* kps, const A* kpd, const A* jac, int64_t K, A zx, A zy,
                              A zz, const A g[3], A* gmasks_b, A* partials_block) {
  __shared__ A smem[15 * 32];
  if (active && gmasks_b) gmasks_b[v] = g[0] * zx + g[1] * zy + g[2] * zz;
  for (int64_t k = 0; k < K; ++k) {
    if (active && gmasks_b) gmasks_b[(k + 1) * Vo + v] = mask_grad(kps, kpd, jac, k, zx, zy, zz, g);
    if (partials_block) {
      A vals[15] = {};
      if (active) keypoint_motion_grad(kpd, jac, k, zx, zy, zz, masks_b[(k + 1) * Vo + v], g, vals);
      block_sum15(vals, smem, partials_block + k * 15);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// kernels
// ------------------------------------------------------------------------------------------------

template <typename scalar_t, typename A>
__global__ void __launch_bounds__(kThreads)
    warp_volume_fwd_kernel(const scalar_t* __restrict__ vol, const A* __restrict__ grid,
                           scalar_t* __restrict__ out, Volume g, int64_t Vo, bool align) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= g.B * Vo) return;
  const int64_t b = i / Vo, v = i % Vo;
  const A* p = grid + i * 3;
  sample(vol + b * g.sb, g, p[0], p[1], p[2], align, out + b * g.C * Vo + v, Vo);
}

template <typename scalar_t, typename A>
__global__ void __launch_bounds__(kThreads)
    warp_volume_bwd_kernel(const A* __restrict__ go, const scalar_t* __restrict__ vol,
                           const A* __restrict__ grid, A* gvol, A* ggrid, Volume g, int64_t Vo,
                           bool align) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= g.B * Vo) return;
  const int64_t b = i / Vo, v = i % Vo;
  const A* p = grid + i * 3;
  sample_backward(vol + b * g.sb, g, p[0], p[1], p[2], align, go + b * g.C * Vo + v, Vo,
                  gvol ? gvol + b * g.C * g.D * g.H * g.W : nullptr,
                  ggrid ? ggrid + i * 3 : nullptr);
}

// grid: (blocks per batch item, B).
template <typename A>
__global__ void __launch_bounds__(kThreads)
    keypoint_flow_fwd_kernel(const A* __restrict__ masks, const A* __restrict__ kps,
                             const A* __restrict__ kpd, const A* __restrict__ jac,
                             A* __restrict__ flow, int64_t K, Output o, bool grid_align) {
  const int64_t Vo = o.Do * o.Ho * o.Wo;
  const int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (v >= Vo) return;
  A zx, zy, zz;
  identity_at(v, o, grid_align, zx, zy, zz);
  flow_at(masks + b * (K + 1) * Vo, Vo, v, kps + b * K * 3, kpd + b * K * 3,
          jac ? jac + b * K * 9 : nullptr, K, zx, zy, zz, flow + (b * Vo + v) * 3);
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    keypoint_flow_bwd_kernel(const A* __restrict__ gflow, const A* __restrict__ masks,
                             const A* __restrict__ kps, const A* __restrict__ kpd,
                             const A* __restrict__ jac, A* gmasks, A* partials, int64_t K,
                             Output o, bool grid_align) {
  const int64_t Vo = o.Do * o.Ho * o.Wo;
  const int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t b = blockIdx.y;
  const bool active = v < Vo;
  A zx = 0, zy = 0, zz = 0, g[3] = {0, 0, 0};
  if (active) {
    identity_at(v, o, grid_align, zx, zy, zz);
    for (int d = 0; d < 3; ++d) g[d] = gflow[(b * Vo + v) * 3 + d];
  }
  flow_backward(masks + b * (K + 1) * Vo, Vo, v, active, kps + b * K * 3, kpd + b * K * 3,
                jac ? jac + b * K * 9 : nullptr, K, zx, zy, zz, g,
                gmasks ? gmasks + b * (K + 1) * Vo : nullptr,
                partials ? partials + (b * gridDim.x + blockIdx.x) * K * 15 : nullptr);
}

template <typename scalar_t, typename A>
__global__ void __launch_bounds__(kThreads)
    warp_by_keypoints_fwd_kernel(const scalar_t* __restrict__ vol, const A* __restrict__ masks,
                                 const A* __restrict__ kps, const A* __restrict__ kpd,
                                 const A* __restrict__ jac, scalar_t* __restrict__ out, Volume g,
                                 int64_t K, Output o, bool align, bool grid_align) {
  const int64_t Vo = o.Do * o.Ho * o.Wo;
  const int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (v >= Vo) return;
  A zx, zy, zz, f[3];
  identity_at(v, o, grid_align, zx, zy, zz);
  flow_at(masks + b * (K + 1) * Vo, Vo, v, kps + b * K * 3, kpd + b * K * 3,
          jac ? jac + b * K * 9 : nullptr, K, zx, zy, zz, f);
  sample(vol + b * g.sb, g, f[0], f[1], f[2], align, out + b * g.C * Vo + v, Vo);
}

template <typename scalar_t, typename A>
__global__ void __launch_bounds__(kThreads)
    warp_by_keypoints_bwd_kernel(const A* __restrict__ go, const scalar_t* __restrict__ vol,
                                 const A* __restrict__ masks, const A* __restrict__ kps,
                                 const A* __restrict__ kpd, const A* __restrict__ jac, A* gvol,
                                 A* gmasks, A* partials, Volume g, int64_t K, Output o,
                                 bool align, bool grid_align) {
  const int64_t Vo = o.Do * o.Ho * o.Wo;
  const int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t b = blockIdx.y;
  const bool active = v < Vo;
  const bool need_pos = gmasks != nullptr || partials != nullptr;
  const A* masks_b = masks + b * (K + 1) * Vo;
  const A* kps_b = kps + b * K * 3;
  const A* kpd_b = kpd + b * K * 3;
  const A* jac_b = jac ? jac + b * K * 9 : nullptr;
  A zx = 0, zy = 0, zz = 0, gf[3] = {0, 0, 0};
  if (active) {
    A f[3];
    identity_at(v, o, grid_align, zx, zy, zz);
    flow_at(masks_b, Vo, v, kps_b, kpd_b, jac_b, K, zx, zy, zz, f);
    sample_backward(vol + b * g.sb, g, f[0], f[1], f[2], align, go + b * g.C * Vo + v, Vo,
                    gvol ? gvol + b * g.C * g.D * g.H * g.W : nullptr, need_pos ? gf : nullptr);
  }
  if (need_pos) {  // every thread of the block takes part in the reductions
    flow_backward(masks_b, Vo, v, active, kps_b, kpd_b, jac_b, K, zx, zy, zz, gf,
                  gmasks ? gmasks + b * (K + 1) * Vo : nullptr,
                  partials ? partials + (b * gridDim.x + blockIdx.x) * K * 15 : nullptr);
  }
}

template <typename scalar_t, typename A>
__global__ void __launch_bounds__(kThreads)
    motion_field_input_fwd_kernel(const scalar_t* __restrict__ vol, const A* __restrict__ kps,
                                  const A* __restrict__ kpd, const A* __restrict__ jac,
                                  scalar_t* __restrict__ out, Volume g, int64_t K, A var,
                                  bool align, bool grid_align) {
  const Output o{g.D, g.H, g.W};
  const int64_t V = g.D * g.H * g.W;
  const int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (v >= V) return;
  const A* kps_b = kps + b * K * 3;
  const A* kpd_b = kpd + b * K * 3;
  const A* jac_b = jac ? jac + b * K * 9 : nullptr;
  const int64_t CC = g.C + 1;
  scalar_t* out_b = out + b * (K + 1) * CC * V;
  A zx, zy, zz;
  identity_at(v, o, grid_align, zx, zy, zz);
  for (int64_t k = 0; k <= K; ++k) {
    A p[3] = {zx, zy, zz};
    A heat = 0;
    if (k > 0) {
      keypoint_motion(kps_b, kpd_b, jac_b, k - 1, zx, zy, zz, p);
      heat = gaussian(kpd_b + 3 * (k - 1), zx, zy, zz, var) -
             gaussian(kps_b + 3 * (k - 1), zx, zy, zz, var);
    }
    out_b[k * CC * V + v] = from_acc<scalar_t>(heat);
    sample(vol + b * g.sb, g, p[0], p[1], p[2], align, out_b + (k * CC + 1) * V + v, V);
  }
}

template <typename scalar_t, typename A>
__global__ void __launch_bounds__(kThreads)
    motion_field_input_bwd_kernel(const A* __restrict__ go, const scalar_t* __restrict__ vol,
                                  const A* __restrict__ kps, const A* __restrict__ kpd,
                                  const A* __restrict__ jac, A* gvol, A* partials, Volume g,
                                  int64_t K, A var, bool align, bool grid_align) {
  __shared__ A smem[15 * 32];
  const Output o{g.D, g.H, g.W};
  const int64_t V = g.D * g.H * g.W;
  const int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t b = blockIdx.y;
  const bool active = v < V;
  const A* kps_b = kps + b * K * 3;
  const A* kpd_b = kpd + b * K * 3;
  const A* jac_b = jac ? jac + b * K * 9 : nullptr;
  const int64_t CC = g.C + 1;
  const A* go_b = go + b * (K + 1) * CC * V;
  A* gvol_b = gvol ? gvol + b * g.C * V : nullptr;
  A zx = 0, zy = 0, zz = 0;
  if (active) {
    identity_at(v, o, grid_align, zx, zy, zz);
    if (gvol_b) sample_backward(vol + b * g.sb, g, zx, zy, zz, align, go_b + V + v, V, gvol_b,
                                static_cast<A*>(nullptr));
  }
  for (int64_t k = 1; k <= K; ++k) {  // uniform over the block: every thread reduces
    A vals[15] = {};
    if (active) {
      A p[3], gp[3] = {0, 0, 0};
      keypoint_motion(kps_b, kpd_b, jac_b, k - 1, zx, zy, zz, p);
      sample_backward(vol + b * g.sb, g, p[0], p[1], p[2], align, go_b + (k * CC + 1) * V + v, V,
                      gvol_b, partials ? gp : static_cast<A*>(nullptr));
      if (partials) {
        keypoint_motion_grad(kpd_b, jac_b, k - 1, zx, zy, zz, A(1), gp, vals);
        heatmap_grad(kps_b + 3 * (k - 1), kpd_b + 3 * (k - 1), zx, zy, zz, var,
                     go_b[k * CC * V + v], vals);
      }
    }
    if (partials)
      block_sum15(vals, smem, partials + ((b * gridDim.x + blockIdx.x) * K + (k - 1)) * 15);
  }
}

// ------------------------------------------------------------------------------------------------
// launchers
// ------------------------------------------------------------------------------------------------

inline int64_t blocks(int64_t n) { return (n + kThreads - 1) / kThreads; }

template <typename scalar_t>
cudaError_t wv_fwd(const void* vol, const void* grid, void* out, const Volume& v, const Output& o,
                   bool align, cudaStream_t s) {
  using A = typename Acc<scalar_t>::type;
  const int64_t Vo = o.Do * o.Ho * o.Wo;
  if (v.B * Vo == 0) return cudaSuccess;
  warp_volume_fwd_kernel<scalar_t, A><<<blocks(v.B * Vo), kThreads, 0, s>>>(
      static_cast<const scalar_t*>(vol), static_cast<const A*>(grid),
      static_cast<scalar_t*>(out), v, Vo, align);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t wv_bwd(const void* go, const void* vol, const void* grid, void* gvol, void* ggrid,
                   const Volume& v, const Output& o, bool align, cudaStream_t s) {
  using A = typename Acc<scalar_t>::type;
  const int64_t Vo = o.Do * o.Ho * o.Wo;
  if (v.B * Vo == 0 || (gvol == nullptr && ggrid == nullptr)) return cudaSuccess;
  warp_volume_bwd_kernel<scalar_t, A><<<blocks(v.B * Vo), kThreads, 0, s>>>(
      static_cast<const A*>(go), static_cast<const scalar_t*>(vol), static_cast<const A*>(grid),
      static_cast<A*>(gvol), static_cast<A*>(ggrid), v, Vo, align);
  return cudaGetLastError();
}

template <typename A>
cudaError_t kf_fwd(const void* masks, const Keypoints& kp, void* flow, int64_t B, const Output& o,
                   bool grid_align, cudaStream_t s) {
  const int64_t Vo = o.Do * o.Ho * o.Wo;
  if (B * Vo == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(blocks(Vo)), static_cast<unsigned>(B));
  keypoint_flow_fwd_kernel<A><<<grid, kThreads, 0, s>>>(
      static_cast<const A*>(masks), static_cast<const A*>(kp.kp_source),
      static_cast<const A*>(kp.kp_driving), static_cast<const A*>(kp.jacobian),
      static_cast<A*>(flow), kp.K, o, grid_align);
  return cudaGetLastError();
}

template <typename A>
cudaError_t kf_bwd(const void* gflow, const void* masks, const Keypoints& kp, void* gmasks,
                   void* partials, int64_t B, const Output& o, bool grid_align, cudaStream_t s) {
  const int64_t Vo = o.Do * o.Ho * o.Wo;
  if (B * Vo == 0 || (gmasks == nullptr && partials == nullptr)) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(blocks(Vo)), static_cast<unsigned>(B));
  keypoint_flow_bwd_kernel<A><<<grid, kThreads, 0, s>>>(
      static_cast<const A*>(gflow), static_cast<const A*>(masks),
      static_cast<const A*>(kp.kp_source), static_cast<const A*>(kp.kp_driving),
      static_cast<const A*>(kp.jacobian), static_cast<A*>(gmasks), static_cast<A*>(partials),
      kp.K, o, grid_align);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t wk_fwd(const void* vol, const void* masks, const Keypoints& kp, void* out,
                   const Volume& v, const Output& o, bool align, bool grid_align,
                   cudaStream_t s) {
  using A = typename Acc<scalar_t>::type;
  const int64_t Vo = o.Do * o.Ho * o.Wo;
  if (v.B * Vo == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(blocks(Vo)), static_cast<unsigned>(v.B));
  warp_by_keypoints_fwd_kernel<scalar_t, A><<<grid, kThreads, 0, s>>>(
      static_cast<const scalar_t*>(vol), static_cast<const A*>(masks),
      static_cast<const A*>(kp.kp_source), static_cast<const A*>(kp.kp_driving),
      static_cast<const A*>(kp.jacobian), static_cast<scalar_t*>(out), v, kp.K, o, align,
      grid_align);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t wk_bwd(const void* go, const void* vol, const void* masks, const Keypoints& kp,
                   void* gvol, void* gmasks, void* partials, const Volume& v, const Output& o,
                   bool align, bool grid_align, cudaStream_t s) {
  using A = typename Acc<scalar_t>::type;
  const int64_t Vo = o.Do * o.Ho * o.Wo;
  if (v.B * Vo == 0 || (gvol == nullptr && gmasks == nullptr && partials == nullptr))
    return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(blocks(Vo)), static_cast<unsigned>(v.B));
  warp_by_keypoints_bwd_kernel<scalar_t, A><<<grid, kThreads, 0, s>>>(
      static_cast<const A*>(go), static_cast<const scalar_t*>(vol), static_cast<const A*>(masks),
      static_cast<const A*>(kp.kp_source), static_cast<const A*>(kp.kp_driving),
      static_cast<const A*>(kp.jacobian), static_cast<A*>(gvol), static_cast<A*>(gmasks),
      static_cast<A*>(partials), v, kp.K, o, align, grid_align);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t mf_fwd(const void* vol, const Keypoints& kp, void* out, const Volume& v, double var,
                   bool align, bool grid_align, cudaStream_t s) {
  using A = typename Acc<scalar_t>::type;
  const int64_t V = v.D * v.H * v.W;
  if (v.B * V == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(blocks(V)), static_cast<unsigned>(v.B));
  motion_field_input_fwd_kernel<scalar_t, A><<<grid, kThreads, 0, s>>>(
      static_cast<const scalar_t*>(vol), static_cast<const A*>(kp.kp_source),
      static_cast<const A*>(kp.kp_driving), static_cast<const A*>(kp.jacobian),
      static_cast<scalar_t*>(out), v, kp.K, static_cast<A>(var), align, grid_align);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t mf_bwd(const void* go, const void* vol, const Keypoints& kp, void* gvol,
                   void* partials, const Volume& v, double var, bool align, bool grid_align,
                   cudaStream_t s) {
  using A = typename Acc<scalar_t>::type;
  const int64_t V = v.D * v.H * v.W;
  if (v.B * V == 0 || (gvol == nullptr && partials == nullptr)) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(blocks(V)), static_cast<unsigned>(v.B));
  motion_field_input_bwd_kernel<scalar_t, A><<<grid, kThreads, 0, s>>>(
      static_cast<const A*>(go), static_cast<const scalar_t*>(vol),
      static_cast<const A*>(kp.kp_source), static_cast<const A*>(kp.kp_driving),
      static_cast<const A*>(kp.jacobian), static_cast<A*>(gvol), static_cast<A*>(partials), v,
      kp.K, static_cast<A>(var), align, grid_align);
  return cudaGetLastError();
}

}  // namespace

#define PYFACE_WARP_DISPATCH(dtype, fn, ...)                  \
  switch (dtype) {                                            \
    case DType::F32: return fn<float>(__VA_ARGS__);           \
    case DType::F64: return fn<double>(__VA_ARGS__);          \
    case DType::F16: return fn<__half>(__VA_ARGS__);          \
    case DType::BF16: return fn<__nv_bfloat16>(__VA_ARGS__);  \
  }                                                           \
  return cudaErrorInvalidValue

cudaError_t warp_volume_forward(DType dtype, const void* volume, const void* grid, void* out,
                                const Volume& v, const Output& o, bool align_corners,
                                cudaStream_t stream) {
  PYFACE_WARP_DISPATCH(dtype, wv_fwd, volume, grid, out, v, o, align_corners, stream);
}

cudaError_t warp_volume_backward(DType dtype, const void* grad_out, const void* volume,
                                 const void* grid, void* grad_volume, void* grad_grid,
                                 const Volume& v, const Output& o, bool align_corners,
                                 cudaStream_t stream) {
  PYFACE_WARP_DISPATCH(dtype, wv_bwd, grad_out, volume, grid, grad_volume, grad_grid, v, o,
                       align_corners, stream);
}

cudaError_t keypoint_flow_forward(DType acc, const void* masks, const Keypoints& kp, void* flow,
                                  int64_t B, const Output& o, bool grid_align_corners,
                                  cudaStream_t stream) {
  if (acc == DType::F64) return kf_fwd<double>(masks, kp, flow, B, o, grid_align_corners, stream);
  if (acc == DType::F32) return kf_fwd<float>(masks, kp, flow, B, o, grid_align_corners, stream);
  return cudaErrorInvalidValue;
}

cudaError_t keypoint_flow_backward(DType acc, const void* grad_flow, const void* masks,
                                   const Keypoints& kp, void* grad_masks, void* partials,
                                   int64_t B, const Output& o, bool grid_align_corners,
                                   cudaStream_t stream) {
  if (acc == DType::F64)
    return kf_bwd<double>(grad_flow, masks, kp, grad_masks, partials, B, o, grid_align_corners,
                          stream);
  if (acc == DType::F32)
    return kf_bwd<float>(grad_flow, masks, kp, grad_masks, partials, B, o, grid_align_corners,
                         stream);
  return cudaErrorInvalidValue;
}

cudaError_t warp_by_keypoints_forward(DType dtype, const void* volume, const void* masks,
                                      const Keypoints& kp, void* out, const Volume& v,
                                      const Output& o, bool align_corners,
                                      bool grid_align_corners, cudaStream_t stream) {
  PYFACE_WARP_DISPATCH(dtype, wk_fwd, volume, masks, kp, out, v, o, align_corners,
                       grid_align_corners, stream);
}

cudaError_t warp_by_keypoints_backward(DType dtype, const void* grad_out, const void* volume,
                                       const void* masks, const Keypoints& kp, void* grad_volume,
                                       void* grad_masks, void* partials, const Volume& v,
                                       const Output& o, bool align_corners,
                                       bool grid_align_corners, cudaStream_t stream) {
  PYFACE_WARP_DISPATCH(dtype, wk_bwd, grad_out, volume, masks, kp, grad_volume, grad_masks,
                       partials, v, o, align_corners, grid_align_corners, stream);
}

cudaError_t motion_field_input_forward(DType dtype, const void* volume, const Keypoints& kp,
                                       void* out, const Volume& v, double heatmap_variance,
                                       bool align_corners, bool grid_align_corners,
                                       cudaStream_t stream) {
  PYFACE_WARP_DISPATCH(dtype, mf_fwd, volume, kp, out, v, heatmap_variance, align_corners,
                       grid_align_corners, stream);
}

cudaError_t motion_field_input_backward(DType dtype, const void* grad_out, const void* volume,
                                        const Keypoints& kp, void* grad_volume, void* partials,
                                        const Volume& v, double heatmap_variance,
                                        bool align_corners, bool grid_align_corners,
                                        cudaStream_t stream) {
  PYFACE_WARP_DISPATCH(dtype, mf_bwd, grad_out, volume, kp, grad_volume, partials, v,
                       heatmap_variance, align_corners, grid_align_corners, stream);
}

}  // namespace cuda
}  // namespace warp
}  // namespace pyface
