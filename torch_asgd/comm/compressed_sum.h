// CompressedSum: the sum of a float32 vector over every rank of a World, travelling
// encoded (codec.h) with error feedback: a reduce-scatter and an all-gather of encoded
// shares, each rank sending and receiving about 2 (n-1)/n encoded vectors, as a ring
// all-reduce does uncompressed (SyncSGD's compressed gradients).
//
//   1. every rank encodes its vector plus what its earlier sums' encodings lost (its
//      residual), and sends share j (whole codec blocks, about 1/n of the elements) to
//      rank j;
//   2. rank j sums the n decoded shares in rank order, adds what the encoding of its
//      earlier sums lost (its second residual), and encodes the sum (keeping the loss);
//   3. the encoded sums are all-gathered, and every rank decodes the same bytes, so
//      that every rank's result is bit-identical and, over a run, the sums delivered plus
//      the ranks' residuals (both kinds) equal the vectors given.
//
// sum() is collective. It fails on every rank alike, before any rank's residuals change,
// with DivergedError when a rank's vector holds NaN or Inf (or values too large for the
// codec) or a share's sum is too large, and CommError when a rank's encoded share
// arrives undecodable at the rank that reduces it (a sum that arrives undecodable fails
// the rank that received it), or when the exchange does not complete within the World's
// timeout. Thread safety: one thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "torch_asgd/comm/codec.h"

namespace torch_asgd {

class World;

class CompressedSum {
 public:
  // `who` and `what` name the caller and its vectors in errors ("SyncSGD", "gradients").
  // Throws ConfigError for a lossless compression (use all_reduce()).
  CompressedSum(std::shared_ptr<World> world, Compression compression, int64_t numel,
                std::string who, std::string what);

  // `values` (float32, CPU, numel) becomes the decoded sum over the ranks. `values` is
  // swapped with an internal buffer of the same size (no copy of the vector).
  void sum(at::Tensor& values);

  // What this rank holds that no sum has delivered yet, flat: what its vectors'
  // encodings lost, plus, on its share, what its sums' encodings lost. A new tensor.
  at::Tensor residual() const;
  // For checkpoints: the residual of this rank's vectors (flat), and that of its sums
  // (flat, zero outside its share).
  const at::Tensor& vector_residual() const { return residual_; }
  at::Tensor sum_residual() const;
  // Restores residuals saved by any rank, of a world of any size: what lies in this
  // rank's share now stays with its sums, the rest goes with its next vector.
  void restore(const at::Tensor& vector_residual, const at::Tensor& sum_residual);

  // Encoded bytes this rank contributes per sum.
  int64_t encoded_bytes() const;
  const Compression& compression() const { return compression_; }

 private:
  int64_t share_begin(int rank) const;  // a rank's share of the vector
  int64_t share_size(int rank) const;   // elements; a share is a codec payload of its own
  size_t slot_bytes(int rank) const;    // a status word, the rank it names, the share encoded

  std::shared_ptr<World> world_;
  Compression compression_;
  int64_t numel_;
  std::string who_, what_;
  at::Tensor residual_;         // what the encoding of this rank's vectors lost
  at::Tensor reduce_residual_;  // ... and of the sums of its share (share-sized)
  at::Tensor reduced_;          // the sum of this rank's share being encoded (share-sized)
  std::vector<int64_t> share_starts_;  // rank j's share: [starts[j], starts[j + 1])
  std::vector<size_t> slot_offsets_;   // of rank j's slot in send_ and gathered_
  // Slots of the reduce-scatter (one per rank: sent; this rank's share from each:
  // received) and of the all-gather (one per rank), each as long as its share needs.
  std::vector<uint8_t> send_, received_, gathered_;
};

}  // namespace torch_asgd
