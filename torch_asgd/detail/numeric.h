// Tight loops over flat numeric buffers, shared by the channel and the optimizers:
// one pass where ATen would make several (float and double on the CPU; ATen for the
// rest). Internal. (DASGD's own: optim/detail/delta_kernels.h.)
#pragma once

#include <cstddef>

#include <ATen/core/Tensor.h>

namespace torch_asgd {
namespace detail {

// True when no element of the floating-point data is NaN or infinite (non-floating
// dtypes always are).
bool all_finite(const void* data, size_t bytes, c10::ScalarType dtype);
bool all_finite(const at::Tensor& t);
// dst += src over `bytes` bytes of `dtype`.
void add_into(void* dst, const void* src, size_t bytes, c10::ScalarType dtype);

}  // namespace detail
}  // namespace torch_asgd
