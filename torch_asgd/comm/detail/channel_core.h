// What the parts of a Channel share: its options and identity, the status of every peer
// (failed, said goodbye, acknowledged ours), the error to rethrow on the training
// thread, and small helpers on payload bytes. Internal.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "torch_asgd/comm/channel.h"
#include "torch_asgd/comm/detail/buffer_pool.h"
#include "torch_asgd/comm/wire.h"
#include "torch_asgd/detail/numeric.h"

namespace gloo {
class Context;
namespace transport {
class UnboundBuffer;
}
}  // namespace gloo

namespace torch_asgd {
class World;
namespace detail {

class Sender;
class Receiver;

// Gloo's waits cannot poll: a wait that times out poisons every connection of the
// context. Background waits are therefore unbounded and ended by abortWait*(); a
// peer's death shows as a connection error instead.
constexpr std::chrono::milliseconds kForever = std::chrono::hours(24 * 365);

struct PeerStatus {
  bool failing = false;  // peer_failed() has claimed it; `failed` is set once it is settled
  bool failed = false;
  bool bye_received = false;  // the peer sends nothing more but acknowledgements
  uint64_t bye_seq = 0;       // the sequence number of its goodbye
  bool bye_acked = false;     // the peer has everything this rank sent, goodbye included
  // The acknowledgement of its goodbye is handed to Gloo (the peer's close() waits for
  // it: a channel destroyed before would leave the peer waiting out its timeout).
  bool bye_ack_posted = false;
  std::string last_reject;
  uint64_t rejected = 0;
  bool rejects_logged[static_cast<int>(Reject::kCount_)] = {};
};

struct ChannelCore {
  ChannelCore(std::shared_ptr<World> w, ChannelOptions o, uint64_t slot, uint64_t tok);

  std::shared_ptr<World> world;
  std::shared_ptr<gloo::Context> context;
  const ChannelOptions options;
  const int rank;
  const int size;
  const uint64_t data_slot;   // frames of messages
  const uint64_t watch_slot;  // never sent on: its posted receives fail with their connection
  const uint64_t token;
  // Declared additive streams, by id (nullptr: not declared).
  std::array<const AdditiveStream*, kMaxStreams> streams{};
  DecodeLimits limits;  // what the receiver accepts (expected_sender is set per frame)

  Sender* sender = nullptr;
  Receiver* receiver = nullptr;

  // Payloads of ordered and replace messages: the sender's copies, and what the receiver
  // hands out (each keeps at most 8 idle buffers and max(2 capacity_bytes, 32 MiB)).
  BufferPool send_buffers;
  BufferPool recv_buffers;

  // Guards peers and is what close() sleeps on.
  mutable std::mutex mu;
  std::condition_variable cv;
  std::vector<PeerStatus> peers;

  std::atomic<bool> stopping{false};
  std::atomic<bool> closing{false};
  // Tests: the receiver thread takes no frame while set (a peer that stalls).
  std::atomic<bool> hold_receiver{false};
  // Tests: the sender posts no acknowledgement frame of its own while set (a slow sender
  // thread, or a process about to end).
  std::atomic<bool> hold_acks{false};
  // Tests: the sender thread throws when it next wakes (an error it did not foresee).
  std::atomic<bool> fail_sender_thread{false};
  // Tests: the receiver thread throws once its next frame has arrived.
  std::atomic<bool> fail_receiver_thread{false};
  // Tests: the watcher thread throws (an int) when its wait next ends.
  std::atomic<bool> fail_watcher_thread{false};

  std::mutex error_mu;  // guards error; taken after mu where both are held
  std::exception_ptr error;
  std::atomic<bool> broken{false};  // a thread of the channel died: nothing moves any more

  // Bytes of one Gloo transfer of a payload that follows the header frame `h`: the chunk
  // size, or whole blocks of its codec.
  uint64_t transfer_bytes(const FrameHeader& h) const;
  bool critical(int peer) const;
  bool failed(int peer) const;
  std::vector<int> live_peers() const;  // not failing or failed (goodbyes included)
  // Every peer said goodbye and acknowledged ours, ours of theirs is posted, none failed,
  // no thread died: nothing more arrives on this channel's slots.
  bool ended_cleanly() const;
  // A peer's connection failed, as seen by any thread: log or store the error (not if
  // the peer had said goodbye: then it is the normal end), and tell sender and receiver.
  void peer_failed(int peer, const std::string& what);
  // A frame from `peer` failed a check: count it, log the reason once.
  void rejected(int peer, Reject why, const std::string& detail = "");
  // Stores an error for the training thread (the first one wins).
  void fail(std::exception_ptr e);
  // The `thread` ("sending", "receiving") stopped on an error it did not handle (`what`):
  // store a CommError naming both, and end every wait for the channel's progress
  // (close(), flush(), room for a message). Call with no lock held.
  void thread_died(const std::string& thread, const std::string& what);
  void rethrow_if_failed();
  // Keeps `resource` alive as long as the Gloo connections (memory Gloo may still touch).
  void retire(std::shared_ptr<void> resource, uint64_t bytes);
  std::string prefix() const;  // "rank R: channel 'name'"
};

}  // namespace detail
}  // namespace torch_asgd
