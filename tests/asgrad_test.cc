#include <gtest/gtest.h>

#include <algorithm>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <deque>
#include <map>
#include <set>

#include <torch/torch.h>

#include "testing.h"
#include "torch_asgd/comm/error.h"
#include "scripted.h"
#include "torch_asgd/optim/asgrad_worker.h"
#include "torch_asgd/optim/detail/asgrad_protocol.h"
#include "torch_asgd/optim/job_policy.h"
#include "torch_asgd/optim/parameter_server.h"

namespace torch_asgd {
namespace {

using namespace std::chrono_literals;

const std::vector<int> kWorkers = {1, 2, 3, 4, 5};
auto all_available = [](int) { return true; };

TEST(JobPolicy, PureReturnsTheReturningWorker) {
  JobAssigner a(AssignPolicy::kPure, kWorkers, 1);
  for (int w : kWorkers) EXPECT_EQ(a.next(w, all_available), w);
  EXPECT_EQ(a.next(3, [](int w) { return w != 3; }), -1);
  // A job lost with a failed worker is not replaced: every live worker holds its own.
  EXPECT_EQ(a.next(-1, all_available), -1);
}

TEST(JobPolicy, ALostJobGoesToAnAvailableWorker) {
  for (auto policy : {AssignPolicy::kRandom, AssignPolicy::kShuffle}) {
    JobAssigner a(policy, kWorkers, 3);
    for (int k = 0; k < 50; ++k) {
      const int w = a.next(-1, [](int r) { return r != 2; });
      EXPECT_NE(w, 2);
      EXPECT_NE(std::find(kWorkers.begin(), kWorkers.end(), w), kWorkers.end());
    }
  }
}

TEST(JobPolicy, ShuffleNamesEveryWorkerOncePerWindow) {
  JobAssigner a(AssignPolicy::kShuffle, kWorkers, 7);
  std::vector<int> seq;
  for (int i = 0; i < 5000; ++i) seq.push_back(a.next(1, all_available));
  std::set<std::vector<int>> distinct_windows;
  for (size_t start = 0; start < seq.size(); start += kWorkers.size()) {
    std::vector<int> window(seq.begin() + start, seq.begin() + start + kWorkers.size());
    distinct_windows.insert(window);
    std::sort(window.begin(), window.end());
    ASSERT_EQ(window, kWorkers) << "window at " << start;
  }
  EXPECT_GT(distinct_windows.size(), 50u) << "the permutation must change between windows";
  // Unavailable workers are skipped.
  for (int i = 0; i < 100; ++i) EXPECT_NE(a.next(1, [](int w) { return w != 4; }), 4);
}

TEST(JobPolicy, RandomIsUniform) {
  JobAssigner a(AssignPolicy::kRandom, kWorkers, 11);
  const int draws = 50000;
  std::map<int, int> count;
  for (int i = 0; i < draws; ++i) ++count[a.next(1, all_available)];
  double chi2 = 0;
  const double expected = static_cast<double>(draws) / kWorkers.size();
  for (int w : kWorkers) chi2 += (count[w] - expected) * (count[w] - expected) / expected;
  // df = 4: P(chi2 > 18.47) = 0.001 under uniformity.
  EXPECT_LT(chi2, 18.47) << "counts " << count[1] << " " << count[2] << " " << count[3] << " "
                         << count[4] << " " << count[5];
  for (int i = 0; i < 100; ++i) EXPECT_NE(a.next(1, [](int w) { return w != 2; }), 2);
}

TEST(JobPolicy, NamesAreParsed) {
  EXPECT_EQ(parse_assign_policy("shuffle"), AssignPolicy::kShuffle);
  EXPECT_THROW(parse_assign_policy("fifo"), ConfigError);
  EXPECT_EQ(parse_step_rule("delay-adaptive"), StepRule::kDelayAdaptive);
  EXPECT_THROW(parse_step_rule("adaptive"), ConfigError);
}

torch::nn::Sequential make_net() {
  return torch::nn::Sequential(torch::nn::Linear(5, 8), torch::nn::Tanh(), torch::nn::Linear(8, 1));
}

std::pair<torch::Tensor, torch::Tensor> batch(int worker, int64_t t) {
  auto gen = at::detail::createCPUGenerator(1000 * worker + t);
  return {torch::randn({8, 5}, gen), torch::randn({8, 1}, gen)};
}

TEST(AsGrad, OneWorkerPureIsSequentialSGD) {
  const int steps = 40;
  torch::manual_seed(9);
  auto init = make_net();
  std::vector<torch::Tensor> x0;
  for (const auto& p : init->parameters()) x0.push_back(p.detach().clone());
  auto ref = make_net();
  {
    torch::NoGradGuard g;
    for (size_t i = 0; i < x0.size(); ++i) ref->parameters()[i].copy_(x0[i]);
  }
  torch::optim::SGD sgd(ref->parameters(), torch::optim::SGDOptions(0.1));
  for (int t = 0; t < steps; ++t) {
    auto [x, y] = batch(1, t);
    sgd.zero_grad();
    torch::mse_loss(ref->forward(x), y).backward();
    sgd.step();
  }
  testing::spawn(2, [&](std::shared_ptr<World> world) {
    auto net = make_net();
    {
      torch::NoGradGuard g;
      for (size_t i = 0; i < x0.size(); ++i) net->parameters()[i].copy_(x0[i]);
    }
    if (world->rank() == 0) {
      ParameterServer server(net->named_parameters(), torch::optim::SGDOptions(0.1),
                             ServerOptions().policy(AssignPolicy::kPure).max_gradients(steps), world);
      auto stats = server.run();
      EXPECT_EQ(stats.version, steps);
      EXPECT_EQ(stats.staleness.max, 0);
      auto mine = net->parameters(), theirs = ref->parameters();
      for (size_t i = 0; i < mine.size(); ++i) {
        EXPECT_TRUE(torch::equal(mine[i], theirs[i])) << "parameter " << i;
      }
    } else {
      AsGradWorker opt(net->named_parameters(), WorkerOptions(), world);
      while (!opt.done()) {
        auto [x, y] = batch(1, opt.stats().gradients);
        opt.zero_grad();
        torch::mse_loss(net->forward(x), y).backward();
        opt.step();
      }
      EXPECT_EQ(opt.stats().gradients, steps);
      opt.finish();
    }
  });
}

// Three workers of different speeds; returns what the server and each worker saw.
struct Run {
  ServerStats server;
  std::vector<int> job_log, apply_log;
  std::map<int, std::vector<int64_t>> job_versions;  // per worker, in order received
  std::map<int, int64_t> sent;                       // gradients each worker returned
  std::map<int, torch::Tensor> final_model;          // the server's, by rank 0
};

Run run_asgrad(ServerOptions options, std::vector<std::chrono::milliseconds> pauses,
               const std::function<torch::Tensor(int, const torch::Tensor&)>& loss_of,
               int64_t dim, double lr) {
  Run out;
  std::mutex mu;
  const int n = static_cast<int>(pauses.size()) + 1;
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    auto w = torch::zeros({dim}, torch::TensorOptions().dtype(torch::kDouble).requires_grad(true));
    if (world->rank() == 0) {
      ParameterServer server(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(lr),
                             options.keep_log(true), world);
      auto stats = server.run();
      std::lock_guard<std::mutex> lock(mu);
      out.server = stats;
      out.job_log = server.job_log();
      out.apply_log = server.apply_log();
      out.final_model[0] = w.detach().clone();
      return;
    }
    AsGradWorker opt(std::vector<torch::Tensor>{w}, WorkerOptions(), world);
    std::vector<int64_t> versions = {opt.stats().job_version};
    while (!opt.done()) {
      opt.zero_grad();
      loss_of(world->rank(), w).backward();
      std::this_thread::sleep_for(pauses[world->rank() - 1]);
      opt.step();
      if (!opt.done()) versions.push_back(opt.stats().job_version);
    }
    opt.finish();
    std::lock_guard<std::mutex> lock(mu);
    out.job_versions[world->rank()] = versions;
    out.sent[world->rank()] = opt.stats().gradients;
  });
  return out;
}

