// Numerics shared by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda): accumulation types,
// Chan's combine of (count, mean, M2), the activations the norms fuse and their gradients. Torch-free
// and __host__ __device__-ready, so plain nvcc compiles it and the CPU tests exercise the same arithmetic.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FS_HD __host__ __device__ __forceinline__
#else
#define FS_HD inline
#endif

namespace fusedstab {

// Accumulation type: fp32 for fp32/fp16/bf16 (any 16-bit float type), fp64 for fp64.
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

// Running (count, mean, M2) of a set, combined with others by Chan et al.'s parallel formula: exact
// for any offset of the values, and a set of count 0 contributes nothing.
template <typename A> struct Moments {
  A n = A(0), mean = A(0), m2 = A(0);

  FS_HD void push(A x) {  // Welford's update with one value
    n += A(1);
    A d = x - mean;
    mean += d / n;
    m2 += d * (x - mean);
  }
  FS_HD void combine(const Moments& o) {
    if (o.n == A(0)) return;
    if (n == A(0)) { *this = o; return; }
    A total = n + o.n, d = o.mean - mean, w = o.n / total;
    mean += d * w;
    m2 += o.m2 + d * d * n * w;
    n = total;
  }
  // Population variance (the norms normalize by it); NaN for an empty set.
  FS_HD A var() const { return m2 / n; }
};

// Activations the norms fuse (fusedstab.kernels.common.ACTIVATIONS uses the same codes).
enum Activation : int { kNone = 0, kRelu = 1, kLeakyRelu = 2, kSilu = 3 };

template <typename A> FS_HD A activate(A z, int act, A slope) {
  switch (act) {
    case kRelu: return z < A(0) ? A(0) : z;  // NaN stays NaN, as torch's relu
    case kLeakyRelu: return z > A(0) ? z : z * slope;
    case kSilu: return z / (A(1) + std::exp(-z));
    default: return z;
  }
}

// dy * act'(z) as torch's backward defines it: relu' is 0 at z <= 0 and passes dy at NaN (as
// threshold_backward), leaky_relu' is the slope at z <= 0 and at NaN.
template <typename A> FS_HD A activate_grad(A dy, A z, int act, A slope) {
  switch (act) {
    case kRelu: return z <= A(0) ? A(0) : dy;
    case kLeakyRelu: return z > A(0) ? dy : dy * slope;
    case kSilu: {
      A s = A(1) / (A(1) + std::exp(-z));
      return dy * s * (A(1) + z * (A(1) - s));
    }
    default: return dy;
  }
}

}  // namespace fusedstab
