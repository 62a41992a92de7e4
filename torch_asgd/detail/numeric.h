// Tight loops over flat numeric buffers, shared by the channel and the optimizers:
// one pass where ATen would make several (float and double on the CPU; ATen for the
// rest). Internal.
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
// out (+)= x - y, then y = x, in one pass. `out` may live on another device (the CPU).
void take_delta(at::Tensor& out, at::Tensor& x, at::Tensor& y, bool accumulate);
// x += s and y += s in one pass.
void add_both(at::Tensor& x, at::Tensor& y, const at::Tensor& s);

}  // namespace detail
}  // namespace torch_asgd
