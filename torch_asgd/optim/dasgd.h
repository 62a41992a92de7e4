// DASGD: decentralized asynchronous SGD (ALGORITHMS.md section 1 and 1b), a drop-in
// torch::optim::Optimizer.
//
//   auto world = torch_asgd::World::from_env();
//   torch_asgd::DASGD opt(model->named_parameters(),
//                         torch_asgd::DASGDOptions(0.05).momentum(0.9), world);
//   for (...) { opt.zero_grad(); loss.backward(); opt.step(); }
//   opt.finish();
//
// Every rank applies its own update at once with the local rule (SGD with momentum,
// dampening, Nesterov, weight decay; exactly torch::optim::SGD's arithmetic), adds the
// change to an accumulator, hands the accumulator to every peer every
// `broadcast_every` steps, and applies whatever its peers' deltas have arrived. step()
// never waits for another rank. In kGossip mode ranks instead mix models with one peer
// per round on a rotating exponential graph.
//
// Construction is collective: every rank builds its DASGD at the same point, with the
// same parameters (names, shapes, dtypes) and mode, or every rank throws
// MismatchError naming the first difference. Thread safety: one training thread.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/optim/optimizer.h>
#include <torch/ordered_dict.h>
#include <torch/serialize/archive.h>

#include "torch_asgd/comm/channel.h"
#include "torch_asgd/comm/world.h"
#include "torch_asgd/optim/momentum_state.h"
#include "torch_asgd/optim/staleness.h"

namespace torch_asgd {
namespace detail {
class DevicePipeline;
class FlatParams;
}

enum class DASGDMode {
  kDelta = 0,   // accumulated updates to every peer, applied by addition (section 1)
  kGossip = 1,  // model mixing with one peer per round (section 1b)
};

struct DASGDOptions : public torch::optim::OptimizerCloneableOptions<DASGDOptions> {
  DASGDOptions(double lr = 0.01);  // NOLINT: as SGDOptions(lr)
  // The local update rule, per parameter group, as torch::optim::SGDOptions.
  TORCH_ARG(double, lr);
  TORCH_ARG(double, momentum) = 0;
  TORCH_ARG(double, dampening) = 0;
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(bool, nesterov) = false;
  // Optimizer-wide: read from the options given to the constructor.
  TORCH_ARG(int64_t, broadcast_every) = 1;  // k: local steps per exchange
  TORCH_ARG(DASGDMode, mode) = DASGDMode::kDelta;
  TORCH_ARG(double, gossip_alpha) = 0.5;  // mixing weight in kGossip mode
  // A peer whose connection fails is logged once and left behind; the others train
  // on (kThrow: step() throws CommError instead).
  TORCH_ARG(PeerFailure, on_peer_failure) = PeerFailure::kContinue;
  // Delta mode, parameters on a GPU: copy outgoing deltas on a side stream into pinned
  // buffers and hand them over from a background thread, and stage arrivals through
  // pinned memory on that stream (detail::DevicePipeline), so that the training thread
  // waits for neither. Off by default: written without a GPU and never run (README,
  // "GPU"). Ignored for parameters on the CPU.
  TORCH_ARG(bool, overlap) = false;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
};

using DASGDParamState = MomentumState;

// What a rank has done and seen; cheap to read at any time.
struct DASGDStats {
  int rank = 0;
  int world_size = 1;
  int64_t local_steps = 0;     // step() calls that applied a gradient
  int64_t version = 0;         // gradient updates, from any rank, in the local model
  int64_t remote_updates = 0;  // peer updates applied here (delta mode)
  int64_t models_mixed = 0;    // peer models mixed in (gossip mode)
  // Over every applied update: local ones (staleness 0) and peers'. In gossip mode,
  // one entry per mixed model: how many updates it lacked.
  StalenessStats staleness;
  uint64_t messages_sent = 0, messages_received = 0, coalesced = 0, rejected = 0, dropped = 0;
  std::vector<int> failed_peers;  // ranks whose connection failed
  std::string str() const;
};

class DASGD : public torch::optim::Optimizer {
 public:
  DASGD(std::vector<torch::Tensor> params, DASGDOptions defaults,
        std::shared_ptr<World> world = nullptr);
  // Names make mismatch errors name the parameter (e.g. module->named_parameters()).
  DASGD(const torch::OrderedDict<std::string, torch::Tensor>& named_params, DASGDOptions defaults,
        std::shared_ptr<World> world = nullptr);
  DASGD(std::vector<torch::optim::OptimizerParamGroup> param_groups, DASGDOptions defaults,
        std::shared_ptr<World> world = nullptr, std::vector<std::string> names = {});
  // Calls finish() with a 10 s bound if it was not called.
  ~DASGD() override;

  // Applies this rank's gradients, hands the accumulated update to the network every
  // broadcast_every steps, applies what peers sent. Never waits for a peer. Rethrows
  // a peer's failure as CommError (unless on_peer_failure is kContinue).
  torch::Tensor step(LossClosure closure = nullptr) override;

  // Sends what is still accumulated, says goodbye, waits up to `timeout` for every
  // peer's last updates and applies them. In delta mode, after every rank's clean
  // finish the replicas are equal (up to floating-point summation order). Returns
  // false if some peer did not finish in time. step() after finish() throws.
  bool finish(std::chrono::milliseconds timeout = std::chrono::seconds(60));

  DASGDStats stats() const;
  const DASGDOptions& defaults() const { return options_; }

  void save(torch::serialize::OutputArchive& archive) const override;
  // Throws MismatchError if the archive was saved for other parameters.
  void load(torch::serialize::InputArchive& archive) override;

 private:
  friend struct DASGDTestAccess;  // deterministic delivery in tests

  void init();
  void send_delta();
  void gossip_request();
  void apply(std::vector<Message> messages);
  void apply_one(const Message& m);

  DASGDOptions options_;
  std::shared_ptr<World> world_;
  std::unique_ptr<Channel> channel_;
  // After channel_: destroyed (its hand-off thread stopped) before the channel.
  std::unique_ptr<detail::DevicePipeline> pipeline_;
  std::vector<std::string> names_;
  std::unique_ptr<detail::FlatParams> flat_;
  at::Tensor delta_;       // accumulated local change not yet handed over
  UpdateStats pending_;    // the updates in delta_
  int64_t local_steps_ = 0;
  int64_t version_ = 0;
  int64_t remote_updates_ = 0;
  int64_t models_mixed_ = 0;
  StalenessStats staleness_;
  int64_t gossip_round_ = 0;
  std::map<int64_t, at::Tensor> snapshots_;  // gossip: model at each open request
  bool finished_ = false;
  bool hold_arrivals_ = false;  // tests: step() leaves arrivals for DASGDTestAccess
};

std::string to_string(DASGDMode mode);

}  // namespace torch_asgd
