#include "torch_asgd/optim/sync_sgd.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <utility>

#include <fmt/format.h>
#include <torch/torch.h>

#include "torch_asgd/comm/collectives.h"
#include "torch_asgd/comm/compressed_sum.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/detail/bytes.h"
#include "torch_asgd/optim/detail/checkpoint.h"
#include "torch_asgd/optim/detail/compression_checks.h"
#include "torch_asgd/optim/detail/flat_params.h"
#include "torch_asgd/optim/detail/json.h"

namespace torch_asgd {

std::string SyncSGDStats::str() const {
  return fmt::format("{}: {} synchronous steps, {:.2f} s in all-reduce, {} bytes reduced{}",
                     who(), steps, allreduce_seconds, bytes_reduced,
                     codec.empty() ? "" : " (" + codec + ")");
}

std::string SyncSGDStats::to_json() const {
  return detail::JsonObject()
      .add("optimizer", optimizer)
      .add("rank", rank)
      .add("world_size", world_size)
      .add("steps", steps)
      .add("allreduce_seconds", allreduce_seconds)
      .add("bytes_reduced", bytes_reduced)
      .add("codec", codec)
      .add("staleness", staleness)
      .str();
}

SyncSGD::SyncSGD(std::shared_ptr<torch::optim::Optimizer> inner, SyncSGDOptions options,
                 std::shared_ptr<World> world, Model model)
    : DistributedOptimizer(std::move(inner), "SyncSGD", std::move(model)),
      options_(std::move(options)),
      world_(world_or_default(std::move(world))) {
  stats_.rank = world_ ? world_->rank() : 0;
  stats_.world_size = world_ ? world_->size() : 1;
  const Compression& c = options_.compression();
  detail::check_topk_fraction(c, "SyncSGD");
  if (world_ && world_->size() > 1) {
    if (flat().dtype() != at::kFloat && flat().dtype() != at::kDouble) {
      throw ConfigError(fmt::format("SyncSGD: parameters of dtype {} cannot be all-reduced; use "
                                    "float or double",
                                    c10::toString(flat().dtype())));
    }
    detail::check_codec_dtype(c, flat().dtype(), "SyncSGD");
    Fingerprint fp = exchange_fingerprint();
    fp.set("algorithm", "sync").set("local rule", rule_name()).set("compression", c.describe());
    if (c.lossy()) fp.set("compressed exchange", "reduce-scatter, all-gather");
    fp.set("broadcast_buffers", options_.broadcast_buffers() ? "1" : "0");
    world_->check_fingerprint("syncsgd", fp);
    start_equal(*world_, 0);
    grads_ = torch::zeros({flat().numel()}, torch::TensorOptions().dtype(flat().dtype()));
    if (c.lossy()) {
      stats_.codec = c.describe();
      compressed_ = std::make_unique<CompressedSum>(world_, c, flat().numel(), "SyncSGD", "gradients");
    }
  }
}

SyncSGD::SyncSGD(Params params, const torch::optim::SGDOptions& sgd, SyncSGDOptions options,
                 std::shared_ptr<World> world, Model model)
    : SyncSGD(detail::make_sgd(params.take_groups(), sgd), std::move(options), std::move(world),
              params.names_or(std::move(model))) {}


at::Tensor SyncSGD::residual() const {
  return compressed_ ? compressed_->residual() : at::Tensor();
}

void SyncSGD::allreduce_gradients() {
  flat().gather_grads(grads_);  // every rank contributes every parameter
  if (compressed_) {
    const auto t0 = std::chrono::steady_clock::now();
    compressed_->sum(grads_);
    stats_.allreduce_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    stats_.bytes_reduced += static_cast<uint64_t>(compressed_->encoded_bytes());
    set_mean_gradients();
    return;
  }
  if (carry_.defined()) grads_.add_(carry_);  // dropped below once it has been sent
  const auto t0 = std::chrono::steady_clock::now();
  try {
    all_reduce(*world_, grads_, ReduceOp::kSum);
  } catch (const CommError& e) {
    throw CommError(fmt::format(
        "{} (SyncSGD's all-reduce of gradients). Synchronous SGD waits for every rank: is one "
        "of them stopped, dead or much slower than the timeout allows?",
        e.what()));
  }
  stats_.allreduce_seconds +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  stats_.bytes_reduced += static_cast<uint64_t>(flat().bytes());
  carry_ = at::Tensor();
  set_mean_gradients();
}

void SyncSGD::set_mean_gradients() {
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
  throw_if_finished();
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
    if (options_.broadcast_buffers() && !buffers().empty()) broadcast_buffers();
    stats_.staleness.add(0);
    ++stats_.steps;
    return loss;
  }
  torch::Tensor loss = inner_step(closure);
  stats_.staleness.add(0);
  ++stats_.steps;
  return loss;
}

void SyncSGD::broadcast_buffers() {
  torch::NoGradGuard no_grad;
  at::Tensor bytes = detail::pack_bytes(buffers());
  try {
    broadcast(*world_, bytes, 0, /*tag=*/7401);
  } catch (const CommError& e) {
    throw CommError(fmt::format("{} (SyncSGD's broadcast of rank 0's buffers)", e.what()));
  }
  detail::unpack_bytes(bytes, buffers());
}

bool SyncSGD::finish(std::chrono::milliseconds) {
  finished_ = true;
  return true;
}

void SyncSGD::resync() {
  if (world_ && world_->size() > 1) average_model(*world_);
}

void SyncSGD::save_state(torch::serialize::OutputArchive& archive) const {
  detail::write_int64s(archive, "torch_asgd/SyncSGD/counters", {stats_.steps});
  if (compressed_) {
    archive.write("torch_asgd/SyncSGD/residual", compressed_->vector_residual());
    archive.write("torch_asgd/SyncSGD/reduce_residual", compressed_->sum_residual());
  }
}

void SyncSGD::load_state(torch::serialize::InputArchive& archive) {
  // Everything is read and checked before anything changes.
  const int64_t steps = detail::read_int64s(archive, "torch_asgd/SyncSGD/counters", 1)[0];
  auto read_residual = [&](const char* key, const char* what) {
    at::Tensor saved;
    if (!archive.try_read(key, saved)) return at::Tensor();
    if (saved.scalar_type() != at::kFloat || saved.numel() != flat().numel()) {
      throw MismatchError(fmt::format(
          "SyncSGD: the checkpoint's {} has {} {} values, this model has {} parameters", what,
          saved.numel(), c10::toString(saved.scalar_type()), flat().numel()));
    }
    return saved.reshape({-1});
  };
  const at::Tensor saved = read_residual("torch_asgd/SyncSGD/residual", "error-feedback residual");
  const at::Tensor saved_sums =
      read_residual("torch_asgd/SyncSGD/reduce_residual", "error-feedback residual of reduced sums");
  stats_.steps = steps;
  carry_ = at::Tensor();
  // A checkpoint of a compressed run carries what its messages had not yet sent; one of
  // an uncompressed run has nothing outstanding. Resumed without compression, the
  // residuals travel with the next step's gradients; with one rank, where
  // nothing is sent, there is no one to send them to and they are dropped.
  if (compressed_) {
    compressed_->restore(saved, saved_sums);
  } else if (grads_.defined() && saved.defined()) {
    carry_ = saved.to(grads_.scalar_type());
    if (saved_sums.defined()) carry_.add_(saved_sums.to(grads_.scalar_type()));
  }
}

}  // namespace torch_asgd
