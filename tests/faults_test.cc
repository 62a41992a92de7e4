// Faults injected into real processes on loopback: a stalled peer, a dead worker,
// stray connections, jobs killed and resumed from checkpoints, and bad checkpoints.
// (A killed DASGD peer and a killed parameter server are in examples_test.cc.)
#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include <fmt/format.h>

#include "common/checkpoint.h"
#include "example_data.h"
#include "process.h"
#include "testing.h"

namespace torch_asgd {
namespace {

using namespace std::chrono_literals;
using testing::Proc;

struct Tick {
  long ms, step, rss_kb;
  unsigned long held;
};

std::vector<Tick> ticks(const std::string& out) {
  std::vector<Tick> t;
  std::istringstream in(out);
  std::string line;
  while (std::getline(in, line)) {
    Tick k{};
    if (std::sscanf(line.c_str(), "tick %ld %ld %ld %lu", &k.ms, &k.step, &k.rss_kb, &k.held) == 4) t.push_back(k);
  }
  return t;
}

long now_ms() {
  return static_cast<long>(std::chrono::duration_cast<std::chrono::milliseconds>(
                               std::chrono::steady_clock::now().time_since_epoch())
                               .count());
}

// Steps per second of the ticks within [from, to] (steady-clock ms).
double rate(const std::vector<Tick>& t, long from, long to) {
  const Tick* first = nullptr;
  const Tick* last = nullptr;
  for (const auto& k : t) {
    if (k.ms < from || k.ms > to) continue;
    if (first == nullptr) first = &k;
    last = &k;
  }
  if (first == nullptr || last == first) return 0;
  return 1000.0 * static_cast<double>(last->step - first->step) / static_cast<double>(last->ms - first->ms);
}

std::vector<Proc> start_training(int n, const std::string& steps, const std::string& numel) {
  return testing::start_ranks(n, {bin("asgd-test-peer"), "train", steps, numel}, "60");
}

// The step of a rank's last tick, reading its output meanwhile; -1 before any tick.
long last_step(Proc& p) {
  testing::pump(p, 0);
  const auto t = ticks(p.out_buf);
  return t.empty() ? -1 : t.back().step;
}

// A peer stopped with SIGSTOP: the others take 600 steps each while it is stopped (they
// could not if either waited for it), what they keep for it stays two messages at most,
// and after SIGCONT every replica ends exactly equal to the sum of every rank's every
// update.
TEST(StalledPeer, NobodySlowsDownMemoryStaysBoundedNoUpdateIsLost) {
  auto ranks = start_training(3, "3000", "1000000");  // 4 MB of parameters
  // Past the start-up, rank 0 at step 400 (a tick is "tick <ms> <step> <rss>").
  ASSERT_TRUE(testing::wait_for_output(ranks[0], " 400 ", 60s)) << ranks[0].err_buf;
  const long stop_at = now_ms();
  ::kill(ranks[2].pid, SIGSTOP);
  std::vector<long> stopped_at = {last_step(ranks[0]), last_step(ranks[1])};
  auto went_on_by = [&](int r) { return last_step(ranks[r]) >= stopped_at[r] + 600; };
  const bool went_on = testing::eventually([&] { return went_on_by(0) && went_on_by(1); }, 90s);
  const long cont_at = now_ms();
  const std::vector<long> cont_steps = {last_step(ranks[0]), last_step(ranks[1])};
  ::kill(ranks[2].pid, SIGCONT);
  ASSERT_TRUE(went_on) << "ranks 0 and 1 stopped at steps " << cont_steps[0] << " and "
                       << cont_steps[1] << " (from " << stopped_at[0] << " and " << stopped_at[1]
                       << ") while rank 2 was stopped: they waited for it";
  for (auto& p : ranks) testing::finish(p, 120s);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(ranks[r].exit_code, 0) << "rank " << r << ": " << ranks[r].out_buf.substr(
                                            ranks[r].out_buf.rfind("final") == std::string::npos
                                                ? 0 : ranks[r].out_buf.rfind("final"))
                                     << ranks[r].err_buf;
    EXPECT_NE(ranks[r].out_buf.find("exact"), std::string::npos) << "rank " << r;
  }
  for (int r = 0; r < 2; ++r) {
    const auto t = ticks(ranks[r].out_buf);
    // For the record only: the pace before and during the stall.
    RecordProperty("rank" + std::to_string(r) + "_steps_per_s_before",
                   std::to_string(rate(t, stop_at - 1500, stop_at)));
    RecordProperty("rank" + std::to_string(r) + "_steps_per_s_stalled",
                   std::to_string(rate(t, stop_at, cont_at)));
    // What the channel keeps for one peer, counted by the channel: a stopped peer holds
    // the message in flight to it and the one sum of everything sent since, never more
    // (holding every missed delta would be 4 MB a step, ~600 MB over the stall).
    const unsigned long model = 4000000;
    unsigned long held_max = 0;
    long peak_before = -1, peak_during = -1;
    for (const auto& k : t) {
      if (k.ms > stop_at && k.ms <= cont_at) {
        held_max = std::max(held_max, k.held);
        peak_during = std::max(peak_during, k.rss_kb);
      }
      if (k.ms > stop_at - 2000 && k.ms <= stop_at) peak_before = std::max(peak_before, k.rss_kb);
    }
    EXPECT_LE(held_max, 2 * model) << "rank " << r << " kept more than two messages for a peer";
    EXPECT_GE(held_max, model) << "rank " << r << ": nothing held for the stopped peer (was it stopped?)";
    // RSS, for the record: frames come and go, and the allocator keeps some.
    RecordProperty("rank" + std::to_string(r) + "_rss_growth_kb", std::to_string(peak_during - peak_before));
  }
}

// The TCP ports a process listens on, from /proc.
std::vector<int> listening_ports(pid_t pid) {
  std::set<std::string> inodes;
  const std::string fd_dir = "/proc/" + std::to_string(pid) + "/fd";
  if (DIR* d = ::opendir(fd_dir.c_str())) {
    while (dirent* e = ::readdir(d)) {
      char target[256];
      const ssize_t n = ::readlink((fd_dir + "/" + e->d_name).c_str(), target, sizeof(target) - 1);
      if (n <= 0) continue;
      const std::string t(target, static_cast<size_t>(n));
      if (t.rfind("socket:[", 0) == 0) inodes.insert(t.substr(8, t.size() - 9));
    }
    ::closedir(d);
  }
  std::vector<int> ports;
  for (const char* table : {"tcp", "tcp6"}) {
    std::istringstream tcp(slurp("/proc/" + std::to_string(pid) + "/net/" + table));
    std::string line;
    std::getline(tcp, line);  // header
    while (std::getline(tcp, line)) {
      std::istringstream f(line);
      std::string sl, local, remote, state, queues, timer, retr, uid, timeout, inode;
      f >> sl >> local >> remote >> state >> queues >> timer >> retr >> uid >> timeout >> inode;
      if (state == "0A" && inodes.count(inode) > 0) {
        ports.push_back(std::stoi(local.substr(local.rfind(':') + 1), nullptr, 16));
      }
    }
  }
  return ports;
}

// Connects to 127.0.0.1:port; -1 if nobody listens.
int connect_to(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Processes that are not part of the job connect to every port the ranks listen on
// while they train: some send garbage and hang up, some send nothing and stay. The job
// finishes anyway, every replica exact.
TEST(StrayConnections, AreRefusedWithoutDisturbingTheJob) {
  auto ranks = start_training(3, "1500", "100000");
  ASSERT_TRUE(testing::wait_for_output(ranks[0], " 100 ", 60s)) << ranks[0].err_buf;
  std::vector<int> ports = listening_ports(ranks[0].pid);
  for (int p : listening_ports(ranks[1].pid)) ports.push_back(p);
  // Gloo (Debian's 2022 release) listens only while its pairs connect; once the job
  // runs, rank 0's store is what a stray process can reach.
  ASSERT_GE(ports.size(), 1u) << "found no listening ports";
  std::vector<int> idle;
  uint32_t x = 12345;
  for (int p : ports) {
    for (int k = 0; k < 3; ++k) {
      const int fd = connect_to(p);
      if (fd < 0) continue;
      if (k == 2) {
        idle.push_back(fd);  // connected, silent, kept open
        continue;
      }
      std::vector<uint8_t> junk(k == 0 ? 16 : 100000);
      for (auto& b : junk) b = static_cast<uint8_t>((x = x * 1664525u + 1013904223u) >> 24);
      ssize_t unused = ::send(fd, junk.data(), junk.size(), MSG_NOSIGNAL);
      (void)unused;
      ::close(fd);
    }
  }
  for (auto& p : ranks) testing::finish(p, 120s);
  for (int fd : idle) ::close(fd);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(ranks[r].exit_code, 0) << "rank " << r << ": " << ranks[r].err_buf;
    EXPECT_NE(ranks[r].out_buf.find("exact"), std::string::npos) << "rank " << r;
  }
  RecordProperty("ports_probed", std::to_string(ports.size()));
}

// A rank of the job writes malformed frames straight onto its peers' channel connection
// (garbage, another job's token, a version-1 header) while all of them exchange deltas:
// every frame reaches a decoder, is rejected and counted, and every sum stays exact.
TEST(StrayFrames, ReachTheDecodersAndAreRejectedWithoutDisturbingTheJob) {
  auto ranks = testing::start_ranks(3, {bin("asgd-test-peer"), "hostile", "60"}, "60");
  for (auto& p : ranks) testing::finish(p, 120s);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(ranks[r].exit_code, 0) << "rank " << r << ": " << ranks[r].out_buf << ranks[r].err_buf;
    EXPECT_NE(ranks[r].out_buf.find("sum exact"), std::string::npos) << ranks[r].out_buf;
  }
  // Rank 2 injected 3 frames per peer at rounds 5, 15, ..., 55: 18 each.
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(ranks[r].out_buf.find("rejected 18 "), std::string::npos) << ranks[r].out_buf;
    EXPECT_NE(ranks[r].err_buf.find("protocol version 1"), std::string::npos) << ranks[r].err_buf;
  }
}

