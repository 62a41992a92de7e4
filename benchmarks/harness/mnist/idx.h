// Reader for MNIST's IDX format (train-images-idx3-ubyte, train-labels-idx1-ubyte, ...),
// plain or gzip-compressed; Fashion-MNIST uses the same format.
#pragma once

#include <string>

#include <torch/torch.h>

namespace torch_asgd {
namespace examples {

struct ImageSet {
  torch::Tensor images;  // [N, 1, 28, 28] float, normalized
  torch::Tensor labels;  // [N] int64 in 0..9
};

// Reads "<dir>/<stem>-images-idx3-ubyte[.gz]" and "<dir>/<stem>-labels-idx1-ubyte[.gz]"
// (stem "train" or "t10k"). Throws std::runtime_error with one line naming the file
// and what is wrong: missing, truncated, wrong magic number, inconsistent counts.
ImageSet read_idx(const std::string& dir, const std::string& stem);

}  // namespace examples
}  // namespace torch_asgd
