// GroupNorm and BatchNorm kernels (forward, backward, fused activation) over x (N, C, S), NCHW or
// channels-last; the work items, tiles and splits are csrc/cuda/channel_norm_plan.h's.
//
// Statistics: each thread keeps (count, mean, M2) of its values centred by a pivot (the mean of its
// first 8 values: fp32 means of data offset far from 0 are off by an ulp of the offset, which Chan's
// update would multiply into M2), 8 values at a time (their own mean and M2 in registers, then
// Chan's combine; channels-last: Welford's update per row). The threads' moments are combined in
// float64 (pivot + mean is exact there) in a fixed order, written as one float64 (count, mean, M2)
// record per (output, split), and a finalize kernel (a warp per output) combines the records in a
// fixed order. Backward: per (output, split) sums of dz and dz * xhat (dz = dy * act'(z), z = w * xhat
// + b recomputed from x), reduced in a fixed order; GroupNorm's group coefficients and dweight /
// dbias come from per-(sample, channel) sums. No atomics anywhere: bitwise deterministic.
//
// Records (float64 (count, mean, M2) triplets, or accumulation-type sums, one array per quantity):
// - moments: record (n * J + j) * W + o for output o of sample n (GroupNorm NCHW: o = group, W = G;
//   channels-last and BatchNorm: o = channel, W = C; BatchNorm has one "sample");
// - backward sums: (n * J + j) * C + c, the dz array then the dz * xhat array.
#pragma once

#include <type_traits>

#include "cuda/channel_norm_plan.h"
#include "cuda/kernels/common.cuh"

namespace fusedstab {
namespace cuda {
namespace cn {

using M64 = Moments<double>;

// Units of 8 elements a thread loads from each tensor before it computes: BYTES in flight (at least
// one unit). The channels-last kernels hold 8 channels' coefficients in registers (fewer blocks per
// SM), so they keep more bytes in flight per thread.
template <typename T, int BYTES> constexpr int units() {
  return BYTES / int(kUnit * sizeof(T)) > 1 ? BYTES / int(kUnit * sizeof(T)) : 1;
}
constexpr int kRowBytes = 32, kColBytes = 64;

// __launch_bounds__'s minimum blocks per SM (a register budget: 65536 / (256 x blocks)), chosen per
// kernel family for 16-bit / fp32 and 1 for fp64 (correctness, not speed). Left unset, ptxas's
// occupancy heuristic trades a few bytes of spill for another block per SM in some variants.
template <typename T> constexpr int min_blocks(int blocks) { return sizeof(T) == 8 ? 1 : blocks; }
constexpr int kRowBlocks = 3, kColBlocks = 2;  // rows / slab kernels; channels-last forward

// ---------------------------------------------------------------------------- arithmetic
// No IEEE division (floating or int64) in these kernels: its slow-path subroutine makes the unrolled
// loops around the call spill registers. fp32 takes div.full (2 ulp, as Triton's fp32 division and
// tl.exp's __expf), fp64 two Newton steps from fp32's reciprocal (within an ulp or two).

// 1 / b, b >= 1 (and below fp32's range).
__device__ __forceinline__ double rcp64(double b) {
  double r = double(__fdividef(1.f, __double2float_rn(b)));
  r = r * (2.0 - b * r);
  return r * (2.0 - b * r);
}

// a / b with b a count >= 1.
__device__ __forceinline__ float fdiv(float a, float b) { return __fdividef(a, b); }
__device__ __forceinline__ double fdiv(double a, double b) { return a * rcp64(b); }

// a / b and a % b (0 <= a, 1 <= b): 32-bit division where both fit, else an fp64 estimate corrected
// to the exact quotient (a step or two for a < 2^53).
__device__ __forceinline__ void divmod(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if ((uint64_t(a) | uint64_t(b)) <= 0xffffffffull) {
    const uint32_t q32 = uint32_t(a) / uint32_t(b);
    q = q32, r = int64_t(uint32_t(a) - q32 * uint32_t(b));
    return;
  }
  q = int64_t(double(a) * rcp64(double(b)));
  r = a - q * b;
  while (r < 0) --q, r += b;
  while (r >= b) ++q, r -= b;
}

// Chan's combine of float64 (count, mean, M2): numerics.h's Moments::combine with fdiv.
__device__ __forceinline__ void chan(M64& m, const M64& o) {
  if (o.n == 0.0) return;
  if (m.n == 0.0) {
    m = o;
    return;
  }
  const double total = m.n + o.n, d = o.mean - m.mean, w = fdiv(o.n, total);
  m.mean += d * w;
  m.m2 += o.m2 + d * d * m.n * w;
  m.n = total;
}

// The logistic sigmoid 1 / (1 + exp(-z)); fp64: 0 where 1 + exp(-z) > 2^100 (|silu| < 1e-27 there).
// -inf and NaN give NaN downstream, as torch's.
__device__ __forceinline__ float sigmoid(float z) { return __fdividef(1.f, 1.f + __expf(-z)); }
__device__ __forceinline__ double sigmoid(double z) {
  const double d = 1.0 + exp(-z);
  return d > 0x1p100 ? 0.0 : rcp64(d);
}

// numerics.h's activations, SiLU through sigmoid() above: the same formulas, NaN / inf behaviour.
template <typename A> __device__ __forceinline__ A act_fwd(A z, int act, A slope) {
  return act == kSilu ? z * sigmoid(z) : activate(z, act, slope);
}
template <typename A> __device__ __forceinline__ A act_grad(A dy, A z, int act, A slope) {
  if (act != kSilu) return activate_grad(dy, z, act, slope);
  const A s = sigmoid(z);
  return dy * s * (A(1) + z * (A(1) - s));
}

// ---------------------------------------------------------------------------- small helpers
// Weight or bias element c: x's dtype T, or fp32 (p32, for fp16 / bf16 x); `absent` without one.
template <typename A, typename T>
__device__ __forceinline__ A param(const void* p, bool p32, int64_t c, A absent) {
  if (p == nullptr) return absent;
  return p32 ? A(static_cast<const float*>(p)[c]) : to_acc<A>(static_cast<const T*>(p)[c]);
}

// Elements [c0, c0 + 8) of a row of `len`, zero past it (the caller knows c0 < len).
__host__ __device__ __forceinline__ int unit_count(int64_t c0, int64_t len) {
  return len - c0 < kUnit ? int(len - c0) : kUnit;
}

// Uniform per-thread params of the activation.
template <typename A> struct Act {
  int act;
  A slope;
};

__device__ __forceinline__ M64 shfl_down(const M64& m, int o) {
  M64 r;
  r.n = __shfl_down_sync(0xffffffffu, m.n, o);
  r.mean = __shfl_down_sync(0xffffffffu, m.mean, o);
  r.m2 = __shfl_down_sync(0xffffffffu, m.m2, o);
  return r;
}

// Tree over lanes l, l + o0, l + 2 o0, ... (o0 = first, a power of two): lane l (l < first) gets
// the combination in a fixed order. first = 1, last = 16: a whole warp into lane 0.
__device__ __forceinline__ M64 warp_moments(M64 m, int width, int stride = 1) {
  for (int o = width / 2; o > 0; o >>= 1) chan(m, shfl_down(m, o * stride));
  return m;
}

__device__ __forceinline__ void write3(double* r, const M64& m) { r[0] = m.n, r[1] = m.mean, r[2] = m.m2; }
__device__ __forceinline__ M64 read3(const double* r) {
  M64 m;
  m.n = r[0], m.mean = r[1], m.m2 = r[2];
  return m;
}

// The block's moments (every thread calls; thread 0 gets the result, warps combined in order).
__device__ __forceinline__ M64 block_moments(M64 m, double (*sm)[kThreads / kWarp]) {
  m = warp_moments(m, kWarp);
  const int warp = threadIdx.x / kWarp;
  __syncthreads();  // sm may still be read by the previous item
  if (threadIdx.x % kWarp == 0) sm[0][warp] = m.n, sm[1][warp] = m.mean, sm[2][warp] = m.m2;
  __syncthreads();
  if (threadIdx.x == 0)
    for (int w = 1; w < int(blockDim.x / kWarp); ++w) {
      M64 o;
      o.n = sm[0][w], o.mean = sm[1][w], o.m2 = sm[2][w];
      chan(m, o);
    }
  return m;
}

// A thread's (count, mean, M2) of its values minus a pivot, taken 8 values at a time.
template <typename A> struct PivotMoments {
  A pivot = A(0);
  Moments<A> m;

  __device__ __forceinline__ void push8(const A* v, int cnt) {
    const A inv = cnt == kUnit ? A(1) / A(kUnit) : fdiv(A(1), A(cnt));
    if (m.n == A(0)) {  // the first values: their mean centres all that follow
      A s = A(0);
#pragma unroll
      for (int k = 0; k < kUnit; ++k) s += k < cnt ? v[k] : A(0);
      pivot = s * inv;
    }
    A s = A(0);
#pragma unroll
    for (int k = 0; k < kUnit; ++k) s += k < cnt ? v[k] - pivot : A(0);
    const A mu = s * inv;
    A q = A(0);
#pragma unroll
    for (int k = 0; k < kUnit; ++k) {
      const A d = k < cnt ? v[k] - pivot - mu : A(0);
      q += d * d;
    }
    // Chan's combine (numerics.h's Moments::combine) with fdiv
    const A total = m.n + A(cnt), d = mu - m.mean, w = fdiv(A(cnt), total);
    m.mean += d * w;
    m.m2 += q + d * d * m.n * w;
    m.n = total;
  }
  __device__ __forceinline__ M64 get() const {
    M64 r;
    r.n = double(m.n), r.mean = double(pivot) + double(m.mean), r.m2 = double(m.m2);
    return r;
  }
};

// Walks the tiles j, j + J, ... of an rt x ct grid of tiles (row-major).
struct TileWalk {
  int64_t r, c, dr, dc, ct;
  __device__ __forceinline__ TileWalk(int64_t j, int64_t J, int64_t ct_) : ct(ct_) {
    divmod(j, ct_, r, c);
    divmod(J, ct_, dr, dc);
  }
  __device__ __forceinline__ void next() {
    r += dr, c += dc;
    if (c >= ct) c -= ct, ++r;
  }
};

// Per-row (NCHW) or per-channel coefficients of the backward sums: d = x - mean, xhat = d * rstd,
// z = w * xhat + b = d * a + b (a = rstd * w).
template <typename A> struct BwdCoef {
  A mean, rstd, a, b;
};

// (dz, xhat) of one value: dz = dy * act'(z).
template <typename A>
__device__ __forceinline__ A dz_of(A dy, A x, const BwdCoef<A>& k, const Act<A>& a, A& xhat) {
  const A d = x - k.mean;
  xhat = d * k.rstd;
  return a.act == kNone ? dy : act_grad(dy, d * k.a + k.b, a.act, a.slope);
}

// ============================================================================ statistics
// NCHW rows (GroupNorm: a group's C/G * S contiguous values per row, R = N * G rows): the moments
// of row `row` over the column tiles j, j + J, ...; record (row / G * J + j) * G + row % G.
template <typename T>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(kRowBlocks))
rows_moments_kernel(const T* __restrict__ x, int64_t R, int64_t L, Plan p, int64_t G, bool vec, double* __restrict__ rec) {
  using A = acc_t<T>;
  constexpr int U = units<T, kRowBytes>();
  const int bx = p.t.bx, tx = threadIdx.x % bx, ty = threadIdx.x / bx;
  const int64_t span = p.J * bx * kUnit;  // columns between a thread's units
  for (int64_t item = blockIdx.x; item < p.items; item += gridDim.x) {
    int64_t rt, j;
    divmod(item, p.J, rt, j);
    const int64_t row = rt * p.t.by + ty;
    PivotMoments<A> acc;
    if (row < R) {
      const T* xr = x + row * L;
      for (int64_t c0 = (j * bx + tx) * kUnit; c0 < L; c0 += U * span) {
        A v[U][kUnit];
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (c0 + u * span < L) load8(v[u], xr, c0 + u * span, L, vec);
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (c0 + u * span < L) acc.push8(v[u], unit_count(c0 + u * span, L));
      }
    }
    const M64 m = warp_moments(acc.get(), bx);
    if (tx == 0 && row < R) {
      int64_t n, g;
      divmod(row, G, n, g);
      write3(rec + ((n * p.J + j) * G + g) * 3, m);
    }
  }
}

// The U tiles of a slab a thread takes next (j, j + J, ...: row n = tile row * by + ty, columns
// from c): h false past the slab.
template <int U> struct SlabUnits {
  int64_t n[U], c[U];
  bool h[U];
  __device__ __forceinline__ SlabUnits(TileWalk& w, const Plan& p, int tx, int ty, int64_t N, int64_t S) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      n[u] = w.r * p.t.by + ty, c[u] = (w.c * p.t.bx + tx) * kUnit;
      h[u] = w.r < p.rt && n[u] < N && c[u] < S;
      w.next();
    }
  }
};

