// bias + Leaky ReLU launchers: grid shapes and the dtype dispatch (torch-free; nvcc only).
#include <algorithm>
#include <type_traits>

#include "cuda/bias_leaky_relu.h"
#include "cuda/kernels/bias_leaky_relu.cuh"
#include "cuda/kernels/reduce.cuh"
#include "cuda/launch_config.h"

namespace fusedstab {
namespace cuda {
namespace {

using Grid = cfg::BlrGrid;
Grid grid_for(int64_t R, int64_t L, int per_sm) { return cfg::blr_grid(R, L, per_sm, sm_count()); }

constexpr int kFwdPerSm = 8, kBwdPerSm = 4;

template <typename T> bool aligned(const void* p) { return aligned16(static_cast<const T*>(p)); }

template <typename TX, typename TY> cudaError_t fwd(const BiasLeakyReluFwd& a, cudaStream_t stream) {
  const Grid g = grid_for(a.R, a.L, kFwdPerSm);
  const bool vec = a.L % kGroup == 0 && aligned<TX>(a.x) && aligned<TY>(a.y);
  blr::fwd_kernel<TX, TY><<<dim3(unsigned(g.tiles), unsigned(g.slices)), blr::kThreads, 0, stream>>>(
      static_cast<const TX*>(a.x), static_cast<const TY*>(a.bias), static_cast<TY*>(a.y), a.mask, a.R, a.L,
      a.C, acc_t<TY>(a.slope), a.per_row, vec, g.bx);
  return cudaGetLastError();
}

template <typename TD, typename TX> cudaError_t bwd(const BiasLeakyReluBwd& a, cudaStream_t stream) {
  using A = acc_t<TD>;
  const Grid g = grid_for(a.R, a.L, kBwdPerSm);
  const bool vec = a.L % kGroup == 0 && aligned<TD>(a.dy) && (a.dx == nullptr || aligned<TX>(a.dx)) &&
                   (a.use_mask || aligned<TD>(a.saved));
  A* part = a.dbias != nullptr ? static_cast<A*>(a.partial) : nullptr;
  blr::bwd_kernel<TD, TX><<<dim3(unsigned(g.tiles), unsigned(g.slices)), blr::kThreads, 0, stream>>>(
      static_cast<const TD*>(a.dy), a.saved, static_cast<TX*>(a.dx), part, a.R, a.L, A(a.slope), a.per_row,
      a.use_mask, vec, g.bx);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || part == nullptr) return err;
  // per row: part is (tiles, R) = (tiles * R / C, C); per column: (slices, L) with L == C
  const int64_t G = a.per_row ? g.tiles * (a.R / a.C) : g.slices;
  return sum_rows(part, G, a.C, static_cast<A*>(a.dbias), stream);
}

// The (x or dx, y or dy) dtype pairs the kernels take: equal, or the second one wider.
template <template <typename, typename> class F, typename Args>
cudaError_t dispatch_pair(DType narrow, DType wide, const Args& a, cudaStream_t stream) {
  return dispatch_dtype(wide, [&](auto w) -> cudaError_t {
    using TW = std::decay_t<decltype(w)>;
    if (narrow == wide) return F<TW, TW>::run(a, stream);
    return dispatch_dtype(narrow, [&](auto n) -> cudaError_t {
      using TN = std::decay_t<decltype(n)>;
      if constexpr (sizeof(TN) < sizeof(TW)) return F<TN, TW>::run(a, stream);
      else return cudaErrorInvalidValue;  // f16 with bf16: the glue widens to f32 first
    });
  });
}

template <typename TX, typename TY> struct Fwd {
  static cudaError_t run(const BiasLeakyReluFwd& a, cudaStream_t s) { return fwd<TX, TY>(a, s); }
};
template <typename TX, typename TD> struct Bwd {
  static cudaError_t run(const BiasLeakyReluBwd& a, cudaStream_t s) { return bwd<TD, TX>(a, s); }
};

}  // namespace

cudaError_t bias_leaky_relu_fwd(const BiasLeakyReluFwd& a, cudaStream_t stream) {
  return dispatch_pair<Fwd>(a.x_dtype, a.y_dtype, a, stream);
}

int64_t bias_leaky_relu_bwd_partials(int64_t R, int64_t L, bool per_row, bool need_dbias) {
  if (!need_dbias) return 0;
  const Grid g = grid_for(R, L, kBwdPerSm);
  return per_row ? g.tiles * R : g.slices * L;
}

cudaError_t bias_leaky_relu_bwd(const BiasLeakyReluBwd& a, cudaStream_t stream) {
  return dispatch_pair<Bwd>(a.dx_dtype, a.dy_dtype, a, stream);
}

}  // namespace cuda
}  // namespace fusedstab
