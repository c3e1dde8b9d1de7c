// bias + Leaky ReLU (forward, backward) and Linear + bias + Leaky ReLU (forward) on CPU.
//
// The elementwise ops see an (R, L) view in memory order with the bias per column (L == C) or per row
// (index row % C). One pass each way, rows split over threads: forward reads x, writes y (and the
// packed sign mask, one byte per 8 columns, when slope < 0); backward reads dy and y (or the mask),
// writes dx and sums dbias. The Linear op is the BLAS matmul into y, then that same forward pass in
// place over y: bias, activation and mask together.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/vec_io.h"

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace fusedstab::cpu {
namespace {

constexpr const char* kFwd = "bias_leaky_relu_fwd";
constexpr const char* kBwd = "bias_leaky_relu_bwd";
constexpr const char* kLinear = "linear_leaky_relu_fwd";

// ------------------------------------------------------------------------ sign masks <-> bits
// Bit j of the result is lane j of the comparison mask m (all-ones lanes where true).
template <typename A> inline uint32_t lane_bits(const Vectorized<A>& m) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) return uint32_t(_mm256_movemask_ps(m));
  else return uint32_t(_mm256_movemask_pd(m));
#else
  __at_align__ A buf[kLanes<A>];
  m.store(buf);
  uint32_t bits = 0;
  for (int64_t j = 0; j < kLanes<A>; ++j) {
    uint64_t u = 0;
    std::memcpy(&u, &buf[j], sizeof(A));
    bits |= uint32_t(u != 0) << j;
  }
  return bits;
#endif
}

// The comparison mask whose lane j is bit j of bits.
template <typename A> inline Vectorized<A> bits_to_lanes(uint32_t bits) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i b = _mm256_and_si256(_mm256_set1_epi32(int(bits)), sel);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, sel));
  } else {
    const __m256i sel = _mm256_setr_epi64x(1, 2, 4, 8);
    __m256i b = _mm256_and_si256(_mm256_set1_epi64x(int64_t(bits)), sel);
    return _mm256_castsi256_pd(_mm256_cmpeq_epi64(b, sel));
  }
#else
  using U = std::conditional_t<std::is_same_v<A, float>, uint32_t, uint64_t>;
  __at_align__ A buf[kLanes<A>];
  for (int64_t j = 0; j < kLanes<A>; ++j) {
    U u = ((bits >> j) & 1) ? ~U(0) : U(0);
    std::memcpy(&buf[j], &u, sizeof(A));
  }
  return Vectorized<A>::loadu(buf);
#endif
}

// ------------------------------------------------------------------------ forward
struct FwdArgs {
  const void* x;
  void* y;
  uint8_t* mask;  // nullptr: no mask
  const void* bias_acc;  // C values of A, or nullptr
  int64_t R, L, C;
  bool per_row;
  double slope;
};

// Rows [begin, end): z = x + b, y = z > 0 ? z : z * slope (in A, rounded once to Y), mask bit = z > 0.
// Steps of 8 columns: one mask byte, 8 / K vectors.
template <typename X, typename Y> void fwd_rows(const FwdArgs& a, int64_t begin, int64_t end) {
  using A = acc_t<Y>;
  using Vec = Vectorized<A>;
  constexpr int64_t K = kLanes<A>, NV = 8 / K;
  static_assert(8 % K == 0, "a mask byte covers whole vectors");
  const int64_t L = a.L, L8 = (L + 7) / 8;
  const auto bias = static_cast<const A*>(a.bias_acc);
  const Vec vslope(static_cast<A>(a.slope)), zero(A(0));
  for (int64_t r = begin; r < end; ++r) {
    const X* x = static_cast<const X*>(a.x) + r * L;
    Y* y = static_cast<Y*>(a.y) + r * L;
    uint8_t* m = a.mask ? a.mask + r * L8 : nullptr;
    const Vec brow(bias && a.per_row ? bias[r % a.C] : A(0));
    for (int64_t i = 0; i < L; i += 8) {
      uint32_t bits = 0;
      for (int64_t v = 0; v < NV; ++v) {
        const int64_t o = i + v * K, c = std::min(K, L - o);
        if (c <= 0) break;
        Vec z = Io<A, X>::load(x + o, c);
        z += (bias && !a.per_row) ? Vec::loadu(bias + o, c) : brow;
        const Vec pos = z > zero;
        Io<A, Y>::store(y + o, Vec::blendv(z * vslope, z, pos), c);
        if (m) bits |= (lane_bits(pos) & ((1u << c) - 1)) << (v * K);  // padding bits stay 0
      }
      if (m) m[i / 8] = uint8_t(bits);
    }
  }
}

