// What the AsGrad server and its workers say to each other, on one channel of ordered
// messages whose metadata is {kind, model version}:
//   server -> worker  kJob       a model snapshot and its version
//   worker -> server  kGradient  a gradient and the version of the job it was computed on
//   server -> worker  kStop      no more jobs: training is over
//   worker -> server  kDone      this worker takes no more jobs
// The server sends a worker its next job only once the worker has returned the last
// one, so each worker has at most one job and one gradient in flight.
#pragma once

#include <cstdint>

#include "torch_asgd/comm/channel.h"
#include "torch_asgd/comm/fingerprint.h"
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

inline ChannelOptions asgrad_channel_options(const FlatParams& flat, PeerFailure on_failure) {
  ChannelOptions o;
  o.name = "asgrad";
  o.capacity_bytes = flat.bytes();
  o.on_peer_failure = on_failure;
  return o;
}

inline Fingerprint asgrad_fingerprint(const FlatParams& flat, int server_rank) {
  Fingerprint fp = flat.fingerprint();
  fp.set("algorithm", "asgrad").set("server_rank", std::to_string(server_rank));
  return fp;
}

}  // namespace detail
}  // namespace torch_asgd
