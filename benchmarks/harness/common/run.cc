// The examples' program, in the order a run goes: setup (the world, the data, the model,
// the optimizer or server, a checkpoint to resume from), the training loop (with its
// stop conditions and evaluation on a clock), the end (finish, final evaluation), and
// the report (summary lines, metrics JSON).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <optional>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include "common/checkpoint.h"
#include "common/data.h"
#include "common/example.h"
#include "common/stopping.h"
#include "torch_asgd/torch_asgd.h"

namespace torch_asgd {
namespace examples {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

bool is_server_algo(const std::string& algo) { return algo.rfind("asgd-", 0) == 0; }

// The local rule over `params`: the inner optimizer of every algorithm.
std::shared_ptr<torch::optim::Optimizer> make_rule(const ExampleOptions& o,
                                                   std::vector<torch::Tensor> params) {
  if (o.optimizer == "adam") {
    return std::make_shared<torch::optim::Adam>(
        params, torch::optim::AdamOptions(o.lr).weight_decay(o.weight_decay));
  }
  if (o.optimizer == "adamw") {
    return std::make_shared<torch::optim::AdamW>(
        params, torch::optim::AdamWOptions(o.lr).weight_decay(o.weight_decay));
  }
  return std::make_shared<torch::optim::SGD>(
      params, torch::optim::SGDOptions(o.lr).momentum(o.momentum).weight_decay(o.weight_decay));
}

// ---- progress ------------------------------------------------------------------------

class Progress {
 public:
  Progress(bool enabled, int64_t total) : enabled_(enabled), total_(total), tty_(::isatty(STDOUT_FILENO)) {}

  void update(int64_t done, double loss, double last_acc, bool force = false) {
    if (!enabled_) return;
    const double now = seconds_since(start_);
    if (!force && now - last_print_ < (tty_ ? 0.2 : 5.0)) return;
    const double rate = done / std::max(now, 1e-9);
    const std::string acc = last_acc >= 0 ? fmt::format("{:.1f}%", 100 * last_acc) : "-";
    const std::string of = total_ > 0 ? fmt::format("/{}", total_) : "";
    const std::string loss_text = loss >= 0 ? fmt::format("{:.3f}", loss) : "-";
    if (tty_) {
      const int width = 30;
      const int filled = total_ > 0 ? static_cast<int>(width * std::min<int64_t>(done, total_) / total_) : 0;
      std::printf("\r[%s%s] %ld%s | %.0f steps/s | loss %s | eval %s   ",
                  std::string(filled, '#').c_str(), std::string(width - filled, ' ').c_str(),
                  static_cast<long>(done), of.c_str(), rate, loss_text.c_str(), acc.c_str());
    } else {
      std::printf("progress: %ld%s steps, %.0f steps/s, loss %s, eval %s, %.0f s\n",
                  static_cast<long>(done), of.c_str(), rate, loss_text.c_str(), acc.c_str(), now);
    }
    std::fflush(stdout);
    last_print_ = now;
  }

  void finish() {
    if (enabled_ && tty_) std::printf("\n");
  }

 private:
  bool enabled_;
  int64_t total_;
  bool tty_;
  Clock::time_point start_ = Clock::now();
  double last_print_ = -1e9;
};

// The training loss, smoothed; unbiased from the first step (not an average that
// starts at 0).
class SmoothedLoss {
 public:
  void add(double loss) {
    ema_ = 0.95 * ema_ + 0.05 * loss;
    weight_ = 0.95 * weight_ + 0.05;
  }
  double value() const { return weight_ > 0 ? ema_ / weight_ : -1; }

 private:
  double ema_ = 0, weight_ = 0;
};

// ---- what each rank reports to rank 0 -----------------------------------------------

struct RankReport {
  bool trainer = true;  // the server is not
  int64_t steps = 0;
  double samples_per_second = 0;  // over the steps after --warmup-steps
  double accuracy = 0;
  double loss = 0;
  json stats;  // the optimizer's counters

