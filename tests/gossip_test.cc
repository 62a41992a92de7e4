// Gossip (docs/algorithms.md, "Gossip"): the sum of the models changes only by the ranks'
// own local steps, whatever the delivery order (delays, crossed requests, stalls and
// late replies); with an optimum of its own per rank it reaches the average objective's;
// a dead requester's lost reply is counted as a broken pair.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <functional>
#include <random>

#include <torch/torch.h>

#include "scripted.h"
#include "testing.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/optim/gossip.h"

namespace torch_asgd {

struct GossipTestAccess {
  static void hold_arrivals(Gossip& g) { g.held_ = true; }
  static void apply(Gossip& g) {
    g.take(g.transport_->poll());
    g.settle_with_gone_peers();
  }
  // The open exchange's reply is overdue: give it up at the next step.
  static void make_late(Gossip& g) {
    if (g.open_) g.open_->opened -= std::chrono::hours(1);
  }
  static bool open(const Gossip& g) { return g.open_.has_value(); }
  // No exchange of its own open and none given up whose reply may still come.
  static bool settled(const Gossip& g) { return !g.open_ && g.given_up_.empty(); }
};

namespace {

// Rank r's own least-squares problem, with an optimum of its own and a curvature of its
// own (rows scaled by r + 1), so that the optimum of the average objective is far from the
// mean of the ranks' optima. Gradients over all of a rank's rows: no sampling noise.
struct Problems {
  explicit Problems(int n, int dim = 5) : dim(dim) {
    for (int r = 0; r < n; ++r) {
      auto gen = at::detail::createCPUGenerator(31 + r);
      A.push_back(torch::randn({40, dim}, gen, torch::kDouble) * (r + 1) / std::sqrt(40.0));
      b.push_back(A.back().matmul(2 * torch::randn({dim}, gen, torch::kDouble)));
    }
  }
  torch::Tensor loss(const torch::Tensor& w, int r, int64_t) const {
    return 0.5 * (A[r].to(w.scalar_type()).matmul(w) - b[r].to(w.scalar_type())).pow(2).sum();
  }
  // The optimum of the average objective (normal equations).
  torch::Tensor joint_optimum() const {
    auto AtA = torch::zeros({dim, dim}, torch::kDouble);
    auto Atb = torch::zeros({dim}, torch::kDouble);
    for (size_t r = 0; r < A.size(); ++r) {
      AtA += A[r].t().matmul(A[r]);
      Atb += A[r].t().matmul(b[r]);
    }
    return torch::linalg_solve(AtA, Atb);
  }
  int dim;
  std::vector<torch::Tensor> A, b;
};

struct Ranks {
  Ranks(int n, const Problems& pb, double lr, GossipOptions o = GossipOptions(),
        at::ScalarType dtype = torch::kDouble)
      : net(n) {
    torch::manual_seed(9);
    auto x0 = torch::randn({pb.dim}, torch::kDouble).to(dtype);
    for (int r = 0; r < n; ++r) {
      w.push_back(x0.clone().requires_grad_(true));
      opt.push_back(std::make_unique<Gossip>(
          std::make_shared<torch::optim::SGD>(std::vector<torch::Tensor>{w[r]}, torch::optim::SGDOptions(lr)),
          o, net.endpoint(r)));
      GossipTestAccess::hold_arrivals(*opt[r]);
    }
    sum0 = x0.to(torch::kDouble) * n;
    local = torch::zeros_like(sum0);
  }
  // A local step of rank r, its change recorded apart from any mixing.
  void step(const Problems& pb, int r, int64_t t) {
    auto before = w[r].detach().clone();
    opt[r]->zero_grad();
    pb.loss(w[r], r, t).backward();
    opt[r]->step();
    local += w[r].detach().to(torch::kDouble) - before.to(torch::kDouble);
  }
  torch::Tensor sum() const {
    auto s = torch::zeros_like(sum0);
    for (size_t r = 0; r < w.size(); ++r) {
      if (!net.killed(static_cast<int>(r))) s += w[r].detach().to(torch::kDouble);
    }
    return s;
  }
  double conservation_error() const { return (sum() - (sum0 + local)).abs().max().item<double>(); }
  void settle() {
    for (int round = 0; round < 10; ++round) {
      net.deliver_all();
      for (auto& o : opt) GossipTestAccess::apply(*o);
    }
  }
  ~Ranks() {
    for (auto& o : opt) o->finish(std::chrono::milliseconds(0));  // nothing delivers now
  }
  testing::ScriptedNetwork net;
  std::vector<torch::Tensor> w;
  std::vector<std::unique_ptr<Gossip>> opt;
  torch::Tensor sum0, local;
};

// 400 local steps at random ranks under a scripted delivery: delayed, reordered across
// peers, several at once; now and then a reply is overdue and given up (its late reply
// must then be undone). Every 100 steps (and at the end) everything is delivered and the
// sum checked against `tolerance`; then the exchanges' bookkeeping.
void conserves_under_any_delivery(Ranks& ranks, const Problems& pb, int n, double tolerance) {
  std::mt19937 rng(17 + n);
  for (int t = 0; t < 400; ++t) {
    const int r = static_cast<int>(rng() % n);
    ranks.step(pb, r, t);
    for (int e = 0; e < 2; ++e) {
      const int from = static_cast<int>(rng() % n), to = static_cast<int>(rng() % n);
      if (from != to) ranks.net.deliver(from, to, 1 + rng() % 2);
    }
    const int a = static_cast<int>(rng() % n);
    if (rng() % 25 == 0 && GossipTestAccess::open(*ranks.opt[a])) GossipTestAccess::make_late(*ranks.opt[a]);
    GossipTestAccess::apply(*ranks.opt[a]);
    if (t % 100 == 99) {
      // While an exchange is half done the sum is off by its other half: settle first.
      ranks.settle();
      ASSERT_LT(ranks.conservation_error(), tolerance) << "n " << n << " step " << t;
    }
  }
  ranks.settle();
  EXPECT_LT(ranks.conservation_error(), tolerance);
  int64_t completed = 0, declined = 0, given_up = 0, undone = 0, undos = 0, answered = 0;
  for (auto& o : ranks.opt) {
    const GossipStats s = o->stats();
    completed += s.completed;
    declined += s.declined;
    given_up += s.given_up;
    undone += s.undone;
    undos += s.undos_applied;
    answered += s.answered;
    EXPECT_EQ(s.broken, 0);
    EXPECT_GE(s.lag.sum, 0);
  }
  EXPECT_GT(completed, 0);
  EXPECT_GT(declined, 0) << "the schedule never made a rank decline";
  EXPECT_GT(undone, 0) << "the schedule never undid a late reply";
  EXPECT_EQ(undone, undos) << "every undo sent was applied";
  EXPECT_EQ(answered, completed + undone) << "every answered request was mixed or undone";
  ::testing::Test::RecordProperty("given_up", std::to_string(given_up));
}

class Conservation : public ::testing::TestWithParam<int> {};

TEST_P(Conservation, TheSumOfTheModelsMovesOnlyByLocalStepsUnderAnyDelivery) {
  const int n = GetParam();
  const Problems pb(n);
  Ranks ranks(n, pb, 0.05);
  conserves_under_any_delivery(ranks, pb, n, 1e-10);
}

INSTANTIATE_TEST_SUITE_P(Ranks, Conservation, ::testing::Values(2, 3, 4, 5));

TEST(Gossip, CrossedRequestsMixOnce) {
  // Ranks 0 and 1 open exchanges with each other at the same time: rank 0's (the lower
  // rank's) is answered, rank 1's declined; one mix pair in all.
  const Problems pb(2);
  Ranks ranks(2, pb, 0.05);
  ranks.step(pb, 0, 0);
  ranks.step(pb, 1, 0);
  ranks.settle();
  const GossipStats s0 = ranks.opt[0]->stats(), s1 = ranks.opt[1]->stats();
  EXPECT_EQ(s0.completed, 1);
  EXPECT_EQ(s1.answered, 1);
  EXPECT_EQ(s1.completed, 0);
  EXPECT_EQ(s1.declined, 1);
  EXPECT_EQ(s0.refused, 1);
  EXPECT_LT(ranks.conservation_error(), 1e-12);
  // The two models were averaged (alpha 0.5), the requester's own step kept.
  EXPECT_TRUE(torch::allclose(ranks.w[0], ranks.w[1], 0, 1e-12));
}

TEST(Gossip, AStalledPeersLateReplyIsUndone) {
  const Problems pb(3);
  Ranks ranks(3, pb, 0.05);
  ranks.step(pb, 0, 0);  // rank 0 asks rank 1
  ranks.net.deliver(0, 1);
  GossipTestAccess::apply(*ranks.opt[1]);  // rank 1 answers and mixes; the reply stalls
  GossipTestAccess::make_late(*ranks.opt[0]);
  ranks.step(pb, 0, 1);  // gives up, asks rank 2 instead
  EXPECT_EQ(ranks.opt[0]->stats().given_up, 1);
  ranks.settle();  // the late reply comes: rank 0 sends rank 1 its half back
  EXPECT_EQ(ranks.opt[0]->stats().undone, 1);
  EXPECT_EQ(ranks.opt[1]->stats().undos_applied, 1);
  EXPECT_LT(ranks.conservation_error(), 1e-12);
}

TEST(Gossip, ARepliesLostToADeadRequesterAreCountedBroken) {
  const Problems pb(3);
  Ranks ranks(3, pb, 0.05);
  ranks.step(pb, 0, 0);  // rank 0 asks rank 1
  ranks.net.deliver(0, 1);
  GossipTestAccess::apply(*ranks.opt[1]);  // rank 1 mixed; its reply waits
  ranks.net.kill(0);
  GossipTestAccess::apply(*ranks.opt[1]);
  GossipTestAccess::apply(*ranks.opt[2]);
  EXPECT_EQ(ranks.opt[1]->stats().broken, 1);
  EXPECT_EQ(ranks.opt[2]->stats().broken, 0);
  // The survivors go on.
  for (int t = 1; t < 20; ++t) {
    ranks.step(pb, 1, t);
    ranks.step(pb, 2, t);
    ranks.settle();
  }
  EXPECT_GT(ranks.opt[1]->stats().completed + ranks.opt[2]->stats().completed, 0);
}

// Ranks at their own pace on their own problems, `gossip` mixing and `alone` not, with a
// decreasing step size; then everything is delivered. The distances of both mean models
// to the optimum of the average objective (relative), and how far the ranks spread.
struct OptimumRun {
  double err_gossip = 0, err_alone = 0;
  double spread = 0, spread_alone = 0, spread_early = 0;  // early: gossip's at step 200
};

OptimumRun pace_to_joint_optimum(Ranks& gossip, Ranks& alone, const Problems& pb, int n) {
  OptimumRun run;
  const auto star = pb.joint_optimum();
  std::mt19937 rng(23);
  std::vector<int64_t> t_of(n, 0);
  for (int e = 0; e < 16000; ++e) {
    // A decreasing step size: with a constant one, disagreement leaves a bias O(lr).
    if (e > 0 && e % 2000 == 0) {
      for (auto* rs : {&gossip, &alone}) {
        for (auto& o : rs->opt) o->param_groups()[0].options().set_lr(o->param_groups()[0].options().get_lr() / 2);
      }
    }
    // Ranks at their own pace: one applies what reached it and steps; messages travel.
    const int r = static_cast<int>(rng() % n);
    GossipTestAccess::apply(*gossip.opt[r]);
    gossip.step(pb, r, t_of[r]);
    alone.step(pb, r, t_of[r]++);
    const int from = static_cast<int>(rng() % n);
    for (int to = 0; to < n; ++to) {
      if (to != from) gossip.net.deliver(from, to);
    }
    if (e == 200) {
      for (int k = 0; k < n; ++k) {
        run.spread_early = std::max(run.spread_early, (gossip.w[k] - gossip.w[0]).norm().item<double>());
      }
    }
  }
  gossip.settle();
  auto error = [&](const Ranks& rs) {
    auto m = torch::zeros_like(star);
    for (const auto& w : rs.w) m += w.detach().to(torch::kDouble);
    return (m / n - star).norm().item<double>() / star.norm().item<double>();
  };
  run.err_gossip = error(gossip);
  run.err_alone = error(alone);
  for (int r = 0; r < n; ++r) {
    run.spread = std::max(run.spread, (gossip.w[r] - gossip.w[0]).norm().item<double>());
    run.spread_alone = std::max(run.spread_alone, (alone.w[r] - alone.w[0]).norm().item<double>());
  }
  return run;
}

TEST(Gossip, EachRankWithItsOwnOptimumReachesTheAverageObjectives) {
  // Local SGD alone would take every rank to its own optimum; gossip must take them to
  // the optimum of the average objective, and close the gap between them.
  const int n = 4;
  const Problems pb(n);
  Ranks gossip(n, pb, 0.02);
  Ranks alone(n, pb, 0.02);
  const OptimumRun run = pace_to_joint_optimum(gossip, alone, pb, n);
  RecordProperty("error_gossip", std::to_string(run.err_gossip));
  RecordProperty("error_local_alone", std::to_string(run.err_alone));
  std::printf("distance to the joint optimum (relative): gossip %.4f, local SGD alone %.4f; spread "
              "%.4f (at step 200: %.4f; alone %.4f)\n",
              run.err_gossip, run.err_alone, run.spread, run.spread_early, run.spread_alone);
  EXPECT_GT(run.err_alone, 0.3) << "the problem is too easy: local SGD alone reaches the joint optimum";
  EXPECT_LT(run.err_gossip, 0.1 * run.err_alone);
  EXPECT_LT(run.spread, 0.5 * run.spread_early);
  EXPECT_LT(run.spread, 0.2 * run.spread_alone);
}

// Ranks as threads over real channels (nothing scripted), each stepping freely from the
// same start at its own pace, then finish(). Every value in float64.
struct FreeRun {
  std::vector<torch::Tensor> finals, locals;  // final models, and each rank's own steps
  std::vector<GossipStats> stats;
  torch::Tensor gap;  // sum of the final models - (sum of the starts + every local step)
};

FreeRun run_over_real_channels(int n, const Problems& pb, at::ScalarType dtype, const GossipOptions& o,
                               int64_t steps) {
  FreeRun run;
  run.finals.resize(n);
  run.locals.resize(n);
  run.stats.resize(n);
  torch::manual_seed(10);
  auto x0 = torch::randn({pb.dim}, dtype);
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    auto w = x0.clone().requires_grad_(true);
    Gossip opt(std::make_shared<torch::optim::SGD>(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.02)),
               o, world);
    GossipTestAccess::hold_arrivals(opt);
    auto local = torch::zeros({pb.dim}, torch::kDouble);
    for (int64_t t = 0; t < steps; ++t) {
      auto before = w.detach().to(torch::kDouble, /*non_blocking=*/false, /*copy=*/true);
      opt.zero_grad();
      pb.loss(w, me, t).backward();
      opt.step();
      local += w.detach().to(torch::kDouble) - before;
      GossipTestAccess::apply(opt);
      std::this_thread::sleep_for(std::chrono::microseconds(200 * (me + 1)));
    }
    EXPECT_TRUE(opt.finish(std::chrono::seconds(30))) << "rank " << me;
    run.finals[me] = w.detach().to(torch::kDouble, /*non_blocking=*/false, /*copy=*/true);
    run.locals[me] = local;
    run.stats[me] = opt.stats();
  });
  run.gap = -x0.to(torch::kDouble) * n;
  for (int r = 0; r < n; ++r) run.gap += run.finals[r] - run.locals[r];
  return run;
}

