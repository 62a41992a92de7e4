#include "torch_asgd/optim/sync_sgd.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <utility>

#include <fmt/format.h>
#include <torch/torch.h>

#include "torch_asgd/comm/collectives.h"
#include "torch_asgd/comm/error.h"
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
  if (world_ && world_->size() > 1 && !options_.local()) {
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
      residual_ = torch::zeros_like(grads_);
      // Shares of whole codec blocks, as even as blocks allow (some empty when there are
      // fewer blocks than ranks): each share encodes on its own to the bytes the whole
      // gradient's encoding has there, and travels without padding.
      const int n = world_->size();
      const int64_t blocks = (flat().numel() + kCodecBlock - 1) / kCodecBlock;
      for (int j = 0; j <= n; ++j) {
        share_starts_.push_back(std::min(flat().numel(), j * blocks / n * kCodecBlock));
      }
      for (int j = 0; j < n; ++j) slot_offsets_.push_back(j == 0 ? 0 : slot_offsets_[j - 1] + slot_bytes(j - 1));
      const int me = world_->rank();
      reduce_residual_ = torch::zeros({share_size(me)}, torch::kFloat);
      reduced_ = torch::zeros({share_size(me)}, torch::kFloat);
      send_.resize(slot_offsets_[n - 1] + slot_bytes(n - 1));
      received_.resize(static_cast<size_t>(n) * slot_bytes(me));
      gathered_.resize(send_.size());
    }
  }
}

SyncSGD::SyncSGD(std::vector<torch::Tensor> params, const torch::optim::SGDOptions& sgd,
                 SyncSGDOptions options, std::shared_ptr<World> world, Model model)
    : SyncSGD(detail::make_sgd({torch::optim::OptimizerParamGroup(std::move(params))}, sgd),
              std::move(options), std::move(world), std::move(model)) {}

SyncSGD::SyncSGD(const torch::OrderedDict<std::string, torch::Tensor>& named,
                 const torch::optim::SGDOptions& sgd, SyncSGDOptions options,
                 std::shared_ptr<World> world)
    : SyncSGD(detail::make_sgd({torch::optim::OptimizerParamGroup(named.values())}, sgd),
              std::move(options), std::move(world), named.keys()) {}

SyncSGD::SyncSGD(std::vector<torch::optim::OptimizerParamGroup> groups,
                 const torch::optim::SGDOptions& defaults, SyncSGDOptions options,
                 std::shared_ptr<World> world, Model model)
    : SyncSGD(detail::make_sgd(std::move(groups), defaults), std::move(options), std::move(world),
              std::move(model)) {}

namespace {

// The status word at the head of every slot of the compressed exchange, and the rank it
// names (second word). Every rank decides from the same gathered slots, so that all of
// them fail alike and none waits in a collective the others left.
enum SlotStatus : uint32_t {
  kSlotOk = 0,
  kGradientNotEncodable = 1,  // the named rank's gradient holds NaN/Inf (or too large)
  kShareUndecodable = 2,      // the named rank's encoded share arrived undecodable here
  kSumNotEncodable = 3,       // the reduced sum of the named rank's share cannot be encoded
};

void write_status(uint8_t* slot, uint32_t status, int32_t rank) {
  std::memcpy(slot, &status, 4);
  std::memcpy(slot + 4, &rank, 4);
}

std::pair<uint32_t, int32_t> read_status(const uint8_t* slot) {
  uint32_t status = 0;
  int32_t rank = 0;
  std::memcpy(&status, slot, 4);
  std::memcpy(&rank, slot + 4, 4);
  return {status, rank};
}

}  // namespace

int64_t SyncSGD::share_begin(int j) const { return share_starts_[static_cast<size_t>(j)]; }

int64_t SyncSGD::share_size(int j) const { return share_starts_[static_cast<size_t>(j) + 1] - share_begin(j); }

size_t SyncSGD::slot_bytes(int j) const {
  return 8 + static_cast<size_t>(codec::encoded_bytes(options_.compression(), share_size(j)));
}

