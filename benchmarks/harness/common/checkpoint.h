// Checkpoints of the examples: one file per rank, DIR/rank-R.pt, holding the model,
// the optimizer (or the parameter server), the step and the sampler. A checkpoint is
// written to a temporary file in DIR, flushed to disk and renamed over the old one,
// so a crash mid-write leaves the previous checkpoint intact and never a torn file.
#pragma once

#include <cstdint>
#include <string>

#include <torch/nn/module.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

namespace torch_asgd {
namespace examples {

// Who wrote a checkpoint: a resumed run must be the same job.
struct CheckpointMeta {
  std::string algo;
  int world_size = 0;
  int rank = 0;
  int64_t step = 0;  // the rank's steps (the server: gradients applied)
};

// A model's fingerprint: sum_k x_k * (k mod 7 + 1) over its parameters in order, in
// float64, and the same sum of |x_k|, its scale. Linear in the model, so the fingerprint
// of a mean of models is the mean of theirs: what a resumed run prints, and tests check
// against the checkpoints it read. Checkpoints store it under kFingerprintKey.
struct Fingerprint {
  double value = 0;
  double scale = 0;
};
Fingerprint fingerprint(const torch::nn::Module& model);
extern const char* const kFingerprintKey;  // a float64 tensor {value, scale}

class RankCheckpoint {
 public:
  RankCheckpoint(std::string dir, int rank);

  const std::string& path() const { return path_; }
  bool exists() const;

  // Writes `meta` and the archive atomically; throws std::runtime_error naming the
  // file and the system's reason.
  void write(torch::serialize::OutputArchive& archive, const CheckpointMeta& meta) const;

  // Reads the checkpoint and checks that it was written by `expected` (its algo, world
  // size and rank); returns the step it was written at. Throws std::runtime_error
  // naming the file for a missing, unreadable, corrupt or foreign checkpoint.
  int64_t read(torch::serialize::InputArchive& archive, const CheckpointMeta& expected) const;

 private:
  std::string dir_;
  std::string path_;
};

}  // namespace examples
}  // namespace torch_asgd
