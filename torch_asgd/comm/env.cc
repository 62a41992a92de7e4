#include "torch_asgd/comm/env.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

#include "torch_asgd/comm/error.h"

extern char** environ;

namespace torch_asgd {
namespace {

class Env {
 public:
  explicit Env(const std::map<std::string, std::string>& vars) : vars_(vars) {}

  std::optional<std::string> get(const std::string& name) const {
    auto it = vars_.find(name);
    if (it == vars_.end() || it->second.empty()) return std::nullopt;
    return it->second;
  }

  bool has(const std::string& name) const { return get(name).has_value(); }

  std::optional<long> integer(const std::string& name) const {
    auto v = get(name);
    if (!v) return std::nullopt;
    errno = 0;
    char* end = nullptr;
    long value = std::strtol(v->c_str(), &end, 10);
    // Slurm writes counts such as "4(x2)": the leading integer is what counts.
    bool slurm_count = end != v->c_str() && *end == '(';
    if (errno != 0 || end == v->c_str() || (*end != '\0' && !slurm_count)) {
      throw ConfigError(fmt::format("environment variable {}='{}' is not an integer", name, *v));
    }
    return value;
  }

  long required_integer(const std::string& name, const std::string& launcher,
                        const std::string& hint) const {
    auto v = integer(name);
    if (!v) {
      throw ConfigError(fmt::format("{} is set ({}) but {} is not; {}", launcher_vars(launcher),
                                    launcher, name, hint));
    }
    return *v;
  }

 private:
  static std::string launcher_vars(const std::string& launcher) {
    if (launcher == "torchrun") return "RANK or WORLD_SIZE";
    if (launcher == "slurm") return "SLURM_PROCID";
    return "OMPI_COMM_WORLD_RANK";
  }

  const std::map<std::string, std::string>& vars_;
};

// First host of a Slurm node list such as "node[03-05,9],gpu1" -> "node03".
std::string first_slurm_host(const std::string& list) {
  std::string host;
  for (size_t i = 0; i < list.size(); ++i) {
    char c = list[i];
    if (c == ',') break;
    if (c == '[') {
      size_t j = i + 1;
      while (j < list.size() && list[j] != '-' && list[j] != ',' && list[j] != ']') {
        host += list[j++];
      }
      break;
    }
    host += c;
  }
  return host;
}

bool truthy(const std::optional<std::string>& v) {
  return v && (*v == "1" || *v == "True" || *v == "true" || *v == "TRUE" || *v == "yes");
}

}  // namespace

WorldOptions WorldOptions::from_env() {
  std::map<std::string, std::string> vars;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const char* eq = std::strchr(*e, '=');
    if (eq != nullptr) vars.emplace(std::string(*e, static_cast<size_t>(eq - *e)), std::string(eq + 1));
  }
  return from_env(vars);
}

WorldOptions WorldOptions::from_env(const std::map<std::string, std::string>& vars) {
  Env env(vars);
  WorldOptions o;
  const std::string launch_hint =
      "start the program with asgd-launch, torchrun --no-python or srun, or set the variable";

  if (env.has("RANK") || env.has("WORLD_SIZE")) {
    o.source = "torchrun";
    o.rank = static_cast<int>(env.required_integer("RANK", o.source, launch_hint));
    o.world_size = static_cast<int>(env.required_integer("WORLD_SIZE", o.source, launch_hint));
    o.local_rank = static_cast<int>(env.integer("LOCAL_RANK").value_or(o.rank));
    o.local_world_size = static_cast<int>(env.integer("LOCAL_WORLD_SIZE").value_or(o.world_size));
    o.master_addr = env.get("MASTER_ADDR").value_or("");
    o.master_port = static_cast<int>(env.integer("MASTER_PORT").value_or(-1));
    o.job_id = env.get("TORCHELASTIC_RUN_ID").value_or("");
  } else if (env.has("SLURM_PROCID")) {
    o.source = "slurm";
    o.rank = static_cast<int>(env.required_integer("SLURM_PROCID", o.source, launch_hint));
    o.world_size = static_cast<int>(env.required_integer("SLURM_NTASKS", o.source, launch_hint));
    o.local_rank = static_cast<int>(env.integer("SLURM_LOCALID").value_or(0));
    auto per_node = env.integer("SLURM_NTASKS_PER_NODE");
    if (!per_node) per_node = env.integer("SLURM_STEP_TASKS_PER_NODE");
    if (!per_node) per_node = env.integer("SLURM_TASKS_PER_NODE");
    o.local_world_size = static_cast<int>(per_node.value_or(o.world_size));
    o.master_addr = env.get("MASTER_ADDR").value_or("");
    if (o.master_addr.empty()) {
      auto nodes = env.get("SLURM_STEP_NODELIST");
      if (!nodes) nodes = env.get("SLURM_JOB_NODELIST");
      if (nodes) o.master_addr = first_slurm_host(*nodes);
    }
    auto job = env.integer("SLURM_JOB_ID");
    o.master_port = static_cast<int>(
        env.integer("MASTER_PORT").value_or(job ? 20000 + (*job % 10000) : 29500));
    if (job) {
      o.job_id = fmt::format("slurm-{}.{}", *job, env.get("SLURM_STEP_ID").value_or("0"));
    }
  } else if (env.has("OMPI_COMM_WORLD_RANK")) {
    o.source = "openmpi";
    o.rank = static_cast<int>(env.required_integer("OMPI_COMM_WORLD_RANK", o.source, launch_hint));
    o.world_size =
        static_cast<int>(env.required_integer("OMPI_COMM_WORLD_SIZE", o.source, launch_hint));
    o.local_rank = static_cast<int>(env.integer("OMPI_COMM_WORLD_LOCAL_RANK").value_or(0));
    o.local_world_size =
        static_cast<int>(env.integer("OMPI_COMM_WORLD_LOCAL_SIZE").value_or(o.world_size));
    o.master_addr = env.get("MASTER_ADDR").value_or("");
    if (o.master_addr.empty() && o.local_world_size == o.world_size) o.master_addr = "127.0.0.1";
    o.master_port = static_cast<int>(env.integer("MASTER_PORT").value_or(29500));
    if (auto job = env.get("OMPI_MCA_ess_base_jobid")) o.job_id = "ompi-" + *job;
  } else {
    // No launcher: a world of one, so the same program also runs as a plain process.
    o.rank = 0;
    o.world_size = 1;
    o.local_rank = 0;
    o.local_world_size = 1;
  }

  o.use_agent_store = truthy(env.get("TORCHELASTIC_USE_AGENT_STORE"));
  o.store_path = env.get("TORCH_ASGD_STORE_PATH").value_or("");
  if (auto job = env.get("TORCH_ASGD_JOB_ID")) o.job_id = *job;
  if (o.job_id.empty()) o.job_id = "default";
  if (auto iface = env.get("GLOO_SOCKET_IFNAME")) {
    o.iface = iface->substr(0, iface->find(','));
  }
  if (auto t = env.get("TORCH_ASGD_TIMEOUT")) {
    char* end = nullptr;
    double seconds = std::strtod(t->c_str(), &end);
    if (end == t->c_str() || *end != '\0' || !(seconds > 0)) {
      throw ConfigError(fmt::format(
          "TORCH_ASGD_TIMEOUT='{}' is not a positive number of seconds", *t));
    }
    o.timeout = std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
  }
  o.validate();
  return o;
}