// The process of rank `rank` among the children of `parent` (by its RANK variable); -1.
pid_t child_with_rank(pid_t parent, int rank) {
  DIR* d = ::opendir("/proc");
  if (d == nullptr) return -1;
  pid_t found = -1;
  while (dirent* e = ::readdir(d)) {
    const pid_t pid = static_cast<pid_t>(std::atoi(e->d_name));
    if (pid <= 0) continue;
    const std::string stat = slurp("/proc/" + std::to_string(pid) + "/stat");
    const auto close_paren = stat.rfind(')');
    if (close_paren == std::string::npos) continue;
    char state = 0;
    int ppid = 0;
    if (std::sscanf(stat.c_str() + close_paren + 1, " %c %d", &state, &ppid) != 2 || ppid != parent) continue;
    // environ is NUL-separated "NAME=value" entries; put a NUL in front of the first.
    const std::string env = std::string(1, '\0') + slurp("/proc/" + std::to_string(pid) + "/environ");
    const std::string entry = std::string(1, '\0') + "RANK=" + std::to_string(rank) + std::string(1, '\0');
    if (env.find(entry) != std::string::npos) found = pid;
  }
  ::closedir(d);
  return found;
}

// Under asgd-launch (without --fail-fast), a DASGD rank killed mid-run: the others
// finish and rank 0 prints its summary, and the launcher's exit code still reports
// the killed rank (128 + SIGKILL).
TEST(LaunchedJob, AKilledRankLeavesTheOthersRunningAndTheExitCodeReportsIt) {
  const std::string dir = make_mnist_dir("launched_kill", false);
  auto launcher = testing::start(
      {bin("asgd-launch"), "--nproc", "3", "--master-port", "0", "--", bin("asgd-mnist"), "--data",
       dir, "--algo", "dasgd", "--epochs", "150", "--batch-size", "10", "--lr", "0.02",
       "--eval-every", "100000"},
      {{"TORCH_ASGD_TIMEOUT", "30"}});
  ASSERT_TRUE(testing::wait_for_output(launcher, "progress:", 60s)) << launcher.err_buf;
  const pid_t victim = child_with_rank(launcher.pid, 2);
  ASSERT_GT(victim, 0) << "rank 2's process not found";
  ::kill(victim, SIGKILL);
  testing::finish(launcher, 120s);
  EXPECT_FALSE(launcher.timed_out);
  EXPECT_EQ(launcher.exit_code, 128 + SIGKILL) << launcher.out_buf << launcher.err_buf;
  const std::string all = launcher.out_buf + launcher.err_buf;
  EXPECT_NE(all.find("asgd-launch: rank 2 was killed by signal 9"), std::string::npos) << all;
  EXPECT_NE(all.find("asgd-mnist: algo=dasgd optimizer=sgd ranks=3"), std::string::npos)
      << "rank 0 did not finish: " << all;
  EXPECT_NE(all.find("failed peers 2"), std::string::npos) << all;
}

