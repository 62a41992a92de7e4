// The parameters of an optimizer seen as one flat vector, in parameter-group order:
// what travels between ranks is always this vector (or a delta of it).
//
// Flat vectors that travel are CPU tensors; the parameters may live on another device
// (CUDA). flatten() and gather_grads() then gather on that device and copy the whole
// vector to the host at once, and add_() and copy_() move a host vector to the device
// at once, not one small copy per parameter.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/optim/optimizer.h>
#include <torch/ordered_dict.h>

#include "torch_asgd/comm/fingerprint.h"

namespace torch_asgd {
namespace cuda {
class ParamTable;
}  // namespace cuda
namespace detail {

class FlatParams {
 public:
  FlatParams() = default;
  // `names` may be empty (then parameters are called "param[i]").
  FlatParams(const std::vector<torch::optim::OptimizerParamGroup>& groups,
             std::vector<std::string> names);

  int64_t numel() const { return numel_; }
  c10::ScalarType dtype() const { return dtype_; }
  int64_t bytes() const { return numel_ * static_cast<int64_t>(c10::elementSize(dtype_)); }
  const std::vector<at::Tensor>& params() const { return params_; }
  const std::vector<std::string>& names() const { return names_; }
  int64_t offset(size_t i) const { return offsets_[i]; }
  // Where the parameters live (all on one device; the constructor checks).
  const c10::Device& device() const { return device_; }
  bool on_cpu() const { return device_.is_cpu(); }
  // `flat` on the parameters' device (itself when it already is).
  at::Tensor on_device(const at::Tensor& flat) const;

  // The slice of a flat vector that belongs to parameter i, shaped like it.
  at::Tensor view(const at::Tensor& flat, size_t i) const;

  at::Tensor flatten() const;                // a CPU copy of all parameters
  // Copies every parameter's gradient into the CPU vector `flat` (zeros where a
  // parameter has none).
  void gather_grads(const at::Tensor& flat) const;
  void add_(const at::Tensor& flat, double alpha = 1) const;  // params += alpha * flat (any device)
  void copy_(const at::Tensor& flat) const;  // params = flat (any device)

  Fingerprint fingerprint() const;

 private:
  std::vector<at::Tensor> params_;
  std::vector<std::string> names_;
  std::vector<int64_t> offsets_;
  int64_t numel_ = 0;
  c10::ScalarType dtype_ = c10::ScalarType::Float;
  c10::Device device_ = c10::Device(c10::kCPU);
  // The fused kernels' table of the parameters (CUDA builds, CUDA parameters only).
  std::shared_ptr<cuda::ParamTable> fused_;
};

// Parameters named "param[0]", "param[1]", ... for optimizers given no names.
torch::OrderedDict<std::string, at::Tensor> default_names(const std::vector<at::Tensor>& params);

}  // namespace detail
}  // namespace torch_asgd
