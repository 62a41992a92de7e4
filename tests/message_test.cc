#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "torch_asgd/comm/message.h"

namespace torch_asgd {
namespace {

MessageHeader sample() {
  MessageHeader h;
  h.kind = MessageKind::kDelta;
  h.delivery = Delivery::kAdditive;
  h.dtype = c10::ScalarType::Float;
  h.sender = 2;
  h.sequence = 17;
  h.token = 0xABCDEF;
  h.sender_step = 100;
  h.model_version = 250;
  h.payload_bytes = 4000;
  h.updates.add(240);
  h.updates.add(245);
  h.payload_checksum = 0x12345678;
  return h;
}

DecodeLimits limits() {
  DecodeLimits l;
  l.world_size = 4;
  l.expected_sender = 2;
  l.receiver = 0;
  l.max_payload_bytes = 4096;
  l.token = 0xABCDEF;
  return l;
}

std::vector<uint8_t> encoded(const MessageHeader& h) {
  std::vector<uint8_t> b(kHeaderBytes);
  encode_header(h, b.data());
  return b;
}

// Changes one field's bytes and re-seals the header CRC, so that the field's own
// check (not the checksum) must catch it.
std::vector<uint8_t> resealed(std::vector<uint8_t> b, size_t offset, const void* v, size_t n) {
  std::memcpy(b.data() + offset, v, n);
  uint32_t c = crc32(b.data(), kHeaderBytes - 4);
  std::memcpy(b.data() + kHeaderBytes - 4, &c, 4);
  return b;
}

Reject decode(const std::vector<uint8_t>& b, DecodeLimits l = limits()) {
  MessageHeader out;
  return decode_header(b.data(), b.size(), l, &out);
}

TEST(Message, RoundTrip) {
  auto b = encoded(sample());
  MessageHeader out;
  ASSERT_EQ(decode_header(b.data(), b.size(), limits(), &out), Reject::kNone);
  MessageHeader in = sample();
  EXPECT_EQ(out.kind, in.kind);
  EXPECT_EQ(out.delivery, in.delivery);
  EXPECT_EQ(out.dtype, in.dtype);
  EXPECT_EQ(out.sender, in.sender);
  EXPECT_EQ(out.sequence, in.sequence);
  EXPECT_EQ(out.token, in.token);
  EXPECT_EQ(out.sender_step, in.sender_step);
  EXPECT_EQ(out.model_version, in.model_version);
  EXPECT_EQ(out.payload_bytes, in.payload_bytes);
  EXPECT_EQ(out.updates.count, 2);
  EXPECT_EQ(out.updates.version_sum, 485);
  EXPECT_EQ(out.updates.version_min, 240);
  EXPECT_EQ(out.payload_checksum, in.payload_checksum);
}

TEST(Message, RejectsEachBadField) {
  auto good = encoded(sample());
  EXPECT_EQ(decode(std::vector<uint8_t>(good.begin(), good.begin() + 100)), Reject::kBadMagic);
  uint32_t magic = 0xDEADBEEF;
  EXPECT_EQ(decode(resealed(good, 0, &magic, 4)), Reject::kBadMagic);
  uint16_t version = kProtocolVersion + 1;
  EXPECT_EQ(decode(resealed(good, 4, &version, 2)), Reject::kBadVersion);
  uint8_t reserved = 1;
  EXPECT_EQ(decode(resealed(good, 100, &reserved, 1)), Reject::kBadVersion);
  uint8_t kind = 0;
  EXPECT_EQ(decode(resealed(good, 6, &kind, 1)), Reject::kBadKind);
  kind = kMaxMessageKind + 1;
  EXPECT_EQ(decode(resealed(good, 6, &kind, 1)), Reject::kBadKind);
  uint8_t delivery = 3;
  EXPECT_EQ(decode(resealed(good, 7, &delivery, 1)), Reject::kBadDelivery);
  uint8_t dtype = 200;
  EXPECT_EQ(decode(resealed(good, 12, &dtype, 1)), Reject::kBadDtype);
  dtype = static_cast<uint8_t>(c10::ScalarType::ComplexFloat);
  EXPECT_EQ(decode(resealed(good, 12, &dtype, 1)), Reject::kBadDtype);
  for (int32_t sender : {-1, 0, 3, 4, 1000}) {
    EXPECT_EQ(decode(resealed(good, 8, &sender, 4)), Reject::kWrongSender) << sender;
  }
  uint64_t huge = uint64_t{1} << 40;
  EXPECT_EQ(decode(resealed(good, 48, &huge, 8)), Reject::kOversized);
  uint64_t odd = 4001;
  EXPECT_EQ(decode(resealed(good, 48, &odd, 8)), Reject::kMisaligned);
  int64_t negative = -5;
  EXPECT_EQ(decode(resealed(good, 56, &negative, 8)), Reject::kBadUpdateStats);
  int64_t future = 251;  // an update computed at a version the sender does not have yet
  EXPECT_EQ(decode(resealed(good, 72, &future, 8)), Reject::kBadUpdateStats);
  uint64_t other_job = 99;
  EXPECT_EQ(decode(resealed(good, 24, &other_job, 8)), Reject::kWrongToken);
}

TEST(Message, HeaderChecksumCatchesEveryFlippedBit) {
  auto good = encoded(sample());
  for (size_t bit = 0; bit < (kHeaderBytes - 4) * 8; ++bit) {
    auto b = good;
    b[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
    Reject r = decode(b);
    EXPECT_NE(r, Reject::kNone) << "bit " << bit;
  }
}

TEST(Message, RandomBytesAreNeverAccepted) {
  std::mt19937 rng(7);
  std::vector<uint8_t> b(kHeaderBytes);
  for (int i = 0; i < 20000; ++i) {
    for (auto& x : b) x = static_cast<uint8_t>(rng());
    if (i % 2 == 0) std::memcpy(b.data(), &kMessageMagic, 4);
    EXPECT_NE(decode(b), Reject::kNone);
  }
}

TEST(Message, PayloadChecksumCatchesTruncationAndChanges) {
  for (size_t n : {0, 1, 7, 8, 9, 31, 32, 33, 1000, 4097}) {
    std::vector<uint8_t> p(n + 8);
    for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<uint8_t>(i * 31 + 7);
    uint32_t c = payload_checksum(p.data(), n);
    EXPECT_EQ(c, payload_checksum(p.data(), n));
    if (n > 0) {
      EXPECT_NE(c, payload_checksum(p.data(), n - 1)) << n;
      auto q = p;
      q[n / 2] ^= 0x10;
      EXPECT_NE(c, payload_checksum(q.data(), n)) << n;
    }
    EXPECT_NE(c, payload_checksum(p.data(), n + 1)) << n;
  }
  // Swapping two 8-byte words changes a position-dependent checksum.
  std::vector<uint64_t> w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  uint32_t c = payload_checksum(w.data(), w.size() * 8);
  std::swap(w[0], w[4]);
  EXPECT_NE(c, payload_checksum(w.data(), w.size() * 8));
}

TEST(Message, UpdateStatsMerge) {
  UpdateStats a, b;
  a.add(5);
  a.add(9);
  b.add(3);
  a.merge(b);
  EXPECT_EQ(a.count, 3);
  EXPECT_EQ(a.version_sum, 17);
  EXPECT_EQ(a.version_min, 3);
}

}  // namespace
}  // namespace torch_asgd
