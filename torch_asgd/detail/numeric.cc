#include "torch_asgd/detail/numeric.h"

#include <cstring>

#include <ATen/ATen.h>

#include "torch_asgd/comm/wire.h"

namespace torch_asgd {
namespace detail {

namespace {

// Exponent all ones: NaN or infinity. Tight loops over the bits, which compilers vectorize.
template <typename Bits>
bool finite_bits(const uint8_t* p, size_t n, Bits mask) {
  Bits bad = 0;
  const size_t count = n / sizeof(Bits);
  for (size_t i = 0; i < count; ++i) {
    Bits v;
    std::memcpy(&v, p + i * sizeof(Bits), sizeof(Bits));
    bad |= static_cast<Bits>((v & mask) == mask);
  }
  return bad == 0;
}

template <typename T>
void add_loop(uint8_t* dst, const uint8_t* src, size_t bytes) {
  const size_t n = bytes / sizeof(T);
  T* d = reinterpret_cast<T*>(dst);
  const T* s = reinterpret_cast<const T*>(src);
  for (size_t i = 0; i < n; ++i) d[i] += s[i];
}

}  // namespace

bool all_finite(const void* data, size_t bytes, c10::ScalarType dtype) {
  const auto* p = static_cast<const uint8_t*>(data);
  switch (dtype) {
    case c10::ScalarType::Float: return finite_bits<uint32_t>(p, bytes, 0x7f800000u);
    case c10::ScalarType::Double: return finite_bits<uint64_t>(p, bytes, 0x7ff0000000000000ull);
    case c10::ScalarType::Half: return finite_bits<uint16_t>(p, bytes, 0x7c00u);
    case c10::ScalarType::BFloat16: return finite_bits<uint16_t>(p, bytes, 0x7f80u);
    default: return true;
  }
}

void add_into(void* dst, const void* src, size_t bytes, c10::ScalarType dtype) {
  auto* d = static_cast<uint8_t*>(dst);
  const auto* s = static_cast<const uint8_t*>(src);
  switch (dtype) {
    case c10::ScalarType::Float: add_loop<float>(d, s, bytes); return;
    case c10::ScalarType::Double: add_loop<double>(d, s, bytes); return;
    case c10::ScalarType::Long: add_loop<int64_t>(d, s, bytes); return;
    case c10::ScalarType::Int: add_loop<int32_t>(d, s, bytes); return;
    default: {
      const int64_t n = static_cast<int64_t>(bytes / dtype_size(dtype));
      auto opts = at::TensorOptions().dtype(dtype);
      at::from_blob(d, {n}, opts).add_(at::from_blob(const_cast<uint8_t*>(s), {n}, opts));
    }
  }
}

bool all_finite(const at::Tensor& t) {
  if (!c10::isFloatingType(t.scalar_type())) return true;
  if (t.device().is_cpu() && t.is_contiguous()) {
    return all_finite(t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size(), t.scalar_type());
  }
  return at::isfinite(t).all().item<bool>();
}

}  // namespace detail
}  // namespace torch_asgd
