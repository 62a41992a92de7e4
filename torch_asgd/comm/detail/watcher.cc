#include "torch_asgd/comm/detail/watcher.h"

#include <gloo/context.h>
#include <gloo/transport/unbound_buffer.h>

#include "torch_asgd/comm/detail/log.h"

namespace torch_asgd {
namespace detail {

Watcher::Watcher(ChannelCore& core) : core_(core) {}

Watcher::~Watcher() { stop_and_join(); }

void Watcher::start() {
  if (core_.size < 2) return;
  thread_ = std::thread([this] { run(); });
}

void Watcher::stop_and_join() {
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

void Watcher::run() {
  while (!core_.stopping) {
    // A fresh buffer each round: one whose receive failed keeps that exception. The
    // old one's receives on the other connections stay posted (Gloo only holds weak
    // references to them), one per failure, so at most one per peer.
    // What the watch receives would be written to lives as long as they can.
    auto memory = std::make_shared<uint64_t>(0);
    std::shared_ptr<gloo::transport::UnboundBuffer> buf =
        core_.context->createUnboundBuffer(memory.get(), sizeof(uint64_t));
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
    bool stopped = false;
    try {
      if (!buf->waitRecv(nullptr, kForever)) stopped = true;  // aborted
      else log_warning(core_.prefix() + ": a peer sent on the watch slot; ignored");
    } catch (const std::exception&) {
      // A connection failed: the next round's receives find which.
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      current_ = nullptr;
    }
    core_.retire(buf);
    core_.retire(memory);
    if (stopped) break;
  }
}

}  // namespace detail
}  // namespace torch_asgd
