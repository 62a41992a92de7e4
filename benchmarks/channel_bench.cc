// Point-to-point bandwidth and latency of a torch_asgd Channel on loopback, beside a
// plain TCP socket pair moving the same bytes in the same run (two threads of one
// process in both cases).
//
//   asgd-bench-channel [--sizes 4K,64K,1M,16M,64M] [--repeats 5] [--seconds 0.5]
//                      [--recv-depth D] [--in-flight K] [--out FILE]
//
// Bandwidth: one-way stream of messages of the given size, a window of messages in
// flight, measured at the receiver (payload bytes / s). Latency: ping-pong of one
// message, half the round trip. Every figure is the median of --repeats runs, with
// min and max. Each result is verified before it is timed (six messages whole, and
// the first of every timed run).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include <fmt/format.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/torch.h>

#include "torch_asgd/torch_asgd.h"

using namespace torch_asgd;
using Clock = std::chrono::steady_clock;

namespace {

struct Stats {
  double median = 0, min = 0, max = 0;
};

Stats summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v.front(), v.back()};
}

int64_t parse_size(const std::string& s) {
  int64_t n = std::stoll(s);
  char unit = s.back();
  if (unit == 'K' || unit == 'k') n <<= 10;
  if (unit == 'M' || unit == 'm') n <<= 20;
  if (unit == 'G' || unit == 'g') n <<= 30;
  return n;
}

std::string human(int64_t bytes) {
  if (bytes >= (1 << 20)) return fmt::format("{} MB", bytes >> 20);
  if (bytes >= (1 << 10)) return fmt::format("{} KB", bytes >> 10);
  return fmt::format("{} B", bytes);
}

// ---- plain TCP socket pair ------------------------------------------------------------

