// Host workspace of the C++ CPU kernels.
//
// Workspace whose size grows with the problem (per batch item, per point, per face) is allocated
// through ATen's CPU allocator on the calling thread, before any parallel region: the profiler
// records allocator events per thread, so an allocation made by std::vector or inside a worker
// thread would be invisible to the memory measure of `pyface bench`. Scratch of a fixed small
// size (a block of voxels, a row of texels) may stay on the stack or in a worker thread.
#pragma once

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace pyface {

// A fixed-size array of n trivially copyable T (uninitialised unless a fill value is given).
template <typename T>
class HostBuffer {
  static_assert(std::is_trivially_copyable_v<T>, "HostBuffer holds trivially copyable types");

 public:
  HostBuffer() = default;
  explicit HostBuffer(int64_t n)
      : n_(std::max<int64_t>(n, 0)),
        storage_(at::empty({n_ * static_cast<int64_t>(sizeof(T))}, at::kByte)),
        data_(reinterpret_cast<T*>(storage_.mutable_data_ptr<uint8_t>())) {}
  HostBuffer(int64_t n, const T& value) : HostBuffer(n) { std::fill(data_, data_ + n_, value); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  int64_t size() const { return n_; }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }
  T* begin() { return data_; }
  T* end() { return data_ + n_; }

 private:
  int64_t n_ = 0;
  at::Tensor storage_;  // ATen CPU allocations are 64-byte aligned
  T* data_ = nullptr;
};

}  // namespace pyface
