// Gossip: decentralized model mixing for many ranks (docs/algorithms.md, "Gossip"), a
// drop-in torch::optim::Optimizer around any inner torch::optim::Optimizer.
//
// Every `exchange_every` local steps a rank opens an exchange with one peer on a
// rotating exponential graph (peer rank + 2^r mod n, r cycling): it sends its model s,
// the peer replies with its model y as it was before mixing and mixes
// x_peer += alpha (s - x_peer), and the requester mixes x += alpha (y - s) when the
// reply comes. The two mixes cancel in the sum, so the sum of all models changes only by
// the ranks' own local steps: the average model follows SGD exactly, and gossip only
// contracts the disagreement. What keeps that true:
//   - one exchange at a time per rank: a rank with an exchange open declines every
//     request, but the one from the very peer it waits for when that peer's rank is lower
//     (crossed requests mix once);
//   - requests, replies and declines are ordered messages: delivered once, never merged;
//   - an exchange whose reply does not come within exchange_timeout is given up (the next
//     one goes to the next peer); if its reply comes later, the requester sends the
//     responder its half back (an undo), which the responder subtracts;
//   - a reply that cannot reach its requester (it died) is counted as a broken pair.
// Nobody waits: step() never blocks on a peer.
//
// Under a lossy compression (bf16, fp16, int8) the models travel encoded, and both sides
// mix with the values the other decodes: the requester keeps s^ = decode(encode(s)), the
// responder mixes x_peer += alpha (s^ - y^) with y^ = decode(encode(y)) of its own reply,
// the requester x += alpha (y^ - s^). The mixes still cancel in the sum; each model takes
// on alpha times the codecs' rounding, which no later message corrects (models, unlike
// deltas, are not summed, so there is no residual to carry).
//
// Buffers (Model): equal at start (rank 0's); the floating-point ones travel and mix with
// the parameters in every exchange (the same alpha: they are averaged where the models
// are); integer buffers (BatchNorm's batch count) stay each rank's own; resync()
// averages the floating-point ones.
//
// Construction is collective, as DASGD's. Thread safety: one training thread.
#pragma once

#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <optional>
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
#include "torch_asgd/optim/staleness.h"

namespace torch_asgd {

struct GossipOptions {
  GossipOptions() = default;
  // k: local steps between exchanges this rank opens.
  TORCH_ARG(int64_t, exchange_every) = 1;
  // alpha: the mixing weight, in (0, 1]; 0.5 averages the two models.
  TORCH_ARG(double, alpha) = 0.5;
  TORCH_ARG(PeerFailure, on_peer_failure) = PeerFailure::kContinue;
  // How long a requester waits for a reply before it gives the exchange up.
  TORCH_ARG(std::chrono::milliseconds, exchange_timeout) = std::chrono::seconds(5);
  // How requests and replies travel: none (default), bf16, fp16 or int8 (codec.h),
  // float32 parameters only. topk is refused: a model is not sparse. Every rank must use
  // the same. Undos travel uncompressed.
  TORCH_ARG(Compression, compression) = Compression();
};

struct GossipStats : OptimizerStats {
  GossipStats() : OptimizerStats("Gossip") {}
  int64_t local_steps = 0;
  std::vector<int64_t> versions;  // the largest count of each rank's updates mixed in
  // Exchanges this rank opened: completed (mixed), declined by the peer (or crossed),
  // given up (no reply in time); and what became of replies that came too late.
  int64_t opened = 0, completed = 0, declined = 0, given_up = 0, undone = 0;
  // Exchanges other ranks opened with this one: answered (mixed) and declined.
  int64_t answered = 0, refused = 0, undos_applied = 0;
  // Mixes whose other half was lost: a reply to a requester that died, a late reply
  // that could not be undone because this rank had closed.
  int64_t broken = 0;
  // Per mixed model: what this model held that the peer's lacked (docs/algorithms.md).
  StalenessStats lag;
  uint64_t messages_sent = 0, messages_received = 0, rejected = 0, dropped = 0;
  std::vector<int> failed_peers;
  std::string codec;  // the compression of requests and replies, when lossy
  std::string str() const override;
  std::string to_json() const override;
};

class Gossip : public DistributedOptimizer {
 public:
  Gossip(std::shared_ptr<torch::optim::Optimizer> inner, GossipOptions options = GossipOptions(),
         std::shared_ptr<World> world = nullptr, Model model = {});
  Gossip(Params params, const torch::optim::SGDOptions& sgd, GossipOptions options = GossipOptions(),
        std::shared_ptr<World> world = nullptr, Model model = {});
  Gossip(std::shared_ptr<torch::optim::Optimizer> inner, GossipOptions options,
         std::unique_ptr<Transport> transport, Model model = {});
  // If finish() was not called: warns, then finishes with a 10 s bound.
  ~Gossip() override;