// A quadratic per worker: 0.5 |x - c_w|^2 with its own centre.
torch::Tensor quadratic(int worker, const torch::Tensor& x) {
  auto c = torch::full({x.size(0)}, static_cast<double>(worker), torch::kDouble);
  return 0.5 * (x - c).pow(2).sum();
}

// The same, scripted: time is counted in ticks, and worker w needs periods[w - 1] ticks
// for a gradient (from the tick its job arrived or its previous one was done). Each tick
// the server's messages are delivered, the workers whose gradient is ready send it, and
// the server serves once. Nothing depends on a clock: a run is a function of its options.
Run run_scripted(ServerOptions options, const std::vector<int>& periods,
                 const std::function<torch::Tensor(int, const torch::Tensor&)>& loss_of,
                 int64_t dim, double lr) {
  const int n = static_cast<int>(periods.size()) + 1;
  testing::ScriptedNetwork net(n);
  auto w = torch::zeros({dim}, torch::TensorOptions().dtype(torch::kDouble).requires_grad(true));
  ParameterServer server(std::make_shared<torch::optim::SGD>(std::vector<torch::Tensor>{w},
                                                             torch::optim::SGDOptions(lr)),
                         options.keep_log(true), net.endpoint(0));
  struct Held {
    int64_t version;
    torch::Tensor snapshot;
  };
  std::vector<std::unique_ptr<Transport>> workers;
  std::vector<std::deque<Held>> jobs(n);
  std::vector<int64_t> busy_until(n, -1);
  for (int r = 1; r < n; ++r) workers.push_back(net.endpoint(r));
  Run out;
  bool more = true;
  for (int64_t tick = 0; more; ++tick) {
    if (tick == 1000000) {
      ADD_FAILURE() << "the scripted run did not end: the server stopped taking gradients";
      break;
    }
    for (int r = 1; r < n; ++r) net.deliver(0, r);
    for (int r = 1; r < n; ++r) {
      for (auto& m : workers[r - 1]->poll().messages) {
        if (detail::asgrad_kind(m) != detail::kJob) continue;
        out.job_versions[r].push_back(detail::asgrad_version(m));
        jobs[r].push_back(Held{detail::asgrad_version(m), m.payload.clone()});
      }
      if (jobs[r].empty()) continue;
      if (busy_until[r] < 0) busy_until[r] = tick + periods[r - 1];  // starts on the job
      if (tick < busy_until[r]) continue;
      Held job = std::move(jobs[r].front());
      jobs[r].pop_front();
      auto x = job.snapshot.clone().requires_grad_(true);
      loss_of(r, x).backward();
      workers[r - 1]->send(0, detail::asgrad_message(detail::kGradient, job.version, x.grad()));
      out.sent[r] += 1;
      busy_until[r] = jobs[r].empty() ? -1 : tick + periods[r - 1];
    }
    for (int r = 1; r < n; ++r) net.deliver(r, 0);
    more = server.serve(std::chrono::milliseconds(0));
  }
  out.server = server.stats();
  out.job_log = server.job_log();
  out.apply_log = server.apply_log();
  out.final_model[0] = w.detach().clone();
  return out;
}

