#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <thread>

#include <torch/torch.h>

#include "testing.h"
#include "torch_asgd/comm/detail/channel_core.h"
#include "torch_asgd/comm/detail/mesh.h"
#include "torch_asgd/comm/detail/sender.h"
#include "torch_asgd/comm/detail/watcher.h"
#include "torch_asgd/comm/error.h"

namespace torch_asgd {

// Tests: a receiver thread that takes nothing, as a stalled process's would.
struct ChannelTestAccess {
  static void hold_receiver(Channel& ch, bool hold) { ch.core_->hold_receiver = hold; }
  // The sender thread throws when it next wakes.
  static void fail_sender_thread(Channel& ch) { ch.core_->fail_sender_thread = true; }
  // The receiver thread throws once its next frame has arrived.
  static void fail_receiver_thread(Channel& ch) { ch.core_->fail_receiver_thread = true; }
  // The watcher thread throws something that is not a std::exception, at once.
  static void fail_watcher_thread(Channel& ch) {
    ch.core_->fail_watcher_thread = true;
    ch.watcher_->poke();
  }
  // The sender posts no acknowledgement frame while held; released, it posts those owed.
  static void hold_acks(Channel& ch, bool hold) {
    ch.core_->hold_acks = hold;
    if (!hold) ch.sender_->wake();
  }
  // Idle payload buffers of ordered and replace messages, on either side.
  static size_t idle_send_buffers(Channel& ch) { return ch.core_->send_buffers.idle_count(); }
  static size_t idle_recv_buffers(Channel& ch) { return ch.core_->recv_buffers.idle_count(); }
};

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

// Receives ordered/replace messages until `count` arrived or the deadline passes.
std::vector<Message> receive(Channel& ch, size_t count) {
  std::vector<Message> got;
  auto deadline = std::chrono::steady_clock::now() + 30s;
  while (got.size() < count && std::chrono::steady_clock::now() < deadline) {
    for (auto& m : ch.wait(100ms).messages) got.push_back(std::move(m));
  }
  return got;
}

// Additive arrivals added up: their sums, the updates their parts count, whether any
// was tainted. A receiver may hand out parts of one message in several polls.
struct Summed {
  explicit Summed(int64_t numel) : total(torch::zeros({numel})) {}
  at::Tensor total;
  int64_t updates = 0;
  bool tainted = false;
  int arrivals = 0;
  void add(const Arrivals& got) {
    for (const auto& a : got.additive) {
      total += a.sum;
      for (const auto& part : a.parts) updates += part.second.field(0);
      tainted = tainted || a.tainted;
      ++arrivals;
    }
  }
};

struct Shape {
  int64_t numel;
  c10::ScalarType dtype;
};

// World size, and sends in flight per peer. Chunks of 4 KB: the larger payloads travel
// in several.
class AllToAll : public ::testing::TestWithParam<std::tuple<int, size_t>> {};

TEST_P(AllToAll, OrderedMessagesOfEverySizeArriveIntactAndInOrder) {
  const int n = std::get<0>(GetParam());
  const std::vector<Shape> shapes = {{0, at::kFloat},    {1, at::kByte},     {4099, at::kByte},
                                     {1001, at::kFloat}, {3, at::kDouble},   {40000, at::kFloat},
                                     {1024, at::kFloat}, {4096 - 80, at::kByte}};
  spawn(n, [&](std::shared_ptr<World> world) {
    ChannelOptions opts;
    opts.name = "all-to-all";
    opts.capacity_bytes = 256 * 1024;
    opts.chunk_bytes = 4096;
    opts.max_meta_bytes = 1024;
    opts.inline_bytes = 512;
    opts.max_in_flight = std::get<1>(GetParam());
    auto ch = world->open_channel(opts);
    EXPECT_EQ(ch->threads(), 3) << "threads do not grow with the peers";
    const int me = world->rank();
    for (int i = 0; i < static_cast<int>(shapes.size()); ++i) {
      for (int p = 0; p < n; ++p) {
        if (p == me) continue;
        Outgoing m;
        m.payload = payload_for(me, p, i, shapes[i].numel, shapes[i].dtype);
        m.meta = Metadata({i, 7 * me + p, -i});
        ch->send(p, m);
      }
    }
    auto got = receive(*ch, shapes.size() * (n - 1));
    ASSERT_EQ(got.size(), shapes.size() * (n - 1));
    std::vector<int> next(n, 0);
    for (const auto& m : got) {
      const int from = m.sender;
      const int i = next[from]++;
      ASSERT_LT(i, static_cast<int>(shapes.size()));
      EXPECT_EQ(m.meta, Metadata({i, 7 * from + me, -i})) << "messages from one sender arrive in order";
      EXPECT_EQ(m.payload.scalar_type(), shapes[i].dtype);
      EXPECT_TRUE(m.payload.equal(payload_for(from, me, i, shapes[i].numel, shapes[i].dtype)))
          << "from " << from << " message " << i;
    }
    EXPECT_TRUE(ch->close(20s));
    for (const auto& c : ch->counters()) {
      EXPECT_EQ(c.sent_messages, shapes.size() + 1);  // and the goodbye
      EXPECT_EQ(c.received_messages, shapes.size() + 1);
      EXPECT_EQ(c.rejected, 0u);
      EXPECT_EQ(c.queued, 0u);
      EXPECT_TRUE(c.closed);
      EXPECT_FALSE(c.failed);
    }
  });
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, AllToAll,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4, 5),
                                            ::testing::Values(size_t{1}, size_t{3})));

TEST(Channel, TensOfMegabytesArriveIntact) {
  const int64_t numel = 10 * 1000 * 1000 + 3;  // 40 MB of floats, odd count: 10 chunks
  spawn(2, [&](std::shared_ptr<World> world) {
    ChannelOptions opts;
    opts.name = "big";
    opts.capacity_bytes = numel * 4;
    auto ch = world->open_channel(opts);
    auto expected = (torch::arange(numel, torch::kLong) * static_cast<int64_t>(2654435761))
                        .remainder(1000003)
                        .to(torch::kFloat)
                        .div_(7.0);
    if (world->rank() == 1) {
      Outgoing m;
      m.payload = expected;
      ch->send(0, m);
      EXPECT_TRUE(ch->flush(30s));
    } else {
      auto got = receive(*ch, 1);
      ASSERT_EQ(got.size(), 1u);
      EXPECT_TRUE(got[0].payload.equal(expected));
    }
    EXPECT_TRUE(ch->close(20s));
  });
}

