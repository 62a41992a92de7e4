#include "common/checkpoint.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include <fmt/format.h>
#include <torch/torch.h>

namespace torch_asgd {
namespace examples {
namespace {

const char* const kMetaKey = "example/meta";  // [format, world_size, rank, step]
const char* const kAlgoKey = "example/algo";  // the --algo, as bytes
constexpr int64_t kFormat = 1;

std::runtime_error system_error(const std::string& what, const std::string& path) {
  return std::runtime_error(fmt::format("{} {}: {}", what, path, std::strerror(errno)));
}

}  // namespace

const char* const kFingerprintKey = "example/model_fingerprint";

Fingerprint fingerprint(const torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  Fingerprint f;
  for (const auto& p : model.parameters()) {
    const auto x = p.detach().to(torch::kCPU, torch::kDouble).reshape(-1);
    const auto w = torch::arange(x.numel(), torch::kLong).remainder(7).add(1).to(torch::kDouble);
    f.value += x.mul(w).sum().item<double>();
    f.scale += x.abs().mul(w).sum().item<double>();
  }
  return f;
}

RankCheckpoint::RankCheckpoint(std::string dir, int rank)
    : dir_(std::move(dir)), path_(fmt::format("{}/rank-{}.pt", dir_, rank)) {
  // A process killed mid-write leaves its temporary file behind: remove this rank's.
  const std::string prefix = fmt::format("rank-{}.pt.tmp-", rank);
  if (DIR* d = ::opendir(dir_.c_str())) {
    while (dirent* e = ::readdir(d)) {
      if (std::strncmp(e->d_name, prefix.c_str(), prefix.size()) == 0) {
        ::unlink((dir_ + "/" + e->d_name).c_str());
      }
    }
    ::closedir(d);
  }
}

bool RankCheckpoint::exists() const {
  struct stat st {};
  return ::stat(path_.c_str(), &st) == 0;
}

void RankCheckpoint::write(torch::serialize::OutputArchive& archive,
                           const CheckpointMeta& meta) const {
  archive.write(kMetaKey, torch::tensor({kFormat, int64_t{meta.world_size}, int64_t{meta.rank},
                                         meta.step},
                                        torch::kLong));
  auto algo = torch::empty({static_cast<int64_t>(meta.algo.size())}, torch::kByte);
  std::memcpy(algo.data_ptr(), meta.algo.data(), meta.algo.size());
  archive.write(kAlgoKey, algo);

  if (::mkdir(dir_.c_str(), 0777) != 0 && errno != EEXIST) {
    throw system_error("cannot create the checkpoint directory", dir_);
  }
  const std::string tmp = fmt::format("{}.tmp-{}", path_, ::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) throw system_error("cannot write the checkpoint", tmp);
  bool ok = true;
  int saved_errno = 0;
  // Tests: stop for a while once the temporary file is open, so that a kill lands mid-write.
  static const long pause_ms = [] {
    const char* v = std::getenv("TORCH_ASGD_TEST_CHECKPOINT_PAUSE_MS");
    return v != nullptr ? std::atol(v) : 0L;
  }();
  bool paused = false;
  archive.save_to([&](const void* data, size_t n) -> size_t {
    if (pause_ms > 0 && !paused && ok) {
      paused = true;
      std::fprintf(stderr, "checkpoint: mid-write of %s\n", tmp.c_str());
      std::fflush(stderr);
      std::this_thread::sleep_for(std::chrono::milliseconds(pause_ms));
    }
    const char* p = static_cast<const char*>(data);
    size_t left = n;
    while (ok && left > 0) {
      const ssize_t w = ::write(fd, p, left);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        ok = false;
        saved_errno = errno;
        break;
      }
      p += w;
      left -= static_cast<size_t>(w);
    }
    return n;  // a failure is reported below, once the writer is done
  });
  if (ok && ::fsync(fd) != 0) {
    ok = false;
    saved_errno = errno;
  }
  ::close(fd);
  if (!ok) {
    ::unlink(tmp.c_str());
    errno = saved_errno;
    throw system_error("cannot write the checkpoint", tmp);
  }
  if (::rename(tmp.c_str(), path_.c_str()) != 0) {
    saved_errno = errno;
    ::unlink(tmp.c_str());
    errno = saved_errno;
    throw system_error("cannot move the new checkpoint into place at", path_);
  }
  // The rename itself must reach the disk too.
  const int dfd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

int64_t RankCheckpoint::read(torch::serialize::InputArchive& archive,
                             const CheckpointMeta& expected) const {
  if (!exists()) {
    throw std::runtime_error(fmt::format(
        "--resume: there is no checkpoint {} to resume from; start without --resume, or point "
        "--checkpoint-dir at the directory of the run to continue",
        path_));
  }
  try {
    archive.load_from(path_);
  } catch (const c10::Error& e) {
    throw std::runtime_error(fmt::format(
        "checkpoint {} is unreadable: it is corrupt or truncated, or not a checkpoint ({}); "
        "delete it to start over",
        path_, e.what_without_backtrace()));
  }
  torch::Tensor meta, algo;
  if (!archive.try_read(kMetaKey, meta) || !archive.try_read(kAlgoKey, algo) ||
      meta.scalar_type() != torch::kLong || meta.numel() != 4 || algo.scalar_type() != torch::kByte) {
    throw std::runtime_error(fmt::format(
        "checkpoint {} was not written by this example (no run description in it)", path_));
  }
  meta = meta.contiguous();
  algo = algo.contiguous();
  const int64_t* m = meta.data_ptr<int64_t>();
  CheckpointMeta got;
  got.algo.assign(static_cast<const char*>(algo.data_ptr()), static_cast<size_t>(algo.numel()));
  got.world_size = static_cast<int>(m[1]);
  got.rank = static_cast<int>(m[2]);
  got.step = m[3];
  if (m[0] != kFormat) {
    throw std::runtime_error(
        fmt::format("checkpoint {} has format {}, this program reads format {}", path_, m[0], kFormat));
  }
  if (got.algo != expected.algo || got.world_size != expected.world_size || got.rank != expected.rank) {
    throw std::runtime_error(fmt::format(
        "checkpoint {} was written by rank {} of {} running --algo {}, but this is rank {} of {} "
        "running --algo {}: resume with the same algorithm and number of ranks",
        path_, got.rank, got.world_size, got.algo, expected.rank, expected.world_size,
        expected.algo));
  }
  if (got.step < 0) {
    throw std::runtime_error(fmt::format("checkpoint {} is corrupt: negative step {}", path_, got.step));
  }
  return got.step;
}

}  // namespace examples
}  // namespace torch_asgd
