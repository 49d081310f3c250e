// Tri-plane bilinear sampling: the C++ CPU kernels and TORCH_LIBRARY_IMPL(pyface, CPU) of the
// ops declared in triplane.cpp (schemas and argument checks) and documented there.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <vector>

#include "triplane/triplane.h"
#include "triplane/triplane_math.h"

namespace pyface {
namespace triplane {

namespace {

// ---------------------------------------------------------------------------------------------
// CPU kernels. Planes are read through their strides (contiguous NCHW and channels-last views
// both work without a copy); all offsets are 64-bit.
// ---------------------------------------------------------------------------------------------

struct Geometry {
  int64_t B, N, C, H, W;
  int64_t sb, sp, sc, sh, sw;  // planes strides
};

Geometry geometry(const at::Tensor& planes, const at::Tensor& points) {
  return {planes.size(0), points.size(1), planes.size(2), planes.size(3), planes.size(4),
          planes.stride(0), planes.stride(1), planes.stride(2), planes.stride(3), planes.stride(4)};
}

// The kernels read whole channel rows per tap. For NCHW planes that is a strided gather, which the
// blocked kernels below keep in cache as well as they can; when the taps outnumber the texels by
// enough (N >= 3*H*W / 4 per batch item, e.g. EG3D's 393k samples per image on 256^2 planes), a
// channels-last copy of the planes - one pass over them - is cheaper than strided gathers.
bool prefer_channels_last(const at::Tensor& planes, int64_t n_points_per_item) {
  return planes.stride(2) != 1 && 4 * n_points_per_item >= 3 * planes.size(3) * planes.size(4);
}

// (B, 3, C, H, W) with any strides -> a (B, 3, C, H, W) view of a contiguous (B, 3, H, W, C)
// copy, transposed row by row in parallel (one plane row of all channels is a small tile).
at::Tensor channels_last_copy(const at::Tensor& planes) {
  const int64_t B = planes.size(0), C = planes.size(2), H = planes.size(3), W = planes.size(4);
  auto out = at::empty({B, 3, H, W, C}, planes.options());
  const int64_t sb = planes.stride(0), sp = planes.stride(1), sc = planes.stride(2),
                sh = planes.stride(3), sw = planes.stride(4);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, planes.scalar_type(),
                                  "triplane_channels_last_copy", [&] {
    const scalar_t* src = planes.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * 3 * H, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t bp = r / H, h = r % H;
        const scalar_t* s0 = src + (bp / 3) * sb + (bp % 3) * sp + h * sh;
        scalar_t* d0 = dst + r * W * C;
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* s = s0 + c * sc;
          for (int64_t w = 0; w < W; ++w) d0[w * C + c] = s[w * sw];
        }
      }
    });
  });
  return out.permute({0, 1, 4, 2, 3});
}

template <typename acc_t>
inline void plane_coords(const acc_t* p, const Args& a, int plane, acc_t& u, acc_t& v) {
  u = p[axis_u(a.axes, plane)] * static_cast<acc_t>(a.scale);
  v = p[axis_v(a.axes, plane)] * static_cast<acc_t>(a.scale);
}

// Row of the upstream gradient for (b, plane, n) and the factor that the reduction applies.
template <typename scalar_t, typename acc_t>
inline const scalar_t* grad_row(const scalar_t* grad_out, const Geometry& g, const Args& a,
                                int64_t b, int pl, int64_t n, acc_t& factor) {
  factor = a.reduce == Reduce::MEAN ? acc_t(1) / acc_t(3) : acc_t(1);
  if (a.reduce == Reduce::NONE) return grad_out + ((b * 3 + pl) * g.N + n) * g.C;
  return grad_out + (b * g.N + n) * g.C;
}

// Forward for channels-last planes (channel stride 1), points in blocks of kTapBlock: the tap
// set-up (bilinear_taps' arithmetic: unnormalise, clamp, floor, weights, bounds) runs over the
// block in branch-free loops the compiler vectorises across points; then each point gathers its
// taps, each a contiguous channel row. CC > 0 fixes the channel count at compile time (the common
// plane widths get fully unrolled channel loops); CC = 0 reads it from the geometry. The weights
// and sums are the same expressions, in the same order, as bilinear_taps and the per-tap loop, so
// the result is the same to the bit.
constexpr int64_t kTapBlock = 64;

