#include "torch_asgd/comm/channel.h"

#include <algorithm>
#include <cstring>
#include <functional>

#include <ATen/Functions.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "torch_asgd/comm/detail/channel_core.h"
#include "torch_asgd/comm/detail/receiver.h"
#include "torch_asgd/comm/detail/sender.h"
#include "torch_asgd/comm/detail/watcher.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/comm/world.h"
#include "torch_asgd/detail/log.h"

namespace torch_asgd {

Channel::Channel(std::shared_ptr<World> world, ChannelOptions options, uint64_t slot,
                 uint64_t token)
    : core_(std::make_shared<detail::ChannelCore>(std::move(world), std::move(options), slot,
                                                  token)) {
  receiver_ = std::make_unique<detail::Receiver>(*core_);
  sender_ = std::make_unique<detail::Sender>(*core_);
  watcher_ = std::make_unique<detail::Watcher>(*core_);
  core_->sender = sender_.get();
  core_->receiver = receiver_.get();
  receiver_->start();
  sender_->start();
  watcher_->start();
}

Channel::~Channel() {
  const bool clean = core_->ended_cleanly();
  core_->stopping = true;
  watcher_->stop_and_join(clean);
  receiver_->stop_and_join(clean);
  sender_->stop_and_join();
  core_->sender = nullptr;
  core_->receiver = nullptr;
}

int Channel::rank() const { return core_->rank; }
int Channel::size() const { return core_->size; }
const ChannelOptions& Channel::options() const { return core_->options; }

void Channel::rethrow_if_failed() { core_->rethrow_if_failed(); }

namespace {

FrameType frame_type(Delivery d) {
  switch (d) {
    case Delivery::kOrdered: return FrameType::kOrdered;
    case Delivery::kAdditive: return FrameType::kAdditive;
    case Delivery::kReplace: return FrameType::kReplace;
  }
  return FrameType::kOrdered;
}

at::Tensor flat_payload(const Outgoing& msg) {
  if (!msg.payload.defined()) return at::empty({0}, at::TensorOptions().dtype(at::kByte));
  return msg.payload.contiguous().view({-1});
}

// The sender's private copy of the caller's payload: a plain memcpy where flat's memory
// holds its values (contiguous, the message's dtype; at::copy_ takes several times as
// long for bytes), else at::copy_ (a lazily negated or conjugated view, a zero tensor).
void copy_payload(detail::OutMsg& m, const at::Tensor& flat) {
  if (flat.numel() == 0) return;
  if (flat.is_neg() || flat.is_conj() || flat.data_ptr() == nullptr) {
    m.payload.copy_(flat);
  } else {
    std::memcpy(m.payload.data_ptr(), flat.data_ptr(), m.bytes());
  }
}

}  // namespace

// The declared additive stream `stream`, with `meta` checked against its schema.
static const AdditiveStream& additive_stream(const detail::ChannelCore& c, uint8_t stream,
                                             const Metadata& meta) {
  const AdditiveStream* s = stream < kMaxStreams ? c.streams[stream] : nullptr;
  if (s == nullptr) {
    throw ConfigError(fmt::format("{}: additive stream {} was not declared in "
                                  "ChannelOptions::additive",
                                  c.prefix(), static_cast<int>(stream)));
  }
  if (!conforms(meta, s->meta)) {
    throw ConfigError(fmt::format(
        "{}: metadata of {} fields and {} values of records does not fit stream {}'s schema {}",
        c.prefix(), meta.fields.size(), meta.records.size(), static_cast<int>(stream),
        s->meta.describe()));
  }
  return *s;
}

// Checks what the receiver would reject, so that it is said here, where it can be fixed.
static void check_outgoing(const detail::ChannelCore& c, const Outgoing& msg, const at::Tensor& flat) {
  const std::string where = c.prefix();
  if (c.closing) throw ConfigError(where + ": send() after close()");
  if (!flat.device().is_cpu()) {
    throw ConfigError(fmt::format("{}: payload is on {}, expected a CPU tensor", where,
                                  flat.device().str()));
  }
  const size_t elem = dtype_size(flat.scalar_type());
  if (elem == 0) {
    throw ConfigError(fmt::format("{}: dtype {} cannot be sent", where,
                                  c10::toString(flat.scalar_type())));
  }
  const uint64_t bytes = static_cast<uint64_t>(flat.numel()) * elem;
  if (msg.meta.bytes() > c.options.max_meta_bytes ||
      kFrameHeaderBytes + msg.meta.bytes() > static_cast<uint64_t>(c.options.chunk_bytes)) {
    throw ConfigError(fmt::format("{}: {} bytes of metadata exceed the channel's max_meta_bytes "
                                  "({}) or chunk_bytes",
                                  where, msg.meta.bytes(), c.options.max_meta_bytes));
  }
  if (msg.stream >= kMaxStreams) {
    throw ConfigError(fmt::format("{}: stream {} is out of range (0..{})", where, msg.stream,
                                  kMaxStreams - 1));
  }
  if (msg.delivery == Delivery::kAdditive) {
    const AdditiveStream& s = additive_stream(c, msg.stream, msg.meta);
    if (flat.scalar_type() != s.dtype || flat.numel() != s.numel) {
      throw ConfigError(fmt::format(
          "{}: additive stream {} carries {} elements of {}, not {} of {}", where, msg.stream,
          s.numel, c10::toString(s.dtype), flat.numel(), c10::toString(flat.scalar_type())));
    }
    return;
  }
  if (!msg.meta.records.empty() || msg.meta.records_overflowed) {
    throw ConfigError(where + ": only additive messages carry metadata records");
  }
  if (bytes > static_cast<uint64_t>(c.options.capacity_bytes)) {
    throw ConfigError(fmt::format(
        "{}: payload of {} bytes exceeds the channel capacity of {} bytes; open the channel with "
        "a larger capacity_bytes",
        where, bytes, c.options.capacity_bytes));
  }
}

void Channel::send(int peer, const Outgoing& msg) {
  rethrow_if_failed();
  if (peer < 0 || peer >= core_->size || peer == core_->rank) {
    throw ConfigError(fmt::format("{}: cannot send to rank {} (valid peers are 0..{} except {})",
                                  core_->prefix(), peer, core_->size - 1, core_->rank));
  }
  const at::Tensor flat = flat_payload(msg);
  check_outgoing(*core_, msg, flat);
  detail::OutRef m = sender_->new_message(frame_type(msg.delivery), msg.stream, flat.scalar_type(),
                                          flat.numel());
  copy_payload(*m, flat);
  m->meta = msg.meta;
  if (core_->options.verify_payload && msg.delivery != Delivery::kAdditive) {
    // Immutable from here on (additive ones may still be summed into).
    m->checksum = checksum64(m->payload.data_ptr(), m->bytes());
    m->checksummed = true;
  }
  sender_->enqueue(peer, std::move(m));
}

void Channel::broadcast(const Outgoing& msg) {
  rethrow_if_failed();
  const at::Tensor flat = flat_payload(msg);
  check_outgoing(*core_, msg, flat);
  if (core_->size < 2) return;
  if (msg.delivery == Delivery::kAdditive) {
    sender_->broadcast_additive(msg.stream, msg.meta, [&](at::Tensor& buffer, bool accumulate) {
      if (accumulate) {
        buffer.add_(flat);
      } else {
        buffer.copy_(flat);
      }
    });
    return;
  }
  detail::OutRef m =
      sender_->new_message(frame_type(msg.delivery), msg.stream, flat.scalar_type(), flat.numel());
  copy_payload(*m, flat);
  m->meta = msg.meta;
  if (core_->options.verify_payload) {
    m->checksum = checksum64(m->payload.data_ptr(), m->bytes());
    m->checksummed = true;
  }
  sender_->enqueue_all(std::move(m));
}

void Channel::broadcast_additive(uint8_t stream, const Metadata& meta,
                                 const std::function<void(at::Tensor&, bool)>& fill) {
  rethrow_if_failed();
  if (core_->closing) throw ConfigError(core_->prefix() + ": send() after close()");
  additive_stream(*core_, stream, meta);
  if (core_->size < 2) return;
  sender_->broadcast_additive(stream, meta, fill);
}

Arrivals Channel::poll() {
  rethrow_if_failed();
  if (core_->size < 2) return Arrivals();
  return receiver_->poll();
}

Arrivals Channel::wait(std::chrono::milliseconds timeout) {
  rethrow_if_failed();
  if (core_->size < 2) return Arrivals();
  Arrivals got = receiver_->poll();
  if (!got.empty()) return got;
  receiver_->wait(timeout);
  return poll();
}

bool Channel::flush(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  bool ok = true;
  for (int p = 0; p < core_->size; ++p) {
    if (p != core_->rank) ok = sender_->wait_idle(p, deadline) && ok;
  }
  rethrow_if_failed();
  return ok;
}

bool Channel::wait_for_room(int peer, size_t max_queued, std::chrono::milliseconds timeout) {
  if (peer < 0 || peer >= core_->size || peer == core_->rank) {
    throw ConfigError(fmt::format("{}: no peer rank {}", core_->prefix(), peer));
  }
  const bool ok =
      sender_->wait_room(peer, max_queued, std::chrono::steady_clock::now() + timeout);
  rethrow_if_failed();
  return ok;
}

bool Channel::close(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  if (!core_->closing.exchange(true) && core_->size > 1) sender_->request_close();
  std::vector<int> unfinished;
  {
    std::unique_lock<std::mutex> lock(core_->mu);
    for (int p = 0; p < core_->size; ++p) {
      if (p == core_->rank) continue;
      const bool done = core_->cv.wait_until(lock, deadline, [&] {
        const detail::PeerStatus& s = core_->peers[p];
        return core_->broken || s.failed || (s.bye_received && s.bye_acked && s.bye_ack_posted);
      });
      if (!done) unfinished.push_back(p);
    }
  }
  if (unfinished.empty() && core_->size > 1) {
    // Our acknowledgement of each peer's goodbye must leave before this returns: the
    // peer's close() waits for it, and this process may exit at once.
    unfinished = sender_->await_bye_acks_sent(deadline);
  }
  if (!unfinished.empty()) {
    detail::log_warning(fmt::format(
        "{}: ranks {} did not finish within {} ms of close(); what they still send is lost",
        core_->prefix(), fmt::join(unfinished, ", "), timeout.count()));
  }
  rethrow_if_failed();
  return unfinished.empty();
}

PeerCounters Channel::counters(int peer) const {
  if (peer < 0 || peer >= core_->size) {
    throw ConfigError(fmt::format("rank {}: no rank {} in a world of {}", core_->rank, peer,
                                  core_->size));
  }
  PeerCounters c;
  c.peer = peer;
  if (peer == core_->rank) return c;
  {
    // The status first: a peer seen failed has its lost and dropped counts settled
    // (ChannelCore::peer_failed settles them before the failure is visible).
    std::lock_guard<std::mutex> lock(core_->mu);
    const detail::PeerStatus& s = core_->peers[peer];
    c.rejected = s.rejected;
    c.last_reject = s.last_reject;
    c.closed = s.bye_received;
    c.failed = s.failed && !s.bye_received;  // a connection closing after goodbye is the normal end
  }
  const auto out = sender_->counts(peer);
  const auto in = receiver_->counts(peer);
  c.sent_messages = out.sent_messages;
  c.sent_bytes = out.sent_bytes;
  c.coalesced = out.coalesced;
  c.dropped = out.dropped;
  c.lost = out.lost;
  c.held_bytes = out.held_bytes;
  c.queued = sender_->queued(peer);
  c.lagging = sender_->lagging(peer);
  c.received_messages = in.received_messages;
  c.received_bytes = in.received_bytes;
  c.coalesced_received = in.coalesced;
  return c;
}

uint64_t Channel::held_bytes() const { return core_->sender->held_bytes(); }

std::vector<PeerCounters> Channel::counters() const {
  std::vector<PeerCounters> out;
  for (int p = 0; p < core_->size; ++p) {
    if (p != core_->rank) out.push_back(counters(p));
  }
  return out;
}

std::vector<int> Channel::closed_peers() const {
  std::vector<int> out;
  std::lock_guard<std::mutex> lock(core_->mu);
  for (int p = 0; p < core_->size; ++p) {
    if (p != core_->rank && core_->peers[p].bye_received) out.push_back(p);
  }
  return out;
}

std::vector<int> Channel::failed_peers() const {
  std::vector<int> out;
  std::lock_guard<std::mutex> lock(core_->mu);
  for (int p = 0; p < core_->size; ++p) {
    if (p != core_->rank && core_->peers[p].failed && !core_->peers[p].bye_received) {
      out.push_back(p);
    }
  }
  return out;
}

namespace {

// FNV-1a: a stable token for a job and channel name.
uint64_t token_of(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h == 0 ? 1 : h;
}

}  // namespace

void validate(const ChannelOptions& o) {
  auto bad = [&](const std::string& what) {
    throw ConfigError(fmt::format("channel '{}': {}", o.name, what));
  };
  if (o.capacity_bytes < 0) bad("capacity_bytes must be >= 0");
  if (o.recv_depth < 1 || o.recv_depth > 64) {
    bad(fmt::format("recv_depth {} must be within 1..64 (each is a receive buffer of chunk_bytes)",
                    o.recv_depth));
  }
  if (o.max_in_flight < 1) bad("max_in_flight must be >= 1");
  if (o.max_ordered < 1) bad("max_ordered must be >= 1");
  if (o.chunk_bytes < 4096 || o.chunk_bytes % 8 != 0) {
    bad(fmt::format("chunk_bytes {} must be a multiple of 8 and >= 4096", o.chunk_bytes));
  }
  if (o.max_meta_bytes + kFrameHeaderBytes > static_cast<size_t>(o.chunk_bytes)) {
    bad("max_meta_bytes must leave room for the frame header within chunk_bytes");
  }
  if (o.inline_bytes < 0) bad("inline_bytes must be >= 0");
  if (!(o.group_hold >= 0 && o.group_hold <= 1e9)) bad("group_hold must be within 0..1e9");
  std::vector<bool> seen(kMaxStreams, false);
  for (const auto& s : o.additive) {
    if (s.id >= kMaxStreams || seen[s.id]) {
      bad(fmt::format("additive stream ids must be distinct and < {} (got {})", kMaxStreams,
                      static_cast<int>(s.id)));
    }
    seen[s.id] = true;
    if (s.numel <= 0 || dtype_size(s.dtype) == 0) {
      bad(fmt::format("additive stream {} has numel {}: it needs numel > 0 (the elements every "
                      "payload of it carries) and a dtype that can travel",
                      static_cast<int>(s.id), s.numel));
    }
    const size_t meta = 8 * (s.meta.fields.size() +
                             static_cast<size_t>(std::max(0, s.meta.max_records)) *
                                 static_cast<size_t>(std::max(0, s.meta.record_width)));
    if (s.meta.record_width < 0 || s.meta.max_records < 0 || meta > o.max_meta_bytes ||
        s.meta.fields.size() > 65535 || s.meta.record_width > 65535 || s.meta.max_records > 65535) {
      bad(fmt::format("additive stream {}: its metadata ({} bytes at most) exceeds max_meta_bytes "
                      "({})",
                      static_cast<int>(s.id), meta, o.max_meta_bytes));
    }
    if (s.compression.lossy() && s.dtype != c10::ScalarType::Float) {
      bad(fmt::format("additive stream {}: compression '{}' needs float32 values, the stream is {}; "
                      "use compression none",
                      static_cast<int>(s.id), s.compression.describe(), c10::toString(s.dtype)));
    }
    if (s.compression.codec == Codec::kTopK &&
        !(s.compression.topk_fraction > 0 && s.compression.topk_fraction <= 1)) {
      bad(fmt::format("additive stream {}: topk fraction {} must be in (0, 1]", static_cast<int>(s.id),
                      s.compression.topk_fraction));
    } else if (s.compression.lossy() &&
               codec::block_bytes(s.compression, kCodecBlock) > o.chunk_bytes) {
      bad(fmt::format("additive stream {}: a block of compression '{}' takes {} bytes, more than "
                      "chunk_bytes ({}): raise chunk_bytes",
                      static_cast<int>(s.id), s.compression.describe(),
                      codec::block_bytes(s.compression, kCodecBlock), o.chunk_bytes));
    }
  }
}

std::unique_ptr<Channel> World::open_channel(const ChannelOptions& options, const Fingerprint& fp) {
  validate(options);
  Fingerprint full = fp;
  full.set("wire protocol", fmt::format("torch_asgd v{}", kProtocolVersion))
      .set("channel", options.name)
      .set("capacity_bytes", std::to_string(options.capacity_bytes))
      .set("chunk_bytes", std::to_string(options.chunk_bytes))
      .set("max_meta_bytes", std::to_string(options.max_meta_bytes))
      .set("inline_bytes", std::to_string(options.inline_bytes))
      .set("verify_payload", options.verify_payload ? "1" : "0")
      .set("channel_index", std::to_string(channels_opened_));
  for (const auto& s : options.additive) {
    full.set(fmt::format("additive stream {}", static_cast<int>(s.id)),
             fmt::format("{} x {}, metadata {}, compression {} (codec version {})", s.numel,
                         c10::toString(s.dtype), s.meta.describe(), s.compression.describe(),
                         static_cast<int>(kCodecVersion)));
  }
  check_fingerprint("channel/" + options.name, full);
  // Channel slots live far above the slots Gloo's collectives count up from; each
  // channel takes two (its frames, and the watch slot nobody sends on).
  const uint64_t slot = (uint64_t{1} << 48) + 2 * static_cast<uint64_t>(channels_opened_++);
  const uint64_t token = token_of(options_.job_id + "/" + options.name);
  return std::make_unique<Channel>(shared_from_this(), options, slot, token);
}

}  // namespace torch_asgd
