// Multi-tensor norm and scale (global-norm gradient clipping) on CPU: one parallel pass over a whole
// list of dense tensors of one dtype.
//
// The list is cut into chunks of at most kChunk elements (a big tensor into many, a small one into
// one), the chunks split over threads. The norm reduces each chunk to a partial (fp32 lanes, or fp64
// for fp64 input), then combines each tensor's partials in chunk order, in fp64 (counts stay exact):
// deterministic whatever the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/vec_io.h"

namespace fusedstab::cpu {
namespace {

constexpr const char* kNorm = "multi_tensor_norm";
constexpr const char* kScale = "multi_tensor_scale_";
constexpr int64_t kChunk = 1 << 16;  // elements: 256 KiB of fp32, ~2k chunks for GPT-2 small's 124M

// The list's common dtype, after checking every tensor (CPU, float, dense, same dtype).
at::ScalarType check_list(at::TensorList ts, const char* op) {
  TORCH_CHECK(!ts.empty(), op, ": expected a non-empty list of tensors");
  const at::ScalarType dt = ts[0].scalar_type();
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    TORCH_CHECK(t.defined(), op, ": tensor ", i, " is undefined");
    TORCH_CHECK(t.device().is_cpu(), op, ": tensor ", i, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.scalar_type() == dt, op, ": every tensor must have the dtype of the first (", dt,
                "), tensor ", i, " has ", t.scalar_type());
    TORCH_CHECK(is_dense(t), op, ": tensor ", i, " must be dense (no gaps between its elements), got sizes ",
                t.sizes(), " strides ", t.strides());
  }
  TORCH_CHECK(is_float(dt), op, ": tensors must be float32, float64, float16 or bfloat16, got ", dt);
  return dt;
}

struct Chunk {
  int64_t tensor;
  const char* ptr;
  int64_t n;
};

// Chunks of the non-empty tensors, in list order; first[i] is the first chunk of tensor i.
std::vector<Chunk> chunks_of(at::TensorList ts, std::vector<int64_t>* first) {
  std::vector<Chunk> out;
  for (size_t i = 0; i < ts.size(); ++i) {
    if (first) first->push_back(int64_t(out.size()));
    const int64_t n = ts[i].numel();
    const auto base = static_cast<const char*>(ts[i].const_data_ptr());
    for (int64_t s = 0; s < n; s += kChunk)
      out.push_back({int64_t(i), base + s * ts[i].element_size(), std::min(kChunk, n - s)});
  }
  if (first) first->push_back(int64_t(out.size()));
  return out;
}

// ------------------------------------------------------------------------ norm
enum Kind { kSquare, kAbs, kMax, kMin, kNonzero, kPow };

Kind kind_of(double p) {
  if (p == 2.0) return kSquare;
  if (p == 1.0) return kAbs;
  if (p == std::numeric_limits<double>::infinity()) return kMax;
  if (p == -std::numeric_limits<double>::infinity()) return kMin;
  if (p == 0.0) return kNonzero;
  return kPow;
}

// max / min that propagate NaN (as torch's amax / amin).
inline double nan_max(double a, double b) { return std::isnan(a) || a > b ? a : (std::isnan(b) ? b : std::max(a, b)); }
inline double nan_min(double a, double b) { return std::isnan(a) || a < b ? a : (std::isnan(b) ? b : std::min(a, b)); }

template <typename T> double reduce_chunk(const T* x, int64_t n, Kind kind, double p) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t K = kLanes<A>;
  if (kind == kMax || kind == kMin) {
    const bool mx = kind == kMax;
    const Vec id(mx ? A(0) : std::numeric_limits<A>::infinity());
    Vec m = id;
    for_steps<A>(n, [&](int64_t i, int64_t c) {
      Vec a = Io<A, T>::load(x + i, c).abs();
      if (c < K) a = Vec::set(id, a, c);
      m = mx ? at::vec::maximum(m, a) : at::vec::minimum(m, a);
    });
    __at_align__ A lanes[K];
    m.store(lanes);
    double r = lanes[0];
    for (int64_t j = 1; j < K; ++j) r = mx ? nan_max(r, lanes[j]) : nan_min(r, lanes[j]);
    return r;
  }
  if (kind == kPow) {  // any p (rare): scalar pow; 0^p = inf for p < 0, as torch
    const A pa = static_cast<A>(p);
    A s[1];
    blocked_sums<1, A>(n, [&](int64_t i, int64_t c, Vec* acc) {
      __at_align__ A v[K] = {};
      for (int64_t j = 0; j < c; ++j) v[j] = std::pow(std::abs(static_cast<A>(x[i + j])), pa);
      acc[0] += Vec::loadu(v);
    }, s);
    return s[0];
  }
  A s[1];
  const Vec one(A(1)), zero(A(0));
  blocked_sums<1, A>(n, [&](int64_t i, int64_t c, Vec* acc) {
    const Vec v = Io<A, T>::load(x + i, c);  // 0 past the end: adds nothing
    if (kind == kSquare) acc[0] = at::vec::fmadd(v, v, acc[0]);
    else if (kind == kAbs) acc[0] += v.abs();
    else acc[0] += (v != zero) & one;  // NaN counts as nonzero
  }, s);
  return s[0];
}

