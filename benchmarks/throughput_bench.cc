// Training throughput of one rank of an example network (MNIST's, or with --net cifar
// the CIFAR example's ResNet-20) under an algorithm;
// run several ranks with asgd-launch. benchmarks/throughput.sh runs every algorithm
// in one go and tabulates the aggregate samples/s.
//
//   asgd-launch --nproc 2 -- asgd-bench-throughput --algo {local,dasgd,gossip,sync}
//                            [--steps 300] [--warmup 30] [--batch-size 64] [--broadcast-every 1]
//                            [--optimizer sgd|adam|adamw] [--max-lead L] [--lead-policy wait|damp]
//                            [--lead-measure applied|progress] [--compress CODEC]
//                            [--net mnist|cifar|lm|flat] [--flat-mb MB] [--sleep-ms MS]
//
// "local" is the inner optimizer alone (a plain torch::optim optimizer, no wrapper):
// the others' figures with one process are the wrapper's own per-step cost.
//
// --net lm is asgd-lm's default transformer (10.9 M parameters, 128-byte samples);
// --net flat is one parameter vector of --flat-mb MB whose gradient is fixed noise (no
// network); with --sleep-ms each step also sleeps that long, standing in for compute, so
// that tens of ranks fit on a few cores and what is measured is the optimizer and the
// network (benchmarks/scale.sh).
//
// Inputs are synthetic batches of the data set's shape, made before timing, so the figure
// is compute plus communication, not data loading. Prints one line per rank:
//   throughput algo=dasgd rank=0 samples_per_second=1234.5 steps=300 ...
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>

#include <torch/torch.h>

#include "cifar/resnet.h"
#include "lm/transformer.h"
#include "mnist/net.h"
#include "proc_status.h"
#include "torch_asgd/torch_asgd.h"

using namespace torch_asgd;

namespace {

// --net flat: one parameter vector; the "loss" (p * g).sum() makes g its gradient.
struct FlatImpl : torch::nn::Module {
  explicit FlatImpl(int64_t numel) { p = register_parameter("p", torch::zeros({numel})); }
  torch::Tensor p;
};

}  // namespace

