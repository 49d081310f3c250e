// Torch glue for the tri-plane sampling CUDA kernels: argument checks, allocation, the current
// stream, and TORCH_LIBRARY_IMPL(pyface, CUDA). Built only against a CUDA build of torch.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_glue.h"
#include "triplane/triplane.h"
#include "triplane/triplane_kernels.h"

namespace pyface {
namespace triplane {
namespace {

cuda::Problem problem(const at::Tensor& planes, const at::Tensor& points, const Args& a) {
  cuda::Problem p{};
  p.B = planes.size(0);
  p.N = points.size(1);
  p.C = planes.size(2);
  p.H = planes.size(3);
  p.W = planes.size(4);
  p.sb = planes.stride(0);
  p.sp = planes.stride(1);
  p.sc = planes.stride(2);
  p.sh = planes.stride(3);
  p.sw = planes.stride(4);
  p.axes = static_cast<int32_t>(a.axes);
  p.reduce = static_cast<int32_t>(a.reduce);
  p.scale = a.scale;
  p.align_corners = a.align_corners;
  return p;
}

at::Tensor triplane_sample_cuda(const at::Tensor& planes, const at::Tensor& points,
                                c10::string_view plane_axes, double box_size,
                                c10::string_view reduce, bool align_corners) {
  const Args a = check_inputs(planes, points, std::string(plane_axes), box_size,
                              std::string(reduce), align_corners);
  check_cuda("planes", planes);
  const c10::cuda::CUDAGuard guard(planes.device());
  const auto pts = points.to(acc_dtype(planes)).contiguous();
  auto out = at::empty(output_shape(planes, points, a.reduce), planes.options());
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(cuda::forward(dtype_of("planes", planes), planes.const_data_ptr(),
                               pts.const_data_ptr(), out.mutable_data_ptr(),
                               problem(planes, points, a),
                               current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> triplane_sample_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& planes, const at::Tensor& points,
    c10::string_view plane_axes, double box_size, c10::string_view reduce, bool align_corners,
    bool need_planes_grad, bool need_points_grad) {
  const Args a = check_inputs(planes, points, std::string(plane_axes), box_size,
                              std::string(reduce), align_corners);
  check_grad_out(grad_out, planes, points, a.reduce);
  check_cuda("planes", planes);
  const c10::cuda::CUDAGuard guard(planes.device());
  const auto acc = acc_dtype(planes);
  const auto pts = points.to(acc).contiguous();
  const auto go = grad_out.to(planes.scalar_type()).contiguous();
  // The accumulator follows the planes' memory layout when it is dense (channels-last planes
  // get a channels-last gradient, so the atomics stay coalesced), else it is contiguous.
  at::Tensor gplanes = need_planes_grad
                           ? at::zeros_like(planes, planes.options().dtype(acc))
                           : at::Tensor();
  at::Tensor gpoints = need_points_grad ? at::zeros(points.sizes(), points.options().dtype(acc))
                                        : at::Tensor();
  cuda::Problem p = problem(planes, points, a);
  if (gplanes.defined()) {
    p.gsb = gplanes.stride(0);
    p.gsp = gplanes.stride(1);
    p.gsc = gplanes.stride(2);
    p.gsh = gplanes.stride(3);
    p.gsw = gplanes.stride(4);
  }
  C10_CUDA_CHECK(cuda::backward(dtype_of("planes", planes), go.const_data_ptr(),
                                planes.const_data_ptr(), pts.const_data_ptr(),
                                gplanes.defined() ? gplanes.mutable_data_ptr() : nullptr,
                                gpoints.defined() ? gpoints.mutable_data_ptr() : nullptr, p,
                                current_stream()));
  at::Tensor grad_planes = gplanes.defined() ? gplanes.to(planes.scalar_type())
                                             : at::empty({0}, planes.options());
  at::Tensor grad_points = gpoints.defined() ? gpoints.to(points.scalar_type())
                                             : at::empty({0}, points.options());
  return {grad_planes, grad_points};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyface, CUDA, m) {
  m.impl("triplane_sample", &triplane_sample_cuda);
  m.impl("triplane_sample_bwd", &triplane_sample_bwd_cuda);
}

}  // namespace triplane
}  // namespace pyface
