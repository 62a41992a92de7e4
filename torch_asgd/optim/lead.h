// DASGD's bounded lead (DASGDOptions::max_lead): how a rank's lead over its slowest live
// peer is counted, and what the rank does when it exceeds the bound (docs/algorithms.md,
// "DASGD"). The bookkeeping is optim/detail/bounded_lead.h.
#pragma once

#include <string>

namespace torch_asgd {

// How a rank's lead over its slowest live peer is counted, in its own updates.
enum class LeadMeasure {
  // Its own updates the peer has not applied yet, as far as this rank knows from the
  // peer's version vectors (SGP's synch_freq idea, measured in the set-based staleness).
  // A peer that applies everything it has at each step lets a faster rank take up to L
  // steps per step of its own: it bounds how stale a peer's view is, not how far apart
  // the ranks' progress drifts.
  kApplied = 0,
  // Its own updates minus the peer's own updates, as last reported by the peer (the
  // stale synchronous parallel bound): no rank gets more than L updates ahead of the
  // slowest, so with data split by label every rank's data keeps entering the model in
  // proportion, to the end of the run. A peer left behind (it stalled past lead_timeout)
  // is waited for again once it has taken L steps more; the gap its stall left is then
  // accepted until the peer makes it up, and the bound holds against its growing.
  kProgress = 1,
};
std::string to_string(LeadMeasure m);

// What a rank does when its lead (LeadMeasure) exceeds max_lead (docs/algorithms.md,
// "DASGD").
enum class LeadPolicy {
  kWait = 0,  // stop taking steps until the gap closes (bounded by lead_timeout)
  kDamp = 1,  // never wait: scale the local step by min(1, max_lead / lead)
};
std::string to_string(LeadPolicy p);

}  // namespace torch_asgd
