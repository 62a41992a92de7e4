#include "torch_asgd/comm/channel.h"

#include <algorithm>
#include <cstring>
#include <optional>

#include <ATen/Functions.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <gloo/context.h>
#include <gloo/transport/unbound_buffer.h>

#include "torch_asgd/comm/detail/log.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/comm/world.h"

namespace torch_asgd {
namespace detail {

// Gloo's waits cannot poll: a wait that times out poisons every connection of the
// context. Background waits are therefore unbounded and ended by abortWait*(); the
// liveness of a peer shows as a connection error instead.
constexpr std::chrono::milliseconds kForever = std::chrono::hours(24 * 365);

// Reuses the frames (header + payload buffers) of one channel, so that steady-state
// traffic allocates nothing and touches no fresh pages.
class FramePool {
 public:
  FramePool(size_t frame_bytes, size_t max_free) : frame_bytes_(frame_bytes), max_free_(max_free) {}

  at::Tensor take() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        at::Tensor t = std::move(free_.back());
        free_.pop_back();
        return t;
      }
    }
    return at::empty({static_cast<int64_t>(frame_bytes_)}, at::TensorOptions().dtype(at::kByte));
  }

  void give(at::Tensor frame) {
    if (static_cast<size_t>(frame.numel()) != frame_bytes_) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.size() < max_free_) free_.push_back(std::move(frame));
  }

  size_t frame_bytes() const { return frame_bytes_; }

 private:
  const size_t frame_bytes_;
  const size_t max_free_;
  std::mutex mu_;  // guards free_
  std::vector<at::Tensor> free_;
};

// A message waiting to be sent: its frame holds the payload after kHeaderBytes; the
// header is encoded into the frame by the sender thread.
struct Pending {
  MessageHeader header;
  at::Tensor frame;
};

struct PeerLink {
  explicit PeerLink(int p) : peer(p) {}

  const int peer;

  // Guards the fields down to `in_flight_bufs`; `cv` wakes the sender thread and the
  // training thread's flush()/close().
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Pending> ordered;
  std::optional<Pending> coalescing[kMaxMessageKind + 1];  // by kind
  bool bye_queued = false;  // close() asked for a goodbye the sender has not taken yet
  bool bye_sent = false;
  size_t in_flight_count = 0;  // sends posted to Gloo, not yet complete
  bool failed = false;  // the connection failed
  bool closed = false;  // the peer said goodbye
  std::string last_reject;
  uint64_t next_sequence = 1;
  std::vector<gloo::transport::UnboundBuffer*> in_flight_bufs;  // oldest first

  // Guards recv_bufs (the receiver thread replaces them; abort reads them).
  std::mutex recv_mu;
  std::vector<std::unique_ptr<gloo::transport::UnboundBuffer>> recv_bufs;
  std::vector<at::Tensor> recv_frames;
  uint64_t last_sequence = 0;  // receiver thread only
  bool rejects_logged[static_cast<int>(Reject::kCount_)] = {};  // receiver thread only

  std::atomic<uint64_t> sent_messages{0}, sent_bytes{0}, received_messages{0},
      received_bytes{0}, coalesced{0}, coalesced_received{0}, rejected{0}, dropped{0};

  std::thread sender;
  std::thread receiver;

  bool has_work_locked() const {
    if (!ordered.empty()) return true;
    for (const auto& c : coalescing) {
      if (c) return true;
    }
    return bye_queued;  // cleared when the sender takes the goodbye
  }
  size_t queued_locked() const {
    size_t n = ordered.size() + in_flight_count;
    for (const auto& c : coalescing) n += c ? 1 : 0;
    return n;
  }
  bool idle_locked() const {
    if (in_flight_count > 0 || !ordered.empty()) return false;
    for (const auto& c : coalescing) {
      if (c) return false;
    }
    return true;
  }
};

