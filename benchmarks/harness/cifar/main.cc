// asgd-cifar: trains a ResNet-20 on CIFAR-10 (binary version) with any torch_asgd
// algorithm, with random crop and horizontal flip; --synthetic N generates a labelled
// stand-in for smoke runs. Same options, progress and metrics as asgd-mnist.
//
//   asgd-launch --nproc 2 -- asgd-cifar --data DIR --algo dasgd --epochs 1
//   asgd-launch --nproc 3 -- asgd-cifar --synthetic 2000 --algo asgd-shuffle
#include "cifar/cifar10.h"
#include "cifar/resnet.h"
#include <CLI/CLI.hpp>

#include "common/example.h"

int main(int argc, char** argv) {
  using namespace torch_asgd::examples;
  Task task;
  task.program = "asgd-cifar";
  task.default_data = "data/cifar-10-batches-bin";
  task.extra_options = [](CLI::App& app, ExampleOptions& o) {
    app.add_option("--synthetic", o.synthetic,
                   "generate N labelled images instead of reading --data")
        ->check(CLI::PositiveNumber);
  };
  task.load = [](const ExampleOptions& o) {
    return o.synthetic > 0 ? synthetic_cifar10(o.synthetic, o.seed) : read_cifar10(o.data);
  };
  task.make_model = [] { return std::make_shared<ResNetImpl>(3); };
  task.forward = [](torch::nn::Module& m, const torch::Tensor& x) {
    return static_cast<ResNetImpl&>(m).forward(x);
  };
  task.augment = [](const torch::Tensor& x, torch::Generator& gen) {
    // Random crop of 32 from the 40x40 zero-padded image, and a horizontal flip.
    auto padded = torch::constant_pad_nd(x, {4, 4, 4, 4});
    auto out = torch::empty_like(x);
    for (int64_t i = 0; i < x.size(0); ++i) {
      auto r = torch::randint(0, 9, {3}, gen, torch::kLong);
      auto crop = padded[i].narrow(1, r[0].item<int64_t>(), 32).narrow(2, r[1].item<int64_t>(), 32);
      out[i].copy_(r[2].item<int64_t>() % 2 ? crop.flip({2}) : crop);
    }
    return out;
  };
  return run(task, argc, argv);
}
