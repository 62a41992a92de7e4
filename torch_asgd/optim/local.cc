#include "torch_asgd/optim/local.h"

#include <algorithm>

#include <fmt/format.h>

#include "torch_asgd/comm/error.h"
#include "torch_asgd/comm/world.h"
#include "torch_asgd/optim/detail/checkpoint.h"
#include "torch_asgd/optim/detail/json.h"

namespace torch_asgd {

std::string LocalStats::str() const { return fmt::format("{}: {} local steps", who(), steps); }

std::string LocalStats::to_json() const {
  return detail::JsonObject()
      .add("optimizer", optimizer)
      .add("rank", rank)
      .add("world_size", world_size)
      .add("steps", steps)
      .add("staleness", staleness)
      .str();
}

Local::Local(std::shared_ptr<torch::optim::Optimizer> inner, std::shared_ptr<World> world, Model model)
    : DistributedOptimizer(std::move(inner), "Local", std::move(model)) {
  if (world) {
    stats_.rank = world->rank();
    stats_.world_size = world->size();
    return;
  }
  // Named from the launcher's variables, without a rendezvous: nothing is exchanged.
  try {
    const WorldOptions o = WorldOptions::from_env();
    stats_.rank = std::max(o.rank, 0);
    stats_.world_size = std::max(o.world_size, 1);
  } catch (const ConfigError&) {
  }
}

Local::Local(Params params, const torch::optim::SGDOptions& sgd, std::shared_ptr<World> world, Model model)
    : Local(detail::make_sgd(params.take_groups(), sgd), std::move(world), params.names_or(std::move(model))) {}

torch::Tensor Local::step(LossClosure closure) {
  throw_if_finished();
  torch::Tensor loss = inner_step(closure);
  stats_.staleness.add(0);
  ++stats_.steps;
  return loss;
}

bool Local::finish(std::chrono::milliseconds) {
  finished_ = true;
  return true;
}

void Local::save_state(torch::serialize::OutputArchive& archive) const {
  detail::write_int64s(archive, "torch_asgd/Local/counters", {stats_.steps});
}

void Local::load_state(torch::serialize::InputArchive& archive) {
  stats_.steps = detail::read_int64s(archive, "torch_asgd/Local/counters", 1)[0];
}

}  // namespace torch_asgd
