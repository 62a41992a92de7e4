// DASGD: decentralized asynchronous SGD (docs/algorithms.md, "DASGD"), a drop-in
// torch::optim::Optimizer around any inner torch::optim::Optimizer (the local rule).
//
//   auto world = torch_asgd::World::from_env();
//   torch_asgd::DASGD opt(
//       std::make_shared<torch::optim::AdamW>(model->parameters(), torch::optim::AdamWOptions(1e-3)),
//       torch_asgd::DASGDOptions().average(true), world, model);
//   for (...) { opt.zero_grad(); loss.backward(); opt.step(); }
//   opt.finish();
//
// or, as shorthand for an inner torch::optim::SGD:
//
//   torch_asgd::DASGD opt(model->named_parameters(), torch::optim::SGDOptions(0.05).momentum(0.9),
//                         torch_asgd::DASGDOptions(), world);
//
// Every rank applies its own step at once (the inner optimizer's), and every
// `broadcast_every` steps hands the change since its last hand-over to every peer; it
// applies whatever its peers' changes have arrived by addition. step() never waits for
// another rank (unless max_lead asks it to). Staleness is set-based and exact
// (staleness.h): every delta carries the version vectors of the updates in it.
//
// The step's meaning: every rank's change is added at full weight to every replica, so
// with n ranks a replica moves about n times as far per unit of time as one rank alone
// (asynchronous SGD's semantics: n steps of one rank's batch). A loop tuned for DDP,
// whose step is the mean of the ranks' gradients, wants average(true): each rank's
// change is scaled by 1/n, so that the n ranks' changes add up to their mean.
//
// Buffers (Model): equal at start (rank 0's); then each rank keeps its own (they are not
// deltas); resync() averages them.
//
// Construction is collective: every rank builds its DASGD at the same point, with the
// same parameters (names, shapes, dtypes) and the same local rule, or every rank throws
// MismatchError naming the first difference. Thread safety: one training thread.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <torch/optim/optimizer.h>
#include <torch/optim/sgd.h>
#include <torch/ordered_dict.h>
#include <torch/serialize/archive.h>

#include "torch_asgd/comm/channel.h"
#include "torch_asgd/comm/transport.h"
#include "torch_asgd/comm/world.h"
#include "torch_asgd/optim/distributed_optimizer.h"
#include "torch_asgd/optim/lead.h"
#include "torch_asgd/optim/staleness.h"

namespace torch_asgd {
namespace detail {
class BoundedLead;
class DevicePipeline;
class PendingUpdates;
}  // namespace detail

// Optimizer-wide settings; the local rule's are the inner optimizer's.
struct DASGDOptions {
  DASGDOptions() = default;
  // k: local steps per hand-over of the accumulated change.
  TORCH_ARG(int64_t, broadcast_every) = 1;
  // A peer whose connection fails is logged once and left behind; the others train
  // on (kThrow: step() throws CommError instead).
  TORCH_ARG(PeerFailure, on_peer_failure) = PeerFailure::kContinue;
  // L: the bounded lead (0: unbounded, today's algorithm). See LeadPolicy.
  TORCH_ARG(int64_t, max_lead) = 0;
  TORCH_ARG(LeadPolicy, lead_policy) = LeadPolicy::kWait;
  TORCH_ARG(LeadMeasure, lead_measure) = LeadMeasure::kApplied;
  // The longest a rank waits for one peer to catch up before it leaves it behind (as a
  // dead peer is); the peer is waited for again once it has caught up.
  TORCH_ARG(std::chrono::milliseconds, lead_timeout) = std::chrono::seconds(10);
  // How deltas travel (codec.h): none, bf16, fp16, int8 or topk, float32 parameters
  // only. A lossy codec keeps what a message lost and sends it with the next one (error
  // feedback), and finish() sends what is left uncompressed, so that after every rank's
  // clean finish() the replicas still agree. Every rank must use the same.
  TORCH_ARG(Compression, compression) = Compression();
  // Parameters on a GPU: copy outgoing deltas on a side stream and hand them over from a
  // background thread (detail::DevicePipeline). Written without a GPU and never run
  // (docs/gpu.md); ignored for parameters on the CPU.
  TORCH_ARG(bool, overlap) = false;
  // DDP's averaged step: each rank's change (its inner step) is scaled by 1/n (n: the
  // world size) before it is applied and sent, so that the n ranks' changes together
  // move every replica by their mean. Off: the change is applied at full weight
  // everywhere (the DASGD paper's algorithm). Every rank must use the same.
  TORCH_ARG(bool, average) = false;
};

// What a rank has done and seen; cheap to read at any time.
struct DASGDStats : OptimizerStats {
  DASGDStats() : OptimizerStats("DASGD") {}
  int64_t local_steps = 0;     // step() calls
  int64_t version = 0;         // updates, from any rank, the local model holds
  int64_t remote_updates = 0;  // peer updates applied here
  std::vector<int64_t> versions;  // the version vector: updates of each rank held here
  StalenessStats staleness;       // over every applied update, own ones (tau 0) included
  // Bounded lead (counted as options().lead_measure() says) over the slowest live peer
  // at the last step, its maximum after any step, and the waiting it cost.
  int64_t lead = 0;
  int64_t max_lead_seen = 0;
  int64_t lead_waits = 0, lead_timeouts = 0, damped_steps = 0;
  double lead_wait_seconds = 0;
  std::vector<int> left_behind;  // peers not waited for (stalled beyond lead_timeout)
  uint64_t messages_sent = 0, messages_received = 0, coalesced = 0, rejected = 0, dropped = 0;
  uint64_t max_held_bytes = 0;  // the most payload bytes the channel keeps for one peer now
  std::vector<int> failed_peers;  // ranks whose connection failed
  bool overlap_active = false;    // deltas leave through detail::DevicePipeline (overlap, GPU)
  std::string str() const override;
  std::string to_json() const override;
};

class DASGD : public DistributedOptimizer {
 public:
  // `model`: the module (its parameters' names and its buffers), or the names alone.
  // `world`: nullptr takes the process's default (distributed_optimizer.h).
  DASGD(std::shared_ptr<torch::optim::Optimizer> inner, DASGDOptions options = DASGDOptions(),
        std::shared_ptr<World> world = nullptr, Model model = {});
  // Shorthand: an inner torch::optim::SGD with these options.
  DASGD(Params params, const torch::optim::SGDOptions& sgd, DASGDOptions options = DASGDOptions(),
        std::shared_ptr<World> world = nullptr, Model model = {});
  // Over a transport of the caller's (tests script one; Channel is the real one).
  DASGD(std::shared_ptr<torch::optim::Optimizer> inner, DASGDOptions options,
        std::unique_ptr<Transport> transport, Model model = {});
  // If finish() was not called: warns, then finishes with a 10 s bound.
  ~DASGD() override;

