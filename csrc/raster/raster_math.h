// Rasterization math shared by the C++ CPU and the CUDA kernels. Framework-free: no torch header.
//
// Screen conventions (see pyface/ops/reference/raster.py): NDC x, y in [-1, 1], y = -1 is the top
// edge; pixel (row i, column j) has its centre at pixel coordinates (X, Y) = (j + 0.5, i + 0.5)
// where X = (x + 1) W / 2 and Y = (y + 1) H / 2; z is depth, smaller is nearer.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

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
  if (align_corners) return n > 1 ? static_cast<double>(i) * (2.0 / static_cast<double>(n - 1)) - 1.0 : 0.0;
  return (2.0 * static_cast<double>(i) + 1.0) / static_cast<double>(n) - 1.0;
}

// Finds the nearest point to (qx, qy). Points of cell c are cell_pts[cell_start[c] ..
// cell_start[c + 1]) (indices in increasing order), coordinates in px/py (indexed by point id).
// Ties -> lowest index. max_d2 < 0: unbounded. Returns the point id or -1.
PYFACE_HD int64_t grid_nearest(const Grid& g, const int32_t* cell_start, const int32_t* cell_pts,
                               const double* pu, const double* pv, double qx, double qy,
                               double max_d2, double& best_d2) {
  const int32_t cx = grid_cell(qx, g.x0, g.cw, g.gx);
  const int32_t cy = grid_cell(qy, g.y0, g.ch, g.gy);
  int64_t best = -1;
  best_d2 = INFINITY;
  const int32_t rmax = (g.gx > g.gy ? g.gx : g.gy);
  // slack guards the lower bound against rounding of the cell boundaries
  const double slack_x = g.cw * 1e-9, slack_y = g.ch * 1e-9;
  for (int32_t r = 0; r <= rmax; ++r) {
    const int32_t ix0 = cx - r, ix1 = cx + r, iy0 = cy - r, iy1 = cy + r;
    for (int32_t iy = (iy0 < 0 ? 0 : iy0); iy <= (iy1 > g.gy - 1 ? g.gy - 1 : iy1); ++iy) {
      const bool edge_row = (iy == iy0 || iy == iy1);
      const int32_t lo = ix0 < 0 ? 0 : ix0, hi = ix1 > g.gx - 1 ? g.gx - 1 : ix1;
      // on the block's first and last rows every cell; in between only columns ix0 and ix1
      const int32_t step = edge_row ? 1 : (ix1 - ix0);
      for (int32_t ix = edge_row ? lo : ix0; ix <= hi; ix += (step > 0 ? step : 1)) {
        if (ix < lo) continue;
        const int64_t c = static_cast<int64_t>(iy) * g.gx + ix;
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
    }
    // lower bound on the distance to any point in a cell outside the searched block: the
    // block's interior sides (sides on the grid boundary have no cells beyond them)
    double bound = INFINITY;
    if (ix0 > 0) {
      const double d = qx - (g.x0 + ix0 * g.cw) - slack_x;
      bound = d < bound ? d : bound;
    }
    if (ix1 < g.gx - 1) {
      const double d = (g.x0 + (ix1 + 1) * g.cw) - qx - slack_x;
      bound = d < bound ? d : bound;
    }
    if (iy0 > 0) {
      const double d = qy - (g.y0 + iy0 * g.ch) - slack_y;
      bound = d < bound ? d : bound;
    }
    if (iy1 < g.gy - 1) {
      const double d = (g.y0 + (iy1 + 1) * g.ch) - qy - slack_y;
      bound = d < bound ? d : bound;
    }
    if (bound == INFINITY) break;  // the block covers the whole grid
    if (bound > 0) {
      const double b2 = bound * bound;
      if (b2 > best_d2) break;
      if (max_d2 >= 0 && b2 > max_d2) break;
    }
  }
  if (best >= 0 && max_d2 >= 0 && best_d2 > max_d2) best = -1;
  return best;
}

}  // namespace raster
}  // namespace pyface
