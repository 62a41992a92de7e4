// Real English text as the language model's data: the bytes of a file, or of every
// regular file of a directory in name order (by default Debian's fortunes, ~2.6 MB:
// /usr/share/games/fortunes; `.dat` index files and links are skipped), cut into
// disjoint windows of context + 1 bytes. A sample's input is a window's first `context`
// bytes, its labels the `context` bytes that follow each of them; every 20th window is
// held out as the test (validation) set.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "common/example.h"

namespace torch_asgd {
namespace examples {

// The text under `path`. Throws std::runtime_error with one line that names the path and
// what to do when it is missing, unreadable, or too short for `min_bytes`.
std::string read_text(const std::string& path, int64_t min_bytes);

// The training and held-out windows of `text` (every `heldout_every`-th window held out).
std::pair<Dataset, Dataset> text_windows(const std::string& text, int64_t context, int64_t heldout_every = 20);

}  // namespace examples
}  // namespace torch_asgd