  json to_json() const {
    return {{"trainer", trainer}, {"steps", steps}, {"samples_per_second", samples_per_second},
            {"accuracy", accuracy}, {"loss", loss}, {"stats", stats}};
  }
  static RankReport from_json(const json& j) {
    RankReport r;
    r.trainer = j.at("trainer");
    r.steps = j.at("steps");
    r.samples_per_second = j.at("samples_per_second");
    r.accuracy = j.at("accuracy");
    // A diverged rank's loss is NaN, which JSON writes as null.
    r.loss = j.at("loss").is_number() ? j.at("loss").get<double>() : std::nan("");
    r.stats = j.at("stats");
    return r;
  }
};

json staleness_json(const StalenessStats& s, const std::string& kind) {
  return {{"kind", kind}, {"mean", s.mean()}, {"max", s.max}, {"count", s.count}, {"bounded", s.bounded}};
}

// One all-reduce over every rank: the mean of their parameters, and the smallest and
// largest of their steps (returned as {min, max}). For synchronous ranks resuming.
std::pair<int64_t, int64_t> average_models(World& world, torch::nn::Module& model, int64_t step) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> params;
  for (auto& p : model.parameters()) params.push_back(p.detach().reshape({-1}).to(torch::kDouble));
  auto flat = torch::cat(params).to(torch::kCPU).contiguous();  // Gloo reduces host memory
  auto steps = torch::tensor({static_cast<double>(step), -static_cast<double>(step)}, torch::kDouble);
  all_reduce(world, flat, ReduceOp::kSum, /*tag=*/7001);
  all_reduce(world, steps, ReduceOp::kMin, /*tag=*/7002);  // {min, -max}
  flat /= world.size();
  int64_t at = 0;
  for (auto& p : model.parameters()) {
    const int64_t n = p.numel();
    p.copy_(flat.narrow(0, at, n).view_as(p));
    at += n;
  }
  return {static_cast<int64_t>(steps[0].item<double>()), -static_cast<int64_t>(steps[1].item<double>())};
}

// A rank's checkpoint: `key` (its optimizer's or the server's state), the model, and
// what `more` adds (the sampler).
void save_rank(const RankCheckpoint& checkpoint, const CheckpointMeta& meta, const char* key,
               const torch::optim::Optimizer& state, const torch::nn::Module& model,
               const std::function<void(torch::serialize::OutputArchive&)>& more = {}) {
  torch::serialize::OutputArchive a, state_archive, model_archive;
  state.save(state_archive);
  model.save(model_archive);
  a.write(key, state_archive);
  a.write("model", model_archive);
  const Fingerprint f = fingerprint(model);
  a.write(kFingerprintKey, torch::tensor({f.value, f.scale}, torch::kDouble));
  if (more) more(a);
  checkpoint.write(a, meta);
}

// Loads what save_rank() wrote; returns the step it was written at. The state goes
// first: for another model's checkpoint it names what differs.
int64_t load_rank(const RankCheckpoint& checkpoint, const CheckpointMeta& meta, const char* key,
                  torch::optim::Optimizer& state, torch::nn::Module& model,
                  const std::function<void(torch::serialize::InputArchive&)>& more = {}) {
  torch::serialize::InputArchive a, state_archive, model_archive;
  const int64_t step = checkpoint.read(a, meta);
  a.read(key, state_archive);
  state.load(state_archive);
  a.read("model", model_archive);
  model.load(model_archive);
  if (more) more(a);
  return step;
}

// ---- the run ---------------------------------------------------------------------------

class Run {
 public:
  Run(const Task& task, const ExampleOptions& o) : task_(task), o_(o) {}

  void setup();
  void train();
  void end();
  int report();

 private:
  // Setup.
  void check_options() const;
  void build_trainer();
  void resume_trainer();
  // The loop.
  void train_server();
  void train_ranks();
  bool stop_now();
  void step_once();
  double clock() const { return seconds_since(t0_) - eval_pause_; }
  int64_t global_samples() const;
  void maybe_evaluate(int64_t done);
  void evaluate_now();
  void record_evaluation(double at, int64_t samples, const Evaluation& e);
  bool reached_target(const Evaluation& e) const;
  void evaluate_deferred();
  std::vector<at::Tensor> model_state() const;  // copies of the parameters and buffers
  void set_model_state(const std::vector<at::Tensor>& state);
  void save_checkpoint();
  // The end.
  void gather(const RankReport& mine);
  json metrics_json() const;

  const Task& task_;
  ExampleOptions o_;
  std::shared_ptr<World> world_;
  torch::Device device_ = torch::Device(torch::kCPU);
  int n_ = 1, rank_ = 0, trainers_ = 1;
  bool server_algo_ = false, is_server_ = false;
  Dataset train_, test_;
  std::shared_ptr<torch::nn::Module> model_;

  std::unique_ptr<ParameterServer> server_;
  std::unique_ptr<torch::optim::Optimizer> opt_;
  DASGD* dasgd_ = nullptr;
  Gossip* gossip_ = nullptr;
  SyncSGD* sync_ = nullptr;
  Local* local_ = nullptr;
  bool lockstep() const { return sync_ != nullptr || local_ != nullptr; }  // equal step counts
  AsGradWorker* worker_ = nullptr;
  std::optional<Sampler> sampler_;
  std::optional<RankCheckpoint> checkpoint_;
  CheckpointMeta meta_;
  std::optional<SharedStop> shared_stop_;