// The metadata of the additive test stream: how many updates, the sum and minimum of a
// version, the newest step. Records: one per update, while there are at most 4.
MetaSchema delta_schema() {
  MetaSchema s;
  s.fields = {Merge::kSum, Merge::kSum, Merge::kMin, Merge::kMax};
  s.record_width = 1;
  s.max_records = 4;
  return s;
}

ChannelOptions additive_options(const std::string& name, int64_t numel) {
  ChannelOptions o;
  o.name = name;
  o.additive = {AdditiveStream{0, c10::kFloat, numel, delta_schema()}};
  return o;
}

// Broadcast number i of the lagging-peer tests: every element i % 5 + 1.
void broadcast_numbered(Channel& ch, int64_t numel, int i) {
  Outgoing m;
  m.delivery = Delivery::kAdditive;
  m.payload = torch::full({numel}, static_cast<float>(i % 5 + 1));
  m.meta = Metadata({1, i, i, i});
  ch.broadcast(m);
}

// What every element of broadcasts 0 .. count - 1 adds up to.
float numbered_total(int count) {
  float total = 0;
  for (int i = 0; i < count; ++i) total += static_cast<float>(i % 5 + 1);
  return total;
}

// An error the sending, receiving or watching thread did not foresee does not end the
// process (std::terminate) and leaves no wait for the channel's progress running out its
// timeout: the training thread's next call throws it, named, and so do flush() and
// close() at once (their timeouts here are far longer than ctest's). The watcher's throws
// something that is not a std::exception.
class ChannelThreadDies : public ::testing::TestWithParam<std::string> {};

TEST_P(ChannelThreadDies, ItsErrorIsThrownOnTheTrainingThreadNotACrash) {
  const std::string which = GetParam();
  spawn(2, [&](std::shared_ptr<World> world) {
    auto ch = world->open_channel(additive_options("dies", 16));
    world->barrier("open");
    Outgoing m;
    m.delivery = Delivery::kAdditive;
    m.payload = torch::ones({16});
    m.meta = Metadata({1, 0, 0, 0});
    if (world->rank() == 0) {
      if (which == "sending") {
        ChannelTestAccess::fail_sender_thread(*ch);
      } else if (which == "receiving") {
        ChannelTestAccess::fail_receiver_thread(*ch);
      } else {
        ChannelTestAccess::fail_watcher_thread(*ch);
      }
      world->barrier("armed");
      std::string error;
      eventually([&] {
        try {
          if (which == "sending") ch->broadcast(m);
          ch->poll();
        } catch (const CommError& e) {
          error = e.what();
        }
        return !error.empty();
      }, 30s);
      const std::string why = which == "watching" ? "an exception that is not a std::exception"
                                                  : "a test made it throw";
      EXPECT_NE(error.find("rank 0: channel 'dies': the " + which + " thread stopped: " + why),
                std::string::npos)
          << error;
      EXPECT_THROW(ch->flush(1000s), CommError);
      EXPECT_THROW(ch->close(1000s), CommError);
    } else {
      world->barrier("armed");
      if (which == "receiving") ch->broadcast(m);  // a frame for rank 0's receiver
    }
    world->barrier("checked");
  });
}

