// Compression of additive payloads (float32 deltas and gradients) on the wire.
//
// A codec works on blocks of kCodecBlock elements (the last block may be shorter); every
// block encodes to a size that depends only on the codec and the block's length, so a
// receiver knows in advance how many bytes a message of a stream takes, and a transfer
// of whole blocks can be decoded and summed as it arrives:
//
//   none   4 n bytes   the float32 values as they are
//   bf16   2 n bytes   bfloat16, rounded to nearest even
//   fp16   2 n bytes   IEEE half, rounded to nearest even, saturated at +-65504
//   int8   4 + n       a float32 scale (a power of two, so that every decoded value and
//                      every residual is exact in float32) and n int8 values in -127..127
//   topk   6 k         the k = max(1, ceil(fraction n)) entries of largest magnitude:
//                      k float32 values, then their k uint16 indices within the block,
//                      increasing
//
// The codecs are lossy; the channel keeps what a message lost (the residual, `x -
// decode(encode(x))`, exact in float32) and adds it to the next message to the same
// peers (error feedback), so that over a run nothing is lost. A receiver refuses encoded
// bytes that decode to NaN or Inf, or topk indices that are out of range or not
// increasing.
//
// Thread safety: pure functions.
#pragma once

#include <cstdint>
#include <string>

namespace torch_asgd {

enum class Codec : uint8_t { kNone = 0, kBf16 = 1, kFp16 = 2, kInt8 = 3, kTopK = 4 };
inline constexpr uint8_t kMaxCodec = 4;
// The encodings' version, carried in every frame beside the codec: a peer that encodes
// differently is refused.
inline constexpr uint8_t kCodecVersion = 1;
inline constexpr int64_t kCodecBlock = 4096;

const char* to_string(Codec c);

struct Compression {
  Codec codec = Codec::kNone;
  double topk_fraction = 0.01;  // kTopK: the share of each block's entries sent (0, 1]

  Compression() = default;
  Compression(Codec c, double fraction = 0.01) : codec(c), topk_fraction(fraction) {}  // NOLINT
  // "none", "bf16", "fp16", "int8", "topk" (1 %), "topk:0.05"; throws ConfigError naming
  // the accepted forms.
  static Compression parse(const std::string& text);
  std::string describe() const;  // parse(describe()) == *this
  bool lossy() const { return codec != Codec::kNone; }
  bool operator==(const Compression& o) const {
    return codec == o.codec && (codec != Codec::kTopK || topk_fraction == o.topk_fraction);
  }
  bool operator!=(const Compression& o) const { return !(*this == o); }
};

namespace codec {

// Entries kept in a topk block of n elements.
int64_t topk_entries(const Compression& c, int64_t n);
// Encoded bytes of one block of n <= kCodecBlock elements, and of a payload of numel.
int64_t block_bytes(const Compression& c, int64_t n);
int64_t encoded_bytes(const Compression& c, int64_t numel);
// The bytes of one transfer of an encoded payload: whole blocks, at most max_chunk (one
// block at least: a channel refuses a chunk size smaller than one block).
int64_t transfer_bytes(const Compression& c, int64_t max_chunk);
// Elements encoded before byte offset `offset` of a payload (a block boundary).
int64_t elements_before(const Compression& c, int64_t offset);

// Encodes numel float32 values into `out` (encoded_bytes(c, numel) bytes). When
// `residual` is given (it may be `src` itself), it receives src - decode(out), exactly.
// Returns false, having written nothing useful, if the codec cannot take the values:
// NaN or Inf, or under fp16 a magnitude of 2^28 or more (its residual would round).
bool encode(const Compression& c, const float* src, int64_t numel, uint8_t* out, float* residual);

// Bytes [offset, offset + length) of an encoded payload of numel elements, `offset` and
// `offset + length` on block boundaries (or the end): whether they decode to finite
// values with topk indices in range and increasing.
bool valid(const Compression& c, const uint8_t* data, int64_t offset, int64_t length, int64_t numel);
// Adds the values those bytes decode to into acc (numel elements: the whole payload's).
void add_decoded(const Compression& c, const uint8_t* data, int64_t offset, int64_t length,
                 int64_t numel, float* acc);

}  // namespace codec
}  // namespace torch_asgd
