// Gradient statistics and the finishing program of an adaptive clipping step on CPU (the eager
// references: fusedstab/reference.py grad_stats and grad_clip_finish).
//
// grad_stats: one parallel pass over a list of dense tensors of one dtype gives each tensor's sum of
// squares, count of non-finite elements and max |x|. The list is cut into chunks of at most kChunk
// elements, the chunks split over threads; each tensor's chunk partials are combined in chunk order
// in fp64: deterministic whatever the thread count.
// grad_clip_finish: scalar code over the per-tensor sums (T values) and the mode's small state.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpu/vec_io.h"

namespace fusedstab::cpu {
namespace {

constexpr const char* kStats = "grad_stats";
constexpr const char* kFinish = "grad_clip_finish";
constexpr int64_t kChunk = 1 << 16;  // elements per task: 256 KiB of fp32
constexpr int64_t kBlock = 1024;      // elements per fp32 vector sum before it joins the fp64 total
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double nan_max(double a, double b) { return std::isnan(a) || a > b ? a : b; }

struct Part {
  double sq = 0, bad = 0, mx = 0;
};

// The common case reads each element once for two vector ops (a square added, a max): the count of
// non-finite elements is taken in a second pass over the (cache-resident) chunk only when its max is
// Inf or its sum NaN, i.e. when it holds one. The vector max need not propagate NaN: a NaN makes the
// sum NaN, and the chunk's max is then NaN.
template <typename T> Part reduce_chunk(const T* x, int64_t n) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t K = V::size();
  Part r;
  V mx0(A(0)), mx1(A(0));
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t end = std::min(n, b + kBlock);
    V sq0(A(0)), sq1(A(0));
    int64_t i = b;
    for (; i + 2 * K <= end; i += 2 * K) {
      const V a0 = Io<A, T>::load(x + i).abs(), a1 = Io<A, T>::load(x + i + K).abs();
      sq0 = at::vec::fmadd(a0, a0, sq0);
      sq1 = at::vec::fmadd(a1, a1, sq1);
      mx0 = at::vec::clamp_min(a0, mx0);
      mx1 = at::vec::clamp_min(a1, mx1);
    }
    for (; i < end; i += K) {
      const V a = Io<A, T>::load(x + i, end - i).abs();  // lanes past the end: 0
      sq0 = at::vec::fmadd(a, a, sq0);
      mx0 = at::vec::clamp_min(a, mx0);
    }
    r.sq += double(hsum(sq0 + sq1));
  }
  __at_align__ A lanes[2 * K];
  mx0.store(lanes);
  mx1.store(lanes + K);
  for (int64_t j = 0; j < 2 * K; ++j)
    if (double(lanes[j]) > r.mx) r.mx = double(lanes[j]);
  if (std::isnan(r.sq)) r.mx = kNaN;
  if (std::isnan(r.sq) || std::isinf(r.mx)) {  // rare: count them
    int64_t bad = 0;
    for (int64_t j = 0; j < n; ++j) bad += !std::isfinite(double(static_cast<A>(x[j])));
    r.bad = double(bad);
  }
  return r;
}

void grad_stats(at::TensorList tensors, at::Tensor& out) {
  TORCH_CHECK(!tensors.empty(), kStats, ": expected a non-empty list of tensors");
  const at::ScalarType dt = tensors[0].scalar_type();
  TORCH_CHECK(is_float(dt), kStats, ": tensors must be float32, float64, float16 or bfloat16, got ", dt);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dt && is_dense(t), kStats, ": tensor ", i,
                " must be a dense CPU tensor of dtype ", dt, ", got ", t.scalar_type(), " on ", t.device(),
                " with sizes ", t.sizes(), " strides ", t.strides());
  }
  const int64_t T = int64_t(tensors.size());
  const at::ScalarType acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == acc && out.dim() == 2 && out.size(0) == 3 &&
                  out.size(1) == T && out.is_contiguous(),
              kStats, ": out must be a contiguous (3, ", T, ") ", acc, " CPU tensor");
  struct Chunk { const char* ptr; int64_t n; };
  std::vector<Chunk> chunks;
  std::vector<int64_t> first;
  for (const auto& t : tensors) {
    first.push_back(int64_t(chunks.size()));
    const auto base = static_cast<const char*>(t.const_data_ptr());
    for (int64_t s = 0; s < t.numel(); s += kChunk)
      chunks.push_back({base + s * t.element_size(), std::min(kChunk, t.numel() - s)});
  }
  first.push_back(int64_t(chunks.size()));
  std::vector<Part> part(chunks.size());
  with_float_type(dt, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) part[c] = reduce_chunk<T>(reinterpret_cast<const T*>(chunks[c].ptr), chunks[c].n);
    });
  });
  with_float_type(acc, [&](auto tag) {
    using A = decltype(tag);
    A* o = out.data_ptr<A>();
    for (int64_t t = 0; t < T; ++t) {
      Part r;
      for (int64_t c = first[t]; c < first[t + 1]; ++c) {
        r.sq += part[c].sq;
        r.bad += part[c].bad;
        r.mx = nan_max(r.mx, part[c].mx);
      }
      o[t] = A(r.sq);
      o[T + t] = A(r.bad);
      o[2 * T + t] = A(r.mx);
    }
  });
}