INSTANTIATE_TEST_SUITE_P(Channel, ChannelThreadDies,
                         ::testing::Values("sending", "receiving", "watching"),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

TEST(Channel, AdditiveMessagesCoalesceWithoutLoss) {
  // Two senders each send 300 additive deltas to rank 0, which does not look until
  // everything has arrived: whatever was merged on either side, the sum, the update
  // counts and the version statistics must come out exact.
  const int kSends = 300;
  const int64_t numel = 5000;
  spawn(3, [&](std::shared_ptr<World> world) {
    auto ch = world->open_channel(additive_options("deltas", numel));
    const int me = world->rank();
    if (me != 0) {
      for (int i = 0; i < kSends; ++i) {
        Outgoing m;
        m.delivery = Delivery::kAdditive;
        m.payload = torch::full({numel}, static_cast<float>(me * (i % 7 + 1)));
        m.meta = Metadata({1, 2 * i + 5, 2 * i + 5, i});
        m.meta.records = {i};
        ch->send(0, m);
      }
      EXPECT_TRUE(ch->close(20s));
      auto c = ch->counters(0);
      EXPECT_EQ(c.sent_messages - 1 + c.coalesced, static_cast<uint64_t>(kSends))
          << "every send is either transmitted or merged";
    } else {
      EXPECT_TRUE(ch->close(20s));
      Arrivals got = ch->poll();
      EXPECT_TRUE(got.messages.empty());
      ASSERT_EQ(got.additive.size(), 1u);  // one sum for the stream, whoever sent
      const AdditiveArrival& a = got.additive[0];
      float expected = 0;
      for (int from = 1; from <= 2; ++from) {
        for (int i = 0; i < kSends; ++i) expected += static_cast<float>(from * (i % 7 + 1));
      }
      EXPECT_TRUE(a.sum.equal(torch::full({numel}, expected)));
      // Nothing was polled before: every arrival but the first was merged into it.
      const auto c1 = ch->counters(1), c2 = ch->counters(2);
      EXPECT_EQ(c1.coalesced_received + c2.coalesced_received,
                c1.received_messages - 1 + c2.received_messages - 1 - 1);  // goodbyes aside
      int64_t version_sum = 0;
      for (int i = 0; i < kSends; ++i) version_sum += 2 * i + 5;
      for (int from = 1; from <= 2; ++from) {
        Metadata total;
        bool first = true;
        for (const auto& [sender, meta] : a.parts) {
          if (sender != from) continue;
          if (first) {
            total = meta;
            first = false;
          } else {
            merge(total, meta, delta_schema());
          }
        }
        ASSERT_FALSE(first) << "nothing from rank " << from;
        EXPECT_EQ(total.field(0), kSends);
        EXPECT_EQ(total.field(1), version_sum);
        EXPECT_EQ(total.field(2), 5);
        EXPECT_EQ(total.field(3), kSends - 1);
        EXPECT_TRUE(total.records_overflowed) << "300 records cannot fit in 4";
      }
    }
  });
}

TEST(Channel, ABroadcastIsSummedIntoOneBufferAndPolledOnce) {
  // Four ranks broadcast 50 additive deltas each; every rank must end with exactly the
  // others' sum, in one buffer, with each message's metadata exact while it was
  // delivered on its own.
  const int n = 4, kSends = 50;
  const int64_t numel = 3001;
  spawn(n, [&](std::shared_ptr<World> world) {
    auto ch = world->open_channel(additive_options("bcast", numel));
    const int me = world->rank();
    at::Tensor total = torch::zeros({numel});
    std::vector<int64_t> updates(n, 0);
    auto take = [&](Arrivals got) {
      for (auto& a : got.additive) {
        total += a.sum;
        for (const auto& [from, meta] : a.parts) updates[from] += meta.field(0);
      }
    };
    for (int i = 0; i < kSends; ++i) {
      Outgoing m;
      m.delivery = Delivery::kAdditive;
      m.payload = torch::full({numel}, static_cast<float>(me + 1));
      m.meta = Metadata({1, i, i, i});
      m.meta.records = {i};
      ch->broadcast(m);
      if (i % 7 == 0) take(ch->poll());
    }
    EXPECT_TRUE(ch->close(20s));
    take(ch->poll());
    float expected = 0;
    for (int r = 0; r < n; ++r) {
      if (r != me) {
        expected += static_cast<float>(kSends * (r + 1));
        EXPECT_EQ(updates[r], kSends) << "from rank " << r;
      }
    }
    EXPECT_TRUE(total.equal(torch::full({numel}, expected))) << "rank " << me;
  });
}

TEST(Channel, AStalledPeerLagsAloneAndGetsTheExactSumWhenItWakes) {
  // Rank 1's receiver takes nothing while rank 0 broadcasts 200 deltas to ranks 1 and 2.
  // Rank 0 never waits; what rank 1 cannot take is summed into one pending message for
  // it (rank 1 lags), while rank 2 keeps receiving. When rank 1 wakes it gets the exact
  // sum.
  const int kSends = 200;
  const int64_t numel = 100000;
  spawn(3, [&](std::shared_ptr<World> world) {
    auto ch = world->open_channel(additive_options("stall", numel));
    const int me = world->rank();
    if (me == 1) ChannelTestAccess::hold_receiver(*ch, true);
    world->barrier("held");
    if (me == 0) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < kSends; ++i) {
        broadcast_numbered(*ch, numel, i);
        std::this_thread::sleep_for(1ms);
      }
      RecordProperty("send_seconds",
                     std::to_string(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()));
      EXPECT_TRUE(eventually([&] { return ch->counters(2).queued == 0; }))
          << "rank 2 did not get everything while rank 1 was stalled";
      const auto c1 = ch->counters(1);
      EXPECT_TRUE(c1.lagging);
      EXPECT_GE(c1.coalesced, static_cast<uint64_t>(kSends - 8)) << "rank 1's messages queued";
      EXPECT_LE(c1.queued, 2u) << "one in flight and one pending at most";
      world->store().set("sent", std::vector<uint8_t>{1});
    } else if (me == 1) {
      world->store().wait({"sent"});
      ChannelTestAccess::hold_receiver(*ch, false);
    }
    EXPECT_TRUE(ch->close(30s));
    if (me != 0) {
      Summed got(numel);
      got.add(ch->poll());
      EXPECT_TRUE(got.total.equal(torch::full({numel}, numbered_total(kSends)))) << "rank " << me;
      EXPECT_EQ(got.updates, kSends) << "rank " << me;
    }
  });
}

TEST(Channel, PeersThatLagInStepShareOneCoalescingBuffer) {
  // Ranks 1 and 2 take nothing while rank 0 broadcasts; rank 3 keeps up. The first
  // broadcast is in flight to both, everything after it waits for both: one shared sum,
  // not one per peer (2 model-sized buffers in all, where a buffer per lagging peer would
  // be 3). Then rank 1 wakes and catches up while rank 2 stays stalled, so the group
  // splits; every rank must still end with the exact sum.
  const int kSends = 60;
  const int64_t numel = 100000;
  const uint64_t model = numel * sizeof(float);
  spawn(4, [&](std::shared_ptr<World> world) {
    auto ch = world->open_channel(additive_options("group", numel));
    const int me = world->rank();
    if (me == 1 || me == 2) ChannelTestAccess::hold_receiver(*ch, true);
    world->barrier("held");
    auto send = [&](int i) { broadcast_numbered(*ch, numel, i); };
    if (me == 0) {
      // The first broadcast is handed to the network before the next is made (else, with
      // the sender thread descheduled, all of them coalesce into one first message).
      send(0);
      ASSERT_TRUE(eventually([&] {
        return ch->counters(1).sent_messages == 1 && ch->counters(2).sent_messages == 1 &&
               ch->counters(3).sent_messages == 1;
      }));
      for (int i = 1; i < kSends; ++i) send(i);
      EXPECT_TRUE(eventually([&] { return ch->counters(3).queued == 0; }));
      EXPECT_TRUE(eventually([&] { return ch->counters(1).coalesced + 2 >= kSends; }));
      // (the last broadcasts may still wait to be handed out: then it holds them too)
      EXPECT_TRUE(eventually([&] { return ch->held_bytes() == 2 * model; }))
          << "one buffer in flight and one sum for both, not " << ch->held_bytes() / model;
      // Rank 1's share, once rank 3 has split off (until then the group may still be
      // handing its last sum around).
      EXPECT_TRUE(eventually([&] { return ch->counters(1).held_bytes == 2 * model; }))
          << "rank 1 holds " << ch->counters(1).held_bytes / model << " models";
      world->store().set("wake1", std::vector<uint8_t>{1});
      EXPECT_TRUE(eventually([&] { return ch->counters(1).queued == 0; }));
      for (int i = kSends; i < 2 * kSends; ++i) send(i);
      EXPECT_TRUE(eventually([&] { return ch->counters(1).queued == 0 && ch->counters(3).queued == 0; }));
      // Rank 2: the first message in flight, and one sum of all the rest.
      EXPECT_TRUE(eventually([&] { return ch->held_bytes() == 2 * model; }))
          << ch->held_bytes() / model << " models held";
      world->store().set("wake2", std::vector<uint8_t>{1});
    } else if (me == 1 || me == 2) {
      world->store().wait({me == 1 ? "wake1" : "wake2"});
      ChannelTestAccess::hold_receiver(*ch, false);
    }
    EXPECT_TRUE(ch->close(30s));
    if (me != 0) {
      Summed got(numel);
      got.add(ch->poll());
      EXPECT_TRUE(got.total.equal(torch::full({numel}, numbered_total(2 * kSends)))) << "rank " << me;
      EXPECT_EQ(got.updates, 2 * kSends) << "rank " << me;
    }
  });
}

