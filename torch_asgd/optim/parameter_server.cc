#include "torch_asgd/optim/parameter_server.h"

#include <algorithm>

#include <fmt/format.h>
#include <torch/torch.h>

#include "torch_asgd/comm/error.h"
#include "torch_asgd/detail/log.h"
#include "torch_asgd/optim/detail/asgrad_protocol.h"
#include "torch_asgd/optim/detail/checkpoint.h"
#include "torch_asgd/optim/detail/flat_params.h"
#include "torch_asgd/optim/detail/json.h"

namespace torch_asgd {

std::string to_string(StepRule rule) {
  return rule == StepRule::kConstant ? "constant" : "delay-adaptive";
}

StepRule parse_step_rule(const std::string& name) {
  if (name == "constant") return StepRule::kConstant;
  if (name == "delay-adaptive") return StepRule::kDelayAdaptive;
  throw ConfigError("unknown step rule '" + name + "' (constant or delay-adaptive)");
}

std::string ServerStats::str() const {
  std::string out = fmt::format("{}: {} gradients, {} applied, {} dropped{}{}; {}", who(), gradients,
                                version, dropped,
                                late > 0 ? fmt::format(", {} after the budget", late) : "",
                                codec.empty() ? "" : fmt::format(", {} received as {}", encoded, codec),
                                staleness.str());
  for (const auto& w : workers) {
    out += fmt::format("\n  worker {}: {} jobs, {} gradients, {} dropped, {}{}{}", w.rank, w.jobs,
                       w.gradients, w.dropped, w.staleness.str(),
                       w.rejected > 0 ? fmt::format(", {} refused", w.rejected) : "",
                       w.failed ? " (failed)" : w.done ? " (done)" : "");
  }
  return out;
}

std::string ServerStats::to_json() const {
  std::string list;
  for (const auto& w : workers) {
    if (!list.empty()) list += ", ";
    list += detail::JsonObject()
                .add("rank", w.rank)
                .add("jobs", w.jobs)
                .add("gradients", w.gradients)
                .add("applied", w.applied)
                .add("dropped", w.dropped)
                .add("rejected", w.rejected)
                .add("staleness", w.staleness)
                .add("done", w.done)
                .add("failed", w.failed)
                .str();
  }
  return detail::JsonObject()
      .add("optimizer", optimizer)
      .add("rank", rank)
      .add("world_size", world_size)
      .add("version", version)
      .add("gradients", gradients)
      .add("dropped", dropped)
      .add("late", late)
      .add("codec", codec)
      .add("encoded", encoded)
      .add("staleness", staleness)
      .add_raw("workers", "[" + list + "]")
      .str();
}

ParameterServer::ParameterServer(std::shared_ptr<torch::optim::Optimizer> inner,
                                 ServerOptions options, std::shared_ptr<World> world, Model model)
    : DistributedOptimizer(std::move(inner), "ParameterServer", std::move(model)),
      options_(std::move(options)),
      world_(world_or_default(std::move(world))) {
  if (!world_ || world_->size() < 2) {
    throw ConfigError("a parameter server needs at least 2 ranks (itself and a worker); start "
                      "the job with more processes");
  }
  if (options_.server_rank() != world_->rank()) {
    throw ConfigError(fmt::format("rank {} built a ParameterServer but server_rank is {}",
                                  world_->rank(), options_.server_rank()));
  }
  check_options();  // before the collectives: a rank that throws must not leave its peers waiting
  const Compression& c = options_.compression();
  detail::check_asgrad_compression(c, flat().dtype(), fmt::format("rank {}: ParameterServer", world_->rank()));
  Fingerprint fp = detail::asgrad_fingerprint(exchange_fingerprint(), options_.server_rank(), c);
  transport_ = world_->open_channel(detail::asgrad_channel_options(flat(), options_.on_worker_failure(), c), fp);
  timeout_ = world_->options().timeout;
  start_equal(*world_, options_.server_rank());
  init();
}

ParameterServer::ParameterServer(std::shared_ptr<torch::optim::Optimizer> inner,
                                 ServerOptions options, std::unique_ptr<Transport> transport,
                                 std::chrono::milliseconds timeout)
    : DistributedOptimizer(std::move(inner), "ParameterServer", Model()),
      options_(std::move(options)),
      transport_(std::move(transport)),
      timeout_(timeout) {
  if (!transport_ || transport_->size() < 2) {
    throw ConfigError("a parameter server needs at least 2 ranks (itself and a worker)");
  }
  check_options();
  detail::check_asgrad_compression(options_.compression(), flat().dtype(), "ParameterServer");
  init();
}

void ParameterServer::check_options() const {
  if (options_.staleness_cap() < 0) {
    throw ConfigError(fmt::format("ParameterServer: staleness_cap is {}; it must be >= 0 (0 keeps "
                                  "every gradient)", options_.staleness_cap()));
  }
  if (options_.max_gradients() < 0) {
    throw ConfigError(fmt::format("ParameterServer: max_gradients is {}; it must be >= 0 (0: until "
                                  "every worker is done)", options_.max_gradients()));
  }
}

void ParameterServer::init() {
  rank_ = transport_->rank();
  totals_.rank = rank_;
  totals_.world_size = transport_->size();
  const int n = transport_->size();
  workers_.resize(n);
  busy_.assign(n, false);
  queues_.resize(n);
  for (int r = 0; r < n; ++r) {
    workers_[r].rank = r;
    if (r != rank_) worker_ranks_.push_back(r);
  }
  assigner_ = std::make_unique<JobAssigner>(options_.policy(), worker_ranks_, options_.seed());
  grad_ = torch::zeros({flat().numel()}, torch::TensorOptions().dtype(flat().dtype()).device(flat().device()));
  if (options_.compression().lossy()) {
    // (On the CPU a gradient is decoded straight into grad_.)
    if (!grad_.is_cpu()) decoded_ = torch::zeros({flat().numel()}, torch::kFloat);
    totals_.codec = options_.compression().describe();
  }
}

ParameterServer::ParameterServer(Params params, const torch::optim::SGDOptions& sgd,
                                 ServerOptions options, std::shared_ptr<World> world, Model model)
    : ParameterServer(detail::make_sgd(params.take_groups(), sgd), std::move(options), std::move(world),
                      params.names_or(std::move(model))) {}

ParameterServer::~ParameterServer() {
  if (transport_ && !stopped_) finish_in_destructor(rank_);
}

torch::Tensor ParameterServer::step(LossClosure) {
  throw_if_finished();
  serve(std::chrono::milliseconds(100));
  return {};
}

bool ParameterServer::finish(std::chrono::milliseconds timeout) {
  if (finished_) return true;
  finished_ = true;
  if (!stopped_) {
    const auto saved = timeout_;
    timeout_ = timeout;
    stop();
    timeout_ = saved;
  }
  return close_clean_;
}

WorkerStats& ParameterServer::worker(int rank) { return workers_.at(static_cast<size_t>(rank)); }

bool ParameterServer::budget_spent() const {
  return options_.max_gradients() > 0 && totals_.gradients >= options_.max_gradients();
}

bool ParameterServer::available(int rank) const {
  const auto& w = workers_[static_cast<size_t>(rank)];
  return !w.done && !w.failed;
}

int64_t ParameterServer::jobs_in_flight() const {
  int64_t n = 0;
  for (int r : worker_ranks_) n += (busy_[r] ? 1 : 0) + static_cast<int64_t>(queues_[r].size());
  return n;
}

void ParameterServer::send_job(int rank, Job job) {
  transport_->send(rank, detail::asgrad_message(detail::kJob, job.version, std::move(job.snapshot)));
  busy_[rank] = true;
}

bool ParameterServer::serve(std::chrono::milliseconds timeout) {
  if (stopped_) return false;
  if (!started_) {
    // Every worker starts with one job. (Not in the constructor, so that load() can
    // restore the version first.)
    started_ = true;
    refresh_views();
    for (int r : worker_ranks_) {
      if (options_.keep_log()) job_log_.push_back(r);
      ++workers_[r].jobs;
      send_job(r, Job{flat().flat().to(torch::kCPU, false, true), totals_.version});
    }
    last_gradient_ = std::chrono::steady_clock::now();
  }
  note_failures();
  for (auto& m : transport_->wait(timeout).messages) pending_.push_back(std::move(m));
  // One at a time from the queue: a message whose handling throws leaves the rest.
  while (!pending_.empty()) {
    Message m = std::move(pending_.front());
    pending_.pop_front();
    handle(m);
  }
  note_failures();
  const bool nobody_left =
      std::none_of(worker_ranks_.begin(), worker_ranks_.end(), [&](int r) { return available(r); });
  if (budget_spent() || nobody_left) {
    stop();
    return false;
  }
  if (std::chrono::steady_clock::now() - last_gradient_ > timeout_) {
    throw CommError(fmt::format(
        "rank {}: the parameter server received no gradient for {} s; are the workers alive?",
        rank_, timeout_.count() / 1000));
  }
  return true;
}

void ParameterServer::handle(const Message& m) {
  const int w = m.sender;
  if (!detail::is_asgrad(m)) {
    throw CommError(fmt::format("rank {}: the parameter server got a message it does not know "
                                "from rank {}; is it running the same torch_asgd?",
                                rank_, w));
  }
  if (detail::asgrad_kind(m) == detail::kGradient) {
    handle_gradient(m);
  } else if (detail::asgrad_kind(m) == detail::kDone) {
    worker(w).done = true;
    reissue_jobs_of(w);
  }
}

void ParameterServer::handle_gradient(const Message& m) {
  const int w = m.sender;
  // (Checked before anything is counted: a bad gradient leaves the statistics as they were.)
  const Compression& c = options_.compression();
  const bool encoded = detail::is_encoded_gradient(m, c, flat().numel());
  if (encoded && !codec::valid(c, m.payload.data_ptr<uint8_t>(), 0, m.payload.numel(), flat().numel())) {
    throw CommError(fmt::format("rank {}: worker {} sent a {} gradient that does not decode (values not "
                                "finite, or topk indices out of range); its memory or its build is broken",
                                rank_, w, c.describe()));
  }
  if (!encoded && (m.payload.numel() != flat().numel() || m.payload.scalar_type() != flat().dtype())) {
    throw CommError(fmt::format("rank {}: worker {} sent a gradient of {} elements of {}; the model "
                                "has {} of {}{}",
                                rank_, w, m.payload.numel(),
                                c10::toString(m.payload.scalar_type()), flat().numel(),
                                c10::toString(flat().dtype()),
                                c.lossy() ? fmt::format(" ({} bytes under {})",
                                                        codec::encoded_bytes(c, flat().numel()), c.describe())
                                          : ""));
  }
  WorkerStats& ws = worker(w);
  last_gradient_ = std::chrono::steady_clock::now();
  ++ws.gradients;
  if (budget_spent()) {
    ++totals_.late;  // the budget is spent: no more steps
    return;
  }
  ++totals_.gradients;
  if (encoded) ++totals_.encoded;
  // A worker already given up (its job was issued to another) gets no new job: as many
  // jobs stay in flight as live workers. Its gradient is still real work.
  const bool counted = busy_[w];
  busy_[w] = false;
  const int64_t job_version = detail::asgrad_version(m);
  const int64_t tau = totals_.version - job_version;
  if (options_.staleness_cap() > 0 && tau >= options_.staleness_cap()) {
    ++ws.dropped;
    ++totals_.dropped;
  } else {
    torch::NoGradGuard no_grad;
    if (encoded) {
      at::Tensor& into = decoded_.defined() ? decoded_ : grad_;  // float32 on the CPU
      into.zero_();
      codec::add_decoded(c, m.payload.data_ptr<uint8_t>(), 0, m.payload.numel(), flat().numel(),
                         into.data_ptr<float>());
      if (decoded_.defined()) grad_.copy_(decoded_);
    } else {
      grad_.copy_(m.payload);
    }
    const double n = static_cast<double>(worker_ranks_.size());
    if (options_.step_rule() == StepRule::kDelayAdaptive && tau > n) {
      grad_.mul_(n / static_cast<double>(tau));  // gamma_tau = gamma min(1, n / tau)
    }
    flat().set_grads(grad_);
    inner_step(nullptr);
    // The gradients were views of grad_: gone again, so that zero_grad() (which detaches
    // gradients in place, as views cannot be) finds none.
    for (const auto& p : flat().params()) const_cast<at::Tensor&>(p).mutable_grad() = at::Tensor();
    ws.staleness.add(tau);
    totals_.staleness.add(tau);
    ++ws.applied;
    ++totals_.version;
    if (options_.keep_log()) apply_log_.push_back(w);
  }
  if (!counted || !available(w)) return;  // its job was issued to another already
  // The worker is free: first what already waits for it, then a new job, unless a job
  // issued before a worker's death was known keeps one more in flight than live workers.
  if (!queues_[w].empty()) {
    Job next = std::move(queues_[w].front());
    queues_[w].pop_front();
    send_job(w, std::move(next));
  }
  if (jobs_in_flight() < live_workers()) issue_job(w);
}

void ParameterServer::note_failures() {
  for (int w : transport_->failed_peers()) {
    if (!workers_[w].failed) {
      workers_[w].failed = true;
      reissue_jobs_of(w);
    }
  }
  // A message the channel refused (corrupt, or values not finite) was a gradient: its
  // job would never come back, and the worker waits for the next. It gets a new one.
  for (const auto& c : transport_->counters()) {
    WorkerStats& ws = worker(c.peer);
    if (c.rejected <= static_cast<uint64_t>(ws.rejected)) continue;
    ws.rejected = static_cast<int64_t>(c.rejected);
    detail::log_warning(fmt::format(
        "rank {}: the parameter server refused a message of worker {} ({}); it gets a new job",
        rank_, c.peer, c.last_reject));
    if (busy_[c.peer] && available(c.peer)) {
      busy_[c.peer] = false;
      if (!queues_[c.peer].empty()) {
        Job next = std::move(queues_[c.peer].front());
        queues_[c.peer].pop_front();
        send_job(c.peer, std::move(next));
      } else {
        issue_job_to(c.peer);
      }
    }
  }
}

int64_t ParameterServer::live_workers() const {
  int64_t n = 0;
  for (int r : worker_ranks_) n += available(r) ? 1 : 0;
  return n;
}

void ParameterServer::reissue_jobs_of(int rank) {
  // Its gradient in flight is not waited for, and what waited for it is dropped; the
  // others get new jobs (from the current model, as the policy picks) until every live
  // worker has one in flight again.
  queues_[rank].clear();
  busy_[rank] = false;
  while (jobs_in_flight() < live_workers() && !budget_spent()) {
    const int64_t before = jobs_in_flight();
    issue_job(-1);
    if (jobs_in_flight() == before) break;  // the policy has no worker for it
  }
}

void ParameterServer::issue_job(int returning) {
  if (budget_spent()) return;
  const int target = assigner_->next(returning, [&](int r) { return available(r); });
  if (target < 0) return;
  ++worker(target).jobs;
  if (options_.keep_log()) job_log_.push_back(target);
  Job job{flat().flat().to(torch::kCPU, false, true), totals_.version};
  if (busy_[target]) {
    queues_[target].push_back(std::move(job));
  } else {
    send_job(target, std::move(job));
  }
}

void ParameterServer::stop() {
  if (stopped_) return;
  stopped_ = true;
  for (int r : worker_ranks_) {
    if (!workers_[r].failed) transport_->send(r, detail::asgrad_message(detail::kStop, totals_.version));
  }
  close_clean_ = transport_->close(timeout_);
}

ServerStats ParameterServer::run() {
  while (serve()) {
  }
  return stats();
}

void ParameterServer::issue_job_to(int rank) {
  if (budget_spent()) return;
  ++worker(rank).jobs;
  if (options_.keep_log()) job_log_.push_back(rank);
  send_job(rank, Job{flat().flat().to(torch::kCPU, false, true), totals_.version});
}

ServerStats ParameterServer::stats() const {
  ServerStats s = totals_;
  for (int r : worker_ranks_) s.workers.push_back(workers_[r]);
  return s;
}

void ParameterServer::save_state(torch::serialize::OutputArchive& archive) const {
  detail::write_int64s(archive, "torch_asgd/server/counters",
                       {totals_.version, totals_.gradients, totals_.dropped,
                        totals_.staleness.count, totals_.staleness.sum, totals_.staleness.max});
}

void ParameterServer::load_state(torch::serialize::InputArchive& archive) {
  auto c = detail::read_int64s(archive, "torch_asgd/server/counters", 6);
  totals_.version = c[0];
  totals_.gradients = c[1];
  totals_.dropped = c[2];
  totals_.staleness.count = c[3];
  totals_.staleness.sum = c[4];
  totals_.staleness.max = c[5];
}

}  // namespace torch_asgd
