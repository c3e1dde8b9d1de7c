// BatchNorm (+ fused activation) CPU kernels, the four steps SyncBatchNorm reduces between:
// fusedstab_C::batch_norm_stats / batch_norm_elemt / batch_norm_bwd_reduce / batch_norm_bwd_elemt.
//
// x is (N, C, S), dense NCHW or channels-inner (see channel_norm.h); channel c's set is all N*S of its
// elements.
// - Reductions (stats, bwd_reduce), NCHW: channel c's elements, numbered n * S + s, are cut into chunks
//   of kChunk (pieces of its runs); all (channel, chunk) pairs run in parallel, so few channels or a
//   small batch still use every thread. Channels-inner: blocks of rows, reduced per channel. The chunks
//   are combined per channel in chunk order, in double.
// - Elementwise steps (elemt, bwd_elemt): the flat tensor in tasks of kGrain elements.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "channel_norm.h"

namespace fusedstab {
namespace cpu {
namespace {

constexpr const char* kStats = "batch_norm_stats";
constexpr const char* kElemt = "batch_norm_elemt";
constexpr const char* kReduce = "batch_norm_bwd_reduce";
constexpr const char* kBwdElemt = "batch_norm_bwd_elemt";

// (C,) statistics in acc: mean, rstd, coef rows.
template <typename A> const A* channel_stat(const at::Tensor& t, int64_t C, const char* op, const char* name) {
  check_buffer(t, {C}, c10::CppTypeToScalarType<A>::value, op, name);
  return t.const_data_ptr<A>();
}

// Channel c's pieces of the chunk [k * kChunk, ..) of its N*S elements: f(offset, len).
template <class F> void nchw_chunk(const Shape& sh, int64_t c, int64_t k, const F& f) {
  const int64_t a = k * kChunk, b = std::min(a + kChunk, sh.N * sh.S);
  for_runs(a, b, sh.S, [&](int64_t n, int64_t s0, int64_t len) { f((n * sh.C + c) * sh.S + s0, len); });
}

template <typename T> void stats_kernel(const at::Tensor& x, const Shape& sh, const at::Tensor& out_t) {
  using A = acc_t<T>;
  const int64_t C = sh.C, R = sh.N * sh.S;  // R: elements per channel
  const T* X = x.const_data_ptr<T>();
  A* out = out_t.mutable_data_ptr<A>();
  std::vector<Mom> part;
  int64_t nk;
  if (!sh.cl) {
    nk = cdiv(R, kChunk);
    part.resize(C * nk);
    at::parallel_for(0, C * nk, grain_for(std::min(kChunk, R)), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        part[i] = chunk_moments<T>([&](const auto& f) {
          nchw_chunk(sh, i / nk, i % nk, [&](int64_t o, int64_t len) { f(X + o, len); });
        });
    });
  } else {
    const int64_t RB = rows_per_chunk(C);
    nk = cdiv(R, RB);
    part.resize(nk * C);
    std::vector<double> mean(nk * C), m2(nk * C);
    at::parallel_for(0, nk, grain_for(RB * C), [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k)
        column_moments(X + k * RB * C, std::min(RB, R - k * RB), C, &mean[k * C], &m2[k * C]);
    });
    for (int64_t k = 0; k < nk; ++k)
      for (int64_t c = 0; c < C; ++c)  // stored channel-major, as the NCHW partials
        part[c * nk + k] = Mom{double(std::min(RB, R - k * RB)), mean[k * C + c], m2[k * C + c]};
  }
  for (int64_t c = 0; c < C; ++c) {
    const Mom m = combine_sets(nk, [&](int64_t k) { return part[c * nk + k]; });
    out[c] = A(m.n);
    out[C + c] = A(m.mean);
    out[2 * C + c] = A(m.m2);
  }
}

void batch_norm_stats(const at::Tensor& x, const at::Tensor& stats) {
  const Shape sh = check_input(x, kStats);
  check_buffer(stats, {3, sh.C}, acc_dtype(x.scalar_type()), kStats, "stats");
  if (x.numel() == 0) {  // count 0, mean 0, M2 0
    stats.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kStats,
                                  [&] { stats_kernel<scalar_t>(x, sh, stats); });
}

// Per-channel parameters of the elementwise steps (see BwdParams in channel_norm.h).
template <typename A>
std::vector<BwdParams<A>> channel_params(int64_t C, const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias, const at::Tensor& mean_t,
                                         const at::Tensor& rstd_t, const char* op) {
  const std::vector<A> w = channel_values<A>(weight, C, A(1), op, "weight"),
                       b = channel_values<A>(bias, C, A(0), op, "bias");
  const A* mean = channel_stat<A>(mean_t, C, op, "mean");
  const A* rstd = channel_stat<A>(rstd_t, C, op, "rstd");
  std::vector<BwdParams<A>> P(C);
  for (int64_t c = 0; c < C; ++c) P[c] = BwdParams<A>{mean[c], rstd[c], rstd[c] * w[c], b[c], 1, 0, 0, 1};
  return P;
}

// The elementwise loop shared by elemt and bwd_elemt: run(offset, len, channel) over NCHW pieces, or
// rows(first row, rows) channels-inner.
template <class Run, class Rows> void elementwise(const Shape& sh, const Run& run, const Rows& rows) {
  const int64_t C = sh.C, S = sh.S;
  if (!sh.cl) {
    at::parallel_for(0, sh.N * C * S, kGrain, [&](int64_t b, int64_t e) {
      for_runs(b, e, S, [&](int64_t r, int64_t s0, int64_t len) { run(r * S + s0, len, r % C); });
    });
  } else {
    at::parallel_for(0, sh.N * S, grain_for(C), [&](int64_t b, int64_t e) { rows(b, e - b); });
  }
}

template <typename T>
void elemt_kernel(const at::Tensor& x, const Shape& sh, const std::vector<BwdParams<acc_t<T>>>& P, int act,
                  double slope_d, const at::Tensor& y) {
  using A = acc_t<T>;
  const int64_t C = sh.C;
  const T* X = x.const_data_ptr<T>();
  T* Y = y.mutable_data_ptr<T>();
  const A slope = A(slope_d);
  std::vector<A> pm(C), pa(C), pb(C);
  for (int64_t c = 0; c < C; ++c) {
    pm[c] = P[c].m;
    pa[c] = P[c].a;
    pb[c] = P[c].b;
  }
  with_act(act, [&](auto A_) {
    constexpr int ACT = decltype(A_)::value;
    elementwise(
        sh, [&](int64_t o, int64_t len, int64_t c) { apply_run<ACT>(X + o, Y + o, len, pm[c], pa[c], pb[c], slope); },
        [&](int64_t r0, int64_t rows) {
          apply_rows<ACT>(X + r0 * C, Y + r0 * C, rows, C, pm.data(), pa.data(), pb.data(), slope);
        });
  });
}

void batch_norm_elemt(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
                      c10::string_view activation, double slope, const at::Tensor& y) {
  const Shape sh = check_input(x, kElemt);
  const int act = parse_activation(activation);
  check_like(y, x, kElemt, "y");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kElemt, [&] {
    auto P = channel_params<acc_t<scalar_t>>(sh.C, weight, bias, mean, rstd, kElemt);
    if (x.numel()) elemt_kernel<scalar_t>(x, sh, P, act, slope, y);
  });
}

