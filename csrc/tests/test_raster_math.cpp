// Framework-free unit test of csrc/raster/raster_math.h (the math the CPU and CUDA kernels share).
// Built and run by ctest (CMakeLists.txt), or: g++ -std=c++17 -Icsrc csrc/tests/test_raster_math.cpp
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "tests/expect.h"
#include "raster/raster_math.h"

using pyface_test::near;
using namespace pyface::raster;

// NDC of a pixel coordinate (centre of pixel j at j + 0.5).
static double ndc(double px, int64_t size) { return 2.0 * px / static_cast<double>(size) - 1.0; }

static Triangle make(const double px[3][2], int64_t H, int64_t W, Cull cull = Cull::NONE) {
  int64_t vx[3], vy[3];
  double vz[3] = {1.0, 1.0, 1.0};
  bool ok = true;
  for (int k = 0; k < 3; ++k) {
    ok &= snap(ndc(px[k][0], W), W, vx[k]);
    ok &= snap(ndc(px[k][1], H), H, vy[k]);
  }
  return setup_triangle(vx, vy, vz, ok, cull, true, H, W);
}

static int coverage(const Triangle& t, int64_t i, int64_t j) {
  double d, b[3];
  return t.valid && i >= t.y0 && i <= t.y1 && j >= t.x0 && j <= t.x1 && cover(t, i, j, true, d, b);
}

static void test_random_quads_cover_once() {
  // random convex quads split on a diagonal whose ends lie on pixel centres: every pixel of the
  // quad is covered by exactly one of the two triangles
  std::mt19937 rng(0);
  std::uniform_int_distribution<int> pick(0, 30);
  const int64_t H = 32, W = 32;
  for (int trial = 0; trial < 200; ++trial) {
    const double a[2] = {pick(rng) + 0.5, pick(rng) + 0.5};
    const double c[2] = {pick(rng) + 0.5, pick(rng) + 0.5};
    std::uniform_real_distribution<double> u(0.0, 32.0);
    const double b[2] = {u(rng), u(rng)};
    const double d[2] = {u(rng), u(rng)};
    const double t1[3][2] = {{a[0], a[1]}, {b[0], b[1]}, {c[0], c[1]}};
    const double t2[3][2] = {{a[0], a[1]}, {c[0], c[1]}, {d[0], d[1]}};
    // b and d on opposite sides of the diagonal a-c: the triangles share only that edge
    const double cross_b = (c[0] - a[0]) * (b[1] - a[1]) - (c[1] - a[1]) * (b[0] - a[0]);
    const double cross_d = (c[0] - a[0]) * (d[1] - a[1]) - (c[1] - a[1]) * (d[0] - a[0]);
    if (!(cross_b * cross_d < 0)) continue;
    const Triangle x = make(t1, H, W), y = make(t2, H, W);
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) EXPECT(coverage(x, i, j) + coverage(y, i, j) <= 1);
    // pixel centres on the diagonal strictly between its ends: covered exactly once
    const int steps = 64;
    for (int s = 1; s < steps; ++s) {
      const double px = a[0] + (c[0] - a[0]) * s / steps, py = a[1] + (c[1] - a[1]) * s / steps;
      const double fx = px - 0.5, fy = py - 0.5;
      if (fx != std::floor(fx) || fy != std::floor(fy)) continue;  // not a pixel centre
      EXPECT(coverage(x, (int64_t)fy, (int64_t)fx) + coverage(y, (int64_t)fy, (int64_t)fx) == 1);
    }
  }
}

static void test_culling_and_degenerate() {
  const double cw[3][2] = {{1, 1}, {9, 1}, {1, 9}};   // clockwise on the displayed image
  const double ccw[3][2] = {{1, 1}, {1, 9}, {9, 1}};
  EXPECT(make(cw, 10, 10).valid && make(ccw, 10, 10).valid);
  EXPECT(!make(cw, 10, 10, Cull::CW).valid && make(cw, 10, 10, Cull::CCW).valid);
  EXPECT(!make(ccw, 10, 10, Cull::CCW).valid && make(ccw, 10, 10, Cull::CW).valid);
  const double line[3][2] = {{1, 1}, {5, 5}, {9, 9}};
  EXPECT(!make(line, 10, 10).valid);
  int64_t v;
  EXPECT(!snap(NAN, 10, v) && !snap(1e12, 10, v) && snap(0.0, 10, v) && v == 5 * kSubpixel);
}

static void test_grid_nearest_vs_brute_force() {
  std::mt19937 rng(1);
  std::normal_distribution<double> n01(0.0, 1.0);
  const int N = 500;
  std::vector<double> pu(N), pv(N);
  for (int i = 0; i < N; ++i) {  // clustered, partly outside [-1, 1]
    const int c = i % 5;
    pu[i] = 0.4 * (c - 2) + 0.05 * n01(rng);
    pv[i] = 0.3 * (c % 3 - 1) + 0.05 * n01(rng) + (i % 50 == 0 ? 3.0 : 0.0);
  }
  Grid g;
  g.gx = 13;
  g.gy = 9;
  g.x0 = -1.0;
  g.y0 = -1.0;
  g.cw = 2.0 / g.gx;
  g.ch = 2.0 / g.gy;
  std::vector<int32_t> start(g.gx * g.gy + 1, 0), pts(N);
  auto cell = [&](int i) {
    return grid_cell(pv[i], g.y0, g.ch, g.gy) * g.gx + grid_cell(pu[i], g.x0, g.cw, g.gx);
  };
  for (int i = 0; i < N; ++i) ++start[cell(i) + 1];
  for (int c = 0; c < g.gx * g.gy; ++c) start[c + 1] += start[c];
  std::vector<int32_t> fill(start.begin(), start.end() - 1);
  for (int i = N - 1; i >= 0; --i)  // reverse order inside cells: ties must still pick the lowest
    pts[fill[cell(i)]++] = i;
  std::vector<double> col_lo(g.gx, INFINITY), col_hi(g.gx, -INFINITY);
  for (int i = 0; i < N; ++i) {
    const int32_t col = grid_cell(pu[i], g.x0, g.cw, g.gx);
    col_lo[col] = std::min(col_lo[col], pv[i]);
    col_hi[col] = std::max(col_hi[col], pv[i]);
  }
  for (int q = 0; q < 400; ++q) {
    const double qx = -1.5 + 3.0 * (q % 20) / 19.0, qy = -1.5 + 3.0 * (q / 20) / 19.0;
    double best = INFINITY;
    int64_t arg = -1;
    for (int i = 0; i < N; ++i) {
      const double d = (qx - pu[i]) * (qx - pu[i]) + (qy - pv[i]) * (qy - pv[i]);
      if (d < best) {
        best = d;
        arg = i;
      }
    }
    double d2;
    EXPECT(grid_nearest(g, start.data(), pts.data(), col_lo.data(), col_hi.data(), pu.data(),
                        pv.data(), qx, qy, -1.0, d2) == arg);
    const int64_t bounded = grid_nearest(g, start.data(), pts.data(), col_lo.data(),
                                         col_hi.data(), pu.data(), pv.data(), qx, qy, 0.01, d2);
    EXPECT(bounded == (best <= 0.01 ? arg : -1));
  }
}

int main() {
  test_random_quads_cover_once();
  test_culling_and_degenerate();
  test_grid_nearest_vs_brute_force();
  return pyface_test::finish("test_raster_math");
}
