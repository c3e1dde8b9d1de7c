// What the GroupNorm and BatchNorm CPU kernels (group_norm.cpp, batch_norm.cpp) share: argument checks,
// vector loads/stores in the accumulation type, the fused activations on vectors, and the loops over
// x (N, C, S) in its two dense layouts:
// - NCHW: runs of S contiguous elements, run r = n * C + c at offset r * S;
// - channels-inner (channels_last, (N, C, 1)): rows of C contiguous channels, row n * S + s.
//
// Determinism: every reduction is cut into chunks whose bounds depend on the shape only, each chunk
// gives (count, mean, M2) or sums, and the chunks are combined in a fixed order in double. Results
// are bitwise the same run to run and for any thread count.
//
// Precision: a chunk's moments come from sum(x - p) and sum((x - p)^2) about a pivot p near its mean
// (differences of values near p are exact, so 1e4 + noise keeps fp32 precision; a second pass where p
// was off), and chunks combine by Chan et al.'s formula in double (combine_sets).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/numerics.h"

namespace fusedstab {
namespace cpu {

using at::vec::Vectorized;
using Mom = Moments<double>;

constexpr int64_t kChunk = 2048;   // elements of a run chunk (a second pass over it finds it in L1)
constexpr int64_t kGrain = 32768;  // elements a thread takes at least (at::internal::GRAIN_SIZE): less
                                   // work runs on the calling thread

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// at::parallel_for's grain for tasks of `elems` elements each.
inline int64_t grain_for(int64_t elems) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(elems, 1)); }

// ----------------------------------------------------------------------------- vector I/O
// Vectors of the accumulation type A loaded from / stored to T; a partial vector is zero-padded.
template <typename T> struct IO {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  static constexpr int64_t K = V::size();
  static V load(const T* p) { return V::loadu(p); }
  static void store(T* p, V v) { v.store(p); }
  static V load(const T* p, int64_t n) { return V::loadu(p, n); }
  static void store(T* p, V v, int64_t n) { v.store(p, n); }
};

template <typename T> struct IO16 {  // c10::Half, c10::BFloat16: 8 of them per fp32 vector
  using A = float;
  using V = Vectorized<float>;
  static constexpr int64_t K = V::size();
  static V load(const T* p) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
    V out;
    if constexpr (std::is_same_v<T, c10::BFloat16>) at::vec::load_fp32_from_bf16(p, out);
    else at::vec::load_fp32_from_fp16(p, out);
    return out;
#else
    float tmp[K];
    for (int64_t i = 0; i < K; ++i) tmp[i] = float(p[i]);
    return V::loadu(tmp);
#endif
  }
  static void store(T* p, V v) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
    __m128i h;
    if constexpr (std::is_same_v<T, c10::BFloat16>) h = at::vec::cvtfp32_bf16(__m256(v));
    else h = at::vec::cvtfp32_fp16(__m256(v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
#else
    float tmp[K];
    v.store(tmp);
    for (int64_t i = 0; i < K; ++i) p[i] = T(tmp[i]);
#endif
  }
  static V load(const T* p, int64_t n) {
    T tmp[K] = {};
    std::copy_n(p, n, tmp);
    return load(tmp);
  }
  static void store(T* p, V v, int64_t n) {
    T tmp[K];
    store(tmp, v);
    std::copy_n(tmp, n, p);
  }
};
template <> struct IO<c10::Half> : IO16<c10::Half> {};
template <> struct IO<c10::BFloat16> : IO16<c10::BFloat16> {};

template <typename V> double hsum(V v) {  // lanes summed in a fixed order
  using A = typename V::value_type;
  A tmp[V::size()];
  v.store(tmp);
  double s = 0;
  for (int64_t i = 0; i < V::size(); ++i) s += tmp[i];
  return s;
}

// ----------------------------------------------------------------------------- activations
// common/numerics.h's activate / activate_grad on vectors (the same formulas, NaN and z == 0 included).
// exp(-z) for SiLU = z / (1 + exp(-z)) and its gradient, as torch computes them. fp32: ATen's inline
// exp_u20 (within 20 ulp; Sleef's exp is a call per vector and was half of SiLU's cost), made to
// overflow to inf as exp does (z = -inf gives SiLU NaN, z << 0 gives -0, as torch). fp64: Sleef's exp.
template <typename V> inline V exp_neg(V z) {
  const V nz = z.neg();
  if constexpr (std::is_same_v<typename V::value_type, float>)
    return V::blendv(nz.exp_u20(), V(INFINITY), nz > V(88.72283935546875f));
  else
    return nz.exp();
}

