#include "torch_asgd/comm/fingerprint.h"

#include <sstream>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <torch/csrc/distributed/c10d/Store.hpp>

#include "torch_asgd/comm/error.h"
#include "torch_asgd/comm/world.h"

namespace torch_asgd {

Fingerprint& Fingerprint::add(std::string name, at::IntArrayRef shape, c10::ScalarType dtype) {
  if (name.find_first_of("\t\n") != std::string::npos) {
    throw ConfigError(fmt::format("tensor name '{}' contains a tab or newline", name));
  }
  tensors_.push_back({std::move(name), shape.vec(), dtype});
  return *this;
}

Fingerprint& Fingerprint::set(const std::string& key, const std::string& value) {
  if ((key + value).find_first_of("\t\n=") != std::string::npos) {
    throw ConfigError(fmt::format("fingerprint property '{}' contains '=', a tab or newline", key));
  }
  for (auto& kv : props_) {
    if (kv.first == key) {
      kv.second = value;
      return *this;
    }
  }
  props_.emplace_back(key, value);
  return *this;
}

std::string Fingerprint::serialize() const {
  std::string out = "torch_asgd-fingerprint-1\n";
  for (const auto& [k, v] : props_) out += fmt::format("@{}={}\n", k, v);
  for (const auto& t : tensors_) {
    out += fmt::format("{}\t{}\t{}\n", t.name, static_cast<int>(t.dtype), fmt::join(t.shape, ","));
  }
  return out;
}

Fingerprint Fingerprint::parse(const std::string& text) {
  std::istringstream in(text);
  std::string line;
  if (!std::getline(in, line) || line != "torch_asgd-fingerprint-1") {
    throw MismatchError("peer sent something that is not a torch_asgd fingerprint "
                        "(different torch_asgd version?)");
  }
  Fingerprint fp;
  while (std::getline(in, line)) {
    if (!line.empty() && line[0] == '@') {
      auto eq = line.find('=');
      if (eq == std::string::npos) throw MismatchError("corrupt fingerprint property: " + line);
      fp.props_.emplace_back(line.substr(1, eq - 1), line.substr(eq + 1));
      continue;
    }
    auto t1 = line.find('\t');
    auto t2 = t1 == std::string::npos ? t1 : line.find('\t', t1 + 1);
    if (t2 == std::string::npos) throw MismatchError("corrupt fingerprint line: " + line);
    TensorSpec spec;
    spec.name = line.substr(0, t1);
    try {
      spec.dtype = static_cast<c10::ScalarType>(std::stoi(line.substr(t1 + 1, t2 - t1 - 1)));
      std::istringstream dims(line.substr(t2 + 1));
      std::string d;
      while (std::getline(dims, d, ',')) spec.shape.push_back(std::stoll(d));
    } catch (const std::exception&) {
      throw MismatchError("corrupt fingerprint line: " + line);
    }
    fp.tensors_.push_back(std::move(spec));
  }
  return fp;
}

std::string describe(const TensorSpec& spec) {
  return fmt::format("'{}' {} [{}]", spec.name, c10::toString(spec.dtype), fmt::join(spec.shape, ", "));
}

std::string Fingerprint::first_difference(const Fingerprint& other, const std::string& where) const {
  // Parameters first: a model that differs is the likelier mistake, and the
  // properties derived from it (sizes) would otherwise hide which parameter.
  size_t n = std::min(tensors_.size(), other.tensors_.size());
  for (size_t i = 0; i < n; ++i) {
    const auto& a = tensors_[i];
    const auto& b = other.tensors_[i];
    if (a == b) continue;
    if (a.name != b.name) {
      return fmt::format("parameter #{} is {} here but {} {}", i, describe(a), describe(b), where);
    }
    if (a.shape != b.shape) {
      return fmt::format("parameter '{}' has shape [{}] here but [{}] {}", a.name,
                         fmt::join(a.shape, ", "), fmt::join(b.shape, ", "), where);
    }
    return fmt::format("parameter '{}' has dtype {} here but {} {}", a.name,
                       c10::toString(a.dtype), c10::toString(b.dtype), where);
  }
  if (tensors_.size() != other.tensors_.size()) {
    const bool mine_longer = tensors_.size() > other.tensors_.size();
    const auto& extra = mine_longer ? tensors_[n] : other.tensors_[n];
    return fmt::format("{} parameters here but {} {}: first unmatched is {} ({})",
                       tensors_.size(), other.tensors_.size(), where, describe(extra),
                       mine_longer ? "only here" : "only " + where);
  }
  for (const auto& [k, v] : props_) {
    std::string theirs = "<unset>";
    for (const auto& kv : other.props_) {
      if (kv.first == k) theirs = kv.second;
    }
    if (theirs != v) {
      return fmt::format("{} is '{}' here but '{}' {}", k, v, theirs, where);
    }
  }
  for (const auto& kv : other.props_) {
    bool found = false;
    for (const auto& mine : props_) found = found || mine.first == kv.first;
    if (!found) {
      return fmt::format("{} is unset here but '{}' {}", kv.first, kv.second, where);
    }
  }
  return "";
}

// World::check_fingerprint: how ranks compare what they will exchange (world.h).
namespace {
std::string text_of(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }
std::vector<uint8_t> bytes_of(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }
}  // namespace

void World::check_fingerprint(const std::string& topic, const Fingerprint& fp) {
  if (size() == 1) return;
  const std::string prefix =
      fmt::format("fingerprint/{}/{}/", topic, topic_uses_[topic]++);
  store_->set(prefix + std::to_string(rank()), bytes_of(fp.serialize()));
  wait_for_all(prefix, fmt::format("fingerprint exchange for '{}'", topic));
  std::string diff;
  std::exception_ptr store_error;  // a fingerprint that could not be fetched
  try {
    for (int r = 0; r < size() && diff.empty(); ++r) {
      if (r == rank()) continue;
      const std::string theirs_text = text_of(store_->get(prefix + std::to_string(r)));
      try {
        diff = fp.first_difference(Fingerprint::parse(theirs_text), "on rank " + std::to_string(r));
      } catch (const MismatchError& e) {  // another format: another torch_asgd, or corrupt
        diff = fmt::format("rank {}'s fingerprint cannot be read here: {}", r, e.what());
      }
    }
  } catch (...) {
    store_error = std::current_exception();
  }
  if (diff.empty() && !store_error) return;
  // Where fingerprints differ, every rank differs from some other and throws. The rank
  // hosting the store takes it down as it unwinds, so each rank says it has read every
  // fingerprint, and none throws before all have: every rank then reports the mismatch,
  // not a store that went away. (Bounded by the timeout; a rank gone meanwhile is not
  // waited for further, and the mismatch is thrown regardless.) A rank whose store
  // failed says it has read, so that nobody waits for it, and throws at once.
  try {
    store_->set(prefix + "read/" + std::to_string(rank()), bytes_of("1"));
  } catch (const std::exception&) {
  }
  if (store_error) std::rethrow_exception(store_error);
  try {
    wait_for_all(prefix + "read/", fmt::format("fingerprint exchange for '{}'", topic));
  } catch (const std::exception&) {
  }
  throw MismatchError(fmt::format(
      "rank {}: ranks disagree on what they exchange ('{}'): {}. Every rank must build the "
      "same model with the same options",
      rank(), topic, diff));
}

}  // namespace torch_asgd
