// The local update rule of torch::optim::SGD (weight decay, momentum, dampening,
// Nesterov), operation for operation, so that with no peers an optimizer built on it
// is bit-identical to torch::optim::SGD.
#pragma once

#include <torch/optim/optimizer.h>

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

}  // namespace detail
}  // namespace torch_asgd
