// Volume-rendering math shared by the CPU and CUDA kernels: EG3D's MipRayMarcher2 compositing
// (forward and a backward that recomputes instead of storing) and EG3D's importance sampling.
// Framework-free: no torch header. One call handles one ray; every buffer is that ray's slice.
//
// Notation for a ray with n samples (n - 1 intervals i):
//   s_i = (raw_i + raw_{i+1}) / 2, sigma_i = softplus(s_i + bias), delta_i = t_{i+1} - t_i,
//   x_i = sigma_i * delta_i, alpha_i = 1 - exp(-x_i), p_i = (1 - alpha_i) + 1e-10,
//   T_0 = 1, T_{i+1} = T_i * p_i, w_i = alpha_i * T_i,
//   out = sum_i w_i * (f_i + f_{i+1}) / 2 (+ 1 - W with a white background), W = sum_i w_i,
//   depth = clamp(nan_to_num(sum_i w_i * (t_i + t_{i+1}) / 2 / W, inf), dmin, dmax).
// Backward: with G_i = dL/dw_i (through out, depth and the weights output) and the running sum
// P_i = sum_{j<=i} G_j w_j, the suffix S_i = sum_{j>i} G_j w_j = P_total - P_i gives
//   dL/dx_i = exp(-x_i) * (G_i * T_i - S_i / p_i)
// in one forward-order pass, so no cumulative product is ever stored.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/macros.h"

