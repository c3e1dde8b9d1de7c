// GroupNorm: the torch glue of the CUDA kernels (argument checks, the current stream,
// TORCH_LIBRARY_IMPL). The public op (fusedstab/ops/group_norm.py) allocated the outputs; the
// per-split partials are scratch.
#include "cuda/channel_norm_glue.h"
#include "cuda/group_norm.h"

namespace fusedstab {
namespace cuda {
namespace {

// x (N, C, S) and num_groups: the channels-last choice (dense NCHW wherever x is).
bool check_groups(const at::Tensor& x, int64_t G, const char* op) {
  const bool cl = check_x(x, false, op);
  TORCH_CHECK(G > 0 && x.size(1) % G == 0, op, ": num_groups ", G, " must divide the ", x.size(1), " channels");
  return cl;
}

void fwd(const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
         int64_t G, double eps, c10::string_view activation, double slope, const at::Tensor& y,
         const at::Tensor& mean, const at::Tensor& rstd) {
  const bool cl = check_groups(x, G, "group_norm_fwd");
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  const bool w32 = check_param(weight, x, "weight"), b32 = check_param(bias, x, "bias");
  check_like(y, x, cl, "y");
  check_acc(mean, x, {N, G}, "mean");
  check_acc(rstd, x, {N, G}, "rstd");
  const int act = activation_code(activation);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor ws = workspace(x, group_norm_fwd_workspace(N, C, S, G, cl));
  GroupNormFwd a{x.data_ptr(), ptr(weight), ptr(bias), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                 ws.data_ptr(), ws.numel(), N, C, S, G, cl, eps, act, slope, dtype_of(x, "x"), w32, b32};
  C10_CUDA_CHECK(group_norm_fwd(a, stream_of(x)));
}

void bwd(const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
         const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t G,
         c10::string_view activation, double slope, const at::Tensor& dx, const at::Tensor& dweight,
         const at::Tensor& dbias) {
  const bool cl = check_groups(x, G, "group_norm_bwd");
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  const bool w32 = check_param(weight, x, "weight"), b32 = check_param(bias, x, "bias");
  check_like(dy, x, cl, "dy");
  check_like(dx, x, cl, "dx");
  check_acc(mean, x, {N, G}, "mean");
  check_acc(rstd, x, {N, G}, "rstd");
  if (weight.has_value()) check_acc(dweight, x, {C}, "dweight");  // else (0,): not written
  if (bias.has_value()) check_acc(dbias, x, {C}, "dbias");
  const int act = activation_code(activation);
  c10::cuda::CUDAGuard guard(x.device());
  const DType xd = dtype_of(x, "x");
  const at::Tensor ws = workspace(x, group_norm_bwd_workspace(N, C, S, G, cl, xd));
  GroupNormBwd a{dy.data_ptr(), x.data_ptr(), ptr(weight), ptr(bias), mean.data_ptr(), rstd.data_ptr(),
                 dx.data_ptr(), weight.has_value() ? dweight.data_ptr() : nullptr,
                 bias.has_value() ? dbias.data_ptr() : nullptr, ws.data_ptr(), ws.numel(), N, C, S, G, cl, act,
                 slope, xd, w32, b32};
  C10_CUDA_CHECK(group_norm_bwd(a, stream_of(x)));
}

}  // namespace
}  // namespace cuda
}  // namespace fusedstab

TORCH_LIBRARY_IMPL(fusedstab_C, CUDA, m) {
  m.impl("group_norm_fwd", &fusedstab::cuda::fwd);
  m.impl("group_norm_bwd", &fusedstab::cuda::bwd);
}
