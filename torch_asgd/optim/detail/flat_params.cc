#include "torch_asgd/optim/detail/flat_params.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include "torch_asgd/comm/error.h"
#ifdef TORCH_ASGD_WITH_CUDA
#include "torch_asgd/cuda/fused.h"
#include "torch_asgd/cuda/kernels.h"
#endif

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
    if (i == 0) {
      dtype_ = p.scalar_type();
      device_ = p.device();
    }
    if (p.device() != device_) {
      throw ConfigError(fmt::format(
          "parameter '{}' is on {} but '{}' is on {}: all parameters must be on one device "
          "(move the model with module->to(device) before creating the optimizer)",
          names_[i], p.device().str(), names_[0], device_.str()));
    }
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
#ifdef TORCH_ASGD_WITH_CUDA
  fused_ = cuda::make_param_table(*this);
#endif
}

at::Tensor FlatParams::view(const at::Tensor& flat, size_t i) const {
  return flat.narrow(0, offsets_[i], params_[i].numel()).view(params_[i].sizes());
}

at::Tensor FlatParams::on_device(const at::Tensor& flat) const {
  return flat.device() == device_ ? flat : flat.to(device_);
}

at::Tensor FlatParams::flatten() const {
  if (!on_cpu()) {
    // One gather on the device, one copy to the host.
    std::vector<at::Tensor> parts;
    for (const auto& p : params_) parts.push_back(p.detach().reshape({-1}));
    return parts.empty() ? torch::empty({0}, torch::TensorOptions().dtype(dtype_))
                         : torch::cat(parts).to(torch::kCPU);
  }
  auto out = torch::empty({numel_}, torch::TensorOptions().dtype(dtype_));
  for (size_t i = 0; i < params_.size(); ++i) view(out, i).copy_(params_[i].detach());
  return out;
}

void FlatParams::gather_grads(const at::Tensor& flat) const {
  if (!on_cpu() && flat.device() != device_) {
    std::vector<at::Tensor> parts;
    for (const auto& p : params_) {
      parts.push_back(p.grad().defined() ? p.grad().reshape({-1}) : torch::zeros({p.numel()}, p.options()));
    }
    if (!parts.empty()) flat.copy_(torch::cat(parts));
    return;
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    auto v = view(flat, i);
    if (params_[i].grad().defined()) {
      v.copy_(params_[i].grad());
    } else {
      v.zero_();
    }
  }
}

void FlatParams::add_(const at::Tensor& flat, double alpha) const {
  torch::NoGradGuard no_grad;
  const at::Tensor here = on_device(flat);
#ifdef TORCH_ASGD_WITH_CUDA
  // One launch over every parameter instead of one per parameter.
  if (fused_ && cuda::fused_add(*this, fused_.get(), here.contiguous(), static_cast<float>(alpha))) {
    return;
  }
#endif
  for (size_t i = 0; i < params_.size(); ++i) params_[i].add_(view(here, i), alpha);
}

void FlatParams::copy_(const at::Tensor& flat) const {
  torch::NoGradGuard no_grad;
  const at::Tensor here = on_device(flat);
  for (size_t i = 0; i < params_.size(); ++i) params_[i].copy_(view(here, i));
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
