// LayerNorm / RMSNorm (+ fused residual add) kernels, forward and backward.
//
// A row belongs to a group of `tpr` threads (a power of two: a few lanes of a warp for short rows,
// a warp, or a whole block of up to 512 threads for long ones); each thread holds NG groups of 8
// consecutive columns in registers (columns 8 * (tx + j * tpr) + k), read with 16-byte loads where
// rows are aligned. Rows longer than 512 threads x NG x 8 take the two-pass "long" kernels, a block
// per row, whose second pass re-reads the row (from L2 where it still is).
// Statistics: two passes over the registers (mean, then centred squares); the long kernel combines
// per-thread (count, mean, M2) by Chan's formula (numerics.h). Backward: dx per row; dweight / dbias
// accumulated per thread over the rows a (persistent) block takes, the block's row groups combined in
// a fixed order into its row of a (blocks, N) partial buffer, then summed by reduce.cuh's sum_rows:
// deterministic, no atomics.
#pragma once

#include "cuda/kernels/common.cuh"

namespace fusedstab {
namespace cuda {
namespace ln {

template <typename A> __device__ __forceinline__ A rsqrt_(A v) { return A(1) / sqrt(v); }  // fp64: IEEE
template <> __device__ __forceinline__ float rsqrt_<float>(float v) { return rsqrtf(v); }  // as Triton's tl.rsqrt

// Load 8 columns of x (+ residual, rounded to TH and stored to h when h is given) as acc.
template <typename A, typename TX, typename TH>
__device__ __forceinline__ void load_h(A* v, const TX* x, const TH* res, TH* h, int64_t c0, int64_t N, bool vec) {
  load8(v, x, c0, N, vec);
  if (res != nullptr) {
    A r[kGroup];
    load8(r, res, c0, N, vec);
#pragma unroll
    for (int k = 0; k < kGroup; ++k) v[k] = to_acc<A>(from_acc<TH>(v[k] + r[k]));  // normalize the h we store
    if (h != nullptr) store8(h, v, c0, N, vec);
  }
}

// Weight or bias: x's dtype TX, or fp32 (p32) with fp16 / bf16 x: a run-time choice (uniform over
// the grid) rather than a template parameter, which would double the kernels to compile.
template <typename A, typename TX>
__device__ __forceinline__ void load_param(A* v, const void* p, bool p32, int64_t c0, int64_t N, bool vec, A absent) {
  if (p != nullptr && p32) {
    load8(v, static_cast<const float*>(p), c0, N, vec);
  } else if (p != nullptr) {
    load8(v, static_cast<const TX*>(p), c0, N, vec);
  } else {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) v[k] = absent;
  }
}

// ---------------------------------------------------------------------------- forward, cached rows
template <typename TX, typename TH, int NG>
__global__ void __launch_bounds__(512)
fwd_rows_kernel(const TX* __restrict__ x, const TH* __restrict__ res, const void* __restrict__ w, const void* __restrict__ b,
                TX* __restrict__ y, TH* __restrict__ h, acc_t<TH>* __restrict__ mean_out, acc_t<TH>* __restrict__ rstd_out,
                int64_t M, int64_t N, int64_t sx, int64_t sr, acc_t<TH> eps, bool rms, bool w32, bool vec, int tpr) {
  using A = acc_t<TH>;
  __shared__ A smem[32];
  const int tx = threadIdx.x % tpr;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / tpr) + threadIdx.x / tpr;
  const bool live = row < M;  // every thread takes part in the reductions, live or not
  A v[NG][kGroup];
  A sum = A(0);
#pragma unroll
  for (int j = 0; j < NG; ++j) {
    const int64_t c0 = int64_t(tx + j * tpr) * kGroup;
    if (live && c0 < N) {
      load_h(v[j], x + row * sx, res == nullptr ? nullptr : res + row * sr, h == nullptr ? nullptr : h + row * N, c0, N,
             vec);
    } else {
#pragma unroll
      for (int k = 0; k < kGroup; ++k) v[j][k] = A(0);
    }
#pragma unroll
    for (int k = 0; k < kGroup; ++k) sum += v[j][k];  // columns past N loaded 0
  }
  const A mean = rms ? A(0) : group_reduce(sum, Sum{}, tpr, smem) / A(N);
  A sq = A(0);
#pragma unroll
  for (int j = 0; j < NG; ++j) {
    const int64_t c0 = int64_t(tx + j * tpr) * kGroup;
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const A d = c0 + k < N ? v[j][k] - mean : A(0);
      sq += d * d;
    }
  }
  const A rstd = rsqrt_(group_reduce(sq, Sum{}, tpr, smem) / A(N) + eps);
  if (!live) return;  // no reduction follows
  if (tx == 0) {
    rstd_out[row] = rstd;
    if (!rms) mean_out[row] = mean;
  }
#pragma unroll
  for (int j = 0; j < NG; ++j) {
    const int64_t c0 = int64_t(tx + j * tpr) * kGroup;
    if (c0 >= N) continue;
    A wv[kGroup], bv[kGroup];
    load_param<A, TX>(wv, w, w32, c0, N, vec, A(1));
    load_param<A, TX>(bv, b, w32, c0, N, vec, A(0));
#pragma unroll
    for (int k = 0; k < kGroup; ++k) v[j][k] = (v[j][k] - mean) * rstd * wv[k] + bv[k];
    store8(y + row * N, v[j], c0, N, vec);
  }
}

