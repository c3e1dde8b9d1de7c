// Multi-tensor norm and scale launchers (torch-free; csrc/cuda/multi_tensor.cu): the per-tensor
// reductions that global-norm clipping combines, and the in-place scaling by a coefficient that
// lives on the device. Semantics as fusedstab/ops/multi_tensor.py (and fusedstab.kernels.multi_tensor).
#pragma once

#include "cuda/launch.h"
#include "cuda/multi_tensor_plan.h"

namespace fusedstab {
namespace cuda {

// out[i] = the reduction of tensor i (accumulation dtype of `dtype`); partial: scratch of
// mt::total_chunks elements of that dtype. Tensors: dense, same dtype, on the current device.
cudaError_t multi_tensor_norm(const void* const* addr, const int64_t* numel, int n, DType dtype, double norm_type,
                              void* out, void* partial, cudaStream_t stream);
// t *= *coef for every tensor (coef: a device scalar of the accumulation dtype); with zero_nonfinite,
// coef == 0 writes exact zeros (NaN/Inf included).
cudaError_t multi_tensor_scale(void* const* addr, const int64_t* numel, int n, DType dtype, const void* coef,
                               bool zero_nonfinite, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedstab
