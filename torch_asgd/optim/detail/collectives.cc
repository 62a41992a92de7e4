#include "torch_asgd/optim/detail/collectives.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include "torch_asgd/comm/collectives.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/comm/world.h"

namespace torch_asgd {
namespace detail {

void average_over_ranks(World& world, const at::Tensor& flat, const std::string& who) {
  if (world.size() < 2) return;
  torch::NoGradGuard no_grad;
  // Gloo reduces host memory.
  at::Tensor mean = flat.to(torch::kCPU, torch::kDouble, false, /*copy=*/true).contiguous();
  try {
    all_reduce(world, mean, ReduceOp::kSum, /*tag=*/7101);
  } catch (const CommError& e) {
    throw CommError(fmt::format("{} ({} averaging the models over the ranks)", e.what(), who));
  }
  mean.div_(world.size());
  const_cast<at::Tensor&>(flat).copy_(mean);
}

}  // namespace detail
}  // namespace torch_asgd
