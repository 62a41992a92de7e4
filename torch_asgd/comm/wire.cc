#include "torch_asgd/comm/wire.h"

#include <algorithm>
#include <cstring>

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace torch_asgd {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the wire format is little-endian; a big-endian port must byte-swap here");

constexpr size_t kChecksumOffset = 72;

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

// Over the first 72 header bytes and the metadata block that follows them.
uint64_t header_checksum(const uint8_t* frame, size_t meta_bytes) {
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, frame, kChecksumOffset);
  XXH3_64bits_update(&state, frame + kFrameHeaderBytes, meta_bytes);
  return XXH3_64bits_digest(&state);
}

}  // namespace

uint64_t checksum64(const void* data, size_t size) { return XXH3_64bits(data, size); }

StreamingChecksum::StreamingChecksum() : state_(XXH3_createState()) { reset(); }
StreamingChecksum::~StreamingChecksum() { XXH3_freeState(static_cast<XXH3_state_t*>(state_)); }
void StreamingChecksum::reset() { XXH3_64bits_reset(static_cast<XXH3_state_t*>(state_)); }
void StreamingChecksum::update(const void* data, size_t size) {
  XXH3_64bits_update(static_cast<XXH3_state_t*>(state_), data, size);
}
uint64_t StreamingChecksum::digest() const {
  return XXH3_64bits_digest(static_cast<const XXH3_state_t*>(state_));
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
    case Reject::kBadMagic: return "bad magic number (not a torch_asgd frame)";
    case Reject::kOldVersion: return "protocol version 1 (an older torch_asgd)";
    case Reject::kBadVersion: return "unsupported protocol version";
    case Reject::kBadHeaderChecksum: return "header checksum mismatch";
    case Reject::kBadType: return "unknown frame type";
    case Reject::kBadStream: return "stream not declared for this frame type";
    case Reject::kBadDtype: return "unsupported dtype";
    case Reject::kBadFlags: return "unknown or inconsistent flags";
    case Reject::kWrongSender: return "sender rank does not match the connection";
    case Reject::kOversized: return "payload or metadata larger than the channel allows";
    case Reject::kMisaligned: return "payload size not a multiple of the element size";
    case Reject::kBadMetadata: return "malformed metadata block";
    case Reject::kBadPayloadChecksum: return "payload checksum mismatch (truncated or corrupt)";
    case Reject::kNonFinite: return "non-finite values (NaN/Inf) in the payload";
    case Reject::kBadSequence: return "out-of-order or repeated sequence number";
    case Reject::kWrongToken: return "frame of another job or channel";
    case Reject::kUnexpected: return "frame not allowed at this point of the protocol";
    case Reject::kBadCodec: return "codec, codec version or encoded blocks not valid for the stream";
    case Reject::kCount_: break;
  }
  return "unknown reason";
}

void encode_frame_header(const FrameHeader& h, const Metadata& meta, uint8_t* out) {
  std::memset(out, 0, kFrameHeaderBytes);
  put<uint32_t>(out, 0, kFrameMagic);
  put<uint16_t>(out, 4, kProtocolVersion);
  put<uint8_t>(out, 6, static_cast<uint8_t>(h.type));
  put<uint8_t>(out, 7, h.stream);
  put<int32_t>(out, 8, h.sender);
  put<uint8_t>(out, 12, static_cast<uint8_t>(h.dtype));
  put<uint8_t>(out, 13, h.flags);
  put<uint16_t>(out, 14, h.meta_fields);
  put<uint64_t>(out, 16, h.sequence);
  put<uint64_t>(out, 24, h.token);
  put<uint64_t>(out, 32, h.payload_bytes);
  put<uint16_t>(out, 40, h.meta_records);
  put<uint16_t>(out, 42, h.record_width);
  put<uint8_t>(out, 44, static_cast<uint8_t>(h.codec));
  put<uint8_t>(out, 45, h.codec == Codec::kNone ? 0 : kCodecVersion);
  put<uint64_t>(out, 48, h.ack);
  put<uint64_t>(out, 56, h.payload_checksum);
  // The block is what the header says; what the metadata lacks of it stays zero.
  uint8_t* block = out + kFrameHeaderBytes;
  std::memset(block, 0, h.meta_bytes());
  const size_t nf = std::min<size_t>(h.meta_fields, meta.fields.size());
  if (nf > 0) std::memcpy(block, meta.fields.data(), 8 * nf);
  const size_t nr = std::min(static_cast<size_t>(h.meta_records) * h.record_width, meta.records.size());
  if (nr > 0) std::memcpy(block + 8 * static_cast<size_t>(h.meta_fields), meta.records.data(), 8 * nr);
  put<uint64_t>(out, kChecksumOffset, header_checksum(out, h.meta_bytes()));
}

