#include "torch_asgd/optim/detail/checkpoint.h"

#include <cstring>

#include <fmt/format.h>
#include <torch/torch.h>

#include "torch_asgd/comm/error.h"

namespace torch_asgd {
namespace detail {

void write_fingerprint(torch::serialize::OutputArchive& archive, const std::string& prefix,
                       const Fingerprint& fp) {
  write_string(archive, prefix + "/fingerprint", fp.serialize());
}

void check_fingerprint(torch::serialize::InputArchive& archive, const std::string& prefix,
                       const Fingerprint& current, const std::string& who) {
  torch::Tensor t;
  if (!archive.try_read(prefix + "/fingerprint", t)) {
    throw MismatchError(fmt::format("{}: the checkpoint holds no {} state (saved by another "
                                    "optimizer, or not a torch_asgd checkpoint)",
                                    who, who));
  }
  t = t.contiguous();
  std::string text(static_cast<const char*>(t.data_ptr()), static_cast<size_t>(t.numel()));
  std::string diff = current.first_difference(Fingerprint::parse(text), "in the checkpoint");
  if (!diff.empty()) {
    throw MismatchError(fmt::format("{}: the checkpoint belongs to another model: {}", who, diff));
  }
}

void write_string(torch::serialize::OutputArchive& archive, const std::string& key,
                  const std::string& value) {
  auto t = torch::empty({static_cast<int64_t>(value.size())}, torch::kByte);
  if (!value.empty()) std::memcpy(t.data_ptr(), value.data(), value.size());
  archive.write(key, t);
}

std::string read_string(torch::serialize::InputArchive& archive, const std::string& key) {
  torch::Tensor t;
  if (!archive.try_read(key, t) || t.scalar_type() != torch::kByte) {
    throw MismatchError(fmt::format("corrupt checkpoint: '{}' is missing or malformed", key));
  }
  t = t.contiguous();
  return std::string(static_cast<const char*>(t.data_ptr()), static_cast<size_t>(t.numel()));
}

void write_int64s(torch::serialize::OutputArchive& archive, const std::string& key,
                  const std::vector<int64_t>& values) {
  archive.write(key, torch::tensor(values, torch::kLong));
}

std::vector<int64_t> read_int64s(torch::serialize::InputArchive& archive, const std::string& key,
                                 size_t count) {
  torch::Tensor t;
  if (!archive.try_read(key, t) || t.numel() != static_cast<int64_t>(count) ||
      t.scalar_type() != torch::kLong) {
    throw MismatchError(fmt::format("corrupt checkpoint: '{}' is missing or malformed", key));
  }
  t = t.contiguous();
  return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + count);
}

void write_group_lrs(torch::serialize::OutputArchive& archive, const std::string& prefix,
                     const std::vector<torch::optim::OptimizerParamGroup>& groups) {
  std::vector<double> lrs;
  for (const auto& g : groups) lrs.push_back(g.options().get_lr());
  archive.write(prefix + "/group_lr", torch::tensor(lrs, torch::kDouble));
}

void read_group_lrs(torch::serialize::InputArchive& archive, const std::string& prefix,
                    std::vector<torch::optim::OptimizerParamGroup>& groups) {
  torch::Tensor t;
  if (!archive.try_read(prefix + "/group_lr", t) ||
      t.numel() != static_cast<int64_t>(groups.size())) {
    throw MismatchError(fmt::format("corrupt checkpoint: '{}/group_lr' is missing or has another "
                                    "number of parameter groups",
                                    prefix));
  }
  for (size_t i = 0; i < groups.size(); ++i) {
    groups[i].options().set_lr(t[static_cast<int64_t>(i)].item<double>());
  }
}

}  // namespace detail
}  // namespace torch_asgd
