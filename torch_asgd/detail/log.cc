#include "torch_asgd/detail/log.h"

#include <unistd.h>

namespace torch_asgd {
namespace detail {
namespace {

void write_line(const std::string& line) {
  // One write(2) so that lines from different threads never interleave.
  std::string out = line + "\n";
  ssize_t unused = ::write(STDERR_FILENO, out.data(), out.size());
  (void)unused;
}

}  // namespace

void log_warning(const std::string& message) { write_line("[torch_asgd] WARNING: " + message); }
void log_info(const std::string& message) { write_line("[torch_asgd] " + message); }

}  // namespace detail
}  // namespace torch_asgd