// Whether W = promote(N, W), the only pairs the ops meet (y of x and bias; dy of dx): 9 of 16.
template <typename N, typename W> constexpr bool kWidens =
    std::is_same_v<N, W> || std::is_same_v<W, double> ||
    (std::is_same_v<W, float> && (std::is_same_v<N, Half> || std::is_same_v<N, BFloat16>));

// f<N, W> for the dtypes (n, w), checked to be a kWidens pair.
template <typename Fn, template <typename, typename> class Pick>
Fn pick_pair(at::ScalarType n, at::ScalarType w) {
  TORCH_CHECK(c10::promoteTypes(n, w) == w, "fusedstab: unsupported dtype pair ", n, ", ", w);
  return with_float_type(n, [&](auto nt) {
    return with_float_type(w, [&](auto wt) -> Fn {
      using N = std::decay_t<decltype(nt)>;
      using W = std::decay_t<decltype(wt)>;
      if constexpr (kWidens<N, W>) return Pick<N, W>::fn;
      else return nullptr;
    });
  });
}

using FwdFn = void (*)(const FwdArgs&, int64_t, int64_t);
template <typename X, typename Y> struct PickFwd { static constexpr FwdFn fn = &fwd_rows<X, Y>; };
FwdFn fwd_fn(at::ScalarType x, at::ScalarType y) { return pick_pair<FwdFn, PickFwd>(x, y); }

// The bias as C values of the accumulation type A of y (any float dtype, any stride).
std::vector<char> bias_acc(const at::Tensor& b, at::ScalarType acc) {
  const int64_t C = b.numel();
  std::vector<char> out(C * c10::elementSize(acc));
  with_float_type(b.scalar_type(), [&](auto bt) {
    using B = decltype(bt);
    const B* p = b.const_data_ptr<B>();
    const int64_t s = b.stride(0);
    if (acc == at::kDouble)
      for (int64_t i = 0; i < C; ++i) reinterpret_cast<double*>(out.data())[i] = static_cast<double>(p[i * s]);
    else
      for (int64_t i = 0; i < C; ++i) reinterpret_cast<float*>(out.data())[i] = static_cast<float>(p[i * s]);
  });
  return out;
}

void run_fwd(const FwdArgs& a, at::ScalarType x, at::ScalarType y) {
  const FwdFn f = fwd_fn(x, y);
  at::parallel_for(0, a.R, std::max<int64_t>(1, 16384 / std::max<int64_t>(a.L, 1)),
                   [&](int64_t b, int64_t e) { f(a, b, e); });
}

void check_mask(const at::Tensor& mask, double slope, int64_t R, int64_t L, const char* op) {
  if (slope < 0) {
    check_dense(mask, {R, (L + 7) / 8}, at::kByte, op, "mask");
  } else {
    TORCH_CHECK(mask.numel() == 0, op, ": mask must be empty for slope >= 0 (or NaN), got shape ",
                mask.sizes());
  }
}

