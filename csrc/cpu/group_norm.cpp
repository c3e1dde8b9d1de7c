// GroupNorm (+ fused activation) CPU kernels: fusedstab_C::group_norm_fwd / group_norm_bwd.
//
// x is (N, C, S), dense NCHW or channels-inner (see channel_norm.h). Group g of sample n is channels
// [g*D, (g+1)*D), D = C / G, over all S.
// - NCHW: a group is one contiguous region of D*S elements, and the unit of work; the forward's
//   statistics come from chunks of kChunk elements of it, the backward's per-channel sums from chunks of
//   at most kChunk elements of each run.
// - channels-inner: a sample (S rows of C) is the unit; chunks are blocks of rows, reduced per channel
//   and then per group.
// With enough units that fit in L2, each thread takes whole units, so a unit is read from memory once
// and its second pass hits the cache (by_units); backward then also keeps the unit's dz for the dx pass.
// Backward: dz = dy * act'(z), z = w * xhat + b recomputed from x; per (sample, channel) sum(dz) and
// sum(dz * xhat) give dbias, dweight (summed over samples in order) and the group means of
// gw = w * dz and gw * xhat, then dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "channel_norm.h"

namespace fusedstab {
namespace cpu {
namespace {

constexpr const char* kFwd = "group_norm_fwd";
constexpr const char* kBwd = "group_norm_bwd";

// The calling thread's buffer for the dz of the unit it works on (by_units' cached path): the dx pass
// reads it instead of computing the activation's gradient (an exp for SiLU) a second time.
template <typename A> A* dz_cache(int64_t n) {
  static thread_local std::vector<A> buf;
  if (int64_t(buf.size()) < n) buf.resize(n);
  return buf.data();
}

template <typename T>
void fwd_kernel(const at::Tensor& x, const Shape& sh, int64_t G, double eps, int act, double slope_d,
                const std::vector<acc_t<T>>& w, const std::vector<acc_t<T>>& bias, const at::Tensor& y,
                const at::Tensor& mean_t, const at::Tensor& rstd_t) {
  using A = acc_t<T>;
  const int64_t N = sh.N, C = sh.C, S = sh.S, D = C / G;
  const T* X = x.const_data_ptr<T>();
  T* Y = y.mutable_data_ptr<T>();
  A* mean = mean_t.mutable_data_ptr<A>();
  A* rstd = rstd_t.mutable_data_ptr<A>();
  const A slope = A(slope_d);
  std::vector<A> pm(N * C), pa(N * C);  // per (sample, channel): mean and rstd * w

  // The group's statistics from its chunks' moments in order, and the per-channel parameters.
  auto finish_group = [&](int64_t ng, const Mom* part, int64_t nk) {
    const Mom m = combine_sets(nk, [&](int64_t k) { return part[k]; });
    mean[ng] = A(m.mean);
    rstd[ng] = A(1.0 / std::sqrt(m.var() + eps));
    const int64_t n = ng / G, c0 = (ng % G) * D;
    for (int64_t c = c0; c < c0 + D; ++c) {
      pm[n * C + c] = mean[ng];
      pa[n * C + c] = rstd[ng] * w[c];
    }
  };

  if (!sh.cl) {
    const int64_t L = D * S, nk = cdiv(L, kChunk);
    std::vector<Mom> part(N * G * nk);
    by_units(
        N * G, nk, std::min(kChunk, L), L * int64_t(sizeof(T)),
        [&](int64_t u, int64_t k, bool) {
          const T* p = X + u * L + k * kChunk;
          const int64_t len = std::min(kChunk, L - k * kChunk);
          part[u * nk + k] = chunk_moments<T>([&](const auto& f) { f(p, len); });
        },
        [&](int64_t u) { finish_group(u, &part[u * nk], nk); },
        [&](int64_t u, int64_t k, bool) {
          const int64_t a = u * L + k * kChunk, b = std::min(a + kChunk, (u + 1) * L);
          with_act(act, [&](auto A_) {
            for_runs(a, b, S, [&](int64_t run, int64_t s0, int64_t len) {
              const int64_t c = run % C;
              apply_run<decltype(A_)::value>(X + run * S + s0, Y + run * S + s0, len, pm[run], pa[run], bias[c],
                                             slope);
            });
          });
        });
    return;
  }
  const int64_t RB = rows_per_chunk(C), nk = cdiv(S, RB);
  std::vector<Mom> part(N * nk * G);  // per (sample, chunk, group)
  by_units(
      N, nk, std::min(RB, S) * C, S * C * int64_t(sizeof(T)),
      [&](int64_t n, int64_t k, bool) {
        const int64_t rows = std::min(RB, S - k * RB);
        std::vector<double> cm(C), cm2(C);
        column_moments(X + (n * S + k * RB) * C, rows, C, cm.data(), cm2.data());
        for (int64_t g = 0; g < G; ++g)
          part[(n * nk + k) * G + g] =
              combine_sets(D, [&](int64_t i) { return Mom{double(rows), cm[g * D + i], cm2[g * D + i]}; });
      },
      [&](int64_t n) {
        std::vector<Mom> gp(nk);
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t k = 0; k < nk; ++k) gp[k] = part[(n * nk + k) * G + g];
          finish_group(n * G + g, gp.data(), nk);
        }
      },
      [&](int64_t n, int64_t k, bool) {
        const int64_t r0 = n * S + k * RB, rows = std::min(RB, S - k * RB);
        with_act(act, [&](auto A_) {
          apply_rows<decltype(A_)::value>(X + r0 * C, Y + r0 * C, rows, C, &pm[n * C], &pa[n * C], bias.data(),
                                          slope);
        });
      });
}

void group_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, int64_t G, double eps, c10::string_view activation,
                    double slope, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd) {
  const Shape sh = check_input(x, kFwd);
  const int act = parse_activation(activation);
  TORCH_CHECK(G > 0 && sh.C % G == 0, kFwd, ": num_groups (", G, ") must be positive and divide C (", sh.C, ")");
  const auto acc = acc_dtype(x.scalar_type());
  check_like(y, x, kFwd, "y");
  check_buffer(mean, {sh.N, G}, acc, kFwd, "mean");
  check_buffer(rstd, {sh.N, G}, acc, kFwd, "rstd");
  if (x.numel() == 0) {  // groups of no elements
    mean.zero_();
    rstd.fill_(NAN);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kFwd, [&] {
    using A = acc_t<scalar_t>;
    fwd_kernel<scalar_t>(x, sh, G, eps, act, slope, channel_values<A>(weight, sh.C, A(1), kFwd, "weight"),
                         channel_values<A>(bias, sh.C, A(0), kFwd, "bias"), y, mean, rstd);
  });
}

