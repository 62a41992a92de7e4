#include <gtest/gtest.h>

#include <cstring>

#include <gloo/context.h>
#include <gloo/transport/unbound_buffer.h>
#include <torch/torch.h>

#include "testing.h"
#include "torch_asgd/comm/error.h"

namespace torch_asgd {
namespace {

using namespace std::chrono_literals;
using testing::eventually;
using testing::spawn;
using testing::spawn_collect;

// A payload that says who sent it to whom, and which message it is.
at::Tensor payload_for(int from, int to, int index, int64_t numel, c10::ScalarType dtype) {
  auto t = torch::arange(numel, torch::kLong).remainder(97) + 1000 * from + 100 * to + index;
  return t.to(dtype);
}

// Receives until `count` messages arrived or the deadline passes.
std::vector<Message> receive(Channel& ch, size_t count) {
  std::vector<Message> got;
  auto deadline = std::chrono::steady_clock::now() + 30s;
  while (got.size() < count && std::chrono::steady_clock::now() < deadline) {
    for (auto& m : ch.wait(100ms)) got.push_back(std::move(m));
  }
  return got;
}

struct Shape {
  int64_t numel;
  c10::ScalarType dtype;
};

// World size, and sends in flight per peer.
class AllToAll : public ::testing::TestWithParam<std::tuple<int, size_t>> {};

TEST_P(AllToAll, OrderedMessagesOfEverySizeArriveIntactAndInOrder) {
  const int n = std::get<0>(GetParam());
  const std::vector<Shape> shapes = {
      {0, at::kFloat}, {1, at::kByte}, {4099, at::kByte}, {1001, at::kFloat}, {3, at::kDouble}};
  spawn(n, [&](std::shared_ptr<World> world) {
    ChannelOptions opts;
    opts.name = "all-to-all";
    opts.capacity_bytes = 64 * 1024;
    opts.max_in_flight = std::get<1>(GetParam());
    auto ch = world->open_channel(opts);
    const int me = world->rank();
    for (int i = 0; i < static_cast<int>(shapes.size()); ++i) {
      for (int p = 0; p < n; ++p) {
        if (p == me) continue;
        Outgoing m;
        m.payload = payload_for(me, p, i, shapes[i].numel, shapes[i].dtype);
        m.sender_step = i;
        ch->send(p, m);
      }
    }
    auto got = receive(*ch, shapes.size() * (n - 1));
    ASSERT_EQ(got.size(), shapes.size() * (n - 1));
    std::vector<int> next(n, 0);
    for (const auto& m : got) {
      const int from = m.sender();
      const int i = next[from]++;
      ASSERT_LT(i, static_cast<int>(shapes.size()));
      EXPECT_EQ(m.header.sender_step, i) << "messages from one sender arrive in order";
      EXPECT_EQ(m.payload.scalar_type(), shapes[i].dtype);
      EXPECT_TRUE(m.payload.equal(payload_for(from, me, i, shapes[i].numel, shapes[i].dtype)))
          << "from " << from << " message " << i;
    }
    EXPECT_TRUE(ch->close(20s));
    for (const auto& c : ch->counters()) {
      EXPECT_EQ(c.sent_messages, shapes.size() + 1);  // and the goodbye
      EXPECT_EQ(c.received_messages, shapes.size() + 1);
      EXPECT_EQ(c.rejected, 0u);
      EXPECT_TRUE(c.closed);
      EXPECT_FALSE(c.failed);
    }
  });
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, AllToAll,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4, 5),
                                            ::testing::Values(size_t{1}, size_t{3})));

TEST(Channel, TensOfMegabytesArriveIntact) {
  const int64_t numel = 10 * 1000 * 1000 + 3;  // 40 MB of floats, odd count
  spawn(2, [&](std::shared_ptr<World> world) {
    ChannelOptions opts;
    opts.name = "big";
    opts.capacity_bytes = numel * 4;
    auto ch = world->open_channel(opts);
    // The same pseudo-random pattern on both ranks (threads share torch's generator).
    auto expected = (torch::arange(numel, torch::kLong) * static_cast<int64_t>(2654435761))
                        .remainder(1000003)
                        .to(torch::kFloat)
                        .div_(7.0);
    if (world->rank() == 1) {
      Outgoing m;
      m.kind = MessageKind::kModel;
      m.payload = expected;
      ch->send(0, m);
      EXPECT_TRUE(ch->flush(30s));
    } else {
      auto got = receive(*ch, 1);
      ASSERT_EQ(got.size(), 1u);
      EXPECT_EQ(got[0].header.kind, MessageKind::kModel);
      EXPECT_TRUE(got[0].payload.equal(expected));
    }
    EXPECT_TRUE(ch->close(20s));
  });
}

