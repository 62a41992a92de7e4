#include "torch_asgd/comm/world.h"

#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <thread>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "torch_asgd/comm/detail/mesh.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/detail/log.h"
#include "torch_asgd/detail/process.h"

namespace torch_asgd {
namespace {

bool is_loopback(const std::string& addr) {
  return addr.rfind("127.", 0) == 0 || addr == "localhost" || addr == "::1";
}

std::string seconds(std::chrono::milliseconds t) {
  return fmt::format("{:g} s", static_cast<double>(t.count()) / 1000.0);
}

std::string str(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }
std::vector<uint8_t> bytes(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }

// Rank 0, when it hosts the TCP store, writes its job id here (outside every job's
// prefix): a rank that reached another job's store says so at once instead of waiting
// for ranks that will never come there.
const char* const kOwnerKey = "torch_asgd.store_owner";

// Whether a rank hosts or joins a TCP store that World opened itself (not the
// torchelastic agent's, not a FileStore, not one the program passed in).
bool owns_tcp_store(const WorldOptions& o) { return o.store_path.empty() && !o.use_agent_store; }

// The name first: c10d retries an unresolvable host once a second until the timeout,
// logging every try; one line now is what the user needs.
void resolve_master_addr(const WorldOptions& o) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int rc = ::getaddrinfo(o.master_addr.c_str(), nullptr, &hints, &found);
  if (rc != 0) {
    throw ConfigError(fmt::format(
        "rank {}: MASTER_ADDR={} does not resolve ({}): set it to rank 0's host name or IP "
        "address, the same on every rank",
        o.rank, o.master_addr, ::gai_strerror(rc)));
  }
  ::freeaddrinfo(found);
}

// What a store threw, as one short line for a message of ours.
std::string first_line(const std::exception& e) {
  std::string why = e.what();
  return why.substr(0, std::min<size_t>(why.find('\n'), 200));
}

// A rank that waits longer than this says what it waits for, and again every as long.
constexpr std::chrono::seconds kSayEvery{5};

std::string store_address(const WorldOptions& o) {
  if (!o.store_path.empty()) return fmt::format("file store '{}'", o.store_path);
  if (o.master_addr.empty()) return "store";
  return fmt::format("store at MASTER_ADDR={} MASTER_PORT={}", o.master_addr, o.master_port);
}

void claim_or_check_owner(c10d::Store& store, const WorldOptions& o) {
  // What the store throws (its host is gone) becomes one line that says so.
  auto guarded = [&](auto&& call) {
    try {
      return call();
    } catch (const std::exception& e) {
      throw CommError(fmt::format("rank {}: the rendezvous {} went away while this rank joined "
                                  "it: {}. Did rank 0 exit?",
                                  o.rank, store_address(o), first_line(e)));
    }
  };
  if (o.rank == 0) {
    guarded([&] { store.set(kOwnerKey, std::vector<uint8_t>(o.job_id.begin(), o.job_id.end())); });
    return;
  }
  const auto deadline = std::chrono::steady_clock::now() + o.timeout;
  while (!guarded([&] { return store.check({kOwnerKey}); })) {
    if (std::chrono::steady_clock::now() >= deadline) {
      throw CommError(fmt::format(
          "rank {}: the rendezvous {} answers, but no torch_asgd rank 0 claimed it within {}: "
          "is another program's store on this port? Pick another MASTER_PORT",
          o.rank, store_address(o), seconds(o.timeout)));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const auto v = guarded([&] { return store.get(kOwnerKey); });
  const std::string owner(v.begin(), v.end());
  if (owner != o.job_id) {
    throw ConfigError(fmt::format(
        "rank {}: the rendezvous {} is hosted by job '{}', not by this job '{}': another job is "
        "using this port (so this job's rank 0 could not host its store there). Give each job "
        "its own MASTER_PORT",
        o.rank, store_address(o), owner, o.job_id));
  }
}

c10::intrusive_ptr<c10d::Store> open_store(const WorldOptions& o) {
  if (!o.store_path.empty()) {
    try {
      auto s = c10::make_intrusive<c10d::FileStore>(o.store_path, o.world_size);
      s->setTimeout(o.timeout);
      return s;
    } catch (const std::exception& e) {
      throw CommError(fmt::format("rank {}: cannot open the rendezvous file store '{}': {}; is "
                                  "the directory writable and shared by all ranks?",
                                  o.rank, o.store_path, e.what()));
    }
  }
  resolve_master_addr(o);
  c10d::TCPStoreOptions t;
  t.port = static_cast<uint16_t>(o.master_port);
  t.isServer = o.rank == 0 && !o.use_agent_store;
  t.waitWorkers = false;
  auto failed = [&](const std::string& reason) {
    std::string what = reason;
    what = what.substr(0, what.find('\n'));
    while (!what.empty() && (what.back() == '.' || what.back() == ' ')) what.pop_back();
    if (t.isServer) {
      return CommError(fmt::format(
          "rank 0: cannot host the rendezvous store on {}:{}: {}. Is the port in use by another "
          "job? Pick another MASTER_PORT",
          o.master_addr, o.master_port, what));
    }
    return CommError(fmt::format(
        "rank {}: cannot reach the rendezvous store at MASTER_ADDR={} MASTER_PORT={} within {}: "
        "{}. Is {} running, and are MASTER_ADDR/MASTER_PORT the same on every rank?",
        o.rank, o.master_addr, o.master_port, seconds(o.timeout), what,
        o.use_agent_store ? "the torchelastic agent's store" : "rank 0"));
  };
  if (t.isServer) {
    t.timeout = o.timeout;
    try {
      return c10::make_intrusive<c10d::TCPStore>(o.master_addr, t);
    } catch (const std::exception& e) {
      throw failed(e.what());
    }
  }
  // A client tries again until the timeout, and says every kSayEvery whom it waits
  // for, so that a wrong MASTER_PORT does not look like a hang.
  const auto t0 = std::chrono::steady_clock::now();
  const auto deadline = t0 + o.timeout;
  auto next_say = t0 + kSayEvery;
  std::string first_reason;  // a later, shorter try's is less telling
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    t.timeout = std::max(std::chrono::milliseconds(1), std::min<std::chrono::milliseconds>(left, kSayEvery));
    try {
      auto store = c10::make_intrusive<c10d::TCPStore>(o.master_addr, t);
      store->setTimeout(o.timeout);
      return store;
    } catch (const std::exception& e) {
      const auto now = std::chrono::steady_clock::now();
      if (first_reason.empty()) first_reason = e.what();
      if (now >= deadline) throw failed(first_reason);
      if (now >= next_say) {
        detail::log_info(fmt::format(
            "rank {}: still no rendezvous store at MASTER_ADDR={} MASTER_PORT={} after {:.0f} s "
            "(of {}); is {} running, with the same MASTER_PORT?",
            o.rank, o.master_addr, o.master_port, std::chrono::duration<double>(now - t0).count(),
            seconds(o.timeout), o.use_agent_store ? "the torchelastic agent's store" : "rank 0"));
        next_say = now + kSayEvery;
      }
      std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(
          std::chrono::milliseconds(200), deadline - now));
    }
  }
}

}  // namespace