namespace {

uint8_t* frame_bytes(const at::Tensor& frame) {
  return static_cast<uint8_t*>(frame.data_ptr());
}

// A tensor over the payload part of a frame, without copying; it keeps the frame
// alive and gives it back to the pool when the last reference goes.
at::Tensor payload_view(const at::Tensor& frame, const MessageHeader& h,
                        const std::shared_ptr<FramePool>& pool) {
  const int64_t numel = static_cast<int64_t>(h.payload_bytes / dtype_size(h.dtype));
  auto keep = frame;
  return at::from_blob(
      frame_bytes(frame) + kHeaderBytes, {numel},
      [keep, pool](void*) mutable { pool->give(std::move(keep)); },
      at::TensorOptions().dtype(h.dtype));
}

// A non-owning view, valid while the frame lives.
at::Tensor payload_alias(const at::Tensor& frame, const MessageHeader& h) {
  const int64_t numel = static_cast<int64_t>(h.payload_bytes / dtype_size(h.dtype));
  return at::from_blob(frame_bytes(frame) + kHeaderBytes, {numel},
                       at::TensorOptions().dtype(h.dtype));
}

// What the caller's tensor looks like on the wire.
at::Tensor flatten_payload(const Outgoing& msg) {
  if (!msg.payload.defined()) return at::empty({0}, at::TensorOptions().dtype(at::kByte));
  return msg.payload.contiguous().view({-1});
}

}  // namespace
}  // namespace detail

using detail::PeerLink;
using detail::Pending;

Channel::Channel(std::shared_ptr<World> world, ChannelOptions options, uint64_t slot,
                 uint64_t token)
    : world_(std::move(world)),
      context_(world_->gloo_context()),
      options_(std::move(options)),
      rank_(world_->rank()),
      size_(world_->size()),
      slot_(slot),
      token_(token) {
  const size_t frame = kHeaderBytes + static_cast<size_t>(options_.capacity_bytes) + kTrailerBytes;
  pool_ = std::make_shared<detail::FramePool>(frame, 2 * static_cast<size_t>(size_) + 2);
  links_.resize(size_);
  for (int p = 0; p < size_; ++p) {
    if (p != rank_) links_[p] = std::make_unique<PeerLink>(p);
  }
  for (auto& link : links_) {
    if (!link) continue;
    link->receiver = std::thread([this, l = link.get()] { receiver_loop(*l); });
    link->sender = std::thread([this, l = link.get()] { sender_loop(*l); });
  }
}

Channel::~Channel() { abort_and_join(); }

void Channel::rethrow_if_failed() {
  std::lock_guard<std::mutex> lock(error_mu_);
  if (error_) std::rethrow_exception(error_);
}

void Channel::send(int peer, const Outgoing& msg) {
  rethrow_if_failed();
  if (peer < 0 || peer >= size_ || peer == rank_) {
    throw ConfigError(fmt::format("rank {}: channel '{}': cannot send to rank {} (valid peers are "
                                  "0..{} except {})",
                                  rank_, options_.name, peer, size_ - 1, rank_));
  }
  at::Tensor flat = detail::flatten_payload(msg);
  send_locked_peer(*links_[peer], msg, flat);
}

void Channel::broadcast(const Outgoing& msg) {
  rethrow_if_failed();
  at::Tensor flat = detail::flatten_payload(msg);
  for (auto& link : links_) {
    if (link) send_locked_peer(*link, msg, flat);
  }
}