  int64_t step_ = 0, first_step_ = 0, total_steps_ = -1;
  SmoothedLoss loss_;
  std::optional<Progress> progress_;
  Clock::time_point t0_;
  double eval_pause_ = 0, next_eval_at_ = 0, train_seconds_ = 0, wall_seconds_ = 0;
  double warm_at_ = -1;  // clock() when this rank's --warmup-steps were done
  double last_acc_ = -1, time_to_target_ = -1;
  int64_t parameters_ = 0;  // the model's
  json curve_ = json::array();
  // --eval-deferred: the models to evaluate after training, with their clock and samples.
  struct Snapshot {
    double seconds;
    int64_t samples;
    std::vector<at::Tensor> state;
  };
  std::vector<Snapshot> snapshots_;
  std::string stopped_by_ = "epochs";

  RankReport report_;
  Evaluation final_;
  std::vector<std::optional<RankReport>> all_;
  StalenessStats staleness_;
  std::string staleness_kind_ = "staleness";
  std::string detail_;
};

void Run::check_options() const {
  if (server_algo_ && n_ < 2) {
    throw ConfigError(fmt::format("--algo {} needs at least 2 ranks (a server and a worker); start "
                                  "it with asgd-launch --nproc 3 -- {} ...",
                                  o_.algo, task_.program));
  }
  if (o_.straggler_rank >= n_) {
    throw ConfigError(fmt::format("--straggler rank {} is out of range: this job has ranks 0..{}",
                                  o_.straggler_rank, n_ - 1));
  }
  if (server_algo_ && o_.straggler_rank == 0) {
    throw ConfigError("--straggler 0: rank 0 is the parameter server, which computes no "
                      "gradients; pick a worker rank 1.." + std::to_string(n_ - 1));
  }
  if (o_.average && o_.algo != "dasgd") {
    throw ConfigError(fmt::format("--average is DASGD's (its step is otherwise the sum of the ranks'); "
                                  "--algo {} takes no --average", o_.algo));
  }
}

void Run::setup() {
  torch::set_num_threads(o_.threads);
  if (o_.device == "cuda" && !torch::cuda::is_available()) {
    throw ConfigError(
        "--device cuda: this LibTorch sees no CUDA device (Debian's LibTorch is CPU-only: "
        "build against a CUDA LibTorch as the README's GPU section says); use --device cpu");
  }
  world_ = World::from_env();
  n_ = world_->size();
  rank_ = world_->rank();
  // Ranks on one machine share its GPUs round-robin by local rank.
  if (o_.device == "cuda") {
    device_ = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(
                                              world_->local_rank() % torch::cuda::device_count()));
  }
  server_algo_ = is_server_algo(o_.algo);
  is_server_ = server_algo_ && rank_ == 0;
  trainers_ = server_algo_ ? n_ - 1 : n_;
  check_options();
  std::tie(train_, test_) = task_.load(o_);
  // Same initial model everywhere.
  torch::manual_seed(o_.seed);
  model_ = task_.make_model();
  for (const auto& p : model_->parameters()) parameters_ += p.numel();
  model_->to(device_);
  if (!o_.checkpoint_dir.empty()) checkpoint_.emplace(o_.checkpoint_dir, rank_);
  meta_ = CheckpointMeta{o_.algo, n_, rank_, 0};
  const int64_t per_rank = o_.partition == "full" ? train_.labels.size(0) : train_.labels.size(0) / trainers_;
  if (!is_server_ && per_rank / o_.batch_size < 1) {
    throw ConfigError(fmt::format("each of the {} training ranks gets {} samples, fewer than one "
                                  "batch of {}: use a smaller --batch-size or fewer ranks",
                                  trainers_, per_rank, o_.batch_size));
  }
  if (is_server_) {
    const int64_t epoch_gradients = train_.labels.size(0) / o_.batch_size;
    const int64_t budget = o_.budget_samples > 0 ? (o_.budget_samples + o_.batch_size - 1) / o_.batch_size
                           : o_.budget_seconds > 0 ? 0
                                                   : int64_t{o_.epochs} * epoch_gradients;
    server_ = std::make_unique<ParameterServer>(
        make_rule(o_, model_->parameters()),
        ServerOptions()
            .policy(parse_assign_policy(o_.algo.substr(5)))
            .step_rule(parse_step_rule(o_.step_rule))
            .max_gradients(budget)
            .seed(o_.seed)
            .compression(Compression::parse(o_.compress)),
        world_, *model_);
    if (o_.resume) {
      const int64_t at = load_rank(*checkpoint_, meta_, "server", *server_, *model_);
      std::printf("rank 0: resumed from %s at gradient %ld (model fingerprint %.17g)\n",
                  checkpoint_->path().c_str(), static_cast<long>(at), fingerprint(*model_).value);
    }
    total_steps_ = budget;
  } else {
    build_trainer();
    if (o_.resume) resume_trainer();
  }
  progress_.emplace(rank_ == 0, total_steps_);
  next_eval_at_ = o_.eval_every_seconds;
  t0_ = Clock::now();
}

