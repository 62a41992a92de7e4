// Collective helpers over a World's Gloo context, for the rare moments optimizers meet
// (resuming from checkpoints). Internal.
#pragma once

#include <string>

#include <ATen/core/Tensor.h>

namespace torch_asgd {
class World;
namespace detail {

// Every rank's `flat` (any device, float or double) becomes the mean over all ranks,
// reduced in double precision. Throws CommError naming `who` on failure.
void average_over_ranks(World& world, const at::Tensor& flat, const std::string& who);

}  // namespace detail
}  // namespace torch_asgd
