// The wire format of every message torch_asgd sends between ranks.
//
// A message is one Gloo point-to-point transfer: a fixed 128-byte header, the payload
// bytes, and an 8-byte trailer. Receivers post buffers of a fixed capacity agreed when the
// channel opens, so a header can never make a receiver allocate anything; a header is
// only trusted once decode_header() has accepted it.
//
// Header layout (little-endian; reserved bytes must be zero):
//    0  u32 magic "ASGD"              48  u64 payload bytes
//    4  u16 protocol version          56  i64 number of updates carried
//    6  u8  kind                      64  i64 sum of their model versions
//    7  u8  delivery                  72  i64 min of their model versions
//    8  i32 sender rank               80  u32 payload checksum
//   12  u8  dtype, 3 reserved         84  40 reserved
//   16  u64 sequence number          124  u32 CRC-32 of bytes 0..123
//   24  u64 channel token (job id and channel name)
//   32  i64 sender step
//   40  i64 model version
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include <c10/core/ScalarType.h>

namespace torch_asgd {

inline constexpr uint32_t kMessageMagic = 0x44475341;  // "ASGD" read as little-endian
inline constexpr uint16_t kProtocolVersion = 1;
inline constexpr size_t kHeaderBytes = 128;
// After the payload comes an 8-byte trailer derived from the sequence number: Gloo
// does not say how many bytes arrived, and a frame shorter than its header claims
// would leave a stale trailer (sequence numbers never repeat), so truncation shows.
inline constexpr size_t kTrailerBytes = 8;

enum class MessageKind : uint8_t {
  kBye = 1,       // the sender will send nothing more on this channel
  kControl = 2,   // small protocol message of an algorithm
  kDelta = 3,     // additive parameter update (DASGD)
  kModel = 4,     // a model snapshot (gossip mixing, AsGrad jobs)
  kGradient = 5,  // a gradient for the parameter server
  kJob = 6,       // a job for an AsGrad worker
  kData = 7,      // opaque bytes (tests and benchmarks)
  kReply = 8,     // a model sent in answer to a kModel request (gossip)
};
inline constexpr uint8_t kMaxMessageKind = 8;

// What the sender does with a message it cannot send yet, and what the receiver does
// with one the training thread has not taken yet.
enum class Delivery : uint8_t {
  kOrdered = 0,   // kept in a bounded FIFO queue; never merged
  kAdditive = 1,  // added into the pending message of the same kind (coalesced)
  kReplace = 2,   // replaces the pending message of the same kind (only the newest counts)
};
inline constexpr uint8_t kMaxDelivery = 2;

// The model versions of the updates a message carries: enough to account the
// staleness of every one of them exactly after coalescing (ALGORITHMS.md).
struct UpdateStats {
  int64_t count = 0;
  int64_t version_sum = 0;
  int64_t version_min = std::numeric_limits<int64_t>::max();

  void add(int64_t version) {
    ++count;
    version_sum += version;
    version_min = version < version_min ? version : version_min;
  }
  void merge(const UpdateStats& o) {
    count += o.count;
    version_sum += o.version_sum;
    version_min = o.version_min < version_min ? o.version_min : version_min;
  }
};

struct MessageHeader {
  MessageKind kind = MessageKind::kData;
  Delivery delivery = Delivery::kOrdered;
  c10::ScalarType dtype = c10::ScalarType::Byte;
  int32_t sender = -1;
  uint64_t sequence = 0;  // 1, 2, ... per sender and channel
  uint64_t token = 0;     // identifies the job and the channel
  int64_t sender_step = 0;
  int64_t model_version = 0;
  uint64_t payload_bytes = 0;
  UpdateStats updates;
  uint32_t payload_checksum = 0;
};

// Why a message was rejected. Every rejection is counted per peer and logged once
// per reason; a rejected message is never applied.
enum class Reject : uint8_t {
  kNone = 0,
  kBadMagic,
  kBadVersion,
  kBadHeaderChecksum,
  kBadKind,
  kBadDelivery,
  kBadDtype,
  kWrongSender,
  kOversized,
  kMisaligned,
  kBadUpdateStats,
  kBadPayloadChecksum,
  kNonFinite,
  kBadSequence,
  kWrongToken,
  kTruncated,
  kCount_,  // number of reasons
};
const char* to_string(Reject reason);

struct DecodeLimits {
  int world_size = 1;
  int expected_sender = -1;     // the peer the transfer came from; -1 accepts any rank
  int receiver = -1;            // our own rank, never a valid sender
  uint64_t max_payload_bytes = 0;
  uint64_t token = 0;           // the channel's token; 0 accepts any
};

// Writes `h` into `out[0..kHeaderBytes)`, including both checksums' fields as given
// (payload_checksum) or computed (the header CRC).
void encode_header(const MessageHeader& h, uint8_t* out);

// Decodes and validates a header of `size` bytes. Returns kNone and fills `*out` only
// when every field is well-formed and within `limits`. Never allocates. The
// sequence number is checked by the caller, who knows what it expects next.
Reject decode_header(const uint8_t* bytes, size_t size, const DecodeLimits& limits,
                     MessageHeader* out);

// Checksum over a payload: position-dependent (Fletcher-style over 64-bit words), so
// truncation, stale bytes and reordering are caught; not cryptographic.
uint32_t payload_checksum(const void* data, size_t size);

// The trailer value that must follow the payload of a message with this header.
uint64_t trailer_for(const MessageHeader& h);

// CRC-32 (IEEE) of a byte range.
uint32_t crc32(const void* data, size_t size);

size_t dtype_size(c10::ScalarType t);  // 0 for dtypes that may not travel

}  // namespace torch_asgd
