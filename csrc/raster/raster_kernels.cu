// CUDA kernels of the rasterization ops. Framework-free: no torch header (see raster_kernels.h).
//
// * raster_mesh: one thread per (batch, face) sets the triangle up (exact fixed-point edge
//   functions, raster_math.h) and walks its pixel bounding box; visibility is a 64-bit atomicMin
//   on (float32 depth key << 32 | face index) per pixel, so the nearest face wins and equal
//   float32 depths go to the lowest face index. A resolve pass recomputes the winner's
//   barycentrics and depth in float64.
// * splat_points: the same packed atomicMin with (depth key | point index), then a resolve pass.
// * points_to_triplane_index: per (batch, plane) a uniform grid over the texel extents
//   (counting sort with atomics + a per-plane block scan, column envelopes with 64-bit
//   atomicMin/Max), then one thread per texel runs the search of raster_math.h (ties -> lowest
//   index whatever the order within a cell).
// * gather_features / mesh_interpolate: one thread per output element; the backward passes
//   scatter with atomicAdd into a float (double for float64) buffer.
#include "raster/raster_kernels.h"

#include "common/cuda_types.cuh"

namespace pyface {
namespace raster {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr unsigned long long kEmpty = ~0ull;

inline unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks > 0x7fffffff ? 0x7fffffff : (blocks < 1 ? 1 : blocks));
}

template <typename T>
T host_cast(double v);
template <>
float host_cast<float>(double v) { return static_cast<float>(v); }
template <>
double host_cast<double>(double v) { return v; }
template <>
__half host_cast<__half>(double v) { return __float2half(static_cast<float>(v)); }
template <>
__nv_bfloat16 host_cast<__nv_bfloat16>(double v) {
  return __float2bfloat16(static_cast<float>(v));
}

// Calls f with a value of the element type of `dt` (the lambda takes the type from it).
template <typename Fn>
cudaError_t dispatch(DType dt, Fn&& f) {
  switch (dt) {
    case DType::F32:
      return f(float{});
    case DType::F64:
      return f(double{});
    case DType::F16:
      return f(__half{});
    case DType::BF16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

__device__ __forceinline__ unsigned long long pack(double depth, int64_t id) {
  const uint32_t key = float_key(static_cast<float>(depth));
  return (static_cast<unsigned long long>(key) << 32) | static_cast<unsigned long long>(id);
}

// ----- mesh rasterization --------------------------------------------------------------------

__global__ void raster_faces_kernel(const double* verts, const int64_t* faces, int64_t B,
                                    int64_t V, int64_t F, int64_t H, int64_t W, Cull cull,
                                    bool persp, unsigned long long* zbuf) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < B * F;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = t / F, f = t % F;
    const Triangle tri = load_triangle(verts, faces, b, f, V, H, W, cull, persp);
    if (!tri.valid) continue;
    unsigned long long* zb = zbuf + b * H * W;
    for (int64_t i = tri.y0; i <= tri.y1; ++i) {
      for (int64_t j = tri.x0; j <= tri.x1; ++j) {
        double d, bc[3];
        if (!cover(tri, i, j, persp, d, bc)) continue;
        atomicMin(zb + i * W + j, pack(d, f));
      }
    }
  }
}

template <typename scalar_t>
__global__ void raster_resolve_kernel(const double* verts, const int64_t* faces, int64_t B,
                                      int64_t V, int64_t H, int64_t W, Cull cull, bool persp,
                                      const unsigned long long* zbuf, int64_t* face_index,
                                      scalar_t* bary, scalar_t* depth) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < B * H * W;
       t += int64_t(gridDim.x) * blockDim.x) {
    const unsigned long long key = zbuf[t];
    const int64_t b = t / (H * W), p = t % (H * W);
    double d = INFINITY, bc[3] = {0.0, 0.0, 0.0};
    int64_t f = -1;
    if (key != kEmpty) {
      f = static_cast<int64_t>(key & 0xffffffffull);
      const Triangle tri = load_triangle(verts, faces, b, f, V, H, W, cull, persp);
      cover(tri, p / W, p % W, persp, d, bc);
    }
    face_index[t] = f;
    depth[t] = from_acc<scalar_t>(d);
    for (int k = 0; k < 3; ++k) bary[t * 3 + k] = from_acc<scalar_t>(bc[k]);
  }
}

