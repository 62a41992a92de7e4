// The codecs of additive payloads (codec.h): round-trip error bounds on random and
// adversarial data, exact residuals, the validator, decoding transfer by transfer, and
// error feedback conserving every value over many coalesced messages.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "torch_asgd/comm/codec.h"
#include "torch_asgd/comm/error.h"

namespace torch_asgd {
namespace {

const Compression kLossy[] = {Compression(Codec::kBf16), Compression(Codec::kFp16),
                              Compression(Codec::kInt8), Compression(Codec::kTopK, 0.01),
                              Compression(Codec::kTopK, 0.3)};

struct RoundTrip {
  std::vector<uint8_t> wire;
  std::vector<float> decoded, residual;
  bool ok = false;
};

RoundTrip round_trip(const Compression& c, const std::vector<float>& x) {
  RoundTrip r;
  const auto n = static_cast<int64_t>(x.size());
  r.wire.assign(static_cast<size_t>(codec::encoded_bytes(c, n)), 0xAB);
  r.residual.assign(x.size(), -1.0f);
  r.ok = codec::encode(c, x.data(), n, r.wire.data(), r.residual.data());
  if (!r.ok) return r;
  EXPECT_TRUE(codec::valid(c, r.wire.data(), 0, static_cast<int64_t>(r.wire.size()), n)) << c.describe();
  r.decoded.assign(x.size(), 0.0f);
  codec::add_decoded(c, r.wire.data(), 0, static_cast<int64_t>(r.wire.size()), n, r.decoded.data());
  return r;
}

std::vector<float> random_values(int64_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = d(rng);
  return x;
}

// decode(encode(x)) + residual == x, exactly (in float64), element by element.
void expect_exact(const Compression& c, const std::vector<float>& x, const RoundTrip& r) {
  ASSERT_TRUE(r.ok);
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(static_cast<double>(r.decoded[i]) + static_cast<double>(r.residual[i]),
              static_cast<double>(x[i]))
        << c.describe() << " element " << i;
  }
}

TEST(Codec, SizesAreFixedByTheCodecAndTheLength) {
  EXPECT_EQ(codec::encoded_bytes(Compression(Codec::kNone), 10000), 40000);
  EXPECT_EQ(codec::encoded_bytes(Compression(Codec::kBf16), 10001), 20002);
  EXPECT_EQ(codec::encoded_bytes(Compression(Codec::kFp16), 1), 2);
  // int8: a 4-byte scale per block of 4096: 0.25x of float32 plus 1/4096.
  EXPECT_EQ(codec::encoded_bytes(Compression(Codec::kInt8), 3 * 4096 + 5), 3 * (4 + 4096) + 4 + 5);
  // topk: ceil(fraction n) entries of 6 bytes per block, one at least.
  EXPECT_EQ(codec::encoded_bytes(Compression(Codec::kTopK, 0.01), 4096), 6 * 41);
  EXPECT_EQ(codec::encoded_bytes(Compression(Codec::kTopK, 0.01), 10), 6);
  for (const auto& c : kLossy) EXPECT_EQ(codec::encoded_bytes(c, 0), 0) << c.describe();
  // A transfer is whole blocks within the chunk.
  EXPECT_EQ(codec::transfer_bytes(Compression(Codec::kInt8), 4 << 20), 1023 * 4100);
  EXPECT_EQ(codec::transfer_bytes(Compression(Codec::kBf16), 4096), 8192) << "one block at least";
}

TEST(Codec, RandomDataRoundTripsWithinEachCodecsBoundAndTheResidualIsExact) {
  for (int64_t n : {1, 7, 4096, 4097, 12345}) {
    const auto x = random_values(n, static_cast<uint32_t>(n));
    for (const auto& c : kLossy) {
      SCOPED_TRACE(c.describe() + " n=" + std::to_string(n));
      const RoundTrip r = round_trip(c, x);
      expect_exact(c, x, r);
      for (int64_t b = 0; b < n; b += kCodecBlock) {
        const int64_t len = std::min(kCodecBlock, n - b);
        float m = 0;
        for (int64_t i = b; i < b + len; ++i) m = std::max(m, std::fabs(x[i]));
        int64_t kept = 0;
        for (int64_t i = b; i < b + len; ++i) {
          const double err = std::fabs(static_cast<double>(x[i]) - r.decoded[i]);
          switch (c.codec) {
            case Codec::kBf16:  // round to nearest: half a unit in the 8th bit
              ASSERT_LE(err, std::ldexp(std::fabs(x[i]), -8)) << i;
              break;
            case Codec::kFp16:  // these values are normal halves: 11 bits
              ASSERT_LE(err, std::ldexp(std::fabs(x[i]), -11) + std::ldexp(1.0, -25)) << i;
              break;
            case Codec::kInt8:  // half a step of at most 2 max / 127
              ASSERT_LE(err, m / 127.0 + 1e-30) << i;
              break;
            case Codec::kTopK:
              if (r.decoded[i] != 0) {
                ASSERT_EQ(r.decoded[i], x[i]) << i;
                ++kept;
              }
              break;
            case Codec::kNone:
              break;
          }
        }
        if (c.codec == Codec::kTopK) {
          ASSERT_EQ(kept, codec::topk_entries(c, len));
          // What was kept is the largest: nothing dropped is larger than anything kept.
          float smallest_kept = std::numeric_limits<float>::infinity(), largest_dropped = 0;
          for (int64_t i = b; i < b + len; ++i) {
            if (r.decoded[i] != 0) smallest_kept = std::min(smallest_kept, std::fabs(x[i]));
            else largest_dropped = std::max(largest_dropped, std::fabs(x[i]));
          }
          ASSERT_LE(largest_dropped, smallest_kept);
        }
      }
    }
  }
}

TEST(Codec, AdversarialInputs) {
  // All zeros: exact, residual zero (int8's scale is 0).
  for (const auto& c : kLossy) {
    const std::vector<float> zeros(5000, 0.0f);
    const RoundTrip r = round_trip(c, zeros);
    expect_exact(c, zeros, r);
    for (float v : r.residual) ASSERT_EQ(v, 0.0f) << c.describe();
  }
  // One huge value among small ones: int8 sends the small ones as 0 and keeps them in the
  // residual; bf16 and fp16 saturate instead of overflowing; all exact with the residual.
  std::vector<float> spike = random_values(4096, 3, 1e-3f);
  spike[100] = 3.0e38f;
  for (const auto& c : kLossy) {
    const RoundTrip r = round_trip(c, spike);
    if (c.codec == Codec::kFp16) {
      // 3e38 - 65504 rounds to 3e38: error feedback would count 65504 twice. fp16 takes
      // magnitudes below 2^28 only (saturating above 65504); beyond, a message travels raw.
      EXPECT_FALSE(r.ok);
      std::vector<float> big = {1e6f, -2.5e8f, 0.5f};
      const RoundTrip b = round_trip(c, big);
      EXPECT_EQ(b.decoded[0], 65504.0f);
      EXPECT_EQ(b.decoded[1], -65504.0f);
      expect_exact(c, big, b);
      continue;
    }
    expect_exact(c, spike, r);
    if (c.codec == Codec::kInt8) EXPECT_EQ(r.decoded[5], 0.0f);
    if (c.codec == Codec::kBf16) EXPECT_TRUE(std::isfinite(r.decoded[100]));
  }
  // Float's largest values: nothing decodes to Inf (int8 rounds inwards there, bf16 and
  // fp16 saturate), and the residual still makes up the difference exactly.
  const std::vector<float> edge = {std::numeric_limits<float>::max(), -3.3900003e38f, 1.0f, -1e-45f};
  for (const auto& c : kLossy) {
    const RoundTrip r = round_trip(c, edge);
    if (c.codec == Codec::kFp16) {
      EXPECT_FALSE(r.ok) << "fp16 cannot keep an exact residual of float's largest values";
      continue;
    }
    ASSERT_TRUE(r.ok) << c.describe();
    for (float v : r.decoded) EXPECT_TRUE(std::isfinite(v)) << c.describe();
    expect_exact(c, edge, r);
  }
  // NaN and Inf are refused, whatever the codec.
  for (float bad : {std::nanf(""), std::numeric_limits<float>::infinity()}) {
    std::vector<float> x = random_values(5000, 4);
    x[4321] = bad;
    for (const auto& c : kLossy) EXPECT_FALSE(round_trip(c, x).ok) << c.describe();
  }
  // Empty.
  for (const auto& c : kLossy) {
    std::vector<float> none;
    uint8_t out = 0;
    EXPECT_TRUE(codec::encode(c, none.data(), 0, &out, nullptr));
    EXPECT_TRUE(codec::valid(c, &out, 0, 0, 0));
  }
}

TEST(Codec, TheValidatorRefusesWhatCannotComeFromAnEncoder) {
  const auto x = random_values(4096 + 100, 5);
  const int64_t n = static_cast<int64_t>(x.size());
  auto corrupt = [&](const Compression& c, const std::function<void(std::vector<uint8_t>&)>& f) {
    RoundTrip r = round_trip(c, x);
    f(r.wire);
    return codec::valid(c, r.wire.data(), 0, static_cast<int64_t>(r.wire.size()), n);
  };
  const Compression topk(Codec::kTopK, 0.01);
  const int64_t k = codec::topk_entries(topk, kCodecBlock);
  auto index = [&](std::vector<uint8_t>& w, int64_t j, uint16_t v) { std::memcpy(&w[4 * k + 2 * j], &v, 2); };
  EXPECT_FALSE(corrupt(topk, [&](auto& w) { index(w, k - 1, 4096); })) << "an index beyond the block";
  EXPECT_FALSE(corrupt(topk, [&](auto& w) {
    uint16_t first;
    std::memcpy(&first, &w[4 * k], 2);
    index(w, 1, first);
  })) << "a repeated index";
  const float nan = std::nanf("");
  EXPECT_FALSE(corrupt(topk, [&](auto& w) { std::memcpy(&w[0], &nan, 4); })) << "a NaN value";
  EXPECT_FALSE(corrupt(Compression(Codec::kInt8), [&](auto& w) { std::memcpy(&w[4100], &nan, 4); }))
      << "the second block's scale";
  EXPECT_FALSE(corrupt(Compression(Codec::kBf16), [&](auto& w) { w[1] = 0x7F; w[0] = 0x80; })) << "bf16 Inf";
  EXPECT_FALSE(corrupt(Compression(Codec::kFp16), [&](auto& w) { w[3] = 0x7C; })) << "fp16 Inf";
  // Bytes that end inside a block.
  RoundTrip r = round_trip(Compression(Codec::kInt8), x);
  EXPECT_FALSE(codec::valid(Compression(Codec::kInt8), r.wire.data(), 0, 4099, n));
}

TEST(Codec, DecodingTransferByTransferEqualsDecodingTheWhole) {
  const auto x = random_values(3 * 4096 + 999, 6);
  const auto n = static_cast<int64_t>(x.size());
  for (const auto& c : kLossy) {
    const RoundTrip whole = round_trip(c, x);
    const int64_t step = codec::transfer_bytes(c, 9000);  // one or two blocks
    std::vector<float> acc(x.size(), 0.0f);
    const auto total = static_cast<int64_t>(whole.wire.size());
    for (int64_t off = 0; off < total; off += step) {
      const int64_t len = std::min(step, total - off);
      ASSERT_TRUE(codec::valid(c, whole.wire.data() + off, off, len, n)) << c.describe() << " at " << off;
      codec::add_decoded(c, whole.wire.data() + off, off, len, n, acc.data());
    }
    EXPECT_EQ(std::memcmp(acc.data(), whole.decoded.data(), 4 * acc.size()), 0) << c.describe();
  }
}

// What the channel does per group of peers: every message sent is added into what
// waits; now and then what waits is encoded and posted, and what the encoding lost
// waits for the next one. Over 300 messages, posted at irregular times (so many are
// coalesced), what the receiver summed plus what still waits equals what was sent,
// exactly in float64; and once the rest is posted uncompressed, nothing is missing.
TEST(Codec, ErrorFeedbackOverManyCoalescedMessagesLosesNothing) {
  const int64_t n = 2 * 4096 + 17;
  for (const auto& c : kLossy) {
    SCOPED_TRACE(c.describe());
    std::mt19937 rng(7);
    std::vector<double> produced(static_cast<size_t>(n), 0.0), received(static_cast<size_t>(n), 0.0);
    std::vector<float> waiting(static_cast<size_t>(n), 0.0f);
    std::vector<uint8_t> wire(static_cast<size_t>(codec::encoded_bytes(c, n)));
    std::vector<float> decoded(static_cast<size_t>(n));
    int posted = 0;
    double residual_norm = 0;
    for (int t = 0; t < 300; ++t) {
      // Values on a grid of 2^-10 within +-4: every float32 sum here is exact, so any
      // difference is the codec's, not rounding's.
      for (int64_t i = 0; i < n; ++i) {
        const float v = static_cast<float>(static_cast<int>(rng() % 8193) - 4096) / 1024.0f;
        waiting[i] += v;
        produced[i] += v;
      }
      if (rng() % 3 != 0) continue;  // coalesced: it waits with the others
      ASSERT_TRUE(codec::encode(c, waiting.data(), n, wire.data(), waiting.data()));
      std::fill(decoded.begin(), decoded.end(), 0.0f);
      codec::add_decoded(c, wire.data(), 0, static_cast<int64_t>(wire.size()), n, decoded.data());
      for (int64_t i = 0; i < n; ++i) {
        received[i] += decoded[i];
        ASSERT_EQ(received[i] + waiting[i], produced[i]) << "element " << i << " after message " << t;
      }
      ++posted;
    }
    for (int64_t i = 0; i < n; ++i) residual_norm += std::fabs(waiting[i]);
    EXPECT_GT(posted, 50);
    EXPECT_GT(residual_norm, 0) << "a lossy codec left nothing to carry over: the test shows nothing";
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(received[i] + waiting[i], produced[i]);
  }
}

TEST(Codec, ParseAcceptsItsNamesAndRefusesTheRest) {
  EXPECT_EQ(Compression::parse("none").codec, Codec::kNone);
  EXPECT_EQ(Compression::parse("int8").codec, Codec::kInt8);
  EXPECT_EQ(Compression::parse("topk"), Compression(Codec::kTopK, 0.01));
  EXPECT_EQ(Compression::parse("topk:0.05"), Compression(Codec::kTopK, 0.05));
  for (const auto& c : kLossy) EXPECT_EQ(Compression::parse(c.describe()), c) << c.describe();
  for (const char* bad : {"", "int4", "topk:0", "topk:1.5", "topk:x", "bf16:0.1", "INT8"}) {
    try {
      Compression::parse(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("none, bf16, fp16, int8, topk"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace torch_asgd
