// Helpers that every CUDA glue file (csrc/cuda/<op>_glue.cpp) shares: argument checks with clear
// messages, the dtype codes of launch.h, the current stream. Only the c10/cuda stream, guard and
// exception headers (ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, so CI's syntax check
// against the CPU build of torch could not compile it).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launch.h"

namespace fusedstab {
namespace cuda {

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kDouble: return DType::F64;
    default: TORCH_CHECK(false, name, ": expected a float32/float16/bfloat16/float64 tensor, got ", t.scalar_type());
  }
}

// A CUDA tensor on ref's device (nothing read from another device or from host memory).
inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, ": expected a CUDA tensor on ", ref.device(),
              ", got one on ", t.device());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
}

// The accumulation dtype of a dtype (fp32 for fp32/fp16/bf16, fp64 for fp64), as numerics.h.
inline at::ScalarType acc_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

}  // namespace cuda
}  // namespace fusedstab
