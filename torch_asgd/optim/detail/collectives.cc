#include "torch_asgd/optim/detail/collectives.h"

#include <fmt/format.h>
#include <gloo/allreduce.h>
#include <gloo/math.h>
#include <torch/torch.h>

#include "torch_asgd/comm/error.h"
#include "torch_asgd/comm/world.h"

namespace torch_asgd {
namespace detail {

void average_over_ranks(World& world, const at::Tensor& flat, const std::string& who) {
  if (world.size() < 2) return;
  torch::NoGradGuard no_grad;
  // Gloo reduces host memory.
  at::Tensor mean = flat.to(torch::kCPU, torch::kDouble, false, /*copy=*/true).contiguous();
  gloo::AllreduceOptions opts(world.gloo_context());
  opts.setInput(mean.data_ptr<double>(), static_cast<size_t>(mean.numel()));
  opts.setOutput(mean.data_ptr<double>(), static_cast<size_t>(mean.numel()));
  opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(
      &gloo::sum<double>));
  opts.setTag(7101);
  opts.setTimeout(world.options().timeout);
  try {
    gloo::allreduce(opts);
  } catch (const std::exception& e) {
    throw CommError(fmt::format("rank {}: {}: averaging the models over the ranks failed: {}",
                                world.rank(), who, std::string(e.what()).substr(0, 300)));
  }
  mean.div_(world.size());
  const_cast<at::Tensor&>(flat).copy_(mean);
}

}  // namespace detail
}  // namespace torch_asgd
