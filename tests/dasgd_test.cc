#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>

#include <torch/torch.h>

#include "testing.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/optim/dasgd.h"
#include "torch_asgd/optim/detail/device_pipeline.h"

namespace torch_asgd {

// Deterministic delivery for tests: step() leaves arrivals alone, and this applies
// them in rank order once the expected number of peer updates is there.
struct DASGDTestAccess {
  static void hold_arrivals(DASGD& o) { o.hold_arrivals_ = true; }

  static void deliver_in_rank_order(DASGD& o, int64_t updates) {
    std::vector<Message> got;
    int64_t have = 0;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (have < updates) {
      if (std::chrono::steady_clock::now() > deadline) {
        throw std::runtime_error("lock-step delivery timed out");
      }
      for (auto& m : o.channel_->wait(std::chrono::milliseconds(10))) {
        have += m.header.updates.count;
        got.push_back(std::move(m));
      }
    }
    if (have != updates) throw std::runtime_error("more updates arrived than expected");
    std::stable_sort(got.begin(), got.end(),
                     [](const Message& a, const Message& b) { return a.sender() < b.sender(); });
    o.apply(std::move(got));
  }
};

namespace {

using namespace std::chrono_literals;

torch::nn::Sequential make_net() {
  return torch::nn::Sequential(torch::nn::Linear(10, 16), torch::nn::Tanh(),
                               torch::nn::Linear(16, 3));
}

void copy_params(torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard g;
  auto a = from.parameters();
  auto b = to.parameters();
  for (size_t i = 0; i < a.size(); ++i) b[i].copy_(a[i]);
}

bool same_params(torch::nn::Module& a, torch::nn::Module& b) {
  auto pa = a.parameters();
  auto pb = b.parameters();
  for (size_t i = 0; i < pa.size(); ++i) {
    if (!torch::equal(pa[i], pb[i])) return false;
  }
  return true;
}

// One training step of `net` on batch `t` (the same data for the same t everywhere).
void train_step(torch::nn::Sequential& net, torch::optim::Optimizer& opt, int t, int rank = 0) {
  auto gen = at::detail::createCPUGenerator(1000 * rank + t);
  auto x = torch::randn({8, 10}, gen);
  auto y = torch::randint(0, 3, {8}, gen);
  opt.zero_grad();
  auto loss = torch::nll_loss(torch::log_softmax(net->forward(x), 1), y);
  loss.backward();
  opt.step();
}

struct RuleCase {
  const char* name;
  double momentum, dampening, weight_decay;
  bool nesterov;
};

class SingleRank : public ::testing::TestWithParam<RuleCase> {};

TEST_P(SingleRank, BitIdenticalToTorchSGDOver100Steps) {
  const RuleCase c = GetParam();
  torch::manual_seed(0);
  auto a = make_net();
  auto b = make_net();
  copy_params(*a, *b);
  torch::optim::SGD sgd(a->parameters(), torch::optim::SGDOptions(0.05)
                                             .momentum(c.momentum)
                                             .dampening(c.dampening)
                                             .weight_decay(c.weight_decay)
                                             .nesterov(c.nesterov));
  DASGD dasgd(b->parameters(), DASGDOptions(0.05)
                                   .momentum(c.momentum)
                                   .dampening(c.dampening)
                                   .weight_decay(c.weight_decay)
                                   .nesterov(c.nesterov));
  torch::optim::StepLR sched_a(sgd, 30, 0.5);
  torch::optim::StepLR sched_b(dasgd, 30, 0.5);
  for (int t = 0; t < 100; ++t) {
    train_step(a, sgd, t);
    train_step(b, dasgd, t);
    sched_a.step();
    sched_b.step();
    ASSERT_TRUE(same_params(*a, *b)) << c.name << " differs at step " << t;
  }
  EXPECT_EQ(dasgd.stats().local_steps, 100);
  EXPECT_EQ(dasgd.stats().version, 100);
  EXPECT_EQ(dasgd.stats().staleness.max, 0);
  EXPECT_DOUBLE_EQ(dasgd.param_groups()[0].options().get_lr(), 0.05 * 0.125);
}

INSTANTIATE_TEST_SUITE_P(Rules, SingleRank,
                         ::testing::Values(RuleCase{"plain", 0, 0, 0, false},
                                           RuleCase{"momentum", 0.9, 0, 0, false},
                                           RuleCase{"dampening", 0.9, 0.2, 0, false},
                                           RuleCase{"nesterov", 0.9, 0, 1e-3, true},
                                           RuleCase{"weight_decay", 0, 0, 1e-2, false}));

TEST(DASGD, ParameterGroupsKeepTheirOwnOptions) {
  torch::manual_seed(1);
  auto a = make_net();
  auto b = make_net();
  copy_params(*a, *b);
  auto pa = a->parameters();
  auto pb = b->parameters();
  std::vector<torch::optim::OptimizerParamGroup> ga = {
      torch::optim::OptimizerParamGroup({pa[0], pa[1]}, std::make_unique<torch::optim::SGDOptions>(
                                                            torch::optim::SGDOptions(0.2).momentum(0.5))),
      torch::optim::OptimizerParamGroup({pa[2], pa[3]})};
  std::vector<torch::optim::OptimizerParamGroup> gb = {
      torch::optim::OptimizerParamGroup({pb[0], pb[1]},
                                        std::make_unique<DASGDOptions>(DASGDOptions(0.2).momentum(0.5))),
      torch::optim::OptimizerParamGroup({pb[2], pb[3]})};
  torch::optim::SGD sgd(ga, torch::optim::SGDOptions(0.01));
  DASGD dasgd(gb, DASGDOptions(0.01));
  EXPECT_DOUBLE_EQ(dasgd.param_groups()[0].options().get_lr(), 0.2);
  EXPECT_DOUBLE_EQ(dasgd.param_groups()[1].options().get_lr(), 0.01);
  for (int t = 0; t < 30; ++t) {
    train_step(a, sgd, t);
    train_step(b, dasgd, t);
  }
  EXPECT_TRUE(same_params(*a, *b));
}

TEST(DASGD, RefusesBadOptions) {
  auto net = make_net();
  EXPECT_THROW(DASGD(net->parameters(), DASGDOptions(-1)), c10::Error);
  EXPECT_THROW(DASGD(net->parameters(), DASGDOptions(0.1).nesterov(true)), c10::Error);
  EXPECT_THROW(DASGD(net->parameters(), DASGDOptions(0.1).broadcast_every(0)), c10::Error);
  EXPECT_THROW(DASGD(net->parameters(), DASGDOptions(0.1).gossip_alpha(0)), c10::Error);
  std::vector<torch::optim::OptimizerParamGroup> foreign = {torch::optim::OptimizerParamGroup(
      net->parameters(), std::make_unique<torch::optim::AdamOptions>(0.1))};
  EXPECT_THROW(DASGD(foreign, DASGDOptions(0.1)), ConfigError);
}

TEST(DASGD, WorldOfOneIsPlainSGD) {
  torch::manual_seed(2);
  auto a = make_net();
  auto b = make_net();
  copy_params(*a, *b);
  auto world = World::create(testing::thread_world_options(0, 1));
  torch::optim::SGD sgd(a->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  DASGD dasgd(b->parameters(), DASGDOptions(0.1).momentum(0.9), world);
  for (int t = 0; t < 20; ++t) {
    train_step(a, sgd, t);
    train_step(b, dasgd, t);
  }
  EXPECT_TRUE(same_params(*a, *b));
  EXPECT_TRUE(dasgd.finish());
  EXPECT_THROW(train_step(b, dasgd, 0), ConfigError);
}

// Lock-step: every rank takes a step, then receives every peer's delta of that step
// (applied in rank order), then all meet. Each replica must equal, bit for bit,
// sequential SGD over the same gradients in the same order: its own, then the peers'
// in rank order. The staleness it records must be the version differences that
// follow from that schedule.
class LockStep : public ::testing::TestWithParam<int> {};

TEST_P(LockStep, EqualsSequentialSGDOverTheInterleavedGradients) {
  const int n = GetParam();
  const int steps = 25;
  const double lr = 0.1;
  // updates[t][r]: the update rank r applied at step t (its -lr * gradient).
  std::vector<std::vector<torch::Tensor>> updates(steps, std::vector<torch::Tensor>(n));
  torch::manual_seed(3);
  auto init = make_net();
  std::vector<torch::Tensor> x0;
  for (const auto& p : init->parameters()) x0.push_back(p.detach().clone());

  testing::spawn(n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    auto net = make_net();
    {
      torch::NoGradGuard g;
      auto ps = net->parameters();
      for (size_t i = 0; i < ps.size(); ++i) ps[i].copy_(x0[i]);
    }
    DASGD opt(net->named_parameters(), DASGDOptions(lr), world);
    DASGDTestAccess::hold_arrivals(opt);
    for (int t = 0; t < steps; ++t) {
      std::vector<torch::Tensor> before;
      for (const auto& p : net->parameters()) before.push_back(p.detach().clone());
      train_step(net, opt, t, me);
      std::vector<torch::Tensor> d;
      auto ps = net->parameters();
      for (size_t i = 0; i < ps.size(); ++i) d.push_back(ps[i].grad().mul(-lr));
      updates[t][me] = torch::cat([&] {
        std::vector<torch::Tensor> flat;
        for (auto& x : d) flat.push_back(x.reshape({-1}));
        return flat;
      }());
      DASGDTestAccess::deliver_in_rank_order(opt, static_cast<int64_t>(n - 1) * (t + 1) -
                                                      opt.stats().remote_updates);
      world->barrier("step-" + std::to_string(t));
    }
    world->barrier("recorded");

    // The reference, computed from the recorded updates alone.
    std::vector<torch::Tensor> ref;
    for (const auto& x : x0) ref.push_back(x.clone());
    auto apply = [&](const torch::Tensor& flat) {
      int64_t off = 0;
      for (auto& r : ref) {
        r.add_(flat.narrow(0, off, r.numel()).view(r.sizes()));
        off += r.numel();
      }
    };
    for (int t = 0; t < steps; ++t) {
      apply(updates[t][me]);
      for (int r = 0; r < n; ++r) {
        if (r != me) apply(updates[t][r]);
      }
    }
    auto ps = net->parameters();
    for (size_t i = 0; i < ps.size(); ++i) {
      EXPECT_TRUE(torch::equal(ps[i], ref[i])) << "rank " << me << " parameter " << i;
    }

    // Version bookkeeping: at step t every replica starts at version n*t, applies its
    // own update (staleness 0, computed at n*t), then the k-th peer delta (computed
    // at n*t) at version n*t + k.
    const DASGDStats s = opt.stats();
    int64_t expect_sum = 0;
    for (int t = 0; t < steps; ++t) {
      for (int k = 1; k < n; ++k) expect_sum += k;
    }
    EXPECT_EQ(s.local_steps, steps);
    EXPECT_EQ(s.version, static_cast<int64_t>(n) * steps);
    EXPECT_EQ(s.remote_updates, static_cast<int64_t>(n - 1) * steps);
    EXPECT_EQ(s.staleness.count, static_cast<int64_t>(n) * steps);
    EXPECT_EQ(s.staleness.sum, expect_sum);
    EXPECT_EQ(s.staleness.max, n - 1);
    EXPECT_TRUE(opt.finish(20s));
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, LockStep, ::testing::Values(2, 3));

// Least squares sharded over 4 ranks (rank 3 four times slower) must converge to the
// known optimum; the fast ranks make about 4x the slow one's steps.
struct ConvergenceResult {
  std::vector<int64_t> steps;
  std::vector<torch::Tensor> w;
  std::vector<DASGDStats> stats;
};

ConvergenceResult least_squares(DASGDMode mode) {
  const int n = 4, dim = 8, rows = 256, slow_rank = 3, slow_steps = 100;
  // Double precision: replicas agree up to summation order, which float32 would blur
  // to ~1e-5 after a thousand updates; in float64 a real discrepancy cannot hide.
  auto xstar = torch::linspace(-1, 1, dim, torch::kDouble);
  ConvergenceResult res;
  res.steps.resize(n);
  res.w.resize(n);
  res.stats.resize(n);
  std::atomic<bool> slow_done{false};
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    auto gen = at::detail::createCPUGenerator(77 + me);
    auto A = torch::randn({rows, dim}, gen, torch::kDouble);
    auto b = A.matmul(xstar);
    auto w = torch::zeros({dim}, torch::TensorOptions().dtype(torch::kDouble).requires_grad(true));
    DASGD opt(std::vector<torch::Tensor>{w}, DASGDOptions(0.02).mode(mode), world);
    // Pauses long against the scheduling noise of a loaded 2-core machine.
    const auto pause = me == slow_rank ? 12ms : 3ms;
    for (int64_t t = 0;; ++t) {
      if (me == slow_rank ? t >= slow_steps : slow_done.load()) break;
      auto idx = torch::randint(0, rows, {16}, gen);
      opt.zero_grad();
      auto loss = (A.index_select(0, idx).matmul(w) - b.index_select(0, idx)).pow(2).mean();
      loss.backward();
      opt.step();
      std::this_thread::sleep_for(pause);
    }
    if (me == slow_rank) slow_done = true;
    EXPECT_TRUE(opt.finish(30s));
    res.steps[me] = opt.stats().local_steps;
    res.w[me] = w.detach().clone();
    res.stats[me] = opt.stats();
  });
  return res;
}

void expect_four_times_faster(const ConvergenceResult& r) {
  for (int fast = 0; fast < 3; ++fast) {
    const double ratio = static_cast<double>(r.steps[fast]) / r.steps[3];
    EXPECT_GT(ratio, 2.5) << "rank " << fast << " made " << r.steps[fast] << " steps, the slow "
                          << "rank " << r.steps[3] << ": something made the fast ranks wait";
    EXPECT_LT(ratio, 6.0);
  }
}

TEST(Convergence, DeltaModeReachesTheOptimumWithAStraggler) {
  auto r = least_squares(DASGDMode::kDelta);
  auto xstar = torch::linspace(-1, 1, 8, torch::kDouble);
  expect_four_times_faster(r);
  int64_t total_steps = 0;
  for (auto s : r.steps) total_steps += s;
  for (int i = 0; i < 4; ++i) {
    const double err = ((r.w[i] - xstar).norm() / xstar.norm()).item<double>();
    EXPECT_LT(err, 1e-3) << "rank " << i << ": " << r.stats[i].str();
    // Replica agreement after finish: up to floating-point summation order.
    EXPECT_TRUE(torch::allclose(r.w[i], r.w[0], 1e-10, 1e-12))
        << "rank " << i << " differs from rank 0 by " << (r.w[i] - r.w[0]).abs().max().item<double>();
    // Every update of every rank was applied exactly once everywhere.
    EXPECT_EQ(r.stats[i].version, total_steps) << "rank " << i;
    EXPECT_EQ(r.stats[i].remote_updates, total_steps - r.steps[i]) << "rank " << i;
    EXPECT_EQ(r.stats[i].staleness.count, total_steps) << "rank " << i;
    EXPECT_EQ(r.stats[i].rejected, 0u);
  }
  std::printf("delta mode: steps %ld %ld %ld %ld; rank 0 %s\n", static_cast<long>(r.steps[0]),
              static_cast<long>(r.steps[1]), static_cast<long>(r.steps[2]),
              static_cast<long>(r.steps[3]), r.stats[0].str().c_str());
}

TEST(Convergence, GossipModeReachesTheOptimumWithAStraggler) {
  auto r = least_squares(DASGDMode::kGossip);
  auto xstar = torch::linspace(-1, 1, 8, torch::kDouble);
  expect_four_times_faster(r);
  for (int i = 0; i < 4; ++i) {
    const double err = ((r.w[i] - xstar).norm() / xstar.norm()).item<double>();
    EXPECT_LT(err, 1e-2) << "rank " << i << ": " << r.stats[i].str();
    EXPECT_GT(r.stats[i].models_mixed, 0) << "rank " << i;
  }
  std::printf("gossip mode: steps %ld %ld %ld %ld; rank 0 %s\n", static_cast<long>(r.steps[0]),
              static_cast<long>(r.steps[1]), static_cast<long>(r.steps[2]),
              static_cast<long>(r.steps[3]), r.stats[0].str().c_str());
}

std::string temp_path(const std::string& name) {
  return ::testing::TempDir() + "torch_asgd_" + name + "_" + std::to_string(::getpid());
}

TEST(Checkpoint, SaveLoadMidRunResumesIdentically) {
  torch::manual_seed(4);
  auto net = make_net();
  DASGD opt(net->named_parameters(), DASGDOptions(0.05).momentum(0.9));
  torch::optim::StepLR sched(opt, 10, 0.5);
  for (int t = 0; t < 30; ++t) {
    train_step(net, opt, t);
    sched.step();
  }
  const std::string model_path = temp_path("model.pt"), opt_path = temp_path("opt.pt");
  torch::save(net, model_path);
  torch::save(opt, opt_path);
  for (int t = 30; t < 50; ++t) train_step(net, opt, t);

  auto net2 = make_net();
  torch::load(net2, model_path);
  DASGD opt2(net2->named_parameters(), DASGDOptions(0.05).momentum(0.9));
  torch::load(opt2, opt_path);
  EXPECT_EQ(opt2.stats().local_steps, 30);
  // StepLR decayed at its step counts 10 and 20; the default would be 0.05.
  EXPECT_DOUBLE_EQ(opt2.param_groups()[0].options().get_lr(), 0.05 * 0.25);
  for (int t = 30; t < 50; ++t) train_step(net2, opt2, t);
  EXPECT_TRUE(same_params(*net, *net2));
  EXPECT_EQ(opt2.stats().local_steps, 50);

  // A model of another shape is refused with the fingerprint's first difference.
  auto other = torch::nn::Sequential(torch::nn::Linear(10, 17), torch::nn::Tanh(),
                                     torch::nn::Linear(17, 3));
  DASGD wrong(other->named_parameters(), DASGDOptions(0.05).momentum(0.9));
  try {
    torch::load(wrong, opt_path);
    FAIL() << "expected MismatchError";
  } catch (const MismatchError& e) {
    EXPECT_NE(std::string(e.what()).find("DASGD: the checkpoint belongs to another model: "
                                         "parameter '0.weight' has shape [17, 10] here but "
                                         "[16, 10] in the checkpoint"),
              std::string::npos)
        << e.what();
  }
  // So is a checkpoint of another optimizer.
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
  torch::save(sgd, opt_path);
  EXPECT_THROW(torch::load(opt2, opt_path), MismatchError);
  std::remove(model_path.c_str());
  std::remove(opt_path.c_str());
}

TEST(DASGD, MismatchedModelsAreRefusedOnEveryRank) {
  auto errors = testing::spawn_collect(3, [](std::shared_ptr<World> world) {
    auto net = torch::nn::Sequential(torch::nn::Linear(10, world->rank() == 1 ? 9 : 8));
    DASGD opt(net->named_parameters(), DASGDOptions(0.1), world);
  });
  for (int r = 0; r < 3; ++r) {
    EXPECT_NE(errors[r].find("parameter '0.weight' has shape"), std::string::npos) << errors[r];
  }
}

TEST(DASGD, ModesMustAgree) {
  auto errors = testing::spawn_collect(2, [](std::shared_ptr<World> world) {
    auto net = torch::nn::Sequential(torch::nn::Linear(4, 2));
    DASGD opt(net->parameters(),
              DASGDOptions(0.1).mode(world->rank() == 0 ? DASGDMode::kDelta : DASGDMode::kGossip),
              world);
  });
  for (const auto& e : errors) EXPECT_NE(e.find("mode is"), std::string::npos) << e;
}

TEST(DASGD, OverlapIsIgnoredForCpuParameters) {
  // The device pipeline is for GPU parameters; on the CPU the option changes nothing.
  auto run = [](bool overlap) {
    torch::manual_seed(3);
    auto x = torch::randn({10}, torch::kDouble);
    testing::spawn(2, [&](std::shared_ptr<World> world) {
      auto p = x.clone();
      DASGD opt(std::vector<torch::Tensor>{p}, DASGDOptions(0.1).overlap(overlap), world);
      p.mutable_grad() = torch::ones_like(p) * (world->rank() + 1);
      for (int s = 0; s < 5; ++s) opt.step();
      ASSERT_TRUE(opt.finish(std::chrono::seconds(20)));
      EXPECT_TRUE(p.allclose(x - 0.1 * 5 * 3)) << "rank " << world->rank();
    });
  };
  run(false);
  run(true);
  EXPECT_THROW(detail::DevicePipeline(c10::Device(c10::kCPU), 4, c10::kFloat), ConfigError);
}

}  // namespace
}  // namespace torch_asgd
