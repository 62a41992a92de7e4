// ParameterServer: the server of the AsGrad family (docs/algorithms.md, "The AsGrad
// family"). It runs on a rank of its own, holds the model, and for every gradient a worker returns:
// computes its staleness tau = v_server - v_job, hands it to its local rule (any inner
// torch::optim::Optimizer: asynchronous Adam is a server with an Adam rule), scaled by
// min(1, n / tau) under the delay-adaptive step rule, or drops it if tau >= staleness_cap;
// then issues exactly one new job with the current model to the worker the policy picks
// (queued, FIFO, if that worker is busy). At start every worker gets one job, and as
// many jobs as live workers stay in flight: a worker that fails or finishes leaves its
// job to another, and a gradient of a worker already given up is applied without a new
// job.
//
//   ParameterServer server(std::make_shared<torch::optim::Adam>(net->parameters(), 1e-3),
//                          ServerOptions().policy(AssignPolicy::kShuffle), world, net);
//   while (!server.done()) server.step();  // or server.run()
//
// The workers use AsGradWorker (asgrad_worker.h). Construction is collective with them
// (the equal start); a worker's constructor then waits for its first job, which the
// server sends at its first step() or serve(): put no other collective between the
// server's construction and its first step. Blocking: serve() waits at most its
// timeout; run() returns when training ends and the workers have been told. Thread
// safety: one thread.
#pragma once

#include <chrono>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include <torch/optim/sgd.h>
#include <torch/ordered_dict.h>
#include <torch/serialize/archive.h>

#include "torch_asgd/comm/channel.h"
#include "torch_asgd/comm/transport.h"
#include "torch_asgd/comm/world.h"
#include "torch_asgd/optim/distributed_optimizer.h"
#include "torch_asgd/optim/job_policy.h"
#include "torch_asgd/optim/staleness.h"

namespace torch_asgd {

enum class StepRule {
  kConstant = 0,       // the rule's learning rate as it is (AsGrad)
  kDelayAdaptive = 1,  // the gradient scaled by min(1, n / tau) (Mishchenko et al., 2022)
};
std::string to_string(StepRule rule);
StepRule parse_step_rule(const std::string& name);  // "constant", "delay-adaptive"

// Optimizer-wide settings; the step size is the inner optimizer's.
struct ServerOptions {
  ServerOptions() = default;
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
  // more jobs; its job in flight is issued anew to another worker. kThrow: the next
  // serve() throws CommError.
  TORCH_ARG(PeerFailure, on_worker_failure) = PeerFailure::kContinue;
  // How the workers' gradients travel (codec.h; float32 parameters only); the workers'
  // WorkerOptions::compression must be the same (compared when the channel opens).
  TORCH_ARG(Compression, compression) = Compression();
};

struct WorkerStats {
  int rank = -1;
  int64_t jobs = 0;       // jobs issued to this worker (queued ones included)
  int64_t gradients = 0;  // gradients received from it
  int64_t applied = 0;
  int64_t dropped = 0;    // tau >= staleness_cap
  StalenessStats staleness;
  int64_t rejected = 0;  // its messages the channel refused (a job reissued to it each time)
  bool done = false;    // said it takes no more jobs
  bool failed = false;  // its connection failed
};

struct ServerStats : OptimizerStats {
  ServerStats() : OptimizerStats("ParameterServer") {}
  int64_t version = 0;  // gradients applied
  int64_t gradients = 0;  // gradients taken (applied or dropped), at most max_gradients
  int64_t dropped = 0;
  int64_t late = 0;  // gradients that came after the budget was spent (not applied)
  std::string codec;     // ServerOptions::compression, when lossy
  int64_t encoded = 0;   // gradients that came encoded (the others: values no codec takes)
  StalenessStats staleness;
  std::vector<WorkerStats> workers;
  std::string str() const override;  // one line, then one per worker
  std::string to_json() const override;
};

class ParameterServer : public DistributedOptimizer {
 public:
  // `world`: nullptr takes the process's default (distributed_optimizer.h).
  ParameterServer(std::shared_ptr<torch::optim::Optimizer> inner, ServerOptions options,
                  std::shared_ptr<World> world = nullptr, Model model = {});
  // Shorthand: an inner torch::optim::SGD with these options.
  ParameterServer(Params params, const torch::optim::SGDOptions& sgd, ServerOptions options,
                  std::shared_ptr<World> world = nullptr, Model model = {});
  // Over a transport of the caller's (tests script the workers' side); `timeout` is how
  // long serve() lets the workers stay silent.
  ParameterServer(std::shared_ptr<torch::optim::Optimizer> inner, ServerOptions options,
                  std::unique_ptr<Transport> transport,
                  std::chrono::milliseconds timeout = std::chrono::seconds(300));
  // If finish() was not called: warns and finishes with a 10 s bound.
  ~ParameterServer() override;