// (count, mean, M2) of a block, combined in a fixed order (shuffle-down tree per warp, then warps in
// order by thread 0); every thread gets the block's.
template <typename A> __device__ Moments<A> block_moments(Moments<A> m, A* sn, A* smean, A* sm2) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    Moments<A> other;
    other.n = __shfl_down_sync(0xffffffffu, m.n, o);
    other.mean = __shfl_down_sync(0xffffffffu, m.mean, o);
    other.m2 = __shfl_down_sync(0xffffffffu, m.m2, o);
    if ((threadIdx.x % kWarp) + o < kWarp) m.combine(other);
  }
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) sn[warp] = m.n, smean[warp] = m.mean, sm2[warp] = m.m2;
  __syncthreads();
  if (threadIdx.x == 0) {
    Moments<A> r;
    for (int i = 0; i < int(blockDim.x / kWarp); ++i) {
      Moments<A> o;
      o.n = sn[i], o.mean = smean[i], o.m2 = sm2[i];
      r.combine(o);
    }
    sn[0] = r.n, smean[0] = r.mean, sm2[0] = r.m2;
  }
  __syncthreads();
  Moments<A> r;
  r.n = sn[0], r.mean = smean[0], r.m2 = sm2[0];
  return r;
}

// ---------------------------------------------------------------------------- forward, long rows
template <typename TX, typename TH>
__global__ void __launch_bounds__(512)
fwd_long_kernel(const TX* __restrict__ x, const TH* __restrict__ res, const void* __restrict__ w, const void* __restrict__ b,
                TX* __restrict__ y, TH* __restrict__ h, acc_t<TH>* __restrict__ mean_out, acc_t<TH>* __restrict__ rstd_out,
                int64_t M, int64_t N, int64_t sx, int64_t sr, acc_t<TH> eps, bool rms, bool w32, bool vec) {
  using A = acc_t<TH>;
  __shared__ A sn[32], smean[32], sm2[32];
  const int64_t row = blockIdx.x;
  const TX* xr = x + row * sx;
  const TH* rr = res == nullptr ? nullptr : res + row * sr;
  TH* hr = h == nullptr ? nullptr : h + row * N;
  // Pass 1: statistics (and h stored). Each 8-column group's own mean and M2, then Chan's combine.
  Moments<A> m;
  A sq = A(0);
  for (int64_t c0 = int64_t(threadIdx.x) * kGroup; c0 < N; c0 += int64_t(blockDim.x) * kGroup) {
    A v[kGroup];
    load_h(v, xr, rr, hr, c0, N, vec);
    const int cnt = int(min(int64_t(kGroup), N - c0));
    if (rms) {
#pragma unroll
      for (int k = 0; k < kGroup; ++k) sq += v[k] * v[k];  // past N: 0
    } else {
      A s = A(0);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) s += v[k];
      Moments<A> g;
      g.n = A(cnt), g.mean = s / A(cnt);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        const A d = k < cnt ? v[k] - g.mean : A(0);
        g.m2 += d * d;
      }
      m.combine(g);
    }
  }
  A mean = A(0), var;
  if (rms) {
    var = group_reduce(sq, Sum{}, int(blockDim.x), sn) / A(N);
  } else {
    const Moments<A> r = block_moments(m, sn, smean, sm2);
    mean = r.mean, var = r.var();
  }
  const A rstd = rsqrt_(var + eps);
  if (threadIdx.x == 0) {
    rstd_out[row] = rstd;
    if (!rms) mean_out[row] = mean;
  }
  // Pass 2: normalize, re-reading h (stored by this thread in pass 1: its own columns) or x.
  for (int64_t c0 = int64_t(threadIdx.x) * kGroup; c0 < N; c0 += int64_t(blockDim.x) * kGroup) {
    A v[kGroup], wv[kGroup], bv[kGroup];
    if (hr != nullptr) load8(v, static_cast<const TH*>(hr), c0, N, vec);
    else load_h(v, xr, rr, static_cast<TH*>(nullptr), c0, N, vec);
    load_param<A, TX>(wv, w, w32, c0, N, vec, A(1));
    load_param<A, TX>(bv, b, w32, c0, N, vec, A(0));
#pragma unroll
    for (int k = 0; k < kGroup; ++k) v[k] = (v[k] - mean) * rstd * wv[k] + bv[k];
    store8(y + row * N, v, c0, N, vec);
  }
}

