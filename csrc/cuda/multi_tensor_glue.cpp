// Multi-tensor norm and scale: the torch glue of the CUDA kernels. No host sync: the addresses and
// sizes go into kernel parameters, the coefficient is read on the device, the chunk partials are
// scratch from the caching allocator (CUDA-graph capturable).
#include <algorithm>
#include <vector>

#include "cuda/glue.h"
#include "cuda/multi_tensor.h"

namespace fusedstab {
namespace cuda {
namespace {

// Dense tensors of one float dtype on one CUDA device (elements fill [data_ptr, data_ptr + numel)).
DType check_list(at::TensorList tensors, const char* op) {
  TORCH_CHECK(!tensors.empty(), op, ": expected at least one tensor");
  const at::Tensor& t0 = tensors[0];
  TORCH_CHECK(t0.is_cuda(), op, ": expected CUDA tensors, got one on ", t0.device());
  const DType dt = dtype_of(t0, op);
  for (const at::Tensor& t : tensors) {
    check_device(t, t0, op);
    TORCH_CHECK(t.scalar_type() == t0.scalar_type(), op, ": expected every tensor of dtype ", t0.scalar_type(),
                ", got ", t.scalar_type());
    TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": expected dense tensors (no gaps, no overlap)");
  }
  TORCH_CHECK(tensors.size() < (size_t(1) << 31), op, ": too many tensors");
  return dt;
}

void norm(at::TensorList tensors, double norm_type, const at::Tensor& out) {
  const DType dt = check_list(tensors, "multi_tensor_norm");
  const int n = int(tensors.size());
  check_device(out, tensors[0], "out");
  check_dtype(out, acc_scalar_type(tensors[0].scalar_type()), "out");
  check_contiguous(out, "out");
  check_shape(out, {int64_t(n)}, "out");
  std::vector<const void*> addr(n);
  std::vector<int64_t> numel(n);
  for (int i = 0; i < n; ++i) addr[i] = tensors[i].data_ptr(), numel[i] = tensors[i].numel();
  c10::cuda::CUDAGuard guard(out.device());
  at::Tensor partial = at::empty({std::max<int64_t>(mt::total_chunks(numel.data(), n), 1)}, out.options());
  C10_CUDA_CHECK(multi_tensor_norm(addr.data(), numel.data(), n, dt, norm_type, out.data_ptr(), partial.data_ptr(),
                                   stream_of(out)));
}

void scale_(at::TensorList tensors, const at::Tensor& coef, bool zero_nonfinite) {
  const DType dt = check_list(tensors, "multi_tensor_scale_");
  const int n = int(tensors.size());
  check_device(coef, tensors[0], "coef");
  TORCH_CHECK(coef.numel() == 1, "multi_tensor_scale_: coef must have one element, got ", coef.numel());
  dtype_of(coef, "coef");
  // The coefficient in the accumulation dtype, on the device (a device-side cast: no sync).
  const at::Tensor c = coef.to(acc_scalar_type(tensors[0].scalar_type())).contiguous();
  std::vector<void*> addr(n);
  std::vector<int64_t> numel(n);
  for (int i = 0; i < n; ++i) addr[i] = tensors[i].data_ptr(), numel[i] = tensors[i].numel();
  c10::cuda::CUDAGuard guard(coef.device());
  C10_CUDA_CHECK(multi_tensor_scale(addr.data(), numel.data(), n, dt, c.data_ptr(), zero_nonfinite, stream_of(c)));
}

}  // namespace
}  // namespace cuda
}  // namespace fusedstab

TORCH_LIBRARY_IMPL(fusedstab_C, CUDA, m) {
  m.impl("multi_tensor_norm", &fusedstab::cuda::norm);
  m.impl("multi_tensor_scale_", &fusedstab::cuda::scale_);
}
