// World: the ranks of one job, connected.
//
// World::from_env() reads where this rank stands (WorldOptions::from_env), meets the
// other ranks at the rendezvous store, and connects to every one of them over Gloo's
// TCP transport (torch_asgd's own Gloo, private to libtorch_asgd.so). Optimizers share one World (std::shared_ptr) and open Channels on it.
//
// Blocking: creating a World blocks until every rank has arrived, or throws CommError
// after options().timeout naming the ranks that did not come. Collective calls
// (open_channel, check_fingerprint, barrier) block likewise, each bounded by the same
// timeout. Thread safety: collective calls must be made in the same order on every
// rank, from one thread; the accessors may be called from any thread.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <c10/util/intrusive_ptr.h>

#include "torch_asgd/comm/channel.h"
#include "torch_asgd/comm/env.h"
#include "torch_asgd/comm/fingerprint.h"

namespace c10d {
class Store;
}
namespace torch_asgd {
namespace detail {
class Mesh;
}

class World : public std::enable_shared_from_this<World> {
 public:
  // The process's World, from the environment: made (rendezvous) at the first call and
  // the same one after, also for optimizers given no World (process_default()).
  static std::shared_ptr<World> from_env();
  // A new World: the environment with the fields `overrides` sets winning, rendezvous.
  static std::shared_ptr<World> from_env(const WorldOptions& overrides);
  // The World optimizers take when given none: the one from_env() made, or, when a
  // launcher's variables name a job of several ranks, from_env()'s; nullptr otherwise
  // (one rank, no rendezvous). Kept for the life of the process.
  static std::shared_ptr<World> process_default();
  // Rendezvous with complete options (rank, world_size and a store location).
  static std::shared_ptr<World> create(const WorldOptions& options);
  // Rendezvous through an existing store (e.g. c10d::HashStore for ranks that are
  // threads of one process). Keys are still prefixed with the job id.
  static std::shared_ptr<World> create(const WorldOptions& options,
                                       c10::intrusive_ptr<c10d::Store> store);
  ~World();
  World(const World&) = delete;
  World& operator=(const World&) = delete;

  int rank() const { return options_.rank; }
  int size() const { return options_.world_size; }
  int local_rank() const { return options_.local_rank; }
  int local_size() const { return options_.local_world_size; }
  const WorldOptions& options() const { return options_; }

  // Collective. Every rank passes the fingerprint of what it will exchange under
  // `topic`; if any two differ, every rank throws MismatchError naming the first
  // difference it sees. A topic may be checked again (by a second optimizer, say).
  void check_fingerprint(const std::string& topic, const Fingerprint& fp);

  // Collective. Opens a channel; the options (name, capacity, ...) and `fp` are
  // checked to agree across ranks first. Channel names must be unique per World.
  std::unique_ptr<Channel> open_channel(const ChannelOptions& options,
                                        const Fingerprint& fp = Fingerprint());

  // Collective. Returns once every rank has called barrier(name), or throws CommError
  // naming the missing ranks after options().timeout.
  void barrier(const std::string& name);

  // The rendezvous store, keys prefixed with this job's id.
  c10d::Store& store();
  // The connections to every rank (collectives.h and Channel use them). Internal.
  detail::Mesh& mesh() const { return *mesh_; }

  // Keeps `resource` alive until the Gloo connections are gone (memory that Gloo may
  // still write into after an aborted operation). Internal.
  void retire(std::shared_ptr<void> resource, uint64_t bytes);
  // The bytes kept so: after a channel ended cleanly, only its last acknowledgements (a
  // frame header each), which Gloo may still be sending. Internal.
  uint64_t retired_bytes() const;

 private:
  World(WorldOptions options, c10::intrusive_ptr<c10d::Store> store);
  void connect();
  void wait_for_all(const std::string& key_prefix, const std::string& what);

  WorldOptions options_;
  c10::intrusive_ptr<c10d::Store> store_;
  std::unique_ptr<detail::Mesh> mesh_;
  int channels_opened_ = 0;
  std::map<std::string, int> topic_uses_;  // check_fingerprint calls per topic

  mutable std::mutex retired_mu_;  // guards retired_
  std::vector<std::shared_ptr<void>> retired_;
  uint64_t retired_bytes_ = 0;
};

}  // namespace torch_asgd