// A group of lagging peers is posted together: rank 1 keeps up, rank 2 is stalled after
// the first broadcast, and with a long group_hold rank 1 waits for it rather than going on
// alone, so that both keep sharing one buffer (the first broadcast in flight, one sum of
// the rest): rank 1 gets no second message while rank 2 is stalled. Once rank 2 wakes,
// both get the exact sum. (With the default hold, the stalled-peer tests show the group
// splitting instead.)
TEST(Channel, AGroupWaitsForItsSlowestMemberInsteadOfSplitting) {
  const int64_t numel = 1 << 20;  // 4 MB: a transfer of a millisecond or more
  const uint64_t model = numel * sizeof(float);
  const int kSends = 20;
  spawn(3, [&](std::shared_ptr<World> world) {
    ChannelOptions o = additive_options("hold", numel);
    o.group_hold = 1e9;  // in effect: for as long as it takes
    auto ch = world->open_channel(o);
    const int me = world->rank();
    auto send = [&](int i) { broadcast_numbered(*ch, numel, i); };
    Summed got(numel);
    if (me == 0) {
      send(0);
      // The first message is through to both: each acknowledged it.
      EXPECT_TRUE(eventually([&] { return ch->counters(1).queued == 0 && ch->counters(2).queued == 0; }));
      world->barrier("first");  // rank 2 now holds its receiver
      world->barrier("held");
      send(1);  // in flight to both; rank 2 will never acknowledge it while stalled
      EXPECT_TRUE(eventually([&] { return ch->counters(1).queued == 0; }));
      for (int i = 2; i < kSends; ++i) send(i);
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      EXPECT_EQ(ch->counters(1).sent_messages, 2u) << "rank 1 went on without its group";
      // (a broadcast not yet handed out is held apart until it is summed in)
      EXPECT_TRUE(eventually([&] { return ch->held_bytes() == 2 * model; }))
          << "not one buffer in flight and one sum for both: " << ch->held_bytes() / model;
      world->store().set("wake", std::vector<uint8_t>{1});
    } else {
      while (got.arrivals < 1) got.add(ch->wait(std::chrono::milliseconds(100)));
      world->barrier("first");
      if (me == 2) ChannelTestAccess::hold_receiver(*ch, true);
      world->barrier("held");
      if (me == 2) {
        world->store().wait({"wake"});
        ChannelTestAccess::hold_receiver(*ch, false);
      }
    }
    EXPECT_TRUE(ch->close(std::chrono::seconds(30)));
    if (me != 0) {
      got.add(ch->poll());
      EXPECT_TRUE(got.total.equal(torch::full({numel}, numbered_total(kSends)))) << "rank " << me;
      EXPECT_EQ(got.updates, kSends) << "rank " << me;
    }
  });
}

// poll() hands ordered and replace messages out in the order they arrived, a replace
// message where its newest version arrived (channel.h).
TEST(Channel, PollHandsOutOrderedAndReplaceMessagesInArrivalOrder) {
  spawn(2, [&](std::shared_ptr<World> world) {
    ChannelOptions o;
    o.name = "order";
    o.capacity_bytes = 64;
    auto ch = world->open_channel(o);
    if (world->rank() == 1) {
      // Each handed to the network before the next, so that they arrive in this order:
      // ordered 1, replace 2, ordered 3, replace 4 (replaces 2), ordered 5.
      for (int64_t i = 1; i <= 5; ++i) {
        Outgoing m;
        m.delivery = i % 2 == 0 ? Delivery::kReplace : Delivery::kOrdered;
        m.meta = Metadata({i});
        ch->send(0, m);
        ASSERT_TRUE(ch->flush(30s));
        ASSERT_TRUE(eventually([&] { return ch->counters(0).queued == 0; }));
      }
    } else {
      ASSERT_TRUE(eventually([&] { return ch->counters(1).received_messages >= 5; }));
      std::vector<int64_t> order;
      for (const auto& m : ch->poll().messages) order.push_back(m.meta.field(0));
      EXPECT_EQ(order, (std::vector<int64_t>{1, 3, 4, 5}));
    }
    EXPECT_TRUE(ch->close(30s));
  });
}

// A channel that ended cleanly leaves almost nothing behind in its World: its receive
// buffers (recv_depth x chunk_bytes, 16 MiB by default) go with it; only its last
// acknowledgements (a frame header each, which Gloo may still be sending) stay. (After a
// peer failed the receive buffers stay as long as the World: Gloo may still write there.)
TEST(Channel, AChannelClosedCleanlyKeepsNoReceiveBuffersInItsWorld) {
  spawn(2, [&](std::shared_ptr<World> world) {
    for (int i = 0; i < 3; ++i) {
      auto ch = world->open_channel(additive_options("closed" + std::to_string(i), 1000));
      broadcast_numbered(*ch, 1000, i);
      EXPECT_TRUE(ch->close(30s));
    }
    EXPECT_LT(world->retired_bytes(), 4096u) << "3 channels of 16 MiB of receive buffers each";
  });
}

