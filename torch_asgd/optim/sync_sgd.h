// SyncSGD: the synchronous baseline (ALGORITHMS.md section 3). Every step the
// gradients are averaged over all ranks with a Gloo all-reduce (what DDP does), then
// every rank applies the same SGD update; with .local(true) nothing is communicated
// at all, each rank training on its own (the throughput bound). Same usage as every
// torch_asgd optimizer: loss.backward(); opt.step().
//
// step() blocks until every rank has contributed its gradients: the slowest rank
// sets the pace. It throws CommError if the all-reduce does not complete within the
// World's timeout. Construction is collective and checks that ranks agree on the
// parameters (MismatchError otherwise).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/optim/optimizer.h>
#include <torch/ordered_dict.h>
#include <torch/serialize/archive.h>

#include "torch_asgd/comm/world.h"
#include "torch_asgd/optim/momentum_state.h"
#include "torch_asgd/optim/staleness.h"

namespace torch_asgd {
namespace detail {
class FlatParams;
}

struct SyncSGDOptions : public torch::optim::OptimizerCloneableOptions<SyncSGDOptions> {
  SyncSGDOptions(double lr = 0.01);  // NOLINT: as SGDOptions(lr)
  TORCH_ARG(double, lr);
  TORCH_ARG(double, momentum) = 0;
  TORCH_ARG(double, dampening) = 0;
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(bool, nesterov) = false;
  // Optimizer-wide: no communication at all.
  TORCH_ARG(bool, local) = false;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
};

struct SyncSGDStats {
  int rank = 0;
  int world_size = 1;
  int64_t steps = 0;
  double allreduce_seconds = 0;  // time spent in the all-reduce (waiting included)
  uint64_t bytes_reduced = 0;
  StalenessStats staleness;  // always 0: every update is applied to the model it was computed at
  std::string str() const;
};

class SyncSGD : public torch::optim::Optimizer {
 public:
  SyncSGD(std::vector<torch::Tensor> params, SyncSGDOptions defaults,
          std::shared_ptr<World> world = nullptr);
  SyncSGD(const torch::OrderedDict<std::string, torch::Tensor>& named_params,
          SyncSGDOptions defaults, std::shared_ptr<World> world = nullptr);
  SyncSGD(std::vector<torch::optim::OptimizerParamGroup> param_groups, SyncSGDOptions defaults,
          std::shared_ptr<World> world = nullptr, std::vector<std::string> names = {});
  ~SyncSGD() override;

  torch::Tensor step(LossClosure closure = nullptr) override;
  SyncSGDStats stats() const;

  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 private:
  void allreduce_gradients();

  SyncSGDOptions options_;
  std::shared_ptr<World> world_;
  std::unique_ptr<detail::FlatParams> flat_;
  at::Tensor grads_;  // flat gradient buffer for the all-reduce
  SyncSGDStats stats_;
};

}  // namespace torch_asgd
