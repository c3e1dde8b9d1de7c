// The torch-free interface between the CUDA launchers (csrc/cuda/<op>.cu, compiled by plain nvcc)
// and their torch glue (csrc/cuda/<op>_glue.cpp, compiled by the host compiler): dtype codes, and the
// convention that a launcher takes raw pointers, sizes, strides and a cudaStream_t and returns the
// cudaError_t of its launches (the glue turns it into a torch error with C10_CUDA_CHECK).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fusedstab {
namespace cuda {

// The float dtypes the kernels take (the glue maps at::ScalarType onto these).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

inline int dtype_size(DType d) { return d == DType::F64 ? 8 : d == DType::F32 ? 4 : 2; }
inline bool is_16bit(DType d) { return d == DType::F16 || d == DType::BF16; }

// Multiprocessors of the current device (cached per device; sizes persistent grids).
int sm_count();

}  // namespace cuda
}  // namespace fusedstab
