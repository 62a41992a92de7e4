#include "torch_asgd/optim/gossip.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include "torch_asgd/comm/codec.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/detail/log.h"
#include "torch_asgd/optim/detail/checkpoint.h"
#include "torch_asgd/optim/detail/compression_checks.h"
#include "torch_asgd/optim/detail/flat_params.h"
#include "torch_asgd/optim/detail/json.h"

namespace torch_asgd {
namespace {

// The gossip protocol's messages (ordered, stream 0); metadata: kind, exchange id,
// then the sender's version vector. kDone: the sender takes no more steps and opens no
// more exchanges (it still answers until it says goodbye).
enum Kind : int64_t { kRequest = 1, kReply = 2, kDecline = 3, kUndo = 4, kDone = 5 };
constexpr size_t kKindsKept = 64;  // per peer, for counting lost replies

}  // namespace

std::string GossipStats::str() const {
  std::string failed =
      failed_peers.empty() ? "" : fmt::format("; failed peers {}", fmt::join(failed_peers, ", "));
  return fmt::format(
      "{}: {} local steps; exchanges opened {}, completed {}, declined {}, given up {}, "
      "undone {}; answered {}, refused {}, undos applied {}, broken {}; {}; messages sent {}, "
      "received {}, rejected {}{}{}",
      who(), local_steps, opened, completed, declined, given_up, undone, answered,
      refused, undos_applied, broken, lag.str("lag"), messages_sent, messages_received, rejected,
      codec.empty() ? "" : "; models sent as " + codec, failed);
}

std::string GossipStats::to_json() const {
  return detail::JsonObject()
      .add("optimizer", optimizer)
      .add("rank", rank)
      .add("world_size", world_size)
      .add("local_steps", local_steps)
      .add("versions", versions)
      .add("opened", opened)
      .add("completed", completed)
      .add("declined", declined)
      .add("given_up", given_up)
      .add("undone", undone)
      .add("answered", answered)
      .add("refused", refused)
      .add("undos_applied", undos_applied)
      .add("broken", broken)
      .add("lag", lag)
      .add("messages_sent", messages_sent)
      .add("messages_received", messages_received)
      .add("rejected", rejected)
      .add("dropped", dropped)
      .add("codec", codec)
      .add("failed_peers", failed_peers)
      .str();
}

Gossip::Gossip(std::shared_ptr<torch::optim::Optimizer> inner, GossipOptions options,
               std::shared_ptr<World> world, Model model)
    : DistributedOptimizer(std::move(inner), "Gossip", std::move(model)),
      options_(std::move(options)),
      world_(world_or_default(std::move(world))) {
  check_options();  // before the collectives: a rank that throws must not leave its peers waiting
  for (const auto& b : buffers()) {
    if (at::isFloatingType(b.scalar_type())) mixed_buffers_.push_back(b);
  }
  if (world_ && world_->size() > 1) {
    ChannelOptions co;
    co.name = "gossip";
    // Models (or their encodings: int8 takes more than float32 for a model of one value).
    const int64_t numel = model_numel();
    co.capacity_bytes = std::max(numel * static_cast<int64_t>(c10::elementSize(flat().dtype())),
                                 codec::encoded_bytes(options_.compression(), numel));
    co.on_peer_failure = options_.on_peer_failure();
    Fingerprint fp = exchange_fingerprint();
    fp.set("algorithm", "gossip")
        .set("local rule", rule_name())
        .set("compression", options_.compression().describe());
    transport_ = world_->open_channel(co, fp);
    start_equal(*world_, 0);
  }
  init();
}

Gossip::Gossip(Params params, const torch::optim::SGDOptions& sgd, GossipOptions options,
               std::shared_ptr<World> world, Model model)
    : Gossip(detail::make_sgd(params.take_groups(), sgd), std::move(options), std::move(world),
             params.names_or(std::move(model))) {}

Gossip::Gossip(std::shared_ptr<torch::optim::Optimizer> inner, GossipOptions options,
               std::unique_ptr<Transport> transport, Model model)
    : DistributedOptimizer(std::move(inner), "Gossip", std::move(model)),
      options_(std::move(options)),
      transport_(std::move(transport)) {
  check_options();
  if (transport_ && transport_->size() < 2) transport_.reset();
  init();
}

void Gossip::check_options() const {
  if (options_.exchange_every() < 1) {
    throw ConfigError(fmt::format("Gossip: exchange_every is {}; it must be >= 1 (local steps "
                                  "between exchanges)", options_.exchange_every()));
  }
  if (!(options_.alpha() > 0 && options_.alpha() <= 1)) {
    throw ConfigError(fmt::format("Gossip: alpha is {}; it must be in (0, 1] (0.5 averages the two "
                                  "models)", options_.alpha()));
  }
  if (options_.exchange_timeout().count() <= 0) {
    throw ConfigError(fmt::format("Gossip: exchange_timeout is {} ms; it must be > 0",
                                  options_.exchange_timeout().count()));
  }
  const Compression& c = options_.compression();
  if (c.codec == Codec::kTopK) {
    throw ConfigError(fmt::format(
        "Gossip: compression '{}' sends a few entries of what it is given, and gossip sends "
        "whole models: use bf16, fp16 or int8 (or DASGD, whose deltas topk suits)",
        c.describe()));
  }
  detail::check_codec_dtype(c, flat().dtype(), "Gossip");
}

void Gossip::init() {
  rank_ = transport_ ? transport_->rank() : 0;
  size_ = transport_ ? transport_->size() : 1;
  rounds_ = std::max(1, static_cast<int>(std::ceil(std::log2(size_))));
  versions_.assign(size_, 0);
  sent_kinds_.resize(size_);
  counted_failed_.assign(size_, false);
  peer_done_.assign(size_, false);
  counts_.rank = rank_;
  counts_.world_size = size_;
  const Compression& c = options_.compression();
  if (c.lossy() && transport_) counts_.codec = c.describe();
}

Gossip::~Gossip() {
  if (transport_) finish_in_destructor(rank_);
}

int64_t Gossip::model_numel() const {
  int64_t n = flat().numel();
  for (const auto& b : mixed_buffers_) n += b.numel();
  return n;
}

at::Tensor Gossip::model_vector(bool copy) const {
  if (mixed_buffers_.empty()) {
    return copy ? flat().flat().to(torch::kCPU, /*non_blocking=*/false, /*copy=*/true) : flat().flat();
  }
  std::vector<at::Tensor> parts{flat().flat().to(torch::kCPU)};
  for (const auto& b : mixed_buffers_) parts.push_back(b.reshape({-1}).to(torch::kCPU, flat().dtype()));
  return torch::cat(parts);
}

void Gossip::update_model(double keep, const std::vector<std::pair<at::Tensor, double>>& terms) {
  torch::NoGradGuard no_grad;
  const int64_t np = flat().numel();
  at::Tensor x = flat().flat();
  if (keep != 1) x.mul_(keep);
  for (const auto& [v, c] : terms) x.add_(flat().on_device(v.numel() == np ? v : v.narrow(0, 0, np)), c);
  int64_t at = np;
  for (auto& b : mixed_buffers_) {
    at::Tensor y = b.reshape({-1});  // a view of a contiguous buffer
    if (keep != 1) y.mul_(keep);
    for (const auto& [v, c] : terms) y.add_(v.narrow(0, at, b.numel()).to(b.device(), b.scalar_type()), c);
    if (!b.is_contiguous()) b.copy_(y.view(b.sizes()));
    at += b.numel();
  }
}

std::vector<int> Gossip::gone_peers() const {
  std::vector<int> out = transport_->failed_peers();
  for (int p : transport_->closed_peers()) out.push_back(p);
  return out;
}

bool Gossip::every_peer_done_or_gone() const {
  const auto gone = gone_peers();
  for (int p = 0; p < size_; ++p) {
    if (p == rank_ || peer_done_[p]) continue;
    if (std::find(gone.begin(), gone.end(), p) == gone.end()) return false;
  }
  return true;
}

void Gossip::send(int peer, int64_t kind, int64_t id, const at::Tensor& payload) {
  Outgoing m;
  m.payload = payload.defined() ? payload.to(torch::kCPU) : payload;
  m.meta.fields = {kind, id};
  m.meta.fields.insert(m.meta.fields.end(), versions_.begin(), versions_.end());
  transport_->send(peer, m);
  auto& kinds = sent_kinds_[peer];
  kinds.push_back(kind);
  if (kinds.size() > kKindsKept) kinds.pop_front();
}

at::Tensor Gossip::encode_model(const at::Tensor& model, at::Tensor& decoded) const {
  const Compression& c = options_.compression();
  const at::Tensor x = model.contiguous();
  const int64_t numel = x.numel();
  if (c.codec == Codec::kFp16 && numel > 0) {
    // fp16 saturates at +-65504; a delta keeps what that clips in its residual, a model
    // has none, so it would be changed for good.
    const double largest = x.abs().max().item<double>();
    if (largest > 65504) {
      throw DivergedError(fmt::format(
          "rank {}: Gossip: this rank's model holds a value of magnitude {:g}, beyond fp16's "
          "65504; use bf16 or int8 (or find out why the weights grew so large)",
          rank_, largest));
    }
  }
  at::Tensor bytes = torch::empty({codec::encoded_bytes(c, numel)}, torch::kUInt8);
  if (!codec::encode(c, x.data_ptr<float>(), numel, bytes.data_ptr<uint8_t>(), nullptr)) {
    throw DivergedError(fmt::format(
        "rank {}: Gossip: this rank's model holds NaN or Inf (or values too large for '{}') and "
        "cannot be sent; lower the learning rate or clip gradients",
        rank_, c.describe()));
  }
  decoded = torch::zeros({numel}, torch::kFloat);
  codec::add_decoded(c, bytes.data_ptr<uint8_t>(), 0, bytes.numel(), numel, decoded.data_ptr<float>());
  return bytes;
}

at::Tensor Gossip::model_in(const Message& m, const char* what) const {
  const Compression& c = options_.compression();
  const int64_t numel = model_numel();
  auto malformed = [&](const std::string& why) {
    return CommError(fmt::format("rank {}: Gossip: malformed {} from rank {}: {}", rank_, what,
                                 m.sender, why));
  };
  if (!m.payload.defined()) throw malformed("no model");
  if (!c.lossy()) {
    if (m.payload.numel() != numel || m.payload.scalar_type() != flat().dtype()) {
      throw malformed(fmt::format("{} {} values, the model has {} {}", m.payload.numel(),
                                  c10::toString(m.payload.scalar_type()), numel,
                                  c10::toString(flat().dtype())));
    }
    return m.payload;
  }
  const int64_t length = codec::encoded_bytes(c, numel);
  if (m.payload.scalar_type() != at::kByte || m.payload.numel() != length) {
    throw malformed(fmt::format("{} {} values, '{}' sends {} bytes", m.payload.numel(),
                                c10::toString(m.payload.scalar_type()), c.describe(), length));
  }
  const at::Tensor bytes = m.payload.contiguous();
  if (!codec::valid(c, bytes.data_ptr<uint8_t>(), 0, length, numel)) {
    throw malformed(fmt::format("its '{}' blocks do not decode to finite values", c.describe()));
  }
  at::Tensor decoded = torch::zeros({numel}, torch::kFloat);
  codec::add_decoded(c, bytes.data_ptr<uint8_t>(), 0, length, numel, decoded.data_ptr<float>());
  return decoded;
}

void Gossip::record_lag(const Message& m) {
  // What this model holds that the peer's lacked; then this model holds what either did.
  const int64_t* theirs = m.meta.fields.data() + 2;
  counts_.lag.add(staleness(versions_, theirs));
  for (int k = 0; k < size_; ++k) versions_[k] = std::max(versions_[k], theirs[k]);
}

torch::Tensor Gossip::step(LossClosure closure) {
  throw_if_finished();
  torch::Tensor loss = inner_step(closure);
  ++local_steps_;
  ++versions_[rank_];
  if (!transport_) return loss;
  if (!held_) take(transport_->poll());
  settle_with_gone_peers(/*may_poll=*/!held_);
  give_up_if_late();
  if (!open_ && !finishing_ && local_steps_ % options_.exchange_every() == 0) open_exchange();
  return loss;
}

void Gossip::take(Arrivals arrivals) {
  for (auto& m : arrivals.messages) pending_.push_back(std::move(m));
  handle_pending();
}

void Gossip::handle_pending() {
  // One at a time from the queue, so that a message whose handling throws leaves the
  // rest for the next call instead of losing them.
  while (!pending_.empty()) {
    Message m = std::move(pending_.front());
    pending_.pop_front();
    handle(m);
  }
}

void Gossip::handle(const Message& m) {
  const int peer = m.sender;
  if (m.meta.fields.size() != 2 + static_cast<size_t>(size_)) {
    throw CommError(fmt::format("rank {}: Gossip: rank {} sent a message this protocol does not "
                                "know; is it running the same torch_asgd?",
                                rank_, peer));
  }
  const int64_t kind = m.meta.fields[0];
  const int64_t id = m.meta.fields[1];
  auto payload_ok = [&] {
    return m.payload.defined() && m.payload.numel() == model_numel() &&
           m.payload.scalar_type() == flat().dtype();
  };
  const bool lossy = options_.compression().lossy();
  torch::NoGradGuard no_grad;
  switch (kind) {
    case kRequest: {
      const at::Tensor s = model_in(m, "request");
      if (closed_) return;  // our goodbye is out: the peer treats it as declined
      const bool crossed = open_ && open_->peer == peer && peer < rank_;
      if (open_ && !crossed) {
        send(peer, kDecline, id, at::Tensor());
        ++counts_.refused;
        return;
      }
      if (crossed) {
        // The lower rank's request wins; the peer declines ours, unless it had given its
        // own up already and answers ours instead: then that reply comes late and is
        // undone, as any late reply, so that only one pair of mixes stays.
        given_up_[open_->id] = std::move(*open_);
        open_.reset();
        ++counts_.declined;
      }
      const double alpha = options_.alpha();
      if (lossy) {
        // x_j += alpha (s^ - y^): what the requester will subtract, exactly.
        at::Tensor y_hat, bytes;
        try {
          bytes = encode_model(model_vector(/*copy=*/false).to(torch::kCPU), y_hat);
        } catch (const DivergedError&) {
          send(peer, kDecline, id, at::Tensor());  // the requester must not wait for us
          ++counts_.refused;
          throw;
        }
        send(peer, kReply, id, bytes);
        record_lag(m);
        update_model(1, {{s, alpha}, {y_hat, -alpha}});
      } else {
        send(peer, kReply, id, model_vector(/*copy=*/false));  // before mixing (the channel copies it)
        record_lag(m);
        // x_j += alpha (s - x_j), in place.
        update_model(1 - alpha, {{s, alpha}});
      }
      ++counts_.answered;
      return;
    }
    case kReply: {
      const at::Tensor y = model_in(m, "reply");
      if (open_ && open_->peer == peer && open_->id == id) {
        // x_i += alpha (y - s): progress made meanwhile is kept.
        record_lag(m);
        update_model(1, {{y, options_.alpha()}, {open_->snapshot, -options_.alpha()}});
        open_.reset();
        ++counts_.completed;
        return;
      }
      auto late = given_up_.find(id);
      if (late != given_up_.end() && late->second.peer == peer) {
        // Too late to mix; the responder mixed, so it gets its half back.
        at::Tensor half = (late->second.snapshot - y).mul_(options_.alpha());
        given_up_.erase(late);
        if (closed_) {
          ++counts_.broken;  // our goodbye is out: the undo cannot be sent
          return;
        }
        send(peer, kUndo, id, half);
        ++counts_.undone;
      }
      return;
    }
    case kDecline: {
      if (open_ && open_->peer == peer && open_->id == id) {
        open_.reset();
        ++counts_.declined;
      } else {
        given_up_.erase(id);  // it never mixed
      }
      return;
    }
    case kDone:
      peer_done_[peer] = true;
      return;
    case kUndo: {
      if (!payload_ok()) throw CommError(fmt::format("rank {}: Gossip: malformed undo from rank {}", rank_, peer));
      update_model(1, {{m.payload, -1.0}});
      ++counts_.undos_applied;
      return;
    }
    default:
      throw CommError(fmt::format("rank {}: Gossip: rank {} sent a message of unknown kind {}",
                                  rank_, peer, kind));
  }
}

void Gossip::open_exchange() {
  const auto gone = gone_peers();
  auto unusable = [&](int p) {
    if (std::find(gone.begin(), gone.end(), p) != gone.end()) return true;
    for (const auto& [id, x] : given_up_) {
      if (x.peer == p) return true;  // its last reply may still come
    }
    return false;
  };
  for (int tries = 0; tries < rounds_; ++tries) {
    const int offset = 1 << (round_++ % rounds_);
    const int peer = (rank_ + offset) % size_;
    if (peer == rank_ || unusable(peer)) continue;
    Exchange x;
    x.peer = peer;
    x.id = next_id_++;
    x.snapshot = model_vector(/*copy=*/true);
    x.opened = std::chrono::steady_clock::now();
    if (options_.compression().lossy()) {
      // s^: what the peer decodes, and what the reply's mix subtracts.
      at::Tensor decoded;
      send(peer, kRequest, x.id, encode_model(x.snapshot, decoded));
      x.snapshot = decoded;
    } else {
      send(peer, kRequest, x.id, x.snapshot);
    }
    open_ = std::move(x);
    ++counts_.opened;
    return;
  }
}

void Gossip::settle_with_gone_peers(bool may_poll) {
  const auto failed = transport_->failed_peers();
  for (int p : failed) {
    if (counted_failed_[p]) continue;
    counted_failed_[p] = true;
    // Replies among the messages it never acknowledged were lost with it.
    uint64_t lost = 0;
    for (const auto& c : transport_->counters()) {
      if (c.peer == p) lost = c.lost;
    }
    const auto& kinds = sent_kinds_[p];
    for (size_t i = 0; i < lost && i < kinds.size(); ++i) {
      if (kinds[kinds.size() - 1 - i] == kReply) ++counts_.broken;
    }
  }
  // What a gone peer sent before its goodbye may still wait to be polled (a reply it
  // sent, having mixed): without that poll nothing about its exchanges can be concluded.
  if (!may_poll) return;
  const auto gone = gone_peers();
  auto is_gone = [&](int p) { return std::find(gone.begin(), gone.end(), p) != gone.end(); };
  auto waits_on_gone = [&] {
    if (open_ && is_gone(open_->peer)) return true;
    for (const auto& g : given_up_) {
      if (is_gone(g.second.peer)) return true;
    }
    return false;
  };
  // A goodbye comes after every reply its sender sent, and the channel queues a reply
  // before it records the goodbye: a reply that came with it is in the next poll.
  // (`may_poll`: false inside step() while a test scripts the arrivals; the test's next
  // GossipTestAccess::apply() polls and settles.)
  if (waits_on_gone()) take(transport_->poll());
  // A peer that said goodbye or died answers nothing more: what it had not answered, it
  // did not mix.
  if (open_ && is_gone(open_->peer)) {
    open_.reset();
    ++counts_.declined;
  }
  for (auto it = given_up_.begin(); it != given_up_.end();) {
    it = is_gone(it->second.peer) ? given_up_.erase(it) : std::next(it);
  }
}

void Gossip::give_up_if_late() {
  if (!open_) return;
  if (std::chrono::steady_clock::now() - open_->opened < options_.exchange_timeout()) return;
  ++counts_.given_up;
  given_up_[open_->id] = std::move(*open_);
  open_.reset();
}

bool Gossip::finish(std::chrono::milliseconds timeout) {
  if (finished_) return true;
  if (!transport_) {
    finished_ = true;
    return true;
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  finishing_ = true;
  const auto gone = gone_peers();
  for (int p = 0; p < size_; ++p) {
    if (p != rank_ && std::find(gone.begin(), gone.end(), p) == gone.end()) {
      send(p, kDone, 0, at::Tensor());
    }
  }
  // Settle this rank's own exchanges (answering peers meanwhile).
  while ((open_ || !given_up_.empty()) && std::chrono::steady_clock::now() < deadline) {
    take(transport_->wait(std::chrono::milliseconds(20)));
    settle_with_gone_peers();
    give_up_if_late();
  }
  const bool settled = !open_ && given_up_.empty();
  // Stay a responder while a peer still steps: its later work mixes into this model too.
  // A peer opens no exchange after its kDone, and a request comes before the kDone its
  // sender sent after it (ordered), so once every peer is done no request is left.
  while (!every_peer_done_or_gone() && std::chrono::steady_clock::now() < deadline) {
    take(transport_->wait(std::chrono::milliseconds(20)));
    settle_with_gone_peers();
  }
  const auto left = std::max(std::chrono::milliseconds(1),
                             std::chrono::duration_cast<std::chrono::milliseconds>(
                                 deadline - std::chrono::steady_clock::now()));
  closed_ = true;
  finished_ = true;
  const bool clean = transport_->close(left);
  take(transport_->poll());  // undos still apply; requests are not answered any more
  settle_with_gone_peers();
  return clean && settled;
}

void Gossip::resync() {
  if (!transport_) return;
  if (!world_) throw ConfigError("Gossip: resync() needs a World (the transport here is not one)");
  average_model(*world_);
  std::fill(versions_.begin(), versions_.end(), 0);
}

GossipStats Gossip::stats() const {
  GossipStats s = counts_;
  s.local_steps = local_steps_;
  s.versions = versions_;
  if (transport_) {
    for (const auto& c : transport_->counters()) {
      s.messages_sent += c.sent_messages;
      s.messages_received += c.received_messages;
      s.rejected += c.rejected;
      s.dropped += c.dropped;
    }
    s.failed_peers = transport_->failed_peers();
  }
  return s;
}

void Gossip::save_state(torch::serialize::OutputArchive& archive) const {
  detail::write_int64s(archive, "torch_asgd/Gossip/counters",
                       {local_steps_, round_, next_id_, static_cast<int64_t>(size_)});
  detail::write_int64s(archive, "torch_asgd/Gossip/versions", versions_);
}

void Gossip::load_state(torch::serialize::InputArchive& archive) {
  auto c = detail::read_int64s(archive, "torch_asgd/Gossip/counters", 4);
  if (c[3] != size_) {
    throw MismatchError(fmt::format("Gossip: the checkpoint was written by a rank of {} ranks, "
                                    "this job has {}",
                                    c[3], size_));
  }
  auto versions = detail::read_int64s(archive, "torch_asgd/Gossip/versions", static_cast<size_t>(size_));
  local_steps_ = c[0];
  round_ = c[1];
  next_id_ = c[2];
  versions_ = std::move(versions);
}

}  // namespace torch_asgd
