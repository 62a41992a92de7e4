#include "torch_asgd/optim/detail/sgd_rule.h"

#include <torch/optim/serialize.h>
#include <torch/torch.h>

namespace torch_asgd {
namespace detail {

void check(const SGDRule& r) {
  TORCH_CHECK(r.lr >= 0, "Invalid learning rate: ", r.lr);
  TORCH_CHECK(r.momentum >= 0, "Invalid momentum value: ", r.momentum);
  TORCH_CHECK(r.weight_decay >= 0, "Invalid weight_decay value: ", r.weight_decay);
  TORCH_CHECK(!r.nesterov || (r.momentum > 0 && r.dampening == 0),
              "Nesterov momentum requires a momentum and zero dampening");
}

at::Tensor sgd_direction(const SGDRule& r, const at::Tensor& p, const at::Tensor& grad,
                         at::Tensor& buf) {
  auto d_p = grad.data();
  if (r.weight_decay != 0) d_p = d_p.add(p.data(), r.weight_decay);
  if (r.momentum != 0) {
    if (!buf.defined()) {
      buf = torch::clone(d_p).detach();
    } else {
      buf.mul_(r.momentum).add_(d_p, 1 - r.dampening);
    }
    d_p = r.nesterov ? d_p.add(buf, r.momentum) : buf;
  }
  return d_p;
}

}  // namespace detail

void MomentumState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_buffer);
}

void MomentumState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, momentum_buffer);
}

}  // namespace torch_asgd
