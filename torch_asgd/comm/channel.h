// Channel: asynchronous point-to-point messages between the ranks of a World, over
// Gloo's TCP transport.
//
// Contract
// - send()/broadcast() copy the payload and return at once: they never wait for the
//   network or for a peer. The training thread never touches Gloo.
// - Per peer, outgoing data is bounded. A kAdditive message is added into the
//   not-yet-sent message of the same kind (coalesced); a kReplace message overwrites
//   it; kOrdered messages queue, at most ChannelOptions::max_ordered per peer (send()
//   throws ConfigError beyond that). Memory per peer is therefore O(capacity) however
//   slow the peer is: one pending message per kind, one in flight, and the posted
//   receive buffers.
// - Background threads (one sender and one receiver per peer) own the Gloo traffic:
//   every peer always has `recv_depth` receive buffers posted, so a sender never
//   waits for its receiver to ask. Arrivals are validated (message.h), then queued
//   for poll()/wait(); kAdditive arrivals that the training thread has not taken yet
//   are coalesced there too, so the receive side is bounded the same way.
// - A message that fails validation is counted in PeerCounters::rejected and never
//   delivered.
// - An error on a background thread (a peer's connection failing) is stored and
//   rethrown, as CommError, by the next call on the training thread. With
//   PeerFailure::kContinue it is logged once instead, that peer is marked failed,
//   and messages to it are dropped (counted).
// - Thread safety: all public members may be called from any thread, but the
//   intended use is one training thread per Channel.
// - Closing: close() sends what is pending, then a goodbye to every peer, and waits
//   (bounded) for every peer's goodbye, so that every message sent before a peer's
//   close() has been delivered here. The destructor aborts without waiting.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <ATen/core/Tensor.h>

#include "torch_asgd/comm/message.h"

namespace gloo {
class Context;
}

namespace torch_asgd {

class World;

enum class PeerFailure {
  kThrow,     // the next call on the training thread throws CommError
  kContinue,  // log a warning, stop talking to that peer, carry on with the others
};

// What a receiver does with a floating-point payload that holds NaN or Inf.
enum class NonFinite {
  kAccept,  // deliver it
  kReject,  // reject and count it, warn once naming the sender (default)
  kFatal,   // reject it and make the next call on the training thread throw CommError
};

struct ChannelOptions {
  // Both sides of a channel must agree on all of these; World::open_channel checks.
  std::string name = "default";
  // Largest payload a message on this channel may carry, in bytes.
  int64_t capacity_bytes = 1 << 20;
  // Receive buffers kept posted per peer (>= 1). Two let one arrive while the other
  // is handed over.
  int recv_depth = 2;
  // Sends posted to Gloo at once per peer (>= 1). More keep the connection busy
  // while the sender thread wakes up, at one more frame each and less coalescing;
  // on the 2-core reference machine 2 measured no better than 1.
  size_t max_in_flight = 1;
  // Ordered messages that may wait per peer before send() refuses more.
  size_t max_ordered = 64;
  // Checksum every payload (sender computes, receiver verifies). Off by default: TCP
  // already checksums what it carries and the trailer exposes truncation; on, it
  // catches corruption above TCP at the cost of two passes over every payload
  // (measured in benchmarks/results/channel_loopback.md).
  bool verify_payload = false;
  PeerFailure on_peer_failure = PeerFailure::kThrow;
  // Peers whose failure is always thrown, whatever on_peer_failure says (an AsGrad
  // worker tolerates a dead fellow worker, never a dead server). May differ by rank.
  std::vector<int> critical_peers;
  NonFinite on_non_finite = NonFinite::kReject;
};

struct Outgoing {
  MessageKind kind = MessageKind::kData;
  Delivery delivery = Delivery::kOrdered;
  // CPU tensor, any shape; its elements travel as one contiguous run. May be
  // undefined for a message with no payload. Copied by send(): the caller may reuse
  // it at once.
  at::Tensor payload;
  int64_t sender_step = 0;
  int64_t model_version = 0;
  UpdateStats updates;
};

struct Message {
  MessageHeader header;
  // 1-D tensor of header.dtype with header.payload_bytes bytes; owned by the caller.
  at::Tensor payload;
  int sender() const { return header.sender; }
};

struct PeerCounters {
  int peer = -1;
  uint64_t sent_messages = 0;
  uint64_t sent_bytes = 0;  // header and payload bytes handed to the network
  uint64_t received_messages = 0;
  uint64_t received_bytes = 0;
  uint64_t coalesced = 0;           // outgoing messages merged into a pending one
  uint64_t coalesced_received = 0;  // arrivals merged into one not yet polled
  uint64_t rejected = 0;            // arrivals that failed validation
  uint64_t dropped = 0;             // outgoing messages to a failed peer
  uint64_t queued = 0;              // messages waiting for or in transmission now
  bool closed = false;              // the peer said goodbye
  bool failed = false;              // the peer's connection failed
  std::string last_reject;          // why the last rejected message was rejected
};

namespace detail {
class FramePool;
struct PeerLink;
}  // namespace detail

class Channel {
 public:
  // Use World::open_channel(), which checks that every rank opens the same channel.
  Channel(std::shared_ptr<World> world, ChannelOptions options, uint64_t slot, uint64_t token);
  ~Channel();
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  const ChannelOptions& options() const { return options_; }