void Channel::send_locked_peer(PeerLink& l, const Outgoing& msg, const at::Tensor& flat) {
  if (closing_) {
    throw ConfigError(fmt::format("rank {}: channel '{}': send() after close()", rank_,
                                  options_.name));
  }
  if (!flat.device().is_cpu()) {
    throw ConfigError(fmt::format("rank {}: channel '{}': payload is on {}, expected a CPU tensor",
                                  rank_, options_.name, flat.device().str()));
  }
  const size_t elem = dtype_size(flat.scalar_type());
  if (elem == 0) {
    throw ConfigError(fmt::format("rank {}: channel '{}': dtype {} cannot be sent", rank_,
                                  options_.name, c10::toString(flat.scalar_type())));
  }
  const uint64_t bytes = static_cast<uint64_t>(flat.numel()) * elem;
  if (bytes > static_cast<uint64_t>(options_.capacity_bytes)) {
    throw ConfigError(fmt::format(
        "rank {}: channel '{}': payload of {} bytes exceeds the channel capacity of {} bytes; "
        "open the channel with a larger capacity_bytes",
        rank_, options_.name, bytes, options_.capacity_bytes));
  }
  const auto kind = static_cast<size_t>(msg.kind);
  if (msg.kind == MessageKind::kBye) {
    throw ConfigError("kBye is reserved for close()");
  }
  // The receiver rejects what breaks these, so say it here, where it can be fixed.
  if (msg.sender_step < 0 || msg.model_version < 0 || msg.updates.count < 0 ||
      (msg.updates.count > 0 &&
       (msg.updates.version_min < 0 || msg.updates.version_min > msg.model_version))) {
    throw ConfigError(fmt::format(
        "rank {}: channel '{}': inconsistent message metadata (sender_step {}, model_version {}, "
        "{} updates with min version {}): steps and versions are >= 0 and no update can be newer "
        "than the model_version it is sent with",
        rank_, options_.name, msg.sender_step, msg.model_version, msg.updates.count,
        msg.updates.version_min));
  }

  MessageHeader h;
  h.kind = msg.kind;
  h.delivery = msg.delivery;
  h.dtype = flat.scalar_type();
  h.sender = rank_;
  h.sender_step = msg.sender_step;
  h.model_version = msg.model_version;
  h.payload_bytes = bytes;
  h.updates = msg.updates;

  {
    std::lock_guard<std::mutex> lock(l.mu);
    // A peer's goodbye only means it sends no more; it receives until ours.
    if (l.failed) {
      ++l.dropped;
      return;
    }
    auto& slot = l.coalescing[kind];
    if (msg.delivery == Delivery::kAdditive && slot) {
      if (slot->header.dtype != h.dtype || slot->header.payload_bytes != bytes ||
          slot->header.delivery != Delivery::kAdditive) {
        throw ConfigError(fmt::format(
            "rank {}: channel '{}': additive messages of one kind must keep their dtype and size "
            "(pending {} bytes of {}, new {} bytes of {})",
            rank_, options_.name, slot->header.payload_bytes, c10::toString(slot->header.dtype),
            bytes, c10::toString(h.dtype)));
      }
      detail::payload_alias(slot->frame, slot->header).add_(flat);
      slot->header.updates.merge(h.updates);
      slot->header.sender_step = h.sender_step;
      slot->header.model_version = h.model_version;
      ++l.coalesced;
      return;  // the sender thread already knows there is work
    }
    if (msg.delivery == Delivery::kReplace && slot) {
      if (slot->header.delivery != Delivery::kReplace) {
        throw ConfigError(fmt::format("rank {}: channel '{}': kind {} is sent both as replace and "
                                      "as another delivery",
                                      rank_, options_.name, kind));
      }
      std::memcpy(detail::frame_bytes(slot->frame) + kHeaderBytes, flat.data_ptr(), bytes);
      slot->header = h;
      ++l.coalesced;
      return;
    }
    if (msg.delivery == Delivery::kOrdered && l.ordered.size() >= options_.max_ordered) {
      throw ConfigError(fmt::format(
          "rank {}: channel '{}': {} ordered messages already wait for rank {}, which is not "
          "receiving; send large or frequent data as additive or replace messages",
          rank_, options_.name, l.ordered.size(), l.peer));
    }
    Pending p;
    p.header = h;
    if (msg.delivery == Delivery::kOrdered && bytes + kHeaderBytes < pool_->frame_bytes() / 2) {
      p.frame = at::empty({static_cast<int64_t>(kHeaderBytes + bytes + kTrailerBytes)},
                          at::TensorOptions().dtype(at::kByte));
    } else {
      p.frame = pool_->take();
    }
    if (bytes > 0) std::memcpy(detail::frame_bytes(p.frame) + kHeaderBytes, flat.data_ptr(), bytes);
    if (msg.delivery == Delivery::kOrdered) {
      l.ordered.push_back(std::move(p));
    } else {
      slot = std::move(p);
    }
  }
  l.cv.notify_all();
}

