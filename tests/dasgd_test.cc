// DASGD (docs/algorithms.md, "DASGD"): lock-step replicas against a reference computed
// another way, set-based staleness against ground-truth update sets under scripted
// delivery, the bounded lead, convergence with a straggler over real channels,
// checkpoints and the failures it must not hide.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <random>
#include <set>

#include <torch/torch.h>

#include "scripted.h"
#include "testing.h"
#include "torch_asgd/comm/detail/channel_core.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/optim/dasgd.h"
#include "torch_asgd/optim/detail/device_pipeline.h"
#include "torch_asgd/optim/detail/update_meta.h"

namespace torch_asgd {

// Scripted delivery in tests: step() leaves arrivals alone; the test applies them.
struct DASGDTestAccess {
  static void hold_arrivals(DASGD& o) { o.hold_arrivals_ = true; }
  static void apply(DASGD& o) { o.apply(o.transport_->poll()); }
  static void log_taus(DASGD& o, std::vector<int64_t>* log) { o.tau_log_ = log; }
  static void send_now(DASGD& o) { o.send_delta(); }
  // The rank dies: its channel goes without a goodbye.
  static void crash(DASGD& o) {
    o.transport_.reset();
    o.finished_ = true;
  }
};

void PrintTo(LeadMeasure m, std::ostream* os) { *os << to_string(m); }

struct ChannelTestAccess {
  static void hold_receiver(Channel& ch, bool hold) { ch.core_->hold_receiver = hold; }
};

namespace {

using namespace std::chrono_literals;

// Least squares in float64, so that replicas agree to 1e-10 when nothing is lost.
struct Problem {
  int dim = 6;
  torch::Tensor x0 = torch::linspace(-0.5, 0.5, 6, torch::kDouble);
  // The gradient of rank r's loss at step t, at w: the same data wherever it is drawn.
  torch::Tensor batch_loss(const torch::Tensor& w, int r, int64_t t) const {
    auto gen = at::detail::createCPUGenerator(7919 * r + t);
    auto A = torch::randn({8, dim}, gen, torch::kDouble);
    auto b = A.matmul(torch::linspace(-1, 1, dim, torch::kDouble)) + 0.1 * r;
    return (A.matmul(w) - b).pow(2).mean();
  }
};

using Factory = std::function<std::shared_ptr<torch::optim::Optimizer>(std::vector<torch::Tensor>)>;

Factory sgd_factory(double lr, double momentum = 0) {
  return [=](std::vector<torch::Tensor> p) {
    return std::make_shared<torch::optim::SGD>(p, torch::optim::SGDOptions(lr).momentum(momentum));
  };
}
Factory adam_factory(double lr) {
  return [=](std::vector<torch::Tensor> p) {
    return std::make_shared<torch::optim::Adam>(p, torch::optim::AdamOptions(lr));
  };
}

// n DASGD ranks over one scripted network, stepped by the test in one thread.
struct ScriptedRanks {
  ScriptedRanks(int n, const Problem& pb, const Factory& rule, DASGDOptions o = DASGDOptions())
      : net(n, pb.dim, torch::kDouble, detail::update_schema(n)) {
    for (int r = 0; r < n; ++r) {
      w.push_back(pb.x0.clone().requires_grad_(true));
      opt.push_back(std::make_unique<DASGD>(rule({w[r]}), o, net.endpoint(r)));
      DASGDTestAccess::hold_arrivals(*opt[r]);
    }
  }
  ~ScriptedRanks() {
    for (auto& o : opt) {
      try {
        o->finish(0ms);
      } catch (const std::exception&) {  // a test that made it fail on purpose
      }
    }
  }
  void step(const Problem& pb, int r, int64_t t) {
    at::AutoGradMode grad(true);  // also when a script steps a rank inside another's wait
    opt[r]->zero_grad();
    pb.batch_loss(w[r], r, t).backward();
    opt[r]->step();
  }
  testing::ScriptedNetwork net;
  std::vector<torch::Tensor> w;
  std::vector<std::unique_ptr<DASGD>> opt;
};

class LockStep : public ::testing::TestWithParam<std::tuple<int, int, bool>> {};

// Every rank steps, every delta is delivered, every rank applies, k times over. Each
// replica must equal a reference computed another way: n inner optimizers of their own,
// each stepping from the common model on its rank's gradient, the common model moving by
// the sum of their changes. Staleness is set-based: in lock-step a peer's update misses
// only the receiver's own update of that round (tau = 1) when k = 1.
TEST_P(LockStep, ReplicasEqualEachInnerOptimizerReplayedOnTheInterleavedGradients) {
  const int n = std::get<0>(GetParam());
  const int k = std::get<1>(GetParam());
  const bool adam = std::get<2>(GetParam());
  const Factory rule = adam ? adam_factory(0.05) : sgd_factory(0.05, 0.9);
  const Problem pb;
  const int rounds = 24;
  ScriptedRanks ranks(n, pb, rule, DASGDOptions().broadcast_every(k));
  std::vector<int64_t> taus;
  DASGDTestAccess::log_taus(*ranks.opt[0], &taus);

  // The reference: a model per rank that steps from the common model X.
  torch::Tensor X = pb.x0.clone();
  std::vector<torch::Tensor> ref_w;
  std::vector<std::shared_ptr<torch::optim::Optimizer>> ref;
  for (int r = 0; r < n; ++r) {
    ref_w.push_back(pb.x0.clone().requires_grad_(true));
    ref.push_back(rule({ref_w[r]}));
  }
  // Between exchanges a rank's model is X plus its own steps since the last exchange.
  std::vector<torch::Tensor> own(n);
  for (int r = 0; r < n; ++r) own[r] = torch::zeros_like(X);
  for (int t = 0; t < rounds; ++t) {
    for (int r = 0; r < n; ++r) {
      ranks.step(pb, r, t);
      torch::NoGradGuard g;
      ref_w[r].copy_(X + own[r]);
      auto before = ref_w[r].clone();
      ref[r]->zero_grad();
      {
        at::AutoGradMode grad(true);
        pb.batch_loss(ref_w[r], r, t).backward();
      }
      ref[r]->step();
      own[r] += ref_w[r] - before;
    }
    if ((t + 1) % k == 0) {
      ranks.net.deliver_all();
      for (int r = 0; r < n; ++r) DASGDTestAccess::apply(*ranks.opt[r]);
      for (int r = 0; r < n; ++r) X = X + own[r];
      for (int r = 0; r < n; ++r) own[r].zero_();
    }
  }
  for (int r = 0; r < n; ++r) {
    const double diff = (ranks.w[r].detach() - (X + own[r])).abs().max().item<double>();
    EXPECT_LT(diff, 1e-12) << "rank " << r;
  }
  const DASGDStats s = ranks.opt[0]->stats();
  const int64_t exchanges = rounds / k;
  EXPECT_EQ(s.local_steps, rounds);
  EXPECT_EQ(s.remote_updates, static_cast<int64_t>(n - 1) * exchanges * k);
  EXPECT_EQ(s.version, static_cast<int64_t>(n) * exchanges * k);
  EXPECT_EQ(s.staleness.count, static_cast<int64_t>(n) * rounds);
  EXPECT_EQ(s.staleness.bounded, 0);
  // A peer's update of a round lacks the receiver's k updates of that round; whatever of
  // its own sender's it holds, the receiver holds too (they come in order): tau = k.
  ASSERT_EQ(taus.size(), static_cast<size_t>((n - 1) * exchanges * k));
  for (int64_t tau : taus) EXPECT_EQ(tau, k);
  EXPECT_EQ(s.staleness.sum, static_cast<int64_t>(n - 1) * exchanges * k * k);
  EXPECT_EQ(s.staleness.max, k);
}

INSTANTIATE_TEST_SUITE_P(Ranks, LockStep,
                         ::testing::Combine(::testing::Values(2, 3), ::testing::Values(1, 3),
                                            ::testing::Bool()));

// Random delays, delivery out of order across peers, coalescing: every recorded tau must
// equal |G(receiver) \ G(computed at)| computed from the update sets themselves, and
// after everything is delivered every replica holds every update.
TEST(ScriptedSchedule, EveryRecordedStalenessEqualsTheUpdateSetDifference) {
  const Problem pb;
  for (int n : {2, 3, 4, 5}) {
    ScriptedRanks ranks(n, pb, sgd_factory(0.01));
    std::vector<std::vector<int64_t>> logs(n);
    for (int r = 0; r < n; ++r) DASGDTestAccess::log_taus(*ranks.opt[r], &logs[r]);
    // The sets: G[r] = updates in rank r's model; what each update was computed at.
    using Update = std::pair<int, int64_t>;
    std::vector<std::set<Update>> G(n);
    std::map<Update, std::set<Update>> computed_at;
    // What each queue (from, to) carries, in order: the updates of each message.
    std::map<std::pair<int, int>, std::deque<std::vector<Update>>> carries;
    std::vector<int64_t> made(n, 0);
    std::vector<std::vector<int64_t>> expected(n);
    std::mt19937 rng(1000 + n);
    int64_t coalesced = 0;
    for (int t = 0; t < 150; ++t) {
      const int r = static_cast<int>(rng() % n);
      const Update u{r, made[r]++};
      computed_at[u] = G[r];
      G[r].insert(u);
      ranks.step(pb, r, t);
      for (int p = 0; p < n; ++p) {
        if (p != r) carries[{r, p}].push_back({u});
      }
      // Random deliveries and merges, in random order across senders.
      for (int e = 0; e < 3; ++e) {
        const int from = static_cast<int>(rng() % n), to = static_cast<int>(rng() % n);
        if (from == to || ranks.net.in_flight(from, to) == 0) continue;
        auto& q = carries[{from, to}];
        if (rng() % 4 == 0 && q.size() > 1) {
          ranks.net.coalesce(from, to);
          std::vector<Update> all;
          for (auto& m : q) all.insert(all.end(), m.begin(), m.end());
          q.assign(1, all);
          ++coalesced;
          continue;
        }
        const size_t count = 1 + rng() % q.size();
        ranks.net.deliver(from, to, count);
        for (size_t i = 0; i < count; ++i) {
          for (const Update& v : q.front()) expected[to].push_back(static_cast<int64_t>(v.first) * 1000000 + v.second);
          q.pop_front();
        }
      }
      // A random rank applies what has reached it: all at once, to its model as it was.
      const int a = static_cast<int>(rng() % n);
      std::vector<Update> batch;
      for (int64_t code : expected[a]) batch.push_back({static_cast<int>(code / 1000000), code % 1000000});
      expected[a].clear();
      std::vector<int64_t> truth;
      for (const Update& v : batch) {
        std::vector<Update> missing;
        std::set_difference(G[a].begin(), G[a].end(), computed_at[v].begin(), computed_at[v].end(),
                            std::back_inserter(missing));
        truth.push_back(static_cast<int64_t>(missing.size()));
      }
      const size_t before = logs[a].size();
      DASGDTestAccess::apply(*ranks.opt[a]);
      for (const Update& v : batch) G[a].insert(v);
      ASSERT_EQ(logs[a].size() - before, truth.size()) << "n " << n << " step " << t;
      for (size_t i = 0; i < truth.size(); ++i) {
        const int64_t got = logs[a][before + i];
        if (got < 0) continue;  // bounded (records overflowed): checked below
        ASSERT_EQ(got, truth[i]) << "n " << n << " step " << t << " update " << i;
      }
    }
    // Everything delivered and applied: every replica holds every update.
    ranks.net.deliver_all();
    for (int r = 0; r < n; ++r) DASGDTestAccess::apply(*ranks.opt[r]);
    int64_t total = 0;
    for (int64_t m : made) total += m;
    for (int r = 0; r < n; ++r) {
      const DASGDStats s = ranks.opt[r]->stats();
      EXPECT_EQ(s.version, total) << "rank " << r;
      EXPECT_GE(s.staleness.sum, 0);
      EXPECT_TRUE(torch::allclose(ranks.w[r], ranks.w[0], 0, 1e-10)) << "rank " << r;
    }
    EXPECT_GT(coalesced, 0) << "the schedule never coalesced";
  }
}

TEST(ScriptedSchedule, CoalescedBeyondTheRecordsIsCountedAsBounded) {
  // Rank 0 makes 300 updates that rank 1 receives as one message: too many for the
  // records, so their tau is bounded (and counted so), never passed off as exact.
  const Problem pb;
  ScriptedRanks ranks(2, pb, sgd_factory(0.01));
  for (int t = 0; t < 5; ++t) ranks.step(pb, 1, t);  // rank 1 ahead: 0's updates lack these
  for (int t = 0; t < 300; ++t) ranks.step(pb, 0, t);
  ranks.net.coalesce(0, 1);
  ranks.net.deliver_all();
  DASGDTestAccess::apply(*ranks.opt[1]);
  const DASGDStats s = ranks.opt[1]->stats();
  EXPECT_EQ(s.remote_updates, 300);
  EXPECT_EQ(s.staleness.count, 305);
  // Every one of rank 0's updates lacked rank 1's 5: the aggregates know that exactly
  // (rank 1's component is the same in all of them).
  EXPECT_EQ(s.staleness.sum, 300 * 5);
  EXPECT_EQ(s.staleness.bounded, 0);
  // Now rank 1 steps in between rank 0's updates: components differ, tau only bounded.
  ScriptedRanks mixed(2, pb, sgd_factory(0.01));
  for (int t = 0; t < 200; ++t) {
    mixed.step(pb, 0, t);
    if (t % 2 == 0) {
      mixed.step(pb, 1, t);
      mixed.net.deliver(1, 0);
      DASGDTestAccess::apply(*mixed.opt[0]);
    }
  }
  mixed.net.coalesce(0, 1);
  mixed.net.deliver_all();
  DASGDTestAccess::apply(*mixed.opt[1]);
  const DASGDStats m = mixed.opt[1]->stats();
  EXPECT_EQ(m.staleness.bounded, 200);
  EXPECT_GE(m.staleness.sum, 0);
}

TEST(DASGD, ARejectedDeltaStopsTheRankNamingTheSender) {
  const Problem pb;
  ScriptedRanks ranks(3, pb, sgd_factory(0.01));
  ranks.step(pb, 2, 0);
  ranks.net.deliver_all();
  ranks.net.mark_rejected(0, 2);
  try {
    DASGDTestAccess::apply(*ranks.opt[0]);
    FAIL() << "expected CommError";
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("a delta from rank 2 was rejected"), std::string::npos) << e.what();
  }
}

TEST(DASGD, ANonFiniteModelStopsWithTheStepAndTheLastPeerUpdate) {
  const Problem pb;
  ScriptedRanks ranks(2, pb, sgd_factory(0.01));
  for (int t = 0; t < 4; ++t) {
    ranks.step(pb, 0, t);
    ranks.net.deliver_all();
    DASGDTestAccess::apply(*ranks.opt[1]);
  }
  ranks.opt[1]->zero_grad();
  ranks.w[1].mutable_grad() = torch::full({pb.dim}, std::numeric_limits<double>::quiet_NaN(), torch::kDouble);
  try {
    ranks.opt[1]->step();
    FAIL() << "expected DivergedError";
  } catch (const DivergedError& e) {
    EXPECT_NE(std::string(e.what()).find("rank 1: DASGD: the model is no longer finite (NaN or Inf) "
                                         "after local step 1; the last peer update applied was "
                                         "rank 0's update 4"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(ranks.net.in_flight(1, 0), 0u) << "the non-finite delta went out";
}

TEST(DASGD, ABroadcastThatThrowsLosesNoUpdate) {
  const Problem pb;
  ScriptedRanks ranks(2, pb, sgd_factory(0.01));
  ranks.net.fail_next_broadcast(0);
  EXPECT_THROW(ranks.step(pb, 0, 0), CommError);
  ranks.step(pb, 0, 1);  // carries both updates
  ranks.net.deliver_all();
  DASGDTestAccess::apply(*ranks.opt[1]);
  EXPECT_EQ(ranks.opt[1]->stats().remote_updates, 2);
  EXPECT_TRUE(torch::allclose(ranks.w[1], ranks.w[0], 0, 1e-12));
}

// ---- the bounded lead --------------------------------------------------------------

// Both ways of counting the lead (LeadMeasure) must pass the tests that hold for both.
class BoundedLead : public ::testing::TestWithParam<LeadMeasure> {
 protected:
  DASGDOptions bound(int64_t lead) const {
    return DASGDOptions().max_lead(lead).lead_measure(GetParam());
  }
};

TEST_P(BoundedLead, UnsetOrNeverReachedChangesNothingBitForBit) {
  const Problem pb;
  auto run = [&](DASGDOptions o) {
    ScriptedRanks ranks(3, pb, sgd_factory(0.02, 0.5), o);
    std::mt19937 rng(5);
    for (int t = 0; t < 120; ++t) {
      const int r = static_cast<int>(rng() % 3);
      ranks.step(pb, r, t);
      ranks.net.deliver_all();
      for (int a = 0; a < 3; ++a) DASGDTestAccess::apply(*ranks.opt[a]);
    }
    std::vector<torch::Tensor> out;
    for (auto& w : ranks.w) out.push_back(w.detach().clone());
    return out;
  };
  auto unset = run(bound(0)), loose = run(bound(1000000)), plain = run(DASGDOptions());
  for (size_t r = 0; r < unset.size(); ++r) {
    EXPECT_TRUE(torch::equal(unset[r], loose[r])) << "rank " << r;
    EXPECT_TRUE(torch::equal(unset[r], plain[r])) << "rank " << r;
  }
}

TEST_P(BoundedLead, DampingScalesTheStepByTheBoundOverTheLead) {
  const Problem pb;
  // Rank 0 steps alone, rank 1 never steps nor applies: rank 0's lead grows by one a step.
  ScriptedRanks damped(2, pb, sgd_factory(0.05), bound(4).lead_policy(LeadPolicy::kDamp));
  ScriptedRanks free(2, pb, sgd_factory(0.05));
  for (int t = 0; t < 5; ++t) {  // leads 0..4 when the steps start: nothing damped yet
    damped.step(pb, 0, t);
    free.step(pb, 0, t);
  }
  ASSERT_TRUE(torch::equal(damped.w[0], free.w[0]));
  EXPECT_EQ(damped.opt[0]->stats().damped_steps, 0);
  // Step 6 starts with a lead of 5 > 4: its change is scaled by 4 / 5.
  const auto before = free.w[0].detach().clone();
  damped.step(pb, 0, 5);
  free.step(pb, 0, 5);
  const auto full = free.w[0].detach() - before, scaled = damped.w[0].detach() - before;
  EXPECT_TRUE(torch::allclose(scaled, full * (4.0 / 5.0), 0, 1e-15));
  for (int t = 6; t < 20; ++t) damped.step(pb, 0, t);
  const DASGDStats s = damped.opt[0]->stats();
  EXPECT_EQ(s.damped_steps, 20 - 5);
  EXPECT_EQ(s.lead, 20);
  EXPECT_EQ(s.lead_waits, 0) << "damping never waits";
}

// Scripted: ranks 0 and 1 step every round, rank 2 every 8th. A fast rank whose lead over
// rank 2 exceeds 5 waits in step(); the script lets rank 2 take its step during that wait
// (and only then), which ends it. The lead after every step never exceeds the bound, and
// the fast ranks had to wait. Counted as progress, the lead is also the gap in steps.
TEST_P(BoundedLead, TheLeadNeverExceedsTheBound) {
  const Problem pb;
  const int n = 3, slow = 2;
  ScriptedRanks ranks(n, pb, sgd_factory(0.01), bound(5).lead_timeout(60s));
  int64_t widest_gap = 0;  // a fast rank's steps beyond rank 2's, after any step
  int64_t slow_t = 0;
  std::vector<int> released(n, 0);
  // Rank 2 applies what it has from `from` (everyone: -1), takes a step, and everyone
  // gets its delta.
  auto slow_step = [&](int from) {
    for (int p = 0; p < n; ++p) {
      if (from < 0 || p == from) ranks.net.deliver(p, slow);
    }
    DASGDTestAccess::apply(*ranks.opt[slow]);
    ranks.step(pb, slow, slow_t++);
    for (int p = 0; p < n; ++p) ranks.net.deliver(slow, p);
  };
  ranks.net.on_wait = [&](int r) {
    ASSERT_NE(r, slow) << "the slow rank never leads";
    ++released[r];
    slow_step(r);  // what the other fast rank sent it is still on the way
  };
  for (int64_t t = 0; t < 80; ++t) {
    for (int r = 0; r < 2; ++r) {
      ranks.step(pb, r, t);
      EXPECT_LE(ranks.opt[r]->stats().lead, 5) << "rank " << r << " after step " << t;
      widest_gap = std::max(widest_gap, t + 1 - slow_t);
      ranks.net.deliver(r, 1 - r);
      DASGDTestAccess::apply(*ranks.opt[1 - r]);
    }
    if (t % 8 == 7) slow_step(-1);
  }
  for (int r = 0; r < 2; ++r) {
    const DASGDStats s = ranks.opt[r]->stats();
    EXPECT_EQ(s.lead_timeouts, 0) << "rank " << r;
    // Counted as progress, rank 0's waits move rank 2 on before rank 1 gets there.
    if (GetParam() == LeadMeasure::kApplied || r == 0) {
      EXPECT_GT(s.lead_waits, 0) << "rank " << r << " never had to wait";
    }
    EXPECT_EQ(s.lead_waits, released[r]) << "rank " << r << ": each wait ended by one step of rank 2";
    EXPECT_LE(s.max_lead_seen, 5) << "rank " << r;
    EXPECT_EQ(s.local_steps, 80);
  }
  if (GetParam() == LeadMeasure::kProgress) {
    EXPECT_LE(widest_gap, 5) << "a fast rank got more than 5 steps ahead of rank 2";
  } else {
    // What kProgress is for: rank 2 applies all it has at each step, so the fast ranks
    // may take up to 5 steps per step of its, and their progress drifts apart.
    EXPECT_GT(widest_gap, 20);
  }
}

// Scripted: rank 3 is dead from the start. Ranks 0-2 keep up with each other, so nobody
// ever waits: the dead rank's view of them does not count.
TEST_P(BoundedLead, ADeadPeerIsNeverWaitedFor) {
  const Problem pb;
  const int n = 4;
  ScriptedRanks ranks(n, pb, sgd_factory(0.01), bound(3).lead_timeout(2s));
  ranks.net.kill(3);
  for (int64_t t = 0; t < 30; ++t) {
    for (int r = 0; r < 3; ++r) {
      ranks.step(pb, r, t);
      for (int p = 0; p < 3; ++p) ranks.net.deliver(r, p);
      for (int p = 0; p < 3; ++p) DASGDTestAccess::apply(*ranks.opt[p]);
    }
  }
  for (int r = 0; r < 3; ++r) {
    const DASGDStats s = ranks.opt[r]->stats();
    EXPECT_EQ(s.lead_waits, 0) << "rank " << r << " waited for the dead rank 3";
    EXPECT_EQ(s.lead_timeouts, 0) << "rank " << r;
    EXPECT_EQ(ranks.net.waits(r), 0) << "rank " << r;
    EXPECT_LE(s.max_lead_seen, 3) << "rank " << r;
  }
}

// Scripted: rank 2 takes no step and applies nothing. Ranks 0 and 1 wait for it once, for
// lead_timeout, then leave it behind and never wait again; once it has caught up it is
// waited for again.
TEST(BoundedLeadApplied, AStalledPeerIsWaitedForOnceThenLeftBehind) {
  const Problem pb;
  const int n = 3;
  ScriptedRanks ranks(n, pb, sgd_factory(0.01), DASGDOptions().max_lead(3).lead_timeout(200ms));
  for (int64_t t = 0; t < 40; ++t) {
    for (int r = 0; r < 2; ++r) {
      ranks.step(pb, r, t);
      ranks.net.deliver(r, 1 - r);
      DASGDTestAccess::apply(*ranks.opt[1 - r]);
    }
  }
  for (int r = 0; r < 2; ++r) {
    const DASGDStats s = ranks.opt[r]->stats();
    EXPECT_EQ(s.lead_waits, 1) << "rank " << r << ": waited for the stalled rank more than once";
    EXPECT_EQ(s.lead_timeouts, 1) << "rank " << r;
    EXPECT_GE(s.lead_wait_seconds, 0.2) << "rank " << r << ": gave up before lead_timeout";
    EXPECT_EQ(s.left_behind, std::vector<int>{2}) << "rank " << r;
    EXPECT_EQ(s.local_steps, 40);
  }
  // Rank 2 catches up: it applies everything and steps; its delta tells the others.
  for (int p = 0; p < 2; ++p) ranks.net.deliver(p, 2);
  DASGDTestAccess::apply(*ranks.opt[2]);
  ranks.step(pb, 2, 0);
  for (int p = 0; p < 2; ++p) {
    ranks.net.deliver(2, p);
    DASGDTestAccess::apply(*ranks.opt[p]);
    EXPECT_TRUE(ranks.opt[p]->stats().left_behind.empty()) << "rank " << p << " still leaves rank 2 behind";
  }
  // Waited for again: rank 0 alone runs ahead until it must wait, and rank 2 releases it.
  int released = 0;
  ranks.net.on_wait = [&](int r) {
    ASSERT_EQ(r, 0);
    ++released;
    for (int p = 0; p < n; ++p) ranks.net.deliver(0, p);
    for (int p = 1; p < n; ++p) DASGDTestAccess::apply(*ranks.opt[p]);
    ranks.step(pb, 1, 100 + released);
    ranks.step(pb, 2, 100 + released);
    for (int p = 1; p < n; ++p) ranks.net.deliver(p, 0);
  };
  for (int64_t t = 40; t < 48; ++t) ranks.step(pb, 0, t);
  EXPECT_EQ(released, 2) << "rank 0 did not wait for the caught-up rank 2 again";
  EXPECT_EQ(ranks.opt[0]->stats().lead_timeouts, 1);
  EXPECT_LE(ranks.opt[0]->stats().lead, 3);
}

// Counted as progress: rank 2 takes no step. Ranks 0 and 1 wait for it once, for
// lead_timeout, then leave it behind. It is waited for again once it steps again (L
// steps); the gap its stall left is accepted then, and from there on every step of rank
// 0 needs one of rank 2's: the gap does not grow.
TEST(BoundedLeadProgress, AStalledPeerThatStepsAgainIsWaitedForAgainAndItsGapCannotGrow) {
  const Problem pb;
  const int n = 3, L = 3;
  ScriptedRanks ranks(n, pb, sgd_factory(0.01),
                      DASGDOptions().max_lead(L).lead_measure(LeadMeasure::kProgress).lead_timeout(200ms));
  for (int64_t t = 0; t < 40; ++t) {
    for (int r = 0; r < 2; ++r) {
      ranks.step(pb, r, t);
      ranks.net.deliver(r, 1 - r);
      DASGDTestAccess::apply(*ranks.opt[1 - r]);
    }
  }
  for (int r = 0; r < 2; ++r) {
    const DASGDStats s = ranks.opt[r]->stats();
    EXPECT_EQ(s.lead_waits, 1) << "rank " << r;
    EXPECT_EQ(s.lead_timeouts, 1) << "rank " << r;
    EXPECT_GE(s.lead_wait_seconds, 0.2) << "rank " << r << ": gave up before lead_timeout";
    EXPECT_EQ(s.left_behind, std::vector<int>{2}) << "rank " << r;
  }
  // Rank 2 learns where the others are, then steps; they apply each delta. It is waited
  // for again from its L-th step on, 37 updates behind.
  for (int p = 0; p < 2; ++p) ranks.net.deliver(p, 2);
  DASGDTestAccess::apply(*ranks.opt[2]);
  for (int64_t t = 0; t < L; ++t) {
    ranks.step(pb, 2, t);
    for (int p = 0; p < 2; ++p) {
      ranks.net.deliver(2, p);
      DASGDTestAccess::apply(*ranks.opt[p]);
      EXPECT_EQ(ranks.opt[p]->stats().left_behind.empty(), t + 1 == L)
          << "rank " << p << " after rank 2's update " << t + 1;
    }
  }
  // Rank 0 runs on; every step of its own now needs one of rank 2's (and rank 1 keeps up).
  int released = 0;
  ranks.net.on_wait = [&](int r) {
    ASSERT_EQ(r, 0);
    ++released;
    for (int p = 0; p < 2; ++p) ranks.net.deliver(p, 2);
    DASGDTestAccess::apply(*ranks.opt[2]);
    ranks.step(pb, 2, 100 + released);
    for (int p = 0; p < 2; ++p) ranks.net.deliver(2, p);
    ranks.net.deliver(0, 1);
    DASGDTestAccess::apply(*ranks.opt[1]);
    ranks.step(pb, 1, 100 + released);
    ranks.net.deliver(1, 0);
    ranks.net.deliver(1, 2);
  };
  for (int64_t t = 40; t < 48; ++t) {
    ranks.step(pb, 0, t);
    EXPECT_LE(ranks.opt[0]->stats().lead, L) << "after rank 0's step " << t;
  }
  EXPECT_EQ(released, 8);
  EXPECT_EQ(ranks.opt[0]->stats().lead_timeouts, 1);
}

// Over real channels, ranks as threads: rank 2 paced 8x slower. The bound holds after
// every step (by construction, not by timing: a rank waits until it does).
TEST_P(BoundedLead, TheLeadNeverExceedsTheBoundOverRealChannels) {
  const int n = 3;
  const LeadMeasure measure = GetParam();
  std::vector<int64_t> worst(n, 0);
  std::atomic<bool> slow_done{false};
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    auto w = torch::zeros({6}, torch::TensorOptions().dtype(torch::kDouble).requires_grad(true));
    DASGD opt(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.01),
              DASGDOptions().max_lead(5).lead_measure(measure).lead_timeout(120s), world);
    const Problem pb;
    for (int64_t t = 0;; ++t) {
      if (me == 2 ? t >= 40 : slow_done.load()) break;
      opt.zero_grad();
      pb.batch_loss(w, me, t).backward();
      opt.step();
      worst[me] = std::max(worst[me], opt.stats().lead);
      std::this_thread::sleep_for(me == 2 ? 8ms : 1ms);
    }
    if (me == 2) slow_done = true;
    EXPECT_TRUE(opt.finish(30s));
    EXPECT_EQ(opt.stats().lead_timeouts, 0) << "rank " << me << " (a 120 s wait timed out)";
  });
  for (int r = 0; r < n; ++r) EXPECT_LE(worst[r], 5) << "rank " << r;
}

INSTANTIATE_TEST_SUITE_P(Measures, BoundedLead,
                         ::testing::Values(LeadMeasure::kApplied, LeadMeasure::kProgress),
                         [](const auto& info) { return to_string(info.param); });

// ---- over real channels -----------------------------------------------------------------

// Least squares sharded over 4 ranks must converge to the known optimum with rank 3 a
// straggler: it takes no step at all until each fast rank has taken 200 (which they can
// only if none of them waits for it), then 100 steps paced 4x slower than theirs.
TEST(Convergence, DeltaModeReachesTheOptimumWithAStraggler) {
  const int n = 4, dim = 8, rows = 256, slow_rank = 3, slow_steps = 100, head_start = 200;
  auto xstar = torch::linspace(-1, 1, dim, torch::kDouble);
  std::vector<int64_t> steps(n);
  std::vector<torch::Tensor> result(n);
  std::vector<DASGDStats> stats(n);
  std::atomic<bool> slow_done{false};
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    auto gen = at::detail::createCPUGenerator(77 + me);
    auto A = torch::randn({rows, dim}, gen, torch::kDouble);
    auto b = A.matmul(xstar);
    auto w = torch::zeros({dim}, torch::TensorOptions().dtype(torch::kDouble).requires_grad(true));
    DASGD opt(std::make_shared<torch::optim::Adam>(std::vector<torch::Tensor>{w},
                                                   torch::optim::AdamOptions(0.02)),
              DASGDOptions(), world);
    if (me == slow_rank) world->store().wait({"ahead 0", "ahead 1", "ahead 2"}, 120s);
    const auto pause = me == slow_rank ? 12ms : 3ms;
    for (int64_t t = 0;; ++t) {
      if (me == slow_rank ? t >= slow_steps : slow_done.load()) break;
      auto idx = torch::randint(0, rows, {16}, gen);
      opt.zero_grad();
      (A.index_select(0, idx).matmul(w) - b.index_select(0, idx)).pow(2).mean().backward();
      opt.step();
      if (me != slow_rank && t + 1 == head_start) {
        world->store().set("ahead " + std::to_string(me), std::vector<uint8_t>{1});
      }
      std::this_thread::sleep_for(pause);
    }
    if (me == slow_rank) slow_done = true;
    EXPECT_TRUE(opt.finish(30s));
    steps[me] = opt.stats().local_steps;
    result[me] = w.detach().clone();
    stats[me] = opt.stats();
  });
  int64_t total = 0;
  for (auto s : steps) total += s;
  EXPECT_EQ(steps[slow_rank], slow_steps);
  for (int fast = 0; fast < 3; ++fast) EXPECT_GE(steps[fast], head_start) << "rank " << fast;
  for (int i = 0; i < n; ++i) {
    EXPECT_LT(((result[i] - xstar).norm() / xstar.norm()).item<double>(), 0.05) << stats[i].str();
    // Replica agreement after finish: up to floating-point summation order.
    EXPECT_TRUE(torch::allclose(result[i], result[0], 1e-10, 1e-12)) << "rank " << i;
    EXPECT_EQ(stats[i].version, total) << "rank " << i;
    EXPECT_EQ(stats[i].remote_updates, total - steps[i]) << "rank " << i;
    EXPECT_EQ(stats[i].staleness.count, total) << "rank " << i;
    EXPECT_GE(stats[i].staleness.sum, 0);
  }
}