// ----- attribute interpolation ---------------------------------------------------------------
template <typename scalar_t>
__global__ void interp_fwd_kernel(const scalar_t* attr, const int64_t* faces, const int64_t* fi,
                                  const scalar_t* bary, scalar_t* out, int64_t B, int64_t V,
                                  int64_t C, int64_t P) {
  using acc_t = typename Acc<scalar_t>::type;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < B * C * P;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = t % P, c = (t / P) % C, b = t / (P * C);
    const int64_t f = fi[b * P + p];
    acc_t v = 0;
    if (f >= 0) {
      for (int k = 0; k < 3; ++k) {
        v += to_acc(bary[(b * P + p) * 3 + k]) * to_acc(attr[(b * V + faces[f * 3 + k]) * C + c]);
      }
    }
    out[t] = from_acc<scalar_t>(static_cast<double>(v));
  }
}

template <typename scalar_t>
__global__ void interp_bwd_kernel(const scalar_t* grad, const int64_t* faces, const int64_t* fi,
                                  const scalar_t* bary, typename Acc<scalar_t>::type* gacc,
                                  int64_t B, int64_t V, int64_t C, int64_t P) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < B * C * P;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = t % P, c = (t / P) % C, b = t / (P * C);
    const int64_t f = fi[b * P + p];
    if (f < 0) continue;
    const auto g = to_acc(grad[t]);
    for (int k = 0; k < 3; ++k) {
      atomicAdd(gacc + (b * V + faces[f * 3 + k]) * C + c, to_acc(bary[(b * P + p) * 3 + k]) * g);
    }
  }
}

// ----- point splatting -----------------------------------------------------------------------
__global__ void splat_kernel(const double* pts, int64_t B, int64_t N, int64_t H, int64_t W,
                             double radius, unsigned long long* zbuf) {
  const double r2 = radius * radius;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < B * N;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = t / N, n = t % N;
    const double* q = pts + t * 3;
    const double X = splat_coord(q[0], W), Y = splat_coord(q[1], H), Z = q[2];
    if (!isfinite(X) || !isfinite(Y) || !isfinite(Z)) continue;
    const double ya = ceil(Y - radius), yb = floor(Y + radius);
    const double xa = ceil(X - radius), xb = floor(X + radius);
    if (yb < 0 || ya > H - 1 || xb < 0 || xa > W - 1) continue;
    const int64_t i0 = static_cast<int64_t>(fmax(ya, 0.0));
    const int64_t i1 = static_cast<int64_t>(fmin(yb, double(H - 1)));
    const int64_t j0 = static_cast<int64_t>(fmax(xa, 0.0));
    const int64_t j1 = static_cast<int64_t>(fmin(xb, double(W - 1)));
    const unsigned long long key = pack(Z, n);
    unsigned long long* zb = zbuf + b * H * W;
    for (int64_t i = i0; i <= i1; ++i) {
      const double dy = static_cast<double>(i) - Y;
      for (int64_t j = j0; j <= j1; ++j) {
        const double dx = static_cast<double>(j) - X;
        if (dx * dx + dy * dy > r2) continue;
        atomicMin(zb + i * W + j, key);
      }
    }
  }
}

template <typename scalar_t>
__global__ void splat_resolve_kernel(const double* pts, int64_t B, int64_t N, int64_t HW,
                                     const unsigned long long* zbuf, int64_t* index,
                                     scalar_t* depth) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < B * HW;
       t += int64_t(gridDim.x) * blockDim.x) {
    const unsigned long long key = zbuf[t];
    if (key == kEmpty) {
      index[t] = -1;
      depth[t] = from_acc<scalar_t>(INFINITY);
    } else {
      const int64_t n = static_cast<int64_t>(key & 0xffffffffull);
      index[t] = n;
      depth[t] = from_acc<scalar_t>(pts[((t / HW) * N + n) * 3 + 2]);
    }
  }
}

