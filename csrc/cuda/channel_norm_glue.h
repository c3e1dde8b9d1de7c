// Checks shared by the GroupNorm and BatchNorm glue (group_norm_glue.cpp, batch_norm_glue.cpp): the
// (N, C, S) layouts of fusedstab/ops/layout.py, tensors like x, parameters, statistics, activations.
#pragma once

#include <c10/util/string_view.h>

#include "cuda/glue.h"

namespace fusedstab {
namespace cuda {

// numerics.h's Activation of fusedstab's activation names.
inline int activation_code(c10::string_view name) {
  if (name == "none") return 0;
  if (name == "relu") return 1;
  if (name == "leaky_relu") return 2;
  if (name == "silu") return 3;
  TORCH_CHECK(false, "unknown activation '", std::string(name), "': expected none, relu, leaky_relu or silu");
}

inline bool is_channels_inner(const at::Tensor& t) { return t.transpose(1, 2).is_contiguous(); }

// x (N, C, S) non-empty, on a CUDA device, of a float dtype, dense NCHW or channels-inner; returns
// whether the kernels read it channels-last. Where both hold (S == 1 or C == 1, one memory order),
// `cl_if_both` chooses.
inline bool check_x(const at::Tensor& x, bool cl_if_both, const char* op) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3 && x.numel() > 0, op, ": x must be a non-empty (N, C, S) CUDA tensor");
  dtype_of(x, "x");
  const bool nchw = x.is_contiguous(), cl = is_channels_inner(x);
  TORCH_CHECK(nchw || cl, op, ": x must be dense NCHW or channels-inner, got strides ", x.strides());
  return cl && (!nchw || cl_if_both);
}

// t of x's device, dtype, shape and layout.
inline void check_like(const at::Tensor& t, const at::Tensor& x, bool cl, const char* name) {
  check_device(t, x, name);
  check_dtype(t, x.scalar_type(), name);
  check_shape(t, x.sizes(), name);
  TORCH_CHECK(cl ? is_channels_inner(t) : t.is_contiguous(), name, ": expected x's layout (",
              cl ? "channels-inner" : "NCHW", "), got strides ", t.strides());
}

// Weight or bias: (C,) contiguous, x's dtype or fp32 with fp16 / bf16 x; returns whether it is fp32
// while x is not (the kernels' run-time choice). False without one.
inline bool check_param(const c10::optional<at::Tensor>& p, const at::Tensor& x, const char* name) {
  if (!p.has_value()) return false;
  check_device(*p, x, name);
  check_contiguous(*p, name);
  check_shape(*p, {x.size(1)}, name);
  const bool p32 = p->scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
  TORCH_CHECK(p->scalar_type() == x.scalar_type() || (p32 && is_16bit(dtype_of(x, "x"))), name,
              ": expected x's dtype ", x.scalar_type(), " (or float32 for float16 / bfloat16 x), got ",
              p->scalar_type());
  return p32;
}

// Statistics and sums: contiguous, of `shape`, in x's accumulation dtype.
inline void check_acc(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape, const char* name) {
  check_device(t, x, name);
  check_dtype(t, acc_scalar_type(x.scalar_type()), name);
  check_contiguous(t, name);
  check_shape(t, shape, name);
}

inline void* ptr(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// Scratch for the per-split partials, from the caching allocator (graph-capturable).
inline at::Tensor workspace(const at::Tensor& x, int64_t bytes) {
  return at::empty({bytes > 0 ? bytes : 1}, x.options().dtype(at::kByte));
}

}  // namespace cuda
}  // namespace fusedstab
