// Torch glue of the CUDA rasterization kernels: argument checks (shared with the CPU entry
// points, raster.h), dtype mapping, buffer allocation, current stream, TORCH_LIBRARY_IMPL(CUDA).
// Built only against a CUDA torch (setup.py); the kernels live in raster_kernels.cu.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common/cuda_glue.h"
#include "raster/raster.h"
#include "raster/raster_kernels.h"

namespace pyface {
namespace raster {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> raster_mesh_cuda(const at::Tensor& verts,
                                                                const at::Tensor& faces,
                                                                int64_t height, int64_t width,
                                                                c10::string_view cull,
                                                                bool perspective_correct) {
  check_mesh(verts, faces, height, width);  // includes the face-range check (one sync)
  check_cuda("verts_ndc", verts);
  const Cull c = parse_cull(std::string(cull));
  const c10::cuda::CUDAGuard guard(verts.device());
  const int64_t B = verts.size(0), V = verts.size(1), F = faces.size(0);
  TORCH_CHECK_VALUE(F < (int64_t(1) << 31), "faces: at most 2^31 - 1 faces, got ", F);
  auto face_index = at::empty({B, height, width}, verts.options().dtype(at::kLong));
  auto bary = at::empty({B, height, width, 3}, verts.options());
  auto depth = at::empty({B, 1, height, width}, verts.options());
  if (B == 0) return {face_index, bary, depth};
  const auto v = verts.to(at::kDouble).contiguous();
  const auto f = faces.to(at::kLong).contiguous();
  auto zbuf = at::empty({B * height * width}, verts.options().dtype(at::kLong));
  C10_CUDA_CHECK(cuda::raster_mesh(v.const_data_ptr<double>(), f.const_data_ptr<int64_t>(), B, V, F,
                                   height, width, c, perspective_correct,
                                   reinterpret_cast<unsigned long long*>(zbuf.mutable_data_ptr()),
                                   face_index.mutable_data_ptr<int64_t>(), bary.mutable_data_ptr(),
                                   depth.mutable_data_ptr(), dtype_of("verts_ndc", verts),
                                   current_stream()));
  return {face_index, bary, depth};
}

void check_interp_args(const at::Tensor& faces, const at::Tensor& face_index,
                       const at::Tensor& bary) {
  check_interp(faces, face_index, bary);
  check_cuda("faces", faces);
  check_cuda("face_index", face_index);
  check_cuda("bary", bary);
}

at::Tensor mesh_interpolate_cuda(const at::Tensor& attributes, const at::Tensor& faces,
                                 const at::Tensor& face_index, const at::Tensor& bary) {
  check_interp_args(faces, face_index, bary);
  check_interp_attributes(attributes, face_index, check_cuda);
  check_interp_indices(faces, face_index, attributes.size(1));
  const c10::cuda::CUDAGuard guard(attributes.device());
  const int64_t B = face_index.size(0), H = face_index.size(1), W = face_index.size(2);
  const int64_t V = attributes.size(1), C = attributes.size(2);
  auto out = at::empty({B, C, H, W}, attributes.options());
  if (out.numel() == 0) return out;
  const auto a = attributes.contiguous();
  const auto f = faces.to(at::kLong).contiguous();
  const auto fi = face_index.contiguous();
  const auto bc = bary.to(attributes.scalar_type()).contiguous();
  C10_CUDA_CHECK(cuda::mesh_interpolate(a.const_data_ptr(), f.const_data_ptr<int64_t>(),
                                        fi.const_data_ptr<int64_t>(), bc.const_data_ptr(),
                                        out.mutable_data_ptr(), B, V, C, H * W,
                                        dtype_of("attributes", a), current_stream()));
  return out;
}

at::Tensor mesh_interpolate_bwd_cuda(const at::Tensor& grad, const at::Tensor& faces,
                                     const at::Tensor& face_index, const at::Tensor& bary,
                                     int64_t num_verts) {
  check_interp_args(faces, face_index, bary);
  check_interp_grad(grad, face_index, check_cuda);
  check_interp_indices(faces, face_index, num_verts);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t B = face_index.size(0), H = face_index.size(1), W = face_index.size(2);
  const int64_t C = grad.size(1);
  auto gacc = at::zeros({B, num_verts, C}, grad.options().dtype(acc_dtype(grad)));
  if (gacc.numel() > 0 && H * W > 0) {
    const auto g = grad.contiguous();
    const auto f = faces.to(at::kLong).contiguous();
    const auto fi = face_index.contiguous();
    const auto bc = bary.to(grad.scalar_type()).contiguous();
    C10_CUDA_CHECK(cuda::mesh_interpolate_bwd(g.const_data_ptr(), f.const_data_ptr<int64_t>(),
                                              fi.const_data_ptr<int64_t>(), bc.const_data_ptr(),
                                              gacc.mutable_data_ptr(), B, num_verts, C, H * W,
                                              dtype_of("grad", g),
                                              current_stream()));
  }
  return gacc.to(grad.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> splat_points_index_cuda(const at::Tensor& points,
                                                           int64_t height, int64_t width,
                                                           double radius) {
  check_splat(points, height, width, radius, check_cuda);
  const c10::cuda::CUDAGuard guard(points.device());
  const int64_t B = points.size(0), N = points.size(1);
  auto index = at::empty({B, height, width}, points.options().dtype(at::kLong));
  auto depth = at::empty({B, 1, height, width}, points.options());
  if (B == 0) return {index, depth};
  const auto p = points.to(at::kDouble).contiguous();
  auto zbuf = at::empty({B * height * width}, points.options().dtype(at::kLong));
  C10_CUDA_CHECK(cuda::splat_points(p.const_data_ptr<double>(), B, N, height, width, radius,
                                    reinterpret_cast<unsigned long long*>(zbuf.mutable_data_ptr()),
                                    index.mutable_data_ptr<int64_t>(), depth.mutable_data_ptr(),
                                    dtype_of("points_ndc", points), current_stream()));
  return {index, depth};
}

at::Tensor points_to_triplane_index_cuda(const at::Tensor& points,
                                         const c10::optional<at::Tensor>& valid, int64_t height,
                                         int64_t width, c10::string_view plane_axes,
                                         double box_size, bool align_corners,
                                         double max_distance) {
  const TriplaneIndexArgs args =
      check_points_to_triplane(points, valid, height, width, plane_axes, box_size, check_cuda);
  check_max_distance(max_distance);
  const PlaneAxes axes = args.axes;
  const at::Tensor& vmask = args.valid;
  const int64_t B = points.size(0), N = points.size(1);
  const c10::cuda::CUDAGuard guard(points.device());
  auto index = at::empty({B, 3, height, width}, points.options().dtype(at::kLong));
  if (B == 0) return index;
  // about two points per cell, never finer than the texels, at most 1024 cells per side
  const double side = std::ceil(std::sqrt(std::max(1.0, static_cast<double>(N) / 2.0)));
  const int32_t gx = static_cast<int32_t>(std::clamp(side, 1.0, std::min<double>(1024, width)));
  const int32_t gy = static_cast<int32_t>(std::clamp(side, 1.0, std::min<double>(1024, height)));
  const auto p = points.to(at::kDouble).contiguous();
  const size_t bytes = cuda::points_to_triplane_workspace(B, N, gx, gy);
  auto ws = at::empty({static_cast<int64_t>(bytes)}, points.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::points_to_triplane_index(
                     p.const_data_ptr<double>(),
                     vmask.defined() ? vmask.const_data_ptr<bool>() : nullptr, B, N, height, width,
                     axes, 2.0 / box_size, align_corners,
                     max_distance >= 0 ? max_distance * max_distance : -1.0, gx, gy,
                     ws.mutable_data_ptr(), index.mutable_data_ptr<int64_t>(),
                     current_stream()));
  return index;
}

at::Tensor gather_features_cuda(const at::Tensor& features, const at::Tensor& index,
                                double background) {
  check_gather(features, index);
  check_cuda("features", features);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), N = features.size(1), C = features.size(2);
  const int64_t G = index.size(1), P = index.size(2);
  auto out = at::empty({B, G, C, P}, features.options());
  if (out.numel() == 0) return out;
  const auto f = features.contiguous();
  const auto idx = index.contiguous();
  C10_CUDA_CHECK(cuda::gather_features(f.const_data_ptr(), idx.const_data_ptr<int64_t>(),
                                       out.mutable_data_ptr(), B, N, C, G, P, background,
                                       dtype_of("features", f), current_stream()));
  return out;
}

at::Tensor gather_features_bwd_cuda(const at::Tensor& grad, const at::Tensor& index,
                                    int64_t num_points) {
  check_gather_grad(grad, index, check_cuda);
  check_count("num_points", num_points);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t B = index.size(0), G = index.size(1), P = index.size(2), C = grad.size(2);
  auto gacc = at::zeros({B, num_points, C}, grad.options().dtype(acc_dtype(grad)));
  if (gacc.numel() > 0 && G * P > 0) {
    const auto g = grad.contiguous();
    const auto idx = index.contiguous();
    C10_CUDA_CHECK(cuda::gather_features_bwd(g.const_data_ptr(), idx.const_data_ptr<int64_t>(),
                                             gacc.mutable_data_ptr(), B, num_points, C, G, P,
                                             dtype_of("grad", g), current_stream()));
  }
  return gacc.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(pyface, CUDA, m) {
  m.impl("raster_mesh", &raster_mesh_cuda);
  m.impl("mesh_interpolate", &mesh_interpolate_cuda);
  m.impl("mesh_interpolate_bwd", &mesh_interpolate_bwd_cuda);
  m.impl("splat_points_index", &splat_points_index_cuda);
  m.impl("points_to_triplane_index", &points_to_triplane_index_cuda);
  m.impl("gather_features", &gather_features_cuda);
  m.impl("gather_features_bwd", &gather_features_bwd_cuda);
}

}  // namespace raster
}  // namespace pyface
