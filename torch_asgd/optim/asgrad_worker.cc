#include "torch_asgd/optim/asgrad_worker.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include "torch_asgd/comm/error.h"
#include "torch_asgd/detail/log.h"
#include "torch_asgd/detail/numeric.h"
#include "torch_asgd/optim/detail/asgrad_protocol.h"
#include "torch_asgd/optim/detail/checkpoint.h"
#include "torch_asgd/optim/detail/flat_params.h"
#include "torch_asgd/optim/detail/json.h"

namespace torch_asgd {

std::string AsGradWorkerStats::str() const {
  return fmt::format("{}: {} gradients returned, {} jobs, {:.2f} s waiting for jobs", who(),
                     gradients, jobs, wait_seconds);
}

std::string AsGradWorkerStats::to_json() const {
  return detail::JsonObject()
      .add("optimizer", optimizer)
      .add("rank", rank)
      .add("world_size", world_size)
      .add("gradients", gradients)
      .add("jobs", jobs)
      .add("job_version", job_version)
      .add("wait_seconds", wait_seconds)
      .str();
}

AsGradWorker::AsGradWorker(Params params, WorkerOptions options, std::shared_ptr<World> world,
                           Model model)
    : DistributedOptimizer(params.take_tensors(), "AsGradWorker", params.names_or(std::move(model))),
      options_(std::move(options)),
      world_(world_or_default(std::move(world))) {
  if (!world_ || world_->size() < 2) {
    throw ConfigError("an AsGrad worker needs a parameter server: start at least 2 ranks");
  }
  const int server = options_.server_rank();
  if (server < 0 || server >= world_->size() || server == world_->rank()) {
    throw ConfigError(fmt::format("rank {}: server_rank {} is not another rank of the {}",
                                  world_->rank(), server, world_->size()));
  }
  stats_.rank = world_->rank();
  stats_.world_size = world_->size();
  const Compression& c = options_.compression();
  detail::check_asgrad_compression(c, flat().dtype(), fmt::format("rank {}: AsGradWorker", world_->rank()));
  // A dead fellow worker is no concern of this one; a dead server ends its work.
  ChannelOptions channel_options = detail::asgrad_channel_options(flat(), PeerFailure::kContinue, c);
  channel_options.critical_peers = {server};
  channel_ = world_->open_channel(channel_options,
                                  detail::asgrad_fingerprint(exchange_fingerprint(), server, c));
  start_equal(*world_, server);
  grads_ = torch::zeros({flat().numel()}, torch::TensorOptions().dtype(flat().dtype()));
  if (c.lossy()) {
    residual_ = torch::zeros_like(grads_);
    encoded_ = torch::empty({codec::encoded_bytes(c, flat().numel())}, torch::kByte);
  }
  wait_for_job();
}

AsGradWorker::~AsGradWorker() {
  if (channel_) finish_in_destructor(world_->rank());
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
      if (it->payload.numel() != flat().numel()) {
        throw CommError(fmt::format("rank {}: a job of {} elements from the server; the model has {}",
                                    world_->rank(), it->payload.numel(), flat().numel()));
      }
      torch::NoGradGuard no_grad;
      refresh_views();
      flat().flat().copy_(it->payload);
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
  throw_if_finished();
  if (done_) return loss;
  torch::NoGradGuard no_grad;
  flat().gather_grads(grads_);
  // The server's channel would refuse it, and this worker would wait for a job that
  // never comes: stop here, where it can be explained.
  if (!detail::all_finite(grads_)) {
    throw DivergedError(fmt::format(
        "rank {}: AsGradWorker: the gradient at job version {} holds NaN or Inf and is not sent. "
        "Training diverged: lower the learning rate, clip the gradients, or check the data "
        "(finish() hands this worker's job to another)",
        world_->rank(), stats_.job_version));
  }
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

void AsGradWorker::save_state(torch::serialize::OutputArchive& archive) const {
  detail::write_int64s(archive, "torch_asgd/worker/counters", {stats_.gradients, stats_.jobs});
  if (residual_.defined()) archive.write("torch_asgd/worker/residual", residual_);
}

void AsGradWorker::load_state(torch::serialize::InputArchive& archive) {
  auto c = detail::read_int64s(archive, "torch_asgd/worker/counters", 2);
  // What the encodings owed when it was saved goes with the next gradient, compressed
  // or not (a checkpoint without one owes nothing). Read and checked before anything
  // changes: a bad checkpoint leaves this worker as it was.
  at::Tensor saved;
  const bool has_residual = archive.try_read("torch_asgd/worker/residual", saved);
  if (has_residual && (saved.numel() != flat().numel() || saved.scalar_type() != flat().dtype())) {
    throw MismatchError(fmt::format(
        "AsGradWorker: the checkpoint's error-feedback residual has {} {} values, this model has {} {}",
        saved.numel(), c10::toString(saved.scalar_type()), flat().numel(), c10::toString(flat().dtype())));
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
