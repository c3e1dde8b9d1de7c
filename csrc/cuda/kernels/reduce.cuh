// The second, small reduction of per-program partial sums (dweight, dbias): out[n] = sum over g of
// part[g, n], in a fixed order (deterministic, no atomics). Shared by the norms and bias + Leaky ReLU.
#pragma once

#include "cuda/kernels/common.cuh"

namespace fusedstab {
namespace cuda {

constexpr int kSumCols = 32, kSumSlices = 16;  // block: 32 columns x 16 slices of the G rows

// part: (G, N) contiguous in the accumulation type A; out: (N,) of type TO.
template <typename A, typename TO>
__global__ void __launch_bounds__(kSumCols * kSumSlices)
sum_rows_kernel(const A* __restrict__ part, int64_t G, int64_t N, TO* __restrict__ out) {
  __shared__ A smem[kSumSlices][kSumCols + 1];
  const int tx = threadIdx.x % kSumCols, ty = threadIdx.x / kSumCols;
  const int64_t col = int64_t(blockIdx.x) * kSumCols + tx;
  A acc = A(0);
  if (col < N)
    for (int64_t g = ty; g < G; g += kSumSlices) acc += part[g * N + col];
  smem[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && col < N) {
    A r = smem[0][tx];
    for (int s = 1; s < kSumSlices; ++s) r += smem[s][tx];
    out[col] = from_acc<TO>(r);
  }
}

template <typename A, typename TO>
cudaError_t sum_rows(const A* part, int64_t G, int64_t N, TO* out, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  sum_rows_kernel<A, TO><<<unsigned(ceil_div(N, kSumCols)), kSumCols * kSumSlices, 0, stream>>>(part, G, N, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fusedstab
