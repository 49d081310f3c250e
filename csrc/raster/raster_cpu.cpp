// Rasterization ops: the C++ CPU kernels and TORCH_LIBRARY_IMPL(pyface, CPU) of the ops declared
// in raster.cpp (schemas and argument checks) and documented there.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/workspace.h"
#include "raster/raster.h"

namespace pyface {
namespace raster {

namespace {

// ---------------------------------------------------------------------------------------------
// Mesh rasterization: triangle setup per face (parallel), binning into 16 x 16 tiles (counting
// sort, faces in increasing index order), then one task per tile owns its pixels' z-buffer.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kTile = 16;

// Calls f(bin) for the bin of every tile that triangle tr covers, in row-major tile order; bins
// of its batch item start at base, tiles_x tiles per row.
template <typename F>
inline void for_tile_bins(const Triangle& tr, int64_t base, int64_t tiles_x, const F& f) {
  for (int64_t ty = tr.y0 / kTile; ty <= tr.y1 / kTile; ++ty)
    for (int64_t tx = tr.x0 / kTile; tx <= tr.x1 / kTile; ++tx) f(base + ty * tiles_x + tx);
}

template <typename scalar_t>
void raster_mesh_cpu_kernel(const double* verts, const int64_t* faces, int64_t B, int64_t V,
                            int64_t F, int64_t H, int64_t W, Cull cull, bool persp,
                            int64_t* face_index, scalar_t* bary_out, scalar_t* depth_out) {
  const int64_t tiles_x = (W + kTile - 1) / kTile, tiles_y = (H + kTile - 1) / kTile;
  const int64_t n_tiles = tiles_x * tiles_y;
  // one parallel region per phase for the whole batch (each region is a fork/join)
  HostBuffer<Triangle> tris(B * F);
  at::parallel_for(0, B * F, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      tris[t] = load_triangle(verts, faces, t / F, t % F, V, H, W, cull, persp);
    }
  });
  // counting sort of faces into (batch, tile) bins, faces in increasing index order
  HostBuffer<int64_t> tile_start(B * n_tiles + 1, 0);
  for (int64_t t = 0; t < B * F; ++t) {
    const Triangle& tr = tris[t];
    if (!tr.valid) continue;
    for_tile_bins(tr, (t / F) * n_tiles, tiles_x, [&](int64_t bin) { ++tile_start[bin + 1]; });
  }
  for (int64_t i = 0; i < B * n_tiles; ++i) tile_start[i + 1] += tile_start[i];
  HostBuffer<int32_t> tile_faces(tile_start[B * n_tiles]);
  {
    HostBuffer<int64_t> fill(B * n_tiles);
    std::copy(tile_start.begin(), tile_start.end() - 1, fill.begin());
    for (int64_t t = 0; t < B * F; ++t) {
      const Triangle& tr = tris[t];
      if (!tr.valid) continue;
      for_tile_bins(tr, (t / F) * n_tiles, tiles_x,
                    [&](int64_t bin) { tile_faces[fill[bin]++] = static_cast<int32_t>(t % F); });
    }
  }
  at::parallel_for(0, B * n_tiles, 1, [&](int64_t begin, int64_t end) {
    double zbuf[kTile * kTile];
    int64_t fbuf[kTile * kTile];
    double bbuf[kTile * kTile][3];
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / n_tiles, tile = bt % n_tiles;
      const int64_t ty = tile / tiles_x, tx = tile % tiles_x;
      const int64_t i0 = ty * kTile, j0 = tx * kTile;
      const int64_t i1 = std::min(H, i0 + kTile) - 1, j1 = std::min(W, j0 + kTile) - 1;
      for (int64_t k = 0; k < kTile * kTile; ++k) {
        zbuf[k] = std::numeric_limits<double>::infinity();
        fbuf[k] = -1;
        bbuf[k][0] = bbuf[k][1] = bbuf[k][2] = 0.0;
      }
      for (int64_t s = tile_start[bt]; s < tile_start[bt + 1]; ++s) {
        const int32_t f = tile_faces[s];
        const Triangle& t = tris[b * F + f];
        const int64_t ya = std::max<int64_t>(t.y0, i0), yb = std::min<int64_t>(t.y1, i1);
        const int64_t xa = std::max<int64_t>(t.x0, j0), xb = std::min<int64_t>(t.x1, j1);
        for (int64_t i = ya; i <= yb; ++i) {
          for (int64_t j = xa; j <= xb; ++j) {
            double d, bc[3];
            if (!cover(t, i, j, persp, d, bc)) continue;
            const int64_t k = (i - i0) * kTile + (j - j0);
            // faces arrive in increasing index order: strict < keeps the lowest on ties
            if (d < zbuf[k]) {
              zbuf[k] = d;
              fbuf[k] = f;
              bbuf[k][0] = bc[0];
              bbuf[k][1] = bc[1];
              bbuf[k][2] = bc[2];
            }
          }
        }
      }
      int64_t* fi_b = face_index + b * H * W;
      scalar_t* bary_b = bary_out + b * H * W * 3;
      scalar_t* depth_b = depth_out + b * H * W;
      for (int64_t i = i0; i <= i1; ++i) {
        for (int64_t j = j0; j <= j1; ++j) {
          const int64_t k = (i - i0) * kTile + (j - j0);
          const int64_t p = i * W + j;
          fi_b[p] = fbuf[k];
          depth_b[p] = static_cast<scalar_t>(zbuf[k]);
          for (int c = 0; c < 3; ++c) bary_b[p * 3 + c] = static_cast<scalar_t>(bbuf[k][c]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> raster_mesh_cpu(const at::Tensor& verts,
                                                               const at::Tensor& faces,
                                                               int64_t height, int64_t width,
                                                               c10::string_view cull,
                                                               bool perspective_correct) {
  check_mesh(verts, faces, height, width);
  check_cpu("verts_ndc", verts);
  const Cull c = parse_cull(std::string(cull));
  const int64_t B = verts.size(0), V = verts.size(1), F = faces.size(0);
  TORCH_CHECK_VALUE(F < (int64_t(1) << 31), "faces: at most 2^31 - 1 faces, got ", F);
  auto face_index = at::empty({B, height, width}, verts.options().dtype(at::kLong));
  auto bary = at::empty({B, height, width, 3}, verts.options());
  auto depth = at::empty({B, 1, height, width}, verts.options());
  if (B == 0) return {face_index, bary, depth};
  const auto v = verts.to(at::kDouble).contiguous();
  const auto f = faces.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, verts.scalar_type(), "raster_mesh_cpu",
                                  [&] {
    raster_mesh_cpu_kernel<scalar_t>(v.const_data_ptr<double>(), f.const_data_ptr<int64_t>(), B,
                                     V, F, height, width, c, perspective_correct,
                                     face_index.mutable_data_ptr<int64_t>(),
                                     bary.mutable_data_ptr<scalar_t>(),
                                     depth.mutable_data_ptr<scalar_t>());
  });
  return {face_index, bary, depth};
}

// ---------------------------------------------------------------------------------------------
// Attribute interpolation: attr_image[b, c, p] = sum_k bary[b, p, k] attributes[b, faces[fi, k], c]
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
void interp_fwd_kernel(const scalar_t* attr, const int64_t* faces, const int64_t* fi,
                       const scalar_t* bary, scalar_t* out, int64_t B, int64_t V, int64_t C,
                       int64_t P) {
  at::parallel_for(0, B * P, std::max<int64_t>(1, 2048 / std::max<int64_t>(1, C)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / P, p = i % P;
      const int64_t f = fi[i];
      scalar_t* o = out + b * C * P + p;
      if (f < 0) {
        for (int64_t c = 0; c < C; ++c) o[c * P] = scalar_t(0);
        continue;
      }
      const scalar_t* a[3];
      acc_t w[3];
      for (int k = 0; k < 3; ++k) {
        a[k] = attr + (b * V + faces[f * 3 + k]) * C;
        w[k] = static_cast<acc_t>(bary[i * 3 + k]);
      }
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = w[0] * static_cast<acc_t>(a[0][c]) + w[1] * static_cast<acc_t>(a[1][c]) +
                        w[2] * static_cast<acc_t>(a[2][c]);
        o[c * P] = static_cast<scalar_t>(v);
      }
    }
  });
}

// Runs f(b, c0, c1) in parallel over tasks that own disjoint (batch b, channels [c0, c1)) slices
// of a (B, ., C) gradient: no atomics, deterministic. The channel chunks are halved (down to 4
// channels) while there are fewer than 4 tasks per thread.
template <typename F>
void for_channel_tasks(int64_t B, int64_t C, const F& f) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunk = std::max<int64_t>(C, 1);
  while (chunk > 4 && B * ((C + chunk - 1) / chunk) < 4 * threads) chunk = (chunk + 1) / 2;
  const int64_t n_chunks = (C + chunk - 1) / chunk;
  at::parallel_for(0, B * n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_chunks;
      const int64_t c0 = (task % n_chunks) * chunk, c1 = std::min(C, c0 + chunk);
      f(b, c0, c1);
    }
  });
}

template <typename scalar_t, typename acc_t>
void interp_bwd_kernel(const scalar_t* grad, const int64_t* faces, const int64_t* fi,
                       const scalar_t* bary, acc_t* gattr, int64_t B, int64_t V, int64_t C,
                       int64_t P) {
  for_channel_tasks(B, C, [&](int64_t b, int64_t c0, int64_t c1) {
    for (int64_t p = 0; p < P; ++p) {
      const int64_t f = fi[b * P + p];
      if (f < 0) continue;
      for (int k = 0; k < 3; ++k) {
        const acc_t w = static_cast<acc_t>(bary[(b * P + p) * 3 + k]);
        acc_t* g = gattr + (b * V + faces[f * 3 + k]) * C;
        for (int64_t c = c0; c < c1; ++c)
          g[c] += w * static_cast<acc_t>(grad[(b * C + c) * P + p]);
      }
    }
  });
}

at::Tensor mesh_interpolate_cpu(const at::Tensor& attributes, const at::Tensor& faces,
                                const at::Tensor& face_index, const at::Tensor& bary) {
  check_interp(faces, face_index, bary);
  check_interp_attributes(attributes, face_index, check_cpu);
  check_interp_indices(faces, face_index, attributes.size(1));
  const int64_t B = face_index.size(0), H = face_index.size(1), W = face_index.size(2);
  const int64_t V = attributes.size(1), C = attributes.size(2), P = H * W;
  auto out = at::empty({B, C, H, W}, attributes.options());
  if (out.numel() == 0) return out;
  const auto a = attributes.contiguous();
  const auto f = faces.to(at::kLong).contiguous();
  const auto fi = face_index.contiguous();
  const auto bc = bary.to(attributes.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "mesh_interpolate",
                                  [&] {
    using acc_t = acc_type<scalar_t>;
    interp_fwd_kernel<scalar_t, acc_t>(a.const_data_ptr<scalar_t>(), f.const_data_ptr<int64_t>(),
                                       fi.const_data_ptr<int64_t>(), bc.const_data_ptr<scalar_t>(),
                                       out.mutable_data_ptr<scalar_t>(), B, V, C, P);
  });
  return out;
}

at::Tensor mesh_interpolate_bwd_cpu(const at::Tensor& grad, const at::Tensor& faces,
                                    const at::Tensor& face_index, const at::Tensor& bary,
                                    int64_t num_verts) {
  check_interp(faces, face_index, bary);
  check_interp_grad(grad, face_index, check_cpu);
  check_interp_indices(faces, face_index, num_verts);
  const int64_t B = face_index.size(0), H = face_index.size(1), W = face_index.size(2);
  const int64_t C = grad.size(1), P = H * W;
  const auto acc = acc_dtype(grad);
  auto gacc = at::zeros({B, num_verts, C}, grad.options().dtype(acc));
  if (gacc.numel() > 0 && P > 0) {
    const auto g = grad.contiguous();
    const auto f = faces.to(at::kLong).contiguous();
    const auto fi = face_index.contiguous();
    const auto bc = bary.to(grad.scalar_type()).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                    "mesh_interpolate_bwd", [&] {
      using acc_t = acc_type<scalar_t>;
      interp_bwd_kernel<scalar_t, acc_t>(g.const_data_ptr<scalar_t>(), f.const_data_ptr<int64_t>(),
                                         fi.const_data_ptr<int64_t>(),
                                         bc.const_data_ptr<scalar_t>(),
                                         gacc.mutable_data_ptr<acc_t>(), B, num_verts, C, P);
    });
  }
  return gacc.to(grad.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// Point splatting: each task owns a band of rows; points are binned by the rows they can cover.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void splat_cpu_kernel(const double* pts, int64_t B, int64_t N, int64_t H, int64_t W, double radius,
                      int64_t* index, scalar_t* depth_out) {
  const double r2 = radius * radius;
  const int64_t band = 8;
  const int64_t n_bands = (H + band - 1) / band;
  // counting sort of points into (batch, band) bins, in increasing index order
  HostBuffer<int64_t> start(B * n_bands + 1, 0);
  HostBuffer<int64_t> y0s(B * N), y1s(B * N);
  for (int64_t t = 0; t < B * N; ++t) {
    const double X = splat_coord(pts[t * 3], W), Y = splat_coord(pts[t * 3 + 1], H);
    const double Z = pts[t * 3 + 2];
    y0s[t] = 0;
    y1s[t] = -1;
    if (!std::isfinite(X) || !std::isfinite(Y) || !std::isfinite(Z)) continue;
    const double ya = std::ceil(Y - radius), yb = std::floor(Y + radius);
    const double xa = std::ceil(X - radius), xb = std::floor(X + radius);
    // no pixel centre within the radius (ya > yb or xa > xb), or entirely off the image
    if (ya > yb || xa > xb || yb < 0 || ya > H - 1 || xb < 0 || xa > W - 1) continue;
    y0s[t] = static_cast<int64_t>(std::max(ya, 0.0));
    y1s[t] = static_cast<int64_t>(std::min(yb, double(H - 1)));
    const int64_t base = (t / N) * n_bands;
    for (int64_t k = y0s[t] / band; k <= y1s[t] / band; ++k) ++start[base + k + 1];
  }
  for (int64_t k = 0; k < B * n_bands; ++k) start[k + 1] += start[k];
  HostBuffer<int32_t> items(start[B * n_bands]);
  {
    HostBuffer<int64_t> fill(B * n_bands);
    std::copy(start.begin(), start.end() - 1, fill.begin());
    for (int64_t t = 0; t < B * N; ++t) {
      if (y1s[t] < y0s[t]) continue;
      const int64_t base = (t / N) * n_bands;
      for (int64_t k = y0s[t] / band; k <= y1s[t] / band; ++k)
        items[fill[base + k]++] = static_cast<int32_t>(t % N);
    }
  }
  at::parallel_for(0, B * n_bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> zbuf(static_cast<size_t>(band * W));
    std::vector<int64_t> ibuf(static_cast<size_t>(band * W));
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / n_bands, k_band = bk % n_bands;
      const double* pb = pts + b * N * 3;
      const int64_t i0 = k_band * band, i1 = std::min(H, i0 + band) - 1;
      std::fill(zbuf.begin(), zbuf.end(), std::numeric_limits<double>::infinity());
      std::fill(ibuf.begin(), ibuf.end(), -1);
      for (int64_t s = start[bk]; s < start[bk + 1]; ++s) {
        const int64_t n = items[s];
        const double X = splat_coord(pb[n * 3], W), Y = splat_coord(pb[n * 3 + 1], H);
        const double Z = pb[n * 3 + 2];
        const int64_t ya = std::max(y0s[b * N + n], i0), yb = std::min(y1s[b * N + n], i1);
        const int64_t xa = static_cast<int64_t>(std::max(std::ceil(X - radius), 0.0));
        const int64_t xb = static_cast<int64_t>(std::min(std::floor(X + radius), double(W - 1)));
        for (int64_t i = ya; i <= yb; ++i) {
          const double dy = static_cast<double>(i) - Y;
          for (int64_t j = xa; j <= xb; ++j) {
            const double dx = static_cast<double>(j) - X;
            if (dx * dx + dy * dy > r2) continue;
            const int64_t k = (i - i0) * W + j;
            if (Z < zbuf[k]) {  // points in increasing index order: ties keep the lowest
              zbuf[k] = Z;
              ibuf[k] = n;
            }
          }
        }
      }
      int64_t* ib = index + b * H * W;
      scalar_t* db = depth_out + b * H * W;
      for (int64_t i = i0; i <= i1; ++i)
        for (int64_t j = 0; j < W; ++j) {
          const int64_t k = (i - i0) * W + j;
          ib[i * W + j] = ibuf[k];
          db[i * W + j] = static_cast<scalar_t>(zbuf[k]);
        }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> splat_points_index_cpu(const at::Tensor& points, int64_t height,
                                                          int64_t width, double radius) {
  check_splat(points, height, width, radius, check_cpu);
  const int64_t B = points.size(0), N = points.size(1);
  auto index = at::empty({B, height, width}, points.options().dtype(at::kLong));
  auto depth = at::empty({B, 1, height, width}, points.options());
  if (B == 0) return {index, depth};
  const auto p = points.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, points.scalar_type(), "splat_points",
                                  [&] {
    splat_cpu_kernel<scalar_t>(p.const_data_ptr<double>(), B, N, height, width, radius,
                               index.mutable_data_ptr<int64_t>(),
                               depth.mutable_data_ptr<scalar_t>());
  });
  return {index, depth};
}

// ---------------------------------------------------------------------------------------------
// Nearest point per texel: per (batch, plane) a uniform grid over the points (counting sort,
// about two points per cell, plus each column's envelope), then a search per texel that visits
// columns outward and skips the out-of-reach ones (raster_math.h). O(N + H W) memory.
// ---------------------------------------------------------------------------------------------
at::Tensor points_to_triplane_index_cpu(const at::Tensor& points,
                                        const c10::optional<at::Tensor>& valid, int64_t height,
                                        int64_t width, c10::string_view plane_axes,
                                        double box_size, bool align_corners, double max_distance) {
  const TriplaneIndexArgs args =
      check_points_to_triplane(points, valid, height, width, plane_axes, box_size, check_cpu);
  check_max_distance(max_distance);
  const PlaneAxes axes = args.axes;
  const at::Tensor& vmask = args.valid;
  const int64_t B = points.size(0), N = points.size(1), H = height, W = width;
  auto index = at::empty({B, 3, H, W}, points.options().dtype(at::kLong));
  if (B == 0) return index;
  const auto p = points.to(at::kDouble).contiguous();
  const double* pd = p.const_data_ptr<double>();
  const bool* vd = vmask.defined() ? vmask.const_data_ptr<bool>() : nullptr;
  const double scale = 2.0 / box_size;
  const double max_d2 = max_distance >= 0 ? max_distance * max_distance : -1.0;
  int64_t* out = index.mutable_data_ptr<int64_t>();
  // texel centre extents (the grid never needs to extend beyond them)
  const double tu0 = texel_centre(0, W, align_corners), tu1 = texel_centre(W - 1, W, align_corners);
  const double tv0 = texel_centre(0, H, align_corners), tv1 = texel_centre(H - 1, H, align_corners);
  // phase 1a, one task per (batch, plane): project the plane's points and size its grid
  struct PlaneGrid {
    Grid g;
    int64_t m = 0;          // points on the plane
    int64_t cells = 0;      // g.gx * g.gy (0 for an empty plane)
    int64_t cell_base = 0;  // offset of the plane's cell_start in the shared buffer
  };
  constexpr int64_t kMaxCells = 1024;  // per grid side
  const int64_t T = B * 3;
  std::vector<PlaneGrid> grids(static_cast<size_t>(T));  // T small records
  HostBuffer<double> puv(T * N * 2);                     // per task: u of every point, then v
  HostBuffer<int32_t> ids(T * N), cell_pts(T * N);       // per task: valid points, binned points
  HostBuffer<double> cols(T * kMaxCells * 2);            // per task: v envelope of each column
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      PlaneGrid& pg = grids[task];
      const int64_t b = task / 3;
      const int pl = static_cast<int>(task % 3);
      const int cu = axis_u(axes, pl), cv = axis_v(axes, pl);
      double* pu = puv.data() + task * N * 2;
      double* pv = pu + N;
      int32_t* id = ids.data() + task * N;
      int64_t M = 0;
      double lo_u = INFINITY, hi_u = -INFINITY, lo_v = INFINITY, hi_v = -INFINITY;
      for (int64_t n = 0; n < N; ++n) {
        pu[n] = pv[n] = 0.0;
        const double* q = pd + (b * N + n) * 3;
        const double u = q[cu] * scale, v = q[cv] * scale;
        if (!std::isfinite(u) || !std::isfinite(v)) continue;
        if (vd != nullptr && !vd[b * N + n]) continue;
        pu[n] = u;
        pv[n] = v;
        id[M++] = static_cast<int32_t>(n);
        lo_u = std::min(lo_u, u);
        hi_u = std::max(hi_u, u);
        lo_v = std::min(lo_v, v);
        hi_v = std::max(hi_v, v);
      }
      pg.m = M;
      if (M == 0) continue;
      // grid bounds: the points' bounding box clipped to the texel extents (points beyond fall
      // into the border cells, whose extents the search treats as unbounded)
      Grid& g = pg.g;
      const double gx_lo = std::max(lo_u, tu0), gx_hi = std::min(hi_u, tu1);
      const double gy_lo = std::max(lo_v, tv0), gy_hi = std::min(hi_v, tv1);
      const double ex = std::max(gx_hi - gx_lo, 0.0), ey = std::max(gy_hi - gy_lo, 0.0);
      const double tiny = 1e-6;
      const double cells = std::max<double>(1.0, static_cast<double>(M) / 2.0);
      double gxf, gyf;
      if (ex <= tiny && ey <= tiny) {
        gxf = gyf = 1;
      } else if (ex <= tiny) {
        gxf = 1;
        gyf = cells;
      } else if (ey <= tiny) {
        gxf = cells;
        gyf = 1;
      } else {
        gxf = std::sqrt(cells * ex / ey);
        gyf = cells / std::max(gxf, 1.0);
      }
      // never finer than the texel grid, never more than kMaxCells cells per side
      g.gx = static_cast<int32_t>(
          std::clamp(std::ceil(gxf), 1.0, std::min<double>(kMaxCells, W)));
      g.gy = static_cast<int32_t>(
          std::clamp(std::ceil(gyf), 1.0, std::min<double>(kMaxCells, H)));
      g.x0 = ex > tiny ? gx_lo : gx_lo - 0.5;
      g.y0 = ey > tiny ? gy_lo : gy_lo - 0.5;
      g.cw = (ex > tiny ? ex : 1.0) / g.gx;
      g.ch = (ey > tiny ? ey : 1.0) / g.gy;
      pg.cells = static_cast<int64_t>(g.gx) * g.gy;
    }
  });
  // the planes' cell_start arrays, one buffer (sizes known only now)
  int64_t total_cells = 0;
  for (PlaneGrid& pg : grids) {
    pg.cell_base = total_cells;
    total_cells += pg.cells + 1;
  }
  HostBuffer<int32_t> cell_start(total_cells, 0), cursor(total_cells);
  // phase 1b, one task per (batch, plane): counting sort of the points into the cells
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const PlaneGrid& pg = grids[task];
      if (pg.m == 0) continue;
      const Grid& g = pg.g;
      const double* pu = puv.data() + task * N * 2;
      const double* pv = pu + N;
      const int32_t* id = ids.data() + task * N;
      int32_t* cs = cell_start.data() + pg.cell_base;
      int32_t* cur = cursor.data() + pg.cell_base;
      double* col_lo = cols.data() + task * kMaxCells * 2;
      double* col_hi = col_lo + kMaxCells;
      std::fill(col_lo, col_lo + g.gx, INFINITY);
      std::fill(col_hi, col_hi + g.gx, -INFINITY);
      auto cell = [&](int32_t n, int32_t& col) {
        col = grid_cell(pu[n], g.x0, g.cw, g.gx);
        return grid_cell(pv[n], g.y0, g.ch, g.gy) * g.gx + col;
      };
      for (int64_t m = 0; m < pg.m; ++m) {
        const int32_t n = id[m];
        int32_t col;
        ++cs[cell(n, col) + 1];
        col_lo[col] = std::min(col_lo[col], pv[n]);
        col_hi[col] = std::max(col_hi[col], pv[n]);
      }
      for (int64_t c = 0; c < pg.cells; ++c) cs[c + 1] += cs[c];
      std::copy(cs, cs + pg.cells, cur);
      int32_t* pts = cell_pts.data() + task * N;
      for (int64_t m = 0; m < pg.m; ++m) {  // ascending ids within every cell
        int32_t col;
        const int32_t n = id[m];
        pts[cur[cell(n, col)]++] = n;
      }
    }
  });
  // phase 2, one task per texel row of every plane: nearest-point search
  at::parallel_for(0, T * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t task = row / H, i = row % H;
      const PlaneGrid& pg = grids[task];
      int64_t* o = out + row * W;
      if (pg.m == 0) {
        std::fill(o, o + W, int64_t(-1));
        continue;
      }
      const double* pu = puv.data() + task * N * 2;
      const double* pv = pu + N;
      const double* col_lo = cols.data() + task * kMaxCells * 2;
      const double qy = texel_centre(i, H, align_corners);
      for (int64_t j = 0; j < W; ++j) {
        double d2;
        o[j] = grid_nearest(pg.g, cell_start.data() + pg.cell_base, cell_pts.data() + task * N,
                            col_lo, col_lo + kMaxCells, pu, pv,
                            texel_centre(j, W, align_corners), qy, max_d2, d2);
      }
    }
  });
  return index;
}

