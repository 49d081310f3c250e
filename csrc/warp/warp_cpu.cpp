// 3D-flow warping: the C++ CPU kernels and TORCH_LIBRARY_IMPL(pyface, CPU) of the ops declared
// in warp.cpp (schemas and argument checks) and documented there.
//
// No kernel materialises a flow, a sparse motion or a repeated volume: flows are computed per
// output voxel from the masks and keypoints. Keypoint gradients are reduced per fixed chunk of
// voxels and the partials summed in a fixed order, so results do not depend on the thread count.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <vector>

#include "warp/warp.h"
#include "warp/warp_math.h"

namespace pyface {
namespace warp {

namespace {

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

constexpr int64_t kChunk = 1024;  // output voxels per task (and per keypoint-gradient partial)

struct VolGeom {
  int64_t B, C, D, H, W;
  int64_t sb, sc, sd, sh, sw;
};

VolGeom vol_geom(const at::Tensor& v) {
  return {v.size(0),   v.size(1),   v.size(2),   v.size(3),   v.size(4),
          v.stride(0), v.stride(1), v.stride(2), v.stride(3), v.stride(4)};
}

// Identity-grid coordinates of an output grid, per axis.
template <typename T>
struct Axes {
  std::vector<T> x, y, z;
  int64_t D, H, W;
  Axes(int64_t D_, int64_t H_, int64_t W_, bool align) : x(W_), y(H_), z(D_), D(D_), H(H_), W(W_) {
    for (int64_t i = 0; i < W; ++i) x[i] = identity_coord<T>(i, W, align);
    for (int64_t i = 0; i < H; ++i) y[i] = identity_coord<T>(i, H, align);
    for (int64_t i = 0; i < D; ++i) z[i] = identity_coord<T>(i, D, align);
  }
  void at(int64_t v, T& zx, T& zy, T& zz) const {
    zx = x[v % W];
    zy = y[(v / W) % H];
    zz = z[v / (W * H)];
  }
};

// The valid taps of a sample, compacted: offsets relative to the (batch, channel 0) base.
template <typename T>
struct Compact {
  int n = 0;
  int64_t off[8];
  T w[8], dx[8], dy[8], dz[8];
};

template <typename T>
Compact<T> compact(const Taps3<T>& t, int64_t sd, int64_t sh, int64_t sw, bool with_grad) {
  Compact<T> c;
  for (int k = 0; k < 8; ++k) {
    if (!t.valid(k)) continue;
    c.off[c.n] = t.offset(k, sd, sh, sw);
    c.w[c.n] = t.weight(k);
    if (with_grad) {
      c.dx[c.n] = t.dwdx(k);
      c.dy[c.n] = t.dwdy(k);
      c.dz[c.n] = t.dwdz(k);
    }
    ++c.n;
  }
  return c;
}

// A block of consecutive output voxels whose taps are computed once and then used channel by
// channel: reads of one channel plane and writes of one output row stay local.
constexpr int kBlock = 64;

template <typename T>
struct TapBlock {
  int n = 0;
  Compact<T> t[kBlock];
  bool nan[kBlock];

  // pos(i, p) writes the normalized sample position of voxel i (< count) of the block to p[3];
  // (sd, sh, sw) are the strides the tap offsets are computed with.
  template <typename Pos>
  void fill(int count, const Pos& pos, const VolGeom& g, bool align_corners, int64_t sd,
            int64_t sh, int64_t sw, bool with_grad) {
    n = count;
    for (int i = 0; i < count; ++i) {
      T p[3];
      pos(i, p);
      const Taps3<T> tp = trilinear_taps<T>(p[0], p[1], p[2], g.W, g.H, g.D, align_corners);
      nan[i] = tp.nan;
      if (tp.nan) {
        t[i].n = 0;
      } else {
        t[i] = compact(tp, sd, sh, sw, with_grad);
      }
    }
  }
};

// Runs f(vb, count) over blocks of up to kBlock voxels of [v0, v1).
template <typename F>
inline void for_blocks(int64_t v0, int64_t v1, const F& f) {
  for (int64_t vb = v0; vb < v1; vb += kBlock)
    f(vb, static_cast<int>(std::min<int64_t>(kBlock, v1 - vb)));
}

// out[c * ostride + i] = sample of channel c at voxel i of the block.
template <typename scalar_t, typename acc_t>
inline void sample_block(const scalar_t* vol_b, const VolGeom& g, const TapBlock<acc_t>& blk,
                         scalar_t* out, int64_t ostride) {
  const acc_t qnan = std::numeric_limits<acc_t>::quiet_NaN();
  for (int64_t c = 0; c < g.C; ++c) {
    const scalar_t* p = vol_b + c * g.sc;
    scalar_t* o = out + c * ostride;
    for (int i = 0; i < blk.n; ++i) {
      const Compact<acc_t>& ct = blk.t[i];
      acc_t v = 0;
      if (ct.n == 8) {  // interior sample: a fixed trip count the compiler unrolls
        for (int j = 0; j < 8; ++j) v += static_cast<acc_t>(p[ct.off[j]]) * ct.w[j];
      } else {
        for (int j = 0; j < ct.n; ++j) v += static_cast<acc_t>(p[ct.off[j]]) * ct.w[j];
      }
      o[i] = static_cast<scalar_t>(blk.nan[i] ? qnan : v);
    }
  }
}

// out[i][:] = gradient of sum_c go[c * gstride + i] * sample_c(i) w.r.t. the normalized
// position of voxel i (blk filled with_grad and the volume strides).
template <typename scalar_t, typename acc_t>
inline void position_grad_block(const scalar_t* vol_b, const VolGeom& g,
                                const TapBlock<acc_t>& blk, const acc_t* go, int64_t gstride,
                                bool align_corners, acc_t (*out)[3]) {
  for (int i = 0; i < blk.n; ++i) out[i][0] = out[i][1] = out[i][2] = 0;
  for (int64_t c = 0; c < g.C; ++c) {
    const scalar_t* p = vol_b + c * g.sc;
    const acc_t* goc = go + c * gstride;
    for (int i = 0; i < blk.n; ++i) {
      const Compact<acc_t>& ct = blk.t[i];
      acc_t gx = 0, gy = 0, gz = 0;
      auto tap = [&](int j) {
        const acc_t val = static_cast<acc_t>(p[ct.off[j]]);
        gx += ct.dx[j] * val;
        gy += ct.dy[j] * val;
        gz += ct.dz[j] * val;
      };
      if (ct.n == 8) {
        for (int j = 0; j < 8; ++j) tap(j);
      } else {
        for (int j = 0; j < ct.n; ++j) tap(j);
      }
      out[i][0] += gx * goc[i];
      out[i][1] += gy * goc[i];
      out[i][2] += gz * goc[i];
    }
  }
  const acc_t sx = unnormalize_scale<acc_t>(g.W, align_corners);
  const acc_t sy = unnormalize_scale<acc_t>(g.H, align_corners);
  const acc_t sz = unnormalize_scale<acc_t>(g.D, align_corners);
  const acc_t qnan = std::numeric_limits<acc_t>::quiet_NaN();
  for (int i = 0; i < blk.n; ++i) {
    if (blk.nan[i]) {
      out[i][0] = out[i][1] = out[i][2] = qnan;
    } else {
      out[i][0] *= sx;
      out[i][1] *= sy;
      out[i][2] *= sz;
    }
  }
}

// gvol_b (C, D, H, W) contiguous += go[c * gstride + i] * weights, channels [c0, c1)
// (blk filled with the contiguous strides (H*W, W, 1)).
template <typename acc_t>
inline void scatter_block(acc_t* gvol_b, const VolGeom& g, const TapBlock<acc_t>& blk,
                          const acc_t* go, int64_t gstride, int64_t c0, int64_t c1) {
  const int64_t dhw = g.D * g.H * g.W;
  for (int64_t c = c0; c < c1; ++c) {
    const acc_t* goc = go + c * gstride;
    acc_t* q = gvol_b + c * dhw;
    for (int i = 0; i < blk.n; ++i) {
      const Compact<acc_t>& ct = blk.t[i];
      const acc_t gi = goc[i];
      if (ct.n == 8) {
        for (int j = 0; j < 8; ++j) q[ct.off[j]] += ct.w[j] * gi;
      } else {
        for (int j = 0; j < ct.n; ++j) q[ct.off[j]] += ct.w[j] * gi;
      }
    }
  }
}

// ---- channels-last slabs ------------------------------------------------------------------------
// When every worker owns whole batch items, a batch item is processed in slabs of up to kSlab
// channels: the slab is copied to a (D, H, W, S) buffer in the accumulation type, so each
// trilinear tap reads S contiguous values and the per-channel loops vectorise. Sample positions
// are computed once per batch item (not once per slab) into a (Vo, 3) buffer. The working memory
// is therefore bounded by workers x (2 V S + 6 Vo) values whatever C, and it is one ATen
// allocation made on the calling thread before the parallel region (the profiler's memory events
// are recorded per thread, so worker-thread allocations would escape the bench's measure).

constexpr int64_t kSlab = 16;

inline int64_t slab_channels(int64_t C) { return std::min<int64_t>(C, kSlab); }

// Number of workers of the batch-owning path (each owns a contiguous range of batch items).
inline int64_t batch_workers(int64_t B) {
  return std::max<int64_t>(1, std::min<int64_t>(B, at::get_num_threads()));
}

// Runs f(worker, b0, b1) for every worker, in parallel.
template <typename F>
void for_batch_workers(int64_t B, int64_t workers, const F& f) {
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) f(w, w * B / workers, (w + 1) * B / workers);
  });
}