void SyncSGD::exchange_encoded() {
  const Compression& c = options_.compression();
  const int n = world_->size(), me = world_->rank();
  auto fail_collective = [&](const char* what, const CommError& e) {
    return CommError(fmt::format(
        "{} (SyncSGD's {} of compressed gradients). Synchronous SGD waits for every rank: is one "
        "of them stopped, dead or much slower than the timeout allows?",
        e.what(), what));
  };
  // Every share is a payload of its own (whole codec blocks), encoded and decoded alone.
  // 1. Reduce-scatter. Share j of this rank's gradient plus its residual, encoded, goes
  //    to rank j; grads_ keeps what the encoding lost (the next residual, taken only if
  //    the step is). A gradient the codec cannot carry (NaN, Inf) is announced in the
  //    status word instead.
  grads_.add_(residual_);
  float* g = grads_.data_ptr<float>();
  uint32_t status = kSlotOk;
  for (int j = 0; j < n && status == kSlotOk; ++j) {
    float* x = g + share_begin(j);
    if (!codec::encode(c, x, share_size(j), send_.data() + slot_offsets_[j] + 8, x)) {
      status = kGradientNotEncodable;
    }
  }
  for (int j = 0; j < n; ++j) write_status(send_.data() + slot_offsets_[j], status, me);
  const size_t my_slot = slot_bytes(me);
  const auto t0 = std::chrono::steady_clock::now();
  try {
    std::vector<size_t> out_counts, in_counts(static_cast<size_t>(n), my_slot);
    for (int j = 0; j < n; ++j) out_counts.push_back(slot_bytes(j));
    all_to_all_bytes(*world_, send_.data(), out_counts, received_.data(), in_counts);
  } catch (const CommError& e) {
    throw fail_collective("reduce-scatter", e);
  }
  // 2. This rank's share: the sum of every rank's decoded share, in rank order, plus
  //    what the encoding of earlier sums lost here (the second residual); encoded into
  //    this rank's slot of the all-gather, the loss kept in reduced_ until the step is
  //    taken.
  const int64_t len = share_size(me);
  const int64_t bytes = static_cast<int64_t>(my_slot) - 8;
  uint8_t* mine = gathered_.data() + slot_offsets_[me];
  std::pair<uint32_t, int32_t> verdict{kSlotOk, me};
  for (int r = 0; r < n && verdict.first == kSlotOk; ++r) {
    const uint8_t* theirs = received_.data() + static_cast<size_t>(r) * my_slot;
    if (read_status(theirs).first != kSlotOk) {
      verdict = {kGradientNotEncodable, r};
    } else if (!codec::valid(c, theirs + 8, 0, bytes, len)) {
      verdict = {kShareUndecodable, r};
    }
  }
  if (verdict.first == kSlotOk) {
    float* red = reduced_.data_ptr<float>();
    std::fill(red, red + len, 0.0f);
    for (int r = 0; r < n; ++r) {
      codec::add_decoded(c, received_.data() + static_cast<size_t>(r) * my_slot + 8, 0, bytes, len, red);
    }
    const float* kept = reduce_residual_.data_ptr<float>();
    for (int64_t i = 0; i < len; ++i) red[i] += kept[i];
    if (!codec::encode(c, red, len, mine + 8, red)) verdict = {kSumNotEncodable, me};
  }
  write_status(mine, verdict.first, verdict.second);
  // 3. All-gather of the encoded sums.
  try {
    std::vector<size_t> counts;
    for (int j = 0; j < n; ++j) counts.push_back(slot_bytes(j));
    all_gather_bytes(*world_, gathered_.data(), counts);  // in place, from `mine`
  } catch (const CommError& e) {
    throw fail_collective("all-gather", e);
  }
  stats_.allreduce_seconds +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (int j = 0; j < n; ++j) {
    const uint8_t* sum = gathered_.data() + slot_offsets_[j];
    const auto [st, who] = read_status(sum);
    if (st == kGradientNotEncodable) {
      throw DivergedError(fmt::format(
          "rank {}: rank {}'s gradients hold NaN or Inf (or values too large for '{}') and "
          "cannot be encoded; no rank takes this step. Is the loss diverging? Lower the "
          "learning rate or clip gradients",
          me, who, c.describe()));
    }
    if (st == kSumNotEncodable) {
      throw DivergedError(fmt::format(
          "rank {}: the sum of the ranks' gradients for rank {}'s share of the parameters is too "
          "large for '{}'; no rank takes this step. Is the loss diverging? Lower the learning "
          "rate or clip gradients",
          me, who, c.describe()));
    }
    if (st != kSlotOk) {
      throw CommError(fmt::format(
          "rank {}: rank {}'s compressed gradients ('{}') arrived undecodable at rank {}; no rank "
          "takes this step",
          me, who, c.describe(), j));
    }
    if (!codec::valid(c, sum + 8, 0, static_cast<int64_t>(slot_bytes(j)) - 8, share_size(j))) {
      throw CommError(fmt::format(
          "rank {}: rank {}'s compressed sum ('{}') arrived undecodable; this rank cannot take "
          "the step, and its replica would differ from the others': restart from a checkpoint",
          me, j, c.describe()));
    }
  }
  // The step is taken: the losses become the residuals, and every rank decodes the same
  // sums into the mean's numerator (identical replicas).
  std::swap(grads_, residual_);
  std::swap(reduced_, reduce_residual_);
  stats_.bytes_reduced += static_cast<uint64_t>(codec::encoded_bytes(c, flat().numel()));
  grads_.zero_();
  for (int j = 0; j < n; ++j) {
    codec::add_decoded(c, gathered_.data() + slot_offsets_[j] + 8, 0,
                       static_cast<int64_t>(slot_bytes(j)) - 8, share_size(j),
                       grads_.data_ptr<float>() + share_begin(j));
  }
}