// ----- nearest point per texel ---------------------------------------------------------------
struct P2TLayout {
  double* pu;          // (B*3, N)
  double* pv;          // (B*3, N)
  int32_t* cell_of;    // (B*3, N), -1: invalid point
  int32_t* count;      // (B*3, G + 1)
  int32_t* start;      // (B*3, G + 1)
  int32_t* cursor;     // (B*3, G)
  int32_t* cell_pts;   // (B*3, N)
  unsigned long long* lo_key;  // (B*3, gx) order-preserving keys of the column envelopes
  unsigned long long* hi_key;  // (B*3, gx)
  double* col_lo;      // (B*3, gx)
  double* col_hi;      // (B*3, gx)
};

inline size_t align256(size_t n) { return (n + 255) & ~size_t(255); }

P2TLayout p2t_layout(void* ws, int64_t B, int64_t N, int64_t G, int64_t gx) {
  char* p = static_cast<char*>(ws);
  P2TLayout l;
  const size_t BP = static_cast<size_t>(B) * 3;
  l.pu = reinterpret_cast<double*>(p);
  p += align256(BP * N * sizeof(double));
  l.pv = reinterpret_cast<double*>(p);
  p += align256(BP * N * sizeof(double));
  l.cell_of = reinterpret_cast<int32_t*>(p);
  p += align256(BP * N * sizeof(int32_t));
  l.count = reinterpret_cast<int32_t*>(p);
  p += align256(BP * (G + 1) * sizeof(int32_t));
  l.start = reinterpret_cast<int32_t*>(p);
  p += align256(BP * (G + 1) * sizeof(int32_t));
  l.cursor = reinterpret_cast<int32_t*>(p);
  p += align256(BP * G * sizeof(int32_t));
  l.cell_pts = reinterpret_cast<int32_t*>(p);
  p += align256(BP * N * sizeof(int32_t));
  l.lo_key = reinterpret_cast<unsigned long long*>(p);
  p += align256(BP * gx * sizeof(unsigned long long));
  l.hi_key = reinterpret_cast<unsigned long long*>(p);
  p += align256(BP * gx * sizeof(unsigned long long));
  l.col_lo = reinterpret_cast<double*>(p);
  p += align256(BP * gx * sizeof(double));
  l.col_hi = reinterpret_cast<double*>(p);
  return l;
}

// Order-preserving map of a double to uint64 and back (for atomicMin / atomicMax).
__device__ __forceinline__ unsigned long long double_key(double v) {
  const unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(v));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}
__device__ __forceinline__ double key_double(unsigned long long k) {
  const unsigned long long u = (k & 0x8000000000000000ull) ? (k & ~0x8000000000000000ull) : ~k;
  return __longlong_as_double(static_cast<long long>(u));
}

__global__ void p2t_bin_kernel(const double* pts, const bool* valid, int64_t B, int64_t N,
                               PlaneAxes axes, double scale, Grid g, P2TLayout l) {
  const int64_t G = static_cast<int64_t>(g.gx) * g.gy;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < B * 3 * N;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bp = t / N, n = t % N, b = bp / 3;
    const int pl = static_cast<int>(bp % 3);
    const double* q = pts + (b * N + n) * 3;
    const double u = q[axis_u(axes, pl)] * scale, v = q[axis_v(axes, pl)] * scale;
    l.pu[t] = u;
    l.pv[t] = v;
    const bool ok = isfinite(u) && isfinite(v) && (valid == nullptr || valid[b * N + n]);
    if (!ok) {
      l.cell_of[t] = -1;
      continue;
    }
    const int32_t col = grid_cell(u, g.x0, g.cw, g.gx);
    const int32_t c = grid_cell(v, g.y0, g.ch, g.gy) * g.gx + col;
    l.cell_of[t] = c;
    atomicAdd(l.count + bp * (G + 1) + c, 1);
    const unsigned long long key = double_key(v);
    atomicMin(l.lo_key + bp * g.gx + col, key);
    atomicMax(l.hi_key + bp * g.gx + col, key);
  }
}

