#include "torch_asgd/comm/detail/mesh.h"

#include <cstring>

#include <fmt/format.h>
#include <gloo/context.h>
#include <gloo/transport/context.h>
#include <gloo/transport/device.h>
#include <gloo/transport/pair.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>

#include "torch_asgd/comm/error.h"
#include "torch_asgd/comm/world.h"

namespace torch_asgd {
namespace detail {
namespace {

// A gloo::Context whose transport context this file connects: gloo::Context keeps the
// transport context protected, for subclasses such as gloo::rendezvous::Context.
class MeshContext : public gloo::Context {
 public:
  MeshContext(int rank, int size, std::shared_ptr<gloo::transport::Device> device,
              std::chrono::milliseconds timeout)
      : gloo::Context(rank, size) {
    setTimeout(timeout);
    device_ = std::move(device);
    transportContext_ = device_->createContext(rank, size);
    transportContext_->setTimeout(timeout);
  }
  gloo::transport::Context& transport() { return *transportContext_; }
};

void put_u32(std::vector<uint8_t>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
uint32_t get_u32(const std::vector<uint8_t>& in, size_t at) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(in[at + i]) << (8 * i);
  return v;
}

}  // namespace

Mesh::Mesh(int rank, int size, const std::string& hostname, const std::string& iface,
           std::chrono::milliseconds timeout)
    : rank_(rank), size_(size) {
  gloo::transport::tcp::attr attr;
  if (!iface.empty()) {
    attr.iface = iface;
  } else {
    attr.hostname = hostname;
  }
  try {
    device_ = gloo::transport::tcp::CreateDevice(attr);
  } catch (const std::exception& e) {
    throw ConfigError(fmt::format(
        "rank {}: cannot create the Gloo TCP device on {}: {}. Set GLOO_SOCKET_IFNAME to an "
        "interface that exists and reaches the other hosts",
        rank, iface.empty() ? "host '" + hostname + "'" : "interface '" + iface + "'",
        std::string(e.what()).substr(0, 300)));
  }
  auto ctx = std::make_shared<MeshContext>(rank, size, device_, timeout);
  for (int p = 0; p < size; ++p) {
    if (p != rank) ctx->transport().createPair(p);
  }
  context_ = std::move(ctx);
}

Mesh::~Mesh() {
  // The connections go before the device whose loop serves them.
  context_.reset();
  device_.reset();
}

std::vector<uint8_t> Mesh::addresses() const {
  // One record per peer: its rank, the address's length, the address.
  auto& transport = static_cast<MeshContext&>(*context_).transport();
  std::vector<uint8_t> out;
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    const std::vector<char> a = transport.getPair(p)->address().bytes();
    put_u32(out, static_cast<uint32_t>(p));
    put_u32(out, static_cast<uint32_t>(a.size()));
    out.insert(out.end(), a.begin(), a.end());
  }
  return out;
}

void Mesh::connect(const std::function<std::vector<uint8_t>(int rank)>& published) {
  auto& transport = static_cast<MeshContext&>(*context_).transport();
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    const std::vector<uint8_t> records = published(p);
    std::vector<char> mine;
    bool found = false;
    for (size_t at = 0; at + 8 <= records.size() && !found;) {
      const uint32_t peer = get_u32(records, at);
      const uint32_t len = get_u32(records, at + 4);
      if (at + 8 + len > records.size()) break;
      if (static_cast<int>(peer) == rank_) {
        mine.assign(records.begin() + at + 8, records.begin() + at + 8 + len);
        found = true;
      }
      at += 8 + len;
    }
    if (!found) {
      throw CommError(fmt::format(
          "rank {}: rank {} published no address for this rank: is it a rank of another job "
          "or of another torch_asgd version on the same store?",
          rank_, p));
    }
    try {
      transport.getPair(p)->connect(mine);
    } catch (const std::exception& e) {
      throw CommError(fmt::format(
          "rank {}: connecting to rank {} failed: {}. Check that the hosts reach each other on "
          "the interface Gloo uses (GLOO_SOCKET_IFNAME)",
          rank_, p, std::string(e.what()).substr(0, 400)));
    }
  }
}

void send_raw(World& world, int peer, uint64_t slot, const void* data, size_t bytes,
              std::chrono::milliseconds timeout) {
  auto buf = world.mesh().context()->createUnboundBuffer(const_cast<void*>(data), bytes);
  buf->send(peer, slot, 0, bytes);
  buf->waitSend(timeout);
}

}  // namespace detail
}  // namespace torch_asgd
