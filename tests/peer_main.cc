// asgd-test-peer: the rank program of the end-to-end tests (tests/e2e_test.cc).
// Runs under asgd-launch, torchrun --no-python or srun. Modes:
//   connect              rendezvous, open a channel, close; prints "connected <rank>/<size>"
//   exchange             all-to-all ordered messages of 0, 1, odd and large sizes, verified
//   flood N BYTES        rank 0 sends N additive deltas of BYTES to rank 1 while rank 1 may be
//                        stopped; rank 0 prints its counters and RSS growth, rank 1 verifies
//                        the exact sum it received
//   mismatch             rank 1 declares another model; every rank must fail
//   hostile ROUNDS       every rank broadcasts ROUNDS additive deltas; the last rank also
//                        writes malformed frames (garbage, another job's token, a claim of a
//                        terabyte, a version-1 header) onto the others' channel between
//                        rounds. Every rank must end with the exact sum; the others print
//                        how many frames they rejected ("rejected K")
//   train STEPS NUMEL    DASGD (delta mode, momentum 0) over NUMEL float parameters: each
//                        step of rank r applies the gradient (r+1)/1024 after 2 ms of
//                        "compute", so that after finish() every replica must equal
//                        -lr/1024 * STEPS * (1 + 2 + ... + size) exactly. Prints a
//                        "tick <steady ms> <step> <rss kb> <held bytes>" line every 25 steps
//                        (held: the most payload bytes the channel keeps for one peer), then
//                        "final ... exact" or "... WRONG"
//   default-world STEPS  DASGD given no World, as a program that forgets to pass one: it
//                        must take the launcher's (World::process_default()) and start
//                        every rank from rank 0's parameters (each rank builds its own
//                        value, r + 1): after finish() every replica must equal
//                        1 - lr/1024 * STEPS * (1 + ... + size). Prints "default world N"
// Exit code 0 when the mode's checks pass; errors print one line and exit 1.
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>

#include <cstring>

#include <torch/torch.h>

#include "torch_asgd/comm/detail/mesh.h"
#include "torch_asgd/torch_asgd.h"

using namespace torch_asgd;
using namespace std::chrono_literals;

