// Pieces of optimizer checkpoints shared by every torch_asgd optimizer: the
// fingerprint of the parameters a checkpoint belongs to (so that loading it into
// another model fails naming the first difference), integer counters, and the
// per-group learning rates (which LR schedulers change and LibTorch's own optimizer
// serialization does not restore).
#pragma once

#include <string>
#include <vector>

#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include "torch_asgd/comm/fingerprint.h"

namespace torch_asgd {
namespace detail {

void write_fingerprint(torch::serialize::OutputArchive& archive, const std::string& prefix,
                       const Fingerprint& fp);
// Throws MismatchError naming the first difference, or saying the state is missing.
void check_fingerprint(torch::serialize::InputArchive& archive, const std::string& prefix,
                       const Fingerprint& current, const std::string& who);

void write_string(torch::serialize::OutputArchive& archive, const std::string& key,
                  const std::string& value);
// Throws MismatchError when the key is missing.
std::string read_string(torch::serialize::InputArchive& archive, const std::string& key);

void write_int64s(torch::serialize::OutputArchive& archive, const std::string& key,
                  const std::vector<int64_t>& values);
// Throws MismatchError unless the key holds exactly `count` values.
std::vector<int64_t> read_int64s(torch::serialize::InputArchive& archive, const std::string& key,
                                 size_t count);

void write_group_lrs(torch::serialize::OutputArchive& archive, const std::string& prefix,
                     const std::vector<torch::optim::OptimizerParamGroup>& groups);
void read_group_lrs(torch::serialize::InputArchive& archive, const std::string& prefix,
                    std::vector<torch::optim::OptimizerParamGroup>& groups);

}  // namespace detail
}  // namespace torch_asgd