Reject decode_frame_header(const uint8_t* in, size_t size, const DecodeLimits& limits,
                           FrameHeader* out, uint16_t* peer_version) {
  if (size < kFrameHeaderBytes || get<uint32_t>(in, 0) != kFrameMagic) return Reject::kBadMagic;
  const uint16_t version = get<uint16_t>(in, 4);
  if (peer_version != nullptr) *peer_version = version;
  if (version == 1) return Reject::kOldVersion;
  if (version != kProtocolVersion) return Reject::kBadVersion;

  FrameHeader h;
  h.meta_fields = get<uint16_t>(in, 14);
  h.meta_records = get<uint16_t>(in, 40);
  h.record_width = get<uint16_t>(in, 42);
  const size_t meta_bytes = h.meta_bytes();
  if (meta_bytes > limits.max_meta_bytes) return Reject::kOversized;
  if (kFrameHeaderBytes + meta_bytes > size || kFrameHeaderBytes + meta_bytes > limits.frame_capacity) {
    return Reject::kOversized;
  }
  if (get<uint64_t>(in, kChecksumOffset) != header_checksum(in, meta_bytes)) {
    return Reject::kBadHeaderChecksum;
  }
  if (get<uint16_t>(in, 46) != 0 || get<uint64_t>(in, 64) != 0) {
    return Reject::kBadVersion;  // a newer protocol uses these
  }
  const uint8_t codec = in[44], codec_version = in[45];
  if (codec > kMaxCodec) return Reject::kBadCodec;
  h.codec = static_cast<Codec>(codec);
  if (codec_version != (h.codec == Codec::kNone ? 0 : kCodecVersion)) return Reject::kBadCodec;

  const uint8_t type = in[6];
  if (type < 1 || type > kMaxFrameType) return Reject::kBadType;
  h.type = static_cast<FrameType>(type);
  h.stream = in[7];
  if (h.stream >= kMaxStreams) return Reject::kBadStream;
  h.flags = in[13];
  if ((h.flags & ~kKnownFlags) != 0) return Reject::kBadFlags;
  const uint8_t dtype = in[12];
  h.dtype = static_cast<c10::ScalarType>(dtype);
  const size_t elem =
      dtype < static_cast<uint8_t>(c10::ScalarType::NumOptions) ? dtype_size(h.dtype) : 0;
  if (elem == 0) return Reject::kBadDtype;

  h.sender = get<int32_t>(in, 8);
  if (h.sender < 0 || h.sender >= limits.world_size || h.sender == limits.receiver ||
      (limits.expected_sender >= 0 && h.sender != limits.expected_sender)) {
    return Reject::kWrongSender;
  }
  h.sequence = get<uint64_t>(in, 16);
  h.token = get<uint64_t>(in, 24);
  if (limits.token != 0 && h.token != limits.token) return Reject::kWrongToken;
  h.payload_bytes = get<uint64_t>(in, 32);
  h.ack = get<uint64_t>(in, 48);
  h.payload_checksum = get<uint64_t>(in, 56);
  if ((h.flags & kChecksummed) == 0 && h.payload_checksum != 0) return Reject::kBadFlags;
  if (h.meta_records != 0 && h.record_width == 0) return Reject::kBadMetadata;
  if ((h.flags & kRecordsOverflowed) != 0 && h.meta_records != 0) return Reject::kBadMetadata;

  const bool control = h.type == FrameType::kBye || h.type == FrameType::kAck;
  if (control) {
    if (h.payload_bytes != 0 || h.stream != 0 || meta_bytes != 0 ||
        (h.flags & ~kAckRequested) != 0) {
      return Reject::kBadFlags;
    }
  } else if (h.type == FrameType::kAdditive) {
    uint64_t want = limits.additive_bytes[h.stream];
    if (want == 0) return Reject::kBadStream;
    if (h.dtype != limits.additive_dtype[h.stream]) return Reject::kBadDtype;
    if (h.codec != Codec::kNone) {
      // Only the stream's own codec; the payload is its blocks.
      if (h.codec != limits.additive_codec[h.stream].codec) return Reject::kBadCodec;
      want = static_cast<uint64_t>(codec::encoded_bytes(limits.additive_codec[h.stream],
                                                        static_cast<int64_t>(want / elem)));
    }
    if (h.payload_bytes != want) return h.payload_bytes > want ? Reject::kOversized : Reject::kMisaligned;
  } else if (h.payload_bytes > limits.max_payload_bytes) {
    return Reject::kOversized;
  }
  if (h.codec != Codec::kNone && h.type != FrameType::kAdditive) return Reject::kBadCodec;
  if (h.codec == Codec::kNone && h.payload_bytes % elem != 0) return Reject::kMisaligned;
  if (h.inline_payload()) {
    if (kFrameHeaderBytes + meta_bytes + h.payload_bytes > limits.frame_capacity ||
        kFrameHeaderBytes + meta_bytes + h.payload_bytes > size) {
      return Reject::kOversized;
    }
  }
  *out = h;
  return Reject::kNone;
}

Metadata read_metadata(const FrameHeader& h, const uint8_t* frame) {
  Metadata m;
  const uint8_t* block = frame + kFrameHeaderBytes;
  m.fields.resize(h.meta_fields);
  if (!m.fields.empty()) std::memcpy(m.fields.data(), block, 8 * m.fields.size());
  m.records.resize(static_cast<size_t>(h.meta_records) * h.record_width);
  if (!m.records.empty()) {
    std::memcpy(m.records.data(), block + 8 * m.fields.size(), 8 * m.records.size());
  }
  m.records_overflowed = (h.flags & kRecordsOverflowed) != 0;
  return m;
}

}  // namespace torch_asgd
