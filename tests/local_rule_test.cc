// Any torch::optim optimizer as the local rule (docs/algorithms.md, "The local rule"): with one rank
// every algorithm is its inner optimizer, bit for bit, LR scheduler included; the
// wrapper is a drop-in torch::optim::Optimizer (groups, schedulers, zero_grad, save and
// load with the inner state, refusals).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <functional>
#include <map>

#include <torch/torch.h>

#include "testing.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/optim/dasgd.h"
#include "torch_asgd/optim/gossip.h"
#include "torch_asgd/optim/sync_sgd.h"

namespace torch_asgd {
namespace {

using Factory = std::function<std::shared_ptr<torch::optim::Optimizer>(std::vector<torch::Tensor>)>;

struct Rule {
  const char* name;
  Factory make;
};

std::vector<Rule> rules() {
  using namespace torch::optim;
  return {
      {"sgd", [](auto p) { return std::make_shared<SGD>(p, SGDOptions(0.05)); }},
      {"sgd_momentum", [](auto p) { return std::make_shared<SGD>(p, SGDOptions(0.05).momentum(0.9)); }},
      {"sgd_nesterov_wd", [](auto p) {
         return std::make_shared<SGD>(p, SGDOptions(0.05).momentum(0.9).nesterov(true).weight_decay(1e-3));
       }},
      {"sgd_dampening", [](auto p) { return std::make_shared<SGD>(p, SGDOptions(0.05).momentum(0.9).dampening(0.2)); }},
      {"adam", [](auto p) { return std::make_shared<Adam>(p, AdamOptions(1e-2)); }},
      {"adamw", [](auto p) { return std::make_shared<AdamW>(p, AdamWOptions(1e-2).weight_decay(0.05)); }},
      {"rmsprop", [](auto p) { return std::make_shared<RMSprop>(p, RMSpropOptions(1e-3).momentum(0.5)); }},
  };
}

enum class Algo { kDASGD, kGossip, kSync };

const char* algo_name(Algo a) {
  return a == Algo::kDASGD ? "dasgd" : a == Algo::kGossip ? "gossip" : "sync";
}

std::unique_ptr<DistributedOptimizer> wrap(Algo a, std::shared_ptr<torch::optim::Optimizer> inner) {
  if (a == Algo::kDASGD) return std::make_unique<DASGD>(std::move(inner));
  if (a == Algo::kGossip) return std::make_unique<Gossip>(std::move(inner));
  return std::make_unique<SyncSGD>(std::move(inner));
}

torch::nn::Sequential make_net() {
  return torch::nn::Sequential(torch::nn::Linear(10, 16), torch::nn::Tanh(), torch::nn::Linear(16, 3));
}

void copy_params(torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard g;
  auto a = from.parameters();
  auto b = to.parameters();
  for (size_t i = 0; i < a.size(); ++i) b[i].copy_(a[i]);
}

bool same_params(torch::nn::Module& a, torch::nn::Module& b) {
  auto pa = a.parameters(), pb = b.parameters();
  for (size_t i = 0; i < pa.size(); ++i) {
    if (!torch::equal(pa[i], pb[i])) return false;
  }
  return true;
}

// One training step of `net` on batch `t` (the same data for the same t everywhere).
void train_step(torch::nn::Sequential& net, torch::optim::Optimizer& opt, int t) {
  auto gen = at::detail::createCPUGenerator(1000 + t);
  auto x = torch::randn({8, 10}, gen);
  auto y = torch::randint(0, 3, {8}, gen);
  opt.zero_grad();
  torch::nll_loss(torch::log_softmax(net->forward(x), 1), y).backward();
  opt.step();
}

class OneRank : public ::testing::TestWithParam<std::tuple<Algo, size_t>> {};

TEST_P(OneRank, IsTheInnerOptimizerBitForBitOver100StepsWithAScheduler) {
  const Algo algo = std::get<0>(GetParam());
  const Rule rule = rules()[std::get<1>(GetParam())];
  torch::manual_seed(0);
  auto a = make_net();
  auto b = make_net();
  copy_params(*a, *b);
  auto alone = rule.make(a->parameters());
  auto wrapped = wrap(algo, rule.make(b->parameters()));
  // The scheduler on the wrapper drives the inner learning rate.
  torch::optim::StepLR sched_a(*alone, 30, 0.5);
  torch::optim::StepLR sched_b(*wrapped, 30, 0.5);
  for (int t = 0; t < 100; ++t) {
    train_step(a, *alone, t);
    train_step(b, *wrapped, t);
    sched_a.step();
    sched_b.step();
    ASSERT_TRUE(same_params(*a, *b)) << rule.name << " under " << algo_name(algo) << " differs at step " << t;
  }
  EXPECT_DOUBLE_EQ(wrapped->inner().param_groups()[0].options().get_lr(),
                   alone->param_groups()[0].options().get_lr());
  EXPECT_DOUBLE_EQ(wrapped->param_groups()[0].options().get_lr(),
                   alone->param_groups()[0].options().get_lr());
}

INSTANTIATE_TEST_SUITE_P(
    Rules, OneRank,
    ::testing::Combine(::testing::Values(Algo::kDASGD, Algo::kGossip, Algo::kSync),
                       ::testing::Range(size_t{0}, rules().size())),
    [](const ::testing::TestParamInfo<std::tuple<Algo, size_t>>& info) {
      return std::string(algo_name(std::get<0>(info.param))) + "_" + rules()[std::get<1>(info.param)].name;
    });

TEST(LocalRule, TheSgdShorthandIsAnInnerSgd) {
  torch::manual_seed(1);
  auto a = make_net();
  auto b = make_net();
  copy_params(*a, *b);
  torch::optim::SGD sgd(a->parameters(), torch::optim::SGDOptions(0.1).momentum(0.5));
  DASGD dasgd(b->named_parameters(), torch::optim::SGDOptions(0.1).momentum(0.5));
  EXPECT_EQ(dasgd.rule_name(), "torch::optim::SGD");
  for (int t = 0; t < 30; ++t) {
    train_step(a, sgd, t);
    train_step(b, dasgd, t);
  }
  EXPECT_TRUE(same_params(*a, *b));
}

TEST(LocalRule, ParameterGroupsAreTheInnerOnes) {
  torch::manual_seed(2);
  auto a = make_net();
  auto b = make_net();
  copy_params(*a, *b);
  auto groups = [](torch::nn::Sequential& net) {
    auto p = net->parameters();
    return std::vector<torch::optim::OptimizerParamGroup>{
        torch::optim::OptimizerParamGroup({p[0], p[1]}, std::make_unique<torch::optim::AdamOptions>(0.02)),
        torch::optim::OptimizerParamGroup({p[2], p[3]})};
  };
  torch::optim::Adam alone(groups(a), torch::optim::AdamOptions(0.005));
  DASGD dasgd(std::make_shared<torch::optim::Adam>(groups(b), torch::optim::AdamOptions(0.005)));
  ASSERT_EQ(dasgd.param_groups().size(), 2u);
  EXPECT_DOUBLE_EQ(dasgd.param_groups()[0].options().get_lr(), 0.02);
  EXPECT_DOUBLE_EQ(dasgd.param_groups()[1].options().get_lr(), 0.005);
  // The wrapper's group options are of the inner's own type, so the usual static_cast is
  // valid; what is set on them reaches the inner group at the next step.
  static_cast<torch::optim::AdamOptions&>(dasgd.param_groups()[1].options()).lr(0.001).betas({0.8, 0.99});
  static_cast<torch::optim::AdamOptions&>(alone.param_groups()[1].options()).lr(0.001).betas({0.8, 0.99});
  for (int t = 0; t < 15; ++t) {
    train_step(a, alone, t);
    train_step(b, dasgd, t);
  }
  const auto& inner1 = static_cast<const torch::optim::AdamOptions&>(dasgd.inner().param_groups()[1].options());
  EXPECT_DOUBLE_EQ(inner1.lr(), 0.001);
  EXPECT_DOUBLE_EQ(std::get<0>(inner1.betas()), 0.8);
  // A learning rate set on the inner group directly is taken over by the wrapper's.
  dasgd.inner().param_groups()[0].options().set_lr(0.03);
  alone.param_groups()[0].options().set_lr(0.03);
  for (int t = 15; t < 30; ++t) {
    train_step(a, alone, t);
    train_step(b, dasgd, t);
  }
  EXPECT_DOUBLE_EQ(dasgd.param_groups()[0].options().get_lr(), 0.03);
  EXPECT_TRUE(same_params(*a, *b));
}

// A learning rate set on the inner group before the first step is taken over too (the
// wrapper's copy starts as the inner's, not as what it was at construction).
TEST(LocalRule, AnInnerLearningRateSetBeforeTheFirstStepIsKept) {
  torch::manual_seed(4);
  auto a = make_net();
  auto b = make_net();
  copy_params(*a, *b);
  torch::optim::SGD alone(a->parameters(), torch::optim::SGDOptions(0.02));
  DASGD dasgd(b->named_parameters(), torch::optim::SGDOptions(0.1));
  dasgd.inner().param_groups()[0].options().set_lr(0.02);
  for (int t = 0; t < 10; ++t) {
    train_step(a, alone, t);
    train_step(b, dasgd, t);
  }
  EXPECT_DOUBLE_EQ(dasgd.param_groups()[0].options().get_lr(), 0.02);
  EXPECT_TRUE(same_params(*a, *b));
}

// A rule of the user's own, with options of its own type: what is set on the wrapper's
// groups reaches it (its learning rate; other fields are the user's type's business).
struct HalvingOptions : torch::optim::OptimizerCloneableOptions<HalvingOptions> {
  explicit HalvingOptions(double lr) : lr_(lr) {}
  double get_lr() const override { return lr_; }
  void set_lr(const double lr) override { lr_ = lr; }
  double lr_;
};
struct HalvingSGD : torch::optim::Optimizer {
  HalvingSGD(std::vector<torch::Tensor> params, double lr)
      : Optimizer({torch::optim::OptimizerParamGroup(std::move(params))}, std::make_unique<HalvingOptions>(lr)) {}
  torch::Tensor step(LossClosure) override {
    torch::NoGradGuard no_grad;
    for (auto& g : param_groups()) {
      for (auto& p : g.params()) {
        if (p.grad().defined()) p.sub_(p.grad() * g.options().get_lr());
      }
    }
    return {};
  }
  void save(torch::serialize::OutputArchive&) const override {}
  void load(torch::serialize::InputArchive&) override {}
};

TEST(LocalRule, ALearningRateSetOnTheWrapperReachesARuleOfTheUsersOwn) {
  torch::manual_seed(5);
  auto a = make_net();
  auto b = make_net();
  copy_params(*a, *b);
  HalvingSGD alone(a->parameters(), 0.1);
  DASGD dasgd(std::make_shared<HalvingSGD>(b->parameters(), 0.1));
  for (int t = 0; t < 10; ++t) {
    if (t == 5) {
      alone.param_groups()[0].options().set_lr(0.03);
      dasgd.param_groups()[0].options().set_lr(0.03);
    }
    train_step(a, alone, t);
    train_step(b, dasgd, t);
  }
  EXPECT_DOUBLE_EQ(dasgd.inner().param_groups()[0].options().get_lr(), 0.03);
  EXPECT_TRUE(same_params(*a, *b));
}

TEST(LocalRule, GradientsSetToNoneAreTolerated) {
  // As zero_grad(set_to_none) of newer LibTorch leaves them: undefined.
  torch::manual_seed(3);
  auto a = make_net();
  auto b = make_net();
  copy_params(*a, *b);
  torch::optim::Adam alone(a->parameters(), torch::optim::AdamOptions(0.01));
  SyncSGD sync(std::make_shared<torch::optim::Adam>(b->parameters(), torch::optim::AdamOptions(0.01)));
  for (int t = 0; t < 10; ++t) {
    for (auto* net : {&a, &b}) {
      for (auto& p : (*net)->parameters()) p.mutable_grad() = torch::Tensor();
    }
    train_step(a, alone, t);
    train_step(b, sync, t);
  }
  EXPECT_TRUE(same_params(*a, *b));
}

TEST(LocalRule, SaveLoadCarriesAdamsMomentsAndResumesIdentically) {
  torch::manual_seed(4);
  auto net = make_net();
  DASGD opt(std::make_shared<torch::optim::Adam>(net->parameters(), torch::optim::AdamOptions(0.01)));
  torch::optim::StepLR sched(opt, 10, 0.5);
  for (int t = 0; t < 25; ++t) {
    train_step(net, opt, t);
    sched.step();
  }
  const std::string model_path = ::testing::TempDir() + std::to_string(::getpid()) + "_lr_model.pt";
  const std::string opt_path = ::testing::TempDir() + std::to_string(::getpid()) + "_lr_opt.pt";
  torch::save(net, model_path);
  torch::save(opt, opt_path);
  for (int t = 25; t < 50; ++t) train_step(net, opt, t);

  auto net2 = make_net();
  DASGD opt2(std::make_shared<torch::optim::Adam>(net2->parameters(), torch::optim::AdamOptions(0.01)));
  torch::load(net2, model_path);  // gives the parameters storage of their own: taken back
  torch::load(opt2, opt_path);
  EXPECT_DOUBLE_EQ(opt2.param_groups()[0].options().get_lr(), 0.01 * 0.25);  // the scheduler's
  for (int t = 25; t < 50; ++t) train_step(net2, opt2, t);
  EXPECT_TRUE(same_params(*net, *net2)) << "Adam's moments and step counts were not carried";
  EXPECT_EQ(opt2.stats().local_steps, 50);

  // Another rule's checkpoint is refused, naming both.
  auto net3 = make_net();
  DASGD sgd_rule(net3->parameters(), torch::optim::SGDOptions(0.01));
  try {
    torch::load(sgd_rule, opt_path);
    ADD_FAILURE() << "expected MismatchError";
  } catch (const MismatchError& e) {
    EXPECT_NE(std::string(e.what()).find("written with torch::optim::Adam as the local rule, but "
                                         "this optimizer's is torch::optim::SGD"),
              std::string::npos)
        << e.what();
  }
  // So is another model's.
  auto other = torch::nn::Sequential(torch::nn::Linear(10, 17), torch::nn::Tanh(), torch::nn::Linear(17, 3));
  DASGD wrong(std::make_shared<torch::optim::Adam>(other->parameters(), torch::optim::AdamOptions(0.01)));
  EXPECT_THROW(torch::load(wrong, opt_path), MismatchError);
  // And another algorithm's.
  auto net4 = make_net();
  Gossip gossip(std::make_shared<torch::optim::Adam>(net4->parameters(), torch::optim::AdamOptions(0.01)));
  EXPECT_THROW(torch::load(gossip, opt_path), MismatchError);
  std::remove(model_path.c_str());
  std::remove(opt_path.c_str());
}

TEST(LocalRule, ACheckpointRefusedPartWayChangesNothing) {
  // A one-rank checkpoint, with Adam's moments and a scheduled learning rate...
  torch::manual_seed(6);
  auto net = make_net();
  DASGD saved(std::make_shared<torch::optim::Adam>(net->parameters(), torch::optim::AdamOptions(0.01)));
  torch::optim::StepLR sched(saved, 5, 0.5);
  for (int t = 0; t < 12; ++t) {
    train_step(net, saved, t);
    sched.step();
  }
  const std::string path = ::testing::TempDir() + std::to_string(::getpid()) + "_lr_refused.pt";
  torch::save(saved, path);
  // ...is refused by the ranks of a two-rank job only once the wrapper's own state is
  // read, after the inner optimizer's. Neither may keep anything of it.
  testing::spawn(2, [&](std::shared_ptr<World> world) {
    torch::manual_seed(7);
    auto mine = make_net();
    DASGD opt(std::make_shared<torch::optim::Adam>(mine->parameters(), torch::optim::AdamOptions(0.02)),
              DASGDOptions(), world);
    for (int t = 0; t < 3; ++t) train_step(mine, opt, t);
    // Adam's step counts and first moments before the load (the tensors' values).
    std::map<std::string, std::pair<int64_t, torch::Tensor>> before;
    for (const auto& [key, s] : opt.inner().state()) {
      const auto& adam = static_cast<const torch::optim::AdamParamState&>(*s);
      before[key] = {adam.step(), adam.exp_avg().clone()};
    }
    ASSERT_EQ(before.size(), mine->parameters().size());
    try {
      torch::load(opt, path);
      ADD_FAILURE() << "a checkpoint of one rank was loaded by a rank of two";
    } catch (const MismatchError& e) {
      EXPECT_NE(std::string(e.what()).find("written by a rank of 1 ranks, this job has 2"), std::string::npos)
          << e.what();
    }
    ASSERT_EQ(opt.inner().state().size(), before.size());
    for (const auto& [key, s] : opt.inner().state()) {
      const auto& adam = static_cast<const torch::optim::AdamParamState&>(*s);
      ASSERT_EQ(before.count(key), 1u);
      EXPECT_EQ(adam.step(), before[key].first) << "the refused checkpoint's Adam step count was kept";
      EXPECT_TRUE(adam.exp_avg().equal(before[key].second)) << "the refused checkpoint's Adam moments were kept";
    }
    EXPECT_DOUBLE_EQ(opt.param_groups()[0].options().get_lr(), 0.02) << "its learning rate was kept";
    EXPECT_DOUBLE_EQ(opt.inner().param_groups()[0].options().get_lr(), 0.02);
    EXPECT_EQ(opt.stats().local_steps, 3);
    train_step(mine, opt, 3);  // and it trains on
    opt.finish();
  });
  std::remove(path.c_str());
}

TEST(LocalRule, RefusesWhatCannotWork) {
  auto net = make_net();
  // LBFGS evaluates a closure several times per step.
  try {
    DASGD d(std::make_shared<torch::optim::LBFGS>(net->parameters(), torch::optim::LBFGSOptions(1)));
    ADD_FAILURE() << "LBFGS was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("LBFGS cannot be the local rule"), std::string::npos) << e.what();
  }
  // A group cannot be added afterwards, on the wrapper or on the inner optimizer.
  auto inner = std::make_shared<torch::optim::SGD>(std::vector<torch::Tensor>{net->parameters()[0]},
                                                   torch::optim::SGDOptions(0.1));
  DASGD d(inner);
  EXPECT_THROW(d.add_param_group(torch::optim::OptimizerParamGroup({net->parameters()[1]})), ConfigError);
  inner->add_param_group(torch::optim::OptimizerParamGroup({net->parameters()[1]}));
  for (auto& p : net->parameters()) p.mutable_grad() = torch::ones_like(p);
  try {
    d.step();
    ADD_FAILURE() << "a group added to the inner optimizer went unnoticed";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("parameters were added after construction"), std::string::npos) << e.what();
  }
  // Options are checked, and refused as error.h promises: ConfigError, naming the option.
  try {
    DASGD(net->parameters(), torch::optim::SGDOptions(0.1), DASGDOptions().broadcast_every(0));
    ADD_FAILURE() << "broadcast_every 0 was taken";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("broadcast_every is 0"), std::string::npos) << e.what();
  }
  EXPECT_THROW(Gossip(net->parameters(), torch::optim::SGDOptions(0.1), GossipOptions().alpha(0)), ConfigError);
  // A parameter given twice.
  EXPECT_THROW(DASGD(std::vector<torch::Tensor>{net->parameters()[0], net->parameters()[0]},
                     torch::optim::SGDOptions(0.1)),
               ConfigError);
}

