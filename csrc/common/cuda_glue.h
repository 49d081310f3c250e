// Helpers of the torch glue of the CUDA kernels (csrc/*/*_cuda.cpp, built only against a CUDA
// torch): the device check, the dtype mapping for the framework-free launchers and the current
// stream. Launch errors are checked with C10_CUDA_CHECK.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "common/dtype.h"

namespace pyface {

// `name`: the argument named in the error.
inline void check_cuda(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, ": expected a CUDA tensor, got ", t.device());
}

// The launcher element type of float32 / float64 / float16 / bfloat16.
inline DType dtype_of(const char* name, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, name, ": expected float32, float64, float16 or bfloat16, got ", t);
  return DType::F32;
}

inline DType dtype_of(const char* name, const at::Tensor& t) {
  return dtype_of(name, t.scalar_type());
}

// The stream the launchers run on.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace pyface
