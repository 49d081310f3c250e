// Unit tests of the volume-rendering math shared by the CPU and CUDA kernels: the compositing
// backward against central finite differences of the forward, and importance-sampling invariants.
#include <cmath>
#include <cstdio>
#include <vector>

#include "tests/expect.h"
#include "render/render_math.h"

using pyface_test::near;
using namespace pyface::render;

namespace {

struct Ray {
  int n, C;
  std::vector<double> f, s, t;
};

// L = g_out . out + g_depth * depth + g_w . weights
double loss(const Ray& r, const std::vector<double>& g_out, double g_depth,
            const std::vector<double>& g_w, bool wb, double dmin, double dmax) {
  std::vector<double> out(r.C), w(r.n - 1);
  double depth;
  composite_forward_ray<double, double>(r.f.data(), r.s.data(), r.t.data(), r.n, r.C, -1.0, wb,
                                        dmin, dmax, out.data(), &depth, w.data());
  double l = g_depth * depth;
  for (int c = 0; c < r.C; ++c) l += g_out[c] * out[c];
  for (int i = 0; i + 1 < r.n; ++i) l += g_w[i] * w[i];
  return l;
}

}  // namespace

int main() {
  unsigned seed = 12345;
  auto rnd = [&]() {  // uniform [0, 1)
    seed = seed * 1664525u + 1013904223u;
    return (seed >> 8) / double(1u << 24);
  };
  for (int trial = 0; trial < 6; ++trial) {
    Ray r{2 + trial * 3, 1 + trial % 3, {}, {}, {}};
    const bool wb = trial % 2 == 1;
    double t = 2.0;
    for (int j = 0; j < r.n; ++j) {
      t += 0.01 + 0.1 * rnd();
      r.t.push_back(t);
      r.s.push_back(6.0 * rnd() - 2.0);
      for (int c = 0; c < r.C; ++c) r.f.push_back(rnd());
    }
    std::vector<double> g_out(r.C), g_w(r.n - 1);
    for (auto& g : g_out) g = rnd() - 0.5;
    for (auto& g : g_w) g = rnd() - 0.5;
    const double g_depth = rnd() - 0.5, dmin = 0.0, dmax = 100.0;
    std::vector<double> gf(r.n * r.C), gs(r.n);
    composite_backward_ray<double, double>(g_out.data(), g_depth, g_w.data(), r.f.data(),
                                           r.s.data(), r.t.data(), r.n, r.C, -1.0, wb, dmin,
                                           dmax, gf.data(), gs.data());
    const double h = 1e-6;
    for (int j = 0; j < r.n; ++j) {
      Ray p = r, m = r;
      p.s[j] += h;
      m.s[j] -= h;
      const double fd = (loss(p, g_out, g_depth, g_w, wb, dmin, dmax) -
                         loss(m, g_out, g_depth, g_w, wb, dmin, dmax)) / (2 * h);
      EXPECT(near(gs[j], fd, 1e-6));
      for (int c = 0; c < r.C; ++c) {
        Ray pf = r, mf = r;
        pf.f[j * r.C + c] += h;
        mf.f[j * r.C + c] -= h;
        const double fdf = (loss(pf, g_out, g_depth, g_w, wb, dmin, dmax) -
                            loss(mf, g_out, g_depth, g_w, wb, dmin, dmax)) / (2 * h);
        EXPECT(near(gf[j * r.C + c], fdf, 1e-6));
      }
    }
    // the scratch paths (per-sample dots, cached intervals) give the same gradients
    std::vector<double> gf2(r.n * r.C), gs2(r.n), dots(r.n);
    std::vector<Interval<double>> ivs(r.n - 1);
    composite_backward_ray<double, double>(g_out.data(), g_depth, g_w.data(), r.f.data(),
                                           r.s.data(), r.t.data(), r.n, r.C, -1.0, wb, dmin,
                                           dmax, gf2.data(), gs2.data(), dots.data(),
                                           ivs.data());
    for (int j = 0; j < r.n; ++j) EXPECT(near(gs[j], gs2[j], 1e-12));
    for (int j = 0; j < r.n * r.C; ++j) EXPECT(near(gf[j], gf2[j], 1e-12));
  }

  // importance sampling: samples lie within the midpoints, are monotone in u, and u = 0 gives
  // the first midpoint
  {
    const int n = 10, m = 33;
    std::vector<double> t(n), w(n - 1), u(m), out(m), cdf(n);
    for (int j = 0; j < n; ++j) t[j] = 2.0 + 0.1 * j + 0.03 * rnd();
    for (auto& x : w) x = rnd();
    for (int q = 0; q < m; ++q) u[q] = q / double(m);
    importance_ray<double, double>(t.data(), w.data(), u.data(), n, m, out.data(), cdf.data());
    EXPECT(near(out[0], 0.5 * (t[0] + t[1]), 1e-12));
    for (int q = 0; q < m; ++q) {
      EXPECT(out[q] >= 0.5 * (t[0] + t[1]) - 1e-12 && out[q] <= 0.5 * (t[n - 2] + t[n - 1]));
      if (q) EXPECT(out[q] >= out[q - 1]);
    }
  }
  return pyface_test::finish("test_render_math");
}