TEST(Gossip, OverRealChannelsTheSumIsConservedAndEveryExchangeSettles) {
  // After finish(), the sum of the final models equals the sum of the starting models
  // plus every local step.
  const int n = 4;
  const Problems pb(n);
  const FreeRun run = run_over_real_channels(n, pb, torch::kDouble, GossipOptions(), 150);
  int64_t completed = 0;
  for (int r = 0; r < n; ++r) {
    completed += run.stats[r].completed;
    EXPECT_EQ(run.stats[r].broken, 0) << run.stats[r].str();
  }
  EXPECT_LT(run.gap.abs().max().item<double>(), 1e-10);
  EXPECT_GT(completed, 0);
}

TEST(Gossip, ARankThatFinishesFirstStillMixesItsSlowerPeersLaterWork) {
  // Rank 0 stops stepping and calls finish() while rank 1 still trains: rank 0 stays a
  // responder until rank 1 finishes, so each of the 10 exchanges rank 1 opens after that
  // completes (none is declined) and changes rank 0's model; the sum stays conserved.
  // Nothing here ends by a clock: no exchange is given up (the timeout is an hour), rank 0
  // has settled its own exchanges before it finishes, and rank 1 waits for each reply.
  const int n = 2;  // rank 1's every exchange goes to rank 0
  const Problems pb(n);
  std::vector<torch::Tensor> finals(n), locals(n);
  torch::Tensor at_finish;
  std::vector<GossipStats> stats(n);
  std::atomic<bool> zero_finishing{false};
  int64_t completed_late = -1, declined_late = -1;
  bool waits_ended[n] = {true, true};  // one per rank (not a vector<bool>: threads write it)
  torch::manual_seed(11);
  auto x0 = torch::randn({pb.dim}, torch::kDouble);
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    auto w = x0.clone().requires_grad_(true);
    Gossip opt(std::make_shared<torch::optim::SGD>(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.02)),
               GossipOptions().exchange_timeout(std::chrono::hours(1)), world);
    GossipTestAccess::hold_arrivals(opt);
    auto local = torch::zeros_like(x0);
    auto local_step = [&](int64_t t) {
      auto before = w.detach().clone();
      opt.zero_grad();
      pb.loss(w, me, t).backward();
      opt.step();
      local += w.detach() - before;
      GossipTestAccess::apply(opt);
    };
    // Answering peers meanwhile, until `done` holds.
    auto wait_until = [&](const std::function<bool()>& done) {
      const bool ended = testing::eventually([&] {
        GossipTestAccess::apply(opt);
        return done();
      }, std::chrono::seconds(60));
      waits_ended[me] = waits_ended[me] && ended;
    };
    for (int64_t t = 0; t < 20; ++t) local_step(t);
    if (me == 0) {
      wait_until([&] { return GossipTestAccess::settled(opt); });
      at_finish = w.detach().clone();
      zero_finishing = true;
    } else {
      wait_until([&] { return zero_finishing.load() && GossipTestAccess::settled(opt); });
      const GossipStats before = opt.stats();
      for (int64_t t = 20; t < 30; ++t) {
        local_step(t);  // opens an exchange with rank 0
        wait_until([&] { return GossipTestAccess::settled(opt); });
      }
      completed_late = opt.stats().completed - before.completed;
      declined_late = opt.stats().declined - before.declined;
    }
    EXPECT_TRUE(opt.finish(std::chrono::seconds(60))) << "rank " << me;
    finals[me] = w.detach().clone();
    locals[me] = local;
    stats[me] = opt.stats();
  });
  EXPECT_TRUE(waits_ended[0] && waits_ended[1]);
  EXPECT_EQ(completed_late, 10) << stats[1].str();
  EXPECT_EQ(declined_late, 0) << stats[1].str();
  EXPECT_GT((finals[0] - at_finish).abs().max().item<double>(), 0.0)
      << "rank 0's model did not take in rank 1's later work";
  auto sum = finals[0] + finals[1], expected = x0 * n + locals[0] + locals[1];
  EXPECT_LT((sum - expected).abs().max().item<double>(), 1e-10);
  EXPECT_EQ(stats[0].broken + stats[1].broken, 0);
}