  // The server takes its steps as gradients arrive: step() is serve() for up to 100 ms
  // (the closure, if any, is not called) and returns an undefined tensor. done() says
  // when training has ended. The server's loop: while (!server.done()) server.step();
  torch::Tensor step(LossClosure closure = nullptr) override;
  bool done() const override { return stopped_; }

  // Handles what arrives within `timeout`. Returns false once training has ended
  // (max_gradients reached or every worker done) and the workers were told to stop.
  // Throws CommError if a worker failed (unless on_worker_failure is kContinue) or if
  // no gradient at all came for the World's timeout.
  bool serve(std::chrono::milliseconds timeout = std::chrono::milliseconds(100));
  // serve() until training ends.
  ServerStats run();
  // Ends training now (a time budget, a signal): the workers are told to stop, and the
  // channel closes (bounded by the World's timeout). serve() returns false from then on.
  void stop();
  // stop(), its close bounded by `timeout`; false if some worker did not finish in time.
  bool finish(std::chrono::milliseconds timeout = std::chrono::seconds(60)) override;
  // Nothing to average: the server's model is the model, and every job carries it.
  void resync() override {}

  ServerStats stats() const;
  // Jobs handed out (or queued for their worker) whose gradient has not come back.
  int64_t jobs_in_flight() const;
  // Workers in the order jobs were issued / gradients applied (keep_log only).
  const std::vector<int>& job_log() const { return job_log_; }
  const std::vector<int>& apply_log() const { return apply_log_; }
  const ServerOptions& options() const { return options_; }

 protected:
  void save_state(torch::serialize::OutputArchive& archive) const override;
  void load_state(torch::serialize::InputArchive& archive) override;
  std::unique_ptr<OptimizerStats> stats_snapshot() const override {
    return std::make_unique<ServerStats>(stats());
  }

 private:
  struct Job {
    at::Tensor snapshot;
    int64_t version;
  };
  WorkerStats& worker(int rank);
  bool available(int rank) const;
  bool budget_spent() const;  // max_gradients reached
  void handle(const Message& m);
  void handle_gradient(const Message& m);
  void reissue_jobs_of(int rank);  // a worker failed or finished
  void note_failures();
  int64_t live_workers() const;
  void issue_job(int returning);
  void issue_job_to(int rank);  // a job of the current model, whatever the policy says
  void send_job(int rank, Job job);
  void check_options() const;  // ConfigError naming the option
  void init();

  ServerOptions options_;
  std::shared_ptr<World> world_;
  std::unique_ptr<Transport> transport_;
  std::chrono::milliseconds timeout_{std::chrono::seconds(300)};
  int rank_ = 0;
  std::unique_ptr<JobAssigner> assigner_;
  std::vector<int> worker_ranks_;
  std::vector<WorkerStats> workers_;      // by rank; the server's own entry unused
  std::vector<bool> busy_;                // by rank: a job is out
  std::vector<std::deque<Job>> queues_;   // by rank
  std::deque<Message> pending_;           // arrived, not yet handled
  at::Tensor grad_;                       // the gradient the rule is given (parameters' device)
  at::Tensor decoded_;                    // an encoded gradient decoded, for a GPU's grad_
  ServerStats totals_;
  std::vector<int> job_log_, apply_log_;
  std::chrono::steady_clock::time_point last_gradient_;
  bool started_ = false;
  bool stopped_ = false;
  bool close_clean_ = true;
};

}  // namespace torch_asgd