namespace {
// The process's World (from_env(), process_default()). Never destroyed: its connections
// end with the process, not in static destruction.
std::mutex default_mu;
std::shared_ptr<World>& default_world() {
  static auto* made = new std::shared_ptr<World>();
  return *made;
}
}  // namespace

std::shared_ptr<World> World::from_env() {
  std::lock_guard<std::mutex> lock(default_mu);
  if (!default_world()) default_world() = create(WorldOptions::from_env());
  return default_world();
}

std::shared_ptr<World> World::from_env(const WorldOptions& overrides) {
  return create(WorldOptions::from_env().merged_with(overrides));
}

std::shared_ptr<World> World::process_default() {
  {
    std::lock_guard<std::mutex> lock(default_mu);
    if (default_world()) return default_world();
  }
  if (WorldOptions::from_env().world_size < 2) return nullptr;
  return from_env();
}

std::shared_ptr<World> World::create(const WorldOptions& options) {
  options.validate();
  c10::intrusive_ptr<c10d::Store> store;
  if (options.world_size > 1) {
    detail::quiet_c10d_unless_asked();
    store = open_store(options);
    if (owns_tcp_store(options)) claim_or_check_owner(*store, options);
  }
  std::shared_ptr<World> w(new World(options, std::move(store)));
  w->connect();
  return w;
}

std::shared_ptr<World> World::create(const WorldOptions& options,
                                     c10::intrusive_ptr<c10d::Store> store) {
  options.validate(/*store_given=*/true);
  std::shared_ptr<World> w(new World(options, std::move(store)));
  w->connect();
  return w;
}

World::World(WorldOptions options, c10::intrusive_ptr<c10d::Store> store)
    : options_(std::move(options)) {
  detail::ignore_sigpipe_unless_handled();
  if (store) {
    store->setTimeout(options_.timeout);
    store_ = c10::make_intrusive<c10d::PrefixStore>("torch_asgd/" + options_.job_id, store);
  }
}

World::~World() {
  // The connections go first, then the memory they may still have referenced.
  mesh_.reset();
  std::lock_guard<std::mutex> lock(retired_mu_);
  retired_.clear();
}

