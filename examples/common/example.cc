#include "common/example.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <optional>
#include <stdexcept>
#include <thread>

#include <fmt/format.h>
#include <gloo/allreduce.h>
#include <gloo/math.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include "common/checkpoint.h"
#include "torch_asgd/torch_asgd.h"

namespace torch_asgd {
namespace examples {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

bool is_server_algo(const std::string& algo) { return algo.rfind("asgd-", 0) == 0; }

// ---- command line ------------------------------------------------------------------

int to_int(const std::string& flag, const std::string& v, int lo) {
  try {
    size_t used = 0;
    int x = std::stoi(v, &used);
    if (used == v.size() && x >= lo) return x;
  } catch (const std::exception&) {
  }
  throw std::invalid_argument(fmt::format("{} '{}' must be an integer >= {}", flag, v, lo));
}

double to_double(const std::string& flag, const std::string& v, double lo) {
  try {
    size_t used = 0;
    double x = std::stod(v, &used);
    if (used == v.size() && x >= lo) return x;
  } catch (const std::exception&) {
  }
  throw std::invalid_argument(fmt::format("{} '{}' must be a number >= {}", flag, v, lo));
}

void one_of(const std::string& flag, const std::string& v, std::initializer_list<const char*> allowed) {
  std::string list;
  for (const char* a : allowed) {
    if (v == a) return;
    list += std::string(list.empty() ? "" : ", ") + a;
  }
  throw std::invalid_argument(fmt::format("unknown {} '{}' (choose from {})", flag, v, list));
}

// ---- data ----------------------------------------------------------------------------

// The indices of shard `index` of `count` (equal sizes, the same on every rank).
torch::Tensor shard_indices(const Dataset& train, int index, int count, const ExampleOptions& o) {
  const int64_t n = train.labels.size(0);
  torch::Tensor order;
  if (o.partition == "by-label") {
    // Sorted by label: each shard holds a few classes (the heterogeneous setting).
    order = std::get<1>(torch::sort(train.labels, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  } else {
    auto gen = at::detail::createCPUGenerator(o.seed);
    order = torch::randperm(n, gen, torch::kLong);
  }
  const int64_t per = n / count;
  return order.narrow(0, index * per, per).clone();
}

class Sampler {
 public:
  Sampler(torch::Tensor shard, std::string mode, uint64_t seed)
      : shard_(std::move(shard)), mode_(std::move(mode)), gen_(at::detail::createCPUGenerator(seed)) {
    if (mode_ == "shuffle-once") order_ = torch::randperm(shard_.size(0), gen_, torch::kLong);
  }

  torch::Tensor next(int batch) {
    const int64_t n = shard_.size(0);
    if (mode_ == "with-replacement") return shard_.index_select(0, torch::randint(0, n, {batch}, gen_, torch::kLong));
    if (!order_.defined() || pos_ + batch > n) {
      if (mode_ == "reshuffle" || !order_.defined()) order_ = torch::randperm(n, gen_, torch::kLong);
      pos_ = 0;
    }
    auto idx = order_.narrow(0, pos_, batch);
    pos_ += batch;
    return shard_.index_select(0, idx);
  }

  int64_t size() const { return shard_.size(0); }
  torch::Generator& generator() { return gen_; }

  void save(torch::serialize::OutputArchive& a) const {
    a.write("sampler/generator", gen_.get_state());
    a.write("sampler/order", order_.defined() ? order_ : torch::empty({0}, torch::kLong));
    a.write("sampler/pos", torch::tensor({pos_}, torch::kLong));
  }
  void load(torch::serialize::InputArchive& a) {
    torch::Tensor state, order, pos;
    a.read("sampler/generator", state);
    a.read("sampler/order", order);
    a.read("sampler/pos", pos);
    if (pos.numel() != 1 || order.scalar_type() != torch::kLong || order.dim() != 1 ||
        pos.item<int64_t>() < 0 || pos.item<int64_t>() > shard_.size(0) ||
        (order.numel() != 0 && order.numel() != shard_.size(0))) {
      throw std::runtime_error("the checkpoint's sampler state does not fit this rank's data shard "
                               "(was the data or --batch-size changed?)");
    }
    gen_.set_state(state);
    order_ = order.numel() == 0 ? torch::Tensor() : order;
    pos_ = pos.item<int64_t>();
  }

 private:
  torch::Tensor shard_;
  std::string mode_;
  torch::Generator gen_;
  torch::Tensor order_;
  int64_t pos_ = 0;
};

double accuracy(const Task& task, torch::nn::Module& model, const Dataset& set, int64_t limit) {
  torch::NoGradGuard no_grad;
  const auto params = model.parameters();
  const torch::Device device = params.empty() ? torch::Device(torch::kCPU) : params[0].device();
  model.eval();
  const int64_t n = std::min<int64_t>(limit, set.labels.size(0));
  int64_t correct = 0;
  for (int64_t start = 0; start < n; start += 1000) {
    const int64_t len = std::min<int64_t>(1000, n - start);
    auto out = task.forward(model, set.images.narrow(0, start, len).to(device));
    correct += out.argmax(1).eq(set.labels.narrow(0, start, len).to(device)).sum().item<int64_t>();
  }
  model.train();
  return static_cast<double>(correct) / static_cast<double>(n);
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
    std::string acc = last_acc >= 0 ? fmt::format("{:.1f}%", 100 * last_acc) : "-";
    if (tty_) {
      const int width = 30;
      const int filled = total_ > 0 ? static_cast<int>(width * std::min<int64_t>(done, total_) / total_) : 0;
      std::printf("\r[%s%s] %ld/%ld | %.0f steps/s | loss %.3f | eval %s   ",
                  std::string(filled, '#').c_str(), std::string(width - filled, ' ').c_str(),
                  static_cast<long>(done), static_cast<long>(total_), rate, loss, acc.c_str());
    } else {
      std::printf("progress: %ld/%ld steps, %.0f steps/s, loss %.3f, eval %s, %.0f s\n",
                  static_cast<long>(done), static_cast<long>(total_), rate, loss, acc.c_str(), now);
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

// ---- what each rank reports ----------------------------------------------------------

struct RankReport {
  double samples_per_second = 0;  // < 0: not a training rank
  double accuracy = 0;
  uint64_t sent = 0, received = 0, coalesced = 0, rejected = 0;

  std::string encode() const {
    return fmt::format("{} {} {} {} {} {}", samples_per_second, accuracy, sent, received, coalesced,
                       rejected);
  }
  static RankReport decode(const std::string& s) {
    RankReport r;
    std::istringstream in(s);
    in >> r.samples_per_second >> r.accuracy >> r.sent >> r.received >> r.coalesced >> r.rejected;
    return r;
  }
};

template <typename Counters>
void add_counters(RankReport& r, const Counters& s) {
  r.sent += s.messages_sent;
  r.received += s.messages_received;
  r.coalesced += s.coalesced;
  r.rejected += s.rejected;
}

std::string json_number(double v) { return fmt::format("{:.6g}", v); }

// A rank's checkpoint: `key` (its optimizer's or the server's state), the model, and
// what `more` adds (the sampler).
template <typename State>
void save_rank(const RankCheckpoint& checkpoint, const CheckpointMeta& meta, const char* key,
               const State& state, const torch::nn::Module& model,
               const std::function<void(torch::serialize::OutputArchive&)>& more = {}) {
  torch::serialize::OutputArchive a, state_archive, model_archive;
  state.save(state_archive);
  model.save(model_archive);
  a.write(key, state_archive);
  a.write("model", model_archive);
  if (more) more(a);
  checkpoint.write(a, meta);
}

// Loads what save_rank() wrote; returns the step it was written at. The state goes
// first: for another model's checkpoint it names what differs.
template <typename State>
int64_t load_rank(const RankCheckpoint& checkpoint, const CheckpointMeta& meta, const char* key,
                  State& state, torch::nn::Module& model,
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

// One all-reduce over every rank: the mean of their parameters, and the smallest and
// largest of their steps (returned as {min, max}).
std::pair<int64_t, int64_t> average_models(World& world, torch::nn::Module& model, int64_t step) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> params;
  for (auto& p : model.parameters()) params.push_back(p.detach().reshape({-1}).to(torch::kDouble));
  auto flat = torch::cat(params).to(torch::kCPU).contiguous();  // Gloo reduces host memory
  auto steps = torch::tensor({static_cast<double>(step), -static_cast<double>(step)}, torch::kDouble);
  using Reduce = void (*)(void*, const void*, const void*, size_t);
  auto allreduce = [&](torch::Tensor& t, Reduce fn, uint32_t tag) {
    gloo::AllreduceOptions opts(world.gloo_context());
    opts.setInput(t.data_ptr<double>(), static_cast<size_t>(t.numel()));
    opts.setOutput(t.data_ptr<double>(), static_cast<size_t>(t.numel()));
    opts.setReduceFunction(fn);
    opts.setTag(tag);
    opts.setTimeout(world.options().timeout);
    gloo::allreduce(opts);
  };
  allreduce(flat, &gloo::sum<double>, 7001);
  allreduce(steps, &gloo::min<double>, 7002);  // {min, -max}
  flat /= world.size();
  int64_t at = 0;
  for (auto& p : model.parameters()) {
    const int64_t n = p.numel();
    p.copy_(flat.narrow(0, at, n).view_as(p));
    at += n;
  }
  return {static_cast<int64_t>(steps[0].item<double>()), -static_cast<int64_t>(steps[1].item<double>())};
}

}  // namespace

std::string usage(const Task& task) {
  return fmt::format(
      "usage: {0} [options]   (several ranks: asgd-launch --nproc N -- {0} [options])\n"
      "\n"
      "  --algo A             dasgd | gossip | asgd-pure | asgd-random | asgd-shuffle | sync | local (dasgd)\n"
      "  --data DIR           data directory ({1})\n"
      "  --epochs E           passes over the training set (1)\n"
      "  --batch-size B       per rank and step (32)\n"
      "  --lr X               learning rate (0.03)\n"
      "  --momentum X         momentum of the local rule (0.7; not used by the server algorithms)\n"
      "  --step-rule R        server algorithms: constant | delay-adaptive (constant)\n"
      "  --broadcast-every K  dasgd/gossip: local steps per exchange (1)\n"
      "  --partition P        iid | by-label: each rank sees a few classes only (iid)\n"
      "  --sampling S         reshuffle | shuffle-once | with-replacement (reshuffle)\n"
      "  --straggler R:F      rank R sleeps so that each of its steps takes F times its compute time\n"
      "  --target-accuracy A  report the time rank 0's model first reaches test accuracy A (0..1)\n"
      "  --eval-every N       rank 0 evaluates every N steps (server: gradients) (200)\n"
      "  --metrics-out FILE   rank 0 writes the run's metrics as JSON\n"
      "  --seed S             seed of the model, the shards and the sampling (1)\n"
      "  --device D           cpu | cuda: the model on GPU local_rank % GPUs (cpu)\n"
      "  --threads T          intra-op threads per rank (1)\n"
      "  --synthetic N        (CIFAR) generate N labelled images instead of reading --data\n"
      "  --checkpoint-dir D   each rank writes D/rank-R.pt (atomically: temporary file + rename)\n"
      "  --checkpoint-every N steps of each rank (the server: gradients) between checkpoints (500)\n"
      "  --resume             continue from the checkpoints in --checkpoint-dir\n"
      "  --overlap            dasgd on cuda: copies and hand-over on a side stream (unverified)\n"
      "  --help               this text\n",
      task.program, task.default_data);
}

ExampleOptions parse_options(int argc, char** argv, const Task& task) {
  ExampleOptions o;
  o.data = task.default_data;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      o.help = true;
      continue;
    }
    if (a == "--resume") {
      o.resume = true;
      continue;
    }
    if (a == "--overlap") {
      o.overlap = true;
      continue;
    }
    if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value (or is unknown)");
    const std::string v = argv[++i];
    if (a == "--algo") {
      one_of(a, v, {"dasgd", "gossip", "asgd-pure", "asgd-random", "asgd-shuffle", "sync", "local"});
      o.algo = v;
    } else if (a == "--data") {
      o.data = v;
    } else if (a == "--epochs") {
      o.epochs = to_int(a, v, 1);
    } else if (a == "--batch-size") {
      o.batch_size = to_int(a, v, 1);
    } else if (a == "--lr") {
      o.lr = to_double(a, v, 0);
    } else if (a == "--momentum") {
      o.momentum = to_double(a, v, 0);
    } else if (a == "--step-rule") {
      one_of(a, v, {"constant", "delay-adaptive"});
      o.step_rule = v;
    } else if (a == "--broadcast-every") {
      o.broadcast_every = to_int(a, v, 1);
    } else if (a == "--partition") {
      one_of(a, v, {"iid", "by-label"});
      o.partition = v;
    } else if (a == "--sampling") {
      one_of(a, v, {"reshuffle", "shuffle-once", "with-replacement"});
      o.sampling = v;
    } else if (a == "--straggler") {
      auto colon = v.find(':');
      if (colon == std::string::npos) {
        throw std::invalid_argument(fmt::format("--straggler '{}' must be RANK:FACTOR, e.g. 3:4", v));
      }
      o.straggler_rank = to_int(a, v.substr(0, colon), 0);
      o.straggler_factor = to_double(a, v.substr(colon + 1), 1);
    } else if (a == "--target-accuracy") {
      o.target_accuracy = to_double(a, v, 0);
      if (o.target_accuracy > 1) throw std::invalid_argument("--target-accuracy is a fraction in 0..1");
    } else if (a == "--eval-every") {
      o.eval_every = to_int(a, v, 1);
    } else if (a == "--metrics-out") {
      o.metrics_out = v;
    } else if (a == "--seed") {
      o.seed = static_cast<uint64_t>(to_int(a, v, 0));
    } else if (a == "--device") {
      one_of(a, v, {"cpu", "cuda"});
      o.device = v;
    } else if (a == "--threads") {
      o.threads = to_int(a, v, 1);
    } else if (a == "--synthetic") {
      o.synthetic = to_int(a, v, 1);
    } else if (a == "--checkpoint-dir") {
      o.checkpoint_dir = v;
    } else if (a == "--checkpoint-every") {
      o.checkpoint_every = to_int(a, v, 1);
    } else {
      throw std::invalid_argument("unknown option " + a);
    }
  }
  if (o.resume && o.checkpoint_dir.empty()) {
    throw std::invalid_argument("--resume needs --checkpoint-dir DIR, the directory of the run to continue");
  }
  return o;
}

int run(const Task& task, int argc, char** argv) {
  ExampleOptions o;
  try {
    o = parse_options(argc, argv, task);
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "%s: %s (see --help)\n", task.program.c_str(), e.what());
    return 2;
  }
  if (o.help) {
    std::fputs(usage(task).c_str(), stdout);
    return 0;
  }
  try {
    torch::set_num_threads(o.threads);
    if (o.device == "cuda" && !torch::cuda::is_available()) {
      throw ConfigError(
          "--device cuda: this LibTorch sees no CUDA device (Debian's LibTorch is CPU-only: "
          "build against a CUDA LibTorch as the README's GPU section says); use --device cpu");
    }
    auto world = World::from_env();
    // Ranks on one machine share its GPUs round-robin by local rank.
    const torch::Device device =
        o.device == "cuda"
            ? torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(
                                              world->local_rank() % torch::cuda::device_count()))
            : torch::Device(torch::kCPU);
    const int n = world->size(), rank = world->rank();
    const bool server_algo = is_server_algo(o.algo);
    if (server_algo && n < 2) {
      throw ConfigError(fmt::format("--algo {} needs at least 2 ranks (a server and a worker); start "
                                    "it with asgd-launch --nproc 3 -- {} ...",
                                    o.algo, task.program));
    }
    if (o.straggler_rank >= n) {
      throw ConfigError(fmt::format("--straggler rank {} is out of range: this job has ranks 0..{}",
                                    o.straggler_rank, n - 1));
    }
    if (server_algo && o.straggler_rank == 0) {
      throw ConfigError("--straggler 0: rank 0 is the parameter server, which computes no "
                        "gradients; pick a worker rank 1.." + std::to_string(n - 1));
    }
    auto [train, test] = task.load(o);

    // Same initial model everywhere.
    torch::manual_seed(o.seed);
    auto model = task.make_model();
    model->to(device);
    const bool is_server = server_algo && rank == 0;
    const int trainers = server_algo ? n - 1 : n;
    const int my_shard = server_algo ? rank - 1 : rank;
    const auto t0 = Clock::now();
    std::vector<std::pair<double, double>> curve;
    double time_to_target = -1;
    double last_acc = -1;
    auto evaluate_rank0 = [&] {
      last_acc = accuracy(task, *model, test, 2000);
      curve.emplace_back(seconds_since(t0), last_acc);
      if (o.target_accuracy > 0 && time_to_target < 0 && last_acc >= o.target_accuracy) {
        time_to_target = seconds_since(t0);
      }
    };

    RankReport report;
    StalenessStats staleness;
    std::string detail;
    std::vector<int> failed;  // ranks this rank knows to have failed
    const int64_t per_shard = train.labels.size(0) / trainers;
    const int64_t steps_per_epoch = per_shard / o.batch_size;
    if (steps_per_epoch < 1) {
      throw ConfigError(fmt::format("each of the {} training ranks gets {} samples, fewer than one "
                                    "batch of {}: use a smaller --batch-size or fewer ranks",
                                    trainers, per_shard, o.batch_size));
    }

    std::optional<RankCheckpoint> checkpoint;
    if (!o.checkpoint_dir.empty()) checkpoint.emplace(o.checkpoint_dir, rank);
    CheckpointMeta meta{o.algo, n, rank, 0};

    if (is_server) {
      const int64_t total = int64_t{o.epochs} * (train.labels.size(0) / o.batch_size);
      ParameterServer server(model->named_parameters(),
                             ServerOptions(o.lr)
                                 .policy(parse_assign_policy(o.algo.substr(5)))
                                 .step_rule(parse_step_rule(o.step_rule))
                                 .max_gradients(total)
                                 .seed(o.seed),
                             world);
      if (o.resume) {
        const int64_t at = load_rank(*checkpoint, meta, "server", server, *model);
        std::printf("rank 0: resumed from %s at gradient %ld\n", checkpoint->path().c_str(),
                    static_cast<long>(at));
      }
      auto save_checkpoint = [&] {
        meta.step = server.stats().gradients;
        save_rank(*checkpoint, meta, "server", server, *model);
      };
      Progress progress(true, total);
      int64_t next_eval = server.stats().gradients + o.eval_every;
      int64_t next_checkpoint = server.stats().gradients + o.checkpoint_every;
      while (server.serve(std::chrono::milliseconds(50))) {
        const int64_t done = server.stats().gradients;
        if (done >= next_eval) {
          evaluate_rank0();
          next_eval += o.eval_every;
        }
        if (checkpoint && done >= next_checkpoint) {
          save_checkpoint();
          next_checkpoint = done + o.checkpoint_every;
        }
        progress.update(done, 0, last_acc);
      }
      if (checkpoint) save_checkpoint();
      progress.update(server.stats().gradients, 0, last_acc, true);
      progress.finish();
      auto s = server.stats();
      staleness = s.staleness;
      detail = s.str();
      for (const auto& w : s.workers) {
        if (w.failed) failed.push_back(w.rank);
      }
      report.samples_per_second = -1;
    } else {
      Sampler sampler(shard_indices(train, my_shard, trainers, o), o.sampling,
                      o.seed * 1000 + static_cast<uint64_t>(rank));
      std::unique_ptr<torch::optim::Optimizer> opt;
      DASGD* dasgd = nullptr;
      SyncSGD* sync = nullptr;
      AsyncSGD* worker = nullptr;
      if (o.algo == "dasgd" || o.algo == "gossip") {
        auto d = std::make_unique<DASGD>(
            model->named_parameters(),
            DASGDOptions(o.lr)
                .momentum(o.momentum)
                .broadcast_every(o.broadcast_every)
                .mode(o.algo == "dasgd" ? DASGDMode::kDelta : DASGDMode::kGossip)
                .overlap(o.overlap),
            world);
        dasgd = d.get();
        opt = std::move(d);
      } else if (o.algo == "sync" || o.algo == "local") {
        auto s = std::make_unique<SyncSGD>(model->named_parameters(),
                                           SyncSGDOptions(o.lr).momentum(o.momentum).local(o.algo == "local"),
                                           world);
        sync = s.get();
        opt = std::move(s);
      } else {
        auto w = std::make_unique<AsyncSGD>(model->named_parameters(), AsyncSGDOptions(), world);
        worker = w.get();
        opt = std::move(w);
      }
      int64_t step = 0;
      if (o.resume) {
        step = load_rank(*checkpoint, meta, "optimizer", *opt, *model,
                         [&](torch::serialize::InputArchive& a) { sampler.load(a); });
        if (n > 1 && (o.algo == "dasgd" || o.algo == "gossip" || o.algo == "sync")) {
          // The ranks' checkpoints are from different moments and what was in flight
          // is gone: restart from their mean, which every replica then shares.
          auto [lo, hi] = average_models(*world, *model, step);
          if (o.algo == "sync" && lo != hi) {
            // Killed between two ranks' writes: sync steps in lock-step, so every rank
            // goes on from the oldest step (with the mean model).
            std::printf("rank %d: the checkpoints are from steps %ld to %ld; sync resumes "
                        "every rank at step %ld\n",
                        rank, static_cast<long>(lo), static_cast<long>(hi), static_cast<long>(lo));
            step = lo;
          }
        }
        std::printf("rank %d: resumed from %s at step %ld\n", rank, checkpoint->path().c_str(),
                    static_cast<long>(step));
      }
      const int64_t first_step = step;
      auto save_checkpoint = [&] {
        meta.step = step;
        save_rank(*checkpoint, meta, "optimizer", *opt, *model,
                  [&](torch::serialize::OutputArchive& a) { sampler.save(a); });
      };
      const int64_t total = server_algo ? -1 : int64_t{o.epochs} * steps_per_epoch;
      Progress progress(rank == 0, total);
      const bool straggle = rank == o.straggler_rank && o.straggler_factor > 1;
      double loss_avg = 0;
      double compute_seconds = 0;
      while (server_algo ? !worker->done() : step < total) {
        const auto s0 = Clock::now();
        auto idx = sampler.next(o.batch_size);
        auto x = train.images.index_select(0, idx);
        if (task.augment) x = task.augment(x, sampler.generator());
        x = x.to(device);
        auto y = train.labels.index_select(0, idx).to(device);
        opt->zero_grad();
        auto loss = torch::nll_loss(task.forward(*model, x), y);
        loss.backward();
        const double compute = seconds_since(s0);
        if (straggle) {
          std::this_thread::sleep_for(std::chrono::duration<double>((o.straggler_factor - 1) * compute));
        }
        opt->step();
        compute_seconds += compute;
        ++step;
        if (checkpoint && step % o.checkpoint_every == 0) save_checkpoint();
        loss_avg = 0.95 * loss_avg + 0.05 * loss.item<double>();
        if (rank == 0) {
          if (step % o.eval_every == 0) evaluate_rank0();
          progress.update(step, loss_avg, last_acc);
        }
      }
      const double train_seconds = seconds_since(t0);
      if (rank == 0) {
        progress.update(step, loss_avg, last_acc, true);
        progress.finish();
      }
      if (dasgd != nullptr) {
        // Fast ranks wait here for the slow ones' last updates.
        dasgd->finish(world->options().timeout);
        auto s = dasgd->stats();
        staleness = s.staleness;
        add_counters(report, s);
        detail = s.str();
        failed = s.failed_peers;
      } else if (sync != nullptr) {
        staleness = sync->stats().staleness;
        detail = sync->stats().str();
      } else {
        worker->finish();
        detail = worker->stats().str();
      }
      if (checkpoint) save_checkpoint();
      report.samples_per_second = static_cast<double>(step - first_step) * o.batch_size / train_seconds;
    }

    // Every rank evaluates its model on the full test set.
    report.accuracy = accuracy(task, *model, test, test.labels.size(0));
    const double wall = seconds_since(t0);
    std::vector<RankReport> all(n);
    std::vector<bool> reported(n, false);
    all[rank] = report;
    reported[rank] = true;
    if (n > 1) {
      // Rank 0 gathers every live rank's report; a rank known to have failed is left
      // out at once, one that says nothing within the timeout after a while.
      auto& store = world->store();
      const std::string mine = report.encode();
      store.set(fmt::format("example/report/{}", rank), std::vector<uint8_t>(mine.begin(), mine.end()));
      if (rank == 0) {
        for (int r = 1; r < n; ++r) {
          if (std::find(failed.begin(), failed.end(), r) != failed.end()) continue;
          const std::string key = fmt::format("example/report/{}", r);
          try {
            store.wait({key}, world->options().timeout);
            auto v = store.get(key);
            all[r] = RankReport::decode(std::string(v.begin(), v.end()));
            reported[r] = true;
          } catch (const std::exception&) {
            std::fprintf(stderr, "%s: rank %d sent no report; it is left out of the summary\n",
                         task.program.c_str(), r);
          }
        }
        store.set("example/summarized", std::vector<uint8_t>{1});
      } else {
        // Rank 0 hosts the store: let it finish reading before this rank goes.
        try {
          store.wait({"example/summarized"}, world->options().timeout);
        } catch (const std::exception&) {
        }
      }
    }
    std::printf("rank %d: %s; test accuracy %.4f\n", rank, detail.c_str(), report.accuracy);
    if (rank != 0) return 0;

    std::vector<double> rates;
    double aggregate = 0;
    RankReport totals;
    for (int k = 0; k < n; ++k) {
      if (!reported[k]) continue;
      const RankReport& r = all[k];
      if (r.samples_per_second >= 0) {
        rates.push_back(r.samples_per_second);
        aggregate += r.samples_per_second;
      }
      totals.sent += r.sent;
      totals.received += r.received;
      totals.coalesced += r.coalesced;
      totals.rejected += r.rejected;
    }
    std::printf(
        "%s: algo=%s ranks=%d workers=%d epochs=%d test_accuracy=%.4f wall=%.1fs "
        "samples/s=%.0f (aggregate) time_to_target=%s staleness S_avg=%.2f S_max=%ld\n",
        task.program.c_str(), o.algo.c_str(), n, trainers, o.epochs, report.accuracy, wall,
        aggregate, time_to_target < 0 ? "-" : fmt::format("{:.1f}s", time_to_target).c_str(),
        staleness.mean(), static_cast<long>(staleness.max));
    if (!o.metrics_out.empty()) {
      std::string rates_json, curve_json;
      for (double r : rates) rates_json += (rates_json.empty() ? "" : ", ") + json_number(r);
      for (auto& [s, a] : curve) {
        curve_json += (curve_json.empty() ? "" : ", ") + fmt::format("[{}, {}]", json_number(s), json_number(a));
      }
      std::ofstream out(o.metrics_out);
      out << "{\n"
          << fmt::format("  \"algo\": \"{}\",\n  \"world_size\": {},\n  \"workers\": {},\n  \"epochs\": {},\n",
                         o.algo, n, trainers, o.epochs)
          << fmt::format("  \"test_accuracy\": {},\n  \"wall_seconds\": {},\n", json_number(report.accuracy),
                         json_number(wall))
          << fmt::format("  \"time_to_target_seconds\": {},\n",
                         time_to_target < 0 ? "null" : json_number(time_to_target))
          << fmt::format("  \"samples_per_second\": [{}],\n  \"aggregate_samples_per_second\": {},\n",
                         rates_json, json_number(aggregate))
          << fmt::format("  \"staleness\": {{\"mean\": {}, \"max\": {}, \"count\": {}}},\n",
                         json_number(staleness.mean()), staleness.max, staleness.count)
          << fmt::format("  \"messages\": {{\"sent\": {}, \"received\": {}, \"coalesced\": {}, \"rejected\": {}}},\n",
                         totals.sent, totals.received, totals.coalesced, totals.rejected)
          << fmt::format("  \"eval_curve\": [{}]\n", curve_json) << "}\n";
      if (!out) throw std::runtime_error("cannot write --metrics-out " + o.metrics_out);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", task.program.c_str(), e.what());
    return 1;
  }
}

}  // namespace examples
}  // namespace torch_asgd
