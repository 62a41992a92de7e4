// Channel: asynchronous point-to-point messages between the ranks of a World, over
// Gloo's TCP transport. It knows delivery, sizes and checks; what the messages mean is
// the business of the optimizer that speaks them, whose fields travel as opaque
// Metadata (metadata.h) beside the payload.
//
// Delivery
// - kOrdered: every message is delivered once, in the order it was sent. At most
//   ChannelOptions::max_ordered wait per peer on either side: send() throws ConfigError
//   beyond that on the sender, and a peer that sends more than the receiver has polled
//   is failed (it broke the protocol that bounds them).
// - kAdditive: for numeric updates that may be summed (deltas, gradients). Each additive
//   stream is declared when the channel opens (dtype, size, and how its metadata
//   merges). A sender whose peer is still receiving the previous message adds the next
//   into a pending one instead of queueing it, and a receiver sums what arrives into
//   one buffer per stream until the training thread polls: nothing is lost, and memory
//   does not grow with the number of messages.
// - kReplace: only the newest message of a stream counts, on either side.
//
// Contract
// - send()/broadcast() copy the payload and return at once: they never wait for the
//   network or for a peer. A broadcast is copied once and the copy is shared by every
//   peer's transmission; a peer needs an additive buffer of its own only while it lags.
// - Memory and threads do not grow with peers x model: receive buffers are chunk-sized
//   and shared by all peers, additive arrivals are summed into one buffer per stream,
//   and three threads (a sender, a receiver and a watcher of the connections) serve
//   every peer. Messages larger than a chunk travel as several chunks; a receiver may
//   hand part of an additive message to the training thread before the rest arrives
//   (its metadata comes with the last chunk). The payload buffers of ordered and
//   replace messages are reused once released (the sender's copy when acknowledged,
//   a received payload when the caller drops it), since fresh memory costs a page fault
//   per page on first write: each side (sending, receiving) keeps at most 8 idle
//   buffers and max(2 capacity_bytes, 32 MiB) of them, the most recently released.
// - Every frame is checked (wire.h): sizes, sender, sequence, token, header checksum,
//   and by default an XXH3 checksum of every payload. What fails a check is counted in
//   PeerCounters::rejected, logged once per reason, and never delivered. Floating-point
//   payloads holding NaN or Inf are rejected too (on_non_finite). An additive message is
//   summed chunk by chunk as it streams in: one rejected after a first chunk was summed
//   leaves its stream's next AdditiveArrival marked `tainted` (not to be applied).
// - An error on a background thread (a peer's connection failing) is stored and
//   rethrown, as CommError, by the next call on the training thread. With
//   PeerFailure::kContinue it is logged once instead, that peer is marked failed, and
//   messages to it are dropped (counted).
// - Closing: close() sends what is pending and a goodbye to every peer, acknowledges
//   each peer's goodbye, and waits (bounded) until every peer has acknowledged ours: when
//   it returns true every peer has received everything this rank sent, and this rank
//   everything every peer sent, so that either side may exit at once. The destructor
//   aborts without waiting.
// - Thread safety: all public members may be called from any thread, but the intended
//   use is one training thread per Channel.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "torch_asgd/comm/codec.h"
#include "torch_asgd/comm/metadata.h"
#include "torch_asgd/comm/transport.h"
#include "torch_asgd/comm/wire.h"

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

enum class Delivery : uint8_t { kOrdered = 0, kAdditive = 1, kReplace = 2 };

struct AdditiveStream {
  uint8_t id = 0;  // 0..15, distinct
  c10::ScalarType dtype = c10::ScalarType::Float;
  int64_t numel = 0;
  MetaSchema meta;  // how the metadata of two coalesced messages merges
  // How messages travel (codec.h; float32 streams only). A lossy codec keeps, per group
  // of peers posted together, what a message lost and adds it to their next message
  // (error feedback): the sum of what every peer received plus what the sender still
  // keeps for it equals the sum of what was sent. Coalescing works on the decoded
  // values; what is left at close() travels uncompressed, so that a closed channel has
  // delivered everything exactly.
  Compression compression;
};