// NCHW slabs (BatchNorm: channel c's N rows of S at x + c * S, row stride C * S): the moments of
// the tiles j, j + J, ... of slab c; record j * C + c.
template <typename T>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(kRowBlocks))
slab_moments_kernel(const T* __restrict__ x, int64_t N, int64_t C, int64_t S, Plan p, bool vec, double* __restrict__ rec) {
  using A = acc_t<T>;
  constexpr int U = units<T, kRowBytes>();
  __shared__ double sm[3][kThreads / kWarp];
  const int bx = p.t.bx, tx = threadIdx.x % bx, ty = threadIdx.x / bx;
  for (int64_t item = blockIdx.x; item < p.items; item += gridDim.x) {
    int64_t c, j;
    divmod(item, p.J, c, j);
    const T* xc = x + c * S;
    PivotMoments<A> acc;
    for (TileWalk w(j, p.J, p.ct); w.r < p.rt;) {
      const SlabUnits<U> t(w, p, tx, ty, N, S);
      A v[U][kUnit];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (t.h[u]) load8(v[u], xc + t.n[u] * C * S, t.c[u], S, vec);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (t.h[u]) acc.push8(v[u], unit_count(t.c[u], S));
    }
    const M64 m = block_moments(acc.get(), sm);
    if (threadIdx.x == 0) write3(rec + (j * C + c) * 3, m);
  }
}

