// Payload buffers that come back for reuse. A large buffer from the allocator is fresh
// memory (glibc maps anything above 32 MB anew, and smaller ones often): every page of it
// faults once when first written, which on a virtual machine costs more than moving the
// bytes. A channel that sends or receives the same sizes again and again takes them from
// here instead. Thread safe; a buffer may be released on any thread. Internal.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include <ATen/core/Tensor.h>

namespace torch_asgd {
namespace detail {

class BufferPool {
 public:
  // Keeps at most `max_count` idle buffers and `max_bytes` bytes of them: a released
  // buffer displaces the longest idle ones to fit (a buffer larger than max_bytes goes
  // back to the allocator), so the sizes in use now are the ones kept.
  BufferPool(size_t max_count, uint64_t max_bytes);

  // A contiguous 1-D tensor of `numel` elements of `dtype` (contents undefined) whose
  // memory returns to this pool once the last tensor sharing it is gone, even after the
  // pool itself is destroyed (then it is freed).
  at::Tensor take(c10::ScalarType dtype, int64_t numel);

  size_t idle_count() const;
  uint64_t idle_bytes() const;

 private:
  struct Shelf {
    size_t max_count;
    uint64_t max_bytes;
    mutable std::mutex mu;  // guards idle and bytes
    std::vector<at::Tensor> idle;  // byte tensors
    uint64_t bytes = 0;
  };
  std::shared_ptr<Shelf> shelf_;
};

}  // namespace detail
}  // namespace torch_asgd