struct ChannelOptions {
  // Both sides of a channel must agree on all of these; World::open_channel checks.
  std::string name = "default";
  // Largest payload an ordered or replace message may carry, in bytes.
  int64_t capacity_bytes = 1 << 20;
  std::vector<AdditiveStream> additive;
  // Bytes of one Gloo transfer, and of each shared receive buffer (a multiple of 8).
  int64_t chunk_bytes = 4 << 20;
  // Receive buffers kept posted, shared by all peers (1..64).
  int recv_depth = 4;
  // Ordered and replace messages posted to Gloo at once per peer (>= 1).
  size_t max_in_flight = 2;
  // Ordered messages that may wait per peer, on the sending and on the receiving side.
  size_t max_ordered = 16;
  // Largest metadata block of a message, in bytes.
  size_t max_meta_bytes = 64 << 10;
  // Payloads at most this large travel inside their header frame (one transfer).
  int64_t inline_bytes = 64 << 10;
  // Additive messages: a peer ready to send the buffer it shares with other lagging
  // peers waits for them (they are still sending their previous message) up to this many
  // times a transfer's time (the shortest last transfer of a live peer, at most its own),
  // so that they go on sharing one buffer instead of one each: memory against latency.
  // 0: never wait.
  double group_hold = 4.0;
  // Checksum every payload (XXH3-64: the sender computes, the receiver verifies). TCP
  // checksums what it carries; this catches corruption above it and payload chunks cut
  // short by a broken peer, at about a tenth of a memory pass per side.
  bool verify_payload = true;
  PeerFailure on_peer_failure = PeerFailure::kThrow;
  // Peers whose failure is always thrown, whatever on_peer_failure says (an AsGrad
  // worker tolerates a dead fellow worker, never a dead server). May differ by rank.
  std::vector<int> critical_peers;
  // (Encoded additive blocks that do not decode to finite values are always rejected, as
  // kBadCodec: no encoder makes them.)
  NonFinite on_non_finite = NonFinite::kReject;
};

struct Outgoing {
  Delivery delivery = Delivery::kOrdered;
  uint8_t stream = 0;
  // CPU tensor, any shape; its elements travel as one contiguous run. May be undefined
  // for a message with no payload. Copied by send(): the caller may reuse it at once.
  // Additive: dtype and numel of the declared stream.
  at::Tensor payload;
  Metadata meta;  // additive: must conform to the stream's schema
};

// An ordered or replace message as it arrived.
struct Message {
  int sender = -1;
  Delivery delivery = Delivery::kOrdered;
  uint8_t stream = 0;
  // 1-D, the dtype it was sent with; owned by the caller. Its memory returns to the
  // channel's pool when the last tensor sharing it is gone, so its storage cannot grow
  // (resize_ beyond its size throws): clone() it to get one that can.
  at::Tensor payload;
  Metadata meta;
};

// What arrived on one additive stream since the last poll: the sum of the payloads and
// the metadata of each message whose last chunk is in it. The buffer returns to the
// channel when `sum` is released.
struct AdditiveArrival {
  uint8_t stream = 0;
  at::Tensor sum;
  std::vector<std::pair<int, Metadata>> parts;  // (sender, metadata), oldest first per sender
  // A message rejected after some of its chunks were already summed in (non-finite values
  // in a later chunk, a payload checksum that failed at the end): `sum` is not the sum of
  // `parts` and must not be applied. The rejection is counted as usual.
  bool tainted = false;
};

struct Arrivals {
  // Ordered and replace messages in arrival order (a replace message where its newest
  // version arrived; older versions are gone).
  std::vector<Message> messages;
  std::vector<AdditiveArrival> additive;  // streams that received something
  bool empty() const { return messages.empty() && additive.empty(); }
};

