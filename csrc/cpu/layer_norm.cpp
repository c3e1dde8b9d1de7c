// LayerNorm / RMSNorm (+ the fused residual add) on CPU: layer_norm_fwd and layer_norm_bwd.
//
// Rows are split over threads (at::parallel_for). The pass that reads a row from memory stages it in a
// thread-local buffer of the accumulation type A (a row already in A is re-read in place instead), so
// the later passes read it from cache and all the math runs in A whatever the dtypes of x, residual,
// weight, dy and dh: only the conversions in and out (vec_io.h) depend on them.
//
// Forward statistics: sums of d = h - s and d^2 in the pass that reads the row, s the mean of its first
// 8 (fp64: 4) values; mean = s + sum(d)/N, var = sum(d^2)/N - (sum(d)/N)^2. Where s is far from the
// mean (the variance would cancel) the row, in cache, is summed again around the mean (corrected
// two-pass): exact for any offset of the row, two passes over it in the common case.
// Backward: dweight/dbias as one partial row per row block (block p of P = min(M, threads)), summed in
// block order: deterministic for a given thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/vec_io.h"

namespace fusedstab::cpu {
namespace {

constexpr const char* kFwd = "layer_norm_fwd";
constexpr const char* kBwd = "layer_norm_bwd";

// ------------------------------------------------------------------------ row conversions
template <typename A> using LoadFn = void (*)(const void* src, A* dst, int64_t n);

template <typename A, typename T> void load_row(const void* src, A* dst, int64_t n) {
  auto p = static_cast<const T*>(src);
  for_steps<A>(n, [&](int64_t i, int64_t c) { Io<A, T>::load(p + i, c).store(dst + i, c); });
}

template <typename A> LoadFn<A> load_fn(at::ScalarType t) {
  return with_float_type(t, [](auto tag) -> LoadFn<A> { return &load_row<A, decltype(tag)>; });
}

// A parameter (N,) as N values of A, or `fill` when absent.
template <typename A> std::vector<A> param_row(const std::optional<at::Tensor>& p, int64_t N, A fill) {
  std::vector<A> out(N, fill);
  if (p.has_value()) load_fn<A>(p->scalar_type())(p->const_data_ptr(), out.data(), N);
  return out;
}

// Up to two rows that the next row's first pass will read from memory. The pass that writes a row's
// output prefetches them, a cache line per 64 bytes, so that they arrive while this row is computed.
// Only rows of 4 KiB or more: the hardware prefetcher stops at a page's end, so it restarts at every
// such row (about 15% of the fp32 forward at 1024 columns); shorter rows share pages and stream well
// without (there the prefetches measured slower).
struct NextRows {
  const char* p[2] = {nullptr, nullptr};
  int64_t esize[2] = {0, 0};
  template <typename A> void at(int64_t i) const {  // at element i of a step of kLanes<A> elements
    for (int k = 0; k < 2; ++k) {
      if (!p[k]) continue;
      const int64_t off = i * esize[k];
      if (off % 64 < kLanes<A> * esize[k]) __builtin_prefetch(p[k] + off);
    }
  }
};

// ------------------------------------------------------------------------ forward
// The promoted dtype of x and residual (torch's rule for float types), the dtype of h.
template <typename X, typename R> using promoted_t = std::conditional_t<
    std::is_same_v<X, R>, X,
    std::conditional_t<std::is_same_v<X, double> || std::is_same_v<R, double>, double, float>>;

// One pass over the source row(s): h = x (+ residual, rounded to h's dtype and stored, as eager's
// x + residual), kept in buf (unless h is x itself, already in A), and the sums of d = h - shift and
// d^2, shift being the mean of the row's first lanes (0 for RMSNorm). Returns {sum d, sum d^2, shift}.
template <typename A> using IngestFn = void (*)(const void* x, const void* r, void* h, A* buf, int64_t n,
                                                bool rms, A* out);

template <typename A, typename X, typename R>
void ingest(const void* xp, const void* rp, void* hp, A* buf, int64_t n, bool rms, A* out) {
  using Vec = Vectorized<A>;
  constexpr bool kRes = !std::is_void_v<R>;
  using H = std::conditional_t<kRes, promoted_t<X, std::conditional_t<kRes, R, X>>, X>;
  const X* x = static_cast<const X*>(xp);
  auto value = [&](int64_t i, int64_t c) {
    Vec v = Io<A, X>::load(x + i, c);
    if constexpr (kRes) {
      H* h = static_cast<H*>(hp);
      v += Io<A, R>::load(static_cast<const R*>(rp) + i, c);
      Io<A, H>::store(h + i, v, c);
      if constexpr (!std::is_same_v<A, H>) v = Io<A, H>::load(h + i, c);
    }
    return v;
  };
  A shift = A(0);
  if (!rms) {  // a shift near the mean keeps the one-pass variance from cancelling
    const int64_t c = std::min(kLanes<A>, n);
    shift = hsum(value(0, c)) / A(c);
  }
  const Vec vs(shift);
  blocked_sums<2, A>(n, [&](int64_t i, int64_t c, Vec* acc) {
    const Vec v = value(i, c);
    if (buf) v.store(buf + i, c);
    Vec d = v - vs;
    if (c < kLanes<A>) d = Vec::set(Vec(A(0)), d, c);
    acc[0] += d;
    acc[1] = at::vec::fmadd(d, d, acc[1]);
  }, out);
  out[2] = shift;
}

template <typename A> IngestFn<A> ingest_fn(at::ScalarType x, std::optional<at::ScalarType> r) {
  return with_float_type(x, [&](auto xt) -> IngestFn<A> {
    using X = decltype(xt);
    if (!r.has_value()) {
      if constexpr (std::is_same_v<acc_t<X>, A>) return &ingest<A, X, void>;
      TORCH_CHECK(false, "fusedstab: layer_norm: internal dtype mismatch");
    }
    return with_float_type(*r, [&](auto rt) -> IngestFn<A> {
      using X = std::decay_t<decltype(xt)>;  // not the enclosing alias: g++ 12 resolves that wrongly here
      using R = std::decay_t<decltype(rt)>;
      if constexpr (std::is_same_v<acc_t<promoted_t<X, R>>, A>) return &ingest<A, X, R>;
      TORCH_CHECK(false, "fusedstab: layer_norm: internal dtype mismatch");
    });
  });
}

// mean and rstd from ingest's sums. The one-pass variance loses precision only when the shift is far
// from the mean (mean(d)^2 > var / 2: rare, the shift being the mean of 8 or 4 of the row's values);
// then the deviations from the mean are summed again over the row (in cache): corrected two-pass.
template <typename A> void row_stats(const A* h, int64_t n, bool rms, A eps, const A* sums, A& mean, A& rstd) {
  using Vec = Vectorized<A>;
  const A dm = sums[0] / A(n), sq = sums[1] / A(n);
  if (rms) {
    mean = A(0);
    rstd = A(1) / std::sqrt(sq + eps);
    return;
  }
  mean = sums[2] + dm;
  A var = sq - dm * dm;
  if (dm * dm > A(0.5) * sq) {
    const Vec vm(mean);
    A r[2];
    blocked_sums<2, A>(n, [&](int64_t i, int64_t c, Vec* acc) {
      Vec d = Vec::loadu(h + i, c) - vm;
      if (c < kLanes<A>) d = Vec::set(Vec(A(0)), d, c);
      acc[0] += d;
      acc[1] = at::vec::fmadd(d, d, acc[1]);
    }, r);
    const A dm2 = r[0] / A(n);
    mean += dm2;
    var = r[1] / A(n) - dm2 * dm2;
  }
  rstd = A(1) / std::sqrt(std::max(var, A(0)) + eps);  // NaN stays NaN
}

template <typename A> using NormOutFn = void (*)(const A* h, const A* w, const A* b, A mean, A rstd, void* y,
                                                 int64_t n, const NextRows& next);

// y = (h - mean) * rstd * w + b, rounded once to Y.
template <typename A, typename Y> void norm_out(const A* h, const A* w, const A* b, A mean, A rstd, void* out,
                                                int64_t n, const NextRows& next) {
  using Vec = Vectorized<A>;
  auto y = static_cast<Y*>(out);
  const Vec vm(mean), vr(rstd);
  for_steps<A>(n, [&](int64_t i, int64_t c) {
    next.at<A>(i);
    Vec v = (Vec::loadu(h + i, c) - vm) * vr;
    Io<A, Y>::store(y + i, at::vec::fmadd(v, Vec::loadu(w + i, c), Vec::loadu(b + i, c)), c);
  });
}

template <typename A>
void fwd_impl(const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
              const std::optional<at::Tensor>& residual, double eps, bool rms, const at::Tensor& y,
              const at::Tensor& h, const at::Tensor& mean, const at::Tensor& rstd) {
  const int64_t M = x.size(0), N = x.size(1);
  A* mean_p = rms ? nullptr : mean.data_ptr<A>();
  A* rstd_p = rstd.data_ptr<A>();
  if (N == 0) {  // no statistics (as torch: mean 0, rstd NaN); y is empty
    if (mean_p) std::fill(mean_p, mean_p + M, A(0));
    std::fill(rstd_p, rstd_p + M, std::numeric_limits<A>::quiet_NaN());
    return;
  }
  const std::vector<A> w = param_row<A>(weight, N, A(1)), b = param_row<A>(bias, N, A(0));
  const bool has_r = residual.has_value();
  // x is read in place when it is already the normalized row in A.
  const bool direct = !has_r && x.scalar_type() == c10::CppTypeToScalarType<A>::value;
  const IngestFn<A> in = ingest_fn<A>(x.scalar_type(), has_r ? std::optional(residual->scalar_type()) : std::nullopt);
  const NormOutFn<A> out = with_float_type(y.scalar_type(), [](auto tag) -> NormOutFn<A> {
    return &norm_out<A, decltype(tag)>;
  });

  const auto xb = static_cast<const char*>(x.const_data_ptr());
  const int64_t xs = x.stride(0) * x.element_size();
  const auto rb = has_r ? static_cast<const char*>(residual->const_data_ptr()) : nullptr;
  const int64_t rs = has_r ? residual->stride(0) * residual->element_size() : 0;
  const auto yb = static_cast<char*>(y.data_ptr());
  const int64_t ys = N * y.element_size();
  const auto hb = has_r ? static_cast<char*>(h.data_ptr()) : nullptr;
  const int64_t hs = has_r ? N * h.element_size() : 0;
  const A eps_a = static_cast<A>(eps);

  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / N), [&](int64_t begin, int64_t end) {
    std::vector<A> buf(direct ? 0 : N);
    for (int64_t r = begin; r < end; ++r) {
      A sums[3], mu, rsd;
      in(xb + r * xs, rb ? rb + r * rs : nullptr, hb ? hb + r * hs : nullptr, direct ? nullptr : buf.data(), N,
         rms, sums);
      const A* row = direct ? reinterpret_cast<const A*>(xb + r * xs) : buf.data();
      row_stats<A>(row, N, rms, eps_a, sums, mu, rsd);
      if (mean_p) mean_p[r] = mu;
      rstd_p[r] = rsd;
      NextRows ahead;
      if (r + 1 < end && N * x.element_size() >= 4096) {
        ahead.p[0] = xb + (r + 1) * xs, ahead.esize[0] = x.element_size();
        if (rb) ahead.p[1] = rb + (r + 1) * rs, ahead.esize[1] = residual->element_size();
      }
      out(row, w.data(), b.data(), mu, rsd, yb + r * ys, N, ahead);
    }
  });
}

