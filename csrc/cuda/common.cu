// Host helpers of the CUDA launchers (torch-free).
#include "cuda/launch.h"

namespace fusedstab {
namespace cuda {

int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) {
    (void)cudaGetLastError();  // not sticky: leave no error for the launch check to find
    return 132;
  }
  if (dev < 64 && cached[dev]) return cached[dev];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    n = 132;  // an H100's: sizes grids only
  }
  if (dev < 64) cached[dev] = n;
  return n;
}

}  // namespace cuda
}  // namespace fusedstab
