#include "torch_asgd/optim/sync_sgd.h"

#include <chrono>

#include <fmt/format.h>
#include <gloo/allreduce.h>
#include <gloo/math.h>
#include <torch/optim/serialize.h>
#include <torch/torch.h>

#include "torch_asgd/comm/error.h"
#include "torch_asgd/optim/detail/checkpoint.h"
#include "torch_asgd/optim/detail/flat_params.h"
#include "torch_asgd/optim/detail/sgd_rule.h"

namespace torch_asgd {

SyncSGDOptions::SyncSGDOptions(double lr) : lr_(lr) {}

void SyncSGDOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(dampening);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(nesterov);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(local);
}

void SyncSGDOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, momentum);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, dampening);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, nesterov);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, local);
}

std::string SyncSGDStats::str() const {
  return fmt::format("rank {}/{}: {} synchronous steps, {:.2f} s in all-reduce, {} bytes reduced",
                     rank, world_size, steps, allreduce_seconds, bytes_reduced);
}

SyncSGD::SyncSGD(std::vector<torch::Tensor> params, SyncSGDOptions defaults,
                 std::shared_ptr<World> world)
    : SyncSGD(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(
                  std::move(params))},
              std::move(defaults), std::move(world)) {}

SyncSGD::SyncSGD(const torch::OrderedDict<std::string, torch::Tensor>& named,
                 SyncSGDOptions defaults, std::shared_ptr<World> world)
    : SyncSGD(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(
                  named.values())},
              std::move(defaults), std::move(world), named.keys()) {}

SyncSGD::SyncSGD(std::vector<torch::optim::OptimizerParamGroup> groups, SyncSGDOptions defaults,
                 std::shared_ptr<World> world, std::vector<std::string> names)
    : Optimizer(groups, std::make_unique<SyncSGDOptions>(defaults)),
      options_(std::move(defaults)),
      world_(std::move(world)) {
  detail::reapply_group_options(groups, param_groups_);
  detail::check_groups<SyncSGDOptions>(param_groups_, "SyncSGD");
  flat_ = std::make_unique<detail::FlatParams>(param_groups_, std::move(names));
  stats_.rank = world_ ? world_->rank() : 0;
  stats_.world_size = world_ ? world_->size() : 1;
  if (world_ && world_->size() > 1 && !options_.local()) {
    if (flat_->dtype() != at::kFloat && flat_->dtype() != at::kDouble) {
      throw ConfigError(fmt::format("SyncSGD: parameters of dtype {} cannot be all-reduced; use "
                                    "float or double",
                                    c10::toString(flat_->dtype())));
    }
    Fingerprint fp = flat_->fingerprint();
    fp.set("algorithm", "sync");
    world_->check_fingerprint("syncsgd", fp);
    grads_ = torch::zeros({flat_->numel()}, torch::TensorOptions().dtype(flat_->dtype()));
  }
}

SyncSGD::~SyncSGD() = default;

void SyncSGD::allreduce_gradients() {
  flat_->gather_grads(grads_);  // every rank contributes every parameter
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
  stats_.bytes_reduced += static_cast<uint64_t>(flat_->bytes());
  grads_.div_(world_->size());
  const auto& params = flat_->params();
  const at::Tensor mean = flat_->on_device(grads_);  // one copy to the device (none on CPU)
  for (size_t i = 0; i < params.size(); ++i) {
    auto v = flat_->view(mean, i);
    auto p = params[i];
    if (p.grad().defined()) {
      p.mutable_grad().copy_(v);
    } else {
      p.mutable_grad() = v.clone();
    }
  }
}

torch::Tensor SyncSGD::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss = {};
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  if (grads_.defined()) allreduce_gradients();
  const bool stepped = detail::for_each_sgd_update<SyncSGDOptions>(
      param_groups_, state_, [](size_t, torch::Tensor& p, const torch::Tensor& d_p, double lr) {
        p.data().add_(d_p, -1 * lr);
      });
  if (stepped) {
    stats_.staleness.add(stats_.steps, stats_.steps);
    ++stats_.steps;
  }
  return loss;
}

SyncSGDStats SyncSGD::stats() const { return stats_; }

void SyncSGD::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<MomentumState, SyncSGDOptions>(archive, *this);
  detail::write_fingerprint(archive, "torch_asgd/syncsgd", flat_->fingerprint());
  detail::write_int64s(archive, "torch_asgd/syncsgd/counters", {stats_.steps});
  detail::write_group_lrs(archive, "torch_asgd/syncsgd", param_groups_);
}

void SyncSGD::load(torch::serialize::InputArchive& archive) {
  detail::check_fingerprint(archive, "torch_asgd/syncsgd", flat_->fingerprint(), "SyncSGD");
  torch::optim::serialize<MomentumState, SyncSGDOptions>(archive, *this);
  stats_.steps = detail::read_int64s(archive, "torch_asgd/syncsgd/counters", 1)[0];
  detail::read_group_lrs(archive, "torch_asgd/syncsgd", param_groups_);
}

}  // namespace torch_asgd
