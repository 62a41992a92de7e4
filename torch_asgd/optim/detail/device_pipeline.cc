#include "torch_asgd/optim/detail/device_pipeline.h"

#include <chrono>
#include <cstring>

#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <fmt/format.h>
#include <torch/torch.h>

#include "torch_asgd/comm/error.h"

namespace torch_asgd {
namespace detail {
namespace {

c10::Stream current_stream(c10::Device d) { return c10::impl::VirtualGuardImpl(d.type()).getStream(d); }

c10::Stream side_stream(c10::Device d) {
  return c10::impl::VirtualGuardImpl(d.type()).getStreamFromGlobalPool(d);
}

c10::Device gpu_only(c10::Device d) {
  if (d.is_cpu()) throw ConfigError("DevicePipeline is for parameters on a GPU, not the CPU");
  return d;
}

void wait_for(const c10::Event& e) {
  while (e.was_marked_for_recording() && !e.query()) std::this_thread::sleep_for(std::chrono::microseconds(20));
}

}  // namespace

DevicePipeline::DevicePipeline(c10::Device device, int64_t numel, c10::ScalarType dtype)
    : device_(gpu_only(device)), compute_(current_stream(device_)), copy_(side_stream(device_)) {
  const auto on_device = torch::TensorOptions().dtype(dtype).device(device);
  const auto pinned = torch::TensorOptions().dtype(dtype).pinned_memory(true);
  for (int k = 0; k < 2; ++k) {
    out_.push_back(OutSlot{torch::zeros({numel}, on_device), torch::empty({numel}, pinned),
                           c10::Event(device.type())});
    in_.push_back(InSlot{torch::empty({numel}, on_device), torch::empty({numel}, pinned),
                         c10::Event(device.type()), c10::Event(device.type())});
  }
  thread_ = std::thread([this] { handoff_loop(); });
}

DevicePipeline::~DevicePipeline() {
  {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return queue_.empty(); });
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void DevicePipeline::rethrow_locked() {
  if (error_) {
    auto e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

void DevicePipeline::ship(std::function<void(const at::Tensor&)> send) {
  const int k = cur_;
  const int other = 1 - k;
  {
    // Back-pressure: the other slot's host buffer must be free before it is refilled
    // at the next ship; wait for it now, while the GPU works.
    std::unique_lock<std::mutex> lock(mu_);
    rethrow_locked();
    cv_.wait(lock, [&] { return !out_[other].busy || error_; });
    rethrow_locked();
    out_[k].busy = true;
  }
  OutSlot& s = out_[k];
  c10::Event ready(device_.type());
  ready.record(compute_);  // everything queued into s.device so far
  {
    c10::StreamGuard guard(copy_);
    ready.block(copy_);
    s.pinned.copy_(s.device, /*non_blocking=*/true);
    s.device.zero_();
    s.copied.record(copy_);
  }
  // The compute stream writes into the other slot next: after its copy and zeroing.
  if (out_[other].copied.was_marked_for_recording()) out_[other].copied.block(compute_);
  cur_ = other;
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.emplace_back(k, std::move(send));
  }
  cv_.notify_all();
}

void DevicePipeline::handoff_loop() {
  for (;;) {
    std::pair<int, std::function<void(const at::Tensor&)>> item;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      item = std::move(queue_.front());
    }
    OutSlot& s = out_[item.first];
    wait_for(s.copied);
    std::exception_ptr failed;
    try {
      item.second(s.pinned);
    } catch (...) {
      failed = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.pop_front();
      s.busy = false;
      if (failed && !error_) error_ = failed;
    }
    cv_.notify_all();
  }
}

at::Tensor DevicePipeline::to_device(const at::Tensor& host) {
  if (host.numel() != in_[0].pinned.numel() || host.scalar_type() != in_[0].pinned.scalar_type()) {
    throw ConfigError(fmt::format("DevicePipeline: a vector of {} {} where {} {} were expected",
                                  host.numel(), c10::toString(host.scalar_type()),
                                  in_[0].pinned.numel(), c10::toString(in_[0].pinned.scalar_type())));
  }
  InSlot& s = in_[next_in_];
  next_in_ = 1 - next_in_;
  wait_for(s.copied);  // its previous copy has left the pinned buffer
  const at::Tensor src = host.contiguous();
  std::memcpy(s.pinned.data_ptr(), src.data_ptr(), src.nbytes());
  s.consumed.record(compute_);  // what used this slot's device buffer before
  {
    c10::StreamGuard guard(copy_);
    s.consumed.block(copy_);
    s.device.copy_(s.pinned, /*non_blocking=*/true);
    s.copied.record(copy_);
  }
  s.copied.block(compute_);
  return s.device;
}

void DevicePipeline::drain() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return queue_.empty(); });
  rethrow_locked();
}

}  // namespace detail
}  // namespace torch_asgd
