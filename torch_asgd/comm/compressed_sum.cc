#include "torch_asgd/comm/compressed_sum.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include <fmt/format.h>
#include <torch/torch.h>

#include "torch_asgd/comm/collectives.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/comm/world.h"

namespace torch_asgd {
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

CompressedSum::CompressedSum(std::shared_ptr<World> world, Compression compression, int64_t numel,
                             std::string who, std::string what)
    : world_(std::move(world)),
      compression_(compression),
      numel_(numel),
      who_(std::move(who)),
      what_(std::move(what)) {
  if (!compression_.lossy()) {
    throw ConfigError(fmt::format("{}: CompressedSum needs a lossy compression; '{}' is summed by "
                                  "all_reduce()",
                                  who_, compression_.describe()));
  }
  residual_ = torch::zeros({numel_}, torch::kFloat);
  // Shares of whole codec blocks, as even as blocks allow (some empty when there are
  // fewer blocks than ranks): each share encodes on its own to the bytes the whole
  // vector's encoding has there, and travels without padding.
  const int n = world_->size();
  const int64_t blocks = (numel_ + kCodecBlock - 1) / kCodecBlock;
  for (int j = 0; j <= n; ++j) share_starts_.push_back(std::min(numel_, j * blocks / n * kCodecBlock));
  for (int j = 0; j < n; ++j) slot_offsets_.push_back(j == 0 ? 0 : slot_offsets_[j - 1] + slot_bytes(j - 1));
  const int me = world_->rank();
  reduce_residual_ = torch::zeros({share_size(me)}, torch::kFloat);
  reduced_ = torch::zeros({share_size(me)}, torch::kFloat);
  send_.resize(slot_offsets_[n - 1] + slot_bytes(n - 1));
  received_.resize(static_cast<size_t>(n) * slot_bytes(me));
  gathered_.resize(send_.size());
}

int64_t CompressedSum::share_begin(int j) const { return share_starts_[static_cast<size_t>(j)]; }

int64_t CompressedSum::share_size(int j) const {
  return share_starts_[static_cast<size_t>(j) + 1] - share_begin(j);
}

size_t CompressedSum::slot_bytes(int j) const {
  return 8 + static_cast<size_t>(codec::encoded_bytes(compression_, share_size(j)));
}

int64_t CompressedSum::encoded_bytes() const { return codec::encoded_bytes(compression_, numel_); }

void CompressedSum::sum(at::Tensor& grads_) {
  const Compression& c = compression_;
  const int n = world_->size(), me = world_->rank();
  auto fail_collective = [&](const char* what, const CommError& e) {
    return CommError(fmt::format(
        "{} ({}'s {} of compressed {}). A sum waits for every rank: is one of them stopped, dead "
        "or much slower than the timeout allows?",
        e.what(), who_, what, what_));
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
  for (int j = 0; j < n; ++j) {
    const uint8_t* sum = gathered_.data() + slot_offsets_[j];
    const auto [st, who] = read_status(sum);
    if (st == kGradientNotEncodable) {
      throw DivergedError(fmt::format(
          "rank {}: rank {}'s {} hold NaN or Inf (or values too large for '{}') and cannot be "
          "encoded; no rank takes this step. Is the loss diverging? Lower the learning rate or "
          "clip gradients",
          me, who, what_, c.describe()));
    }
    if (st == kSumNotEncodable) {
      throw DivergedError(fmt::format(
          "rank {}: the sum of the ranks' {} for rank {}'s share of the parameters is too large "
          "for '{}'; no rank takes this step. Is the loss diverging? Lower the learning rate or "
          "clip gradients",
          me, what_, who, c.describe()));
    }
    if (st != kSlotOk) {
      throw CommError(fmt::format(
          "rank {}: rank {}'s compressed {} ('{}') arrived undecodable at rank {}; no rank takes "
          "this step",
          me, who, what_, c.describe(), j));
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
  grads_.zero_();
  for (int j = 0; j < n; ++j) {
    codec::add_decoded(c, gathered_.data() + slot_offsets_[j] + 8, 0,
                       static_cast<int64_t>(slot_bytes(j)) - 8, share_size(j),
                       grads_.data_ptr<float>() + share_begin(j));
  }
}

at::Tensor CompressedSum::residual() const {
  at::Tensor all = residual_.clone();
  const int me = world_->rank();
  all.narrow(0, share_begin(me), share_size(me)).add_(reduce_residual_);
  return all;
}

at::Tensor CompressedSum::sum_residual() const {
  // Flat, zero outside this rank's share: a resume cuts the shares anew.
  at::Tensor sums = torch::zeros_like(residual_);
  const int me = world_->rank();
  sums.narrow(0, share_begin(me), share_size(me)).copy_(reduce_residual_);
  return sums;
}

void CompressedSum::restore(const at::Tensor& vector_residual, const at::Tensor& sum_residual) {
  residual_.zero_();
  reduce_residual_.zero_();
  if (vector_residual.defined()) residual_.copy_(vector_residual);
  if (sum_residual.defined()) {
    // What lies in this rank's share now stays with its sums; the rest (shares cut
    // otherwise, or another rank's file) goes with this rank's next vector.
    const int me = world_->rank();
    const int64_t b = share_begin(me), len = share_size(me);
    reduce_residual_.copy_(sum_residual.narrow(0, b, len));
    at::Tensor rest = sum_residual.clone();
    rest.narrow(0, b, len).zero_();
    residual_.add_(rest);
  }
}

}  // namespace torch_asgd
