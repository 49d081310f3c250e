// Tri-plane bilinear sampling: op schemas, argument checks, and the C++ CPU kernels.
//
// Ops (namespace pyface):
//   triplane_sample(planes, points, plane_axes, box_size, reduce, align_corners) -> out
//   triplane_sample_bwd(grad_out, planes, points, plane_axes, box_size, reduce, align_corners,
//                       need_planes_grad, need_points_grad) -> (grad_planes, grad_points)
// Autograd and fake (meta) kernels are registered from Python (pyface/_ops/triplane.py).

#include "triplane/triplane.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "triplane/triplane_math.h"

namespace pyface {
namespace triplane {

Args check_inputs(const at::Tensor& planes, const at::Tensor& points, const std::string& plane_axes,
                  double box_size, const std::string& reduce, bool align_corners) {
  PYFACE_CHECK_DIM("planes", planes, 5, "(B, 3, C, H, W)");
  PYFACE_CHECK_DIM("points", points, 3, "(B, N, 3)");
  PYFACE_CHECK_FLOAT("planes", planes);
  PYFACE_CHECK_FLOAT("points", points);
  TORCH_CHECK_VALUE(planes.size(1) == 3, "planes: expected shape (B, 3, C, H, W), got ",
                    shape_str(planes), " (dim 1 must be 3)");
  TORCH_CHECK_VALUE(points.size(2) == 3, "points: expected shape (B, N, 3), got ",
                    shape_str(points), " (dim 2 must be 3)");
  TORCH_CHECK_VALUE(planes.size(0) == points.size(0), "planes and points: batch sizes differ, ",
                    "planes ", shape_str(planes), " vs points ", shape_str(points));
  TORCH_CHECK_VALUE(planes.size(2) >= 1 && planes.size(3) >= 1 && planes.size(4) >= 1,
                    "planes: C, H and W must be >= 1, got ", shape_str(planes));
  PYFACE_CHECK_SAME_DEVICE("planes", planes, "points", points);
  TORCH_CHECK_VALUE(box_size > 0 && std::isfinite(box_size),
                    "box_size: expected a positive finite number, got ", box_size);
  return Args{parse_plane_axes(plane_axes), parse_reduce(reduce), 2.0 / box_size, align_corners};
}

std::vector<int64_t> output_shape(const at::Tensor& planes, const at::Tensor& points,
                                  Reduce reduce) {
  const int64_t B = planes.size(0), C = planes.size(2), N = points.size(1);
  if (reduce == Reduce::NONE) return {B, 3, N, C};
  return {B, N, C};
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& planes, const at::Tensor& points,
                    Reduce reduce) {
  const auto expected = output_shape(planes, points, reduce);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(expected), "grad_out: expected shape ",
                    at::IntArrayRef(expected), ", got ", shape_str(grad_out));
  PYFACE_CHECK_SAME_DEVICE("grad_out", grad_out, "planes", planes);
  PYFACE_CHECK_FLOAT("grad_out", grad_out);
}

at::ScalarType acc_dtype(const at::Tensor& planes) {
  return planes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

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

template <typename acc_t>
void plane_coords(const acc_t* p, const Args& a, int plane, acc_t& u, acc_t& v) {
  u = p[axis_u(a.axes, plane)] * static_cast<acc_t>(a.scale);
  v = p[axis_v(a.axes, plane)] * static_cast<acc_t>(a.scale);
}

template <typename scalar_t, typename acc_t>
void forward_cpu_kernel(const scalar_t* planes, const acc_t* points, scalar_t* out,
                        const Geometry& g, const Args& a) {
  const int64_t total = g.B * g.N;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.C));
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / g.N, n = i % g.N;
      const acc_t* p = points + i * 3;
      Taps<acc_t> taps[3];
      int64_t offs[3][4];
      for (int pl = 0; pl < 3; ++pl) {
        acc_t u, v;
        plane_coords(p, a, pl, u, v);
        taps[pl] = bilinear_taps(u, v, g.W, g.H, a.align_corners);
        const int64_t base = b * g.sb + pl * g.sp;
        for (int k = 0; k < 4; ++k) offs[pl][k] = base + tap_offset(taps[pl], k, g.sh, g.sw);
      }
      for (int64_t c = 0; c < g.C; ++c) {
        acc_t acc = 0;
        for (int pl = 0; pl < 3; ++pl) {
          const Taps<acc_t>& t = taps[pl];
          acc_t val = 0;
          for (int k = 0; k < 4; ++k) {
            if (t.valid[k]) val += static_cast<acc_t>(planes[offs[pl][k] + c * g.sc]) * t.w[k];
          }
          if (t.nan) val = std::numeric_limits<acc_t>::quiet_NaN();
          if (a.reduce == Reduce::NONE) {
            out[((b * 3 + pl) * g.N + n) * g.C + c] = static_cast<scalar_t>(val);
          } else {
            acc += val;
          }
        }
        if (a.reduce == Reduce::MEAN) acc = acc / acc_t(3);
        if (a.reduce != Reduce::NONE) out[i * g.C + c] = static_cast<scalar_t>(acc);
      }
    }
  });
}

