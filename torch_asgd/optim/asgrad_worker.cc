#include "torch_asgd/optim/asgrad_worker.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include "torch_asgd/comm/detail/log.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/optim/detail/asgrad_protocol.h"
#include "torch_asgd/optim/detail/checkpoint.h"
#include "torch_asgd/optim/detail/flat_params.h"

namespace torch_asgd {
namespace {

// A worker's parameter groups have no learning rate: the server's rule steps.
struct NoRuleOptions : public torch::optim::OptimizerCloneableOptions<NoRuleOptions> {
  double get_lr() const override { throw refused(); }
  void set_lr(const double) override { throw refused(); }
  static ConfigError refused() {
    return ConfigError("AsGradWorker has no learning rate: the parameter server's rule takes the "
                       "steps; attach the LR scheduler to the ParameterServer");
  }
};

}  // namespace

std::string AsGradWorkerStats::str() const {
  return fmt::format("worker {}: {} gradients returned, {} jobs, {:.2f} s waiting for jobs", rank,
                     gradients, jobs, wait_seconds);
}

AsGradWorker::AsGradWorker(std::vector<torch::Tensor> params, WorkerOptions options,
                           std::shared_ptr<World> world)
    : AsGradWorker(detail::default_names(params), std::move(options), std::move(world)) {}

AsGradWorker::AsGradWorker(const torch::OrderedDict<std::string, torch::Tensor>& named,
                           WorkerOptions options, std::shared_ptr<World> world)
    : Optimizer({torch::optim::OptimizerParamGroup(named.values())},
                std::make_unique<NoRuleOptions>()),
      options_(std::move(options)),
      world_(std::move(world)) {
  if (!world_ || world_->size() < 2) {
    throw ConfigError("an AsGrad worker needs a parameter server: start at least 2 ranks");
  }
  const int server = options_.server_rank();
  if (server < 0 || server >= world_->size() || server == world_->rank()) {
    throw ConfigError(fmt::format("rank {}: server_rank {} is not another rank of the {}",
                                  world_->rank(), server, world_->size()));
  }
  stats_.rank = world_->rank();
  flat_ = std::make_unique<detail::FlatParams>(param_groups_, named.keys());
  const Compression& c = options_.compression();
  detail::check_asgrad_compression(c, flat_->dtype(), fmt::format("rank {}: AsGradWorker", world_->rank()));
  // A dead fellow worker is no concern of this one; a dead server ends its work.
  ChannelOptions channel_options = detail::asgrad_channel_options(*flat_, PeerFailure::kContinue, c);
  channel_options.critical_peers = {server};
  channel_ = world_->open_channel(channel_options, detail::asgrad_fingerprint(*flat_, server, c));
  grads_ = torch::zeros({flat_->numel()}, torch::TensorOptions().dtype(flat_->dtype()));
  if (c.lossy()) {
    residual_ = torch::zeros_like(grads_);
    encoded_ = torch::empty({codec::encoded_bytes(c, flat_->numel())}, torch::kByte);
  }
  wait_for_job();
}

AsGradWorker::~AsGradWorker() {
  try {
    finish(std::chrono::seconds(10));
  } catch (const std::exception& e) {
    detail::log_warning(std::string("AsGradWorker: finish() in the destructor failed: ") + e.what());
  }
}

void AsGradWorker::wait_for_job() {
  const auto t0 = std::chrono::steady_clock::now();
  const auto deadline = t0 + world_->options().timeout;
  auto take = [&](Arrivals a) {
    for (auto& m : a.messages) {
      if (m.sender == options_.server_rank() && detail::is_asgrad(m)) arrivals_.push_back(std::move(m));
    }
  };
  for (;;) {
    // Arrivals are kept until used: a job and the server's stop may come together,
    // and the stop wins (the server takes no more gradients).
    take(channel_->poll());
    for (const auto& m : arrivals_) {
      if (detail::asgrad_kind(m) == detail::kStop) {
        done_ = true;
        arrivals_.clear();
        return;
      }
    }
    for (auto it = arrivals_.begin(); it != arrivals_.end(); ++it) {
      if (detail::asgrad_kind(*it) != detail::kJob) continue;
      if (it->payload.numel() != flat_->numel()) {
        throw CommError(fmt::format("rank {}: a job of {} elements from the server; the model has {}",
                                    world_->rank(), it->payload.numel(), flat_->numel()));
      }
      torch::NoGradGuard no_grad;
      flat_->ensure_views(flat_->params().size());
      flat_->flat().copy_(it->payload);
      stats_.job_version = detail::asgrad_version(*it);
      ++stats_.jobs;
      arrivals_.erase(it);
      stats_.wait_seconds +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      return;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      throw CommError(fmt::format(
          "rank {}: no job from the parameter server (rank {}) for {} s; is it still running?",
          world_->rank(), options_.server_rank(), world_->options().timeout.count() / 1000));
    }
    take(channel_->wait(std::chrono::milliseconds(100)));
  }
}

torch::Tensor AsGradWorker::step(LossClosure closure) {
  torch::Tensor loss = {};
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  if (done_) return loss;
  torch::NoGradGuard no_grad;
  flat_->gather_grads(grads_);
  at::Tensor payload = grads_;
  if (residual_.defined()) {
    // Error feedback: what earlier encodings lost rides along. The residual becomes what
    // this encoding loses; values no codec can take (NaN, Inf) travel as they are, and
    // owe nothing after.
    grads_.add_(residual_);
    const Compression& c = options_.compression();
    if (c.lossy() && codec::encode(c, grads_.data_ptr<float>(), grads_.numel(),
                                   encoded_.data_ptr<uint8_t>(), residual_.data_ptr<float>())) {
      payload = encoded_;
    } else if (c.lossy()) {
      residual_.zero_();
    } else {
      residual_ = at::Tensor();  // a checkpoint's residual, resumed without compression: sent
    }
  }
  channel_->send(options_.server_rank(),
                 detail::asgrad_message(detail::kGradient, stats_.job_version, payload));
  ++stats_.gradients;
  wait_for_job();
  return loss;
}

bool AsGradWorker::finish(std::chrono::milliseconds timeout) {
  if (finished_) return true;
  finished_ = true;
  if (!done_) {
    channel_->send(options_.server_rank(), detail::asgrad_message(detail::kDone, 0));
    done_ = true;
  }
  return channel_->close(timeout);
}

void AsGradWorker::save(torch::serialize::OutputArchive& archive) const {
  detail::write_fingerprint(archive, "torch_asgd/worker", flat_->fingerprint());
  detail::write_int64s(archive, "torch_asgd/worker/counters", {stats_.gradients, stats_.jobs});
  if (residual_.defined()) archive.write("torch_asgd/worker/residual", residual_);
}

void AsGradWorker::load(torch::serialize::InputArchive& archive) {
  detail::check_fingerprint(archive, "torch_asgd/worker", flat_->fingerprint(), "AsGradWorker");
  auto c = detail::read_int64s(archive, "torch_asgd/worker/counters", 2);
  // What the encodings owed when it was saved goes with the next gradient, compressed
  // or not (a checkpoint without one owes nothing). Read and checked before anything
  // changes: a bad checkpoint leaves this worker as it was.
  at::Tensor saved;
  const bool has_residual = archive.try_read("torch_asgd/worker/residual", saved);
  if (has_residual && (saved.numel() != flat_->numel() || saved.scalar_type() != flat_->dtype())) {
    throw MismatchError(fmt::format(
        "AsGradWorker: the checkpoint's error-feedback residual has {} {} values, this model has {} {}",
        saved.numel(), c10::toString(saved.scalar_type()), flat_->numel(), c10::toString(flat_->dtype())));
  }
  stats_.gradients = c[0];
  stats_.jobs = c[1];
  if (has_residual) {
    residual_ = saved.reshape({-1}).to(at::kCPU).clone();
  } else if (options_.compression().lossy()) {
    residual_.zero_();
  } else {
    residual_ = at::Tensor();
  }
}

}  // namespace torch_asgd
