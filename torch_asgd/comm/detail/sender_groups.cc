// Additive messages: what a peer that lags gets instead of a queue (one sum), the
// broadcast shared by the peers that lag in step (a group), and the group hold that
// keeps a group together.
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

namespace {

// `m` summed into `into`, a waiting buffer no peer has posted yet (its checksum is
// then stale), metadata by the stream's rules.
void add_in_place(OutMsg& into, const OutMsg& m, const AdditiveStream& spec) {
  into.payload.add_(m.payload);
  into.checksummed = false;
  into.residual_only = into.residual_only && m.residual_only;
  merge(into.meta, m.meta, spec.meta);
}

}  // namespace

OutRef Sender::shared_waiting_locked(uint8_t s) const {
  // The waiting message of every live peer, if it is one and the same buffer that no
  // peer has posted yet (so that only these slots hold it).
  OutRef shared;
  for (const auto& p : peers_) {
    if (!p || p->failed) continue;
    const OutRef& w = p->additive[s];
    if (!w || w->frozen || (shared && w != shared)) return nullptr;
    shared = w;
  }
  return shared;
}

void Sender::coalesce_locked(PeerOut& p, uint8_t s, OutRef msg) {
  // A message for this peer alone (`msg` is a fresh private copy).
  const AdditiveStream& spec = *core_.streams[s];
  OutRef& waiting = p.additive[s];
  if (!waiting) {
    // The first one while nothing waits: posted as soon as the one in flight is
    // acknowledged (at once if none is).
    waiting = std::move(msg);
    if (p.additive_in_flight[s]) p.lagging = true;
    return;
  }
  if (!waiting->residual_only) ++p.counts.coalesced;  // (a residual alone is no message)
  if (p.additive_in_flight[s]) p.lagging = true;
  if (!waiting->frozen && waiting.use_count() == 1) {
    add_in_place(*waiting, *msg, spec);
    return;
  }
  // Shared with other peers, or already posted: what waits is added into the new one.
  msg->payload.add_(waiting->payload);
  Metadata meta = waiting->meta;
  merge(meta, msg->meta, spec.meta);
  msg->meta = std::move(meta);
  OutMsg* was = waiting.get();
  waiting = std::move(msg);
  drop_residual_if_unneeded_locked(was, s);
}

void Sender::distribute_broadcasts_locked(std::unique_lock<std::mutex>& lock) {
  for (int s = 0; s < kMaxStreams; ++s) {
    if (!pending_broadcast_[s]) continue;
    OutRef m = std::move(pending_broadcast_[s]);
    // Not frozen yet: until some peer posts it, it is only in waiting slots, and the
    // peers that hold it there receive the same broadcasts, so the next ones can be
    // added into it in place.
    if (core_.options.verify_payload && !core_.streams[s]->compression.lossy()) {
      // Immutable from now on: one checksum serves every peer. Outside the lock, so
      // that the training thread can go on sending. (Under a codec, the checksum is of
      // the encoded bytes, computed when first posted.)
      ++distributing_;
      lock.unlock();
      m->checksum = checksum64(m->payload.data_ptr(), m->bytes());
      m->checksummed = true;
      lock.lock();
      --distributing_;
    }
    const AdditiveStream& spec = *core_.streams[s];
    // Peers that waited with the same buffer get the same sum: one per group.
    std::vector<OutMsg*> summed;                       // not frozen: m added in place
    std::vector<std::pair<OutRef, OutRef>> replaced;  // frozen: its successor
    for (auto& p : peers_) {
      if (!p) continue;
      if (p->failed) {
        ++p->counts.dropped;
        continue;
      }
      OutRef& waiting = p->additive[s];
      if (!waiting) {
        waiting = m;
        if (p->additive_in_flight[s]) p->lagging = true;
        continue;
      }
      if (!waiting->residual_only) ++p->counts.coalesced;  // (a residual alone is no message)
      if (p->additive_in_flight[s]) p->lagging = true;
      if (!waiting->frozen) {
        if (std::find(summed.begin(), summed.end(), waiting.get()) == summed.end()) {
          add_in_place(*waiting, *m, spec);
          summed.push_back(waiting.get());
        }
        continue;
      }
      auto it = std::find_if(replaced.begin(), replaced.end(),
                             [&](const auto& r) { return r.first == waiting; });
      if (it != replaced.end()) {
        waiting = it->second;
        continue;
      }
      OutRef group = new_message(FrameType::kAdditive, static_cast<uint8_t>(s), spec.dtype, spec.numel);
      at::add_out(group->payload, waiting->payload, m->payload);
      group->meta = waiting->meta;
      merge(group->meta, m->meta, spec.meta);
      group->residual_only = waiting->residual_only && m->residual_only;
      replaced.emplace_back(waiting, group);
      waiting = std::move(group);
    }
    for (const auto& r : replaced) drop_residual_if_unneeded_locked(r.first.get(), s);
  }
}

bool Sender::held_for_group_locked(PeerOut& p, int s) {
  // Peers that wait with the same buffer are a group: posted together, they go on
  // sharing every buffer. One that is ready waits for the others of its group (still
  // sending their previous message) for up to group_hold times a transfer's time, then
  // goes alone; so a peer that stalls splits off, and memory grows with the groups, not
  // with the peers. Never held at close. A transfer's time runs from post to
  // acknowledgement, so a receiver's stall is in it: the hold takes the shortest last
  // transfer of any live peer (at most its own), so that a peer waking from a stall is
  // not held for a multiple of that stall by a member still stalled.
  if (p.bye_wanted || core_.options.group_hold <= 0) return false;
  const OutRef& w = p.additive[s];
  if (!w || w.use_count() <= 1) return false;
  bool others_busy = false;
  for (const auto& q : peers_) {
    if (q && q.get() != &p && !q->failed && q->additive[s] == w && q->additive_in_flight[s]) {
      others_busy = true;
      break;
    }
  }
  if (!others_busy) return false;
  const Clock::time_point now = Clock::now();
  if (!p.held_since[s] || p.held_for[s] != w.get()) {
    p.held_since[s] = now;
    p.held_for[s] = w.get();
  }
  Clock::duration transfer = p.last_transfer[s];
  for (const auto& q : peers_) {
    if (q && !q->failed && q->last_transfer[s] > Clock::duration::zero() &&
        q->last_transfer[s] < transfer) {
      transfer = q->last_transfer[s];
    }
  }
  // (At most a minute, whatever group_hold says: a hold is a wait for a peer, not a stop.)
  const double seconds = std::min(
      60.0, std::chrono::duration<double>(transfer).count() * core_.options.group_hold);
  const Clock::time_point until =
      *p.held_since[s] + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  if (now >= until) return false;
  if (!next_wake_ || until < *next_wake_) next_wake_ = until;
  return true;
}

}  // namespace detail
}  // namespace torch_asgd