void Run::build_trainer() {
  const int shard = server_algo_ ? rank_ - 1 : rank_;
  sampler_.emplace(rank_indices(train_, shard, trainers_, o_), o_.sampling,
                   o_.seed * 1000 + static_cast<uint64_t>(rank_));
  // The module: its parameters' names and its buffers (BatchNorm's), kept equal at start.
  const Model model(*model_);
  if (o_.algo == "dasgd") {
    auto d = std::make_unique<DASGD>(
        make_rule(o_, model_->parameters()),
        DASGDOptions()
            .broadcast_every(o_.broadcast_every)
            .max_lead(o_.max_lead)
            .lead_policy(o_.lead_policy == "damp" ? LeadPolicy::kDamp : LeadPolicy::kWait)
            .lead_measure(o_.lead_measure == "progress" ? LeadMeasure::kProgress : LeadMeasure::kApplied)
            .compression(Compression::parse(o_.compress))
            .overlap(o_.overlap)
            .average(o_.average),
        world_, model);
    dasgd_ = d.get();
    opt_ = std::move(d);
  } else if (o_.algo == "gossip") {
    auto g = std::make_unique<Gossip>(
        make_rule(o_, model_->parameters()),
        GossipOptions()
            .exchange_every(o_.broadcast_every)
            .alpha(o_.gossip_alpha)
            .compression(Compression::parse(o_.compress)),
        world_, model);
    gossip_ = g.get();
    opt_ = std::move(g);
    staleness_kind_ = "lag";
  } else if (o_.algo == "sync") {
    auto s = std::make_unique<SyncSGD>(make_rule(o_, model_->parameters()),
                                       SyncSGDOptions().compression(Compression::parse(o_.compress)),
                                       world_, model);
    sync_ = s.get();
    opt_ = std::move(s);
  } else if (o_.algo == "local") {
    auto l = std::make_unique<Local>(make_rule(o_, model_->parameters()), world_, model);
    local_ = l.get();
    opt_ = std::move(l);
  } else {
    auto w = std::make_unique<AsGradWorker>(model_->parameters(),
                                            WorkerOptions().compression(Compression::parse(o_.compress)), world_,
                                            model);
    worker_ = w.get();
    opt_ = std::move(w);
  }
  const int64_t per_epoch = sampler_->size() / o_.batch_size;
  if (server_algo_) {
    total_steps_ = -1;  // the server decides
  } else if (o_.budget_samples > 0) {
    // Sync steps in lock-step: the budget is a step count; the others share a counter.
    total_steps_ = lockstep() ? (o_.budget_samples + int64_t{n_} * o_.batch_size - 1) / (int64_t{n_} * o_.batch_size)
                         : -1;
    stopped_by_ = "budget";
  } else if (o_.budget_seconds > 0) {
    total_steps_ = -1;
    stopped_by_ = "budget";
  } else {
    total_steps_ = int64_t{o_.epochs} * per_epoch;
  }
  if (!lockstep() && !worker_) shared_stop_.emplace(world_, o_.budget_samples, o_.budget_seconds);
}

