// End-to-end tests: real processes on loopback, started by asgd-launch or directly.
#include <gtest/gtest.h>

#include <algorithm>
#include <regex>

#include "process.h"

namespace torch_asgd {
namespace {

using namespace std::chrono_literals;
using testing::Proc;

std::string peer() { return testing::bin_dir() + "/asgd-test-peer"; }
std::string launcher() { return testing::bin_dir() + "/asgd-launch"; }

using testing::rank_env;

class LaunchedExchange : public ::testing::TestWithParam<int> {};

TEST_P(LaunchedExchange, EveryRankReceivesEverythingIntact) {
  const int n = GetParam();
  Proc p = testing::run({launcher(), "--nproc", std::to_string(n), "--master-port", "0", "--",
                         peer(), "exchange"},
                        {}, 180s);
  ASSERT_FALSE(p.timed_out) << p.out_buf << p.err_buf;
  EXPECT_EQ(p.exit_code, 0) << p.out_buf << p.err_buf;
  for (int r = 0; r < n; ++r) {
    std::string line = "[" + std::to_string(r) + "]: rank " + std::to_string(r) + " received " +
                       std::to_string(4 * (n - 1)) + " messages, 0 wrong, closed cleanly";
    EXPECT_NE(p.out_buf.find(line), std::string::npos) << line << "\n" << p.out_buf << p.err_buf;
  }
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, LaunchedExchange, ::testing::Values(1, 2, 3, 4, 5));

// The same program, started the way srun and mpirun start ranks.
TEST(OtherLaunchers, SlurmAndOpenMpiVariables) {
  for (const std::string launcher : {"slurm", "openmpi"}) {
    const int port = testing::free_port();
    std::vector<Proc> procs;
    for (int r = 0; r < 3; ++r) {
      std::map<std::string, std::string> env;
      if (launcher == "slurm") {
        env = {{"SLURM_PROCID", std::to_string(r)}, {"SLURM_NTASKS", "3"},
               {"SLURM_LOCALID", std::to_string(r)}, {"SLURM_NTASKS_PER_NODE", "3"},
               {"SLURM_JOB_NODELIST", "localhost"}, {"SLURM_JOB_ID", "77"},
               {"MASTER_PORT", std::to_string(port)}};
      } else {
        env = {{"OMPI_COMM_WORLD_RANK", std::to_string(r)}, {"OMPI_COMM_WORLD_SIZE", "3"},
               {"OMPI_COMM_WORLD_LOCAL_RANK", std::to_string(r)},
               {"OMPI_COMM_WORLD_LOCAL_SIZE", "3"}, {"MASTER_PORT", std::to_string(port)}};
      }
      env["TORCH_ASGD_TIMEOUT"] = "30";
      procs.push_back(testing::start({peer(), "connect"}, env));
    }
    for (int r = 0; r < 3; ++r) {
      testing::finish(procs[r], 90s);
      EXPECT_EQ(procs[r].exit_code, 0) << launcher << " rank " << r << ": " << procs[r].err_buf;
      EXPECT_NE(procs[r].out_buf.find("connected " + std::to_string(r) + "/3"), std::string::npos)
          << launcher << ": " << procs[r].out_buf;
    }
  }
}

TEST(BadEnvironment, RankNotBelowWorldSize) {
  Proc p = testing::run({peer()}, rank_env(2, 2, 29999), 60s);
  EXPECT_EQ(p.exit_code, 1);
  EXPECT_NE(p.err_buf.find("RANK=2 is out of range for WORLD_SIZE=2 (from torchrun)"),
            std::string::npos)
      << p.err_buf;
}

TEST(BadEnvironment, MissingMasterAddr) {
  auto env = rank_env(1, 2, 29999);
  env.erase("MASTER_ADDR");
  Proc p = testing::run({peer()}, env, 60s);
  EXPECT_EQ(p.exit_code, 1);
  EXPECT_NE(p.err_buf.find("rank 1: MASTER_ADDR is not set"), std::string::npos) << p.err_buf;
}

// A program run under a launcher that gives its optimizer no World takes the
// launcher's, not a world of one: the ranks train together, from rank 0's parameters.
TEST(DefaultWorld, AnOptimizerGivenNoWorldTakesTheLaunchersFromRankZerosStart) {
  Proc p = testing::run({testing::bin_dir() + "/asgd-launch", "--nproc", "3", "--master-port", "0", "--",
                         peer(), "default-world", "40"},
                        {}, 120s);
  ASSERT_FALSE(p.timed_out) << p.out_buf << p.err_buf;
  EXPECT_EQ(p.exit_code, 0) << p.out_buf << p.err_buf;
  for (int r = 0; r < 3; ++r) {
    EXPECT_NE(p.out_buf.find("[" + std::to_string(r) + "]: default world 3"), std::string::npos) << p.out_buf;
    EXPECT_NE(p.out_buf.find("[" + std::to_string(r) + "]: final rank " + std::to_string(r) + " max_diff 0 exact"),
              std::string::npos)
        << p.out_buf;
  }
}

TEST(BadEnvironment, UnreachableMaster) {
  const int port = testing::free_port();  // nobody listens there
  Proc p = testing::run({peer()}, rank_env(1, 2, port, "3"), 60s);
  EXPECT_FALSE(p.timed_out);
  EXPECT_EQ(p.exit_code, 1);
  EXPECT_NE(p.err_buf.find("rank 1: cannot reach the rendezvous store at MASTER_ADDR=127.0.0.1"),
            std::string::npos)
      << p.err_buf;
  EXPECT_NE(p.err_buf.find("Is rank 0 running"), std::string::npos) << p.err_buf;
  // c10d's retries and socket warnings stay off the terminal: one line, ours.
  EXPECT_EQ(std::count(p.err_buf.begin(), p.err_buf.end(), '\n'), 1) << p.err_buf;
}

// A rank that waits long says whom it waits for, every few seconds, instead of saying
// nothing until its timeout: a rank whose MASTER_PORT is wrong (nobody hosts a store
// there), and a rank 0 whose peer never comes.
TEST(BadEnvironment, ALongWaitSaysWhomItWaitsFor) {
  const int port = testing::free_port();  // nobody listens there
  Proc lost = testing::run({peer()}, rank_env(1, 2, port, "12"), 60s);
  EXPECT_EQ(lost.exit_code, 1);
  EXPECT_NE(lost.err_buf.find("[torch_asgd] rank 1: still no rendezvous store at MASTER_ADDR=127.0.0.1 "
                              "MASTER_PORT=" + std::to_string(port)),
            std::string::npos)
      << lost.err_buf;
  EXPECT_LT(lost.err_buf.find("still no rendezvous store"), lost.err_buf.find("cannot reach"))
      << "said while waiting, before the error:\n" << lost.err_buf;
  Proc alone = testing::run({peer()}, rank_env(0, 3, testing::free_port(), "8"), 60s);
  EXPECT_EQ(alone.exit_code, 1);
  EXPECT_NE(alone.err_buf.find("[torch_asgd] rank 0: rendezvous: waiting for ranks [1, 2] of WORLD_SIZE=3"),
            std::string::npos)
      << alone.err_buf;
}

TEST(BadEnvironment, UnresolvableMasterAddrIsOneLine) {
  auto env = rank_env(1, 2, testing::free_port(), "300");
  env["MASTER_ADDR"] = "nosuchhost.invalid";
  Proc p = testing::run({peer()}, env, 60s);
  EXPECT_FALSE(p.timed_out);
  EXPECT_EQ(p.exit_code, 1);
  EXPECT_NE(p.err_buf.find("rank 1: MASTER_ADDR=nosuchhost.invalid does not resolve"), std::string::npos)
      << p.err_buf;
  EXPECT_EQ(std::count(p.err_buf.begin(), p.err_buf.end(), '\n'), 1) << p.err_buf;
}

TEST(BadEnvironment, PortInUse) {
  // Someone else listens on the port rank 0 should host the store on.
  int fd = ::socket(AF_INET6, SOCK_STREAM, 0);
  int v6only = 0;
  ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only));
  sockaddr_in6 a{};
  a.sin6_family = AF_INET6;
  a.sin6_addr = in6addr_any;
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(::listen(fd, 4), 0);
  socklen_t len = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  const int port = ntohs(a.sin6_port);
  Proc p = testing::run({peer()}, rank_env(0, 2, port, "3"), 60s);
  ::close(fd);
  EXPECT_FALSE(p.timed_out);
  EXPECT_EQ(p.exit_code, 1);
  EXPECT_NE(p.err_buf.find("rank 0: cannot host the rendezvous store on 127.0.0.1:" +
                           std::to_string(port)),
            std::string::npos)
      << p.err_buf;
  EXPECT_NE(p.err_buf.find("Pick another MASTER_PORT"), std::string::npos) << p.err_buf;
}

