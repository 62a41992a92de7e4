// The receiving half of a Channel: one thread that keeps `recv_depth` chunk-sized
// buffers posted to Gloo for any peer (in rotating order, so that no peer starves the
// others), checks every frame, reassembles messages and hands them over:
//   - additive payloads are summed at once into one buffer per stream, whatever peer
//     they come from; the training thread's poll() takes that buffer and leaves a fresh
//     one;
//   - ordered messages queue (at most max_ordered unpolled per peer: a peer that sends
//     more is failed, since it broke the protocol that bounds them);
//   - replace messages keep only the newest per peer and stream.
// A message is acknowledged to its sender once it has been handed over. Internal.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "torch_asgd/comm/detail/channel_core.h"

namespace torch_asgd {
namespace detail {

class Receiver {
 public:
  explicit Receiver(ChannelCore& core);
  ~Receiver();
  Receiver(const Receiver&) = delete;
  Receiver& operator=(const Receiver&) = delete;

  void start();
  // After core.stopping. `clean`: every peer said goodbye and nothing more can arrive, so
  // the posted receives are released at once (else they live as long as the World).
  void stop_and_join(bool clean);

  // Training thread.
  Arrivals poll();
  // Waits until something has arrived, an error is stored, or the deadline passes.
  void wait(std::chrono::milliseconds timeout);

  // The highest sequence number of `peer`'s frames handed over (its acknowledgement).
  uint64_t last_whole(int peer) const;
  // Any thread: what a failed peer had half sent is discarded; no buffer waits for it.
  void peer_failed(int peer);
  // Wakes wait() (an error was stored).
  void notify();

  struct Counts {
    uint64_t received_messages = 0, received_bytes = 0, coalesced = 0;
  };
  Counts counts(int peer) const;

 private:
  struct PeerIn;
  struct Accumulator;
  struct Posted {
    at::Tensor frame;
    std::unique_ptr<gloo::transport::UnboundBuffer> buf;
  };

  void run();  // loop(), and what to do if it throws
  void loop();
  Posted make_buffer();
  bool post(Posted& p);  // false when no peer is left to receive from
  void on_frame(int src, const uint8_t* data);
  void on_payload(PeerIn& p, const uint8_t* data, size_t bytes);
  void finish_message(PeerIn& p);
  // Adds payload bytes [offset, offset + bytes) of a message with header h (raw, or its
  // codec's blocks) into a's sum. Call with a.mu held.
  void sum_into(Accumulator& a, const FrameHeader& h, uint64_t offset, const uint8_t* data, size_t bytes);
  void whole(PeerIn& p, uint64_t seq, bool ack_requested);
  void reject(PeerIn& p, Reject why, uint16_t version = 0);

  ChannelCore& core_;
  std::thread thread_;
  std::vector<std::unique_ptr<PeerIn>> peers_;  // by rank; null for self
  uint64_t rotation_ = 0;                      // receiver thread: who is asked first

  std::mutex fifo_mu_;  // guards fifo_ (the thread changes it, stop_and_join aborts it)
  std::deque<Posted> fifo_;

  // Guards inbox_, inbox_count_ and replace_; what wait() sleeps on.
  std::mutex arr_mu_;
  std::condition_variable arr_cv_;
  bool arrived_ = false;  // something is there for poll()
  // Ordered and replace messages with their arrival number, so that poll() hands them
  // out in arrival order (a replace message where its newest version arrived).
  std::deque<std::pair<uint64_t, Message>> inbox_;
  std::vector<size_t> inbox_count_;                // by peer
  std::vector<std::optional<std::pair<uint64_t, Message>>> replace_;  // by peer * kMaxStreams + stream
  uint64_t arrivals_ = 0;
  std::array<std::shared_ptr<Accumulator>, kMaxStreams> acc_{};
};

}  // namespace detail
}  // namespace torch_asgd
