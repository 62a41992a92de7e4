#include "lm/text.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <system_error>
#include <vector>

#include <fmt/format.h>

namespace torch_asgd {
namespace examples {

namespace fs = std::filesystem;

namespace {

const char* const kInstallHint = "scripts/deps.sh installs Debian's fortunes: apt-get install fortunes";

std::string read_file(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad() || (!in.eof() && in.fail())) {
    throw std::runtime_error(fmt::format("cannot read {}", file.string()));
  }
  return bytes;
}

}  // namespace

std::string read_text(const std::string& path, int64_t min_bytes) {
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (ec || !fs::exists(status)) {
    throw std::runtime_error(fmt::format("--data {}: no such file or directory ({})", path, kInstallHint));
  }
  std::vector<fs::path> files;
  if (fs::is_directory(status)) {
    for (const auto& entry : fs::directory_iterator(path, ec)) {
      if (entry.is_symlink() || !entry.is_regular_file() || entry.path().extension() == ".dat") continue;
      files.push_back(entry.path());
    }
    if (ec) throw std::runtime_error(fmt::format("--data {}: cannot list the directory: {}", path, ec.message()));
    std::sort(files.begin(), files.end());
  } else {
    files.push_back(path);
  }
  std::string text;
  for (const auto& f : files) text += read_file(f);
  if (static_cast<int64_t>(text.size()) < min_bytes) {
    throw std::runtime_error(fmt::format(
        "--data {}: {} bytes of text in {} file(s), and this run needs at least {} (20 windows of "
        "--context + 1 bytes); give a larger text ({})",
        path, text.size(), files.size(), min_bytes, kInstallHint));
  }
  return text;
}

std::pair<Dataset, Dataset> text_windows(const std::string& text, int64_t context, int64_t heldout_every) {
  const int64_t span = context + 1;
  const int64_t windows = static_cast<int64_t>(text.size()) / span;
  auto all = torch::from_blob(const_cast<char*>(text.data()), {windows, span}, torch::kUInt8).to(torch::kLong);
  auto heldout = torch::arange(windows, torch::kLong).remainder(heldout_every).eq(heldout_every - 1);
  auto train = all.index({heldout.logical_not()});
  auto test = all.index({heldout});
  auto split = [&](const torch::Tensor& w) {
    return Dataset{w.narrow(1, 0, context).contiguous(), w.narrow(1, 1, context).contiguous()};
  };
  return {split(train), split(test)};
}

}  // namespace examples
}  // namespace torch_asgd