TEST(BadEnvironment, MissingRankIsNamed) {
  const int port = testing::free_port();
  Proc p = testing::run({peer()}, rank_env(0, 3, port, "3"), 60s);
  EXPECT_FALSE(p.timed_out);
  EXPECT_EQ(p.exit_code, 1);
  EXPECT_NE(p.err_buf.find("rank 0: rendezvous timed out after 3 s: ranks [1, 2] of WORLD_SIZE=3 "
                           "did not arrive"),
            std::string::npos)
      << p.err_buf;
}

TEST(Fingerprint, MismatchedModelsFailOnEveryRank) {
  Proc p = testing::run({launcher(), "--nproc", "3", "--master-port", "0", "--", peer(),
                         "mismatch"},
                        {}, 120s);
  EXPECT_EQ(p.exit_code, 1);
  for (int r = 0; r < 3; ++r) {
    std::string prefix = "[" + std::to_string(r) + "]: error: rank " + std::to_string(r) +
                         ": ranks disagree on what they exchange";
    EXPECT_NE(p.err_buf.find(prefix), std::string::npos) << prefix << "\n" << p.err_buf;
  }
  EXPECT_NE(p.err_buf.find("parameter 'fc1.weight' has shape [50, 320] here but [50, 321] on "
                           "rank 1"),
            std::string::npos)
      << p.err_buf;
}

