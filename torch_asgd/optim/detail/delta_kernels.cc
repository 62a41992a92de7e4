#include "torch_asgd/optim/detail/delta_kernels.h"

#include <ATen/ATen.h>

namespace torch_asgd {
namespace detail {
namespace {

template <typename T>
void delta_loop(T* out, T* x, T* y, int64_t n, bool accumulate) {
  if (accumulate) {
    for (int64_t i = 0; i < n; ++i) {
      out[i] += x[i] - y[i];
      y[i] = x[i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = x[i] - y[i];
      y[i] = x[i];
    }
  }
}

template <typename T>
void add_both_loop(T* x, T* y, const T* s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    x[i] += s[i];
    y[i] += s[i];
  }
}

bool cpu_contiguous(const at::Tensor& t, c10::ScalarType dtype) {
  return t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype;
}

}  // namespace

void take_delta(at::Tensor& out, at::Tensor& x, at::Tensor& y, bool accumulate) {
  const auto dtype = x.scalar_type();
  if (cpu_contiguous(out, dtype) && cpu_contiguous(x, dtype) && cpu_contiguous(y, dtype) &&
      (dtype == at::kFloat || dtype == at::kDouble)) {
    if (dtype == at::kFloat) {
      delta_loop(out.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), x.numel(), accumulate);
    } else {
      delta_loop(out.data_ptr<double>(), x.data_ptr<double>(), y.data_ptr<double>(), x.numel(), accumulate);
    }
    return;
  }
  at::Tensor d = (x - y).to(out.device());
  if (accumulate) {
    out.add_(d);
  } else {
    out.copy_(d);
  }
  y.copy_(x);
}

void add_both(at::Tensor& x, at::Tensor& y, const at::Tensor& s) {
  const auto dtype = x.scalar_type();
  if (cpu_contiguous(x, dtype) && cpu_contiguous(y, dtype) && cpu_contiguous(s, dtype) &&
      (dtype == at::kFloat || dtype == at::kDouble)) {
    if (dtype == at::kFloat) {
      add_both_loop(x.data_ptr<float>(), y.data_ptr<float>(), s.data_ptr<float>(), x.numel());
    } else {
      add_both_loop(x.data_ptr<double>(), y.data_ptr<double>(), s.data_ptr<double>(), x.numel());
    }
    return;
  }
  const at::Tensor here = s.device() == x.device() ? s : s.to(x.device());
  x.add_(here);
  y.add_(here);
}

}  // namespace detail
}  // namespace torch_asgd
