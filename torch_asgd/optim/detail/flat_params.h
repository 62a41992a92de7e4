// The parameters of an optimizer as one flat buffer, in parameter-group order.
//
// At construction every parameter becomes a view into one contiguous tensor (on the
// parameters' device), so that "the model", "the model as it was", "the change" and
// "apply a peer's change" are each one contiguous operation, and a message is filled
// straight from the buffer with no gathering. The parameters keep their identity
// (their TensorImpl, which optimizer state is keyed by); only their storage moves.
// Something that gives a parameter storage of its own afterwards (torch::load of the
// module does) is undone by ensure_views(): the values are copied back into the buffer.
// Moving the model to another device or dtype afterwards is refused there.
//
// Flat vectors that travel are CPU tensors; for parameters on another device the
// methods that take or return one copy the whole vector at once.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/optim/optimizer.h>
#include <torch/ordered_dict.h>

#include "torch_asgd/comm/fingerprint.h"

namespace torch_asgd {
namespace detail {

class FlatParams {
 public:
  FlatParams() = default;
  // `names` may be empty (then parameters are called "param[i]"). Throws ConfigError
  // for parameters on several devices or of several dtypes, or a parameter given twice.
  FlatParams(const std::vector<torch::optim::OptimizerParamGroup>& groups,
             std::vector<std::string> names);
  FlatParams(const FlatParams&) = delete;
  FlatParams& operator=(const FlatParams&) = delete;

  int64_t numel() const { return numel_; }
  c10::ScalarType dtype() const { return dtype_; }
  int64_t bytes() const { return numel_ * static_cast<int64_t>(c10::elementSize(dtype_)); }
  const std::vector<at::Tensor>& params() const { return params_; }
  const std::vector<std::string>& names() const { return names_; }
  const c10::Device& device() const { return device_; }
  bool on_cpu() const { return device_.is_cpu(); }

  // The buffer every parameter is a view of (on the parameters' device).
  const at::Tensor& flat() const { return flat_; }
  // The slice of a flat vector that belongs to parameter i, shaped like it.
  at::Tensor view(const at::Tensor& flat, size_t i) const;
  // `t` on the parameters' device (itself when it already is).
  at::Tensor on_device(const at::Tensor& t) const;

  // Makes every parameter a view of the buffer again, keeping its values (returns
  // whether one had storage of its own). Throws ConfigError when parameters were added
  // (`count`: how many the optimizer holds now) or one changed shape, dtype or device.
  bool ensure_views(size_t count);

  // Gradients as one vector: `out` (CPU or device, numel elements) receives every
  // parameter's gradient, zeros where a parameter has none.
  void gather_grads(const at::Tensor& out) const;
  // Every parameter's gradient becomes the slice of `flat` (on the device).
  void set_grads(const at::Tensor& flat) const;

  Fingerprint fingerprint() const;

 private:
  std::vector<at::Tensor> params_;
  std::vector<std::string> names_;
  std::vector<int64_t> offsets_;
  std::vector<const void*> addresses_;  // where each parameter's data must be
  at::Tensor flat_;
  int64_t numel_ = 0;
  c10::ScalarType dtype_ = c10::ScalarType::Float;
  c10::Device device_ = c10::Device(c10::kCPU);
};

// Parameters named "param[0]", "param[1]", ... for optimizers given no names.
torch::OrderedDict<std::string, at::Tensor> default_names(const std::vector<at::Tensor>& params);

}  // namespace detail
}  // namespace torch_asgd
