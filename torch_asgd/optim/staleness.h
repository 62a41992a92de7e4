// Staleness as docs/algorithms.md defines it, for every algorithm (set-based, the DASGD
// paper's): the staleness of an update u, computed at model x_s and applied to model
// x_r, is tau(u) = |G(x_r) \ G(x_s)|, the updates the model it is applied to holds that
// the model its gradient was computed at lacked. Never negative.
//
// Measured with version vectors: V[k] counts rank k's updates a model holds, and since
// each rank's updates reach every peer in order, tau(u) = sum_k max(0, V_r[k] - V_s[k]).
// Recorded per rank over all applied updates (count, sum, max), so S_avg and S_max are
// measured. An update whose tau could only be bounded (its message coalesced with so
// many others that only per-component minima and maxima survived) is counted in
// `bounded`, and what is recorded for it is the upper bound.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <fmt/format.h>

namespace torch_asgd {

struct StalenessStats {
  int64_t count = 0;
  int64_t sum = 0;
  int64_t max = 0;
  int64_t bounded = 0;  // updates whose tau is an upper bound, not exact

  double mean() const { return count == 0 ? 0.0 : static_cast<double>(sum) / count; }

  void add(int64_t tau) {
    ++count;
    sum += tau;
    max = std::max(max, tau);
  }
  // `n` updates of total staleness at most `sum` and each at most `max`.
  void add_bounded(int64_t n, int64_t sum_bound, int64_t max_bound) {
    count += n;
    sum += sum_bound;
    max = std::max(max, max_bound);
    bounded += n;
  }
  void merge(const StalenessStats& o) {
    count += o.count;
    sum += o.sum;
    max = std::max(max, o.max);
    bounded += o.bounded;
  }

  // `what` names the quantity ("staleness", "lag").
  std::string str(const std::string& what = "staleness") const {
    std::string b = bounded > 0 ? fmt::format(", {} bounded", bounded) : "";
    return fmt::format("{} S_avg {:.2f} S_max {} over {} updates{}", what, mean(), max, count, b);
  }
};

// tau of an update computed at `computed_at` and applied to a model at `applied_to`
// (version vectors of equal length).
inline int64_t staleness(const std::vector<int64_t>& applied_to, const int64_t* computed_at) {
  int64_t tau = 0;
  for (size_t k = 0; k < applied_to.size(); ++k) tau += std::max<int64_t>(0, applied_to[k] - computed_at[k]);
  return tau;
}

}  // namespace torch_asgd
