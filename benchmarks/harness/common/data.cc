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

double Accuracy::worst() const {
  return per_class.empty() ? overall : *std::min_element(per_class.begin(), per_class.end());
}

Accuracy evaluate(const Task& task, torch::nn::Module& model, const Dataset& set, int64_t limit) {
  torch::NoGradGuard no_grad;
  const auto params = model.parameters();
  const torch::Device device = params.empty() ? torch::Device(torch::kCPU) : params[0].device();
  model.eval();
  const int64_t n = std::min<int64_t>(limit, set.labels.size(0));
  std::vector<int64_t> correct(10, 0), seen(10, 0);
  for (int64_t start = 0; start < n; start += 1000) {
    const int64_t len = std::min<int64_t>(1000, n - start);
    auto out = task.forward(model, set.images.narrow(0, start, len).to(device));
    auto labels = set.labels.narrow(0, start, len);
    auto hits = out.argmax(1).to(torch::kCPU).eq(labels);
    auto l = labels.accessor<int64_t, 1>();
    auto h = hits.accessor<bool, 1>();
    for (int64_t i = 0; i < len; ++i) {
      const int64_t c = l[i];
      if (c < 0 || c >= 10) continue;
      ++seen[c];
      correct[c] += h[i] ? 1 : 0;
    }
  }
  model.train();
  Accuracy acc;
  int64_t all = 0, total = 0;
  for (int c = 0; c < 10; ++c) {
    all += correct[c];
    total += seen[c];
    if (seen[c] > 0) acc.per_class.push_back(static_cast<double>(correct[c]) / static_cast<double>(seen[c]));
  }
  acc.overall = total > 0 ? static_cast<double>(all) / static_cast<double>(total) : 0;
  return acc;
}

}  // namespace examples
}  // namespace torch_asgd
