// Collectives over a World: the moments when every rank meets (SyncSGD's all-reduce,
// averaging the models on resync(), the examples agreeing to stop), over the World's
// connections. Use these rather than a Gloo of your own: torch_asgd's Gloo is private to
// libtorch_asgd.so (docs/operations.md, "Any LibTorch").
//
// Every call is collective: every rank makes it, with the same sizes and tag, in the same
// order. It blocks until every rank has, bounded by world.options().timeout, and throws
// CommError (with what the transport said) on a timeout or a failed peer. Collectives
// with distinct tags may run at the same time from different threads; those with one
// tag may not. A world of one rank returns at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace torch_asgd {

class World;

enum class ReduceOp { kSum, kMin, kMax };

// Every rank's `values` (a contiguous CPU tensor of float, double or int64) becomes its
// element-wise reduction over the ranks. Throws ConfigError for another tensor.
void all_reduce(World& world, at::Tensor& values, ReduceOp op = ReduceOp::kSum, uint32_t tag = 0);

// Every rank's `values` (a contiguous CPU tensor of any dtype) becomes rank `root`'s.
void broadcast(World& world, at::Tensor& values, int root, uint32_t tag = 0);

// Each rank sends `send_counts[j]` bytes, from `send` in rank order, to rank j, and
// receives `recv_counts[j]` bytes from rank j into `recv`, in rank order.
void all_to_all_bytes(World& world, const uint8_t* send, const std::vector<size_t>& send_counts,
                      uint8_t* recv, const std::vector<size_t>& recv_counts, uint32_t tag = 0);

// `buffer` holds counts[j] bytes of each rank j, in rank order; each rank fills in its own
// part, and afterwards every part holds its rank's bytes.
void all_gather_bytes(World& world, uint8_t* buffer, const std::vector<size_t>& counts,
                      uint32_t tag = 0);

}  // namespace torch_asgd