// A rank whose close() returned may end at once (destroy its channel and World, exit):
// close() must not return before the acknowledgement of the peer's goodbye has left,
// or the peer's close() waits out its whole timeout (issue 34: "ranks 16 did not finish
// within 60000 ms of close()" at 32 ranks). Here rank 0's acknowledgements are held for
// a while, as a descheduled sender thread holds them: it says goodbye, rank 1 answers
// with its own (acknowledging rank 0's), and only a separate frame can acknowledge rank
// 1's goodbye. Rank 0 then ends its channel and World as soon as close() returns.
TEST(Channel, CloseReturnsOnlyOnceTheAcknowledgementOfThePeersGoodbyeHasLeft) {
  std::atomic<bool> rank1_clean{false};
  spawn(2, [&](std::shared_ptr<World> world) {
    auto ch = world->open_channel(additive_options("bye", 1000));
    world->barrier("open");
    if (world->rank() == 0) {
      ChannelTestAccess::hold_acks(*ch, true);
      std::mutex mu;  // guards gone and the channel's end
      bool gone = false;
      std::thread release([&] {
        std::this_thread::sleep_for(300ms);
        std::lock_guard<std::mutex> lock(mu);
        if (!gone) ChannelTestAccess::hold_acks(*ch, false);
      });
      const auto t0 = std::chrono::steady_clock::now();
      EXPECT_TRUE(ch->close(30s));
      EXPECT_GE(std::chrono::steady_clock::now() - t0, 250ms) << "close() returned before its last acknowledgement";
      const auto t1 = std::chrono::steady_clock::now();
      EXPECT_TRUE(ch->close(30s)) << "a second close()";
      EXPECT_LT(std::chrono::steady_clock::now() - t1, 5s) << "a second close() waited for a send already done";
      {
        // The channel ends at once, acknowledgements still held or not.
        std::lock_guard<std::mutex> lock(mu);
        gone = true;
        ch.reset();
      }
      release.join();
      return;  // and the World with it
    }
    // Rank 1 says goodbye once rank 0's has arrived, so that its own acknowledges rank 0's.
    ASSERT_TRUE(eventually([&] { return ch->counters(0).closed; }));
    rank1_clean = ch->close(5s);
  });
  EXPECT_TRUE(rank1_clean) << "rank 1 waited out its close() timeout for an acknowledgement that never came";
}

TEST(Channel, CloseReturnsOnlyOnceThePeerHasEverything) {
  // Rank 1 is stalled while rank 0 sends and closes: rank 0's close() must not return
  // true before rank 1 has taken and acknowledged every message (else rank 0 might exit
  // and its connection's reset destroy what rank 1 had not read yet).
  spawn(2, [&](std::shared_ptr<World> world) {
    ChannelOptions opts;
    opts.name = "close";
    opts.capacity_bytes = 1 << 20;
    auto ch = world->open_channel(opts);
    if (world->rank() == 1) {
      ChannelTestAccess::hold_receiver(*ch, true);
      world->barrier("held");
      world->store().wait({"first close done"});
      ChannelTestAccess::hold_receiver(*ch, false);
      EXPECT_TRUE(ch->close(20s));
      EXPECT_EQ(receive(*ch, 10).size(), 10u);
      return;
    }
    world->barrier("held");
    for (int i = 0; i < 10; ++i) {
      Outgoing m;
      m.payload = torch::full({100000}, static_cast<float>(i));
      ch->send(1, m);
    }
    EXPECT_FALSE(ch->close(1500ms)) << "close() returned while the peer had not read everything";
    world->store().set("first close done", std::vector<uint8_t>{1});
    EXPECT_TRUE(ch->close(20s));
  });
}

TEST(BufferPool, ReusesWhatWasReleasedAndNeverLendsABufferInUse) {
  auto pool = std::make_unique<detail::BufferPool>(4, 1 << 20);
  at::Tensor a = pool->take(at::kFloat, 250);  // 1000 bytes
  void* const first = a.data_ptr();
  at::Tensor b = pool->take(at::kFloat, 250);
  EXPECT_NE(b.data_ptr(), first) << "a buffer in use is not lent again";
  at::Tensor view = a.narrow(0, 10, 5);
  a = at::Tensor();
  EXPECT_EQ(pool->idle_count(), 0u) << "a view still holds it";
  view = at::Tensor();
  EXPECT_EQ(pool->idle_count(), 1u);
  EXPECT_EQ(pool->idle_bytes(), 1000u);
  at::Tensor c = pool->take(at::kByte, 1000);  // the same bytes, another dtype
  EXPECT_EQ(c.data_ptr(), first) << "released memory is reused";
  EXPECT_EQ(c.numel(), 1000);
  EXPECT_EQ(c.scalar_type(), at::kByte);
  EXPECT_EQ(pool->idle_count(), 0u);
  at::Tensor d = pool->take(at::kFloat, 100);  // another size: fresh
  EXPECT_NE(d.data_ptr(), first);
  EXPECT_EQ(pool->take(at::kDouble, 0).numel(), 0);
  at::Tensor late = pool->take(at::kFloat, 250);
  pool.reset();
  late.fill_(1.0f);  // still valid memory
  late = at::Tensor();  // released after its pool: freed
}

TEST(BufferPool, TheNewestReleasedStayWithinTheCountAndTheBytes) {
  {
    detail::BufferPool pool(2, 1 << 20);  // the count binds
    at::Tensor a = pool.take(at::kByte, 1000), b = pool.take(at::kByte, 400), c = pool.take(at::kByte, 500);
    void* const pb = b.data_ptr();
    a = at::Tensor();
    b = at::Tensor();
    c = at::Tensor();
    EXPECT_EQ(pool.idle_count(), 2u);
    EXPECT_EQ(pool.idle_bytes(), 900u) << "the oldest (1000 bytes) made room";
    at::Tensor again = pool.take(at::kByte, 400);
    EXPECT_EQ(again.data_ptr(), pb) << "a kept buffer is lent again";
    EXPECT_EQ(pool.idle_count(), 1u);
  }
  {
    detail::BufferPool pool(8, 2000);  // the bytes bind
    at::Tensor a = pool.take(at::kByte, 1000), b = pool.take(at::kByte, 800), c = pool.take(at::kByte, 600);
    at::Tensor big = pool.take(at::kByte, 3000);
    a = at::Tensor();
    b = at::Tensor();
    EXPECT_EQ(pool.idle_bytes(), 1800u);
    c = at::Tensor();
    EXPECT_EQ(pool.idle_count(), 2u);
    EXPECT_EQ(pool.idle_bytes(), 1400u) << "the oldest (1000 bytes) made room";
    big = at::Tensor();
    EXPECT_EQ(pool.idle_bytes(), 1400u) << "larger than the pool: freed, nothing displaced";
  }
}

