// Checks the trap itself: its Gloo entry points abort when called. (Otherwise a passing
// isolation test would prove nothing.) Linked to the trap library directly, whose
// definitions it calls; that a preloaded trap takes the calls of a library that exports
// or imports Gloo's symbols is shown by building with -DTORCH_ASGD_GLOO_ISOLATION=OFF,
// where the preloaded tests abort (docs/operations.md).
#include <gloo/transport/tcp/device.h>

int main() {
  gloo::transport::tcp::attr attr;
  attr.hostname = "127.0.0.1";
  auto device = gloo::transport::tcp::CreateDevice(attr);
  return device ? 0 : 1;
}
