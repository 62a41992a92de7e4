#include <gtest/gtest.h>

#include <signal.h>

#include <cstring>
#include <fstream>
#include <regex>
#include <stdexcept>
#include <thread>

#include "process.h"
#include "torch_asgd/launch/launcher.h"

namespace torch_asgd {
namespace {

using namespace std::chrono_literals;
using launch::parse_args;
using testing::Proc;

std::string launcher() { return testing::bin_dir() + "/asgd-launch"; }

// `pid` is still our `sleep` (or the shell about to exec it) and not yet dead. A killed
// process closes its pipes before it is a zombie ("Z" after the name), so callers give a
// killed one time to get there.
bool sleeping(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  for (const char* name : {"(sleep) ", "(sh) "}) {
    const auto at = line.find(name);
    if (at != std::string::npos) return line.compare(at + std::strlen(name), 1, "Z") != 0;
  }
  return false;
}

// The pids printed as "<label> <pid>"; each one that is still sleeping 30 s on (an event,
// not a bound: an unkilled sleep lives for 120 s) is killed here and counted.
std::pair<int, int> found_and_running(const std::string& out, const std::string& label) {
  std::regex re(label + " (\\d+)");
  int found = 0, running = 0;
  for (std::sregex_iterator it(out.begin(), out.end(), re), end; it != end; ++it) {
    const pid_t pid = static_cast<pid_t>(std::stol((*it)[1]));
    ++found;
    const auto give_up = std::chrono::steady_clock::now() + 30s;
    while (sleeping(pid) && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(10ms);
    }
    if (sleeping(pid)) {
      ++running;
      ::kill(pid, SIGKILL);
    }
  }
  return {found, running};
}

TEST(LauncherArgs, Parses) {
  auto o = parse_args({"--nproc", "4", "--nnodes", "2", "--node-rank", "1", "--master-addr",
                       "10.0.0.1", "--master-port", "1234", "--fail-fast", "--", "prog", "--x"});
  EXPECT_EQ(o.nproc, 4);
  EXPECT_EQ(o.nnodes, 2);
  EXPECT_EQ(o.node_rank, 1);
  EXPECT_EQ(o.master_addr, "10.0.0.1");
  EXPECT_EQ(o.master_port, 1234);
  EXPECT_TRUE(o.fail_fast);
  EXPECT_EQ(o.command, (std::vector<std::string>{"prog", "--x"}));
  // torchrun style, without "--".
  EXPECT_EQ(parse_args({"--nproc_per_node", "2", "prog", "--nproc", "9"}).command,
            (std::vector<std::string>{"prog", "--nproc", "9"}));
}

TEST(LauncherArgs, RejectsBadArguments) {
  EXPECT_THROW(parse_args({"--", "prog"}), std::invalid_argument);           // no --nproc
  EXPECT_THROW(parse_args({"--nproc", "0", "prog"}), std::invalid_argument);  // out of range
  EXPECT_THROW(parse_args({"--nproc", "x", "prog"}), std::invalid_argument);
  EXPECT_THROW(parse_args({"--nproc", "2"}), std::invalid_argument);  // no program
  EXPECT_THROW(parse_args({"--nproc", "2", "--bogus", "prog"}), std::invalid_argument);
  EXPECT_THROW(parse_args({"--nproc", "2", "--nnodes", "2", "--node-rank", "2", "prog"}),
               std::invalid_argument);
  EXPECT_THROW(parse_args({"--nproc", "2", "--nnodes", "2", "--master-port", "0", "prog"}),
               std::invalid_argument);
}

// --master-port 0's port lies below the ephemeral range, where no other process's
// connection or bind(0) is handed it before rank 0's store listens, and is free.
TEST(FreePort, LiesBelowTheEphemeralRangeAndCanBeBound) {
  std::ifstream range("/proc/sys/net/ipv4/ip_local_port_range");
  int low = 0, high = 0;
  if (!(range >> low >> high)) GTEST_SKIP() << "the ephemeral port range cannot be read here";
  if (std::min(low, 30000) < 11000) GTEST_SKIP() << "no room below the ephemeral range (" << low << ")";
  for (int i = 0; i < 20; ++i) {
    const int port = launch::free_port();
    EXPECT_GE(port, 10000);
    EXPECT_LT(port, low) << "a port of the ephemeral range " << low << "-" << high;
    EXPECT_EQ(launch::try_bind(port), port);
  }
}

TEST(Launcher, BadArgumentsExitTwoWithUsage) {
  Proc p = testing::run({launcher(), "--nproc", "0", "--", "/bin/true"});
  EXPECT_EQ(p.exit_code, 2);
  EXPECT_NE(p.err_buf.find("--nproc '0' must be an integer between 1 and 4096"), std::string::npos);
  EXPECT_NE(p.err_buf.find("usage: asgd-launch"), std::string::npos);
}

TEST(Launcher, SetsTorchrunVariablesAndPrefixesLines) {
  Proc p = testing::run({launcher(), "--nproc", "2", "--nnodes", "2", "--node-rank", "1",
                         "--master-addr", "10.9.8.7", "--master-port", "4567", "--job-id", "J",
                         "--", "/bin/sh", "-c",
                         "echo $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $GROUP_RANK "
                         "$MASTER_ADDR $MASTER_PORT $TORCHELASTIC_RUN_ID; printf partial; "
                         "echo to-stderr >&2"});
  EXPECT_EQ(p.exit_code, 0) << p.err_buf;
  EXPECT_NE(p.out_buf.find("[2]: 2 4 0 2 1 10.9.8.7 4567 J\n"), std::string::npos) << p.out_buf;
  EXPECT_NE(p.out_buf.find("[3]: 3 4 1 2 1 10.9.8.7 4567 J\n"), std::string::npos) << p.out_buf;
  EXPECT_NE(p.out_buf.find("[3]: partial\n"), std::string::npos) << p.out_buf;
  EXPECT_NE(p.err_buf.find("[2]: to-stderr\n"), std::string::npos) << p.err_buf;
}

// glibc's malloc thresholds are fixed for the ranks unless the user set them or asked
// for glibc's defaults.
TEST(Launcher, FixesMallocThresholdsUnlessSetOrTurnedOff) {
  const std::vector<std::string> show{"--", "/bin/sh", "-c",
                                      "echo mmap=${MALLOC_MMAP_THRESHOLD_-unset} trim=${MALLOC_TRIM_THRESHOLD_-unset}"};
  auto with = [&](std::vector<std::string> argv) {
    argv.insert(argv.begin(), {launcher(), "--nproc", "1"});
    argv.insert(argv.end(), show.begin(), show.end());
    return argv;
  };
  Proc p = testing::run(with({}));
  EXPECT_NE(p.out_buf.find("[0]: mmap=1073741824 trim=4294967296\n"), std::string::npos) << p.out_buf;
  p = testing::run(with({"--default-malloc"}));
  EXPECT_NE(p.out_buf.find("[0]: mmap=unset trim=unset\n"), std::string::npos) << p.out_buf;
  p = testing::run(with({}), {{"MALLOC_MMAP_THRESHOLD_", "65536"}});
  EXPECT_NE(p.out_buf.find("[0]: mmap=65536 trim=4294967296\n"), std::string::npos) << p.out_buf;
}

TEST(Launcher, ExitsWithTheFirstNonZeroCode) {
  Proc p = testing::run({launcher(), "--nproc", "3", "--", "/bin/sh", "-c",
                         "if [ $RANK = 2 ]; then exit 7; fi; sleep 1; exit $((RANK + 3))"});
  EXPECT_EQ(p.exit_code, 7);
  EXPECT_NE(p.err_buf.find("asgd-launch: rank 2 exited with code 7"), std::string::npos);
  EXPECT_NE(p.err_buf.find("asgd-launch: rank 0 exited with code 3"), std::string::npos)
      << "without --fail-fast the others run to their end";
  Proc ok = testing::run({launcher(), "--nproc", "2", "--", "/bin/true"});
  EXPECT_EQ(ok.exit_code, 0);
}

TEST(Launcher, ReportsARankKilledBySignal) {
  Proc p = testing::run({launcher(), "--nproc", "2", "--", "/bin/sh", "-c",
                         "if [ $RANK = 1 ]; then kill -9 $$; fi"});
  EXPECT_EQ(p.exit_code, 128 + 9);
  EXPECT_NE(p.err_buf.find("rank 1 was killed by signal 9"), std::string::npos) << p.err_buf;
}

TEST(Launcher, FailFastTerminatesTheOthers) {
  Proc p = testing::run({launcher(), "--nproc", "3", "--fail-fast", "--", "/bin/sh", "-c",
                         "if [ $RANK = 1 ]; then exit 3; fi; sleep 60 & wait"},
                        {}, 30s);
  EXPECT_FALSE(p.timed_out) << "the other ranks were not terminated";
  EXPECT_EQ(p.exit_code, 3);
  EXPECT_NE(p.err_buf.find("--fail-fast: terminating the other ranks"), std::string::npos);
}

TEST(Launcher, ForwardsSigterm) {
  Proc p = testing::start({launcher(), "--nproc", "2", "--", "/bin/sh", "-c",
                           "trap 'echo got-term; exit 5' TERM; echo up; sleep 60 & wait"});
  ASSERT_TRUE(testing::wait_for_output(p, "[1]: up", 20s));
  ASSERT_TRUE(testing::wait_for_output(p, "[0]: up", 20s));
  ::kill(p.pid, SIGTERM);
  testing::finish(p, 30s);
  EXPECT_FALSE(p.timed_out);
  EXPECT_NE(p.out_buf.find("[0]: got-term"), std::string::npos) << p.out_buf;
  EXPECT_NE(p.out_buf.find("[1]: got-term"), std::string::npos) << p.out_buf;
  EXPECT_EQ(p.exit_code, 5);
}

TEST(Launcher, LeftoverBackgroundProcessesDoNotKeepItWaiting) {
  // A rank exits but leaves a background process holding its output pipe. The launcher
  // must not wait for it (it would for 120 s, past this run's 60 s limit): once the ranks
  // are gone it ends what is left of their process groups, and returns.
  Proc p = testing::run({launcher(), "--nproc", "2", "--", "/bin/sh", "-c",
                         "sleep 120 & echo background $!; echo done"},
                        {}, 60s);
  EXPECT_FALSE(p.timed_out) << "the launcher waited for its ranks' background processes";
  EXPECT_EQ(p.exit_code, 0);
  const auto [found, running] = found_and_running(p.out_buf, "background");
  EXPECT_EQ(found, 2) << p.out_buf;
  EXPECT_EQ(running, 0) << "the launcher left its ranks' background processes running";
}

TEST(Launcher, KilledOutrightItTakesItsRanksWithIt) {
  // SIGKILL gives the launcher no chance to forward anything; its ranks, each in its own
  // process group, must still not outlive it.
  Proc p = testing::start({launcher(), "--nproc", "2", "--", "/bin/sh", "-c",
                           "echo rank $$; exec sleep 120"});
  ASSERT_TRUE(testing::wait_for_output(p, "[0]: rank ", 20s));
  ASSERT_TRUE(testing::wait_for_output(p, "[1]: rank ", 20s));
  ::kill(p.pid, SIGKILL);
  testing::finish(p, 30s);
  const auto [found, running] = found_and_running(p.out_buf, "rank");
  EXPECT_EQ(found, 2) << p.out_buf;
  EXPECT_EQ(running, 0) << "ranks outlived their launcher";
}

TEST(Launcher, MissingProgram) {
  Proc p = testing::run({launcher(), "--nproc", "1", "--", "/no/such/program"});
  EXPECT_EQ(p.exit_code, 127);
  EXPECT_NE(p.err_buf.find("cannot run '/no/such/program'"), std::string::npos) << p.err_buf;
}

}  // namespace
}  // namespace torch_asgd