TEST(BufferPool, ThreadsTakingAndReleasingAtOnceNeverShareABuffer) {
  detail::BufferPool pool(4, 1 << 20);
  std::atomic<int> shared{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 2000; ++i) {
        at::Tensor buf = pool.take(at::kInt, 64 + 64 * (i % 3));
        buf.fill_(t * 100000 + i);
        std::this_thread::yield();
        if (!buf.eq(t * 100000 + i).all().item<bool>()) ++shared;  // another thread wrote it
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(shared.load(), 0);
  EXPECT_LE(pool.idle_count(), 4u);
  EXPECT_GT(pool.idle_count(), 0u);
}

TEST(Channel, OrderedPayloadsReuseTheirBuffersOnBothSides) {
  // A message's buffers are fresh memory only the first time: a sender's copy returns
  // to its pool once acknowledged, and what a receiver handed out once it is dropped.
  const int64_t numel = (1 << 20) / 4;
  spawn(2, [&](std::shared_ptr<World> world) {
    ChannelOptions opts;
    opts.name = "pool";
    opts.capacity_bytes = numel * 4;
    auto ch = world->open_channel(opts);
    void* first = nullptr;
    for (int i = 0; i < 3; ++i) {
      if (world->rank() == 1) {
        Outgoing m;
        m.payload = torch::full({numel}, static_cast<float>(i));
        ch->send(0, m);
        ASSERT_TRUE(ch->flush(30s));
        EXPECT_EQ(ChannelTestAccess::idle_send_buffers(*ch), 1u)
            << "message " << i << ": the acknowledged copy is back, and the earlier one was reused";
      } else {
        auto got = receive(*ch, 1);
        ASSERT_EQ(got.size(), 1u);
        EXPECT_TRUE(got[0].payload.equal(torch::full({numel}, static_cast<float>(i))));
        if (i == 0) first = got[0].payload.data_ptr();
        EXPECT_EQ(got[0].payload.data_ptr(), first) << "message " << i << " reuses the first's buffer";
        EXPECT_EQ(ChannelTestAccess::idle_recv_buffers(*ch), 0u);
        got.clear();
        EXPECT_EQ(ChannelTestAccess::idle_recv_buffers(*ch), 1u) << "dropped, it is back";
      }
      world->barrier("message " + std::to_string(i));
    }
    EXPECT_TRUE(ch->close(20s));
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
        m.delivery = Delivery::kReplace;
        m.payload = torch::full({4000}, static_cast<double>(i), torch::kDouble);
        m.meta = Metadata({i});
        ch->send(0, m);
      }
    }
    EXPECT_TRUE(ch->close(20s));
    if (world->rank() == 0) {
      auto got = ch->poll().messages;
      ASSERT_EQ(got.size(), 1u);
      EXPECT_EQ(got[0].delivery, Delivery::kReplace);
      EXPECT_EQ(got[0].meta.field(0), 199);
      EXPECT_TRUE(got[0].payload.equal(torch::full({4000}, 199.0, torch::kDouble)));
    }
  });
}

TEST(Channel, SendChecksItsArguments) {
  spawn(2, [&](std::shared_ptr<World> world) {
    ChannelOptions opts = additive_options("checks", 10);
    opts.capacity_bytes = 400;
    auto ch = world->open_channel(opts);
    const int peer = 1 - world->rank();
    Outgoing m;
    m.payload = torch::zeros({101});
    EXPECT_THROW(ch->send(peer, m), ConfigError);  // 404 bytes > 400
    m.payload = torch::zeros({10});
    EXPECT_THROW(ch->send(world->rank(), m), ConfigError);
    EXPECT_THROW(ch->send(2, m), ConfigError);
    m.payload = torch::zeros({2}, torch::kComplexFloat);
    EXPECT_THROW(ch->send(peer, m), ConfigError);
    m.payload = torch::zeros({10});
    m.meta.records = {1};  // records are for additive streams
    EXPECT_THROW(ch->send(peer, m), ConfigError);
    Outgoing a;
    a.delivery = Delivery::kAdditive;
    a.payload = torch::zeros({10});
    a.meta = Metadata({1, 2, 3, 4});
    a.stream = 1;  // not declared
    EXPECT_THROW(ch->send(peer, a), ConfigError);
    a.stream = 0;
    a.payload = torch::zeros({11});  // the stream has 10 elements
    EXPECT_THROW(ch->send(peer, a), ConfigError);
    a.payload = torch::zeros({10}, torch::kDouble);
    EXPECT_THROW(ch->send(peer, a), ConfigError);
    a.payload = torch::zeros({10});
    a.meta = Metadata({1, 2});  // the schema has 4 fields
    EXPECT_THROW(ch->send(peer, a), ConfigError);
    a.meta = Metadata({1, 2, 3, 4});
    a.meta.records = {1, 2, 3, 4, 5};  // at most 4 records
    EXPECT_THROW(ch->send(peer, a), ConfigError);
    EXPECT_TRUE(ch->close(20s));
    m.meta = Metadata();
    EXPECT_THROW(ch->send(peer, m), ConfigError);  // after close
  });
}

