#include "torch_asgd/cuda/kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace torch_asgd {
namespace cuda {
namespace {

// Each block of a launch handles one chunk: up to kChunk elements of one parameter.
constexpr int64_t kChunk = 1 << 16;
constexpr int kThreads = 256;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("torch_asgd CUDA: ") + what + ": " + cudaGetErrorString(e));
  }
}

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

}  // namespace

struct ParamTable::Device {
  // Per chunk: the parameter's pointer, the chunk's first element within it, its
  // length, and the chunk's offset in the flat vector.
  void** data;
  int64_t* start;
  int64_t* length;
  int64_t* flat_offset;
};

namespace {

struct Chunk {
  void* data;
  int64_t start, length, flat_offset;
};

template <typename T, typename Op>
__global__ void for_each_chunk(ParamTable::Device t, Op op) {
  const int c = blockIdx.x;
  T* p = static_cast<T*>(t.data[c]) + t.start[c];
  const int64_t n = t.length[c];
  const int64_t flat = t.flat_offset[c];
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    store(p, i, op(load(p, i), flat + i));
  }
}

template <typename Op>
void launch(const ParamTable& table, Op op, void* stream) {
  if (table.chunks() == 0) return;
  ParamTable::Device d = *table.device();
  auto s = static_cast<cudaStream_t>(stream);
  switch (table.dtype()) {
    case DType::kFloat32:
      for_each_chunk<float><<<table.chunks(), kThreads, 0, s>>>(d, op);
      break;
    case DType::kFloat16:
      for_each_chunk<__half><<<table.chunks(), kThreads, 0, s>>>(d, op);
      break;
    case DType::kBFloat16:
      for_each_chunk<__nv_bfloat16><<<table.chunks(), kThreads, 0, s>>>(d, op);
      break;
  }
  check(cudaGetLastError(), "kernel launch");
}

// At most this many flat vectors per fused launch (passed by value).
constexpr int kMaxInputs = 8;

struct Inputs {
  const float* v[kMaxInputs];
  int count;
};

struct AddDeltas {
  Inputs in;
  float scale;
  __device__ float operator()(float x, int64_t j) const {
    float s = 0;
    for (int k = 0; k < in.count; ++k) s += in.v[k][j];
    return x + scale * s;
  }
};

struct Mix {
  Inputs in;
  float weight;
  __device__ float operator()(float x, int64_t j) const {
    float s = 0;
    for (int k = 0; k < in.count; ++k) s += in.v[k][j];
    return (1.0f - weight) * x + weight * (s / static_cast<float>(in.count));
  }
};

struct Sgd {
  const float* grad;
  float* buf;
  float lr, momentum;
  __device__ float operator()(float x, int64_t j) const {
    float g = grad[j];
    if (buf != nullptr) {
      g = momentum * buf[j] + g;
      buf[j] = g;
    }
    return x - lr * g;
  }
};

template <typename Op>
void launch_batched(const ParamTable& table, const float* const* vectors, int count, void* stream,
                    Op make) {
  if (count < 0) throw std::invalid_argument("torch_asgd CUDA: negative input count");
  // More inputs than one launch takes: fold them in groups (still one launch per group).
  for (int first = 0; first < count; first += kMaxInputs) {
    Inputs in{};
    in.count = count - first < kMaxInputs ? count - first : kMaxInputs;
    for (int k = 0; k < in.count; ++k) in.v[k] = vectors[first + k];
    launch(table, make(in), stream);
  }
}

}  // namespace

ParamTable::ParamTable(const std::vector<void*>& data, const std::vector<int64_t>& numel, DType dtype)
    : dtype_(dtype), pointers_(data) {
  if (data.size() != numel.size()) throw std::invalid_argument("ParamTable: data and numel differ in length");
  std::vector<void*> ptr;
  std::vector<int64_t> start, length, offset;
  for (size_t i = 0; i < data.size(); ++i) {
    if (numel[i] < 0) throw std::invalid_argument("ParamTable: negative numel");
    for (int64_t s = 0; s < numel[i]; s += kChunk) {
      ptr.push_back(data[i]);
      start.push_back(s);
      length.push_back(numel[i] - s < kChunk ? numel[i] - s : kChunk);
      offset.push_back(total_ + s);
    }
    total_ += numel[i];
  }
  chunks_ = static_cast<int>(ptr.size());
  device_ = new Device{};
  if (chunks_ == 0) return;
  const size_t n = static_cast<size_t>(chunks_);
  char* mem = nullptr;
  check(cudaMalloc(&mem, n * (sizeof(void*) + 3 * sizeof(int64_t))), "cudaMalloc of the parameter table");
  device_->data = reinterpret_cast<void**>(mem);
  device_->start = reinterpret_cast<int64_t*>(mem + n * sizeof(void*));
  device_->length = device_->start + n;
  device_->flat_offset = device_->length + n;
  check(cudaMemcpy(device_->data, ptr.data(), n * sizeof(void*), cudaMemcpyHostToDevice), "table upload");
  check(cudaMemcpy(device_->start, start.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice), "table upload");
  check(cudaMemcpy(device_->length, length.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice), "table upload");
  check(cudaMemcpy(device_->flat_offset, offset.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice),
        "table upload");
}

ParamTable::~ParamTable() {
  if (device_ != nullptr && chunks_ > 0) cudaFree(device_->data);
  delete device_;
}

void apply_deltas(const ParamTable& table, const float* const* deltas, int count, float scale,
                  void* stream) {
  launch_batched(table, deltas, count, stream, [&](const Inputs& in) { return AddDeltas{in, scale}; });
}

void gossip_mix(const ParamTable& table, const float* const* models, int count, float weight,
                void* stream) {
  if (count == 0) return;
  if (count > kMaxInputs) {
    throw std::invalid_argument("torch_asgd CUDA: gossip_mix takes at most 8 models per call");
  }
  launch_batched(table, models, count, stream, [&](const Inputs& in) { return Mix{in, weight}; });
}

void sgd_update(const ParamTable& table, const float* grad, float* buf, float lr, float momentum,
                void* stream) {
  launch(table, Sgd{grad, momentum > 0 ? buf : nullptr, lr, momentum}, stream);
}

bool device_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear it
    return false;
  }
  return n > 0;
}

}  // namespace cuda
}  // namespace torch_asgd
