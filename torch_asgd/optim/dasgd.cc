#include "torch_asgd/optim/dasgd.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include "torch_asgd/comm/error.h"
#include "torch_asgd/detail/log.h"
#include "torch_asgd/detail/numeric.h"
#include "torch_asgd/optim/detail/bounded_lead.h"
#include "torch_asgd/optim/detail/checkpoint.h"
#include "torch_asgd/optim/detail/delta_kernels.h"
#include "torch_asgd/optim/detail/device_pipeline.h"
#include "torch_asgd/optim/detail/flat_params.h"
#include "torch_asgd/optim/detail/json.h"
#include "torch_asgd/optim/detail/update_meta.h"

namespace torch_asgd {


std::string DASGDStats::str() const {
  std::string failed =
      failed_peers.empty() ? "" : fmt::format("; failed peers {}", fmt::join(failed_peers, ", "));
  std::string lead_text;
  if (lead_waits > 0 || damped_steps > 0 || max_lead_seen > 0) {
    lead_text = fmt::format("; lead {} (max {}), {} waits ({:.2f} s, {} timed out), {} damped steps",
                            lead, max_lead_seen, lead_waits, lead_wait_seconds, lead_timeouts,
                            damped_steps);
    if (!left_behind.empty()) lead_text += fmt::format(", left behind {}", fmt::join(left_behind, ", "));
  }
  return fmt::format(
      "{}: {} local steps, model version {}, {} peer updates applied; {}; messages sent {}, "
      "received {}, coalesced {}, rejected {}{}{}",
      who(), local_steps, version, remote_updates, staleness.str(), messages_sent,
      messages_received, coalesced, rejected, lead_text, failed);
}

std::string DASGDStats::to_json() const {
  return detail::JsonObject()
      .add("optimizer", optimizer)
      .add("rank", rank)
      .add("world_size", world_size)
      .add("local_steps", local_steps)
      .add("version", version)
      .add("remote_updates", remote_updates)
      .add("versions", versions)
      .add("staleness", staleness)
      .add("lead", lead)
      .add("max_lead_seen", max_lead_seen)
      .add("lead_waits", lead_waits)
      .add("lead_timeouts", lead_timeouts)
      .add("damped_steps", damped_steps)
      .add("lead_wait_seconds", lead_wait_seconds)
      .add("left_behind", left_behind)
      .add("messages_sent", messages_sent)
      .add("messages_received", messages_received)
      .add("coalesced", coalesced)
      .add("rejected", rejected)
      .add("dropped", dropped)
      .add("max_held_bytes", max_held_bytes)
      .add("failed_peers", failed_peers)
      .add("overlap_active", overlap_active)
      .str();
}

DASGD::DASGD(std::shared_ptr<torch::optim::Optimizer> inner, DASGDOptions options,
             std::shared_ptr<World> world, Model model)
    : DistributedOptimizer(std::move(inner), "DASGD", std::move(model)),
      options_(std::move(options)),
      world_(world_or_default(std::move(world))) {
  check_options();  // before the collectives: a rank that throws must not leave its peers waiting
  if (world_ && world_->size() > 1) {
    ChannelOptions co;
    co.name = "dasgd";
    co.capacity_bytes = 0;  // deltas (additive, declared below) and views (empty payloads)
    co.additive = {AdditiveStream{0, flat().dtype(), flat().numel(),
                                  detail::update_schema(world_->size()), options_.compression()}};
    co.on_peer_failure = options_.on_peer_failure();
    Fingerprint fp = exchange_fingerprint();
    fp.set("algorithm", "dasgd").set("local rule", rule_name());
    fp.set("average", options_.average() ? "1" : "0");
    transport_ = world_->open_channel(co, fp);
    start_equal(*world_, 0);
  }
  init();
}

DASGD::DASGD(Params params, const torch::optim::SGDOptions& sgd, DASGDOptions options,
             std::shared_ptr<World> world, Model model)
    : DASGD(detail::make_sgd(params.take_groups(), sgd), std::move(options), std::move(world),
            params.names_or(std::move(model))) {}

DASGD::DASGD(std::shared_ptr<torch::optim::Optimizer> inner, DASGDOptions options,
             std::unique_ptr<Transport> transport, Model model)
    : DistributedOptimizer(std::move(inner), "DASGD", std::move(model)),
      options_(std::move(options)),
      transport_(std::move(transport)) {
  check_options();
  if (transport_ && transport_->size() < 2) transport_.reset();
  init();
}

void DASGD::check_options() const {
  if (options_.broadcast_every() < 1) {
    throw ConfigError(fmt::format("DASGD: broadcast_every is {}; it must be >= 1 (local steps per "
                                  "hand-over)", options_.broadcast_every()));
  }
  if (options_.max_lead() < 0) {
    throw ConfigError(fmt::format("DASGD: max_lead is {}; it must be >= 0 (0 turns the bound off)",
                                  options_.max_lead()));
  }
  if (options_.lead_timeout().count() <= 0) {
    throw ConfigError(fmt::format("DASGD: lead_timeout is {} ms; it must be > 0",
                                  options_.lead_timeout().count()));
  }
}

void DASGD::init() {
  rank_ = transport_ ? transport_->rank() : 0;
  size_ = transport_ ? transport_->size() : 1;
  versions_.assign(size_, 0);
  lead_ = std::make_unique<detail::BoundedLead>(size_, options_.max_lead(), options_.lead_measure());
  view_sent_ = versions_;
  pending_ = std::make_unique<detail::PendingUpdates>(size_);
  if (!transport_) return;
  torch::NoGradGuard no_grad;
  shadow_ = flat().flat().clone();
  if (options_.overlap() && !flat().on_cpu()) {
    pipeline_ = std::make_unique<detail::DevicePipeline>(flat().device(), flat().numel(), flat().dtype());
  }
}

DASGD::~DASGD() {
  if (transport_) finish_in_destructor(rank_);
}

int64_t DASGD::lead() const {
  return transport_ ? lead_->lead(transport_->live_peers(), versions_[rank_]) : 0;
}

void DASGD::heard(int peer, int64_t seen_of_mine, int64_t its_own) {
  lead_->heard(peer, seen_of_mine, its_own, versions_[rank_]);
}

void DASGD::rebase() {
  torch::NoGradGuard no_grad;
  if (shadow_.defined()) shadow_.copy_(flat().flat());
  pending_->clear();
  rebase_pending_ = false;
}

torch::Tensor DASGD::step(LossClosure closure) {
  throw_if_finished();
  if (!transport_) {
    torch::Tensor loss = inner_step(closure);
    ++local_steps_;
    staleness_.add(0);
    ++versions_[0];
    return loss;
  }
  torch::NoGradGuard no_grad;
  // A module loaded into the parameters (torch::load) is not a change to send.
  if (refresh_views() || rebase_pending_) rebase();
  const int64_t lead_now = options_.max_lead() > 0 ? lead() : 0;
  // The step is scaled: by 1/n under average(), and by min(1, L / lead) while this rank
  // leads under LeadPolicy::kDamp: x <- before + f (x - before).
  double f = options_.average() ? 1.0 / static_cast<double>(size_) : 1.0;
  const bool damp = options_.lead_policy() == LeadPolicy::kDamp && lead_now > options_.max_lead();
  if (damp) f *= static_cast<double>(options_.max_lead()) / static_cast<double>(lead_now);
  at::Tensor before;
  if (f != 1.0) before = flat().flat().clone();
  torch::Tensor loss = inner_step(closure);
  if (f != 1.0) {
    at::Tensor x = flat().flat();
    x.sub_(before).mul_(f).add_(before);
  }
  if (damp) ++damped_steps_;
  ++local_steps_;
  pending_->add(versions_);  // the vector of the model this update was computed at
  ++versions_[rank_];
  staleness_.add(0);  // a rank's own update is applied to the model it was computed at
  if (local_steps_ % options_.broadcast_every() == 0) send_delta();
  if (!hold_arrivals_) apply(transport_->poll());
  if (options_.max_lead() > 0) {
    if (options_.lead_policy() == LeadPolicy::kWait) wait_for_lead();
    max_lead_seen_ = std::max(max_lead_seen_, lead());
  }
  return loss;
}

std::string DASGD::last_applied() const {
  if (last_sender_ < 0) return "no peer update was applied yet";
  return fmt::format("the last peer update applied was rank {}'s update {}", last_sender_,
                     last_sender_update_);
}

void DASGD::send_delta() {
  if (pending_->count() == 0) return;
  at::Tensor x = flat().flat();
  // Peers would refuse a non-finite delta: stop here, where it can be explained.
  if (!detail::all_finite(x)) {
    throw DivergedError(fmt::format(
        "rank {}: DASGD: the model is no longer finite (NaN or Inf) after local step {}; {}. "
        "Training diverged: lower the learning rate, clip the gradients, or check the data",
        rank_, local_steps_, last_applied()));
  }
  const Metadata meta = pending_->encode(versions_);
  if (pipeline_) {
    // The change is taken on the device; a side stream copies it out and the pipeline's
    // thread hands it over.
    at::Tensor staged = pipeline_->current();
    detail::take_delta(staged, x, shadow_, /*accumulate=*/false);
    pipeline_->ship([this, meta](const at::Tensor& host) {
      transport_->broadcast_additive(0, meta, [&](at::Tensor& buffer, bool accumulate) {
        if (accumulate) {
          buffer.add_(host);
        } else {
          buffer.copy_(host);
        }
      });
    });
  } else {
    // One pass: the buffer gets x - shadow, and shadow becomes x. If the transport throws
    // before filling, nothing here has changed.
    transport_->broadcast_additive(0, meta, [&](at::Tensor& buffer, bool accumulate) {
      detail::take_delta(buffer, x, shadow_, accumulate);
    });
  }
  pending_->clear();
  view_sent_ = versions_;
}

void DASGD::apply(Arrivals arrivals) {
  torch::NoGradGuard no_grad;
  for (const auto& m : arrivals.messages) {
    // A waiting peer's view: how many of each rank's updates it has applied.
    if (m.delivery != Delivery::kReplace || m.meta.fields.size() != static_cast<size_t>(size_)) {
      throw CommError(fmt::format("rank {}: DASGD: rank {} sent a message DASGD does not know; is it "
                                  "running the same torch_asgd?",
                                  rank_, m.sender));
    }
    heard(m.sender, m.meta.field(rank_), m.meta.field(m.sender));
  }
  for (auto& a : arrivals.additive) {
    if (a.stream != 0) continue;
    if (a.tainted) {  // a rejected delta is partly in the sum
      check_rejections();
      throw CommError(fmt::format("rank {}: DASGD: a rejected delta was partly summed into what "
                                  "arrived; restart from the last checkpoint (with resync())",
                                  rank_));
    }
    at::Tensor x = flat().flat();
    at::Tensor sum = pipeline_ ? pipeline_->to_device(a.sum) : a.sum;
    detail::add_both(x, shadow_, sum);
    // Every part of the sum is applied at once, to the model as it was before it.
    const std::vector<int64_t> applied_to = versions_;
    for (const auto& [sender, meta] : a.parts) {
      if (meta.none()) continue;  // what a codec lost earlier: values, no update of its own
      detail::UpdatePart part;
      if (!detail::decode_updates(meta, size_, &part)) {
        throw CommError(fmt::format("rank {}: DASGD: rank {} sent a delta whose metadata does not "
                                    "describe its updates; is it running the same torch_asgd?",
                                    rank_, sender));
      }
      detail::record_staleness(meta, applied_to, staleness_, tau_log_);
      versions_[sender] += part.count;
      remote_updates_ += part.count;
      heard(sender, part.sender_now[rank_], part.sender_now[sender]);
      last_sender_ = sender;
      last_sender_update_ = versions_[sender];
    }
  }
  check_rejections();
}

void DASGD::check_rejections() {
  uint64_t rejected = 0;
  int who = -1;
  std::string why;
  for (const auto& c : transport_->counters()) {
    rejected += c.rejected;
    if (c.rejected > 0) {
      who = c.peer;
      why = c.last_reject;
    }
  }
  if (rejected <= rejected_seen_) return;
  rejected_seen_ = rejected;
  // Its sender applied that delta: without it this replica can never agree again.
  throw CommError(fmt::format(
      "rank {}: DASGD: a delta from rank {} was rejected ({}); rank {} applied it itself, so the "
      "replicas can no longer agree. Check the network and the other rank's output; restart from "
      "the last checkpoint (with resync())",
      rank_, who, why, who));
}

void DASGD::wait_for_lead() {
  const int64_t limit = options_.max_lead();
  if (lead() <= limit) return;
  ++lead_waits_;
  const auto t0 = std::chrono::steady_clock::now();
  const auto deadline = t0 + options_.lead_timeout();
  while (lead() > limit) {
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) {
      // Whoever has not caught up is left behind, as a dead peer is, until it does.
      ++lead_timeouts_;
      for (const auto& line : lead_->leave_behind(transport_->live_peers(), versions_[rank_])) {
        detail::log_warning(fmt::format(
            "rank {}: DASGD: {} and did not catch up within lead_timeout ({} ms): no longer "
            "waiting for it until it does",
            rank_, line, options_.lead_timeout().count()));
      }
      break;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now);
    apply(transport_->wait(std::min(left, std::chrono::milliseconds(50))));
    // Peers that wait for this rank learn what it has applied only from its messages, and
    // a waiting rank sends no delta: tell them (newest wins, so it never piles up).
    if (versions_ != view_sent_) send_view();
  }
  lead_wait_seconds_ +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void DASGD::send_view() {
  Outgoing m;
  m.delivery = Delivery::kReplace;
  m.meta = Metadata(versions_);
  for (int p : transport_->live_peers()) transport_->send(p, m);
  view_sent_ = versions_;
}

bool DASGD::finish(std::chrono::milliseconds timeout) {
  if (finished_) return true;
  finished_ = true;
  if (!transport_) return true;
  if (refresh_views() || rebase_pending_) rebase();
  send_delta();
  if (pipeline_) pipeline_->drain();  // every delta handed to the channel before goodbye
  const bool clean = transport_->close(timeout);
  apply(transport_->poll());
  return clean;
}

void DASGD::resync() {
  if (!transport_) return;
  if (!world_) throw ConfigError("DASGD: resync() needs a World (the transport here is not one)");
  torch::NoGradGuard no_grad;
  refresh_views();
  average_model(*world_);
  std::fill(versions_.begin(), versions_.end(), 0);
  lead_->reset();
  rebase();
}

DASGDStats DASGD::stats() const {
  DASGDStats s;
  s.rank = rank_;
  s.world_size = size_;
  s.local_steps = local_steps_;
  s.versions = versions_;
  for (int64_t v : versions_) s.version += v;
  s.remote_updates = remote_updates_;
  s.staleness = staleness_;
  s.overlap_active = pipeline_ != nullptr;
  s.lead = transport_ ? lead() : 0;
  s.max_lead_seen = max_lead_seen_;
  s.lead_waits = lead_waits_;
  s.lead_timeouts = lead_timeouts_;
  s.damped_steps = damped_steps_;
  s.lead_wait_seconds = lead_wait_seconds_;
  s.left_behind = lead_->left_behind();
  if (transport_) {
    for (const auto& c : transport_->counters()) {
      s.messages_sent += c.sent_messages;
      s.messages_received += c.received_messages;
      s.coalesced += c.coalesced + c.coalesced_received;
      s.rejected += c.rejected;
      s.dropped += c.dropped;
      s.max_held_bytes = std::max(s.max_held_bytes, c.held_bytes);
    }
    s.failed_peers = transport_->failed_peers();
  }
  return s;
}

void DASGD::save_state(torch::serialize::OutputArchive& archive) const {
  detail::write_int64s(archive, "torch_asgd/DASGD/counters",
                       {local_steps_, remote_updates_, staleness_.count, staleness_.sum,
                        staleness_.max, staleness_.bounded, static_cast<int64_t>(size_)});
  detail::write_int64s(archive, "torch_asgd/DASGD/versions", versions_);
}

void DASGD::load_state(torch::serialize::InputArchive& archive) {
  auto c = detail::read_int64s(archive, "torch_asgd/DASGD/counters", 7);
  if (c[6] != size_) {
    throw MismatchError(fmt::format("DASGD: the checkpoint was written by a rank of {} ranks, this "
                                    "job has {}",
                                    c[6], size_));
  }
  auto versions = detail::read_int64s(archive, "torch_asgd/DASGD/versions", static_cast<size_t>(size_));
  local_steps_ = c[0];
  remote_updates_ = c[1];
  staleness_.count = c[2];
  staleness_.sum = c[3];
  staleness_.max = c[4];
  staleness_.bounded = c[5];
  versions_ = std::move(versions);
  // The checkpointed parameters already hold every update made before it, sent or not:
  // from here on only new changes are handed over. (Peers resumed from checkpoints of
  // other moments agree again after resync().)
  rebase_pending_ = true;
}

}  // namespace torch_asgd
