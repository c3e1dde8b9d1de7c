// bias + Leaky ReLU: the torch glue of the CUDA kernels (argument checks, the current stream,
// TORCH_LIBRARY_IMPL). The public op (fusedstab/ops/bias_leaky_relu.py) allocated the outputs.
#include <algorithm>

#include "cuda/bias_leaky_relu.h"
#include "cuda/glue.h"

namespace fusedstab {
namespace cuda {
namespace {

void check_rows(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  check_device(t, ref, name);
  check_contiguous(t, name);
  check_shape(t, ref.sizes(), name);
}

// The bias (C,) in y's dtype (a copy of C elements where it is narrower: exact).
at::Tensor bias_as(const c10::optional<at::Tensor>& bias, const at::Tensor& x, at::ScalarType dtype, int64_t C) {
  const at::Tensor& b = *bias;
  check_device(b, x, "bias");
  TORCH_CHECK(b.dim() == 1 && b.size(0) == C, "bias: expected shape [", C, "], got ", b.sizes());
  dtype_of(b, "bias");
  return b.to(dtype).contiguous();
}

void fwd(const at::Tensor& x, const c10::optional<at::Tensor>& bias, double slope, bool per_row, const at::Tensor& y,
         const at::Tensor& mask) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.numel() > 0, "bias_leaky_relu_fwd: x must be a non-empty 2-D CUDA tensor");
  check_contiguous(x, "x");
  check_rows(y, x, "y");
  const int64_t R = x.size(0), L = x.size(1);
  const DType xd = dtype_of(x, "x"), yd = dtype_of(y, "y");
  TORCH_CHECK(xd == yd || dtype_size(yd) > dtype_size(xd),
              "bias_leaky_relu_fwd: y's dtype ", y.scalar_type(), " must be x's or wider, got x ", x.scalar_type());
  int64_t C = per_row ? 0 : L;
  at::Tensor b;
  if (bias.has_value()) {
    C = bias->numel();
    TORCH_CHECK(C > 0 && (per_row ? R % C == 0 : C == L), "bias_leaky_relu_fwd: a bias of ", C,
                per_row ? " elements must divide the rows, " : " elements must match the columns, ", "got (", R, ", ", L, ")");
    b = bias_as(bias, x, y.scalar_type(), C);
  }
  const bool save_mask = slope < 0;
  if (save_mask) {
    check_device(mask, x, "mask");
    check_dtype(mask, at::kByte, "mask");
    check_contiguous(mask, "mask");
    check_shape(mask, {R, (L + 7) / 8}, "mask");
  }
  c10::cuda::CUDAGuard guard(x.device());
  BiasLeakyReluFwd a{x.data_ptr(), b.defined() ? b.data_ptr() : nullptr, y.data_ptr(),
                     save_mask ? mask.data_ptr<uint8_t>() : nullptr, R, L, std::max<int64_t>(C, 1), slope, per_row,
                     xd, yd};
  C10_CUDA_CHECK(bias_leaky_relu_fwd(a, stream_of(x)));
}

void bwd(const at::Tensor& dy, const at::Tensor& saved, double slope, bool per_row, int64_t C, const at::Tensor& dx,
         const at::Tensor& dbias) {
  TORCH_CHECK(dy.is_cuda() && dy.dim() == 2 && dy.numel() > 0, "bias_leaky_relu_bwd: dy must be a non-empty 2-D CUDA tensor");
  check_contiguous(dy, "dy");
  const int64_t R = dy.size(0), L = dy.size(1);
  const DType dd = dtype_of(dy, "dy");
  const bool use_mask = slope < 0;
  check_device(saved, dy, "saved");
  check_contiguous(saved, "saved");
  if (use_mask) {
    check_dtype(saved, at::kByte, "saved mask");
    check_shape(saved, {R, (L + 7) / 8}, "saved mask");
  } else {
    check_dtype(saved, dy.scalar_type(), "saved y");
    check_shape(saved, dy.sizes(), "saved y");
  }
  const bool need_dx = dx.numel() > 0, need_db = dbias.numel() > 0;
  DType xd = dd;
  if (need_dx) {
    check_rows(dx, dy, "dx");
    xd = dtype_of(dx, "dx");
    TORCH_CHECK(xd == dd || dtype_size(dd) > dtype_size(xd), "bias_leaky_relu_bwd: dx's dtype ", dx.scalar_type(),
                " must be dy's or narrower, got dy ", dy.scalar_type());
  }
  if (need_db) {
    TORCH_CHECK(C > 0 && (per_row ? R % C == 0 : C == L), "bias_leaky_relu_bwd: C = ", C,
                per_row ? " must divide the rows, " : " must match the columns, ", "got (", R, ", ", L, ")");
    check_device(dbias, dy, "dbias");
    check_dtype(dbias, acc_scalar_type(dy.scalar_type()), "dbias");
    check_shape(dbias, {C}, "dbias");
  }
  if (!need_dx && !need_db) return;
  c10::cuda::CUDAGuard guard(dy.device());
  const int64_t n_part = bias_leaky_relu_bwd_partials(R, L, per_row, need_db);
  at::Tensor part = need_db ? at::empty({n_part}, dy.options().dtype(acc_scalar_type(dy.scalar_type()))) : at::Tensor();
  BiasLeakyReluBwd a{dy.data_ptr(), saved.data_ptr(), need_dx ? dx.data_ptr() : nullptr,
                     need_db ? dbias.data_ptr() : nullptr, need_db ? part.data_ptr() : nullptr, R, L,
                     std::max<int64_t>(C, 1), slope, per_row, use_mask, dd, xd};
  C10_CUDA_CHECK(bias_leaky_relu_bwd(a, stream_of(dy)));
}

}  // namespace
}  // namespace cuda
}  // namespace fusedstab

TORCH_LIBRARY_IMPL(fusedstab_C, CUDA, m) {
  m.impl("bias_leaky_relu_fwd", &fusedstab::cuda::fwd);
  m.impl("bias_leaky_relu_bwd", &fusedstab::cuda::bwd);
}
