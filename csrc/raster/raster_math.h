// Rasterization math shared by the C++ CPU and the CUDA kernels. Framework-free: no torch header.
//
// Screen conventions (see pyface/ops/reference/raster.py): NDC x, y in [-1, 1], y = -1 is the top
// edge; pixel (row i, column j) has its centre at pixel coordinates (X, Y) = (j + 0.5, i + 0.5)
// where X = (x + 1) W / 2 and Y = (y + 1) H / 2; z is depth, smaller is nearer.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"
#include "common/plane_axes.h"

namespace pyface {
namespace raster {

// Mesh vertices are snapped to 1/256 pixel so that edge functions are exact int64 values.
constexpr int kSubpixelBits = 8;
constexpr int64_t kSubpixel = int64_t(1) << kSubpixelBits;
constexpr int64_t kGuard = int64_t(1) << 29;  // |fixed coordinate| bound (2^21 pixels)

enum class Cull : int32_t { NONE = 0, CW = 1, CCW = 2 };

// NDC -> fixed-point pixel coordinate. Returns false if not finite or outside the guard band.
// Same operations, in the same order, as pyface.ops.reference.raster.snap_vertices.
PYFACE_HD bool snap(double ndc, int64_t size, int64_t& out) {
  const double p = (ndc + 1.0) * static_cast<double>(size) / 2.0;
  const double f = floor(p * static_cast<double>(kSubpixel) + 0.5);
  if (!(f >= -static_cast<double>(kGuard) && f <= static_cast<double>(kGuard))) {  // NaN -> false
    out = 0;
    return false;
  }
  out = static_cast<int64_t>(f);
  return true;
}

// Floor division for possibly negative numerators (positive denominators).
PYFACE_HD int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// A triangle ready for coverage tests, oriented so that its doubled area is positive.
struct Triangle {
  int64_t ax[3], ay[3];  // start of edge k (edge k runs from vertex k+1 to vertex k+2)
  int64_t dx[3], dy[3];  // oriented edge vectors
  int64_t area;          // doubled area, > 0
  double z[3];           // vertex depths
  int32_t x0, x1, y0, y1;  // pixel bounding box (inclusive); empty if x0 > x1 or y0 > y1
  bool top_left[3];
  bool valid;
};

// Sets up triangle (v0, v1, v2). vx/vy: fixed-point coordinates; ok: all three snapped; z depths.
PYFACE_HD Triangle setup_triangle(const int64_t vx[3], const int64_t vy[3], const double vz[3],
                                  bool ok, Cull cull, bool perspective_correct, int64_t H,
                                  int64_t W) {
  Triangle t;
  t.valid = ok;
  t.x0 = 0;
  t.x1 = -1;
  t.y0 = 0;
  t.y1 = -1;
  t.area = 0;
  for (int k = 0; k < 3; ++k) {
    t.z[k] = vz[k];
    if (!(vz[k] == vz[k]) || !(vz[k] - vz[k] == 0.0)) t.valid = false;  // NaN or inf
    if (perspective_correct && !(vz[k] > 0.0)) t.valid = false;
  }
  if (!t.valid) return t;
  for (int k = 0; k < 3; ++k) {
    const int a = (k + 1) % 3, b = (k + 2) % 3;
    t.ax[k] = vx[a];
    t.ay[k] = vy[a];
    t.dx[k] = vx[b] - vx[a];
    t.dy[k] = vy[b] - vy[a];
  }
  // doubled signed area = edge function of edge 2 (v0 -> v1) at v2
  const int64_t area = t.dx[2] * (vy[2] - t.ay[2]) - t.dy[2] * (vx[2] - t.ax[2]);
  // area > 0 <=> clockwise on the displayed image (x right, y down)
  if (area == 0 || (cull == Cull::CW && area > 0) || (cull == Cull::CCW && area < 0)) {
    t.valid = false;
    return t;
  }
  const int64_t sign = area < 0 ? -1 : 1;
  t.area = area * sign;
  for (int k = 0; k < 3; ++k) {
    t.dx[k] *= sign;
    t.dy[k] *= sign;
    t.top_left[k] = (t.dy[k] == 0 && t.dx[k] > 0) || t.dy[k] < 0;
  }
  int64_t mnx = vx[0], mxx = vx[0], mny = vy[0], mxy = vy[0];
  for (int k = 1; k < 3; ++k) {
    mnx = vx[k] < mnx ? vx[k] : mnx;
    mxx = vx[k] > mxx ? vx[k] : mxx;
    mny = vy[k] < mny ? vy[k] : mny;
    mxy = vy[k] > mxy ? vy[k] : mxy;
  }
  // pixels j whose centre j * S + S / 2 lies in [mnx, mxx]
  const int64_t half = kSubpixel / 2;
  int64_t jx0 = floor_div(mnx - half + kSubpixel - 1, kSubpixel);
  int64_t jx1 = floor_div(mxx - half, kSubpixel);
  int64_t jy0 = floor_div(mny - half + kSubpixel - 1, kSubpixel);
  int64_t jy1 = floor_div(mxy - half, kSubpixel);
  jx0 = jx0 < 0 ? 0 : jx0;
  jy0 = jy0 < 0 ? 0 : jy0;
  jx1 = jx1 > W - 1 ? W - 1 : jx1;
  jy1 = jy1 > H - 1 ? H - 1 : jy1;
  if (jx0 > jx1 || jy0 > jy1) {
    t.valid = false;
    return t;
  }
  t.x0 = static_cast<int32_t>(jx0);
  t.x1 = static_cast<int32_t>(jx1);
  t.y0 = static_cast<int32_t>(jy0);
  t.y1 = static_cast<int32_t>(jy1);
  return t;
}

// Snaps the vertices of face f of batch item b and sets up its triangle: verts (B, V, 3) NDC,
// faces (F, 3) with values in [0, V).
PYFACE_HD Triangle load_triangle(const double* verts, const int64_t* faces, int64_t b, int64_t f,
                                 int64_t V, int64_t H, int64_t W, Cull cull, bool persp) {
  int64_t vx[3], vy[3];
  double vz[3];
  bool ok = true;
  for (int k = 0; k < 3; ++k) {
    const double* v = verts + (b * V + faces[f * 3 + k]) * 3;
    ok &= snap(v[0], W, vx[k]);
    ok &= snap(v[1], H, vy[k]);
    vz[k] = v[2];
  }
  return setup_triangle(vx, vy, vz, ok, cull, persp, H, W);
}

// Coverage of pixel (row i, column j) by t; on success fills the depth and the (perspective-
// correct when asked) barycentrics.
PYFACE_HD bool cover(const Triangle& t, int64_t i, int64_t j, bool perspective_correct,
                     double& depth, double bary[3]) {
  const int64_t px = j * kSubpixel + kSubpixel / 2;
  const int64_t py = i * kSubpixel + kSubpixel / 2;
  int64_t w[3];
  for (int k = 0; k < 3; ++k) {
    w[k] = t.dx[k] * (py - t.ay[k]) - t.dy[k] * (px - t.ax[k]);
    if (w[k] < 0 || (w[k] == 0 && !t.top_left[k])) return false;
  }
  const double area = static_cast<double>(t.area);
  double b[3];
  for (int k = 0; k < 3; ++k) b[k] = static_cast<double>(w[k]) / area;
  if (perspective_correct) {
    double q[3];
    for (int k = 0; k < 3; ++k) q[k] = b[k] / t.z[k];
    const double inv = (q[0] + q[1]) + q[2];
    depth = 1.0 / inv;
    for (int k = 0; k < 3; ++k) bary[k] = q[k] / inv;
  } else {
    depth = (b[0] * t.z[0] + b[1] * t.z[1]) + b[2] * t.z[2];
    for (int k = 0; k < 3; ++k) bary[k] = b[k];
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Point splatting: pixel-centre coordinates (centre of column j at X = j).
// ---------------------------------------------------------------------------------------------
PYFACE_HD double splat_coord(double ndc, int64_t size) {
  return (ndc + 1.0) * static_cast<double>(size) / 2.0 - 0.5;
}

// Order-preserving map of a float to uint32 (for packed depth|index atomicMin on the GPU).
PYFACE_HD uint32_t float_key(float f) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(f);
#else
  __builtin_memcpy(&u, &f, sizeof(u));
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// ---------------------------------------------------------------------------------------------
// Nearest-point search on a uniform 2D grid.
// ---------------------------------------------------------------------------------------------
struct Grid {
  double x0, y0;    // lower corner
  double cw, ch;    // cell size (> 0)
  int32_t gx, gy;   // number of cells
};

PYFACE_HD int32_t grid_cell(double v, double lo, double size, int32_t n) {
  double c = floor((v - lo) / size);
  c = c < 0 ? 0 : (c > n - 1 ? n - 1 : c);
  return static_cast<int32_t>(c);
}

// Normalized coordinate of texel centre i of an axis of n texels (grid_sample's convention).
PYFACE_HD double texel_centre(int64_t i, int64_t n, bool align_corners) {
  if (align_corners) {
    return n > 1 ? static_cast<double>(i) * (2.0 / static_cast<double>(n - 1)) - 1.0 : 0.0;
  }
  return (2.0 * static_cast<double>(i) + 1.0) / static_cast<double>(n) - 1.0;
}

// Distance from v to the extent of cell k of an axis (the border cells extend to infinity:
// they also hold the points beyond the grid), less a slack for the rounding of the boundaries.
PYFACE_HD double cell_gap(double v, int32_t k, double lo, double size, int32_t n, double slack) {
  const double a = k == 0 ? -INFINITY : lo + k * size;
  const double b = k == n - 1 ? INFINITY : lo + (k + 1) * size;
  double d = a - v > v - b ? a - v : v - b;
  d -= slack;
  return d > 0 ? d : 0.0;
}

// Updates (best_d2, best) with the points of cell c; ties -> lowest index.
PYFACE_HD void scan_cell(int64_t c, const int32_t* cell_start, const int32_t* cell_pts,
                         const double* pu, const double* pv, double qx, double qy,
                         double& best_d2, int64_t& best) {
  for (int32_t s = cell_start[c]; s < cell_start[c + 1]; ++s) {
    const int32_t p = cell_pts[s];
    const double du = qx - pu[p], dv = qy - pv[p];
    const double d2 = du * du + dv * dv;
    if (d2 < best_d2 || (d2 == best_d2 && p < best)) {
      best_d2 = d2;
      best = p;
    }
  }
}

// Finds the nearest point to (qx, qy) on a grid of points binned by cell (row-major, gy rows of
// gx columns): points of cell c are cell_pts[cell_start[c] .. cell_start[c + 1]) in any order,
// coordinates pu/pv indexed by point id. col_lo/col_hi: min/max v of the points of each column
// (col_lo > col_hi for an empty column). Ties -> lowest index. max_d2 < 0: unbounded.
// Returns the point id or -1, and its squared distance in best_d2.
//
// Columns are visited outward from the query's column; a side stops once the column's
// x-distance exceeds the search radius (the best distance so far, or max_distance). A column is
// skipped when its envelope [col_lo, col_hi] is out of reach, else its rows are scanned outward
// from the query's row until out of reach. So a query far from the cloud costs a few envelope
// tests per column instead of a scan of every empty cell on the way.
PYFACE_HD int64_t grid_nearest(const Grid& g, const int32_t* cell_start, const int32_t* cell_pts,
                               const double* col_lo, const double* col_hi, const double* pu,
                               const double* pv, double qx, double qy, double max_d2,
                               double& best_d2) {
  const double slack_x = g.cw * 1e-9, slack_y = g.ch * 1e-9;
  const int32_t cx = grid_cell(qx, g.x0, g.cw, g.gx);
  int64_t best = -1;
  best_d2 = INFINITY;
  double lim = max_d2 >= 0 ? max_d2 : INFINITY;  // squared search radius (inclusive)
  bool open[2] = {true, true};                    // left, right
  for (int32_t k = 0; open[0] || open[1]; ++k) {
    for (int side = 0; side < 2; ++side) {
      if (!open[side] || (k == 0 && side == 1)) continue;
      const int32_t ix = side == 0 ? cx - k : cx + k;
      if (ix < 0 || ix >= g.gx) {
        open[side] = false;
        continue;
      }
      const double dx = cell_gap(qx, ix, g.x0, g.cw, g.gx, slack_x);
      const double dx2 = dx * dx;
      if (dx2 > lim) {  // farther columns on this side are farther still
        open[side] = false;
        continue;
      }
      const double lo = col_lo[ix], hi = col_hi[ix];
      if (lo > hi) continue;  // empty column
      double de = lo - qy > qy - hi ? lo - qy : qy - hi;
      de = de > 0 ? de : 0.0;
      if (dx2 + de * de > lim * (1.0 + 1e-12)) continue;
      // rows outward from the row of qy clamped to the column's envelope
      const double qc = qy < lo ? lo : (qy > hi ? hi : qy);
      const int32_t r0 = grid_cell(qc, g.y0, g.ch, g.gy);
      const int32_t rlo = grid_cell(lo, g.y0, g.ch, g.gy), rhi = grid_cell(hi, g.y0, g.ch, g.gy);
      bool rows_open[2] = {true, true};  // down, up
      for (int32_t m = 0; rows_open[0] || rows_open[1]; ++m) {
        for (int dir = 0; dir < 2; ++dir) {
          if (!rows_open[dir] || (m == 0 && dir == 1)) continue;
          const int32_t iy = dir == 0 ? r0 - m : r0 + m;
          if (iy < rlo || iy > rhi) {
            rows_open[dir] = false;
            continue;
          }
          const double dy = cell_gap(qy, iy, g.y0, g.ch, g.gy, slack_y);
          if (dx2 + dy * dy > lim) {  // rows move away from qy in this direction
            if (m > 0) rows_open[dir] = false;
            continue;
          }
          scan_cell(static_cast<int64_t>(iy) * g.gx + ix, cell_start, cell_pts, pu, pv, qx, qy,
                    best_d2, best);
          if (best_d2 < lim) lim = best_d2;
        }
      }
    }
  }
  if (best >= 0 && max_d2 >= 0 && best_d2 > max_d2) best = -1;
  return best;
}

}  // namespace raster
}  // namespace pyface
