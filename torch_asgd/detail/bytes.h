// Tensors of any dtype and device as one byte vector on the CPU, and back: what a
// broadcast of parameters and buffers carries. Internal.
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>

namespace torch_asgd {
namespace detail {

// The tensors' bytes one after another (a CPU copy).
at::Tensor pack_bytes(const std::vector<at::Tensor>& tensors);
// Copies `bytes`, laid out as pack_bytes() lays them out, back into `tensors` (on their
// devices). Each part is realigned first: a tensor's bytes may start at any offset.
void unpack_bytes(const at::Tensor& bytes, const std::vector<at::Tensor>& tensors);

}  // namespace detail
}  // namespace torch_asgd