TEST(SlowReceiver, StoppedReceiverNeitherSlowsTheSenderNorGrowsItsMemory) {
  // Rank 1 is stopped with SIGSTOP while rank 0 sends 2000 additive deltas of 1 MB
  // (2 GB if they queued). Rank 0 must finish its sends (it never waits for the
  // network), coalesce nearly all of them, and not grow after its first 100 sends
  // (start-up costs such as thread stacks are not the backlog); after SIGCONT rank 1
  // must receive exactly the sum of everything sent.
  const int kSends = 2000;
  const int64_t kBytes = 1 << 20;
  const int port = testing::free_port();
  Proc sender = testing::start({peer(), "flood", std::to_string(kSends), std::to_string(kBytes)},
                               rank_env(0, 2, port));
  Proc receiver = testing::start({peer(), "flood", std::to_string(kSends), std::to_string(kBytes)},
                                 rank_env(1, 2, port));
  ASSERT_TRUE(testing::wait_for_output(receiver, "ready 1", 60s)) << receiver.err_buf;
  ASSERT_TRUE(testing::wait_for_output(sender, "ready 0", 60s)) << sender.err_buf;
  ::kill(receiver.pid, SIGSTOP);
  testing::write_stdin(sender, "go\n");
  const bool sent = testing::wait_for_output(sender, "rss_growth_kb", 120s);
  ::kill(receiver.pid, SIGCONT);
  ASSERT_TRUE(sent) << "the sender blocked on a stopped receiver\n" << sender.err_buf;

  std::smatch m;
  std::regex re("transmitted (\\d+) coalesced (\\d+) rss_start_kb -?\\d+ rss_growth_kb (-?\\d+)");
  ASSERT_TRUE(std::regex_search(sender.out_buf, m, re)) << sender.out_buf;
  const long transmitted = std::stol(m[1]);
  const long coalesced = std::stol(m[2]);
  const long growth_kb = std::stol(m[3]);
  RecordProperty("transmitted_while_stopped", std::to_string(transmitted));
  RecordProperty("rss_growth_kb", std::to_string(growth_kb));
  EXPECT_GE(coalesced, kSends - 8) << "sends waited instead of coalescing";
  EXPECT_LT(growth_kb, 4 * kBytes / 1024) << "sender memory grew with the backlog";

  testing::finish(sender, 120s);
  testing::finish(receiver, 120s);
  EXPECT_EQ(sender.exit_code, 0) << sender.out_buf << sender.err_buf;
  EXPECT_EQ(receiver.exit_code, 0) << receiver.out_buf << receiver.err_buf;
  EXPECT_NE(receiver.out_buf.find("received updates 2000 sum exact"), std::string::npos)
      << receiver.out_buf << receiver.err_buf;
}

}  // namespace
}  // namespace torch_asgd
