// asgd-mnist: trains LibTorch's MNIST example network on MNIST-format data (by default
// Debian's real Fashion-MNIST) with any torch_asgd algorithm.
//
//   asgd-launch --nproc 4 -- asgd-mnist --algo dasgd --epochs 1
//   asgd-launch --nproc 4 -- asgd-mnist --algo asgd-shuffle --straggler 3:2 --metrics-out m.json
//
// See --help for every option.
#include "common/example.h"
#include "mnist/idx.h"
#include "mnist/net.h"

int main(int argc, char** argv) {
  using namespace torch_asgd::examples;
  Task task;
  task.program = "asgd-mnist";
  task.default_data = "/usr/share/datasets/fashion-mnist";
  task.load = [](const ExampleOptions& o) {
    auto train = read_idx(o.data, "train");
    auto test = read_idx(o.data, "t10k");
    return std::make_pair(Dataset{train.images, train.labels}, Dataset{test.images, test.labels});
  };
  task.make_model = [] { return std::make_shared<MnistNetImpl>(); };
  task.forward = [](torch::nn::Module& m, const torch::Tensor& x) {
    return static_cast<MnistNetImpl&>(m).forward(x);
  };
  return run(task, argc, argv);
}
