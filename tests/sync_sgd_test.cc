#include <gtest/gtest.h>
#include <unistd.h>

#include <torch/torch.h>

#include "testing.h"
#include "torch_asgd/comm/codec.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/optim/local.h"
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

// Local (local.h): each rank its own model, exactly its inner optimizer alone.
TEST(SyncSGD, LocalCommunicatesNothing) {
  const auto x0 = initial_params();
  testing::spawn(2, [&](std::shared_ptr<World> world) {
    auto net = make_net();
    auto alone = make_net();
    load(*net, x0);
    load(*alone, x0);
    Local opt(net->parameters(), torch::optim::SGDOptions(0.1), world);
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
    EXPECT_EQ(opt.stats().steps, 20);
    EXPECT_EQ(opt.stats().str().rfind(fmt::format("Local rank {}/2: 20 local steps", world->rank()), 0), 0u)
        << opt.stats().str();
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

// ---- Compressed gradients (SyncSGDOptions::compression) ----

at::Tensor flat_grads(torch::nn::Module& net) {
  std::vector<at::Tensor> gs;
  for (const auto& p : net.parameters()) gs.push_back(p.grad().reshape({-1}));
  return torch::cat(gs);
}

at::Tensor flat_values(torch::nn::Module& net) {
  std::vector<at::Tensor> xs;
  for (const auto& p : net.parameters()) xs.push_back(p.detach().reshape({-1}));
  return torch::cat(xs);
}

// 9002 parameters: two whole codec blocks of 4096 and an odd rest.
torch::nn::Sequential make_wide_net() {
  return torch::nn::Sequential(torch::nn::Linear(6, 1000), torch::nn::Tanh(), torch::nn::Linear(1000, 2));
}

class CompressedSync : public ::testing::TestWithParam<std::string> {};

// Every rank applies the mean of every rank's decoded gradient: the replicas stay bit-
// identical, and over the run the gradients applied plus the ranks' residuals equal the
// gradients produced (error feedback loses nothing), up to the float32 rounding of the
// sums. Dropping the residual breaks the second by orders of magnitude more than that.
TEST_P(CompressedSync, ReplicasAgreeBitForBitAndErrorFeedbackLosesNothing) {
  const int n = 4, steps = 30;  // n a power of two: mean * n is the decoded sum exactly
  const Compression c = Compression::parse(GetParam());
  torch::manual_seed(6);
  std::vector<torch::Tensor> x0;
  for (const auto& p : make_wide_net()->parameters()) x0.push_back(p.detach().clone());
  std::vector<at::Tensor> finals(n), produced(n), magnitude(n), applied(n), residuals(n);
  std::vector<uint64_t> bytes(n);
  int64_t numel = 0;
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    auto net = make_wide_net();
    load(*net, x0);
    SyncSGD opt(net->named_parameters(), torch::optim::SGDOptions(0.02).momentum(0.5),
                SyncSGDOptions().compression(c), world);
    at::Tensor made, size, sum;
    for (int t = 0; t < steps; ++t) {
      auto [x, y] = batch(me, t);
      opt.zero_grad();
      torch::mse_loss(net->forward(x), y).backward();
      const at::Tensor g = flat_grads(*net).to(at::kDouble);
      made = made.defined() ? made + g : g;
      size = size.defined() ? size + g.abs() : g.abs();
      opt.step();
      // The gradients the step used: the mean over the ranks (SGD leaves them in .grad).
      const at::Tensor used = flat_grads(*net).to(at::kDouble) * n;
      sum = sum.defined() ? sum + used : used;
    }
    finals[me] = flat_values(*net);
    produced[me] = made;
    magnitude[me] = size;
    applied[me] = sum;
    residuals[me] = opt.residual().to(at::kDouble);
    bytes[me] = opt.stats().bytes_reduced;
    if (me == 0) numel = finals[me].numel();
  });
  at::Tensor all_produced = torch::zeros_like(produced[0]), all_size = torch::zeros_like(produced[0]);
  at::Tensor all_residual = torch::zeros_like(produced[0]);
  for (int r = 0; r < n; ++r) {
    EXPECT_TRUE(torch::equal(finals[r], finals[0])) << "rank " << r << " differs from rank 0";
    EXPECT_TRUE(torch::equal(applied[r], applied[0]));
    EXPECT_EQ(bytes[r], static_cast<uint64_t>(steps * codec::encoded_bytes(c, numel)));
    all_produced += produced[r];
    all_size += magnitude[r];
    all_residual += residuals[r];
  }
  // Error feedback kept all the codec lost, up to the float32 rounding of the sums (the
  // gaps measured are below 2e-8 of the summed magnitudes) ...
  const at::Tensor gap = (applied[0] + all_residual - all_produced).abs();
  const at::Tensor bound = 1e-7 * (all_size + all_residual.abs()) + 1e-12;
  EXPECT_TRUE((gap <= bound).all().item<bool>())
      << "largest gap " << gap.max().item<double>() << " where the rounding bound is "
      << bound.max().item<double>() << " (worst ratio " << (gap / bound).max().item<double>() << ")";
  // ... and it did lose something, far above that bound (else this proves nothing).
  EXPECT_GT(all_residual.abs().max().item<double>(), 10 * bound.max().item<double>());
}

INSTANTIATE_TEST_SUITE_P(Codecs, CompressedSync, ::testing::Values("bf16", "fp16", "int8", "topk:0.1"),
                         [](const auto& info) {
                           std::string s = info.param;
                           for (auto& ch : s) ch = std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
                           return s;
                         });

// A gradient the codec cannot carry: every rank fails alike (none hangs in the all-
// gather), no rank takes the step, and training can go on afterwards.
TEST(SyncSGDCompressed, ANonFiniteGradientFailsEveryRankAndNoneTakesTheStep) {
  const int n = 3;
  const auto x0 = initial_params();
  std::vector<std::string> errors(n);
  std::vector<at::Tensor> finals(n);
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    auto net = make_net();
    load(*net, x0);
    SyncSGD opt(net->parameters(), torch::optim::SGDOptions(0.1), SyncSGDOptions().compression(Codec::kInt8),
                world);
    for (int t = 0; t < 4; ++t) {
      auto [x, y] = batch(me, t);
      opt.zero_grad();
      torch::mse_loss(net->forward(x), y).backward();
      if (t == 2 && me == 1) {
        torch::NoGradGuard g;
        net->parameters()[0].mutable_grad()[0][0] = std::numeric_limits<float>::quiet_NaN();
      }
      const at::Tensor before = flat_values(*net).clone();
      const at::Tensor residual = opt.residual().clone();
      try {
        opt.step();
      } catch (const DivergedError& e) {
        errors[me] = e.what();
        EXPECT_TRUE(torch::equal(flat_values(*net), before)) << "rank " << me << " stepped";
        EXPECT_TRUE(torch::equal(opt.residual(), residual)) << "rank " << me << "'s residual moved";
      }
    }
    finals[me] = flat_values(*net);
    EXPECT_TRUE(flat_values(*net).isfinite().all().item<bool>());
  });
  for (int r = 0; r < n; ++r) {
    EXPECT_NE(errors[r].find("rank 1's gradients hold NaN or Inf"), std::string::npos)
        << "rank " << r << ": '" << errors[r] << "'";
    EXPECT_TRUE(torch::equal(finals[r], finals[0])) << "rank " << r;
  }
}

