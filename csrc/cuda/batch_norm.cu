// BatchNorm launchers: the plans of csrc/cuda/channel_norm_plan.h, the dtype dispatch (torch-free).
// Statistics: per (split, channel) partials (NCHW: a channel's slab of N rows; channels-last: all
// N * S rows), one finalize into (count, mean, M2). Backward reduce: per (split, channel) sums,
// then fixed-order column sums. The elementwise steps: one pass each.
#include <type_traits>

#include "cuda/batch_norm.h"
#include "cuda/kernels/channel_norm.cuh"
#include "cuda/kernels/reduce.cuh"

namespace fusedstab {
namespace cuda {
namespace {

using namespace cn;

bool al(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

bool bad(const BatchNormGeometry& g) { return g.N <= 0 || g.C <= 0 || g.S <= 0; }

template <typename T> cudaError_t stats(const BatchNormStats& a, cudaStream_t s) {
  using A = acc_t<T>;
  const BatchNormGeometry& g = a.g;
  const int sms = sm_count();
  if (a.workspace == nullptr || a.workspace_bytes < bn_stats_workspace(g.N, g.C, g.S, g.channels_last, sms))
    return cudaErrorInvalidValue;
  const T* x = static_cast<const T*>(a.x);
  double* rec = static_cast<double*>(a.workspace);
  const Plan p = bn_plan(g.N, g.C, g.S, g.channels_last, sms);
  if (g.channels_last)
    cols_moments_kernel<T><<<unsigned(grid_of(p)), kThreads, 0, s>>>(x, g.N * g.S, g.C, p, g.C % kUnit == 0 && al(x), rec);
  else
    slab_moments_kernel<T><<<unsigned(grid_of(p)), kThreads, 0, s>>>(x, g.N, g.C, g.S, p, g.S % kUnit == 0 && al(x), rec);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  A* out = static_cast<A*>(a.stats);
  moments_finalize_kernel<A><<<unsigned(cdiv(g.C, kThreads / kWarp)), kThreads, 0, s>>>(
      rec, 1, g.C, p.J, 1, g.C, 0.0, true, out, out + g.C, out + 2 * g.C);
  return cudaGetLastError();
}

template <typename T> ElemArgs<T> elem_args(const BatchNormArgs& a, bool bwd) {
  const BatchNormGeometry& g = a.g;
  const bool vec = (g.channels_last ? g.C : g.S) % kUnit == 0 && al(a.x) && al(a.out) && (!bwd || al(a.dy));
  return {static_cast<const T*>(a.x), static_cast<const T*>(a.dy), static_cast<T*>(a.out), a.weight, a.bias,
          static_cast<const acc_t<T>*>(a.mean), static_cast<const acc_t<T>*>(a.rstd),
          static_cast<const acc_t<T>*>(a.coef), g.N, g.C, g.S, g.C, 0, a.w32, a.b32, vec, a.act, a.slope};
}

template <typename T, bool BWD> cudaError_t elemt(const BatchNormArgs& a, cudaStream_t s) {
  const BatchNormGeometry& g = a.g;
  const ElemArgs<T> e = elem_args<T>(a, BWD);
  const Plan p = elem_plan(g.N, g.C, g.S, g.channels_last, false, sm_count());
  if (g.channels_last) cols_elem_kernel<T, BWD><<<unsigned(grid_of(p)), kThreads, 0, s>>>(e, g.N * g.S, p);
  else rows_elem_kernel<T, BWD><<<unsigned(grid_of(p)), kThreads, 0, s>>>(e, p);
  return cudaGetLastError();
}

template <typename T> cudaError_t bwd_reduce(const BatchNormArgs& a, cudaStream_t s) {
  using A = acc_t<T>;
  const BatchNormGeometry& g = a.g;
  const int sms = sm_count();
  if (a.workspace == nullptr ||
      a.workspace_bytes < bn_bwd_workspace(g.N, g.C, g.S, g.channels_last, sizeof(A), sms))
    return cudaErrorInvalidValue;
  const Plan p = bn_plan(g.N, g.C, g.S, g.channels_last, sms);
  const bool vec = (g.channels_last ? g.C : g.S) % kUnit == 0 && al(a.x) && al(a.dy);
  const BwdArgs<T> b{static_cast<const T*>(a.dy), static_cast<const T*>(a.x), a.weight, a.bias,
                     static_cast<const A*>(a.mean), static_cast<const A*>(a.rstd), g.N, g.C, g.S, g.C, 0,
                     a.w32, a.b32, vec, a.act, a.slope};
  A* part = static_cast<A*>(a.workspace);  // (2, J, C): dz, dz * xhat
  if (g.channels_last) cols_bwd_sums_kernel<T><<<unsigned(grid_of(p)), kThreads, 0, s>>>(b, 1, g.N * g.S, p, part);
  else slab_bwd_sums_kernel<T><<<unsigned(grid_of(p)), kThreads, 0, s>>>(b, p, part);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  A* out = static_cast<A*>(a.out);
  if ((err = sum_rows(part, p.J, g.C, out, s)) != cudaSuccess) return err;
  return sum_rows(part + p.J * g.C, p.J, g.C, out + g.C, s);
}

template <typename F> cudaError_t dispatch(DType d, F&& f) {
  return dispatch_dtype(d, [&](auto t) { return f(t); });
}

}  // namespace

int64_t batch_norm_stats_workspace(const BatchNormGeometry& g) {
  return cn::bn_stats_workspace(g.N, g.C, g.S, g.channels_last, sm_count());
}

int64_t batch_norm_bwd_reduce_workspace(const BatchNormGeometry& g) {
  return cn::bn_bwd_workspace(g.N, g.C, g.S, g.channels_last, g.x_dtype == DType::F64 ? 8 : 4, sm_count());
}

cudaError_t batch_norm_stats(const BatchNormStats& a, cudaStream_t stream) {
  if (bad(a.g)) return cudaErrorInvalidValue;
  return dispatch(a.g.x_dtype, [&](auto t) { return stats<std::decay_t<decltype(t)>>(a, stream); });
}

cudaError_t batch_norm_elemt(const BatchNormArgs& a, cudaStream_t stream) {
  if (bad(a.g)) return cudaErrorInvalidValue;
  return dispatch(a.g.x_dtype, [&](auto t) { return elemt<std::decay_t<decltype(t)>, false>(a, stream); });
}

cudaError_t batch_norm_bwd_reduce(const BatchNormArgs& a, cudaStream_t stream) {
  if (bad(a.g)) return cudaErrorInvalidValue;
  return dispatch(a.g.x_dtype, [&](auto t) { return bwd_reduce<std::decay_t<decltype(t)>>(a, stream); });
}

cudaError_t batch_norm_bwd_elemt(const BatchNormArgs& a, cudaStream_t stream) {
  if (bad(a.g)) return cudaErrorInvalidValue;
  return dispatch(a.g.x_dtype, [&](auto t) { return elemt<std::decay_t<decltype(t)>, true>(a, stream); });
}

}  // namespace cuda
}  // namespace fusedstab
