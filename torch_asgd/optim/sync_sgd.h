// SyncSGD: the synchronous baseline (docs/algorithms.md, "Baselines"), around any inner
// torch::optim::Optimizer. Every step the gradients are averaged over all ranks with a
// Gloo all-reduce (what DDP does), then every rank takes the inner optimizer's step on
// them: DDP's semantics for any rule. (No communication at all, the throughput bound:
// Local, local.h.)
//
// With .compression(codec) (codec.h) the gradients travel encoded instead, summed by a
// CompressedSum (comm/compressed_sum.h: a reduce-scatter and an all-gather of encoded
// shares with error feedback), so that the replicas stay bit-identical and, over a run,
// the gradients applied plus the ranks' residuals equal the gradients produced.
//
// step() blocks until every rank has contributed its gradients: the slowest rank sets
// the pace. It throws CommError if the all-reduce does not complete within the World's
// timeout. Under compression it also throws, on every rank alike and before any rank
// takes the step, DivergedError when a rank's gradient holds NaN or Inf (uncompressed,
// those are averaged in like any value) or a share's sum is too large for the codec, and
// CommError when a rank's encoded share arrives undecodable at the rank that reduces it
// (a sum that arrives undecodable fails the rank that received it). Construction is
// collective and checks that ranks agree on the parameters and the rule (MismatchError
// otherwise).
//
// Buffers (Model): equal at start (rank 0's), and with broadcast_buffers (the default, as
// DDP's) rank 0's again after every step, so that every rank's forward pass sees rank 0's
// running statistics; otherwise each rank keeps its own. finish() has nothing to deliver
// and returns true; resync() averages parameters and buffers.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/optim/optimizer.h>
#include <torch/optim/sgd.h>
#include <torch/ordered_dict.h>
#include <torch/serialize/archive.h>

#include "torch_asgd/comm/codec.h"
#include "torch_asgd/comm/compressed_sum.h"
#include "torch_asgd/comm/world.h"
#include "torch_asgd/optim/distributed_optimizer.h"
#include "torch_asgd/optim/staleness.h"

namespace torch_asgd {

struct SyncSGDOptions {
  SyncSGDOptions() = default;
  // How gradients travel: none (a float32/float64 all-reduce, the default), or a lossy
  // codec (bf16, fp16, int8, topk; float32 parameters only) with an error-feedback
  // residual kept per rank and saved in checkpoints. Every rank must use the same.
  // Ignored (nothing is sent) with one rank.
  TORCH_ARG(Compression, compression) = Compression();
  // After every step every rank takes rank 0's buffers (DDP's broadcast_buffers). Off:
  // each rank keeps its own. Ignored without buffers or with one rank.
  TORCH_ARG(bool, broadcast_buffers) = true;
};

struct SyncSGDStats : OptimizerStats {
  SyncSGDStats() : OptimizerStats("SyncSGD") {}
  int64_t steps = 0;
  // Time spent in the all-reduce (waiting included; under compression the whole
  // exchange, the decoding and encoding of this rank's share included).
  double allreduce_seconds = 0;
  uint64_t bytes_reduced = 0;  // gradient bytes this rank contributed (encoded, if compressed)
  std::string codec;  // the compression, when lossy
  StalenessStats staleness;  // always 0: every update is applied to the model it was computed at
  std::string str() const override;
  std::string to_json() const override;
};

class SyncSGD : public DistributedOptimizer {
 public:
  SyncSGD(std::shared_ptr<torch::optim::Optimizer> inner, SyncSGDOptions options = SyncSGDOptions(),
          std::shared_ptr<World> world = nullptr, Model model = {});
  SyncSGD(Params params, const torch::optim::SGDOptions& sgd, SyncSGDOptions options = SyncSGDOptions(),
        std::shared_ptr<World> world = nullptr, Model model = {});

  torch::Tensor step(LossClosure closure = nullptr) override;
  // Nothing to deliver: every step was completed by every rank. Returns true.
  bool finish(std::chrono::milliseconds timeout = std::chrono::seconds(60)) override;
  void resync() override;
  SyncSGDStats stats() const { return stats_; }
  const SyncSGDOptions& options() const { return options_; }
  // Under a lossy codec: what this rank holds that no step has applied yet (float32,
  // flat, in parameter order): what the encoding of its gradients lost, plus, on its
  // share of the parameters, what the encoding of the reduced sums lost. Undefined
  // otherwise. A new tensor.
  at::Tensor residual() const;

 protected:
  void save_state(torch::serialize::OutputArchive& archive) const override;
  void load_state(torch::serialize::InputArchive& archive) override;
  std::unique_ptr<OptimizerStats> stats_snapshot() const override {
    return std::make_unique<SyncSGDStats>(stats_);
  }

 private:
  void allreduce_gradients();
  void set_mean_gradients();
  void broadcast_buffers();

  SyncSGDOptions options_;
  std::shared_ptr<World> world_;
  at::Tensor grads_;  // flat gradient buffer (host) for the all-reduce
  std::unique_ptr<CompressedSum> compressed_;  // under a lossy codec
  at::Tensor carry_;  // a checkpoint's residuals resumed without compression: sent once
  SyncSGDStats stats_;
};

}  // namespace torch_asgd
