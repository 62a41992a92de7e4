// Fused CUDA kernels of torch_asgd: one launch over every parameter of a model.
//
// This header needs neither CUDA's nor LibTorch's headers: the library's C++ code
// calls it with raw device pointers and a cudaStream_t passed as void*. The kernels
// (kernels.cu) are built by CMake's CUDA language when nvcc is found; see the
// README's GPU section.
//
// Every kernel walks a ParamTable: the parameters' device pointers and sizes, and
// their offsets in one flat vector (the layout of detail::FlatParams, which is how
// updates travel between ranks). Arithmetic is in float whatever the parameters'
// dtype (fp32, fp16 or bf16); flat vectors (deltas, gradients, momentum) are fp32.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace torch_asgd {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// The parameters as the kernels see them. Build it once (the pointers of a model's
// parameters do not change between steps) and reuse it: construction uploads the
// table to the device.
class ParamTable {
 public:
  // `data[i]` points to `numel[i]` elements of `dtype` in device memory.
  ParamTable(const std::vector<void*>& data, const std::vector<int64_t>& numel, DType dtype);
  ~ParamTable();
  ParamTable(const ParamTable&) = delete;
  ParamTable& operator=(const ParamTable&) = delete;

  int64_t numel() const { return total_; }
  DType dtype() const { return dtype_; }
  int chunks() const { return chunks_; }
  // The pointers it was built for: if a parameter moved since, build a new table.
  const std::vector<void*>& pointers() const { return pointers_; }

  struct Device;  // the table in device memory (kernels.cu)
  const Device* device() const { return device_; }

 private:
  DType dtype_;
  std::vector<void*> pointers_;
  int64_t total_ = 0;
  int chunks_ = 0;
  Device* device_ = nullptr;
};

// params += scale * (deltas[0] + ... + deltas[count-1]), each delta a flat fp32
// device vector of table.numel() elements. (DASGD's delta mode: the peers' updates.)
void apply_deltas(const ParamTable& table, const float* const* deltas, int count, float scale,
                  void* stream);

// params = (1 - weight) * params + weight * mean(models[0..count-1]), each model a flat
// fp32 device vector. (DASGD's gossip mode.)
void gossip_mix(const ParamTable& table, const float* const* models, int count, float weight,
                void* stream);

// The parameter server's step: with momentum > 0, buf = momentum * buf + grad and
// params -= lr * buf; else params -= lr * grad. grad and buf are flat fp32 device vectors
// (buf may be null when momentum is 0).
void sgd_update(const ParamTable& table, const float* grad, float* buf, float lr, float momentum,
                void* stream);

// Whether a CUDA device is usable by this process (false, not an error, without one).
bool device_available();

}  // namespace cuda
}  // namespace torch_asgd
