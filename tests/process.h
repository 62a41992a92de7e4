// Test helper: real child processes with a chosen environment, captured output and a
// bounded wait (a child that outlives its timeout is killed, and the test fails
// rather than hangs).
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "torch_asgd/launch/free_port.h"

extern char** environ;

namespace torch_asgd {
namespace testing {

// Directory of the running test binary: build/bin, where every executable lives.
inline std::string bin_dir() {
  char buf[PATH_MAX] = {};
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  std::string p(buf, n > 0 ? static_cast<size_t>(n) : 0);
  return p.substr(0, p.rfind('/'));
}

struct Proc {
  pid_t pid = -1;
  int in = -1, out = -1, err = -1;
  std::string out_buf, err_buf;
  int exit_code = -1;  // 128+signal when killed
  bool timed_out = false;
  double seconds = 0;
  std::chrono::steady_clock::time_point started;
};

// Launcher variables of the test's own environment are removed so that only `env`
// decides where a child stands.
inline Proc start(const std::vector<std::string>& argv,
                  const std::map<std::string, std::string>& env = {}) {
  static const char* kLauncherVars[] = {
      "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
      "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "SLURM_PROCID", "SLURM_NTASKS",
      "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "TORCH_ASGD_STORE_PATH",
      "TORCH_ASGD_JOB_ID", "TORCH_ASGD_TIMEOUT", "GLOO_SOCKET_IFNAME"};
  std::map<std::string, std::string> vars;
  for (char** e = environ; *e != nullptr; ++e) {
    const char* eq = std::strchr(*e, '=');
    if (eq != nullptr) vars[std::string(*e, static_cast<size_t>(eq - *e))] = eq + 1;
  }
  for (const char* v : kLauncherVars) vars.erase(v);
  for (const auto& [k, v] : env) vars[k] = v;
  std::vector<std::string> env_strings;
  for (const auto& [k, v] : vars) env_strings.push_back(k + "=" + v);

  int in[2], out[2], err[2];
  if (::pipe2(in, O_CLOEXEC) != 0 || ::pipe2(out, O_CLOEXEC) != 0 || ::pipe2(err, O_CLOEXEC) != 0) {
    return Proc();
  }
  Proc p;
  p.started = std::chrono::steady_clock::now();
  p.pid = ::fork();
  if (p.pid == 0) {
    ::dup2(in[0], STDIN_FILENO);
    ::dup2(out[1], STDOUT_FILENO);
    ::dup2(err[1], STDERR_FILENO);
    std::vector<char*> a, e;
    for (const auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    for (const auto& s : env_strings) e.push_back(const_cast<char*>(s.c_str()));
    e.push_back(nullptr);
    ::execve(a[0], a.data(), e.data());
    ::_exit(127);
  }
  ::close(in[0]);
  ::close(out[1]);
  ::close(err[1]);
  p.in = in[1];
  p.out = out[0];
  p.err = err[0];
  ::fcntl(p.out, F_SETFL, O_NONBLOCK);
  ::fcntl(p.err, F_SETFL, O_NONBLOCK);
  return p;
}

// Reads what is available (waiting up to `wait_ms`); returns false once both pipes closed.
inline bool pump(Proc& p, int wait_ms) {
  pollfd fds[2] = {{p.out, POLLIN, 0}, {p.err, POLLIN, 0}};
  int open = (p.out >= 0) + (p.err >= 0);
  if (open == 0) return false;
  ::poll(fds, 2, wait_ms);
  char buf[65536];
  for (int k = 0; k < 2; ++k) {
    int& fd = k == 0 ? p.out : p.err;
    if (fd < 0 || !(fds[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n > 0) {
      (k == 0 ? p.out_buf : p.err_buf).append(buf, static_cast<size_t>(n));
    } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
      ::close(fd);
      fd = -1;
    }
  }
  return true;
}

// Waits until stdout contains `text`; false after `timeout`.
inline bool wait_for_output(Proc& p, const std::string& text, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (p.out_buf.find(text) == std::string::npos) {
    if (std::chrono::steady_clock::now() >= deadline || !pump(p, 50)) {
      return p.out_buf.find(text) != std::string::npos;
    }
  }
  return true;
}

// Waits until stderr contains `text`; false after `timeout`.
inline bool wait_for_error(Proc& p, const std::string& text, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (p.err_buf.find(text) == std::string::npos) {
    if (std::chrono::steady_clock::now() >= deadline || !pump(p, 50)) {
      return p.err_buf.find(text) != std::string::npos;
    }
  }
  return true;
}

inline void write_stdin(Proc& p, const std::string& s) {
  ssize_t unused = ::write(p.in, s.data(), s.size());
  (void)unused;
}

// Waits for exit (collecting output); kills the child after `timeout`.
inline void finish(Proc& p, std::chrono::milliseconds timeout) {
  if (p.in >= 0) {
    ::close(p.in);
    p.in = -1;
  }
  auto deadline = p.started + timeout;
  int status = 0;
  for (;;) {
    pump(p, 20);
    pid_t r = ::waitpid(p.pid, &status, WNOHANG);
    if (r == p.pid) break;
    if (std::chrono::steady_clock::now() >= deadline) {
      p.timed_out = true;
      ::kill(p.pid, SIGKILL);
      ::waitpid(p.pid, &status, 0);
      break;
    }
  }
  while (pump(p, 20)) {
  }
  p.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  p.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - p.started).count();
}

inline Proc run(const std::vector<std::string>& argv,
                const std::map<std::string, std::string>& env = {},
                std::chrono::milliseconds timeout = std::chrono::seconds(120)) {
  Proc p = start(argv, env);
  finish(p, timeout);
  return p;
}

// torchrun's variables for rank `rank` of `size` meeting at 127.0.0.1:`port`, with
// the rendezvous timeout in seconds.
inline std::map<std::string, std::string> rank_env(int rank, int size, int port,
                                                   const std::string& timeout = "20") {
  return {{"RANK", std::to_string(rank)},    {"WORLD_SIZE", std::to_string(size)},
          {"MASTER_ADDR", "127.0.0.1"},      {"MASTER_PORT", std::to_string(port)},
          {"TORCH_ASGD_TIMEOUT", timeout},   {"TORCHELASTIC_RUN_ID", "e2e"}};
}

// A TCP port nobody listens on right now, below the ephemeral range, so that no other
// process's connection takes it before the rank that listens there starts.
using launch::free_port;

// Starts `size` ranks of `argv` on loopback, each with rank_env() at a free port.
inline std::vector<Proc> start_ranks(int size, const std::vector<std::string>& argv,
                                     const std::string& timeout = "20") {
  const int port = free_port();
  std::vector<Proc> ranks;
  for (int r = 0; r < size; ++r) ranks.push_back(start(argv, rank_env(r, size, port, timeout)));
  return ranks;
}

}  // namespace testing
}  // namespace torch_asgd
