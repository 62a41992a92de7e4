// Per-parameter state of torch_asgd's optimizers: the momentum buffer of the local
// SGD rule, serialized as torch::optim::SGDParamState is.
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

namespace torch_asgd {

struct MomentumState : public torch::optim::OptimizerCloneableParamState<MomentumState> {
  TORCH_ARG(torch::Tensor, momentum_buffer);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

}  // namespace torch_asgd
