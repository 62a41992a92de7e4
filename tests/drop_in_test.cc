// What makes torch_asgd a drop-in for DDP: every rank starts equal (or is refused),
// buffers are handled, every optimizer answers the same calls, and DASGD can take DDP's
// averaged step.
#include <gtest/gtest.h>

#include <mutex>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "testing.h"
#include "torch_asgd/torch_asgd.h"

namespace torch_asgd {
namespace {

using namespace std::chrono_literals;
using testing::spawn;
using testing::spawn_collect;

// A network with BatchNorm (buffers: running_mean, running_var, num_batches_tracked),
// its values depending on `rank`, as differently seeded ranks' would. 65 float
// parameters: the int64 buffer then starts 4 bytes off an 8-byte boundary in what the
// equal start broadcasts.
torch::nn::Sequential bn_net(int rank) {
  torch::nn::Sequential net(torch::nn::Linear(4, 8), torch::nn::BatchNorm1d(8), torch::nn::ReLU(),
                            torch::nn::Linear(8, 1));
  torch::NoGradGuard no_grad;
  int i = 0;
  for (auto& p : net->parameters()) {
    p.copy_(torch::linspace(-1, 1, p.numel()).view_as(p) * (rank + 1) + i++);
  }
  for (auto& b : net->buffers()) {
    if (at::isFloatingType(b.scalar_type())) {
      b.fill_(rank + 0.5);
    } else {
      b.fill_(10 * rank + 3);
    }
  }
  return net;
}

// Every parameter and buffer of `net`, flattened (a copy).
std::vector<at::Tensor> state_of(torch::nn::Module& net) {
  std::vector<at::Tensor> out;
  for (auto& p : net.parameters()) out.push_back(p.detach().clone());
  for (auto& b : net.buffers()) out.push_back(b.clone());
  return out;
}

bool same(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!torch::equal(a[i], b[i])) return false;
  }
  return true;
}

std::shared_ptr<torch::optim::Optimizer> sgd_of(torch::nn::Module& net, double lr = 0.05) {
  return std::make_shared<torch::optim::SGD>(net.parameters(), torch::optim::SGDOptions(lr));
}

// One of every algorithm for `net` on `world` (rank 0 is the AsGrad server).
std::unique_ptr<DistributedOptimizer> make(const std::string& algo, torch::nn::Sequential& net,
                                           std::shared_ptr<World> world, Model model,
                                           int64_t server_gradients = 4) {
  if (algo == "dasgd") return std::make_unique<DASGD>(sgd_of(*net), DASGDOptions(), world, model);
  if (algo == "gossip") return std::make_unique<Gossip>(sgd_of(*net), GossipOptions(), world, model);
  if (algo == "sync") return std::make_unique<SyncSGD>(sgd_of(*net), SyncSGDOptions(), world, model);
  if (world->rank() == 0) {
    return std::make_unique<ParameterServer>(
        sgd_of(*net), ServerOptions().max_gradients(server_gradients), world, model);
  }
  return std::make_unique<AsGradWorker>(net->parameters(), WorkerOptions(), world, model);
}

// What "asgrad" names in the statistics of rank `rank`.
std::string algorithm_name(const std::string& algo, int rank) {
  if (algo == "dasgd") return "DASGD";
  if (algo == "gossip") return "Gossip";
  if (algo == "sync") return "SyncSGD";
  return rank == 0 ? "ParameterServer" : "AsGradWorker";
}

std::string param_name(const ::testing::TestParamInfo<std::string>& i) { return i.param; }

class EveryAlgorithm : public ::testing::TestWithParam<std::string> {};

// DDP's start: whatever each rank built, every rank trains from rank 0's parameters and
// buffers (the server's, for the AsGrad family).
TEST_P(EveryAlgorithm, EveryRankStartsFromRankZerosParametersAndBuffers) {
  const std::string algo = GetParam();
  spawn(3, [&](std::shared_ptr<World> world) {
    auto net = bn_net(world->rank());
    auto expected = bn_net(0);
    ASSERT_EQ(same(state_of(*net), state_of(*expected)), world->rank() == 0);
    auto opt = make(algo, net, world, net);
    EXPECT_TRUE(same(state_of(*net), state_of(*expected))) << "rank " << world->rank();
    if (algo == "asgrad" && world->rank() == 0) {
      while (!opt->done()) opt->step();
    }
    EXPECT_TRUE(opt->finish(30s));
  });
}

