// LibTorch's MNIST example, trained on every rank the launcher started, with DASGD: no
// rank waits for another. What torch_asgd adds to a plain LibTorch loop is marked (*).
//
//   asgd-launch --nproc 4 -- asgd-example-mnist DATA_DIR [EPOCHS]
//
// DATA_DIR holds MNIST-format IDX files, uncompressed (torch::data::datasets::MNIST
// reads those): scripts/demo.sh unpacks Debian's Fashion-MNIST into build/fashion-mnist.
#include <cstdio>
#include <iostream>

#include <torch/torch.h>
#include <torch_asgd/torch_asgd.h>

struct Net : torch::nn::Module {
  Net() {
    conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 10, 5)));
    conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(10, 20, 5)));
    fc1 = register_module("fc1", torch::nn::Linear(320, 50));
    fc2 = register_module("fc2", torch::nn::Linear(50, 10));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(torch::max_pool2d(conv1->forward(x), 2));
    x = torch::relu(torch::max_pool2d(conv2->forward(x), 2)).view({-1, 320});
    return torch::log_softmax(fc2->forward(torch::relu(fc1->forward(x))), 1);
  }
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};

int main(int argc, char** argv) try {
  const std::string data = argc > 1 ? argv[1] : "build/fashion-mnist";
  const int epochs = argc > 2 ? std::stoi(argv[2]) : 1;
  auto world = torch_asgd::World::from_env();  // (*) torchrun's, Slurm's or Open MPI's variables
  auto net = std::make_shared<Net>();
  // (*) Any torch::optim optimizer is the local rule. Every rank starts from rank 0's
  // model; average(true) makes the ranks' steps add up to their mean, as DDP's do.
  torch_asgd::DASGD opt(
      std::make_shared<torch::optim::SGD>(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9)),
      torch_asgd::DASGDOptions().average(true), world, net);

  auto normalize = torch::data::transforms::Normalize<>(0.5, 0.5);
  auto train = torch::data::datasets::MNIST(data).map(normalize).map(torch::data::transforms::Stack<>());
  for (int epoch = 1; epoch <= epochs; ++epoch) {
    // Each rank its own share of the training set, reshuffled every epoch. (The loader
    // keeps a copy of the sampler: a new one each epoch.)
    torch::data::samplers::DistributedRandomSampler sampler(*train.size(), world->size(), world->rank());
    sampler.set_epoch(epoch);
    auto loader = torch::data::make_data_loader(train, sampler, 64);
    for (auto& batch : *loader) {
      opt.zero_grad();
      auto loss = torch::nll_loss(net->forward(batch.data), batch.target);
      loss.backward();
      opt.step();  // (*) never waits for another rank
    }
  }
  opt.finish();  // (*) the last updates reach every rank: the replicas agree again

  auto test = torch::data::datasets::MNIST(data, torch::data::datasets::MNIST::Mode::kTest)
                  .map(normalize).map(torch::data::transforms::Stack<>());
  const auto n = *test.size();
  auto test_loader = torch::data::make_data_loader(std::move(test), 1000);
  torch::NoGradGuard no_grad;
  net->eval();
  int64_t correct = 0;
  for (auto& batch : *test_loader) {
    correct += net->forward(batch.data).argmax(1).eq(batch.target).sum().item<int64_t>();
  }
  std::printf("rank %d: test accuracy %.4f; %s\n", world->rank(), static_cast<double>(correct) / n,
              opt.stats().str().c_str());
  return 0;
} catch (const c10::Error& e) {  // LibTorch's: the data, most likely
  std::cerr << "asgd-example-mnist: " << e.what_without_backtrace()
            << " (DATA_DIR must hold MNIST's four uncompressed IDX files)\n";
  return 1;
} catch (const std::exception& e) {  // torch_asgd's: one line that says what to do
  std::cerr << "asgd-example-mnist: " << e.what() << "\n";
  return 1;
}
