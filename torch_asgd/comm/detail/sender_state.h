// The sender's per-peer state (sender.h), shared by its parts: sender.cc, sender_link.cc,
// sender_groups.cc, sender_encoder.cc. Internal.
#pragma once

#include <array>
#include <chrono>
#include <deque>
#include <memory>
#include <optional>

#include "torch_asgd/comm/detail/sender.h"

namespace gloo {
namespace transport {
class UnboundBuffer;
}
}  // namespace gloo

namespace torch_asgd {
namespace detail {

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
  // The peer asked for an acknowledgement of its frames up to due_seq; the frames posted
  // so far acknowledge up to ack_posted.
  uint64_t due_seq = 0, ack_posted = 0;
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

}  // namespace detail
}  // namespace torch_asgd