// Gradient of the upstream cotangent for (b, plane, n, c), including the mean's 1/3.
template <typename scalar_t, typename acc_t>
acc_t grad_at(const scalar_t* grad_out, const Geometry& g, const Args& a, int64_t b, int pl,
              int64_t n, int64_t c) {
  if (a.reduce == Reduce::NONE) {
    return static_cast<acc_t>(grad_out[((b * 3 + pl) * g.N + n) * g.C + c]);
  }
  const acc_t go = static_cast<acc_t>(grad_out[(b * g.N + n) * g.C + c]);
  return a.reduce == Reduce::MEAN ? go / acc_t(3) : go;
}

// Gradient w.r.t. points: one independent task per point (no write conflicts).
template <typename scalar_t, typename acc_t>
void points_grad_cpu_kernel(const scalar_t* grad_out, const scalar_t* planes, const acc_t* points,
                            acc_t* grad_points, const Geometry& g, const Args& a) {
  const int64_t total = g.B * g.N;
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
        int64_t offs[4];
        const int64_t base = b * g.sb + pl * g.sp;
        for (int k = 0; k < 4; ++k) offs[k] = base + tap_offset(t, k, g.sh, g.sw);
        acc_t gx = 0, gy = 0;
        for (int64_t c = 0; c < g.C; ++c) {
          const acc_t go = grad_at<scalar_t, acc_t>(grad_out, g, a, b, pl, n, c);
          for (int k = 0; k < 4; ++k) {
            if (!t.valid[k]) continue;
            const acc_t val = static_cast<acc_t>(planes[offs[k] + c * g.sc]);
            gx += dwdx[k] * val * go;
            gy += dwdy[k] * val * go;
          }
        }
        if (t.nan) gx = gy = std::numeric_limits<acc_t>::quiet_NaN();
        const acc_t s = static_cast<acc_t>(a.scale);
        gp[axis_u(a.axes, pl)] += gx * unnormalize_scale<acc_t>(g.W, a.align_corners) * s;
        gp[axis_v(a.axes, pl)] += gy * unnormalize_scale<acc_t>(g.H, a.align_corners) * s;
      }
      for (int d = 0; d < 3; ++d) grad_points[i * 3 + d] = gp[d];
    }
  });
}

// Gradient w.r.t. planes: tasks own disjoint (batch, plane, channel-range) slices of the
// gradient, so the scatter needs no atomics and is deterministic. `grad` is contiguous
// (B, 3, C, H, W) in the accumulation type.
template <typename scalar_t, typename acc_t>
void planes_grad_cpu_kernel(const scalar_t* grad_out, const acc_t* points, acc_t* grad,
                            const Geometry& g, const Args& a) {
  const int64_t hw = g.H * g.W;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Enough tasks to keep every thread busy, channel chunks of at least 4.
  int64_t chunk = g.C;
  while (chunk > 4 && g.B * 3 * ((g.C + chunk - 1) / chunk) < 4 * threads) chunk = (chunk + 1) / 2;
  const int64_t n_chunks = (g.C + chunk - 1) / chunk;
  const int64_t tasks = g.B * 3 * n_chunks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (3 * n_chunks);
      const int pl = static_cast<int>((task / n_chunks) % 3);
      const int64_t c0 = (task % n_chunks) * chunk;
      const int64_t c1 = std::min(g.C, c0 + chunk);
      acc_t* gplane = grad + (b * 3 + pl) * g.C * hw;
      for (int64_t n = 0; n < g.N; ++n) {
        const acc_t* p = points + (b * g.N + n) * 3;
        acc_t u, v;
        plane_coords(p, a, pl, u, v);
        const Taps<acc_t> t = bilinear_taps(u, v, g.W, g.H, a.align_corners);
        if (t.nan) continue;
        for (int k = 0; k < 4; ++k) {
          if (!t.valid[k]) continue;
          const int64_t off = tap_offset(t, k, g.W, 1);
          const acc_t w = t.w[k];
          for (int64_t c = c0; c < c1; ++c) {
            gplane[c * hw + off] += w * grad_at<scalar_t, acc_t>(grad_out, g, a, b, pl, n, c);
          }
        }
      }
    }
  });
}

