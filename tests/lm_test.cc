// The language model of asgd-lm: the transformer sees no future byte, the text's windows
// are what they claim, and the program learns real English text on two ranks.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "example_data.h"
#include "lm/text.h"
#include "lm/transformer.h"
#include "process.h"

namespace torch_asgd {
namespace {

using namespace std::chrono_literals;
using examples::TransformerConfig;
using examples::TransformerImpl;
using testing::Proc;

const char* const kFortunes = "/usr/share/games/fortunes";

TransformerConfig tiny() {
  TransformerConfig c;
  c.width = 32;
  c.depth = 2;
  c.heads = 2;
  c.context = 32;
  return c;
}

// Changing byte 9 changes no prediction made before it (positions 0..8), and does
// change the ones made from it on.
TEST(Transformer, NoPositionSeesAByteAfterIt) {
  torch::manual_seed(3);
  TransformerImpl model(tiny());
  model.eval();
  torch::NoGradGuard no_grad;
  auto bytes = torch::randint(0, 256, {2, 16}, torch::kLong);
  auto changed = bytes.clone();
  changed.select(1, 9).add_(1).remainder_(256);
  auto a = model.forward(bytes), b = model.forward(changed);
  ASSERT_EQ(a.sizes(), (std::vector<int64_t>{2, 16, 256}));
  EXPECT_TRUE(torch::equal(a.narrow(1, 0, 9), b.narrow(1, 0, 9))) << "a prediction saw a later byte";
  for (int64_t t = 9; t < 16; ++t) {
    EXPECT_FALSE(torch::allclose(a.select(1, t), b.select(1, t))) << "position " << t << " ignores byte 9";
  }
  // Log-probabilities: each position's distribution sums to 1.
  EXPECT_TRUE(torch::allclose(a.exp().sum(-1), torch::ones({2, 16}), 1e-5, 1e-5));
}

TEST(Transformer, TheDefaultHasAboutTenMillionParameters) {
  TransformerImpl model{TransformerConfig{}};
  int64_t n = 0;
  for (const auto& p : model.parameters()) n += p.numel();
  EXPECT_EQ(n, 10893568);  // 6 * (12 * 384^2 + 13 * 384) + (2 * 256 + 128) * 384 + 256 + 2 * 384
}

// Disjoint windows of context + 1 bytes; labels are the inputs shifted by one byte;
// every 20th window is held out.
TEST(TextWindows, LabelsAreTheNextBytesAndEveryTwentiethWindowIsHeldOut) {
  std::string text;
  for (int i = 0; i < 45 * 5 + 3; ++i) text.push_back(static_cast<char>('a' + i % 26));
  auto [train, test] = examples::text_windows(text, 4);  // 45 windows of 5 bytes, 3 left over
  ASSERT_EQ(train.images.sizes(), (std::vector<int64_t>{43, 4}));
  ASSERT_EQ(test.images.sizes(), (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(train.images.scalar_type(), torch::kLong);
  EXPECT_TRUE(torch::equal(train.labels.narrow(1, 0, 3), train.images.narrow(1, 1, 3)));
  // Window 19 (bytes 95..99) is the first held out; window 20 is the 20th training one.
  auto held = test.images[0];
  auto next = test.labels[0];
  for (int j = 0; j < 4; ++j) {
    EXPECT_EQ(held[j].item<int64_t>(), 'a' + (95 + j) % 26);
    EXPECT_EQ(next[j].item<int64_t>(), 'a' + (96 + j) % 26);
  }
  EXPECT_EQ(train.images[19][0].item<int64_t>(), 'a' + 100 % 26);
}

TEST(TextWindows, MissingOrShortTextIsOneClearLine) {
  try {
    examples::read_text("/nonexistent/text", 10);
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("--data /nonexistent/text: no such file or directory "
                                         "(scripts/deps.sh installs Debian's fortunes"),
              std::string::npos)
        << e.what();
  }
  const std::string file = ::testing::TempDir() + "asgd_short_text";
  std::ofstream(file) << "too short";
  try {
    examples::read_text(file, 660);
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("9 bytes of text in 1 file(s), and this run needs at least 660"),
              std::string::npos)
        << e.what();
  }
}

// The entropy (nats per byte) of the held-out bytes under their own byte frequencies: what
// a model that ignores the context can reach at best.
double unigram_entropy(const torch::Tensor& labels) {
  auto counts = torch::bincount(labels.reshape({-1}), {}, 256).to(torch::kDouble);
  auto p = counts / counts.sum();
  auto nz = p.masked_select(p.gt(0));
  return -(nz * nz.log()).sum().item<double>();
}

// Two DASGD ranks train the tiny transformer on Debian's fortunes: the held-out loss ends
// below what any model blind to the context can reach (so it learned from the context),
// the ranks end equal, and the metrics carry the loss, its perplexity and the curve.
TEST(AsgdLm, TwoRanksLearnRealTextBeyondByteFrequencies) {
  auto [train, test] = examples::text_windows(examples::read_text(kFortunes, 0), 32);
  const double blind = unigram_entropy(test.labels.narrow(0, 0, 256));
  const std::string json = ::testing::TempDir() + "asgd_lm_metrics_" + std::to_string(::getpid()) + ".json";
  Proc p = testing::run({bin("asgd-launch"), "--nproc", "2", "--master-port", "0", "--", bin("asgd-lm"),
                         "--width", "32", "--depth", "2", "--heads", "2", "--context", "32",
                         "--algo", "dasgd", "--average", "--lr", "0.003", "--batch-size", "16",
                         "--budget-samples", "16000", "--eval-every", "100", "--target-loss",
                         std::to_string(blind), "--metrics-out", json},
                        {}, 240s);
  ASSERT_FALSE(p.timed_out) << p.out_buf << p.err_buf;
  ASSERT_EQ(p.exit_code, 0) << p.out_buf << p.err_buf;
  const auto m = metrics_in(json);
  ASSERT_TRUE(m.is_object()) << slurp(json);
  const double loss = m["test_loss"].get<double>();
  EXPECT_LT(loss, blind - 0.3) << "the held-out loss " << loss << " is not below the byte frequencies' " << blind;
  EXPECT_NEAR(m["perplexity"].get<double>(), std::exp(loss), 1e-9);
  EXPECT_EQ(m["parameters"], 43136);
  EXPECT_FALSE(m["time_to_target_seconds"].is_null()) << m.dump(2);
  EXPECT_TRUE(m["class_accuracy"].empty());
  ASSERT_FALSE(m["eval_curve"].empty());
  EXPECT_TRUE(m["eval_curve"][0].contains("loss"));
  // After finish() both replicas are x_0 plus the same deltas, added in different orders:
  // the same held-out loss up to float rounding (4.5e-8 apart when measured).
  ASSERT_EQ(m["ranks"].size(), 2u);
  EXPECT_NEAR(m["ranks"][0]["loss"].get<double>(), m["ranks"][1]["loss"].get<double>(), 1e-5 * loss)
      << m["ranks"].dump();
}

// A diverged run's loss is NaN, which JSON writes as null: every rank's report still
// reaches rank 0's summary.
TEST(AsgdLm, ADivergedRankStillReports) {
  const std::string json = ::testing::TempDir() + "asgd_lm_nan_" + std::to_string(::getpid()) + ".json";
  Proc p = testing::run({bin("asgd-launch"), "--nproc", "2", "--master-port", "0", "--", bin("asgd-lm"),
                         "--width", "32", "--depth", "2", "--heads", "2", "--context", "32", "--algo", "local",
                         "--optimizer", "sgd", "--lr", "1e30", "--budget-samples", "320", "--metrics-out", json},
                        {}, 120s);
  ASSERT_EQ(p.exit_code, 0) << p.out_buf << p.err_buf;
  EXPECT_EQ(p.err_buf.find("sent no report"), std::string::npos) << p.err_buf;
  const auto m = metrics_in(json);
  ASSERT_TRUE(m.is_object()) << slurp(json);
  EXPECT_TRUE(m["test_loss"].is_null()) << "the run did not diverge: " << m["test_loss"];
  ASSERT_EQ(m["ranks"].size(), 2u);
  for (const auto& r : m["ranks"]) EXPECT_FALSE(r.is_null()) << m["ranks"].dump();
}

Proc lm(std::vector<std::string> args) {
  std::vector<std::string> argv{bin("asgd-lm"), "--width", "32", "--depth", "2", "--heads", "2",
                                "--context", "32", "--budget-samples", "64"};
  argv.insert(argv.end(), args.begin(), args.end());
  return testing::run(argv, {}, 60s);
}

TEST(AsgdLmBadInput, MissingDataIsOneLine) {
  Proc p = lm({"--data", "/nonexistent/fortunes"});
  EXPECT_EQ(p.exit_code, 1);
  EXPECT_NE(p.err_buf.find("asgd-lm: error: --data /nonexistent/fortunes: no such file or directory"),
            std::string::npos)
      << p.err_buf;
}

TEST(AsgdLmBadInput, HeadsThatDoNotDivideTheWidth) {
  Proc p = testing::run({bin("asgd-lm"), "--width", "32", "--heads", "3", "--budget-samples", "64"}, {}, 60s);
  EXPECT_EQ(p.exit_code, 1);
  EXPECT_NE(p.err_buf.find("asgd-lm: error: --heads 3 does not divide --width 32"), std::string::npos)
      << p.err_buf;
}

TEST(AsgdLmBadInput, ALabelPartitionOfSequencesIsRefused) {
  Proc p = lm({"--partition", "by-label"});
  EXPECT_EQ(p.exit_code, 2);
  EXPECT_NE(p.err_buf.find("by-label needs one label per sample, and asgd-lm's samples are sequences"),
            std::string::npos)
      << p.err_buf;
}

TEST(AsgdLmBadInput, OneTargetAtATime) {
  Proc p = lm({"--target-loss", "2", "--target-accuracy", "0.5"});
  EXPECT_EQ(p.exit_code, 2);
  EXPECT_NE(p.err_buf.find("give one target: --target-accuracy or --target-loss"), std::string::npos)
      << p.err_buf;
}

}  // namespace
}  // namespace torch_asgd