void bias_leaky_relu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias, double slope, bool per_row,
                         at::Tensor& y, at::Tensor& mask) {
  check_float(x, kFwd, "x");
  TORCH_CHECK(x.dim() == 2, kFwd, ": x must be 2-D (rows, columns), got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), kFwd, ": x must be contiguous");
  const int64_t R = x.size(0), L = x.size(1);
  at::ScalarType yd = x.scalar_type();
  int64_t C = 1;
  if (bias.has_value()) {
    check_float(*bias, kFwd, "bias");
    TORCH_CHECK(bias->dim() == 1, kFwd, ": bias must be 1-D, got shape ", bias->sizes());
    C = bias->size(0);
    if (per_row) {
      TORCH_CHECK(C >= 1 && R % C == 0, kFwd, ": with a per-row bias the rows (", R,
                  ") must be a multiple of the bias size (", C, ")");
    } else {
      TORCH_CHECK(C == L, kFwd, ": a per-column bias must have one value per column (", L, "), got ", C);
    }
    yd = c10::promoteTypes(yd, bias->scalar_type());
  }
  check_dense(y, {R, L}, yd, kFwd, "y");
  check_mask(mask, slope, R, L, kFwd);
  if (R == 0 || L == 0) return;
  std::vector<char> b;
  if (bias.has_value()) b = bias_acc(*bias, acc_of(yd));
  run_fwd({x.const_data_ptr(), y.data_ptr(), slope < 0 ? mask.data_ptr<uint8_t>() : nullptr,
           bias.has_value() ? b.data() : nullptr, R, L, C, per_row, slope},
          x.scalar_type(), yd);
}

// ------------------------------------------------------------------------ backward
// Backward reads its two streams (dy and the saved y) kPrefetch bytes ahead in software, a cache line
// per 64 bytes: the hardware prefetcher stops at each 4 KiB page (10-20% of the backward at 1 thread;
// the forward's single stream measured no better with it).
constexpr int64_t kPrefetch = 1024;
template <typename T> inline void prefetch_ahead(const T* p, int64_t i) {
  if ((i * int64_t(sizeof(T))) % 64 < 8 * int64_t(sizeof(T))) __builtin_prefetch(p + i + kPrefetch / sizeof(T));
}

struct BwdArgs {
  const void* dy;
  const void* y;         // saved y (slope >= 0), or nullptr
  const uint8_t* mask;   // saved mask (slope < 0), or nullptr
  void* dx;              // nullptr: not needed
  void* partial;         // per_row false: one row of L values of A per row block; true: R row sums
  int64_t R, L;
  bool per_row;
  double slope;
};

// Rows [begin, end) of block p: dz = pos ? dy : dy * slope (in A); dx = dz rounded once to X.
template <typename D, typename X> void bwd_rows(const BwdArgs& a, int64_t p, int64_t begin, int64_t end) {
  using A = acc_t<D>;
  using Vec = Vectorized<A>;
  constexpr int64_t K = kLanes<A>, NV = 8 / K;
  const int64_t L = a.L, L8 = (L + 7) / 8;
  const Vec vslope(static_cast<A>(a.slope)), zero(A(0));
  A* col_part = a.partial && !a.per_row ? static_cast<A*>(a.partial) + p * L : nullptr;
  A* row_sums = a.partial && a.per_row ? static_cast<A*>(a.partial) : nullptr;
  for (int64_t r = begin; r < end; ++r) {
    const D* dy = static_cast<const D*>(a.dy) + r * L;
    const D* y = a.y ? static_cast<const D*>(a.y) + r * L : nullptr;
    const uint8_t* m = a.mask ? a.mask + r * L8 : nullptr;
    X* dx = a.dx ? static_cast<X*>(a.dx) + r * L : nullptr;
    Vec acc(A(0)), tot(A(0));  // row sum: flushed every 64 steps (precision)
    for (int64_t i = 0, step = 0; i < L; i += 8, ++step) {
      prefetch_ahead(dy, i);
      if (y) prefetch_ahead(y, i);
      const uint32_t bits = m ? m[i / 8] : 0;
      for (int64_t v = 0; v < NV; ++v) {
        const int64_t o = i + v * K, c = std::min(K, L - o);
        if (c <= 0) break;
        const Vec g = Io<A, D>::load(dy + o, c);  // 0 past the row's end
        const Vec pos = m ? bits_to_lanes<A>(bits >> (v * K)) : Io<A, D>::load(y + o, c) > zero;
        Vec dz = Vec::blendv(g * vslope, g, pos);
        if (c < K) dz = Vec::set(zero, dz, c);  // 0 * NaN slope past the row's end
        if (dx) Io<A, X>::store(dx + o, dz, c);
        if (col_part) (Vec::loadu(col_part + o, c) + dz).store(col_part + o, c);
        if (row_sums) acc += dz;
      }
      if (row_sums && step % 64 == 63) {
        tot += acc;
        acc = zero;
      }
    }
    if (row_sums) row_sums[r] = hsum(tot + acc);
  }
}

using BwdFn = void (*)(const BwdArgs&, int64_t, int64_t, int64_t);
template <typename X, typename D> struct PickBwd { static constexpr BwdFn fn = &bwd_rows<D, X>; };

void bias_leaky_relu_bwd(const at::Tensor& dy, const at::Tensor& saved, double slope, bool per_row, int64_t C,
                         at::Tensor& dx, at::Tensor& dbias) {
  check_float(dy, kBwd, "dy");
  TORCH_CHECK(dy.dim() == 2, kBwd, ": dy must be 2-D (rows, columns), got shape ", dy.sizes());
  TORCH_CHECK(dy.is_contiguous(), kBwd, ": dy must be contiguous");
  const int64_t R = dy.size(0), L = dy.size(1);
  const bool use_mask = slope < 0;
  if (use_mask) {
    check_dense(saved, {R, (L + 7) / 8}, at::kByte, kBwd, "saved (the sign mask, slope < 0)");
  } else {
    check_dense(saved, {R, L}, dy.scalar_type(), kBwd, "saved (y, slope >= 0)");
  }
  const bool need_dx = dx.numel() > 0, need_db = dbias.numel() > 0;
  if (need_dx) {
    check_float(dx, kBwd, "dx");
    check_dense(dx, {R, L}, dx.scalar_type(), kBwd, "dx");
    TORCH_CHECK(c10::promoteTypes(dx.scalar_type(), dy.scalar_type()) == dy.scalar_type(), kBwd,
                ": dx (", dx.scalar_type(), ") must not be wider than dy (", dy.scalar_type(), ")");
  }
  if (need_db) {
    if (per_row) {
      TORCH_CHECK(C >= 1 && R % C == 0, kBwd, ": with a per-row bias the rows (", R,
                  ") must be a multiple of C (", C, ")");
    } else {
      TORCH_CHECK(C == L, kBwd, ": a per-column bias needs C == columns (", L, "), got ", C);
    }
    check_dense(dbias, {C}, acc_of(dy.scalar_type()), kBwd, "dbias");
  }
  if (R == 0 || L == 0) {
    if (need_db) dbias.zero_();
    return;
  }
  const at::ScalarType acc = acc_of(dy.scalar_type());
  const at::ScalarType xd = need_dx ? dx.scalar_type() : dy.scalar_type();
  const BwdFn f = pick_pair<BwdFn, PickBwd>(xd, dy.scalar_type());
  // Row blocks: per-column dbias partials are one row per block, summed in block order.
  const int64_t P = std::min<int64_t>(R, need_db && !per_row ? at::get_num_threads() : R);
  const int64_t esz = c10::elementSize(acc);
  std::vector<char> part(need_db ? (per_row ? R : P * L) * esz : 0);
  if (need_db && !per_row) std::fill(part.begin(), part.end(), 0);  // 0.0 in both fp32 and fp64
  const BwdArgs args{dy.const_data_ptr(), use_mask ? nullptr : saved.const_data_ptr(),
                     use_mask ? saved.const_data_ptr<uint8_t>() : nullptr, need_dx ? dx.data_ptr() : nullptr,
                     need_db ? part.data() : nullptr, R, L, per_row, slope};
  const int64_t grain = P == R ? std::max<int64_t>(1, 16384 / L) : 1;
  at::parallel_for(0, P, grain, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) f(args, p, p * R / P, (p + 1) * R / P);
  });
  if (!need_db) return;
  auto reduce = [&](auto zero) {
    using A = decltype(zero);
    const A* src = reinterpret_cast<const A*>(part.data());
    A* out = dbias.data_ptr<A>();
    if (per_row) {  // dbias[c] = sum over rows r = c, c + C, ... of the row sums, in row order
      std::fill(out, out + C, A(0));
      for (int64_t r = 0; r < R; ++r) out[r % C] += src[r];
    } else {
      for (int64_t c = 0; c < L; ++c) {
        A s = src[c];
        for (int64_t p = 1; p < P; ++p) s += src[p * L + c];
        out[c] = s;
      }
    }
  };
  if (acc == at::kDouble) reduce(double(0)); else reduce(float(0));
}

