// asgd-exchange-demo: the smallest end-to-end exchange between ranks.
//
// Every rank starts from the same "model" x0, makes `--rounds` local updates of its
// own, applies them locally, and broadcasts them as additive messages; before each
// round it applies whatever deltas have arrived. Nobody waits for anybody. After
// close(), every replica must equal x0 + (sum of all ranks' deltas), exactly: the
// eventual consistency DASGD relies on. With --compress, deltas travel under a lossy
// codec whose residuals follow later (error feedback): the replicas must still agree
// exactly, and fewer bytes travel. The deltas lie on a grid of 2^-10, so that float32
// sums in any order are exact and "exactly" can be checked.
//
//   asgd-launch --nproc 4 --master-port 0 -- asgd-exchange-demo [--rounds 200] [--size 100000]
//                                            [--compress none|bf16|fp16|int8|topk[:F]]
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#include <torch/torch.h>

#include "torch_asgd/torch_asgd.h"

using namespace torch_asgd;

int main(int argc, char** argv) {
  int rounds = 200;
  int64_t size = 100000;
  std::string compress = "none";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--rounds") == 0) rounds = std::stoi(argv[i + 1]);
    else if (std::strcmp(argv[i], "--size") == 0) size = std::stoll(argv[i + 1]);
    else if (std::strcmp(argv[i], "--compress") == 0) compress = argv[i + 1];
  }
  try {
    const Compression compression = Compression::parse(compress);
    auto world = World::from_env();
    // One additive stream of `size` floats; its metadata counts the updates a message holds.
    ChannelOptions opts;
    opts.name = "exchange-demo";
    opts.capacity_bytes = 0;
    MetaSchema schema;
    schema.fields = {Merge::kSum};
    opts.additive = {AdditiveStream{0, c10::kFloat, size, schema, compression}};
    Fingerprint fp;
    fp.add("x", {size}, c10::kFloat);
    auto channel = world->open_channel(opts, fp);

    at::Tensor x = torch::zeros({size});
    int64_t applied = 0;  // peer updates applied here
    int64_t version = 0;  // updates, from any rank, that x contains
    auto apply_arrivals = [&] {
      for (auto& a : channel->poll().additive) {
        x += a.sum;
        for (const auto& part : a.parts) {
          applied += part.second.field(0);
          version += part.second.field(0);
        }
      }
    };
    // Rank r's delta at step t: element i is ((i 7 + t 13 + r 5) mod 2049 - 1024) / 1024.
    const at::Tensor index = torch::arange(size, torch::kLong);
    auto delta = [&](int r, int t) {
      return ((index * 7 + (t * 13 + r * 5)).remainder(2049) - 1024).to(torch::kFloat) / 1024.0;
    };
    const auto t0 = std::chrono::steady_clock::now();
    for (int step = 0; step < rounds; ++step) {
      apply_arrivals();
      at::Tensor d = delta(world->rank(), step);
      Outgoing msg;
      msg.delivery = Delivery::kAdditive;
      msg.payload = d;
      msg.meta = Metadata({1});
      x += d;
      ++version;
      channel->broadcast(msg);
      std::this_thread::sleep_for(std::chrono::microseconds(200 * (world->rank() + 1)));
    }
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const bool clean = channel->close(std::chrono::seconds(60));
    apply_arrivals();

    const int n = world->size();
    at::Tensor expected = torch::zeros({size}, torch::kDouble);
    for (int r = 0; r < n; ++r) {
      for (int t = 0; t < rounds; ++t) expected += delta(r, t).to(torch::kDouble);
    }
    const bool agree = x.to(torch::kDouble).equal(expected);
    uint64_t sent = 0, coalesced = 0, received = 0, bytes = 0;
    for (const auto& c : channel->counters()) {
      sent += c.sent_messages;
      coalesced += c.coalesced + c.coalesced_received;
      received += c.received_messages;
      bytes += c.sent_bytes;
    }
    std::printf(
        "rank %d: %d local steps in %.2f s, applied %ld peer updates; messages sent %lu (%.1f MB, "
        "compression %s), received %lu, coalesced %lu; replica %s x0 + all deltas\n",
        world->rank(), rounds, secs, static_cast<long>(applied), static_cast<unsigned long>(sent),
        static_cast<double>(bytes) / 1e6, compression.describe().c_str(),
        static_cast<unsigned long>(received), static_cast<unsigned long>(coalesced),
        agree ? "equals" : "DIFFERS FROM");
    return agree && clean ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
