// BatchNorm: the torch glue of the CUDA kernels (argument checks, the current stream,
// TORCH_LIBRARY_IMPL). The public ops (fusedstab/ops/batch_norm.py) allocated the outputs; the
// per-split partials are scratch.
#include "cuda/batch_norm.h"
#include "cuda/channel_norm_glue.h"

namespace fusedstab {
namespace cuda {
namespace {

// x (N, C, S): channels-last wherever x is channels-inner and S == 1 ((N, C) input) or not NCHW.
BatchNormGeometry geometry(const at::Tensor& x, const char* op) {
  const bool cl = check_x(x, x.size(2) == 1, op);
  return {x.size(0), x.size(1), x.size(2), cl, dtype_of(x, "x")};
}

void stats(const at::Tensor& x, const at::Tensor& out) {
  const BatchNormGeometry g = geometry(x, "batch_norm_stats");
  check_acc(out, x, {3, g.C}, "stats");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor ws = workspace(x, batch_norm_stats_workspace(g));
  C10_CUDA_CHECK(batch_norm_stats(BatchNormStats{x.data_ptr(), out.data_ptr(), ws.data_ptr(), ws.numel(), g},
                                  stream_of(x)));
}

// The arguments every other step shares, checked.
BatchNormArgs args(const at::Tensor* dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                   const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
                   c10::string_view activation, double slope, const char* op) {
  const BatchNormGeometry g = geometry(x, op);
  const bool w32 = check_param(weight, x, "weight"), b32 = check_param(bias, x, "bias");
  if (dy != nullptr) check_like(*dy, x, g.channels_last, "dy");
  check_acc(mean, x, {g.C}, "mean");
  check_acc(rstd, x, {g.C}, "rstd");
  return {dy != nullptr ? dy->data_ptr() : nullptr, x.data_ptr(), ptr(weight), ptr(bias), mean.data_ptr(),
          rstd.data_ptr(), nullptr, nullptr, nullptr, 0, g, activation_code(activation), slope, w32, b32};
}

void elemt(const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
           const at::Tensor& mean, const at::Tensor& rstd, c10::string_view activation, double slope,
           const at::Tensor& y) {
  BatchNormArgs a = args(nullptr, x, weight, bias, mean, rstd, activation, slope, "batch_norm_elemt");
  check_like(y, x, a.g.channels_last, "y");
  a.out = y.data_ptr();
  c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(batch_norm_elemt(a, stream_of(x)));
}

void bwd_reduce(const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
                c10::string_view activation, double slope, const at::Tensor& sums) {
  BatchNormArgs a = args(&dy, x, weight, bias, mean, rstd, activation, slope, "batch_norm_bwd_reduce");
  check_acc(sums, x, {2, a.g.C}, "sums");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor ws = workspace(x, batch_norm_bwd_reduce_workspace(a.g));
  a.out = sums.data_ptr(), a.workspace = ws.data_ptr(), a.workspace_bytes = ws.numel();
  C10_CUDA_CHECK(batch_norm_bwd_reduce(a, stream_of(x)));
}

void bwd_elemt(const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
               const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
               const c10::optional<at::Tensor>& coef, c10::string_view activation, double slope, const at::Tensor& dx) {
  BatchNormArgs a = args(&dy, x, weight, bias, mean, rstd, activation, slope, "batch_norm_bwd_elemt");
  check_like(dx, x, a.g.channels_last, "dx");
  if (coef.has_value()) check_acc(*coef, x, {2, a.g.C}, "coef");
  a.coef = ptr(coef), a.out = dx.data_ptr();
  c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(batch_norm_bwd_elemt(a, stream_of(x)));
}

}  // namespace
}  // namespace cuda
}  // namespace fusedstab

TORCH_LIBRARY_IMPL(fusedstab_C, CUDA, m) {
  m.impl("batch_norm_stats", &fusedstab::cuda::stats);
  m.impl("batch_norm_elemt", &fusedstab::cuda::elemt);
  m.impl("batch_norm_bwd_reduce", &fusedstab::cuda::bwd_reduce);
  m.impl("batch_norm_bwd_elemt", &fusedstab::cuda::bwd_elemt);
}