TEST(Channel, AdditiveMessagesCoalesceWithoutLoss) {
  // Two senders each send 300 additive deltas to rank 0, which does not look until
  // everything has arrived: whatever was merged on either side, the sums, the update
  // counts and the version statistics must come out exact.
  const int kSends = 300;
  const int64_t numel = 5000;
  spawn(3, [&](std::shared_ptr<World> world) {
    ChannelOptions opts;
    opts.name = "deltas";
    opts.capacity_bytes = numel * 4;
    auto ch = world->open_channel(opts);
    const int me = world->rank();
    if (me != 0) {
      for (int i = 0; i < kSends; ++i) {
        Outgoing m;
        m.kind = MessageKind::kDelta;
        m.delivery = Delivery::kAdditive;
        m.payload = torch::full({numel}, static_cast<float>(me * (i % 7 + 1)));
        m.sender_step = i;
        m.model_version = 2 * i + 10;
        m.updates.add(2 * i + 5);
        ch->send(0, m);
      }
      EXPECT_TRUE(ch->close(20s));
      auto c = ch->counters(0);
      EXPECT_EQ(c.sent_messages - 1 + c.coalesced, static_cast<uint64_t>(kSends))
          << "every send is either transmitted or merged";
    } else {
      EXPECT_TRUE(ch->close(20s));
      auto got = ch->poll();
      // Nothing was polled before: the inbox merged each sender's deltas into one.
      ASSERT_EQ(got.size(), 2u);
      for (const auto& m : got) {
        const int from = m.sender();
        float expected = 0;
        int64_t version_sum = 0;
        for (int i = 0; i < kSends; ++i) {
          expected += static_cast<float>(from * (i % 7 + 1));
          version_sum += 2 * i + 5;
        }
        EXPECT_TRUE(m.payload.equal(torch::full({numel}, expected))) << "from " << from;
        EXPECT_EQ(m.header.updates.count, kSends);
        EXPECT_EQ(m.header.updates.version_sum, version_sum);
        EXPECT_EQ(m.header.updates.version_min, 5);
        EXPECT_EQ(m.header.sender_step, kSends - 1);
        EXPECT_EQ(m.header.model_version, 2 * (kSends - 1) + 10);
        auto c = ch->counters(from);
        EXPECT_EQ(c.received_messages - 1, c.coalesced_received + 1)
            << "all arrivals but the first were merged into it";
      }
    }
  });
}

TEST(Channel, ReplaceKeepsOnlyTheNewest) {
  spawn(2, [&](std::shared_ptr<World> world) {
    ChannelOptions opts;
    opts.name = "models";
    opts.capacity_bytes = 4000 * 8;
    auto ch = world->open_channel(opts);
    if (world->rank() == 1) {
      for (int i = 0; i < 200; ++i) {
        Outgoing m;
        m.kind = MessageKind::kModel;
        m.delivery = Delivery::kReplace;
        m.payload = torch::full({4000}, static_cast<double>(i), torch::kDouble);
        m.model_version = i;
        ch->send(0, m);
      }
    }
    EXPECT_TRUE(ch->close(20s));
    if (world->rank() == 0) {
      auto got = ch->poll();
      ASSERT_EQ(got.size(), 1u);
      EXPECT_EQ(got[0].header.model_version, 199);
      EXPECT_TRUE(got[0].payload.equal(torch::full({4000}, 199.0, torch::kDouble)));
    }
  });
}

