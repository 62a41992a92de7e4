// What the AsGrad server and its workers say to each other, on one channel of ordered
// messages whose metadata is {kind, model version}:
//   server -> worker  kJob       a model snapshot and its version
//   worker -> server  kGradient  a gradient and the version of the job it was computed on:
//                                float values, or under a lossy compression the codec's
//                                bytes (codec.h) of the gradient plus what earlier
//                                encodings lost (error feedback, kept by the worker)
//   server -> worker  kStop      no more jobs: training is over
//   worker -> server  kDone      this worker takes no more jobs
// The server sends a worker its next job only once the worker has returned the last
// one, so each worker has at most one job and one gradient in flight.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "torch_asgd/comm/channel.h"
#include "torch_asgd/comm/codec.h"
#include "torch_asgd/comm/fingerprint.h"
#include "torch_asgd/optim/detail/compression_checks.h"
#include "torch_asgd/optim/detail/flat_params.h"

namespace torch_asgd {
namespace detail {

enum AsGradKind : int64_t { kJob = 1, kGradient = 2, kStop = 3, kDone = 4 };

inline Outgoing asgrad_message(int64_t kind, int64_t version, at::Tensor payload = at::Tensor()) {
  Outgoing m;
  m.payload = std::move(payload);
  m.meta = Metadata({kind, version});
  return m;
}

inline bool is_asgrad(const Message& m) { return m.meta.fields.size() == 2; }
inline int64_t asgrad_kind(const Message& m) { return m.meta.field(0); }
inline int64_t asgrad_version(const Message& m) { return m.meta.field(1); }

inline ChannelOptions asgrad_channel_options(const FlatParams& flat, PeerFailure on_failure,
                                             const Compression& compression) {
  ChannelOptions o;
  o.name = "asgrad";
  o.capacity_bytes = std::max<int64_t>(flat.bytes(), codec::encoded_bytes(compression, flat.numel()));
  o.on_peer_failure = on_failure;
  return o;
}

// Server and workers must compress alike: the codec is part of what they compare.
inline Fingerprint asgrad_fingerprint(Fingerprint fp, int server_rank,
                                      const Compression& compression) {
  fp.set("algorithm", "asgrad")
      .set("server_rank", std::to_string(server_rank))
      .set("compression", compression.describe());
  return fp;
}

// Throws ConfigError, naming `who`, for a compression these parameters cannot take.
inline void check_asgrad_compression(const Compression& c, c10::ScalarType dtype, const std::string& who) {
  check_topk_fraction(c, who);
  check_codec_dtype(c, dtype, who);
}

// A gradient message's payload under `c`: the codec's bytes, or (values no codec can
// take) the float values themselves.
inline bool is_encoded_gradient(const Message& m, const Compression& c, int64_t numel) {
  return c.lossy() && m.payload.defined() && m.payload.scalar_type() == at::kByte &&
         m.payload.numel() == codec::encoded_bytes(c, numel);
}

}  // namespace detail
}  // namespace torch_asgd
