// AsGradWorker: the worker side of the AsGrad family, shaped like a
// torch::optim::Optimizer so that the training loop is the usual one. Its parameters
// always hold the snapshot of the worker's current job; step() after loss.backward()
// returns the gradient, tagged with that snapshot's version, to the parameter server
// and loads the next job (waiting for it if the server has none for this worker yet).
// The worker applies no step of its own: the server's rule does (so it has no learning
// rate, and an LR scheduler attached to it is refused; attach it to the server). It is a
// DistributedOptimizer without a local rule (inner() throws).
//
//   AsGradWorker opt(net->parameters(), WorkerOptions(), world, net);  // waits for job 1
//   while (!opt.done()) { opt.zero_grad(); loss(net, batch).backward(); opt.step(); }
//   opt.finish();
//
// done() turns true when the server says training is over. finish() tells the server
// this worker takes no more jobs (if it is still running) and closes the channel.
// A gradient that holds NaN or Inf is not sent (the server would refuse it): step()
// throws DivergedError instead, and finish() then tells the server to give this
// worker's job to another. Waits are bounded by the World's timeout: a server that
// disappears or stays silent gives CommError. Buffers (Model): equal at start (the
// server's), then each worker's own. Thread safety: one training thread.
#pragma once

#include <chrono>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include <torch/optim/optimizer.h>
#include <torch/ordered_dict.h>
#include <torch/serialize/archive.h>

#include "torch_asgd/comm/channel.h"
#include "torch_asgd/comm/world.h"
#include "torch_asgd/optim/distributed_optimizer.h"

namespace torch_asgd {

struct WorkerOptions {
  WorkerOptions() = default;
  TORCH_ARG(int, server_rank) = 0;
  // How gradients travel (codec.h; float32 parameters only). Must be the server's too
  // (compared when the channel opens). Under a lossy codec the worker keeps what each
  // encoding lost and adds it to its next gradient (error feedback): the server receives
  // the sum of the gradients less what the worker still keeps (residual()).
  TORCH_ARG(Compression, compression) = Compression();
};


struct AsGradWorkerStats : OptimizerStats {
  AsGradWorkerStats() : OptimizerStats("AsGradWorker") {}
  int64_t gradients = 0;    // gradients returned
  int64_t jobs = 0;         // jobs received
  int64_t job_version = 0;  // version of the current job
  double wait_seconds = 0;  // time spent waiting for jobs
  std::string str() const override;
  std::string to_json() const override;
};

class AsGradWorker : public DistributedOptimizer {
 public:
  // `world`: nullptr takes the process's default (distributed_optimizer.h).
  // `params`: a list of tensors, named parameters or parameter groups (Params).
  AsGradWorker(Params params, WorkerOptions options = WorkerOptions(),
               std::shared_ptr<World> world = nullptr, Model model = {});
  // If finish() was not called: warns and finishes with a 10 s bound.
  ~AsGradWorker() override;

  // Returns the gradient and loads the next job. After done(), does nothing.
  torch::Tensor step(LossClosure closure = nullptr) override;
  bool done() const override { return done_; }
  // Says this worker takes no more jobs (if training is not over yet) and closes;
  // false if the server did not finish within `timeout`.
  bool finish(std::chrono::milliseconds timeout = std::chrono::seconds(60)) override;
  // Nothing to average: every job carries the server's model.
  void resync() override {}
  AsGradWorkerStats stats() const { return stats_; }
  // What the gradient encodings lost and the next gradient carries (undefined without
  // compression). Saved in checkpoints; resumed without compression, it is sent once.
  const at::Tensor& residual() const { return residual_; }

 protected:
  void save_state(torch::serialize::OutputArchive& archive) const override;
  void load_state(torch::serialize::InputArchive& archive) override;
  std::unique_ptr<OptimizerStats> stats_snapshot() const override {
    return std::make_unique<AsGradWorkerStats>(stats_);
  }

 private:
  void wait_for_job();

  WorkerOptions options_;
  std::shared_ptr<World> world_;
  std::unique_ptr<Channel> channel_;
  at::Tensor grads_;
  at::Tensor residual_;  // error feedback: float32, on the CPU
  at::Tensor encoded_;   // the encoded gradient (bytes)
  std::deque<Message> arrivals_;  // from the server, not yet used
  AsGradWorkerStats stats_;
  bool done_ = false;
};

}  // namespace torch_asgd