TEST(Channel, BadOptionsAreRefusedByName) {
  spawn(1, [&](std::shared_ptr<World> world) {
    ChannelOptions o;
    o.chunk_bytes = 1000;
    EXPECT_THROW(world->open_channel(o), ConfigError);
    o = ChannelOptions();
    o.additive = {AdditiveStream{3, c10::kFloat, 10, {}}, AdditiveStream{3, c10::kFloat, 10, {}}};
    try {
      world->open_channel(o);
      ADD_FAILURE() << "duplicate stream ids were accepted";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("distinct"), std::string::npos) << e.what();
    }
    o = ChannelOptions();
    o.recv_depth = 0;
    EXPECT_THROW(world->open_channel(o), ConfigError);
    o.recv_depth = 1000;  // 1000 receive buffers of 4 MiB
    EXPECT_THROW(world->open_channel(o), ConfigError);
    o = ChannelOptions();
    o.additive = {AdditiveStream{0, c10::kFloat, 0, {}}};  // would refuse every payload
    try {
      world->open_channel(o);
      ADD_FAILURE() << "an additive stream of 0 elements was accepted";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("additive stream 0 has numel 0: it needs numel > 0"),
                std::string::npos)
          << e.what();
    }
    auto refused = [&](const ChannelOptions& bad, const std::string& what) {
      try {
        world->open_channel(bad);
        ADD_FAILURE() << "accepted: " << what;
      } catch (const ConfigError& e) {
        EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
      }
    };
    o = ChannelOptions();
    o.group_hold = -1;
    refused(o, "group_hold must be within 0..1e9");
    o = ChannelOptions();
    o.additive = {AdditiveStream{0, c10::kDouble, 10, {}, Compression(Codec::kInt8)}};
    refused(o, "compression 'int8' needs float32 values");
    o.additive = {AdditiveStream{0, c10::kFloat, 10, {}, Compression(Codec::kTopK, 0)}};
    refused(o, "topk fraction 0 must be in (0, 1]");
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
  auto streams = spawn_collect(2, [](std::shared_ptr<World> world) {
    world->open_channel(additive_options("s", world->rank() == 0 ? 10 : 11));
  });
  for (const auto& e : streams) {
    EXPECT_NE(e.find("additive stream 0 is '"), std::string::npos) << e;
  }
}

// Sends raw bytes to a peer on a channel's Gloo slot, as a broken or hostile peer would.
void send_raw(World& world, int peer, uint64_t slot, std::vector<uint8_t> bytes) {
  detail::send_raw(world, peer, slot, bytes.data(), bytes.size(), std::chrono::seconds(20));
}

// A header frame of protocol version 2, with inline payload.
std::vector<uint8_t> frame(const FrameHeader& h, const Metadata& meta,
                           const std::vector<uint8_t>& payload) {
  std::vector<uint8_t> b(kFrameHeaderBytes + h.meta_bytes() + payload.size());
  encode_frame_header(h, meta, b.data());
  std::memcpy(b.data() + kFrameHeaderBytes + h.meta_bytes(), payload.data(), payload.size());
  return b;
}

