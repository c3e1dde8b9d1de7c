// GroupNorm launchers: the plans of csrc/cuda/channel_norm_plan.h, the dtype dispatch (torch-free).
// Forward: statistics partials (NCHW: rows of a group's values; channels-last: per (sample, split,
// channel)), one finalize into mean / rstd, the normalize + activation pass. Backward: per (sample,
// split, channel) sums of dz and dz * xhat, the group coefficients, dweight / dbias (fixed-order
// column sums), the dx pass.
#include <type_traits>

#include "cuda/group_norm.h"
#include "cuda/kernels/channel_norm.cuh"
#include "cuda/kernels/reduce.cuh"

namespace fusedstab {
namespace cuda {
namespace {

using namespace cn;

bool al(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

int acc_bytes(DType d) { return d == DType::F64 ? 8 : 4; }

template <typename T> cudaError_t fwd(const GroupNormFwd& a, cudaStream_t s) {
  using A = acc_t<T>;
  const int sms = sm_count();
  const int64_t N = a.N, C = a.C, S = a.S, G = a.G, Cg = C / G;
  const bool cl = a.channels_last;
  if (a.workspace == nullptr || a.workspace_bytes < gn_fwd_workspace(N, C, S, G, cl, sms)) return cudaErrorInvalidValue;
  const T* x = static_cast<const T*>(a.x);
  double* rec = static_cast<double*>(a.workspace);
  const Plan p = gn_stats_plan(N, C, S, G, cl, sms);
  if (cl) {
    cols_moments_kernel<T><<<unsigned(grid_of(p)), kThreads, 0, s>>>(x, S, C, p, C % kUnit == 0 && al(x), rec);
  } else {
    const int64_t L = Cg * S;
    rows_moments_kernel<T><<<unsigned(grid_of(p)), kThreads, 0, s>>>(x, N * G, L, p, G, L % kUnit == 0 && al(x), rec);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  A* mean = static_cast<A*>(a.mean);
  A* rstd = static_cast<A*>(a.rstd);
  moments_finalize_kernel<A><<<unsigned(cdiv(N * G, kThreads / kWarp)), kThreads, 0, s>>>(
      rec, N, G, p.J, cl ? Cg : 1, cl ? C : G, a.eps, false, mean, rstd, nullptr);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  T* y = static_cast<T*>(a.y);
  const bool vec = (cl ? C : S) % kUnit == 0 && al(x) && al(y);
  const ElemArgs<T> e{x, nullptr, y, a.weight, a.bias, mean, rstd, nullptr, N, C, S, G, Cg,
                      a.w32, a.b32, vec, a.act, a.slope};
  const Plan pe = elem_plan(N, C, S, cl, true, sms);
  if (cl) cols_elem_kernel<T, false><<<unsigned(grid_of(pe)), kThreads, 0, s>>>(e, S, pe);
  else rows_elem_kernel<T, false><<<unsigned(grid_of(pe)), kThreads, 0, s>>>(e, pe);
  return cudaGetLastError();
}

template <typename T> cudaError_t bwd(const GroupNormBwd& a, cudaStream_t s) {
  using A = acc_t<T>;
  const int sms = sm_count();
  const int64_t N = a.N, C = a.C, S = a.S, G = a.G, Cg = C / G;
  const bool cl = a.channels_last;
  if (a.workspace == nullptr || a.workspace_bytes < gn_bwd_workspace(N, C, S, G, cl, sizeof(A), sms))
    return cudaErrorInvalidValue;
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  T* dx = static_cast<T*>(a.dx);
  const A* mean = static_cast<const A*>(a.mean);
  const A* rstd = static_cast<const A*>(a.rstd);
  const Plan p = gn_bwd_plan(N, C, S, cl, sms);
  A* sums = static_cast<A*>(a.workspace);  // (2, N, J, C): dz, dz * xhat
  A* coef = sums + 2 * N * p.J * C;         // (N * G, 2)
  const bool vec = (cl ? C : S) % kUnit == 0 && al(x) && al(dy) && al(dx);
  const BwdArgs<T> b{dy, x, a.weight, a.bias, mean, rstd, N, C, S, G, Cg, a.w32, a.b32, vec, a.act, a.slope};
  if (cl) cols_bwd_sums_kernel<T><<<unsigned(grid_of(p)), kThreads, 0, s>>>(b, N, S, p, sums);
  else rows_bwd_sums_kernel<T><<<unsigned(grid_of(p)), kThreads, 0, s>>>(b, p, sums);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  gn_coef_kernel<A, T><<<unsigned(cdiv(N * G, kThreads / kWarp)), kThreads, 0, s>>>(sums, N, C, G, p.J, S, a.weight,
                                                                                    a.w32, coef);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (a.dweight != nullptr && (err = sum_rows(sums + N * p.J * C, N * p.J, C, static_cast<A*>(a.dweight), s)) != cudaSuccess)
    return err;
  if (a.dbias != nullptr && (err = sum_rows(sums, N * p.J, C, static_cast<A*>(a.dbias), s)) != cudaSuccess) return err;
  const ElemArgs<T> e{x, dy, dx, a.weight, a.bias, mean, rstd, coef, N, C, S, G, Cg, a.w32, a.b32, vec, a.act, a.slope};
  const Plan pe = elem_plan(N, C, S, cl, true, sms);
  if (cl) cols_elem_kernel<T, true><<<unsigned(grid_of(pe)), kThreads, 0, s>>>(e, S, pe);
  else rows_elem_kernel<T, true><<<unsigned(grid_of(pe)), kThreads, 0, s>>>(e, pe);
  return cudaGetLastError();
}

}  // namespace

int64_t group_norm_fwd_workspace(int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last) {
  return cn::gn_fwd_workspace(N, C, S, G, channels_last, sm_count());
}

int64_t group_norm_bwd_workspace(int64_t N, int64_t C, int64_t S, int64_t G, bool channels_last, DType x_dtype) {
  return cn::gn_bwd_workspace(N, C, S, G, channels_last, acc_bytes(x_dtype), sm_count());
}

cudaError_t group_norm_fwd(const GroupNormFwd& a, cudaStream_t stream) {
  if (a.N <= 0 || a.C <= 0 || a.S <= 0 || a.G <= 0 || a.C % a.G != 0) return cudaErrorInvalidValue;
  return dispatch_dtype(a.x_dtype, [&](auto t) { return fwd<std::decay_t<decltype(t)>>(a, stream); });
}

cudaError_t group_norm_bwd(const GroupNormBwd& a, cudaStream_t stream) {
  if (a.N <= 0 || a.C <= 0 || a.S <= 0 || a.G <= 0 || a.C % a.G != 0) return cudaErrorInvalidValue;
  return dispatch_dtype(a.x_dtype, [&](auto t) { return bwd<std::decay_t<decltype(t)>>(a, stream); });
}

}  // namespace cuda
}  // namespace fusedstab
