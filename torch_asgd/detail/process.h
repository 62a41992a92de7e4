// What torch_asgd changes for the whole process, once, when the first World opens: both
// only where the program has not set them itself. Internal.
#pragma once

namespace torch_asgd {
namespace detail {

// SIGPIPE ignored (a write to a dead peer fails with EPIPE and the channel reports it,
// instead of the signal killing this rank), unless the program installed a handler.
void ignore_sigpipe_unless_handled();
// c10's log level raised to FATAL unless TORCH_CPP_LOG_LEVEL is set, so that c10d's
// retries and copies of torch_asgd's errors stay off the terminal.
void quiet_c10d_unless_asked();

}  // namespace detail
}  // namespace torch_asgd
