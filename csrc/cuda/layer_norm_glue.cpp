// LayerNorm / RMSNorm (+ residual add): the torch glue of the CUDA kernels (argument checks, the
// current stream, TORCH_LIBRARY_IMPL). The public op (fusedstab/ops/layer_norm.py) allocated the
// outputs; the partial sums of dweight / dbias are scratch.
#include "cuda/glue.h"
#include "cuda/layer_norm.h"

namespace fusedstab {
namespace cuda {
namespace {

// (M, N) rows with unit column stride on ref's device.
void check_rows(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  check_device(t, ref, name);
  check_shape(t, ref.sizes(), name);
  TORCH_CHECK(t.size(1) == 1 || t.stride(1) == 1, name, ": expected unit column stride, got strides ", t.strides());
  TORCH_CHECK(t.stride(0) >= 0, name, ": expected a non-negative row stride");
}

void check_out(const at::Tensor& t, const at::Tensor& ref, at::ScalarType dtype, at::IntArrayRef shape, const char* name) {
  check_device(t, ref, name);
  check_dtype(t, dtype, name);
  check_contiguous(t, name);
  check_shape(t, shape, name);
}

// Weight / bias: (N,) contiguous; returns their dtype code (x's when there is none).
DType check_params(const c10::optional<at::Tensor>& w, const c10::optional<at::Tensor>& b, const at::Tensor& x,
                   int64_t N) {
  DType d = dtype_of(x, "x");
  c10::optional<at::ScalarType> seen;
  for (const auto* p : {&w, &b}) {
    if (!p->has_value()) continue;
    const at::Tensor& t = **p;
    const char* name = p == &w ? "weight" : "bias";
    check_device(t, x, name);
    check_contiguous(t, name);
    check_shape(t, {N}, name);
    TORCH_CHECK(!seen || *seen == t.scalar_type(), "layer_norm: weight and bias must share a dtype");
    seen = t.scalar_type();
    d = dtype_of(t, name);
  }
  return d;
}

int64_t row_stride(const at::Tensor& t) { return t.size(0) == 1 ? t.size(1) : t.stride(0); }

void fwd(const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
         const c10::optional<at::Tensor>& residual, double eps, bool rms, const at::Tensor& y, const at::Tensor& h,
         const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.numel() > 0, "layer_norm_fwd: x must be a non-empty 2-D CUDA tensor");
  check_rows(x, x, "x");
  const int64_t M = x.size(0), N = x.size(1);
  const DType xd = dtype_of(x, "x");
  const DType wd = check_params(weight, bias, x, N);
  at::Tensor res;
  DType hd = xd;
  if (residual.has_value()) {
    check_rows(*residual, x, "residual");
    dtype_of(*residual, "residual");
    const at::ScalarType hs = c10::promoteTypes(x.scalar_type(), residual->scalar_type());
    check_out(h, x, hs, x.sizes(), "h");
    hd = dtype_of(h, "h");
    // A residual narrower than h (e.g. bf16 with fp32 x): widened once (exact), rows as given.
    res = residual->scalar_type() == hs ? *residual : residual->to(hs);
  }
  TORCH_CHECK(layer_norm_dtypes_ok(xd, hd, wd), "layer_norm_fwd (cuda): unsupported dtypes: x ", x.scalar_type(),
              ", x + residual ", residual.has_value() ? h.scalar_type() : x.scalar_type(), ", parameters ",
              weight.has_value() ? weight->scalar_type() : bias.has_value() ? bias->scalar_type() : x.scalar_type());
  check_out(y, x, x.scalar_type(), x.sizes(), "y");
  const at::ScalarType acc = acc_scalar_type(residual.has_value() ? h.scalar_type() : x.scalar_type());
  check_out(rstd, x, acc, {M}, "rstd");
  if (!rms) check_out(mean, x, acc, {M}, "mean");
  c10::cuda::CUDAGuard guard(x.device());
  LayerNormFwd a{x.data_ptr(), res.defined() ? res.data_ptr() : nullptr,
                 weight.has_value() ? weight->data_ptr() : nullptr, bias.has_value() ? bias->data_ptr() : nullptr,
                 y.data_ptr(), res.defined() ? h.data_ptr() : nullptr, rms ? nullptr : mean.data_ptr(), rstd.data_ptr(),
                 M, N, row_stride(x), res.defined() ? row_stride(res) : 0, eps, rms, xd, hd, wd};
  C10_CUDA_CHECK(layer_norm_fwd(a, stream_of(x)));
}

void bwd(const at::Tensor& dy, const at::Tensor& h, const c10::optional<at::Tensor>& weight,
         const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
         const c10::optional<at::Tensor>& dh, bool rms, const at::Tensor& dx, const at::Tensor& dweight,
         const at::Tensor& dbias) {
  TORCH_CHECK(h.is_cuda() && h.dim() == 2 && h.numel() > 0, "layer_norm_bwd: h must be a non-empty 2-D CUDA tensor");
  check_rows(h, h, "h");
  check_rows(dy, h, "dy");
  const int64_t M = h.size(0), N = h.size(1);
  const DType xd = dtype_of(dy, "dy"), hd = dtype_of(h, "h");
  const DType wd = check_params(weight, bias, dy, N);
  TORCH_CHECK(layer_norm_dtypes_ok(xd, hd, wd), "layer_norm_bwd (cuda): unsupported dtypes: dy ", dy.scalar_type(),
              ", h ", h.scalar_type());
  const at::ScalarType acc = acc_scalar_type(h.scalar_type());
  check_out(rstd, h, acc, {M}, "rstd");
  if (!rms) check_out(mean, h, acc, {M}, "mean");
  if (dh.has_value()) {
    check_rows(*dh, h, "dh");
    check_dtype(*dh, h.scalar_type(), "dh");
  }
  check_out(dx, h, h.scalar_type(), h.sizes(), "dx");
  const bool need_dw = weight.has_value(), need_db = bias.has_value();
  if (need_dw) check_out(dweight, h, weight->scalar_type(), {N}, "dweight");
  if (need_db) check_out(dbias, h, bias->scalar_type(), {N}, "dbias");
  c10::cuda::CUDAGuard guard(h.device());
  const int64_t n_part = layer_norm_bwd_partials(M, N, xd, hd, wd, need_dw, need_db);
  at::Tensor part = n_part > 0 ? at::empty({n_part}, h.options().dtype(acc)) : at::Tensor();
  LayerNormBwd a{dy.data_ptr(), h.data_ptr(), need_dw ? weight->data_ptr() : nullptr, rms ? nullptr : mean.data_ptr(),
                 rstd.data_ptr(), dh.has_value() ? dh->data_ptr() : nullptr, dx.data_ptr(),
                 need_dw ? dweight.data_ptr() : nullptr, need_db ? dbias.data_ptr() : nullptr,
                 part.defined() ? part.data_ptr() : nullptr, n_part, M, N, row_stride(dy), row_stride(h),
                 dh.has_value() ? row_stride(*dh) : 0, rms, xd, hd, wd};
  C10_CUDA_CHECK(layer_norm_bwd(a, stream_of(h)));
}

}  // namespace
}  // namespace cuda
}  // namespace fusedstab

TORCH_LIBRARY_IMPL(fusedstab_C, CUDA, m) {
  m.impl("layer_norm_fwd", &fusedstab::cuda::fwd);
  m.impl("layer_norm_bwd", &fusedstab::cuda::bwd);
}
