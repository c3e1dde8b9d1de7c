// GroupNorm (+ activation) launchers (torch-free; csrc/cuda/group_norm.cu). Semantics as
// fusedstab/ops/group_norm.py: x (N, C, S) dense NCHW (strides (C*S, S, 1)) or channels-last
// ((S*C, 1, C)); y, dy and dx in x's layout and dtype; mean / rstd (N, G) in the accumulation dtype;
// z = w * xhat + b, y = act(z) rounded once; dweight / dbias (C,) in the accumulation dtype.
// Scratch: the workspace of group_norm_{fwd,bwd}_workspace bytes (per-split partials).
#pragma once

#include "cuda/launch.h"

namespace fusedstab {
namespace cuda {

struct GroupNormFwd {
  const void* x;       // (N, C, S), x_dtype
  const void* weight;  // (C,) x_dtype, or fp32 (w32) for fp16 / bf16 x; or null
  const void* bias;    // (C,) likewise (b32); or null
  void* y;             // like x
  void* mean;          // (N, G) accumulation dtype
  void* rstd;          // (N, G)
  void* workspace;
  int64_t workspace_bytes;
  int64_t N, C, S, G;
  bool channels_last;
  double eps;
  int act;  // numerics.h's Activation
  double slope;
  DType x_dtype;
  bool w32, b32;
};

struct GroupNormBwd {
  const void* dy;  // like x
  const void* x;
  const void* weight;  // as GroupNormFwd
  const void* bias;
  const void* mean;  // (N, G)
  const void* rstd;
  void* dx;       // like x
  void* dweight;  // (C,) accumulation dtype, or null
  void* dbias;    // (C,) accumulation dtype, or null
  void* workspace;
  int64_t workspace_bytes;
  int64_t N, C, S, G;
  bool channels_last;
  int act;
  double slope;
  DType x_dtype;
  bool w32, b32;
};

int64_t group_norm_fwd_workspace(int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last);
int64_t group_norm_bwd_workspace(int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last, DType x_dtype);
cudaError_t group_norm_fwd(const GroupNormFwd& a, cudaStream_t stream);
cudaError_t group_norm_bwd(const GroupNormBwd& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedstab
