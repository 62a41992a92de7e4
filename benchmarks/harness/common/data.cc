#include "common/data.h"

#include <algorithm>
#include <stdexcept>

namespace torch_asgd {
namespace examples {

torch::Tensor rank_indices(const Dataset& train, int index, int count, const ExampleOptions& o) {
  const int64_t n = train.labels.size(0);
  if (o.partition == "full") return torch::arange(n, torch::kLong);
  torch::Tensor order;
  if (o.partition == "by-label") {
    // (A Task without classes, whose labels are sequences, is refused by-label when the
    // options are parsed.)
    // Sorted by label: each shard holds a few classes (the heterogeneous setting).
    order = std::get<1>(torch::sort(train.labels, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  } else {
    auto gen = at::detail::createCPUGenerator(o.seed);
    order = torch::randperm(n, gen, torch::kLong);
  }
  const int64_t per = n / count;
  return order.narrow(0, index * per, per).clone();
}

Sampler::Sampler(torch::Tensor indices, std::string mode, uint64_t seed)
    : indices_(std::move(indices)), mode_(std::move(mode)), gen_(at::detail::createCPUGenerator(seed)) {
  if (mode_ == "shuffle-once") order_ = torch::randperm(indices_.size(0), gen_, torch::kLong);
}

torch::Tensor Sampler::next(int batch) {
  const int64_t n = indices_.size(0);
  if (mode_ == "with-replacement") {
    return indices_.index_select(0, torch::randint(0, n, {batch}, gen_, torch::kLong));
  }
  if (!order_.defined() || pos_ + batch > n) {
    if (mode_ == "reshuffle" || !order_.defined()) order_ = torch::randperm(n, gen_, torch::kLong);
    pos_ = 0;
  }
  auto idx = order_.narrow(0, pos_, batch);
  pos_ += batch;
  return indices_.index_select(0, idx);
}

void Sampler::save(torch::serialize::OutputArchive& a) const {
  a.write("sampler/generator", gen_.get_state());
  a.write("sampler/order", order_.defined() ? order_ : torch::empty({0}, torch::kLong));
  a.write("sampler/pos", torch::tensor({pos_}, torch::kLong));
}

void Sampler::load(torch::serialize::InputArchive& a) {
  torch::Tensor state, order, pos;
  a.read("sampler/generator", state);
  a.read("sampler/order", order);
  a.read("sampler/pos", pos);
  if (pos.numel() != 1 || order.scalar_type() != torch::kLong || order.dim() != 1 ||
      pos.item<int64_t>() < 0 || pos.item<int64_t>() > indices_.size(0) ||
      (order.numel() != 0 && order.numel() != indices_.size(0))) {
    throw std::runtime_error("the checkpoint's sampler state does not fit this rank's data "
                             "(was the data, --partition or --batch-size changed?)");
  }
  gen_.set_state(state);
  order_ = order.numel() == 0 ? torch::Tensor() : order;
  pos_ = pos.item<int64_t>();
}

double Evaluation::worst() const {
  return per_class.empty() ? accuracy : *std::min_element(per_class.begin(), per_class.end());
}

torch::Tensor nll(const torch::Tensor& log_probs, const torch::Tensor& labels,
                  torch::Reduction::Reduction reduction) {
  return torch::nll_loss(log_probs.reshape({-1, log_probs.size(-1)}), labels.reshape({-1}), {}, reduction);
}

Evaluation evaluate(const Task& task, torch::nn::Module& model, const Dataset& set, int64_t limit) {
  torch::NoGradGuard no_grad;
  const auto params = model.parameters();
  const torch::Device device = params.empty() ? torch::Device(torch::kCPU) : params[0].device();
  model.eval();
  const int64_t n = std::min<int64_t>(limit, set.labels.size(0));
  const int classes = std::max(task.classes, 0);
  std::vector<int64_t> correct(classes, 0), seen(classes, 0);
  int64_t hits_all = 0, predictions = 0;
  double loss_sum = 0;
  const int64_t chunk = std::max<int64_t>(task.eval_batch, 1);
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t len = std::min<int64_t>(chunk, n - start);
    auto out = task.forward(model, set.images.narrow(0, start, len).to(device));
    auto labels = set.labels.narrow(0, start, len);
    loss_sum += nll(out, labels.to(device), torch::Reduction::Sum).item<double>();
    auto flat = labels.reshape({-1});
    auto hits = out.argmax(-1).reshape({-1}).to(torch::kCPU).eq(flat);
    hits_all += hits.sum().item<int64_t>();
    predictions += flat.size(0);
    if (classes == 0) continue;
    auto l = flat.accessor<int64_t, 1>();
    auto h = hits.accessor<bool, 1>();
    for (int64_t i = 0; i < flat.size(0); ++i) {
      const int64_t c = l[i];
      if (c < 0 || c >= classes) continue;
      ++seen[c];
      correct[c] += h[i] ? 1 : 0;
    }
  }
  model.train();
  Evaluation e;
  for (int c = 0; c < classes; ++c) {
    if (seen[c] > 0) e.per_class.push_back(static_cast<double>(correct[c]) / static_cast<double>(seen[c]));
  }
  e.accuracy = predictions > 0 ? static_cast<double>(hits_all) / static_cast<double>(predictions) : 0;
  e.loss = predictions > 0 ? loss_sum / static_cast<double>(predictions) : 0;
  return e;
}

}  // namespace examples
}  // namespace torch_asgd