// ---------------------------------------------------------------------------- backward, cached rows
// Persistent: block b takes row chunks b, b + gridDim.x, ... of blockDim.x / tpr rows. part_w /
// part_b: (gridDim.x, N) partials (null when not needed).
template <typename TX, typename TH, int NG>
__global__ void __launch_bounds__(512)
bwd_rows_kernel(const TX* __restrict__ dy, const TH* __restrict__ hin, const void* __restrict__ w,
                const acc_t<TH>* __restrict__ mean_in, const acc_t<TH>* __restrict__ rstd_in, const TH* __restrict__ dh,
                TH* __restrict__ dx, acc_t<TH>* __restrict__ part_w, acc_t<TH>* __restrict__ part_b, int64_t M, int64_t N,
                int64_t sdy, int64_t sh, int64_t sdh, bool rms, bool w32, bool vec, int tpr) {
  using A = acc_t<TH>;
  __shared__ A smem[32];
  const int tx = threadIdx.x % tpr, ty = threadIdx.x / tpr, rpb = blockDim.x / tpr;
  A dw[NG][kGroup], db[NG][kGroup];
#pragma unroll
  for (int j = 0; j < NG; ++j)
#pragma unroll
    for (int k = 0; k < kGroup; ++k) dw[j][k] = A(0), db[j][k] = A(0);
  for (int64_t r0 = int64_t(blockIdx.x) * rpb; r0 < M; r0 += int64_t(gridDim.x) * rpb) {  // uniform over the block
    const int64_t row = r0 + ty;
    const bool live = row < M;
    const A rstd = live ? rstd_in[row] : A(0);
    const A mean = live && !rms ? mean_in[row] : A(0);
    A xh[NG][kGroup], g[NG][kGroup];  // xhat, dy
    A s1 = A(0), s2 = A(0);
#pragma unroll
    for (int j = 0; j < NG; ++j) {
      const int64_t c0 = int64_t(tx + j * tpr) * kGroup;
      A wv[kGroup];
      if (live && c0 < N) {
        load8(xh[j], hin + row * sh, c0, N, vec);
        load8(g[j], dy + row * sdy, c0, N, vec);
        load_param<A, TX>(wv, w, w32, c0, N, vec, A(1));
      } else {
#pragma unroll
        for (int k = 0; k < kGroup; ++k) xh[j][k] = g[j][k] = wv[k] = A(0);
      }
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        xh[j][k] = c0 + k < N ? (xh[j][k] - mean) * rstd : A(0);
        const A wdy = g[j][k] * wv[k];
        s1 += xh[j][k] * wdy;
        s2 += wdy;
      }
    }
    const A c1 = group_reduce(s1, Sum{}, tpr, smem) / A(N);
    const A c2 = rms ? A(0) : group_reduce(s2, Sum{}, tpr, smem) / A(N);
#pragma unroll
    for (int j = 0; j < NG; ++j) {
      const int64_t c0 = int64_t(tx + j * tpr) * kGroup;
      if (!live || c0 >= N) continue;
      A wv[kGroup], d[kGroup];
      load_param<A, TX>(wv, w, w32, c0, N, vec, A(1));
      if (dh != nullptr) load8(d, dh + row * sdh, c0, N, vec);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        const A v = (g[j][k] * wv[k] - (xh[j][k] * c1 + c2)) * rstd;
        d[k] = dh != nullptr ? v + d[k] : v;
        dw[j][k] += g[j][k] * xh[j][k];
        db[j][k] += g[j][k];
      }
      store8(dx + row * N, d, c0, N, vec);
    }
  }
  if (part_w == nullptr && part_b == nullptr) return;
  // The block's row groups, combined in order: column by column through shared memory.
  __shared__ A cw[512], cb[512];
