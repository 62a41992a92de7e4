#include "torch_asgd/comm/codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include <fmt/format.h>

#include "torch_asgd/comm/error.h"

namespace torch_asgd {

const char* to_string(Codec c) {
  switch (c) {
    case Codec::kNone: return "none";
    case Codec::kBf16: return "bf16";
    case Codec::kFp16: return "fp16";
    case Codec::kInt8: return "int8";
    case Codec::kTopK: return "topk";
  }
  return "unknown";
}

Compression Compression::parse(const std::string& text) {
  const std::string forms = "none, bf16, fp16, int8, topk (1 % of the entries) or topk:F with F in (0, 1]";
  const auto colon = text.find(':');
  const std::string name = text.substr(0, colon);
  for (uint8_t i = 0; i <= kMaxCodec; ++i) {
    const auto c = static_cast<Codec>(i);
    if (name != to_string(c)) continue;
    if (colon == std::string::npos) return Compression(c);
    if (c != Codec::kTopK) break;
    const std::string f = text.substr(colon + 1);
    char* end = nullptr;
    const double fraction = std::strtod(f.c_str(), &end);
    if (f.empty() || end != f.c_str() + f.size() || !(fraction > 0 && fraction <= 1)) break;
    return Compression(c, fraction);
  }
  throw ConfigError(fmt::format("unknown compression '{}': use {}", text, forms));
}

std::string Compression::describe() const {
  if (codec != Codec::kTopK) return to_string(codec);
  return fmt::format("topk:{}", topk_fraction);
}

namespace codec {
namespace {

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

uint16_t to_bf16(float x) {  // x finite
  const uint32_t u = bits_of(x);
  uint32_t r = u + 0x7FFFu + ((u >> 16) & 1u);  // to nearest, ties to even
  uint16_t h = static_cast<uint16_t>(r >> 16);
  if ((h & 0x7F80u) == 0x7F80u) h = static_cast<uint16_t>((u >> 16 & 0x8000u) | 0x7F7Fu);  // saturate
  return h;
}
float from_bf16(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

// IEEE half, rounded to nearest even; what would round to infinity saturates at 65504.
uint16_t to_fp16(float f) {  // f finite
  uint32_t x = bits_of(f);
  const auto sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7FFFFFFFu;
  if (x >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7BFFu);  // >= 65520
  if (x <= 0x33000000u) return sign;                                  // <= 2^-25: to zero
  auto round = [](uint32_t kept, uint32_t rest, uint32_t half) {
    return kept + (rest > half || (rest == half && (kept & 1u)) ? 1u : 0u);
  };
  if (x < 0x38800000u) {  // below 2^-14: a subnormal half, in units of 2^-24
    const uint32_t e = x >> 23, m = (x & 0x7FFFFFu) | 0x800000u, shift = 126 - e;  // 14..24
    return static_cast<uint16_t>(sign | round(m >> shift, m & ((1u << shift) - 1), 1u << (shift - 1)));
  }
  // Rebias the exponent (127 -> 15) and keep 10 bits of the mantissa; a carry out of the
  // mantissa correctly moves to the next exponent.
  const uint32_t kept = (x >> 13) - ((127u - 15u) << 10);
  return static_cast<uint16_t>(sign | round(kept, x & 0x1FFFu, 0x1000u));
}

float from_fp16(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) {
    const float v = std::ldexp(static_cast<float>(m), -24);
    return sign != 0 ? -v : v;
  }
  if (e == 31) return sign != 0 ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
  return float_of(sign | ((e + 112u) << 23) | (m << 13));
}

bool finite_block(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) return false;
  }
  return true;
}

// fp16 saturates at 65504; the residual x - 65504 is exact in float32 while |x| < 2^28
// (beyond, it rounds, and error feedback would count the difference twice).
bool within_fp16_feedback(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::fabs(x[i]) >= 268435456.0f) return false;
  }
  return true;
}

// The smallest power of two s with m / s <= 127 (m > 0, finite), within float's range.
float int8_scale(float m) {
  int e;
  const double f = std::frexp(static_cast<double>(m) / 127.0, &e);  // f 2^e, f in [0.5, 1)
  if (f == 0.5) --e;  // m / 127 is itself a power of two
  e = std::max(e, -149);
  float s = std::ldexp(1.0f, e);
  while (m / s > 127.0f) s *= 2.0f;
  return s;
}

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
void store(uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}

