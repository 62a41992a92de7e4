#include "torch_asgd/optim/detail/update_meta.h"

#include <algorithm>
#include <limits>

namespace torch_asgd {
namespace detail {
namespace {

// Records per message: enough for exact staleness in the common case (a few updates
// per delta), while the metadata stays a few kilobytes at any world size.
int max_records_for(int n) { return std::max(1, std::min(64, 4096 / std::max(1, n))); }

}  // namespace

MetaSchema update_schema(int n) {
  MetaSchema s;
  s.fields.push_back(Merge::kSum);
  for (int k = 0; k < n; ++k) s.fields.push_back(Merge::kMax);
  for (int k = 0; k < n; ++k) s.fields.push_back(Merge::kMin);
  for (int k = 0; k < n; ++k) s.fields.push_back(Merge::kMax);
  for (int k = 0; k < n; ++k) s.fields.push_back(Merge::kSum);
  s.record_width = n;
  s.max_records = max_records_for(n);
  return s;
}

PendingUpdates::PendingUpdates(int n) : n_(n), max_records_(max_records_for(n)) { clear(); }

void PendingUpdates::clear() {
  count_ = 0;
  min_.assign(n_, std::numeric_limits<int64_t>::max());
  max_.assign(n_, 0);
  sum_.assign(n_, 0);
  records_.clear();
  overflowed_ = false;
}

void PendingUpdates::add(const std::vector<int64_t>& v) {
  ++count_;
  for (int k = 0; k < n_; ++k) {
    min_[k] = std::min(min_[k], v[k]);
    max_[k] = std::max(max_[k], v[k]);
    sum_[k] += v[k];
  }
  if (overflowed_) return;
  if (records_.size() / static_cast<size_t>(n_) >= static_cast<size_t>(max_records_)) {
    records_.clear();
    overflowed_ = true;
    return;
  }
  records_.insert(records_.end(), v.begin(), v.end());
}

Metadata PendingUpdates::encode(const std::vector<int64_t>& now) const {
  Metadata m;
  m.fields.reserve(1 + 4 * static_cast<size_t>(n_));
  m.fields.push_back(count_);
  m.fields.insert(m.fields.end(), now.begin(), now.end());
  m.fields.insert(m.fields.end(), min_.begin(), min_.end());
  m.fields.insert(m.fields.end(), max_.begin(), max_.end());
  m.fields.insert(m.fields.end(), sum_.begin(), sum_.end());
  m.records = records_;
  m.records_overflowed = overflowed_;
  return m;
}

bool decode_updates(const Metadata& m, int n, UpdatePart* out) {
  if (m.fields.size() != 1 + 4 * static_cast<size_t>(n) || m.field(0) < 0) return false;
  if (m.records.size() % static_cast<size_t>(n) != 0) return false;
  const size_t records = m.records.size() / static_cast<size_t>(n);
  if (!m.records_overflowed && records != static_cast<size_t>(m.field(0))) return false;
  out->count = m.field(0);
  out->sender_now = m.fields.data() + 1;
  out->computed_at.clear();
  for (size_t r = 0; r < records; ++r) {
    out->computed_at.emplace_back(m.records.begin() + static_cast<long>(r * n),
                                  m.records.begin() + static_cast<long>((r + 1) * n));
  }
  return true;
}

void record_staleness(const Metadata& m, const std::vector<int64_t>& applied_to,
                      StalenessStats& stats, std::vector<int64_t>* taus) {
  const int n = static_cast<int>(applied_to.size());
  const int64_t count = m.field(0);
  if (count <= 0) return;
  if (!m.records_overflowed) {
    for (int64_t u = 0; u < count; ++u) {
      const int64_t tau = staleness(applied_to, m.records.data() + u * n);
      stats.add(tau);
      if (taus != nullptr) taus->push_back(tau);
    }
    return;
  }
  // Only aggregates: sum_u max(0, a - v_u) is exact when a is outside [min, max].
  const int64_t* lo = m.fields.data() + 1 + n;
  const int64_t* hi = m.fields.data() + 1 + 2 * n;
  const int64_t* sum = m.fields.data() + 1 + 3 * n;
  int64_t total = 0, max_bound = 0;
  bool exact = true;
  for (int k = 0; k < n; ++k) {
    const int64_t a = applied_to[k];
    if (a <= lo[k]) continue;
    max_bound += a - lo[k];
    if (a >= hi[k]) {
      total += count * a - sum[k];
      if (lo[k] != hi[k]) exact = false;  // the sum is exact; which update has the max is not
    } else {
      total += count * (a - lo[k]);
      exact = false;
    }
  }
  if (exact) {
    // Every update saw the same components: each has the same tau.
    for (int64_t u = 0; u < count; ++u) {
      stats.add(max_bound);
      if (taus != nullptr) taus->push_back(max_bound);
    }
    return;
  }
  stats.add_bounded(count, total, max_bound);
  if (taus != nullptr) taus->insert(taus->end(), static_cast<size_t>(count), -1);
}

}  // namespace detail
}  // namespace torch_asgd
