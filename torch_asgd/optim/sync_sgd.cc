#include "torch_asgd/optim/sync_sgd.h"

#include <chrono>
#include <cstring>

#include <fmt/format.h>
#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/math.h>
#include <torch/torch.h>

#include "torch_asgd/comm/error.h"
#include "torch_asgd/optim/detail/checkpoint.h"
#include "torch_asgd/optim/detail/compression_checks.h"
#include "torch_asgd/optim/detail/flat_params.h"

namespace torch_asgd {

std::string SyncSGDStats::str() const {
  return fmt::format("rank {}/{}: {} synchronous steps, {:.2f} s in all-reduce, {} bytes reduced{}",
                     rank, world_size, steps, allreduce_seconds, bytes_reduced,
                     codec.empty() ? "" : " (" + codec + ")");
}

SyncSGD::SyncSGD(std::shared_ptr<torch::optim::Optimizer> inner, SyncSGDOptions options,
                 std::shared_ptr<World> world, std::vector<std::string> names)
    : DistributedOptimizer(std::move(inner), "SyncSGD", std::move(names)),
      options_(std::move(options)),
      world_(std::move(world)) {
  stats_.rank = world_ ? world_->rank() : 0;
  stats_.world_size = world_ ? world_->size() : 1;
  const Compression& c = options_.compression();
  detail::check_topk_fraction(c, "SyncSGD");
  if (world_ && world_->size() > 1 && !options_.local()) {
    if (flat().dtype() != at::kFloat && flat().dtype() != at::kDouble) {
      throw ConfigError(fmt::format("SyncSGD: parameters of dtype {} cannot be all-reduced; use "
                                    "float or double",
                                    c10::toString(flat().dtype())));
    }
    detail::check_codec_dtype(c, flat().dtype(), "SyncSGD");
    Fingerprint fp = flat().fingerprint();
    fp.set("algorithm", "sync").set("local rule", rule_name()).set("compression", c.describe());
    world_->check_fingerprint("syncsgd", fp);
    grads_ = torch::zeros({flat().numel()}, torch::TensorOptions().dtype(flat().dtype()));
    if (c.lossy()) {
      stats_.codec = c.describe();
      residual_ = torch::zeros_like(grads_);
      encoded_.resize(static_cast<size_t>(world_->size()) * slot_bytes());
    }
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

size_t SyncSGD::slot_bytes() const {
  return 8 + static_cast<size_t>(codec::encoded_bytes(options_.compression(), flat().numel()));
}

void SyncSGD::allgather_encoded() {
  const Compression& c = options_.compression();
  const int n = world_->size(), me = world_->rank();
  const size_t slot = slot_bytes();
  const int64_t numel = flat().numel();
  // What this rank sends: its gradient plus the residual, encoded; the residual becomes
  // what the encoding lost. A gradient the codec cannot carry (NaN, Inf) is announced
  // in the slot's status word instead, so that every rank fails alike, none hangs.
  grads_.add_(residual_);
  uint8_t* mine = encoded_.data() + static_cast<size_t>(me) * slot;
  uint32_t status = 0;
  if (codec::encode(c, grads_.data_ptr<float>(), numel, mine + 8, grads_.data_ptr<float>())) {
    // grads_ now holds the new residual: make it residual_, and reuse the old residual's
    // buffer as grads_ (the decoded sum goes there below).
    std::swap(grads_, residual_);
  } else {
    status = 1;  // residual_ is left as it was
  }
  std::memcpy(mine, &status, sizeof status);
  std::memset(mine + 4, 0, 4);
  const auto t0 = std::chrono::steady_clock::now();
  try {
    gloo::AllgatherOptions opts(world_->gloo_context());
    opts.setOutput(encoded_.data(), encoded_.size());  // no input: in place, from `mine`
    opts.setTimeout(world_->options().timeout);
    gloo::allgather(opts);
  } catch (const std::exception& e) {
    if (status == 0) std::swap(grads_, residual_);  // this step is not taken: undo
    throw CommError(fmt::format(
        "rank {}: SyncSGD's all-gather of compressed gradients failed: {}. Synchronous SGD waits "
        "for every rank: is one of them stopped, dead or much slower than the timeout allows?",
        me, std::string(e.what()).substr(0, 300)));
  }
  stats_.allreduce_seconds +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  stats_.bytes_reduced += static_cast<uint64_t>(slot - 8);
  for (int r = 0; r < n; ++r) {
    const uint8_t* theirs = encoded_.data() + static_cast<size_t>(r) * slot;
    uint32_t st = 0;
    std::memcpy(&st, theirs, sizeof st);
    if (st != 0 || !codec::valid(c, theirs + 8, 0, static_cast<int64_t>(slot - 8), numel)) {
      if (status == 0) std::swap(grads_, residual_);  // this step is not taken: undo
      if (st != 0) {
        throw DivergedError(fmt::format(
            "rank {}: rank {}'s gradients hold NaN or Inf (or values too large for '{}') and "
            "cannot be encoded; no rank takes this step. Is the loss diverging? Lower the "
            "learning rate or clip gradients",
            me, r, c.describe()));
      }
      throw CommError(fmt::format(
          "rank {}: rank {}'s compressed gradients ('{}') arrived undecodable; no rank takes "
          "this step",
          me, r, c.describe()));
    }
  }
  // Every rank sums the same decoded values in the same order: identical replicas.
  grads_.zero_();
  for (int r = 0; r < n; ++r) {
    codec::add_decoded(c, encoded_.data() + static_cast<size_t>(r) * slot + 8, 0,
                       static_cast<int64_t>(slot - 8), numel, grads_.data_ptr<float>());
  }
}

void SyncSGD::allreduce_gradients() {
  flat().gather_grads(grads_);  // every rank contributes every parameter
  if (residual_.defined()) {
    allgather_encoded();
    set_mean_gradients();
    return;
  }
  if (carry_.defined()) grads_.add_(carry_);  // dropped below once it has been sent
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
  if (residual_.defined()) archive.write("torch_asgd/SyncSGD/residual", residual_);
}

void SyncSGD::load_state(torch::serialize::InputArchive& archive) {
  stats_.steps = detail::read_int64s(archive, "torch_asgd/SyncSGD/counters", 1)[0];
  carry_ = at::Tensor();
  // A checkpoint of a compressed run carries what its messages had not yet sent; one of
  // an uncompressed run has nothing outstanding. Resumed without compression, the
  // residual travels with the next step's gradients; with one rank or local(), where
  // nothing is sent, there is no one to send it to and it is dropped.
  at::Tensor saved;
  if (!archive.try_read("torch_asgd/SyncSGD/residual", saved)) {
    if (residual_.defined()) residual_.zero_();
    return;
  }
  if (saved.scalar_type() != at::kFloat || saved.numel() != flat().numel()) {
    throw MismatchError(fmt::format(
        "SyncSGD: the checkpoint's error-feedback residual has {} {} values, this model has {} "
        "parameters",
        saved.numel(), c10::toString(saved.scalar_type()), flat().numel()));
  }
  if (residual_.defined()) {
    residual_.copy_(saved.reshape({-1}));
  } else if (grads_.defined()) {
    carry_ = saved.reshape({-1}).to(grads_.scalar_type());
  }
}

}  // namespace torch_asgd