struct PeerCounters {
  int peer = -1;
  uint64_t sent_messages = 0;
  uint64_t sent_bytes = 0;  // header frames and payloads handed to the network
  uint64_t received_messages = 0;
  uint64_t received_bytes = 0;
  uint64_t coalesced = 0;           // outgoing messages merged into a pending one
  uint64_t coalesced_received = 0;  // arrivals merged into one not yet polled
  uint64_t rejected = 0;            // frames that failed validation
  uint64_t dropped = 0;             // outgoing messages to a failed peer
  uint64_t lost = 0;                // sent messages the peer never acknowledged before it failed
  uint64_t queued = 0;              // messages waiting for or in transmission now
  uint64_t held_bytes = 0;          // payload bytes kept for it now (in flight and waiting)
  bool lagging = false;             // its previous message was still in flight at the last send
  bool closed = false;              // the peer said goodbye
  bool failed = false;              // the peer's connection failed
  std::string last_reject;          // why the last rejected frame was rejected
};

namespace detail {
struct ChannelCore;
class Sender;
class Receiver;
class Watcher;
}  // namespace detail

// Throws ConfigError, naming the field, for options no channel can work with. The one
// check of ChannelOptions; World::open_channel() calls it.
void validate(const ChannelOptions& options);

class Channel : public Transport {
 public:
  // Use World::open_channel(), which checks that every rank opens the same channel.
  Channel(std::shared_ptr<World> world, ChannelOptions options, uint64_t slot, uint64_t token);
  ~Channel() override;
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  int rank() const override;
  int size() const override;
  const ChannelOptions& options() const;

  // Hands `msg` to the sender thread and returns at once (see the contract above).
  // Throws ConfigError for a bad peer, a payload that does not fit, metadata that does
  // not conform, or a full ordered queue; CommError for a stored error.
  void send(int peer, const Outgoing& msg) override;
  // send() to every other rank; the payload is copied once for all of them.
  void broadcast(const Outgoing& msg);
  // An additive broadcast whose payload `fill` writes straight into the channel's
  // buffer: fill(buffer, accumulate) must add its values into `buffer` when
  // `accumulate` (a previous broadcast is still pending there), else overwrite it.
  void broadcast_additive(uint8_t stream, const Metadata& meta,
                          const std::function<void(at::Tensor& buffer, bool accumulate)>& fill) override;

  // Everything that has arrived, without waiting. Rethrows a stored error.
  Arrivals poll() override;
  // Waits up to `timeout` for something to arrive; returns what has (maybe nothing).
  Arrivals wait(std::chrono::milliseconds timeout) override;

  // Waits up to `timeout` until everything sent so far has been handed to the network
  // (or its peer failed). Returns false on timeout. Under a lossy codec, what encodings
  // lost is kept for the next message (or close()) and is not waited for here.
  bool flush(std::chrono::milliseconds timeout);

  // Waits up to `timeout` until at most `max_queued` messages wait for or are in
  // transmission to `peer`. Returns false on timeout.
  bool wait_for_room(int peer, size_t max_queued, std::chrono::milliseconds timeout);

  // Sends what is pending and a goodbye to every live peer, acknowledges theirs, and
  // waits up to `timeout` for every live peer's goodbye and acknowledgement. Arrivals
  // stay available to poll(). Returns false (and logs the peers) if some peer did not
  // finish in time. After close(), send() throws.
  bool close(std::chrono::milliseconds timeout) override;

  std::vector<PeerCounters> counters() const override;
  PeerCounters counters(int peer) const;
  // Peers whose connection failed (not those that said goodbye first).
  std::vector<int> failed_peers() const override;
  // Peers that said goodbye.
  std::vector<int> closed_peers() const override;
  // Payload bytes the sender keeps referenced for all peers together, a buffer shared by
  // several peers counted once (PeerCounters::held_bytes counts it for each).
  uint64_t held_bytes() const;
  // Background threads serving this channel (for tests and benchmarks).
  int threads() const { return 3; }

  // Throws the first error stored by a background thread, if any.
  void rethrow_if_failed() override;

 private:
  friend struct ChannelTestAccess;  // tests: hold the receiver thread

  std::shared_ptr<detail::ChannelCore> core_;
  std::unique_ptr<detail::Receiver> receiver_;
  std::unique_ptr<detail::Sender> sender_;
  std::unique_ptr<detail::Watcher> watcher_;
};

}  // namespace torch_asgd
