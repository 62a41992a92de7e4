// The checks every optimizer makes of its Compression option, with one wording, so that
// a user sees the same message whichever algorithm refused it. Internal.
#pragma once

#include <string>

#include <c10/core/ScalarType.h>
#include <fmt/format.h>

#include "torch_asgd/comm/codec.h"
#include "torch_asgd/comm/error.h"

namespace torch_asgd {
namespace detail {

// Throws ConfigError, naming `who`, for a topk fraction outside (0, 1].
inline void check_topk_fraction(const Compression& c, const std::string& who) {
  if (c.codec == Codec::kTopK && !(c.topk_fraction > 0 && c.topk_fraction <= 1)) {
    throw ConfigError(fmt::format("{}: topk fraction {} must be in (0, 1]", who, c.topk_fraction));
  }
}

// Throws ConfigError, naming `who`, for a lossy codec on parameters that are not float32.
inline void check_codec_dtype(const Compression& c, c10::ScalarType dtype, const std::string& who) {
  if (c.lossy() && dtype != at::kFloat) {
    throw ConfigError(fmt::format("{}: compression '{}' needs float32 parameters, these are {}; use "
                                  "compression none",
                                  who, c.describe(), c10::toString(dtype)));
  }
}

}  // namespace detail
}  // namespace torch_asgd
