// The wire format (protocol version 2) and the metadata merge rules.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "torch_asgd/comm/metadata.h"
#include "torch_asgd/comm/wire.h"

namespace torch_asgd {
namespace {

Metadata sample_meta() {
  Metadata m({3, 250, -7});
  m.records = {1, 2, 3, 4};
  return m;
}

FrameHeader sample() {
  FrameHeader h;
  h.type = FrameType::kAdditive;
  h.stream = 2;
  h.dtype = c10::ScalarType::Float;
  h.sender = 2;
  h.sequence = 17;
  h.token = 0xABCDEF;
  h.payload_bytes = 4000;
  h.meta_fields = 3;
  h.meta_records = 2;
  h.record_width = 2;
  h.ack = 12;
  h.flags = kChecksummed | kAckRequested;
  h.payload_checksum = 0x123456789ull;
  return h;
}

DecodeLimits limits() {
  DecodeLimits l;
  l.world_size = 4;
  l.expected_sender = 2;
  l.receiver = 0;
  l.token = 0xABCDEF;
  l.max_payload_bytes = 4096;
  l.max_meta_bytes = 1024;
  l.frame_capacity = 8192;
  l.additive_bytes[2] = 4000;
  l.additive_dtype[2] = c10::ScalarType::Float;
  return l;
}

std::vector<uint8_t> encoded(const FrameHeader& h, const Metadata& m = sample_meta()) {
  std::vector<uint8_t> b(h.frame_bytes());
  encode_frame_header(h, m, b.data());
  return b;
}

Reject decode(const std::vector<uint8_t>& b, DecodeLimits l = limits(), FrameHeader* out = nullptr) {
  FrameHeader h;
  return decode_frame_header(b.data(), b.size(), l, out ? out : &h);
}

// A header with one field changed, re-encoded (so the checksum is right and the field's
// own check must catch it).
template <typename F>
Reject with(F change, DecodeLimits l = limits()) {
  FrameHeader h = sample();
  Metadata m = sample_meta();
  change(h, m, l);
  return decode(encoded(h, m), l);
}

TEST(Wire, RoundTrip) {
  auto b = encoded(sample());
  FrameHeader out;
  ASSERT_EQ(decode(b, limits(), &out), Reject::kNone);
  const FrameHeader in = sample();
  EXPECT_EQ(out.type, in.type);
  EXPECT_EQ(out.stream, in.stream);
  EXPECT_EQ(out.dtype, in.dtype);
  EXPECT_EQ(out.sender, in.sender);
  EXPECT_EQ(out.sequence, in.sequence);
  EXPECT_EQ(out.token, in.token);
  EXPECT_EQ(out.payload_bytes, in.payload_bytes);
  EXPECT_EQ(out.ack, in.ack);
  EXPECT_EQ(out.flags, in.flags);
  EXPECT_EQ(out.payload_checksum, in.payload_checksum);
  EXPECT_EQ(read_metadata(out, b.data()), sample_meta());
}

TEST(Wire, RejectsEachBadField) {
  auto good = encoded(sample());
  EXPECT_EQ(decode(std::vector<uint8_t>(good.begin(), good.begin() + 60)), Reject::kBadMagic);
  uint32_t magic = 0xDEADBEEF;
  auto b = good;
  std::memcpy(b.data(), &magic, 4);
  EXPECT_EQ(decode(b), Reject::kBadMagic);
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) { h.type = static_cast<FrameType>(0); }),
            Reject::kBadType);
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) { h.type = static_cast<FrameType>(6); }),
            Reject::kBadType);
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) { h.stream = 16; }), Reject::kBadStream);
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) { h.stream = 3; }), Reject::kBadStream)
      << "an additive stream nobody declared";
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) { h.dtype = static_cast<c10::ScalarType>(200); }),
            Reject::kBadDtype);
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) { h.dtype = c10::ScalarType::ComplexFloat; }),
            Reject::kBadDtype);
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) { h.dtype = c10::ScalarType::Double; }),
            Reject::kBadDtype)
      << "another dtype than the stream's";
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) { h.flags |= 0x80; }), Reject::kBadFlags);
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) { h.flags &= ~kChecksummed; }),
            Reject::kBadFlags)
      << "a checksum value without the flag";
  for (int32_t sender : {-1, 0, 3, 4, 1000}) {
    EXPECT_EQ(with([&](FrameHeader& h, Metadata&, DecodeLimits&) { h.sender = sender; }),
              Reject::kWrongSender)
        << sender;
  }
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) { h.payload_bytes = 4004; }),
            Reject::kOversized);
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) { h.payload_bytes = 3996; }),
            Reject::kMisaligned)
      << "an additive payload of another size than the stream's";
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) {
              h.type = FrameType::kOrdered;
              h.payload_bytes = uint64_t{1} << 40;
            }),
            Reject::kOversized);
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) {
              h.type = FrameType::kOrdered;
              h.payload_bytes = 4001;
            }),
            Reject::kMisaligned);
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits& l) { l.max_meta_bytes = 40; }),
            Reject::kOversized);
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) { h.record_width = 0; }),
            Reject::kBadMetadata);
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) { h.flags |= kRecordsOverflowed; }),
            Reject::kBadMetadata)
      << "records beside the overflow flag";
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) { h.token = 99; }), Reject::kWrongToken);
  EXPECT_EQ(with([](FrameHeader& h, Metadata& m, DecodeLimits&) {
              h.type = FrameType::kBye;
              h.stream = 0;
            }),
            Reject::kBadFlags)
      << "a goodbye with a payload";
  EXPECT_EQ(with([](FrameHeader& h, Metadata&, DecodeLimits&) {
              h.type = FrameType::kOrdered;
              h.payload_bytes = 400;
              h.flags |= kInlinePayload;  // the frame would end past the buffer
            },
                 [] {
                   DecodeLimits l = limits();
                   l.frame_capacity = 300;
                   return l;
                 }()),
            Reject::kOversized);
  // Reserved bytes are zero: a newer protocol would use them.
  b = good;
  b[44] = 1;
  EXPECT_NE(decode(b), Reject::kNone);
}

