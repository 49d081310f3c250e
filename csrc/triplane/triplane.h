// Tri-plane sampling: shared torch glue (argument checks) used by the CPU and CUDA entry points.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

#include "common/checks.h"

namespace pyface {
namespace triplane {

struct Args {
  PlaneAxes axes;
  Reduce reduce;
  double scale;  // 2 / box_size
  bool align_corners;
};

// Validates planes (B, 3, C, H, W) and points (B, N, 3) and parses the options.
Args check_inputs(const at::Tensor& planes, const at::Tensor& points, const std::string& plane_axes,
                  double box_size, const std::string& reduce, bool align_corners);

// Validates grad_out against the forward output shape.
void check_grad_out(const at::Tensor& grad_out, const at::Tensor& planes, const at::Tensor& points,
                    Reduce reduce);

// Output shape of the forward: (B, N, C), or (B, 3, N, C) for reduce="none".
std::vector<int64_t> output_shape(const at::Tensor& planes, const at::Tensor& points, Reduce reduce);

}  // namespace triplane
}  // namespace pyface