at::Tensor SyncSGD::residual() const {
  if (!residual_.defined()) return at::Tensor();
  at::Tensor all = residual_.clone();
  const int me = world_->rank();
  all.narrow(0, share_begin(me), share_size(me)).add_(reduce_residual_);
  return all;
}

void SyncSGD::allreduce_gradients() {
  flat().gather_grads(grads_);  // every rank contributes every parameter
  if (residual_.defined()) {
    exchange_encoded();
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
  std::vector<at::Tensor> parts;
  for (const auto& b : buffers()) {
    parts.push_back(b.detach().to(torch::kCPU).contiguous().reshape({-1}).view(torch::kUInt8));
  }
  at::Tensor bytes = torch::cat(parts);
  try {
    broadcast(*world_, bytes, 0, /*tag=*/7401);
  } catch (const CommError& e) {
    throw CommError(fmt::format("{} (SyncSGD's broadcast of rank 0's buffers)", e.what()));
  }
  int64_t at = 0;
  for (const auto& b : buffers()) {
    const int64_t n = b.numel() * static_cast<int64_t>(b.element_size());
    const_cast<at::Tensor&>(b).copy_(bytes.narrow(0, at, n).view(b.scalar_type()).view(b.sizes()));
    at += n;
  }
}

bool SyncSGD::finish(std::chrono::milliseconds) {
  finished_ = true;
  return true;
}

void SyncSGD::resync() {
  if (world_ && world_->size() > 1 && !options_.local()) average_model(*world_);
}

void SyncSGD::save_state(torch::serialize::OutputArchive& archive) const {
  detail::write_int64s(archive, "torch_asgd/SyncSGD/counters", {stats_.steps});
  if (residual_.defined()) {
    archive.write("torch_asgd/SyncSGD/residual", residual_);
    // Flat, zero outside this rank's share: a resume cuts the shares anew.
    at::Tensor sums = torch::zeros_like(residual_);
    const int me = world_->rank();
    sums.narrow(0, share_begin(me), share_size(me)).copy_(reduce_residual_);
    archive.write("torch_asgd/SyncSGD/reduce_residual", sums);
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
  // residuals travel with the next step's gradients; with one rank or local(), where
  // nothing is sent, there is no one to send them to and they are dropped.
  if (residual_.defined()) {
    residual_.zero_();
    reduce_residual_.zero_();
    if (saved.defined()) residual_.copy_(saved);
    if (saved_sums.defined()) {
      // What lies in this rank's share now stays with its sums; the rest (shares cut
      // otherwise, or another rank's file) goes with this rank's next gradient.
      const int me = world_->rank();
      const int64_t b = share_begin(me), len = share_size(me);
      reduce_residual_.copy_(saved_sums.narrow(0, b, len));
      at::Tensor rest = saved_sums.clone();
      rest.narrow(0, b, len).zero_();
      residual_.add_(rest);
    }
  } else if (grads_.defined() && saved.defined()) {
    carry_ = saved.to(grads_.scalar_type());
    if (saved_sums.defined()) carry_.add_(saved_sums.to(grads_.scalar_type()));
  }
}

}  // namespace torch_asgd
