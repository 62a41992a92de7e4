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
#include "torch_asgd/comm/error.h"

namespace torch_asgd {
namespace detail {

uint64_t OutMsg::bytes() const {
  return payload.defined() ? static_cast<uint64_t>(payload.numel()) * payload.element_size() : 0;
}

uint64_t OutMsg::held_bytes() const {
  return bytes() + (wire.defined() ? static_cast<uint64_t>(wire.numel()) : 0);
}

using Clock = std::chrono::steady_clock;

// A frame posted to one peer, kept until the peer acknowledges it.
struct Sender::Posted {
  uint64_t seq = 0;
  OutRef msg;  // null for control frames
  FrameType type = FrameType::kOrdered;
  uint8_t stream = 0;
  at::Tensor header;  // the header frame's bytes
  // (Shared: the frame that acknowledges a peer's goodbye is waited for by close().)
  std::shared_ptr<gloo::transport::UnboundBuffer> header_buf;
  std::unique_ptr<gloo::transport::UnboundBuffer> payload_buf;
};

struct Sender::PeerOut {
  explicit PeerOut(int r) : rank(r) {}
  const int rank;
  std::deque<OutRef> ordered;                  // waiting, oldest first
  std::array<OutRef, kMaxStreams> replace{};   // waiting: the newest of each stream
  std::array<OutRef, kMaxStreams> additive{};  // waiting: the sum of what came meanwhile
  std::array<bool, kMaxStreams> additive_in_flight{};
  // Additive: when the message in flight was posted, how long the last one took from post
  // to acknowledgement, and since when a waiting message is held back for its group.
  std::array<Clock::time_point, kMaxStreams> posted_at{};
  std::array<Clock::duration, kMaxStreams> last_transfer{};
  std::array<std::optional<Clock::time_point>, kMaxStreams> held_since{};
  std::array<const OutMsg*, kMaxStreams> held_for{};  // the waiting message held_since is of
  size_t ordered_in_flight = 0;  // ordered and replace messages not yet acknowledged
  std::deque<Posted> unacked;    // by sequence number
  uint64_t next_seq = 1;
  bool ack_due = false;     // the peer asked for an acknowledgement
  bool bye_wanted = false;  // close() asked for a goodbye
  bool bye_posted = false;
  bool bye_ack_posted = false;  // a frame acknowledging its goodbye is posted
  std::shared_ptr<gloo::transport::UnboundBuffer> bye_ack_buf;  // that frame's
  bool lagging = false;
  bool failed = false;
  Sender::Counts counts;

