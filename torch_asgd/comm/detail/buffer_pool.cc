#include "torch_asgd/comm/detail/buffer_pool.h"

#include <ATen/Functions.h>

#include "torch_asgd/comm/wire.h"

namespace torch_asgd {
namespace detail {

BufferPool::BufferPool(size_t max_count, uint64_t max_bytes) : shelf_(std::make_shared<Shelf>()) {
  shelf_->max_count = max_count;
  shelf_->max_bytes = max_bytes;
}

at::Tensor BufferPool::take(c10::ScalarType dtype, int64_t numel) {
  const uint64_t bytes = static_cast<uint64_t>(numel) * dtype_size(dtype);
  if (bytes == 0) return at::empty({numel}, at::TensorOptions().dtype(dtype));
  at::Tensor block;
  {
    std::lock_guard<std::mutex> lock(shelf_->mu);
    auto& idle = shelf_->idle;
    for (size_t i = 0; i < idle.size(); ++i) {
      if (static_cast<uint64_t>(idle[i].numel()) == bytes) {
        block = std::move(idle[i]);
        idle.erase(idle.begin() + static_cast<long>(i));
        shelf_->bytes -= bytes;
        break;
      }
    }
  }
  if (!block.defined()) block = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
  std::weak_ptr<Shelf> home = shelf_;
  void* data = block.data_ptr();
  return at::from_blob(
      data, {numel},
      [home, block](void*) mutable {
        auto shelf = home.lock();
        if (!shelf) return;
        const uint64_t b = static_cast<uint64_t>(block.numel());
        if (shelf->max_count == 0 || b > shelf->max_bytes) return;
        std::vector<at::Tensor> evicted;  // freed after the lock is released
        std::lock_guard<std::mutex> lock(shelf->mu);
        auto& idle = shelf->idle;
        size_t drop = 0;
        while (idle.size() - drop >= shelf->max_count || shelf->bytes + b > shelf->max_bytes) {
          shelf->bytes -= static_cast<uint64_t>(idle[drop].numel());
          evicted.push_back(std::move(idle[drop]));
          ++drop;
        }
        idle.erase(idle.begin(), idle.begin() + static_cast<long>(drop));
        shelf->bytes += b;
        idle.push_back(std::move(block));
      },
      at::TensorOptions().dtype(dtype));
}

size_t BufferPool::idle_count() const {
  std::lock_guard<std::mutex> lock(shelf_->mu);
  return shelf_->idle.size();
}

uint64_t BufferPool::idle_bytes() const {
  std::lock_guard<std::mutex> lock(shelf_->mu);
  return shelf_->bytes;
}

}  // namespace detail
}  // namespace torch_asgd
