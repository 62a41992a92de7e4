// Which worker gets the next job (docs/algorithms.md, "The AsGrad family"), one small class:
//   pure     the worker that just returned a gradient;
//   random   a worker drawn uniformly at random;
//   shuffle  the next worker of a random permutation of all workers, a new
//            permutation every n jobs, so every window of n jobs names each worker
//            once (AsGrad's method).
// Workers that can no longer take jobs (finished or failed) are skipped.
#pragma once

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace torch_asgd {

enum class AssignPolicy { kPure = 0, kRandom = 1, kShuffle = 2 };

std::string to_string(AssignPolicy policy);
AssignPolicy parse_assign_policy(const std::string& name);  // "pure", "random", "shuffle"

class JobAssigner {
 public:
  JobAssigner(AssignPolicy policy, std::vector<int> workers, uint64_t seed);

  // The worker for the next job, given the one that just returned a gradient (-1:
  // none did; the job replaces one lost with a failed worker); -1 when no worker can
  // take it. `available(w)` says whether worker w takes jobs.
  int next(int returning, const std::function<bool(int)>& available);

  AssignPolicy policy() const { return policy_; }

 private:
  AssignPolicy policy_;
  std::vector<int> workers_;
  std::mt19937_64 rng_;
  std::vector<int> permutation_;  // shuffle: the current window
  size_t position_ = 0;           // shuffle: next index into permutation_
};

}  // namespace torch_asgd