// Channels-last (rows of C channels; nseg segments of `rows` rows: GroupNorm's samples, or one of
// all N * S rows): per channel, the moments of rows j * by + ty, + J * by, ... of segment `seg`;
// record (seg * J + j) * C + c. Welford's update per row (a thread's 8 channels share the count),
// on values centred by the thread's first row.
template <typename T>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(kColBlocks))
cols_moments_kernel(const T* __restrict__ x, int64_t rows, int64_t C, Plan p, bool vec, double* __restrict__ rec) {
  using A = acc_t<T>;
  constexpr int U = units<T, kColBytes>();
  __shared__ double sm[3][kThreads / kWarp][kWarp];
  const int bx = p.t.bx, by = p.t.by, tx = threadIdx.x % bx, ty = threadIdx.x / bx;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t step = p.J * by;
  for (int64_t item = blockIdx.x; item < p.items; item += gridDim.x) {
    int64_t sc, j, seg, cb;
    divmod(item, p.J, sc, j);
    divmod(sc, p.ct, seg, cb);
    const int64_t c0 = (cb * bx + tx) * kUnit;
    const T* xs = x + seg * rows * C;
    A n = A(0), piv[kUnit], mean[kUnit], m2[kUnit];
#pragma unroll
    for (int k = 0; k < kUnit; ++k) piv[k] = mean[k] = m2[k] = A(0);
    if (c0 < C) {
      for (int64_t r0 = j * by + ty; r0 < rows; r0 += U * step) {
        A v[U][kUnit];
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (r0 + u * step < rows) load8(v[u], xs + (r0 + u * step) * C, c0, C, vec);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (r0 + u * step >= rows) break;
          if (n == A(0)) {
#pragma unroll
            for (int k = 0; k < kUnit; ++k) piv[k] = v[u][k];
          }
          n += A(1);
          const A inv = fdiv(A(1), n);
#pragma unroll
          for (int k = 0; k < kUnit; ++k) {
            const A d = v[u][k] - piv[k] - mean[k];
            mean[k] += d * inv;
            m2[k] += d * (v[u][k] - piv[k] - mean[k]);
          }
        }
      }
    }
    // Each channel's rows: lanes bx apart within a warp, then the warps in order.
#pragma unroll
    for (int k = 0; k < kUnit; ++k) {
      M64 m;
      m.n = double(n), m.mean = double(piv[k]) + double(mean[k]), m.m2 = double(m2[k]);
      m = warp_moments(m, kWarp / bx, bx);
      __syncthreads();
      if (lane < bx) sm[0][warp][lane] = m.n, sm[1][warp][lane] = m.mean, sm[2][warp][lane] = m.m2;
      __syncthreads();
      if (int(threadIdx.x) < bx) {
        for (int w = 1; w < int(blockDim.x / kWarp); ++w) {
          M64 o;
          o.n = sm[0][w][lane], o.mean = sm[1][w][lane], o.m2 = sm[2][w][lane];
          chan(m, o);
        }
        if (c0 + k < C) write3(rec + ((seg * p.J + j) * C + c0 + k) * 3, m);
      }
    }
  }
}

