#include "cifar/cifar10.h"

#include <fstream>
#include <stdexcept>
#include <vector>

#include <fmt/format.h>

namespace torch_asgd {
namespace examples {
namespace {

constexpr int64_t kRecord = 1 + 3 * 32 * 32;
const char* kFiles[] = {"data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin",
                        "data_batch_4.bin", "data_batch_5.bin", "test_batch.bin"};

std::string missing_message(const std::string& dir, const std::string& file) {
  return fmt::format(
      "{}/{} not found: --data must name a directory with the CIFAR-10 binary version "
      "(data_batch_1.bin ... data_batch_5.bin and test_batch.bin, as in "
      "cifar-10-binary.tar.gz from the dataset's authors, extracted), or run with "
      "--synthetic N to generate a labelled stand-in",
      dir, file);
}

// CIFAR's per-channel means and deviations.
torch::Tensor normalize(const torch::Tensor& u8) {
  auto x = u8.to(torch::kFloat).div_(255.0);
  auto mean = torch::tensor({0.4914f, 0.4822f, 0.4465f}).view({1, 3, 1, 1});
  auto std = torch::tensor({0.2470f, 0.2435f, 0.2616f}).view({1, 3, 1, 1});
  return (x - mean) / std;
}

Dataset read_files(const std::string& dir, const std::vector<std::string>& files) {
  std::vector<torch::Tensor> images, labels;
  for (const auto& f : files) {
    const std::string path = dir + "/" + f;
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) throw std::runtime_error(missing_message(dir, f));
    const int64_t size = in.tellg();
    if (size <= 0 || size % kRecord != 0) {
      throw std::runtime_error(fmt::format(
          "{}: {} bytes is not a whole number of CIFAR-10 records of {} bytes (truncated or not "
          "the binary version?)",
          path, size, kRecord));
    }
    in.seekg(0);
    const int64_t n = size / kRecord;
    auto raw = torch::empty({n, kRecord}, torch::kUInt8);
    in.read(reinterpret_cast<char*>(raw.data_ptr()), size);
    if (!in) throw std::runtime_error(fmt::format("{}: read error", path));
    auto lab = raw.select(1, 0).to(torch::kLong);
    if (lab.max().item<int64_t>() > 9) {
      throw std::runtime_error(fmt::format("{}: a label is not a class 0..9: not a CIFAR-10 file", path));
    }
    labels.push_back(lab);
    images.push_back(raw.narrow(1, 1, 3072).reshape({n, 3, 32, 32}));
  }
  return Dataset{normalize(torch::cat(images)), torch::cat(labels)};
}

Dataset synthetic(int64_t n, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  auto labels = torch::randint(0, 10, {n}, gen, torch::kLong);
  auto images = torch::randint(0, 64, {n, 3, 32, 32}, gen, torch::kLong);
  auto rows = torch::arange(32).view({1, 32, 1}).expand({1, 32, 32});
  auto cols = torch::arange(32).view({1, 1, 32}).expand({1, 32, 32});
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = labels[i].item<int64_t>();
    // Colour from the class's bits, stripes horizontal for k < 5, vertical otherwise.
    auto stripes = ((k < 5 ? rows : cols) / (2 + k % 5)).remainder(2).to(torch::kLong);
    for (int64_t c = 0; c < 3; ++c) {
      const int64_t level = ((k >> c) & 1) ? 160 : 40;
      images[i][c] += stripes.squeeze(0) * level + (k % 2 == 0 && c == 2 ? 30 : 0);
    }
  }
  return Dataset{normalize(images.clamp(0, 255).to(torch::kUInt8)), labels};
}

}  // namespace

std::pair<Dataset, Dataset> read_cifar10(const std::string& dir) {
  std::vector<std::string> train(kFiles, kFiles + 5);
  return {read_files(dir, train), read_files(dir, {kFiles[5]})};
}

std::pair<Dataset, Dataset> synthetic_cifar10(int64_t n, uint64_t seed) {
  return {synthetic(n, seed), synthetic(std::max<int64_t>(10, n / 5), seed + 1)};
}

void write_cifar10_file(const std::string& path, const torch::Tensor& images,
                        const torch::Tensor& labels) {
  const int64_t n = labels.size(0);
  auto raw = torch::empty({n, kRecord}, torch::kUInt8);
  raw.select(1, 0).copy_(labels.to(torch::kUInt8));
  raw.narrow(1, 1, 3072).copy_(images.reshape({n, 3072}));
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(raw.data_ptr()), n * kRecord);
}

}  // namespace examples
}  // namespace torch_asgd
