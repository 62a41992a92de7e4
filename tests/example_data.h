// Generated data and helpers shared by the tests that run the examples as programs.
#pragma once

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
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

// Reads a whole gzip file; empty if it cannot be read.
inline std::vector<uint8_t> gunzip(const std::string& path) {
  std::vector<uint8_t> out;
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) return out;
  std::vector<uint8_t> buf(1 << 20);
  int n;
  while ((n = gzread(f, buf.data(), static_cast<unsigned>(buf.size()))) > 0) out.insert(out.end(), buf.begin(), buf.begin() + n);
  gzclose(f);
  return out;
}

// The real Fashion-MNIST (Debian's dataset-fashion-mnist, installed by scripts/deps.sh):
// the first `train` training and `test` test images, written as plain IDX files into a
// directory of the test's own. Data on which a broken run misses an accuracy bound that
// a healthy one meets, unlike the generated bars (which every run learns perfectly).
inline std::string make_fashion_dir(const std::string& name, int train, int test) {
  // TORCH_ASGD_FASHION_MNIST names another copy (scripts/gpu-check.sh brings its own).
  const char* other = std::getenv("TORCH_ASGD_FASHION_MNIST");
  const std::string src = other != nullptr && *other != 0 ? other : "/usr/share/datasets/fashion-mnist";
  std::string dir = ::testing::TempDir() + "asgd_fashion_" + name + "_" + std::to_string(::getpid());
  ::mkdir(dir.c_str(), 0755);
  auto cut = [&](const std::string& stem, int n) {
    auto images = gunzip(src + "/" + stem + "-images-idx3-ubyte.gz");
    auto labels = gunzip(src + "/" + stem + "-labels-idx1-ubyte.gz");
    if (images.size() < 16 + 784u * n || labels.size() < 8u + n) {
      ADD_FAILURE() << src << " is missing or short: run ./scripts/deps.sh (dataset-fashion-mnist)";
      return;
    }
    std::vector<uint8_t> img, lab;
    put32(img, 2051);
    put32(img, static_cast<uint32_t>(n));
    put32(img, 28);
    put32(img, 28);
    img.insert(img.end(), images.begin() + 16, images.begin() + 16 + 784 * n);
    put32(lab, 2049);
    put32(lab, static_cast<uint32_t>(n));
    lab.insert(lab.end(), labels.begin() + 8, labels.begin() + 8 + n);
    write(dir + "/" + stem + "-images-idx3-ubyte", img, false);
    write(dir + "/" + stem + "-labels-idx1-ubyte", lab, false);
  };
  cut("train", train);
  cut("t10k", test);
  return dir;
}

inline std::string slurp(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// An example's --metrics-out file; null if it cannot be read.
inline nlohmann::json metrics_in(const std::string& metrics_file) {
  std::ifstream in(metrics_file);
  if (!in) return nlohmann::json();
  try {
    return nlohmann::json::parse(in);
  } catch (const std::exception&) {
    return nlohmann::json();
  }
}

// The test accuracy in an example's --metrics-out file; -1 if there is none.
inline double test_accuracy_in(const std::string& metrics_file) {
  const auto m = metrics_in(metrics_file);
  return m.is_object() && m.contains("test_accuracy") ? m["test_accuracy"].get<double>() : -1.0;
}

// Every rank's final test accuracy in the file (-1 for a rank that sent no report).
inline std::vector<double> rank_accuracies_in(const std::string& metrics_file) {
  std::vector<double> out;
  const auto m = metrics_in(metrics_file);
  if (!m.is_object() || !m.contains("ranks")) return out;
  for (const auto& r : m["ranks"]) out.push_back(r.is_null() ? -1.0 : r["accuracy"].get<double>());
  return out;
}

// "asgd-pure" -> "asgd_pure": test names cannot hold '-'.
inline std::string algo_test_name(const ::testing::TestParamInfo<std::string>& info) {
  std::string n = info.param;
  std::replace(n.begin(), n.end(), '-', '_');
  return n;
}

}  // namespace
}  // namespace torch_asgd
