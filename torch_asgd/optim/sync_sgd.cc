#include "torch_asgd/optim/sync_sgd.h"

#include <chrono>

#include <fmt/format.h>
#include <gloo/allreduce.h>
#include <gloo/math.h>
#include <torch/torch.h>

#include "torch_asgd/comm/error.h"
#include "torch_asgd/optim/detail/checkpoint.h"
#include "torch_asgd/optim/detail/flat_params.h"

namespace torch_asgd {

std::string SyncSGDStats::str() const {
  return fmt::format("rank {}/{}: {} synchronous steps, {:.2f} s in all-reduce, {} bytes reduced",
                     rank, world_size, steps, allreduce_seconds, bytes_reduced);
}

SyncSGD::SyncSGD(std::shared_ptr<torch::optim::Optimizer> inner, SyncSGDOptions options,
                 std::shared_ptr<World> world, std::vector<std::string> names)
    : DistributedOptimizer(std::move(inner), "SyncSGD", std::move(names)),
      options_(std::move(options)),
      world_(std::move(world)) {
  stats_.rank = world_ ? world_->rank() : 0;
  stats_.world_size = world_ ? world_->size() : 1;
  if (world_ && world_->size() > 1 && !options_.local()) {
    if (flat().dtype() != at::kFloat && flat().dtype() != at::kDouble) {
      throw ConfigError(fmt::format("SyncSGD: parameters of dtype {} cannot be all-reduced; use "
                                    "float or double",
                                    c10::toString(flat().dtype())));
    }
    Fingerprint fp = flat().fingerprint();
    fp.set("algorithm", "sync").set("local rule", rule_name());
    world_->check_fingerprint("syncsgd", fp);
    grads_ = torch::zeros({flat().numel()}, torch::TensorOptions().dtype(flat().dtype()));
  }
}

SyncSGD::SyncSGD(std::vector<torch::Tensor> params, const torch::optim::SGDOptions& sgd,
                 SyncSGDOptions options, std::shared_ptr<World> world)
    : SyncSGD(detail::make_sgd({torch::optim::OptimizerParamGroup(std::move(params))}, sgd),
              std::move(options), std::move(world)) {}

SyncSGD::SyncSGD(const torch::OrderedDict<std::string, torch::Tensor>& named,
                 const torch::optim::SGDOptions& sgd, SyncSGDOptions options,
                 std::shared_ptr<World> world)
    : SyncSGD(detail::make_sgd({torch::optim::OptimizerParamGroup(named.values())}, sgd),
              std::move(options), std::move(world), named.keys()) {}

SyncSGD::SyncSGD(std::vector<torch::optim::OptimizerParamGroup> groups,
                 const torch::optim::SGDOptions& defaults, SyncSGDOptions options,
                 std::shared_ptr<World> world, std::vector<std::string> names)
    : SyncSGD(detail::make_sgd(std::move(groups), defaults), std::move(options), std::move(world),
              std::move(names)) {}

void SyncSGD::allreduce_gradients() {
  flat().gather_grads(grads_);  // every rank contributes every parameter
  const auto t0 = std::chrono::steady_clock::now();
  try {
    gloo::AllreduceOptions opts(world_->gloo_context());
    if (grads_.scalar_type() == at::kFloat) {
      opts.setInput(grads_.data_ptr<float>(), grads_.numel());
      opts.setOutput(grads_.data_ptr<float>(), grads_.numel());
      opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(
          &gloo::sum<float>));
    } else {
      opts.setInput(grads_.data_ptr<double>(), grads_.numel());
      opts.setOutput(grads_.data_ptr<double>(), grads_.numel());
      opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(
          &gloo::sum<double>));
    }
    opts.setTimeout(world_->options().timeout);
    gloo::allreduce(opts);
  } catch (const std::exception& e) {
    throw CommError(fmt::format(
        "rank {}: SyncSGD's all-reduce failed: {}. Synchronous SGD waits for every rank: is one "
        "of them stopped, dead or much slower than the timeout allows?",
        world_->rank(), std::string(e.what()).substr(0, 300)));
  }
  stats_.allreduce_seconds +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  stats_.bytes_reduced += static_cast<uint64_t>(flat().bytes());
  grads_.div_(world_->size());
  // Every parameter gets the mean (one copy to the device), also one that had none here.
  torch::NoGradGuard no_grad;
  const at::Tensor mean = flat().on_device(grads_);
  for (size_t i = 0; i < flat().params().size(); ++i) {
    at::Tensor p = flat().params()[i];
    if (p.grad().defined()) {
      p.mutable_grad().copy_(flat().view(mean, i));
    } else {
      p.mutable_grad() = flat().view(mean, i).clone();
    }
  }
}

torch::Tensor SyncSGD::step(LossClosure closure) {
  if (grads_.defined()) {
    // The closure (if any) must run before the gradients are averaged.
    torch::Tensor loss;
    if (closure != nullptr) {
      at::AutoGradMode enable_grad(true);
      loss = closure();
    }
    refresh_views();
    allreduce_gradients();
    inner_step(nullptr);
    stats_.staleness.add(0);
    ++stats_.steps;
    return loss;
  }
  torch::Tensor loss = inner_step(closure);
  stats_.staleness.add(0);
  ++stats_.steps;
  return loss;
}

void SyncSGD::save_state(torch::serialize::OutputArchive& archive) const {
  detail::write_int64s(archive, "torch_asgd/SyncSGD/counters", {stats_.steps});
}

void SyncSGD::load_state(torch::serialize::InputArchive& archive) {
  stats_.steps = detail::read_int64s(archive, "torch_asgd/SyncSGD/counters", 1)[0];
}

}  // namespace torch_asgd
