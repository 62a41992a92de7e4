// The examples' command line, declared once with CLI11: --help, the checks of every
// value and their error messages come from these declarations.
#include <cstdio>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "common/example.h"
#include "torch_asgd/comm/codec.h"

namespace torch_asgd {
namespace examples {

int parse_options(int argc, char** argv, const Task& task, ExampleOptions* out) {
  ExampleOptions& o = *out;
  o.data = task.default_data;
  if (task.defaults) task.defaults(o);
  CLI::App app(fmt::format(
      "{}: trains with a torch_asgd algorithm; several ranks: asgd-launch --nproc N -- {} ...",
      task.program, task.program));
  app.get_formatter()->column_width(30);
  app.add_option("--algo", o.algo, "the algorithm")
      ->check(CLI::IsMember({"dasgd", "gossip", "asgd-pure", "asgd-random", "asgd-shuffle", "sync",
                             "local"}))
      ->capture_default_str();
  app.add_option("--optimizer", o.optimizer, "the local rule (the server's rule for asgd-*)")
      ->check(CLI::IsMember({"sgd", "adam", "adamw"}))
      ->capture_default_str();
  app.add_option("--data", o.data, "data directory")->capture_default_str();
  app.add_option("--epochs", o.epochs, "passes over each rank's share of the training set")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--budget-samples", o.budget_samples,
                 "stop when all ranks together have trained on this many samples (instead of epochs)")
      ->check(CLI::PositiveNumber);
  app.add_option("--budget-seconds", o.budget_seconds,
                 "stop after this many seconds of training (instead of epochs)")
      ->check(CLI::PositiveNumber);
  app.add_option("--batch-size", o.batch_size, "per rank and step")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--lr", o.lr, "learning rate (default: sgd 0.03, adam and adamw 0.001)")
      ->check(CLI::PositiveNumber);
  auto* momentum = app.add_option("--momentum", o.momentum,
                                  "momentum of sgd (asgd-*: 0 unless given, as AsGrad's server)")
                       ->check(CLI::Range(0.0, 1.0))
                       ->capture_default_str();
  app.add_option("--weight-decay", o.weight_decay, "weight decay (default: adamw 0.01, else 0)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--step-rule", o.step_rule, "asgd-*: the server's step rule")
      ->check(CLI::IsMember({"constant", "delay-adaptive"}))
      ->capture_default_str();
  app.add_option("--broadcast-every", o.broadcast_every,
                 "dasgd: local steps per hand-over; gossip: per exchange")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-lead", o.max_lead,
                 "dasgd: bound on how many of its updates a rank may be ahead of its slowest peer (0: off)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--lead-policy", o.lead_policy, "dasgd: wait (until the peers catch up) or damp")
      ->check(CLI::IsMember({"wait", "damp"}))
      ->capture_default_str();
  app.add_option("--lead-measure", o.lead_measure,
                 "dasgd: the lead counts this rank's updates the slowest peer has not applied "
                 "(applied) or those beyond the slowest peer's own count (progress)")
      ->check(CLI::IsMember({"applied", "progress"}))
      ->capture_default_str();
  app.add_option("--compress", o.compress,
                 "dasgd, sync, gossip, asgd-*: how deltas / gradients / models / workers' gradients travel: "
                 "none, bf16, fp16, int8, topk (1 % of the entries; not gossip) or topk:F; for deltas and "
                 "gradients, lossy codecs keep what they lose for the next message")
      ->check([](const std::string& v) {
        try {
          torch_asgd::Compression::parse(v);
          return std::string();
        } catch (const std::exception& e) {
          return std::string(e.what());
        }
      })
      ->capture_default_str();
  app.add_option("--gossip-alpha", o.gossip_alpha, "gossip: mixing weight")
      ->check(CLI::Range(1e-6, 1.0))
      ->capture_default_str();
  app.add_option("--partition", o.partition,
                 "iid or by-label shards (each rank a few classes), or full: every rank draws from "
                 "the whole set in its own order")
      ->check(CLI::IsMember({"iid", "by-label", "full"}))
      ->capture_default_str();
  app.add_option("--sampling", o.sampling, "order within a rank's data")
      ->check(CLI::IsMember({"reshuffle", "shuffle-once", "with-replacement"}))
      ->capture_default_str();
  std::string straggler;
  app.add_option("--straggler", straggler,
                 "R:F: rank R sleeps so that each of its steps takes F times its compute time");
  app.add_option("--target-accuracy", o.target_accuracy,
                 "report the time rank 0's model first reaches this test accuracy (0..1)")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--target-loss", o.target_loss,
                 "report the time rank 0's model first reaches this test loss (nats per prediction)")
      ->check(CLI::PositiveNumber);
  app.add_option("--eval-every", o.eval_every,
                 "rank 0 evaluates every N of its steps (server: gradients); 0: off")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--eval-every-seconds", o.eval_every_seconds,
                 "rank 0 (the server) evaluates every S seconds of training")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--eval-samples", o.eval_samples, "test samples evaluated during training")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--final-eval-samples", o.final_eval_samples,
                 "test samples every rank evaluates after training (0: the whole test set)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_flag("--eval-deferred", o.eval_deferred,
               "rank 0 keeps a copy of its model at each evaluation point and evaluates the copies "
               "after training, so that evaluating pauses no rank and the times are training time "
               "for every algorithm alike (benchmarks; memory: one model per evaluation)");
  app.add_option("--metrics-out", o.metrics_out, "rank 0 writes the run's metrics as JSON");
  app.add_option("--seed", o.seed, "seed of the model, the data order and the sampling")
      ->capture_default_str();
  app.add_option("--device", o.device, "cpu, or cuda: the model on GPU local_rank % GPUs")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  app.add_option("--threads", o.threads, "intra-op threads per rank")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--checkpoint-dir", o.checkpoint_dir,
                 "each rank writes DIR/rank-R.pt (atomically: temporary file + rename)");
  app.add_option("--checkpoint-every", o.checkpoint_every,
                 "steps of each rank (the server: gradients) between checkpoints")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_flag("--resume", o.resume, "continue from --checkpoint-dir (every rank, same --algo and ranks)");
  app.add_flag("--overlap", o.overlap, "dasgd, --device cuda: copy deltas on a side stream (unverified)");
  app.add_flag("--average", o.average,
               "dasgd: scale each rank's step by 1/ranks, so that the ranks' steps add up to their "
               "mean (DDP's averaged step; keep DDP's learning rate)");
  app.add_option("--warmup-steps", o.warmup_steps,
                 "steps of each rank left out of its samples/s (CUDA's and the allocator's start-up)")
      ->check(CLI::NonNegativeNumber);
  if (task.extra_options) task.extra_options(app, o);
  try {
    app.parse(argc, argv);
    if (!straggler.empty()) {
      const auto colon = straggler.find(':');
      size_t used_r = 0, used_f = 0;
      bool ok = colon != std::string::npos;
      if (ok) {
        try {
          o.straggler_rank = std::stoi(straggler.substr(0, colon), &used_r);
          o.straggler_factor = std::stod(straggler.substr(colon + 1), &used_f);
        } catch (const std::exception&) {
          ok = false;
        }
      }
      ok = ok && used_r == colon && used_f == straggler.size() - colon - 1 && o.straggler_rank >= 0 &&
           o.straggler_factor >= 1;
      if (!ok) {
        throw CLI::ValidationError("--straggler", "'" + straggler +
                                                      "' must be RANK:FACTOR with RANK >= 0 and FACTOR >= 1 (e.g. 3:2)");
      }
    }
    if (o.resume && o.checkpoint_dir.empty()) {
      throw CLI::ValidationError("--resume", "needs --checkpoint-dir DIR, the directory of the run to continue");
    }
    if (o.compress != "none" && o.algo != "dasgd" && o.algo != "sync" && o.algo != "gossip" &&
        o.algo.rfind("asgd-", 0) != 0) {
      throw CLI::ValidationError("--compress", "compresses DASGD's deltas, SyncSGD's gradients, gossip's models and "
                                                   "AsGrad workers' gradients; --algo " + o.algo +
                                                   " is not compressed (use dasgd, sync, gossip or asgd-*)");
    }
    if (o.algo == "gossip" && o.compress.rfind("topk", 0) == 0) {
      throw CLI::ValidationError("--compress", "topk sends a few entries of what it is given, and gossip sends "
                                                   "whole models: use bf16, fp16 or int8");
    }
    if (o.partition == "by-label" && task.classes == 0) {
      throw CLI::ValidationError("--partition", "by-label needs one label per sample, and " + task.program +
                                                    "'s samples are sequences: use iid or full");
    }
    if (o.target_accuracy > 0 && o.target_loss > 0) {
      throw CLI::ValidationError("--target-loss", "give one target: --target-accuracy or --target-loss");
    }
    if (o.budget_samples > 0 && o.budget_seconds > 0) {
      throw CLI::ValidationError("--budget-samples", "give one budget: samples or seconds");
    }
  } catch (const CLI::CallForHelp&) {
    std::fputs(app.help().c_str(), stdout);
    return 0;
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "%s: %s (see --help)\n", task.program.c_str(), e.what());
    return 2;
  }
  if (o.lr == 0) o.lr = o.optimizer == "sgd" ? 0.03 : 1e-3;
  // The server applies stale gradients: AsGrad's rule has no momentum unless asked for.
  if (o.algo.rfind("asgd-", 0) == 0 && momentum->count() == 0) o.momentum = 0;
  if (o.weight_decay < 0) o.weight_decay = o.optimizer == "adamw" ? 0.01 : 0;
  return -1;
}

}  // namespace examples
}  // namespace torch_asgd