// The same loop, written against DistributedOptimizer, drives every algorithm, and
// every optimizer's statistics name it, as text and as JSON.
TEST_P(EveryAlgorithm, OneLoopAndOneContractForEveryOptimizer) {
  const std::string algo = GetParam();
  spawn(3, [&](std::shared_ptr<World> world) {
    auto net = bn_net(world->rank());
    std::unique_ptr<DistributedOptimizer> opt = make(algo, net, world, net);
    auto x = torch::linspace(-1, 1, 16).view({4, 4}) * (world->rank() + 1);
    for (int t = 0; t < 6 && !opt->done(); ++t) {
      opt->zero_grad();
      if (algo != "asgrad" || world->rank() != 0) net->forward(x).pow(2).sum().backward();
      opt->step();
    }
    while (!opt->done() && algo == "asgrad") opt->step();  // the server serves the rest
    EXPECT_TRUE(opt->finish(30s));
    EXPECT_TRUE(opt->finish(1s)) << "a second finish() returns at once";
    EXPECT_THROW(opt->step(), ConfigError) << "step() after finish()";
    const auto stats = opt->stats();
    const std::string name = algorithm_name(algo, world->rank());
    EXPECT_EQ(stats->optimizer, name);
    EXPECT_EQ(opt->algorithm(), name);
    const std::string who = fmt::format("{} rank {}/3: ", name, world->rank());
    EXPECT_EQ(stats->str().rfind(who, 0), 0u) << stats->str();
    const auto j = nlohmann::json::parse(stats->to_json());
    EXPECT_EQ(j["optimizer"], name) << j;
    EXPECT_EQ(j["rank"], world->rank()) << j;
    EXPECT_EQ(j["world_size"], 3) << j;
  });
}

INSTANTIATE_TEST_SUITE_P(DropIn, EveryAlgorithm, ::testing::Values("dasgd", "gossip", "sync", "asgrad"),
                         param_name);

