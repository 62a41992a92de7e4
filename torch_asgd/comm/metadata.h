// Metadata: the small, bounded block of 64-bit integers that travels beside a payload.
//
// The channel carries it opaquely: what the fields mean (a message kind, a version
// vector, a correlation id) is the business of the optimizer that speaks them. The
// channel only needs to know how to merge the metadata of two additive messages when it
// coalesces them, and that rule is the optimizer's too, given as a MetaSchema:
//
//   - `fields`: one merge rule per aggregate field (sum, min, max, first, last);
//   - `records`: up to `max_records` records of `record_width` fields each, concatenated
//     on merge while they fit. Beyond that every record is dropped and the metadata says
//     so (`records_overflowed`): what the records described is then only known through
//     the aggregates.
//
// Thread safety: plain values.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace torch_asgd {

enum class Merge : uint8_t {
  kSum = 0,
  kMin = 1,
  kMax = 2,
  kFirst = 3,  // keep the older message's value
  kLast = 4,   // keep the newer message's value
};

struct MetaSchema {
  std::vector<Merge> fields;
  int record_width = 0;  // int64s per record; 0: no records
  int max_records = 0;   // records kept before they overflow

  // Text form for fingerprints ("sum,max,max/3x8"): ranks must agree on it.
  std::string describe() const;
  bool operator==(const MetaSchema& o) const {
    return fields == o.fields && record_width == o.record_width && max_records == o.max_records;
  }
};

struct Metadata {
  std::vector<int64_t> fields;
  std::vector<int64_t> records;  // record_count(width) records, `width` values each
  bool records_overflowed = false;

  Metadata() = default;
  explicit Metadata(std::vector<int64_t> f) : fields(std::move(f)) {}

  int64_t field(size_t i) const { return i < fields.size() ? fields[i] : 0; }
  // No metadata at all: the message carries values but nothing the optimizer counts (a
  // codec's residual). It conforms to every schema and is the identity of merge().
  bool none() const { return fields.empty() && records.empty() && !records_overflowed; }
  size_t record_count(int width) const {
    return width > 0 ? records.size() / static_cast<size_t>(width) : 0;
  }
  size_t bytes() const { return 8 * (fields.size() + records.size()); }
  bool operator==(const Metadata& o) const {
    return fields == o.fields && records == o.records && records_overflowed == o.records_overflowed;
  }
};

// Whether `m` has the shape `schema` describes: one value per field, whole records,
// no more than max_records of them (and none once they overflowed); or is none().
bool conforms(const Metadata& m, const MetaSchema& schema);

// Merges `later` into `earlier` (earlier then later, in time) by the schema's rules.
// Both must conform to the schema; none() is the identity.
void merge(Metadata& earlier, const Metadata& later, const MetaSchema& schema);

const char* to_string(Merge rule);

}  // namespace torch_asgd
