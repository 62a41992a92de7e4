#include "torch_asgd/comm/metadata.h"

#include <algorithm>

namespace torch_asgd {

const char* to_string(Merge rule) {
  switch (rule) {
    case Merge::kSum: return "sum";
    case Merge::kMin: return "min";
    case Merge::kMax: return "max";
    case Merge::kFirst: return "first";
    case Merge::kLast: return "last";
  }
  return "?";
}

std::string MetaSchema::describe() const {
  std::string s;
  for (size_t i = 0; i < fields.size(); ++i) {
    if (i > 0) s += ',';
    s += to_string(fields[i]);
  }
  s += "/" + std::to_string(max_records) + "x" + std::to_string(record_width);
  return s;
}

bool conforms(const Metadata& m, const MetaSchema& schema) {
  if (m.none()) return true;
  if (m.fields.size() != schema.fields.size()) return false;
  if (schema.record_width <= 0) return m.records.empty();
  if (m.records.size() % static_cast<size_t>(schema.record_width) != 0) return false;
  if (m.records_overflowed && !m.records.empty()) return false;
  return m.record_count(schema.record_width) <= static_cast<size_t>(schema.max_records);
}

void merge(Metadata& a, const Metadata& b, const MetaSchema& schema) {
  if (b.none()) return;
  if (a.none()) {
    a = b;
    return;
  }
  for (size_t i = 0; i < schema.fields.size() && i < a.fields.size() && i < b.fields.size(); ++i) {
    int64_t& x = a.fields[i];
    const int64_t y = b.fields[i];
    switch (schema.fields[i]) {
      case Merge::kSum: x += y; break;
      case Merge::kMin: x = std::min(x, y); break;
      case Merge::kMax: x = std::max(x, y); break;
      case Merge::kFirst: break;
      case Merge::kLast: x = y; break;
    }
  }
  if (schema.record_width <= 0) return;
  const size_t total = a.record_count(schema.record_width) + b.record_count(schema.record_width);
  if (a.records_overflowed || b.records_overflowed ||
      total > static_cast<size_t>(schema.max_records)) {
    a.records.clear();
    a.records_overflowed = true;
    return;
  }
  a.records.insert(a.records.end(), b.records.begin(), b.records.end());
}

}  // namespace torch_asgd