TEST(DASGD, PeerFailureCanBeThrown) {
  testing::spawn(3, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    auto w = torch::zeros({4}, torch::TensorOptions().requires_grad(true));
    auto opt = std::make_unique<DASGD>(
        std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.1),
        DASGDOptions().on_peer_failure(me == 0 ? PeerFailure::kThrow : PeerFailure::kContinue), world);
    world->barrier("built");
    if (me == 2) {
      DASGDTestAccess::crash(*opt);
      world.reset();
      return;
    }
    w.mutable_grad() = torch::ones({4});
    if (me == 1) {
      // Tolerates the dead peer: steps on without an error, also once rank 0 has seen it.
      world->store().wait({"rank 0 saw it"}, 30s);
      for (int s = 0; s < 3; ++s) EXPECT_NO_THROW(opt->step());
      EXPECT_TRUE(testing::eventually([&] {
        const auto f = opt->stats().failed_peers;
        return std::find(f.begin(), f.end(), 2) != f.end();
      }));
      opt->finish(20s);
      return;
    }
    std::string error;
    EXPECT_TRUE(testing::eventually([&] {
      try {
        opt->step();
      } catch (const CommError& e) {
        error = e.what();
        return true;
      }
      return false;
    }, 20s));
    EXPECT_NE(error.find("connection to rank 2 failed"), std::string::npos) << error;
    world->store().set("rank 0 saw it", std::vector<uint8_t>{1});
    DASGDTestAccess::crash(*opt);  // finish() would throw the stored error again
  });
}

