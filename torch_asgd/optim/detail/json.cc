#include "torch_asgd/optim/detail/json.h"

#include <cmath>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "torch_asgd/optim/staleness.h"
#include "torch_asgd/optim/stats.h"

namespace torch_asgd {

std::string OptimizerStats::who() const {
  return fmt::format("{} rank {}/{}", optimizer, rank, world_size);
}

namespace detail {

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += fmt::format("\\u{:04x}", c);
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

JsonObject& JsonObject::field(const std::string& key, const std::string& value) {
  if (!body_.empty()) body_ += ", ";
  body_ += json_string(key) + ": " + value;
  return *this;
}

JsonObject& JsonObject::add(const std::string& key, int64_t v) { return field(key, std::to_string(v)); }
JsonObject& JsonObject::add(const std::string& key, uint64_t v) { return field(key, std::to_string(v)); }
JsonObject& JsonObject::add(const std::string& key, double v) {
  return field(key, std::isfinite(v) ? fmt::format("{}", v) : "null");
}
JsonObject& JsonObject::add(const std::string& key, bool v) { return field(key, v ? "true" : "false"); }
JsonObject& JsonObject::add(const std::string& key, const std::string& v) { return field(key, json_string(v)); }
JsonObject& JsonObject::add(const std::string& key, const std::vector<int>& v) {
  return field(key, fmt::format("[{}]", fmt::join(v, ", ")));
}
JsonObject& JsonObject::add(const std::string& key, const std::vector<int64_t>& v) {
  return field(key, fmt::format("[{}]", fmt::join(v, ", ")));
}
JsonObject& JsonObject::add(const std::string& key, const StalenessStats& s) {
  return field(key, JsonObject()
                        .add("mean", s.mean())
                        .add("max", s.max)
                        .add("count", s.count)
                        .add("bounded", s.bounded)
                        .str());
}
JsonObject& JsonObject::add_raw(const std::string& key, const std::string& json) { return field(key, json); }

}  // namespace detail
}  // namespace torch_asgd
