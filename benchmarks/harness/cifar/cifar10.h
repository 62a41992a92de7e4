// CIFAR-10 in its binary format (data_batch_1.bin .. data_batch_5.bin, test_batch.bin:
// records of 1 label byte and 3072 pixel bytes, red, green, blue planes of 32x32),
// and a generated stand-in for smoke runs.
#pragma once

#include <string>
#include <utility>

#include "common/example.h"

namespace torch_asgd {
namespace examples {

// Train (the five data batches) and test set from `dir`. Throws std::runtime_error
// with one line naming what is missing or malformed.
std::pair<Dataset, Dataset> read_cifar10(const std::string& dir);

// `n` training and n/5 test images in CIFAR's shape whose classes are told apart by
// colour and stripe orientation; deterministic for a seed.
std::pair<Dataset, Dataset> synthetic_cifar10(int64_t n, uint64_t seed);

// Writes `images` ([N,3,32,32] uint8) and `labels` as one CIFAR-10 binary file.
void write_cifar10_file(const std::string& path, const torch::Tensor& images,
                        const torch::Tensor& labels);

}  // namespace examples
}  // namespace torch_asgd