template <typename acc_t>
struct PlaneTapBlock {
  acc_t ix[kTapBlock], iy[kTapBlock];
  int32_t x0[kTapBlock], y0[kTapBlock];
  acc_t w[4][kTapBlock];
  uint8_t nan[kTapBlock];
};

// bilinear_taps for points[i0 .. i0 + count) on one plane, vectorisable over the block.
template <typename acc_t>
inline void plane_tap_block(PlaneTapBlock<acc_t>& tb, const acc_t* points, int64_t i0,
                            int64_t count, const Geometry& g, const Args& a, int pl) {
  const int au = axis_u(a.axes, pl), av = axis_v(a.axes, pl);
  const acc_t scale = static_cast<acc_t>(a.scale);
  const acc_t Wf = acc_t(g.W), Hf = acc_t(g.H);
  const acc_t xmax = acc_t(g.W + 1), ymax = acc_t(g.H + 1);
  const bool ac = a.align_corners;
  for (int64_t j = 0; j < count; ++j) {
    const acc_t u = points[(i0 + j) * 3 + au] * scale;
    const acc_t v = points[(i0 + j) * 3 + av] * scale;
    const bool bad = (u != u) | (v != v);
    acc_t ix = ac ? ((u + acc_t(1)) / acc_t(2)) * acc_t(g.W - 1)
                  : ((u + acc_t(1)) * Wf - acc_t(1)) / acc_t(2);
    acc_t iy = ac ? ((v + acc_t(1)) / acc_t(2)) * acc_t(g.H - 1)
                  : ((v + acc_t(1)) * Hf - acc_t(1)) / acc_t(2);
    ix = bad ? acc_t(0) : ix;
    iy = bad ? acc_t(0) : iy;
    ix = ix < acc_t(-2) ? acc_t(-2) : (ix > xmax ? xmax : ix);
    iy = iy < acc_t(-2) ? acc_t(-2) : (iy > ymax ? ymax : iy);
    // floor of a value in [-2, size + 1]: truncate, then step down where truncation rounded up
    int32_t xi = static_cast<int32_t>(ix), yi = static_cast<int32_t>(iy);
    xi -= static_cast<acc_t>(xi) > ix ? 1 : 0;
    yi -= static_cast<acc_t>(yi) > iy ? 1 : 0;
    const acc_t fx0 = static_cast<acc_t>(xi), fy0 = static_cast<acc_t>(yi);
    const acc_t fx1 = fx0 + acc_t(1), fy1 = fy0 + acc_t(1);
    tb.ix[j] = ix;
    tb.iy[j] = iy;
    tb.x0[j] = xi;
    tb.y0[j] = yi;
    tb.w[0][j] = (fx1 - ix) * (fy1 - iy);
    tb.w[1][j] = (ix - fx0) * (fy1 - iy);
    tb.w[2][j] = (fx1 - ix) * (iy - fy0);
    tb.w[3][j] = (ix - fx0) * (iy - fy0);
    tb.nan[j] = bad;
  }
}