void Run::resume_trainer() {
  step_ = load_rank(*checkpoint_, meta_, "optimizer", *opt_, *model_,
                    [&](torch::serialize::InputArchive& a) { sampler_->load(a); });
  // The ranks' checkpoints are from different moments and what was in flight is gone:
  // restart from their mean, which every replica then shares.
  if (dasgd_ != nullptr) dasgd_->resync();
  if (gossip_ != nullptr) gossip_->resync();
  if (sync_ != nullptr && n_ > 1 && o_.algo == "sync") {
    auto [lo, hi] = average_models(*world_, *model_, step_);
    if (lo != hi) {
      // Killed between two ranks' writes: sync steps in lock-step, so every rank goes on
      // from the oldest step (with the mean model).
      std::printf("rank %d: the checkpoints are from steps %ld to %ld; sync resumes every rank at "
                  "step %ld\n",
                  rank_, static_cast<long>(lo), static_cast<long>(hi), static_cast<long>(lo));
      step_ = lo;
    }
  }
  first_step_ = step_;
  // The fingerprint of the model this rank goes on from (after the mean): a check that
  // every replica starts from the same model, and what the resume test compares.
  std::printf("rank %d: resumed from %s at step %ld (model fingerprint %.17g)\n", rank_,
              checkpoint_->path().c_str(), static_cast<long>(step_), fingerprint(*model_).value);
}

// ---- the loop --------------------------------------------------------------------------

int64_t Run::global_samples() const {
  if (is_server_) return server_->stats().gradients * o_.batch_size;
  if (lockstep()) return step_ * n_ * o_.batch_size;
  if (shared_stop_) return std::max<int64_t>(shared_stop_->global_samples(), step_ * o_.batch_size);
  return step_ * o_.batch_size;
}

void Run::evaluate_now() {
  if (o_.eval_deferred) {
    snapshots_.push_back({clock(), global_samples(), model_state()});
    return;
  }
  // On rank 0's training thread; the clock stops meanwhile (reported times exclude it).
  // The other ranks of an asynchronous algorithm train on meanwhile, so its times gain
  // on sync's by up to the share of rank 0's time spent here (--eval-deferred does not).
  const auto e0 = Clock::now();
  const Evaluation e = evaluate(task_, *model_, test_, o_.eval_samples);
  eval_pause_ += seconds_since(e0);
  record_evaluation(clock(), global_samples(), e);  // this evaluation's pause excluded too
}

bool Run::reached_target(const Evaluation& e) const {
  return (o_.target_accuracy > 0 && e.accuracy >= o_.target_accuracy) ||
         (o_.target_loss > 0 && e.loss <= o_.target_loss);
}

void Run::record_evaluation(double at, int64_t samples, const Evaluation& e) {
  last_acc_ = e.accuracy;
  curve_.push_back({{"seconds", at}, {"samples", samples}, {"accuracy", e.accuracy}, {"loss", e.loss}});
  if (time_to_target_ < 0 && reached_target(e)) time_to_target_ = at;
}

std::vector<at::Tensor> Run::model_state() const {
  std::vector<at::Tensor> state;
  // In host memory, also for a model on the GPU: one copy per evaluation point.
  for (const auto& p : model_->parameters()) state.push_back(p.detach().to(torch::kCPU, false, true));
  for (const auto& b : model_->buffers()) state.push_back(b.detach().to(torch::kCPU, false, true));
  return state;
}

void Run::set_model_state(const std::vector<at::Tensor>& state) {
  torch::NoGradGuard no_grad;
  size_t i = 0;
  for (auto& p : model_->parameters()) p.copy_(state.at(i++));
  for (auto& b : model_->buffers()) b.copy_(state.at(i++));
}

void Run::evaluate_deferred() {
  if (snapshots_.empty()) return;
  std::printf("rank 0: evaluating the %zu models copied during training (--eval-deferred)\n",
              snapshots_.size());
  std::fflush(stdout);
  const auto trained = model_state();
  for (const auto& s : snapshots_) {
    set_model_state(s.state);
    record_evaluation(s.seconds, s.samples, evaluate(task_, *model_, test_, o_.eval_samples));
  }
  set_model_state(trained);
  snapshots_.clear();
}

void Run::maybe_evaluate(int64_t done) {
  const bool by_steps = o_.eval_every > 0 && done > 0 && done % o_.eval_every == 0;
  const bool by_clock = o_.eval_every_seconds > 0 && clock() >= next_eval_at_;
  if (!by_steps && !by_clock) return;
  evaluate_now();
  while (o_.eval_every_seconds > 0 && next_eval_at_ <= clock()) next_eval_at_ += o_.eval_every_seconds;
}

void Run::save_checkpoint() {
  if (is_server_) {
    meta_.step = server_->stats().gradients;
    save_rank(*checkpoint_, meta_, "server", *server_, *model_);
    return;
  }
  meta_.step = step_;
  save_rank(*checkpoint_, meta_, "optimizer", *opt_, *model_,
            [&](torch::serialize::OutputArchive& a) { sampler_->save(a); });
}