void Channel::sender_loop(PeerLink& l) {
  struct InFlight {
    std::unique_ptr<gloo::transport::UnboundBuffer> buf;
    at::Tensor frame;
    size_t bytes = 0;
    bool bye = false;
  };
  // Up to max_in_flight sends are posted at once, so the connection does not idle
  // while this thread wakes up for the next message; completions come in order.
  std::deque<InFlight> flight;
  const size_t max_in_flight = std::max<size_t>(1, options_.max_in_flight);
  auto retire_all = [&] {
    // Gloo may still read these frames: keep them alive with the connections.
    std::lock_guard<std::mutex> lock(l.mu);
    l.in_flight_bufs.clear();
    l.in_flight_count = 0;
    for (auto& f : flight) {
      world_->retire(std::make_shared<InFlight>(std::move(f)));
    }
    flight.clear();
  };
  try {
    size_t next_kind = 0;  // round robin over the coalescing slots
    for (;;) {
      std::optional<Pending> next;
      bool bye = false;
      {
        std::unique_lock<std::mutex> lock(l.mu);
        if (flight.empty()) {
          l.cv.wait(lock, [&] { return stopping_ || l.failed || l.has_work_locked(); });
        }
        if (stopping_ || l.failed) {
          lock.unlock();
          retire_all();
          return;
        }
        if (flight.size() < max_in_flight && l.has_work_locked()) {
          Pending p;
          if (!l.ordered.empty()) {
            p = std::move(l.ordered.front());
            l.ordered.pop_front();
          } else {
            bool found = false;
            for (size_t i = 0; i <= kMaxMessageKind && !found; ++i) {
              auto& slot = l.coalescing[(next_kind + i) % (kMaxMessageKind + 1)];
              if (slot) {
                p = std::move(*slot);
                slot.reset();
                next_kind = (next_kind + i + 1) % (kMaxMessageKind + 1);
                found = true;
              }
            }
            if (!found) {  // only the goodbye is left
              bye = true;
              l.bye_queued = false;
              p.header.kind = MessageKind::kBye;
              p.header.sender = rank_;
              p.frame = at::empty({static_cast<int64_t>(kHeaderBytes + kTrailerBytes)},
                                  at::TensorOptions().dtype(at::kByte));
            }
          }
          ++l.in_flight_count;
          p.header.sequence = l.next_sequence++;
          next = std::move(p);
        }
      }

      if (next) {
        Pending& p = *next;
        p.header.token = token_;
        uint8_t* data = detail::frame_bytes(p.frame);
        if (options_.verify_payload) {
          p.header.payload_checksum = payload_checksum(data + kHeaderBytes, p.header.payload_bytes);
        }
        encode_header(p.header, data);
        const uint64_t trailer = trailer_for(p.header);
        std::memcpy(data + kHeaderBytes + p.header.payload_bytes, &trailer, kTrailerBytes);
        InFlight f;
        f.bytes = kHeaderBytes + p.header.payload_bytes + kTrailerBytes;
        f.bye = bye;
        f.frame = std::move(p.frame);
        f.buf = context_->createUnboundBuffer(data, f.bytes);
        {
          std::lock_guard<std::mutex> lock(l.mu);
          l.in_flight_bufs.push_back(f.buf.get());
        }
        gloo::transport::UnboundBuffer* buf = f.buf.get();
        flight.push_back(std::move(f));
        buf->send(l.peer, slot_, 0, flight.back().bytes);
        continue;
      }

      // Nothing more may or can be posted now: wait for the oldest send to complete.
      InFlight& oldest = flight.front();
      const bool done = oldest.buf->waitSend(nullptr, detail::kForever);
      if (!done) {
        retire_all();
        return;
      }
      {
        std::lock_guard<std::mutex> lock(l.mu);
        --l.in_flight_count;
        l.in_flight_bufs.erase(l.in_flight_bufs.begin());
        ++l.sent_messages;
        l.sent_bytes += oldest.bytes;
        if (oldest.bye) l.bye_sent = true;
      }
      l.cv.notify_all();
      const bool was_bye = oldest.bye;
      pool_->give(std::move(oldest.frame));
      flight.pop_front();
      if (was_bye) return;
    }
  } catch (const std::exception& e) {
    retire_all();
    peer_failed(l, e.what());
  }
}

