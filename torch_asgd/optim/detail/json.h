// A JSON object written field by field, for the optimizers' to_json(). Internal.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace torch_asgd {
struct StalenessStats;
namespace detail {

class JsonObject {
 public:
  JsonObject& add(const std::string& key, int64_t v);
  JsonObject& add(const std::string& key, uint64_t v);
  JsonObject& add(const std::string& key, int v) { return add(key, static_cast<int64_t>(v)); }
  JsonObject& add(const std::string& key, double v);
  JsonObject& add(const std::string& key, bool v);
  JsonObject& add(const std::string& key, const std::string& v);
  JsonObject& add(const std::string& key, const char* v) { return add(key, std::string(v)); }
  JsonObject& add(const std::string& key, const std::vector<int>& v);
  JsonObject& add(const std::string& key, const std::vector<int64_t>& v);
  JsonObject& add(const std::string& key, const StalenessStats& s);
  // `json`: a value written already (an object or an array).
  JsonObject& add_raw(const std::string& key, const std::string& json);
  std::string str() const { return "{" + body_ + "}"; }

 private:
  JsonObject& field(const std::string& key, const std::string& value);
  std::string body_;
};

std::string json_string(const std::string& s);

}  // namespace detail
}  // namespace torch_asgd
