// asgd-bench-memory: what one DASGD rank holds, as the number of peers grows.
//
// Every rank trains one parameter of --mb megabytes (fp32) with DASGD for --steps steps
// (a fixed gradient: the arithmetic is not the point), then prints its peak resident
// memory (VmHWM), the model's size, and its thread count:
//
//   asgd-launch --nproc 8 -- asgd-bench-memory --mb 64 --steps 50
//   memory rank=0 ranks=8 model_mb=64.0 peak_rss_mb=... threads=...
//
// benchmarks/memory.sh runs it for 1 to 8 ranks, and with ranks stopped by SIGSTOP.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include <torch/torch.h>

#include "proc_status.h"
#include "torch_asgd/torch_asgd.h"

using namespace torch_asgd;
using bench::status_field;

int main(int argc, char** argv) {
  double mb = 64;
  int steps = 50;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--mb") mb = std::stod(argv[i + 1]);
    else if (a == "--steps") steps = std::stoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  torch::set_num_threads(1);
  try {
    auto world = World::from_env();
    const int64_t numel = static_cast<int64_t>(mb * (1 << 20) / 4);
    auto x = torch::zeros({numel}, torch::requires_grad());
    x.mutable_grad() = torch::full({numel}, 1e-3f);
    DASGD opt(std::vector<torch::Tensor>{x}, torch::optim::SGDOptions(0.1), DASGDOptions(), world);
    for (int s = 0; s < steps; ++s) {
      opt.step();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    const long threads = status_field("Threads");
    const bool clean = opt.finish(std::chrono::seconds(120));
    const auto st = opt.stats();
    std::printf("memory rank=%d ranks=%d model_mb=%.1f peak_rss_mb=%.1f threads=%ld version=%ld coalesced=%lu %s\n",
                world->rank(), world->size(), mb, status_field("VmHWM") / 1024.0, threads,
                static_cast<long>(st.version), static_cast<unsigned long>(st.coalesced),
                clean && st.version == static_cast<int64_t>(steps) * world->size() ? "exact" : "INCOMPLETE");
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
