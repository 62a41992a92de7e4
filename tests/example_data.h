// Generated data and helpers shared by the tests that run the examples as programs.
#pragma once

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "process.h"

namespace torch_asgd {
namespace {

inline std::string bin(const std::string& name) { return testing::bin_dir() + "/" + name; }

inline void put32(std::vector<uint8_t>& b, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(v >> s));
}

// n images of 28x28 whose class k is a bright bar in row band k: learnable.
inline std::pair<std::vector<uint8_t>, std::vector<uint8_t>> idx_files(int n, uint32_t seed) {
  std::vector<uint8_t> img, lab;
  put32(img, 2051);
  put32(img, static_cast<uint32_t>(n));
  put32(img, 28);
  put32(img, 28);
  put32(lab, 2049);
  put32(lab, static_cast<uint32_t>(n));
  uint32_t x = seed;
  for (int i = 0; i < n; ++i) {
    const int k = i % 10;
    lab.push_back(static_cast<uint8_t>(k));
    for (int r = 0; r < 28; ++r) {
      for (int c = 0; c < 28; ++c) {
        x = x * 1664525u + 1013904223u;
        const bool bar = r >= 2 + 2 * k && r < 4 + 2 * k;
        img.push_back(static_cast<uint8_t>(bar ? 200 + (x >> 28) : (x >> 27)));
      }
    }
  }
  return {img, lab};
}

inline void write(const std::string& path, const std::vector<uint8_t>& bytes, bool gz) {
  if (gz) {
    gzFile f = gzopen((path + ".gz").c_str(), "wb");
    gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
    gzclose(f);
  } else {
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                                static_cast<std::streamsize>(bytes.size()));
  }
}

inline std::string make_mnist_dir(const std::string& name, bool gz) {
  std::string dir = ::testing::TempDir() + "asgd_" + name + "_" + std::to_string(::getpid());
  ::mkdir(dir.c_str(), 0755);
  auto [train_img, train_lab] = idx_files(600, 1);
  auto [test_img, test_lab] = idx_files(200, 2);
  write(dir + "/train-images-idx3-ubyte", train_img, gz);
  write(dir + "/train-labels-idx1-ubyte", train_lab, gz);
  write(dir + "/t10k-images-idx3-ubyte", test_img, gz);
  write(dir + "/t10k-labels-idx1-ubyte", test_lab, gz);
  return dir;
}

inline std::string slurp(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The test accuracy in an example's --metrics-out file; -1 if there is none.
inline double test_accuracy_in(const std::string& metrics_file) {
  const std::string m = slurp(metrics_file);
  const auto at = m.find("\"test_accuracy\": ");
  return at == std::string::npos ? -1.0 : std::stod(m.substr(at + 17));
}

// "asgd-pure" -> "asgd_pure": test names cannot hold '-'.
inline std::string algo_test_name(const ::testing::TestParamInfo<std::string>& info) {
  std::string n = info.param;
  std::replace(n.begin(), n.end(), '-', '_');
  return n;
}

}  // namespace
}  // namespace torch_asgd