template <typename T>
void bwd_kernel(const at::Tensor& dy, const at::Tensor& x, const Shape& sh, int64_t G, int act, double slope_d,
                const std::vector<acc_t<T>>& w, const std::vector<acc_t<T>>& bias, const at::Tensor& mean_t,
                const at::Tensor& rstd_t, const at::Tensor& dx, const at::Tensor& dw, const at::Tensor& db) {
  using A = acc_t<T>;
  const int64_t N = sh.N, C = sh.C, S = sh.S, D = C / G;
  const T* DY = dy.const_data_ptr<T>();
  const T* X = x.const_data_ptr<T>();
  T* DX = dx.mutable_data_ptr<T>();
  const A* mean = mean_t.const_data_ptr<A>();
  const A* rstd = rstd_t.const_data_ptr<A>();
  const A slope = A(slope_d);
  std::vector<double> sdz(N * C), sdzx(N * C);  // per (sample, channel)

  auto forward_params = [&](int64_t n, int64_t c) {
    const int64_t ng = n * G + c / D;
    BwdParams<A> P{};
    P.m = mean[ng];
    P.r = rstd[ng];
    P.a = rstd[ng] * w[c];
    P.b = bias[c];
    return P;
  };
  // The group's sums from its channels' (sample n, channels c0.. of group ng), then dx's parameters:
  // dx = rstd * (w * dz - mean(gw) - xhat * mean(gw * xhat)): p = w, q = mean(gw), u = rstd * mean(gw *
  // xhat), k = rstd.
  auto dx_params = [&](int64_t ng, auto&& set) {
    const int64_t n = ng / G, c0 = (ng % G) * D;
    double sg = 0, sgx = 0;
    for (int64_t c = c0; c < c0 + D; ++c) {
      sg += double(w[c]) * sdz[n * C + c];
      sgx += double(w[c]) * sdzx[n * C + c];
    }
    const double r = rstd[ng], cnt = double(D) * double(S);
    for (int64_t c = c0; c < c0 + D; ++c) {
      BwdParams<A> P = forward_params(n, c);
      // a group of one element: dx = 0 exactly (xhat = 0, gw = mean(gw)), not an fma's rounding of it
      P.p = cnt == 1 ? A(0) : w[c];
      P.q = cnt == 1 ? A(0) : A(sg / cnt);
      P.u = A(r * sgx / cnt);
      P.k = rstd[ng];
      set(c, P);
    }
  };

  if (!sh.cl) {
    const int64_t ns = cdiv(S, kChunk), nk = D * ns;  // chunks per group: pieces of each channel's run
    const bool cache = act != kNone;
    std::vector<std::pair<double, double>> part(N * C * ns);
    std::vector<BwdParams<A>> params(N * C);
    auto piece = [&](int64_t u, int64_t k, int64_t& run, int64_t& s0, int64_t& len) {
      run = (u / G) * C + (u % G) * D + k / ns;
      s0 = (k % ns) * kChunk;
      len = std::min(kChunk, S - s0);
    };
    auto cached_dz = [&](int64_t k, int64_t s0, bool cached) {  // this piece's place in the unit's dz
      return cached && cache ? dz_cache<A>(D * S) + (k / ns) * S + s0 : nullptr;
    };
    by_units(
        N * G, nk, std::min(kChunk, S), D * S * int64_t(2 * sizeof(T) + sizeof(A)),  // dy, x, dz
        [&](int64_t u, int64_t k, bool cached) {
          int64_t run, s0, len;
          piece(u, k, run, s0, len);
          const BwdParams<A> P = forward_params(run / C, run % C);
          with_act(act, [&](auto A_) {
            part[run * ns + k % ns] = sums_run<decltype(A_)::value>(DY + run * S + s0, X + run * S + s0, len, P,
                                                                    slope, cached_dz(k, s0, cached));
          });
        },
        [&](int64_t u) {
          const int64_t n = u / G;
          for (int64_t c = (u % G) * D; c < (u % G + 1) * D; ++c) {
            double a = 0, b = 0;
            for (int64_t k = 0; k < ns; ++k) {
              a += part[(n * C + c) * ns + k].first;
              b += part[(n * C + c) * ns + k].second;
            }
            sdz[n * C + c] = a;
            sdzx[n * C + c] = b;
          }
          dx_params(u, [&](int64_t c, const BwdParams<A>& P) { params[n * C + c] = P; });
        },
        [&](int64_t u, int64_t k, bool cached) {
          int64_t run, s0, len;
          piece(u, k, run, s0, len);
          with_act(act, [&](auto A_) {
            dx_run<decltype(A_)::value, true>(DY + run * S + s0, X + run * S + s0, DX + run * S + s0, len,
                                              params[run], slope, cached_dz(k, s0, cached));
          });
        });
  } else {
    const int64_t RB = rows_per_chunk(C), nk = cdiv(S, RB);
    std::vector<double> part(N * nk * 2 * C);  // per (sample, chunk): sum(dz) and sum(dz * xhat) per channel
    std::vector<BwdParams<A>> fparams(N * C);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) fparams[n * C + c] = forward_params(n, c);
    ParamRows<A> params(N * C);
    const bool cache = act != kNone;
    auto cached_dz = [&](int64_t k, bool cached) { return cached && cache ? dz_cache<A>(S * C) + k * RB * C : nullptr; };
    by_units(
        N, nk, std::min(RB, S) * C, S * C * int64_t(2 * sizeof(T) + sizeof(A)),
        [&](int64_t n, int64_t k, bool cached) {
          const int64_t r0 = n * S + k * RB, rows = std::min(RB, S - k * RB);
          double* out = &part[(n * nk + k) * 2 * C];
          with_act(act, [&](auto A_) {
            sums_rows<decltype(A_)::value>(DY + r0 * C, X + r0 * C, rows, C, &fparams[n * C], slope, out, out + C,
                                           cached_dz(k, cached));
          });
        },
        [&](int64_t n) {
          for (int64_t c = 0; c < C; ++c) {
            double a = 0, b = 0;
            for (int64_t k = 0; k < nk; ++k) {
              a += part[(n * nk + k) * 2 * C + c];
              b += part[(n * nk + k) * 2 * C + C + c];
            }
            sdz[n * C + c] = a;
            sdzx[n * C + c] = b;
          }
          for (int64_t g = 0; g < G; ++g)
            dx_params(n * G + g, [&](int64_t c, const BwdParams<A>& P) { params.set(n * C + c, P); });
        },
        [&](int64_t n, int64_t k, bool cached) {
          const int64_t r0 = n * S + k * RB, rows = std::min(RB, S - k * RB);
          with_act(act, [&](auto A_) {
            dx_rows<decltype(A_)::value, true>(DY + r0 * C, X + r0 * C, DX + r0 * C, rows, C, params, n * C, slope,
                                               cached_dz(k, cached));
          });
        });
  }
  // dweight, dbias: the per-sample sums in sample order
  if (dw.numel() || db.numel()) {
    A* DW = dw.numel() ? dw.mutable_data_ptr<A>() : nullptr;
    A* DB = db.numel() ? db.mutable_data_ptr<A>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      double a = 0, b = 0;
      for (int64_t n = 0; n < N; ++n) {
        a += sdzx[n * C + c];
        b += sdz[n * C + c];
      }
      if (DW) DW[c] = A(a);
      if (DB) DB[c] = A(b);
    }
  }
}