void Channel::receiver_loop(PeerLink& l) {
  const size_t frame_size = pool_->frame_bytes();
  const int depth = std::max(1, options_.recv_depth);
  DecodeLimits limits;
  limits.world_size = size_;
  limits.expected_sender = l.peer;
  limits.receiver = rank_;
  limits.max_payload_bytes = static_cast<uint64_t>(options_.capacity_bytes);
  limits.token = token_;
  try {
    auto post = [&](int i, bool fresh_frame) {
      std::lock_guard<std::mutex> lock(l.recv_mu);
      if (fresh_frame) {
        l.recv_frames[i] = pool_->take();
        l.recv_bufs[i] = context_->createUnboundBuffer(detail::frame_bytes(l.recv_frames[i]), frame_size);
      }
      if (stopping_) return false;
      l.recv_bufs[i]->recv(l.peer, slot_, 0, frame_size);
      return true;
    };
    {
      std::lock_guard<std::mutex> lock(l.recv_mu);
      l.recv_frames.resize(depth);
      l.recv_bufs.resize(depth);
    }
    for (int i = 0; i < depth; ++i) {
      if (!post(i, true)) return;
    }
    for (int i = 0;; i = (i + 1) % depth) {
      gloo::transport::UnboundBuffer* buf;
      {
        std::lock_guard<std::mutex> lock(l.recv_mu);
        buf = l.recv_bufs[i].get();
      }
      if (!buf->waitRecv(nullptr, detail::kForever)) return;  // aborted

      at::Tensor frame = l.recv_frames[i];
      const uint8_t* data = detail::frame_bytes(frame);
      MessageHeader h;
      Reject why = decode_header(data, kHeaderBytes, limits, &h);
      if (why == Reject::kNone && h.sequence <= l.last_sequence) why = Reject::kBadSequence;
      if (why == Reject::kNone) {
        uint64_t trailer;
        std::memcpy(&trailer, data + kHeaderBytes + h.payload_bytes, kTrailerBytes);
        if (trailer != trailer_for(h)) why = Reject::kTruncated;
      }
      if (why == Reject::kNone && options_.verify_payload &&
          payload_checksum(data + kHeaderBytes, h.payload_bytes) != h.payload_checksum) {
        why = Reject::kBadPayloadChecksum;
      }
      if (why == Reject::kNone && options_.on_non_finite != NonFinite::kAccept &&
          h.payload_bytes > 0 && c10::isFloatingType(h.dtype) &&
          !at::isfinite(detail::payload_alias(frame, h)).all().item<bool>()) {
        why = Reject::kNonFinite;
        if (options_.on_non_finite == NonFinite::kFatal) {
          std::lock_guard<std::mutex> lock(error_mu_);
          if (!error_) {
            error_ = std::make_exception_ptr(CommError(fmt::format(
                "rank {}: channel '{}': rank {} sent non-finite values (NaN/Inf); its training "
                "diverged or its memory is corrupt",
                rank_, options_.name, l.peer)));
          }
        }
      }
      if (why != Reject::kNone) {
        ++l.rejected;
        {
          std::lock_guard<std::mutex> lock(l.mu);
          l.last_reject = to_string(why);
        }
        auto& logged = l.rejects_logged[static_cast<int>(why)];
        if (!logged) {
          logged = true;
          detail::log_warning(fmt::format(
              "rank {}: channel '{}': rejected a message from rank {}: {} (counted; further "
              "rejections for this reason are not logged)",
              rank_, options_.name, l.peer, to_string(why)));
        }
        if (!post(i, false)) return;
        continue;
      }
      l.last_sequence = h.sequence;
      ++l.received_messages;
      l.received_bytes += kHeaderBytes + h.payload_bytes + kTrailerBytes;
      if (h.kind == MessageKind::kBye) {
        {
          std::lock_guard<std::mutex> lock(l.mu);
          l.closed = true;
        }
        l.cv.notify_all();
        inbox_cv_.notify_all();
        return;
      }
      bool adopted = false;
      {
        std::unique_lock<std::mutex> lock(inbox_mu_);
        Message* merge_into = nullptr;
        if (h.delivery != Delivery::kOrdered) {
          for (auto it = inbox_.rbegin(); it != inbox_.rend(); ++it) {
            if (it->header.sender == h.sender && it->header.kind == h.kind &&
                it->header.delivery == h.delivery && it->header.dtype == h.dtype &&
                (h.delivery == Delivery::kReplace || it->header.payload_bytes == h.payload_bytes)) {
              merge_into = &*it;
              break;
            }
          }
        }
        if (merge_into != nullptr && h.delivery == Delivery::kAdditive) {
          merge_into->payload.add_(detail::payload_alias(frame, h));
          UpdateStats merged = merge_into->header.updates;
          merged.merge(h.updates);
          merge_into->header = h;
          merge_into->header.updates = merged;
          ++l.coalesced_received;
        } else if (merge_into != nullptr) {
          merge_into->header = h;
          merge_into->payload = detail::payload_view(frame, h, pool_);
          adopted = true;
          ++l.coalesced_received;
        } else {
          inbox_.push_back(Message{h, detail::payload_view(frame, h, pool_)});
          adopted = true;
        }
      }
      inbox_cv_.notify_all();
      if (!post(i, adopted)) return;
    }
  } catch (const std::exception& e) {
    peer_failed(l, e.what());
  }
}

