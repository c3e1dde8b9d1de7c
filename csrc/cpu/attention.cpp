// CPU FlashAttention: fusedstab_C::attention_fwd / attention_bwd. The semantics are the header's of
// fusedstab/kernels/attention.py, the layouts fusedstab/ops/attention.py's; every argument is checked.
//
// The L x S matrix is never built. Forward: each (batch, query head, block of queries) runs an online
// softmax over blocks of keys. Backward, FlashAttention-2 in one pass: each (batch, kv head, set of key
// blocks) recomputes P = exp(S - lse) tile by tile and accumulates dk, dv in its own buffers over every
// query head of its group (the GQA sum: no races, a fixed order), and dq into rows no other item writes
// (one partial per set when a head's key blocks are split between sets to keep the threads busy, summed
// in set order afterwards): deterministic for a given thread count.
//
// The tile products are BLAS GEMMs (MKL's, as torch's own CPU flash attention) in the accumulation
// type: 2-byte blocks are widened to fp32 first (there is no fast half GEMM on this CPU), so P and dS
// are never rounded. Dropout: keep(b, h, i, j) = uniform(Philox(seed; offset + ((b * Hq + h) * L + i) * S + j))
// >= p (keep_row below), which the backward regenerates whatever the blocking or the thread count.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/TransposeType.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/numerics.h"

extern "C" {  // Fortran BLAS (LP64)
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace fusedstab {
namespace {

using at::native::TransposeType;
template <typename A> using Vec = at::vec::Vectorized<A>;

// Tile sizes (tuned at (4, 8, 512, 64) fp32 on 2 cores): the forward's scores tile is 128 x 512 fp32
// (256 KB: few GEMM calls, so MKL packs its operands seldom, and one pass of the online softmax
// covers 512 keys); the backward's tiles are smaller, as it keeps S, dP (and Pd) of one tile at once.
constexpr int64_t kBlockM = 128, kBlockN = 512;    // forward: queries, keys
constexpr int64_t kBBlockM = 64, kBBlockN = 128;   // backward: queries, keys
// Backward: at most this many key-block sets per (batch, kv head), each with its own fp32 dq partial.
constexpr int64_t kMaxSplit = 4;

template <typename A> constexpr A kNegInf = -std::numeric_limits<A>::infinity();

int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr auto kN = TransposeType::NoTranspose;
constexpr auto kT = TransposeType::Transpose;

// c = alpha op(a) op(b) + beta c in BLAS's column-major convention (a row-major tile is its transpose).
// cpublas::gemm's fp32/fp64 overloads are not exported by libtorch_cpu, but the BLAS they call is (MKL's
// sgemm_/dgemm_ in the x86 wheels): called directly where present (weak symbols); elsewhere at::addmm
// on views of the tiles (c's transpose = op(b)^T op(a)^T). k == 0 (an empty head dim) is c = beta c.
template <typename A>
void gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, A alpha, const A* a,
          int64_t lda, const A* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < m; ++i) c[j * ldc + i] = beta == A(0) ? A(0) : beta * c[j * ldc + i];
    return;
  }
  const bool na = ta == kN, nb = tb == kN;
  auto blas = std::is_same_v<A, float> ? reinterpret_cast<void*>(&sgemm_) : reinterpret_cast<void*>(&dgemm_);
  if (blas != nullptr && std::max({m, n, k, lda, ldb, ldc}) <= std::numeric_limits<int>::max()) {
    const char cta = na ? 'n' : 't', ctb = nb ? 'n' : 't';
    const int im = int(m), in = int(n), ik = int(k), ilda = int(lda), ildb = int(ldb), ildc = int(ldc);
    if constexpr (std::is_same_v<A, float>)
      sgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
    else
      dgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
    return;
  }
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
  auto tile = [&](const A* p, int64_t rows, int64_t cols, int64_t ld) {  // row-major view of a column-major tile
    return at::from_blob(const_cast<A*>(p), {cols, rows}, {ld, 1}, opt);
  };
  at::Tensor at_ = na ? tile(a, m, k, lda) : tile(a, k, m, lda).t();  // op(a)^T: (k, m)
  at::Tensor bt = nb ? tile(b, k, n, ldb) : tile(b, n, k, ldb).t();  // op(b)^T: (n, k)
  at::Tensor ct = tile(c, m, n, ldc);                                 // c^T: (n, m)
  at::addmm_out(ct, ct, bt, at_, beta, alpha);
}

