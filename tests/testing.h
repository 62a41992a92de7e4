// Test helpers: several ranks as threads of one process over an in-memory store
// (after Gloo's test/base_test.h), and small utilities.
#pragma once

#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include "torch_asgd/comm/world.h"

namespace torch_asgd {
namespace testing {

inline WorldOptions thread_world_options(int rank, int size) {
  WorldOptions o;
  o.rank = rank;
  o.world_size = size;
  o.local_rank = rank;
  o.local_world_size = size;
  o.hostname = "127.0.0.1";
  o.job_id = "test";
  o.timeout = std::chrono::seconds(20);
  return o;
}

// Every rank's World is up (its mesh connected) before any rank's test body runs, so a
// rank that ends or throws at once cannot close its connections under a rank that is
// still connecting (which would then fail with "Connection closed by peer").
inline std::shared_ptr<World> created(std::shared_ptr<World> world) {
  world->barrier("testing: every World is up");
  return world;
}

// Runs fn(world) on `size` threads, one World per rank, all meeting in one HashStore.
// Rethrows the first exception any rank threw, after all ranks have finished.
inline void spawn(int size, const std::function<void(std::shared_ptr<World>)>& fn,
                  const std::function<void(WorldOptions&)>& tweak = nullptr) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::thread> threads;
  std::mutex mu;
  std::exception_ptr first;
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      try {
        WorldOptions o = thread_world_options(r, size);
        if (tweak) tweak(o);
        fn(created(World::create(o, store)));
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!first) first = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  if (first) std::rethrow_exception(first);
}

// Like spawn(), but collects every rank's exception message ("" when none).
inline std::vector<std::string> spawn_collect(
    int size, const std::function<void(std::shared_ptr<World>)>& fn) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::string> errors(size);
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(created(World::create(thread_world_options(r, size), store)));
      } catch (const std::exception& e) {
        errors[r] = e.what();
        if (errors[r].empty()) errors[r] = "(empty message)";
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

// Polls `pred` until it holds or `timeout` passes.
inline bool eventually(const std::function<bool()>& pred,
                       std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return pred();
}

}  // namespace testing
}  // namespace torch_asgd