  bool waiting() const {
    if (!ordered.empty()) return true;
    for (int s = 0; s < kMaxStreams; ++s) {
      if (replace[s] || additive[s]) return true;
    }
    return false;
  }
  // Messages waiting for or in transmission (what only carries earlier messages' loss
  // under a codec waits for the next one, and is not counted).
  size_t queued() const {
    size_t n = ordered.size();
    for (const auto& u : unacked) n += u.msg ? 1 : 0;
    for (int s = 0; s < kMaxStreams; ++s) {
      n += (replace[s] ? 1 : 0) + (additive[s] && !additive[s]->residual_only ? 1 : 0);
    }
    return n;
  }
};

Sender::Sender(ChannelCore& core) : core_(core), free_(std::make_shared<FreeList>()) {
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

void Sender::wake_locked() {
  work_ = true;
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

bool Sender::on_ack(int peer, uint64_t ack) {
  std::lock_guard<std::mutex> lock(mu_);
  PeerOut& p = *peers_[peer];
  // An acknowledgement of frames not sent yet is a broken or hostile peer's: freeing
  // what Gloo is still sending would corrupt memory.
  if (ack >= p.next_seq) return false;
  if (p.unacked.empty() || p.unacked.front().seq > ack) return true;
  release_locked(p, ack);
  wake_locked();
  return true;
}

void Sender::ack_due(int peer) {
  std::lock_guard<std::mutex> lock(mu_);
  peers_[peer]->ack_due = true;
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

// ---- the thread ---------------------------------------------------------------------

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

void Sender::drop_residual_if_unneeded_locked(OutMsg* m, int s) {
  // A message's residual is for the peers that post it; once no waiting slot holds the
  // message any more, nobody will, and the residual need not live as long as it does.
  if (m == nullptr || !m->residual) return;
  for (const auto& p : peers_) {
    if (p && p->additive[s].get() == m) return;
  }
  m->residual.reset();
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

void Sender::post_ready_locked(PeerOut& p) {
  if (p.failed) return;
  const size_t window = std::max<size_t>(1, core_.options.max_in_flight);
  while (!p.ordered.empty() && p.ordered_in_flight < window) {
    OutRef m = std::move(p.ordered.front());
    p.ordered.pop_front();
    ++p.ordered_in_flight;
    // Ask for an acknowledgement before the window fills, so that it never stalls, and
    // for the last one, so that nothing stays unacknowledged.
    const bool ask = p.ordered_in_flight * 2 >= window || p.ordered.empty();
    post_locked(p, std::move(m), FrameType::kOrdered, ask);
    if (p.failed) return;
  }
  for (int s = 0; s < kMaxStreams && !p.failed; ++s) {
    if (p.replace[s] && p.ordered_in_flight < window) {
      ++p.ordered_in_flight;
      OutRef m = std::move(p.replace[s]);
      p.replace[s].reset();
      post_locked(p, std::move(m), FrameType::kReplace, /*ack_requested=*/true);
    }
    const OutRef& w = p.additive[s];
    // (What only carries earlier messages' loss waits for the next message, or close.)
    if (w && !p.additive_in_flight[s] && (!w->residual_only || p.bye_wanted) &&
        !held_for_group_locked(p, s)) {
      p.additive_in_flight[s] = true;
      p.posted_at[s] = Clock::now();
      p.held_since[s].reset();
      OutRef m = std::move(p.additive[s]);
      p.additive[s].reset();
      // (Encoded beforehand, outside the lock: encode_ready(); never at close.)
      m->frozen = true;  // Gloo reads it now; peers of its group post the same bytes
      if (core_.options.verify_payload && !m->checksummed) {
        const at::Tensor& bytes = m->wire.defined() ? m->wire : m->payload;
        m->checksum = checksum64(bytes.data_ptr(), static_cast<size_t>(bytes.nbytes()));
        m->checksummed = true;
      }
      // Error feedback: what the encoding lost goes with this peer's next message.
      if (m->residual) p.additive[s] = m->residual;
      drop_residual_if_unneeded_locked(m.get(), s);
      post_locked(p, std::move(m), FrameType::kAdditive, /*ack_requested=*/true);
    }
  }
  if (p.failed) return;
  // The goodbye goes after everything sent before close(), broadcasts not yet in this
  // peer's slots included.
  if (p.bye_wanted && !p.bye_posted && !p.waiting() && !broadcast_undistributed_locked()) {
    p.bye_posted = true;
    post_locked(p, nullptr, FrameType::kBye, /*ack_requested=*/true);
  }
  // Nothing went out that carries the acknowledgement the peer asked for: send it alone.
  if (p.ack_due && !p.failed) post_locked(p, nullptr, FrameType::kAck, false);
}

void Sender::encode_ready(std::unique_lock<std::mutex>& lock) {
  // Messages about to be posted under a lossy codec are encoded here, outside the lock,
  // so that the training thread's broadcasts and the receiver's acknowledgements do not
  // wait for a pass over the model. Frozen first: nobody adds into them meanwhile.
  std::vector<std::pair<OutRef, const AdditiveStream*>> todo;
  for (int s = 0; s < kMaxStreams; ++s) {
    const AdditiveStream* spec = core_.streams[s];
    if (spec == nullptr || !spec->compression.lossy()) continue;
    for (auto& p : peers_) {
      if (!p || p->failed || p->bye_wanted) continue;
      const OutRef& w = p->additive[s];
      if (!w || w->frozen || w->residual_only || p->additive_in_flight[s] || held_for_group_locked(*p, s)) {
        continue;
      }
      w->frozen = true;
      todo.emplace_back(w, spec);
    }
  }
  if (todo.empty()) return;
  std::vector<Encoded> done;
  ++distributing_;
  lock.unlock();
  for (auto& [m, spec] : todo) done.push_back(encode_message(*m, *spec));  // m is frozen: read only
  lock.lock();
  --distributing_;
  for (size_t i = 0; i < todo.size(); ++i) {
    OutMsg& m = *todo[i].first;
    if (!done[i].wire.defined()) continue;
    m.checksummed = false;  // the checksum is of the bytes that travel
    m.wire = std::move(done[i].wire);
    m.codec = todo[i].second->compression.codec;
    m.residual = std::move(done[i].residual);
  }
}

Sender::Encoded Sender::encode_message(const OutMsg& m, const AdditiveStream& spec) {
  Encoded e;
  const int64_t numel = spec.numel;
  e.wire = at::empty({codec::encoded_bytes(spec.compression, numel)}, at::TensorOptions().dtype(at::kByte));
  e.residual = new_message(FrameType::kAdditive, spec.id, spec.dtype, numel);
  if (!codec::encode(spec.compression, m.payload.data_ptr<float>(), numel, e.wire.data_ptr<uint8_t>(),
                     e.residual->payload.data_ptr<float>())) {
    return Encoded();  // values the codec cannot take: it travels as it is
  }
  e.residual->residual_only = true;  // metadata: none (no update of its own)
  return e;
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

void Sender::post_locked(PeerOut& p, OutRef msg, FrameType type, bool ack_requested) {
  Posted f;
  f.seq = p.next_seq++;
  f.type = type;
  FrameHeader h;
  h.type = f.type;
  h.sender = core_.rank;
  h.sequence = f.seq;
  h.token = core_.token;
  h.ack = core_.receiver->last_whole(p.rank);
  if (ack_requested) h.flags |= kAckRequested;
  // An encoded additive payload travels as its codec's blocks, in whole blocks.
  const bool encoded = msg && msg->wire.defined();
  const uint64_t bytes = !msg ? 0 : encoded ? static_cast<uint64_t>(msg->wire.numel()) : msg->bytes();
  const void* payload = !msg ? nullptr : encoded ? msg->wire.data_ptr() : msg->payload.data_ptr();
  const Metadata empty;
  const Metadata& meta = msg ? msg->meta : empty;
  if (msg) {
    f.stream = msg->stream;
    h.stream = msg->stream;
    h.dtype = msg->dtype;
    h.payload_bytes = bytes;
    h.codec = encoded ? msg->codec : Codec::kNone;
    h.meta_fields = static_cast<uint16_t>(meta.fields.size());
    h.record_width = msg->type == FrameType::kAdditive
                         ? static_cast<uint16_t>(core_.streams[msg->stream]->meta.record_width)
                         : 0;
    h.meta_records = h.record_width > 0 ? static_cast<uint16_t>(meta.records.size() / h.record_width) : 0;
    if (meta.records_overflowed) h.flags |= kRecordsOverflowed;
    if (msg->checksummed) {
      h.flags |= kChecksummed;
      h.payload_checksum = msg->checksum;
    }
    const bool fits = kFrameHeaderBytes + h.meta_bytes() + bytes <=
                      static_cast<uint64_t>(core_.options.chunk_bytes);
    if (bytes > 0 && bytes <= static_cast<uint64_t>(core_.options.inline_bytes) && fits) {
      h.flags |= kInlinePayload;
    }
  }
  f.header = at::empty({static_cast<int64_t>(h.frame_bytes())}, at::TensorOptions().dtype(at::kByte));
  auto* out = static_cast<uint8_t*>(f.header.data_ptr());
  encode_frame_header(h, meta, out);
  if (h.inline_payload()) {
    std::memcpy(out + kFrameHeaderBytes + h.meta_bytes(), payload, bytes);
  }
  p.ack_due = false;  // every frame carries the acknowledgement
  f.msg = msg;  // before Gloo sees its bytes: a failed post retires them with the frame
  try {
    f.header_buf = core_.context->createUnboundBuffer(out, h.frame_bytes());
    f.header_buf->send(p.rank, core_.data_slot, 0, h.frame_bytes());
    if (bytes > 0 && !h.inline_payload()) {
      f.payload_buf = core_.context->createUnboundBuffer(const_cast<void*>(payload), bytes);
      const uint64_t chunk = core_.transfer_bytes(h);
      for (uint64_t off = 0; off < bytes; off += chunk) {
        f.payload_buf->send(p.rank, core_.data_slot, off, std::min(chunk, bytes - off));
      }
    }
  } catch (const std::exception& e) {
    p.failed = true;
    failures_.emplace_back(p.rank, e.what());
    const uint64_t held = static_cast<uint64_t>(f.header.nbytes()) + bytes;
    core_.retire(std::make_shared<Posted>(std::move(f)), held);
    return;
  }
  if (msg) {
    ++p.counts.sent_messages;
    p.counts.sent_bytes += h.frame_bytes() + (h.inline_payload() ? 0 : bytes);
  } else if (f.type == FrameType::kBye) {
    ++p.counts.sent_messages;
    p.counts.sent_bytes += h.frame_bytes();
  }
  f.msg = std::move(msg);
  std::shared_ptr<gloo::transport::UnboundBuffer> header_buf = f.header_buf;
  p.unacked.push_back(std::move(f));
  if (h.ack > 0 && !p.bye_ack_posted) {
    std::lock_guard<std::mutex> lock(core_.mu);
    PeerStatus& s = core_.peers[p.rank];
    if (s.bye_received && h.ack >= s.bye_seq) {
      s.bye_ack_posted = p.bye_ack_posted = true;
      p.bye_ack_buf = std::move(header_buf);
      core_.cv.notify_all();
    }
  }
}

std::vector<int> Sender::await_bye_acks_sent(std::chrono::steady_clock::time_point deadline) {
  // The frames that acknowledge the peers' goodbyes, each sent once.
  std::vector<std::pair<int, std::shared_ptr<gloo::transport::UnboundBuffer>>> todo;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& p : peers_) {
      if (p && !p->failed && p->bye_ack_buf) todo.emplace_back(p->rank, p->bye_ack_buf);
    }
  }
  // A Gloo wait that times out poisons the whole context: wait without a timeout, and
  // let a timer abort the wait at the deadline instead (the send itself goes on).
  std::mutex m;
  std::condition_variable cv;
  bool over = false, aborted = false;
  gloo::transport::UnboundBuffer* current = nullptr;
  std::thread timer([&] {
    std::unique_lock<std::mutex> lock(m);
    if (!cv.wait_until(lock, deadline, [&] { return over; })) {
      aborted = true;
      if (current != nullptr) current->abortWaitSend();
    }
  });
  std::vector<int> unsent;
  for (auto& [peer, buf] : todo) {
    {
      std::lock_guard<std::mutex> lock(m);
      if (aborted) {
        unsent.push_back(peer);
        continue;
      }
      current = buf.get();
    }
    bool sent = false;
    try {
      sent = buf->waitSend(kForever);
    } catch (const std::exception&) {
      // The connection failed: the watcher names it.
    }
    {
      std::lock_guard<std::mutex> lock(m);
      current = nullptr;
    }
    if (!sent) unsent.push_back(peer);
  }
  {
    std::lock_guard<std::mutex> lock(m);
    over = true;
  }
  cv.notify_all();
  timer.join();
  return unsent;
}

void Sender::release_locked(PeerOut& p, uint64_t ack) {
  while (!p.unacked.empty() && p.unacked.front().seq <= ack) {
    Posted& f = p.unacked.front();
    if (f.type == FrameType::kAdditive) {
      p.additive_in_flight[f.stream] = false;
      p.last_transfer[f.stream] = Clock::now() - p.posted_at[f.stream];
      if (!p.additive[f.stream] || p.additive[f.stream]->residual_only) p.lagging = false;
    } else if (f.type == FrameType::kOrdered || f.type == FrameType::kReplace) {
      --p.ordered_in_flight;
    } else if (f.type == FrameType::kBye) {
      std::lock_guard<std::mutex> lock(core_.mu);
      core_.peers[p.rank].bye_acked = true;
      core_.cv.notify_all();
    }
    p.unacked.pop_front();  // the peer has the bytes: Gloo is done with them
  }
  done_cv_.notify_all();
}

void Sender::drop_locked(PeerOut& p) {
  // Gloo may still hold the posted sends: their memory lives as long as the connections
  // do. (At a clean end that is the last acknowledgements, a header each, which the peer
  // may not have received yet: destroying them would withdraw their sends.)
  for (auto& f : p.unacked) {
    if (f.msg) ++p.counts.lost;
    const uint64_t bytes = static_cast<uint64_t>(f.header.nbytes()) + (f.msg ? f.msg->bytes() : 0);
    core_.retire(std::make_shared<Posted>(std::move(f)), bytes);
  }
  p.unacked.clear();
  p.counts.dropped += p.ordered.size();
  p.ordered.clear();
  for (int s = 0; s < kMaxStreams; ++s) {
    if (p.additive[s]) ++p.counts.dropped;
    if (p.replace[s]) ++p.counts.dropped;
    p.additive[s].reset();
    p.replace[s].reset();
    p.additive_in_flight[s] = false;
  }
  p.ordered_in_flight = 0;
  done_cv_.notify_all();
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
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    auto ready = [&] { return work_ || core_.stopping; };
    if (next_wake_) {
      // A message held for its group is due then.
      if (!cv_.wait_until(lock, *next_wake_, ready)) work_ = true;
    } else {
      cv_.wait(lock, ready);
    }
    if (core_.fail_sender_thread.exchange(false)) throw std::runtime_error("a test made it throw");
    if (core_.stopping) return;
    work_ = false;
    next_wake_.reset();
    distribute_broadcasts_locked(lock);
    encode_ready(lock);
    for (auto& p : peers_) {
      if (p) post_ready_locked(*p);
    }
    done_cv_.notify_all();
    if (!failures_.empty()) {
      auto failures = std::move(failures_);
      failures_.clear();
      lock.unlock();
      for (const auto& [peer, what] : failures) core_.peer_failed(peer, what);
      lock.lock();
    }
  }
}

}  // namespace detail
}  // namespace torch_asgd
