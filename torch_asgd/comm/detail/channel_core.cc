#include "torch_asgd/comm/detail/channel_core.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "torch_asgd/comm/detail/mesh.h"
#include "torch_asgd/comm/detail/receiver.h"
#include "torch_asgd/comm/detail/sender.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/comm/world.h"
#include "torch_asgd/detail/log.h"

namespace torch_asgd {
namespace detail {

namespace {

// Idle payload buffers kept per side (send, receive): enough for a stream of messages of
// one size to reuse its buffers. At most 8 buffers and max(2 capacity_bytes, 32 MiB).
constexpr size_t kPooledBuffers = 8;
uint64_t pooled_bytes(const ChannelOptions& o) {
  const uint64_t cap = static_cast<uint64_t>(std::max<int64_t>(o.capacity_bytes, 0));
  const uint64_t two = cap > UINT64_MAX / 2 ? UINT64_MAX : 2 * cap;
  return std::max<uint64_t>(two, 32ull << 20);
}

}  // namespace

ChannelCore::ChannelCore(std::shared_ptr<World> w, ChannelOptions o, uint64_t slot, uint64_t tok)
    : world(std::move(w)),
      context(world->mesh().context()),
      options(std::move(o)),
      rank(world->rank()),
      size(world->size()),
      data_slot(slot),
      watch_slot(slot + 1),
      token(tok),
      send_buffers(kPooledBuffers, pooled_bytes(options)),
      recv_buffers(kPooledBuffers, pooled_bytes(options)) {
  peers.resize(size);
  for (const auto& s : options.additive) {
    streams[s.id] = &s;
    limits.additive_bytes[s.id] = static_cast<uint64_t>(s.numel) * dtype_size(s.dtype);
    limits.additive_dtype[s.id] = s.dtype;
    limits.additive_codec[s.id] = s.compression;
  }
  limits.world_size = size;
  limits.receiver = rank;
  limits.token = token;
  limits.max_payload_bytes = static_cast<uint64_t>(options.capacity_bytes);
  limits.max_meta_bytes = options.max_meta_bytes;
  limits.frame_capacity = static_cast<size_t>(options.chunk_bytes);
}

std::string ChannelCore::prefix() const {
  return fmt::format("rank {}: channel '{}'", rank, options.name);
}

uint64_t ChannelCore::transfer_bytes(const FrameHeader& h) const {
  if (h.codec == Codec::kNone) return static_cast<uint64_t>(options.chunk_bytes);
  return static_cast<uint64_t>(codec::transfer_bytes(streams[h.stream]->compression, options.chunk_bytes));
}

bool ChannelCore::critical(int peer) const {
  return std::find(options.critical_peers.begin(), options.critical_peers.end(), peer) !=
         options.critical_peers.end();
}

bool ChannelCore::failed(int peer) const {
  std::lock_guard<std::mutex> lock(mu);
  return peers[peer].failed;
}

std::vector<int> ChannelCore::live_peers() const {
  std::vector<int> out;
  std::lock_guard<std::mutex> lock(mu);
  for (int p = 0; p < size; ++p) {
    if (p != rank && !peers[p].failing) out.push_back(p);  // (failing: being settled or failed)
  }
  return out;
}

void ChannelCore::peer_failed(int peer, const std::string& what) {
  const bool throws = options.on_peer_failure == PeerFailure::kThrow || critical(peer);
  const std::string msg = fmt::format(
      "{}: connection to rank {} failed: {}; is rank {} still running? check its output", prefix(),
      peer, what, peer);
  bool normal_end;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (peers[peer].failing || stopping) return;
    peers[peer].failing = true;
    // A peer that said goodbye has sent everything: its connection closing then is
    // the normal end, not an error.
    normal_end = peers[peer].bye_received;
    if (!normal_end && throws) {
      std::lock_guard<std::mutex> error_lock(error_mu);
      if (!error) error = std::make_exception_ptr(CommError(msg));
    }
  }
  // Settled before the failure is visible: whoever sees the peer failed (counters,
  // failed_peers) also sees the error it throws and what was lost or dropped with it.
  if (sender != nullptr) sender->peer_failed(peer);
  if (receiver != nullptr) receiver->peer_failed(peer);
  {
    std::lock_guard<std::mutex> lock(mu);
    peers[peer].failed = true;
  }
  cv.notify_all();
  if (!normal_end) {
    if (throws) {
      if (receiver != nullptr) receiver->notify();
    } else {
      log_warning(msg + "; continuing without it");
    }
  }
}

void ChannelCore::rejected(int peer, Reject why, const std::string& detail) {
  bool first;
  {
    std::lock_guard<std::mutex> lock(mu);
    PeerStatus& p = peers[peer];
    ++p.rejected;
    p.last_reject = to_string(why);
    first = !p.rejects_logged[static_cast<int>(why)];
    p.rejects_logged[static_cast<int>(why)] = true;
  }
  if (first) {
    log_warning(fmt::format(
        "{}: rejected a frame from rank {}: {}{} (counted; further rejections for this reason are "
        "not logged)",
        prefix(), peer, to_string(why), detail.empty() ? "" : " (" + detail + ")"));
  }
}

void ChannelCore::fail(std::exception_ptr e) {
  {
    std::lock_guard<std::mutex> lock(error_mu);
    if (!error) error = std::move(e);
  }
  if (receiver != nullptr) receiver->notify();
}

bool ChannelCore::ended_cleanly() const {
  if (broken) return false;
  std::lock_guard<std::mutex> lock(mu);
  for (int p = 0; p < size; ++p) {
    if (p == rank) continue;
    const PeerStatus& s = peers[p];
    if (s.failed || !s.bye_received || !s.bye_acked || !s.bye_ack_posted) return false;
  }
  return true;
}

void ChannelCore::thread_died(const std::string& thread, const std::string& what) {
  fail(std::make_exception_ptr(CommError(fmt::format(
      "{}: the {} thread stopped: {}. Nothing more moves on this channel; restart from the last "
      "checkpoint",
      prefix(), thread, what))));
  broken = true;
  {
    std::lock_guard<std::mutex> lock(mu);  // a close() between its check and its sleep sees it
  }
  cv.notify_all();
  if (sender != nullptr) sender->wake_waiters();
}

void ChannelCore::rethrow_if_failed() {
  std::lock_guard<std::mutex> lock(error_mu);
  if (error) std::rethrow_exception(error);
}

void ChannelCore::retire(std::shared_ptr<void> resource, uint64_t bytes) {
  world->retire(std::move(resource), bytes);
}

}  // namespace detail
}  // namespace torch_asgd