// One warp per output o = n * G + g: the records (n * J + j) * W + g * I + i (j < J, i < I)
// combined in a fixed order; GroupNorm: mean and rstd = 1 / sqrt(M2 / count + eps) into out0, out1;
// BatchNorm (stats): count, mean, M2 into out0, out1, out2.
template <typename A>
__global__ void __launch_bounds__(kThreads, min_blocks<A>(0))
moments_finalize_kernel(const double* __restrict__ rec, int64_t Nn, int64_t G, int64_t J, int64_t I, int64_t W,
                        double eps, bool stats, A* __restrict__ out0, A* __restrict__ out1, A* __restrict__ out2) {
  const int lane = threadIdx.x % kWarp;
  const int64_t o = int64_t(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
  if (o >= Nn * G) return;  // a whole warp
  int64_t n, g;
  divmod(o, G, n, g);
  M64 m;
  for (int64_t t = lane; t < J * I; t += kWarp) {
    int64_t j, i;
    divmod(t, I, j, i);
    chan(m, read3(rec + ((n * J + j) * W + g * I + i) * 3));
  }
  m = warp_moments(m, kWarp);
  if (lane != 0) return;
  if (stats) {
    out0[o] = A(m.n), out1[o] = A(m.mean), out2[o] = A(m.m2);
  } else {
    out0[o] = A(m.mean), out1[o] = A(1.0 / sqrt(m.m2 / m.n + eps));
  }
}

// ============================================================================ elementwise
// The statistics index of channel c of sample n: GroupNorm (Cg > 0) its group's n * G + c / Cg,
// BatchNorm (Cg == 0) the channel.
__device__ __forceinline__ int64_t stat_index(int64_t n, int64_t c, int64_t G, int64_t Cg) {
  if (Cg == 0) return c;
  int64_t g, r;
  divmod(c, Cg, g, r);
  return n * G + g;
}

template <typename T> struct ElemArgs {
  const T* x;
  const T* dy;       // backward
  T* out;            // y or dx
  const void* w;     // (C,) T or fp32, or null
  const void* b;
  const acc_t<T>* mean;  // per statistics index
  const acc_t<T>* rstd;
  const acc_t<T>* coef;  // backward: GroupNorm (N*G, 2); BatchNorm (2, C) or null (eval)
  int64_t N, C, S, G, Cg;  // Cg == 0: BatchNorm
  bool w32, b32, vec;
  int act;
  double slope;
};

// What the elementwise passes need per channel: forward y = act((x - mean) * scale + b), scale =
// rstd * w; backward dx = rstd * (dz * w - m1 - xhat * m2), xhat = (x - mean) * rstd, dz =
// dy * act'(w * xhat + b), (m1, m2) GroupNorm's group means of dz * w and dz * w * xhat, BatchNorm's
// w * coef (training) or 0 (eval).
template <typename A, bool BWD> struct Coef;
template <typename A> struct Coef<A, false> {
  A mean, scale, b;
  template <typename T> __device__ __forceinline__ void load(const ElemArgs<T>& a, int64_t n, int64_t c) {
    const int64_t k = stat_index(n, c, a.G, a.Cg);
    mean = a.mean[k], scale = a.rstd[k] * param<A, T>(a.w, a.w32, c, A(1)), b = param<A, T>(a.b, a.b32, c, A(0));
  }
  __device__ __forceinline__ A apply(A x, A, const Act<A>& a) const { return act_fwd((x - mean) * scale + b, a.act, a.slope); }
};
template <typename A> struct Coef<A, true> {
  // dx = rstd * (dz * w - m1 - xhat * m2) = a * dz + cc + d * bn (a = rstd * w, cc = -rstd * m1,
  // bn = -rstd^2 * m2, d = x - mean): five registers a channel instead of six.
  A mean, a, b, cc, bn;
  template <typename T> __device__ __forceinline__ void load(const ElemArgs<T>& e, int64_t n, int64_t c) {
    const int64_t i = stat_index(n, c, e.G, e.Cg);
    const A rstd = e.rstd[i], w = param<A, T>(e.w, e.w32, c, A(1));
    A m1 = A(0), m2 = A(0);
    if (e.Cg > 0) {
      m1 = e.coef[2 * i], m2 = e.coef[2 * i + 1];
    } else if (e.coef != nullptr) {
      m1 = w * e.coef[c], m2 = w * e.coef[e.C + c];
    }
    mean = e.mean[i], a = rstd * w, b = param<A, T>(e.b, e.b32, c, A(0)), cc = -rstd * m1, bn = -rstd * rstd * m2;
  }
  __device__ __forceinline__ A apply(A x, A dy, const Act<A>& act) const {
    const A d = x - mean;
    const A dz = act.act == kNone ? dy : act_grad(dy, d * a + b, act.act, act.slope);
    return a * dz + cc + d * bn;
  }
};

// NCHW rows r = n * C + c of S: item (row tile, j), column tiles j, j + J, ...
template <typename T, bool BWD>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(kRowBlocks))
rows_elem_kernel(ElemArgs<T> a, Plan p) {
  using A = acc_t<T>;
  constexpr int U = units<T, kRowBytes>();
  const int bx = p.t.bx, tx = threadIdx.x % bx, ty = threadIdx.x / bx;
  const int64_t R = a.N * a.C, S = a.S, span = p.J * bx * kUnit;
  const Act<A> act{a.act, A(a.slope)};
  for (int64_t item = blockIdx.x; item < p.items; item += gridDim.x) {
    int64_t rt, j;
    divmod(item, p.J, rt, j);
    const int64_t row = rt * p.t.by + ty;
    if (row >= R) continue;  // no block-wide step below
    int64_t n, c;
    divmod(row, a.C, n, c);
    Coef<A, BWD> k;
    k.load(a, n, c);
    const T* xr = a.x + row * S;
    const T* dyr = BWD ? a.dy + row * S : nullptr;
    T* outr = a.out + row * S;
    for (int64_t c0 = (j * bx + tx) * kUnit; c0 < S; c0 += U * span) {
      A v[U][kUnit], g[U][kUnit];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c0 + u * span >= S) break;
        load8(v[u], xr, c0 + u * span, S, a.vec);
        if (BWD) load8(g[u], dyr, c0 + u * span, S, a.vec);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c0 + u * span >= S) break;
#pragma unroll
        for (int i = 0; i < kUnit; ++i) v[u][i] = k.apply(v[u][i], BWD ? g[u][i] : A(0), act);
        store8(outr, v[u], c0 + u * span, S, a.vec);
      }
    }
  }
}