TEST(AsGrad, EveryGradientOnceAndStalenessEqualsVersionDifferences) {
  auto r = run_asgrad(ServerOptions().policy(AssignPolicy::kShuffle).max_gradients(150).seed(3),
                      {1ms, 2ms, 3ms}, quadratic, 4, 0.01);
  EXPECT_EQ(r.server.gradients, 150);
  EXPECT_EQ(r.server.version, 150);
  ASSERT_EQ(r.apply_log.size(), 150u);
  // Every gradient read is applied (no cap), unless it came after the budget was spent:
  // one read in the same batch as the 150th is counted late. A worker has one job at a
  // time, so at most one of its gradients is late, and at most one more it sent may
  // never have been read by the stopped server.
  int64_t received = 0, late = 0;
  for (const auto& w : r.server.workers) {
    received += w.gradients;
    late += w.gradients - w.applied;
    EXPECT_GE(r.sent[w.rank], w.gradients);
    EXPECT_LE(r.sent[w.rank], w.gradients + 1);
    EXPECT_LE(w.applied, w.gradients);
    EXPECT_LE(w.gradients, w.applied + 1) << "at most one gradient of a worker is late";
  }
  EXPECT_EQ(late, r.server.late) << "what was read and not applied is exactly what came late";
  EXPECT_EQ(received, 150 + r.server.late);

  // Recompute every tau from the workers' own job versions and the order of application:
  // the i-th applied gradient met server version i; worker w's k-th gradient was
  // computed at the k-th job version w received.
  std::map<int, size_t> next;
  int64_t sum = 0, max = 0;
  for (size_t i = 0; i < r.apply_log.size(); ++i) {
    const int w = r.apply_log[i];
    const int64_t computed_at = r.job_versions[w].at(next[w]++);
    const int64_t tau = static_cast<int64_t>(i) - computed_at;
    ASSERT_GE(tau, 0);
    sum += tau;
    max = std::max(max, tau);
  }
  EXPECT_EQ(r.server.staleness.count, 150);
  EXPECT_EQ(r.server.staleness.sum, sum);
  EXPECT_EQ(r.server.staleness.max, max);

  // Shuffle: after the initial job of each, every window of 3 jobs names each worker once.
  ASSERT_GE(r.job_log.size(), 3u);
  for (size_t start = 0; start + 3 <= r.job_log.size(); start += 3) {
    std::vector<int> window(r.job_log.begin() + start, r.job_log.begin() + start + 3);
    std::sort(window.begin(), window.end());
    EXPECT_EQ(window, (std::vector<int>{1, 2, 3})) << "window at " << start;
  }
}

TEST(AsGrad, StalenessCapDropsAndCounts) {
  auto r = run_scripted(
      ServerOptions().policy(AssignPolicy::kRandom).staleness_cap(2).max_gradients(120).seed(7),
      {1, 1, 6}, quadratic, 4, 0.01);
  EXPECT_EQ(r.server.gradients, 120);
  EXPECT_EQ(r.server.version + r.server.dropped, 120);
  EXPECT_GT(r.server.dropped, 0) << "a 6x slower worker's gradients are often 2 or more stale";
  EXPECT_LT(r.server.staleness.max, 2) << "no applied gradient may have tau >= R";
}