template <int ACT, typename V> inline V act_vec(V z, V slope) {
  if constexpr (ACT == kRelu) return V::blendv(z, V(0), z < V(0));
  else if constexpr (ACT == kLeakyRelu) return V::blendv(z * slope, z, z > V(0));
  else if constexpr (ACT == kSilu) return z / (V(1) + exp_neg(z));
  else return z;
}

template <int ACT, typename V> inline V act_grad_vec(V dy, V z, V slope) {
  if constexpr (ACT == kRelu) return V::blendv(dy, V(0), z <= V(0));
  else if constexpr (ACT == kLeakyRelu) return V::blendv(dy * slope, dy, z > V(0));
  else if constexpr (ACT == kSilu) {
    V s = V(1) / (V(1) + exp_neg(z));
    return dy * s * (V(1) + z * (V(1) - s));
  } else return dy;
}

inline int parse_activation(c10::string_view s) {
  if (s == "none") return kNone;
  if (s == "relu") return kRelu;
  if (s == "leaky_relu") return kLeakyRelu;
  if (s == "silu") return kSilu;
  TORCH_CHECK(false, "fusedstab: unknown activation '", std::string(s), "'; expected none, relu, leaky_relu or silu");
}

// f(std::integral_constant<int, ACT>) for the runtime code: one instantiation per activation of the
// inner loops only.
template <class F> inline void with_act(int act, const F& f) {
  switch (act) {
    case kRelu: f(std::integral_constant<int, kRelu>()); break;
    case kLeakyRelu: f(std::integral_constant<int, kLeakyRelu>()); break;
    case kSilu: f(std::integral_constant<int, kSilu>()); break;
    default: f(std::integral_constant<int, kNone>());
  }
}

// ----------------------------------------------------------------------------- argument checks
inline bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct Shape {
  int64_t N, C, S;
  bool cl;  // channels-inner
};

// x (N, C, S) on the CPU, a float dtype, dense NCHW or dense channels-inner (size-1 dims' strides
// do not matter: they never move an offset).
inline Shape check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.defined() && x.dim() == 3, op, ": x must be a 3-d (N, C, S) tensor");
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(is_float(x.scalar_type()), op, ": x must be float32, float64, float16 or bfloat16, got ",
              x.scalar_type());
  Shape s{x.size(0), x.size(1), x.size(2), false};
  s.cl = s.S == 1 || !x.is_contiguous();  // (N, C, 1) reads as rows of C
  if (s.cl && x.numel() > 0) {
    bool ok = (s.C == 1 || x.stride(1) == 1) && (s.S == 1 || x.stride(2) == s.C) &&
              (s.N == 1 || x.stride(0) == s.C * s.S);
    TORCH_CHECK(ok, op, ": x must be dense NCHW (contiguous) or channels-inner (strides (C*S, 1, C)), got sizes ",
                x.sizes(), " and strides ", x.strides());
  }
  return s;
}

// t has x's dtype, sizes and strides (dy, y, dx).
inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's sizes ", x.sizes(), ", got ", t.sizes());
  bool same = true;
  for (int64_t d = 0; d < x.dim(); ++d) same = same && (x.size(d) == 1 || t.stride(d) == x.stride(d));
  TORCH_CHECK(same, op, ": ", name, " must have x's strides ", x.strides(), ", got ", t.strides());
}

// A contiguous tensor of the given sizes and dtype (statistics, sums).
inline void check_buffer(const at::Tensor& t, at::IntArrayRef sizes, at::ScalarType dtype, const char* op,
                         const char* name) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have sizes ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// weight / bias: None, or a contiguous (C,) float tensor of any float dtype; returned in A (default