// A thread's scratch tile, 64-byte aligned (c10's CPU allocator): MKL may take another code path, and
// round differently, at another alignment, so aligned buffers keep results the same run to run.
template <typename A> class Scratch {
 public:
  explicit Scratch(int64_t n) : n_(n), p_(static_cast<A*>(c10::alloc_cpu(std::max<int64_t>(n, 1) * sizeof(A)))) {}
  ~Scratch() { c10::free_cpu(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  A* data() { return p_; }
  A* begin() { return p_; }
  A* end() { return p_ + n_; }

 private:
  int64_t n_;
  A* p_;
};

// One (batch, head) slice of a 4-D operand: rows through their stride, the last dim unit-stride.
template <typename T> struct View {
  T* p;
  int64_t sb, sh, sr;
  T* row(int64_t b, int64_t h, int64_t i) const { return p + b * sb + h * sh + i * sr; }
};
template <typename T> View<T> view(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T, typename A> void widen(const T* src, A* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<A, float> && !std::is_same_v<T, float>) {
    for (; i + Vec<float>::size() <= n; i += Vec<float>::size()) {
      Vec<float> x;
      at::vec::load_to_float(src + i, x);
      x.store(dst + i);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<A>(src[i]);
}

// Rows [0, n) of a (rows, d) matrix of T with row stride ld, as BLAS takes it in A: the data itself when
// it already is one (ld >= d), else a packed copy in buf. *ld_out: its leading dimension.
template <typename T, typename A>
const A* as_acc(const T* p, int64_t ld, int64_t n, int64_t d, A* buf, int64_t* ld_out) {
  if constexpr (std::is_same_v<T, A>) {
    if (ld >= d || n == 1) {
      *ld_out = std::max<int64_t>({ld, d, 1});  // one row: ld is never used to step
      return p;
    }
  }
  for (int64_t r = 0; r < n; ++r) widen(p + r * ld, buf + r * d, d);
  *ld_out = std::max<int64_t>(d, 1);
  return buf;
}

// Rows of acc (n x d, packed) times alpha, stored as T through row stride ld.
template <typename T, typename A> void store_rows(const A* src, int64_t n, int64_t d, A alpha, T* dst, int64_t ld) {
  for (int64_t r = 0; r < n; ++r) {
    const A* s = src + r * d;
    T* o = dst + r * ld;
    for (int64_t e = 0; e < d; ++e) o[e] = static_cast<T>(s[e] * alpha);
  }
}

// exp(x - m) in place, returning the sum. m finite, x <= m: the exp_u20 polynomial (the one torch's CPU
// flash attention uses: 20 ulp, exact 0 at -inf) for fp32, Sleef's 1-ulp exp for fp64.
template <typename A> Vec<A> vexp(const Vec<A>& x) { return x.exp(); }
template <> Vec<float> vexp<float>(const Vec<float>& x) { return x.exp_u20(); }

template <typename A> A exp_shifted(A* x, int64_t n, A m) {
  constexpr int64_t V = Vec<A>::size();
  const Vec<A> vm(m);
  Vec<A> vsum(A(0));
  int64_t c = 0;
  for (; c + V <= n; c += V) {
    Vec<A> p = vexp(Vec<A>::loadu(x + c) - vm);
    p.store(x + c);
    vsum = vsum + p;
  }
  A sum = at::vec::vec_reduce_all<A>([](const Vec<A>& a, const Vec<A>& b) { return a + b; }, vsum);
  for (; c < n; ++c) {
    x[c] = std::exp(x[c] - m);
    sum += x[c];
  }
  return sum;
}

// The same for an m that is NaN or +inf (std::exp keeps torch's NaNs; the polynomial clamps them away).
template <typename A> A exp_shifted_slow(A* x, int64_t n, A m) {
  A sum = A(0);
  for (int64_t c = 0; c < n; ++c) {
    x[c] = std::exp(x[c] - m);
    sum += x[c];
  }
  return sum;
}

template <typename A> A row_max(const A* x, int64_t n) {  // NaN if any is NaN
  return at::vec::reduce_all<A>([](const Vec<A>& a, const Vec<A>& b) { return at::vec::maximum(a, b); }, x, n);
}

// Everything that is fixed for one call.
struct Problem {
  int64_t B, Hq, Hkv, G, L, S, E, Ev;
  bool causal;
  double scale;
  float dropout_p;
  uint64_t seed, offset;
  // The mask: none, bool (True takes part), fp32 or the inputs' dtype (added); (B, Hq, L, S) strides.
  enum MaskKind { kNoMask, kBoolMask, kFloatMask, kSameMask } mask_kind;
  const void* mask;
  int64_t msb, msh, msm, msn;
};

template <typename A, typename M>
void apply_mask(A* s, int64_t bm, int64_t bn, const M* m, int64_t sm, int64_t sn) {
  for (int64_t r = 0; r < bm; ++r) {
    A* row = s + r * bn;
    const M* mr = m + r * sm;
    for (int64_t c = 0; c < bn; ++c) {
      if constexpr (std::is_same_v<M, uint8_t>) {
        if (!mr[c * sn]) row[c] = kNegInf<A>;
      } else {
        row[c] += static_cast<A>(mr[c * sn]);
      }
    }
  }
}

// The mask and causality (key j > query i) on the scores tile s (bm x bn, queries m0.., keys n0..).
template <typename T, typename A>
void mask_scores(const Problem& pr, A* s, int64_t bm, int64_t bn, int64_t b, int64_t h, int64_t m0, int64_t n0) {
  const int64_t moff = b * pr.msb + h * pr.msh + m0 * pr.msm + n0 * pr.msn;
  switch (pr.mask_kind) {
    case Problem::kBoolMask:
      apply_mask(s, bm, bn, static_cast<const uint8_t*>(pr.mask) + moff, pr.msm, pr.msn);
      break;
    case Problem::kFloatMask:
      apply_mask(s, bm, bn, static_cast<const float*>(pr.mask) + moff, pr.msm, pr.msn);
      break;
    case Problem::kSameMask:
      apply_mask(s, bm, bn, static_cast<const T*>(pr.mask) + moff, pr.msm, pr.msn);
      break;
    case Problem::kNoMask:
      break;
  }
  if (pr.causal && n0 + bn - 1 > m0) {
    for (int64_t r = 0; r < bm; ++r) {
      const int64_t first = std::max<int64_t>(m0 + r + 1 - n0, 0);  // first key past the diagonal
      if (first < bn) std::fill(s + r * bn + first, s + (r + 1) * bn, kNegInf<A>);
    }
  }
}

// Philox4x32-10 (Salmon et al., SC'11): four 32-bit outputs that are a pure function of a 128-bit
// counter and a 64-bit key, so any element's draw can be regenerated anywhere (the backward, another
// thread) without state. Torch-free: it can move to common/numerics.h when a CUDA kernel needs the
// same stream.
struct Philox4 {
  uint32_t x[4];
};

inline Philox4 philox4x32_10(uint64_t counter, uint64_t key) {
  uint32_t c0 = uint32_t(counter), c1 = uint32_t(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(key), k1 = uint32_t(key >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0, p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// Dropout's keep flags of keys n0 .. n0 + n - 1 of query row i of head (b, h). The draw of element
// index t (its counter plus the offset) is output t % 4 of Philox(t / 4; seed) as a uniform in [0, 1)
// from its top 24 bits: one Philox call serves 4 consecutive elements (its outputs are independent).
void keep_row(const Problem& pr, int64_t b, int64_t h, int64_t i, int64_t n0, int64_t n, uint8_t* keep) {
  uint64_t idx = pr.offset + uint64_t(((b * pr.Hq + h) * pr.L + i) * pr.S + n0);
  for (int64_t c = 0; c < n;) {
    const Philox4 r = philox4x32_10(idx >> 2, pr.seed);
    for (unsigned lane = unsigned(idx & 3); lane < 4 && c < n; ++lane, ++c, ++idx)
      keep[c] = float(r.x[lane] >> 8) * 5.9604644775390625e-8f >= pr.dropout_p;  // 2^-24
  }
}

// ----------------------------------------------------------------------------- forward
template <typename T>
void attention_fwd_impl(const Problem& pr, View<const T> q, View<const T> k, View<const T> v, View<T> o,
                        acc_t<T>* lse) {
  using A = acc_t<T>;
  const int64_t L = pr.L, S = pr.S, E = pr.E, Ev = pr.Ev, nmb = divup(L, kBlockM);
  const bool dropout = pr.dropout_p > 0.f;
  const A drop_scale = pr.dropout_p < 1.f ? A(1) / (A(1) - A(pr.dropout_p)) : A(0);
  at::parallel_for(0, pr.B * pr.Hq * nmb, 1, [&](int64_t begin, int64_t end) {
    Scratch<A> qbuf(kBlockM * E), kbuf(kBlockN * E), vbuf(kBlockN * Ev), s(kBlockM * kBlockN), acc(kBlockM * Ev);
    std::vector<A> mrow(kBlockM), lrow(kBlockM);
    std::vector<uint8_t> keep(kBlockN);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t bh = idx / nmb, t = idx % nmb, b = bh / pr.Hq, h = bh % pr.Hq, hk = h / pr.G;
      // Query blocks in the order 0, last, 1, last - 1, ...: under causality a light and a heavy block
      // alternate, so the threads' contiguous ranges of items carry about equal work.
      const int64_t m0 = (t % 2 == 0 ? t / 2 : nmb - 1 - t / 2) * kBlockM, bm = std::min(kBlockM, L - m0);
      int64_t ldq, ldk, ldv;
      const A* qa = as_acc(q.row(b, h, m0), q.sr, bm, E, qbuf.data(), &ldq);
      std::fill(acc.begin(), acc.end(), A(0));
      std::fill(mrow.begin(), mrow.end(), kNegInf<A>);
      std::fill(lrow.begin(), lrow.end(), A(0));
      const int64_t hi = pr.causal ? std::min(S, m0 + bm) : S;  // keys past the last row's diagonal: unseen
      for (int64_t n0 = 0; n0 < hi; n0 += kBlockN) {
        const int64_t bn = std::min(kBlockN, hi - n0);
        const A* ka = as_acc(k.row(b, hk, n0), k.sr, bn, E, kbuf.data(), &ldk);
        const A* va = as_acc(v.row(b, hk, n0), v.sr, bn, Ev, vbuf.data(), &ldv);
        gemm<A>(kT, kN, bn, bm, E, A(pr.scale), ka, ldk, qa, ldq, A(0), s.data(), bn);
        mask_scores<T>(pr, s.data(), bm, bn, b, h, m0, n0);
        for (int64_t r = 0; r < bm; ++r) {
          A* p = s.data() + r * bn;
          const A mx = row_max(p, bn), m_old = mrow[r];
          const A m_new = (std::isnan(mx) || mx > m_old) ? mx : m_old;
          if (m_new == kNegInf<A>) {  // nothing visible yet: p = 0, acc and l stay 0
            std::fill(p, p + bn, A(0));
            continue;
          }
          const A sum = std::isfinite(m_new) ? exp_shifted(p, bn, m_new) : exp_shifted_slow(p, bn, m_new);
          const A alpha = std::exp(m_old - m_new);  // 0 for the first visible block, NaN stays NaN
          lrow[r] = lrow[r] * alpha + sum;  // before dropout: lse is the undropped one
          mrow[r] = m_new;
          if (!(alpha == A(1))) {
            A* ar = acc.data() + r * Ev;
            for (int64_t e = 0; e < Ev; ++e) ar[e] *= alpha;
          }
          if (dropout) {
            keep_row(pr, b, h, m0 + r, n0, bn, keep.data());
            for (int64_t c = 0; c < bn; ++c) p[c] *= keep[c] ? drop_scale : A(0);
          }
        }
        gemm<A>(kN, kN, Ev, bm, bn, A(1), va, ldv, s.data(), bn, A(1), acc.data(), Ev);
      }
      A* lse_bh = lse + bh * L;
      for (int64_t r = 0; r < bm; ++r) {
        const A l = lrow[r];
        // A fully masked row (l = 0): o = 0, lse = -inf.
        store_rows(acc.data() + r * Ev, 1, Ev, l == A(0) ? A(0) : A(1) / l, o.row(b, h, m0 + r), 0);
        lse_bh[m0 + r] = l == A(0) ? kNegInf<A> : mrow[r] + std::log(l);
      }
    }
  });
}

// ----------------------------------------------------------------------------- backward
// P = exp(scale q k^T + mask - lse) of one tile (bm queries from m0, bn keys from n0) into s (bm x bn);
// 0 on fully masked rows (lse = -inf).
template <typename T, typename A>
void probs_tile(const Problem& pr, A* s, const A* qa, int64_t ldq, const A* ka, int64_t ldk, const A* lse_rows,
                int64_t bm, int64_t bn, int64_t b, int64_t h, int64_t m0, int64_t n0) {
  gemm<A>(kT, kN, bn, bm, pr.E, A(pr.scale), ka, ldk, qa, ldq, A(0), s, bn);
  mask_scores<T>(pr, s, bm, bn, b, h, m0, n0);
  for (int64_t r = 0; r < bm; ++r) {
    A* p = s + r * bn;
    const A lse_r = lse_rows[r];
    if (lse_r == kNegInf<A>)
      std::fill(p, p + bn, A(0));
    else if (std::isfinite(lse_r))
      exp_shifted(p, bn, lse_r);
    else
      exp_shifted_slow(p, bn, lse_r);
  }
}

// dP = dO v^T of one tile into dp; under dropout times keep / (1 - p), and pd = P keep / (1 - p).
template <typename A>
void dprobs_tile(const Problem& pr, A* dp, A* pd, const A* p, const A* da, int64_t ldd, const A* va, int64_t ldv,
                 int64_t bm, int64_t bn, int64_t b, int64_t h, int64_t m0, int64_t n0, uint8_t* keep) {
  gemm<A>(kT, kN, bn, bm, pr.Ev, A(1), va, ldv, da, ldd, A(0), dp, bn);
  if (pr.dropout_p <= 0.f) return;
  const A drop_scale = pr.dropout_p < 1.f ? A(1) / (A(1) - A(pr.dropout_p)) : A(0);
  for (int64_t r = 0; r < bm; ++r) {
    keep_row(pr, b, h, m0 + r, n0, bn, keep);
    for (int64_t j = 0; j < bn; ++j) {
      const A f = keep[j] ? drop_scale : A(0);
      dp[r * bn + j] *= f;
      if (pd != nullptr) pd[r * bn + j] = p[r * bn + j] * f;
    }
  }
}

template <typename T>
void attention_bwd_impl(const Problem& pr, View<const T> dout, View<const T> q, View<const T> k, View<const T> v,
                        View<const T> o, const acc_t<T>* lse, View<T> dq, View<T> dk, View<T> dv,
                        acc_t<T>* dmask) {
  using A = acc_t<T>;
  const int64_t B = pr.B, Hq = pr.Hq, Hkv = pr.Hkv, G = pr.G, L = pr.L, S = pr.S, E = pr.E, Ev = pr.Ev;
  const bool dropout = pr.dropout_p > 0.f;
  const A scale = A(pr.scale);

  // delta = rowsum(P * dP) (dropout included) = rowsum(dout * o) in exact arithmetic. For fp32/fp64 from
  // o; a 2-byte o is rounded (its delta would put dq, dk at ~3x the error of torch's fp32 math path), so
  // there a first pass over the keys sums P * dP in fp32 (FlashAttention's "precise" delta: +40% GEMMs).
  std::vector<A> delta(B * Hq * L);
  if constexpr (std::is_same_v<T, A>) {
    at::parallel_for(0, B * Hq * L, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t bh = r / L, i = r % L;
        const A* a = dout.row(bh / Hq, bh % Hq, i);
        const A* c = o.row(bh / Hq, bh % Hq, i);
        A d = A(0);
        for (int64_t e = 0; e < Ev; ++e) d += a[e] * c[e];
        delta[r] = d;
      }
    });
  } else {
    const int64_t nmb = divup(L, kBBlockM);
    at::parallel_for(0, B * Hq * nmb, 1, [&](int64_t begin, int64_t end) {
      Scratch<A> qbuf(kBBlockM * E), dobuf(kBBlockM * Ev), kbuf(kBBlockN * E), vbuf(kBBlockN * Ev),
          s(kBBlockM * kBBlockN), dp(kBBlockM * kBBlockN);
      std::vector<uint8_t> keep(kBBlockN);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t bh = idx / nmb, b = bh / Hq, h = bh % Hq, hk = h / G, m0 = idx % nmb * kBBlockM;
        const int64_t bm = std::min(kBBlockM, L - m0);
        int64_t ldq, ldd, ldk, ldv;
        const A* qa = as_acc(q.row(b, h, m0), q.sr, bm, E, qbuf.data(), &ldq);
        const A* da = as_acc(dout.row(b, h, m0), dout.sr, bm, Ev, dobuf.data(), &ldd);
        A* drow = delta.data() + bh * L + m0;
        std::fill_n(drow, bm, A(0));
        const int64_t hi = pr.causal ? std::min(S, m0 + bm) : S;
        for (int64_t n0 = 0; n0 < hi; n0 += kBBlockN) {
          const int64_t bn = std::min(kBBlockN, hi - n0);
          const A* ka = as_acc(k.row(b, hk, n0), k.sr, bn, E, kbuf.data(), &ldk);
          const A* va = as_acc(v.row(b, hk, n0), v.sr, bn, Ev, vbuf.data(), &ldv);
          probs_tile<T>(pr, s.data(), qa, ldq, ka, ldk, lse + bh * L + m0, bm, bn, b, h, m0, n0);
          dprobs_tile<A>(pr, dp.data(), nullptr, s.data(), da, ldd, va, ldv, bm, bn, b, h, m0, n0, keep.data());
          for (int64_t r = 0; r < bm; ++r) {
            const A* pr_ = s.data() + r * bn;
            const A* dpr = dp.data() + r * bn;
            A d = A(0);
            for (int64_t j = 0; j < bn; ++j) d += pr_[j] * dpr[j];
            drow[r] += d;
          }
        }
      }
    });
  }

  // Items (batch, kv head, set of key blocks jb = set, set + split, ...): with few heads a head's key
  // blocks are split between sets so that every thread has work; each set then has its own dq partial.
  const int64_t nnb = divup(S, kBBlockN);
  const int64_t want = divup(2 * at::get_num_threads(), std::max<int64_t>(B * Hkv, 1));  // 2 items a thread
  const int64_t split = std::max<int64_t>(1, std::min({want, kMaxSplit, nnb}));
  // dq accumulates in place when it is a BLAS matrix of A and has one writer; else in fp32 partials.
  const bool direct = std::is_same_v<T, A> && split == 1 && (dq.sr >= E || L <= 1);
  at::Tensor part;
  if (!direct)
    part = at::empty({split * B * Hq * L * E}, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
  A* partp = direct ? nullptr : part.data_ptr<A>();
  auto dq_row = [&](int64_t c, int64_t b, int64_t h, int64_t i) -> A* {
    if constexpr (std::is_same_v<T, A>) {
      if (direct) return dq.row(b, h, i);
    }
    return partp + (((c * B + b) * Hq + h) * L + i) * E;
  };
  const int64_t lddq = direct ? std::max<int64_t>({dq.sr, E, 1}) : std::max<int64_t>(E, 1);

  at::parallel_for(0, B * Hkv * split, 1, [&](int64_t begin, int64_t end) {
    Scratch<A> qbuf(kBBlockM * E), dobuf(kBBlockM * Ev), kbuf(kBBlockN * E), vbuf(kBBlockN * Ev),
        s(kBBlockM * kBBlockN), dp(kBBlockM * kBBlockN), pd(dropout ? kBBlockM * kBBlockN : 0), dkl(kBBlockN * E),
        dvl(kBBlockN * Ev);
    std::vector<uint8_t> keep(kBBlockN);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t c = idx % split, b = idx / split / Hkv, hk = idx / split % Hkv;
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h)
        for (int64_t i = 0; i < L; ++i) std::fill_n(dq_row(c, b, h, i), E, A(0));
      for (int64_t jb = c; jb < nnb; jb += split) {
        const int64_t n0 = jb * kBBlockN, bn = std::min(kBBlockN, S - n0);
        int64_t ldk, ldv, ldq, ldd;
        const A* ka = as_acc(k.row(b, hk, n0), k.sr, bn, E, kbuf.data(), &ldk);
        const A* va = as_acc(v.row(b, hk, n0), v.sr, bn, Ev, vbuf.data(), &ldv);
        std::fill(dkl.begin(), dkl.end(), A(0));
        std::fill(dvl.begin(), dvl.end(), A(0));
        const int64_t m_start = pr.causal ? std::min(n0, L) : 0;  // queries before n0 see none of these keys
        for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
          const int64_t bh = b * Hq + h;
          if (dmask != nullptr)  // the skipped causal tiles' dS is 0
            for (int64_t i = 0; i < m_start; ++i) std::fill_n(dmask + (bh * L + i) * S + n0, bn, A(0));
          for (int64_t m0 = m_start; m0 < L; m0 += kBBlockM) {
            const int64_t bm = std::min(kBBlockM, L - m0);
            const A* qa = as_acc(q.row(b, h, m0), q.sr, bm, E, qbuf.data(), &ldq);
            const A* da = as_acc(dout.row(b, h, m0), dout.sr, bm, Ev, dobuf.data(), &ldd);
            probs_tile<T>(pr, s.data(), qa, ldq, ka, ldk, lse + bh * L + m0, bm, bn, b, h, m0, n0);
            dprobs_tile<A>(pr, dp.data(), pd.data(), s.data(), da, ldd, va, ldv, bm, bn, b, h, m0, n0, keep.data());
            // dV += Pd^T dO
            gemm<A>(kN, kT, Ev, bn, bm, A(1), da, ldd, dropout ? pd.data() : s.data(), bn, A(1), dvl.data(), Ev);
            for (int64_t r = 0; r < bm; ++r) {  // dS = P (dP - delta), into dp
              const A* p = s.data() + r * bn;
              A* ds = dp.data() + r * bn;
              const A d = delta[bh * L + m0 + r];
              for (int64_t j = 0; j < bn; ++j) ds[j] = p[j] * (ds[j] - d);
              if (dmask != nullptr) std::copy(ds, ds + bn, dmask + (bh * L + m0 + r) * S + n0);
            }
            gemm<A>(kN, kT, E, bn, bm, scale, qa, ldq, dp.data(), bn, A(1), dkl.data(), E);  // dK += scale dS^T Q
            // dQ += scale dS K
            gemm<A>(kN, kN, E, bm, bn, scale, ka, ldk, dp.data(), bn, A(1), dq_row(c, b, h, m0), lddq);
          }
        }
        store_rows(dkl.data(), bn, E, A(1), dk.row(b, hk, n0), dk.sr);
        store_rows(dvl.data(), bn, Ev, A(1), dv.row(b, hk, n0), dv.sr);
      }
    }
  });

  if (!direct) {  // dq = the sum of the sets' partials, in set order
    at::parallel_for(0, B * Hq * L, 64, [&](int64_t begin, int64_t end) {
      std::vector<A> sum(E);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t bh = r / L, i = r % L;
        std::copy_n(partp + r * E, E, sum.data());
        for (int64_t c = 1; c < split; ++c) {
          const A* pc = partp + (c * B * Hq * L + r) * E;
          for (int64_t e = 0; e < E; ++e) sum[e] += pc[e];
        }
        store_rows(sum.data(), 1, E, A(1), dq.row(bh / Hq, bh % Hq, i), 0);
      }
    });
  }
}

