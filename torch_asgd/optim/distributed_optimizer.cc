#include "torch_asgd/optim/distributed_optimizer.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include <c10/util/Type.h>
#include <fmt/format.h>
#include <torch/optim/lbfgs.h>
#include <torch/torch.h>

#include "torch_asgd/comm/error.h"
#include "torch_asgd/optim/detail/checkpoint.h"
#include "torch_asgd/optim/detail/flat_params.h"

namespace torch_asgd {
namespace {

// The options of a wrapper's parameter group: its learning rate is the inner group's.
struct InnerGroupOptions : public torch::optim::OptimizerCloneableOptions<InnerGroupOptions> {
  InnerGroupOptions(torch::optim::Optimizer* inner, size_t index) : inner_(inner), index_(index) {}

  torch::optim::OptimizerOptions& target() const {
    auto& groups = inner_->param_groups();
    if (index_ >= groups.size()) {
      throw ConfigError(fmt::format("parameter group {} of the wrapper has no group of the inner "
                                    "optimizer any more",
                                    index_));
    }
    return groups[index_].options();
  }
  double get_lr() const override { return target().get_lr(); }
  void set_lr(const double lr) override { target().set_lr(lr); }

 private:
  torch::optim::Optimizer* inner_;
  size_t index_;
};

std::vector<torch::optim::OptimizerParamGroup> groups_of(torch::optim::Optimizer* inner) {
  if (inner == nullptr) throw ConfigError("the inner optimizer is null");
  std::vector<torch::optim::OptimizerParamGroup> out;
  const auto& groups = inner->param_groups();
  for (size_t i = 0; i < groups.size(); ++i) {
    out.emplace_back(groups[i].params(), std::make_unique<InnerGroupOptions>(inner, i));
  }
  return out;
}

std::string type_name(const torch::optim::Optimizer& o) {
  std::string n = c10::demangle(typeid(o).name());
  return n;
}

}  // namespace

DistributedOptimizer::DistributedOptimizer(std::shared_ptr<torch::optim::Optimizer> inner,
                                           std::string algorithm, std::vector<std::string> names)
    : Optimizer(groups_of(inner.get()), std::make_unique<InnerGroupOptions>(inner.get(), 0)),
      inner_(std::move(inner)),
      algorithm_(std::move(algorithm)),
      rule_name_(type_name(*inner_)) {
  if (dynamic_cast<torch::optim::LBFGS*>(inner_.get()) != nullptr) {
    throw ConfigError(fmt::format(
        "{}: torch::optim::LBFGS cannot be the local rule: it evaluates a closure several times "
        "per step, and an asynchronous optimizer applies each rank's step once. Use SGD, Adam, "
        "AdamW, RMSprop or Adagrad",
        algorithm_));
  }
  if (inner_->param_groups().empty()) {
    throw ConfigError(algorithm_ + ": the inner optimizer has no parameters");
  }
  flat_ = std::make_unique<detail::FlatParams>(inner_->param_groups(), std::move(names));
}

DistributedOptimizer::~DistributedOptimizer() = default;

void DistributedOptimizer::add_param_group(const torch::optim::OptimizerParamGroup&) {
  throw ConfigError(fmt::format(
      "{}: parameter groups cannot be added after construction (every rank would have to add the "
      "same group at the same point); give the inner optimizer all its groups before wrapping it",
      algorithm_));
}

bool DistributedOptimizer::refresh_views() {
  // Groups added to the inner optimizer, or to this one through the base class, show as
  // parameters the flat buffer does not hold.
  size_t count = 0;
  for (const auto& g : inner_->param_groups()) count += g.params().size();
  size_t mine = 0;
  for (const auto& g : param_groups_) mine += g.params().size();
  return flat_->ensure_views(std::max(count, mine));
}

torch::Tensor DistributedOptimizer::inner_step(const LossClosure& closure) {
  refresh_views();
  return inner_->step(closure);
}

void DistributedOptimizer::save(torch::serialize::OutputArchive& archive) const {
  const std::string prefix = "torch_asgd/" + algorithm_;
  detail::write_fingerprint(archive, prefix, flat_->fingerprint());
  detail::write_string(archive, prefix + "/rule", rule_name_);
  torch::serialize::OutputArchive inner_archive;
  inner_->save(inner_archive);
  archive.write(prefix + "/inner", inner_archive);
  detail::write_group_lrs(archive, prefix, inner_->param_groups());
  save_state(archive);
}

void DistributedOptimizer::load(torch::serialize::InputArchive& archive) {
  const std::string prefix = "torch_asgd/" + algorithm_;
  detail::check_fingerprint(archive, prefix, flat_->fingerprint(), algorithm_);
  const std::string rule = detail::read_string(archive, prefix + "/rule");
  if (rule != rule_name_) {
    throw MismatchError(fmt::format(
        "{}: the checkpoint was written with {} as the local rule, but this optimizer's is {}; "
        "resume with the same inner optimizer",
        algorithm_, rule, rule_name_));
  }
  torch::serialize::InputArchive inner_archive;
  archive.read(prefix + "/inner", inner_archive);
  // What loading changes is kept, so that a checkpoint refused part way (by a check of
  // the wrapper's state, or by the inner optimizer's own load) leaves this optimizer as it
  // was: LibTorch's loads replace the per-parameter states (a clone shares the tensors,
  // which a load does not write), and the learning rates are read here. A state that
  // cannot be cloned (a rule's own, not derived from OptimizerCloneableParamState) is
  // loaded as before, without the undo.
  auto& groups = inner_->param_groups();
  std::vector<double> lrs;
  for (const auto& g : groups) lrs.push_back(g.options().get_lr());
  std::remove_reference_t<decltype(inner_->state())> state;
  bool undoable = true;
  try {
    for (const auto& [key, s] : inner_->state()) state.emplace(key, s->clone());
  } catch (const c10::Error&) {
    undoable = false;
    state.clear();
  }
  try {
    inner_->load(inner_archive);
    detail::read_group_lrs(archive, prefix, groups);
    load_state(archive);  // checks everything before it changes anything
  } catch (...) {
    if (undoable) inner_->state() = std::move(state);
    for (size_t i = 0; i < groups.size(); ++i) groups[i].options().set_lr(lrs[i]);
    throw;
  }
}

namespace detail {

std::shared_ptr<torch::optim::Optimizer> make_sgd(std::vector<torch::optim::OptimizerParamGroup> groups,
                                                  const torch::optim::SGDOptions& defaults) {
  return std::make_shared<torch::optim::SGD>(std::move(groups), defaults);
}

}  // namespace detail
}  // namespace torch_asgd
