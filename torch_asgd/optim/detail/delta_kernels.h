// DASGD's passes over the model: the change since the last hand-over taken out of the
// parameters, and a peer's change added to the parameters and to the shadow copy, each
// in one pass where ATen would make several (float and double on the CPU; ATen for the
// rest). Internal.
#pragma once

#include <ATen/core/Tensor.h>

namespace torch_asgd {
namespace detail {

// out (+)= x - y, then y = x, in one pass. `out` may live on another device (the CPU).
void take_delta(at::Tensor& out, at::Tensor& x, at::Tensor& y, bool accumulate);
// x += s and y += s in one pass.
void add_both(at::Tensor& x, at::Tensor& y, const at::Tensor& s);

}  // namespace detail
}  // namespace torch_asgd