// AsGrad's heterogeneous setting: each worker's data has its own optimum, and one
// worker is several times slower. With 'pure' the fast workers' objectives dominate
// the model; 'shuffle' gives each worker one job per window and so optimizes the
// average. At the same number of server steps shuffle must be closer to the optimum
// of the average objective, for every seed.
TEST(AsGrad, ShuffleBeatsPureOnHeterogeneousData) {
  const int dim = 5;
  for (uint64_t seed : {1, 2, 3}) {
    // Worker w: least squares with its own rows and its own solution.
    std::map<int, std::pair<torch::Tensor, torch::Tensor>> data;
    torch::Tensor ata = torch::zeros({dim, dim}, torch::kDouble), atb = torch::zeros({dim}, torch::kDouble);
    for (int w = 1; w <= 3; ++w) {
      auto gen = at::detail::createCPUGenerator(100 * seed + w);
      auto A = torch::randn({32, dim}, gen, torch::kDouble) / std::sqrt(32.0);
      auto xw = torch::randn({dim}, gen, torch::kDouble) * 3;
      auto b = A.matmul(xw);
      data[w] = {A, b};
      ata += A.t().matmul(A);
      atb += A.t().matmul(b);
    }
    auto optimum = torch::linalg_solve(ata, atb);
    auto loss = [&](int w, const torch::Tensor& x) {
      return 0.5 * (data[w].first.matmul(x) - data[w].second).pow(2).sum();
    };
    std::map<AssignPolicy, double> error;
    for (AssignPolicy policy : {AssignPolicy::kPure, AssignPolicy::kShuffle}) {
      auto r = run_scripted(ServerOptions().policy(policy).max_gradients(450).seed(seed),
                            {1, 1, 8}, loss, dim, 0.1);
      error[policy] = (r.final_model[0] - optimum).norm().item<double>();
      std::printf("seed %lu %s: distance to the optimum %.4f; %s\n",
                  static_cast<unsigned long>(seed), to_string(policy).c_str(), error[policy],
                  r.server.str().c_str());
    }
    EXPECT_LT(error[AssignPolicy::kShuffle], error[AssignPolicy::kPure]) << "seed " << seed;
  }
}

TEST(AsGrad, SilentServerIsAClearErrorNotAHang) {
  std::vector<std::string> errors(2);
  testing::spawn(
      2,
      [&](std::shared_ptr<World> world) {
        auto w = torch::zeros({3}, torch::requires_grad());
        try {
          if (world->rank() == 0) {
            ParameterServer server(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.1),
                                   ServerOptions(), world);
            // Never serves, and stays up (silent, not gone) until the worker gave up.
            world->store().wait({"worker gave up"});
          } else {
            AsGradWorker opt(std::vector<torch::Tensor>{w}, WorkerOptions(), world);
          }
        } catch (const std::exception& e) {
          errors[world->rank()] = e.what();
        }
        if (world->rank() == 1) world->store().set("worker gave up", std::vector<uint8_t>{1});
      },
      [](WorldOptions& o) { o.timeout = 2s; });
  EXPECT_NE(errors[1].find("rank 1: no job from the parameter server (rank 0) for 2 s"),
            std::string::npos)
      << errors[1];
}

TEST(AsGrad, ServerAndWorkerStateSaveAndLoad) {
  const std::string dir = ::testing::TempDir();
  const std::string server_path = dir + "asgd_server_" + std::to_string(::getpid()) + ".pt";
  const std::string worker_path = dir + "asgd_worker_" + std::to_string(::getpid()) + ".pt";
  // Train 30 gradients and save both sides.
  testing::spawn(2, [&](std::shared_ptr<World> world) {
    auto w = torch::zeros({4}, torch::TensorOptions().dtype(torch::kDouble).requires_grad(true));
    if (world->rank() == 0) {
      ParameterServer server(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.1),
                             ServerOptions().max_gradients(30), world);
      server.run();
      torch::save(server, server_path);
    } else {
      AsGradWorker opt(std::vector<torch::Tensor>{w}, WorkerOptions(), world);
      while (!opt.done()) {
        opt.zero_grad();
        quadratic(1, w).backward();
        opt.step();
      }
      opt.finish();
      torch::save(opt, worker_path);
    }
  });
  // A new server and worker resume the counters; the server's first jobs carry the version.
  testing::spawn(2, [&](std::shared_ptr<World> world) {
    auto w = torch::zeros({4}, torch::TensorOptions().dtype(torch::kDouble).requires_grad(true));
    if (world->rank() == 0) {
      ParameterServer server(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.1),
                             ServerOptions().max_gradients(40), world);
      torch::load(server, server_path);
      EXPECT_EQ(server.stats().version, 30);
      auto s = server.run();
      EXPECT_EQ(s.version, 40);
      EXPECT_EQ(s.staleness.max, 0);
    } else {
      AsGradWorker opt(std::vector<torch::Tensor>{w}, WorkerOptions(), world);
      torch::load(opt, worker_path);
      EXPECT_EQ(opt.stats().gradients, 30);
      EXPECT_EQ(opt.stats().job_version, 30);  // the first job after the server's load
      while (!opt.done()) {
        opt.zero_grad();
        quadratic(1, w).backward();
        opt.step();
      }
      EXPECT_EQ(opt.stats().gradients, 40);
      opt.finish();
    }
  });
  // Another model is refused.
  testing::spawn(2, [&](std::shared_ptr<World> world) {
    auto w = torch::zeros({5}, torch::TensorOptions().dtype(torch::kDouble).requires_grad(true));
    if (world->rank() == 0) {
      ParameterServer server(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.1),
                             ServerOptions().max_gradients(1), world);
      EXPECT_THROW(torch::load(server, server_path), MismatchError);
      server.run();
    } else {
      AsGradWorker opt(std::vector<torch::Tensor>{w}, WorkerOptions(), world);
      EXPECT_THROW(torch::load(opt, worker_path), MismatchError);
      while (!opt.done()) {
        opt.zero_grad();
        quadratic(1, w).backward();
        opt.step();
      }
      opt.finish();
    }
  });
  std::remove(server_path.c_str());
  std::remove(worker_path.c_str());
}

