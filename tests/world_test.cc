#include <gtest/gtest.h>

#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "process.h"
#include "testing.h"
#include "torch_asgd/comm/error.h"

namespace torch_asgd {
namespace {

using namespace std::chrono_literals;

// Runs ranks `ranks` of a world of `size`, as threads over one store, with a short
// timeout; returns each one's error message.
std::vector<std::string> partial_world(int size, std::vector<int> ranks,
                                       const std::string& job = "test") {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::string> errors(ranks.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < ranks.size(); ++i) {
    threads.emplace_back([&, i] {
      try {
        auto o = testing::thread_world_options(ranks[i], size);
        o.timeout = 2s;
        o.job_id = job;
        World::create(o, store);
      } catch (const std::exception& e) {
        errors[i] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

TEST(World, MissingRanksAreNamed) {
  auto errors = partial_world(4, {0, 2});
  for (size_t i = 0; i < errors.size(); ++i) {
    EXPECT_NE(errors[i].find("rendezvous timed out after 2 s: ranks [1, 3] of WORLD_SIZE=4 did "
                             "not arrive (job 'test')"),
              std::string::npos)
        << errors[i];
  }
}

TEST(World, DuplicateRankIsRefused) {
  auto errors = partial_world(2, {0, 0});
  int duplicates = 0;
  for (const auto& e : errors) {
    duplicates += e.find("another process already joined job 'test' as rank 0") != std::string::npos;
  }
  EXPECT_EQ(duplicates, 1) << errors[0] << "\n" << errors[1];
}

TEST(World, WorldOfOneNeedsNoStore) {
  auto o = testing::thread_world_options(0, 1);
  auto w = World::create(o);
  EXPECT_EQ(w->size(), 1);
  w->barrier("nothing to wait for");
  w->check_fingerprint("anything", Fingerprint());
}

TEST(World, AWriteToADeadPeerIsAnErrorNotAKill) {
  // Writing to a connection whose peer is gone raises SIGPIPE, which by default kills
  // the process: a dead rank must not take its peers down that way.
  auto w = World::create(testing::thread_world_options(0, 1));
  int fds[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  close(fds[1]);
  const char byte = 1;
  errno = 0;
  EXPECT_EQ(write(fds[0], &byte, 1), -1);
  EXPECT_EQ(errno, EPIPE);
  close(fds[0]);
}

TEST(World, AProgramsOwnSigpipeHandlerIsKept) {
  struct sigaction mine {};
  mine.sa_handler = [](int) {};
  ASSERT_EQ(sigaction(SIGPIPE, &mine, nullptr), 0);
  auto w = World::create(testing::thread_world_options(0, 1));
  struct sigaction now {};
  ASSERT_EQ(sigaction(SIGPIPE, nullptr, &now), 0);
  EXPECT_EQ(now.sa_handler, mine.sa_handler);
}

TEST(World, TwoJobsOnOneStoreStayApart) {
  // Two jobs of 2 ranks each meet in the same store at the same time (as two jobs
  // pointed at one MASTER_ADDR:MASTER_PORT would): each forms its own world, and every
  // message a rank receives comes from its own job.
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::string> results(4);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      const int rank = i % 2;
      const std::string job = i < 2 ? "job-a" : "job-b";
      try {
        auto o = testing::thread_world_options(rank, 2);
        o.job_id = job;
        auto w = World::create(o, store);
        ChannelOptions co;
        co.name = "shared-name";
        auto ch = w->open_channel(co);
        Outgoing m;
        m.payload = torch::full({16}, job == "job-a" ? 1.0f : 2.0f);
        ch->send(1 - rank, m);
        std::vector<Message> got;
        for (int k = 0; k < 100 && got.empty(); ++k) got = ch->wait(100ms).messages;
        EXPECT_TRUE(ch->close(10s));
        results[i] = got.size() == 1 ? (got[0].payload[0].item<float>() == 1.0f ? "job-a" : "job-b")
                                     : "nothing";
      } catch (const std::exception& e) {
        results[i] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(results, (std::vector<std::string>{"job-a", "job-a", "job-b", "job-b"}));
}

// Rendezvous over a TCP store that World hosts (rank 0) or joins, at a free port.
WorldOptions tcp_options(int rank, int size, int port, const std::string& job,
                         std::chrono::milliseconds timeout) {
  auto o = testing::thread_world_options(rank, size);
  o.master_addr = "127.0.0.1";
  o.master_port = port;
  o.job_id = job;
  o.timeout = timeout;
  return o;
}

// A TCP store on loopback at `port`, hosted by the test itself (as torchelastic's agent,
// or a rank 0, would host it), waiting for no clients.
c10::intrusive_ptr<c10d::TCPStore> host_store(int port) {
  c10d::TCPStoreOptions o;
  o.port = static_cast<uint16_t>(port);
  o.isServer = true;
  o.waitWorkers = false;
  return c10::make_intrusive<c10d::TCPStore>("127.0.0.1", o);
}

// What World::create(o) threw ("" if it returned), and whether that was a ConfigError.
// A world that was created is kept: a rank's create() may return while its peer is still
// finishing its side of the connection, and a world dropped at once would close that
// connection under the peer (its create() then fails with "Connection closed by peer").
struct CreateError {
  std::string what;
  bool config = false;
  std::shared_ptr<World> world;
};
CreateError create_error(const WorldOptions& o) {
  try {
    return {"", false, World::create(o)};
  } catch (const ConfigError& e) {
    return {e.what(), true};
  } catch (const std::exception& e) {
    return {e.what(), false};
  }
}

// Two jobs on one port: the second job's rank 0 cannot host its store, and its rank 1
// reaches the first job's store. It must say so at once, naming both jobs, and not wait
// for ranks that will never come there, nor count as the first job's rank 1: that one,
// started only after, joins and the first job's rendezvous completes. (Job a's timeout is
// long: nothing here ends by a clock.)
TEST(World, AStoreHostedByAnotherJobIsNamedAtOnce) {
  const int port = testing::free_port();
  CreateError a0;
  std::thread job_a([&] { a0 = create_error(tcp_options(0, 2, port, "job-a", 120s)); });
  const CreateError b = create_error(tcp_options(1, 2, port, "job-b", 120s));
  const CreateError a1 = create_error(tcp_options(1, 2, port, "job-a", 120s));  // kept until a0 is
  job_a.join();
  const std::string& a_error = a0.what;
  const std::string& a1_error = a1.what;
  const std::string& b_error = b.what;
  EXPECT_TRUE(b.config) << "not a ConfigError: " << b_error;
  EXPECT_NE(b_error.find("rank 1: the rendezvous store at MASTER_ADDR=127.0.0.1 MASTER_PORT=" +
                         std::to_string(port) + " is hosted by job 'job-a', not by this job 'job-b'"),
            std::string::npos)
      << b_error;
  EXPECT_EQ(a_error, "") << "job a's rank 0";
  EXPECT_EQ(a1_error, "") << "job a's own rank 1 (was job b's taken for it?)";
}

// The store's host ends while a rank waits in the rendezvous: the wait ends at once with
// what happened, not with a timeout it never reached. The test hosts the store as rank
// 0's World would (owner key and all) and ends it once rank 1 has arrived.
TEST(World, AStoreWhoseHostEndsEndsTheWaitWithWhatHappened) {
  const int port = testing::free_port();
  auto host = host_store(port);
  host->set("torch_asgd.store_owner", std::vector<uint8_t>{'j', 'o', 'b'});
  std::string error;
  std::thread rank1([&] { error = create_error(tcp_options(1, 3, port, "job", 120s)).what; });
  const bool arrived = testing::eventually([&] { return host->check({"torch_asgd/job/arrived/1"}); }, 60s);
  host.reset();  // the host ends
  rank1.join();
  ASSERT_TRUE(arrived) << error;
  EXPECT_NE(error.find("rank 1: the rendezvous store at MASTER_ADDR=127.0.0.1 MASTER_PORT=" +
                       std::to_string(port) + " went away"),
            std::string::npos)
      << error;
  EXPECT_NE(error.find("into the rendezvous (job 'job')"), std::string::npos) << error;
  EXPECT_EQ(error.find("timed out"), std::string::npos) << error;
}

TEST(World, AnUnresolvableMasterAddrIsOneLineAtOnce) {
  auto o = tcp_options(1, 2, testing::free_port(), "job", 120s);
  o.master_addr = "nosuchhost.invalid";
  const CreateError got = create_error(o);
  const std::string& error = got.what;
  EXPECT_TRUE(got.config) << error;
  EXPECT_EQ(error.rfind("rank 1: MASTER_ADDR=nosuchhost.invalid does not resolve (", 0), 0u) << error;
  EXPECT_EQ(error.find('\n'), std::string::npos) << error;
}

TEST(World, BarrierAndCollectivesComplete) {
  testing::spawn(3, [](std::shared_ptr<World> w) {
    w->barrier("one");
    w->barrier("two");
    Fingerprint fp;
    fp.add("w", {3}, c10::kFloat);
    w->check_fingerprint("model", fp);
    EXPECT_EQ(w->local_size(), 3);
  });
}

TEST(World, AgentStoreMakesEveryRankAClient) {
  // torchelastic's agent hosts the store; rank 0 must not try to host it too.
  const int port = testing::free_port();
  auto agent = host_store(port);
  std::vector<std::thread> ranks;
  std::vector<std::string> errors(2);
  for (int r = 0; r < 2; ++r) {
    ranks.emplace_back([&, r] {
      try {
        auto o = testing::thread_world_options(r, 2);
        o.master_addr = "127.0.0.1";
        o.master_port = port;
        o.use_agent_store = true;
        auto w = World::create(o);
        w->barrier("agent");
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (auto& t : ranks) t.join();
  EXPECT_EQ(errors[0], "");
  EXPECT_EQ(errors[1], "");
  EXPECT_TRUE(agent->check({"torch_asgd/test/arrived/0", "torch_asgd/test/arrived/1"}))
      << "the ranks used the agent's store, under the job id";
}

TEST(World, FileStoreRendezvous) {
  char path[] = "/tmp/torch_asgd_filestore_XXXXXX";
  int fd = ::mkstemp(path);
  ASSERT_GE(fd, 0);
  ::close(fd);
  ::unlink(path);
  std::vector<std::thread> ranks;
  std::vector<std::string> errors(3);
  for (int r = 0; r < 3; ++r) {
    ranks.emplace_back([&, r] {
      try {
        auto o = testing::thread_world_options(r, 3);
        o.store_path = path;
        auto w = World::create(o);
        auto ch = w->open_channel(ChannelOptions());
        w->barrier("file");
        ch->close(20s);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (auto& t : ranks) t.join();
  for (const auto& e : errors) EXPECT_EQ(e, "");
  ::unlink(path);
}

TEST(World, BadInterfaceIsAConfigError) {
  auto o = testing::thread_world_options(0, 1);
  o.hostname.clear();
  o.iface = "no-such-if0";
  try {
    World::create(o);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("GLOO_SOCKET_IFNAME"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace torch_asgd