template <typename scalar_t, typename acc_t, int CC>
void forward_cpu_kernel_c(const scalar_t* planes, const acc_t* points, scalar_t* out,
                          const Geometry& g, const Args& a) {
  const int64_t total = g.B * g.N;
  const int64_t C = CC > 0 ? CC : g.C;
  const int64_t n_blocks = (total + kTapBlock - 1) / kTapBlock;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, C * kTapBlock));
  at::parallel_for(0, n_blocks, grain, [&](int64_t begin, int64_t end) {
    auto tb = std::make_unique<PlaneTapBlock<acc_t>[]>(3);
    // fixed channel counts keep the running sums in registers
    acc_t acc_fixed[CC > 0 ? CC : 1], val_fixed[CC > 0 ? CC : 1];
    std::vector<acc_t> acc_buf(CC > 0 ? 0 : C), val_buf(CC > 0 ? 0 : C);
    acc_t* __restrict__ acc = CC > 0 ? acc_fixed : acc_buf.data();
    acc_t* __restrict__ val = CC > 0 ? val_fixed : val_buf.data();
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kTapBlock;
      const int64_t count = std::min(kTapBlock, total - i0);
      for (int pl = 0; pl < 3; ++pl) plane_tap_block(tb[pl], points, i0, count, g, a, pl);
      int64_t b = i0 / g.N, n = i0 % g.N;
      for (int64_t j = 0; j < count; ++j, ++n) {
        if (n == g.N) {
          n = 0;
          ++b;
        }
        const int64_t i = i0 + j;
        for (int64_t c = 0; c < C; ++c) acc[c] = acc_t(0);
        for (int pl = 0; pl < 3; ++pl) {
          const PlaneTapBlock<acc_t>& t = tb[pl];
          const int64_t x0 = t.x0[j], y0 = t.y0[j];
          const bool x0_in = x0 >= 0 && x0 < g.W, x1_in = x0 + 1 >= 0 && x0 + 1 < g.W;
          const bool y0_in = y0 >= 0 && y0 < g.H, y1_in = y0 + 1 >= 0 && y0 + 1 < g.H;
          const scalar_t* base = planes + b * g.sb + pl * g.sp;
          const scalar_t* __restrict__ t0 = base + y0 * g.sh + x0 * g.sw;
          if (x0_in && x1_in && y0_in && y1_in && !t.nan[j]) {
            const scalar_t* __restrict__ t1 = t0 + g.sw;
            const scalar_t* __restrict__ t2 = t0 + g.sh;
            const scalar_t* __restrict__ t3 = t2 + g.sw;
            const acc_t w0 = t.w[0][j], w1 = t.w[1][j], w2 = t.w[2][j], w3 = t.w[3][j];
            for (int64_t c = 0; c < C; ++c) {
              val[c] = ((static_cast<acc_t>(t0[c]) * w0 + static_cast<acc_t>(t1[c]) * w1) +
                        static_cast<acc_t>(t2[c]) * w2) + static_cast<acc_t>(t3[c]) * w3;
            }
          } else {
            const bool valid[4] = {x0_in && y0_in, x1_in && y0_in, x0_in && y1_in,
                                   x1_in && y1_in};
            for (int64_t c = 0; c < C; ++c) val[c] = acc_t(0);
            for (int k = 0; k < 4; ++k) {
              if (!valid[k]) continue;
              const scalar_t* tap = base + (y0 + (k >> 1)) * g.sh + (x0 + (k & 1)) * g.sw;
              const acc_t w = t.w[k][j];
              for (int64_t c = 0; c < C; ++c) val[c] += static_cast<acc_t>(tap[c]) * w;
            }
            if (t.nan[j]) {
              for (int64_t c = 0; c < C; ++c) val[c] = std::numeric_limits<acc_t>::quiet_NaN();
            }
          }
          if (a.reduce == Reduce::NONE) {
            scalar_t* o = out + ((b * 3 + pl) * g.N + n) * C;
            for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(val[c]);
          } else {
            for (int64_t c = 0; c < C; ++c) acc[c] += val[c];
          }
        }
        if (a.reduce != Reduce::NONE) {
          scalar_t* o = out + i * C;
          if (a.reduce == Reduce::MEAN) {
            for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c] / acc_t(3));
          } else {
            for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c]);
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void forward_cpu_kernel(const scalar_t* planes, const acc_t* points, scalar_t* out,
                        const Geometry& g, const Args& a) {
  switch (g.C) {
    case 8: return forward_cpu_kernel_c<scalar_t, acc_t, 8>(planes, points, out, g, a);
    case 16: return forward_cpu_kernel_c<scalar_t, acc_t, 16>(planes, points, out, g, a);
    case 32: return forward_cpu_kernel_c<scalar_t, acc_t, 32>(planes, points, out, g, a);
    default: return forward_cpu_kernel_c<scalar_t, acc_t, 0>(planes, points, out, g, a);
  }
}

// Gradient w.r.t. points for channels-last planes: one independent task per point.
template <typename scalar_t, typename acc_t>
void points_grad_cpu_kernel(const scalar_t* grad_out, const scalar_t* planes, const acc_t* points,
                            acc_t* grad_points, const Geometry& g, const Args& a) {
  const int64_t total = g.B * g.N;
  constexpr int64_t sc = 1;  // channels-last planes: contiguous channel rows
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, g.C));
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / g.N, n = i % g.N;
      const acc_t* p = points + i * 3;
      acc_t gp[3] = {0, 0, 0};
      for (int pl = 0; pl < 3; ++pl) {
        acc_t u, v;
        plane_coords(p, a, pl, u, v);
        const Taps<acc_t> t = bilinear_taps(u, v, g.W, g.H, a.align_corners);
        acc_t dwdx[4], dwdy[4];
        weight_grads(t, dwdx, dwdy);
        acc_t factor;
        const scalar_t* go = grad_row(grad_out, g, a, b, pl, n, factor);
        const scalar_t* base = planes + b * g.sb + pl * g.sp;
        acc_t gx = 0, gy = 0;
        for (int k = 0; k < 4; ++k) {
          if (!t.valid[k]) continue;
          const scalar_t* tap = base + tap_offset(t, k, g.sh, g.sw);
          acc_t dot = 0;
          for (int64_t c = 0; c < g.C; ++c) {
            dot += static_cast<acc_t>(tap[c * sc]) * static_cast<acc_t>(go[c]);
          }
          gx += dwdx[k] * dot;
          gy += dwdy[k] * dot;
        }
        if (t.nan) gx = gy = std::numeric_limits<acc_t>::quiet_NaN();
        const acc_t s = static_cast<acc_t>(a.scale) * factor;
        gp[axis_u(a.axes, pl)] += gx * unnormalize_scale<acc_t>(g.W, a.align_corners) * s;
        gp[axis_v(a.axes, pl)] += gy * unnormalize_scale<acc_t>(g.H, a.align_corners) * s;
      }
      for (int d = 0; d < 3; ++d) grad_points[i * 3 + d] = gp[d];
    }
  });
}