void Channel::peer_failed(PeerLink& l, const std::string& what) {
  bool was_closed;
  {
    std::lock_guard<std::mutex> lock(l.mu);
    if (l.failed || stopping_) return;
    l.failed = true;
    was_closed = l.closed && l.bye_sent;
  }
  l.cv.notify_all();
  // A peer that said goodbye and received ours may exit; its connection closing then
  // is the normal end, not an error.
  if (!was_closed) {
    std::string msg = fmt::format(
        "rank {}: channel '{}': connection to rank {} failed: {}; is rank {} still running? "
        "check its output",
        rank_, options_.name, l.peer, what, l.peer);
    const bool critical = std::find(options_.critical_peers.begin(), options_.critical_peers.end(),
                                    l.peer) != options_.critical_peers.end();
    if (options_.on_peer_failure == PeerFailure::kThrow || critical) {
      std::lock_guard<std::mutex> lock(error_mu_);
      if (!error_) error_ = std::make_exception_ptr(CommError(msg));
    } else {
      detail::log_warning(msg + "; continuing without it");
    }
  }
  inbox_cv_.notify_all();
  // Wake the other thread of this link too.
  std::lock_guard<std::mutex> lock(l.recv_mu);
  for (auto& b : l.recv_bufs) {
    if (b) b->abortWaitRecv();
  }
}

std::vector<Message> Channel::poll() {
  rethrow_if_failed();
  std::lock_guard<std::mutex> lock(inbox_mu_);
  std::vector<Message> out(std::make_move_iterator(inbox_.begin()),
                           std::make_move_iterator(inbox_.end()));
  inbox_.clear();
  return out;
}

std::vector<Message> Channel::wait(std::chrono::milliseconds timeout) {
  {
    std::unique_lock<std::mutex> lock(inbox_mu_);
    inbox_cv_.wait_for(lock, timeout, [&] {
      if (!inbox_.empty()) return true;
      std::lock_guard<std::mutex> elock(error_mu_);
      return error_ != nullptr;
    });
  }
  return poll();
}

bool Channel::flush(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  bool ok = true;
  for (auto& link : links_) {
    if (!link) continue;
    std::unique_lock<std::mutex> lock(link->mu);
    ok = link->cv.wait_until(lock, deadline, [&] {
           return link->failed || link->idle_locked();
         }) && ok;
  }
  rethrow_if_failed();
  return ok;
}

