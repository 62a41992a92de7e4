// The sending half of a Channel: one thread that posts every peer's frames to Gloo and
// never waits for Gloo. A message stays referenced until the peer acknowledges it
// (wire.h), which is how this thread learns, for every peer at once, what was
// delivered: a stopped or slow peer holds only its own messages, never the thread.
//
// Per peer and additive stream at most one message is in flight; what is sent meanwhile
// is summed into the one pending message. A broadcast's buffer is shared by every peer;
// peers that lag share one coalescing buffer for as long as they waited for the same
// broadcasts (a group), so that n lagging peers in step cost one buffer, not n. A group
// is posted together: a member that is ready first waits for the others (at most
// group_hold times the shortest last transfer of a live peer, and a minute), so that
// peers of uneven speed do not split into a buffer each. When every peer waits with the
// same buffer, a broadcast is summed straight into it. Under a lossy codec a message is
// encoded once (outside the lock), and what the encoding lost becomes the next waiting
// message of the peers that post it. Ordered and replace messages are in flight up to
// max_in_flight per peer. Internal.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "torch_asgd/comm/detail/channel_core.h"

namespace torch_asgd {
namespace detail {

// A message to send, possibly shared by several peers. Immutable once posted.
struct OutMsg {
  FrameType type = FrameType::kOrdered;
  uint8_t stream = 0;
  c10::ScalarType dtype = c10::ScalarType::Byte;
  at::Tensor payload;  // contiguous 1-D CPU tensor, or undefined (no payload)
  Metadata meta;
  bool checksummed = false;
  uint64_t checksum = 0;  // of the payload, computed once when first posted
  // Additive: posted to some peer (or being encoded for that), and so never to be added
  // into again. A buffer that is not frozen is referenced only by peers' waiting slots
  // (and, as a residual, by the message it was left by), all of which receive the same
  // broadcasts: it may be summed into in place.
  bool frozen = false;
  // Additive under a lossy codec, once first posted: the encoded bytes every peer
  // transmits (the checksum is theirs), and what the encoding lost, which becomes the
  // waiting message of every peer that posts this one.
  at::Tensor wire;
  Codec codec = Codec::kNone;
  std::shared_ptr<OutMsg> residual;
  // Only what earlier messages lost (no update of its own): waits for the next message
  // to ride along, or for close(), where it travels uncompressed.
  bool residual_only = false;

  uint64_t bytes() const;       // of the payload as given (what the header calls its size
                                // when it travels uncompressed)
  uint64_t held_bytes() const;  // payload and encoded bytes kept
};
using OutRef = std::shared_ptr<OutMsg>;

class Sender {
 public:
  explicit Sender(ChannelCore& core);
  ~Sender();
  Sender(const Sender&) = delete;
  Sender& operator=(const Sender&) = delete;

  void start();
  void stop_and_join();  // sets nothing in the core; call after core.stopping

  // Training thread. `msg` is already a private copy of the caller's data.
  void enqueue(int peer, OutRef msg);
  // One message for every live peer, sharing `msg`.
  void enqueue_all(OutRef msg);
  // The additive broadcast of Channel::broadcast_additive.
  void broadcast_additive(uint8_t stream, const Metadata& meta,
                          const std::function<void(at::Tensor&, bool)>& fill);
  // Goodbyes to every live peer once what was sent before is posted.
  void request_close();
  // After close(): waits, at most until `deadline`, until the frames that acknowledge
  // the peers' goodbyes have left (a peer's close() waits for them, and this process may
  // end right after). Returns the peers whose acknowledgement had not left.
  std::vector<int> await_bye_acks_sent(std::chrono::steady_clock::time_point deadline);

  // Receiver thread (the ack path): the peer has processed our frames up to `ack` (false:
  // we never sent that frame, and the acknowledgement is ignored); it asked for an
  // acknowledgement of its own frames. Neither takes the sender's lock, which the
  // training and sender threads hold while they add model-sized payloads: they leave the
  // news for the sender thread and wake it.
  bool on_ack(int peer, uint64_t ack);
  void ack_due(int peer, uint64_t seq);  // its frame `seq` asked for one

  // Any thread: drop what waits for a failed peer.
  void peer_failed(int peer);
  // Any thread not holding this sender's lock: waiters re-check (the channel broke).
  void wake_waiters();
  // The thread looks again (any thread, with any lock but wake_mu_ held).
  void wake();