// ----------------------------------------------------------------------------- argument checks
bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "attention (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "attention (cpu): ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "attention (cpu): ", name, " must have shape ", shape, ", got ", t.sizes());
}

// A (B, H, rows, d) operand read or written row by row: unit stride along d.
void check_rows(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.dim() == 4, "attention (cpu): ", name, " must be 4-D, got ", t.dim(), "-D");
  check_tensor(t, name, dtype, shape);
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "attention (cpu): ", name,
              " must have a unit-stride last dim, got strides ", t.strides());
}

void check_output(const at::Tensor& t, const char* name, std::initializer_list<const at::Tensor*> inputs) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "attention (cpu): output ", name,
              " has overlapping elements (strides ", t.strides(), ")");
  for (const at::Tensor* in : inputs)
    if (in->defined()) at::assert_no_overlap(t, *in);
}

at::ScalarType acc_scalar(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Checks q, k, v, the mask and the scalars; returns the problem (mask pointer and strides included).
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, bool causal, double scale, double dropout_p,
                     int64_t seed, int64_t offset) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention (cpu): q, k, v must be 4-D, got ", q.dim(),
              "-D, ", k.dim(), "-D, ", v.dim(), "-D");
  TORCH_CHECK(is_float(q.scalar_type()), "attention (cpu): q must be float32, float64, float16 or bfloat16, got ",
              q.scalar_type());
  Problem pr{};
  pr.B = q.size(0), pr.Hq = q.size(1), pr.L = q.size(2), pr.E = q.size(3);
  pr.Hkv = k.size(1), pr.S = k.size(2), pr.Ev = v.size(3);
  check_rows(q, "q", q.scalar_type(), q.sizes());
  check_rows(k, "k", q.scalar_type(), {pr.B, pr.Hkv, pr.S, pr.E});
  check_rows(v, "v", q.scalar_type(), {pr.B, pr.Hkv, pr.S, pr.Ev});
  TORCH_CHECK(pr.Hkv > 0 && pr.Hq % pr.Hkv == 0, "attention (cpu): the query heads (", pr.Hq,
              ") must be a multiple of the kv heads (", pr.Hkv, ")");
  pr.G = pr.Hq / pr.Hkv;
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "attention (cpu): dropout_p must be in [0, 1], got ", dropout_p);
  pr.causal = causal, pr.scale = scale, pr.dropout_p = float(dropout_p);
  pr.seed = uint64_t(seed), pr.offset = uint64_t(offset);
  pr.mask_kind = Problem::kNoMask;
  pr.mask = nullptr;
  pr.msb = pr.msh = pr.msm = pr.msn = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    const auto mt = m.scalar_type();
    TORCH_CHECK(mt == at::kBool || mt == at::kFloat || mt == q.scalar_type(), "attention (cpu): the mask must be "
                "bool, float32 or q's dtype (", q.scalar_type(), "), got ", mt);
    TORCH_CHECK(m.dim() == 4, "attention (cpu): the mask must be a 4-D (B, Hq, L, S) view, got ", m.dim(), "-D");
    check_tensor(m, "mask", mt, {pr.B, pr.Hq, pr.L, pr.S});
    pr.mask_kind = mt == at::kBool ? Problem::kBoolMask : mt == at::kFloat ? Problem::kFloatMask : Problem::kSameMask;
    pr.mask = m.data_ptr();
    pr.msb = m.stride(0), pr.msh = m.stride(1), pr.msm = m.stride(2), pr.msn = m.stride(3);
  }
  return pr;
}