namespace {

long rss_kb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

at::Tensor pattern(int from, int to, int index, int64_t numel) {
  return (torch::arange(numel, torch::kLong).remainder(251) + 7 * from + 3 * to + index)
      .to(torch::kFloat);
}

std::vector<Message> receive(Channel& ch, size_t count, std::chrono::seconds limit) {
  std::vector<Message> got;
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (got.size() < count && std::chrono::steady_clock::now() < deadline) {
    for (auto& m : ch.wait(100ms).messages) got.push_back(std::move(m));
  }
  return got;
}

int exchange(World& world) {
  const std::vector<int64_t> sizes = {0, 1, 1001, 3 * 1000 * 1000 + 1};
  ChannelOptions o;
  o.name = "exchange";
  o.capacity_bytes = sizes.back() * 4;
  auto ch = world.open_channel(o);
  for (int i = 0; i < static_cast<int>(sizes.size()); ++i) {
    for (int p = 0; p < world.size(); ++p) {
      if (p == world.rank()) continue;
      Outgoing m;
      m.payload = pattern(world.rank(), p, i, sizes[i]);
      m.meta = Metadata({i});
      ch->send(p, m);
    }
  }
  auto got = receive(*ch, sizes.size() * (world.size() - 1), 60s);
  std::vector<int> next(world.size(), 0);
  int bad = 0;
  for (const auto& m : got) {
    int i = next[m.sender]++;
    if (m.meta.field(0) != i || !m.payload.equal(pattern(m.sender, world.rank(), i, sizes[i]))) ++bad;
  }
  bool closed = ch->close(60s);
  std::printf("rank %d received %zu messages, %d wrong, closed %s\n", world.rank(), got.size(), bad,
              closed ? "cleanly" : "with timeouts");
  return got.size() == sizes.size() * (world.size() - 1) && bad == 0 && closed ? 0 : 1;
}

int flood(World& world, int n, int64_t bytes) {
  if (world.size() != 2) throw ConfigError("flood needs exactly 2 ranks");
  const int64_t numel = bytes / 4;
  ChannelOptions o;
  o.name = "flood";
  o.capacity_bytes = 0;
  MetaSchema schema;
  schema.fields = {Merge::kSum};  // updates carried
  o.additive = {AdditiveStream{0, c10::kFloat, numel, schema}};
  auto ch = world.open_channel(o);
  std::printf("ready %d\n", world.rank());
  std::fflush(stdout);
  if (world.rank() == 0) {
    // Wait for the test's go (after it stopped rank 1), one line on stdin.
    std::string go;
    std::getline(std::cin, go);
    long before = rss_kb();
    long warm = before;
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) {
      if (i == 100) warm = rss_kb();
      Outgoing m;
      m.delivery = Delivery::kAdditive;
      m.payload = torch::full({numel}, static_cast<float>(i % 5 + 1));
      m.meta = Metadata({1});
      ch->send(1, m);
    }
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    long after = rss_kb();
    auto c = ch->counters(1);
    std::printf(
        "sent %d sends in %.3f s: transmitted %lu coalesced %lu rss_start_kb %ld "
        "rss_growth_kb %ld\n",
        n, secs, static_cast<unsigned long>(c.sent_messages),
        static_cast<unsigned long>(c.coalesced), warm - before, after - warm);
    std::fflush(stdout);
    bool ok = ch->close(120s);
    return ok ? 0 : 1;
  }
  bool ok = ch->close(120s);
  at::Tensor sum = torch::zeros({numel});
  int64_t updates = 0;
  for (auto& a : ch->poll().additive) {
    sum += a.sum;
    for (const auto& part : a.parts) updates += part.second.field(0);
  }
  double expected = 0;
  for (int i = 0; i < n; ++i) expected += i % 5 + 1;
  bool exact = sum.equal(torch::full({numel}, static_cast<float>(expected)));
  std::printf("received updates %ld sum %s\n", static_cast<long>(updates),
              exact ? "exact" : "WRONG");
  return ok && exact && updates == n ? 0 : 1;
}