// One worker's slice of the slab workspace (null where not asked for).
template <typename T>
struct Slab {
  T* vcl;   // (V, S) channels-last slab of the volume
  T* gcl;   // (V, S) channels-last slab of the volume gradient
  T* tmp;   // (kBlock, S)
  T* pos;   // (Vo, 3) sample positions of the batch item
  T* gpos;  // (Vo, 3) gradient w.r.t. the positions
};

struct SlabLayout {
  int64_t vcl, gcl, tmp, pos, gpos;
  int64_t total() const { return vcl + gcl + tmp + pos + gpos; }
};

// The workspace of `workers` slabs; layout sizes in values of the accumulation type.
inline at::Tensor slab_workspace(int64_t workers, const SlabLayout& l,
                                 const at::TensorOptions& acc_options) {
  return at::empty({workers * l.total()}, acc_options);
}

template <typename T>
Slab<T> slab_at(at::Tensor& ws, const SlabLayout& l, int64_t worker) {
  T* p = ws.mutable_data_ptr<T>() + worker * l.total();
  auto take = [&](int64_t n) {
    T* q = n > 0 ? p : nullptr;
    p += n;
    return q;
  };
  Slab<T> s;
  s.vcl = take(l.vcl);
  s.gcl = take(l.gcl);
  s.tmp = take(l.tmp);
  s.pos = take(l.pos);
  s.gpos = take(l.gpos);
  return s;
}

// dst (D, H, W, S) = channels [c0, c0 + S) of vol_b.
template <typename scalar_t, typename acc_t>
void to_channels_last(const scalar_t* vol_b, const VolGeom& g, int64_t c0, int64_t S,
                      acc_t* dst) {
  // row by row, so the destination rows being filled (W * S values) stay in cache
  for (int64_t d = 0; d < g.D; ++d)
    for (int64_t h = 0; h < g.H; ++h) {
      acc_t* out = dst + (d * g.H + h) * g.W * S;
      for (int64_t c = 0; c < S; ++c) {
        const scalar_t* row = vol_b + (c0 + c) * g.sc + d * g.sd + h * g.sh;
        for (int64_t w = 0; w < g.W; ++w) out[w * S + c] = static_cast<acc_t>(row[w * g.sw]);
      }
    }
}

// dst (C, V) = transpose of src (V, C).
template <typename acc_t>
void from_channels_last(const acc_t* src, int64_t C, int64_t V, acc_t* dst) {
  constexpr int64_t T = 64;
  for (int64_t v0 = 0; v0 < V; v0 += T) {
    const int64_t v1 = std::min(V, v0 + T);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t v = v0; v < v1; ++v) dst[c * V + v] = src[v * C + c];
  }
}

// go[c * gstride + i] -> got[i * C + c] for the n voxels of a block.
template <typename acc_t>
inline void gather_block_rows(const acc_t* go, int64_t gstride, int64_t C, int n, acc_t* got) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t* g = go + c * gstride;
    for (int i = 0; i < n; ++i) got[i * C + c] = g[i];
  }
}

// out[c * ostride + i] = samples of the block from a channels-last volume (taps filled with the
// strides (H*W*C, W*C, C)); tmp holds kBlock * C values.
template <typename scalar_t, typename acc_t>
inline void sample_block_cl(const acc_t* vcl, int64_t C, const TapBlock<acc_t>& blk, acc_t* tmp,
                            scalar_t* out, int64_t ostride) {
  const acc_t qnan = std::numeric_limits<acc_t>::quiet_NaN();
  for (int i = 0; i < blk.n; ++i) {
    acc_t* a = tmp + i * C;
    const Compact<acc_t>& ct = blk.t[i];
    const acc_t fill = blk.nan[i] ? qnan : acc_t(0);
    for (int64_t c = 0; c < C; ++c) a[c] = fill;
    if (blk.nan[i]) continue;
    for (int j = 0; j < ct.n; ++j) {
      const acc_t* p = vcl + ct.off[j];
      const acc_t w = ct.w[j];
      for (int64_t c = 0; c < C; ++c) a[c] += p[c] * w;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    scalar_t* o = out + c * ostride;
    for (int i = 0; i < blk.n; ++i) o[i] = static_cast<scalar_t>(tmp[i * C + c]);
  }
}

// Adds the position gradients of the block from a channels-last slab of C channels to out;
// got = gather_block_rows(go) of the slab. Samples outside the volume's NaN rule get NaN.
template <typename acc_t>
inline void position_grad_block_cl(const acc_t* vcl, int64_t C, const VolGeom& g,
                                   const TapBlock<acc_t>& blk, const acc_t* got,
                                   bool align_corners, acc_t (*out)[3]) {
  const acc_t sx = unnormalize_scale<acc_t>(g.W, align_corners);
  const acc_t sy = unnormalize_scale<acc_t>(g.H, align_corners);
  const acc_t sz = unnormalize_scale<acc_t>(g.D, align_corners);
  const acc_t qnan = std::numeric_limits<acc_t>::quiet_NaN();
  for (int i = 0; i < blk.n; ++i) {
    if (blk.nan[i]) {
      out[i][0] = out[i][1] = out[i][2] = qnan;
      continue;
    }
    const Compact<acc_t>& ct = blk.t[i];
    const acc_t* gi = got + i * C;
    acc_t gx = 0, gy = 0, gz = 0;
    for (int j = 0; j < ct.n; ++j) {
      const acc_t* p = vcl + ct.off[j];
      acc_t dot = 0;
      for (int64_t c = 0; c < C; ++c) dot += p[c] * gi[c];
      gx += ct.dx[j] * dot;
      gy += ct.dy[j] * dot;
      gz += ct.dz[j] * dot;
    }
    out[i][0] += gx * sx;
    out[i][1] += gy * sy;
    out[i][2] += gz * sz;
  }
}

// gcl (D, H, W, C) += weights * got rows.
template <typename acc_t>
inline void scatter_block_cl(acc_t* gcl, int64_t C, const TapBlock<acc_t>& blk, const acc_t* got) {
  for (int i = 0; i < blk.n; ++i) {
    if (blk.nan[i]) continue;
    const Compact<acc_t>& ct = blk.t[i];
    const acc_t* gi = got + i * C;
    for (int j = 0; j < ct.n; ++j) {
      acc_t* q = gcl + ct.off[j];
      const acc_t w = ct.w[j];
      for (int64_t c = 0; c < C; ++c) q[c] += w * gi[c];
    }
  }
}

// Channel chunk for the volume-gradient scatter: tasks own disjoint (batch, channel range)
// slices of the gradient (no atomics, deterministic), enough of them to keep every thread busy.
int64_t channel_chunk(int64_t B, int64_t C) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunk = C;
  while (chunk > 4 && B * ((C + chunk - 1) / chunk) < 2 * threads) chunk = (chunk + 1) / 2;
  return chunk;
}