int main(int argc, char** argv) {
  std::string algo = "dasgd";
  int steps = 300, warmup = 30, batch = 64, broadcast_every = 1;
  int64_t max_lead = 0;
  std::string optimizer = "sgd", lead_policy = "wait", lead_measure = "applied", net_name = "mnist",
              compress = "none";
  double flat_mb = 2, sleep_ms = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    if (a == "--algo") algo = argv[i + 1];
    else if (a == "--steps") steps = std::stoi(argv[i + 1]);
    else if (a == "--warmup") warmup = std::stoi(argv[i + 1]);
    else if (a == "--batch-size") batch = std::stoi(argv[i + 1]);
    else if (a == "--broadcast-every") broadcast_every = std::stoi(argv[i + 1]);
    else if (a == "--optimizer") optimizer = argv[i + 1];
    else if (a == "--max-lead") max_lead = std::stoll(argv[i + 1]);
    else if (a == "--lead-policy") lead_policy = argv[i + 1];
    else if (a == "--lead-measure") lead_measure = argv[i + 1];
    else if (a == "--compress") compress = argv[i + 1];
    else if (a == "--net") net_name = argv[i + 1];
    else if (a == "--flat-mb") flat_mb = std::stod(argv[i + 1]);
    else if (a == "--sleep-ms") sleep_ms = std::stod(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  torch::set_num_threads(1);
  try {
    // "local" is two independent processes: no World, no rendezvous, nothing shared.
    const auto r0 = std::chrono::steady_clock::now();
    std::shared_ptr<World> world = algo == "local" ? nullptr : World::from_env();
    const double rendezvous = std::chrono::duration<double>(std::chrono::steady_clock::now() - r0).count();
    const int rank = world ? world->rank() : WorldOptions::from_env().rank;
    torch::manual_seed(1);
    if (net_name != "mnist" && net_name != "cifar" && net_name != "lm" && net_name != "flat") {
      throw std::invalid_argument("--net must be mnist, cifar, lm or flat");
    }
    if (!(flat_mb > 0) || sleep_ms < 0) throw std::invalid_argument("--flat-mb must be > 0 and --sleep-ms >= 0");
    const bool cifar = net_name == "cifar";
    const examples::TransformerConfig lm_config;
    std::shared_ptr<torch::nn::Module> module;
    std::function<torch::Tensor(const torch::Tensor&)> forward;  // log-probabilities
    auto use = [&](auto m) {
      forward = [m](const torch::Tensor& x) { return m->forward(x); };
      module = m;
    };
    if (cifar) {
      use(std::make_shared<examples::ResNetImpl>(3));
    } else if (net_name == "lm") {
      use(std::make_shared<examples::TransformerImpl>(lm_config));
    } else if (net_name == "flat") {
      auto flat = std::make_shared<FlatImpl>(static_cast<int64_t>(flat_mb * (1 << 20) / 4));
      module = flat;
      forward = [flat](const torch::Tensor& g) { return (flat->p * g).sum(); };
    } else {
      use(std::make_shared<examples::MnistNetImpl>());
    }
    auto* net = module.get();
    std::unique_ptr<torch::optim::Optimizer> opt;
    std::shared_ptr<torch::optim::Optimizer> local;  // the inner optimizer alone
    DASGD* dasgd = nullptr;
    Gossip* gossip = nullptr;
    auto rule = [&]() -> std::shared_ptr<torch::optim::Optimizer> {
      if (optimizer == "adam") {
        return std::make_shared<torch::optim::Adam>(net->parameters(), torch::optim::AdamOptions(1e-3));
      }
      if (optimizer == "adamw") {
        return std::make_shared<torch::optim::AdamW>(net->parameters(), torch::optim::AdamWOptions(1e-3));
      }
      if (optimizer != "sgd") throw std::invalid_argument("--optimizer must be sgd, adam or adamw");
      return std::make_shared<torch::optim::SGD>(net->parameters(),
                                                 torch::optim::SGDOptions(0.01).momentum(0.5));
    };
    if (algo == "dasgd") {
      auto d = std::make_unique<DASGD>(
          rule(),
          DASGDOptions()
              .broadcast_every(broadcast_every)
              .max_lead(max_lead)
              .lead_policy(lead_policy == "damp" ? LeadPolicy::kDamp : LeadPolicy::kWait)
              .lead_measure(lead_measure == "progress" ? LeadMeasure::kProgress : LeadMeasure::kApplied)
              .compression(Compression::parse(compress)),
          world);
      dasgd = d.get();
      opt = std::move(d);
    } else if (algo == "gossip") {
      auto g = std::make_unique<Gossip>(rule(), GossipOptions().exchange_every(broadcast_every), world);
      gossip = g.get();
      opt = std::move(g);
    } else if (algo == "sync") {
      opt = std::make_unique<SyncSGD>(rule(), SyncSGDOptions(), world);
    } else if (algo == "local") {
      local = rule();
    } else {
      std::fprintf(stderr, "unknown --algo %s (local, dasgd, gossip, sync)\n", algo.c_str());
      return 2;
    }
    torch::optim::Optimizer* step_with = local ? local.get() : opt.get();
    auto gen = at::detail::createCPUGenerator(100 + rank);
    std::vector<torch::Tensor> xs, ys;
    int64_t numel = 0;
    for (const auto& p : net->parameters()) numel += p.numel();
    for (int i = 0; i < 16; ++i) {
      if (net_name == "lm") {
        xs.push_back(torch::randint(0, 256, {batch, lm_config.context}, gen));
        ys.push_back(torch::randint(0, 256, {batch, lm_config.context}, gen));
      } else if (net_name == "flat") {
        xs.push_back(torch::randn({numel}, gen) * 1e-3);  // the gradient
      } else {
        xs.push_back(cifar ? torch::randn({batch, 3, 32, 32}, gen) : torch::randn({batch, 1, 28, 28}, gen));
        ys.push_back(torch::randint(0, 10, {batch}, gen));
      }
    }
    auto run = [&](int n) {
      for (int s = 0; s < n; ++s) {
        step_with->zero_grad();
        auto out = forward(xs[s % 16]);
        auto loss = net_name == "flat" ? out
                                       : torch::nll_loss(out.reshape({-1, out.size(-1)}), ys[s % 16].reshape({-1}));
        loss.backward();
        if (sleep_ms > 0) std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(sleep_ms));
        step_with->step();
      }
    };
    // Messages handed to the channel (a peer's copy each; deltas that wait for a busy link
    // are summed into one message), counted over the timed steps only.
    auto sent_now = [&]() -> uint64_t {
      if (dasgd != nullptr) return dasgd->stats().messages_sent;
      if (gossip != nullptr) return gossip->stats().messages_sent;
      return 0;
    };
    run(warmup);
    const uint64_t sent0 = sent_now();
    const auto t0 = std::chrono::steady_clock::now();
    run(steps);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const uint64_t timed_sent = sent_now() - sent0;
    std::string extra = " parameters=" + std::to_string(numel) + " rendezvous_seconds=" + std::to_string(rendezvous) +
                        " peak_rss_mb=" + std::to_string(bench::status_field("VmHWM") / 1024.0) +
                        " threads=" + std::to_string(bench::status_field("Threads"));
    const auto f0 = std::chrono::steady_clock::now();
    if (dasgd != nullptr) {
      dasgd->finish();
      auto s = dasgd->stats();
      extra += " staleness_mean=" + std::to_string(s.staleness.mean()) +
              " staleness_max=" + std::to_string(s.staleness.max) +
              " messages_sent=" + std::to_string(timed_sent);
    }
    if (gossip != nullptr) {
      gossip->finish();
      auto s = gossip->stats();
      extra += " lag_mean=" + std::to_string(s.lag.mean()) + " exchanges=" + std::to_string(s.completed) +
               " messages_sent=" + std::to_string(timed_sent);
    }
    extra += " finish_seconds=" +
             std::to_string(std::chrono::duration<double>(std::chrono::steady_clock::now() - f0).count());
    std::printf("throughput algo=%s optimizer=%s rank=%d samples_per_second=%.3f steps_per_second=%.3f steps=%d "
                "seconds=%.3f%s\n",
                algo.c_str(), optimizer.c_str(), rank, steps * batch / secs, steps / secs, steps, secs, extra.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
