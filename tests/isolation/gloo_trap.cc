// A stand-in for "another Gloo in the process": a shared library, preloaded with
// LD_PRELOAD, that defines the Gloo entry points torch_asgd calls, each aborting with a
// message. Preloaded symbols come first in the dynamic linker's search, so any call of
// torch_asgd's that the dynamic linker resolves (an imported Gloo symbol, or an exported
// one that torch_asgd calls through its PLT) lands here and aborts. With torch_asgd's
// Gloo private (cmake/Gloo.cmake), every such call is bound inside libtorch_asgd.so and
// this library is never reached. Compiled against torch_asgd's own Gloo headers, so that
// the names match exactly what torch_asgd's calls would look up.
#include <cstdio>
#include <cstdlib>

#include <gloo/allgatherv.h>
#include <gloo/allreduce.h>
#include <gloo/alltoallv.h>
#include <gloo/broadcast.h>
#include <gloo/context.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>

namespace {
[[noreturn]] void trap(const char* what) {
  std::fprintf(stderr, "gloo_trap: %s was called through the dynamic linker: another Gloo would "
               "have taken torch_asgd's call\n", what);
  std::fflush(stderr);
  std::abort();
}
}  // namespace

namespace gloo {

Context::Context(int rank, int size, int base) : rank(rank), size(size), base(base) {
  trap("gloo::Context::Context");
}

std::unique_ptr<transport::UnboundBuffer> Context::createUnboundBuffer(void*, size_t) {
  trap("gloo::Context::createUnboundBuffer");
}

void allreduce(const AllreduceOptions&) { trap("gloo::allreduce"); }
void alltoallv(AlltoallvOptions&) { trap("gloo::alltoallv"); }
void allgatherv(AllgathervOptions&) { trap("gloo::allgatherv"); }
void broadcast(BroadcastOptions&) { trap("gloo::broadcast"); }

namespace transport {
namespace tcp {
std::shared_ptr<::gloo::transport::Device> CreateDevice(const struct attr&) {
  trap("gloo::transport::tcp::CreateDevice");
}
}  // namespace tcp
}  // namespace transport

}  // namespace gloo