// Channels-last (nseg segments of `rows` rows of C channels; GroupNorm: the samples, BatchNorm: one
// of all N * S rows): item (segment, channel block, j), the segment's rows j * by + ty, + J * by, ...;
// a thread's 8 channels' coefficients stay in registers for the whole item.
template <typename T, bool BWD>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(BWD ? 1 : kColBlocks))
cols_elem_kernel(ElemArgs<T> a, int64_t rows, Plan p) {
  using A = acc_t<T>;
  constexpr int U = units<T, kColBytes>();
  const int bx = p.t.bx, by = p.t.by, tx = threadIdx.x % bx, ty = threadIdx.x / bx;
  const int64_t C = a.C, step = p.J * by;
  const Act<A> act{a.act, A(a.slope)};
  for (int64_t item = blockIdx.x; item < p.items; item += gridDim.x) {
    int64_t sc, j, seg, cb;
    divmod(item, p.J, sc, j);
    divmod(sc, p.ct, seg, cb);
    const int64_t c0 = (cb * bx + tx) * kUnit;
    if (c0 >= C) continue;  // no block-wide step below
    Coef<A, BWD> k[kUnit];
#pragma unroll
    for (int i = 0; i < kUnit; ++i) k[i].load(a, seg, c0 + i < C ? c0 + i : C - 1);  // past C: never stored
    const int64_t base = seg * rows * C;
    for (int64_t r0 = j * by + ty; r0 < rows; r0 += U * step) {
      A v[U][kUnit], g[U][kUnit];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (r0 + u * step >= rows) break;
        load8(v[u], a.x + base + (r0 + u * step) * C, c0, C, a.vec);
        if (BWD) load8(g[u], a.dy + base + (r0 + u * step) * C, c0, C, a.vec);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (r0 + u * step >= rows) break;
#pragma unroll
        for (int i = 0; i < kUnit; ++i) v[u][i] = k[i].apply(v[u][i], BWD ? g[u][i] : A(0), act);
        store8(a.out + base + (r0 + u * step) * C, v[u], c0, C, a.vec);
      }
    }
  }
}

// ============================================================================ backward sums
template <typename T> struct BwdArgs {
  const T* dy;
  const T* x;
  const void* w;
  const void* b;
  const acc_t<T>* mean;
  const acc_t<T>* rstd;
  int64_t N, C, S, G, Cg;  // Cg == 0: BatchNorm
  bool w32, b32, vec;
  int act;
  double slope;
};

template <typename T>
__device__ __forceinline__ BwdCoef<acc_t<T>> sums_coef(const BwdArgs<T>& a, int64_t n, int64_t c) {
  using A = acc_t<T>;
  const int64_t k = stat_index(n, c, a.G, a.Cg);
  const A rstd = a.rstd[k];
  return {a.mean[k], rstd, rstd * param<A, T>(a.w, a.w32, c, A(1)), param<A, T>(a.b, a.b32, c, A(0))};
}

