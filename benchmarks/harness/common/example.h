// The benchmark harness (asgd-mnist, asgd-cifar, asgd-lm): what the programs
// share: their command line, the data a rank trains on (docs/algorithms.md, "Data
// order"), the training loop of every algorithm with budgets and evaluation on a clock,
// checkpoints, the end-of-run summary and the metrics JSON. A program provides a Task
// (its data and its network) and calls run(). (A short example a user copies is
// examples/mnist/train.cc.)
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>

#include <torch/torch.h>

namespace CLI {
class App;
}

namespace torch_asgd {
namespace examples {

struct ExampleOptions {
  std::string algo = "dasgd";   // dasgd gossip asgd-pure asgd-random asgd-shuffle sync local
  std::string optimizer = "sgd";  // the local rule: sgd adam adamw
  std::string data;
  // How long: epochs (each rank makes epochs x its share of the training set), or a
  // budget for the whole job (samples over all ranks, or seconds).
  int epochs = 1;
  int64_t budget_samples = 0;
  double budget_seconds = 0;
  int batch_size = 32;
  double lr = 0;            // 0: the optimizer's default (sgd 0.03, adam and adamw 0.001)
  double momentum = 0.7;    // sgd
  double weight_decay = -1;  // < 0: the optimizer's default (adamw 0.01, else 0)
  std::string step_rule = "constant";  // server algorithms: constant, delay-adaptive
  int broadcast_every = 1;             // dasgd; gossip: local steps between exchanges
  int64_t max_lead = 0;                // dasgd: the bounded lead (0: off)
  std::string lead_policy = "wait";    // dasgd: wait, damp
  std::string lead_measure = "applied";  // dasgd: applied, progress
  std::string compress = "none";       // dasgd, sync, gossip, asgd-*: codec of the deltas / gradients / models
  double gossip_alpha = 0.5;
  std::string partition = "iid";       // iid, by-label (shards), full (every rank, own order)
  std::string sampling = "reshuffle";  // reshuffle, shuffle-once, with-replacement
  int straggler_rank = -1;
  double straggler_factor = 1;
  double target_accuracy = 0;  // 0: none
  double target_loss = 0;      // 0: none; the time to the first evaluation at or below it
  int eval_every = 200;            // steps of rank 0 (server: gradients); 0: off
  double eval_every_seconds = 0;   // 0: off
  int64_t eval_samples = 2000;     // the fixed test subset evaluated during training
  int64_t final_eval_samples = 0;  // the test samples every rank evaluates at the end; 0: all
  bool eval_deferred = false;      // rank 0 copies its model at each evaluation point and
                                   // evaluates the copies after training (no rank pauses)
  std::string metrics_out;
  uint64_t seed = 1;
  std::string device = "cpu";
  int threads = 1;
  int64_t synthetic = 0;  // CIFAR: generate this many labelled images instead of reading
  std::string checkpoint_dir;  // empty: no checkpoints
  int checkpoint_every = 500;  // steps of each rank (gradients of the server)
  bool resume = false;
  bool overlap = false;  // dasgd on cuda: DASGDOptions::overlap
  int64_t warmup_steps = 0;  // steps of each rank left out of its samples/s
  bool average = false;      // dasgd: DASGDOptions::average (DDP's averaged step)
};

struct Dataset {
  torch::Tensor images;  // the inputs: [N, C, H, W] float; the language model's [N, T] int64
  torch::Tensor labels;  // [N] int64; the language model's next bytes [N, T]
};

struct Task {
  std::string program;       // "asgd-mnist"
  std::string default_data;  // default --data
  // Options of this example only (CIFAR's --synthetic).
  std::function<void(CLI::App&, ExampleOptions&)> extra_options;
  // This example's defaults of the common options (set before the command line is read).
  std::function<void(ExampleOptions&)> defaults;
  // Train and test sets; throws std::runtime_error with one clear line.
  std::function<std::pair<Dataset, Dataset>(const ExampleOptions&)> load;
  std::function<std::shared_ptr<torch::nn::Module>()> make_model;
  // Log-probabilities: [N, classes], or [N, T, vocabulary] for labels [N, T].
  std::function<torch::Tensor(torch::nn::Module&, const torch::Tensor&)> forward;
  int classes = 10;          // per-class accuracies of the classes 0..classes-1; 0: none
  int64_t eval_batch = 1000;  // samples per forward pass when evaluating
  // Training-time augmentation of a batch (none if empty).
  std::function<torch::Tensor(const torch::Tensor&, torch::Generator&)> augment;
};

// Parses the command line. Returns -1 to go on, or the exit code to leave with at once
// (0 after --help, 2 after printing a bad option's error).
int parse_options(int argc, char** argv, const Task& task, ExampleOptions* out);

// The whole program: returns the process exit code: 0, 1 (an error, one line on
// stderr: "<program>: <what is wrong and what to do>"), 2 (a bad command line), or
// 130/143 when stopped by SIGINT/SIGTERM (after its summary and last checkpoint).
int run(const Task& task, int argc, char** argv);

}  // namespace examples
}  // namespace torch_asgd