// One block of n elements.
void encode_block(const Compression& c, const float* x, int64_t n, uint8_t* out, float* r,
                  std::vector<int32_t>& order) {
  switch (c.codec) {
    case Codec::kNone:
      std::memcpy(out, x, 4 * static_cast<size_t>(n));
      if (r != nullptr) std::fill(r, r + n, 0.0f);
      return;
    case Codec::kBf16:
    case Codec::kFp16: {
      const bool bf = c.codec == Codec::kBf16;
      for (int64_t i = 0; i < n; ++i) {
        const float v = x[i];
        const uint16_t h = bf ? to_bf16(v) : to_fp16(v);
        store<uint16_t>(out + 2 * i, h);
        if (r != nullptr) r[i] = v - (bf ? from_bf16(h) : from_fp16(h));
      }
      return;
    }
    case Codec::kInt8: {
      float m = 0;
      for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(x[i]));
      const float s = m > 0 ? int8_scale(m) : 0.0f;
      store<float>(out, s);
      auto* q = reinterpret_cast<int8_t*>(out + 4);
      for (int64_t i = 0; i < n; ++i) {
        const float v = x[i];
        float k = s > 0 ? std::clamp(std::nearbyint(v / s), -127.0f, 127.0f) : 0.0f;
        // Near float's largest values a step rounded outwards would overflow: take the
        // one inwards (the residual keeps the difference, still exactly).
        if (!std::isfinite(k * s)) k -= k > 0 ? 1.0f : -1.0f;
        q[i] = static_cast<int8_t>(k);
        if (r != nullptr) r[i] = v - k * s;  // exact: s is a power of two
      }
      return;
    }
    case Codec::kTopK: {
      const int64_t k = topk_entries(c, n);
      order.resize(static_cast<size_t>(n));
      std::iota(order.begin(), order.end(), 0);
      auto larger = [&](int32_t a, int32_t b) {
        const float fa = std::fabs(x[a]), fb = std::fabs(x[b]);
        return fa > fb || (fa == fb && a < b);  // ties: the lower index, deterministically
      };
      std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), larger);
      std::sort(order.begin(), order.begin() + k);
      if (r != nullptr && r != x) std::memcpy(r, x, 4 * static_cast<size_t>(n));
      for (int64_t j = 0; j < k; ++j) {
        const int32_t i = order[static_cast<size_t>(j)];
        store<float>(out + 4 * j, x[i]);
        store<uint16_t>(out + 4 * k + 2 * j, static_cast<uint16_t>(i));
      }
      if (r != nullptr) {
        for (int64_t j = 0; j < k; ++j) r[order[static_cast<size_t>(j)]] = 0.0f;
      }
      return;
    }
  }
}

bool valid_block(const Compression& c, const uint8_t* p, int64_t n) {
  switch (c.codec) {
    case Codec::kNone:
      for (int64_t i = 0; i < n; ++i) {
        if (!std::isfinite(load<float>(p + 4 * i))) return false;
      }
      return true;
    case Codec::kBf16:
      for (int64_t i = 0; i < n; ++i) {
        if ((load<uint16_t>(p + 2 * i) & 0x7F80u) == 0x7F80u) return false;
      }
      return true;
    case Codec::kFp16:
      for (int64_t i = 0; i < n; ++i) {
        if ((load<uint16_t>(p + 2 * i) & 0x7C00u) == 0x7C00u) return false;
      }
      return true;
    case Codec::kInt8: {
      const float s = load<float>(p);
      if (!std::isfinite(s) || s < 0) return false;
      int largest = 0;
      for (int64_t i = 0; i < n; ++i) largest = std::max(largest, std::abs(static_cast<int>(static_cast<int8_t>(p[4 + i]))));
      return std::isfinite(static_cast<float>(largest) * s);  // every decoded value is finite
    }
    case Codec::kTopK: {
      const int64_t k = topk_entries(c, n);
      int64_t previous = -1;
      for (int64_t j = 0; j < k; ++j) {
        if (!std::isfinite(load<float>(p + 4 * j))) return false;
        const int64_t i = load<uint16_t>(p + 4 * k + 2 * j);
        if (i <= previous || i >= n) return false;
        previous = i;
      }
      return true;
    }
  }
  return false;
}