void layer_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, double eps,
                    bool rms, at::Tensor& y, at::Tensor& h, at::Tensor& mean, at::Tensor& rstd) {
  check_float(x, kFwd, "x");
  TORCH_CHECK(x.dim() == 2, kFwd, ": x must be 2-D (rows, features), got shape ", x.sizes());
  const int64_t M = x.size(0), N = x.size(1);
  check_rows(x, M, N, kFwd, "x");
  at::ScalarType hd = x.scalar_type();
  if (residual.has_value()) {
    check_rows(*residual, M, N, kFwd, "residual");
    hd = c10::promoteTypes(hd, residual->scalar_type());
  }
  for (auto* p : {&weight, &bias}) {
    if (!p->has_value()) continue;
    const char* name = p == &weight ? "weight" : "bias";
    check_float(**p, kFwd, name);
    TORCH_CHECK((*p)->dim() == 1 && (*p)->size(0) == N, kFwd, ": ", name, " must have shape [", N, "], got ",
                (*p)->sizes());
    TORCH_CHECK((*p)->is_contiguous(), kFwd, ": ", name, " must be contiguous");
  }
  const at::ScalarType acc = acc_of(hd);
  check_dense(y, {M, N}, x.scalar_type(), kFwd, "y");
  if (residual.has_value()) {
    check_dense(h, {M, N}, hd, kFwd, "h");
  } else {
    TORCH_CHECK(h.numel() == 0, kFwd, ": h must be empty without a residual, got shape ", h.sizes());
  }
  if (rms) {
    TORCH_CHECK(mean.numel() == 0, kFwd, ": mean must be empty for RMSNorm, got shape ", mean.sizes());
  } else {
    check_dense(mean, {M}, acc, kFwd, "mean");
  }
  check_dense(rstd, {M}, acc, kFwd, "rstd");
  if (M == 0) return;
  if (acc == at::kDouble)
    fwd_impl<double>(x, weight, bias, residual, eps, rms, y, h, mean, rstd);
  else
    fwd_impl<float>(x, weight, bias, residual, eps, rms, y, h, mean, rstd);
}