namespace pyface {
namespace render {

constexpr double kTransmittanceEps = 1e-10;
constexpr double kPdfEps = 1e-5;
constexpr double kSmoothOffset = 0.01;

// exp / log1p in the argument's precision on host and device (expf for float, exp for double).
PYFACE_HD float exp_(float x) { return ::expf(x); }
PYFACE_HD double exp_(double x) { return ::exp(x); }
PYFACE_HD float log1p_(float x) { return ::log1pf(x); }
PYFACE_HD double log1p_(double x) { return ::log1p(x); }

// torch.nn.functional.softplus (beta 1, threshold 20) and its derivative.
template <typename A>
PYFACE_HD A softplus(A x) {
  return x > A(20) ? x : log1p_(exp_(x));
}
template <typename A>
PYFACE_HD A softplus_grad(A x) {
  if (x > A(20)) return A(1);
  const A z = exp_(x);
  return z / (z + A(1));
}

template <typename A>
struct Interval {
  A delta, x, e, alpha, p, dmid;
  A sg;  // softplus'(s) = sigmoid(s)
};

// The per-interval terms are computed in the input precision S, exactly as the reference does
// them elementwise (and fast: float transcendentals for float inputs); the running products and
// sums over the ray accumulate in A.
template <typename S, typename A>
PYFACE_HD Interval<A> interval(const S* dens, const S* dep, int64_t i, A bias) {
  Interval<A> r;
  const S t0 = dep[i], t1 = dep[i + 1];
  const S delta = t1 - t0;
  const S s = (dens[i] + dens[i + 1]) / S(2) + static_cast<S>(bias);
  // softplus and its derivative from one exp (torch's threshold 20)
  const S z = s > S(20) ? S(0) : exp_(s);
  const S x = (s > S(20) ? s : log1p_(z)) * delta;
  const S e = exp_(-x);
  const S alpha = S(1) - e;
  r.delta = static_cast<A>(delta);
  r.dmid = static_cast<A>((t0 + t1) / S(2));
  r.sg = s > S(20) ? A(1) : static_cast<A>(z / (z + S(1)));
  r.x = static_cast<A>(x);
  r.e = static_cast<A>(e);
  r.alpha = static_cast<A>(alpha);
  r.p = static_cast<A>((S(1) - alpha) + static_cast<S>(kTransmittanceEps));
  return r;
}

// Composited depth before the clamp; NaN (zero total weight) maps to +inf like nan_to_num.
template <typename A>
PYFACE_HD A raw_depth(A wd, A w) {
  return wd / w;
}

template <typename S, typename A>
PYFACE_HD A clamp_depth(A d, A dmin, A dmax) {
  if (d != d) d = A(INFINITY);
  // nan_to_num maps +-inf to the largest finite value of the output dtype
  const A big = static_cast<A>(std::numeric_limits<S>::max());
  if (d > big) d = big;
  if (d < -big) d = -big;
  return d < dmin ? dmin : (d > dmax ? dmax : d);
}

// Forward for one ray. feat: (n, C) row-major; dens, dep: (n,); out: (C,); out_w: (n - 1,).
// `acc`: optional scratch of C values; when given the features are read sample by sample
// (contiguous, vectorisable) instead of channel by channel.
template <typename S, typename A>
PYFACE_HD void composite_forward_ray(const S* feat, const S* dens, const S* dep, int64_t n,
                                     int64_t C, A bias, bool white_back, A dmin, A dmax, S* out,
                                     S* out_depth, S* out_w, A* acc = nullptr) {
  A T = A(1), W = A(0), WD = A(0);
  for (int64_t i = 0; i + 1 < n; ++i) {
    const Interval<A> v = interval<S, A>(dens, dep, i, bias);
    const A w = v.alpha * T;
    out_w[i] = static_cast<S>(w);
    W += w;
    WD += w * v.dmid;
    T *= v.p;
  }
  *out_depth = static_cast<S>(clamp_depth<S, A>(raw_depth(WD, W), dmin, dmax));
  if (acc) {
    for (int64_t c = 0; c < C; ++c) acc[c] = A(0);
    for (int64_t i = 0; i + 1 < n; ++i) {
      const A w = static_cast<A>(out_w[i]);
      const S* f0 = feat + i * C;
      const S* f1 = f0 + C;
      for (int64_t c = 0; c < C; ++c) {
        acc[c] += w * ((static_cast<A>(f0[c]) + static_cast<A>(f1[c])) / A(2));
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      out[c] = static_cast<S>(white_back ? acc[c] + A(1) - W : acc[c]);
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    A acc = A(0);
    for (int64_t i = 0; i + 1 < n; ++i) {
      const A fm = (static_cast<A>(feat[i * C + c]) + static_cast<A>(feat[(i + 1) * C + c])) / A(2);
      acc += static_cast<A>(out_w[i]) * fm;
    }
    if (white_back) acc = acc + A(1) - W;
    out[c] = static_cast<S>(acc);
  }
}

// g_feat . (f_i + f_{i+1}) / 2
template <typename S, typename A>
PYFACE_HD A dot_mid(const S* feat, const S* g_out, int64_t i, int64_t C) {
  A acc = A(0);
  for (int64_t c = 0; c < C; ++c) {
    acc += static_cast<A>(g_out[c]) *
           ((static_cast<A>(feat[i * C + c]) + static_cast<A>(feat[(i + 1) * C + c])) / A(2));
  }
  return acc;
}

// Backward for one ray. g_out: (C,), g_depth: scalar, g_w: (n - 1,). Writes g_feat (n, C) and
// g_dens (n,) when the pointers are non-null; every element of the ray's slice is written.
// `dots`: optional scratch of n values; when given, g_out . f_j is computed once per sample
// instead of twice per interval (the CPU kernels pass a per-thread buffer).
template <typename S, typename A>
// `ivs`: optional scratch of n - 1 intervals; when given, the second pass reads the interval
// terms of the first instead of recomputing their exponentials.
PYFACE_HD void composite_backward_ray(const S* g_out, A g_depth, const S* g_w, const S* feat,
                                      const S* dens, const S* dep, int64_t n, int64_t C, A bias,
                                      bool white_back, A dmin, A dmax, S* g_feat, S* g_dens,
                                      A* dots = nullptr, Interval<A>* ivs = nullptr) {
  if (dots) {
    for (int64_t j = 0; j < n; ++j) {
      A acc = A(0);
      for (int64_t c = 0; c < C; ++c) {
        acc += static_cast<A>(g_out[c]) * static_cast<A>(feat[j * C + c]);
      }
      dots[j] = acc;
    }
  }
  auto dmid_dot = [&](int64_t i) -> A {
    return dots ? (dots[i] + dots[i + 1]) / A(2) : dot_mid<S, A>(feat, g_out, i, C);
  };
  // Pass 1: totals (recomputed, not stored by the forward).
  A T = A(1), W = A(0), WD = A(0), GW = A(0);
  for (int64_t i = 0; i + 1 < n; ++i) {
    const Interval<A> v = interval<S, A>(dens, dep, i, bias);
    if (ivs) ivs[i] = v;
    const A w = v.alpha * T;
    W += w;
    WD += w * v.dmid;
    GW += w * (dmid_dot(i) + static_cast<A>(g_w[i]));
    T *= v.p;
  }
  const A d = raw_depth(WD, W);
  // The clamp (and nan_to_num) pass the gradient only where the depth is finite and in range.
  const bool depth_ok = (d == d) && d >= dmin && d <= dmax && W != A(0);
  const A gd = depth_ok ? g_depth / W : A(0);
  // without a usable depth (zero total weight: d = 0/0) the depth terms must vanish, not turn
  // into 0 * NaN
  const A dd = depth_ok ? d : A(0);
  A wb = A(0);
  if (white_back) {
    for (int64_t c = 0; c < C; ++c) wb += static_cast<A>(g_out[c]);
  }
  // sum_i w_i * gd * (dmid_i - d) == gd * (WD - d * W) and sum_i w_i * wb == wb * W.
  const A total = GW + gd * (WD - dd * W) - wb * W;
  // Pass 2: forward order with the running sum.
  T = A(1);
  A prefix = A(0), w_prev = A(0), gs_prev = A(0);
  for (int64_t i = 0; i + 1 < n; ++i) {
    const Interval<A> v = ivs ? ivs[i] : interval<S, A>(dens, dep, i, bias);
    const A w = v.alpha * T;
    const A G = dmid_dot(i) + static_cast<A>(g_w[i]) + gd * (v.dmid - dd) - wb;
    prefix += G * w;
    const A suffix = total - prefix;
    const A gx = v.e * (G * T - suffix / v.p);
    const A gs = gx * v.delta * v.sg;
    if (g_dens) g_dens[i] = static_cast<S>((gs_prev + gs) / A(2));
    if (g_feat) {
      const A wm = (w_prev + w) / A(2);
      for (int64_t c = 0; c < C; ++c) {
        g_feat[i * C + c] = static_cast<S>(wm * static_cast<A>(g_out[c]));
      }
    }
    gs_prev = gs;
    w_prev = w;
    T *= v.p;
  }
  if (n >= 1) {
    if (g_dens) g_dens[n - 1] = static_cast<S>(gs_prev / A(2));
    if (g_feat) {
      const A wm = w_prev / A(2);
      for (int64_t c = 0; c < C; ++c) {
        g_feat[(n - 1) * C + c] = static_cast<S>(wm * static_cast<A>(g_out[c]));
      }
    }
  }
}

// EG3D's sample_importance for one ray: dep (n,), w (n - 1,), u (m,) -> out (m,).
// cdf: scratch of at least max(n - 2, 1) values.
template <typename S, typename A>
PYFACE_HD void importance_ray(const S* dep, const S* w, const S* u, int64_t n, int64_t m, S* out,
                              S* cdf) {
  const int64_t nw = n - 1;                          // coarse weights
  const int64_t nb = nw >= 2 ? nw - 2 : 0;           // weights[1:-1] after smoothing
  // smoothed_j = (max(w_{j-1}, w_j) + max(w_j, w_{j+1})) / 2 + 0.01 (max_pool pads with -inf)
  auto mp = [&](int64_t j) -> S {  // max_pool1d(k=2, s=1, pad=1) output j, j in [0, nw]
    if (j == 0) return w[0];
    if (j == nw) return w[nw - 1];
    return w[j - 1] > w[j] ? w[j - 1] : w[j];
  };
  auto smoothed = [&](int64_t j) -> S {  // + 0.01, then + eps of sample_pdf
    const S a = static_cast<S>((mp(j) + mp(j + 1)) / S(2));
    const S b = static_cast<S>(a + static_cast<S>(kSmoothOffset));
    return static_cast<S>(b + static_cast<S>(kPdfEps));
  };
  // cdf[k + 1] holds bin k's weight first, then the cumulative sum of the pdf.
  A total = A(0);
  for (int64_t k = 0; k < nb; ++k) {
    cdf[k + 1] = smoothed(k + 1);
    total += static_cast<A>(cdf[k + 1]);
  }
  const S tot = static_cast<S>(total);
  cdf[0] = S(0);
  A run = A(0);
  for (int64_t k = 0; k < nb; ++k) {
    run += static_cast<A>(static_cast<S>(cdf[k + 1] / tot));
    cdf[k + 1] = static_cast<S>(run);
  }
  for (int64_t q = 0; q < m; ++q) {
    const S uq = u[q];
    // searchsorted(cdf, u, right=True): first index with cdf[idx] > u, branch-free (the
    // uniforms are unordered, so a branching search mispredicts about every other step)
    int64_t base = 0, len = nb + 1;
    while (len > 1) {
      const int64_t half = len / 2;
      base = cdf[base + half] <= uq ? base + half : base;
      len -= half;
    }
    const int64_t lo = base + (cdf[base] <= uq ? 1 : 0);
    const int64_t below = lo - 1 > 0 ? lo - 1 : 0;
    const int64_t above = lo < nb ? lo : nb;
    const S c0 = cdf[below], c1 = cdf[above];
    const S b0 = static_cast<S>(S(0.5) * (dep[below] + dep[below + 1]));
    const S b1 = static_cast<S>(S(0.5) * (dep[above] + dep[above + 1]));
    S denom = c1 - c0;
    if (denom < static_cast<S>(kPdfEps)) denom = S(1);
    out[q] = b0 + (uq - c0) / denom * (b1 - b0);
  }
}

}  // namespace render
}  // namespace pyface