int hostile(World& world, int rounds) {
  const int64_t numel = 1000;
  ChannelOptions o;
  o.name = "hostile";
  o.capacity_bytes = 0;
  MetaSchema schema;
  schema.fields = {Merge::kSum};
  o.additive = {AdditiveStream{0, c10::kFloat, numel, schema}};
  auto ch = world.open_channel(o);
  const uint64_t slot = uint64_t{1} << 48;  // the first channel of the world
  const bool attacker = world.rank() == world.size() - 1;
  at::Tensor x = torch::zeros({numel});
  int injected = 0;
  auto inject = [&](int peer, std::vector<uint8_t> bytes) {
    torch_asgd::detail::send_raw(world, peer, slot, bytes.data(), bytes.size(), std::chrono::seconds(30));
    ++injected;
  };
  for (int i = 0; i < rounds; ++i) {
    for (auto& a : ch->poll().additive) x += a.sum;
    Outgoing m;
    m.delivery = Delivery::kAdditive;
    m.payload = torch::full({numel}, static_cast<float>(world.rank() + 1));
    m.meta = Metadata({1});
    x += m.payload;
    ch->broadcast(m);
    if (attacker && i % 10 == 5) {
      FrameHeader h;
      h.type = FrameType::kOrdered;
      h.sender = world.rank();
      h.sequence = 1u << 30;
      h.token = 12345;  // not this job's
      std::vector<uint8_t> other(kFrameHeaderBytes);
      encode_frame_header(h, Metadata(), other.data());
      std::vector<uint8_t> v1(128, 0);
      const uint16_t one = 1;
      std::memcpy(v1.data(), &kFrameMagic, 4);
      std::memcpy(v1.data() + 4, &one, 2);
      for (int p = 0; p < world.size() - 1; ++p) {
        inject(p, std::vector<uint8_t>(200, 0x5a));
        inject(p, other);
        inject(p, v1);
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  const bool clean = ch->close(60s);
  for (auto& a : ch->poll().additive) x += a.sum;
  const int n = world.size();
  const bool exact = x.equal(torch::full({numel}, static_cast<float>(rounds) * n * (n + 1) / 2));
  uint64_t rejected = 0;
  for (const auto& c : ch->counters()) rejected += c.rejected;
  std::printf("rank %d rejected %lu injected %d sum %s\n", world.rank(),
              static_cast<unsigned long>(rejected), injected, exact ? "exact" : "WRONG");
  return clean && exact ? 0 : 1;
}

int default_world(int64_t steps) {
  torch::NoGradGuard no_grad;
  const int rank = std::stoi(std::getenv("RANK"));
  auto x = torch::full({64}, static_cast<float>(rank + 1));
  const double lr = 0.125;
  DASGD opt(std::vector<torch::Tensor>{x}, torch::optim::SGDOptions(lr));
  const int n = opt.stats().world_size;
  std::printf("default world %d\n", n);
  x.mutable_grad() = torch::full({64}, (rank + 1) / 1024.0);
  for (int64_t s = 1; s <= steps; ++s) opt.step();
  const bool finished = opt.finish(120s);
  const double expected = 1 - lr / 1024.0 * static_cast<double>(steps) * n * (n + 1) / 2;
  const double max_diff = (x - expected).abs().max().item<double>();
  std::printf("final rank %d max_diff %g %s\n", rank, max_diff, finished && max_diff == 0 ? "exact" : "WRONG");
  return finished && max_diff == 0 ? 0 : 1;
}

int train(const std::shared_ptr<World>& world, int64_t steps, int64_t numel) {
  torch::NoGradGuard no_grad;
  auto x = torch::zeros({numel});
  const double lr = 0.125;
  DASGD opt(std::vector<torch::Tensor>{x}, torch::optim::SGDOptions(lr), DASGDOptions(), world);
  x.mutable_grad() = torch::full({numel}, (world->rank() + 1) / 1024.0);
  for (int64_t s = 1; s <= steps; ++s) {
    std::this_thread::sleep_for(2ms);
    opt.step();
    if (s % 25 == 0 || s == steps) {
      const auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
          std::chrono::steady_clock::now().time_since_epoch());
      std::printf("tick %ld %ld %ld %lu\n", static_cast<long>(now.count()), static_cast<long>(s), rss_kb(),
                  static_cast<unsigned long>(opt.stats().max_held_bytes));
      std::fflush(stdout);
    }
  }
  const bool finished = opt.finish(120s);
  const int n = world->size();
  const double expected = -lr / 1024.0 * static_cast<double>(steps) * n * (n + 1) / 2;
  const double max_diff = (x - expected).abs().max().item<double>();
  auto st = opt.stats();
  std::printf("final rank %d version %ld remote %ld coalesced %lu max_diff %g %s\n", world->rank(),
              static_cast<long>(st.version), static_cast<long>(st.remote_updates),
              static_cast<unsigned long>(st.coalesced), max_diff,
              finished && max_diff == 0 && st.version == steps * n ? "exact" : "WRONG");
  return finished && max_diff == 0 && st.version == steps * n ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "connect";
  try {
    if (mode == "default-world") return default_world(std::stoll(argv[2]));
    auto world = World::from_env();
    if (mode == "connect") {
      auto ch = world->open_channel(ChannelOptions());
      std::printf("connected %d/%d\n", world->rank(), world->size());
      return ch->close(60s) ? 0 : 1;
    }
    if (mode == "exchange") return exchange(*world);
    if (mode == "flood") return flood(*world, std::stoi(argv[2]), std::stoll(argv[3]));
    if (mode == "train") return train(world, std::stoll(argv[2]), std::stoll(argv[3]));
    if (mode == "hostile") return hostile(*world, std::stoi(argv[2]));
    if (mode == "mismatch") {
      Fingerprint fp;
      fp.add("fc1.weight", {50, world->rank() == 1 ? 321 : 320}, c10::kFloat);
      world->open_channel(ChannelOptions(), fp);
      return 0;
    }
    std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
