#include "torch_asgd/optim/detail/flat_params.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include "torch_asgd/comm/error.h"

namespace torch_asgd {
namespace detail {

FlatParams::FlatParams(const std::vector<torch::optim::OptimizerParamGroup>& groups,
                       std::vector<std::string> names) {
  for (const auto& g : groups) {
    for (const auto& p : g.params()) params_.push_back(p);
  }
  if (names.empty()) {
    for (size_t i = 0; i < params_.size(); ++i) names.push_back(fmt::format("param[{}]", i));
  }
  if (names.size() != params_.size()) {
    throw ConfigError(fmt::format("{} parameter names for {} parameters", names.size(), params_.size()));
  }
  names_ = std::move(names);
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& p = params_[i];
    if (i == 0) dtype_ = p.scalar_type();
    if (p.scalar_type() != dtype_) {
      throw ConfigError(fmt::format(
          "parameter '{}' is {} but '{}' is {}: all parameters must share one dtype", names_[i],
          c10::toString(p.scalar_type()), names_[0], c10::toString(dtype_)));
    }
    if (!p.is_contiguous()) {
      throw ConfigError(fmt::format("parameter '{}' is not contiguous", names_[i]));
    }
    offsets_.push_back(numel_);
    numel_ += p.numel();
  }
}

at::Tensor FlatParams::view(const at::Tensor& flat, size_t i) const {
  return flat.narrow(0, offsets_[i], params_[i].numel()).view(params_[i].sizes());
}

at::Tensor FlatParams::flatten() const {
  auto out = torch::empty({numel_}, torch::TensorOptions().dtype(dtype_));
  for (size_t i = 0; i < params_.size(); ++i) view(out, i).copy_(params_[i].detach());
  return out;
}

void FlatParams::gather_grads(const at::Tensor& flat) const {
  for (size_t i = 0; i < params_.size(); ++i) {
    auto v = view(flat, i);
    if (params_[i].grad().defined()) {
      v.copy_(params_[i].grad());
    } else {
      v.zero_();
    }
  }
}

void FlatParams::add_(const at::Tensor& flat) const {
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) params_[i].add_(view(flat, i));
}

void FlatParams::copy_(const at::Tensor& flat) const {
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) params_[i].copy_(view(flat, i));
}

Fingerprint FlatParams::fingerprint() const {
  Fingerprint fp;
  for (size_t i = 0; i < params_.size(); ++i) {
    fp.add(names_[i], params_[i].sizes(), params_[i].scalar_type());
  }
  return fp;
}

torch::OrderedDict<std::string, at::Tensor> default_names(const std::vector<at::Tensor>& params) {
  torch::OrderedDict<std::string, at::Tensor> named;
  for (size_t i = 0; i < params.size(); ++i) named.insert(fmt::format("param[{}]", i), params[i]);
  return named;
}

}  // namespace detail
}  // namespace torch_asgd
