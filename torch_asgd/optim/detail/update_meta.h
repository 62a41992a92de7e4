// The metadata DASGD's deltas carry (docs/algorithms.md, "Staleness"): for the updates a
// delta holds, the version vector each was computed at, so that every receiver records
// each update's set-based staleness exactly; and the sender's own vector when it sent,
// so that every rank learns how many of its updates each peer has applied (the lead).
//
// Fields (n = world size):
//   [0]            number of updates                      (sum)
//   [1, 1+n)       the sender's vector when it sent       (max)
//   [1+n, 1+2n)    per-component minimum of the vectors   (min)
//   [1+2n, 1+3n)   per-component maximum                  (max)
//   [1+3n, 1+4n)   per-component sum                      (sum)
// Records: one vector (n values) per update while they fit (max_records); beyond that
// only the aggregates survive coalescing, which are exact unless a receiver's component
// falls strictly inside [min, max]: such updates are recorded as bounded.
#pragma once

#include <cstdint>
#include <vector>

#include "torch_asgd/comm/metadata.h"
#include "torch_asgd/optim/staleness.h"

namespace torch_asgd {
namespace detail {

MetaSchema update_schema(int world_size);

// The updates made since the last message, accumulated as they are made.
class PendingUpdates {
 public:
  explicit PendingUpdates(int world_size);
  void add(const std::vector<int64_t>& computed_at);
  int64_t count() const { return count_; }
  Metadata encode(const std::vector<int64_t>& now) const;
  void clear();

 private:
  int n_;
  int max_records_;
  int64_t count_ = 0;
  std::vector<int64_t> min_, max_, sum_, records_;
  bool overflowed_ = false;
};

// One received part (a message, or several coalesced) of a sender's updates.
struct UpdatePart {
  int64_t count = 0;
  const int64_t* sender_now = nullptr;  // n values
  std::vector<std::vector<int64_t>> computed_at;  // per update, when known exactly
};

// Reads a part; false if `m` does not have the shape of update_schema(n).
bool decode_updates(const Metadata& m, int world_size, UpdatePart* out);

// Records the staleness of every update of `m` applied to a model whose vector is
// `applied_to`; `taus`, if given, receives each exact tau in order (-1 where bounded).
void record_staleness(const Metadata& m, const std::vector<int64_t>& applied_to,
                      StalenessStats& stats, std::vector<int64_t>* taus = nullptr);

}  // namespace detail
}  // namespace torch_asgd
