// Volume rendering: shared torch glue (argument checks) used by the CPU and CUDA entry points.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "common/checks.h"

namespace pyface {
namespace render {

// features (B, R, S, C), densities (B, R, S), depths (B, R, S); S >= 2, same dtype and device.
void check_composite_inputs(const at::Tensor& features, const at::Tensor& densities,
                            const at::Tensor& depths);

// grad_features (B, R, C), grad_depth (B, R, 1), grad_weights (B, R, S - 1).
void check_composite_grads(const at::Tensor& grad_features, const at::Tensor& grad_depth,
                           const at::Tensor& grad_weights, const at::Tensor& features);

// Uninitialised outputs of mip_composite for checked features (B, R, S, C): composited features
// (B, R, C), depth (B, R, 1) and weights (B, R, S - 1), with the features' options.
std::tuple<at::Tensor, at::Tensor, at::Tensor> composite_outputs(const at::Tensor& features);

// Uninitialised gradients of mip_composite_bwd for checked features (B, R, S, C): features
// (B, R, S, C) and densities (B, R, S), each of shape (0,) where not asked for.
std::tuple<at::Tensor, at::Tensor> composite_grads(const at::Tensor& features,
                                                   bool need_features_grad,
                                                   bool need_densities_grad);

// depths (B, R, S), weights (B, R, S - 1), u (B, R, M); S >= 2.
void check_importance_inputs(const at::Tensor& depths, const at::Tensor& weights,
                             const at::Tensor& u);

}  // namespace render
}  // namespace pyface
