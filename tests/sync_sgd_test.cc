#include <gtest/gtest.h>

#include <torch/torch.h>

#include "testing.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/optim/sync_sgd.h"

namespace torch_asgd {
namespace {

torch::nn::Sequential make_net() {
  return torch::nn::Sequential(torch::nn::Linear(6, 12), torch::nn::Tanh(),
                               torch::nn::Linear(12, 2));
}

// Batch of rank r at step t: 8 samples, the same wherever it is drawn.
std::pair<torch::Tensor, torch::Tensor> batch(int r, int t) {
  auto gen = at::detail::createCPUGenerator(100 * r + t);
  return {torch::randn({8, 6}, gen), torch::randn({8, 2}, gen)};
}

std::vector<torch::Tensor> initial_params() {
  torch::manual_seed(5);
  std::vector<torch::Tensor> out;
  for (const auto& p : make_net()->parameters()) out.push_back(p.detach().clone());
  return out;
}

void load(torch::nn::Module& net, const std::vector<torch::Tensor>& ps) {
  torch::NoGradGuard g;
  auto mine = net.parameters();
  for (size_t i = 0; i < ps.size(); ++i) mine[i].copy_(ps[i]);
}

class SyncSGDRanks : public ::testing::TestWithParam<int> {};

TEST_P(SyncSGDRanks, EqualsOneProcessOnTheConcatenatedBatch) {
  const int n = GetParam(), steps = 20;
  const auto x0 = initial_params();
  // Reference: one process, the batches of all ranks concatenated, mean loss.
  auto ref = make_net();
  load(*ref, x0);
  torch::optim::SGD sgd(ref->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  for (int t = 0; t < steps; ++t) {
    std::vector<torch::Tensor> xs, ys;
    for (int r = 0; r < n; ++r) {
      auto [x, y] = batch(r, t);
      xs.push_back(x);
      ys.push_back(y);
    }
    sgd.zero_grad();
    torch::mse_loss(ref->forward(torch::cat(xs)), torch::cat(ys)).backward();
    sgd.step();
  }
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    auto net = make_net();
    load(*net, x0);
    SyncSGD opt(net->named_parameters(), torch::optim::SGDOptions(0.1).momentum(0.9), SyncSGDOptions(), world);
    for (int t = 0; t < steps; ++t) {
      auto [x, y] = batch(world->rank(), t);
      opt.zero_grad();
      torch::mse_loss(net->forward(x), y).backward();
      opt.step();
    }
    auto mine = net->parameters();
    auto theirs = ref->parameters();
    for (size_t i = 0; i < mine.size(); ++i) {
      // Equal up to the summation order of the all-reduce.
      EXPECT_TRUE(torch::allclose(mine[i], theirs[i], 1e-5, 1e-6))
          << "rank " << world->rank() << " parameter " << i << " differs by "
          << (mine[i] - theirs[i]).abs().max().item<double>();
    }
    EXPECT_EQ(opt.stats().steps, steps);
    EXPECT_GT(opt.stats().bytes_reduced, 0u);
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, SyncSGDRanks, ::testing::Values(2, 4));

// DDP's semantics for any rule: with Adam, every rank equals one process running Adam on
// the mean gradient of all ranks' batches.
TEST(SyncSGD, AdamOnTheMeanGradientOverRanks) {
  const int n = 3, steps = 15;
  const auto x0 = initial_params();
  auto ref = make_net();
  load(*ref, x0);
  torch::optim::Adam adam(ref->parameters(), torch::optim::AdamOptions(0.01));
  for (int t = 0; t < steps; ++t) {
    std::vector<torch::Tensor> xs, ys;
    for (int r = 0; r < n; ++r) {
      auto [x, y] = batch(r, t);
      xs.push_back(x);
      ys.push_back(y);
    }
    adam.zero_grad();
    torch::mse_loss(ref->forward(torch::cat(xs)), torch::cat(ys)).backward();
    adam.step();
  }
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    auto net = make_net();
    load(*net, x0);
    SyncSGD opt(std::make_shared<torch::optim::Adam>(net->parameters(), torch::optim::AdamOptions(0.01)),
                SyncSGDOptions(), world);
    for (int t = 0; t < steps; ++t) {
      auto [x, y] = batch(world->rank(), t);
      opt.zero_grad();
      torch::mse_loss(net->forward(x), y).backward();
      opt.step();
    }
    auto mine = net->parameters(), theirs = ref->parameters();
    for (size_t i = 0; i < mine.size(); ++i) {
      EXPECT_TRUE(torch::allclose(mine[i], theirs[i], 1e-4, 1e-5))
          << "rank " << world->rank() << " parameter " << i;
    }
  });
}

TEST(SyncSGD, OneRankIsBitIdenticalToSGD) {
  const auto x0 = initial_params();
  auto a = make_net();
  auto b = make_net();
  load(*a, x0);
  load(*b, x0);
  torch::optim::SGD sgd(a->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9).nesterov(true));
  SyncSGD sync(b->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9).nesterov(true));
  for (int t = 0; t < 50; ++t) {
    auto [x, y] = batch(0, t);
    for (auto* pair : {static_cast<torch::optim::Optimizer*>(&sgd), static_cast<torch::optim::Optimizer*>(&sync)}) {
      auto& net = pair == &sgd ? a : b;
      pair->zero_grad();
      torch::mse_loss(net->forward(x), y).backward();
      pair->step();
    }
  }
  auto pa = a->parameters(), pb = b->parameters();
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(torch::equal(pa[i], pb[i]));
}

TEST(SyncSGD, LocalCommunicatesNothing) {
  const auto x0 = initial_params();
  testing::spawn(2, [&](std::shared_ptr<World> world) {
    auto net = make_net();
    auto alone = make_net();
    load(*net, x0);
    load(*alone, x0);
    SyncSGD opt(net->parameters(), torch::optim::SGDOptions(0.1), SyncSGDOptions().local(true), world);
    torch::optim::SGD sgd(alone->parameters(), torch::optim::SGDOptions(0.1));
    for (int t = 0; t < 20; ++t) {
      auto [x, y] = batch(world->rank(), t);
      opt.zero_grad();
      torch::mse_loss(net->forward(x), y).backward();
      opt.step();
      sgd.zero_grad();
      torch::mse_loss(alone->forward(x), y).backward();
      sgd.step();
    }
    auto pa = net->parameters(), pb = alone->parameters();
    for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(torch::equal(pa[i], pb[i]));
    EXPECT_EQ(opt.stats().bytes_reduced, 0u);
  });
}

TEST(SyncSGD, MismatchedModelsAreRefused) {
  auto errors = testing::spawn_collect(2, [](std::shared_ptr<World> world) {
    auto net = torch::nn::Sequential(torch::nn::Linear(4, world->rank() == 0 ? 2 : 3));
    SyncSGD opt(net->named_parameters(), torch::optim::SGDOptions(0.1), SyncSGDOptions(), world);
  });
  for (const auto& e : errors) {
    EXPECT_NE(e.find("parameter '0.weight' has shape"), std::string::npos) << e;
  }
}

}  // namespace
}  // namespace torch_asgd
