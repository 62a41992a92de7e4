// The local update rule of torch::optim::SGD (weight decay, momentum, dampening,
// Nesterov), operation for operation, so that with no peers an optimizer built on it
// is bit-identical to torch::optim::SGD.
#pragma once

#include <string>

#include <torch/optim/optimizer.h>

#include "torch_asgd/comm/error.h"
#include "torch_asgd/optim/momentum_state.h"

namespace torch_asgd {
namespace detail {

struct SGDRule {
  double lr = 0.01;
  double momentum = 0;
  double dampening = 0;
  double weight_decay = 0;
  bool nesterov = false;
};

// Throws c10::Error naming the bad value, as torch::optim::SGD's constructor does.
void check(const SGDRule& rule);

// The direction d_p for parameter `p` with gradient `grad` (the update is -lr * d_p).
// `momentum_buffer` is the parameter's state: undefined on the first step, then kept.
at::Tensor sgd_direction(const SGDRule& rule, const at::Tensor& p, const at::Tensor& grad,
                         at::Tensor& momentum_buffer);

// Runs the rule over every parameter that has a gradient, in group order, keeping
// momentum buffers in `state` keyed as LibTorch keys them, and calls
// fn(index, param, d_p, lr) with the parameter's index across all groups. Options is
// the optimizer's options type (with lr, momentum, dampening, weight_decay,
// nesterov). Returns whether any parameter had a gradient.
template <typename Options, typename State, typename Fn>
bool for_each_sgd_update(std::vector<torch::optim::OptimizerParamGroup>& groups, State& state,
                         Fn&& fn) {
  bool any = false;
  size_t index = 0;
  for (auto& group : groups) {
    const auto& o = static_cast<const Options&>(group.options());
    const SGDRule rule{o.lr(), o.momentum(), o.dampening(), o.weight_decay(), o.nesterov()};
    for (auto& p : group.params()) {
      const size_t i = index++;
      if (!p.grad().defined()) continue;
      at::Tensor buf;
      const std::string key = c10::guts::to_string(p.unsafeGetTensorImpl());
      auto found = state.find(key);
      if (found != state.end()) buf = static_cast<MomentumState&>(*found->second).momentum_buffer();
      at::Tensor d_p = sgd_direction(rule, p, p.grad(), buf);
      if (rule.momentum != 0 && found == state.end()) {
        auto s = std::make_unique<MomentumState>();
        s->momentum_buffer(buf);
        state[key] = std::move(s);
      }
      fn(i, p, d_p, rule.lr);
      any = true;
    }
  }
  return any;
}

// Gives the constructed optimizer's groups the options the caller gave: some LibTorch
// versions replace a custom optimizer's per-group options with the defaults in
// add_param_group.
inline void reapply_group_options(const std::vector<torch::optim::OptimizerParamGroup>& given,
                                  std::vector<torch::optim::OptimizerParamGroup>& groups) {
  for (size_t i = 0; i < given.size(); ++i) {
    if (given[i].has_options()) groups[i].set_options(given[i].options().clone());
  }
}

// Throws ConfigError unless every group has options of type Options (named
// `optimizer`Options), and checks each group's rule.
template <typename Options>
void check_groups(const std::vector<torch::optim::OptimizerParamGroup>& groups,
                  const std::string& optimizer) {
  for (size_t i = 0; i < groups.size(); ++i) {
    const auto* o = dynamic_cast<const Options*>(&groups[i].options());
    if (o == nullptr) {
      throw ConfigError(optimizer + ": parameter group " + std::to_string(i) +
                        " has options of another optimizer; give it " + optimizer + "Options");
    }
    check(SGDRule{o->lr(), o->momentum(), o->dampening(), o->weight_decay(), o->nesterov()});
  }
}

}  // namespace detail
}  // namespace torch_asgd