TEST(Channel, SendChecksItsArguments) {
  spawn(2, [&](std::shared_ptr<World> world) {
    ChannelOptions opts;
    opts.name = "checks";
    opts.capacity_bytes = 400;
    auto ch = world->open_channel(opts);
    Outgoing m;
    m.payload = torch::zeros({101});
    EXPECT_THROW(ch->send(1 - world->rank(), m), ConfigError);  // 404 bytes > 400
    m.payload = torch::zeros({10});
    EXPECT_THROW(ch->send(world->rank(), m), ConfigError);
    EXPECT_THROW(ch->send(2, m), ConfigError);
    m.payload = torch::zeros({2}, torch::kComplexFloat);
    EXPECT_THROW(ch->send(1 - world->rank(), m), ConfigError);
    m.payload = torch::zeros({2});
    m.updates.add(5);  // an update newer than the model it is sent with
    m.model_version = 4;
    EXPECT_THROW(ch->send(1 - world->rank(), m), ConfigError);
    EXPECT_TRUE(ch->close(20s));
    m.payload = torch::zeros({10});
    EXPECT_THROW(ch->send(1 - world->rank(), m), ConfigError);  // after close
  });
}

TEST(Channel, WorldOfOneHasNoPeers) {
  spawn(1, [&](std::shared_ptr<World> world) {
    auto ch = world->open_channel(ChannelOptions());
    Outgoing m;
    m.payload = torch::ones({3});
    ch->broadcast(m);
    EXPECT_TRUE(ch->poll().empty());
    EXPECT_TRUE(ch->counters().empty());
    EXPECT_TRUE(ch->close(1s));
  });
}

TEST(Channel, MismatchedFingerprintsFailOnEveryRank) {
  auto errors = spawn_collect(3, [](std::shared_ptr<World> world) {
    Fingerprint fp;
    fp.add("conv1.weight", {10, 1, 5, 5}, c10::kFloat);
    fp.add("fc1.weight", {50, world->rank() == 2 ? 321 : 320}, c10::kFloat);
    world->open_channel(ChannelOptions(), fp);
  });
  for (int r = 0; r < 3; ++r) {
    EXPECT_NE(errors[r].find("'fc1.weight' has shape"), std::string::npos) << r << ": " << errors[r];
    EXPECT_NE(errors[r].find("rank " + std::to_string(r)), std::string::npos) << errors[r];
  }
  auto capacity = spawn_collect(2, [](std::shared_ptr<World> world) {
    ChannelOptions o;
    o.capacity_bytes = world->rank() == 0 ? 100 : 200;
    world->open_channel(o);
  });
  for (const auto& e : capacity) {
    EXPECT_NE(e.find("capacity_bytes is"), std::string::npos) << e;
  }
}

// Sends raw bytes to a peer on a channel's Gloo slot, as a broken or hostile peer would.
void send_raw(World& world, int peer, uint64_t slot, std::vector<uint8_t> bytes) {
  auto buf = world.gloo_context()->createUnboundBuffer(bytes.data(), bytes.size());
  buf->send(peer, slot, 0, bytes.size());
  buf->waitSend(std::chrono::seconds(20));
}

