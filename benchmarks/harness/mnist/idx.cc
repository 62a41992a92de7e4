#include "mnist/idx.h"

#include <zlib.h>

#include <fstream>
#include <stdexcept>
#include <vector>

#include <fmt/format.h>

namespace torch_asgd {
namespace examples {
namespace {

bool exists(const std::string& path) { return std::ifstream(path).good(); }

// The whole file, gunzipped when its name ends in .gz. Bounded: no IDX file of this
// dataset is larger than 64 MB uncompressed.
std::vector<uint8_t> slurp(const std::string& path) {
  constexpr size_t kLimit = 64u << 20;
  std::vector<uint8_t> out;
  gzFile f = gzopen(path.c_str(), "rb");  // reads plain files as they are, too
  if (f == nullptr) throw std::runtime_error(fmt::format("{}: cannot open", path));
  uint8_t buf[1 << 16];
  for (;;) {
    int n = gzread(f, buf, sizeof(buf));
    if (n < 0) {
      int err = 0;
      std::string what = gzerror(f, &err);
      gzclose(f);
      throw std::runtime_error(fmt::format("{}: corrupt compressed data ({})", path, what));
    }
    if (n == 0) break;
    out.insert(out.end(), buf, buf + n);
    if (out.size() > kLimit) {
      gzclose(f);
      throw std::runtime_error(fmt::format("{}: larger than {} MB, not an MNIST IDX file", path,
                                           kLimit >> 20));
    }
  }
  gzclose(f);
  return out;
}

uint32_t be32(const std::vector<uint8_t>& b, size_t off) {
  return (uint32_t{b[off]} << 24) | (uint32_t{b[off + 1]} << 16) | (uint32_t{b[off + 2]} << 8) |
         uint32_t{b[off + 3]};
}

std::string find(const std::string& dir, const std::string& name) {
  for (const std::string& candidate : {dir + "/" + name, dir + "/" + name + ".gz"}) {
    if (exists(candidate)) return candidate;
  }
  throw std::runtime_error(fmt::format(
      "{}/{}[.gz] not found: --data must name a directory with MNIST-format files "
      "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
      "t10k-labels-idx1-ubyte, plain or .gz); Debian's dataset-fashion-mnist installs them in "
      "/usr/share/datasets/fashion-mnist",
      dir, name));
}

}  // namespace

ImageSet read_idx(const std::string& dir, const std::string& stem) {
  const std::string image_path = find(dir, stem + "-images-idx3-ubyte");
  const std::string label_path = find(dir, stem + "-labels-idx1-ubyte");
  auto img = slurp(image_path);
  auto lab = slurp(label_path);
  if (img.size() < 16 || be32(img, 0) != 2051) {
    throw std::runtime_error(fmt::format(
        "{}: wrong magic number (expected 2051, an IDX file of 3-dimensional unsigned bytes)",
        image_path));
  }
  if (lab.size() < 8 || be32(lab, 0) != 2049) {
    throw std::runtime_error(fmt::format(
        "{}: wrong magic number (expected 2049, an IDX file of 1-dimensional unsigned bytes)",
        label_path));
  }
  const uint64_t n = be32(img, 4), rows = be32(img, 8), cols = be32(img, 12);
  if (rows != 28 || cols != 28) {
    throw std::runtime_error(fmt::format("{}: images are {}x{}, expected 28x28", image_path, rows, cols));
  }
  if (img.size() != 16 + n * rows * cols) {
    throw std::runtime_error(fmt::format("{}: truncated or oversized: {} images need {} bytes, the "
                                         "file has {}",
                                         image_path, n, 16 + n * rows * cols, img.size()));
  }
  const uint64_t nl = be32(lab, 4);
  if (lab.size() != 8 + nl) {
    throw std::runtime_error(fmt::format("{}: truncated or oversized: {} labels need {} bytes, the "
                                         "file has {}",
                                         label_path, nl, 8 + nl, lab.size()));
  }
  if (nl != n) {
    throw std::runtime_error(fmt::format("{} has {} images but {} has {} labels", image_path, n,
                                         label_path, nl));
  }
  for (uint64_t i = 0; i < nl; ++i) {
    if (lab[8 + i] > 9) {
      throw std::runtime_error(fmt::format("{}: label {} of item {} is not a digit class 0..9",
                                           label_path, lab[8 + i], i));
    }
  }
  ImageSet set;
  set.images = torch::from_blob(img.data() + 16, {static_cast<int64_t>(n), 1, 28, 28}, torch::kUInt8)
                   .to(torch::kFloat)
                   .div_(255.0)
                   .sub_(0.5)
                   .div_(0.5);
  set.labels = torch::from_blob(lab.data() + 8, {static_cast<int64_t>(n)}, torch::kUInt8).to(torch::kLong);
  return set;
}

}  // namespace examples
}  // namespace torch_asgd