struct SocketPair {
  int a = -1, b = -1;
  SocketPair() {
    int l = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    ::bind(l, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    ::listen(l, 1);
    ::getsockname(l, reinterpret_cast<sockaddr*>(&addr), &len);
    a = ::socket(AF_INET, SOCK_STREAM, 0);
    if (::connect(a, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) throw std::runtime_error("connect");
    b = ::accept(l, nullptr, nullptr);
    ::close(l);
    int one = 1;
    ::setsockopt(a, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    ::setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }
  ~SocketPair() {
    ::close(a);
    ::close(b);
  }
};

void write_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w <= 0) throw std::runtime_error("write");
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void read_all(int fd, char* p, size_t n) {
  while (n > 0) {
    ssize_t r = ::read(fd, p, n);
    if (r <= 0) throw std::runtime_error("read");
    p += r;
    n -= static_cast<size_t>(r);
  }
}

// Stream `count` messages of `size` bytes (each with an 8-byte length prefix, as any
// framing needs); returns payload bytes/s measured at the receiver.
double socket_bandwidth(int64_t size, int count) {
  SocketPair s;
  std::vector<char> out(size + 8, 'x'), in(size + 8);
  std::memcpy(out.data(), &size, 8);
  auto t0 = Clock::now();
  std::thread sender([&] {
    for (int i = 0; i < count; ++i) write_all(s.a, out.data(), out.size());
  });
  for (int i = 0; i < count; ++i) read_all(s.b, in.data(), in.size());
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  sender.join();
  if (std::memcmp(in.data(), out.data(), in.size()) != 0) throw std::runtime_error("socket data corrupt");
  return static_cast<double>(size) * count / secs;
}

double socket_latency(int64_t size, int count) {
  SocketPair s;
  std::vector<char> buf_a(size + 8, 'a'), buf_b(size + 8);
  std::thread echo([&] {
    for (int i = 0; i < count; ++i) {
      read_all(s.b, buf_b.data(), buf_b.size());
      write_all(s.b, buf_b.data(), buf_b.size());
    }
  });
  auto t0 = Clock::now();
  for (int i = 0; i < count; ++i) {
    write_all(s.a, buf_a.data(), buf_a.size());
    read_all(s.a, buf_a.data(), buf_a.size());
  }
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  echo.join();
  return secs / count / 2;
}

// ---- torch_asgd channel ---------------------------------------------------------------

struct ChannelPair {
  std::shared_ptr<World> w0, w1;
  std::unique_ptr<Channel> c0, c1;

  ChannelPair(int64_t capacity, bool verify, int recv_depth, size_t in_flight) {
    auto store = c10::make_intrusive<c10d::HashStore>();
    auto make = [&](int r) {
      WorldOptions o;
      o.rank = r;
      o.world_size = 2;
      o.local_rank = r;
      o.local_world_size = 2;
      o.hostname = "127.0.0.1";
      o.job_id = "bench";
      return World::create(o, store);
    };
    ChannelOptions co;
    co.name = "bench";
    co.capacity_bytes = capacity;
    co.verify_payload = verify;
    co.max_ordered = 64;
    co.recv_depth = recv_depth;
    co.max_in_flight = in_flight;
    std::thread t([&] {
      w1 = make(1);
      c1 = w1->open_channel(co);
    });
    w0 = make(0);
    c0 = w0->open_channel(co);
    t.join();
  }
  ~ChannelPair() {
    std::thread t([&] { c1->close(std::chrono::seconds(30)); });
    c0->close(std::chrono::seconds(30));
    t.join();
  }
};

double channel_bandwidth(ChannelPair& cp, const at::Tensor& payload, int count, size_t window,
                         bool verify_all = false) {
  Outgoing msg;
  msg.payload = payload;
  auto t0 = Clock::now();
  std::thread sender([&] {
    for (int i = 0; i < count; ++i) {
      cp.c0->wait_for_room(1, window - 1, std::chrono::seconds(60));
      cp.c0->send(1, msg);
    }
  });
  int got = 0;
  bool verified = false;
  while (got < count) {
    for (auto& m : cp.c1->wait(std::chrono::milliseconds(100)).messages) {
      if (!verified || verify_all) {
        if (!m.payload.equal(payload)) throw std::runtime_error("channel data corrupt");
        verified = true;
      }
      ++got;
    }
  }
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  sender.join();
  return static_cast<double>(payload.numel()) * count / secs;
}

double channel_latency(ChannelPair& cp, const at::Tensor& payload, int count) {
  Outgoing msg;
  msg.payload = payload;
  std::thread echo([&] {
    for (int i = 0; i < count;) {
      for (auto& m : cp.c1->wait(std::chrono::milliseconds(100)).messages) {
        Outgoing back;
        back.payload = m.payload;
        cp.c1->send(0, back);
        ++i;
      }
    }
  });
  auto t0 = Clock::now();
  for (int i = 0; i < count; ++i) {
    cp.c0->send(1, msg);
    for (bool back = false; !back;) back = !cp.c0->wait(std::chrono::milliseconds(100)).messages.empty();
  }
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  echo.join();
  return secs / count / 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> sizes = {4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20};
  int repeats = 5;
  int recv_depth = ChannelOptions().recv_depth;
  size_t in_flight = ChannelOptions().max_in_flight;
  double target_seconds = 0.5;
  std::string out_path;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i], v = argv[i + 1];
    if (a == "--sizes") {
      sizes.clear();
      std::stringstream ss(v);
      for (std::string s; std::getline(ss, s, ',');) sizes.push_back(parse_size(s));
    } else if (a == "--repeats") {
      repeats = std::stoi(v);
    } else if (a == "--seconds") {
      target_seconds = std::stod(v);
    } else if (a == "--in-flight") {
      in_flight = std::stoul(v);
    } else if (a == "--recv-depth") {
      recv_depth = std::stoi(v);
    } else if (a == "--out") {
      out_path = v;
    } else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  at::set_num_threads(1);

  std::string table =
      "| size | channel GB/s (verify on) | channel GB/s (verify off) | socket GB/s | ratio "
      "(on/off) | channel latency us | socket latency us |\n"
      "|---:|---:|---:|---:|---:|---:|---:|\n";
  std::printf("%s", table.c_str());
  for (int64_t size : sizes) {
    auto payload = torch::randint(0, 255, {size}, torch::kByte);
    ChannelPair on(size, true, recv_depth, in_flight), off(size, false, recv_depth, in_flight);
    // Counts that take about target_seconds at ~1 GB/s, at least 4 messages.
    const int count = static_cast<int>(std::max<int64_t>(4, std::min<int64_t>(20000, static_cast<int64_t>(target_seconds * 1e9) / size)));
    const int lat_count = static_cast<int>(std::max<int64_t>(4, std::min<int64_t>(2000, static_cast<int64_t>(0.2e9) / size)));
    const size_t window = size >= (16 << 20) ? 2 : 8;
    // Warm up, and verify every message of a few (their buffers come from the pools from
    // the second one on); the timed runs verify their first message.
    channel_bandwidth(on, payload, 6, window, true);
    channel_bandwidth(off, payload, 6, window, true);
    socket_bandwidth(size, 2);
    std::vector<double> bw_on, bw_off, bw_sock, lat_ch, lat_sock;
    for (int r = 0; r < repeats; ++r) {
      bw_on.push_back(channel_bandwidth(on, payload, count, window));
      bw_off.push_back(channel_bandwidth(off, payload, count, window));
      bw_sock.push_back(socket_bandwidth(size, count));
      lat_ch.push_back(channel_latency(on, payload, lat_count));
      lat_sock.push_back(socket_latency(size, lat_count));
    }
    Stats on_s = summarize(bw_on), off_s = summarize(bw_off), sock = summarize(bw_sock);
    Stats lc = summarize(lat_ch), ls = summarize(lat_sock);
    std::string row = fmt::format(
        "| {} | {:.2f} ({:.2f}-{:.2f}) | {:.2f} ({:.2f}-{:.2f}) | {:.2f} ({:.2f}-{:.2f}) | "
        "{:.2f} / {:.2f} | {:.0f} ({:.0f}-{:.0f}) | {:.0f} ({:.0f}-{:.0f}) |\n",
        human(size), on_s.median / 1e9, on_s.min / 1e9, on_s.max / 1e9, off_s.median / 1e9,
        off_s.min / 1e9, off_s.max / 1e9, sock.median / 1e9, sock.min / 1e9, sock.max / 1e9,
        on_s.median / sock.median, off_s.median / sock.median, lc.median * 1e6, lc.min * 1e6,
        lc.max * 1e6, ls.median * 1e6, ls.min * 1e6, ls.max * 1e6);
    std::printf("%s", row.c_str());
    std::fflush(stdout);
    table += row;
  }
  if (!out_path.empty()) std::ofstream(out_path) << table;
  return 0;
}
