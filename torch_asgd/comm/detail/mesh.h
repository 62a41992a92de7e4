// Mesh: this rank's Gloo TCP connections to every other rank, made without
// gloo::rendezvous (whose Store interface differs between Gloo versions): each rank
// creates one transport pair per peer, publishes the pairs' addresses, and connects each
// pair with the address its peer published for it. Only Gloo's transport interface is
// used (Device::createContext, Context::createPair, Pair::address/connect), which old
// (2022) and new (2025) Gloo share. Internal: the one place that creates Gloo objects.
//
// This header names no Gloo header, so that code outside comm/ (tests included) can use
// it without Gloo's headers; what reaches Gloo lives in comm/ alone.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace gloo {
class Context;
namespace transport {
class Device;
}
}  // namespace gloo

namespace torch_asgd {
class World;
namespace detail {

class Mesh {
 public:
  // Creates the TCP device (on `iface` if given, else on `hostname`) and one unconnected
  // pair per peer. Throws ConfigError when the device cannot be created.
  Mesh(int rank, int size, const std::string& hostname, const std::string& iface,
       std::chrono::milliseconds timeout);
  ~Mesh();
  Mesh(const Mesh&) = delete;
  Mesh& operator=(const Mesh&) = delete;

  // This rank's pair addresses, one record per peer, to publish for the peers.
  std::vector<uint8_t> addresses() const;
  // Connects every pair; `published(r)` returns what rank r's addresses() returned.
  // Blocks until every pair is connected, bounded by the timeout; throws CommError.
  void connect(const std::function<std::vector<uint8_t>(int rank)>& published);

  const std::shared_ptr<gloo::Context>& context() const { return context_; }

 private:
  int rank_;
  int size_;
  std::shared_ptr<gloo::transport::Device> device_;
  std::shared_ptr<gloo::Context> context_;
};

// Sends raw bytes to `peer` on a Gloo slot, as a broken or hostile peer would, and
// waits up to `timeout` for the send. For the tests of what a channel rejects.
void send_raw(World& world, int peer, uint64_t slot, const void* data, size_t bytes,
              std::chrono::milliseconds timeout);

}  // namespace detail
}  // namespace torch_asgd