TEST(Checkpoint, RanksResumedFromCheckpointsOfDifferentMomentsAgreeAgain) {
  // broadcast_every 3 and 10 steps: every rank's checkpoint holds an update it never
  // sent. After a restart with resync(), the replicas must agree exactly again (the
  // unsent update must not be sent twice, or the replicas diverge for good).
  const int n = 3;
  const std::string dir = ::testing::TempDir() + std::to_string(::getpid()) + "_";
  const Problem pb;
  auto make = [&](std::shared_ptr<World> world, torch::Tensor& w) {
    w = pb.x0.clone().requires_grad_(true);
    return std::make_unique<DASGD>(
        std::make_shared<torch::optim::Adam>(std::vector<torch::Tensor>{w}, torch::optim::AdamOptions(0.01)),
        DASGDOptions().broadcast_every(3), world);
  };
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    torch::Tensor w;
    auto opt = make(world, w);
    for (int t = 0; t < 10 + me; ++t) {  // different moments
      opt->zero_grad();
      pb.batch_loss(w, me, t).backward();
      opt->step();
    }
    torch::save(*opt, dir + "dasgd_rank" + std::to_string(me) + ".pt");
    torch::save(w, dir + "dasgd_w" + std::to_string(me) + ".pt");
    opt->finish(20s);
  });
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    torch::Tensor w;
    auto opt = make(world, w);
    torch::Tensor saved;
    torch::load(saved, dir + "dasgd_w" + std::to_string(me) + ".pt");
    {
      torch::NoGradGuard g;
      w.copy_(saved);
    }
    torch::load(*opt, dir + "dasgd_rank" + std::to_string(me) + ".pt");
    opt->resync();
    for (int t = 0; t < 6; ++t) {
      opt->zero_grad();
      pb.batch_loss(w, me, 100 + t).backward();
      opt->step();
    }
    EXPECT_TRUE(opt->finish(20s));
    // Everyone's final model, compared through the store.
    auto flat = w.detach().contiguous();
    std::vector<uint8_t> bytes(static_cast<size_t>(flat.numel()) * 8);
    std::memcpy(bytes.data(), flat.data_ptr(), bytes.size());
    world->store().set("final/" + std::to_string(me), bytes);
    world->barrier("final");
    for (int r = 0; r < n; ++r) {
      auto theirs = world->store().get("final/" + std::to_string(r));
      auto t = torch::from_blob(theirs.data(), {flat.numel()}, torch::kDouble).clone();
      EXPECT_TRUE(torch::allclose(t, flat, 0, 1e-10))
          << "rank " << me << " and rank " << r << " differ by " << (t - flat).abs().max().item<double>();
    }
  });
}