// Kernels for planes with a channel stride other than 1 (NCHW): points are processed in blocks
// of kBlock, channel by channel, so the gathers of one channel slice of a plane (H*W values) stay
// in cache while the block's points read it.
constexpr int64_t kBlock = 64;

template <typename acc_t>
struct BlockTaps {
  int64_t off[3][4][kBlock];  // absolute offsets of the taps (0 when invalid)
  acc_t w[3][4][kBlock];      // weights (0 when invalid)
  acc_t dwdx[3][4][kBlock];   // weight derivatives (0 when invalid)
  acc_t dwdy[3][4][kBlock];
  bool nan[3][kBlock];
};

template <typename acc_t>
void setup_block(BlockTaps<acc_t>& bt, const acc_t* points, const Geometry& g, const Args& a,
                 int64_t i0, int64_t count, bool derivatives) {
  for (int64_t j = 0; j < count; ++j) {
    const int64_t i = i0 + j;
    const int64_t b = i / g.N;
    const acc_t* p = points + i * 3;
    for (int pl = 0; pl < 3; ++pl) {
      acc_t u, v;
      plane_coords(p, a, pl, u, v);
      const Taps<acc_t> t = bilinear_taps(u, v, g.W, g.H, a.align_corners);
      acc_t dx[4], dy[4];
      if (derivatives) weight_grads(t, dx, dy);
      bt.nan[pl][j] = t.nan;
      for (int k = 0; k < 4; ++k) {
        const bool ok = t.valid[k] && !t.nan;
        bt.off[pl][k][j] = ok ? b * g.sb + pl * g.sp + tap_offset(t, k, g.sh, g.sw) : 0;
        bt.w[pl][k][j] = ok ? t.w[k] : acc_t(0);
        if (derivatives) {
          bt.dwdx[pl][k][j] = ok ? dx[k] : acc_t(0);
          bt.dwdy[pl][k][j] = ok ? dy[k] : acc_t(0);
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward_cpu_blocked(const scalar_t* planes, const acc_t* points, scalar_t* out,
                         const Geometry& g, const Args& a) {
  const int64_t total = g.B * g.N;
  const int64_t n_blocks = (total + kBlock - 1) / kBlock;
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    auto bt = std::make_unique<BlockTaps<acc_t>>();
    std::vector<acc_t> buf(kBlock * g.C);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kBlock;
      const int64_t count = std::min(kBlock, total - i0);
      setup_block(*bt, points, g, a, i0, count, false);
      std::fill(buf.begin(), buf.end(), acc_t(0));
      for (int pl = 0; pl < 3; ++pl) {
        for (int64_t c = 0; c < g.C; ++c) {
          const scalar_t* pc = planes + c * g.sc;
          for (int64_t j = 0; j < count; ++j) {
            acc_t val = 0;
            for (int k = 0; k < 4; ++k) {
              const acc_t w = bt->w[pl][k][j];
              if (w != acc_t(0)) val += static_cast<acc_t>(pc[bt->off[pl][k][j]]) * w;
            }
            buf[j * g.C + c] += val;
          }
        }
        for (int64_t j = 0; j < count; ++j) {
          if (bt->nan[pl][j]) {
            for (int64_t c = 0; c < g.C; ++c) buf[j * g.C + c] = std::numeric_limits<acc_t>::quiet_NaN();
          }
        }
        if (a.reduce == Reduce::NONE) {
          for (int64_t j = 0; j < count; ++j) {
            const int64_t i = i0 + j, b = i / g.N, n = i % g.N;
            scalar_t* o = out + ((b * 3 + pl) * g.N + n) * g.C;
            for (int64_t c = 0; c < g.C; ++c) o[c] = static_cast<scalar_t>(buf[j * g.C + c]);
          }
          std::fill(buf.begin(), buf.end(), acc_t(0));
        }
      }
      if (a.reduce != Reduce::NONE) {
        const acc_t f = a.reduce == Reduce::MEAN ? acc_t(3) : acc_t(1);
        for (int64_t j = 0; j < count; ++j) {
          scalar_t* o = out + (i0 + j) * g.C;
          for (int64_t c = 0; c < g.C; ++c) o[c] = static_cast<scalar_t>(buf[j * g.C + c] / f);
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void points_grad_cpu_blocked(const scalar_t* grad_out, const scalar_t* planes,
                             const acc_t* points, acc_t* grad_points, const Geometry& g,
                             const Args& a) {
  const int64_t total = g.B * g.N;
  const int64_t n_blocks = (total + kBlock - 1) / kBlock;
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    auto bt = std::make_unique<BlockTaps<acc_t>>();
    std::vector<acc_t> dot(4 * kBlock);
    std::vector<const scalar_t*> rows(kBlock);
    std::vector<acc_t> factor(kBlock);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kBlock;
      const int64_t count = std::min(kBlock, total - i0);
      setup_block(*bt, points, g, a, i0, count, true);
      for (int64_t j = 0; j < count; ++j) {
        for (int d = 0; d < 3; ++d) grad_points[(i0 + j) * 3 + d] = acc_t(0);
      }
      for (int pl = 0; pl < 3; ++pl) {
        std::fill(dot.begin(), dot.end(), acc_t(0));
        for (int64_t j = 0; j < count; ++j) {
          const int64_t i = i0 + j;
          rows[j] = grad_row(grad_out, g, a, i / g.N, pl, i % g.N, factor[j]);
        }
        for (int64_t c = 0; c < g.C; ++c) {
          const scalar_t* pc = planes + c * g.sc;
          for (int64_t j = 0; j < count; ++j) {
            const acc_t go = static_cast<acc_t>(rows[j][c]);
            for (int k = 0; k < 4; ++k) {
              if (bt->w[pl][k][j] != acc_t(0) || bt->dwdx[pl][k][j] != acc_t(0) ||
                  bt->dwdy[pl][k][j] != acc_t(0)) {
                dot[k * kBlock + j] += static_cast<acc_t>(pc[bt->off[pl][k][j]]) * go;
              }
            }
          }
        }
        const acc_t sx = unnormalize_scale<acc_t>(g.W, a.align_corners) * static_cast<acc_t>(a.scale);
        const acc_t sy = unnormalize_scale<acc_t>(g.H, a.align_corners) * static_cast<acc_t>(a.scale);
        for (int64_t j = 0; j < count; ++j) {
          acc_t gx = 0, gy = 0;
          for (int k = 0; k < 4; ++k) {
            gx += bt->dwdx[pl][k][j] * dot[k * kBlock + j];
            gy += bt->dwdy[pl][k][j] * dot[k * kBlock + j];
          }
          if (bt->nan[pl][j]) gx = gy = std::numeric_limits<acc_t>::quiet_NaN();
          acc_t* gp = grad_points + (i0 + j) * 3;
          gp[axis_u(a.axes, pl)] += gx * sx * factor[j];
          gp[axis_v(a.axes, pl)] += gy * sy * factor[j];
        }
      }
    }
  });
}

// Gradient w.r.t. planes, accumulated channels-last: `grad` is (B, 3, H, W, C) in the
// accumulation type. Tasks own disjoint (batch, plane, channel-range) slices, so the scatter
// needs no atomics and is deterministic. With WITH_POINTS the same pass also reads the
// channels-last planes (`planes_cl`, channel stride 1) at the taps it scatters to and writes, per
// (batch, plane, channel chunk, point), the derivative w.r.t. the plane's pixel coordinates
// (`partial`: (B, 3, n_chunks, N, 2)); combine_points_grad() sums those into the point gradient.
template <typename scalar_t, typename acc_t, bool WITH_POINTS>
void planes_grad_cpu_kernel(const scalar_t* grad_out, const acc_t* points, acc_t* grad,
                            const scalar_t* planes_cl, acc_t* partial, int64_t chunk,
                            const Geometry& g, const Args& a) {
  const int64_t hwc = g.H * g.W * g.C;
  const int64_t n_chunks = (g.C + chunk - 1) / chunk;
  const int64_t tasks = g.B * 3 * n_chunks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> go(chunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (3 * n_chunks);
      const int pl = static_cast<int>((task / n_chunks) % 3);
      const int64_t ch = task % n_chunks;
      const int64_t c0 = ch * chunk;
      const int64_t nc = std::min(g.C, c0 + chunk) - c0;
      acc_t* gplane = grad + (b * 3 + pl) * hwc + c0;
      const scalar_t* plane = WITH_POINTS ? planes_cl + b * g.sb + pl * g.sp + c0 : nullptr;
      acc_t* part = WITH_POINTS ? partial + ((b * 3 + pl) * n_chunks + ch) * g.N * 2 : nullptr;
      if (!WITH_POINTS) {
        // plane gradient only: tap set-up vectorised over blocks of points (plane_tap_block),
        // then the scatter in the same order as below
        auto tb = std::make_unique<PlaneTapBlock<acc_t>>();
        for (int64_t n0 = 0; n0 < g.N; n0 += kTapBlock) {
          const int64_t count = std::min(kTapBlock, g.N - n0);
          plane_tap_block(*tb, points, b * g.N + n0, count, g, a, pl);
          for (int64_t j = 0; j < count; ++j) {
            if (tb->nan[j]) continue;
            const int64_t x0 = tb->x0[j], y0 = tb->y0[j];
            const bool x0_in = x0 >= 0 && x0 < g.W, x1_in = x0 + 1 >= 0 && x0 + 1 < g.W;
            const bool y0_in = y0 >= 0 && y0 < g.H, y1_in = y0 + 1 >= 0 && y0 + 1 < g.H;
            const bool valid[4] = {x0_in && y0_in, x1_in && y0_in, x0_in && y1_in,
                                   x1_in && y1_in};
            if (!(valid[0] || valid[1] || valid[2] || valid[3])) continue;
            acc_t factor;
            const scalar_t* row = grad_row(grad_out, g, a, b, pl, n0 + j, factor) + c0;
            for (int64_t c = 0; c < nc; ++c) go[c] = static_cast<acc_t>(row[c]) * factor;
            for (int k = 0; k < 4; ++k) {
              if (!valid[k]) continue;
              acc_t* dst = gplane + ((y0 + (k >> 1)) * g.W + (x0 + (k & 1))) * g.C;
              const acc_t w = tb->w[k][j];
              for (int64_t c = 0; c < nc; ++c) dst[c] += w * go[c];
            }
          }
        }
        continue;
      }
      for (int64_t n = 0; n < g.N; ++n) {
        const acc_t* p = points + (b * g.N + n) * 3;
        acc_t u, v;
        plane_coords(p, a, pl, u, v);
        const Taps<acc_t> t = bilinear_taps(u, v, g.W, g.H, a.align_corners);
        if (WITH_POINTS) {
          part[n * 2] = part[n * 2 + 1] =
              t.nan ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
        }
        if (t.nan || !(t.valid[0] || t.valid[1] || t.valid[2] || t.valid[3])) continue;
        acc_t factor;
        const scalar_t* row = grad_row(grad_out, g, a, b, pl, n, factor) + c0;
        for (int64_t c = 0; c < nc; ++c) go[c] = static_cast<acc_t>(row[c]) * factor;
        acc_t dwdx[4], dwdy[4];
        if (WITH_POINTS) weight_grads(t, dwdx, dwdy);
        acc_t gx = 0, gy = 0;
        for (int k = 0; k < 4; ++k) {
          if (!t.valid[k]) continue;
          acc_t* dst = gplane + tap_offset(t, k, g.W * g.C, g.C);
          const acc_t w = t.w[k];
          for (int64_t c = 0; c < nc; ++c) dst[c] += w * go[c];
          if (WITH_POINTS) {
            const scalar_t* src = plane + tap_offset(t, k, g.sh, g.sw);
            acc_t dot = 0;
            for (int64_t c = 0; c < nc; ++c) dot += static_cast<acc_t>(src[c]) * go[c];
            gx += dwdx[k] * dot;
            gy += dwdy[k] * dot;
          }
        }
        if (WITH_POINTS) {
          part[n * 2] = gx;
          part[n * 2 + 1] = gy;
        }
      }
    }
  });
}

// Channel chunk of the plane-gradient tasks: enough tasks to keep every thread busy, chunks of
// at least 8 channels.
int64_t grad_chunk(const Geometry& g) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunk = std::max<int64_t>(1, g.C);
  while (chunk > 8 && g.B * 3 * ((g.C + chunk - 1) / chunk) < 2 * threads) chunk = (chunk + 1) / 2;
  return chunk;
}

// grad_points[b, n] from the per-plane pixel-coordinate derivatives of planes_grad_cpu_kernel.
template <typename acc_t>
void combine_points_grad(const acc_t* partial, int64_t n_chunks, acc_t* grad_points,
                         const Geometry& g, const Args& a) {
  const acc_t sx = unnormalize_scale<acc_t>(g.W, a.align_corners) * static_cast<acc_t>(a.scale);
  const acc_t sy = unnormalize_scale<acc_t>(g.H, a.align_corners) * static_cast<acc_t>(a.scale);
  at::parallel_for(0, g.B * g.N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / g.N, n = i % g.N;
      acc_t gp[3] = {0, 0, 0};
      for (int pl = 0; pl < 3; ++pl) {
        acc_t gx = 0, gy = 0;
        for (int64_t ch = 0; ch < n_chunks; ++ch) {
          const acc_t* part = partial + (((b * 3 + pl) * n_chunks + ch) * g.N + n) * 2;
          gx += part[0];
          gy += part[1];
        }
        gp[axis_u(a.axes, pl)] += gx * sx;
        gp[axis_v(a.axes, pl)] += gy * sy;
      }
      for (int d = 0; d < 3; ++d) grad_points[i * 3 + d] = gp[d];
    }
  });
}

