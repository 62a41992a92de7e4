// The sender: what the training thread hands over (messages, broadcasts, goodbyes),
// what anyone asks of it (counts, waits), and the thread that runs the other parts:
// sender_link.cc (posting, acknowledgements, retiring), sender_groups.cc (additive
// coalescing and the group hold), sender_encoder.cc (codecs and residuals).
#include "torch_asgd/comm/detail/sender.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <stdexcept>

#include <ATen/Functions.h>
#include <fmt/format.h>
#include <gloo/context.h>
#include <gloo/transport/unbound_buffer.h>

#include "torch_asgd/comm/detail/receiver.h"
#include "torch_asgd/comm/detail/sender_state.h"
#include "torch_asgd/comm/error.h"

namespace torch_asgd {
namespace detail {

uint64_t OutMsg::bytes() const {
  return payload.defined() ? static_cast<uint64_t>(payload.numel()) * payload.element_size() : 0;
}

uint64_t OutMsg::held_bytes() const {
  return bytes() + (wire.defined() ? static_cast<uint64_t>(wire.numel()) : 0);
}

Sender::Sender(ChannelCore& core) : core_(core), free_(std::make_shared<FreeList>()) {
  acks_.resize(core_.size);
  peers_.resize(core_.size);
  for (int p = 0; p < core_.size; ++p) {
    if (p != core_.rank) peers_[p] = std::make_unique<PeerOut>(p);
  }
}

Sender::~Sender() { stop_and_join(); }

void Sender::start() {
  thread_ = std::thread([this] { run(); });
}

void Sender::stop_and_join() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    wake_locked();
  }
  if (thread_.joinable()) thread_.join();
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& p : peers_) {
    if (p) drop_locked(*p);
  }
}

void Sender::wake() {
  {
    std::lock_guard<std::mutex> lock(wake_mu_);
    woken_ = true;
  }
  cv_.notify_all();
}


OutRef Sender::new_message(FrameType type, uint8_t stream, c10::ScalarType dtype, int64_t numel) {
  at::Tensor buffer;
  if (type == FrameType::kAdditive) {
    std::lock_guard<std::mutex> lock(free_->mu);
    auto& free = free_->buffers[stream];
    if (!free.empty()) {
      buffer = std::move(free.back());
      free.pop_back();
    }
  }
  if (!buffer.defined()) {
    // (Ordered and replace payloads come back to the pool when the last peer has them.)
    buffer = type == FrameType::kAdditive ? at::empty({numel}, at::TensorOptions().dtype(dtype))
                                          : core_.send_buffers.take(dtype, numel);
  }
  // Additive buffers come back for the next message once nobody references them (a
  // retired message may outlive the sender: the free list is shared with it).
  auto recycle = [free = free_](OutMsg* m) {
    if (m->type == FrameType::kAdditive && m->payload.defined()) {
      std::lock_guard<std::mutex> lock(free->mu);
      auto& list = free->buffers[m->stream];
      if (list.empty()) list.push_back(std::move(m->payload));
    }
    delete m;
  };
  OutRef m(new OutMsg, recycle);
  m->type = type;
  m->stream = stream;
  m->dtype = dtype;
  m->payload = std::move(buffer);
  return m;
}

void Sender::enqueue(int peer, OutRef msg) {
  std::lock_guard<std::mutex> lock(mu_);
  PeerOut& p = *peers_[peer];
  if (p.failed || core_.failed(peer)) {  // (the core may know before peer_failed() came)
    ++p.counts.dropped;
    return;
  }
  if (msg->type == FrameType::kOrdered) {
    if (p.ordered.size() >= core_.options.max_ordered) {
      throw ConfigError(fmt::format(
          "{}: {} ordered messages already wait for rank {}, which is not receiving; send large "
          "or frequent data as additive or replace messages, or raise max_ordered",
          core_.prefix(), p.ordered.size(), peer));
    }
    p.ordered.push_back(std::move(msg));
  } else if (msg->type == FrameType::kReplace) {
    if (p.replace[msg->stream]) ++p.counts.coalesced;
    p.replace[msg->stream] = std::move(msg);
  } else {
    const uint8_t stream = msg->stream;
    coalesce_locked(p, stream, std::move(msg));
  }
  wake_locked();
}

void Sender::enqueue_all(OutRef msg) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& p : peers_) {
    if (p && !p->failed && msg->type == FrameType::kOrdered &&
        p->ordered.size() >= core_.options.max_ordered) {
      throw ConfigError(fmt::format(
          "{}: {} ordered messages already wait for rank {}, which is not receiving",
          core_.prefix(), p->ordered.size(), p->rank));
    }
  }
  for (auto& p : peers_) {
    if (!p) continue;
    if (p->failed) {
      ++p->counts.dropped;
    } else if (msg->type == FrameType::kOrdered) {
      p->ordered.push_back(msg);
    } else {
      if (p->replace[msg->stream]) ++p->counts.coalesced;
      p->replace[msg->stream] = msg;
    }
  }
  wake_locked();
}