TEST(Channel, MalformedMessagesAreRejectedCountedAndNeverDelivered) {
  const uint64_t kSlot = uint64_t{1} << 48;  // the first channel of a world
  spawn(2, [&](std::shared_ptr<World> world) {
    ChannelOptions opts;
    opts.name = "hostile";
    opts.capacity_bytes = 1024;
    opts.verify_payload = true;  // to see corrupted payloads rejected too
    auto ch = world->open_channel(opts);
    // A well-formed frame from rank 1, to mutate.
    MessageHeader h;
    h.kind = MessageKind::kDelta;
    h.dtype = c10::ScalarType::Float;
    h.sender = 1;
    h.sequence = 1000;  // far ahead of the channel's own numbering
    h.payload_bytes = 400;
    std::vector<uint8_t> payload(400, 7);
    h.payload_checksum = payload_checksum(payload.data(), payload.size());
    auto frame = [&](const MessageHeader& hh, size_t payload_bytes) {
      std::vector<uint8_t> b(kHeaderBytes + payload_bytes + kTrailerBytes);
      encode_header(hh, b.data());
      std::memcpy(b.data() + kHeaderBytes, payload.data(), std::min(payload_bytes, payload.size()));
      uint64_t trailer = trailer_for(hh);
      std::memcpy(b.data() + kHeaderBytes + payload_bytes, &trailer, kTrailerBytes);
      return b;
    };
    // The token is the channel's, which a hostile peer in the job can read off any
    // message; take it from a real one.
    if (world->rank() == 1) {
      Outgoing first;
      first.payload = torch::ones({4});
      ch->send(0, first);  // sequence 1
      ASSERT_TRUE(ch->flush(20s));
    } else {
      auto got = receive(*ch, 1);
      ASSERT_EQ(got.size(), 1u);
      world->store().set("token", std::vector<uint8_t>(8, 0));
      std::vector<uint8_t> tok(8);
      uint64_t t = got[0].header.token;
      std::memcpy(tok.data(), &t, 8);
      world->store().set("token", tok);
    }
    world->barrier("token");
    auto tok = world->store().get("token");
    std::memcpy(&h.token, tok.data(), 8);

    if (world->rank() == 1) {
      std::vector<std::vector<uint8_t>> bad;
      bad.push_back(std::vector<uint8_t>(300, 0xAB));  // garbage
      auto b = frame(h, 400);
      b[20] ^= 1;  // header bit flip
      bad.push_back(b);
      MessageHeader huge = h;
      huge.payload_bytes = uint64_t{1} << 40;  // claims a terabyte
      bad.push_back(frame(huge, 0));
      MessageHeader liar = h;
      liar.sender = 0;  // claims to be the receiver
      bad.push_back(frame(liar, 400));
      auto cut = frame(h, 400);
      cut.resize(kHeaderBytes + 100);  // truncated: the header says 400 bytes
      bad.push_back(cut);
      auto flipped = frame(h, 400);
      flipped[kHeaderBytes + 10] ^= 4;  // corrupted payload
      bad.push_back(flipped);
      MessageHeader replay = h;
      replay.sequence = 1;  // already seen
      bad.push_back(frame(replay, 400));
      MessageHeader other = h;
      other.token ^= 1;  // another job or channel
      bad.push_back(frame(other, 400));
      for (auto& f : bad) send_raw(*world, 0, kSlot, f);
      // Then a good message through the channel itself.
      Outgoing good;
      good.payload = torch::full({4}, 5.0f);
      ch->send(0, good);
      ASSERT_TRUE(ch->flush(20s));
    } else {
      auto got = receive(*ch, 1);
      ASSERT_EQ(got.size(), 1u);
      EXPECT_TRUE(got[0].payload.equal(torch::full({4}, 5.0f)));
      EXPECT_TRUE(ch->poll().empty());
      auto c = ch->counters(1);
      EXPECT_EQ(c.rejected, 8u);
      EXPECT_EQ(c.last_reject, to_string(Reject::kWrongToken));
    }
    world->barrier("done");
    ch->close(20s);
  });
}

TEST(Channel, NonFiniteUpdatesAreRejectedAndCounted) {
  for (NonFinite policy : {NonFinite::kReject, NonFinite::kFatal, NonFinite::kAccept}) {
    spawn(2, [&](std::shared_ptr<World> world) {
      ChannelOptions opts;
      opts.name = "finite";
      opts.capacity_bytes = 64;
      opts.on_non_finite = policy;
      auto ch = world->open_channel(opts);
      if (world->rank() == 1) {
        Outgoing m;
        m.payload = torch::tensor({1.0f, std::numeric_limits<float>::quiet_NaN(), 2.0f});
        ch->send(0, m);
        m.payload = torch::tensor({1.0, std::numeric_limits<double>::infinity()});
        ch->send(0, m);
        m.payload = torch::tensor({3.0f, 4.0f});
        ch->send(0, m);
        m.payload = torch::tensor({255, 0}, torch::kByte);  // bytes are never checked
        ch->send(0, m);
        EXPECT_TRUE(ch->flush(20s));
      } else {
        EXPECT_TRUE(eventually([&] {
          auto c = ch->counters(1);
          return c.received_messages + c.rejected == 4;  // rejected ones are not "received"
        }));
        if (policy == NonFinite::kFatal) {
          try {
            ch->poll();
            ADD_FAILURE() << "expected CommError";
          } catch (const CommError& e) {
            EXPECT_NE(std::string(e.what()).find("rank 0: channel 'finite': rank 1 sent non-finite "
                                                 "values (NaN/Inf)"),
                      std::string::npos)
                << e.what();
          }
        } else {
          auto got = receive(*ch, policy == NonFinite::kAccept ? 4 : 2);
          ASSERT_EQ(got.size(), policy == NonFinite::kAccept ? 4u : 2u);
          if (policy == NonFinite::kReject) {
            EXPECT_TRUE(got[0].payload.equal(torch::tensor({3.0f, 4.0f})));
            EXPECT_EQ(ch->counters(1).rejected, 2u);
            EXPECT_EQ(ch->counters(1).last_reject, to_string(Reject::kNonFinite));
          }
        }
      }
      world->barrier("done");
      if (policy == NonFinite::kFatal && world->rank() == 0) {
        EXPECT_THROW(ch->close(20s), CommError);  // the goodbye still goes out first
      } else {
        EXPECT_TRUE(ch->close(20s));
      }
    });
  }
}

