// DistributedOptimizer: what every torch_asgd optimizer is, a torch::optim::Optimizer
// around an inner torch::optim::Optimizer (SGD, Adam, AdamW, RMSprop, Adagrad, or the
// user's own) built over the same parameters, whose step() is the local rule
// (ALGORITHMS.md section 3b).
//
// - Its parameter groups are the inner one's: same parameters, and options whose
//   learning rate reads and writes the inner group's, so that an LR scheduler attached
//   to the wrapper drives the inner optimizer. zero_grad() clears the same gradients.
// - save()/load() (torch::save/torch::load) carry the inner state (momentum buffers,
//   Adam's moments and step counts) with the wrapper's own; load() refuses a checkpoint
//   written for another model or another local rule, naming the difference.
// - Groups cannot be added afterwards (every rank would have to add the same one at the
//   same point): add_param_group() throws ConfigError, and a group added to the inner
//   optimizer is refused at the next step().
// - An optimizer that needs a closure evaluated several times per step (LBFGS) is
//   refused at construction.
// - With one rank every torch_asgd optimizer is exactly its inner optimizer.
//
// At construction the parameters become views into one flat buffer (flat_params.h):
// build the optimizer after moving the model to its device.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/optim/optimizer.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/archive.h>

namespace torch_asgd {
namespace detail {
class FlatParams;
}

class DistributedOptimizer : public torch::optim::Optimizer {
 public:
  ~DistributedOptimizer() override;

  // The local rule.
  torch::optim::Optimizer& inner() { return *inner_; }
  const torch::optim::Optimizer& inner() const { return *inner_; }
  // Its type, as "torch::optim::Adam".
  const std::string& rule_name() const { return rule_name_; }

  // Refused: see above.
  void add_param_group(const torch::optim::OptimizerParamGroup& group);

  void save(torch::serialize::OutputArchive& archive) const override;
  // Throws MismatchError for a checkpoint of another model, rule or optimizer; a
  // checkpoint refused leaves this optimizer, a LibTorch inner one included, as it was.
  void load(torch::serialize::InputArchive& archive) override;

 protected:
  // `algorithm` names the wrapper in errors and checkpoints ("DASGD"). `names` may be
  // empty (parameters are then called "param[i]").
  DistributedOptimizer(std::shared_ptr<torch::optim::Optimizer> inner, std::string algorithm,
                       std::vector<std::string> names);

  // Makes the parameters views of the flat buffer again if something (torch::load of the
  // module) gave them storage of their own; true if it did. Throws ConfigError when
  // parameters were added or moved to another device.
  bool refresh_views();
  // The inner step, after refresh_views().
  torch::Tensor inner_step(const LossClosure& closure);

  // The wrapper's own state beside the inner one's. load_state() reads and checks
  // everything before it changes anything (load() undoes the inner optimizer's load when
  // it throws).
  virtual void save_state(torch::serialize::OutputArchive& archive) const = 0;
  virtual void load_state(torch::serialize::InputArchive& archive) = 0;

  const std::string& algorithm() const { return algorithm_; }
  detail::FlatParams& flat() { return *flat_; }
  const detail::FlatParams& flat() const { return *flat_; }

 private:
  std::shared_ptr<torch::optim::Optimizer> inner_;
  std::string algorithm_;
  std::string rule_name_;
  std::unique_ptr<detail::FlatParams> flat_;
};

namespace detail {
// An inner torch::optim::SGD over `groups` with `defaults`: the shorthand constructors.
std::shared_ptr<torch::optim::Optimizer> make_sgd(std::vector<torch::optim::OptimizerParamGroup> groups,
                                                  const torch::optim::SGDOptions& defaults);
}  // namespace detail

}  // namespace torch_asgd
