#include "torch_asgd/comm/detail/watcher.h"

#include <gloo/context.h>
#include <gloo/transport/unbound_buffer.h>

#include "torch_asgd/detail/log.h"

namespace torch_asgd {
namespace detail {

Watcher::Watcher(ChannelCore& core) : core_(core) {}

Watcher::~Watcher() { stop_and_join(/*clean=*/false); }

void Watcher::start() {
  if (core_.size < 2) return;
  thread_ = std::thread([this] { run(); });
}

void Watcher::stop_and_join(bool clean) {
  clean_ = clean;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (current_ != nullptr) current_->abortWaitRecv();
  }
  {
    std::lock_guard<std::mutex> lock(core_.mu);
    core_.cv.notify_all();
  }
  if (thread_.joinable()) thread_.join();
}

void Watcher::poke() {
  std::lock_guard<std::mutex> lock(mu_);
  if (current_ != nullptr) current_->abortWaitRecv();
}

void Watcher::run() {
  // Whatever it throws is the channel's end, never the process's.
  try {
    watch();
  } catch (const std::exception& e) {
    core_.thread_died("watching", e.what());
  } catch (...) {
    core_.thread_died("watching", "an exception that is not a std::exception");
  }
}

void Watcher::watch() {
  while (!core_.stopping) {
    // A fresh buffer each round: one whose receive failed keeps that exception. The
    // old one's receives on the other connections stay posted (Gloo only holds weak
    // references to them), one per failure, so at most one per peer.
    // What the watch receives would be written to lives as long as they can.
    auto memory = std::make_shared<uint64_t>(0);
    std::shared_ptr<gloo::transport::UnboundBuffer> buf =
        core_.context->createUnboundBuffer(memory.get(), sizeof(uint64_t));
    // However this round ends (an exception included), stop_and_join() must not see a
    // buffer that is gone.
    struct Forget {
      Watcher* w;
      ~Forget() {
        std::lock_guard<std::mutex> lock(w->mu_);
        w->current_ = nullptr;
      }
    } forget{this};
    int watched = 0;
    for (int p : core_.live_peers()) {
      try {
        buf->recv(p, core_.watch_slot, 0, sizeof(uint64_t));
        ++watched;
      } catch (const std::exception& e) {
        core_.peer_failed(p, e.what());  // its connection has failed already
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (core_.stopping) break;
      current_ = watched > 0 ? buf.get() : nullptr;
    }
    if (watched == 0) {
      std::unique_lock<std::mutex> lock(core_.mu);
      core_.cv.wait(lock, [&] { return core_.stopping.load(); });
      break;
    }
    // (Tests: a poke that came before current_ was set is not lost.)
    if (core_.fail_watcher_thread.exchange(false)) throw 42;  // not a std::exception
    bool stopped = false;
    try {
      if (!buf->waitRecv(nullptr, kForever)) stopped = true;  // aborted
      else log_warning(core_.prefix() + ": a peer sent on the watch slot; ignored");
    } catch (const std::exception&) {
      // A connection failed: the next round's receives find which.
    }
    if (core_.fail_watcher_thread.exchange(false)) throw 42;  // tests: not a std::exception
    {
      std::lock_guard<std::mutex> lock(mu_);
      current_ = nullptr;
    }
    // A receive that failed may be touched by Gloo as long as the connections live; one
    // aborted at a clean end was never matched (nobody sends on this slot).
    if (!(stopped && clean_)) {
      core_.retire(buf, 0);
      core_.retire(memory, sizeof(uint64_t));
    }
    if (stopped) break;
  }
}

}  // namespace detail
}  // namespace torch_asgd
