// A free TCP port for a rendezvous store that a child process will listen
// on a moment later. Internal (the launcher's --master-port 0, and the tests).
//
// The port is chosen below the kernel's ephemeral range
// (/proc/sys/net/ipv4/ip_local_port_range): a port that bind(0) handed out is free
// again once closed, and any other process's connect() or bind(0) (Gloo's pairs open
// dozens a second) can take it before the child listens. Ports below that range are
// handed out to nobody; only a process binding that very port could race.
// (The probe binds every address, as the store does: a service listening on one
// address only still rules its port out.)
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <random>
#include <stdexcept>

namespace torch_asgd {
namespace launch {

// Binds fd to addr, closes fd, and returns the port bound (0: it could not bind).
template <typename Addr>
int bind_and_close(int fd, Addr addr, in_port_t Addr::*port) {
  socklen_t len = sizeof(addr);
  int got = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    got = ntohs(addr.*port);
  }
  ::close(fd);
  return got;
}

// Whether `port` (0: any) can be bound now on every address, as the store binds it
// (dual-stack [::], else 0.0.0.0); the port bound, or 0.
inline int try_bind(int port) {
  const in_port_t wanted = htons(static_cast<uint16_t>(port));
  int fd = ::socket(AF_INET6, SOCK_STREAM, 0);
  if (fd >= 0) {
    const int off = 0;
    ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off));
    sockaddr_in6 addr{};
    addr.sin6_family = AF_INET6;
    addr.sin6_addr = in6addr_any;
    addr.sin6_port = wanted;
    return bind_and_close(fd, addr, &sockaddr_in6::sin6_port);
  }
  fd = ::socket(AF_INET, SOCK_STREAM, 0);  // no IPv6 here
  if (fd < 0) return 0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = wanted;
  return bind_and_close(fd, addr, &sockaddr_in::sin_port);
}

inline int free_port() {
  int low = 32768;  // the kernel's default start of the ephemeral range
  std::ifstream range("/proc/sys/net/ipv4/ip_local_port_range");
  int first = 0, last = 0;
  if (range >> first >> last && first > 0) low = first;
  // Above the well-known ports, below Kubernetes' node ports (30000-32767, redirected
  // without a socket to find).
  const int from = 10000, to = std::min(low, 30000);
  if (to - from >= 1000) {
    std::mt19937 pick(static_cast<uint32_t>(
        static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
        (static_cast<uint64_t>(::getpid()) << 16)));
    std::uniform_int_distribution<int> port(from, to - 1);
    for (int tries = 0; tries < 200; ++tries) {
      const int p = try_bind(port(pick));
      if (p != 0) return p;
    }
  }
  const int any = try_bind(0);  // no room below the range: the kernel's pick
  if (any == 0) throw std::runtime_error("cannot find a free port to listen on");
  return any;
}

}  // namespace launch
}  // namespace torch_asgd
