// asgd-launch: starts N local ranks with torchrun's environment contract.
//
//   asgd-launch --nproc N [--nnodes M --node-rank K --master-addr H --master-port P]
//               [--job-id ID] [--fail-fast] [--grace SECONDS] [--default-malloc] -- PROGRAM ARGS...
//
// Each rank gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK,
// MASTER_ADDR, MASTER_PORT and TORCHELASTIC_RUN_ID (and OMP_NUM_THREADS=1 unless set,
// as torchrun does; and glibc's malloc thresholds fixed unless set or --default-malloc:
// MALLOC_MMAP_THRESHOLD_=1073741824, MALLOC_TRIM_THRESHOLD_=4294967296, with which
// LibTorch on the CPU ran up to 2x faster, docs/operations.md "Launching"). Every line a rank prints is prefixed with "[RANK]: ". SIGINT and
// SIGTERM are forwarded to all ranks (SIGKILL after the grace period). The exit code
// is the first non-zero exit code of a rank (128+signal for a rank killed by a
// signal), 0 if all succeed. Without --fail-fast the other ranks run on when one
// fails; with it they are terminated.
#pragma once

#include <string>
#include <vector>

namespace torch_asgd {
namespace launch {

struct LaunchOptions {
  int nproc = 1;
  int nnodes = 1;
  int node_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;  // 0: pick a free port (single node only)
  std::string job_id;       // default: a fresh id per launch
  bool fail_fast = false;
  bool default_malloc = false;  // leave glibc's malloc thresholds to glibc
  double grace_seconds = 10;
  std::vector<std::string> command;
};

// Throws std::invalid_argument with a one-line reason on bad arguments.
LaunchOptions parse_args(const std::vector<std::string>& args);
std::string usage();

// Runs the ranks to completion; returns the launcher's exit code.
int run(const LaunchOptions& options);

}  // namespace launch
}  // namespace torch_asgd
