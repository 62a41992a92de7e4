// libFuzzer target for the message decoder, the first code that touches bytes from
// the network. Built with clang (-fsanitize=fuzzer,address,undefined) by
// tests/fuzz/run.sh, which ctest runs for a bounded time.
//
// Each input is used twice:
//  1. as raw header bytes (of any length): the decoder must never read out of bounds,
//     and whatever it accepts must satisfy every limit;
//  2. as the fields of a header, encoded with a valid CRC: this reaches the checks
//     behind the CRC (kinds, dtypes, senders, sizes, update statistics), which random
//     bytes almost never pass. Whatever is accepted must re-encode to the same bytes.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "torch_asgd/comm/message.h"

using torch_asgd::DecodeLimits;
using torch_asgd::MessageHeader;
using torch_asgd::Reject;

namespace {

void require(bool ok) {
  if (!ok) std::abort();
}

void check_accepted(const MessageHeader& h, const DecodeLimits& l) {
  require(h.sender >= 0 && h.sender < l.world_size && h.sender != l.receiver);
  require(l.expected_sender < 0 || h.sender == l.expected_sender);
  require(h.payload_bytes <= l.max_payload_bytes);
  require(torch_asgd::dtype_size(h.dtype) > 0 || h.payload_bytes == 0);
  require(h.sender_step >= 0 && h.model_version >= 0 && h.updates.count >= 0);
  require(l.token == 0 || h.token == l.token);
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

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  DecodeLimits limits;
  limits.world_size = 4;
  limits.expected_sender = 2;
  limits.receiver = 0;
  limits.max_payload_bytes = 1 << 20;
  limits.token = 0x1234abcdULL;

  MessageHeader out;
  if (torch_asgd::decode_header(data, size, limits, &out) == Reject::kNone) {
    check_accepted(out, limits);
  }

  const uint8_t* p = data;
  size_t n = size;
  MessageHeader h;
  h.kind = static_cast<torch_asgd::MessageKind>(take<uint8_t>(p, n));
  h.delivery = static_cast<torch_asgd::Delivery>(take<uint8_t>(p, n));
  h.dtype = static_cast<c10::ScalarType>(take<int8_t>(p, n));
  h.sender = take<int32_t>(p, n);
  h.sequence = take<uint64_t>(p, n);
  h.token = take<uint8_t>(p, n) & 1 ? limits.token : take<uint64_t>(p, n);
  h.sender_step = take<int64_t>(p, n);
  h.model_version = take<int64_t>(p, n);
  h.payload_bytes = take<uint64_t>(p, n) >> (take<uint8_t>(p, n) & 63);
  h.updates.count = take<int64_t>(p, n);
  h.updates.version_sum = take<int64_t>(p, n);
  h.updates.version_min = take<int64_t>(p, n);
  h.payload_checksum = take<uint32_t>(p, n);

  uint8_t bytes[torch_asgd::kHeaderBytes];
  torch_asgd::encode_header(h, bytes);
  if (torch_asgd::decode_header(bytes, sizeof(bytes), limits, &out) == Reject::kNone) {
    check_accepted(out, limits);
    uint8_t again[torch_asgd::kHeaderBytes];
    torch_asgd::encode_header(out, again);
    require(std::memcmp(bytes, again, sizeof(bytes)) == 0);
  }
  // A header cut short is always refused.
  if (size > 0) {
    require(torch_asgd::decode_header(bytes, size % torch_asgd::kHeaderBytes, limits, &out) !=
            Reject::kNone);
  }
  return 0;
}
