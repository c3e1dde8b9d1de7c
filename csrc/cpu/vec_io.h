// Vector loads and stores between a tensor's element type T and its accumulation type A (fp32, or
// fp64), for the CPU kernels of layer_norm.cpp, bias_leaky_relu.cpp and multi_tensor.cpp; plus the
// argument checks they share.
//
// One step is one Vectorized<A> (8 fp32 or 4 fp64 lanes under AVX2). 16-bit types convert on load
// and store (round to nearest even, NaN kept), so the arithmetic always runs in A. A partial step
// (the tail of a row) goes through a zero-padded buffer, so every element takes the same vector code.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/numerics.h"

namespace fusedstab::cpu {

using at::vec::Vectorized;
using c10::BFloat16;
using c10::Half;

template <typename A> constexpr int64_t kLanes = Vectorized<A>::size();

template <typename A, typename T> struct Io {
  using V = Vectorized<A>;
  static constexpr int64_t K = V::size();
  // fp32 lanes from 16-bit floats: at::vec's vector conversions
  static constexpr bool kHalfToFloat =
      std::is_same_v<A, float> && (std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>);

  static V load(const T* p) {
    if constexpr (std::is_same_v<A, T>) {
      return V::loadu(p);
    } else if constexpr (kHalfToFloat) {
      V v;
      at::vec::load_to_float(p, v);
      return v;
    } else {  // to or from fp64: scalar conversions (fp64 is not the fast path)
      __at_align__ A buf[K];
      for (int64_t i = 0; i < K; ++i) buf[i] = static_cast<A>(p[i]);
      return V::loadu(buf);
    }
  }
  static void store(T* p, const V& v) {
    if constexpr (std::is_same_v<A, T>) {
      v.store(p);
    } else if constexpr (kHalfToFloat) {
      at::vec::convert<T>(v).store(p, K);
    } else {
      __at_align__ A buf[K];
      v.store(buf);
      for (int64_t i = 0; i < K; ++i) p[i] = static_cast<T>(buf[i]);
    }
  }
  // n < K elements; the other lanes are 0.
  static V load(const T* p, int64_t n) {
    if (n == K) return load(p);
    __at_align__ T buf[K] = {};
    std::copy(p, p + std::clamp<int64_t>(n, 0, K), buf);  // the clamp tells gcc that n <= K
    return load(buf);
  }
  static void store(T* p, const V& v, int64_t n) {
    if (n == K) return store(p, v);
    __at_align__ T buf[K];
    store(buf, v);
    std::copy(buf, buf + std::clamp<int64_t>(n, 0, K), p);
  }
};

// f(i, cnt) over [0, n) in steps of K elements; cnt == K (a constant once inlined) but for the tail.
template <typename A, typename F> inline void for_steps(int64_t n, F&& f) {
  constexpr int64_t K = kLanes<A>;
  int64_t i = 0;
  for (; i + K <= n; i += K) f(i, K);
  if (i < n) f(i, n - i);
}

// Horizontal sum of the lanes, in lane order.
template <typename A> inline A hsum(const Vectorized<A>& v) {
  __at_align__ A buf[kLanes<A>];
  v.store(buf);
  A s = buf[0];
  for (int64_t i = 1; i < kLanes<A>; ++i) s += buf[i];
  return s;
}

// NS sums over i in [0, n): f(i, cnt, acc) adds the terms of elements [i, i + cnt) (cnt < K only at
// the end, with the other lanes' terms 0) into acc[0..NS). Two interleaved vector accumulators per
// sum, restarted every kBlock elements and then added to the total: each fp32 lane sums at most 32
// terms plus n/512 block totals, so a 1M-element sum stays near fp32 rounding.
template <int NS, typename A, typename F> inline void blocked_sums(int64_t n, F&& f, A* out) {
  using V = Vectorized<A>;
  constexpr int64_t K = V::size(), kBlock = 64 * K;
  V tot[NS];
  for (int s = 0; s < NS; ++s) tot[s] = V(A(0));
  for (int64_t i = 0; i < n;) {
    const int64_t end = std::min(n, i + kBlock);
    V a[NS], b[NS];
    for (int s = 0; s < NS; ++s) a[s] = b[s] = V(A(0));
    for (; i + 2 * K <= end; i += 2 * K) {
      f(i, K, a);
      f(i + K, K, b);
    }
    for (; i < end; i += K) f(i, std::min(K, end - i), a);
    for (int s = 0; s < NS; ++s) tot[s] += a[s] + b[s];
  }
  for (int s = 0; s < NS; ++s) out[s] = hsum(tot[s]);
}

// f(tag) with a value of the C++ type of dtype t: the one runtime dispatch of a kernel.
template <typename F> decltype(auto) with_float_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(Half{});
    case at::kBFloat16: return f(BFloat16{});
    default: TORCH_CHECK(false, "fusedstab: unsupported dtype ", t);
  }
}

// ------------------------------------------------------------------------------------------ checks
// Elements fill [data_ptr, data_ptr + numel) in some order (contiguous, channels_last, permuted).
inline bool is_dense(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) != 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (auto [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

inline bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A CPU tensor of a float dtype (fp32, fp64, fp16, bf16).
inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(is_float(t.scalar_type()), op, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
              t.scalar_type());
}

// A contiguous CPU tensor of the given shape and dtype (an output, or an input read as flat).
inline void check_dense(const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype, const char* op,
                        const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// An (M, N) float CPU tensor whose rows are contiguous (any row stride).
inline void check_rows(const at::Tensor& t, int64_t M, int64_t N, const char* op, const char* name) {
  check_float(t, op, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == M && t.size(1) == N, op, ": ", name, " must have shape [", M, ", ",
              N, "], got ", t.sizes());
  TORCH_CHECK(N <= 1 || t.stride(1) == 1, op, ": ", name, " must have unit column stride, got strides ",
              t.strides());
}

}  // namespace fusedstab::cpu