void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                   bool causal, double scale, double dropout_p, int64_t seed, int64_t offset, const at::Tensor& o,
                   const at::Tensor& lse) {
  const Problem pr = make_problem(q, k, v, mask, causal, scale, dropout_p, seed, offset);
  check_rows(o, "o", q.scalar_type(), {pr.B, pr.Hq, pr.L, pr.Ev});
  check_tensor(lse, "lse", acc_scalar(q.scalar_type()), {pr.B, pr.Hq, pr.L});
  TORCH_CHECK(lse.is_contiguous(), "attention (cpu): lse must be contiguous, got strides ", lse.strides());
  const at::Tensor none;
  const at::Tensor& m = mask.has_value() ? *mask : none;
  check_output(o, "o", {&q, &k, &v, &m, &lse});
  check_output(lse, "lse", {&q, &k, &v, &m});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd", [&] {
    attention_fwd_impl<scalar_t>(pr, view<const scalar_t>(q), view<const scalar_t>(k), view<const scalar_t>(v),
                                 view<scalar_t>(o), static_cast<acc_t<scalar_t>*>(lse.data_ptr()));
  });
}

void attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& o, const at::Tensor& lse, const std::optional<at::Tensor>& mask, bool causal,
                   double scale, double dropout_p, int64_t seed, int64_t offset, const at::Tensor& dq,
                   const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& dmask) {
  const Problem pr = make_problem(q, k, v, mask, causal, scale, dropout_p, seed, offset);
  const auto dt = q.scalar_type(), acc = acc_scalar(dt);
  check_rows(dout, "dout", dt, {pr.B, pr.Hq, pr.L, pr.Ev});
  check_rows(o, "o", dt, {pr.B, pr.Hq, pr.L, pr.Ev});
  check_tensor(lse, "lse", acc, {pr.B, pr.Hq, pr.L});
  TORCH_CHECK(lse.is_contiguous(), "attention (cpu): lse must be contiguous, got strides ", lse.strides());
  check_rows(dq, "dq", dt, q.sizes());
  check_rows(dk, "dk", dt, k.sizes());
  check_rows(dv, "dv", dt, v.sizes());
  const bool want_dmask = dmask.numel() != 0;
  if (want_dmask) {
    check_tensor(dmask, "dmask", acc, {pr.B, pr.Hq, pr.L, pr.S});
    TORCH_CHECK(dmask.is_contiguous(), "attention (cpu): dmask must be contiguous, got strides ", dmask.strides());
  } else {
    TORCH_CHECK(dmask.device().is_cpu(), "attention (cpu): dmask must be a CPU tensor, got ", dmask.device());
  }
  const at::Tensor none;
  const at::Tensor& m = mask.has_value() ? *mask : none;
  for (const auto& [out, name] : {std::pair{&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}, {&dmask, "dmask"}})
    if (out->numel() != 0) check_output(*out, name, {&dout, &q, &k, &v, &o, &lse, &m});
  at::assert_no_overlap(dq, dk);
  at::assert_no_overlap(dq, dv);
  at::assert_no_overlap(dk, dv);
  if (want_dmask)
    for (const at::Tensor* g : {&dq, &dk, &dv}) at::assert_no_overlap(dmask, *g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "attention_bwd", [&] {
    using A = acc_t<scalar_t>;
    attention_bwd_impl<scalar_t>(pr, view<const scalar_t>(dout), view<const scalar_t>(q), view<const scalar_t>(k),
                                 view<const scalar_t>(v), view<const scalar_t>(o),
                                 static_cast<const A*>(lse.data_ptr()), view<scalar_t>(dq), view<scalar_t>(dk),
                                 view<scalar_t>(dv), want_dmask ? static_cast<A*>(dmask.data_ptr()) : nullptr);
  });
}

}  // namespace
}  // namespace fusedstab

TORCH_LIBRARY_IMPL(fusedstab_C, CPU, m) {
  m.impl("attention_fwd", &fusedstab::attention_fwd);
  m.impl("attention_bwd", &fusedstab::attention_bwd);
}
