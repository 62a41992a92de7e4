#include "torch_asgd/launch/launcher.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include <fmt/format.h>

#include "torch_asgd/launch/free_port.h"

namespace torch_asgd {
namespace launch {
namespace {

int parse_int(const std::string& flag, const std::string& value, int lo, int hi) {
  char* end = nullptr;
  errno = 0;
  long v = std::strtol(value.c_str(), &end, 10);
  if (errno != 0 || end == value.c_str() || *end != '\0' || v < lo || v > hi) {
    throw std::invalid_argument(
        fmt::format("{} '{}' must be an integer between {} and {}", flag, value, lo, hi));
  }
  return static_cast<int>(v);
}

void write_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::write(fd, s.data() + off, s.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    off += static_cast<size_t>(n);
  }
}

int signal_pipe[2] = {-1, -1};

void on_signal(int sig) {
  int saved = errno;
  unsigned char s = static_cast<unsigned char>(sig);
  ssize_t unused = ::write(signal_pipe[1], &s, 1);
  (void)unused;
  errno = saved;
}

// One output stream of one rank: bytes arrive in arbitrary chunks and leave as whole
// lines with the rank's prefix.
struct Stream {
  int fd = -1;
  int out_fd = STDOUT_FILENO;
  std::string prefix;
  std::string partial;

  // Returns false at end of file.
  bool pump() {
    char buf[65536];
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return true;
    if (n <= 0) {
      if (!partial.empty()) write_all(out_fd, prefix + partial + "\n");
      partial.clear();
      ::close(fd);
      fd = -1;
      return false;
    }
    partial.append(buf, static_cast<size_t>(n));
    std::string out;
    size_t start = 0;
    for (size_t nl; (nl = partial.find('\n', start)) != std::string::npos; start = nl + 1) {
      out += prefix;
      out.append(partial, start, nl - start + 1);
    }
    partial.erase(0, start);
    if (!out.empty()) write_all(out_fd, out);
    return true;
  }
};

struct Child {
  int rank = -1;
  pid_t pid = -1;
  bool running = false;
  int exit_code = 0;
};

}  // namespace

std::string usage() {
  return "usage: asgd-launch --nproc N [--nnodes M --node-rank K --master-addr H --master-port P]\n"
         "                   [--job-id ID] [--fail-fast] [--grace SECONDS] [--default-malloc]\n"
         "                   -- PROGRAM ARGS...\n"
         "\n"
         "Starts N ranks of PROGRAM on this node with torchrun's variables set (RANK, WORLD_SIZE,\n"
         "LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RUN_ID). Prefixes\n"
         "each output line with the rank, forwards SIGINT/SIGTERM, and exits with the first\n"
         "non-zero exit code of a rank (0 if all succeed). Killed outright, it takes its ranks\n"
         "with it.\n"
         "\n"
         "  --nproc N          ranks on this node (required)\n"
         "  --nnodes M         nodes in the job (default 1)\n"
         "  --node-rank K      this node's index, 0..M-1 (default 0)\n"
         "  --master-addr H    address of the node of rank 0 (default 127.0.0.1)\n"
         "  --master-port P    rendezvous port (default 29500; 0 picks a free one, single node)\n"
         "  --job-id ID        job id keying the rendezvous (default: fresh per launch)\n"
         "  --fail-fast        terminate all ranks as soon as one fails\n"
         "  --grace SECONDS    wait this long after forwarding a signal before SIGKILL (10)\n"
         "  --default-malloc   leave glibc's malloc thresholds alone (by default each rank gets\n"
         "                     MALLOC_MMAP_THRESHOLD_=1073741824 and MALLOC_TRIM_THRESHOLD_=4294967296\n"
         "                     unless set: LibTorch's CPU steps then reuse memory, not fresh pages)\n";
}

LaunchOptions parse_args(const std::vector<std::string>& args) {
  LaunchOptions o;
  bool have_nproc = false;
  size_t i = 0;
  auto value = [&](const std::string& flag) -> std::string {
    if (i + 1 >= args.size()) throw std::invalid_argument(flag + " needs a value");
    return args[++i];
  };
  for (; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--") {
      o.command.assign(args.begin() + static_cast<long>(i) + 1, args.end());
      break;
    }
    if (a == "-h" || a == "--help") {
      o.command.clear();
      return o;
    }
    if (a == "--nproc" || a == "--nproc-per-node" || a == "--nproc_per_node") {
      o.nproc = parse_int(a, value(a), 1, 4096);
      have_nproc = true;
    } else if (a == "--nnodes") {
      o.nnodes = parse_int(a, value(a), 1, 100000);
    } else if (a == "--node-rank" || a == "--node_rank") {
      o.node_rank = parse_int(a, value(a), 0, 100000);
    } else if (a == "--master-addr" || a == "--master_addr") {
      o.master_addr = value(a);
    } else if (a == "--master-port" || a == "--master_port") {
      o.master_port = parse_int(a, value(a), 0, 65535);
    } else if (a == "--job-id") {
      o.job_id = value(a);
    } else if (a == "--fail-fast") {
      o.fail_fast = true;
    } else if (a == "--default-malloc") {
      o.default_malloc = true;
    } else if (a == "--grace") {
      o.grace_seconds = parse_int(a, value(a), 0, 3600);
    } else if (!a.empty() && a[0] == '-') {
      throw std::invalid_argument("unknown option " + a);
    } else {
      // torchrun style: the program starts at the first non-option argument.
      o.command.assign(args.begin() + static_cast<long>(i), args.end());
      break;
    }
  }
  if (!have_nproc) throw std::invalid_argument("--nproc N is required");
  if (o.command.empty()) throw std::invalid_argument("no program given (put it after --)");
  if (o.node_rank >= o.nnodes) {
    throw std::invalid_argument(
        fmt::format("--node-rank {} must be smaller than --nnodes {}", o.node_rank, o.nnodes));
  }
  if (o.master_port == 0 && o.nnodes > 1) {
    throw std::invalid_argument("--master-port 0 (pick a free port) works on one node only");
  }
  return o;
}

