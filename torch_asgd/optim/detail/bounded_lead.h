// The bounded lead's bookkeeping for DASGD (lead.h): what this rank knows of each peer's
// progress, its lead over each live peer as LeadMeasure counts it, and which peers are
// left behind after a stall. DASGD waits (or damps its step) on what it says. Internal.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "torch_asgd/optim/lead.h"

namespace torch_asgd {
namespace detail {

class BoundedLead {
 public:
  BoundedLead(int size, int64_t limit, LeadMeasure measure);

  // News of `peer`: it had applied `seen_of_mine` of this rank's updates and made
  // `its_own` of its own (maxima are kept); `mine`: this rank's own updates now. A peer
  // left behind is waited for again once it has caught up (kProgress: once it steps
  // again, the gap its stall left accepted).
  void heard(int peer, int64_t seen_of_mine, int64_t its_own, int64_t mine);
  // This rank's lead over `peer`, and over the slowest of `live` not left behind.
  int64_t lead_over(int peer, int64_t mine) const;
  int64_t lead(const std::vector<int>& live, int64_t mine) const;
  // After lead_timeout: every peer of `live` still beyond the bound is left behind, as
  // a dead peer is, until it catches up. Returns a line for the log per peer left.
  std::vector<std::string> leave_behind(const std::vector<int>& live, int64_t mine);
  std::vector<int> left_behind() const;
  // Everything forgotten (resync(): the version vectors start again).
  void reset();

 private:
  int64_t limit_;
  LeadMeasure measure_;
  std::vector<int64_t> seen_by_;   // by peer: how many of this rank's updates it had applied
  std::vector<int64_t> progress_;  // by peer: how many updates of its own it had made
  // kProgress, by peer: the gap beyond L accepted when a stalled peer stepped again, and
  // its progress when it was left behind.
  std::vector<int64_t> allowance_, left_at_;
  std::vector<bool> left_behind_;
};

}  // namespace detail
}  // namespace torch_asgd