// s1 += dz, s2 += dz * xhat over the cnt values of a unit.
template <typename A>
__device__ __forceinline__ void sums8(A& s1, A& s2, const A* g, const A* x, int cnt, const BwdCoef<A>& k,
                                      const Act<A>& a) {
#pragma unroll
  for (int i = 0; i < kUnit; ++i) {
    A xhat;
    const A dz = dz_of(g[i], x[i], k, a, xhat);
    if (i < cnt) s1 += dz, s2 += dz * xhat;
  }
}

// NCHW rows r = n * C + c of S (GroupNorm): sum(dz) and sum(dz * xhat) of row r over the column
// tiles j, j + J, ...; records (n * J + j) * C + c of out (dz) and out + N * J * C (dz * xhat).
template <typename T>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(kRowBlocks))
rows_bwd_sums_kernel(BwdArgs<T> a, Plan p, acc_t<T>* __restrict__ out) {
  using A = acc_t<T>;
  constexpr int U = units<T, kRowBytes>();
  const int bx = p.t.bx, tx = threadIdx.x % bx, ty = threadIdx.x / bx;
  const int64_t R = a.N * a.C, S = a.S, span = p.J * bx * kUnit;
  const Act<A> act{a.act, A(a.slope)};
  for (int64_t item = blockIdx.x; item < p.items; item += gridDim.x) {
    int64_t rt, j;
    divmod(item, p.J, rt, j);
    const int64_t row = rt * p.t.by + ty;
    A s1 = A(0), s2 = A(0);
    int64_t n = 0, c = 0;
    if (row < R) {
      divmod(row, a.C, n, c);
      const BwdCoef<A> k = sums_coef(a, n, c);
      const T* xr = a.x + row * S;
      const T* dyr = a.dy + row * S;
      for (int64_t c0 = (j * bx + tx) * kUnit; c0 < S; c0 += U * span) {
        A v[U][kUnit], g[U][kUnit];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (c0 + u * span >= S) break;
          load8(v[u], xr, c0 + u * span, S, a.vec);
          load8(g[u], dyr, c0 + u * span, S, a.vec);
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (c0 + u * span < S) sums8(s1, s2, g[u], v[u], unit_count(c0 + u * span, S), k, act);
      }
    }
    s1 = warp_reduce(s1, Sum{}, bx);
    s2 = warp_reduce(s2, Sum{}, bx);
    if (tx == 0 && row < R) {
      const int64_t o = (n * p.J + j) * a.C + c;
      out[o] = s1;
      out[a.N * p.J * a.C + o] = s2;
    }
  }
}

// NCHW slabs (BatchNorm: channel c's N rows of S): sums over the tiles j, j + J, ... of slab c;
// records j * C + c of out (dz) and out + J * C (dz * xhat).
template <typename T>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(kRowBlocks))
slab_bwd_sums_kernel(BwdArgs<T> a, Plan p, acc_t<T>* __restrict__ out) {
  using A = acc_t<T>;
  constexpr int U = units<T, kRowBytes>();
  __shared__ A sm[kThreads / kWarp];
  const int bx = p.t.bx, tx = threadIdx.x % bx, ty = threadIdx.x / bx;
  const int64_t N = a.N, C = a.C, S = a.S;
  const Act<A> act{a.act, A(a.slope)};
  for (int64_t item = blockIdx.x; item < p.items; item += gridDim.x) {
    int64_t c, j;
    divmod(item, p.J, c, j);
    const BwdCoef<A> k = sums_coef(a, 0, c);
    const T* xc = a.x + c * S;
    const T* dyc = a.dy + c * S;
    A s1 = A(0), s2 = A(0);
    for (TileWalk w(j, p.J, p.ct); w.r < p.rt;) {
      const SlabUnits<U> t(w, p, tx, ty, N, S);
      A v[U][kUnit], g[U][kUnit];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (t.h[u]) {
          load8(v[u], xc + t.n[u] * C * S, t.c[u], S, a.vec);
          load8(g[u], dyc + t.n[u] * C * S, t.c[u], S, a.vec);
        }
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (t.h[u]) sums8(s1, s2, g[u], v[u], unit_count(t.c[u], S), k, act);
    }
    s1 = group_reduce(s1, Sum{}, int(blockDim.x), sm);
    s2 = group_reduce(s2, Sum{}, int(blockDim.x), sm);
    if (threadIdx.x == 0) out[j * C + c] = s1, out[p.J * C + j * C + c] = s2;
  }
}