__global__ void p2t_envelope_kernel(int64_t n, P2TLayout l) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < n;
       t += int64_t(gridDim.x) * blockDim.x) {
    const unsigned long long lo = l.lo_key[t], hi = l.hi_key[t];
    const bool empty = lo == ~0ull;
    l.col_lo[t] = empty ? INFINITY : key_double(lo);
    l.col_hi[t] = empty ? -INFINITY : key_double(hi);
  }
}

// Exclusive scan of each plane's G cell counts: one block per (batch, plane).
__global__ void p2t_scan_kernel(int64_t G, P2TLayout l) {
  __shared__ int32_t warp_sums[32];
  __shared__ int32_t carry;
  const int64_t bp = blockIdx.x;
  const int32_t* cnt = l.count + bp * (G + 1);
  int32_t* st = l.start + bp * (G + 1);
  int32_t* cur = l.cursor + bp * G;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
  for (int64_t base = 0; base < G; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const int32_t x = i < G ? cnt[i] : 0;
    int32_t s = x;  // inclusive warp scan
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t y = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += y;
    }
    if (lane == 31) warp_sums[warp] = s;
    __syncthreads();
    if (warp == 0) {
      int32_t w = lane < n_warps ? warp_sums[lane] : 0;
      for (int o = 1; o < 32; o <<= 1) {
        const int32_t y = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += y;
      }
      if (lane < n_warps) warp_sums[lane] = w;  // inclusive prefix of warp totals
    }
    __syncthreads();
    const int32_t excl = carry + (warp > 0 ? warp_sums[warp - 1] : 0) + s - x;
    if (i < G) {
      st[i] = excl;
      cur[i] = excl;
    }
    __syncthreads();
    if (threadIdx.x == 0) carry += warp_sums[n_warps - 1];
    __syncthreads();
  }
  if (threadIdx.x == 0) st[G] = carry;
}

__global__ void p2t_fill_kernel(int64_t B, int64_t N, int64_t G, P2TLayout l) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < B * 3 * N;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int32_t c = l.cell_of[t];
    if (c < 0) continue;
    const int64_t bp = t / N;
    const int32_t slot = atomicAdd(l.cursor + bp * G + c, 1);
    l.cell_pts[bp * N + slot] = static_cast<int32_t>(t % N);  // any order: ties use the index
  }
}

__global__ void p2t_search_kernel(int64_t B, int64_t N, int64_t H, int64_t W, bool align_corners,
                                  double max_d2, Grid g, P2TLayout l, int64_t* index) {
  const int64_t G = static_cast<int64_t>(g.gx) * g.gy;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < B * 3 * H * W;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bp = t / (H * W), p = t % (H * W);
    const double qy = texel_centre(p / W, H, align_corners);
    const double qx = texel_centre(p % W, W, align_corners);
    double d2;
    index[t] = grid_nearest(g, l.start + bp * (G + 1), l.cell_pts + bp * N, l.col_lo + bp * g.gx,
                            l.col_hi + bp * g.gx, l.pu + bp * N, l.pv + bp * N, qx, qy, max_d2,
                            d2);
  }
}

// ----- feature gather ------------------------------------------------------------------------
template <typename scalar_t>
__global__ void gather_kernel(const scalar_t* feat, const int64_t* index, scalar_t* out, int64_t B,
                              int64_t N, int64_t C, int64_t G, int64_t P, scalar_t bg) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < B * G * C * P;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = t % P, c = (t / P) % C, bg_i = t / (P * C);
    const int64_t n = index[bg_i * P + p];
    out[t] = (n < 0 || n >= N) ? bg : feat[((bg_i / G) * N + n) * C + c];
  }
}

