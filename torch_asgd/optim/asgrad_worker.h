// AsyncSGD: the worker side of the AsGrad family, a drop-in torch::optim::Optimizer.
// Its parameters always hold the snapshot of the worker's current job; step() after
// loss.backward() returns the gradient, tagged with that snapshot's version, to the
// parameter server and loads the next job (waiting for it if the server has none
// for this worker yet).
//
//   AsyncSGD opt(net->named_parameters(), AsyncSGDOptions(), world);  // waits for job 1
//   while (!opt.done()) { opt.zero_grad(); loss(net, batch).backward(); opt.step(); }
//   opt.finish();
//
// done() turns true when the server says training is over. finish() tells the server
// this worker takes no more jobs (if it is still running) and closes the channel.
// Waits are bounded by the World's timeout: a server that disappears or stays silent
// gives CommError. Thread safety: one training thread.
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

namespace torch_asgd {
namespace detail {
class FlatParams;
}

struct AsyncSGDOptions : public torch::optim::OptimizerCloneableOptions<AsyncSGDOptions> {
  AsyncSGDOptions() = default;
  // The server's rank; the server's options govern the step size.
  TORCH_ARG(int, server_rank) = 0;
  // The worker applies no step itself; lr is kept for LR-scheduler compatibility only.
  TORCH_ARG(double, lr) = 0;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
};

struct AsyncSGDStats {
  int rank = 0;
  int64_t gradients = 0;    // gradients returned
  int64_t jobs = 0;         // jobs received
  int64_t job_version = 0;  // version of the current job
  double wait_seconds = 0;  // time spent waiting for jobs
  std::string str() const;
};

class AsyncSGD : public torch::optim::Optimizer {
 public:
  AsyncSGD(std::vector<torch::Tensor> params, AsyncSGDOptions options,
           std::shared_ptr<World> world);
  AsyncSGD(const torch::OrderedDict<std::string, torch::Tensor>& named_params,
           AsyncSGDOptions options, std::shared_ptr<World> world);
  ~AsyncSGD() override;

  torch::Tensor step(LossClosure closure = nullptr) override;
  bool done() const { return done_; }
  void finish(std::chrono::milliseconds timeout = std::chrono::seconds(60));
  AsyncSGDStats stats() const { return stats_; }

  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 private:
  void wait_for_job();

  AsyncSGDOptions options_;
  std::shared_ptr<World> world_;
  std::unique_ptr<detail::FlatParams> flat_;
  std::unique_ptr<Channel> channel_;
  at::Tensor grads_;
  std::deque<Message> arrivals_;  // from the server, not yet used
  AsyncSGDStats stats_;
  bool done_ = false;
  bool finished_ = false;
};

}  // namespace torch_asgd
