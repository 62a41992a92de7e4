#include "torch_asgd/optim/detail/bounded_lead.h"

#include <algorithm>

#include <fmt/format.h>

namespace torch_asgd {

std::string to_string(LeadPolicy p) { return p == LeadPolicy::kWait ? "wait" : "damp"; }
std::string to_string(LeadMeasure m) { return m == LeadMeasure::kApplied ? "applied" : "progress"; }

namespace detail {

BoundedLead::BoundedLead(int size, int64_t limit, LeadMeasure measure)
    : limit_(limit),
      measure_(measure),
      seen_by_(size, 0),
      progress_(size, 0),
      allowance_(size, 0),
      left_at_(size, 0),
      left_behind_(size, false) {}

int64_t BoundedLead::lead_over(int peer, int64_t mine) const {
  if (measure_ == LeadMeasure::kApplied) return mine - seen_by_[peer];
  return mine - progress_[peer] - allowance_[peer];
}

int64_t BoundedLead::lead(const std::vector<int>& live, int64_t mine) const {
  int64_t lead = 0;
  for (int p : live) {
    if (!left_behind_[p]) lead = std::max(lead, lead_over(p, mine));
  }
  return lead;
}

void BoundedLead::heard(int peer, int64_t seen_of_mine, int64_t its_own, int64_t mine) {
  seen_by_[peer] = std::max(seen_by_[peer], seen_of_mine);
  progress_[peer] = std::max(progress_[peer], its_own);
  if (measure_ == LeadMeasure::kApplied) {
    if (left_behind_[peer] && lead_over(peer, mine) <= limit_) left_behind_[peer] = false;  // caught up
    return;
  }
  const int64_t gap = mine - progress_[peer];
  if (gap <= limit_) allowance_[peer] = 0;  // it made up the gap its stall left
  if (!left_behind_[peer]) return;
  if (gap <= limit_) {
    left_behind_[peer] = false;  // caught up
  } else if (progress_[peer] >= left_at_[peer] + std::max<int64_t>(1, limit_)) {
    // It steps again: waited for again from here on. Making up the gap its stall left
    // would mean waiting for it far longer than lead_timeout, so that gap is accepted;
    // the bound holds against its growing.
    left_behind_[peer] = false;
    allowance_[peer] = gap - limit_;
  }
}

std::vector<std::string> BoundedLead::leave_behind(const std::vector<int>& live, int64_t mine) {
  std::vector<std::string> lines;
  for (int p : live) {
    if (left_behind_[p] || lead_over(p, mine) <= limit_) continue;
    left_behind_[p] = true;
    left_at_[p] = progress_[p];
    lines.push_back(measure_ == LeadMeasure::kApplied
                        ? fmt::format("rank {} has applied {} of this rank's {} updates", p, seen_by_[p], mine)
                        : fmt::format("rank {} has made {} updates against this rank's {}", p, progress_[p], mine));
  }
  return lines;
}

std::vector<int> BoundedLead::left_behind() const {
  std::vector<int> out;
  for (size_t p = 0; p < left_behind_.size(); ++p) {
    if (left_behind_[p]) out.push_back(static_cast<int>(p));
  }
  return out;
}

void BoundedLead::reset() {
  std::fill(seen_by_.begin(), seen_by_.end(), 0);
  std::fill(progress_.begin(), progress_.end(), 0);
  std::fill(allowance_.begin(), allowance_.end(), 0);
  std::fill(left_at_.begin(), left_at_.end(), 0);
}

}  // namespace detail
}  // namespace torch_asgd
