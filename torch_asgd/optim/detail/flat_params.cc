#include "torch_asgd/optim/detail/flat_params.h"

#include <unordered_set>

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
  std::unordered_set<const void*> seen;
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
    if (!seen.insert(p.unsafeGetTensorImpl()).second) {
      throw ConfigError(fmt::format("parameter '{}' is given twice; give each parameter once",
                                    names_[i]));
    }
    offsets_.push_back(numel_);
    numel_ += p.numel();
  }
  // One buffer; every parameter becomes a view of it, keeping its values and identity.
  torch::NoGradGuard no_grad;
  flat_ = torch::empty({numel_}, torch::TensorOptions().dtype(dtype_).device(device_));
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor slot = view(flat_, i);
    slot.copy_(params_[i].detach());
    params_[i].set_data(slot);
    addresses_.push_back(params_[i].data_ptr());
  }
}

at::Tensor FlatParams::view(const at::Tensor& flat, size_t i) const {
  return flat.narrow(0, offsets_[i], params_[i].numel()).view(params_[i].sizes());
}

at::Tensor FlatParams::on_device(const at::Tensor& t) const {
  return t.device() == device_ ? t : t.to(device_);
}

bool FlatParams::ensure_views(size_t count) {
  if (count != params_.size()) {
    throw ConfigError(fmt::format(
        "the optimizer holds {} parameters but was built over {}: parameters were added after "
        "construction; every rank must pass all parameter groups to the optimizer before it "
        "is wrapped",
        count, params_.size()));
  }
  bool moved = false;
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& p = params_[i];
    if (p.data_ptr() == addresses_[i]) continue;
    if (p.device() != device_ || p.scalar_type() != dtype_ || p.numel() != view(flat_, i).numel()) {
      throw ConfigError(fmt::format(
          "parameter '{}' is now {} on {} with {} elements, but the optimizer was built for {} on "
          "{} with {}: build the optimizer after moving or changing the model",
          names_[i], c10::toString(p.scalar_type()), p.device().str(), p.numel(),
          c10::toString(dtype_), device_.str(), view(flat_, i).numel()));
    }
    // Given storage of its own (torch::load of the module does that): take the values
    // back into the buffer.
    torch::NoGradGuard no_grad;
    at::Tensor slot = view(flat_, i);
    slot.copy_(p.detach());
    p.set_data(slot);
    moved = true;
  }
  return moved;
}

void FlatParams::gather_grads(const at::Tensor& out) const {
  torch::NoGradGuard no_grad;
  if (out.device() == device_) {
    for (size_t i = 0; i < params_.size(); ++i) {
      auto v = view(out, i);
      if (params_[i].grad().defined()) {
        v.copy_(params_[i].grad());
      } else {
        v.zero_();
      }
    }
    return;
  }
  // Gather on the device, then one copy.
  auto staged = torch::empty({numel_}, torch::TensorOptions().dtype(dtype_).device(device_));
  gather_grads(staged);
  out.copy_(staged);
}

void FlatParams::set_grads(const at::Tensor& flat) const {
  const at::Tensor here = on_device(flat);
  for (size_t i = 0; i < params_.size(); ++i) {
    const_cast<at::Tensor&>(params_[i]).mutable_grad() = view(here, i);
  }
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