// Runs f(task, b, v0, v1) over fixed chunks of kChunk voxels of every batch item.
template <typename F>
void for_voxel_chunks(int64_t B, int64_t V, const F& f) {
  const int64_t nch = (V + kChunk - 1) / kChunk;
  at::parallel_for(0, B * nch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nch, v0 = (t % nch) * kChunk;
      f(t, b, v0, std::min(V, v0 + kChunk));
    }
  });
}

// Runs f(b, c0, c1) over (batch, channel chunk) tasks.
template <typename F>
void for_channel_chunks(int64_t B, int64_t C, const F& f) {
  const int64_t chunk = channel_chunk(B, C);
  const int64_t n = (C + chunk - 1) / chunk;
  at::parallel_for(0, B * n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / n, c0 = (t % n) * chunk;
      f(b, c0, std::min(C, c0 + chunk));
    }
  });
}

// Keypoint inputs of one op, converted to the accumulation type.
struct Keypoints {
  at::Tensor kps, kpd, jac;  // contiguous (B, K, 3), (B, K, 3), (B, K, 3, 3) or undefined
  int64_t K;
};

Keypoints keypoints(const at::Tensor& kp_source, const at::Tensor& kp_driving,
                    const std::optional<at::Tensor>& jacobian, at::ScalarType acc) {
  Keypoints k;
  k.kps = kp_source.to(acc).contiguous();
  k.kpd = kp_driving.to(acc).contiguous();
  if (jacobian.has_value()) k.jac = jacobian->to(acc).contiguous();
  k.K = kp_source.size(1);
  return k;
}

template <typename T>
struct KpPtrs {
  const T *kps, *kpd, *jac;
  int64_t K;
  KpPtrs(const Keypoints& k)
      : kps(k.kps.const_data_ptr<T>()),
        kpd(k.kpd.const_data_ptr<T>()),
        jac(k.jac.defined() ? k.jac.const_data_ptr<T>() : nullptr),
        K(k.K) {}
  const T* s(int64_t b) const { return kps + b * K * 3; }
  const T* d(int64_t b) const { return kpd + b * K * 3; }
  const T* j(int64_t b) const { return jac ? jac + b * K * 9 : nullptr; }
};

// Gradients of the flow w.r.t. masks (written to gmasks_b (K+1, V) if not null) and keypoints
// (added to part (K, 15) if not null), given g = d loss / d flow at voxel v.
template <typename T>
inline void flow_grad_at(const T* masks_b, int64_t V, int64_t v, const T* kps, const T* kpd,
                         const T* jac, int64_t K, T zx, T zy, T zz, const T g[3], T* gmasks_b,
                         T* part) {
  if (gmasks_b != nullptr) gmasks_b[v] = g[0] * zx + g[1] * zy + g[2] * zz;
  for (int64_t k = 0; k < K; ++k) {
    if (gmasks_b != nullptr) gmasks_b[(k + 1) * V + v] = mask_grad(kps, kpd, jac, k, zx, zy, zz, g);
    if (part != nullptr) {
      keypoint_motion_grad(kpd, jac, k, zx, zy, zz, masks_b[(k + 1) * V + v], g, part + k * 15);
    }
  }
}

// Sample-position functors for TapBlock::fill (at(vb) binds the block's first voxel).
template <typename T>
struct GridPos {  // positions read from a contiguous (..., 3) grid starting at the block
  const T* p;
  void operator()(int i, T* out) const {
    out[0] = p[3 * i];
    out[1] = p[3 * i + 1];
    out[2] = p[3 * i + 2];
  }
};

template <typename T>
struct FlowPos {  // the keypoint flow of voxel vb + i
  const Axes<T>& axes;
  const T* masks_b;
  int64_t V;
  const T *kps, *kpd, *jac;
  int64_t K;
  int64_t vb;
  FlowPos at(int64_t v) const { return {axes, masks_b, V, kps, kpd, jac, K, v}; }
  void operator()(int i, T* out) const {
    T zx, zy, zz;
    axes.at(vb + i, zx, zy, zz);
    flow_at(masks_b, V, vb + i, kps, kpd, jac, K, zx, zy, zz, out);
  }
};

// pos (n_voxels, 3) = the keypoint flow of every output voxel of fp's batch item.
template <typename T>
void flow_positions(const FlowPos<T>& fp, int64_t n_voxels, T* pos) {
  for_blocks(0, n_voxels, [&](int64_t vb, int n) {
    const FlowPos<T> f = fp.at(vb);
    for (int i = 0; i < n; ++i) f(i, pos + (vb + i) * 3);
  });
}

template <typename T>
struct MotionPos {  // sparse motion k of voxel vb + i (k = -1: the identity)
  const Axes<T>& axes;
  const T *kps, *kpd, *jac;
  int64_t k;
  int64_t vb;
  MotionPos at(int64_t v) const { return {axes, kps, kpd, jac, k, v}; }
  void operator()(int i, T* out) const {
    T zx, zy, zz;
    axes.at(vb + i, zx, zy, zz);
    if (k < 0) {
      out[0] = zx, out[1] = zy, out[2] = zz;
    } else {
      keypoint_motion(kps, kpd, jac, k, zx, zy, zz, out);
    }
  }
};