// ---- AsGrad: a worker dies --------------------------------------------------------------

TEST(DeadWorker, TheServerStopsAssigningToItAndTrainingEndsNormally) {
  const std::string dir = make_fashion_dir("worker_dies", 6000, 1000);
  const std::string json = dir + "/m.json";
  auto ranks = testing::start_ranks(4,
                                    {bin("asgd-mnist"), "--data", dir, "--algo", "asgd-shuffle",
                                     "--epochs", "4", "--batch-size", "10", "--lr", "0.02",
                                     "--eval-every", "0", "--metrics-out", json},
                                    "30");
  ASSERT_TRUE(testing::wait_for_output(ranks[0], "progress:", 60s)) << ranks[0].err_buf;
  ::kill(ranks[3].pid, SIGKILL);
  for (int r = 0; r < 3; ++r) {
    testing::finish(ranks[r], 180s);
    EXPECT_FALSE(ranks[r].timed_out) << "rank " << r << " hung";
    EXPECT_EQ(ranks[r].exit_code, 0) << "rank " << r << ": " << ranks[r].err_buf;
  }
  testing::finish(ranks[3], 10s);
  ASSERT_EQ(ranks[3].exit_code, 128 + SIGKILL) << "worker 3 finished before the kill";
  const std::string& server = ranks[0].out_buf;
  EXPECT_NE(server.find("worker 3:"), std::string::npos) << server;
  EXPECT_NE(server.find("(failed)"), std::string::npos) << server;
  // The budget, exactly: 4 epochs of 6000 samples / 10, with the two others.
  EXPECT_NE(server.find("ParameterServer rank 0/4: 2400 gradients"), std::string::npos) << server;
  // Every survivor ends above what a healthy run reaches on this data (chance: 0.1).
  const auto acc = rank_accuracies_in(json);
  ASSERT_EQ(acc.size(), 4u) << slurp(json);
  for (int r = 0; r < 3; ++r) EXPECT_GT(acc[r], 0.68) << "rank " << r;
  EXPECT_LT(acc[3], 0) << "the dead worker sent a report";
}