// (B, 3, H, W, C) contiguous -> (B, 3, C, H, W) contiguous, in parallel over plane rows.
template <typename src_t, typename dst_t>
void channels_first_copy(const src_t* src, dst_t* dst, const Geometry& g) {
  at::parallel_for(0, g.B * 3 * g.H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bp = r / g.H, h = r % g.H;
      const src_t* s = src + r * g.W * g.C;
      dst_t* d0 = dst + bp * g.C * g.H * g.W + h * g.W;
      for (int64_t c = 0; c < g.C; ++c) {
        dst_t* d = d0 + c * g.H * g.W;
        for (int64_t w = 0; w < g.W; ++w) d[w] = static_cast<dst_t>(s[w * g.C + c]);
      }
    }
  });
}

at::Tensor triplane_sample_cpu(const at::Tensor& planes_in, const at::Tensor& points,
                               c10::string_view plane_axes, double box_size,
                               c10::string_view reduce, bool align_corners) {
  const Args a = check_inputs(planes_in, points, std::string(plane_axes), box_size,
                              std::string(reduce), align_corners);
  check_cpu("planes", planes_in);
  auto out = at::empty(output_shape(planes_in, points, a.reduce), planes_in.options());
  if (out.numel() == 0) return out;
  const auto planes = prefer_channels_last(planes_in, points.size(1))
                          ? channels_last_copy(planes_in) : planes_in;
  const auto pts = points.to(acc_dtype(planes)).contiguous();
  const Geometry g = geometry(planes, points);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, planes.scalar_type(),
                                  "triplane_sample_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    auto run = [&](auto kernel) {
      kernel(planes.const_data_ptr<scalar_t>(), pts.const_data_ptr<acc_t>(),
             out.mutable_data_ptr<scalar_t>(), g, a);
    };
    if (g.sc == 1) run(forward_cpu_kernel<scalar_t, acc_t>);
    else run(forward_cpu_blocked<scalar_t, acc_t>);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> triplane_sample_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& planes_in, const at::Tensor& points,
    c10::string_view plane_axes, double box_size, c10::string_view reduce, bool align_corners,
    bool need_planes_grad, bool need_points_grad) {
  const Args a = check_inputs(planes_in, points, std::string(plane_axes), box_size,
                              std::string(reduce), align_corners);
  check_grad_out(grad_out, planes_in, points, a.reduce);
  check_cpu("planes", planes_in);
  const auto acc = acc_dtype(planes_in);
  const auto pts = points.to(acc).contiguous();
  const auto go = grad_out.to(planes_in.scalar_type()).contiguous();
  at::Tensor grad_planes = at::empty({0}, planes_in.options());
  at::Tensor grad_points = at::empty({0}, points.options());
  const bool work = grad_out.numel() > 0;
  if (need_planes_grad) {
    // One pass scatters the plane gradient and, when asked for, gathers the point gradient from
    // channels-last planes at the same taps.
    const Geometry g0 = geometry(planes_in, points);
    const bool fused = need_points_grad && work;
    const auto planes_cl =
        fused ? (planes_in.stride(2) == 1 ? planes_in : channels_last_copy(planes_in)) : planes_in;
    const Geometry g = geometry(planes_cl, points);
    const int64_t chunk = grad_chunk(g);
    const int64_t n_chunks = (g.C + chunk - 1) / chunk;
    auto gacc = at::zeros({g.B, 3, g.H, g.W, g.C}, planes_in.options().dtype(acc));
    auto partial = at::empty({fused ? g.B * 3 * n_chunks * g.N * 2 : 0},
                             planes_in.options().dtype(acc));
    grad_planes = at::empty(planes_in.sizes(), planes_in.options());
    grad_points = fused ? at::empty(points.sizes(), points.options().dtype(acc)) : grad_points;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, planes_in.scalar_type(),
                                    "triplane_sample_bwd_cpu_planes", [&] {
      using acc_t = acc_type<scalar_t>;
      if (work) {
        if (fused) {
          planes_grad_cpu_kernel<scalar_t, acc_t, true>(
              go.const_data_ptr<scalar_t>(), pts.const_data_ptr<acc_t>(),
              gacc.mutable_data_ptr<acc_t>(), planes_cl.const_data_ptr<scalar_t>(),
              partial.mutable_data_ptr<acc_t>(), chunk, g, a);
          combine_points_grad<acc_t>(partial.const_data_ptr<acc_t>(), n_chunks,
                                     grad_points.mutable_data_ptr<acc_t>(), g, a);
        } else {
          planes_grad_cpu_kernel<scalar_t, acc_t, false>(
              go.const_data_ptr<scalar_t>(), pts.const_data_ptr<acc_t>(),
              gacc.mutable_data_ptr<acc_t>(), nullptr, nullptr, chunk, g0, a);
        }
      }
      channels_first_copy<acc_t, scalar_t>(gacc.const_data_ptr<acc_t>(),
                                           grad_planes.mutable_data_ptr<scalar_t>(), g0);
    });
    if (fused) return {grad_planes, grad_points.to(points.scalar_type())};
  }
  if (need_points_grad) {
    auto gp = at::zeros(points.sizes(), points.options().dtype(acc));
    if (work) {
      const auto planes = prefer_channels_last(planes_in, points.size(1))
                              ? channels_last_copy(planes_in) : planes_in;
      const Geometry g = geometry(planes, points);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, planes.scalar_type(),
                                      "triplane_sample_bwd_cpu_points", [&] {
        using acc_t = acc_type<scalar_t>;
        auto run = [&](auto kernel) {
          kernel(go.const_data_ptr<scalar_t>(), planes.const_data_ptr<scalar_t>(),
                 pts.const_data_ptr<acc_t>(), gp.mutable_data_ptr<acc_t>(), g, a);
        };
        if (g.sc == 1) run(points_grad_cpu_kernel<scalar_t, acc_t>);
        else run(points_grad_cpu_blocked<scalar_t, acc_t>);
      });
    }
    grad_points = gp.to(points.scalar_type());
  }
  return {grad_planes, grad_points};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyface, CPU, m) {
  m.impl("triplane_sample", &triplane_sample_cpu);
  m.impl("triplane_sample_bwd", &triplane_sample_bwd_cpu);
}

}  // namespace triplane
}  // namespace pyface