// Every rank's gradient encodes, but the sum of one share does not (int8 values near
// FLT_MAX add up to Inf at the rank that reduces it): every rank throws the same
// DivergedError naming that share, none takes the step, neither residual moves (both
// hold something by then), and training goes on afterwards.
TEST(SyncSGDCompressed, ASumTooLargeToEncodeFailsEveryRankAndNoneTakesTheStep) {
  const int n = 3;
  torch::manual_seed(8);
  std::vector<torch::Tensor> x0;
  for (const auto& p : make_wide_net()->parameters()) x0.push_back(p.detach().clone());
  std::vector<std::string> errors(n);
  std::vector<at::Tensor> finals(n);
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    auto net = make_wide_net();
    load(*net, x0);
    SyncSGD opt(net->parameters(), torch::optim::SGDOptions(0.02), SyncSGDOptions().compression(Codec::kInt8),
                world);
    for (int t = 0; t < 5; ++t) {
      auto [x, y] = batch(me, t);
      opt.zero_grad();
      torch::mse_loss(net->forward(x), y).backward();
      if (t == 2) {
        torch::NoGradGuard g;
        net->parameters()[0].mutable_grad()[0][0] = 3e38f;  // finite on every rank
      }
      const at::Tensor before = flat_values(*net).clone();
      const at::Tensor residual = opt.residual().clone();
      try {
        opt.step();
        EXPECT_NE(t, 2) << "rank " << me << " took a step whose sum is Inf";
      } catch (const DivergedError& e) {
        errors[me] = e.what();
        EXPECT_EQ(t, 2) << e.what();
        EXPECT_TRUE(torch::equal(flat_values(*net), before)) << "rank " << me << " stepped";
        EXPECT_TRUE(torch::equal(opt.residual(), residual)) << "rank " << me << "'s residual moved";
        EXPECT_GT(residual.abs().max().item<double>(), 0) << "nothing to keep: this proves nothing";
      }
    }
    finals[me] = flat_values(*net);
    EXPECT_TRUE(finals[me].isfinite().all().item<bool>());
  });
  for (int r = 0; r < n; ++r) {
    EXPECT_NE(errors[r].find("the sum of the ranks' gradients for rank 0's share"), std::string::npos)
        << "rank " << r << ": '" << errors[r] << "'";
    EXPECT_TRUE(torch::equal(finals[r], finals[0])) << "rank " << r;
  }
}