// Start::kCheck: ranks whose models differ are refused, every rank naming the first
// tensor that differs and the ranks whose copy differs from rank 0's; equal ones pass.
TEST(EqualStart, UnderCheckRanksThatDifferAreRefusedNamingTheFirstTensor) {
  auto errors = spawn_collect(3, [](std::shared_ptr<World> world) {
    auto net = bn_net(world->rank() == 2 ? 2 : 0);  // only rank 2 differs
    DASGD opt(sgd_of(*net), DASGDOptions(), world, Model(net).start(Start::kCheck));
  });
  for (int r = 0; r < 3; ++r) {
    EXPECT_NE(errors[r].find("the ranks' models differ: parameter '0.weight' on rank 2 is not rank 0's"),
              std::string::npos)
        << "rank " << r << ": " << errors[r];
  }
  // Parameters equal, one buffer not: the buffer is named.
  errors = spawn_collect(2, [](std::shared_ptr<World> world) {
    auto net = bn_net(0);
    if (world->rank() == 1) {
      torch::NoGradGuard no_grad;
      net[1]->buffers()[1].add_(1);  // 1.running_var
    }
    SyncSGD opt(sgd_of(*net), SyncSGDOptions(), world, Model(net).start(Start::kCheck));
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(errors[r].find("buffer '1.running_var' on rank 1 is not rank 0's"), std::string::npos)
        << "rank " << r << ": " << errors[r];
  }
  errors = spawn_collect(3, [](std::shared_ptr<World> world) {
    auto net = bn_net(0);
    Gossip opt(sgd_of(*net), GossipOptions(), world, Model(net).start(Start::kCheck));
    opt.finish(30s);
  });
  for (int r = 0; r < 3; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

// Ranks that disagree on the start (one checks, another broadcasts) are refused at once,
// on every rank, before either waits in the other's collective.
TEST(EqualStart, RanksThatDisagreeOnTheStartAreRefused) {
  auto errors = spawn_collect(2, [](std::shared_ptr<World> world) {
    auto net = bn_net(0);
    Model model(net);
    if (world->rank() == 1) model.start(Start::kCheck);
    DASGD opt(sgd_of(*net), DASGDOptions(), world, model);
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(errors[r].find("start"), std::string::npos) << "rank " << r << ": " << errors[r];
    EXPECT_NE(errors[r].find("ranks disagree on what they exchange"), std::string::npos) << errors[r];
  }
}

// A rank whose options are bad throws before any collective, so that its peers do not
// go on training without it: they wait for it at the channel's opening and say so.
TEST(EqualStart, BadOptionsOnOneRankStopEveryRankAtConstruction) {
  std::vector<std::string> errors(2);
  spawn(2, [&](std::shared_ptr<World> world) {
    auto net = bn_net(0);
    try {
      DASGD opt(sgd_of(*net), DASGDOptions().broadcast_every(world->rank() == 1 ? 0 : 1), world, net);
      opt.finish(1s);
    } catch (const std::exception& e) {
      errors[world->rank()] = e.what();
    }
  }, [](WorldOptions& o) { o.timeout = std::chrono::seconds(3); });
  EXPECT_NE(errors[1].find("broadcast_every is 0"), std::string::npos) << errors[1];
  EXPECT_NE(errors[0].find("ranks [1]"), std::string::npos)
      << "rank 0 must not train alone: " << errors[0];
}

// SyncSGD's buffers are rank 0's after every step (DDP's broadcast_buffers), though every
// rank's forward pass updates its own running statistics from its own data; without
// broadcast_buffers each rank keeps its own.
TEST(Buffers, SyncSGDTakesRankZerosBuffersAfterEveryStep) {
  for (bool broadcast : {true, false}) {
    std::mutex mu;
    std::vector<std::vector<at::Tensor>> seen(2);
    spawn(2, [&](std::shared_ptr<World> world) {
      auto net = bn_net(0);
      SyncSGD opt(sgd_of(*net), SyncSGDOptions().broadcast_buffers(broadcast), world, net);
      for (int t = 0; t < 3; ++t) {
        opt.zero_grad();
        auto x = torch::linspace(-1, 1, 16).view({4, 4}) * (world->rank() + 1) + t;
        net->forward(x).pow(2).sum().backward();
        opt.step();
      }
      std::lock_guard<std::mutex> lock(mu);
      for (auto& b : net->buffers()) seen[world->rank()].push_back(b.clone());
    });
    EXPECT_EQ(same(seen[0], seen[1]), broadcast) << "broadcast_buffers " << broadcast;
  }
}

// resync() averages the parameters and the floating-point buffers (integer buffers:
// rank 0's), in DASGD, Gossip and SyncSGD alike.
TEST(Buffers, ResyncAveragesParametersAndBuffers) {
  for (const std::string algo : {"dasgd", "gossip", "sync"}) {
    spawn(3, [&](std::shared_ptr<World> world) {
      auto net = bn_net(0);
      auto opt = make(algo, net, world, net);
      {
        torch::NoGradGuard no_grad;
        for (auto& p : net->parameters()) p.fill_(world->rank() * 3.0);
        for (auto& b : net->buffers()) b.fill_(at::isFloatingType(b.scalar_type()) ? world->rank() + 1.0 : 7.0 + world->rank());
      }
      opt->resync();
      for (auto& p : net->parameters()) EXPECT_TRUE(torch::equal(p, torch::full_like(p, 3.0))) << algo;
      for (auto& b : net->buffers()) {
        const double want = at::isFloatingType(b.scalar_type()) ? 2.0 : 7.0;
        EXPECT_TRUE(torch::equal(b, torch::full_like(b, want))) << algo << " " << b;
      }
      opt->finish(30s);
    });
  }
}

// A module with a buffer that its forward pass leaves alone, so that only gossip's
// exchanges change it.
struct ScaledImpl : torch::nn::Module {
  ScaledImpl() {
    fc = register_module("fc", torch::nn::Linear(4, 1));
    scale = register_buffer("scale", torch::zeros({3}));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc->forward(x) * scale.sum(); }
  torch::nn::Linear fc{nullptr};
  torch::Tensor scale;
};
TORCH_MODULE(Scaled);

// Gossip mixes the floating-point buffers with the parameters: with the parameters kept
// still (lr 0) and the buffers at 2 and 6, every exchange averages them to 4, and their
// sum stays 8.
TEST(Buffers, GossipMixesBuffersWithTheModel) {
  std::mutex mu;
  std::vector<at::Tensor> scales(2);
  std::vector<int64_t> mixes(2);
  spawn(2, [&](std::shared_ptr<World> world) {
    Scaled net;
    Gossip opt(std::make_shared<torch::optim::SGD>(net->parameters(), torch::optim::SGDOptions(0.0)),
               GossipOptions(), world, *net);
    net->scale.fill_(world->rank() == 0 ? 2.0 : 6.0);  // after the equal start
    for (int t = 0; t < 20; ++t) {
      opt.zero_grad();
      net->forward(torch::ones({2, 4})).sum().backward();
      opt.step();
      std::this_thread::sleep_for(2ms);
    }
    ASSERT_TRUE(opt.finish(30s));
    std::lock_guard<std::mutex> lock(mu);
    scales[world->rank()] = net->scale.clone();
    mixes[world->rank()] = opt.stats().completed + opt.stats().answered;
  });
  ASSERT_GT(mixes[0] + mixes[1], 0) << "no exchange completed: nothing was tested";
  EXPECT_TRUE(torch::equal(scales[0] + scales[1], torch::full({3}, 8.0))) << scales[0] << scales[1];
  EXPECT_TRUE(torch::equal(scales[0], torch::full({3}, 4.0))) << scales[0];
  EXPECT_TRUE(torch::equal(scales[1], torch::full({3}, 4.0))) << scales[1];
}

// DASGDOptions::average: each rank's change is scaled by 1/n, so that after every rank's
// step and finish() every replica moved by the mean of the ranks' steps (DDP's averaged
// step); without it, by their sum. (Powers of two: exact in float.)
TEST(AverageStep, EveryReplicaMovesByTheMeanOfTheRanksSteps) {
  for (bool average : {true, false}) {
    std::mutex mu;
    std::vector<at::Tensor> result(2);
    spawn(2, [&](std::shared_ptr<World> world) {
      auto w = torch::ones({5}).requires_grad_(true);
      DASGD opt(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.5),
                DASGDOptions().average(average), world);
      for (int t = 0; t < 3; ++t) {
        opt.zero_grad();
        (w * (world->rank() == 0 ? 1.0 : 2.0)).sum().backward();  // gradients 1 and 2
        opt.step();
      }
      ASSERT_TRUE(opt.finish(30s));
      std::lock_guard<std::mutex> lock(mu);
      result[world->rank()] = w.detach().clone();
    });
    // Three steps of lr 0.5 on each rank: -1.5 and -3 each; their mean -2.25, sum -4.5.
    const double expected = average ? 1 - 2.25 : 1 - 4.5;
    for (int r = 0; r < 2; ++r) {
      EXPECT_TRUE(torch::equal(result[r], torch::full({5}, expected)))
          << "average " << average << " rank " << r << ": " << result[r];
    }
  }
}

// The AsGrad worker's gradient that holds NaN is not sent (the server would refuse it and
// the worker would wait for a job that never comes): step() throws DivergedError at once,
// and finish() hands the worker's job to another, so the server's training ends.
TEST(AsGradWorker, ANonFiniteGradientIsDivergedErrorAndTheJobGoesToAnother) {
  spawn(3, [&](std::shared_ptr<World> world) {
    auto w = torch::ones({4}).requires_grad_(true);
    if (world->rank() == 0) {
      ParameterServer server(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.1),
                             ServerOptions().max_gradients(20), world);
      while (!server.done()) server.step();
      EXPECT_EQ(server.stats().gradients, 20);
      return;
    }
    AsGradWorker opt(std::vector<torch::Tensor>{w}, WorkerOptions(), world);
    const bool broken = world->rank() == 2;
    try {
      while (!opt.done()) {
        opt.zero_grad();
        (w * (broken ? std::nan("") : 1.0)).sum().backward();
        opt.step();
      }
      EXPECT_FALSE(broken) << "a NaN gradient was sent";
    } catch (const DivergedError& e) {
      EXPECT_TRUE(broken) << e.what();
      EXPECT_NE(std::string(e.what()).find("rank 2: AsGradWorker: the gradient at job version"),
                std::string::npos)
          << e.what();
    }
    opt.finish(30s);
  });
}

}  // namespace
}  // namespace torch_asgd
