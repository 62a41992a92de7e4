#include "torch_asgd/comm/detail/receiver.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include <ATen/Functions.h>
#include <fmt/format.h>
#include <gloo/context.h>
#include <gloo/transport/unbound_buffer.h>

#include "torch_asgd/comm/detail/sender.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/detail/log.h"

namespace torch_asgd {
namespace detail {

// Receiver-thread state of one peer.
struct Receiver::PeerIn {
  explicit PeerIn(int r) : rank(r) {}
  const int rank;
  uint64_t last_seq = 0;
  bool bye = false;
  // The message whose payload chunks are arriving.
  bool in_message = false;
  FrameHeader h;
  Metadata meta;
  uint64_t done = 0;  // payload bytes so far
  bool merged = false;  // additive: it shares the stream's buffer with earlier arrivals
  // Additive: the last chunk, summed in finish_message() under the same lock as the
  // message's metadata, so that no poll() hands out an update without its parts.
  const uint8_t* tail = nullptr;
  size_t tail_bytes = 0;
  Reject why = Reject::kNone;
  StreamingChecksum checksum;
  at::Tensor buffer;  // ordered and replace: the message's own payload
  std::atomic<uint64_t> last_whole{0};
  std::atomic<uint64_t> received_messages{0}, received_bytes{0}, coalesced{0};
};

// The sum of one additive stream's arrivals not yet polled. Shared with the buffers
// poll() hands out, which come back (zeroed) as the next spare.
struct Receiver::Accumulator {
  const AdditiveStream* spec = nullptr;
  std::mutex mu;  // guards everything below
  at::Tensor current;
  at::Tensor spare;
  bool has_data = false;
  bool tainted = false;  // a rejected message was partly summed into current
  std::vector<std::pair<int, Metadata>> parts;
  std::vector<size_t> parts_of;  // by peer
  std::vector<char> partial_from;  // by peer: chunks of an unfinished message are in current