constexpr int64_t kGatherBlock = 256;

// ---------------------------------------------------------------------------------------------
// Gather of point features through an index (-1: background) and its scatter-add backward.
// ---------------------------------------------------------------------------------------------
at::Tensor gather_features_cpu(const at::Tensor& features, const at::Tensor& index,
                               double background) {
  check_gather(features, index);
  check_cpu("features", features);
  const int64_t B = features.size(0), N = features.size(1), C = features.size(2);
  const int64_t G = index.size(1), P = index.size(2);
  auto out = at::empty({B, G, C, P}, features.options());
  if (out.numel() == 0) return out;
  const auto f = features.contiguous();
  const auto idx = index.contiguous();
  const int64_t* id = idx.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "gather_features",
                                  [&] {
    const scalar_t* fd = f.const_data_ptr<scalar_t>();
    scalar_t* od = out.mutable_data_ptr<scalar_t>();
    const scalar_t bg = static_cast<scalar_t>(background);
    at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bg_i = begin; bg_i < end; ++bg_i) {
        const int64_t b = bg_i / G;
        const int64_t* ib = id + bg_i * P;
        scalar_t* ob = od + bg_i * C * P;
        const scalar_t* fb = fd + b * N * C;
        // blocks of pixels: the block's feature rows stay in cache while the channel planes
        // are written contiguously
        for (int64_t p0 = 0; p0 < P; p0 += kGatherBlock) {
          const int64_t p1 = std::min(P, p0 + kGatherBlock);
          for (int64_t c = 0; c < C; ++c) {
            scalar_t* oc = ob + c * P;
            for (int64_t p = p0; p < p1; ++p) {
              const int64_t n = ib[p];
              oc[p] = (n < 0 || n >= N) ? bg : fb[n * C + c];
            }
          }
        }
      }
    });
  });
  return out;
}