template <typename T>
void reduce_kernel(const at::Tensor& dy, const at::Tensor& x, const Shape& sh,
                   const std::vector<BwdParams<acc_t<T>>>& P, int act, double slope_d, const at::Tensor& out_t) {
  using A = acc_t<T>;
  const int64_t C = sh.C, R = sh.N * sh.S;
  const T* DY = dy.const_data_ptr<T>();
  const T* X = x.const_data_ptr<T>();
  A* out = out_t.mutable_data_ptr<A>();
  const A slope = A(slope_d);
  std::vector<double> part;  // (chunk, 2) per channel, channel-major
  int64_t nk;
  with_act(act, [&](auto A_) {
    constexpr int ACT = decltype(A_)::value;
    if (!sh.cl) {
      nk = cdiv(R, kChunk);
      part.resize(C * nk * 2);
      at::parallel_for(0, C * nk, grain_for(std::min(kChunk, R)), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t c = i / nk;
          double sd = 0, sx = 0;
          nchw_chunk(sh, c, i % nk, [&](int64_t o, int64_t len) {
            auto s = sums_run<ACT>(DY + o, X + o, len, P[c], slope);
            sd += s.first;
            sx += s.second;
          });
          part[2 * i] = sd;
          part[2 * i + 1] = sx;
        }
      });
    } else {
      const int64_t RB = rows_per_chunk(C);
      nk = cdiv(R, RB);
      std::vector<double> rows(nk * 2 * C);
      at::parallel_for(0, nk, grain_for(RB * C), [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k)
          sums_rows<ACT>(DY + k * RB * C, X + k * RB * C, std::min(RB, R - k * RB), C, P.data(), slope,
                         &rows[k * 2 * C], &rows[k * 2 * C + C]);
      });
      part.resize(C * nk * 2);
      for (int64_t k = 0; k < nk; ++k)
        for (int64_t c = 0; c < C; ++c) {
          part[2 * (c * nk + k)] = rows[k * 2 * C + c];
          part[2 * (c * nk + k) + 1] = rows[k * 2 * C + C + c];
        }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double sd = 0, sx = 0;
    for (int64_t k = 0; k < nk; ++k) {
      sd += part[2 * (c * nk + k)];
      sx += part[2 * (c * nk + k) + 1];
    }
    out[c] = A(sd);
    out[C + c] = A(sx);
  }
}

