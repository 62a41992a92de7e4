// A small ResNet for CIFAR (He et al. 2016, section 4.2): ResNet-20 is depth 3 blocks
// per stage, 16/32/64 channels; about 0.27 M parameters. BatchNorm's running
// statistics are buffers, not parameters: each rank keeps its own.
#pragma once

#include <torch/torch.h>

namespace torch_asgd {
namespace examples {

struct BasicBlockImpl : torch::nn::Module {
  BasicBlockImpl(int64_t in, int64_t out, int64_t stride)
      : conv1(torch::nn::Conv2dOptions(in, out, 3).stride(stride).padding(1).bias(false)),
        bn1(out),
        conv2(torch::nn::Conv2dOptions(out, out, 3).padding(1).bias(false)),
        bn2(out) {
    register_module("conv1", conv1);
    register_module("bn1", bn1);
    register_module("conv2", conv2);
    register_module("bn2", bn2);
    if (stride != 1 || in != out) {
      shortcut = register_module(
          "shortcut", torch::nn::Sequential(torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, 1).stride(stride).bias(false)),
                                            torch::nn::BatchNorm2d(out)));
    }
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto y = torch::relu(bn1->forward(conv1->forward(x)));
    y = bn2->forward(conv2->forward(y));
    return torch::relu(y + (shortcut.is_empty() ? x : shortcut->forward(x)));
  }
  torch::nn::Conv2d conv1;
  torch::nn::BatchNorm2d bn1;
  torch::nn::Conv2d conv2;
  torch::nn::BatchNorm2d bn2;
  torch::nn::Sequential shortcut{nullptr};
};
TORCH_MODULE(BasicBlock);

struct ResNetImpl : torch::nn::Module {
  explicit ResNetImpl(int64_t blocks_per_stage = 3)
      : stem(torch::nn::Conv2dOptions(3, 16, 3).padding(1).bias(false)), bn(16), fc(64, 10) {
    register_module("stem", stem);
    register_module("bn", bn);
    int64_t in = 16;
    for (int64_t stage = 0; stage < 3; ++stage) {
      const int64_t out = 16 << stage;
      for (int64_t b = 0; b < blocks_per_stage; ++b) {
        blocks->push_back(BasicBlock(in, out, stage > 0 && b == 0 ? 2 : 1));
        in = out;
      }
    }
    register_module("blocks", blocks);
    register_module("fc", fc);
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(bn->forward(stem->forward(x)));
    x = blocks->forward(x);
    x = torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1);
    return torch::log_softmax(fc->forward(x), 1);
  }
  torch::nn::Conv2d stem;
  torch::nn::BatchNorm2d bn;
  torch::nn::Sequential blocks;
  torch::nn::Linear fc;
};
TORCH_MODULE(ResNet);

}  // namespace examples
}  // namespace torch_asgd