TEST(Channel, PeerFailureIsRethrownOnTheTrainingThread) {
  spawn(2, [&](std::shared_ptr<World> world) {
    auto ch = world->open_channel(ChannelOptions());
    world->barrier("opened");
    if (world->rank() == 1) {
      ch.reset();  // abort without goodbye...
      world.reset();  // ...and drop the connections, as a crashed process would
      return;
    }
    std::string error;
    EXPECT_TRUE(eventually([&] {
      try {
        ch->poll();
      } catch (const CommError& e) {
        error = e.what();
        return true;
      }
      return false;
    }));
    EXPECT_NE(error.find("rank 0: channel 'default': connection to rank 1 failed"),
              std::string::npos)
        << error;
    EXPECT_THROW(ch->send(1, Outgoing()), CommError);  // stays failed
  });
}

TEST(Channel, PeerFailureCanBeTolerated) {
  spawn(3, [&](std::shared_ptr<World> world) {
    ChannelOptions opts;
    opts.on_peer_failure = PeerFailure::kContinue;
    auto ch = world->open_channel(opts);
    world->barrier("opened");
    if (world->rank() == 2) {
      ch.reset();
      world.reset();
      return;
    }
    EXPECT_TRUE(eventually([&] { return ch->counters(2).failed; }));
    EXPECT_EQ(ch->live_peers(), std::vector<int>{1 - world->rank()});
    Outgoing m;
    m.payload = torch::ones({2});
    ch->send(2, m);  // dropped, counted
    EXPECT_EQ(ch->counters(2).dropped, 1u);
    ch->send(1 - world->rank(), m);
    EXPECT_EQ(receive(*ch, 1).size(), 1u);
    EXPECT_TRUE(ch->close(20s));
  });
}

TEST(Channel, ACriticalPeersFailureIsThrownEvenWhenOthersAreTolerated) {
  // As an AsGrad worker sees it: rank 1 tolerates rank 2 (a fellow worker) but not
  // rank 0 (its server).
  spawn(3, [&](std::shared_ptr<World> world) {
    ChannelOptions opts;
    opts.on_peer_failure = PeerFailure::kContinue;
    if (world->rank() == 1) opts.critical_peers = {0};
    auto ch = world->open_channel(opts);
    world->barrier("opened");
    if (world->rank() == 2) {
      ch.reset();
      world.reset();
      return;
    }
    EXPECT_TRUE(eventually([&] { return ch->counters(2).failed; }));
    EXPECT_NO_THROW(ch->poll()) << "rank 2 is not critical";
    if (world->rank() == 1) world->store().set("rank 1 saw rank 2 go", std::vector<uint8_t>{1});
    if (world->rank() == 0) {
      world->store().wait({"rank 1 saw rank 2 go"});
      ch.reset();
      world.reset();
      return;
    }
    EXPECT_TRUE(eventually([&] { return ch->counters(0).failed; }));
    EXPECT_THROW(ch->poll(), CommError);
  });
}

}  // namespace
}  // namespace torch_asgd
