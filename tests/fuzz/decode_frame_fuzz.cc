// libFuzzer target for the frame decoder (protocol version 2), the first code that
// touches bytes from the network, with its metadata block. Built with clang
// (-fsanitize=fuzzer,address,undefined) by tests/fuzz/run.sh, which ctest runs for a
// bounded time.
//
// Each input is used three times:
//  1. as raw frame bytes (of any length): the decoder must never read out of bounds,
//     and whatever it accepts must satisfy every limit; its metadata must read back and
//     re-encode to the same bytes;
//  2. as the fields of a header and its metadata, encoded with a valid checksum: this
//     reaches the checks behind the checksum (types, streams, dtypes, senders, sizes,
//     flags, metadata shapes), which random bytes almost never pass;
//  3. as an encoded additive payload of every codec (codec.h): whatever the validator
//     accepts must decode within the payload's elements to finite sums, and as float32
//     values to encode, whose decoded values plus residual must give them back exactly.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <cmath>

#include "torch_asgd/comm/codec.h"
#include "torch_asgd/comm/metadata.h"
#include "torch_asgd/comm/wire.h"

using torch_asgd::DecodeLimits;
using torch_asgd::FrameHeader;
using torch_asgd::FrameType;
using torch_asgd::Metadata;
using torch_asgd::Reject;