// A compressed run resumed on more ranks: the shares are cut anew, so what the encoding
// of a share's sums had lost goes with its rank's next gradient; nothing is lost. Over
// the resumed run, the gradients applied plus the residuals at its end equal the
// gradients produced plus the residuals it started with.
TEST(SyncSGDCompressed, ResumedOnMoreRanksTheResidualsOfTheSumsAreNotLost) {
  const int before_n = 2, after_n = 4, steps = 5;
  torch::manual_seed(7);
  std::vector<torch::Tensor> x0;
  for (const auto& p : make_wide_net()->parameters()) x0.push_back(p.detach().clone());
  const std::string dir = ::testing::TempDir() + std::to_string(::getpid()) + "_";
  const Compression c(Codec::kTopK, 0.05);
  std::vector<at::Tensor> start(before_n);
  testing::spawn(before_n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    auto net = make_wide_net();
    load(*net, x0);
    SyncSGD opt(net->parameters(), torch::optim::SGDOptions(0.02), SyncSGDOptions().compression(c), world);
    for (int t = 0; t < 4; ++t) {
      auto [x, y] = batch(me, t);
      opt.zero_grad();
      torch::mse_loss(net->forward(x), y).backward();
      opt.step();
    }
    start[me] = opt.residual().to(at::kDouble);
    torch::save(opt, dir + "sync_more" + std::to_string(me) + ".pt");
  });
  std::vector<at::Tensor> produced(after_n), size(after_n), applied(after_n), end(after_n);
  testing::spawn(after_n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    auto net = make_wide_net();
    load(*net, x0);
    SyncSGD opt(net->parameters(), torch::optim::SGDOptions(0.02), SyncSGDOptions().compression(c), world);
    if (me < before_n) torch::load(opt, dir + "sync_more" + std::to_string(me) + ".pt");
    at::Tensor made, mag, sum;
    for (int t = 4; t < 4 + steps; ++t) {
      auto [x, y] = batch(me, t);
      opt.zero_grad();
      torch::mse_loss(net->forward(x), y).backward();
      const at::Tensor g = flat_grads(*net).to(at::kDouble);
      made = made.defined() ? made + g : g;
      mag = mag.defined() ? mag + g.abs() : g.abs();
      opt.step();
      const at::Tensor used = flat_grads(*net).to(at::kDouble) * after_n;
      sum = sum.defined() ? sum + used : used;
    }
    produced[me] = made;
    size[me] = mag;
    applied[me] = sum;
    end[me] = opt.residual().to(at::kDouble);
  });
  at::Tensor in = start[0] + start[1], out = torch::zeros_like(in), made = torch::zeros_like(in),
             mag = torch::zeros_like(in);
  for (int r = 0; r < after_n; ++r) {
    out += end[r];
    made += produced[r];
    mag += size[r];
  }
  ASSERT_GT(in.abs().max().item<double>(), 1e-3) << "nothing carried: this proves nothing";
  const at::Tensor gap = (applied[0] + out - made - in).abs();
  const at::Tensor bound = 1e-7 * (mag + in.abs() + out.abs()) + 1e-12;
  EXPECT_TRUE((gap <= bound).all().item<bool>())
      << "largest gap " << gap.max().item<double>() << " where the rounding bound is "
      << bound.max().item<double>();
}

