#include "torch_asgd/comm/message.h"

#include <array>
#include <cstring>


namespace torch_asgd {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the wire format is little-endian; a big-endian port must byte-swap here");

constexpr size_t kCrcOffset = kHeaderBytes - 4;
constexpr size_t kReservedBegin = 84;

template <typename T>
void put(uint8_t* out, size_t offset, T value) {
  std::memcpy(out + offset, &value, sizeof(T));
}

template <typename T>
T get(const uint8_t* in, size_t offset) {
  T value;
  std::memcpy(&value, in + offset, sizeof(T));
  return value;
}

std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    table[i] = c;
  }
  return table;
}

}  // namespace

uint32_t crc32(const void* data, size_t size) {
  static const std::array<uint32_t, 256> table = make_crc_table();
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < size; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t payload_checksum(const void* data, size_t size) {
  // Four independent Fletcher lanes over 64-bit words keep the loop vectorizable; the
  // second sum of each lane weights every word by its position.
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t a[4] = {0, 0, 0, 0};
  uint64_t b[4] = {0, 0, 0, 0};
  size_t words = size / 8;
  size_t i = 0;
  for (; i + 4 <= words; i += 4) {
    for (int l = 0; l < 4; ++l) {
      uint64_t w;
      std::memcpy(&w, p + 8 * (i + l), 8);
      a[l] += w;
      b[l] += a[l];
    }
  }
  uint64_t tail_a = 0, tail_b = 0;
  for (; i < words; ++i) {
    uint64_t w;
    std::memcpy(&w, p + 8 * i, 8);
    tail_a += w;
    tail_b += tail_a;
  }
  uint64_t last = 0;
  std::memcpy(&last, p + 8 * words, size - 8 * words);
  tail_a += last;
  tail_b += tail_a;
  uint64_t h = size * 0x9E3779B97F4A7C15ull;
  for (int l = 0; l < 4; ++l) {
    h = (h ^ a[l]) * 0xFF51AFD7ED558CCDull;
    h = (h ^ b[l]) * 0xC4CEB9FE1A85EC53ull;
  }
  h = (h ^ tail_a) * 0xFF51AFD7ED558CCDull;
  h = (h ^ tail_b) * 0xC4CEB9FE1A85EC53ull;
  h ^= h >> 33;
  return static_cast<uint32_t>(h ^ (h >> 32));
}

size_t dtype_size(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Byte:
    case c10::ScalarType::Char:
    case c10::ScalarType::Bool:
      return 1;
    case c10::ScalarType::Short:
    case c10::ScalarType::Half:
    case c10::ScalarType::BFloat16:
      return 2;
    case c10::ScalarType::Int:
    case c10::ScalarType::Float:
      return 4;
    case c10::ScalarType::Long:
    case c10::ScalarType::Double:
      return 8;
    default:
      return 0;
  }
}

const char* to_string(Reject r) {
  switch (r) {
    case Reject::kNone: return "accepted";
    case Reject::kBadMagic: return "bad magic number (not a torch_asgd message)";
    case Reject::kBadVersion: return "unsupported protocol version";
    case Reject::kBadHeaderChecksum: return "header checksum mismatch";
    case Reject::kBadKind: return "unknown message kind";
    case Reject::kBadDelivery: return "unknown delivery mode";
    case Reject::kBadDtype: return "unsupported dtype";
    case Reject::kWrongSender: return "sender rank does not match the connection";
    case Reject::kOversized: return "payload larger than the channel's capacity";
    case Reject::kMisaligned: return "payload size not a multiple of the element size";
    case Reject::kBadUpdateStats: return "inconsistent update statistics";
    case Reject::kBadPayloadChecksum: return "payload checksum mismatch (truncated or corrupt)";
    case Reject::kNonFinite: return "non-finite values (NaN/Inf) in the payload";
    case Reject::kBadSequence: return "out-of-order or repeated sequence number";
    case Reject::kWrongToken: return "message of another job or channel";
    case Reject::kTruncated: return "payload shorter than its header says (truncated)";
    case Reject::kCount_: break;
  }
  return "unknown reason";
}