WorldOptions WorldOptions::merged_with(const WorldOptions& x) const {
  WorldOptions o = *this;
  if (x.rank >= 0) o.rank = x.rank;
  if (x.world_size >= 0) o.world_size = x.world_size;
  if (x.local_rank >= 0) o.local_rank = x.local_rank;
  if (x.local_world_size >= 0) o.local_world_size = x.local_world_size;
  if (!x.master_addr.empty()) o.master_addr = x.master_addr;
  if (x.master_port >= 0) o.master_port = x.master_port;
  if (x.use_agent_store) o.use_agent_store = true;
  if (!x.store_path.empty()) o.store_path = x.store_path;
  if (!x.job_id.empty()) o.job_id = x.job_id;
  if (!x.iface.empty()) o.iface = x.iface;
  if (!x.hostname.empty()) o.hostname = x.hostname;
  if (x.timeout != WorldOptions().timeout) o.timeout = x.timeout;
  if (x.rank >= 0 || x.world_size >= 0) {
    o.source = "options";
    if (x.local_rank < 0 && o.local_rank >= o.world_size) o.local_rank = o.rank;
    if (x.local_world_size < 0 && o.local_world_size > o.world_size) {
      o.local_world_size = o.world_size;
    }
  }
  o.validate();
  return o;
}

void WorldOptions::validate(bool store_given) const {
  const std::string from = source.empty() ? "" : fmt::format(" (from {})", source);
  if (world_size < 1) {
    throw ConfigError(fmt::format("WORLD_SIZE={} must be at least 1{}", world_size, from));
  }
  if (rank < 0 || rank >= world_size) {
    throw ConfigError(fmt::format(
        "RANK={} is out of range for WORLD_SIZE={}{}: ranks are numbered 0..{}; check that "
        "every process of the job got the same WORLD_SIZE",
        rank, world_size, from, world_size - 1));
  }
  if (local_world_size < 1 || local_world_size > world_size) {
    throw ConfigError(fmt::format("LOCAL_WORLD_SIZE={} must be between 1 and WORLD_SIZE={}{}",
                                  local_world_size, world_size, from));
  }
  if (local_rank < 0 || local_rank >= local_world_size) {
    throw ConfigError(fmt::format("LOCAL_RANK={} is out of range for LOCAL_WORLD_SIZE={}{}",
                                  local_rank, local_world_size, from));
  }
  if (timeout.count() <= 0) {
    throw ConfigError("the rendezvous timeout must be positive");
  }
  if (world_size > 1 && store_path.empty() && !store_given) {
    if (master_addr.empty()) {
      throw ConfigError(fmt::format(
          "rank {}: MASTER_ADDR is not set{}; export MASTER_ADDR=<address of rank 0's host> "
          "(asgd-launch and torchrun set it) or TORCH_ASGD_STORE_PATH=<file on a shared file "
          "system>",
          rank, from));
    }
    if (master_port < 1 || master_port > 65535) {
      throw ConfigError(fmt::format(
          "rank {}: MASTER_PORT={} is not a TCP port (1..65535){}; export MASTER_PORT=<free port "
          "on rank 0's host>",
          rank, master_port, from));
    }
  }
}

}  // namespace torch_asgd
