#include "torch_asgd/comm/collectives.h"

#include <numeric>

#include <fmt/format.h>
#include <gloo/allgatherv.h>
#include <gloo/allreduce.h>
#include <gloo/alltoallv.h>
#include <gloo/broadcast.h>
#include <gloo/math.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include "torch_asgd/comm/detail/mesh.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/comm/world.h"

namespace torch_asgd {
namespace {

using ReduceFn = void (*)(void*, const void*, const void*, size_t);

template <typename T>
ReduceFn reduce_fn(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return &gloo::sum<T>;
    case ReduceOp::kMin:
      return &gloo::min<T>;
    case ReduceOp::kMax:
      return &gloo::max<T>;
  }
  return nullptr;
}

// What Gloo threw, as CommError.
template <typename F>
void run(World& world, const char* what, F&& call) {
  try {
    call();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw CommError(fmt::format("rank {}: {} failed: {}", world.rank(), what,
                                std::string(e.what()).substr(0, 300)));
  }
}

}  // namespace

void all_reduce(World& world, at::Tensor& values, ReduceOp op, uint32_t tag) {
  if (!values.defined() || !values.device().is_cpu() || !values.is_contiguous()) {
    throw ConfigError("all_reduce: the tensor must be defined, on the CPU and contiguous");
  }
  if (world.size() < 2 || values.numel() == 0) return;
  gloo::AllreduceOptions opts(world.mesh().context());
  const size_t n = static_cast<size_t>(values.numel());
  switch (values.scalar_type()) {
    case at::kFloat:
      opts.setInput(values.data_ptr<float>(), n);
      opts.setOutput(values.data_ptr<float>(), n);
      opts.setReduceFunction(reduce_fn<float>(op));
      break;
    case at::kDouble:
      opts.setInput(values.data_ptr<double>(), n);
      opts.setOutput(values.data_ptr<double>(), n);
      opts.setReduceFunction(reduce_fn<double>(op));
      break;
    case at::kLong:
      opts.setInput(values.data_ptr<int64_t>(), n);
      opts.setOutput(values.data_ptr<int64_t>(), n);
      opts.setReduceFunction(reduce_fn<int64_t>(op));
      break;
    default:
      throw ConfigError(fmt::format("all_reduce: tensors of {} cannot be reduced; use float, "
                                    "double or int64",
                                    c10::toString(values.scalar_type())));
  }
  opts.setTag(tag);
  opts.setTimeout(world.options().timeout);
  run(world, "all-reduce", [&] { gloo::allreduce(opts); });
}

void broadcast(World& world, at::Tensor& values, int root, uint32_t tag) {
  if (!values.defined() || !values.device().is_cpu() || !values.is_contiguous()) {
    throw ConfigError("broadcast: the tensor must be defined, on the CPU and contiguous");
  }
  if (root < 0 || root >= world.size()) {
    throw ConfigError(fmt::format("broadcast: root {} is not a rank of this world of {}", root, world.size()));
  }
  if (world.size() < 2 || values.numel() == 0) return;
  gloo::BroadcastOptions opts(world.mesh().context());
  opts.setOutput(static_cast<uint8_t*>(values.data_ptr()), values.nbytes());
  opts.setRoot(root);
  opts.setTag(tag);
  opts.setTimeout(world.options().timeout);
  run(world, "broadcast", [&] { gloo::broadcast(opts); });
}

void all_to_all_bytes(World& world, const uint8_t* send, const std::vector<size_t>& send_counts,
                      uint8_t* recv, const std::vector<size_t>& recv_counts, uint32_t tag) {
  const size_t n = static_cast<size_t>(world.size());
  if (send_counts.size() != n || recv_counts.size() != n) {
    throw ConfigError(fmt::format("all_to_all_bytes: {} and {} counts given for {} ranks",
                                  send_counts.size(), recv_counts.size(), n));
  }
  gloo::AlltoallvOptions opts(world.mesh().context());
  std::vector<int64_t> out(send_counts.begin(), send_counts.end());
  std::vector<int64_t> in(recv_counts.begin(), recv_counts.end());
  opts.setInput(const_cast<uint8_t*>(send), out);
  opts.setOutput(recv, in);
  opts.setTag(tag);
  opts.setTimeout(world.options().timeout);
  run(world, "all-to-all", [&] { gloo::alltoallv(opts); });
}

void all_gather_bytes(World& world, uint8_t* buffer, const std::vector<size_t>& counts, uint32_t tag) {
  if (counts.size() != static_cast<size_t>(world.size())) {
    throw ConfigError(fmt::format("all_gather_bytes: {} counts given for {} ranks", counts.size(),
                                  world.size()));
  }
  if (world.size() < 2) return;
  gloo::AllgathervOptions opts(world.mesh().context());
  opts.setOutput(buffer, counts);  // no input: in place
  opts.setTag(tag);
  opts.setTimeout(world.options().timeout);
  run(world, "all-gather", [&] { gloo::allgatherv(opts); });
}

void World::barrier(const std::string& name) {
  if (size() == 1) return;
  const std::string prefix = "barrier/" + name + "/";
  store_->set(prefix + std::to_string(rank()), std::vector<uint8_t>{1});
  wait_for_all(prefix, fmt::format("barrier '{}'", name));
}

}  // namespace torch_asgd