void encode_header(const MessageHeader& h, uint8_t* out) {
  std::memset(out, 0, kHeaderBytes);
  put<uint32_t>(out, 0, kMessageMagic);
  put<uint16_t>(out, 4, kProtocolVersion);
  put<uint8_t>(out, 6, static_cast<uint8_t>(h.kind));
  put<uint8_t>(out, 7, static_cast<uint8_t>(h.delivery));
  put<int32_t>(out, 8, h.sender);
  put<uint8_t>(out, 12, static_cast<uint8_t>(h.dtype));
  put<uint64_t>(out, 16, h.sequence);
  put<uint64_t>(out, 24, h.token);
  put<int64_t>(out, 32, h.sender_step);
  put<int64_t>(out, 40, h.model_version);
  put<uint64_t>(out, 48, h.payload_bytes);
  put<int64_t>(out, 56, h.updates.count);
  put<int64_t>(out, 64, h.updates.version_sum);
  put<int64_t>(out, 72, h.updates.version_min);
  put<uint32_t>(out, 80, h.payload_checksum);
  put<uint32_t>(out, kCrcOffset, crc32(out, kCrcOffset));
}

Reject decode_header(const uint8_t* in, size_t size, const DecodeLimits& limits,
                     MessageHeader* out) {
  if (size < kHeaderBytes || get<uint32_t>(in, 0) != kMessageMagic) return Reject::kBadMagic;
  if (get<uint32_t>(in, kCrcOffset) != crc32(in, kCrcOffset)) return Reject::kBadHeaderChecksum;
  if (get<uint16_t>(in, 4) != kProtocolVersion) return Reject::kBadVersion;
  for (size_t i = kReservedBegin; i < kCrcOffset; ++i) {
    if (in[i] != 0) return Reject::kBadVersion;  // a newer protocol uses these bytes
  }
  if (in[13] != 0 || in[14] != 0 || in[15] != 0) return Reject::kBadVersion;

  MessageHeader h;
  uint8_t kind = in[6];
  if (kind < 1 || kind > kMaxMessageKind) return Reject::kBadKind;
  h.kind = static_cast<MessageKind>(kind);
  if (in[7] > kMaxDelivery) return Reject::kBadDelivery;
  h.delivery = static_cast<Delivery>(in[7]);
  h.dtype = static_cast<c10::ScalarType>(in[12]);
  size_t elem = in[12] < static_cast<uint8_t>(c10::ScalarType::NumOptions) ? dtype_size(h.dtype) : 0;
  if (elem == 0) return Reject::kBadDtype;

  h.sender = get<int32_t>(in, 8);
  if (h.sender < 0 || h.sender >= limits.world_size || h.sender == limits.receiver ||
      (limits.expected_sender >= 0 && h.sender != limits.expected_sender)) {
    return Reject::kWrongSender;
  }
  h.sequence = get<uint64_t>(in, 16);
  h.token = get<uint64_t>(in, 24);
  if (limits.token != 0 && h.token != limits.token) return Reject::kWrongToken;
  h.sender_step = get<int64_t>(in, 32);
  h.model_version = get<int64_t>(in, 40);
  h.payload_bytes = get<uint64_t>(in, 48);
  if (h.payload_bytes > limits.max_payload_bytes) return Reject::kOversized;
  if (h.payload_bytes % elem != 0) return Reject::kMisaligned;
  h.updates.count = get<int64_t>(in, 56);
  h.updates.version_sum = get<int64_t>(in, 64);
  h.updates.version_min = get<int64_t>(in, 72);
  if (h.updates.count < 0 || h.sender_step < 0 || h.model_version < 0 ||
      (h.updates.count > 0 &&
       (h.updates.version_min < 0 || h.updates.version_min > h.model_version))) {
    return Reject::kBadUpdateStats;
  }
  h.payload_checksum = get<uint32_t>(in, 80);
  *out = h;
  return Reject::kNone;
}

uint64_t trailer_for(const MessageHeader& h) {
  return (h.sequence * 0x9E3779B97F4A7C15ull) ^ h.token ^ 0x544F524348415344ull;
}


}  // namespace torch_asgd
