// LibTorch glue of the fused kernels: built only against a LibTorch with CUDA, where
// detail::FlatParams uses it for parameters on a CUDA device.
#pragma once

#include <memory>

#include <ATen/core/Tensor.h>

namespace torch_asgd {
namespace detail {
class FlatParams;
}  // namespace detail
namespace cuda {

class ParamTable;

// The kernels' view of `flat`'s parameters; null when they cannot use them (not on a
// CUDA device, or a dtype other than fp32, fp16 and bf16).
std::shared_ptr<ParamTable> make_param_table(const detail::FlatParams& flat);

// params += scale * delta in one launch on the current CUDA stream of the parameters'
// device. `delta`: fp32, contiguous, on that device, flat.numel() elements. Returns
// false (and does nothing) where the kernels cannot be used; the caller then falls back.
bool fused_add(const detail::FlatParams& flat, ParamTable* table, const at::Tensor& delta,
               float scale);

}  // namespace cuda
}  // namespace torch_asgd