// ---- checkpoints ------------------------------------------------------------------------

// Killed with SIGKILL while it writes a checkpoint (the test hook holds the writer once
// its temporary file is open, so every kill lands mid-write), a rank never leaves a torn
// checkpoint: each time, the previous one reads back whole.
TEST(Checkpoints, AKillMidWriteNeverLeavesATornCheckpoint) {
  const std::string dir = make_mnist_dir("ckpt_atomic", false);
  const std::string ckpt_dir = dir + "/ckpt";
  // A first checkpoint to fall back on.
  auto first = testing::run({bin("asgd-mnist"), "--data", dir, "--algo", "local", "--epochs", "1",
                             "--batch-size", "10", "--checkpoint-dir", ckpt_dir, "--eval-every", "0"});
  ASSERT_EQ(first.exit_code, 0) << first.err_buf;
  int leftovers = 0;
  int64_t last_step = 0;
  for (int round = 0; round < 4; ++round) {
    auto p = testing::start({bin("asgd-mnist"), "--data", dir, "--algo", "local", "--epochs", "1000",
                             "--batch-size", "10", "--checkpoint-dir", ckpt_dir,
                             "--checkpoint-every", "3", "--eval-every", "0", "--resume"},
                            {{"TORCH_ASGD_TEST_CHECKPOINT_PAUSE_MS", "2000"}});
    ASSERT_TRUE(testing::wait_for_error(p, "checkpoint: mid-write", 60s)) << p.err_buf;
    ::kill(p.pid, SIGKILL);
    testing::finish(p, 10s);
    if (DIR* d = ::opendir(ckpt_dir.c_str())) {
      while (dirent* e = ::readdir(d)) leftovers += std::string(e->d_name).find(".tmp-") != std::string::npos;
      ::closedir(d);
    }
    examples::RankCheckpoint ckpt(ckpt_dir, 0);  // removes the leftover
    torch::serialize::InputArchive a;
    int64_t step = -1;
    EXPECT_NO_THROW(step = ckpt.read(a, {"local", 1, 0, 0})) << "round " << round;
    EXPECT_GE(step, last_step) << "round " << round;
    last_step = step;
  }
  EXPECT_EQ(leftovers, 4) << "every kill must have landed mid-write, or this tests nothing";
}