void Run::train_server() {
  int64_t next_checkpoint = server_->stats().gradients + o_.checkpoint_every;
  int64_t evaluated_at = -1;
  while (server_->serve(std::chrono::milliseconds(50))) {
    const int64_t done = server_->stats().gradients;
    if (done != evaluated_at) {
      maybe_evaluate(done);
      evaluated_at = done;
    }
    if (checkpoint_ && done >= next_checkpoint) {
      save_checkpoint();
      next_checkpoint = done + o_.checkpoint_every;
    }
    progress_->update(done, -1, last_acc_);
    const bool out_of_time = o_.budget_seconds > 0 && clock() >= o_.budget_seconds;
    if (out_of_time || StopSignals::received() != 0) {
      stopped_by_ = out_of_time ? "budget" : "signal";
      server_->stop();
    }
  }
  if (stopped_by_ == "epochs" && o_.budget_samples > 0) stopped_by_ = "budget";
  progress_->update(server_->stats().gradients, -1, last_acc_, true);
}

bool Run::stop_now() {
  if (worker_ != nullptr) {
    if (StopSignals::received() != 0) stopped_by_ = "signal";
    return worker_->done() || StopSignals::received() != 0;
  }
  const bool at_end = total_steps_ >= 0 && step_ >= total_steps_;
  if (lockstep()) {
    // Every rank stops at the same step: they agree every 16 steps.
    if (at_end) return true;
    if (step_ % 16 != 0) return false;
    const bool mine = StopSignals::received() != 0 || (o_.budget_seconds > 0 && clock() >= o_.budget_seconds);
    if (!agree_to_stop(o_.algo == "sync" ? world_.get() : nullptr, mine)) return false;
    stopped_by_ = StopSignals::received() != 0 ? "signal" : "budget";
    return true;
  }
  if (at_end) return true;  // this rank's epochs are done; the others go on with theirs
  if (!shared_stop_->should_stop(step_ * o_.batch_size, clock())) return false;
  if (shared_stop_->reason() != "peer") stopped_by_ = shared_stop_->reason();
  return true;
}

void Run::step_once() {
  const auto s0 = Clock::now();
  auto idx = sampler_->next(o_.batch_size);
  auto x = train_.images.index_select(0, idx);
  if (task_.augment) x = task_.augment(x, sampler_->generator());
  x = x.to(device_);
  auto y = train_.labels.index_select(0, idx).to(device_);
  opt_->zero_grad();
  auto loss = nll(task_.forward(*model_, x), y);
  loss.backward();
  const double compute = seconds_since(s0);
  if (rank_ == o_.straggler_rank && o_.straggler_factor > 1) {
    std::this_thread::sleep_for(std::chrono::duration<double>((o_.straggler_factor - 1) * compute));
  }
  opt_->step();
  ++step_;
  loss_.add(loss.item<double>());  // waits for the device: the step is done
  if (step_ - first_step_ == o_.warmup_steps) warm_at_ = clock();
}

void Run::train_ranks() {
  while (!stop_now()) {
    step_once();
    if (checkpoint_ && step_ % o_.checkpoint_every == 0) save_checkpoint();
    if (rank_ == 0) {
      maybe_evaluate(step_);
      progress_->update(step_, loss_.value(), last_acc_);
    }
  }
  if (rank_ == 0) progress_->update(step_, loss_.value(), last_acc_, true);
}

void Run::train() {
  if (is_server_) {
    train_server();
  } else {
    train_ranks();
  }
  train_seconds_ = clock();
  progress_->finish();
  if (StopSignals::received() != 0) stopped_by_ = "signal";
}

// ---- the end -----------------------------------------------------------------------------

