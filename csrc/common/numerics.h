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

// Philox4x32-10 (Salmon et al., SC'11): a counter-based RNG, four 32-bit outputs that are a pure
// function of a 128-bit counter and a 64-bit key, so any element's random number can be regenerated
// anywhere (backward, another thread, another device) without state.
struct Philox4 {
  uint32_t x[4];
};

FS_HD Philox4 philox4x32_10(uint64_t counter, uint64_t key) {
  uint32_t c0 = uint32_t(counter), c1 = uint32_t(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(key), k1 = uint32_t(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = uint64_t(0xD2511F53u) * c0, p1 = uint64_t(0xCD9E8D57u) * c2;
    uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// A uniform float in [0, 1) from the top 24 bits of one Philox output.
FS_HD float uniform24(uint32_t x) { return float(x >> 8) * 5.9604644775390625e-8f; }  // 2^-24

// Dropout's draw for element ``index`` of the stream keyed by ``seed``: elements 4n .. 4n + 3 take the
// four (independent) outputs of one Philox call on counter n.
FS_HD float philox_uniform(uint64_t seed, uint64_t index) {
  return uniform24(philox4x32_10(index >> 2, seed).x[index & 3]);
}

}  // namespace fusedstab