c10d::Store& World::store() {
  if (!store_) {
    throw ConfigError("a world of one rank has no rendezvous store");
  }
  return *store_;
}

void World::retire(std::shared_ptr<void> resource, uint64_t bytes) {
  std::lock_guard<std::mutex> lock(retired_mu_);
  retired_.push_back(std::move(resource));
  retired_bytes_ += bytes;
}

uint64_t World::retired_bytes() const {
  std::lock_guard<std::mutex> lock(retired_mu_);
  return retired_bytes_;
}

void World::wait_for_all(const std::string& prefix, const std::string& what) {
  // Polled, not one blocking wait: a store that goes away (its host ended) is told
  // apart from ranks that do not come, and every figure printed is the real one.
  std::vector<std::string> keys;
  for (int r = 0; r < size(); ++r) keys.push_back(prefix + std::to_string(r));
  const auto t0 = std::chrono::steady_clock::now();
  const auto deadline = t0 + options_.timeout;
  auto next_say = t0 + kSayEvery;
  std::vector<bool> arrived(size(), false);
  auto pause = std::chrono::milliseconds(5);
  while (true) {
    std::vector<int> missing;
    for (int r = 0; r < size(); ++r) {
      if (arrived[r]) continue;
      try {
        arrived[r] = store_->check({keys[r]});
      } catch (const std::exception& e) {
        const double after = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        throw CommError(fmt::format(
            "rank {}: the rendezvous {} went away {:.1f} s into the {} (job '{}'): {}. The "
            "process hosting it ended: this job's rank 0 exited or was killed (see its "
            "output), or the store belonged to another job on the same MASTER_ADDR:MASTER_PORT",
            rank(), store_address(options_), after, what, options_.job_id, first_line(e)));
      }
      if (!arrived[r]) missing.push_back(r);
    }
    if (missing.empty()) return;
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) {
      throw CommError(fmt::format(
          "rank {}: {} timed out after {}: ranks [{}] of WORLD_SIZE={} did not arrive (job '{}'). "
          "Are they running, with the same MASTER_ADDR, MASTER_PORT, WORLD_SIZE and job id?",
          rank(), what, seconds(options_.timeout), fmt::join(missing, ", "), size(), options_.job_id));
    }
    if (now >= next_say) {
      detail::log_info(fmt::format(
          "rank {}: {}: waiting for ranks [{}] of WORLD_SIZE={} ({:.0f} s of {}, job '{}', {})",
          rank(), what, fmt::join(missing, ", "), size(),
          std::chrono::duration<double>(now - t0).count(), seconds(options_.timeout), options_.job_id,
          store_address(options_)));
      next_say = now + kSayEvery;
    }
    std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(pause, deadline - now));
    pause = std::min(pause * 2, std::chrono::milliseconds(100));
  }
}

void World::connect() {
  const WorldOptions& o = options_;
  std::string host = o.hostname;
  if (host.empty() && o.iface.empty()) {
    if (is_loopback(o.master_addr) || o.local_world_size == o.world_size) {
      host = "127.0.0.1";
    } else {
      char name[256] = {};
      ::gethostname(name, sizeof(name) - 1);
      host = name;
    }
  }
  mesh_ = std::make_unique<detail::Mesh>(o.rank, o.world_size, host, o.iface, o.timeout);
  if (o.world_size == 1) return;
  // Arrival: find out who is missing (and duplicated) before connecting.
  int64_t joined = store_->add("arrived_count/" + std::to_string(o.rank), 1);
  if (joined > 1) {
    throw ConfigError(fmt::format(
        "rank {}: another process already joined job '{}' as rank {} in the rendezvous {}: "
        "every process needs its own RANK, and two jobs on one MASTER_ADDR:MASTER_PORT need "
        "distinct job ids (TORCH_ASGD_JOB_ID) or, better, distinct ports",
        o.rank, o.job_id, o.rank, store_address(o)));
  }
  store_->set("arrived/" + std::to_string(o.rank), bytes(std::to_string(o.world_size)));
  wait_for_all("arrived/", "rendezvous");
  for (int r = 0; r < o.world_size; ++r) {
    std::string theirs = str(store_->get("arrived/" + std::to_string(r)));
    if (theirs != std::to_string(o.world_size)) {
      throw ConfigError(fmt::format("rank {}: WORLD_SIZE is {} here but {} on rank {}", o.rank,
                                    o.world_size, theirs, r));
    }
  }
  // The mesh: every rank's pair addresses through the store, then every pair connected.
  store_->set("mesh/" + std::to_string(o.rank), mesh_->addresses());
  wait_for_all("mesh/", "exchange of connection addresses");
  mesh_->connect([&](int r) { return store_->get("mesh/" + std::to_string(r)); });
}

}  // namespace torch_asgd