TEST(DASGD, MismatchedModelsAreRefusedOnEveryRank) {
  auto errors = testing::spawn_collect(3, [](std::shared_ptr<World> world) {
    auto net = torch::nn::Sequential(torch::nn::Linear(10, world->rank() == 1 ? 9 : 8));
    DASGD opt(net->named_parameters(), torch::optim::SGDOptions(0.1), DASGDOptions(), world);
  });
  for (int r = 0; r < 3; ++r) {
    EXPECT_NE(errors[r].find("parameter '0.weight' has shape"), std::string::npos) << errors[r];
  }
}

TEST(DASGD, WarnsWhenDestroyedWithoutFinish) {
  ::testing::internal::CaptureStderr();
  testing::spawn(2, [&](std::shared_ptr<World> world) {
    auto w = torch::zeros({4}, torch::TensorOptions().requires_grad(true));
    DASGD opt(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.1), DASGDOptions(), world);
    w.mutable_grad() = torch::ones({4});
    opt.step();
  });
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("DASGD destroyed without finish(): finishing now"), std::string::npos) << err;
}

TEST(DASGD, OverlapIsIgnoredForCpuParameters) {
  // The device pipeline is for GPU parameters; on the CPU the option changes nothing.
  auto run = [](bool overlap) {
    auto x = torch::linspace(0, 1, 10, torch::kDouble);
    testing::spawn(2, [&](std::shared_ptr<World> world) {
      auto p = x.clone();
      DASGD opt(std::vector<torch::Tensor>{p}, torch::optim::SGDOptions(0.1), DASGDOptions().overlap(overlap), world);
      p.mutable_grad() = torch::ones_like(p) * (world->rank() + 1);
      for (int s = 0; s < 5; ++s) opt.step();
      ASSERT_TRUE(opt.finish(20s));
      EXPECT_TRUE(p.allclose(x - 0.1 * 5 * 3)) << "rank " << world->rank();
    });
  };
  run(false);
  run(true);
  EXPECT_THROW(detail::DevicePipeline(c10::Device(c10::kCPU), 4, c10::kFloat), ConfigError);
}

