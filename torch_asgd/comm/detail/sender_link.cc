// The sender's link to each peer: what is posted and when (the in-flight window, the
// goodbye, the acknowledgements owed), the frames Gloo sends, and their release when
// the peer acknowledges them (or their retirement when it fails).
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

bool Sender::on_ack(int peer, uint64_t ack) {
  {
    std::lock_guard<std::mutex> lock(ack_mu_);
    AckIn& a = acks_[peer];
    // An acknowledgement of frames not sent yet is a broken or hostile peer's: freeing
    // what Gloo is still sending would corrupt memory.
    if (ack >= a.next_seq) return false;
    if (ack <= a.acked) return true;
    a.acked = ack;
  }
  wake();
  return true;
}

void Sender::ack_due(int peer, uint64_t seq) {
  {
    std::lock_guard<std::mutex> lock(ack_mu_);
    acks_[peer].due_seq = std::max(acks_[peer].due_seq, seq);
  }
  wake();
}

void Sender::take_acks_locked() {
  for (auto& p : peers_) {
    if (!p) continue;
    uint64_t acked;
    {
      std::lock_guard<std::mutex> lock(ack_mu_);
      AckIn& a = acks_[p->rank];
      acked = a.acked;
      p->due_seq = a.due_seq;
    }
    if (!p->unacked.empty() && p->unacked.front().seq <= acked) release_locked(*p, acked);
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
  if (p.due_seq > p.ack_posted && !p.failed && !core_.hold_acks) {
    post_locked(p, nullptr, FrameType::kAck, false);
  }
}

void Sender::post_locked(PeerOut& p, OutRef msg, FrameType type, bool ack_requested) {
  Posted f;
  f.seq = p.next_seq++;
  {
    // Before Gloo sees the frame: its acknowledgement may come at once.
    std::lock_guard<std::mutex> lock(ack_mu_);
    acks_[p.rank].next_seq = p.next_seq;
  }
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
  p.ack_posted = std::max(p.ack_posted, h.ack);  // every frame carries the acknowledgement
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
    if (!sent) {
      unsent.push_back(peer);
    } else {
      // Its one send completion is taken: a second close() must not wait for another.
      std::lock_guard<std::mutex> lock(mu_);
      if (peers_[peer]->bye_ack_buf == buf) peers_[peer]->bye_ack_buf.reset();
    }
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

}  // namespace detail
}  // namespace torch_asgd
