// BatchNorm (+ activation) launchers (torch-free; csrc/cuda/batch_norm.cu), the four steps of
// fusedstab/ops/batch_norm.py: x (N, C, S) dense NCHW (strides (C*S, S, 1)) or channels-last
// ((S*C, 1, C)); y, dy and dx in x's layout and dtype; mean, rstd (C,), stats (3, C) = count, mean,
// M2, sums (2, C) = sum(dz), sum(dz * xhat), coef (2, C) = sums / count, all in the accumulation dtype.
// Scratch: the workspace of batch_norm_{stats,bwd_reduce}_workspace bytes (per-split partials).
#pragma once

#include "cuda/launch.h"

namespace fusedstab {
namespace cuda {

struct BatchNormGeometry {
  int64_t N, C, S;
  bool channels_last;
  DType x_dtype;
};

struct BatchNormStats {
  const void* x;
  void* stats;  // (3, C)
  void* workspace;
  int64_t workspace_bytes;
  BatchNormGeometry g;
};

// The elementwise steps and the backward reduce: y = act(w * xhat + b), xhat = (x - mean) * rstd;
// sums of dz = dy * act'(z); dx = rstd * w * (dz - coef[0] - xhat * coef[1]) (coef null: rstd * w * dz).
struct BatchNormArgs {
  const void* dy;      // backward, like x
  const void* x;
  const void* weight;  // (C,) x_dtype, or fp32 (w32) for fp16 / bf16 x; or null
  const void* bias;    // likewise (b32)
  const void* mean;    // (C,)
  const void* rstd;    // (C,)
  const void* coef;    // bwd_elemt: (2, C) or null
  void* out;           // elemt: y; bwd_reduce: sums (2, C); bwd_elemt: dx
  void* workspace;     // bwd_reduce
  int64_t workspace_bytes;
  BatchNormGeometry g;
  int act;  // numerics.h's Activation
  double slope;
  bool w32, b32;
};

int64_t batch_norm_stats_workspace(const BatchNormGeometry& g);
int64_t batch_norm_bwd_reduce_workspace(const BatchNormGeometry& g);
cudaError_t batch_norm_stats(const BatchNormStats& a, cudaStream_t stream);
cudaError_t batch_norm_elemt(const BatchNormArgs& a, cudaStream_t stream);
cudaError_t batch_norm_bwd_reduce(const BatchNormArgs& a, cudaStream_t stream);
cudaError_t batch_norm_bwd_elemt(const BatchNormArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedstab
