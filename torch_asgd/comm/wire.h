// The wire format of torch_asgd's channels, protocol version 2.
//
// Every message starts with a header frame, one Gloo transfer of at most the channel's
// chunk size:
//
//   [80-byte header][metadata block][inline payload, if small]
//
// A payload that is not inline follows as raw chunks, the next Gloo transfers from the
// same sender on the same slot, each of exactly min(chunk size, bytes left) bytes. The
// receiver knows from the header how many to expect; what a chunk holds is checked
// by the payload checksum when the last one is in. Receive buffers are chunk-sized and
// shared by all peers, so no header can make a receiver allocate more than the limits
// it was opened with.
//
// Header layout (little-endian; reserved bytes must be zero):
//    0  u32 magic "ASGD"                   32  u64 payload bytes
//    4  u16 protocol version (2)           40  u16 metadata records
//    6  u8  frame type (FrameType)         42  u16 record width (int64s)
//    7  u8  stream (0..15)
//    8  i32 sender rank                    44  u8  codec (additive payloads; codec.h)
//   12  u8  dtype                          45  u8  codec version (0 without a codec)
//   13  u8  flags (FrameFlag)              46  u16 reserved
//   14  u16 metadata fields                48  u64 acknowledgement: the highest sequence
//                                                  number of the receiver's frames this
//                                                  sender has processed whole
//                                          56  u64 payload checksum (XXH3-64)
//   16  u64 sequence number (per sender    64  u64 reserved
//           and receiver, from 1 up)       72  u64 header checksum (XXH3-64 of bytes
//   24  u64 channel token (job id and              0..71 and the metadata block)
//           channel name)
// The metadata block is `fields` int64s, then `records * width` int64s. An additive
// payload under a codec other than none is the codec's blocks (codec.h), transferred in
// whole blocks; `dtype` stays the stream's, and the checksum covers the encoded bytes.
//
// Acknowledgements are how a sender learns that a peer has a message (and may free it,
// or send the next one of an additive stream): every header frame carries one, and a
// frame that asks for one (kAckRequested) is answered at once by a kAck frame when the
// receiver has nothing else to send.
//
// Version 1 (128-byte headers, message kinds of the algorithms inside the transport)
// keeps magic and version at the same offsets, so a version-1 frame is recognized and
// refused naming both versions.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

#include <c10/core/ScalarType.h>

#include "torch_asgd/comm/codec.h"
#include "torch_asgd/comm/metadata.h"

namespace torch_asgd {

inline constexpr uint32_t kFrameMagic = 0x44475341;  // "ASGD" read as little-endian
inline constexpr uint16_t kProtocolVersion = 2;
inline constexpr size_t kFrameHeaderBytes = 80;
inline constexpr int kMaxStreams = 16;

enum class FrameType : uint8_t {
  kOrdered = 1,   // delivered once, in order
  kAdditive = 2,  // summed into what is pending (coalesced)
  kReplace = 3,   // only the newest of a stream counts
  kBye = 4,       // the sender sends nothing more
  kAck = 5,       // "I received everything you sent before your goodbye"
};
inline constexpr uint8_t kMaxFrameType = 5;

enum FrameFlag : uint8_t {
  kInlinePayload = 1,     // the payload is in the header frame
  kChecksummed = 2,       // the payload checksum field is set
  kRecordsOverflowed = 4, // Metadata::records_overflowed
  kAckRequested = 8,      // the sender waits for an acknowledgement
};
inline constexpr uint8_t kKnownFlags = 15;

struct FrameHeader {
  FrameType type = FrameType::kOrdered;
  uint8_t stream = 0;
  int32_t sender = -1;
  c10::ScalarType dtype = c10::ScalarType::Byte;
  uint8_t flags = 0;
  uint16_t meta_fields = 0;
  uint64_t sequence = 0;
  uint64_t token = 0;
  uint64_t payload_bytes = 0;
  uint16_t meta_records = 0;
  uint16_t record_width = 0;
  uint64_t ack = 0;
  uint64_t payload_checksum = 0;
  Codec codec = Codec::kNone;  // additive payloads only