void multi_tensor_norm(at::TensorList tensors, double norm_type, at::Tensor& out) {
  const at::ScalarType dt = check_list(tensors, kNorm);
  const int64_t n = int64_t(tensors.size());
  check_dense(out, {n}, acc_of(dt), kNorm, "out");
  std::vector<int64_t> first;
  const std::vector<Chunk> chunks = chunks_of(tensors, &first);
  const Kind kind = kind_of(norm_type);
  std::vector<double> part(chunks.size());
  with_float_type(dt, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c)
        part[c] = reduce_chunk<T>(reinterpret_cast<const T*>(chunks[c].ptr), chunks[c].n, kind, norm_type);
    });
  });
  const double id = kind == kMin ? std::numeric_limits<double>::infinity() : 0.0;  // an empty tensor's
  with_float_type(out.scalar_type(), [&](auto tag) {
    using A = decltype(tag);
    A* o = out.data_ptr<A>();
    for (int64_t t = 0; t < n; ++t) {
      double r = id;
      for (int64_t c = first[t]; c < first[t + 1]; ++c)
        r = kind == kMax ? nan_max(r, part[c]) : kind == kMin ? nan_min(r, part[c]) : r + part[c];
      o[t] = static_cast<A>(r);
    }
  });
}

// ------------------------------------------------------------------------ scale
template <typename T> void scale_chunk(T* x, int64_t n, acc_t<T> coef) {
  using A = acc_t<T>;
  constexpr int64_t K = kLanes<A>;
  const Vectorized<A> vc(coef);
  int64_t i = 0;
  for (; i + 4 * K <= n; i += 4 * K) {  // 4 vectors a step: ~10% over 1 (1 thread, fp32)
    auto a = Io<A, T>::load(x + i), b = Io<A, T>::load(x + i + K), c = Io<A, T>::load(x + i + 2 * K),
         d = Io<A, T>::load(x + i + 3 * K);
    Io<A, T>::store(x + i, a * vc);
    Io<A, T>::store(x + i + K, b * vc);
    Io<A, T>::store(x + i + 2 * K, c * vc);
    Io<A, T>::store(x + i + 3 * K, d * vc);
  }
  x += i;
  for_steps<A>(n - i, [&](int64_t j, int64_t c) { Io<A, T>::store(x + j, Io<A, T>::load(x + j, c) * vc, c); });
}

// Whether two of the tensors share memory (then chunks must run in list order, one at a time).
bool overlapping(at::TensorList ts) {
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  for (const auto& t : ts)
    if (t.numel()) {
      auto b = reinterpret_cast<uintptr_t>(t.const_data_ptr());
      spans.emplace_back(b, b + t.numel() * t.element_size());
    }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].first < spans[i - 1].second) return true;
  return false;
}

void multi_tensor_scale_(at::TensorList tensors, const at::Tensor& coef, bool zero_nonfinite) {
  const at::ScalarType dt = check_list(tensors, kScale);
  check_float(coef, kScale, "coef");
  TORCH_CHECK(coef.numel() == 1, kScale, ": coef must have one element, got shape ", coef.sizes());
  const double c = with_float_type(coef.scalar_type(), [&](auto tag) {
    return static_cast<double>(*coef.const_data_ptr<decltype(tag)>());
  });
  const std::vector<Chunk> chunks = chunks_of(tensors, nullptr);
  const int64_t grain = overlapping(tensors) ? int64_t(chunks.size()) + 1 : 1;
  with_float_type(dt, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const A ca = static_cast<A>(c);
    // t * 1 == t for every value: nothing to write (clip_grad_norm_'s coefficient when under the limit).
    if (ca == A(1)) return;
    const bool zero = zero_nonfinite && ca == A(0);  // exactly 0, NaN and Inf included (+0.0: all bits 0)
    at::parallel_for(0, int64_t(chunks.size()), grain, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        T* x = reinterpret_cast<T*>(const_cast<char*>(chunks[k].ptr));
        if (zero)
          std::memset(static_cast<void*>(x), 0, chunks[k].n * sizeof(T));
        else
          scale_chunk<T>(x, chunks[k].n, ca);
      }
    });
  });
}

}  // namespace
}  // namespace fusedstab::cpu

TORCH_LIBRARY_IMPL(fusedstab_C, CPU, m) {
  m.impl("multi_tensor_norm", &fusedstab::cpu::multi_tensor_norm);
  m.impl("multi_tensor_scale_", &fusedstab::cpu::multi_tensor_scale_);
}
