// bias + Leaky ReLU kernels. A thread takes 8 consecutive columns of a row (one byte of the sign
// mask): one 16-byte load of bf16/fp16 (two of fp32, four of fp64) where rows are 16-byte aligned
// (L % 8 == 0 and aligned pointers), element by element otherwise. Block: bx threads across a row
// (bx = 8-column groups, a power of two <= 32, so a row's threads share a warp) x by rows; grid:
// column tiles x row slices, each slice striding over the rows. dbias: per-slice partials in
// registers, combined in a fixed order (no atomics), then kernels/reduce.cuh's sum_rows.
#pragma once

#include "cuda/kernels/common.cuh"
#include "cuda/launch_config.h"

namespace fusedstab {
namespace cuda {
namespace blr {

constexpr int kThreads = cfg::kBlrThreads;

// TX: x's type; TY: y's (and the bias's) type.
template <typename TX, typename TY>
__global__ void __launch_bounds__(kThreads)
fwd_kernel(const TX* __restrict__ x, const TY* __restrict__ bias, TY* __restrict__ y, uint8_t* __restrict__ mask,
           int64_t R, int64_t L, int64_t C, acc_t<TY> slope, bool per_row, bool vec, int bx) {
  using A = acc_t<TY>;
  const int tx = threadIdx.x % bx, ty = threadIdx.x / bx, by = blockDim.x / bx;
  const int64_t L8 = ceil_div(L, kGroup);
  const int64_t g = int64_t(blockIdx.x) * bx + tx;  // this thread's 8-column group
  if (g >= L8) return;
  const int64_t c0 = g * kGroup;
  A b[kGroup];
#pragma unroll
  for (int k = 0; k < kGroup; ++k) b[k] = A(0);
  if (bias != nullptr && !per_row)
#pragma unroll
    for (int k = 0; k < kGroup; ++k) b[k] = c0 + k < L ? to_acc<A>(bias[c0 + k]) : A(0);
  for (int64_t r = int64_t(blockIdx.y) * by + ty; r < R; r += int64_t(gridDim.y) * by) {
    const int64_t i = r * L + c0;
    A z[kGroup];
    load8(z, x, i, i + L - c0, vec);
    const A br = (bias != nullptr && per_row) ? to_acc<A>(bias[r % C]) : A(0);
    unsigned bits = 0;
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const A v = z[k] + (per_row ? br : b[k]);
      bits |= unsigned(v > A(0)) << k;  // NaN: 0, as torch's backward treats it (slope)
      z[k] = v > A(0) ? v : v * slope;
    }
    store8(y, z, i, i + L - c0, vec);
    if (mask != nullptr) mask[r * L8 + g] = uint8_t(c0 + kGroup <= L ? bits : bits & ((1u << (L - c0)) - 1));
  }
}

// TD: dy's (and a saved y's) type; TX: dx's type. part: per-column (gridDim.y, L) partials, or
// per-row (gridDim.x, R) row sums; null without dbias.
template <typename TD, typename TX>
__global__ void __launch_bounds__(kThreads)
bwd_kernel(const TD* __restrict__ dy, const void* __restrict__ saved, TX* __restrict__ dx, acc_t<TD>* __restrict__ part,
           int64_t R, int64_t L, acc_t<TD> slope, bool per_row, bool use_mask, bool vec, int bx) {
  using A = acc_t<TD>;
  const int tx = threadIdx.x % bx, ty = threadIdx.x / bx, by = blockDim.x / bx;
  const int64_t L8 = ceil_div(L, kGroup);
  const int64_t g = int64_t(blockIdx.x) * bx + tx;
  const bool active = g < L8;
  const int64_t c0 = g * kGroup;
  A acc[kGroup];
#pragma unroll
  for (int k = 0; k < kGroup; ++k) acc[k] = A(0);
  for (int64_t r0 = int64_t(blockIdx.y) * by; r0 < R; r0 += int64_t(gridDim.y) * by) {
    const int64_t r = r0 + ty;
    A rowsum = A(0);
    if (active && r < R) {
      const int64_t i = r * L + c0;
      A d[kGroup], s[kGroup];
      load8(d, dy, i, i + L - c0, vec);
      unsigned bits = 0;
      if (use_mask) {
        bits = static_cast<const uint8_t*>(saved)[r * L8 + g];
      } else {
        load8(s, static_cast<const TD*>(saved), i, i + L - c0, vec);
#pragma unroll
        for (int k = 0; k < kGroup; ++k) bits |= unsigned(s[k] > A(0)) << k;
      }
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        // elements past the row's end count 0 (0 * an inf slope would be NaN)
        d[k] = c0 + k >= L ? A(0) : (bits >> k) & 1u ? d[k] : d[k] * slope;
        acc[k] += d[k];
        rowsum += d[k];
      }
      if (dx != nullptr) store8(dx, d, i, i + L - c0, vec);
    }
    if (part != nullptr && per_row) {  // this column tile's sum of row r: over the bx lanes of the row
      rowsum = warp_reduce(rowsum, Sum{}, bx);
      if (tx == 0 && r < R) part[int64_t(blockIdx.x) * R + r] = rowsum;
    }
  }
  if (part == nullptr || per_row) return;
  // Per column: combine the block's `by` row lanes in a fixed order, one column at a time through smem.
  __shared__ A cols[kThreads];
#pragma unroll  // (acc[k] indexed by a constant: acc stays in registers)
  for (int k = 0; k < kGroup; ++k) {
    __syncthreads();
    cols[threadIdx.x] = acc[k];
    __syncthreads();
    if (ty == 0 && active && c0 + k < L) {
      A sum = cols[tx];
      for (int j = 1; j < by; ++j) sum += cols[j * bx + tx];
      part[int64_t(blockIdx.y) * L + c0 + k] = sum;
    }
  }
}

}  // namespace blr
}  // namespace cuda
}  // namespace fusedstab