  at::Tensor fresh() {
    if (spare.defined()) return std::move(spare);
    return at::zeros({spec->numel}, at::TensorOptions().dtype(spec->dtype));
  }
};

namespace {

// Unpolled metadata parts kept per peer and stream before they are merged.
constexpr size_t kMaxPartsPerPeer = 32;

}  // namespace

void Receiver::sum_into(Accumulator& a, const FrameHeader& h, uint64_t offset, const uint8_t* data,
                        size_t bytes) {
  if (h.codec == Codec::kNone) {
    add_into(static_cast<uint8_t*>(a.current.data_ptr()) + offset, data, bytes, h.dtype);
  } else {
    codec::add_decoded(a.spec->compression, data, static_cast<int64_t>(offset),
                       static_cast<int64_t>(bytes), a.spec->numel, a.current.data_ptr<float>());
  }
}

Receiver::Receiver(ChannelCore& core) : core_(core) {
  peers_.resize(core_.size);
  for (int p = 0; p < core_.size; ++p) {
    if (p != core_.rank) peers_[p] = std::make_unique<PeerIn>(p);
  }
  inbox_count_.assign(core_.size, 0);
  replace_.resize(static_cast<size_t>(core_.size) * kMaxStreams);
  for (const auto& s : core_.options.additive) {
    auto a = std::make_shared<Accumulator>();
    a->spec = &s;
    a->current = at::zeros({s.numel}, at::TensorOptions().dtype(s.dtype));
    a->parts_of.assign(core_.size, 0);
    a->partial_from.assign(core_.size, 0);
    acc_[s.id] = std::move(a);
  }
}

Receiver::~Receiver() { stop_and_join(/*clean=*/false); }

void Receiver::start() {
  if (core_.size < 2) return;
  {
    std::lock_guard<std::mutex> lock(fifo_mu_);
    for (int i = 0; i < std::max(1, core_.options.recv_depth); ++i) {
      fifo_.push_back(make_buffer());
      if (!post(fifo_.back())) break;
    }
  }
  thread_ = std::thread([this] { run(); });
}

void Receiver::stop_and_join(bool clean) {
  {
    std::lock_guard<std::mutex> lock(fifo_mu_);
    for (auto& p : fifo_) p.buf->abortWaitRecv();
  }
  if (thread_.joinable()) thread_.join();
  // After a peer failed, a posted receive may still be filled by Gloo: its memory lives
  // as long as the connections do. After every peer's goodbye nothing more arrives on
  // the channel's slot: destroying a buffer withdraws its receive (Gloo keeps only weak
  // references to it), and then its memory goes.
  std::lock_guard<std::mutex> lock(fifo_mu_);
  if (!clean) {
    for (auto& p : fifo_) {
      const uint64_t bytes = static_cast<uint64_t>(p.frame.nbytes());
      core_.retire(std::make_shared<Posted>(std::move(p)), bytes);
    }
  }
  fifo_.clear();
  notify();
}

Receiver::Posted Receiver::make_buffer() {
  Posted p;
  p.frame = at::empty({core_.options.chunk_bytes}, at::TensorOptions().dtype(at::kByte));
  p.buf = core_.context->createUnboundBuffer(p.frame.data_ptr(),
                                            static_cast<size_t>(core_.options.chunk_bytes));
  return p;
}

bool Receiver::post(Posted& p) {
  std::vector<int> from = core_.live_peers();
  if (from.empty()) return false;
  // Gloo gives a posted buffer to the first listed peer with something to send: rotate.
  std::rotate(from.begin(), from.begin() + static_cast<long>(rotation_++ % from.size()), from.end());
  p.buf->recv(from, core_.data_slot, 0, static_cast<size_t>(core_.options.chunk_bytes));
  return true;
}

void Receiver::run() {
  try {
    loop();
  } catch (const std::exception& e) {
    core_.thread_died("receiving", e.what());
  } catch (...) {
    core_.thread_died("receiving", "an exception that is not a std::exception");
  }
}

void Receiver::loop() {
  for (;;) {
    gloo::transport::UnboundBuffer* buf;
    at::Tensor frame;
    {
      std::lock_guard<std::mutex> lock(fifo_mu_);
      if (core_.stopping || fifo_.empty()) return;
      buf = fifo_.front().buf.get();
      frame = fifo_.front().frame;
    }
    while (core_.hold_receiver && !core_.stopping) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    int src = -1;
    try {
      if (!buf->waitRecv(&src, kForever)) return;  // aborted: the channel is stopping
    } catch (const std::exception&) {
      // The connection this buffer was matched to failed mid-transfer (the watcher names
      // it). Gloo is done with the buffer: replace it.
      std::lock_guard<std::mutex> lock(fifo_mu_);
      if (core_.stopping) return;
      core_.retire(std::make_shared<Posted>(std::move(fifo_.front())),
                   static_cast<uint64_t>(core_.options.chunk_bytes));
      fifo_.pop_front();
      fifo_.push_back(make_buffer());
      try {
        post(fifo_.back());
      } catch (const std::exception&) {
      }
      continue;
    }
    // (A test's hold also covers a frame that arrived into a buffer this thread was
    // already waiting on when the hold began: it is neither handled nor acknowledged.)
    while (core_.hold_receiver && !core_.stopping) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (core_.fail_receiver_thread.exchange(false)) throw std::runtime_error("a test made it throw");
    if (src >= 0 && src < core_.size && peers_[src]) {
      try {
        on_frame(src, static_cast<const uint8_t*>(frame.data_ptr()));
      } catch (const std::exception& e) {
        core_.peer_failed(src, std::string("cannot handle its message: ") + e.what());
      }
    }
    std::lock_guard<std::mutex> lock(fifo_mu_);
    if (core_.stopping) return;
    fifo_.push_back(std::move(fifo_.front()));
    fifo_.pop_front();
    try {
      if (!post(fifo_.back())) {
        // Nobody left to receive from: keep the buffer, posted or not, for the abort.
      }
    } catch (const std::exception&) {
      // A peer failed between the listing and the post; the next post leaves it out.
      fifo_.back() = make_buffer();
      try {
        post(fifo_.back());
      } catch (const std::exception&) {
      }
    }
  }
}

void Receiver::reject(PeerIn& p, Reject why, uint16_t version) {
  std::string detail;
  if (why == Reject::kOldVersion || why == Reject::kBadVersion) {
    detail = fmt::format("rank {} speaks torch_asgd wire protocol version {}, this rank version {}; "
                         "build every rank from the same torch_asgd",
                         p.rank, version, kProtocolVersion);
  }
  core_.rejected(p.rank, why, detail);
}

void Receiver::on_frame(int src, const uint8_t* data) {
  PeerIn& p = *peers_[src];
  const size_t chunk = static_cast<size_t>(core_.options.chunk_bytes);
  if (p.in_message) {
    on_payload(p, data, std::min<uint64_t>(core_.transfer_bytes(p.h), p.h.payload_bytes - p.done));
    return;
  }
  DecodeLimits limits = core_.limits;
  limits.expected_sender = src;
  FrameHeader h;
  uint16_t version = 0;
  Reject why = decode_frame_header(data, chunk, limits, &h, &version);
  if (why == Reject::kNone && h.sequence <= p.last_seq) why = Reject::kBadSequence;
  if (why == Reject::kNone && core_.options.verify_payload && h.payload_bytes > 0 &&
      (h.flags & kChecksummed) == 0) {
    why = Reject::kBadFlags;  // the channel checksums every payload: one came without
  }
  const bool control = h.type == FrameType::kBye || h.type == FrameType::kAck;
  if (why == Reject::kNone && p.bye && h.type != FrameType::kAck) why = Reject::kUnexpected;
  Metadata meta;
  if (why == Reject::kNone && !control) {
    meta = read_metadata(h, data);
    if (h.type == FrameType::kAdditive) {
      if (!conforms(meta, core_.streams[h.stream]->meta)) why = Reject::kBadMetadata;
    } else if (h.meta_records != 0) {
      why = Reject::kBadMetadata;
    }
  }
  if (why != Reject::kNone && why != Reject::kBadMetadata) {
    // Nothing of it can be trusted, not even how many chunks would follow.
    reject(p, why, version);
    return;
  }
  if (h.ack > 0 && !core_.sender->on_ack(src, h.ack)) {
    reject(p, Reject::kUnexpected);  // it acknowledges what was never sent
    return;
  }
  p.last_seq = h.sequence;
  const bool ack_requested = (h.flags & kAckRequested) != 0;
  if (h.type == FrameType::kAck) {
    whole(p, h.sequence, false);
    return;
  }
  if (h.type == FrameType::kBye) {
    p.bye = true;
    p.received_messages++;
    p.received_bytes += h.frame_bytes();
    {
      // Before the acknowledgement is asked for, so that the sender sees which frame
      // carries it.
      std::lock_guard<std::mutex> lock(core_.mu);
      core_.peers[src].bye_received = true;
      core_.peers[src].bye_seq = h.sequence;
      core_.cv.notify_all();
    }
    whole(p, h.sequence, ack_requested);
    notify();
    return;
  }
  // A message: its payload is inline, follows in chunks, or is empty.
  p.h = h;
  p.meta = std::move(meta);
  p.done = 0;
  p.merged = false;
  p.why = why;  // kBadMetadata: consume the payload, deliver nothing
  p.checksum.reset();
  if (h.type != FrameType::kAdditive && why == Reject::kNone) {
    const int64_t numel = static_cast<int64_t>(h.payload_bytes / dtype_size(h.dtype));
    p.buffer = core_.recv_buffers.take(h.dtype, numel);
  }
  if (h.payload_bytes == 0) {
    finish_message(p);
  } else if (h.inline_payload()) {
    on_payload(p, data + kFrameHeaderBytes + h.meta_bytes(), h.payload_bytes);
  } else {
    p.in_message = true;
  }
}

void Receiver::on_payload(PeerIn& p, const uint8_t* data, size_t bytes) {
  const FrameHeader& h = p.h;
  if ((h.flags & kChecksummed) != 0) p.checksum.update(data, bytes);
  const Compression* codec = h.codec == Codec::kNone ? nullptr : &core_.streams[h.stream]->compression;
  if (p.why == Reject::kNone && codec != nullptr) {
    // Encoded blocks decode to finite values with indices in range, or nothing is summed.
    if (!codec::valid(*codec, data, static_cast<int64_t>(p.done), static_cast<int64_t>(bytes),
                      core_.streams[h.stream]->numel)) {
      p.why = Reject::kBadCodec;
    }
  } else if (p.why == Reject::kNone && core_.options.on_non_finite != NonFinite::kAccept &&
             c10::isFloatingType(h.dtype) && !all_finite(data, bytes, h.dtype)) {
    p.why = Reject::kNonFinite;
  }
  if (p.why == Reject::kNone) {
    if (h.type == FrameType::kAdditive && p.done + bytes == h.payload_bytes) {
      p.tail = data;  // valid until finish_message() below returns
      p.tail_bytes = bytes;
    } else if (h.type == FrameType::kAdditive) {
      Accumulator& a = *acc_[h.stream];
      std::lock_guard<std::mutex> lock(a.mu);
      if (!p.merged) {
        p.merged = true;
        if (a.has_data) ++p.coalesced;
      }
      sum_into(a, h, p.done, data, bytes);
      a.has_data = true;
      a.partial_from[p.rank] = 1;
    } else {
      std::memcpy(static_cast<uint8_t*>(p.buffer.data_ptr()) + p.done, data, bytes);
    }
  }
  p.done += bytes;
  if (p.done == h.payload_bytes) {
    p.in_message = false;
    finish_message(p);
  }
}

void Receiver::finish_message(PeerIn& p) {
  const FrameHeader& h = p.h;
  const bool ack_requested = (h.flags & kAckRequested) != 0;
  if (p.why == Reject::kNone && (h.flags & kChecksummed) != 0 &&
      p.checksum.digest() != h.payload_checksum) {
    p.why = Reject::kBadPayloadChecksum;
  }
  p.received_bytes += h.frame_bytes() + (h.inline_payload() ? 0 : h.payload_bytes);
  if (p.why != Reject::kNone) {
    if (p.why == Reject::kNonFinite && core_.options.on_non_finite == NonFinite::kFatal) {
      core_.fail(std::make_exception_ptr(CommError(fmt::format(
          "{}: rank {} sent non-finite values (NaN/Inf); its training diverged or its memory is "
          "corrupt",
          core_.prefix(), p.rank))));
    }
    reject(p, p.why);  // (counted before the taint shows)
    p.tail = nullptr;  // a rejected last chunk is never summed
    if (h.type == FrameType::kAdditive && p.merged) {
      // Chunks of it are in the sum already and cannot be taken out again.
      Accumulator& a = *acc_[h.stream];
      std::lock_guard<std::mutex> lock(a.mu);
      a.tainted = true;
      a.has_data = true;
      a.partial_from[p.rank] = 0;
    }
    p.buffer = at::Tensor();
    whole(p, h.sequence, ack_requested);  // processed, if not delivered
    return;
  }
  std::string violation;
  if (h.type == FrameType::kAdditive) {
    Accumulator& a = *acc_[h.stream];
    std::lock_guard<std::mutex> lock(a.mu);
    if (!p.merged && a.has_data) ++p.coalesced;
    if (p.tail != nullptr) {
      sum_into(a, h, p.done - p.tail_bytes, p.tail, p.tail_bytes);
      p.tail = nullptr;
    }
    a.partial_from[p.rank] = 0;
    a.has_data = true;  // (an empty payload still brings its metadata)
    if (a.parts_of[p.rank] >= kMaxPartsPerPeer) {
      for (auto it = a.parts.rbegin(); it != a.parts.rend(); ++it) {
        if (it->first == p.rank) {
          merge(it->second, p.meta, a.spec->meta);
          break;
        }
      }
    } else {
      a.parts.emplace_back(p.rank, std::move(p.meta));
      ++a.parts_of[p.rank];
    }
  } else {
    Message m;
    m.sender = p.rank;
    m.delivery = h.type == FrameType::kOrdered ? Delivery::kOrdered : Delivery::kReplace;
    m.stream = h.stream;
    m.payload = std::move(p.buffer);
    m.meta = std::move(p.meta);
    std::lock_guard<std::mutex> lock(arr_mu_);
    if (h.type == FrameType::kOrdered) {
      if (inbox_count_[p.rank] >= core_.options.max_ordered) {
        violation = fmt::format(
            "it sent more than max_ordered={} ordered messages that this rank has not polled yet; "
            "poll more often or open the channel with a larger max_ordered",
            core_.options.max_ordered);
      } else {
        ++inbox_count_[p.rank];
        inbox_.emplace_back(arrivals_++, std::move(m));
      }
    } else {
      auto& slot = replace_[static_cast<size_t>(p.rank) * kMaxStreams + h.stream];
      if (slot) ++p.coalesced;
      slot = std::make_pair(arrivals_++, std::move(m));
    }
  }
  // Counted once handled (summed or queued, so whoever sees the count can poll it; or
  // refused below).
  ++p.received_messages;
  if (!violation.empty()) {
    core_.peer_failed(p.rank, violation);
    return;
  }
  whole(p, h.sequence, ack_requested);
  notify();
}

void Receiver::whole(PeerIn& p, uint64_t seq, bool ack_requested) {
  p.last_whole = seq;
  if (ack_requested) core_.sender->ack_due(p.rank, seq);
}

void Receiver::notify() {
  {
    std::lock_guard<std::mutex> lock(arr_mu_);
    arrived_ = true;
  }
  arr_cv_.notify_all();
}

uint64_t Receiver::last_whole(int peer) const { return peers_[peer]->last_whole; }

void Receiver::peer_failed(int peer) {
  // Its posted receives are left out from now on; a half message never ends. Chunks of
  // it already summed stay (they cannot be taken out, and tainting the sum would stop
  // survivors that were asked to go on without the peer): said once, loudly.
  for (auto& a : acc_) {
    if (!a) continue;
    bool partial = false;
    {
      std::lock_guard<std::mutex> lock(a->mu);
      partial = a->partial_from[peer] != 0;
      a->partial_from[peer] = 0;
    }
    if (partial) {
      log_warning(fmt::format("{}: rank {} failed in the middle of an additive message on "
                              "stream {}: the chunks of it that had arrived are in this rank's "
                              "sum, so this replica may differ from the others by part of "
                              "that rank's last update",
                              core_.prefix(), peer, a->spec->id));
    }
  }
}

Receiver::Counts Receiver::counts(int peer) const {
  const PeerIn& p = *peers_[peer];
  return Counts{p.received_messages, p.received_bytes, p.coalesced};
}

void Receiver::wait(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(arr_mu_);
  arr_cv_.wait_for(lock, timeout, [&] { return arrived_ || core_.stopping; });
}

Arrivals Receiver::poll() {
  Arrivals out;
  {
    std::lock_guard<std::mutex> lock(arr_mu_);
    arrived_ = false;
    std::vector<std::pair<uint64_t, Message>> all(std::make_move_iterator(inbox_.begin()),
                                                  std::make_move_iterator(inbox_.end()));
    inbox_.clear();
    std::fill(inbox_count_.begin(), inbox_count_.end(), 0);
    for (auto& slot : replace_) {
      if (slot) {
        all.push_back(std::move(*slot));
        slot.reset();
      }
    }
    std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    out.messages.reserve(all.size());
    for (auto& [order, m] : all) out.messages.push_back(std::move(m));
  }
  for (auto& a : acc_) {
    if (!a) continue;
    std::lock_guard<std::mutex> lock(a->mu);
    if (!a->has_data) continue;
    AdditiveArrival arrival;
    arrival.stream = a->spec->id;
    arrival.tainted = a->tainted;
    a->tainted = false;
    at::Tensor full = std::move(a->current);
    a->current = a->fresh();
    a->has_data = false;
    arrival.parts = std::move(a->parts);
    a->parts.clear();
    std::fill(a->parts_of.begin(), a->parts_of.end(), 0);
    // Handed out with a deleter that zeroes the buffer and keeps it as the next spare.
    std::shared_ptr<Accumulator> keep_acc = a;
    arrival.sum = at::from_blob(
        full.data_ptr(), full.sizes(),
        [keep_acc, full](void*) mutable {
          full.zero_();
          std::lock_guard<std::mutex> l(keep_acc->mu);
          if (!keep_acc->spare.defined()) keep_acc->spare = std::move(full);
        },
        full.options());
    out.additive.push_back(std::move(arrival));
  }
  return out;
}

}  // namespace detail
}  // namespace torch_asgd