// ------------------------------------------------------------------------ Linear + Leaky ReLU
void linear_leaky_relu_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           double slope, at::Tensor& y, at::Tensor& mask) {
  check_float(x, kLinear, "x");
  check_float(weight, kLinear, "weight");
  TORCH_CHECK(x.dim() == 2, kLinear, ": x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), kLinear, ": weight must have shape [N, ",
              x.size(1), "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), kLinear, ": weight must have x's dtype (",
              x.scalar_type(), "), got ", weight.scalar_type());
  const int64_t M = x.size(0), N = weight.size(0);
  if (bias.has_value()) {
    check_float(*bias, kLinear, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, kLinear, ": bias must have shape [", N, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), kLinear, ": bias must have x's dtype (",
                x.scalar_type(), "), got ", bias->scalar_type());
  }
  check_dense(y, {M, N}, x.scalar_type(), kLinear, "y");
  check_mask(mask, slope, M, N, kLinear);
  if (M == 0 || N == 0) return;
  // fp16/bf16: the bias goes into the matmul's fp32 accumulation, so z is rounded once, as eager's
  // F.linear (adding it after the bf16 rounding of x @ w.T would round twice, up to 2x its error).
  const bool bias_in_gemm = bias.has_value() && x.element_size() == 2;
  if (bias_in_gemm)
    at::addmm_out(y, *bias, x, weight.t());
  else
    at::mm_out(y, x, weight.t());
  std::vector<char> b;
  const bool fuse_bias = bias.has_value() && !bias_in_gemm;
  if (fuse_bias) b = bias_acc(*bias, acc_of(x.scalar_type()));
  run_fwd({y.const_data_ptr(), y.data_ptr(), slope < 0 ? mask.data_ptr<uint8_t>() : nullptr,
           fuse_bias ? b.data() : nullptr, M, N, N, false, slope},
          x.scalar_type(), x.scalar_type());
}

}  // namespace
}  // namespace fusedstab::cpu

TORCH_LIBRARY_IMPL(fusedstab_C, CPU, m) {
  m.impl("bias_leaky_relu_fwd", &fusedstab::cpu::bias_leaky_relu_fwd);
  m.impl("bias_leaky_relu_bwd", &fusedstab::cpu::bias_leaky_relu_bwd);
  m.impl("linear_leaky_relu_fwd", &fusedstab::cpu::linear_leaky_relu_fwd);
}