void Run::end() {
  report_.steps = step_ - first_step_;
  if (is_server_) {
    const ServerStats s = server_->stats();
    staleness_ = s.staleness;
    detail_ = s.str();
    report_.trainer = false;
    report_.stats = {{"gradients", s.gradients}, {"dropped", s.dropped}, {"late", s.late},
                     {"staleness", staleness_json(s.staleness, "staleness")}};
    report_.steps = s.gradients;
  } else if (dasgd_ != nullptr) {
    // Fast ranks wait here (bounded) for the slow ones' last updates.
    dasgd_->finish(world_->options().timeout);
    const DASGDStats s = dasgd_->stats();
    staleness_ = s.staleness;
    detail_ = s.str();
    report_.stats = {{"messages_sent", s.messages_sent}, {"messages_received", s.messages_received},
                     {"coalesced", s.coalesced}, {"rejected", s.rejected},
                     {"remote_updates", s.remote_updates},
                     {"staleness", staleness_json(s.staleness, "staleness")},
                     {"lead", {{"max", s.max_lead_seen}, {"waits", s.lead_waits},
                               {"wait_seconds", s.lead_wait_seconds}, {"timeouts", s.lead_timeouts},
                               {"damped_steps", s.damped_steps}}},
                     {"failed_peers", s.failed_peers}};
  } else if (gossip_ != nullptr) {
    gossip_->finish(world_->options().timeout);
    const GossipStats s = gossip_->stats();
    staleness_ = s.lag;
    detail_ = s.str();
    report_.stats = {{"messages_sent", s.messages_sent}, {"messages_received", s.messages_received},
                     {"rejected", s.rejected}, {"staleness", staleness_json(s.lag, "lag")},
                     {"exchanges", {{"opened", s.opened}, {"completed", s.completed},
                                    {"declined", s.declined}, {"given_up", s.given_up},
                                    {"undone", s.undone}, {"answered", s.answered},
                                    {"refused", s.refused}, {"broken", s.broken}}},
                     {"failed_peers", s.failed_peers}};
  } else if (sync_ != nullptr) {
    staleness_ = sync_->stats().staleness;
    detail_ = sync_->stats().str();
    report_.stats = {{"allreduce_seconds", sync_->stats().allreduce_seconds},
                     {"staleness", staleness_json(staleness_, "staleness")}};
  } else if (local_ != nullptr) {
    staleness_ = local_->stats().staleness;
    detail_ = local_->stats().str();
    report_.stats = {{"allreduce_seconds", 0.0}, {"staleness", staleness_json(staleness_, "staleness")}};
  } else {
    worker_->finish();
    detail_ = worker_->stats().str();
    report_.stats = {{"gradients", worker_->stats().gradients},
                     {"wait_seconds", worker_->stats().wait_seconds}};
  }
  if (checkpoint_) save_checkpoint();
  if (!is_server_) {
    const int64_t warm = warm_at_ < 0 ? 0 : o_.warmup_steps;
    report_.samples_per_second = static_cast<double>(report_.steps - warm) * o_.batch_size /
                                 std::max(train_seconds_ - std::max(warm_at_, 0.0), 1e-9);
  }
  // Every rank evaluates its model on the test set (or --final-eval-samples of it).
  final_ = evaluate(task_, *model_, test_,
                    o_.final_eval_samples > 0 ? o_.final_eval_samples : test_.labels.size(0));
  report_.accuracy = final_.accuracy;
  report_.loss = final_.loss;
  evaluate_deferred();  // rank 0's copies, if any; the trained model is put back
  if (rank_ == 0 && time_to_target_ < 0 && reached_target(final_)) {
    time_to_target_ = train_seconds_;  // crossed by the end of training, after the last evaluation
  }
  wall_seconds_ = seconds_since(t0_);
  gather(report_);
}

void Run::gather(const RankReport& mine) {
  all_.assign(n_, std::nullopt);
  all_[rank_] = mine;
  if (n_ < 2) return;
  // Rank 0 gathers every live rank's report; a rank known to have failed is left out at
  // once, one that says nothing within the timeout after a while.
  std::vector<int> failed;
  if (dasgd_ != nullptr) failed = dasgd_->stats().failed_peers;
  if (gossip_ != nullptr) failed = gossip_->stats().failed_peers;
  if (server_) {
    for (const auto& w : server_->stats().workers) {
      if (w.failed) failed.push_back(w.rank);
    }
  }
  auto& store = world_->store();
  const std::string text = mine.to_json().dump();
  store.set(fmt::format("example/report/{}", rank_), std::vector<uint8_t>(text.begin(), text.end()));
  if (rank_ != 0) {
    // Rank 0 hosts the store: let it finish reading before this rank goes.
    try {
      store.wait({"example/summarized"}, world_->options().timeout);
    } catch (const std::exception&) {
    }
    return;
  }
  for (int r = 1; r < n_; ++r) {
    if (std::find(failed.begin(), failed.end(), r) != failed.end()) continue;
    const std::string key = fmt::format("example/report/{}", r);
    try {
      store.wait({key}, world_->options().timeout);
      auto v = store.get(key);
      all_[r] = RankReport::from_json(json::parse(std::string(v.begin(), v.end())));
    } catch (const std::exception&) {
      std::fprintf(stderr, "%s: rank %d sent no report; it is left out of the summary\n",
                   task_.program.c_str(), r);
    }
  }
  store.set("example/summarized", std::vector<uint8_t>{1});
}