// On a GPU (skipped without one): DASGD with its parameters on the device, with and
// without the overlapped pipeline, leaves every replica where the CPU run does once
// finish() returns, with random gradients that differ per rank and per step.
TEST(DASGDOnTheGpu, ReplicasAgreeAfterFinishWithAndWithoutOverlap) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device (this LibTorch: CPU only)";
  const int n = 2, steps = 40;
  auto grads = [&](int r, int s) {
    auto gen = at::detail::createCPUGenerator(1000 * r + s);
    return torch::randn({1000}, gen, torch::kDouble);
  };
  // The CPU reference: plain SGD, every rank's every update applied everywhere.
  auto expected = torch::linspace(0, 1, 1000, torch::kDouble);
  for (int r = 0; r < n; ++r) {
    for (int s = 0; s < steps; ++s) expected -= 0.01 * grads(r, s);
  }
  for (bool overlap : {false, true}) {
    testing::spawn(n, [&](std::shared_ptr<World> world) {
      const int r = world->rank();
      auto p = torch::linspace(0, 1, 1000, torch::kDouble).to(torch::kCUDA);
      DASGD opt(std::vector<torch::Tensor>{p}, torch::optim::SGDOptions(0.01),
                DASGDOptions().overlap(overlap), world);
      for (int s = 0; s < steps; ++s) {
        p.mutable_grad() = grads(r, s).to(torch::kCUDA);
        opt.step();
      }
      ASSERT_TRUE(opt.finish(30s));
      EXPECT_TRUE(p.cpu().allclose(expected, 1e-10, 1e-10))
          << "rank " << r << " overlap " << overlap << ": max difference "
          << (p.cpu() - expected).abs().max().item<double>();
    });
  }
}

}  // namespace
}  // namespace torch_asgd