void add_block(const Compression& c, const uint8_t* p, int64_t n, float* acc) {
  switch (c.codec) {
    case Codec::kNone:
      for (int64_t i = 0; i < n; ++i) acc[i] += load<float>(p + 4 * i);
      return;
    case Codec::kBf16:
      for (int64_t i = 0; i < n; ++i) acc[i] += from_bf16(load<uint16_t>(p + 2 * i));
      return;
    case Codec::kFp16:
      for (int64_t i = 0; i < n; ++i) acc[i] += from_fp16(load<uint16_t>(p + 2 * i));
      return;
    case Codec::kInt8: {
      const float s = load<float>(p);
      const auto* q = reinterpret_cast<const int8_t*>(p + 4);
      for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<float>(q[i]) * s;
      return;
    }
    case Codec::kTopK: {
      const int64_t k = topk_entries(c, n);
      for (int64_t j = 0; j < k; ++j) acc[load<uint16_t>(p + 4 * k + 2 * j)] += load<float>(p + 4 * j);
      return;
    }
  }
}

// Calls f(block pointer, elements, element offset) for every block of [offset, offset +
// length); false if the bytes do not end on a block boundary.
template <typename F>
bool for_blocks(const Compression& c, const uint8_t* data, int64_t offset, int64_t length,
                int64_t numel, F&& f) {
  int64_t elem = elements_before(c, offset);
  int64_t pos = 0;
  while (pos < length) {
    if (elem >= numel) return false;
    const int64_t n = std::min(kCodecBlock, numel - elem);
    const int64_t b = block_bytes(c, n);
    if (pos + b > length) return false;
    if (!f(data + pos, n, elem)) return false;
    pos += b;
    elem += n;
  }
  return true;
}

}  // namespace

int64_t topk_entries(const Compression& c, int64_t n) {
  if (n <= 0) return 0;
  const auto k = static_cast<int64_t>(std::ceil(c.topk_fraction * static_cast<double>(n)));
  return std::clamp<int64_t>(k, 1, n);
}

int64_t block_bytes(const Compression& c, int64_t n) {
  switch (c.codec) {
    case Codec::kNone: return 4 * n;
    case Codec::kBf16:
    case Codec::kFp16: return 2 * n;
    case Codec::kInt8: return n > 0 ? 4 + n : 0;
    case Codec::kTopK: return 6 * topk_entries(c, n);
  }
  return 0;
}

int64_t encoded_bytes(const Compression& c, int64_t numel) {
  const int64_t full = numel / kCodecBlock, last = numel % kCodecBlock;
  return full * block_bytes(c, kCodecBlock) + block_bytes(c, last);
}

int64_t transfer_bytes(const Compression& c, int64_t max_chunk) {
  const int64_t b = block_bytes(c, kCodecBlock);
  return std::max<int64_t>(1, max_chunk / b) * b;
}

int64_t elements_before(const Compression& c, int64_t offset) {
  return offset / block_bytes(c, kCodecBlock) * kCodecBlock;
}

bool encode(const Compression& c, const float* src, int64_t numel, uint8_t* out, float* residual) {
  std::vector<int32_t> order;
  int64_t pos = 0;
  for (int64_t elem = 0; elem < numel; elem += kCodecBlock) {
    const int64_t n = std::min(kCodecBlock, numel - elem);
    if (!finite_block(src + elem, n)) return false;
    if (c.codec == Codec::kFp16 && !within_fp16_feedback(src + elem, n)) return false;
    encode_block(c, src + elem, n, out + pos, residual != nullptr ? residual + elem : nullptr, order);
    pos += block_bytes(c, n);
  }
  return true;
}

bool valid(const Compression& c, const uint8_t* data, int64_t offset, int64_t length, int64_t numel) {
  return for_blocks(c, data, offset, length, numel,
                    [&](const uint8_t* p, int64_t n, int64_t) { return valid_block(c, p, n); });
}

void add_decoded(const Compression& c, const uint8_t* data, int64_t offset, int64_t length,
                 int64_t numel, float* acc) {
  for_blocks(c, data, offset, length, numel, [&](const uint8_t* p, int64_t n, int64_t elem) {
    add_block(c, p, n, acc + elem);
    return true;
  });
}

}  // namespace codec
}  // namespace torch_asgd