  // A new message whose payload buffer (numel elements of dtype) is the caller's to fill;
  // additive buffers are reused once no peer needs them any more.
  OutRef new_message(FrameType type, uint8_t stream, c10::ScalarType dtype, int64_t numel);

  // Messages waiting for or in transmission to `peer` (not yet acknowledged).
  size_t queued(int peer) const;
  bool idle(int peer) const;  // nothing queued or unacknowledged (or the peer failed)
  bool lagging(int peer) const;
  struct Counts {
    uint64_t sent_messages = 0, sent_bytes = 0, coalesced = 0, dropped = 0, lost = 0;
    uint64_t held_bytes = 0;
  };
  Counts counts(int peer) const;
  uint64_t held_bytes() const;  // over all peers, each buffer once
  // Wait until the peer is idle / has at most `max_queued` messages queued (or failed).
  bool wait_idle(int peer, std::chrono::steady_clock::time_point deadline);
  bool wait_room(int peer, size_t max_queued, std::chrono::steady_clock::time_point deadline);

 private:
  struct Posted;
  struct PeerOut;

  void run();   // loop(), and what to do if it throws
  void loop();
  void wake_locked() { wake(); }  // for callers that hold mu_ (taken before wake_mu_)
  void take_acks_locked();  // what the ack path left, into the peers' state
  bool broadcast_undistributed_locked() const;
  bool idle_locked(const PeerOut& p) const;
  void distribute_broadcasts_locked(std::unique_lock<std::mutex>& lock);
  void coalesce_locked(PeerOut& p, uint8_t stream, OutRef msg);
  OutRef shared_waiting_locked(uint8_t stream) const;
  // Encodes what is about to be posted under a lossy codec, outside the lock.
  void encode_ready(std::unique_lock<std::mutex>& lock);
  // m's encoded bytes and its residual (nothing if the codec cannot take m's values).
  struct Encoded {
    at::Tensor wire;
    OutRef residual;
  };
  Encoded encode_message(const OutMsg& m, const AdditiveStream& spec);
  void drop_residual_if_unneeded_locked(OutMsg* m, int stream);
  bool held_for_group_locked(PeerOut& p, int stream);
  void post_ready_locked(PeerOut& p);
  void post_locked(PeerOut& p, OutRef msg, FrameType type, bool ack_requested);
  void release_locked(PeerOut& p, uint64_t ack);
  void drop_locked(PeerOut& p);

  ChannelCore& core_;
  std::thread thread_;

  // What wakes the thread: it sleeps on cv_ with wake_mu_ (never with mu_, so that
  // waking it never waits for mu_). Taken after mu_ where both are held.
  std::mutex wake_mu_;  // guards woken_
  std::condition_variable cv_;
  bool woken_ = false;  // something changed since the thread last looked

  // What the ack path leaves (ack_mu_ is taken after mu_ where both are held): per peer,
  // the sequence number of the next frame (an acknowledgement beyond it is refused), the
  // highest acknowledged, and whether the peer asked for an acknowledgement.
  struct AckIn {
    uint64_t next_seq = 1;
    uint64_t acked = 0;
    uint64_t due_seq = 0;  // the newest of its frames that asked for an acknowledgement
  };
  mutable std::mutex ack_mu_;  // guards acks_
  std::vector<AckIn> acks_;

  // Guards everything below; waiters sleep on done_cv_.
  mutable std::mutex mu_;
  std::condition_variable done_cv_;  // something was acknowledged, posted or dropped
  std::optional<std::chrono::steady_clock::time_point> next_wake_;  // a held message is due
  std::vector<std::unique_ptr<PeerOut>> peers_;  // by rank; null for self
  // Broadcasts not yet handed to the peers, by additive stream (summed while waiting).
  std::array<OutRef, kMaxStreams> pending_broadcast_{};
  // Broadcasts taken out of pending_broadcast_ and being checksummed outside the lock:
  // in no peer's slot yet, but not delivered either (idle, room and goodbye wait).
  int distributing_ = 0;
  std::vector<std::pair<int, std::string>> failures_;  // posts that failed, to report unlocked

  // Additive payload buffers to reuse, by stream.
  struct FreeList {
    std::mutex mu;  // guards buffers
    std::array<std::vector<at::Tensor>, kMaxStreams> buffers;
  };
  std::shared_ptr<FreeList> free_;
};

}  // namespace detail
}  // namespace torch_asgd
