// A fingerprint of what ranks will exchange: the names, shapes and dtypes of the
// parameters, plus named properties (channel capacity, algorithm, ...). Ranks compare
// fingerprints when they connect (World::check_fingerprint) so that a model that
// differs across ranks fails at once, naming the first parameter that differs, rather
// than exchanging garbage.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace torch_asgd {

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  c10::ScalarType dtype = c10::ScalarType::Float;
  bool operator==(const TensorSpec& o) const {
    return name == o.name && shape == o.shape && dtype == o.dtype;
  }
};

class Fingerprint {
 public:
  Fingerprint() = default;

  Fingerprint& add(std::string name, at::IntArrayRef shape, c10::ScalarType dtype);
  Fingerprint& set(const std::string& key, const std::string& value);

  const std::vector<TensorSpec>& tensors() const { return tensors_; }
  const std::vector<std::pair<std::string, std::string>>& properties() const { return props_; }

  // Text form; parse() throws MismatchError on text that is not a fingerprint.
  std::string serialize() const;
  static Fingerprint parse(const std::string& text);

  // Empty when equal, else one sentence naming the first difference, written from
  // this side's point of view: "... here but ... <where>", where `where` says whose
  // the other fingerprint is ("on rank 3", "in the checkpoint").
  std::string first_difference(const Fingerprint& other, const std::string& where) const;

  bool operator==(const Fingerprint& o) const {
    return tensors_ == o.tensors_ && props_ == o.props_;
  }

 private:
  std::vector<TensorSpec> tensors_;
  std::vector<std::pair<std::string, std::string>> props_;
};

std::string describe(const TensorSpec& spec);

}  // namespace torch_asgd