at::Tensor triplane_sample_cpu(const at::Tensor& planes, const at::Tensor& points,
                               c10::string_view plane_axes, double box_size,
                               c10::string_view reduce, bool align_corners) {
  const Args a = check_inputs(planes, points, std::string(plane_axes), box_size,
                              std::string(reduce), align_corners);
  TORCH_CHECK_VALUE(planes.device().is_cpu(), "planes: expected a CPU tensor, got ",
                    planes.device());
  const auto pts = points.to(acc_dtype(planes)).contiguous();
  auto out = at::empty(output_shape(planes, points, a.reduce), planes.options());
  if (out.numel() == 0) return out;
  const Geometry g = geometry(planes, points);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, planes.scalar_type(),
                                  "triplane_sample_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_cpu_kernel<scalar_t, acc_t>(planes.const_data_ptr<scalar_t>(),
                                        pts.const_data_ptr<acc_t>(),
                                        out.mutable_data_ptr<scalar_t>(), g, a);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> triplane_sample_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& planes, const at::Tensor& points,
    c10::string_view plane_axes, double box_size, c10::string_view reduce, bool align_corners,
    bool need_planes_grad, bool need_points_grad) {
  const Args a = check_inputs(planes, points, std::string(plane_axes), box_size,
                              std::string(reduce), align_corners);
  check_grad_out(grad_out, planes, points, a.reduce);
  TORCH_CHECK_VALUE(planes.device().is_cpu(), "planes: expected a CPU tensor, got ",
                    planes.device());
  const auto acc = acc_dtype(planes);
  const auto pts = points.to(acc).contiguous();
  const auto go = grad_out.to(planes.scalar_type()).contiguous();
  const Geometry g = geometry(planes, points);
  at::Tensor grad_planes = at::empty({0}, planes.options());
  at::Tensor grad_points = at::empty({0}, points.options());
  if (need_planes_grad) {
    auto gacc = at::zeros(planes.sizes(), planes.options().dtype(acc));
    if (grad_out.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, planes.scalar_type(),
                                      "triplane_sample_bwd_cpu_planes", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        planes_grad_cpu_kernel<scalar_t, acc_t>(go.const_data_ptr<scalar_t>(),
                                                pts.const_data_ptr<acc_t>(),
                                                gacc.mutable_data_ptr<acc_t>(), g, a);
      });
    }
    grad_planes = gacc.to(planes.scalar_type());
  }
  if (need_points_grad) {
    auto gp = at::zeros(points.sizes(), points.options().dtype(acc));
    if (grad_out.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, planes.scalar_type(),
                                      "triplane_sample_bwd_cpu_points", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        points_grad_cpu_kernel<scalar_t, acc_t>(go.const_data_ptr<scalar_t>(),
                                                planes.const_data_ptr<scalar_t>(),
                                                pts.const_data_ptr<acc_t>(),
                                                gp.mutable_data_ptr<acc_t>(), g, a);
      });
    }
    grad_points = gp.to(points.scalar_type());
  }
  return {grad_planes, grad_points};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyface, m) {
  m.def(
      "triplane_sample(Tensor planes, Tensor points, str plane_axes, float box_size, str reduce, "
      "bool align_corners) -> Tensor");
  m.def(
      "triplane_sample_bwd(Tensor grad_out, Tensor planes, Tensor points, str plane_axes, "
      "float box_size, str reduce, bool align_corners, bool need_planes_grad, "
      "bool need_points_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyface, CPU, m) {
  m.impl("triplane_sample", &triplane_sample_cpu);
  m.impl("triplane_sample_bwd", &triplane_sample_bwd_cpu);
}

}  // namespace triplane
}  // namespace pyface