  // Hands `msg` to the sender of `peer` and returns at once (see the contract above).
  // Throws ConfigError for a bad peer, a payload over capacity, additive payloads of
  // different size or dtype, or a full ordered queue; CommError for a stored error.
  void send(int peer, const Outgoing& msg);
  // send() to every other rank, with one copy of the payload per peer.
  void broadcast(const Outgoing& msg);

  // Everything that has arrived, without waiting. Rethrows a stored error.
  std::vector<Message> poll();
  // Waits up to `timeout` for at least one message; returns what has arrived (maybe
  // nothing). Rethrows a stored error.
  std::vector<Message> wait(std::chrono::milliseconds timeout);

  // Waits up to `timeout` until everything sent so far has been handed to the network
  // and accepted by the receiving side's posted buffers (or its peer failed). Returns
  // false on timeout.
  bool flush(std::chrono::milliseconds timeout);

  // Waits up to `timeout` until at most `max_queued` messages wait for or are in
  // transmission to `peer` (backpressure for callers that must not coalesce). Returns
  // false on timeout.
  bool wait_for_room(int peer, size_t max_queued, std::chrono::milliseconds timeout);

  // Sends what is pending and a goodbye to every live peer, then waits up to
  // `timeout` for every live peer's goodbye. Arrivals stay available to poll().
  // Returns false (and logs the peers) if some peer did not finish in time. After
  // close(), send() throws.
  bool close(std::chrono::milliseconds timeout);

  std::vector<PeerCounters> counters() const;
  PeerCounters counters(int peer) const;
  // Peers that are neither failed nor closed.
  std::vector<int> live_peers() const;

  // Throws the first error stored by a background thread, if any.
  void rethrow_if_failed();

 private:
  friend struct detail::PeerLink;

  void send_locked_peer(detail::PeerLink& link, const Outgoing& msg, const at::Tensor& flat);
  void sender_loop(detail::PeerLink& link);
  void receiver_loop(detail::PeerLink& link);
  void deliver(detail::PeerLink& link, at::Tensor frame, const MessageHeader& h);
  void peer_failed(detail::PeerLink& link, const std::string& what);
  void abort_and_join();

  std::shared_ptr<World> world_;
  std::shared_ptr<gloo::Context> context_;
  ChannelOptions options_;
  const int rank_;
  const int size_;
  const uint64_t slot_;
  const uint64_t token_;
  std::shared_ptr<detail::FramePool> pool_;
  std::vector<std::unique_ptr<detail::PeerLink>> links_;  // indexed by rank; null for self

  // Guards inbox_ and is what wait() sleeps on.
  std::mutex inbox_mu_;
  std::condition_variable inbox_cv_;
  std::deque<Message> inbox_;

  // Guards error_.
  std::mutex error_mu_;
  std::exception_ptr error_;

  std::atomic<bool> closing_{false};
  std::atomic<bool> stopping_{false};
};

}  // namespace torch_asgd
