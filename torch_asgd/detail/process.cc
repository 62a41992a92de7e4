#include "torch_asgd/detail/process.h"

#include <signal.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>

#include <c10/util/Logging.h>

namespace torch_asgd {
namespace detail {

// c10d logs its retries, socket warnings and the errors torch_asgd reports itself (in
// one line that says what to do) to stderr, gated by c10's caffe2_log_level, which c10
// takes from TORCH_CPP_LOG_LEVEL at start-up. Unless the user set that variable, raise
// the level to FATAL: c10d's LOG_IF lines then stay off the terminal (and so does glog's
// "Logging before InitGoogleLogging()"). TORCH_CPP_LOG_LEVEL=INFO brings them back.
// The flag is process-wide (it quiets c10's other LOG_IF lines too): set once, before
// any World of this process opens a store, never lowered.
void quiet_c10d_unless_asked() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char* asked = std::getenv("TORCH_CPP_LOG_LEVEL");
    if (asked == nullptr || *asked == 0) FLAGS_caffe2_log_level = std::max(FLAGS_caffe2_log_level, 3);
  });
}

// A write to a connection whose peer has died raises SIGPIPE, whose default action
// kills the process: one dead rank would then kill its peers, the opposite of what an
// asynchronous optimizer promises. Like Python, ignore it, so that the write fails with
// EPIPE and the channel reports the peer. A handler the program installed itself stays.
void ignore_sigpipe_unless_handled() {
  static const bool once = [] {
    struct sigaction current {};
    if (sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) {
      signal(SIGPIPE, SIG_IGN);
    }
    return true;
  }();
  (void)once;
}

}  // namespace detail
}  // namespace torch_asgd
