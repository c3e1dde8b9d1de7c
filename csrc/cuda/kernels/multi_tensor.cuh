// Multi-tensor kernels in Apex's style: the tensor list (addresses, sizes, chunk offsets) travels in
// the kernel parameters, one block per chunk of kChunk elements of any tensor, so one launch covers a
// thousand tiny tensors and a huge one alike, with no host-to-device copy and no sync (a CUDA graph
// captures the parameters). Norm: each chunk's reduction lands in its own slot of a partial buffer;
// then one block per tensor combines its chunks in order (deterministic, no atomics).
#pragma once

#include "cuda/kernels/common.cuh"
#include "cuda/multi_tensor.h"

namespace fusedstab {
namespace cuda {
namespace mt {

constexpr int kThreads = 512;
// Parameter capacities: 64 tensors (1.3 KB of parameters) or 1024 (20 KB: kernel parameters up to
// 32 KB need CUDA 12.1 and Volta or later).
constexpr int kSmallCap = 64, kBigCap = 1024;

template <int CAP> struct TensorList {
  const void* addr[CAP];
  int64_t numel[CAP];
  int32_t chunk_end[CAP];  // chunks of tensors [0, i] of this launch (cumulative)
  int n;                   // tensors in this launch
};

// The tensor of chunk b (binary search over the cumulative chunk counts) and its first chunk.
template <int CAP> __device__ __forceinline__ int tensor_of(const TensorList<CAP>& tl, int b, int* first) {
  int lo = 0, hi = tl.n - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (tl.chunk_end[mid] > b) hi = mid; else lo = mid + 1;
  }
  *first = lo == 0 ? 0 : tl.chunk_end[lo - 1];
  return lo;
}

// NaN-propagating max/min (torch's amax/amin): a NaN operand wins.
struct Max {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return (a != a || a > b) ? a : b; }
};
struct Min {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return (a != a || a < b) ? a : b; }
};

template <typename A> __device__ __forceinline__ A identity(int kind) {
  return kind == kMin ? A(INFINITY) : A(0);
}

// What one element contributes (before combining): |x|^p, x^2, |x|, or x != 0.
template <typename A> __device__ __forceinline__ A term(A x, int kind, A p) {
  const A a = fabs(x);
  switch (kind) {
    case kSquare: return a * a;
    case kNonzero: return a != A(0) ? A(1) : A(0);
    case kPow: return pow(a, p);  // 0^p: 0 for p > 0, inf for p < 0, as torch
    default: return a;            // abs, max, min
  }
}

template <typename A> __device__ __forceinline__ A combine(A acc, A v, int kind) {
  if (kind == kMax) return Max{}(acc, v);
  if (kind == kMin) return Min{}(acc, v);
  return acc + v;
}

template <typename A> __device__ __forceinline__ A block_combine(A v, int kind, A* smem) {
  if (kind == kMax) return group_reduce(v, Max{}, kThreads, smem);
  if (kind == kMin) return group_reduce(v, Min{}, kThreads, smem);
  return group_reduce(v, Sum{}, kThreads, smem);
}

// KIND: kSquare (the L2 norm, specialised), or -1: the reduction `kind` chosen at run time.
template <typename T, int KIND, int CAP>
__global__ void __launch_bounds__(kThreads)
norm_chunks_kernel(const __grid_constant__ TensorList<CAP> tl, acc_t<T>* __restrict__ partial, int kind_rt, acc_t<T> p) {
  using A = acc_t<T>;
  constexpr int V = Vec<T>::N;
  const int kind = KIND >= 0 ? KIND : kind_rt;
  __shared__ A smem[kThreads / kWarp];
  int first;
  const int t = tensor_of(tl, blockIdx.x, &first);
  const T* x = static_cast<const T*>(tl.addr[t]);
  const int64_t start = int64_t(blockIdx.x - first) * kChunk;
  const int64_t len = min(kChunk, tl.numel[t] - start);
  const T* c = x + start;
  A acc = identity<A>(kind);
  if (aligned16(x)) {  // chunks start at multiples of kChunk: aligned where the tensor is
    const int64_t nv = len / V;
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < nv; i += kThreads) {
      A v[V];
      load_vec(v, c, i * V, len, true);
#pragma unroll
      for (int k = 0; k < V; ++k) acc = combine(acc, term(v[k], kind, p), kind);
    }
    for (int64_t i = nv * V + threadIdx.x; i < len; i += kThreads) acc = combine(acc, term(to_acc<A>(c[i]), kind, p), kind);
  } else {
    for (int64_t i = threadIdx.x; i < len; i += kThreads) acc = combine(acc, term(to_acc<A>(c[i]), kind, p), kind);
  }
  acc = block_combine(acc, kind, smem);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Block i: tensor i of the launch, its chunks' partials combined in order.
template <typename A, int CAP>
__global__ void __launch_bounds__(kThreads)
norm_tensors_kernel(const __grid_constant__ TensorList<CAP> tl, const A* __restrict__ partial, A* __restrict__ out,
                    int kind) {
  __shared__ A smem[kThreads / kWarp];
  const int t = blockIdx.x;
  const int lo = t == 0 ? 0 : tl.chunk_end[t - 1], hi = tl.chunk_end[t];
  A acc = identity<A>(kind);
  for (int i = lo + threadIdx.x; i < hi; i += kThreads) acc = combine(acc, partial[i], kind);
  acc = block_combine(acc, kind, smem);
  if (threadIdx.x == 0) out[t] = acc;
}

template <typename T, int CAP>
__global__ void __launch_bounds__(kThreads)
scale_chunks_kernel(const __grid_constant__ TensorList<CAP> tl, const acc_t<T>* __restrict__ coef_ptr,
                    bool zero_nonfinite) {
  using A = acc_t<T>;
  constexpr int V = Vec<T>::N;
  int first;
  const int t = tensor_of(tl, blockIdx.x, &first);
  T* x = static_cast<T*>(const_cast<void*>(tl.addr[t]));
  const int64_t start = int64_t(blockIdx.x - first) * kChunk;
  const int64_t len = min(kChunk, tl.numel[t] - start);
  T* c = x + start;
  const A coef = *coef_ptr;
  const bool zero = zero_nonfinite && coef == A(0);  // 0 * NaN would stay NaN
  if (aligned16(x)) {
    const int64_t nv = len / V;
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < nv; i += kThreads) {
      A v[V];
      load_vec(v, c, i * V, len, true);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = zero ? A(0) : v[k] * coef;
      store_vec(c, v, i * V, len, true);
    }
    for (int64_t i = nv * V + threadIdx.x; i < len; i += kThreads)
      c[i] = from_acc<T>(zero ? A(0) : to_acc<A>(c[i]) * coef);
  } else {
    for (int64_t i = threadIdx.x; i < len; i += kThreads) c[i] = from_acc<T>(zero ? A(0) : to_acc<A>(c[i]) * coef);
  }
}

}  // namespace mt
}  // namespace cuda
}  // namespace fusedstab