  torch::Tensor step(LossClosure closure = nullptr) override;

  // Opens no more exchanges and tells every peer so; waits (up to `timeout`) until this
  // rank's own exchanges are settled, then goes on answering peers' requests until every
  // live peer has stopped stepping too (a rank that finishes first stays a responder, so
  // the work its slower peers do after that still mixes into its model); then says
  // goodbye. Returns false if something was left unsettled or some peer did not finish in
  // time.
  bool finish(std::chrono::milliseconds timeout = std::chrono::seconds(60)) override;

  // Collective: every rank's model (and floating-point buffers) becomes the mean of all
  // ranks' (resuming from checkpoints of different moments). Call it on every rank after
  // load(), before the first step.
  void resync() override;

  GossipStats stats() const;
  const GossipOptions& options() const { return options_; }

 protected:
  void save_state(torch::serialize::OutputArchive& archive) const override;
  void load_state(torch::serialize::InputArchive& archive) override;
  std::unique_ptr<OptimizerStats> stats_snapshot() const override {
    return std::make_unique<GossipStats>(stats());
  }

 private:
  friend struct GossipTestAccess;

  struct Exchange {
    int peer = -1;
    int64_t id = 0;
    at::Tensor snapshot;  // s: this model when the request went out
    std::chrono::steady_clock::time_point opened;
  };

  void check_options() const;  // ConfigError naming the option
  void init();
  void take(Arrivals arrivals);
  void handle_pending();
  void handle(const Message& m);
  void open_exchange();
  void settle_with_gone_peers(bool may_poll = true);
  void give_up_if_late();
  void send(int peer, int64_t kind, int64_t id, const at::Tensor& payload);
  // Under a lossy compression: the bytes that carry `model` (CPU float32), and in
  // `decoded` what the receiver will make of them. Throws DivergedError if the model
  // cannot be encoded (NaN, Inf).
  at::Tensor encode_model(const at::Tensor& model, at::Tensor& decoded) const;
  // The model a request or reply carries (decoded, under compression); CommError naming
  // `what` if it is malformed.
  at::Tensor model_in(const Message& m, const char* what) const;
  void record_lag(const Message& m);
  // What an exchange mixes: the parameters, then the floating-point buffers. The vector
  // now (the flat parameters themselves when there are no such buffers, else a CPU copy).
  at::Tensor model_vector(bool copy) const;
  int64_t model_numel() const;
  // model <- keep * model + sum of c * v over `terms` (full-length vectors).
  void update_model(double keep, const std::vector<std::pair<at::Tensor, double>>& terms);
  std::vector<int> gone_peers() const;  // failed or said goodbye
  bool every_peer_done_or_gone() const;

  GossipOptions options_;
  std::shared_ptr<World> world_;
  std::unique_ptr<Transport> transport_;
  int rank_ = 0;
  int size_ = 1;
  int rounds_ = 1;  // ceil(log2 n): offsets 1, 2, 4, ...
  int64_t round_ = 0;
  int64_t next_id_ = 1;
  std::optional<Exchange> open_;
  std::map<int64_t, Exchange> given_up_;  // by id: replies that may still come
  std::deque<Message> pending_;           // arrived, not yet handled
  // By peer: the kinds of the last messages sent to it (a reply among those it never
  // acknowledged before dying was lost).
  std::vector<std::deque<int64_t>> sent_kinds_;
  std::vector<bool> counted_failed_;
  std::vector<int64_t> versions_;
  int64_t local_steps_ = 0;
  GossipStats counts_;
  bool finishing_ = false;  // opens no more exchanges
  std::vector<bool> peer_done_;  // by peer: it said it takes no more steps (kDone)
  bool closed_ = false;     // our goodbye is out: answers nothing
  std::vector<at::Tensor> mixed_buffers_;  // the floating-point buffers
  bool held_ = false;  // tests: step() leaves arrivals for GossipTestAccess
};

}  // namespace torch_asgd