json Run::metrics_json() const {
  json rates = json::array();
  double aggregate = 0;
  int64_t steps = 0;
  for (const auto& r : all_) {
    if (!r || !r->trainer) continue;
    rates.push_back(r->samples_per_second);
    aggregate += r->samples_per_second;
    steps += r->steps;
  }
  json ranks = json::array();
  for (int k = 0; k < n_; ++k) ranks.push_back(all_[k] ? all_[k]->to_json() : json());
  return {
      {"program", task_.program},
      {"algo", o_.algo},
      {"optimizer", o_.optimizer},
      {"lr", o_.lr},
      {"world_size", n_},
      {"workers", trainers_},
      {"epochs", o_.budget_samples > 0 || o_.budget_seconds > 0 ? json() : json(o_.epochs)},
      {"budget", {{"samples", o_.budget_samples > 0 ? json(o_.budget_samples) : json()},
                  {"seconds", o_.budget_seconds > 0 ? json(o_.budget_seconds) : json()}}},
      {"stopped_by", stopped_by_},
      {"partition", o_.partition},
      {"straggler", o_.straggler_rank >= 0 ? json({{"rank", o_.straggler_rank}, {"factor", o_.straggler_factor}}) : json()},
      {"parameters", parameters_},
      {"test_accuracy", final_.accuracy},
      {"test_loss", final_.loss},
      {"perplexity", std::exp(final_.loss)},
      {"class_accuracy", final_.per_class},
      {"worst_class_accuracy", final_.worst()},
      {"wall_seconds", wall_seconds_},
      {"train_seconds", train_seconds_},
      {"eval_seconds", eval_pause_},
      {"evaluation", {{"every_steps", o_.eval_every},
                      {"every_seconds", o_.eval_every_seconds},
                      {"samples", o_.eval_samples},
                      {"deferred", o_.eval_deferred}}},
      {"target_accuracy", o_.target_accuracy > 0 ? json(o_.target_accuracy) : json()},
      {"target_loss", o_.target_loss > 0 ? json(o_.target_loss) : json()},
      {"time_to_target_seconds", time_to_target_ < 0 ? json() : json(time_to_target_)},
      {"samples", steps * o_.batch_size},
      {"samples_per_second", rates},
      {"warmup_steps", o_.warmup_steps},
      {"device", o_.device},
      {"overlap", {{"asked", o_.overlap},
                   {"active", dasgd_ != nullptr && dasgd_->stats().overlap_active}}},
      {"aggregate_samples_per_second", aggregate},
      {"staleness", staleness_json(staleness_, staleness_kind_)},
      {"eval_curve", curve_},
      {"ranks", ranks},
  };
}

int Run::report() {
  std::printf("%s; test accuracy %.4f, loss %.4f\n", detail_.c_str(), final_.accuracy, final_.loss);
  std::fflush(stdout);
  if (rank_ != 0) return StopSignals::exit_code();
  const json m = metrics_json();
  std::printf(
      "%s: algo=%s optimizer=%s ranks=%d workers=%d test_accuracy=%.4f test_loss=%.4f "
      "perplexity=%.2f wall=%.1fs train=%.1fs "
      "samples/s=%.0f (aggregate) time_to_target=%s %s S_avg=%.2f S_max=%ld%s stopped_by=%s\n",
      task_.program.c_str(), o_.algo.c_str(), o_.optimizer.c_str(), n_, trainers_, final_.accuracy,
      final_.loss, std::exp(final_.loss),
      wall_seconds_, train_seconds_, m["aggregate_samples_per_second"].get<double>(),
      time_to_target_ < 0 ? "-" : fmt::format("{:.1f}s", time_to_target_).c_str(),
      staleness_kind_.c_str(), staleness_.mean(), static_cast<long>(staleness_.max),
      staleness_.bounded > 0 ? fmt::format(" ({} bounded)", staleness_.bounded).c_str() : "",
      stopped_by_.c_str());
  std::fflush(stdout);
  if (!o_.metrics_out.empty()) {
    std::ofstream out(o_.metrics_out);
    out << m.dump(2) << "\n";
    if (!out) throw std::runtime_error("cannot write --metrics-out " + o_.metrics_out);
  }
  return StopSignals::exit_code();
}

}  // namespace

int run(const Task& task, int argc, char** argv) {
  ExampleOptions o;
  const int parsed = parse_options(argc, argv, task, &o);
  if (parsed >= 0) return parsed;
  StopSignals::install();
  try {
    Run r(task, o);
    r.setup();
    r.train();
    r.end();
    return r.report();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", task.program.c_str(), e.what());
    return 1;
  }
}

}  // namespace examples
}  // namespace torch_asgd