// ------------------------------------------------------------------------ backward
template <typename A> using DxFn = void (*)(const A* h, const A* dy, const A* w, const A* dh, A mean, A rstd,
                                            A c1, A c2, void* dx, int64_t n);

// dx = (w*dy - xhat * c1 - c2) * rstd (+ dh), c1 = mean(xhat * w*dy), c2 = mean(w*dy) (0 for RMSNorm).
template <typename A, typename T> void dx_row(const A* h, const A* dy, const A* w, const A* dh, A mean, A rstd,
                                              A c1, A c2, void* out, int64_t n) {
  using Vec = Vectorized<A>;
  auto dx = static_cast<T*>(out);
  const Vec vm(mean), vr(rstd), v1(c1), v2(c2);
  for_steps<A>(n, [&](int64_t i, int64_t c) {
    Vec xh = (Vec::loadu(h + i, c) - vm) * vr;
    Vec wg = Vec::loadu(dy + i, c) * Vec::loadu(w + i, c);
    Vec d = (wg - xh * v1 - v2) * vr;
    if (dh) d += Vec::loadu(dh + i, c);
    Io<A, T>::store(dx + i, d, c);
  });
}

template <typename A>
void bwd_impl(const at::Tensor& dy, const at::Tensor& h, const std::optional<at::Tensor>& weight,
              const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& dh, bool rms,
              const at::Tensor& dx, const at::Tensor& dweight, const at::Tensor& dbias) {
  using Vec = Vectorized<A>;
  const int64_t M = h.size(0), N = h.size(1);
  const bool need_dw = weight.has_value(), need_db = dbias.numel() > 0, has_dh = dh.has_value();
  constexpr auto kA = c10::CppTypeToScalarType<A>::value;
  const std::vector<A> w = param_row<A>(weight, N, A(1));
  // Rows already in A are read in place.
  const LoadFn<A> load_dy = dy.scalar_type() == kA ? nullptr : load_fn<A>(dy.scalar_type());
  const LoadFn<A> load_h = h.scalar_type() == kA ? nullptr : load_fn<A>(h.scalar_type());
  const LoadFn<A> load_dh = !has_dh || dh->scalar_type() == kA ? nullptr : load_fn<A>(dh->scalar_type());
  const DxFn<A> store_dx = with_float_type(dx.scalar_type(), [](auto tag) -> DxFn<A> {
    return &dx_row<A, decltype(tag)>;
  });
  const A* mean_p = rms ? nullptr : mean.const_data_ptr<A>();
  const A* rstd_p = rstd.const_data_ptr<A>();

  auto row_ptr = [](const at::Tensor& t, int64_t r) {
    return static_cast<const char*>(t.const_data_ptr()) + r * t.stride(0) * t.element_size();
  };
  const auto dxb = static_cast<char*>(dx.data_ptr());
  const int64_t dxs = N * dx.element_size();

  const int64_t P = std::min<int64_t>(M, at::get_num_threads());
  const int64_t nparts = int64_t(need_dw) + int64_t(need_db);
  std::vector<A> parts(P * N * nparts, A(0));

  at::parallel_for(0, P, 1, [&](int64_t pb, int64_t pe) {
    std::vector<A> buf(N * (int64_t(load_dy != nullptr) + int64_t(load_h != nullptr) + int64_t(load_dh != nullptr)));
    for (int64_t p = pb; p < pe; ++p) {
      A* pw = need_dw ? parts.data() + p * N * nparts : nullptr;
      A* pbias = need_db ? parts.data() + (p * nparts + nparts - 1) * N : nullptr;
      for (int64_t r = p * M / P; r < (p + 1) * M / P; ++r) {
        A* next = buf.data();
        auto bring = [&](LoadFn<A> load, const char* src) -> const A* {
          if (!load) return reinterpret_cast<const A*>(src);
          load(src, next, N);
          next += N;
          return next - N;
        };
        const A* g = bring(load_dy, row_ptr(dy, r));
        const A* hr = bring(load_h, row_ptr(h, r));
        const A* dhr = has_dh ? bring(load_dh, row_ptr(*dh, r)) : nullptr;
        const A mu = rms ? A(0) : mean_p[r], rs = rstd_p[r];
        const Vec vm(mu), vr(rs);
        A s[2];
        blocked_sums<2, A>(N, [&](int64_t i, int64_t c, Vec* acc) {
          Vec xh = (Vec::loadu(hr + i, c) - vm) * vr;
          if (c < kLanes<A>) xh = Vec::set(Vec(A(0)), xh, c);
          Vec gi = Vec::loadu(g + i, c);
          Vec wg = gi * Vec::loadu(w.data() + i, c);
          acc[0] = at::vec::fmadd(xh, wg, acc[0]);
          acc[1] += wg;
          if (pw) at::vec::fmadd(gi, xh, Vec::loadu(pw + i, c)).store(pw + i, c);
          if (pbias) (Vec::loadu(pbias + i, c) + gi).store(pbias + i, c);
        }, s);
        store_dx(hr, g, w.data(), dhr, mu, rs, s[0] / A(N), rms ? A(0) : s[1] / A(N), dxb + r * dxs, N);
      }
    }
  });

  // Partial rows summed in block order, then rounded once to the parameter's dtype.
  for (int64_t k = 0; k < nparts; ++k) {
    A* tot = parts.data() + k * N;
    for (int64_t p = 1; p < P; ++p) {
      const A* src = parts.data() + (p * nparts + k) * N;
      for_steps<A>(N, [&](int64_t i, int64_t c) {
        (Vec::loadu(tot + i, c) + Vec::loadu(src + i, c)).store(tot + i, c);
      });
    }
    const at::Tensor& out = (need_dw && k == 0) ? dweight : dbias;
    with_float_type(out.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      auto o = out.data_ptr<T>();
      for_steps<A>(N, [&](int64_t i, int64_t c) { Io<A, T>::store(o + i, Vec::loadu(tot + i, c), c); });
    });
  }
}

