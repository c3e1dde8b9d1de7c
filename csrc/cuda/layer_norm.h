// LayerNorm / RMSNorm (+ the fused residual add) launchers (torch-free; csrc/cuda/layer_norm.cu).
// Semantics as fusedstab/ops/layer_norm.py and fusedstab/kernels/layer_norm.py: rows of N elements
// with unit column stride; h = x + residual rounded to h's dtype, normalized and stored; y in x's
// dtype; mean / rstd in the accumulation dtype; dweight / dbias from per-block partial rows and one
// fixed-order reduction (deterministic).
#pragma once

#include "cuda/launch.h"

namespace fusedstab {
namespace cuda {

struct LayerNormFwd {
  const void* x;         // (M, N), row stride stride_x, x_dtype
  const void* residual;  // (M, N), row stride stride_r, h_dtype; or null
  const void* weight;    // (N,) w_dtype, or null
  const void* bias;      // (N,) w_dtype, or null
  void* y;               // (M, N) contiguous, x_dtype
  void* h;               // (M, N) contiguous, h_dtype (with a residual), or null
  void* mean;            // (M,) accumulation dtype of h_dtype, or null (RMSNorm)
  void* rstd;            // (M,)
  int64_t M, N, stride_x, stride_r;
  double eps;
  bool rms;
  DType x_dtype, h_dtype, w_dtype;
};

struct LayerNormBwd {
  const void* dy;      // (M, N), row stride stride_dy, x_dtype (y's dtype)
  const void* h;       // (M, N), row stride stride_h, h_dtype: the normalized input
  const void* weight;  // (N,) w_dtype, or null
  const void* mean;    // (M,) or null (RMSNorm)
  const void* rstd;    // (M,)
  const void* dh;      // (M, N), row stride stride_dh, h_dtype: the gradient of the h output, or null
  void* dx;            // (M, N) contiguous, h_dtype
  void* dweight;       // (N,) w_dtype, or null
  void* dbias;         // (N,) w_dtype, or null
  void* partial;       // scratch: layer_norm_bwd_partials(...) accumulation-dtype elements
  int64_t partial_elems;
  int64_t M, N, stride_dy, stride_h, stride_dh;
  bool rms;
  DType x_dtype, h_dtype, w_dtype;
};

cudaError_t layer_norm_fwd(const LayerNormFwd& a, cudaStream_t stream);
// Elements of the partial buffer layer_norm_bwd needs for dweight and/or dbias (0 for neither).
int64_t layer_norm_bwd_partials(int64_t M, int64_t N, DType x_dtype, DType h_dtype, DType w_dtype, bool need_dw,
                                bool need_db);
cudaError_t layer_norm_bwd(const LayerNormBwd& a, cudaStream_t stream);

// The (x, h, w) dtype triples the kernels take: h is x's dtype or fp32 (a wider residual with fp16 /
// bf16 x); w is x's dtype or fp32 (fp16 / bf16 x). The glue refuses others.
inline bool layer_norm_dtypes_ok(DType x, DType h, DType w) {
  const bool h_ok = h == x || (is_16bit(x) && h == DType::F32);
  const bool w_ok = w == x || (is_16bit(x) && w == DType::F32);
  return h_ok && w_ok;
}

}  // namespace cuda
}  // namespace fusedstab
