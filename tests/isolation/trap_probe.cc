// Checks the trap itself: a program that calls Gloo through the dynamic linker, run with
// gloo_trap preloaded, must abort. (Otherwise a passing isolation test would prove
// nothing.) Linked to the trap library directly, whose definitions it calls.
#include <gloo/transport/tcp/device.h>

int main() {
  gloo::transport::tcp::attr attr;
  attr.hostname = "127.0.0.1";
  auto device = gloo::transport::tcp::CreateDevice(attr);
  return device ? 0 : 1;
}