int run(const LaunchOptions& o) {
  const int world = o.nproc * o.nnodes;
  const int port = o.master_port == 0 ? free_port() : o.master_port;
  std::string job_id = o.job_id;
  if (job_id.empty()) {
    const char* env = std::getenv("TORCHELASTIC_RUN_ID");
    job_id = env != nullptr && *env != '\0'
                 ? env
                 : fmt::format("launch-{}-{}", ::getpid(),
                               std::chrono::steady_clock::now().time_since_epoch().count());
  }

  if (::pipe2(signal_pipe, O_CLOEXEC | O_NONBLOCK) != 0) throw std::runtime_error("pipe failed");
  struct sigaction sa{};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);

  std::vector<Child> children(o.nproc);
  std::vector<Stream> streams;
  const pid_t launcher_pid = ::getpid();
  for (int local = 0; local < o.nproc; ++local) {
    const int rank = o.node_rank * o.nproc + local;
    int out[2], err[2];
    if (::pipe2(out, O_CLOEXEC) != 0 || ::pipe2(err, O_CLOEXEC) != 0) {
      throw std::runtime_error("pipe failed");
    }
    pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error(fmt::format("fork failed: {}", std::strerror(errno)));
    if (pid == 0) {
      ::setpgid(0, 0);  // our own group: signals reach each rank once, from the launcher
      // A launcher killed outright (SIGKILL, the OOM killer, a test's timeout) forwards
      // nothing: the kernel then kills the rank. The launcher forks from its only thread,
      // so the signal comes when the launcher itself is gone. If it died before the
      // prctl, we were already re-parented: stop here.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != launcher_pid) ::_exit(128 + SIGKILL);
      ::dup2(out[1], STDOUT_FILENO);
      ::dup2(err[1], STDERR_FILENO);
      ::setenv("RANK", std::to_string(rank).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(local).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(o.nproc).c_str(), 1);
      ::setenv("GROUP_RANK", std::to_string(o.node_rank).c_str(), 1);
      ::setenv("ROLE_RANK", std::to_string(rank).c_str(), 1);
      ::setenv("MASTER_ADDR", o.master_addr.c_str(), 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      ::setenv("TORCHELASTIC_RUN_ID", job_id.c_str(), 1);
      if (o.nproc > 1) ::setenv("OMP_NUM_THREADS", "1", 0);
      if (!o.default_malloc) {
        // glibc raises its mmap threshold each time a large mmapped block is freed, so
        // whether a step's tensors come from fresh pages (a fault per page, every step)
        // or the heap depended on history: LibTorch CPU steps ran at half speed or at
        // full speed in the same program (docs/benchmarks.md). Fixed thresholds keep
        // large blocks on the heap and the heap's top untrimmed.
        ::setenv("MALLOC_MMAP_THRESHOLD_", "1073741824", 0);
        ::setenv("MALLOC_TRIM_THRESHOLD_", "4294967296", 0);
      }
      std::vector<char*> argv;
      for (const auto& a : o.command) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execvp(argv[0], argv.data());
      std::string msg = fmt::format("asgd-launch: cannot run '{}': {}\n", o.command[0],
                                    std::strerror(errno));
      write_all(STDERR_FILENO, msg);
      ::_exit(127);
    }
    ::setpgid(pid, pid);
    ::close(out[1]);
    ::close(err[1]);
    children[local] = Child{rank, pid, true, 0};
    streams.push_back(Stream{out[0], STDOUT_FILENO, fmt::format("[{}]: ", rank), {}});
    streams.push_back(Stream{err[0], STDERR_FILENO, fmt::format("[{}]: ", rank), {}});
  }

  int exit_code = 0;
  int running = o.nproc;
  bool terminating = false;
  std::chrono::steady_clock::time_point kill_at{};
  // Once every rank has exited, what is left of their process groups (a background
  // process holding a pipe) must not keep the launcher waiting.
  std::chrono::steady_clock::time_point drain_until = std::chrono::steady_clock::time_point::max();

  auto signal_all = [&](int sig) {
    for (auto& c : children) {
      if (c.running) ::kill(-c.pid, sig);
    }
  };
  auto start_termination = [&](int sig) {
    signal_all(sig);
    if (!terminating) {
      terminating = true;
      kill_at = std::chrono::steady_clock::now() +
                std::chrono::milliseconds(static_cast<int64_t>(o.grace_seconds * 1000));
    }
  };

  auto streams_open = [&] {
    return std::any_of(streams.begin(), streams.end(), [](const Stream& s) { return s.fd >= 0; });
  };
  while (running > 0 || (streams_open() && std::chrono::steady_clock::now() < drain_until)) {
    std::vector<pollfd> fds;
    fds.push_back({signal_pipe[0], POLLIN, 0});
    std::vector<Stream*> polled;
    for (auto& s : streams) {
      if (s.fd >= 0) {
        fds.push_back({s.fd, POLLIN, 0});
        polled.push_back(&s);
      }
    }
    int rv = ::poll(fds.data(), fds.size(), 100);
    if (rv < 0 && errno != EINTR) throw std::runtime_error("poll failed");
    if (rv > 0) {
      if (fds[0].revents & POLLIN) {
        unsigned char sig;
        while (::read(signal_pipe[0], &sig, 1) == 1) {
          write_all(STDERR_FILENO,
                    fmt::format("asgd-launch: got signal {}, forwarding to all ranks\n", sig));
          start_termination(sig);
        }
      }
      for (size_t k = 1; k < fds.size(); ++k) {
        if (fds[k].revents & (POLLIN | POLLHUP | POLLERR)) polled[k - 1]->pump();
      }
    }
    int status;
    pid_t pid;
    while ((pid = ::waitpid(-1, &status, WNOHANG)) > 0) {
      for (auto& c : children) {
        if (c.pid != pid || !c.running) continue;
        c.running = false;
        --running;
        c.exit_code = WIFEXITED(status) ? WEXITSTATUS(status)
                                        : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
        if (c.exit_code != 0) {
          write_all(STDERR_FILENO,
                    WIFSIGNALED(status)
                        ? fmt::format("asgd-launch: rank {} was killed by signal {} ({})\n", c.rank,
                                      WTERMSIG(status), strsignal(WTERMSIG(status)))
                        : fmt::format("asgd-launch: rank {} exited with code {}\n", c.rank,
                                      c.exit_code));
          if (exit_code == 0) exit_code = c.exit_code;
          if (o.fail_fast && !terminating && running > 0) {
            write_all(STDERR_FILENO, "asgd-launch: --fail-fast: terminating the other ranks\n");
            start_termination(SIGTERM);
          }
        }
      }
    }
    if (terminating && running > 0 && std::chrono::steady_clock::now() >= kill_at) {
      signal_all(SIGKILL);
      kill_at = std::chrono::steady_clock::time_point::max();
    }
    if (running == 0 && drain_until == std::chrono::steady_clock::time_point::max()) {
      for (const auto& c : children) ::kill(-c.pid, SIGKILL);  // leftovers of the ranks' groups
      drain_until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    }
  }
  for (auto& s : streams) {
    if (s.fd >= 0) ::close(s.fd);
  }
  return exit_code;
}

}  // namespace launch
}  // namespace torch_asgd
