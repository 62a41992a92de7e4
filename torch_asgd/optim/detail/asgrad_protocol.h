// What the AsGrad server and its workers say to each other, on one channel:
//   server -> worker  kJob      (ordered)  a model snapshot; model_version = its version
//   worker -> server  kGradient (ordered)  a gradient; model_version = its job's version
//   server -> worker  kControl  sender_step = kStopSignal: no more jobs, stop
//   worker -> server  kControl  sender_step = kDoneSignal: this worker takes no more jobs
// The server sends a worker its next job only once the worker has returned the last
// one, so each worker has at most one job and one gradient in flight.
#pragma once

#include <cstdint>

#include "torch_asgd/comm/channel.h"
#include "torch_asgd/comm/fingerprint.h"
#include "torch_asgd/optim/detail/flat_params.h"

namespace torch_asgd {
namespace detail {

constexpr int64_t kStopSignal = 1;
constexpr int64_t kDoneSignal = 2;

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
