// Where a rank stands in the job: its rank, the world size, and how to rendezvous.
//
// WorldOptions::from_env() reads, in this order of precedence, torchrun's variables
// (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), then
// Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, ...), then Open MPI's
// (OMPI_COMM_WORLD_RANK, ...). Fields set explicitly in an options struct passed to
// World::create() override whatever the environment says. Thread safe: it only reads.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>

namespace torch_asgd {

struct WorldOptions {
  int rank = -1;
  int world_size = -1;
  int local_rank = -1;
  int local_world_size = -1;

  // TCPStore rendezvous at master_addr:master_port, hosted by rank 0 unless
  // use_agent_store (torchelastic's TORCHELASTIC_USE_AGENT_STORE=True) says an agent
  // already runs it; then every rank, rank 0 too, joins as a client.
  std::string master_addr;
  int master_port = -1;
  bool use_agent_store = false;

  // A FileStore on a shared file system instead of the TCPStore, when non-empty.
  std::string store_path;

  // Prefixes every key this job writes to the store, so that two jobs sharing one
  // store never read each other's keys.
  std::string job_id;

  // Network interface for Gloo's TCP device (GLOO_SOCKET_IFNAME), else the address of
  // this host's name (127.0.0.1 when MASTER_ADDR is a loopback address).
  std::string iface;
  std::string hostname;

  // Bound on every blocking step of the rendezvous and on the collective calls.
  std::chrono::milliseconds timeout{std::chrono::seconds(300)};

  // Which launcher's variables were found: "torchrun", "slurm", "openmpi",
  // "options" or "" (none).
  std::string source;

  // Reads the process environment. Throws ConfigError naming the variable when a
  // value is missing, malformed or inconsistent (e.g. RANK >= WORLD_SIZE).
  static WorldOptions from_env();

  // Same, from an explicit variable map (used by tests).
  static WorldOptions from_env(const std::map<std::string, std::string>& env);

  // Returns *this with every field that `explicit_opts` sets (rank >= 0, non-empty
  // strings, ...) taken from it. Throws ConfigError if the result is incomplete or
  // inconsistent.
  WorldOptions merged_with(const WorldOptions& explicit_opts) const;

  // Throws ConfigError unless the options describe a usable world. With
  // `store_given`, the rendezvous address is not needed.
  void validate(bool store_given = false) const;
};

}  // namespace torch_asgd