// A job killed as a whole (every rank, or only the parameter server) well into its run,
// then started again with --resume, continues from its checkpoints, exactly: every rank
// goes on from the model the algorithm defines for a resume (the mean of the ranks'
// checkpointed models; the server's own for AsGrad), which the test computes from the
// checkpoints the killed run left, and finishes its run. The fingerprint is linear in
// the model, so a rank that resumed from nothing, from its own replica only, or from
// another checkpoint misses it by far more than float32 rounding. How well an
// asynchronous run ends depends on the schedule, so accuracy is asserted only where the
// run is deterministic (sync); the others' are recorded.
class KilledAndResumed : public ::testing::TestWithParam<std::string> {};

namespace {

// The fingerprint a resumed rank printed: "... (model fingerprint X)".
std::optional<double> printed_fingerprint(const std::string& out) {
  const std::string key = "(model fingerprint ";
  const auto at = out.find(key);
  if (at == std::string::npos) return std::nullopt;
  return std::stod(out.substr(at + key.size()));
}

}  // namespace

TEST_P(KilledAndResumed, GoesOnFromTheCheckpointedModelsAndFinishes) {
  const std::string algo = GetParam();
  const bool server_algo = algo.rfind("asgd-", 0) == 0;
  const std::string dir = make_fashion_dir("resume_" + algo, 6000, 1000);
  const int n = 3;
  auto start_job = [&](const std::string& tag, const std::string& ckpt, bool resume) {
    std::vector<std::string> argv = {
        bin("asgd-mnist"), "--data", dir, "--algo", algo, "--epochs", "4", "--batch-size", "10",
        "--lr", "0.02", "--eval-every", "0", "--metrics-out", dir + "/" + tag + ".json",
        "--checkpoint-dir", dir + "/" + ckpt, "--checkpoint-every", "20"};
    if (resume) argv.push_back("--resume");
    return testing::start_ranks(n, argv);
  };
  // An uninterrupted run: the steps a whole run takes (and, for sync, its accuracy).
  auto clean = start_job("clean", "ckpt-clean", false);
  for (auto& p : clean) testing::finish(p, 180s);
  for (auto& p : clean) ASSERT_EQ(p.exit_code, 0) << p.err_buf;
  const double clean_seconds = clean[0].seconds;

  // Killed as soon as every rank (the AsGrad workers too: they resume their samplers)
  // has written its first checkpoint, at step 20 of 800 (gradient 20 of 2400): mid-run
  // by construction, not by a guess at how long the run takes on a loaded machine.
  auto killed = start_job("killed", "ckpt", false);
  const int writers = n;
  auto all_written = [&] {
    // (stat, not RankCheckpoint: its constructor removes a rank's half-written file)
    for (int r = 0; r < writers; ++r) {
      struct stat st {};
      if (::stat((dir + "/ckpt/rank-" + std::to_string(r) + ".pt").c_str(), &st) != 0) return false;
    }
    return true;
  };
  ASSERT_TRUE(testing::eventually(all_written, 120s)) << killed[0].err_buf;
  if (server_algo) {
    ::kill(killed[0].pid, SIGKILL);  // the workers then fail on their own
  } else {
    for (auto& p : killed) ::kill(p.pid, SIGKILL);
  }
  for (auto& p : killed) testing::finish(p, 60s);
  // The kill landed mid-run (else this would test nothing).
  if (server_algo) {
    ASSERT_EQ(killed[0].exit_code, 128 + SIGKILL) << killed[0].out_buf;
    for (int r = 1; r < n; ++r) EXPECT_EQ(killed[r].exit_code, 1) << killed[r].err_buf;
  } else {
    for (int r = 0; r < n; ++r) ASSERT_EQ(killed[r].exit_code, 128 + SIGKILL) << "rank " << r;
  }
  RecordProperty("clean_run_seconds", std::to_string(clean_seconds));

  // What the killed run left: every rank's checkpointed model, by its fingerprint.
  std::vector<examples::Fingerprint> saved(n);
  for (int r = 0; r < n; ++r) {
    examples::RankCheckpoint ckpt(dir + "/ckpt", r);
    torch::serialize::InputArchive a;
    int64_t step = 0;
    ASSERT_NO_THROW(step = ckpt.read(a, {algo, n, r, 0})) << "rank " << r;
    ASSERT_GT(step, 0) << "rank " << r << " wrote no checkpoint before the kill";
    torch::Tensor f;
    a.read(examples::kFingerprintKey, f);
    saved[r] = {f[0].item<double>(), f[1].item<double>()};
    RecordProperty("checkpoint_fingerprint_" + std::to_string(r), fmt::format("{:.17g}", saved[r].value));
  }
  examples::Fingerprint expected;
  if (server_algo) {
    expected = saved[0];
  } else {
    for (const auto& f : saved) {
      expected.value += f.value / n;
      expected.scale += f.scale / n;
    }
  }

  auto resumed = start_job("resumed", "ckpt", true);
  for (auto& p : resumed) testing::finish(p, 180s);
  std::vector<int64_t> resumed_at(n, 0);
  std::vector<double> resumed_fp(n, 0);
  for (int r = 0; r < n; ++r) {
    EXPECT_EQ(resumed[r].exit_code, 0) << "rank " << r << ": " << resumed[r].err_buf;
    if (server_algo && r > 0) continue;  // workers start from the server's model
    const auto at = resumed[r].out_buf.find(" at step ");
    const auto at_gradient = resumed[r].out_buf.find(" at gradient ");
    const auto pos = at != std::string::npos ? at + 9 : at_gradient != std::string::npos ? at_gradient + 13 : std::string::npos;
    ASSERT_NE(pos, std::string::npos) << "rank " << r << " did not resume: " << resumed[r].out_buf;
    resumed_at[r] = std::stol(resumed[r].out_buf.substr(pos));
    EXPECT_GT(resumed_at[r], 0) << "rank " << r << " resumed from nothing";
    const auto printed = printed_fingerprint(resumed[r].out_buf);
    ASSERT_TRUE(printed.has_value()) << resumed[r].out_buf;
    RecordProperty("resumed_fingerprint_" + std::to_string(r), fmt::format("{:.17g}", *printed));
    // A float32 mean of n models is off by at most a few ulps per element: within 1e-6
    // of the weighted sum of |x|, which bounds it whatever the rounding.
    EXPECT_NEAR(*printed, expected.value, 1e-6 * expected.scale)
        << "rank " << r << " did not go on from the model its checkpoints define";
    resumed_fp[r] = *printed;
  }
  // Replicas resumed from a mean share it bit for bit (DASGD's replicas differ by less
  // than float32 rounding can hide, so this is what tells a mean from a replica's own).
  if (!server_algo) {
    for (int r = 1; r < n; ++r) {
      EXPECT_EQ(resumed_fp[r], resumed_fp[0]) << "rank " << r << " resumed from another model than rank 0";
    }
  }
  // Both runs finished their 4 epochs: each rank's resumed step plus its steps since
  // add up to the clean run's (the server's count includes what it restored).
  const auto m_clean = metrics_in(dir + "/clean.json");
  const auto m_resumed = metrics_in(dir + "/resumed.json");
  ASSERT_TRUE(m_clean.contains("ranks") && m_resumed.contains("ranks"));
  for (int r = 0; r < n; ++r) {
    if (server_algo && r > 0) continue;  // the server's budget is the job's
    const int64_t clean_steps = m_clean["ranks"][r]["steps"].get<int64_t>();
    const int64_t resumed_steps = m_resumed["ranks"][r]["steps"].get<int64_t>();
    EXPECT_EQ((server_algo ? 0 : resumed_at[r]) + resumed_steps, clean_steps) << "rank " << r;
  }
  const auto a_clean = rank_accuracies_in(dir + "/clean.json");
  const auto a_resumed = rank_accuracies_in(dir + "/resumed.json");
  ASSERT_EQ(a_clean.size(), static_cast<size_t>(n));
  ASSERT_EQ(a_resumed.size(), static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) {
    RecordProperty("accuracy_clean_" + std::to_string(r), std::to_string(a_clean[r]));
    RecordProperty("accuracy_resumed_" + std::to_string(r), std::to_string(a_resumed[r]));
    if (algo == "sync") {
      // Sync SGD is deterministic: the same schedule, the same models (up to the step the
      // kill landed at, which only the mean of two checkpoints can move).
      EXPECT_GT(a_clean[r], 0.68) << "rank " << r << " of the clean run";
      EXPECT_NEAR(a_resumed[r], a_clean[r], 0.03) << "rank " << r;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Algos, KilledAndResumed,
                         ::testing::Values("dasgd", "gossip", "sync", "asgd-shuffle"), algo_test_name);

// Bad checkpoints: one clear line naming the file and what is wrong, exit 1.
class BadCheckpoint : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = make_mnist_dir("bad_ckpt", false);
    ckpt_ = dir_ + "/ckpt";
    auto p = testing::run({bin("asgd-mnist"), "--data", dir_, "--algo", "local", "--epochs", "1",
                           "--batch-size", "10", "--checkpoint-dir", ckpt_});
    ASSERT_EQ(p.exit_code, 0) << p.err_buf;
  }
  Proc resume(const std::string& program = "asgd-mnist", const std::string& algo = "local") {
    std::vector<std::string> argv = {bin(program), "--algo", algo, "--epochs", "2",
                                     "--batch-size", "10", "--checkpoint-dir", ckpt_, "--resume"};
    if (program == "asgd-mnist") {
      argv.insert(argv.end(), {"--data", dir_});
    } else {
      argv.insert(argv.end(), {"--synthetic", "200"});
    }
    return testing::run(argv);
  }
  std::string dir_, ckpt_;
};