namespace {

void require(bool ok) {
  if (!ok) std::abort();
}

DecodeLimits make_limits() {
  DecodeLimits l;
  l.world_size = 4;
  l.expected_sender = 2;
  l.receiver = 0;
  l.token = 0x1234abcdULL;
  l.max_payload_bytes = 1 << 20;
  l.max_meta_bytes = 512;
  l.frame_capacity = 4096;
  l.additive_bytes[1] = 4000;
  l.additive_dtype[1] = c10::ScalarType::Float;
  l.additive_bytes[5] = 16;
  l.additive_dtype[5] = c10::ScalarType::Double;
  l.additive_bytes[7] = 4 * 5000;
  l.additive_dtype[7] = c10::ScalarType::Float;
  l.additive_codec[7] = torch_asgd::Compression(torch_asgd::Codec::kTopK, 0.05);
  return l;
}

// What an accepted frame promises, and that it reads back to the same bytes.
void check_accepted(const FrameHeader& h, const uint8_t* bytes, size_t size, const DecodeLimits& l) {
  require(h.sender >= 0 && h.sender < l.world_size && h.sender != l.receiver);
  require(l.expected_sender < 0 || h.sender == l.expected_sender);
  require(l.token == 0 || h.token == l.token);
  require(h.stream < torch_asgd::kMaxStreams);
  require(h.meta_bytes() <= l.max_meta_bytes);
  require(torch_asgd::kFrameHeaderBytes + h.meta_bytes() <= size);
  require(h.frame_bytes() <= l.frame_capacity || !h.inline_payload());
  if (h.inline_payload()) require(h.frame_bytes() <= size);
  const size_t elem = torch_asgd::dtype_size(h.dtype);
  require(elem > 0);
  if (h.codec != torch_asgd::Codec::kNone) {
    require(h.type == FrameType::kAdditive && h.codec == l.additive_codec[h.stream].codec);
    require(static_cast<int64_t>(h.payload_bytes) ==
            torch_asgd::codec::encoded_bytes(l.additive_codec[h.stream],
                                             static_cast<int64_t>(l.additive_bytes[h.stream] / elem)));
  } else if (h.type == FrameType::kAdditive) {
    require(h.payload_bytes % elem == 0);
    require(l.additive_bytes[h.stream] == h.payload_bytes && l.additive_dtype[h.stream] == h.dtype);
  } else if (h.type == FrameType::kBye || h.type == FrameType::kAck) {
    require(h.payload_bytes == 0 && h.meta_bytes() == 0);
  } else {
    require(h.payload_bytes % elem == 0 && h.payload_bytes <= l.max_payload_bytes);
  }
  const Metadata m = torch_asgd::read_metadata(h, bytes);
  require(m.fields.size() == h.meta_fields);
  require(m.records.size() == static_cast<size_t>(h.meta_records) * h.record_width);
  std::vector<uint8_t> again(torch_asgd::kFrameHeaderBytes + h.meta_bytes());
  torch_asgd::encode_frame_header(h, m, again.data());
  require(std::memcmp(again.data(), bytes, again.size()) == 0);
}

template <typename T>
T take(const uint8_t*& p, size_t& n) {
  T v{};
  const size_t k = n < sizeof(T) ? n : sizeof(T);
  std::memcpy(&v, p, k);
  p += k;
  n -= k;
  return v;
}

void fuzz_codecs(const uint8_t* data, size_t size) {
  using torch_asgd::Codec;
  using torch_asgd::Compression;
  namespace codec = torch_asgd::codec;
  if (size < 2) return;
  const Compression codecs[] = {Compression(Codec::kBf16), Compression(Codec::kFp16),
                                Compression(Codec::kInt8), Compression(Codec::kTopK, 0.01),
                                Compression(Codec::kTopK, 0.5)};
  // The element count comes from the first two bytes; the rest is the encoded payload,
  // offered as a whole and as a transfer that starts at the second block.
  const int64_t numel = 1 + (data[0] | data[1] << 8) % 9000;
  const uint8_t* payload = data + 2;
  const int64_t bytes = static_cast<int64_t>(size) - 2;
  std::vector<float> acc(static_cast<size_t>(numel));
  for (const Compression& c : codecs) {
    const int64_t second = codec::block_bytes(c, torch_asgd::kCodecBlock);
    for (int64_t offset : {int64_t{0}, second}) {
      if (offset > 0 && numel <= torch_asgd::kCodecBlock) continue;
      if (!codec::valid(c, payload, offset, bytes, numel)) continue;
      std::fill(acc.begin(), acc.end(), 0.0f);
      codec::add_decoded(c, payload, offset, bytes, numel, acc.data());
      for (float v : acc) require(std::isfinite(v));
    }
    // The bytes as float32 values: the encoding loses nothing that the residual does
    // not keep, exactly.
    const int64_t values = bytes / 4;
    if (values == 0) continue;
    std::vector<float> x(static_cast<size_t>(values));
    std::memcpy(x.data(), payload, 4 * x.size());
    // What each codec takes: finite values, and under fp16 magnitudes below 2^28.
    bool takes = true;
    for (float v : x) takes = takes && std::isfinite(v) && (c.codec != Codec::kFp16 || std::fabs(v) < 268435456.0f);
    std::vector<uint8_t> out(static_cast<size_t>(codec::encoded_bytes(c, values)));
    std::vector<float> residual(x.size());
    require(codec::encode(c, x.data(), values, out.data(), residual.data()) == takes);
    if (!takes) continue;
    require(codec::valid(c, out.data(), 0, static_cast<int64_t>(out.size()), values));
    std::vector<float> decoded(x.size(), 0.0f);
    codec::add_decoded(c, out.data(), 0, static_cast<int64_t>(out.size()), values, decoded.data());
    for (size_t i = 0; i < x.size(); ++i) {
      require(static_cast<double>(decoded[i]) + residual[i] == static_cast<double>(x[i]));
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const DecodeLimits limits = make_limits();
  FrameHeader out;
  if (torch_asgd::decode_frame_header(data, size, limits, &out) == Reject::kNone) {
    check_accepted(out, data, size, limits);
  }

  const uint8_t* p = data;
  size_t n = size;
  FrameHeader h;
  h.type = static_cast<FrameType>(take<uint8_t>(p, n) % 7);
  h.stream = take<uint8_t>(p, n) % 18;
  h.dtype = static_cast<c10::ScalarType>(take<int8_t>(p, n));
  h.sender = take<uint8_t>(p, n) & 1 ? 2 : take<int32_t>(p, n);
  h.flags = take<uint8_t>(p, n);
  h.codec = static_cast<torch_asgd::Codec>(take<uint8_t>(p, n) % 6);
  h.sequence = take<uint64_t>(p, n);
  h.token = take<uint8_t>(p, n) & 1 ? limits.token : take<uint64_t>(p, n);
  h.payload_bytes = take<uint64_t>(p, n) >> (take<uint8_t>(p, n) & 63);
  h.ack = take<uint64_t>(p, n);
  h.payload_checksum = take<uint8_t>(p, n) & 1 ? 0 : take<uint64_t>(p, n);
  h.meta_fields = take<uint8_t>(p, n) % 80;
  h.meta_records = take<uint8_t>(p, n) % 8;
  h.record_width = take<uint8_t>(p, n) % 6;
  Metadata m;
  m.fields.resize(h.meta_fields);
  for (auto& f : m.fields) f = take<int64_t>(p, n);
  m.records.resize(static_cast<size_t>(h.meta_records) * h.record_width);
  for (auto& r : m.records) r = take<int64_t>(p, n);
  const size_t inline_bytes = h.inline_payload() && h.payload_bytes < 4096 ? h.payload_bytes : 0;
  std::vector<uint8_t> frame(torch_asgd::kFrameHeaderBytes + h.meta_bytes() + inline_bytes);
  torch_asgd::encode_frame_header(h, m, frame.data());
  if (torch_asgd::decode_frame_header(frame.data(), frame.size(), limits, &out) == Reject::kNone) {
    check_accepted(out, frame.data(), frame.size(), limits);
  }
  // A frame cut short of its header and metadata is always refused.
  const size_t need = torch_asgd::kFrameHeaderBytes + h.meta_bytes();
  if (size > 0) {
    require(torch_asgd::decode_frame_header(frame.data(), size % need, limits, &out) != Reject::kNone);
  }
  fuzz_codecs(data, size);
  return 0;
}
