// asgd-lm: trains a decoder-only transformer (benchmarks/harness/lm/transformer.h) to
// predict the next byte of real English text (by default Debian's fortunes) with any
// torch_asgd algorithm. Same options, progress and metrics as asgd-mnist; the test set
// is held-out text, and the metrics add its loss (nats per byte) and perplexity.
//
//   asgd-launch --nproc 2 -- asgd-lm --algo dasgd --budget-seconds 600 --target-loss 1.8
//   asgd-lm --width 32 --depth 2 --heads 2 --context 32 --budget-samples 20000   (tiny)
#include <CLI/CLI.hpp>

#include "common/example.h"
#include "lm/text.h"
#include "lm/transformer.h"

int main(int argc, char** argv) {
  using namespace torch_asgd::examples;
  TransformerConfig config;
  Task task;
  task.program = "asgd-lm";
  task.default_data = "/usr/share/games/fortunes";
  task.classes = 0;      // 256 bytes: no per-class table
  task.eval_batch = 16;  // sequences per forward pass
  task.defaults = [](ExampleOptions& o) {
    o.optimizer = "adamw";
    o.batch_size = 16;
    o.eval_every = 50;
    o.eval_samples = 64;         // held-out windows evaluated during training
    o.final_eval_samples = 256;  // and at the end, on every rank
  };
  task.extra_options = [&config](CLI::App& app, ExampleOptions&) {
    app.add_option("--width", config.width, "model width")->check(CLI::PositiveNumber)->capture_default_str();
    app.add_option("--depth", config.depth, "transformer blocks")->check(CLI::PositiveNumber)->capture_default_str();
    app.add_option("--heads", config.heads, "attention heads (they must divide --width)")
        ->check(CLI::PositiveNumber)
        ->capture_default_str();
    app.add_option("--context", config.context, "bytes per sample")->check(CLI::Range(2, 4096))->capture_default_str();
  };
  task.load = [&config](const ExampleOptions& o) {
    if (config.width % config.heads != 0) {
      throw std::runtime_error("--heads " + std::to_string(config.heads) + " does not divide --width " +
                               std::to_string(config.width));
    }
    return text_windows(read_text(o.data, 20 * (config.context + 1)), config.context);
  };
  task.make_model = [&config] { return std::make_shared<TransformerImpl>(config); };
  task.forward = [](torch::nn::Module& m, const torch::Tensor& x) {
    return static_cast<TransformerImpl&>(m).forward(x);
  };
  return run(task, argc, argv);
}
