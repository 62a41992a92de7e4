// The watcher of a Channel's connections: one thread, one small receive posted on every
// live peer's connection on a slot nobody sends on. Gloo fails a connection's pending
// operations when the connection fails, so that receive fails the moment a peer dies,
// whether or not anything was being sent to or received from it; the thread then finds
// which connection it was and reports it (ChannelCore::peer_failed). Internal.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <thread>

#include "torch_asgd/comm/detail/channel_core.h"

namespace torch_asgd {
namespace detail {

class Watcher {
 public:
  explicit Watcher(ChannelCore& core);
  ~Watcher();
  Watcher(const Watcher&) = delete;
  Watcher& operator=(const Watcher&) = delete;

  void start();
  // After core.stopping. `clean`: the last watch's buffer is released at once.
  void stop_and_join(bool clean);
  // Tests: ends the current wait, as a failed connection would.
  void poke();

 private:
  void run();  // watch(), and what to do if it throws
  void watch();

  ChannelCore& core_;
  std::thread thread_;
  std::mutex mu_;  // guards current_
  gloo::transport::UnboundBuffer* current_ = nullptr;
  std::atomic<bool> clean_{false};
};

}  // namespace detail
}  // namespace torch_asgd