template <typename scalar_t>
__global__ void gather_bwd_kernel(const scalar_t* grad, const int64_t* index,
                                  typename Acc<scalar_t>::type* gacc, int64_t B, int64_t N,
                                  int64_t C, int64_t G, int64_t P) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < B * G * C * P;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = t % P, c = (t / P) % C, bg_i = t / (P * C);
    const int64_t n = index[bg_i * P + p];
    if (n < 0 || n >= N) continue;
    atomicAdd(gacc + ((bg_i / G) * N + n) * C + c, to_acc(grad[t]));
  }
}

}  // namespace

// ----- launchers -----------------------------------------------------------------------------
cudaError_t raster_mesh(const double* verts, const int64_t* faces, int64_t B, int64_t V, int64_t F,
                        int64_t H, int64_t W, Cull cull, bool perspective_correct,
                        unsigned long long* zbuf, int64_t* face_index, void* bary, void* depth,
                        DType out_dtype, cudaStream_t stream) {
  if (B * H * W == 0) return cudaSuccess;
  cudaError_t err = cudaMemsetAsync(zbuf, 0xff, sizeof(unsigned long long) * B * H * W, stream);
  if (err != cudaSuccess) return err;
  if (B * F > 0) {
    raster_faces_kernel<<<grid_for(B * F), kThreads, 0, stream>>>(verts, faces, B, V, F, H, W,
                                                                  cull, perspective_correct, zbuf);
  }
  return dispatch(out_dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    raster_resolve_kernel<scalar_t><<<grid_for(B * H * W), kThreads, 0, stream>>>(
        verts, faces, B, V, H, W, cull, perspective_correct, zbuf, face_index,
        static_cast<scalar_t*>(bary), static_cast<scalar_t*>(depth));
    return cudaGetLastError();
  });
}

cudaError_t mesh_interpolate(const void* attributes, const int64_t* faces,
                             const int64_t* face_index, const void* bary, void* out, int64_t B,
                             int64_t V, int64_t C, int64_t P, DType dtype, cudaStream_t stream) {
  if (B * C * P == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    interp_fwd_kernel<scalar_t><<<grid_for(B * C * P), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(attributes), faces, face_index,
        static_cast<const scalar_t*>(bary), static_cast<scalar_t*>(out), B, V, C, P);
    return cudaGetLastError();
  });
}

cudaError_t mesh_interpolate_bwd(const void* grad, const int64_t* faces, const int64_t* face_index,
                                 const void* bary, void* gacc, int64_t B, int64_t V, int64_t C,
                                 int64_t P, DType dtype, cudaStream_t stream) {
  if (B * C * P == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename Acc<scalar_t>::type;
    interp_bwd_kernel<scalar_t><<<grid_for(B * C * P), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad), faces, face_index, static_cast<const scalar_t*>(bary),
        static_cast<acc_t*>(gacc), B, V, C, P);
    return cudaGetLastError();
  });
}

cudaError_t splat_points(const double* points, int64_t B, int64_t N, int64_t H, int64_t W,
                         double radius, unsigned long long* zbuf, int64_t* index, void* depth,
                         DType out_dtype, cudaStream_t stream) {
  if (B * H * W == 0) return cudaSuccess;
  cudaError_t err = cudaMemsetAsync(zbuf, 0xff, sizeof(unsigned long long) * B * H * W, stream);
  if (err != cudaSuccess) return err;
  if (B * N > 0) {
    splat_kernel<<<grid_for(B * N), kThreads, 0, stream>>>(points, B, N, H, W, radius, zbuf);
  }
  return dispatch(out_dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    splat_resolve_kernel<scalar_t><<<grid_for(B * H * W), kThreads, 0, stream>>>(
        points, B, N, H * W, zbuf, index, static_cast<scalar_t*>(depth));
    return cudaGetLastError();
  });
}

