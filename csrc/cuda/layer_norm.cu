// LayerNorm / RMSNorm launchers: the row configuration (threads per row, registers per thread, the
// long-row kernels), persistent backward grids sized by occupancy, the dtype dispatch (torch-free).
#include <algorithm>
#include <type_traits>

#include "cuda/kernels/layer_norm.cuh"
#include "cuda/kernels/reduce.cuh"
#include "cuda/launch_config.h"
#include "cuda/layer_norm.h"

namespace fusedstab {
namespace cuda {
namespace {

// Groups of 8 columns a thread holds (blocks of up to 512 threads: 128 registers a thread): 4 forward
// (32 values: rows up to 16K elements), 2 backward (x and dy cached, dweight and dbias accumulated: 64
// values; rows up to 8K); half as many for fp64. Longer rows take the long kernels.
using cfg::kMaxTpr;
using cfg::row_config;
using cfg::RowCfg;
template <typename A> constexpr int fwd_max_groups() { return sizeof(A) == 8 ? 2 : 4; }
template <typename A> constexpr int bwd_max_groups() { return sizeof(A) == 8 ? 1 : 2; }

bool al(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Blocks of a persistent kernel: as many as are resident at once, no more than there is work.
template <typename K> int64_t persistent_blocks(K kernel, int threads, int64_t work) {
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0) != cudaSuccess || per_sm < 1) {
    (void)cudaGetLastError();
    per_sm = 1;
  }
  return std::max<int64_t>(1, std::min<int64_t>(work, int64_t(per_sm) * sm_count()));
}

template <typename TX, typename TH> struct Fwd {
  static auto rows(int groups) {
    if constexpr (fwd_max_groups<acc_t<TH>>() == 2) return groups == 1 ? ln::fwd_rows_kernel<TX, TH, 1> : ln::fwd_rows_kernel<TX, TH, 2>;
    else return groups == 1 ? ln::fwd_rows_kernel<TX, TH, 1> : groups == 2 ? ln::fwd_rows_kernel<TX, TH, 2> : ln::fwd_rows_kernel<TX, TH, 4>;
  }
  static cudaError_t run(const LayerNormFwd& a, cudaStream_t s) {
    using A = acc_t<TH>;
    const RowCfg c = row_config(a.N, fwd_max_groups<A>(), kMaxTpr, 128);
    const bool w32 = a.w_dtype == DType::F32;
    const bool vec = a.N % kGroup == 0 && a.stride_x % kGroup == 0 && (a.residual == nullptr || a.stride_r % kGroup == 0) &&
                     al(a.x) && al(a.residual) && al(a.weight) && al(a.bias) && al(a.y) && al(a.h);
    const TX* x = static_cast<const TX*>(a.x);
    const TH* r = static_cast<const TH*>(a.residual);
    TX* y = static_cast<TX*>(a.y);
    TH* h = static_cast<TH*>(a.h);
    A* mean = static_cast<A*>(a.mean);
    A* rstd = static_cast<A*>(a.rstd);
    if (c.long_rows) {
      ln::fwd_long_kernel<TX, TH><<<unsigned(a.M), c.threads, 0, s>>>(x, r, a.weight, a.bias, y, h, mean, rstd, a.M, a.N,
                                                                        a.stride_x, a.stride_r, A(a.eps), a.rms, w32, vec);
    } else {
      auto kernel = rows(c.groups);
      kernel<<<unsigned(ceil_div(a.M, c.threads / c.tpr)), c.threads, 0, s>>>(
          x, r, a.weight, a.bias, y, h, mean, rstd, a.M, a.N, a.stride_x, a.stride_r, A(a.eps), a.rms, w32, vec, c.tpr);
    }
    return cudaGetLastError();
  }
};

template <typename TX, typename TH> struct BwdKernels {
  using A = acc_t<TH>;
  static RowCfg config(int64_t N) { return row_config(N, bwd_max_groups<A>(), kMaxTpr, 512); }
  static auto rows(int groups) {
    if constexpr (bwd_max_groups<A>() == 1) return ln::bwd_rows_kernel<TX, TH, 1>;
    else return groups == 1 ? ln::bwd_rows_kernel<TX, TH, 1> : ln::bwd_rows_kernel<TX, TH, 2>;
  }
  // Blocks of the persistent grid (= rows of the partial buffer): the occupancy of the kernel that runs.
  static int64_t blocks(int64_t M, int64_t N) {
    const RowCfg c = config(N);
    return c.long_rows ? persistent_blocks(ln::bwd_long_kernel<TX, TH>, c.threads, M)
                       : persistent_blocks(rows(c.groups), c.threads, ceil_div(M, c.threads / c.tpr));
  }
};

template <typename TX, typename TH> struct Bwd {
  static cudaError_t run(const LayerNormBwd& a, cudaStream_t s) {
    using K = BwdKernels<TX, TH>;
    using A = acc_t<TH>;
    const RowCfg c = K::config(a.N);
    const int64_t G = K::blocks(a.M, a.N);
    const int64_t need = G * a.N * (int64_t(a.dweight != nullptr) + int64_t(a.dbias != nullptr));
    if (need > a.partial_elems) return cudaErrorInvalidValue;  // sized by layer_norm_bwd_partials
    const bool w32 = a.w_dtype == DType::F32;
    const bool vec = a.N % kGroup == 0 && a.stride_dy % kGroup == 0 && a.stride_h % kGroup == 0 &&
                     (a.dh == nullptr || a.stride_dh % kGroup == 0) && al(a.dy) && al(a.h) && al(a.weight) && al(a.dh) &&
                     al(a.dx);
    A* part_w = a.dweight != nullptr ? static_cast<A*>(a.partial) : nullptr;
    A* part_b = a.dbias != nullptr ? static_cast<A*>(a.partial) + (part_w != nullptr ? G * a.N : 0) : nullptr;
    const TX* dy = static_cast<const TX*>(a.dy);
    const TH* h = static_cast<const TH*>(a.h);
    const A* mean = static_cast<const A*>(a.mean);
    const A* rstd = static_cast<const A*>(a.rstd);
    const TH* dh = static_cast<const TH*>(a.dh);
    TH* dx = static_cast<TH*>(a.dx);
    if (c.long_rows)
      ln::bwd_long_kernel<TX, TH><<<unsigned(G), c.threads, 0, s>>>(dy, h, a.weight, mean, rstd, dh, dx, part_w, part_b,
                                                                    a.M, a.N, a.stride_dy, a.stride_h, a.stride_dh, a.rms,
                                                                    w32, vec);
    else
      K::rows(c.groups)<<<unsigned(G), c.threads, 0, s>>>(dy, h, a.weight, mean, rstd, dh, dx, part_w, part_b, a.M, a.N,
                                                          a.stride_dy, a.stride_h, a.stride_dh, a.rms, w32, vec, c.tpr);
    cudaError_t err = cudaGetLastError();
    auto sum = [&](A* part, void* out) -> cudaError_t {  // into the parameter's dtype
      if (err != cudaSuccess || part == nullptr) return err;
      return w32 ? sum_rows(part, G, a.N, static_cast<float*>(out), s) : sum_rows(part, G, a.N, static_cast<TX*>(out), s);
    };
    err = sum(part_w, a.dweight);
    return sum(part_b, a.dbias);
  }
};

// Calls F<TX, TH>::run for the dtypes of layer_norm_dtypes_ok (h: x's dtype, or fp32 for fp16/bf16 x).
template <template <typename, typename> class F, typename Args>
cudaError_t dispatch2(DType x, DType h, DType w, const Args& a, cudaStream_t s) {
  if (!layer_norm_dtypes_ok(x, h, w)) return cudaErrorInvalidValue;
  return dispatch_dtype(x, [&](auto xt) -> cudaError_t {
    using TX = std::decay_t<decltype(xt)>;
    if constexpr (sizeof(TX) == 2) {
      if (h == DType::F32) return F<TX, float>::run(a, s);
    }
    return F<TX, TX>::run(a, s);
  });
}

struct BlocksQuery {
  int64_t M, N;
  int64_t* blocks;
};
template <typename TX, typename TH> struct Blocks {
  static cudaError_t run(const BlocksQuery& q, cudaStream_t) {
    *q.blocks = BwdKernels<TX, TH>::blocks(q.M, q.N);
    return cudaSuccess;
  }
};

}  // namespace

cudaError_t layer_norm_fwd(const LayerNormFwd& a, cudaStream_t stream) {
  return dispatch2<Fwd>(a.x_dtype, a.h_dtype, a.w_dtype, a, stream);
}

int64_t layer_norm_bwd_partials(int64_t M, int64_t N, DType x_dtype, DType h_dtype, DType w_dtype, bool need_dw,
                                bool need_db) {
  if (!need_dw && !need_db) return 0;
  int64_t G = 0;  // the grid of the very kernel that will run
  if (dispatch2<Blocks>(x_dtype, h_dtype, w_dtype, BlocksQuery{M, N, &G}, nullptr) != cudaSuccess) return 0;
  return G * N * (int64_t(need_dw) + int64_t(need_db));
}

cudaError_t layer_norm_bwd(const LayerNormBwd& a, cudaStream_t stream) {
  return dispatch2<Bwd>(a.x_dtype, a.h_dtype, a.w_dtype, a, stream);
}

}  // namespace cuda
}  // namespace fusedstab
