// Staleness as ALGORITHMS.md defines it, for every algorithm: the staleness of an
// update is v(model it is applied to) - v(model its gradient was computed at), where
// v counts the gradient updates, from any rank, a model contains. Recorded per rank
// over all applied updates (count, sum, max), so S_avg and S_max are measured.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include <fmt/format.h>

#include "torch_asgd/comm/message.h"

namespace torch_asgd {

struct StalenessStats {
  int64_t count = 0;
  int64_t sum = 0;
  int64_t max = 0;

  double mean() const { return count == 0 ? 0.0 : static_cast<double>(sum) / count; }

  // One update computed at `computed_at`, applied to a model of version `applied_to`.
  void add(int64_t applied_to, int64_t computed_at) {
    const int64_t tau = applied_to - computed_at;
    ++count;
    sum += tau;
    max = std::max(max, tau);
  }

  // Several updates at once (a coalesced message) applied to a model of version
  // `applied_to`: exact from their count, version sum and minimum version.
  void add(int64_t applied_to, const UpdateStats& u) {
    if (u.count <= 0) return;
    count += u.count;
    sum += u.count * applied_to - u.version_sum;
    max = std::max(max, applied_to - u.version_min);
  }

  void merge(const StalenessStats& o) {
    count += o.count;
    sum += o.sum;
    max = std::max(max, o.max);
  }

  std::string str() const {
    return fmt::format("S_avg {:.2f} S_max {} over {} updates", mean(), max, count);
  }
};

}  // namespace torch_asgd