void group_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t G,
                    c10::string_view activation, double slope, const at::Tensor& dx, const at::Tensor& dweight,
                    const at::Tensor& dbias) {
  const Shape sh = check_input(x, kBwd);
  const int act = parse_activation(activation);
  TORCH_CHECK(G > 0 && sh.C % G == 0, kBwd, ": num_groups (", G, ") must be positive and divide C (", sh.C, ")");
  const auto acc = acc_dtype(x.scalar_type());
  check_like(dy, x, kBwd, "dy");
  check_like(dx, x, kBwd, "dx");
  check_buffer(mean, {sh.N, G}, acc, kBwd, "mean");
  check_buffer(rstd, {sh.N, G}, acc, kBwd, "rstd");
  // dweight / dbias: (C,) in acc, written; or empty, skipped (weight / bias None)
  for (const auto* t : {&dweight, &dbias}) {
    const char* name = t == &dweight ? "dweight" : "dbias";
    if (t->defined() && t->numel() == 0) continue;
    check_buffer(*t, {sh.C}, acc, kBwd, name);
  }
  if (x.numel() == 0) {
    if (dweight.numel()) dweight.zero_();
    if (dbias.numel()) dbias.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kBwd, [&] {
    using A = acc_t<scalar_t>;
    bwd_kernel<scalar_t>(dy, x, sh, G, act, slope, channel_values<A>(weight, sh.C, A(1), kBwd, "weight"),
                         channel_values<A>(bias, sh.C, A(0), kBwd, "bias"), mean, rstd, dx, dweight, dbias);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedstab_C, CPU, m) {
  m.impl("group_norm_fwd", &group_norm_fwd);
  m.impl("group_norm_bwd", &group_norm_bwd);
}

}  // namespace cpu
}  // namespace fusedstab