// value where None).
template <typename A>
std::vector<A> channel_values(const std::optional<at::Tensor>& t, int64_t C, A dflt, const char* op,
                              const char* name) {
  std::vector<A> out(C, dflt);
  if (!t.has_value() || !t->defined()) return out;
  TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(is_float(t->scalar_type()), op, ": ", name, " must be a float tensor, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": ", name, " must have sizes (", C, "), got ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
  at::Tensor a = t->to(c10::CppTypeToScalarType<A>::value);
  std::copy_n(a.const_data_ptr<A>(), C, out.data());
  return out;
}

// ----------------------------------------------------------------------------- loops
// f(run, s0, len) for the pieces of the flat range [a, b) of consecutive runs of length S.
template <class F> inline void for_runs(int64_t a, int64_t b, int64_t S, const F& f) {
  int64_t r = a / S, s = a % S;
  while (a < b) {
    int64_t len = std::min(S - s, b - a);
    f(r, s, len);
    a += len;
    ++r;
    s = 0;
  }
}

// Sets 0..k-1 (get(i) -> Mom) combined by Chan et al.'s parallel formula, as two sums in a fixed order
// (no division per set): n = sum n_i, mean = sum n_i mean_i / n, M2 = sum M2_i + n_i (mean_i - mean)^2.
template <class Get> Mom combine_sets(int64_t k, const Get& get) {
  Mom out;
  double sm = 0;
  for (int64_t i = 0; i < k; ++i) {
    const Mom m = get(i);
    out.n += m.n;
    sm += m.n * m.mean;
  }
  out.mean = sm / out.n;
  for (int64_t i = 0; i < k; ++i) {
    const Mom m = get(i);
    const double d = m.mean - out.mean;
    out.m2 += m.m2 + m.n * d * d;
  }
  return out;
}

// (count, mean, M2) from the sums s = sum(x - p), q = sum((x - p)^2) about a pivot p (accumulated in
// A, finished in double). Their rounding is about eps * (q + s^2 / n), small next to M2 = q - s^2 / n
// while the pivot is within a standard deviation of the mean (ok); else the caller makes a second pass
// about the mean found.
inline Mom from_shifted(double n, double p, double s, double q, bool* ok) {
  const double c = s * s / n, m2 = q - c;
  *ok = c <= m2 || !std::isfinite(q);  // non-finite input: NaN / inf whatever the pivot
  Mom out;
  out.n = n;
  out.mean = p + s / n;  // inf / NaN input: inf / NaN
  out.m2 = m2 < 0 ? 0.0 : m2;  // rounding below 0; NaN stays NaN
  return out;
}

// Moments of the elements that pieces(g) passes to g(const T* p, int64_t len): one pass of
// sum(x - p) and sum((x - p)^2) about a pivot p, the mean of the chunk's first elements (differences
// of values near p are exact, so 1e4 + noise keeps fp32 precision). Where p is off by more than a
// standard deviation (an outlier among the first elements), a second pass about the mean found.
template <typename T, class Pieces> Mom chunk_moments(const Pieces& pieces) {
  using IOT = IO<T>;
  using V = typename IOT::V;
  using A = typename IOT::A;
  constexpr int64_t K = IOT::K;
  A pivot = A(0);
  bool first = true;
  pieces([&](const T* p, int64_t len) {
    if (!first) return;
    first = false;
    const int64_t m = std::min(len, 2 * K);
    pivot = A(hsum(IOT::load(p, std::min(m, K)) + (m > K ? IOT::load(p + K, m - K) : V(0))) / double(m));
  });
  for (int pass = 0;; ++pass) {
    const V vp(pivot);
    V d0(0), d1(0), q0(0), q1(0);
    int64_t n = 0;
    pieces([&](const T* p, int64_t len) {
      n += len;
      int64_t i = 0;
      for (; i + 2 * K <= len; i += 2 * K) {
        V a = IOT::load(p + i) - vp, b = IOT::load(p + i + K) - vp;
        d0 += a;
        d1 += b;
        q0 = at::vec::fmadd(a, a, q0);
        q1 = at::vec::fmadd(b, b, q1);
      }
      for (; i < len; i += K) {
        const int64_t m = std::min(K, len - i);
        V a = V::set(V(0), IOT::load(p + i, m) - vp, m);
        d0 += a;
        q0 = at::vec::fmadd(a, a, q0);
      }
    });
    bool ok;
    const Mom out = from_shifted(double(n), double(pivot), hsum(d0 + d1), hsum(q0 + q1), &ok);
    if (ok || pass == 1) return out;
    pivot = A(out.mean);
  }
}

// Row loops over the channels-inner layout read row after row (sequential memory), each row as
// vectors of channels, the last one zero-padded; per-channel accumulators live in a small array.
template <typename T, class F> inline void for_row_vectors(const T* x, int64_t C, const F& f) {
  using IOT = IO<T>;
  constexpr int64_t K = IOT::K;
  int64_t j = 0, v = 0;
  for (; j + K <= C; j += K, ++v) f(v, IOT::load(x + j));
  if (j < C) f(v, IOT::load(x + j, C - j));
}

// Two rows at once (x and x + C): half the accumulator traffic.
template <typename T, class F> inline void for_row_pair_vectors(const T* x, int64_t C, const F& f) {
  using IOT = IO<T>;
  constexpr int64_t K = IOT::K;
  int64_t j = 0, v = 0;
  for (; j + K <= C; j += K, ++v) f(v, IOT::load(x + j), IOT::load(x + C + j));
  if (j < C) f(v, IOT::load(x + j, C - j), IOT::load(x + C + j, C - j));
}

// Per-column moments of `rows` rows of C contiguous channels (mean and M2 in double, count rows):
// as chunk_moments, per column, the pivot the mean of the first rows.
template <typename T> void column_moments(const T* x, int64_t rows, int64_t C, double* mean, double* m2) {
  using IOT = IO<T>;
  using V = typename IOT::V;
  using A = typename IOT::A;
  constexpr int64_t K = IOT::K;
  constexpr int64_t kPivotRows = 8;
  const int64_t nv = cdiv(C, K), pr = std::min(rows, kPivotRows);
  std::vector<V> piv(nv, V(0)), ds(nv), qs(nv);
  for (int64_t r = 0; r < pr; ++r) for_row_vectors(x + r * C, C, [&](int64_t v, V xv) { piv[v] += xv; });
  for (auto& p : piv) p = p / V(A(pr));
  for (int pass = 0;; ++pass) {
    std::fill(ds.begin(), ds.end(), V(0));
    std::fill(qs.begin(), qs.end(), V(0));
    int64_t r = 0;
    for (; r + 1 < rows; r += 2)
      for_row_pair_vectors(x + r * C, C, [&](int64_t v, V x0, V x1) {
        const V d0 = x0 - piv[v], d1 = x1 - piv[v];
        ds[v] += d0 + d1;
        qs[v] = at::vec::fmadd(d1, d1, at::vec::fmadd(d0, d0, qs[v]));
      });
    if (r < rows)
      for_row_vectors(x + r * C, C, [&](int64_t v, V xv) {
        const V d = xv - piv[v];
        ds[v] += d;
        qs[v] = at::vec::fmadd(d, d, qs[v]);
      });
    bool all_ok = true;
    for (int64_t v = 0; v < nv; ++v) {
      A pv[K], dv[K], qv[K];
      piv[v].store(pv);
      ds[v].store(dv);
      qs[v].store(qv);
      for (int64_t i = 0; i < std::min(K, C - v * K); ++i) {
        bool ok;
        const Mom o = from_shifted(double(rows), pv[i], dv[i], qv[i], &ok);
        all_ok = all_ok && ok;
        mean[v * K + i] = o.mean;
        m2[v * K + i] = o.m2;
        pv[i] = A(o.mean);
      }
      piv[v] = V::loadu(pv);
    }
    if (all_ok || pass == 1) return;
  }
}

// y = act((x - m) * a + b) over a run with one channel's parameters.
template <int ACT, typename T>
void apply_run(const T* x, T* y, int64_t len, acc_t<T> m, acc_t<T> a, acc_t<T> b, acc_t<T> slope) {
  using IOT = IO<T>;
  using V = typename IOT::V;
  constexpr int64_t K = IOT::K;
  const V vm(m), va(a), vb(b), vs(slope);
  int64_t i = 0;
  for (; i + K <= len; i += K)
    IOT::store(y + i, act_vec<ACT>(at::vec::fmadd(IOT::load(x + i) - vm, va, vb), vs));
  if (i < len) IOT::store(y + i, act_vec<ACT>(at::vec::fmadd(IOT::load(x + i, len - i) - vm, va, vb), vs), len - i);
}

// The same over rows of C channels with per-channel parameters pm, pa, pb.
template <int ACT, typename T>
void apply_rows(const T* x, T* y, int64_t rows, int64_t C, const acc_t<T>* pm, const acc_t<T>* pa,
                const acc_t<T>* pb, acc_t<T> slope) {
  using IOT = IO<T>;
  using V = typename IOT::V;
  constexpr int64_t K = IOT::K;
  const V vs(slope);
  for (int64_t r = 0; r < rows; ++r, x += C, y += C) {
    int64_t j = 0;
    for (; j + K <= C; j += K) {
      V z = at::vec::fmadd(IOT::load(x + j) - V::loadu(pm + j), V::loadu(pa + j), V::loadu(pb + j));
      IOT::store(y + j, act_vec<ACT>(z, vs));
    }
    if (j < C) {
      const int64_t m = C - j;
      V z = at::vec::fmadd(IOT::load(x + j, m) - V::loadu(pm + j, m), V::loadu(pa + j, m), V::loadu(pb + j, m));
      IOT::store(y + j, act_vec<ACT>(z, vs), m);
    }
  }
}

// Backward parameters of one channel: xhat = (x - m) * r, z = (x - m) * a + b (a = r * w), and
// dx = (dz * p - q - (x - m) * u) * k: BatchNorm's w * rstd * (dz - mean(dz) - xhat * mean(dz * xhat)),
// GroupNorm's rstd * (w * dz - mean(w * dz) - xhat * mean(w * dz * xhat)).
template <typename A> struct BwdParams {
  A m, r, a, b, p, q, u, k;
};

// (sum dz, sum dz * xhat) over a run, dz = dy * act'(z); dz also written to dz_out where given (a cache
// that the dx pass reads instead of recomputing the activation's gradient).
template <int ACT, typename T>
std::pair<double, double> sums_run(const T* dy, const T* x, int64_t len, const BwdParams<acc_t<T>>& P,
                                   acc_t<T> slope, acc_t<T>* dz_out = nullptr) {
  using IOT = IO<T>;
  using V = typename IOT::V;
  constexpr int64_t K = IOT::K;
  const V vm(P.m), vr(P.r), va(P.a), vb(P.b), vs(slope);
  V sd(0), sx(0);
  int64_t i = 0;
  auto step = [&](V g, V xv, int64_t m) {
    V xm = xv - vm;
    V dz = ACT == kNone ? g : act_grad_vec<ACT>(g, at::vec::fmadd(xm, va, vb), vs);
    V xh = xm * vr;
    if (dz_out) dz.store(dz_out + i, m);
    if (m < K) {
      dz = V::set(V(0), dz, m);
      xh = V::set(V(0), xh, m);
    }
    sd += dz;
    sx = at::vec::fmadd(dz, xh, sx);
  };
  for (; i + K <= len; i += K) step(IOT::load(dy + i), IOT::load(x + i), K);
  if (i < len) step(IOT::load(dy + i, len - i), IOT::load(x + i, len - i), len - i);
  return {hsum(sd), hsum(sx)};
}

// The same per channel over rows of C channels: sdz[c], sdzx[c] (overwritten), parameters per channel;
// dz_out (rows x C) as above.
template <int ACT, typename T>
void sums_rows(const T* dy, const T* x, int64_t rows, int64_t C, const BwdParams<acc_t<T>>* P, acc_t<T> slope,
               double* sdz, double* sdzx, acc_t<T>* dz_out = nullptr) {
  using IOT = IO<T>;
  using V = typename IOT::V;
  using A = acc_t<T>;
  constexpr int64_t K = IOT::K;
  const int64_t nv = cdiv(C, K);
  const V vs(slope);
  std::vector<A> prm(4 * nv * K, A(0));  // m, r, a, b per channel as vectors; padding lanes 0
  for (int64_t c = 0; c < C; ++c) {
    const int64_t v = c / K, i = c % K;
    prm[(4 * v) * K + i] = P[c].m;
    prm[(4 * v + 1) * K + i] = P[c].r;
    prm[(4 * v + 2) * K + i] = P[c].a;
    prm[(4 * v + 3) * K + i] = P[c].b;
  }
  std::vector<V> sd(nv, V(0)), sx(nv, V(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = dy + r * C;
    for_row_vectors(x + r * C, C, [&](int64_t v, V xv) {
      const A* q = &prm[4 * v * K];
      const V gv = v * K + K <= C ? IOT::load(g + v * K) : IOT::load(g + v * K, C - v * K);
      const V xm = xv - V::loadu(q);
      const V dz = ACT == kNone ? gv : act_grad_vec<ACT>(gv, at::vec::fmadd(xm, V::loadu(q + 2 * K), V::loadu(q + 3 * K)), vs);
      if (dz_out) dz.store(dz_out + r * C + v * K, std::min(K, C - v * K));
      sd[v] += dz;
      sx[v] = at::vec::fmadd(dz, xm * V::loadu(q + K), sx[v]);
    });
  }
  for (int64_t v = 0; v < nv; ++v) {
    A a[K], b[K];
    sd[v].store(a);
    sx[v].store(b);
    for (int64_t i = 0; i < std::min(K, C - v * K); ++i) {  // padding lanes never leave the vectors
      sdz[v * K + i] = a[i];
      sdzx[v * K + i] = b[i];
    }
  }
}

// dz: from dy (dz = dy * act'(z)), or read from the cache sums_run / sums_rows wrote (dz_in).
// STATS: the statistics depend on x (training); else dx = dz * p * k, and an infinite x gives a finite
// dx, as torch's eval backward.
template <int ACT, bool STATS, typename V>
inline V dx_vec(V g, const V* dz_in, V xv, V vm, V va, V vb, V vp, V vq, V vu, V vk, V vs) {
  V xm = xv - vm;
  V dz = dz_in ? *dz_in : ACT == kNone ? g : act_grad_vec<ACT>(g, at::vec::fmadd(xm, va, vb), vs);
  if constexpr (STATS) return at::vec::fnmadd(xm, vu, dz * vp - vq) * vk;
  else return dz * vp * vk;
}

// dx over a run with one channel's parameters.
template <int ACT, bool STATS, typename T>
void dx_run(const T* dy, const T* x, T* dx, int64_t len, const BwdParams<acc_t<T>>& P, acc_t<T> slope,
            const acc_t<T>* dz_in = nullptr) {
  using IOT = IO<T>;
  using V = typename IOT::V;
  constexpr int64_t K = IOT::K;
  const V vm(P.m), va(P.a), vb(P.b), vp(P.p), vq(P.q), vu(P.u), vk(P.k), vs(slope);
  auto step = [&](int64_t i, int64_t m) {
    const V g = dz_in ? V(0) : IOT::load(dy + i, m);
    const V dz = dz_in ? V::loadu(dz_in + i, m) : V(0);
    IOT::store(dx + i, dx_vec<ACT, STATS>(g, dz_in ? &dz : nullptr, IOT::load(x + i, m), vm, va, vb, vp, vq, vu, vk, vs),
               m);
  };
  int64_t i = 0;
  for (; i + K <= len; i += K) {
    const V g = dz_in ? V(0) : IOT::load(dy + i);
    const V dz = dz_in ? V::loadu(dz_in + i) : V(0);
    IOT::store(dx + i, dx_vec<ACT, STATS>(g, dz_in ? &dz : nullptr, IOT::load(x + i), vm, va, vb, vp, vq, vu, vk, vs));
  }
  if (i < len) step(i, len - i);
}

// Per-channel parameters as separate arrays, for the row loops.
template <typename A> struct ParamRows {
  std::vector<A> m, a, b, p, q, u, k;
  explicit ParamRows(int64_t n) : m(n), a(n), b(n), p(n), q(n), u(n), k(n) {}
  void set(int64_t i, const BwdParams<A>& P) {
    m[i] = P.m;
    a[i] = P.a;
    b[i] = P.b;
    p[i] = P.p;
    q[i] = P.q;
    u[i] = P.u;
    k[i] = P.k;
  }
};

// dx over rows of C channels, parameters per channel from offset o of the arrays; dz_in (rows x C).
template <int ACT, bool STATS, typename T>
void dx_rows(const T* dy, const T* x, T* dx, int64_t rows, int64_t C, const ParamRows<acc_t<T>>& P, int64_t o,
             acc_t<T> slope, const acc_t<T>* dz_in = nullptr) {
  using IOT = IO<T>;
  using V = typename IOT::V;
  constexpr int64_t K = IOT::K;
  const V vs(slope);
  const auto *pm = P.m.data() + o, *pa = P.a.data() + o, *pb = P.b.data() + o, *pp = P.p.data() + o,
             *pq = P.q.data() + o, *pu = P.u.data() + o, *pk = P.k.data() + o;
  for (int64_t r = 0; r < rows; ++r, dy += C, x += C, dx += C) {
    const acc_t<T>* dzr = dz_in ? dz_in + r * C : nullptr;
    int64_t j = 0;
    for (; j + K <= C; j += K) {
      const V g = dzr ? V(0) : IOT::load(dy + j);
      const V dz = dzr ? V::loadu(dzr + j) : V(0);
      IOT::store(dx + j, dx_vec<ACT, STATS>(g, dzr ? &dz : nullptr, IOT::load(x + j), V::loadu(pm + j),
                                            V::loadu(pa + j), V::loadu(pb + j), V::loadu(pp + j), V::loadu(pq + j),
                                            V::loadu(pu + j), V::loadu(pk + j), vs));
    }
    if (j < C) {
      const int64_t m = C - j;
      const V g = dzr ? V(0) : IOT::load(dy + j, m);
      const V dz = dzr ? V::loadu(dzr + j, m) : V(0);
      IOT::store(dx + j, dx_vec<ACT, STATS>(g, dzr ? &dz : nullptr, IOT::load(x + j, m), V::loadu(pm + j, m),
                                            V::loadu(pa + j, m), V::loadu(pb + j, m), V::loadu(pp + j, m),
                                            V::loadu(pq + j, m), V::loadu(pu + j, m), V::loadu(pk + j, m), vs),
                 m);
    }
  }
}

// Rows per chunk of the channels-inner reductions: long enough that the per-chunk combine is cheap,
// short enough that a second pass (a bad pivot) finds the chunk in L2.
inline int64_t rows_per_chunk(int64_t C) { return std::clamp<int64_t>(16384 / std::max<int64_t>(C, 1), 32, 256); }

// phase1(u, k, cached) for every chunk k (of about chunk_elems elements) of every unit u, then finish(u),
// then phase2(u, k, cached). Where every thread gets several units and a unit's data (unit_bytes) stays
// in the core's L2 (512 KB here) between the phases, one task runs a whole unit, and cached is true: a
// buffer the thread filled in phase 1 is there in phase 2. Else each phase runs over all chunks in
// parallel (a sample of 56x56x64 fp32 read twice from L2's misses ran at half the speed of two plain
// passes). Same arithmetic either way.
constexpr int64_t kUnitCacheBytes = 256 << 10;

template <class P1, class Fin, class P2>
void by_units(int64_t units, int64_t chunks, int64_t chunk_elems, int64_t unit_bytes, const P1& phase1,
              const Fin& finish, const P2& phase2) {
  if (units >= 4 * at::get_num_threads() && unit_bytes <= kUnitCacheBytes) {
    at::parallel_for(0, units, grain_for(chunks * chunk_elems), [&](int64_t b, int64_t e) {
      for (int64_t u = b; u < e; ++u) {
        for (int64_t k = 0; k < chunks; ++k) phase1(u, k, true);
        finish(u);
        for (int64_t k = 0; k < chunks; ++k) phase2(u, k, true);
      }
    });
    return;
  }
  const int64_t grain = grain_for(chunk_elems);
  at::parallel_for(0, units * chunks, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) phase1(i / chunks, i % chunks, false);
  });
  for (int64_t u = 0; u < units; ++u) finish(u);
  at::parallel_for(0, units * chunks, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) phase2(i / chunks, i % chunks, false);
  });
}

}  // namespace cpu
}  // namespace fusedstab