TEST(SyncSGDCompressed, RanksWithDifferentCodecsAreRefused) {
  auto errors = testing::spawn_collect(2, [](std::shared_ptr<World> world) {
    auto net = make_net();
    SyncSGD opt(net->parameters(), torch::optim::SGDOptions(0.1),
                SyncSGDOptions().compression(world->rank() == 0 ? Codec::kInt8 : Codec::kBf16), world);
  });
  for (const auto& e : errors) {
    EXPECT_NE(e.find("compression"), std::string::npos) << e;
    EXPECT_NE(e.find("int8"), std::string::npos) << e;
    EXPECT_NE(e.find("bf16"), std::string::npos) << e;
  }
}

TEST(SyncSGDCompressed, DoubleParametersAndBadFractionsAreConfigErrors) {
  auto errors = testing::spawn_collect(2, [](std::shared_ptr<World> world) {
    auto net = make_net();
    net->to(at::kDouble);
    SyncSGD opt(net->parameters(), torch::optim::SGDOptions(0.1), SyncSGDOptions().compression(Codec::kBf16),
                world);
  });
  for (const auto& e : errors) EXPECT_NE(e.find("needs float32 parameters"), std::string::npos) << e;
  auto net = make_net();
  try {
    SyncSGD opt(net->parameters(), torch::optim::SGDOptions(0.1),
                SyncSGDOptions().compression(Compression(Codec::kTopK, 1.5)));
    ADD_FAILURE() << "a topk fraction of 1.5 was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("must be in (0, 1]"), std::string::npos) << e.what();
  }
}