// ---- Compressed models (GossipOptions::compression) ----

class CompressedGossip : public ::testing::TestWithParam<std::string> {};

// Both sides mix with what the other decodes, so the mixes cancel in the sum, to the
// float32 rounding of the mixes themselves (gaps of 1e-7 to 3e-7 measured). Broken once
// each, the gaps were 6e-4 to 2e-2: a responder mixing towards s^ from its own model,
// x_j += alpha (s^ - x_j), and a requester keeping s instead of s^.
TEST_P(CompressedGossip, TheSumIsConservedUnderAnyDelivery) {
  const int n = 4;
  const Problems pb(n);
  Ranks ranks(n, pb, 0.05, GossipOptions().compression(Compression::parse(GetParam())), torch::kFloat);
  conserves_under_any_delivery(ranks, pb, n, 1e-5);
}

// The codec's rounding stays in the models but does not stop the ranks from reaching
// the optimum of the average objective (as uncompressed gossip does, within 10 % of
// local SGD's distance), and from agreeing.
TEST_P(CompressedGossip, EachRankWithItsOwnOptimumStillReachesTheAverageObjectives) {
  const int n = 4;
  const Problems pb(n);
  Ranks gossip(n, pb, 0.02, GossipOptions().compression(Compression::parse(GetParam())), torch::kFloat);
  Ranks alone(n, pb, 0.02, GossipOptions(), torch::kFloat);
  const OptimumRun run = pace_to_joint_optimum(gossip, alone, pb, n);
  std::printf("%s: distance to the joint optimum (relative): gossip %.4f, alone %.4f; spread %.4f "
              "(alone %.4f)\n",
              GetParam().c_str(), run.err_gossip, run.err_alone, run.spread, run.spread_alone);
  EXPECT_LT(run.err_gossip, 0.1 * run.err_alone);
  EXPECT_LT(run.spread, 0.2 * run.spread_alone);
}

