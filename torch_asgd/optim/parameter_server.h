// ParameterServer: the server of the AsGrad family (ALGORITHMS.md section 2). It runs
// on a rank of its own, holds the model, and for every gradient a worker returns:
// computes its staleness tau = v_server - v_job, applies x <- x - gamma_tau * g at once
// (or drops it if tau >= staleness_cap), and issues exactly one new job with the
// current model to the worker the policy picks (queued, FIFO, if that worker is busy).
// At start every worker gets one job, so there are always n jobs in flight.
//
//   ParameterServer server(net->named_parameters(),
//                          ServerOptions(0.05).policy(AssignPolicy::kShuffle), world);
//   server.run();  // until max_gradients, or until every worker is done
//
// The workers use AsyncSGD (async_sgd.h). Construction is collective with them.
// Blocking: serve() waits at most its timeout; run() returns when training ends and
// the workers have been told. Thread safety: one thread.
#pragma once

#include <chrono>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include <torch/ordered_dict.h>
#include <torch/serialize/archive.h>

#include "torch_asgd/comm/channel.h"
#include "torch_asgd/comm/world.h"
#include "torch_asgd/optim/job_policy.h"
#include "torch_asgd/optim/staleness.h"

namespace torch_asgd {
namespace detail {
class FlatParams;
}

enum class StepRule {
  kConstant = 0,       // gamma_tau = lr (AsGrad)
  kDelayAdaptive = 1,  // gamma_tau = lr * min(1, n / tau) (Mishchenko et al., 2022)
};
std::string to_string(StepRule rule);
StepRule parse_step_rule(const std::string& name);  // "constant", "delay-adaptive"

struct ServerOptions {
  ServerOptions(double lr = 0.01);  // NOLINT
  TORCH_ARG(double, lr);
  TORCH_ARG(AssignPolicy, policy) = AssignPolicy::kShuffle;
  TORCH_ARG(StepRule, step_rule) = StepRule::kConstant;
  // R: a gradient with tau >= R is dropped and counted; 0 keeps every gradient.
  TORCH_ARG(int64_t, staleness_cap) = 0;
  // Stop after this many gradients (applied or dropped); 0: when every worker is done.
  TORCH_ARG(int64_t, max_gradients) = 0;
  TORCH_ARG(uint64_t, seed) = 0;
  TORCH_ARG(int, server_rank) = 0;
  // Keep the worker of every job issued and of every gradient applied (for analysis).
  TORCH_ARG(bool, keep_log) = false;
  // kContinue (default): a worker whose connection fails is logged once and gets no
  // more jobs; its job in flight is not waited for; the others train on. kThrow: the
  // next serve() throws CommError.
  TORCH_ARG(PeerFailure, on_worker_failure) = PeerFailure::kContinue;
};

struct WorkerStats {
  int rank = -1;
  int64_t jobs = 0;       // jobs issued to this worker (queued ones included)
  int64_t gradients = 0;  // gradients received from it
  int64_t applied = 0;
  int64_t dropped = 0;    // tau >= staleness_cap
  StalenessStats staleness;
  bool done = false;    // said it takes no more jobs
  bool failed = false;  // its connection failed
};

struct ServerStats {
  int64_t version = 0;  // gradients applied
  int64_t gradients = 0;
  int64_t dropped = 0;
  StalenessStats staleness;
  std::vector<WorkerStats> workers;
  std::string str() const;
};

class ParameterServer {
 public:
  ParameterServer(std::vector<torch::Tensor> params, ServerOptions options,
                  std::shared_ptr<World> world);
  ParameterServer(const torch::OrderedDict<std::string, torch::Tensor>& named_params,
                  ServerOptions options, std::shared_ptr<World> world);
  ~ParameterServer();
  ParameterServer(const ParameterServer&) = delete;
  ParameterServer& operator=(const ParameterServer&) = delete;

  // Handles what arrives within `timeout`. Returns false once training has ended
  // (max_gradients reached or every worker done) and the workers were told to stop.
  // Throws CommError if a worker failed (unless on_worker_failure is kContinue) or if
  // no gradient at all came for the World's timeout.
  bool serve(std::chrono::milliseconds timeout = std::chrono::milliseconds(100));
  // serve() until training ends.
  ServerStats run();

  ServerStats stats() const;
  // Workers in the order jobs were issued / gradients applied (keep_log only).
  const std::vector<int>& job_log() const { return job_log_; }
  const std::vector<int>& apply_log() const { return apply_log_; }

  // The server's counters and the fingerprint of its model (the model itself is the
  // caller's, saved with torch::save(module)). Load before the first serve().
  void save(torch::serialize::OutputArchive& archive) const;
  void load(torch::serialize::InputArchive& archive);

 private:
  struct Job {
    at::Tensor snapshot;
    int64_t version;
  };
  WorkerStats& worker(int rank);
  bool available(int rank) const;
  bool budget_spent() const;  // max_gradients reached
  void handle_gradient(const Message& m);
  void reissue_jobs_of(int rank);  // a worker failed or finished
  void issue_job(int returning);
  void send_job(int rank, Job job);
  void stop();

  ServerOptions options_;
  std::shared_ptr<World> world_;
  std::unique_ptr<detail::FlatParams> flat_;
  std::unique_ptr<Channel> channel_;
  std::unique_ptr<JobAssigner> assigner_;
  std::vector<int> worker_ranks_;
  std::vector<WorkerStats> workers_;      // by rank; the server's own entry unused
  std::vector<bool> busy_;                // by rank: a job is out
  std::vector<std::deque<Job>> queues_;   // by rank
  ServerStats totals_;
  std::vector<int> job_log_, apply_log_;
  std::chrono::steady_clock::time_point last_gradient_;
  bool started_ = false;
  bool stopped_ = false;
};

// torch::save(server, path) / torch::load(server, path).
torch::serialize::OutputArchive& operator<<(torch::serialize::OutputArchive& archive,
                                            const ParameterServer& server);
torch::serialize::InputArchive& operator>>(torch::serialize::InputArchive& archive,
                                           ParameterServer& server);

}  // namespace torch_asgd
