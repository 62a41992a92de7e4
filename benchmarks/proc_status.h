// A field of this process's /proc/self/status (Linux): "VmHWM" (peak resident memory, kB),
// "Threads", ...; -1 where it cannot be read. For the benchmark programs' reports.
#pragma once

#include <fstream>
#include <string>

namespace torch_asgd {
namespace bench {

inline long status_field(const std::string& name) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(name + ":", 0) == 0) return std::stol(line.substr(name.size() + 1));
  }
  return -1;
}

}  // namespace bench
}  // namespace torch_asgd
