// SyncSGD: the synchronous baseline (ALGORITHMS.md section 3), around any inner
// torch::optim::Optimizer. Every step the gradients are averaged over all ranks with a
// Gloo all-reduce (what DDP does), then every rank takes the inner optimizer's step on
// them: DDP's semantics for any rule. With .local(true) nothing is communicated at all,
// each rank training on its own (the throughput bound).
//
// With .compression(codec) (codec.h) the gradients travel encoded instead: every rank
// encodes its gradient plus what its earlier messages lost (error feedback), the encoded
// gradients are all-gathered, and every rank sums their decoded values in rank order, so
// that the replicas stay bit-identical and, over a run, the gradients applied plus the
// ranks' residuals equal the gradients produced.
//
// step() blocks until every rank has contributed its gradients: the slowest rank sets
// the pace. It throws CommError if the all-reduce does not complete within the World's
// timeout. Under compression it also throws, on every rank alike and before any rank
// takes the step, DivergedError when a rank's gradient holds NaN or Inf (uncompressed,
// those are averaged in like any value) and CommError when a rank's slot does not
// decode. Construction is collective and checks that ranks agree on the parameters and
// the rule (MismatchError otherwise).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/optim/optimizer.h>
#include <torch/optim/sgd.h>
#include <torch/ordered_dict.h>
#include <torch/serialize/archive.h>

#include "torch_asgd/comm/codec.h"
#include "torch_asgd/comm/world.h"
#include "torch_asgd/optim/distributed_optimizer.h"
#include "torch_asgd/optim/staleness.h"

namespace torch_asgd {

struct SyncSGDOptions {
  SyncSGDOptions() = default;
  // No communication at all.
  TORCH_ARG(bool, local) = false;
  // How gradients travel: none (a float32/float64 all-reduce, the default), or a lossy
  // codec (bf16, fp16, int8, topk; float32 parameters only) with an error-feedback
  // residual kept per rank and saved in checkpoints. Every rank must use the same.
  // Ignored (nothing is sent) with one rank or local().
  TORCH_ARG(Compression, compression) = Compression();
};

struct SyncSGDStats {
  int rank = 0;
  int world_size = 1;
  int64_t steps = 0;
  double allreduce_seconds = 0;  // time spent in the all-reduce (waiting included)
  uint64_t bytes_reduced = 0;  // gradient bytes this rank contributed (encoded, if compressed)
  std::string codec;  // the compression, when lossy
  StalenessStats staleness;  // always 0: every update is applied to the model it was computed at
  std::string str() const;
};

class SyncSGD : public DistributedOptimizer {
 public:
  SyncSGD(std::shared_ptr<torch::optim::Optimizer> inner, SyncSGDOptions options = SyncSGDOptions(),
          std::shared_ptr<World> world = nullptr, std::vector<std::string> names = {});
  SyncSGD(std::vector<torch::Tensor> params, const torch::optim::SGDOptions& sgd,
          SyncSGDOptions options = SyncSGDOptions(), std::shared_ptr<World> world = nullptr);
  SyncSGD(const torch::OrderedDict<std::string, torch::Tensor>& named_params,
          const torch::optim::SGDOptions& sgd, SyncSGDOptions options = SyncSGDOptions(),
          std::shared_ptr<World> world = nullptr);
  SyncSGD(std::vector<torch::optim::OptimizerParamGroup> param_groups,
          const torch::optim::SGDOptions& defaults, SyncSGDOptions options = SyncSGDOptions(),
          std::shared_ptr<World> world = nullptr, std::vector<std::string> names = {});

  torch::Tensor step(LossClosure closure = nullptr) override;
  SyncSGDStats stats() const { return stats_; }
  const SyncSGDOptions& options() const { return options_; }
  // Under a lossy codec: what this rank's messages have not yet carried of its
  // gradients (float32, flat, in parameter order); undefined otherwise. Valid until the
  // next step (its buffer is reused): clone it to keep it.
  const at::Tensor& residual() const { return residual_; }

 protected:
  void save_state(torch::serialize::OutputArchive& archive) const override;
  void load_state(torch::serialize::InputArchive& archive) override;

 private:
  void allreduce_gradients();
  // The compressed path: encode, all-gather, decode and sum into grads_.
  void allgather_encoded();
  void set_mean_gradients();
  size_t slot_bytes() const;

  SyncSGDOptions options_;
  std::shared_ptr<World> world_;
  at::Tensor grads_;  // flat gradient buffer (host) for the all-reduce
  at::Tensor residual_;  // error feedback under a lossy codec
  at::Tensor carry_;  // a checkpoint's residual resumed without compression: sent once
  std::vector<uint8_t> encoded_;  // every rank's slot: a status word, then the encoded gradient
  SyncSGDStats stats_;
};

}  // namespace torch_asgd
