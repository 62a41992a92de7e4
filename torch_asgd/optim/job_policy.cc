#include "torch_asgd/optim/job_policy.h"

#include <algorithm>

#include "torch_asgd/comm/error.h"

namespace torch_asgd {

std::string to_string(AssignPolicy p) {
  switch (p) {
    case AssignPolicy::kPure: return "pure";
    case AssignPolicy::kRandom: return "random";
    case AssignPolicy::kShuffle: return "shuffle";
  }
  return "unknown";
}

AssignPolicy parse_assign_policy(const std::string& name) {
  if (name == "pure") return AssignPolicy::kPure;
  if (name == "random") return AssignPolicy::kRandom;
  if (name == "shuffle") return AssignPolicy::kShuffle;
  throw ConfigError("unknown job-assignment policy '" + name + "' (pure, random or shuffle)");
}

JobAssigner::JobAssigner(AssignPolicy policy, std::vector<int> workers, uint64_t seed)
    : policy_(policy), workers_(std::move(workers)), rng_(seed) {
  if (workers_.empty()) throw ConfigError("a parameter server needs at least one worker");
}

int JobAssigner::next(int returning, const std::function<bool(int)>& available) {
  switch (policy_) {
    case AssignPolicy::kPure:
      // A job lost with its worker (returning < 0) is not replaced: under pure
      // assignment every live worker already holds its own.
      return returning >= 0 && available(returning) ? returning : -1;
    case AssignPolicy::kRandom: {
      if (std::none_of(workers_.begin(), workers_.end(), available)) return -1;
      std::uniform_int_distribution<size_t> pick(0, workers_.size() - 1);
      for (;;) {
        int w = workers_[pick(rng_)];
        if (available(w)) return w;
      }
    }
    case AssignPolicy::kShuffle: {
      if (std::none_of(workers_.begin(), workers_.end(), available)) return -1;
      for (;;) {
        if (position_ == permutation_.size()) {
          permutation_ = workers_;
          std::shuffle(permutation_.begin(), permutation_.end(), rng_);
          position_ = 0;
        }
        int w = permutation_[position_++];
        if (available(w)) return w;
      }
    }
  }
  return -1;
}

}  // namespace torch_asgd
