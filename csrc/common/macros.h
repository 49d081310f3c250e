// Portable qualifiers for kernel math shared between the C++ CPU kernels and the CUDA kernels.
// This header includes no torch header, so it can be used by framework-free .cu files.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PYFACE_HD __host__ __device__ __forceinline__
#define PYFACE_DEVICE __device__ __forceinline__
#else
#define PYFACE_HD inline
#define PYFACE_DEVICE inline
#endif

#include <cstdint>

namespace pyface {

// Reduction over the three planes of triplane_sample.
enum class Reduce : int32_t { MEAN = 0, SUM = 1, NONE = 2 };

}  // namespace pyface
