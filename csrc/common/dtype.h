// Element type of the tensors handed to the framework-free CUDA launchers (*_kernels.h). The
// torch glue maps an at::ScalarType to it (common/cuda_glue.h); a launcher returns
// cudaErrorInvalidValue for a type it does not instantiate. Framework-free: no torch header.
#pragma once

#include <cstdint>

namespace pyface {

enum class DType : int32_t { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

}  // namespace pyface