void batch_norm_bwd_reduce(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
                           c10::string_view activation, double slope, const at::Tensor& sums) {
  const Shape sh = check_input(x, kReduce);
  const int act = parse_activation(activation);
  check_like(dy, x, kReduce, "dy");
  check_buffer(sums, {2, sh.C}, acc_dtype(x.scalar_type()), kReduce, "sums");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kReduce, [&] {
    auto P = channel_params<acc_t<scalar_t>>(sh.C, weight, bias, mean, rstd, kReduce);
    if (x.numel()) reduce_kernel<scalar_t>(dy, x, sh, P, act, slope, sums);
    else sums.zero_();
  });
}

template <typename T>
void bwd_elemt_kernel(const at::Tensor& dy, const at::Tensor& x, const Shape& sh, const ParamRows<acc_t<T>>& P,
                      bool train, int act, double slope_d, const at::Tensor& dx) {
  using A = acc_t<T>;
  const int64_t C = sh.C;
  const T* DY = dy.const_data_ptr<T>();
  const T* X = x.const_data_ptr<T>();
  T* DX = dx.mutable_data_ptr<T>();
  const A slope = A(slope_d);
  auto run = [&](auto A_, auto S_) {
    constexpr int ACT = decltype(A_)::value;
    constexpr bool STATS = decltype(S_)::value;
    elementwise(
        sh,
        [&](int64_t o, int64_t len, int64_t c) {
          const BwdParams<A> p{P.m[c], 0, P.a[c], P.b[c], P.p[c], P.q[c], P.u[c], P.k[c]};
          dx_run<ACT, STATS>(DY + o, X + o, DX + o, len, p, slope);
        },
        [&](int64_t r0, int64_t rows) {
          dx_rows<ACT, STATS>(DY + r0 * C, X + r0 * C, DX + r0 * C, rows, C, P, 0, slope);
        });
  };
  with_act(act, [&](auto A_) {
    if (train) run(A_, std::true_type());
    else run(A_, std::false_type());
  });
}

void batch_norm_bwd_elemt(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
                          const std::optional<at::Tensor>& coef, c10::string_view activation, double slope,
                          const at::Tensor& dx) {
  const Shape sh = check_input(x, kBwdElemt);
  const int act = parse_activation(activation);
  check_like(dy, x, kBwdElemt, "dy");
  check_like(dx, x, kBwdElemt, "dx");
  const auto acc = acc_dtype(x.scalar_type());
  const bool train = coef.has_value() && coef->defined();
  if (train) check_buffer(*coef, {2, sh.C}, acc, kBwdElemt, "coef");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kBwdElemt, [&] {
    using A = acc_t<scalar_t>;
    const int64_t C = sh.C;
    auto P = channel_params<A>(C, weight, bias, mean, rstd, kBwdElemt);
    // dx = w * rstd * (dz - coef0 - xhat * coef1): p = 1, q = coef0, u = rstd * coef1, k = w * rstd
    const A* cf = train ? coef->const_data_ptr<A>() : nullptr;
    ParamRows<A> rows(C);
    for (int64_t c = 0; c < C; ++c) {
      P[c].q = train ? cf[c] : A(0);
      P[c].u = train ? P[c].r * cf[C + c] : A(0);
      P[c].k = P[c].a;
      rows.set(c, P[c]);
    }
    if (x.numel()) bwd_elemt_kernel<scalar_t>(dy, x, sh, rows, train, act, slope, dx);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedstab_C, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats);
  m.impl("batch_norm_elemt", &batch_norm_elemt);
  m.impl("batch_norm_bwd_reduce", &batch_norm_bwd_reduce);
  m.impl("batch_norm_bwd_elemt", &batch_norm_bwd_elemt);
}

}  // namespace cpu
}  // namespace fusedstab
