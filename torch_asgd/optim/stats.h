// What every torch_asgd optimizer reports about itself: DistributedOptimizer::stats()
// returns one of these (DASGDStats, GossipStats, SyncSGDStats, LocalStats, ServerStats,
// AsGradWorkerStats), each naming the optimizer, so that two optimizers' lines (a GAN's
// generator and discriminator, say) can be told apart and a loop written against
// DistributedOptimizer can log any of them.
#pragma once

#include <string>

namespace torch_asgd {

struct OptimizerStats {
  std::string optimizer;  // "DASGD", "Gossip", "SyncSGD", "Local", "ParameterServer", "AsGradWorker"
  int rank = 0;
  int world_size = 1;

  virtual ~OptimizerStats() = default;
  // Human-readable, starting with "<optimizer> rank <rank>/<world_size>: ".
  virtual std::string str() const = 0;
  // The same counters as one JSON object, starting with "optimizer", "rank", "world_size".
  virtual std::string to_json() const = 0;

 protected:
  OptimizerStats() = default;
  explicit OptimizerStats(std::string name) : optimizer(std::move(name)) {}
  OptimizerStats(const OptimizerStats&) = default;
  OptimizerStats& operator=(const OptimizerStats&) = default;
  // "<optimizer> rank <rank>/<world_size>"
  std::string who() const;
};

}  // namespace torch_asgd
