// Internal logging: one line per call to stderr, prefixed so that it stands out in the
// interleaved output of many ranks. Thread safe (one write per line).
#pragma once

#include <string>

namespace torch_asgd {
namespace detail {

void log_warning(const std::string& message);
// What a long wait is waiting for ("[torch_asgd] rank 1: waiting ...").
void log_info(const std::string& message);

}  // namespace detail
}  // namespace torch_asgd
