// The data a rank trains on (docs/algorithms.md, "Data order"): its shard (IID, or by label, the
// heterogeneous setting) or the whole training set in an order of its own, drawn with
// reshuffling, one shuffle, or replacement; and the evaluation of a model.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "common/example.h"

namespace torch_asgd {
namespace examples {

// The indices rank `index` of `count` trains on: shard `index` of the set (equal sizes,
// the same on every rank), or all of it (`partition` full).
torch::Tensor rank_indices(const Dataset& train, int index, int count, const ExampleOptions& o);

class Sampler {
 public:
  Sampler(torch::Tensor indices, std::string mode, uint64_t seed);
  torch::Tensor next(int batch);  // indices of the next batch
  int64_t size() const { return indices_.size(0); }
  torch::Generator& generator() { return gen_; }
  void save(torch::serialize::OutputArchive& a) const;
  // Throws std::runtime_error when the state does not fit these indices.
  void load(torch::serialize::InputArchive& a);

 private:
  torch::Tensor indices_;
  std::string mode_;
  torch::Generator gen_;
  torch::Tensor order_;
  int64_t pos_ = 0;
};

struct Evaluation {
  double accuracy = 0;             // of the predicted class (the language model: the next byte)
  double loss = 0;                 // mean negative log-likelihood per prediction (nats)
  std::vector<double> per_class;   // the Task's classes, where it has some
  double worst() const;            // the worst class's accuracy (else the overall one)
};

// `model` on the first `limit` samples of `set`, in batches of task.eval_batch.
Evaluation evaluate(const Task& task, torch::nn::Module& model, const Dataset& set, int64_t limit);

// The loss the harness trains and evaluates with: the mean negative log-likelihood of
// `labels` ([N] or [N, T]) under `log_probs` ([N, C] or [N, T, C]).
torch::Tensor nll(const torch::Tensor& log_probs, const torch::Tensor& labels,
                  torch::Reduction::Reduction reduction = torch::Reduction::Mean);

}  // namespace examples
}  // namespace torch_asgd