bool Channel::wait_for_room(int peer, size_t max_queued, std::chrono::milliseconds timeout) {
  if (peer < 0 || peer >= size_ || peer == rank_) {
    throw ConfigError(fmt::format("rank {}: channel '{}': no peer rank {}", rank_, options_.name, peer));
  }
  PeerLink& l = *links_[peer];
  bool ok;
  {
    std::unique_lock<std::mutex> lock(l.mu);
    ok = l.cv.wait_for(lock, timeout, [&] { return l.failed || l.queued_locked() <= max_queued; });
  }
  rethrow_if_failed();
  return ok;
}

bool Channel::close(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  const bool first_close = !closing_.exchange(true);
  for (auto& link : links_) {
    if (!link || !first_close) continue;
    {
      std::lock_guard<std::mutex> lock(link->mu);
      link->bye_queued = true;
    }
    link->cv.notify_all();
  }
  std::vector<int> unfinished;
  for (auto& link : links_) {
    if (!link) continue;
    std::unique_lock<std::mutex> lock(link->mu);
    bool done = link->cv.wait_until(lock, deadline, [&] {
      return link->failed || (link->bye_sent && link->closed);
    });
    if (!done) unfinished.push_back(link->peer);
  }
  if (!unfinished.empty()) {
    detail::log_warning(fmt::format(
        "rank {}: channel '{}': ranks {} did not finish within {} ms of close(); what they "
        "still send is lost",
        rank_, options_.name, fmt::join(unfinished, ", "), timeout.count()));
  }
  rethrow_if_failed();
  return unfinished.empty();
}

void Channel::abort_and_join() {
  stopping_ = true;
  for (auto& link : links_) {
    if (!link) continue;
    {
      std::lock_guard<std::mutex> lock(link->mu);
      for (auto* b : link->in_flight_bufs) b->abortWaitSend();
    }
    link->cv.notify_all();
    {
      std::lock_guard<std::mutex> lock(link->recv_mu);
      for (auto& b : link->recv_bufs) {
        if (b) b->abortWaitRecv();
      }
    }
  }
  for (auto& link : links_) {
    if (!link) continue;
    if (link->sender.joinable()) link->sender.join();
    if (link->receiver.joinable()) link->receiver.join();
    // Posted receives may still be filled by Gloo; their memory lives as long as the
    // connections do.
    std::lock_guard<std::mutex> lock(link->recv_mu);
    for (size_t i = 0; i < link->recv_bufs.size(); ++i) {
      if (!link->recv_bufs[i]) continue;
      world_->retire(std::make_shared<std::pair<std::unique_ptr<gloo::transport::UnboundBuffer>, at::Tensor>>(
          std::move(link->recv_bufs[i]), link->recv_frames[i]));
    }
  }
  inbox_cv_.notify_all();
}

PeerCounters Channel::counters(int peer) const {
  if (peer < 0 || peer >= size_) {
    throw ConfigError(fmt::format("rank {}: no rank {} in a world of {}", rank_, peer, size_));
  }
  PeerCounters c;
  c.peer = peer;
  const auto& l = links_[peer];
  if (!l) return c;
  c.sent_messages = l->sent_messages;
  c.sent_bytes = l->sent_bytes;
  c.received_messages = l->received_messages;
  c.received_bytes = l->received_bytes;
  c.coalesced = l->coalesced;
  c.coalesced_received = l->coalesced_received;
  c.rejected = l->rejected;
  c.dropped = l->dropped;
  std::lock_guard<std::mutex> lock(l->mu);
  c.queued = l->queued_locked();
  c.closed = l->closed;
  c.failed = l->failed;
  c.last_reject = l->last_reject;
  return c;
}

std::vector<PeerCounters> Channel::counters() const {
  std::vector<PeerCounters> out;
  for (int p = 0; p < size_; ++p) {
    if (p != rank_) out.push_back(counters(p));
  }
  return out;
}

std::vector<int> Channel::live_peers() const {
  std::vector<int> out;
  for (const auto& l : links_) {
    if (!l) continue;
    std::lock_guard<std::mutex> lock(l->mu);
    if (!l->failed && !l->closed) out.push_back(l->peer);
  }
  return out;
}

}  // namespace torch_asgd