#pragma unroll
  for (int j = 0; j < NG; ++j) {
    const int64_t c0 = int64_t(tx + j * tpr) * kGroup;
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      A sw = dw[j][k], sb = db[j][k];
      if (rpb > 1) {
        __syncthreads();
        cw[threadIdx.x] = sw, cb[threadIdx.x] = sb;
        __syncthreads();
        for (int i = 1; i < rpb; ++i) sw += cw[i * tpr + tx], sb += cb[i * tpr + tx];
      }
      if (ty == 0 && c0 + k < N) {
        if (part_w != nullptr) part_w[int64_t(blockIdx.x) * N + c0 + k] = sw;
        if (part_b != nullptr) part_b[int64_t(blockIdx.x) * N + c0 + k] = sb;
      }
    }
  }
}

// ---------------------------------------------------------------------------- backward, long rows
// Persistent, a block per row; the block's partial row is written at its first row and updated after.
template <typename TX, typename TH>
__global__ void __launch_bounds__(512)
bwd_long_kernel(const TX* __restrict__ dy, const TH* __restrict__ hin, const void* __restrict__ w,
                const acc_t<TH>* __restrict__ mean_in, const acc_t<TH>* __restrict__ rstd_in, const TH* __restrict__ dh,
                TH* __restrict__ dx, acc_t<TH>* __restrict__ part_w, acc_t<TH>* __restrict__ part_b, int64_t M, int64_t N,
                int64_t sdy, int64_t sh, int64_t sdh, bool rms, bool w32, bool vec) {
  using A = acc_t<TH>;
  __shared__ A smem[32];
  const int block = blockDim.x;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const bool first = row == blockIdx.x;
    const A rstd = rstd_in[row], mean = rms ? A(0) : mean_in[row];
    const TX* dyr = dy + row * sdy;
    const TH* hr = hin + row * sh;
    A s1 = A(0), s2 = A(0);
    for (int64_t c0 = int64_t(threadIdx.x) * kGroup; c0 < N; c0 += int64_t(block) * kGroup) {
      A xv[kGroup], g[kGroup], wv[kGroup];
      load8(xv, hr, c0, N, vec);
      load8(g, dyr, c0, N, vec);
      load_param<A, TX>(wv, w, w32, c0, N, vec, A(1));
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        const A xhat = c0 + k < N ? (xv[k] - mean) * rstd : A(0);
        s1 += xhat * g[k] * wv[k];
        s2 += g[k] * wv[k];
      }
    }
    const A c1 = group_reduce(s1, Sum{}, block, smem) / A(N);
    const A c2 = rms ? A(0) : group_reduce(s2, Sum{}, block, smem) / A(N);
    for (int64_t c0 = int64_t(threadIdx.x) * kGroup; c0 < N; c0 += int64_t(block) * kGroup) {
      A xv[kGroup], g[kGroup], wv[kGroup], d[kGroup];
      load8(xv, hr, c0, N, vec);
      load8(g, dyr, c0, N, vec);
      load_param<A, TX>(wv, w, w32, c0, N, vec, A(1));
      if (dh != nullptr) load8(d, dh + row * sdh, c0, N, vec);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        const A xhat = (xv[k] - mean) * rstd;
        const A v = (g[k] * wv[k] - (xhat * c1 + c2)) * rstd;
        d[k] = dh != nullptr ? v + d[k] : v;
        if (c0 + k < N) {
          const int64_t p = int64_t(blockIdx.x) * N + c0 + k;  // this block's own partial row
          if (part_w != nullptr) part_w[p] = first ? g[k] * xhat : part_w[p] + g[k] * xhat;
          if (part_b != nullptr) part_b[p] = first ? g[k] : part_b[p] + g[k];
        }
      }
      store8(dx + row * N, d, c0, N, vec);
    }
  }
}

}  // namespace ln
}  // namespace cuda
}  // namespace fusedstab