TEST(Wire, OtherVersionsAreNamed) {
  auto b = encoded(sample());
  uint16_t version = 1;
  std::memcpy(b.data() + 4, &version, 2);
  FrameHeader h;
  uint16_t seen = 0;
  EXPECT_EQ(decode_frame_header(b.data(), b.size(), limits(), &h, &seen), Reject::kOldVersion);
  EXPECT_EQ(seen, 1);
  version = 3;
  std::memcpy(b.data() + 4, &version, 2);
  EXPECT_EQ(decode_frame_header(b.data(), b.size(), limits(), &h, &seen), Reject::kBadVersion);
  EXPECT_EQ(seen, 3);
  // A real version-1 header: 128 bytes, magic, version 1.
  std::vector<uint8_t> v1(128, 0);
  std::memcpy(v1.data(), &kFrameMagic, 4);
  version = 1;
  std::memcpy(v1.data() + 4, &version, 2);
  EXPECT_EQ(decode(v1), Reject::kOldVersion);
}

TEST(Wire, HeaderChecksumCatchesEveryFlippedBit) {
  auto good = encoded(sample());
  // Every bit of the header and the metadata block, except the magic and version,
  // which are checked first.
  for (size_t bit = 6 * 8; bit < good.size() * 8; ++bit) {
    auto b = good;
    b[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
    EXPECT_NE(decode(b), Reject::kNone) << "bit " << bit;
  }
}

TEST(Wire, RandomBytesAreNeverAccepted) {
  std::mt19937 rng(7);
  std::vector<uint8_t> b(kFrameHeaderBytes + 64);
  for (int i = 0; i < 20000; ++i) {
    for (auto& x : b) x = static_cast<uint8_t>(rng());
    if (i % 2 == 0) {
      std::memcpy(b.data(), &kFrameMagic, 4);
      std::memcpy(b.data() + 4, &kProtocolVersion, 2);
    }
    EXPECT_NE(decode(b), Reject::kNone);
  }
}

TEST(Wire, PayloadChecksumCatchesTruncationAndChanges) {
  for (size_t n : {0, 1, 7, 8, 9, 31, 32, 33, 1000, 4097, 100000}) {
    std::vector<uint8_t> p(n + 8);
    for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<uint8_t>(i * 31 + 7);
    const uint64_t c = checksum64(p.data(), n);
    if (n > 0) {
      EXPECT_NE(c, checksum64(p.data(), n - 1)) << n;
      auto q = p;
      q[n / 2] ^= 0x10;
      EXPECT_NE(c, checksum64(q.data(), n)) << n;
    }
    EXPECT_NE(c, checksum64(p.data(), n + 1)) << n;
    // The streaming form over chunks equals the one-shot form.
    StreamingChecksum s;
    for (size_t at = 0; at < n; at += 4096) s.update(p.data() + at, std::min<size_t>(4096, n - at));
    EXPECT_EQ(s.digest(), c) << n;
  }
  std::vector<uint64_t> w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  const uint64_t c = checksum64(w.data(), w.size() * 8);
  std::swap(w[0], w[4]);
  EXPECT_NE(c, checksum64(w.data(), w.size() * 8)) << "position matters";
}

TEST(Metadata, MergeFollowsTheSchema) {
  MetaSchema s;
  s.fields = {Merge::kSum, Merge::kMin, Merge::kMax, Merge::kFirst, Merge::kLast};
  s.record_width = 2;
  s.max_records = 3;
  Metadata a({1, 5, 5, 10, 10});
  a.records = {1, 2};
  Metadata b({2, 3, 9, 20, 20});
  b.records = {3, 4, 5, 6};
  ASSERT_TRUE(conforms(a, s));
  ASSERT_TRUE(conforms(b, s));
  merge(a, b, s);
  EXPECT_EQ(a.fields, (std::vector<int64_t>{3, 3, 9, 10, 20}));
  EXPECT_EQ(a.records, (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));
  EXPECT_FALSE(a.records_overflowed);
  merge(a, b, s);  // 5 records > 3
  EXPECT_TRUE(a.records.empty());
  EXPECT_TRUE(a.records_overflowed);
  EXPECT_TRUE(conforms(a, s));
  Metadata c({1, 1, 1, 1, 1});
  c.records = {7, 8};
  merge(c, a, s);  // an overflowed part overflows the merge
  EXPECT_TRUE(c.records_overflowed);
  EXPECT_EQ(c.fields, (std::vector<int64_t>{6, 1, 9, 1, 20}));
  EXPECT_FALSE(conforms(Metadata({1, 2}), s));
  Metadata odd({1, 2, 3, 4, 5});
  odd.records = {1, 2, 3};
  EXPECT_FALSE(conforms(odd, s)) << "half a record";
  EXPECT_EQ(s.describe(), "sum,min,max,first,last/3x2");
}

}  // namespace
}  // namespace torch_asgd