size_t points_to_triplane_workspace(int64_t B, int64_t N, int32_t gx, int32_t gy) {
  const size_t BP = static_cast<size_t>(B) * 3;
  const size_t G = static_cast<size_t>(gx) * gy;
  return 2 * align256(BP * N * sizeof(double)) + 2 * align256(BP * N * sizeof(int32_t)) +
         2 * align256(BP * (G + 1) * sizeof(int32_t)) + align256(BP * G * sizeof(int32_t)) +
         2 * align256(BP * gx * sizeof(unsigned long long)) +
         2 * align256(BP * gx * sizeof(double));
}

cudaError_t points_to_triplane_index(const double* points, const bool* valid, int64_t B,
                                     int64_t N, int64_t H, int64_t W, PlaneAxes axes,
                                     double scale, bool align_corners, double max_d2, int32_t gx,
                                     int32_t gy, void* workspace, int64_t* index,
                                     cudaStream_t stream) {
  if (B * H * W == 0) return cudaSuccess;
  const int64_t G = static_cast<int64_t>(gx) * gy;
  const P2TLayout l = p2t_layout(workspace, B, N, G, gx);
  // the grid spans the texel-centre extents; points beyond fall into the border cells
  Grid g;
  g.gx = gx;
  g.gy = gy;
  const double tu0 = texel_centre(0, W, align_corners), tu1 = texel_centre(W - 1, W, align_corners);
  const double tv0 = texel_centre(0, H, align_corners), tv1 = texel_centre(H - 1, H, align_corners);
  const double tiny = 1e-6;
  g.x0 = tu1 - tu0 > tiny ? tu0 : tu0 - 0.5;
  g.y0 = tv1 - tv0 > tiny ? tv0 : tv0 - 0.5;
  g.cw = (tu1 - tu0 > tiny ? tu1 - tu0 : 1.0) / gx;
  g.ch = (tv1 - tv0 > tiny ? tv1 - tv0 : 1.0) / gy;
  cudaError_t err =
      cudaMemsetAsync(l.count, 0, sizeof(int32_t) * static_cast<size_t>(B) * 3 * (G + 1), stream);
  if (err != cudaSuccess) return err;
  const size_t env_bytes = sizeof(unsigned long long) * static_cast<size_t>(B) * 3 * gx;
  err = cudaMemsetAsync(l.lo_key, 0xff, env_bytes, stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(l.hi_key, 0, env_bytes, stream);
  if (err != cudaSuccess) return err;
  p2t_bin_kernel<<<grid_for(B * 3 * N), kThreads, 0, stream>>>(points, valid, B, N, axes, scale,
                                                               g, l);
  p2t_envelope_kernel<<<grid_for(B * 3 * gx), kThreads, 0, stream>>>(B * 3 * gx, l);
  p2t_scan_kernel<<<static_cast<unsigned>(B * 3), 1024, 0, stream>>>(G, l);
  p2t_fill_kernel<<<grid_for(B * 3 * N), kThreads, 0, stream>>>(B, N, G, l);
  p2t_search_kernel<<<grid_for(B * 3 * H * W), kThreads, 0, stream>>>(B, N, H, W, align_corners,
                                                                       max_d2, g, l, index);
  return cudaGetLastError();
}

cudaError_t gather_features(const void* features, const int64_t* index, void* out, int64_t B,
                            int64_t N, int64_t C, int64_t G, int64_t P, double background,
                            DType dtype, cudaStream_t stream) {
  if (B * G * C * P == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    gather_kernel<scalar_t><<<grid_for(B * G * C * P), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(features), index, static_cast<scalar_t*>(out), B, N, C, G, P,
        host_cast<scalar_t>(background));
    return cudaGetLastError();
  });
}

cudaError_t gather_features_bwd(const void* grad, const int64_t* index, void* gacc, int64_t B,
                                int64_t N, int64_t C, int64_t G, int64_t P, DType dtype,
                                cudaStream_t stream) {
  if (B * G * C * P == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename Acc<scalar_t>::type;
    gather_bwd_kernel<scalar_t><<<grid_for(B * G * C * P), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad), index, static_cast<acc_t*>(gacc), B, N, C, G, P);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace raster
}  // namespace pyface