TEST(LocalRule, AModelMovedAfterConstructionIsRefusedByName) {
  auto net = make_net();
  DASGD d(net->named_parameters(), torch::optim::SGDOptions(0.1));
  net->to(torch::kDouble);  // new storage of another dtype
  for (auto& p : net->parameters()) p.mutable_grad() = torch::ones_like(p);
  try {
    d.step();
    ADD_FAILURE() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("parameter '0.weight' is now Double"), std::string::npos) << e.what();
  }
}

TEST(LocalRule, InnerOptimizersOverOtherParametersAreRefusedOnEveryRank) {
  // Rank 1's inner optimizer runs over the model's parameters in another order.
  auto errors = testing::spawn_collect(3, [](std::shared_ptr<World> world) {
    torch::manual_seed(5);
    auto net = make_net();
    auto params = net->parameters();
    if (world->rank() == 1) std::reverse(params.begin(), params.end());
    DASGD d(std::make_shared<torch::optim::Adam>(params, torch::optim::AdamOptions(0.01)),
            DASGDOptions(), world);
  });
  for (int r = 0; r < 3; ++r) {
    EXPECT_NE(errors[r].find("ranks disagree on what they exchange"), std::string::npos)
        << "rank " << r << ": " << errors[r];
  }
  // And another rule on one rank.
  auto rules = testing::spawn_collect(2, [](std::shared_ptr<World> world) {
    auto net = make_net();
    std::shared_ptr<torch::optim::Optimizer> inner;
    if (world->rank() == 0) {
      inner = std::make_shared<torch::optim::Adam>(net->parameters(), torch::optim::AdamOptions(0.01));
    } else {
      inner = std::make_shared<torch::optim::SGD>(net->parameters(), torch::optim::SGDOptions(0.01));
    }
    Gossip g(inner, GossipOptions(), world);
  });
  for (const auto& e : rules) EXPECT_NE(e.find("local rule is"), std::string::npos) << e;
}

}  // namespace
}  // namespace torch_asgd