TEST(AsGrad, NeedsAWorker) {
  auto w = torch::zeros({3}, torch::requires_grad());
  auto world = World::create(testing::thread_world_options(0, 1));
  EXPECT_THROW(ParameterServer(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.1),
                               ServerOptions(), world),
               ConfigError);
  EXPECT_THROW(AsGradWorker(std::vector<torch::Tensor>{w}, WorkerOptions(), world), ConfigError);
}

TEST(AsGrad, OneWorkerPureWithAdamIsAdam) {
  // The server's rule consumes each gradient as it comes: asynchronous Adam.
  const int steps = 30;
  torch::manual_seed(19);
  auto init = make_net();
  std::vector<torch::Tensor> x0;
  for (const auto& p : init->parameters()) x0.push_back(p.detach().clone());
  auto set = [&](torch::nn::Module& net) {
    torch::NoGradGuard g;
    for (size_t i = 0; i < x0.size(); ++i) net.parameters()[i].copy_(x0[i]);
  };
  auto ref = make_net();
  set(*ref);
  torch::optim::Adam adam(ref->parameters(), torch::optim::AdamOptions(0.01));
  for (int t = 0; t < steps; ++t) {
    auto [x, y] = batch(1, t);
    adam.zero_grad();
    torch::mse_loss(ref->forward(x), y).backward();
    adam.step();
  }
  testing::spawn(2, [&](std::shared_ptr<World> world) {
    auto net = make_net();
    set(*net);
    if (world->rank() == 0) {
      ParameterServer server(std::make_shared<torch::optim::Adam>(net->parameters(), torch::optim::AdamOptions(0.01)),
                             ServerOptions().policy(AssignPolicy::kPure).max_gradients(steps), world,
                             net->named_parameters().keys());
      // A server's step() serves what arrives: the loop of any DistributedOptimizer.
      DistributedOptimizer& opt = server;
      while (!opt.done()) EXPECT_FALSE(opt.step().defined());
      auto mine = net->parameters(), theirs = ref->parameters();
      for (size_t i = 0; i < mine.size(); ++i) EXPECT_TRUE(torch::equal(mine[i], theirs[i])) << i;
    } else {
      AsGradWorker opt(net->named_parameters(), WorkerOptions(), world);
      // A worker has no learning rate of its own: a scheduler on it is refused.
      EXPECT_THROW(opt.param_groups()[0].options().set_lr(0.1), ConfigError);
      EXPECT_THROW(opt.inner(), ConfigError);
      while (!opt.done()) {
        auto [x, y] = batch(1, opt.stats().gradients);
        opt.zero_grad();
        torch::mse_loss(net->forward(x), y).backward();
        opt.step();
      }
      EXPECT_TRUE(opt.finish());
    }
  });
}

// The step rules' arithmetic: the server's final model is recomputed from the apply log,
// the job versions and the workers' gradients at their job snapshots.
TEST(AsGrad, TheDelayAdaptiveStepIsLrTimesMinOneAndNOverTau) {
  for (StepRule rule : {StepRule::kConstant, StepRule::kDelayAdaptive}) {
    const double lr = 0.05;
    const int dim = 3, n = 3;
    auto r = run_scripted(ServerOptions().policy(AssignPolicy::kPure).step_rule(rule).max_gradients(90),
                          {1, 1, 25}, quadratic, dim, lr);
    // Replay: model history by version; the i-th applied gradient (worker w) was computed
    // at the job version v the worker received: g = x_v - c_w (the quadratic's).
    std::vector<torch::Tensor> x = {torch::zeros({dim}, torch::kDouble)};
    std::map<int, size_t> next;
    int64_t scaled = 0;
    for (size_t i = 0; i < r.apply_log.size(); ++i) {
      const int w = r.apply_log[i];
      const int64_t v = r.job_versions[w].at(next[w]++);
      const int64_t tau = static_cast<int64_t>(i) - v;
      double f = 1;
      if (rule == StepRule::kDelayAdaptive && tau > n) {
        f = static_cast<double>(n) / static_cast<double>(tau);
        ++scaled;
      }
      auto g = x[v] - torch::full({dim}, static_cast<double>(w), torch::kDouble);
      x.push_back(x.back() - lr * (g * f));
    }
    EXPECT_TRUE(torch::allclose(r.final_model[0], x.back(), 0, 1e-12)) << to_string(rule);
    if (rule == StepRule::kDelayAdaptive) EXPECT_GT(scaled, 0) << "no tau exceeded n: nothing tested";
  }
}

