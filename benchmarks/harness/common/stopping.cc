#include "common/stopping.h"

#include <signal.h>

#include <atomic>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/Store.hpp>

#include "torch_asgd/comm/collectives.h"
#include "torch_asgd/comm/world.h"

namespace torch_asgd {
namespace examples {
namespace {

std::atomic<int> g_signal{0};

void on_signal(int sig) {
  g_signal.store(sig);
  // The next one kills: a stop that hangs can still be interrupted.
  ::signal(sig, SIG_DFL);
}

const std::string kSamples = "example/shared/samples";
const std::string kStop = "example/shared/stop";

}  // namespace

void StopSignals::install() {
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
}

int StopSignals::received() { return g_signal.load(); }

int StopSignals::exit_code() {
  const int s = received();
  return s == 0 ? 0 : 128 + s;
}

SharedStop::SharedStop(std::shared_ptr<World> world, int64_t budget_samples, double budget_seconds)
    : world_(world && world->size() > 1 ? std::move(world) : nullptr),
      budget_samples_(budget_samples),
      budget_seconds_(budget_seconds) {}

bool SharedStop::should_stop(int64_t samples, double seconds, bool force) {
  if (stopped_) return true;
  if (StopSignals::received() != 0) {
    reason_ = "signal";
    stop_all();
    return true;
  }
  if (budget_seconds_ > 0 && seconds >= budget_seconds_) {
    reason_ = "budget";
    stop_all();
    return true;
  }
  const auto now = std::chrono::steady_clock::now();
  // A rank also reports once its unreported samples reach 1/(2n) of what it last saw
  // left of the budget: each rank then trains at most that (plus one batch) past the
  // moment the budget is spent, so the job trains at most 1.5x the budget plus n batches,
  // whatever the ranks' speeds.
  const bool due_by_samples =
      world_ && budget_samples_ > 0 &&
      2 * world_->size() * (samples - reported_) >= budget_samples_ - global_;
  if (!world_) {
    global_ = samples;
  } else if (force || due_by_samples || now - last_sync_ >= std::chrono::milliseconds(100)) {
    last_sync_ = now;
    auto& store = world_->store();
    global_ = store.add(kSamples, samples - reported_);
    reported_ = samples;
    if (store.check({kStop})) {
      reason_ = "peer";
      stopped_ = true;
      return true;
    }
  }
  if (budget_samples_ > 0 && global_ >= budget_samples_) {
    reason_ = "budget";
    stop_all();
    return true;
  }
  return false;
}

void SharedStop::stop_all() {
  stopped_ = true;
  if (world_) world_->store().set(kStop, std::vector<uint8_t>{1});
}

bool agree_to_stop(World* world, bool mine) {
  if (world == nullptr || world->size() < 2) return mine;
  at::Tensor flag = torch::tensor({mine ? 1.0 : 0.0}, torch::kDouble);
  all_reduce(*world, flag, ReduceOp::kMax, /*tag=*/7301);
  return flag.item<double>() > 0;
}

}  // namespace examples
}  // namespace torch_asgd