INSTANTIATE_TEST_SUITE_P(Codecs, CompressedGossip, ::testing::Values("bf16", "fp16", "int8"),
                         [](const auto& info) { return info.param; });

TEST(GossipCompression, OverRealChannelsTheSumIsConservedAndExchangesComplete) {
  const int n = 3;
  const Problems pb(n, 50);
  const FreeRun run =
      run_over_real_channels(n, pb, torch::kFloat, GossipOptions().compression(Codec::kInt8), 100);
  int64_t completed = 0, mixes = 0;
  double largest = 0;
  for (int r = 0; r < n; ++r) {
    const GossipStats& st = run.stats[r];
    completed += st.completed;
    mixes += st.completed + st.answered + st.undos_applied;
    largest = std::max(largest, run.finals[r].abs().max().item<double>());
    EXPECT_EQ(st.broken, 0) << st.str();
    EXPECT_EQ(st.rejected, 0u) << st.str();
    EXPECT_NE(st.str().find("models sent as int8"), std::string::npos) << st.str();
  }
  // Each mix rounds twice in float32 (add, then subtract), each time by at most half an
  // ulp of values up to a few times the final ones: a bound that grows with the number
  // of mixes this run happened to make, not with the clock.
  const double bound = static_cast<double>(2 * mixes + 1) * std::ldexp(4 * largest, -24);
  EXPECT_LT(run.gap.abs().max().item<double>(), bound) << mixes << " mixes";
  EXPECT_GT(completed, 0);
}