// flow_grad_at for the n voxels of a block starting at vb, keypoint by keypoint (contiguous mask
// reads and writes, keypoint sums in registers).
template <typename T>
inline void flow_grad_block(const T* masks_b, int64_t V, int64_t vb, int n, const Axes<T>& axes,
                            const T* kps, const T* kpd, const T* jac, int64_t K,
                            const T (*g)[3], T* gmasks_b, T* part) {
  T z[kBlock][3];
  for (int i = 0; i < n; ++i) axes.at(vb + i, z[i][0], z[i][1], z[i][2]);
  if (gmasks_b != nullptr) {
    for (int i = 0; i < n; ++i)
      gmasks_b[vb + i] = g[i][0] * z[i][0] + g[i][1] * z[i][1] + g[i][2] * z[i][2];
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* mk = masks_b + (k + 1) * V + vb;
    if (gmasks_b != nullptr) {
      T* gk = gmasks_b + (k + 1) * V + vb;
      for (int i = 0; i < n; ++i)
        gk[i] = mask_grad(kps, kpd, jac, k, z[i][0], z[i][1], z[i][2], g[i]);
    }
    if (part != nullptr) {
      T acc[15] = {};
      for (int i = 0; i < n; ++i)
        keypoint_motion_grad(kpd, jac, k, z[i][0], z[i][1], z[i][2], mk[i], g[i], acc);
      for (int j = 0; j < 15; ++j) part[k * 15 + j] += acc[j];
    }
  }
}

int64_t num_chunks(int64_t V) { return (V + kChunk - 1) / kChunk; }

// Sums the per-chunk keypoint partials (B * nch, K, 15) into (B, K, 15); an undefined tensor
// where there are no partials (no keypoint gradient asked for).
at::Tensor kp_totals(const at::Tensor& partials, int64_t B, int64_t V, int64_t K) {
  if (!partials.defined()) return at::Tensor();
  return partials.view({B, num_chunks(V), K, 15}).sum(1);  // fixed-order reduction
}

// ---------------------------------------------------------------------------------------------
// warp_volume
// ---------------------------------------------------------------------------------------------

// Accumulation type of the volume ops: double for float64 volumes, float otherwise; grids,
// keypoints and masks are converted to it.
#define PYFACE_DISPATCH_VOLUME(volume, name, ...)                                            \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (volume).scalar_type(), name, [&] { \
    using acc_t = acc_type<scalar_t>;                                                           \
    __VA_ARGS__();                                                                              \
  })

