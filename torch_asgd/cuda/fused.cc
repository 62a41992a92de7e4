#include "torch_asgd/cuda/fused.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "torch_asgd/cuda/kernels.h"
#include "torch_asgd/optim/detail/flat_params.h"

namespace torch_asgd {
namespace cuda {

std::shared_ptr<ParamTable> make_param_table(const detail::FlatParams& flat) {
  if (!flat.device().is_cuda()) return nullptr;
  DType dtype;
  switch (flat.dtype()) {
    case at::kFloat:
      dtype = DType::kFloat32;
      break;
    case at::kHalf:
      dtype = DType::kFloat16;
      break;
    case at::kBFloat16:
      dtype = DType::kBFloat16;
      break;
    default:
      return nullptr;
  }
  c10::cuda::CUDAGuard guard(flat.device());
  std::vector<void*> data;
  std::vector<int64_t> numel;
  for (const auto& p : flat.params()) {
    data.push_back(p.data_ptr());
    numel.push_back(p.numel());
  }
  return std::make_shared<ParamTable>(data, numel, dtype);
}

bool fused_add(const detail::FlatParams& flat, ParamTable* table, const at::Tensor& delta,
               float scale) {
  if (table == nullptr || delta.scalar_type() != at::kFloat || !delta.is_contiguous() ||
      delta.device() != flat.device() || delta.numel() != table->numel()) {
    return false;
  }
  const auto& params = flat.params();
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].data_ptr() != table->pointers()[i]) return false;  // moved since
  }
  c10::cuda::CUDAGuard guard(flat.device());
  const float* d = delta.data_ptr<float>();
  apply_deltas(*table, &d, 1, scale, c10::cuda::getCurrentCUDAStream(flat.device().index()).stream());
  return true;
}

}  // namespace cuda
}  // namespace torch_asgd