void layer_norm_bwd(const at::Tensor& dy, const at::Tensor& h, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
                    const std::optional<at::Tensor>& dh, bool rms, at::Tensor& dx, at::Tensor& dweight,
                    at::Tensor& dbias) {
  check_float(h, kBwd, "h");
  TORCH_CHECK(h.dim() == 2, kBwd, ": h must be 2-D (rows, features), got shape ", h.sizes());
  const int64_t M = h.size(0), N = h.size(1);
  check_rows(h, M, N, kBwd, "h");
  check_rows(dy, M, N, kBwd, "dy");
  if (dh.has_value()) check_rows(*dh, M, N, kBwd, "dh");
  const at::ScalarType acc = acc_of(h.scalar_type());
  if (rms) {
    TORCH_CHECK(mean.numel() == 0, kBwd, ": mean must be empty for RMSNorm, got shape ", mean.sizes());
  } else {
    check_dense(mean, {M}, acc, kBwd, "mean");
  }
  check_dense(rstd, {M}, acc, kBwd, "rstd");
  check_dense(dx, {M, N}, h.scalar_type(), kBwd, "dx");
  for (auto* p : {&weight, &bias}) {
    const bool is_w = p == &weight;
    const char* name = is_w ? "weight" : "bias";
    const at::Tensor& grad = is_w ? dweight : dbias;
    if (p->has_value()) {
      check_float(**p, kBwd, name);
      TORCH_CHECK((*p)->dim() == 1 && (*p)->size(0) == N, kBwd, ": ", name, " must have shape [", N, "], got ",
                  (*p)->sizes());
      TORCH_CHECK(!is_w || (*p)->is_contiguous(), kBwd, ": weight must be contiguous");
      check_dense(grad, {N}, (*p)->scalar_type(), kBwd, is_w ? "dweight" : "dbias");
    } else {
      TORCH_CHECK(grad.numel() == 0, kBwd, ": ", is_w ? "dweight" : "dbias", " must be empty without ", name,
                  ", got shape ", grad.sizes());
    }
  }
  if (M == 0 || N == 0) {  // nothing to normalize: zero gradients
    if (dweight.numel()) dweight.zero_();
    if (dbias.numel()) dbias.zero_();
    return;
  }
  if (acc == at::kDouble)
    bwd_impl<double>(dy, h, weight, mean, rstd, dh, rms, dx, dweight, dbias);
  else
    bwd_impl<float>(dy, h, weight, mean, rstd, dh, rms, dx, dweight, dbias);
}

}  // namespace
}  // namespace fusedstab::cpu

TORCH_LIBRARY_IMPL(fusedstab_C, CPU, m) {
  m.impl("layer_norm_fwd", &fusedstab::cpu::layer_norm_fwd);
  m.impl("layer_norm_bwd", &fusedstab::cpu::layer_norm_bwd);
}