at::Tensor warp_volume_cpu(const at::Tensor& volume, const at::Tensor& grid, bool align_corners) {
  check_warp_volume(volume, grid);
  check_cpu("volume", volume);
  const auto gr = grid.to(acc_dtype(volume)).contiguous();
  const int64_t B = volume.size(0), C = volume.size(1);
  const int64_t Do = grid.size(1), Ho = grid.size(2), Wo = grid.size(3), Vo = Do * Ho * Wo;
  auto out = at::empty({B, C, Do, Ho, Wo}, volume.options());
  if (out.numel() == 0) return out;
  const VolGeom g = vol_geom(volume);
  PYFACE_DISPATCH_VOLUME(volume, "warp_volume_cpu", [&] {
    const acc_t* gp = gr.const_data_ptr<acc_t>();
    const scalar_t* vol = volume.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (B >= at::get_num_threads()) {
      // workers own whole batch items: sample channels-last slabs
      const int64_t V = g.D * g.H * g.W, S = slab_channels(C), workers = batch_workers(B);
      const SlabLayout l{V * S, 0, kBlock * S, 0, 0};
      auto ws = slab_workspace(workers, l, gr.options());
      for_batch_workers(B, workers, [&](int64_t w, int64_t b0, int64_t b1) {
        const Slab<acc_t> sl = slab_at<acc_t>(ws, l, w);
        auto blk = std::make_unique<TapBlock<acc_t>>();
        for (int64_t b = b0; b < b1; ++b) {
          for (int64_t c0 = 0; c0 < C; c0 += S) {
            const int64_t cs = std::min(S, C - c0);
            to_channels_last(vol + b * g.sb, g, c0, cs, sl.vcl);
            for_blocks(0, Vo, [&](int64_t vb, int n) {
              blk->fill(n, GridPos<acc_t>{gp + (b * Vo + vb) * 3}, g, align_corners,
                        g.H * g.W * cs, g.W * cs, cs, false);
              sample_block_cl(sl.vcl, cs, *blk, sl.tmp, o + (b * C + c0) * Vo + vb, Vo);
            });
          }
        }
      });
      return;
    }
    for_voxel_chunks(B, Vo, [&](int64_t, int64_t b, int64_t v0, int64_t v1) {
      auto blk = std::make_unique<TapBlock<acc_t>>();
      for_blocks(v0, v1, [&](int64_t vb, int n) {
        blk->fill(n, GridPos<acc_t>{gp + (b * Vo + vb) * 3}, g, align_corners, g.sd, g.sh, g.sw,
                  false);
        sample_block(vol + b * g.sb, g, *blk, o + b * C * Vo + vb, Vo);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> warp_volume_bwd_cpu(const at::Tensor& grad_out,
                                                       const at::Tensor& volume,
                                                       const at::Tensor& grid, bool align_corners,
                                                       bool need_volume_grad, bool need_grid_grad) {
  check_warp_volume(volume, grid);
  check_cpu("volume", volume);
  const int64_t B = volume.size(0), C = volume.size(1);
  const int64_t Do = grid.size(1), Ho = grid.size(2), Wo = grid.size(3), Vo = Do * Ho * Wo;
  check_grad(grad_out, "grad_out", {B, C, Do, Ho, Wo}, volume);
  const auto acc = acc_dtype(volume);
  const auto gr = grid.to(acc).contiguous();
  const auto go = grad_out.to(acc).contiguous();
  const VolGeom g = vol_geom(volume);
  at::Tensor g_volume = none_like(volume), g_grid = none_like(grid);
  at::Tensor gv, gg;
  // the slab path writes every element of the volume gradient; the other one accumulates
  const bool slabs = go.numel() > 0 && B >= at::get_num_threads();
  if (need_volume_grad)
    gv = slabs ? at::empty(volume.sizes(), volume.options().dtype(acc))
               : at::zeros(volume.sizes(), volume.options().dtype(acc));
  if (need_grid_grad) gg = at::zeros(grid.sizes(), grid.options().dtype(acc));
  if (go.numel() > 0) {
    PYFACE_DISPATCH_VOLUME(volume, "warp_volume_bwd_cpu", [&] {
      const acc_t* gp = gr.const_data_ptr<acc_t>();
      const acc_t* gop = go.const_data_ptr<acc_t>();
      const scalar_t* vol = volume.const_data_ptr<scalar_t>();
      if (slabs) {
        // workers own whole batch items: one pass per channels-last slab; the grid gradient
        // (zero-initialised) accumulates over the slabs
        const int64_t V = g.D * g.H * g.W, S = slab_channels(C), workers = batch_workers(B);
        acc_t* ggp = need_grid_grad ? gg.mutable_data_ptr<acc_t>() : nullptr;
        acc_t* gvp = need_volume_grad ? gv.mutable_data_ptr<acc_t>() : nullptr;
        const SlabLayout l{need_grid_grad ? V * S : 0, need_volume_grad ? V * S : 0, kBlock * S,
                           0, 0};
        auto ws = slab_workspace(workers, l, gr.options());
        for_batch_workers(B, workers, [&](int64_t w, int64_t b0, int64_t b1) {
          const Slab<acc_t> sl = slab_at<acc_t>(ws, l, w);
          auto blk = std::make_unique<TapBlock<acc_t>>();
          for (int64_t b = b0; b < b1; ++b) {
            for (int64_t c0 = 0; c0 < C; c0 += S) {
              const int64_t cs = std::min(S, C - c0);
              if (need_grid_grad) to_channels_last(vol + b * g.sb, g, c0, cs, sl.vcl);
              if (need_volume_grad) std::fill(sl.gcl, sl.gcl + V * cs, acc_t(0));
              for_blocks(0, Vo, [&](int64_t vb, int n) {
                blk->fill(n, GridPos<acc_t>{gp + (b * Vo + vb) * 3}, g, align_corners,
                          g.H * g.W * cs, g.W * cs, cs, need_grid_grad);
                gather_block_rows(gop + (b * C + c0) * Vo + vb, Vo, cs, n, sl.tmp);
                if (need_grid_grad)
                  position_grad_block_cl(sl.vcl, cs, g, *blk, sl.tmp, align_corners,
                                         reinterpret_cast<acc_t(*)[3]>(ggp + (b * Vo + vb) * 3));
                if (need_volume_grad) scatter_block_cl(sl.gcl, cs, *blk, sl.tmp);
              });
              if (need_volume_grad) from_channels_last(sl.gcl, cs, V, gvp + (b * C + c0) * V);
            }
          }
        });
        return;
      }
      if (need_grid_grad) {
        acc_t* ggp = gg.mutable_data_ptr<acc_t>();
        for_voxel_chunks(B, Vo, [&](int64_t, int64_t b, int64_t v0, int64_t v1) {
          auto blk = std::make_unique<TapBlock<acc_t>>();
          for_blocks(v0, v1, [&](int64_t vb, int n) {
            blk->fill(n, GridPos<acc_t>{gp + (b * Vo + vb) * 3}, g, align_corners, g.sd, g.sh,
                      g.sw, true);
            position_grad_block(vol + b * g.sb, g, *blk, gop + b * C * Vo + vb, Vo,
                                align_corners,
                                reinterpret_cast<acc_t(*)[3]>(ggp + (b * Vo + vb) * 3));
          });
        });
      }
      if (need_volume_grad) {
        acc_t* gvp = gv.mutable_data_ptr<acc_t>();
        for_channel_chunks(B, C, [&](int64_t b, int64_t c0, int64_t c1) {
          auto blk = std::make_unique<TapBlock<acc_t>>();
          for_blocks(0, Vo, [&](int64_t vb, int n) {
            blk->fill(n, GridPos<acc_t>{gp + (b * Vo + vb) * 3}, g, align_corners, g.H * g.W,
                      g.W, 1, false);
            scatter_block(gvp + b * C * g.D * g.H * g.W, g, *blk, gop + b * C * Vo + vb, Vo, c0,
                          c1);
          });
        });
      }
    });
  }
  if (need_volume_grad) g_volume = gv.to(volume.scalar_type());
  if (need_grid_grad) g_grid = gg.to(grid.scalar_type());
  return {g_volume, g_grid};
}

// ---------------------------------------------------------------------------------------------
// keypoint_flow
// ---------------------------------------------------------------------------------------------

at::Tensor keypoint_flow_cpu(const at::Tensor& kp_source, const at::Tensor& kp_driving,
                             const at::Tensor& masks, const std::optional<at::Tensor>& jacobian,
                             bool grid_align_corners) {
  const int64_t K = check_keypoints(kp_source, kp_driving, jacobian, -1);
  const int64_t B = kp_source.size(0);
  check_masks(masks, B, K);
  PYFACE_CHECK_SAME_DEVICE("masks", masks, "kp_source", kp_source);
  check_cpu("masks", masks);
  const auto acc = acc_dtype(masks);
  const int64_t D = masks.size(2), H = masks.size(3), W = masks.size(4), V = D * H * W;
  auto flow = at::empty({B, D, H, W, 3}, masks.options().dtype(acc));
  if (flow.numel() == 0) return flow.to(masks.scalar_type());
  const Keypoints kp = keypoints(kp_source, kp_driving, jacobian, acc);
  const auto m = masks.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "keypoint_flow_cpu", [&] {
    const Axes<scalar_t> axes(D, H, W, grid_align_corners);
    const KpPtrs<scalar_t> P(kp);
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    scalar_t* fp = flow.mutable_data_ptr<scalar_t>();
    for_voxel_chunks(B, V, [&](int64_t, int64_t b, int64_t v0, int64_t v1) {
      for (int64_t v = v0; v < v1; ++v) {
        scalar_t zx, zy, zz;
        axes.at(v, zx, zy, zz);
        flow_at(mp + b * (K + 1) * V, V, v, P.s(b), P.d(b), P.j(b), K, zx, zy, zz,
                fp + (b * V + v) * 3);
      }
    });
  });
  return flow.to(masks.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> keypoint_flow_bwd_cpu(
    const at::Tensor& grad_flow, const at::Tensor& kp_source, const at::Tensor& kp_driving,
    const at::Tensor& masks, const std::optional<at::Tensor>& jacobian, bool grid_align_corners,
    bool need_kp_grad, bool need_masks_grad, bool need_jacobian_grad) {
  const int64_t K = check_keypoints(kp_source, kp_driving, jacobian, -1);
  const int64_t B = kp_source.size(0);
  check_masks(masks, B, K);
  PYFACE_CHECK_SAME_DEVICE("masks", masks, "kp_source", kp_source);
  check_cpu("masks", masks);
  const int64_t D = masks.size(2), H = masks.size(3), W = masks.size(4), V = D * H * W;
  check_grad(grad_flow, "grad_flow", {B, D, H, W, 3}, masks);
  need_jacobian_grad = need_jacobian_grad && jacobian.has_value();
  const auto acc = acc_dtype(masks);
  const Keypoints kp = keypoints(kp_source, kp_driving, jacobian, acc);
  const auto m = masks.to(acc).contiguous();
  const auto gf = grad_flow.to(acc).contiguous();
  at::Tensor g_masks = none_like(masks);
  const bool need_part = need_kp_grad || need_jacobian_grad;
  at::Tensor gm, part;
  if (need_masks_grad) gm = at::empty(masks.sizes(), masks.options().dtype(acc));
  if (need_part) part = at::zeros({B * num_chunks(V), K, 15}, masks.options().dtype(acc));
  if (V > 0 && B > 0 && (need_part || need_masks_grad)) {
    AT_DISPATCH_FLOATING_TYPES(acc, "keypoint_flow_bwd_cpu", [&] {
      const Axes<scalar_t> axes(D, H, W, grid_align_corners);
      const KpPtrs<scalar_t> P(kp);
      const scalar_t* mp = m.const_data_ptr<scalar_t>();
      const scalar_t* gfp = gf.const_data_ptr<scalar_t>();
      scalar_t* gmp = need_masks_grad ? gm.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* pp = need_part ? part.mutable_data_ptr<scalar_t>() : nullptr;
      for_voxel_chunks(B, V, [&](int64_t task, int64_t b, int64_t v0, int64_t v1) {
        for (int64_t v = v0; v < v1; ++v) {
          scalar_t zx, zy, zz;
          axes.at(v, zx, zy, zz);
          flow_grad_at(mp + b * (K + 1) * V, V, v, P.s(b), P.d(b), P.j(b), K, zx, zy, zz,
                       gfp + (b * V + v) * 3, gmp ? gmp + b * (K + 1) * V : nullptr,
                       pp ? pp + task * K * 15 : nullptr);
        }
      });
    });
  }
  if (need_masks_grad) g_masks = gm.to(masks.scalar_type());
  const auto [g_kps, g_kpd, g_jac] =
      kp_grads(kp_totals(part, B, V, K), B, K, kp_source, kp_driving, jacobian,
               masks, need_kp_grad, need_jacobian_grad);
  return {g_kps, g_kpd, g_masks, g_jac};
}

// ---------------------------------------------------------------------------------------------
// warp_by_keypoints: the flow of each output voxel is computed on the fly and sampled once.
// ---------------------------------------------------------------------------------------------

struct WarpKpArgs {
  int64_t B, C, K, Do, Ho, Wo, Vo;
};

WarpKpArgs warp_kp_args(const at::Tensor& volume, const at::Tensor& kp_source,
                        const at::Tensor& kp_driving, const at::Tensor& masks,
                        const std::optional<at::Tensor>& jacobian) {
  const int64_t K = check_warp_by_keypoints(volume, kp_source, kp_driving, masks, jacobian);
  const int64_t Do = masks.size(2), Ho = masks.size(3), Wo = masks.size(4);
  return {volume.size(0), volume.size(1), K, Do, Ho, Wo, Do * Ho * Wo};
}

at::Tensor warp_by_keypoints_cpu(const at::Tensor& volume, const at::Tensor& kp_source,
                                 const at::Tensor& kp_driving, const at::Tensor& masks,
                                 const std::optional<at::Tensor>& jacobian, bool align_corners,
                                 bool grid_align_corners) {
  const WarpKpArgs a = warp_kp_args(volume, kp_source, kp_driving, masks, jacobian);
  check_cpu("volume", volume);
  auto out = at::empty({a.B, a.C, a.Do, a.Ho, a.Wo}, volume.options());
  if (out.numel() == 0) return out;
  const auto acc = acc_dtype(volume);
  const Keypoints kp = keypoints(kp_source, kp_driving, jacobian, acc);
  const auto m = masks.to(acc).contiguous();
  const VolGeom g = vol_geom(volume);
  PYFACE_DISPATCH_VOLUME(volume, "warp_by_keypoints_cpu", [&] {
    const Axes<acc_t> axes(a.Do, a.Ho, a.Wo, grid_align_corners);
    const KpPtrs<acc_t> P(kp);
    const acc_t* mp = m.const_data_ptr<acc_t>();
    const scalar_t* vol = volume.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t K = a.K, Vo = a.Vo, C = a.C;
    if (a.B >= at::get_num_threads()) {
      // workers own whole batch items: the flow of the item once, then channels-last slabs
      const int64_t V = g.D * g.H * g.W, S = slab_channels(C), workers = batch_workers(a.B);
      const SlabLayout l{V * S, 0, kBlock * S, Vo * 3, 0};
      auto ws = slab_workspace(workers, l, m.options());
      for_batch_workers(a.B, workers, [&](int64_t w, int64_t b0, int64_t b1) {
        const Slab<acc_t> sl = slab_at<acc_t>(ws, l, w);
        auto blk = std::make_unique<TapBlock<acc_t>>();
        for (int64_t b = b0; b < b1; ++b) {
          flow_positions(
              FlowPos<acc_t>{axes, mp + b * (K + 1) * Vo, Vo, P.s(b), P.d(b), P.j(b), K, 0}, Vo,
              sl.pos);
          for (int64_t c0 = 0; c0 < C; c0 += S) {
            const int64_t cs = std::min(S, C - c0);
            to_channels_last(vol + b * g.sb, g, c0, cs, sl.vcl);
            for_blocks(0, Vo, [&](int64_t vb, int n) {
              blk->fill(n, GridPos<acc_t>{sl.pos + vb * 3}, g, align_corners, g.H * g.W * cs,
                        g.W * cs, cs, false);
              sample_block_cl(sl.vcl, cs, *blk, sl.tmp, o + (b * C + c0) * Vo + vb, Vo);
            });
          }
        }
      });
      return;
    }
    for_voxel_chunks(a.B, Vo, [&](int64_t, int64_t b, int64_t v0, int64_t v1) {
      auto blk = std::make_unique<TapBlock<acc_t>>();
      const FlowPos<acc_t> fp{axes, mp + b * (K + 1) * Vo, Vo, P.s(b), P.d(b), P.j(b), K, 0};
      for_blocks(v0, v1, [&](int64_t vb, int n) {
        blk->fill(n, fp.at(vb), g, align_corners, g.sd, g.sh, g.sw, false);
        sample_block(vol + b * g.sb, g, *blk, o + b * C * Vo + vb, Vo);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> warp_by_keypoints_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& volume, const at::Tensor& kp_source,
    const at::Tensor& kp_driving, const at::Tensor& masks,
    const std::optional<at::Tensor>& jacobian, bool align_corners, bool grid_align_corners,
    bool need_volume_grad, bool need_kp_grad, bool need_masks_grad, bool need_jacobian_grad) {
  const WarpKpArgs a = warp_kp_args(volume, kp_source, kp_driving, masks, jacobian);
  check_cpu("volume", volume);
  check_grad(grad_out, "grad_out", {a.B, a.C, a.Do, a.Ho, a.Wo}, volume);
  need_jacobian_grad = need_jacobian_grad && jacobian.has_value();
  const auto acc = acc_dtype(volume);
  const Keypoints kp = keypoints(kp_source, kp_driving, jacobian, acc);
  const auto m = masks.to(acc).contiguous();
  const auto go = grad_out.to(acc).contiguous();
  const VolGeom g = vol_geom(volume);
  const int64_t B = a.B, C = a.C, K = a.K, Vo = a.Vo;
  at::Tensor g_volume = none_like(volume);
  at::Tensor g_masks = none_like(masks);
  const bool need_part = need_kp_grad || need_jacobian_grad;
  at::Tensor gv, gm, part;
  // the slab path writes every element of the volume gradient; the other one accumulates.
  // Every path writes every element of the mask gradient.
  const bool slabs = go.numel() > 0 && B >= at::get_num_threads();
  if (need_volume_grad)
    gv = slabs ? at::empty(volume.sizes(), volume.options().dtype(acc))
               : at::zeros(volume.sizes(), volume.options().dtype(acc));
  if (need_masks_grad) gm = at::empty(masks.sizes(), masks.options().dtype(acc));
  if (need_part) part = at::zeros({B * num_chunks(Vo), K, 15}, masks.options().dtype(acc));
  if (go.numel() > 0) {
    PYFACE_DISPATCH_VOLUME(volume, "warp_by_keypoints_bwd_cpu", [&] {
      const Axes<acc_t> axes(a.Do, a.Ho, a.Wo, grid_align_corners);
      const KpPtrs<acc_t> P(kp);
      const acc_t* mp = m.const_data_ptr<acc_t>();
      const acc_t* gop = go.const_data_ptr<acc_t>();
      const scalar_t* vol = volume.const_data_ptr<scalar_t>();
      const bool need_pos = need_part || need_masks_grad;
      acc_t* gmp = need_masks_grad ? gm.mutable_data_ptr<acc_t>() : nullptr;
      acc_t* pp = need_part ? part.mutable_data_ptr<acc_t>() : nullptr;
      acc_t* gvp = need_volume_grad ? gv.mutable_data_ptr<acc_t>() : nullptr;
      const int64_t dhw = g.D * g.H * g.W;
      // Position gradients (-> masks, keypoints) of voxels [v0, v1) of batch item b, read from
      // the volume in place (the path for B < threads).
      auto position_pass = [&](int64_t task, int64_t b, int64_t v0, int64_t v1) {
        const acc_t* m_b = mp + b * (K + 1) * Vo;
        auto blk = std::make_unique<TapBlock<acc_t>>();
        acc_t gf[kBlock][3];
        const FlowPos<acc_t> fp{axes, m_b, Vo, P.s(b), P.d(b), P.j(b), K, 0};
        for_blocks(v0, v1, [&](int64_t vb, int n) {
          blk->fill(n, fp.at(vb), g, align_corners, g.sd, g.sh, g.sw, true);
          position_grad_block(vol + b * g.sb, g, *blk, gop + b * C * Vo + vb, Vo, align_corners,
                              gf);
          flow_grad_block(m_b, Vo, vb, n, axes, P.s(b), P.d(b), P.j(b), K, gf,
                          gmp ? gmp + b * (K + 1) * Vo : nullptr,
                          pp ? pp + task * K * 15 : nullptr);
        });
      };
      if (slabs) {
        // Workers own whole batch items (and their slice of the volume gradient): the flow of
        // the item once, one pass per channels-last slab (position gradients accumulate over
        // the slabs), then the mask and keypoint gradients from the position gradients.
        const int64_t nch = num_chunks(Vo);
        const int64_t V = dhw, S = slab_channels(C), workers = batch_workers(B);
        const SlabLayout l{need_pos ? V * S : 0, need_volume_grad ? V * S : 0, kBlock * S,
                           Vo * 3, need_pos ? Vo * 3 : 0};
        auto ws = slab_workspace(workers, l, m.options());
        for_batch_workers(B, workers, [&](int64_t w, int64_t b0, int64_t b1) {
          const Slab<acc_t> sl = slab_at<acc_t>(ws, l, w);
          auto blk = std::make_unique<TapBlock<acc_t>>();
          for (int64_t b = b0; b < b1; ++b) {
            const acc_t* m_b = mp + b * (K + 1) * Vo;
            flow_positions(FlowPos<acc_t>{axes, m_b, Vo, P.s(b), P.d(b), P.j(b), K, 0}, Vo, sl.pos);
            if (need_pos) std::fill(sl.gpos, sl.gpos + Vo * 3, acc_t(0));
            for (int64_t c0 = 0; c0 < C; c0 += S) {
              const int64_t cs = std::min(S, C - c0);
              if (need_pos) to_channels_last(vol + b * g.sb, g, c0, cs, sl.vcl);
              if (need_volume_grad) std::fill(sl.gcl, sl.gcl + V * cs, acc_t(0));
              for_blocks(0, Vo, [&](int64_t vb, int n) {
                blk->fill(n, GridPos<acc_t>{sl.pos + vb * 3}, g, align_corners, g.H * g.W * cs,
                          g.W * cs, cs, need_pos);
                gather_block_rows(gop + (b * C + c0) * Vo + vb, Vo, cs, n, sl.tmp);
                if (need_pos)
                  position_grad_block_cl(sl.vcl, cs, g, *blk, sl.tmp, align_corners,
                                         reinterpret_cast<acc_t(*)[3]>(sl.gpos + vb * 3));
                if (need_volume_grad) scatter_block_cl(sl.gcl, cs, *blk, sl.tmp);
              });
              if (need_volume_grad) from_channels_last(sl.gcl, cs, V, gvp + (b * C + c0) * V);
            }
            if (!need_pos) continue;
            for (int64_t ch = 0; ch < nch; ++ch) {
              const int64_t task = b * nch + ch;
              for_blocks(ch * kChunk, std::min(Vo, (ch + 1) * kChunk), [&](int64_t vb, int n) {
                flow_grad_block(m_b, Vo, vb, n, axes, P.s(b), P.d(b), P.j(b), K,
                                reinterpret_cast<const acc_t(*)[3]>(sl.gpos + vb * 3),
                                gmp ? gmp + b * (K + 1) * Vo : nullptr,
                                pp ? pp + task * K * 15 : nullptr);
              });
            }
          }
        });
      } else {
        if (need_pos) for_voxel_chunks(B, Vo, position_pass);
        if (need_volume_grad) {
          // scatter only (the position gradients are done): tasks own channel ranges
          for_channel_chunks(B, C, [&](int64_t b, int64_t c0, int64_t c1) {
            auto blk_c = std::make_unique<TapBlock<acc_t>>();
            const FlowPos<acc_t> fp{axes, mp + b * (K + 1) * Vo, Vo, P.s(b), P.d(b), P.j(b), K,
                                    0};
            for_blocks(0, Vo, [&](int64_t vb, int n) {
              blk_c->fill(n, fp.at(vb), g, align_corners, g.H * g.W, g.W, 1, false);
              scatter_block(gvp + b * C * dhw, g, *blk_c, gop + b * C * Vo + vb, Vo, c0, c1);
            });
          });
        }
      }
    });
  }
  if (need_volume_grad) g_volume = gv.to(volume.scalar_type());
  if (need_masks_grad) g_masks = gm.to(masks.scalar_type());
  const auto [g_kps, g_kpd, g_jac] =
      kp_grads(kp_totals(part, B, Vo, K), B, K, kp_source, kp_driving, jacobian,
               masks, need_kp_grad, need_jacobian_grad);
  return {g_volume, g_kps, g_kpd, g_masks, g_jac};
}

// ---------------------------------------------------------------------------------------------
// motion_field_input: for k = 0..K the volume warped by sparse motion k and the heatmap
// difference, written in face-vid2vid's channel order without the (K+1)x repeated volume.
// ---------------------------------------------------------------------------------------------

at::Tensor motion_field_input_cpu(const at::Tensor& volume, const at::Tensor& kp_source,
                                  const at::Tensor& kp_driving,
                                  const std::optional<at::Tensor>& jacobian,
                                  double heatmap_variance, bool align_corners,
                                  bool grid_align_corners) {
  const int64_t K =
      check_motion_field_input(volume, kp_source, kp_driving, jacobian, heatmap_variance);
  const int64_t B = volume.size(0), C = volume.size(1);
  check_cpu("volume", volume);
  const int64_t D = volume.size(2), H = volume.size(3), W = volume.size(4), V = D * H * W;
  auto out = at::empty({B, (K + 1) * (C + 1), D, H, W}, volume.options());
  if (out.numel() == 0) return out;
  const auto acc = acc_dtype(volume);
  const Keypoints kp = keypoints(kp_source, kp_driving, jacobian, acc);
  const VolGeom g = vol_geom(volume);
  PYFACE_DISPATCH_VOLUME(volume, "motion_field_input_cpu", [&] {
    const Axes<acc_t> axes(D, H, W, grid_align_corners);
    const KpPtrs<acc_t> P(kp);
    const acc_t var = static_cast<acc_t>(heatmap_variance);
    const scalar_t* vol = volume.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for_voxel_chunks(B, V, [&](int64_t, int64_t b, int64_t v0, int64_t v1) {
      const scalar_t* vol_b = vol + b * g.sb;
      scalar_t* o_b = o + b * (K + 1) * (C + 1) * V;
      auto blk = std::make_unique<TapBlock<acc_t>>();
      for (int64_t k = 0; k <= K; ++k) {
        scalar_t* o_k = o_b + k * (C + 1) * V;
        for (int64_t v = v0; v < v1; ++v) {
          acc_t heat = 0;
          if (k > 0) {
            acc_t zx, zy, zz;
            axes.at(v, zx, zy, zz);
            heat = gaussian(P.d(b) + 3 * (k - 1), zx, zy, zz, var) -
                   gaussian(P.s(b) + 3 * (k - 1), zx, zy, zz, var);
          }
          o_k[v] = static_cast<scalar_t>(heat);
        }
        const MotionPos<acc_t> mpos{axes, P.s(b), P.d(b), P.j(b), k - 1, 0};
        for_blocks(v0, v1, [&](int64_t vb, int n) {
          blk->fill(n, mpos.at(vb), g, align_corners, g.sd, g.sh, g.sw, false);
          sample_block(vol_b, g, *blk, o_k + V + vb, V);
        });
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> motion_field_input_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& volume, const at::Tensor& kp_source,
    const at::Tensor& kp_driving, const std::optional<at::Tensor>& jacobian,
    double heatmap_variance, bool align_corners, bool grid_align_corners, bool need_volume_grad,
    bool need_kp_grad, bool need_jacobian_grad) {
  const int64_t K =
      check_motion_field_input(volume, kp_source, kp_driving, jacobian, heatmap_variance);
  const int64_t B = volume.size(0), C = volume.size(1);
  check_cpu("volume", volume);
  const int64_t D = volume.size(2), H = volume.size(3), W = volume.size(4), V = D * H * W;
  check_grad(grad_out, "grad_out", {B, (K + 1) * (C + 1), D, H, W}, volume);
  need_jacobian_grad = need_jacobian_grad && jacobian.has_value();
  const auto acc = acc_dtype(volume);
  const Keypoints kp = keypoints(kp_source, kp_driving, jacobian, acc);
  const auto go = grad_out.to(acc).contiguous();
  const VolGeom g = vol_geom(volume);
  at::Tensor g_volume = none_like(volume);
  const bool need_part = need_kp_grad || need_jacobian_grad;
  at::Tensor gv, part;
  if (need_volume_grad) gv = at::zeros(volume.sizes(), volume.options().dtype(acc));
  if (need_part) part = at::zeros({B * num_chunks(V), K, 15}, volume.options().dtype(acc));
  if (go.numel() > 0) {
    PYFACE_DISPATCH_VOLUME(volume, "motion_field_input_bwd_cpu", [&] {
      const Axes<acc_t> axes(D, H, W, grid_align_corners);
      const KpPtrs<acc_t> P(kp);
      const acc_t var = static_cast<acc_t>(heatmap_variance);
      const acc_t* gop = go.const_data_ptr<acc_t>();
      const scalar_t* vol = volume.const_data_ptr<scalar_t>();
      const int64_t CC = C + 1;
      const bool need_pos = need_part && K > 0;
      acc_t* pp = need_part ? part.mutable_data_ptr<acc_t>() : nullptr;
      acc_t* gvp = need_volume_grad ? gv.mutable_data_ptr<acc_t>() : nullptr;
      const bool contiguous_taps = g.sd == g.H * g.W && g.sh == g.W && g.sw == 1;
      // Keypoint gradients of voxels [v0, v1) of batch item b (when need_pos) and the scatter
      // of channels [c0, c1) into the volume gradient (when c0 < c1), for every motion k.
      auto run = [&](int64_t task, int64_t b, int64_t v0, int64_t v1, int64_t c0, int64_t c1) {
        const acc_t* go_b = gop + b * (K + 1) * CC * V;
        auto blk = std::make_unique<TapBlock<acc_t>>();
        auto blk_c = std::make_unique<TapBlock<acc_t>>();
        acc_t gp[kBlock][3];
        for (int64_t k = 0; k <= K; ++k) {
          const bool pos_k = need_pos && k > 0;
          if (!pos_k && c0 >= c1) continue;
          acc_t* part_k = pos_k ? pp + task * K * 15 + (k - 1) * 15 : nullptr;
          const MotionPos<acc_t> mpos{axes, P.s(b), P.d(b), P.j(b), k - 1, 0};
          for_blocks(v0, v1, [&](int64_t vb, int n) {
            if (pos_k) {
              blk->fill(n, mpos.at(vb), g, align_corners, g.sd, g.sh, g.sw, true);
              position_grad_block(vol + b * g.sb, g, *blk, go_b + (k * CC + 1) * V + vb, V,
                                  align_corners, gp);
              for (int i = 0; i < n; ++i) {
                acc_t zx, zy, zz;
                axes.at(vb + i, zx, zy, zz);
                keypoint_motion_grad(P.d(b), P.j(b), k - 1, zx, zy, zz, acc_t(1), gp[i], part_k);
              }
            }
            if (c0 < c1) {
              const bool reuse = pos_k && contiguous_taps;
              if (!reuse) blk_c->fill(n, mpos.at(vb), g, align_corners, g.H * g.W, g.W, 1, false);
              scatter_block(gvp + b * C * V, g, reuse ? *blk : *blk_c,
                            go_b + (k * CC + 1) * V + vb, V, c0, c1);
            }
          });
          if (!pos_k) continue;
          const acc_t* kps = P.s(b) + 3 * (k - 1);
          const acc_t* kpd = P.d(b) + 3 * (k - 1);
          for (int64_t v = v0; v < v1; ++v) {
            acc_t zx, zy, zz;
            axes.at(v, zx, zy, zz);
            heatmap_grad(kps, kpd, zx, zy, zz, var, go_b[k * CC * V + v], part_k);
          }
        }
      };
      if (need_volume_grad && B >= at::get_num_threads()) {
        // One task per batch item owns its slice of the volume gradient: a single pass.
        const int64_t nch = num_chunks(V);
        at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b)
            for (int64_t ch = 0; ch < nch; ++ch)
              run(b * nch + ch, b, ch * kChunk, std::min(V, (ch + 1) * kChunk), 0, C);
        });
      } else {
        if (need_pos) {
          for_voxel_chunks(B, V, [&](int64_t task, int64_t b, int64_t v0, int64_t v1) {
            run(task, b, v0, v1, 0, 0);
          });
        }
        if (need_volume_grad) {
          for_channel_chunks(B, C, [&](int64_t b, int64_t c0, int64_t c1) {
            // scatter only: positions are recomputed, the keypoint pass is not repeated
            const acc_t* go_b = gop + b * (K + 1) * CC * V;
            auto blk = std::make_unique<TapBlock<acc_t>>();
            for (int64_t k = 0; k <= K; ++k) {
              const MotionPos<acc_t> mpos{axes, P.s(b), P.d(b), P.j(b), k - 1, 0};
              for_blocks(0, V, [&](int64_t vb, int n) {
                blk->fill(n, mpos.at(vb), g, align_corners, g.H * g.W, g.W, 1, false);
                scatter_block(gvp + b * C * V, g, *blk, go_b + (k * CC + 1) * V + vb, V, c0,
                              c1);
              });
            }
          });
        }
      }
    });
  }
  if (need_volume_grad) g_volume = gv.to(volume.scalar_type());
  const auto [g_kps, g_kpd, g_jac] =
      kp_grads(kp_totals(part, B, V, K), B, K, kp_source, kp_driving, jacobian,
               volume, need_kp_grad, need_jacobian_grad);
  return {g_volume, g_kps, g_kpd, g_jac};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyface, CPU, m) {
  m.impl("warp_volume", &warp_volume_cpu);
  m.impl("warp_volume_bwd", &warp_volume_bwd_cpu);
  m.impl("keypoint_flow", &keypoint_flow_cpu);
  m.impl("keypoint_flow_bwd", &keypoint_flow_bwd_cpu);
  m.impl("warp_by_keypoints", &warp_by_keypoints_cpu);
  m.impl("warp_by_keypoints_bwd", &warp_by_keypoints_bwd_cpu);
  m.impl("motion_field_input", &motion_field_input_cpu);
  m.impl("motion_field_input_bwd", &motion_field_input_bwd_cpu);
}

}  // namespace warp
}  // namespace pyface
