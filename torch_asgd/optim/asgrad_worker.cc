#include "torch_asgd/optim/async_sgd.h"

#include <fmt/format.h>
#include <torch/optim/serialize.h>
#include <torch/torch.h>

#include "torch_asgd/comm/detail/log.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/optim/detail/asgrad_protocol.h"
#include "torch_asgd/optim/detail/checkpoint.h"
#include "torch_asgd/optim/detail/flat_params.h"

namespace torch_asgd {

void AsyncSGDOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(server_rank);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
}

void AsyncSGDOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, server_rank);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
}

std::string AsyncSGDStats::str() const {
  return fmt::format("worker {}: {} gradients returned, {} jobs, {:.2f} s waiting for jobs", rank,
                     gradients, jobs, wait_seconds);
}

AsyncSGD::AsyncSGD(std::vector<torch::Tensor> params, AsyncSGDOptions options,
                   std::shared_ptr<World> world)
    : AsyncSGD(
          detail::default_names(params),
          std::move(options), std::move(world)) {}

AsyncSGD::AsyncSGD(const torch::OrderedDict<std::string, torch::Tensor>& named,
                   AsyncSGDOptions options, std::shared_ptr<World> world)
    : Optimizer({torch::optim::OptimizerParamGroup(named.values())},
                std::make_unique<AsyncSGDOptions>(options)),
      options_(std::move(options)),
      world_(std::move(world)) {
  if (!world_ || world_->size() < 2) {
    throw ConfigError("an AsyncSGD worker needs a parameter server: start at least 2 ranks");
  }
  const int server = options_.server_rank();
  if (server < 0 || server >= world_->size() || server == world_->rank()) {
    throw ConfigError(fmt::format("rank {}: server_rank {} is not another rank of the {}",
                                  world_->rank(), server, world_->size()));
  }
  stats_.rank = world_->rank();
  flat_ = std::make_unique<detail::FlatParams>(param_groups_, named.keys());
  // A dead fellow worker is no concern of this one; a dead server ends its work.
  ChannelOptions channel_options = detail::asgrad_channel_options(*flat_, PeerFailure::kContinue);
  channel_options.critical_peers = {server};
  channel_ = world_->open_channel(channel_options, detail::asgrad_fingerprint(*flat_, server));
  grads_ = torch::zeros({flat_->numel()}, torch::TensorOptions().dtype(flat_->dtype()));
  wait_for_job();
}

AsyncSGD::~AsyncSGD() {
  try {
    finish(std::chrono::seconds(10));
  } catch (const std::exception& e) {
    detail::log_warning(std::string("AsyncSGD: finish() in the destructor failed: ") + e.what());
  }
}

void AsyncSGD::wait_for_job() {
  const auto t0 = std::chrono::steady_clock::now();
  const auto deadline = t0 + world_->options().timeout;
  for (;;) {
    // Arrivals are kept until used: a job and the server's stop may come together,
    // and the stop wins (the server takes no more gradients).
    for (auto& m : channel_->poll()) {
      if (m.sender() == options_.server_rank()) arrivals_.push_back(std::move(m));
    }
    for (const auto& m : arrivals_) {
      if (m.header.kind == MessageKind::kControl && m.header.sender_step == detail::kStopSignal) {
        done_ = true;
        arrivals_.clear();
        return;
      }
    }
    for (auto it = arrivals_.begin(); it != arrivals_.end(); ++it) {
      if (it->header.kind != MessageKind::kJob) continue;
      flat_->copy_(it->payload);
      stats_.job_version = it->header.model_version;
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
    for (auto& m : channel_->wait(std::chrono::milliseconds(100))) {
      if (m.sender() == options_.server_rank()) arrivals_.push_back(std::move(m));
    }
  }
}

torch::Tensor AsyncSGD::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss = {};
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  if (done_) return loss;
  flat_->gather_grads(grads_);
  Outgoing m;
  m.kind = MessageKind::kGradient;
  m.payload = grads_;
  m.sender_step = stats_.gradients;
  m.model_version = stats_.job_version;
  m.updates.add(stats_.job_version);
  channel_->send(options_.server_rank(), m);
  ++stats_.gradients;
  wait_for_job();
  return loss;
}

void AsyncSGD::finish(std::chrono::milliseconds timeout) {
  if (finished_) return;
  finished_ = true;
  if (!done_) {
    Outgoing m;
    m.kind = MessageKind::kControl;
    m.sender_step = detail::kDoneSignal;
    channel_->send(options_.server_rank(), m);
    done_ = true;
  }
  channel_->close(timeout);
}

void AsyncSGD::save(torch::serialize::OutputArchive& archive) const {
  detail::write_fingerprint(archive, "torch_asgd/worker", flat_->fingerprint());
  detail::write_int64s(archive, "torch_asgd/worker/counters", {stats_.gradients, stats_.jobs});
}

void AsyncSGD::load(torch::serialize::InputArchive& archive) {
  detail::check_fingerprint(archive, "torch_asgd/worker", flat_->fingerprint(), "AsyncSGD");
  auto c = detail::read_int64s(archive, "torch_asgd/worker/counters", 2);
  stats_.gradients = c[0];
  stats_.jobs = c[1];
}

}  // namespace torch_asgd