TEST(GossipCompression, TopkDoubleParametersAndMismatchedCodecsAreRefused) {
  auto w = torch::zeros({8}, torch::kFloat).requires_grad_(true);
  auto wd = torch::zeros({8}, torch::kDouble).requires_grad_(true);
  auto sgd = [](torch::Tensor p) {
    return std::make_shared<torch::optim::SGD>(std::vector<torch::Tensor>{p}, torch::optim::SGDOptions(0.1));
  };
  try {
    Gossip g(sgd(w), GossipOptions().compression(Codec::kTopK));
    ADD_FAILURE() << "topk was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("gossip sends whole models: use bf16, fp16 or int8"), std::string::npos)
        << e.what();
  }
  try {
    Gossip g(sgd(wd), GossipOptions().compression(Codec::kBf16));
    ADD_FAILURE() << "float64 parameters were accepted under bf16";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("needs float32 parameters"), std::string::npos) << e.what();
  }
  auto errors = testing::spawn_collect(2, [&](std::shared_ptr<World> world) {
    auto p = torch::zeros({8}, torch::kFloat).requires_grad_(true);
    Gossip g(sgd(p), GossipOptions().compression(world->rank() == 0 ? Codec::kInt8 : Codec::kNone), world);
  });
  for (const auto& e : errors) {
    EXPECT_NE(e.find("compression"), std::string::npos) << e;
    EXPECT_NE(e.find("int8"), std::string::npos) << e;
  }
}

