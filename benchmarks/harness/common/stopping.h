// When a rank stops training: its epochs are done, the job's budget is spent (samples
// over all ranks, or seconds), or SIGINT/SIGTERM asked it to. Asynchronous ranks agree
// through the rendezvous store (a shared sample counter and a stop flag, read about every
// 100 ms, so every rank stops within that of the others, and more often as a samples
// budget runs out, so that the job overshoots it by at most half); synchronous ranks, which must
// stop at the same step, agree through a small all-reduce every few steps.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

namespace torch_asgd {
class World;
namespace examples {

// SIGINT and SIGTERM: the first is remembered (the examples stop at the next step
// boundary, write their checkpoint and summary); a second one kills as usual.
class StopSignals {
 public:
  static void install();
  static int received();  // the signal, or 0
  static int exit_code();  // 128 + the signal, or 0
};

// Budget and stop flag shared by asynchronous ranks.
class SharedStop {
 public:
  // `world` may be null (one rank). A budget of 0 means none.
  SharedStop(std::shared_ptr<World> world, int64_t budget_samples, double budget_seconds);
  // This rank has trained on `samples` in all and for `seconds`: whether to stop now.
  // Talks to the store every 100 ms, when `force`, and with a samples budget whenever
  // this rank's unreported samples reach 1/(2 x ranks) of what is left of it.
  bool should_stop(int64_t samples, double seconds, bool force = false);
  // Tells every rank to stop (this one hit its end, or a signal came).
  void stop_all();
  int64_t global_samples() const { return global_; }
  const std::string& reason() const { return reason_; }  // "budget", "signal", "peer"; "" while running

 private:
  std::shared_ptr<World> world_;
  int64_t budget_samples_;
  double budget_seconds_;
  int64_t reported_ = 0;  // samples of this rank already added to the store
  int64_t global_ = 0;
  std::chrono::steady_clock::time_point last_sync_;
  bool stopped_ = false;
  std::string reason_;
};

// Whether any rank wants to stop, agreed by all at the same step (synchronous ranks).
bool agree_to_stop(World* world, bool mine);

}  // namespace examples
}  // namespace torch_asgd