  bool inline_payload() const { return (flags & kInlinePayload) != 0; }
  size_t meta_bytes() const {
    return 8 * (static_cast<size_t>(meta_fields) +
                static_cast<size_t>(meta_records) * static_cast<size_t>(record_width));
  }
  // Bytes of the header frame itself (header, metadata, inline payload).
  size_t frame_bytes() const {
    return kFrameHeaderBytes + meta_bytes() + (inline_payload() ? payload_bytes : 0);
  }
};

// Why a frame was rejected. Every rejection is counted per peer and logged once per
// reason; a rejected message is never delivered.
enum class Reject : uint8_t {
  kNone = 0,
  kBadMagic,
  kOldVersion,  // a peer speaking protocol version 1
  kBadVersion,
  kBadHeaderChecksum,
  kBadType,
  kBadStream,
  kBadDtype,
  kBadFlags,
  kWrongSender,
  kOversized,
  kMisaligned,
  kBadMetadata,
  kBadPayloadChecksum,
  kNonFinite,
  kBadSequence,
  kWrongToken,
  kUnexpected,  // a frame the protocol does not allow now (an ack before a goodbye)
  kBadCodec,    // a codec (or codec version) the stream does not use
  kCount_,      // number of reasons
};
const char* to_string(Reject reason);

// What a receiver accepts. Additive streams have a fixed dtype and size, declared when
// the channel opens; ordered and replace payloads are bounded by max_payload_bytes.
struct DecodeLimits {
  int world_size = 1;
  int expected_sender = -1;  // the peer the transfer came from; -1 accepts any rank
  int receiver = -1;         // our own rank, never a valid sender
  uint64_t token = 0;        // the channel's token; 0 accepts any
  uint64_t max_payload_bytes = 0;
  size_t max_meta_bytes = 0;
  size_t frame_capacity = 0;  // bytes a header frame may span (the chunk size)
  // Declared additive streams: payload bytes (0: not declared), dtype, and the codec a
  // message may carry besides none.
  std::array<uint64_t, kMaxStreams> additive_bytes{};
  std::array<c10::ScalarType, kMaxStreams> additive_dtype{};
  std::array<Compression, kMaxStreams> additive_codec{};
};

// Writes the header of `h` and its metadata block into `out`, which must hold
// h.frame_bytes() bytes; computes the header checksum. The inline payload (if any) is
// the caller's to place after the metadata block.
void encode_frame_header(const FrameHeader& h, const Metadata& meta, uint8_t* out);

// Decodes and validates a header frame of which `size` bytes are readable. Returns kNone
// and fills `*out` only when every field is well-formed and within `limits`; the
// metadata block starts at bytes + kFrameHeaderBytes. Never allocates. The sequence
// number is checked by the caller, who knows what it expects next. `*peer_version`, if
// given, receives the version the frame claims (for the message that names it).
Reject decode_frame_header(const uint8_t* bytes, size_t size, const DecodeLimits& limits,
                           FrameHeader* out, uint16_t* peer_version = nullptr);

// The metadata block of an accepted header frame (allocates the vectors).
Metadata read_metadata(const FrameHeader& h, const uint8_t* frame);

// XXH3-64 of a byte range, and a streaming form for payloads that arrive in chunks.
uint64_t checksum64(const void* data, size_t size);
class StreamingChecksum {
 public:
  StreamingChecksum();
  ~StreamingChecksum();
  StreamingChecksum(const StreamingChecksum&) = delete;
  StreamingChecksum& operator=(const StreamingChecksum&) = delete;
  void reset();
  void update(const void* data, size_t size);
  uint64_t digest() const;

 private:
  void* state_;  // XXH3_state_t
};

size_t dtype_size(c10::ScalarType t);  // 0 for dtypes that may not travel

}  // namespace torch_asgd