// What a requester sends wrong is refused by name: a model of the wrong size, and int8
// blocks whose scale is not finite.
TEST(GossipCompression, MalformedAndUndecodableModelsAreCommErrors) {
  const Problems pb(2);
  for (int variant = 0; variant < 2; ++variant) {
    Ranks ranks(2, pb, 0.05, GossipOptions().compression(Codec::kInt8), torch::kFloat);
    ranks.step(pb, 0, 0);  // rank 0 asks rank 1
    ranks.net.tamper(0, 1, [&](at::Tensor& p) {
      if (variant == 0) {
        p = p.slice(0, 0, p.numel() - 1).clone();
      } else {
        const float nan = std::numeric_limits<float>::quiet_NaN();
        std::memcpy(p.data_ptr<uint8_t>(), &nan, sizeof nan);  // the first block's scale
      }
    });
    ranks.net.deliver(0, 1);
    try {
      GossipTestAccess::apply(*ranks.opt[1]);
      ADD_FAILURE() << "variant " << variant << " was accepted";
    } catch (const CommError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("malformed request from rank 0"), std::string::npos) << what;
      EXPECT_NE(what.find(variant == 0 ? "'int8' sends 9 bytes" : "do not decode to finite values"),
                std::string::npos)
          << what;
    }
  }
}