void Sender::broadcast_additive(uint8_t stream, const Metadata& meta,
                                const std::function<void(at::Tensor&, bool)>& fill) {
  const AdditiveStream& spec = *core_.streams[stream];
  {
    std::lock_guard<std::mutex> lock(mu_);
    OutRef into = pending_broadcast_[stream];
    const bool pending = into != nullptr;
    // Every peer lags in step: the broadcast goes straight into the sum they all wait
    // with, and costs no buffer of its own. (Not while an earlier broadcast is being
    // checksummed outside the lock: it must be summed first, for the metadata's order.)
    if (!pending && distributing_ == 0) into = shared_waiting_locked(stream);
    if (into) {
      const bool merged = pending || !into->residual_only;  // (a residual alone is no message)
      fill(into->payload, true);
      into->checksummed = false;
      into->residual_only = false;
      merge(into->meta, meta, spec.meta);
      for (auto& p : peers_) {
        if (p && !p->failed) {
          if (merged) ++p->counts.coalesced;
          if (!pending && p->additive_in_flight[stream]) p->lagging = true;
        }
      }
      wake_locked();
      return;
    }
  }
  OutRef m = new_message(FrameType::kAdditive, stream, spec.dtype, spec.numel);
  fill(m->payload, false);
  m->meta = meta;
  std::lock_guard<std::mutex> lock(mu_);
  if (OutRef& pending = pending_broadcast_[stream]) {  // raced with another caller
    pending->payload.add_(m->payload);
    merge(pending->meta, meta, spec.meta);
  } else {
    pending_broadcast_[stream] = std::move(m);
  }
  wake_locked();
}

void Sender::request_close() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& p : peers_) {
    if (p) p->bye_wanted = true;
  }
  wake_locked();
}

void Sender::peer_failed(int peer) {
  std::lock_guard<std::mutex> lock(mu_);
  PeerOut& p = *peers_[peer];
  p.failed = true;
  drop_locked(p);
  wake_locked();
}

size_t Sender::queued(int peer) const {
  std::lock_guard<std::mutex> lock(mu_);
  return peers_[peer]->queued();
}

bool Sender::broadcast_undistributed_locked() const {
  if (distributing_ > 0) return true;
  for (const auto& b : pending_broadcast_) {
    if (b) return true;
  }
  return false;
}

bool Sender::idle_locked(const PeerOut& p) const {
  if (p.failed) return true;
  return !broadcast_undistributed_locked() && p.queued() == 0;
}

bool Sender::idle(int peer) const {
  std::lock_guard<std::mutex> lock(mu_);
  return idle_locked(*peers_[peer]);
}

Sender::Counts Sender::counts(int peer) const {
  std::lock_guard<std::mutex> lock(mu_);
  const PeerOut& p = *peers_[peer];
  Counts c = p.counts;
  // Payload bytes this peer keeps referenced: in flight, and waiting (a buffer shared
  // with other peers counts for each).
  for (const auto& f : p.unacked) c.held_bytes += f.msg ? f.msg->held_bytes() : 0;
  for (const auto& m : p.ordered) c.held_bytes += m->held_bytes();
  for (int s = 0; s < kMaxStreams; ++s) {
    if (p.replace[s]) c.held_bytes += p.replace[s]->held_bytes();
    if (p.additive[s]) c.held_bytes += p.additive[s]->held_bytes();
  }
  return c;
}

uint64_t Sender::held_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<const OutMsg*> seen;
  uint64_t total = 0;
  auto add = [&](const OutRef& m) {
    if (!m || std::find(seen.begin(), seen.end(), m.get()) != seen.end()) return;
    seen.push_back(m.get());
    total += m->held_bytes();
  };
  for (const auto& b : pending_broadcast_) add(b);
  for (const auto& p : peers_) {
    if (!p) continue;
    for (const auto& f : p->unacked) add(f.msg);
    for (const auto& m : p->ordered) add(m);
    for (int s = 0; s < kMaxStreams; ++s) {
      add(p->replace[s]);
      add(p->additive[s]);
    }
  }
  return total;
}

bool Sender::lagging(int peer) const {
  std::lock_guard<std::mutex> lock(mu_);
  return peers_[peer]->lagging;
}

bool Sender::wait_idle(int peer, std::chrono::steady_clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  return done_cv_.wait_until(lock, deadline, [&] { return core_.broken || idle_locked(*peers_[peer]); }) &&
         !core_.broken;
}

bool Sender::wait_room(int peer, size_t max_queued, std::chrono::steady_clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  const PeerOut& p = *peers_[peer];
  return done_cv_.wait_until(lock, deadline, [&] {
    return core_.broken || p.failed ||
           p.queued() + (broadcast_undistributed_locked() ? 1 : 0) <= max_queued;
  }) && !core_.broken;
}

void Sender::run() {
  try {
    loop();
  } catch (const std::exception& e) {
    // Nothing is sent any more: the training thread learns it at its next call, and
    // whoever waits for the channel's progress stops waiting. (loop()'s lock is released.)
    core_.thread_died("sending", e.what());
  } catch (...) {
    core_.thread_died("sending", "an exception that is not a std::exception");
  }
}

void Sender::wake_waiters() {
  {
    std::lock_guard<std::mutex> lock(mu_);  // a waiter between its check and its sleep sees it
  }
  done_cv_.notify_all();
}

void Sender::loop() {
  std::optional<std::chrono::steady_clock::time_point> due;  // a message held for its group
  for (;;) {
    {
      std::unique_lock<std::mutex> w(wake_mu_);
      auto ready = [&] { return woken_ || core_.stopping.load(); };
      if (due) {
        cv_.wait_until(w, *due, ready);
      } else {
        cv_.wait(w, ready);
      }
      woken_ = false;
    }
    if (core_.fail_sender_thread.exchange(false)) throw std::runtime_error("a test made it throw");
    if (core_.stopping) return;
    std::unique_lock<std::mutex> lock(mu_);
    next_wake_.reset();
    take_acks_locked();
    distribute_broadcasts_locked(lock);
    encode_ready(lock);
    for (auto& p : peers_) {
      if (p) post_ready_locked(*p);
    }
    done_cv_.notify_all();
    due = next_wake_;
    if (!failures_.empty()) {
      auto failures = std::move(failures_);
      failures_.clear();
      lock.unlock();
      for (const auto& [peer, what] : failures) core_.peer_failed(peer, what);
    }
  }
}

}  // namespace detail
}  // namespace torch_asgd