// Channels-last (nseg segments of `rows` rows; GroupNorm: the samples, BatchNorm: one of N * S
// rows): per channel, sums over rows j * by + ty, + J * by, ... of the segment; records
// (seg * J + j) * C + c of out (dz) and out + nseg * J * C (dz * xhat).
template <typename T>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(1))
cols_bwd_sums_kernel(BwdArgs<T> a, int64_t nseg, int64_t rows, Plan p, acc_t<T>* __restrict__ out) {
  using A = acc_t<T>;
  constexpr int U = units<T, kColBytes>();
  __shared__ A sm[2][kThreads / kWarp][kWarp];
  const int bx = p.t.bx, by = p.t.by, tx = threadIdx.x % bx, ty = threadIdx.x / bx;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t C = a.C, step = p.J * by;
  const Act<A> act{a.act, A(a.slope)};
  for (int64_t item = blockIdx.x; item < p.items; item += gridDim.x) {
    int64_t sc, j, seg, cb;
    divmod(item, p.J, sc, j);
    divmod(sc, p.ct, seg, cb);
    const int64_t c0 = (cb * bx + tx) * kUnit;
    const T* xs = a.x + seg * rows * C;
    const T* dys = a.dy + seg * rows * C;
    A s1[kUnit], s2[kUnit];
#pragma unroll
    for (int i = 0; i < kUnit; ++i) s1[i] = s2[i] = A(0);
    if (c0 < C) {
      BwdCoef<A> k[kUnit];
#pragma unroll
      for (int i = 0; i < kUnit; ++i) k[i] = sums_coef(a, seg, c0 + i < C ? c0 + i : C - 1);
      for (int64_t r0 = j * by + ty; r0 < rows; r0 += U * step) {
        A v[U][kUnit], g[U][kUnit];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (r0 + u * step >= rows) break;
          load8(v[u], xs + (r0 + u * step) * C, c0, C, a.vec);
          load8(g[u], dys + (r0 + u * step) * C, c0, C, a.vec);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (r0 + u * step >= rows) break;
#pragma unroll
          for (int i = 0; i < kUnit; ++i) {
            A xhat;
            const A dz = dz_of(g[u][i], v[u][i], k[i], act, xhat);
            s1[i] += dz, s2[i] += dz * xhat;
          }
        }
      }
    }
    // Each channel's rows: lanes bx apart within a warp, then the warps in order.
#pragma unroll
    for (int i = 0; i < kUnit; ++i) {
      A u = s1[i], v = s2[i];
      for (int o = kWarp / 2; o >= bx; o >>= 1) {
        u += __shfl_down_sync(0xffffffffu, u, o);
        v += __shfl_down_sync(0xffffffffu, v, o);
      }
      __syncthreads();
      if (lane < bx) sm[0][warp][lane] = u, sm[1][warp][lane] = v;
      __syncthreads();
      if (int(threadIdx.x) < bx) {
        for (int w = 1; w < int(blockDim.x / kWarp); ++w) u += sm[0][w][lane], v += sm[1][w][lane];
        if (c0 + i < C) {
          const int64_t o = (seg * p.J + j) * C + c0 + i;
          out[o] = u;
          out[nseg * p.J * C + o] = v;
        }
      }
    }
  }
}

// GroupNorm: coef[2 o], coef[2 o + 1] = the group means of gw = dz * w and gw * xhat for group
// o = n * G + g, from the per-(sample, split, channel) sums (records (n * J + j) * C + c, dz then
// dz * xhat); one warp per group, a fixed order.
template <typename A, typename T>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(0))
gn_coef_kernel(const A* __restrict__ sums, int64_t N, int64_t C, int64_t G, int64_t J, int64_t S, const void* w,
               bool w32, A* __restrict__ coef) {
  const int lane = threadIdx.x % kWarp;
  const int64_t o = int64_t(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
  if (o >= N * G) return;  // a whole warp
  const int64_t Cg = C / G;
  int64_t n, g;
  divmod(o, G, n, g);
  A s1 = A(0), s2 = A(0);
  for (int64_t t = lane; t < J * Cg; t += kWarp) {
    int64_t j, i;
    divmod(t, Cg, j, i);
    const int64_t c = g * Cg + i, r = (n * J + j) * C + c;
    const A wc = param<A, T>(w, w32, c, A(1));
    s1 += wc * sums[r];
    s2 += wc * sums[N * J * C + r];
  }
  s1 = warp_reduce(s1, Sum{});
  s2 = warp_reduce(s2, Sum{});
  if (lane == 0) {
    const A count = A(Cg) * A(S);
    coef[2 * o] = s1 / count, coef[2 * o + 1] = s2 / count;
  }
}

}  // namespace cn
}  // namespace cuda
}  // namespace fusedstab
