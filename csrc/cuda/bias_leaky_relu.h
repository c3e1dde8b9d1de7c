// bias + Leaky ReLU launchers (torch-free; csrc/cuda/bias_leaky_relu.cu). Semantics as
// fusedstab/ops/bias_leaky_relu.py: an (R, L) view in memory order, the bias per column (L == C) or
// per row (index row % C), y = leaky_relu(x + b) rounded once, the sign mask (R, ceil(L/8)) bit-packed
// (column 8k + j in bit j of byte k) when slope < 0.
#pragma once

#include "cuda/launch.h"

namespace fusedstab {
namespace cuda {

struct BiasLeakyReluFwd {
  const void* x;     // (R, L) contiguous, x_dtype
  const void* bias;  // (C,) of y_dtype, or null
  void* y;           // (R, L) contiguous, y_dtype (x's dtype or wider)
  uint8_t* mask;     // (R, ceil(L/8)) or null
  int64_t R, L, C;
  double slope;
  bool per_row;
  DType x_dtype, y_dtype;
};

struct BiasLeakyReluBwd {
  const void* dy;     // (R, L) contiguous, dy_dtype
  const void* saved;  // the mask (use_mask) or y (dy_dtype)
  void* dx;           // (R, L) contiguous of dx_dtype (dy's or narrower), or null
  void* dbias;        // (C,) in the accumulation dtype of dy_dtype, or null
  void* partial;      // scratch: bias_leaky_relu_bwd_partials(...) accumulation-dtype elements
  int64_t R, L, C;
  double slope;
  bool per_row, use_mask;
  DType dy_dtype, dx_dtype;
};

cudaError_t bias_leaky_relu_fwd(const BiasLeakyReluFwd& a, cudaStream_t stream);
// Elements of the dbias partial buffer that bias_leaky_relu_bwd needs (0 without dbias).
int64_t bias_leaky_relu_bwd_partials(int64_t R, int64_t L, bool per_row, bool need_dbias);
cudaError_t bias_leaky_relu_bwd(const BiasLeakyReluBwd& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedstab
