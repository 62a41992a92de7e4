#include "torch_asgd/detail/bytes.h"

#include <ATen/ATen.h>

namespace torch_asgd {
namespace detail {

at::Tensor pack_bytes(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> parts;
  for (const auto& t : tensors) {
    parts.push_back(t.detach().to(at::kCPU, /*non_blocking=*/false, /*copy=*/true).contiguous().reshape({-1}).view(at::kByte));
  }
  if (parts.empty()) return at::empty({0}, at::kByte);
  return at::cat(parts);
}

void unpack_bytes(const at::Tensor& bytes, const std::vector<at::Tensor>& tensors) {
  int64_t at = 0;
  for (const auto& t : tensors) {
    const int64_t n = t.numel() * static_cast<int64_t>(t.element_size());
    // clone(): a fresh buffer, aligned for the dtype (view(dtype) needs that).
    const at::Tensor part = bytes.narrow(0, at, n).clone().view(t.scalar_type()).view(t.sizes());
    const_cast<at::Tensor&>(t).copy_(part);
    at += n;
  }
}

}  // namespace detail
}  // namespace torch_asgd