TEST_F(BadCheckpoint, ResumeFromAFinishedRunContinues) {
  auto p = resume();
  EXPECT_EQ(p.exit_code, 0) << p.err_buf;
  EXPECT_NE(p.out_buf.find("resumed from " + ckpt_ + "/rank-0.pt at step 60"), std::string::npos)
      << p.out_buf;
}

TEST_F(BadCheckpoint, GarbageIsNamedAsCorrupt) {
  write(ckpt_ + "/rank-0.pt", std::vector<uint8_t>(5000, 0x5a), false);
  auto p = resume();
  EXPECT_EQ(p.exit_code, 1);
  EXPECT_NE(p.err_buf.find("checkpoint " + ckpt_ + "/rank-0.pt is unreadable"), std::string::npos)
      << p.err_buf;
}

TEST_F(BadCheckpoint, TruncatedIsNamedAsCorrupt) {
  const std::string path = ckpt_ + "/rank-0.pt";
  const std::string whole = slurp(path);
  ASSERT_GT(whole.size(), 1000u);
  write(path, std::vector<uint8_t>(whole.begin(), whole.begin() + whole.size() / 2), false);
  auto p = resume();
  EXPECT_EQ(p.exit_code, 1);
  EXPECT_NE(p.err_buf.find("is unreadable"), std::string::npos) << p.err_buf;
}

TEST_F(BadCheckpoint, AnotherModelsCheckpointNamesTheDifference) {
  // The CIFAR example's checkpoint, same algorithm and ranks, but another network.
  auto p = resume("asgd-cifar");
  EXPECT_EQ(p.exit_code, 1);
  EXPECT_NE(p.err_buf.find("belongs to another model"), std::string::npos) << p.err_buf;
}

TEST_F(BadCheckpoint, AnotherAlgorithmIsRefused) {
  auto p = resume("asgd-mnist", "dasgd");
  EXPECT_EQ(p.exit_code, 1);
  EXPECT_NE(p.err_buf.find("running --algo local, but this is rank 0 of 1 running --algo dasgd"),
            std::string::npos)
      << p.err_buf;
}

TEST_F(BadCheckpoint, MissingCheckpointIsNamed) {
  ::unlink((ckpt_ + "/rank-0.pt").c_str());
  auto p = resume();
  EXPECT_EQ(p.exit_code, 1);
  EXPECT_NE(p.err_buf.find("there is no checkpoint " + ckpt_ + "/rank-0.pt"), std::string::npos)
      << p.err_buf;
}

}  // namespace
}  // namespace torch_asgd
