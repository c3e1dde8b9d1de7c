// Device helpers that the CUDA kernels share: conversions between the stored dtypes and the
// accumulation type, 16-byte vector loads and stores, warp and block reductions, a dtype switch.
// Torch-free: plain nvcc compiles it. torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__
// and friends, so conversions are spelled out (__half2float, ...), never implicit.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/numerics.h"
#include "cuda/launch.h"
#include "cuda/launch_config.h"

namespace fusedstab {
namespace cuda {

constexpr int kWarp = 32;

// ---------------------------------------------------------------------------- conversions
template <typename A, typename T> __device__ __forceinline__ A to_acc(T v) { return static_cast<A>(v); }
template <> __device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ double to_acc<double, __half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ double to_acc<double, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round an accumulation value once to the stored type (round to nearest even).
template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __half from_acc<__half, double>(double v) { return __double2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, double>(double v) { return __double2bfloat16(v); }

// ---------------------------------------------------------------------------- vectors
// VEC elements of T in 16 bytes: one LDG.128 / STG.128 where the address is 16-byte aligned.
template <typename T> struct Vec {
  static constexpr int N = 16 / sizeof(T);
  alignas(16) T v[N];
};

template <typename T> __host__ __device__ __forceinline__ bool aligned16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Load the VEC elements [i, i + VEC) of p into acc, as one 16-byte load when vec (the caller
// checked alignment and that the whole vector is in range), else element by element, each in
// range of n (out-of-range elements read as 0).
template <typename A, typename T>
__device__ __forceinline__ void load_vec(A* out, const T* __restrict__ p, int64_t i, int64_t n, bool vec) {
  constexpr int V = Vec<T>::N;
  if (vec) {
    Vec<T> t = *reinterpret_cast<const Vec<T>*>(p + i);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = to_acc<A>(t.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = i + k < n ? to_acc<A>(p[i + k]) : A(0);
  }
}

template <typename T, typename A>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const A* in, int64_t i, int64_t n, bool vec) {
  constexpr int V = Vec<T>::N;
  if (vec) {
    Vec<T> t;
#pragma unroll
    for (int k = 0; k < V; ++k) t.v[k] = from_acc<T>(in[k]);
    *reinterpret_cast<Vec<T>*>(p + i) = t;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (i + k < n) p[i + k] = from_acc<T>(in[k]);
  }
}

// kGroup consecutive elements [i, i + kGroup) of a row that ends at element `end` (exclusive): one
// 16-byte load for 16-bit types, two for fp32, four for fp64 where vec, else element by element
// (past `end`: 0). A thread's unit of work in the row kernels: 8 columns are also a byte of a bit mask.
constexpr int kGroup = cfg::kGroup;

template <typename A, typename T>
__device__ __forceinline__ void load8(A* v, const T* __restrict__ p, int64_t i, int64_t end, bool vec) {
#pragma unroll
  for (int k = 0; k < kGroup; k += Vec<T>::N) load_vec(v + k, p, i + k, end, vec);
}

template <typename T, typename A>
__device__ __forceinline__ void store8(T* __restrict__ p, const A* v, int64_t i, int64_t end, bool vec) {
#pragma unroll
  for (int k = 0; k < kGroup; k += Vec<T>::N) store_vec(p, v + k, i + k, end, vec);
}

// ---------------------------------------------------------------------------- reductions
struct Sum {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};

// Butterfly reduction over the `width` lanes (a power of two <= 32) of each lane group; every lane
// of the group gets the result, and the order of operations is fixed (deterministic).
template <typename A, typename Op>
__device__ __forceinline__ A warp_reduce(A v, Op op, int width = kWarp) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1)
    if (o < width) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Reduce v over `group` consecutive threads of the block (a power of two: 32..1024, or <= 32),
// every thread of the group getting the result. `smem` holds blockDim.x / 32 values of A; all
// threads of the block call this together (it synchronizes when group > 32).
template <typename A, typename Op>
__device__ __forceinline__ A group_reduce(A v, Op op, int group, A* smem) {
  if (group <= kWarp) return warp_reduce(v, op, group);
  v = warp_reduce(v, op);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = group / kWarp;
  const int first = warp - warp % warps;  // first warp of this thread's group
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  A r = smem[first];
  for (int w = 1; w < warps; ++w) r = op(r, smem[first + w]);  // fixed order
  return r;
}

// ---------------------------------------------------------------------------- dtype dispatch
// Calls f(T{}) with T the device type of d: float, __half, __nv_bfloat16, double.
template <typename F> __host__ auto dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::F16: return f(__half{});
    case DType::BF16: return f(__nv_bfloat16{});
    case DType::F64: return f(double{});
    default: return f(float{});
  }
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace fusedstab