  // The inner step; the change goes to every peer every broadcast_every steps; what
  // peers sent is applied. Never waits for a peer (but see max_lead). Throws CommError
  // when a peer's update was rejected (the replicas could no longer agree), and
  // DivergedError when this rank's model turned non-finite.
  torch::Tensor step(LossClosure closure = nullptr) override;

  // Sends what is still accumulated, says goodbye, waits up to `timeout` for every
  // peer's last updates and applies them. After every rank's clean finish the replicas
  // are equal (up to floating-point summation order). Returns false if some peer did not
  // finish in time. step() after finish() throws.
  bool finish(std::chrono::milliseconds timeout = std::chrono::seconds(60)) override;

  // Collective: every rank's model (and floating-point buffers) becomes the mean of all
  // ranks', and the version vectors start again from there. For resuming from
  // checkpoints written at different moments; call it on every rank after load(),
  // before the first step, when nothing is in flight (under a lossy codec nothing kept
  // either: a fresh process).
  void resync() override;

  DASGDStats stats() const;
  const DASGDOptions& options() const { return options_; }

 protected:
  void save_state(torch::serialize::OutputArchive& archive) const override;
  void load_state(torch::serialize::InputArchive& archive) override;
  std::unique_ptr<OptimizerStats> stats_snapshot() const override {
    return std::make_unique<DASGDStats>(stats());
  }

 private:
  friend struct DASGDTestAccess;  // scripted delivery in tests

  void check_options() const;  // ConfigError naming the option
  void init();
  void send_delta();
  void apply(Arrivals arrivals);
  void check_rejections();
  void rebase();  // what the parameters hold now counts as sent
  int64_t lead() const;
  void heard(int peer, int64_t seen_of_mine, int64_t its_own);  // news of a peer's progress
  void wait_for_lead();
  void send_view();
  std::string last_applied() const;

  DASGDOptions options_;
  std::shared_ptr<World> world_;
  std::unique_ptr<Transport> transport_;
  // After transport_: destroyed (its hand-off thread stopped) before the transport.
  std::unique_ptr<detail::DevicePipeline> pipeline_;
  int rank_ = 0;
  int size_ = 1;
  at::Tensor shadow_;  // the parameters minus the change not yet handed over
  std::unique_ptr<detail::PendingUpdates> pending_;
  std::vector<int64_t> versions_;  // this model's version vector
  std::unique_ptr<detail::BoundedLead> lead_;  // max_lead's bookkeeping
  std::vector<int64_t> view_sent_;  // versions_ as the peers last heard of them
  int64_t local_steps_ = 0;
  int64_t remote_updates_ = 0;
  StalenessStats staleness_;
  int64_t max_lead_seen_ = 0, lead_waits_ = 0, lead_timeouts_ = 0, damped_steps_ = 0;
  double lead_wait_seconds_ = 0;
  uint64_t rejected_seen_ = 0;
  int last_sender_ = -1;
  int64_t last_sender_update_ = 0;
  bool rebase_pending_ = false;
  bool hold_arrivals_ = false;       // tests: step() leaves arrivals for DASGDTestAccess
  std::vector<int64_t>* tau_log_ = nullptr;  // tests: every recorded tau, in order
};

}  // namespace torch_asgd