// The server's protocol with the workers played by the test: a worker that fails has its
// job issued anew, and a gradient of it that arrives afterwards is applied but issues no
// job; at no point are more jobs in flight than live workers, and never more gradients
// taken than the budget.
TEST(AsGrad, JobsInFlightNeverExceedTheLiveWorkersNorGradientsTheBudget) {
  testing::ScriptedNetwork net(4);
  auto w = torch::zeros({3}, torch::TensorOptions().dtype(torch::kDouble).requires_grad(true));
  ParameterServer server(std::make_shared<torch::optim::SGD>(std::vector<torch::Tensor>{w},
                                                             torch::optim::SGDOptions(0.1)),
                         ServerOptions().policy(AssignPolicy::kRandom).max_gradients(10).seed(4),
                         net.endpoint(0));
  std::vector<std::unique_ptr<Transport>> workers;
  for (int r = 1; r <= 3; ++r) workers.push_back(net.endpoint(r));
  auto gradient_from = [&](int worker, int64_t version) {
    workers[worker - 1]->send(0, detail::asgrad_message(detail::kGradient, version,
                                                        torch::ones({3}, torch::kDouble)));
  };
  ASSERT_TRUE(server.serve(std::chrono::milliseconds(0)));  // the first jobs
  EXPECT_EQ(server.jobs_in_flight(), 3);
  // Worker 3 sends a gradient, then dies before the server reads it; the server learns of
  // the death first.
  gradient_from(3, 0);
  net.kill(3);
  ASSERT_TRUE(server.serve(std::chrono::milliseconds(0)));
  EXPECT_EQ(server.jobs_in_flight(), 2) << "worker 3's job must be issued anew, not kept";
  auto live = [&] { return 2; };
  // Workers 1 and 2 return gradients, some twice before the server looks.
  for (int round = 0; round < 12; ++round) {
    net.deliver_all();
    for (int k = 1; k <= 2; ++k) {
      for (auto& m : workers[k - 1]->poll().messages) {
        if (detail::asgrad_kind(m) == detail::kJob) gradient_from(k, detail::asgrad_version(m));
      }
    }
    net.deliver_all();
    const bool more = server.serve(std::chrono::milliseconds(0));
    EXPECT_LE(server.jobs_in_flight(), live()) << "round " << round;
    EXPECT_LE(server.stats().gradients, 10) << "round " << round;
    if (!more) break;
  }
  EXPECT_EQ(server.stats().gradients, 10) << "the budget is reached exactly";
  EXPECT_EQ(server.stats().version, 10);
}

TEST(AsGrad, AGradientOfAWorkerAlreadyGivenUpIsAppliedWithoutANewJob) {
  testing::ScriptedNetwork net(3);
  auto w = torch::zeros({2}, torch::TensorOptions().dtype(torch::kDouble).requires_grad(true));
  ParameterServer server(std::make_shared<torch::optim::SGD>(std::vector<torch::Tensor>{w},
                                                             torch::optim::SGDOptions(0.1)),
                         ServerOptions().policy(AssignPolicy::kShuffle).max_gradients(100),
                         net.endpoint(0));
  auto worker2 = net.endpoint(2);
  ASSERT_TRUE(server.serve(std::chrono::milliseconds(0)));
  EXPECT_EQ(server.jobs_in_flight(), 2);
  worker2->send(0, detail::asgrad_message(detail::kGradient, 0, torch::ones({2}, torch::kDouble)));
  worker2->send(0, detail::asgrad_message(detail::kDone, 0));
  net.deliver(2, 0, 1);  // the gradient
  net.deliver(2, 0, 1);  // and the goodbye, read in the same serve()
  ASSERT_TRUE(server.serve(std::chrono::milliseconds(0)));
  EXPECT_EQ(server.stats().version, 1) << "the gradient is real work";
  EXPECT_EQ(server.jobs_in_flight(), 1) << "only worker 1 is left, with its one job";
}

// A gradient the server's channel refused (corrupt, or values not finite) never reaches
// the server, and its worker waits for its next job: the server counts the refusal and
// gives that worker a new job instead of losing it.
TEST(AsGrad, ARefusedGradientGivesItsWorkerANewJob) {
  testing::ScriptedNetwork net(2);
  auto w = torch::zeros({2}, torch::TensorOptions().dtype(torch::kDouble).requires_grad(true));
  ParameterServer server(std::make_shared<torch::optim::SGD>(std::vector<torch::Tensor>{w},
                                                             torch::optim::SGDOptions(0.1)),
                         ServerOptions().policy(AssignPolicy::kPure).max_gradients(100),
                         net.endpoint(0));
  auto worker = net.endpoint(1);
  auto jobs = [&] {
    net.deliver_all();
    int n = 0;
    for (auto& m : worker->poll().messages) n += detail::asgrad_kind(m) == detail::kJob ? 1 : 0;
    return n;
  };
  ASSERT_TRUE(server.serve(std::chrono::milliseconds(0)));
  ASSERT_EQ(jobs(), 1);
  net.mark_rejected(0, 1);  // the worker's gradient, refused
  ASSERT_TRUE(server.serve(std::chrono::milliseconds(0)));
  EXPECT_EQ(jobs(), 1) << "the worker waits for a job that never comes";
  EXPECT_EQ(server.jobs_in_flight(), 1);
  EXPECT_EQ(server.stats().workers[0].rejected, 1);
  EXPECT_EQ(server.stats().gradients, 0);
}