// A responder whose model cannot be encoded declines before it throws, so its requester
// is not left waiting for the exchange's timeout; fp16 refuses a model beyond its range
// (a model has no residual to keep what fp16 would clip).
TEST(GossipCompression, AResponderThatCannotEncodeDeclinesAndThrows) {
  const Problems pb(2);
  for (const char* codec : {"int8", "fp16"}) {
    Ranks ranks(2, pb, 0.05, GossipOptions().compression(Compression::parse(codec)), torch::kFloat);
    ranks.step(pb, 0, 0);  // rank 0 asks rank 1
    {
      torch::NoGradGuard g;
      ranks.w[1][0] = std::string(codec) == "int8" ? std::numeric_limits<float>::infinity() : 1e5f;
    }
    ranks.net.deliver(0, 1);
    try {
      GossipTestAccess::apply(*ranks.opt[1]);
      ADD_FAILURE() << codec << ": a model that cannot be encoded was sent";
    } catch (const DivergedError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(std::string(codec) == "int8" ? "holds NaN or Inf" : "beyond fp16's 65504"),
                std::string::npos)
          << what;
    }
    ranks.net.deliver(1, 0);
    GossipTestAccess::apply(*ranks.opt[0]);
    EXPECT_FALSE(GossipTestAccess::open(*ranks.opt[0])) << codec << ": rank 0 still waits";
    EXPECT_EQ(ranks.opt[0]->stats().declined, 1) << codec;
    EXPECT_EQ(ranks.opt[1]->stats().refused, 1) << codec;
  }
}

// int8 encodes one value in 5 bytes, more than the float32 model's 4: the channel must
// still take it.
TEST(GossipCompression, AOneValueModelTravelsUnderInt8) {
  const int n = 2;
  std::vector<int64_t> completed(n);
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    auto w = torch::full({1}, 1.0f + world->rank()).requires_grad_(true);
    Gossip opt(std::make_shared<torch::optim::SGD>(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.1)),
               GossipOptions().compression(Codec::kInt8).exchange_timeout(std::chrono::hours(1)), world);
    GossipTestAccess::hold_arrivals(opt);
    for (int t = 0; t < 5; ++t) {
      opt.zero_grad();
      w.sum().backward();
      opt.step();
      EXPECT_TRUE(testing::eventually([&] {
        GossipTestAccess::apply(opt);
        return GossipTestAccess::settled(opt);
      }));
    }
    EXPECT_TRUE(opt.finish(std::chrono::seconds(20)));
    completed[world->rank()] = opt.stats().completed;
  });
  EXPECT_GT(completed[0] + completed[1], 0);
}

}  // namespace
}  // namespace torch_asgd
