// Transport: what an optimizer needs from a channel. Channel (channel.h) is the one
// torch_asgd opens through a World; tests script their own, to deliver messages in an
// order they choose. The contract is Channel's: send() and broadcast_additive() never
// wait for a peer, poll() never waits, close() is bounded.
#pragma once

#include <chrono>
#include <cstdint>
#include <algorithm>
#include <functional>
#include <vector>

#include <ATen/core/Tensor.h>

#include "torch_asgd/comm/metadata.h"

namespace torch_asgd {

struct Outgoing;
struct Arrivals;
struct PeerCounters;

class Transport {
 public:
  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual void send(int peer, const Outgoing& msg) = 0;
  // fill(buffer, accumulate): add into `buffer` when accumulate, else overwrite it.
  virtual void broadcast_additive(uint8_t stream, const Metadata& meta,
                                  const std::function<void(at::Tensor& buffer, bool accumulate)>& fill) = 0;
  virtual Arrivals poll() = 0;
  virtual Arrivals wait(std::chrono::milliseconds timeout) = 0;
  virtual bool close(std::chrono::milliseconds timeout) = 0;
  virtual std::vector<PeerCounters> counters() const = 0;
  // Peers whose connection failed (not those that said goodbye).
  virtual std::vector<int> failed_peers() const = 0;
  // Peers that said goodbye.
  virtual std::vector<int> closed_peers() const = 0;
  // Peers that are neither failed nor closed (the others but those two lists).
  std::vector<int> live_peers() const;
  virtual void rethrow_if_failed() = 0;
};

inline std::vector<int> Transport::live_peers() const {
  const std::vector<int> failed = failed_peers();
  const std::vector<int> closed = closed_peers();
  auto gone = [&](int p) {
    return std::find(failed.begin(), failed.end(), p) != failed.end() ||
           std::find(closed.begin(), closed.end(), p) != closed.end();
  };
  std::vector<int> out;
  for (int p = 0; p < size(); ++p) {
    if (p != rank() && !gone(p)) out.push_back(p);
  }
  return out;
}

}  // namespace torch_asgd
