// Moves DASGD's flat vectors between a GPU and the channel without making the training
// thread wait for the GPU or the network (DASGDOptions::overlap; unverified: written
// without a GPU, see docs/gpu.md).
//
// Outgoing: ship() records an event on the compute stream; a copy stream waits for it,
// copies the device delta into a pinned host buffer and zeroes it; a hand-off thread
// passes the host buffer to the channel once that copy's event has completed. Two
// slots alternate, so the compute stream accumulates into one while the other travels
// (it waits, on the GPU, for the other's copy before writing into it).
//
// Incoming: to_device() stages an arrived host vector in pinned memory and copies it to
// the device on the copy stream; the compute stream waits for that copy's event, so
// what the caller then enqueues (the fused apply) is ordered after it.
//
// Written against c10's device-generic streams and events, so it compiles with any
// LibTorch; it is only used for parameters on a device with streams (CUDA).
#pragma once

#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>

namespace torch_asgd {
namespace detail {

class DevicePipeline {
 public:
  // Vectors of `numel` elements of `dtype` on `device` (not the CPU).
  DevicePipeline(c10::Device device, int64_t numel, c10::ScalarType dtype);
  ~DevicePipeline();  // hands off what was shipped, then stops
  DevicePipeline(const DevicePipeline&) = delete;
  DevicePipeline& operator=(const DevicePipeline&) = delete;

  // The device buffer to accumulate into now (zeroed).
  const at::Tensor& current() const { return out_[cur_].device; }

  // Ships current() (all that the compute stream has queued into it so far) and makes
  // the other buffer current. `send` runs on the hand-off thread with a host tensor,
  // valid only during the call (the channel copies it). Waits (host) only if the
  // other buffer is still being handed off from the ship before last.
  void ship(std::function<void(const at::Tensor&)> send);

  // `host` (a CPU vector) on the device, ordered before whatever the caller enqueues
  // next on the compute stream. Valid until the second-next call.
  at::Tensor to_device(const at::Tensor& host);

  // Returns once everything shipped has been handed off; rethrows what `send` threw.
  void drain();

 private:
  struct OutSlot {
    at::Tensor device, pinned;
    c10::Event copied;
    bool busy = false;  // shipped, not yet handed off
  };
  struct InSlot {
    at::Tensor device, pinned;
    c10::Event consumed, copied;
  };
  void handoff_loop();
  void rethrow_locked();

  c10::Device device_;
  c10::Stream compute_, copy_;
  std::vector<OutSlot> out_;
  std::vector<InSlot> in_;
  int cur_ = 0;
  int next_in_ = 0;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<int, std::function<void(const at::Tensor&)>>> queue_;
  std::exception_ptr error_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace detail
}  // namespace torch_asgd
