// A decoder-only transformer over bytes, from LibTorch's modules: token and position
// embeddings, `depth` pre-norm blocks of causal self-attention and a 4x MLP, a final
// norm and a linear head. No dropout: a step is a function of the model and the batch.
//
// Sizes: about 12 * depth * width^2 parameters in the blocks, plus
// (2 * 256 + context) * width in the embeddings and the head. The default (width 384,
// depth 6, context 128) has 10,893,568; the tiny one of the tests (32, 2, 32) 43,136.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include <torch/torch.h>

namespace torch_asgd {
namespace examples {

struct TransformerConfig {
  int64_t width = 384;
  int64_t depth = 6;
  int64_t heads = 6;
  int64_t context = 128;  // bytes a sample holds (and predicts)
  static constexpr int64_t kVocabulary = 256;  // bytes
};

// Multi-head self-attention in which position t sees positions 0..t only.
class CausalSelfAttentionImpl : public torch::nn::Module {
 public:
  CausalSelfAttentionImpl(int64_t width, int64_t heads) : heads_(heads) {
    qkv_ = register_module("qkv", torch::nn::Linear(width, 3 * width));
    proj_ = register_module("proj", torch::nn::Linear(width, width));
  }

  torch::Tensor forward(const torch::Tensor& x) {  // [B, T, C]
    const int64_t b = x.size(0), t = x.size(1), c = x.size(2), d = c / heads_;
    // [B, T, 3, H, D] -> [3, B, H, T, D]
    auto qkv = qkv_->forward(x).view({b, t, 3, heads_, d}).permute({2, 0, 3, 1, 4});
    auto q = qkv[0], k = qkv[1], v = qkv[2];
    auto scores = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(d));
    // The future (above the diagonal) gets no weight.
    auto future = torch::ones({t, t}, torch::TensorOptions().dtype(torch::kBool).device(x.device())).triu(1);
    scores = scores.masked_fill(future, -std::numeric_limits<float>::infinity());
    auto y = torch::matmul(torch::softmax(scores, -1), v);  // [B, H, T, D]
    return proj_->forward(y.transpose(1, 2).reshape({b, t, c}));
  }

 private:
  int64_t heads_;
  torch::nn::Linear qkv_{nullptr}, proj_{nullptr};
};
TORCH_MODULE(CausalSelfAttention);

class TransformerBlockImpl : public torch::nn::Module {
 public:
  TransformerBlockImpl(int64_t width, int64_t heads) {
    norm1_ = register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})));
    attention_ = register_module("attention", CausalSelfAttention(width, heads));
    norm2_ = register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})));
    up_ = register_module("up", torch::nn::Linear(width, 4 * width));
    down_ = register_module("down", torch::nn::Linear(4 * width, width));
  }

  torch::Tensor forward(torch::Tensor x) {
    x = x + attention_->forward(norm1_->forward(x));
    return x + down_->forward(torch::gelu(up_->forward(norm2_->forward(x))));
  }

 private:
  torch::nn::LayerNorm norm1_{nullptr}, norm2_{nullptr};
  CausalSelfAttention attention_{nullptr};
  torch::nn::Linear up_{nullptr}, down_{nullptr};
};
TORCH_MODULE(TransformerBlock);

class TransformerImpl : public torch::nn::Module {
 public:
  explicit TransformerImpl(const TransformerConfig& c) : config_(c) {
    if (c.width <= 0 || c.depth <= 0 || c.heads <= 0 || c.context <= 0 || c.width % c.heads != 0) {
      throw std::invalid_argument("the transformer needs positive sizes and a width that the heads divide (width " +
                                  std::to_string(c.width) + ", heads " + std::to_string(c.heads) + ")");
    }
    tokens_ = register_module("tokens", torch::nn::Embedding(TransformerConfig::kVocabulary, c.width));
    positions_ = register_parameter("positions", torch::randn({c.context, c.width}) * 0.02);
    blocks_ = register_module("blocks", torch::nn::ModuleList());
    for (int64_t i = 0; i < c.depth; ++i) blocks_->push_back(TransformerBlock(c.width, c.heads));
    norm_ = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.width})));
    head_ = register_module("head", torch::nn::Linear(c.width, TransformerConfig::kVocabulary));
    torch::NoGradGuard no_grad;
    tokens_->weight.normal_(0, 0.02);
  }

  // bytes [B, T] (int64, T <= context) -> log-probabilities of the next byte [B, T, 256].
  torch::Tensor forward(const torch::Tensor& bytes) {
    const int64_t t = bytes.size(1);
    auto x = tokens_->forward(bytes) + positions_.narrow(0, 0, t);
    for (const auto& block : *blocks_) x = block->as<TransformerBlockImpl>()->forward(x);
    return torch::log_softmax(head_->forward(norm_->forward(x)), -1);
  }

  const TransformerConfig& config() const { return config_; }

 private:
  TransformerConfig config_;
  torch::nn::Embedding tokens_{nullptr};
  torch::Tensor positions_;
  torch::nn::ModuleList blocks_{nullptr};
  torch::nn::LayerNorm norm_{nullptr};
  torch::nn::Linear head_{nullptr};
};
TORCH_MODULE(Transformer);

}  // namespace examples
}  // namespace torch_asgd
