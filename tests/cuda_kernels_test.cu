// The fused kernels of torch_asgd/cuda against a CPU reference: random shapes (odd
// sizes, empty tensors, tensors spanning many chunks), fp32, fp16 and bf16. Skipped
// when no CUDA device is present.
#include <gtest/gtest.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "torch_asgd/cuda/kernels.h"

namespace torch_asgd {
namespace {

using cuda::DType;

#define SKIP_WITHOUT_GPU() \
  if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device"

float to_float(float v) { return v; }
float to_float(__half v) { return __half2float(v); }
float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
T from_float(float v);
template <>
float from_float<float>(float v) { return v; }
template <>
__half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
DType dtype_of();
template <>
DType dtype_of<float>() { return DType::kFloat32; }
template <>
DType dtype_of<__half>() { return DType::kFloat16; }
template <>
DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }

// Shapes: empty, 1, odd, and one over two chunks of 65536.
const std::vector<int64_t> kSizes = {0, 1, 7, 1001, 4096, 65536 * 2 + 3, 13};

template <typename T>
struct Model {
  std::vector<std::vector<T>> host;
  std::vector<T*> device;
  std::unique_ptr<cuda::ParamTable> table;

  explicit Model(std::mt19937& rng) {
    std::normal_distribution<float> d;
    std::vector<void*> ptrs;
    for (int64_t n : kSizes) {
      std::vector<T> h(static_cast<size_t>(n));
      for (auto& v : h) v = from_float<T>(d(rng));
      T* p = nullptr;
      EXPECT_EQ(cudaMalloc(&p, std::max<int64_t>(n, 1) * sizeof(T)), cudaSuccess);
      EXPECT_EQ(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
      host.push_back(std::move(h));
      device.push_back(p);
      ptrs.push_back(p);
    }
    table = std::make_unique<cuda::ParamTable>(ptrs, kSizes, dtype_of<T>());
  }
  ~Model() {
    for (T* p : device) cudaFree(p);
  }
  // The device's parameters, read back.
  std::vector<std::vector<T>> read() const {
    std::vector<std::vector<T>> out;
    for (size_t i = 0; i < kSizes.size(); ++i) {
      std::vector<T> h(static_cast<size_t>(kSizes[i]));
      EXPECT_EQ(cudaMemcpy(h.data(), device[i], h.size() * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
      out.push_back(std::move(h));
    }
    return out;
  }
};

int64_t total() {
  int64_t t = 0;
  for (int64_t n : kSizes) t += n;
  return t;
}

struct Flat {
  std::vector<float> host;
  float* device = nullptr;
  Flat(std::mt19937& rng, int64_t n) : host(static_cast<size_t>(n)) {
    std::normal_distribution<float> d;
    for (auto& v : host) v = d(rng);
    EXPECT_EQ(cudaMalloc(&device, std::max<int64_t>(n, 1) * sizeof(float)), cudaSuccess);
    upload();
  }
  void upload() {
    EXPECT_EQ(cudaMemcpy(device, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<float> read() const {
    std::vector<float> h(host.size());
    EXPECT_EQ(cudaMemcpy(h.data(), device, h.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
  ~Flat() { cudaFree(device); }
};

// Compares the device's parameters with `expected(i, j, old)` rounded to T: exactly
// one rounding apart at most (fp32: a relative 1e-6, for contraction into FMAs).
template <typename T, typename F>
void expect_params(const Model<T>& m, const std::vector<std::vector<T>>& before, F expected,
                   const std::string& what) {
  auto got = m.read();
  int64_t flat = 0, bad = 0;
  for (size_t i = 0; i < kSizes.size(); ++i) {
    for (int64_t j = 0; j < kSizes[i]; ++j, ++flat) {
      const float want_f = expected(flat, to_float(before[i][j]));
      const float want = to_float(from_float<T>(want_f));
      const float g = to_float(got[i][j]);
      const float tol = sizeof(T) == 4 ? 1e-6f * (1 + std::fabs(want))
                                       : (sizeof(T) == 2 && dtype_of<T>() == DType::kFloat16 ? 1e-3f : 8e-3f) *
                                             (1 + std::fabs(want));
      if (!(std::fabs(g - want) <= tol)) {
        if (bad++ < 5) ADD_FAILURE() << what << ": parameter " << i << " element " << j << ": got " << g
                                     << ", expected " << want;
      }
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

template <typename T>
class Kernels : public ::testing::Test {};
using Types = ::testing::Types<float, __half, __nv_bfloat16>;
TYPED_TEST_SUITE(Kernels, Types);

TYPED_TEST(Kernels, ApplyDeltasAddsTheScaledSum) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(1);
  for (int count : {0, 1, 3, 11}) {  // 11: more than one launch takes
    Model<TypeParam> m(rng);
    auto before = m.host;
    std::vector<std::unique_ptr<Flat>> deltas;
    std::vector<const float*> ptrs;
    for (int k = 0; k < count; ++k) {
      deltas.push_back(std::make_unique<Flat>(rng, total()));
      ptrs.push_back(deltas.back()->device);
    }
    cuda::apply_deltas(*m.table, ptrs.data(), count, -0.5f, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    expect_params(m, before, [&](int64_t j, float x) {
      float s = 0;
      for (auto& d : deltas) s += d->host[j];
      return x + -0.5f * s;
    }, "apply_deltas x" + std::to_string(count));
  }
}

TYPED_TEST(Kernels, GossipMixesTowardTheMean) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(2);
  Model<TypeParam> m(rng);
  auto before = m.host;
  Flat a(rng, total()), b(rng, total());
  const float* models[] = {a.device, b.device};
  cuda::gossip_mix(*m.table, models, 2, 0.25f, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_params(m, before, [&](int64_t j, float x) {
    return 0.75f * x + 0.25f * ((a.host[j] + b.host[j]) / 2);
  }, "gossip_mix");
}

TYPED_TEST(Kernels, SgdWithAndWithoutMomentum) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(3);
  for (float momentum : {0.0f, 0.9f}) {
    Model<TypeParam> m(rng);
    auto before = m.host;
    Flat grad(rng, total()), buf(rng, total());
    cuda::sgd_update(*m.table, grad.device, buf.device, 0.1f, momentum, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    expect_params(m, before, [&](int64_t j, float x) {
      const float g = momentum > 0 ? momentum * buf.host[j] + grad.host[j] : grad.host[j];
      return x - 0.1f * g;
    }, "sgd_update momentum " + std::to_string(momentum));
    if (momentum > 0) {
      auto got = buf.read();
      for (size_t j = 0; j < got.size(); ++j) {
        ASSERT_NEAR(got[j], momentum * buf.host[j] + grad.host[j], 1e-5f) << j;
      }
    }
  }
}

TEST(KernelsTable, CountsChunksAndElements) {
  SKIP_WITHOUT_GPU();
  std::vector<void*> ptrs(kSizes.size(), nullptr);
  cuda::ParamTable t(ptrs, kSizes, DType::kFloat32);  // pointers are never dereferenced here
  EXPECT_EQ(t.numel(), total());
  EXPECT_EQ(t.chunks(), 1 + 1 + 1 + 1 + 3 + 1);  // the empty tensor has no chunk
}

TEST(KernelsTable, AvailabilityIsAnAnswerNotAnError) {
  // Runs everywhere: without a device (or a driver) it says false.
  const bool available = cuda::device_available();
  RecordProperty("cuda_device_available", available ? "yes" : "no");
  SUCCEED();
}

}  // namespace
}  // namespace torch_asgd