// ------------------------------------------------------------------------ the finishing program
template <typename A> double get(const at::Tensor& t, int64_t i) { return double(t.const_data_ptr<A>()[i]); }

double read(const at::Tensor& t, int64_t i) {
  return with_float_type(t.scalar_type(), [&](auto tag) { return get<decltype(tag)>(t, i); });
}

void write(at::Tensor& t, int64_t i, double v) {
  with_float_type(t.scalar_type(), [&](auto tag) {
    using A = decltype(tag);
    t.data_ptr<A>()[i] = A(v);
  });
}

void grad_clip_finish(const at::Tensor& stats, at::Tensor& state, const std::optional<at::Tensor>& max_norm,
                      double max_norm_value, c10::string_view mode_sv, int64_t warmup, double z_thresh,
                      double alpha, double eps, double q, bool skip_nonfinite, double skip_above,
                      at::Tensor& ring_tensors, at::Tensor& ring_scalars, at::Tensor& total, at::Tensor& coef_out,
                      at::Tensor& found_inf, at::Tensor& threshold) {
  const std::string mode(mode_sv);
  TORCH_CHECK(mode == "fixed" || mode == "zclip" || mode == "quantile", kFinish, ": unknown mode ", mode);
  TORCH_CHECK(stats.device().is_cpu() && stats.dim() == 2 && (stats.size(0) == 1 || stats.size(0) == 3) &&
                  stats.is_contiguous() && (stats.scalar_type() == at::kFloat || stats.scalar_type() == at::kDouble),
              kFinish, ": stats must be a contiguous (1 or 3, T) float32/float64 CPU tensor");
  const int64_t T = stats.size(1);
  const int64_t W = mode == "quantile" ? state.numel() - 4 : 0;
  TORCH_CHECK(state.device().is_cpu() && state.scalar_type() == at::kDouble && state.dim() == 1 &&
                  state.is_contiguous() && state.numel() >= 4 && (mode != "quantile" || W >= 1),
              kFinish, ": state must be a contiguous float64 CPU vector of at least ", mode == "quantile" ? 5 : 4,
              " elements");
  TORCH_CHECK(!max_norm || (max_norm->device().is_cpu() && max_norm->numel() == 1 && is_float(max_norm->scalar_type())),
              kFinish, ": max_norm must be a one-element float CPU tensor");
  const int64_t K = ring_scalars.size(0);
  TORCH_CHECK(ring_scalars.device().is_cpu() && ring_scalars.dim() == 2 && ring_scalars.size(1) == 5 &&
                  ring_scalars.is_contiguous() && is_float(ring_scalars.scalar_type()),
              kFinish, ": ring_scalars must be a contiguous (K, 5) float CPU tensor");
  const bool per_tensor = K > 0 && ring_tensors.numel() > 0;
  TORCH_CHECK(!per_tensor || (ring_tensors.device().is_cpu() && ring_tensors.dim() == 3 && ring_tensors.size(0) == K &&
                              ring_tensors.size(1) == 3 && ring_tensors.size(2) == T && ring_tensors.is_contiguous() &&
                              is_float(ring_tensors.scalar_type()) && stats.size(0) == 3),
              kFinish, ": ring_tensors must be empty or a contiguous (K, 3, T) float CPU tensor, with 3 rows of stats");
  for (const at::Tensor* o : {&total, &coef_out, &found_inf, &threshold})
    TORCH_CHECK(o->device().is_cpu() && o->numel() == 1 && is_float(o->scalar_type()), kFinish,
                ": outputs must be one-element float CPU tensors");

  double* st = state.data_ptr<double>();
  const double steps = st[0], seen = st[1], mean = st[2], var = st[3];
  double sum = 0;
  for (int64_t i = 0; i < T; ++i) sum += read(stats, i);
  const double g = std::sqrt(sum);
  const double cap = max_norm ? read(*max_norm, 0) : max_norm_value;
  const bool finite = std::isfinite(g);
  const bool skip = g > skip_above || (skip_nonfinite && !finite);
  const bool good = finite && !skip;
  const bool warm = seen < double(warmup);
  double thr = cap;
  if (mode == "zclip") {
    const double sd = std::sqrt(std::max(var, 0.0));
    const double z = (g - mean) / (sd + eps);
    const bool spike = !warm && z > z_thresh;
    const double adaptive = mean + z_thresh * z_thresh * sd / z;
    if (spike) thr = std::min(adaptive, cap);
    if (good) {
      if (warm) {  // Welford; at the last warm-up step the population variance
        const double n1 = seen + 1, m1 = mean + (g - mean) / n1, m2 = var + (g - mean) * (g - m1);
        st[2] = m1;
        st[3] = n1 >= double(warmup) ? m2 / n1 : m2;
      } else {
        const double x = spike ? adaptive : g;
        const double m1 = alpha * mean + (1 - alpha) * x;
        st[2] = m1;
        st[3] = alpha * var + (1 - alpha) * (x - m1) * (x - m1);
      }
    }
  } else if (mode == "quantile") {
    double* win = st + 4;
    if (good) win[int64_t(std::fmod(seen, double(W)))] = g;
    const double m = std::min(good ? seen + 1 : seen, double(W));
    std::vector<double> srt(win, win + W);
    for (double& v : srt) v = std::isnan(v) ? kInf : v;
    std::sort(srt.begin(), srt.end());
    const double p = q * (m - 1);
    const int64_t lo = std::min<int64_t>(int64_t(std::max(p, 0.0)), W - 1);
    const int64_t hi = std::min<int64_t>(lo + 1, int64_t(std::max(m - 1, 0.0)));
    const double quant = m > 0 ? srt[lo] + (p - double(lo)) * (srt[hi] - srt[lo]) : kInf;
    if (!warm) thr = std::min(quant, cap);
  }
  double coef = thr / (g + 1e-6);
  coef = coef > 1.0 ? 1.0 : coef;  // clamp(max=1) keeping NaN, as torch
  if (skip) coef = 1.0;
  st[1] = good ? seen + 1 : seen;
  st[0] = steps + 1;
  if (K > 0) {
    const int64_t slot = int64_t(std::fmod(steps, double(K)));
    if (per_tensor) {
      for (int64_t i = 0; i < T; ++i) {
        write(ring_tensors, slot * 3 * T + i, std::sqrt(read(stats, i)));
        write(ring_tensors, slot * 3 * T + T + i, read(stats, 2 * T + i));  // max |x|
        write(ring_tensors, slot * 3 * T + 2 * T + i, read(stats, T + i));  // non-finite count
      }
    }
    const double row[5] = {steps + 1, g, thr, coef, skip ? 1.0 : 0.0};
    for (int j = 0; j < 5; ++j) write(ring_scalars, slot * 5 + j, row[j]);
  }
  write(total, 0, g);
  write(coef_out, 0, coef);
  write(found_inf, 0, skip ? 1.0 : 0.0);
  write(threshold, 0, thr);
}

}  // namespace
}  // namespace fusedstab::cpu

TORCH_LIBRARY_IMPL(fusedstab_C, CPU, m) {
  m.impl("grad_stats", &fusedstab::cpu::grad_stats);
  m.impl("grad_clip_finish", &fusedstab::cpu::grad_clip_finish);
}
