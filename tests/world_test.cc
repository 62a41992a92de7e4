#include <gtest/gtest.h>

#include "testing.h"
#include "torch_asgd/comm/error.h"

namespace torch_asgd {
namespace {

using namespace std::chrono_literals;

// Runs ranks `ranks` of a world of `size`, as threads over one store, with a short
// timeout; returns each one's error message.
std::vector<std::string> partial_world(int size, std::vector<int> ranks,
                                       const std::string& job = "test") {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::string> errors(ranks.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < ranks.size(); ++i) {
    threads.emplace_back([&, i] {
      try {
        auto o = testing::thread_world_options(ranks[i], size);
        o.timeout = 2s;
        o.job_id = job;
        World::create(o, store);
      } catch (const std::exception& e) {
        errors[i] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

TEST(World, MissingRanksAreNamed) {
  auto errors = partial_world(4, {0, 2});
  for (size_t i = 0; i < errors.size(); ++i) {
    EXPECT_NE(errors[i].find("rendezvous timed out after 2 s: ranks [1, 3] of WORLD_SIZE=4 did "
                             "not arrive (job 'test')"),
              std::string::npos)
        << errors[i];
  }
}

TEST(World, DuplicateRankIsRefused) {
  auto errors = partial_world(2, {0, 0});
  int duplicates = 0;
  for (const auto& e : errors) {
    duplicates += e.find("another process already joined job 'test' as rank 0") != std::string::npos;
  }
  EXPECT_EQ(duplicates, 1) << errors[0] << "\n" << errors[1];
}

TEST(World, WorldOfOneNeedsNoStore) {
  auto o = testing::thread_world_options(0, 1);
  auto w = World::create(o);
  EXPECT_EQ(w->size(), 1);
  w->barrier("nothing to wait for");
  w->check_fingerprint("anything", Fingerprint());
}

TEST(World, BarrierAndCollectivesComplete) {
  testing::spawn(3, [](std::shared_ptr<World> w) {
    w->barrier("one");
    w->barrier("two");
    Fingerprint fp;
    fp.add("w", {3}, c10::kFloat);
    w->check_fingerprint("model", fp);
    EXPECT_EQ(w->local_size(), 3);
  });
}

TEST(World, BadInterfaceIsAConfigError) {
  auto o = testing::thread_world_options(0, 1);
  o.hostname.clear();
  o.iface = "no-such-if0";
  try {
    World::create(o);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("GLOO_SOCKET_IFNAME"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace torch_asgd
