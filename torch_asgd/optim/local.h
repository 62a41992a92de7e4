// Local: no communication at all. Every rank trains its own model with the inner
// optimizer (any torch::optim::Optimizer), as if alone: the upper bound on throughput
// that the other algorithms are measured against (docs/algorithms.md, "Baselines").
// It answers the common contract (distributed_optimizer.h) so that a loop written for the
// others runs it unchanged; finish() and resync() do nothing (there is nothing to send,
// and nothing is averaged). Construction is not collective.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/optim/optimizer.h>
#include <torch/optim/sgd.h>

#include "torch_asgd/optim/distributed_optimizer.h"
#include "torch_asgd/optim/staleness.h"

namespace torch_asgd {

struct LocalStats : OptimizerStats {
  LocalStats() : OptimizerStats("Local") {}
  int64_t steps = 0;
  StalenessStats staleness;  // always 0: every update is this rank's own, applied at once
  std::string str() const override;
  std::string to_json() const override;
};

class Local : public DistributedOptimizer {
 public:
  // `world` only names this rank in the statistics (nullptr: the launcher's variables
  // name it; no rendezvous either way).
  explicit Local(std::shared_ptr<torch::optim::Optimizer> inner, std::shared_ptr<World> world = nullptr,
                 Model model = {});
  // Shorthand: an inner torch::optim::SGD with these options.
  Local(Params params, const torch::optim::SGDOptions& sgd, std::shared_ptr<World> world = nullptr,
        Model model = {});

  torch::Tensor step(LossClosure closure = nullptr) override;
  bool finish(std::chrono::milliseconds timeout = std::chrono::seconds(60)) override;
  void resync() override {}
  LocalStats stats() const { return stats_; }

 protected:
  void save_state(torch::serialize::OutputArchive& archive) const override;
  void load_state(torch::serialize::InputArchive& archive) override;
  std::unique_ptr<OptimizerStats> stats_snapshot() const override {
    return std::make_unique<LocalStats>(stats_);
  }

 private:
  LocalStats stats_;
};

}  // namespace torch_asgd