at::Tensor gather_features_bwd_cpu(const at::Tensor& grad, const at::Tensor& index,
                                   int64_t num_points) {
  check_gather_grad(grad, index, check_cpu);
  check_count("num_points", num_points);
  const int64_t B = index.size(0), G = index.size(1), P = index.size(2), C = grad.size(2);
  const auto acc = acc_dtype(grad);
  auto gacc = at::zeros({B, num_points, C}, grad.options().dtype(acc));
  if (gacc.numel() > 0 && G * P > 0) {
    const auto g = grad.contiguous();
    const auto idx = index.contiguous();
    const int64_t* id = idx.const_data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                    "gather_features_bwd", [&] {
      using acc_t = acc_type<scalar_t>;
      const scalar_t* gd = g.const_data_ptr<scalar_t>();
      acc_t* od = gacc.mutable_data_ptr<acc_t>();
      for_channel_tasks(B, C, [&](int64_t b, int64_t c0, int64_t c1) {
        for (int64_t gi = 0; gi < G; ++gi) {
          const int64_t* ib = id + (b * G + gi) * P;
          const scalar_t* gb = gd + (b * G + gi) * C * P;
          acc_t* ob = od + b * num_points * C;
          for (int64_t p0 = 0; p0 < P; p0 += kGatherBlock) {
            const int64_t p1 = std::min(P, p0 + kGatherBlock);
            for (int64_t c = c0; c < c1; ++c) {
              const scalar_t* gc = gb + c * P;
              for (int64_t p = p0; p < p1; ++p) {
                const int64_t n = ib[p];
                if (n >= 0 && n < num_points) ob[n * C + c] += static_cast<acc_t>(gc[p]);
              }
            }
          }
        }
      });
    });
  }
  return gacc.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(pyface, CPU, m) {
  m.impl("raster_mesh", &raster_mesh_cpu);
  m.impl("mesh_interpolate", &mesh_interpolate_cpu);
  m.impl("mesh_interpolate_bwd", &mesh_interpolate_bwd_cpu);
  m.impl("splat_points_index", &splat_points_index_cpu);
  m.impl("points_to_triplane_index", &points_to_triplane_index_cpu);
  m.impl("gather_features", &gather_features_cpu);
  m.impl("gather_features_bwd", &gather_features_bwd_cpu);
}

}  // namespace raster
}  // namespace pyface
