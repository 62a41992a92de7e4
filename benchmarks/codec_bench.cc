// What the codecs of additive payloads cost on this CPU (Google Benchmark): encoding one
// message with its residual (what the sender does once per group of peers), and
// decoding it into a sum (what a receiver does per message), per codec, on a 16 MB
// float32 payload (4 M elements) of normal random values. Bytes per second are of the
// float32 payload, so that the figures compare with the channel's bandwidth.
//
//   asgd-bench-codec [--benchmark_repetitions=3 --benchmark_report_aggregates_only=true]
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "torch_asgd/comm/codec.h"

namespace {

using torch_asgd::Codec;
using torch_asgd::Compression;
namespace codec = torch_asgd::codec;

constexpr int64_t kElems = 4 << 20;

const std::vector<float>& values() {
  static const std::vector<float> v = [] {
    std::vector<float> x(kElems);
    std::mt19937 rng(1);
    std::normal_distribution<float> d(0.0f, 1e-3f);
    for (auto& e : x) e = d(rng);
    return x;
  }();
  return v;
}

Compression codec_of(int64_t i) {
  const Compression all[] = {Compression(Codec::kBf16), Compression(Codec::kFp16),
                             Compression(Codec::kInt8), Compression(Codec::kTopK, 0.01)};
  return all[i];
}

void BM_Encode(benchmark::State& state) {
  const Compression c = codec_of(state.range(0));
  std::vector<uint8_t> wire(static_cast<size_t>(codec::encoded_bytes(c, kElems)));
  std::vector<float> residual(kElems);
  for (auto _ : state) {
    if (!codec::encode(c, values().data(), kElems, wire.data(), residual.data())) state.SkipWithError("encode");
    benchmark::DoNotOptimize(wire.data());
  }
  state.SetBytesProcessed(state.iterations() * kElems * 4);
  state.SetLabel(c.describe());
}

void BM_ValidateAndDecode(benchmark::State& state) {
  const Compression c = codec_of(state.range(0));
  std::vector<uint8_t> wire(static_cast<size_t>(codec::encoded_bytes(c, kElems)));
  codec::encode(c, values().data(), kElems, wire.data(), nullptr);
  std::vector<float> acc(kElems, 0.0f);
  const auto n = static_cast<int64_t>(wire.size());
  for (auto _ : state) {
    if (!codec::valid(c, wire.data(), 0, n, kElems)) state.SkipWithError("invalid");
    codec::add_decoded(c, wire.data(), 0, n, kElems, acc.data());
    benchmark::DoNotOptimize(acc.data());
  }
  state.SetBytesProcessed(state.iterations() * kElems * 4);
  state.SetLabel(c.describe());
}

// The raw sum a receiver does without a codec, for comparison.
void BM_PlainSum(benchmark::State& state) {
  std::vector<float> acc(kElems, 0.0f);
  const auto& x = values();
  for (auto _ : state) {
    for (int64_t i = 0; i < kElems; ++i) acc[i] += x[i];
    benchmark::DoNotOptimize(acc.data());
  }
  state.SetBytesProcessed(state.iterations() * kElems * 4);
}

BENCHMARK(BM_Encode)->DenseRange(0, 3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ValidateAndDecode)->DenseRange(0, 3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_PlainSum)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