TEST(Channel, MalformedFramesAreRejectedCountedAndNeverDelivered) {
  const uint64_t kSlot = uint64_t{1} << 48;  // the first channel of a world
  spawn(2, [&](std::shared_ptr<World> world) {
    ChannelOptions opts;
    opts.name = "hostile";
    opts.capacity_bytes = 1024;
    auto ch = world->open_channel(opts);
    // A well-formed frame from rank 1, to mutate. The token is the channel's, which a
    // hostile peer in the job could read off any frame; the test takes it from the core.
    std::vector<uint8_t> payload(400, 7);
    FrameHeader h;
    h.type = FrameType::kOrdered;
    h.dtype = c10::ScalarType::Float;
    h.sender = 1;
    h.sequence = 1000;  // far ahead of the channel's own numbering
    h.payload_bytes = payload.size();
    h.flags = kInlinePayload | kChecksummed;
    h.payload_checksum = checksum64(payload.data(), payload.size());
    h.meta_fields = 1;
    h.token = 0;
    if (world->rank() == 1) {
      Outgoing first;
      first.payload = torch::ones({4});
      ch->send(0, first);
      ASSERT_TRUE(ch->flush(20s));
    } else {
      auto got = receive(*ch, 1);
      ASSERT_EQ(got.size(), 1u);
    }
    world->barrier("first");
    // Both sides derive the token as the World does (FNV-1a of "job/channel").
    uint64_t tok = 0xcbf29ce484222325ull;
    for (unsigned char c : std::string("test/hostile")) tok = (tok ^ c) * 0x100000001b3ull;
    h.token = tok;
    const Metadata meta({42});

    if (world->rank() == 1) {
      std::vector<std::vector<uint8_t>> bad;
      bad.push_back(std::vector<uint8_t>(300, 0xAB));  // garbage
      auto b = frame(h, meta, payload);
      b[20] ^= 1;  // header bit flip
      bad.push_back(b);
      FrameHeader huge = h;
      huge.payload_bytes = uint64_t{1} << 40;  // claims a terabyte
      huge.flags = kChecksummed;
      bad.push_back(frame(huge, meta, {}));
      FrameHeader liar = h;
      liar.sender = 0;  // claims to be the receiver
      bad.push_back(frame(liar, meta, payload));
      auto flipped = frame(h, meta, payload);
      flipped[kFrameHeaderBytes + 8 + 10] ^= 4;  // corrupted payload
      bad.push_back(flipped);
      FrameHeader replay = h;
      replay.sequence = 1;  // already seen
      bad.push_back(frame(replay, meta, payload));
      FrameHeader other = h;
      other.token ^= 1;  // another job or channel
      bad.push_back(frame(other, meta, payload));
      std::vector<uint8_t> v1(128, 0);  // a version-1 header
      const uint32_t magic = kFrameMagic;
      const uint16_t one = 1;
      std::memcpy(v1.data(), &magic, 4);
      std::memcpy(v1.data() + 4, &one, 2);
      bad.push_back(v1);
      for (auto& f : bad) send_raw(*world, 0, kSlot, f);
      // Then a good frame. (It continues the sequence the hostile frames claimed: one
      // with a valid header is indistinguishable from the peer itself, so the channel's
      // own numbering is behind now, and the test ends without closing.)
      FrameHeader good = h;
      good.sequence = 1001;
      std::vector<uint8_t> five(16);
      const float v = 5.0f;
      for (int i = 0; i < 4; ++i) std::memcpy(five.data() + 4 * i, &v, 4);
      good.payload_bytes = five.size();
      good.payload_checksum = checksum64(five.data(), five.size());
      send_raw(*world, 0, kSlot, frame(good, meta, five));
    } else {
      auto got = receive(*ch, 1);
      ASSERT_EQ(got.size(), 1u);
      EXPECT_TRUE(got[0].payload.equal(torch::full({4}, 5.0f)));
      EXPECT_EQ(got[0].meta, meta);
      EXPECT_TRUE(ch->poll().empty());
      auto c = ch->counters(1);
      EXPECT_EQ(c.rejected, 8u);
      EXPECT_EQ(c.last_reject, to_string(Reject::kOldVersion));
    }
    world->barrier("done");
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
        m.payload = torch::tensor({-std::numeric_limits<float>::infinity()}).to(torch::kHalf);
        ch->send(0, m);
        EXPECT_TRUE(ch->flush(20s));
      } else {
        EXPECT_TRUE(eventually([&] {
          auto c = ch->counters(1);
          return c.received_messages + c.rejected == 5;  // rejected ones are not "received"
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
          auto got = receive(*ch, policy == NonFinite::kAccept ? 5 : 2);
          ASSERT_EQ(got.size(), policy == NonFinite::kAccept ? 5u : 2u);
          if (policy == NonFinite::kReject) {
            EXPECT_TRUE(got[0].payload.equal(torch::tensor({3.0f, 4.0f})));
            EXPECT_EQ(ch->counters(1).rejected, 3u);
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

TEST(Channel, AnAdditiveMessageRejectedMidStreamTaintsItsSum) {
  // The NaN sits in the third of four chunks: the first two are summed before it shows,
  // so the sum cannot be delivered as if the message had never come.
  const int64_t numel = 8 * 1024;  // 32 KB: four 8 KB chunks
  spawn(2, [&](std::shared_ptr<World> world) {
    ChannelOptions opts = additive_options("taint", numel);
    opts.chunk_bytes = 8192;
    opts.max_meta_bytes = 1024;
    opts.inline_bytes = 0;
    auto ch = world->open_channel(opts);
    auto send = [&](at::Tensor payload) {
      Outgoing m;
      m.delivery = Delivery::kAdditive;
      m.payload = payload;
      m.meta = Metadata({1, 1, 1, 0});
      m.meta.records = {0};
      ch->send(0, m);
      EXPECT_TRUE(ch->flush(20s));
      world->barrier("sent");
    };
    // A receiver may hand out part of a message before the rest arrives (channel.h):
    // collect every arrival until `done` (the peer's counters show the message processed),
    // then once more.
    auto collect = [&](const std::function<bool(const Summed&)>& done) {
      Summed c(numel);
      EXPECT_TRUE(eventually([&] {
        c.add(ch->poll());
        return done(c);
      }));
      c.add(ch->poll());
      world->barrier("seen");
      return c;
    };
    if (world->rank() == 1) {
      auto bad = torch::ones({numel});
      bad[numel / 2 + 7] = std::numeric_limits<float>::quiet_NaN();
      send(bad);
      world->barrier("seen");
      send(torch::full({numel}, 2.0f));
      world->barrier("seen");
    } else {
      world->barrier("sent");
      // The rejection is counted just before the taint is set: wait for both.
      Summed a = collect([&](const Summed& c) { return ch->counters(1).rejected == 1 && c.tainted; });
      EXPECT_TRUE(a.tainted) << "half a rejected message is in the sum";
      EXPECT_GE(a.arrivals, 1);
      EXPECT_EQ(ch->counters(1).last_reject, to_string(Reject::kNonFinite));
      const uint64_t before = ch->counters(1).received_messages;
      world->barrier("sent");
      Summed b = collect([&](const Summed&) { return ch->counters(1).received_messages > before; });
      EXPECT_FALSE(b.tainted) << "the taint lasts until it is handed out once";
      EXPECT_TRUE(b.total.equal(torch::full({numel}, 2.0f))) << "the next message is summed alone";
      EXPECT_EQ(ch->counters(1).rejected, 1u);
    }
    EXPECT_TRUE(ch->close(20s));
  });
}

TEST(Channel, AnIdleDeadPeerIsNoticedAndRethrownOnTheTrainingThread) {
  // Nothing is sent to or from rank 1 when it goes: the watcher still sees it.
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
    EXPECT_EQ(ch->failed_peers(), std::vector<int>{2});
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

TEST(Channel, APeerThatFloodsOrderedMessagesIsFailedNotBuffered) {
  // Rank 1 sends more ordered messages than rank 0 may hold unpolled: rank 0 fails the
  // peer with a message that says why, instead of buffering without bound.
  spawn(2, [&](std::shared_ptr<World> world) {
    ChannelOptions opts;
    opts.name = "flood";
    opts.max_ordered = 4;
    opts.on_peer_failure = PeerFailure::kThrow;
    auto ch = world->open_channel(opts);
    if (world->rank() == 1) {
      for (int i = 0; i < 6; ++i) {
        ASSERT_TRUE(ch->wait_for_room(0, 3, 20s));
        Outgoing m;
        m.payload = torch::ones({8});
        ch->send(0, m);
      }
      // Rank 0 keeps its end open until every send here was made: a send after its
      // teardown would rightly throw (rank 0 gone).
      world->store().set("rank 1 sent all", std::vector<uint8_t>{1});
      world->store().wait({"rank 0 failed rank 1"}, std::chrono::milliseconds(30000));
      return;
    }
    std::string error;
    EXPECT_TRUE(eventually([&] {
      try {
        ch->rethrow_if_failed();
      } catch (const CommError& e) {
        error = e.what();
        return true;
      }
      return false;
    }));
    EXPECT_NE(error.find("more than max_ordered=4 ordered messages"), std::string::npos) << error;
    world->store().wait({"rank 1 sent all"}, std::chrono::milliseconds(30000));
    world->store().set("rank 0 failed rank 1", std::vector<uint8_t>{1});
  });
}

}  // namespace
}  // namespace torch_asgd
