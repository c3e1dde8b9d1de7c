// Multi-tensor norm and scale launchers: the launch plan (multi_tensor.h), the parameter structs and
// the dtype dispatch (torch-free; nvcc only).
#include <type_traits>

#include "cuda/kernels/multi_tensor.cuh"

namespace fusedstab {
namespace cuda {
namespace {

using mt::kThreads;

template <int CAP> mt::TensorList<CAP> list_of(const void* const* addr, const int64_t* numel, const mt::Launch& l) {
  mt::TensorList<CAP> tl{};
  tl.n = l.count;
  int64_t end = 0;
  for (int i = 0; i < l.count; ++i) {
    tl.addr[i] = addr[l.first + i];
    tl.numel[i] = numel[l.first + i];
    end += mt::chunks_of(numel[l.first + i]);
    tl.chunk_end[i] = int32_t(end);
  }
  return tl;
}

template <typename T, int CAP>
cudaError_t norm_launch(const void* const* addr, const int64_t* numel, const mt::Launch& l, int kind, double p,
                        acc_t<T>* out, acc_t<T>* partial, cudaStream_t stream) {
  using A = acc_t<T>;
  const auto tl = list_of<CAP>(addr, numel, l);
  A* part = partial + l.chunk_base;
  if (l.chunks > 0) {
    if (kind == mt::kSquare)
      mt::norm_chunks_kernel<T, mt::kSquare, CAP><<<unsigned(l.chunks), kThreads, 0, stream>>>(tl, part, kind, A(p));
    else
      mt::norm_chunks_kernel<T, -1, CAP><<<unsigned(l.chunks), kThreads, 0, stream>>>(tl, part, kind, A(p));
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  mt::norm_tensors_kernel<A, CAP><<<unsigned(l.count), kThreads, 0, stream>>>(tl, part, out + l.first, kind);
  return cudaGetLastError();
}

template <typename T, int CAP>
cudaError_t scale_launch(void* const* addr, const int64_t* numel, const mt::Launch& l, const void* coef,
                         bool zero_nonfinite, cudaStream_t stream) {
  if (l.chunks == 0) return cudaSuccess;
  const auto tl = list_of<CAP>(addr, numel, l);
  mt::scale_chunks_kernel<T, CAP><<<unsigned(l.chunks), kThreads, 0, stream>>>(
      tl, static_cast<const acc_t<T>*>(coef), zero_nonfinite);
  return cudaGetLastError();
}

// Small lists take the small parameter struct; longer ones launches of up to kBigCap tensors.
template <typename F> cudaError_t for_launches(const int64_t* numel, int n, F&& f) {
  const int cap = n <= mt::kSmallCap ? mt::kSmallCap : mt::kBigCap;
  for (const mt::Launch& l : mt::plan(numel, n, cap)) {
    if (l.chunks >= (int64_t(1) << 31)) return cudaErrorInvalidValue;  // one tensor of > 2^46 elements
    cudaError_t err = cap == mt::kSmallCap ? f(l, std::integral_constant<int, mt::kSmallCap>{})
                                           : f(l, std::integral_constant<int, mt::kBigCap>{});
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t multi_tensor_norm(const void* const* addr, const int64_t* numel, int n, DType dtype, double norm_type,
                              void* out, void* partial, cudaStream_t stream) {
  const int kind = mt::reduce_kind(norm_type);
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = std::decay_t<decltype(tag)>;
    using A = acc_t<T>;
    return for_launches(numel, n, [&](const mt::Launch& l, auto cap) -> cudaError_t {
      return norm_launch<T, decltype(cap)::value>(addr, numel, l, kind, norm_type, static_cast<A*>(out),
                                                   static_cast<A*>(partial), stream);
    });
  });
}

cudaError_t multi_tensor_scale(void* const* addr, const int64_t* numel, int n, DType dtype, const void* coef,
                               bool zero_nonfinite, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = std::decay_t<decltype(tag)>;
    return for_launches(numel, n, [&](const mt::Launch& l, auto cap) -> cudaError_t {
      return scale_launch<T, decltype(cap)::value>(addr, numel, l, coef, zero_nonfinite, stream);
    });
  });
}

}  // namespace cuda
}  // namespace fusedstab
