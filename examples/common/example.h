// What the MNIST and CIFAR examples share: their command line, data sharding and
// sampling (ALGORITHMS.md section 4), the training loop of every algorithm, the
// progress display, the end-of-run summary and the metrics JSON. An example provides
// a Task (its data and its network) and calls run().
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>

#include <torch/torch.h>

namespace torch_asgd {
namespace examples {

struct ExampleOptions {
  std::string algo = "dasgd";  // dasgd gossip asgd-pure asgd-random asgd-shuffle sync local
  std::string data;
  int epochs = 1;
  int batch_size = 32;
  double lr = 0.03;
  double momentum = 0.7;
  std::string step_rule = "constant";  // server algorithms: constant, delay-adaptive
  int broadcast_every = 1;
  std::string partition = "iid";        // iid, by-label
  std::string sampling = "reshuffle";   // reshuffle, shuffle-once, with-replacement
  int straggler_rank = -1;
  double straggler_factor = 1;
  double target_accuracy = 0;  // 0: none
  int eval_every = 200;        // steps of rank 0 (gradients of the server)
  std::string metrics_out;
  uint64_t seed = 1;
  std::string device = "cpu";
  int threads = 1;
  int64_t synthetic = 0;  // CIFAR: generate this many labelled images instead of reading
  std::string checkpoint_dir;  // empty: no checkpoints
  int checkpoint_every = 500;  // steps of each rank (gradients of the server)
  bool resume = false;
  bool overlap = false;  // dasgd on cuda: DASGDOptions::overlap
  bool help = false;
};

struct Dataset {
  torch::Tensor images;  // [N, C, H, W] float
  torch::Tensor labels;  // [N] int64
};

struct Task {
  std::string program;       // "asgd-mnist"
  std::string default_data;  // default --data
  // Train and test sets; throws std::runtime_error with one clear line.
  std::function<std::pair<Dataset, Dataset>(const ExampleOptions&)> load;
  std::function<std::shared_ptr<torch::nn::Module>()> make_model;
  // Log-probabilities [N, 10].
  std::function<torch::Tensor(torch::nn::Module&, const torch::Tensor&)> forward;
  // Training-time augmentation of a batch (none if empty).
  std::function<torch::Tensor(const torch::Tensor&, torch::Generator&)> augment;
};

// Throws std::invalid_argument with one line on a bad command line.
ExampleOptions parse_options(int argc, char** argv, const Task& task);
std::string usage(const Task& task);

// The whole program: returns the process exit code. Bad input prints one line
// ("<program>: <what is wrong and what to do>") and returns non-zero.
int run(const Task& task, int argc, char** argv);

}  // namespace examples
}  // namespace torch_asgd
