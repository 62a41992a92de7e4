#include "torch_asgd/optim/parameter_server.h"

#include <algorithm>

#include <fmt/format.h>
#include <torch/torch.h>

#include "torch_asgd/comm/detail/log.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/optim/detail/asgrad_protocol.h"
#include "torch_asgd/optim/detail/checkpoint.h"
#include "torch_asgd/optim/detail/flat_params.h"

namespace torch_asgd {

std::string to_string(StepRule rule) {
  return rule == StepRule::kConstant ? "constant" : "delay-adaptive";
}

StepRule parse_step_rule(const std::string& name) {
  if (name == "constant") return StepRule::kConstant;
  if (name == "delay-adaptive") return StepRule::kDelayAdaptive;
  throw ConfigError("unknown step rule '" + name + "' (constant or delay-adaptive)");
}

ServerOptions::ServerOptions(double lr) : lr_(lr) {}

std::string ServerStats::str() const {
  std::string out = fmt::format("server: {} gradients, {} applied, {} dropped; staleness {}",
                                gradients, version, dropped, staleness.str());
  for (const auto& w : workers) {
    out += fmt::format("\n  worker {}: {} jobs, {} gradients, {} dropped, staleness {}{}", w.rank,
                       w.jobs, w.gradients, w.dropped, w.staleness.str(),
                       w.failed ? " (failed)" : w.done ? " (done)" : "");
  }
  return out;
}

namespace {

std::vector<torch::optim::OptimizerParamGroup> one_group(std::vector<torch::Tensor> params) {
  return {torch::optim::OptimizerParamGroup(std::move(params))};
}

}  // namespace

ParameterServer::ParameterServer(std::vector<torch::Tensor> params, ServerOptions options,
                                 std::shared_ptr<World> world)
    : ParameterServer(
          detail::default_names(params),
          std::move(options), std::move(world)) {}

ParameterServer::ParameterServer(const torch::OrderedDict<std::string, torch::Tensor>& named,
                                 ServerOptions options, std::shared_ptr<World> world)
    : options_(std::move(options)), world_(std::move(world)) {
  TORCH_CHECK(options_.lr() >= 0, "Invalid learning rate: ", options_.lr());
  TORCH_CHECK(options_.staleness_cap() >= 0, "Invalid staleness_cap: ", options_.staleness_cap());
  TORCH_CHECK(options_.max_gradients() >= 0, "Invalid max_gradients: ", options_.max_gradients());
  if (!world_ || world_->size() < 2) {
    throw ConfigError("a parameter server needs at least 2 ranks (itself and a worker); start "
                      "the job with more processes");
  }
  if (options_.server_rank() != world_->rank()) {
    throw ConfigError(fmt::format("rank {} built a ParameterServer but server_rank is {}",
                                  world_->rank(), options_.server_rank()));
  }
  flat_ = std::make_unique<detail::FlatParams>(one_group(named.values()), named.keys());
  channel_ = world_->open_channel(
      detail::asgrad_channel_options(*flat_, options_.on_worker_failure()),
      detail::asgrad_fingerprint(*flat_, options_.server_rank()));
  const int n = world_->size();
  workers_.resize(n);
  busy_.assign(n, false);
  queues_.resize(n);
  for (int r = 0; r < n; ++r) {
    workers_[r].rank = r;
    if (r != world_->rank()) worker_ranks_.push_back(r);
  }
  assigner_ = std::make_unique<JobAssigner>(options_.policy(), worker_ranks_, options_.seed());
}

ParameterServer::~ParameterServer() {
  if (!stopped_) {
    try {
      stop();
    } catch (const std::exception& e) {
      detail::log_warning(std::string("ParameterServer: stopping in the destructor failed: ") +
                          e.what());
    }
  }
}

WorkerStats& ParameterServer::worker(int rank) { return workers_.at(static_cast<size_t>(rank)); }

bool ParameterServer::budget_spent() const {
  return options_.max_gradients() > 0 && totals_.gradients >= options_.max_gradients();
}

bool ParameterServer::available(int rank) const {
  const auto& w = workers_[static_cast<size_t>(rank)];
  return !w.done && !w.failed;
}

void ParameterServer::send_job(int rank, Job job) {
  Outgoing m;
  m.kind = MessageKind::kJob;
  m.payload = std::move(job.snapshot);
  m.model_version = job.version;
  channel_->send(rank, m);
  busy_[rank] = true;
}

bool ParameterServer::serve(std::chrono::milliseconds timeout) {
  if (stopped_) return false;
  if (!started_) {
    // Every worker starts with one job: n jobs in flight from now on. (Not in the
    // constructor, so that load() can restore the version first.)
    started_ = true;
    for (int r : worker_ranks_) {
      if (options_.keep_log()) job_log_.push_back(r);
      ++workers_[r].jobs;
      send_job(r, Job{flat_->flatten(), totals_.version});
    }
    last_gradient_ = std::chrono::steady_clock::now();
  }
  for (const auto& m : channel_->wait(timeout)) {
    const int w = m.sender();
    if (m.header.kind == MessageKind::kGradient) {
      handle_gradient(m);
    } else if (m.header.kind == MessageKind::kControl &&
               m.header.sender_step == detail::kDoneSignal) {
      worker(w).done = true;
      reissue_jobs_of(w);
    }
  }
  for (const auto& c : channel_->counters()) {
    if (c.failed && !workers_[c.peer].failed) {
      workers_[c.peer].failed = true;
      reissue_jobs_of(c.peer);
    }
  }
  const bool nobody_left =
      std::none_of(worker_ranks_.begin(), worker_ranks_.end(), [&](int r) { return available(r); });
  if (budget_spent() || nobody_left) {
    stop();
    return false;
  }
  if (std::chrono::steady_clock::now() - last_gradient_ > world_->options().timeout) {
    throw CommError(fmt::format(
        "rank {}: the parameter server received no gradient for {} s; are the workers alive?",
        world_->rank(), world_->options().timeout.count() / 1000));
  }
  return true;
}

void ParameterServer::handle_gradient(const Message& m) {
  const int w = m.sender();
  WorkerStats& ws = worker(w);
  last_gradient_ = std::chrono::steady_clock::now();
  ++ws.gradients;
  ++totals_.gradients;
  busy_[w] = false;
  const int64_t tau = totals_.version - m.header.model_version;
  if (options_.staleness_cap() > 0 && tau >= options_.staleness_cap()) {
    ++ws.dropped;
    ++totals_.dropped;
  } else {
    double gamma = options_.lr();
    const double n = static_cast<double>(worker_ranks_.size());
    if (options_.step_rule() == StepRule::kDelayAdaptive && tau > 0) {
      gamma *= std::min(1.0, n / static_cast<double>(tau));
    }
    flat_->add_(m.payload, -1 * gamma);
    ws.staleness.add(totals_.version, m.header.model_version);
    totals_.staleness.add(totals_.version, m.header.model_version);
    ++ws.applied;
    ++totals_.version;
    if (options_.keep_log()) apply_log_.push_back(w);
  }
  // The worker is free: first what already waits for it, then the new job.
  if (!queues_[w].empty() && available(w)) {
    Job next = std::move(queues_[w].front());
    queues_[w].pop_front();
    send_job(w, std::move(next));
  }
  issue_job(w);
}

void ParameterServer::reissue_jobs_of(int rank) {
  // Its gradient in flight is not waited for, and what waited for it is dropped. So
  // that as many jobs as live workers stay in flight, each lost job is issued anew
  // (from the current model) to another worker, as the policy picks.
  const size_t lost = queues_[rank].size() + (busy_[rank] ? 1 : 0);
  queues_[rank].clear();
  busy_[rank] = false;
  for (size_t k = 0; k < lost; ++k) issue_job(-1);
}

void ParameterServer::issue_job(int returning) {
  if (budget_spent()) return;
  const int target = assigner_->next(returning, [&](int r) { return available(r); });
  if (target < 0) return;
  ++worker(target).jobs;
  if (options_.keep_log()) job_log_.push_back(target);
  Job job{flat_->flatten(), totals_.version};
  if (busy_[target]) {
    queues_[target].push_back(std::move(job));
  } else {
    send_job(target, std::move(job));
  }
}

void ParameterServer::stop() {
  stopped_ = true;
  Outgoing m;
  m.kind = MessageKind::kControl;
  m.sender_step = detail::kStopSignal;
  for (int r : worker_ranks_) {
    if (!workers_[r].failed) channel_->send(r, m);
  }
  channel_->close(world_->options().timeout);
}

ServerStats ParameterServer::run() {
  while (serve()) {
  }
  return stats();
}

ServerStats ParameterServer::stats() const {
  ServerStats s = totals_;
  for (int r : worker_ranks_) s.workers.push_back(workers_[r]);
  return s;
}

void ParameterServer::save(torch::serialize::OutputArchive& archive) const {
  detail::write_fingerprint(archive, "torch_asgd/server", flat_->fingerprint());
  std::vector<int64_t> c = {totals_.version, totals_.gradients, totals_.dropped,
                            totals_.staleness.count, totals_.staleness.sum, totals_.staleness.max};
  detail::write_int64s(archive, "torch_asgd/server/counters", c);
}

void ParameterServer::load(torch::serialize::InputArchive& archive) {
  detail::check_fingerprint(archive, "torch_asgd/server", flat_->fingerprint(), "ParameterServer");
  auto c = detail::read_int64s(archive, "torch_asgd/server/counters", 6);
  totals_.version = c[0];
  totals_.gradients = c[1];
  totals_.dropped = c[2];
  totals_.staleness.count = c[3];
  totals_.staleness.sum = c[4];
  totals_.staleness.max = c[5];
}

torch::serialize::OutputArchive& operator<<(torch::serialize::OutputArchive& archive,
                                            const ParameterServer& server) {
  server.save(archive);
  return archive;
}

torch::serialize::InputArchive& operator>>(torch::serialize::InputArchive& archive,
                                           ParameterServer& server) {
  server.load(archive);
  return archive;
}

}  // namespace torch_asgd