// ---- compressed gradients -------------------------------------------------------------

// An SGD that also adds up, in float64, every gradient it is given.
struct RecordingSGD : torch::optim::SGD {
  RecordingSGD(std::vector<torch::Tensor> params, torch::optim::SGDOptions o)
      : torch::optim::SGD(std::move(params), o) {}
  torch::Tensor step(LossClosure closure = nullptr) override {
    const at::Tensor g = param_groups()[0].params()[0].grad().to(at::kDouble).reshape({-1});
    sum = sum.defined() ? sum + g : g;
    ++steps;
    return torch::optim::SGD::step(closure);
  }
  at::Tensor sum;
  int steps = 0;
};

// Gradient t of the compressed tests: scales from 1e-2 to 1e2, and one entry far larger
// than the rest of its block (what a per-block scale must survive).
at::Tensor compressed_test_gradient(int64_t dim, int t) {
  auto gen = at::detail::createCPUGenerator(100 + t);
  at::Tensor g = torch::randn({dim}, gen) * std::pow(10.0, t % 5 - 2);
  g[(t * 977) % dim] = 3e3;
  return g;
}

class CompressedAsGrad : public ::testing::TestWithParam<std::string> {};

// The server applies the decoded gradients; what the codec lost stays with the worker
// and rides along with its next gradient, so that the gradients applied plus what the
// worker still keeps equal the gradients it produced, up to the float32 rounding of
// adding the residual in. Without error feedback the gap is far above that bound.
TEST_P(CompressedAsGrad, TheServerAppliesWhatWasProducedLessWhatTheWorkerStillKeeps) {
  const Compression c = Compression::parse(GetParam());
  const int64_t dim = 9002;  // two whole codec blocks and an odd rest
  const int steps = 25;
  at::Tensor produced, magnitude, applied, residual;
  int applied_steps = 0;
  testing::spawn(2, [&](std::shared_ptr<World> world) {
    auto w = torch::zeros({dim}, torch::requires_grad());
    if (world->rank() == 0) {
      auto rule = std::make_shared<RecordingSGD>(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.01));
      ParameterServer server(rule, ServerOptions().policy(AssignPolicy::kPure).max_gradients(steps).compression(c),
                             world);
      server.run();
      applied = rule->sum;
      applied_steps = rule->steps;
      return;
    }
    AsGradWorker opt(std::vector<torch::Tensor>{w}, WorkerOptions().compression(c), world);
    at::Tensor made, size;
    for (int t = 0; !opt.done(); ++t) {
      const at::Tensor g = compressed_test_gradient(dim, t);
      w.mutable_grad() = g.clone();
      made = made.defined() ? made + g.to(at::kDouble) : g.to(at::kDouble);
      // What this step rounds: the gradient plus the residual it carries.
      const at::Tensor carried = (g.abs() + opt.residual().abs()).to(at::kDouble);
      size = size.defined() ? size + carried : carried;
      opt.step();
    }
    produced = made;
    magnitude = size;
    residual = opt.residual().to(at::kDouble);
    opt.finish();
  });
  ASSERT_EQ(applied_steps, steps);
  const at::Tensor gap = (applied + residual - produced).abs();
  // Each step rounds once, adding the residual in float32 (half an ulp, 2^-24 relative);
  // the encoding and its residual are exact.
  const at::Tensor bound = std::ldexp(1.0, -24) * magnitude + 1e-12;
  EXPECT_TRUE((gap <= bound).all().item<bool>())
      << "largest gap " << gap.max().item<double>() << " where the rounding bound is "
      << bound.max().item<double>() << " (worst ratio " << (gap / bound).max().item<double>() << ")";
  EXPECT_GT(residual.abs().max().item<double>(), 10 * bound.max().item<double>())
      << "the codec lost something (else this proves nothing)";
}

INSTANTIATE_TEST_SUITE_P(Codecs, CompressedAsGrad, ::testing::Values("bf16", "fp16", "int8", "topk:0.1"),
                         [](const auto& info) {
                           std::string s = info.param;
                           std::replace(s.begin(), s.end(), ':', '_');
                           std::replace(s.begin(), s.end(), '.', '_');
                           return s;
                         });

TEST(CompressedAsGrad, AServerAndAWorkerWithDifferentCodecsAreRefused) {
  auto errors = testing::spawn_collect(2, [](std::shared_ptr<World> world) {
    auto w = torch::zeros({10}, torch::requires_grad());
    if (world->rank() == 0) {
      ParameterServer server(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.1),
                             ServerOptions().compression(Codec::kInt8), world);
    } else {
      AsGradWorker opt(std::vector<torch::Tensor>{w}, WorkerOptions().compression(Codec::kBf16), world);
    }
  });
  ASSERT_EQ(errors.size(), 2u);
  for (const auto& e : errors) {
    EXPECT_NE(e.find("compression"), std::string::npos) << e;
    EXPECT_NE(e.find("int8"), std::string::npos) << e;
    EXPECT_NE(e.find("bf16"), std::string::npos) << e;
  }
}