// The residual is state: a run checkpointed and resumed is bit-identical to one that
// never stopped (dropping the residual at the checkpoint would lose what it held).
TEST(SyncSGDCompressed, ACheckpointKeepsTheResidual) {
  const int n = 2, before = 7, after = 6;
  const auto x0 = initial_params();
  const std::string dir = ::testing::TempDir() + std::to_string(::getpid()) + "_";
  auto make = [](torch::nn::Sequential& net, std::shared_ptr<World> world) {
    return std::make_unique<SyncSGD>(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9),
                                     SyncSGDOptions().compression(Compression(Codec::kTopK, 0.05)), world);
  };
  auto train = [](SyncSGD& opt, torch::nn::Sequential& net, int me, int from, int to) {
    for (int t = from; t < to; ++t) {
      auto [x, y] = batch(me, t);
      opt.zero_grad();
      torch::mse_loss(net->forward(x), y).backward();
      opt.step();
    }
  };
  std::vector<at::Tensor> straight(n), resumed(n);
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    auto net = make_net();
    load(*net, x0);
    auto opt = make(net, world);
    train(*opt, net, me, 0, before);
    ASSERT_GT(opt->residual().abs().sum().item<double>(), 0);
    torch::save(*opt, dir + "sync_rank" + std::to_string(me) + ".pt");
    torch::save(flat_values(*net), dir + "sync_x" + std::to_string(me) + ".pt");
    train(*opt, net, me, before, before + after);
    straight[me] = flat_values(*net);
  });
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    auto net = make_net();
    at::Tensor x;
    torch::load(x, dir + "sync_x" + std::to_string(me) + ".pt");
    {
      torch::NoGradGuard g;
      int64_t at = 0;
      for (auto& p : net->parameters()) {
        p.copy_(x.slice(0, at, at + p.numel()).view_as(p));
        at += p.numel();
      }
    }
    auto opt = make(net, world);
    torch::load(*opt, dir + "sync_rank" + std::to_string(me) + ".pt");
    train(*opt, net, me, before, before + after);
    resumed[me] = flat_values(*net);
  });
  for (int r = 0; r < n; ++r) {
    EXPECT_TRUE(torch::equal(straight[r], resumed[r]))
        << "rank " << r << " differs by " << (straight[r] - resumed[r]).abs().max().item<double>();
  }
}

// A compressed run resumed without compression: the residuals are sent with the first
// step's gradients, once.
TEST(SyncSGDCompressed, ResumedWithoutCompressionTheResidualIsSentOnce) {
  const int n = 2;
  const auto x0 = initial_params();
  const std::string dir = ::testing::TempDir() + std::to_string(::getpid()) + "_";
  std::vector<at::Tensor> residual(n), produced(n, at::Tensor()), produced2(n), used(n), used2(n);
  auto train_step = [](SyncSGD& opt, torch::nn::Sequential& net, int me, int t) {
    auto [x, y] = batch(me, t);
    opt.zero_grad();
    torch::mse_loss(net->forward(x), y).backward();
    const at::Tensor g = flat_grads(*net).to(at::kDouble);
    opt.step();
    return std::make_pair(g, flat_grads(*net).to(at::kDouble) * 2);  // n * the mean used
  };
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    auto net = make_net();
    load(*net, x0);
    SyncSGD opt(net->parameters(), torch::optim::SGDOptions(0.1),
                SyncSGDOptions().compression(Compression(Codec::kTopK, 0.05)), world);
    for (int t = 0; t < 5; ++t) train_step(opt, net, me, t);
    residual[me] = opt.residual().to(at::kDouble);
    torch::save(opt, dir + "sync_carry" + std::to_string(me) + ".pt");
  });
  testing::spawn(n, [&](std::shared_ptr<World> world) {
    const int me = world->rank();
    auto net = make_net();
    load(*net, x0);
    SyncSGD opt(net->parameters(), torch::optim::SGDOptions(0.1), SyncSGDOptions(), world);
    torch::load(opt, dir + "sync_carry" + std::to_string(me) + ".pt");
    std::tie(produced[me], used[me]) = train_step(opt, net, me, 5);
    std::tie(produced2[me], used2[me]) = train_step(opt, net, me, 6);
  });
  const at::Tensor carried = residual[0] + residual[1];
  ASSERT_GT(carried.abs().max().item<double>(), 1e-3) << "nothing to carry: this proves nothing";
  const at::Tensor first = produced[0] + produced[1] + carried, second = produced2[0] + produced2[1];
  EXPECT_TRUE(torch::allclose(used[0], first, 1e-5, 1e-6))
      << "first step off by " << (used[0] - first).abs().max().item<double>();
  EXPECT_TRUE(torch::allclose(used2[0], second, 1e-5, 1e-6))
      << "second step off by " << (used2[0] - second).abs().max().item<double>();
}

}  // namespace
}  // namespace torch_asgd