TEST(CompressedAsGrad, DoubleParametersAndBadFractionsAreConfigErrors) {
  auto errors = testing::spawn_collect(2, [](std::shared_ptr<World> world) {
    auto w = torch::zeros({10}, torch::TensorOptions().dtype(torch::kDouble).requires_grad(true));
    if (world->rank() == 0) {
      ParameterServer server(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.1),
                             ServerOptions().compression(Codec::kInt8), world);
    } else {
      auto f = torch::zeros({10}, torch::requires_grad());
      AsGradWorker opt(std::vector<torch::Tensor>{f}, WorkerOptions().compression(Compression(Codec::kTopK, 0)),
                       world);
    }
  });
  ASSERT_EQ(errors.size(), 2u);
  EXPECT_NE(errors[0].find("ParameterServer: compression 'int8' needs float32 parameters, these are Double"),
            std::string::npos)
      << errors[0];
  EXPECT_NE(errors[1].find("AsGradWorker: topk fraction 0 must be in (0, 1]"), std::string::npos) << errors[1];
}

TEST(CompressedAsGrad, AnUndecodableGradientIsACommErrorNotAStep) {
  testing::ScriptedNetwork net(2);
  auto w = torch::zeros({10}, torch::requires_grad());
  ParameterServer server(std::make_shared<torch::optim::SGD>(std::vector<torch::Tensor>{w},
                                                             torch::optim::SGDOptions(0.1)),
                         ServerOptions().max_gradients(10).compression(Codec::kInt8), net.endpoint(0));
  auto worker = net.endpoint(1);
  ASSERT_TRUE(server.serve(std::chrono::milliseconds(0)));
  at::Tensor bytes = torch::zeros({codec::encoded_bytes(Codec::kInt8, 10)}, torch::kByte);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(bytes.data_ptr(), &nan, sizeof(nan));  // the block's scale
  worker->send(0, detail::asgrad_message(detail::kGradient, 0, bytes));
  net.deliver(1, 0, 1);
  try {
    server.serve(std::chrono::milliseconds(0));
    ADD_FAILURE() << "an undecodable gradient was taken";
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("worker 1 sent a int8 gradient that does not decode"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(server.stats().version, 0);
  EXPECT_TRUE(w.eq(0).all().item<bool>());
}

// The residual is state: saved and loaded with the worker; resumed without
// compression, it goes with the first gradient, whole.
TEST(CompressedAsGrad, ACheckpointKeepsTheResidualAndAnUncompressedResumeSendsItOnce) {
  const std::string path = ::testing::TempDir() + "asgd_worker_int8_" + std::to_string(::getpid()) + ".pt";
  const int64_t dim = 5000;
  at::Tensor saved_residual, loaded_residual, first_applied;
  testing::spawn(2, [&](std::shared_ptr<World> world) {
    auto w = torch::zeros({dim}, torch::requires_grad());
    if (world->rank() == 0) {
      ParameterServer server(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.01),
                             ServerOptions().max_gradients(5).compression(Codec::kInt8), world);
      server.run();
      return;
    }
    AsGradWorker opt(std::vector<torch::Tensor>{w}, WorkerOptions().compression(Codec::kInt8), world);
    for (int t = 0; !opt.done(); ++t) {
      w.mutable_grad() = compressed_test_gradient(dim, t);
      opt.step();
    }
    opt.finish();
    saved_residual = opt.residual().clone();
    torch::save(opt, path);
  });
  ASSERT_GT(saved_residual.abs().max().item<double>(), 0);
  const at::Tensor g = compressed_test_gradient(dim, 7);
  bool residual_after = true;
  testing::spawn(2, [&](std::shared_ptr<World> world) {
    auto w = torch::zeros({dim}, torch::requires_grad());
    if (world->rank() == 0) {
      auto rule = std::make_shared<RecordingSGD>(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.01));
      ParameterServer server(rule, ServerOptions().max_gradients(1), world);
      server.run();
      first_applied = rule->sum;
      return;
    }
    AsGradWorker opt(std::vector<torch::Tensor>{w}, WorkerOptions(), world);
    torch::load(opt, path);
    loaded_residual = opt.residual().clone();
    w.mutable_grad() = g.clone();
    opt.step();
    residual_after = opt.residual().defined();
    opt.finish();
  });
  EXPECT_TRUE(torch::equal(loaded_residual, saved_residual)) << "the checkpoint keeps the residual";
  EXPECT_TRUE(torch::equal(first_applied, (g + saved_residual).to(at::kDouble)))
      << "the first uncompressed gradient carries the residual";
  EXPECT_FALSE(residual_after) << "and nothing is owed after it";
  std::remove(path.c_str());
}

}  // namespace
}  // namespace torch_asgd
