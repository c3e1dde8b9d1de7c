// C entry points over the GroupNorm / BatchNorm launchers (csrc/cuda/group_norm.cu, batch_norm.cu,
// built for the CPU emulator of tests/cuda_emu/emu.h) for tests/test_cuda_channel_norm_emu.py (ctypes):
// host pointers, the workspace the glue would allocate, the launcher's cudaError_t back. What the
// torch glue checks (shapes, dtypes, layouts) is the test's business here.
#include <vector>

#include "cuda/batch_norm.h"
#include "cuda/group_norm.h"
#include "cuda/kernels/channel_norm.cuh"

namespace {
int g_sms = 2;
}

namespace fusedstab {
namespace cuda {
int sm_count() { return g_sms; }
}  // namespace cuda
}  // namespace fusedstab

using namespace fusedstab::cuda;

extern "C" {

void emu_set_sms(int sms) { g_sms = sms; }

void emu_divmod(int64_t a, int64_t b, int64_t* q, int64_t* r) { cn::divmod(a, b, *q, *r); }

int emu_gn_fwd(const void* x, const void* w, const void* b, void* y, void* mean, void* rstd, int64_t N, int64_t C,
               int64_t S, int64_t G, int cl, double eps, int act, double slope, int dtype, int w32, int b32) {
  std::vector<double> ws(size_t(group_norm_fwd_workspace(N, C, S, G, cl)) / 8 + 1);
  GroupNormFwd a{x, w, b, y, mean, rstd, ws.data(), int64_t(ws.size() * 8), N, C, S, G, bool(cl), eps, act, slope,
                 DType(dtype), bool(w32), bool(b32)};
  return int(group_norm_fwd(a, nullptr));
}

int emu_gn_bwd(const void* dy, const void* x, const void* w, const void* b, const void* mean, const void* rstd,
               void* dx, void* dw, void* db, int64_t N, int64_t C, int64_t S, int64_t G, int cl, int act,
               double slope, int dtype, int w32, int b32) {
  std::vector<double> ws(size_t(group_norm_bwd_workspace(N, C, S, G, cl, DType(dtype))) / 8 + 1);
  GroupNormBwd a{dy, x, w, b, mean, rstd, dx, dw, db, ws.data(), int64_t(ws.size() * 8), N, C, S, G, bool(cl), act,
                 slope, DType(dtype), bool(w32), bool(b32)};
  return int(group_norm_bwd(a, nullptr));
}

int emu_bn_stats(const void* x, void* stats, int64_t N, int64_t C, int64_t S, int cl, int dtype) {
  const BatchNormGeometry g{N, C, S, bool(cl), DType(dtype)};
  std::vector<double> ws(size_t(batch_norm_stats_workspace(g)) / 8 + 1);
  return int(batch_norm_stats(BatchNormStats{x, stats, ws.data(), int64_t(ws.size() * 8), g}, nullptr));
}

// step 0: elemt (out y), 1: bwd_reduce (out sums (2, C)), 2: bwd_elemt (out dx; coef may be null)
int emu_bn_step(int step, const void* dy, const void* x, const void* w, const void* b, const void* mean,
                const void* rstd, const void* coef, void* out, int64_t N, int64_t C, int64_t S, int cl, int act,
                double slope, int dtype, int w32, int b32) {
  const BatchNormGeometry g{N, C, S, bool(cl), DType(dtype)};
  std::vector<double> ws(step == 1 ? size_t(batch_norm_bwd_reduce_workspace(g)) / 8 + 1 : 1);
  BatchNormArgs a{dy, x, w, b, mean, rstd, coef, out, ws.data(), int64_t(ws.size() * 8), g, act, slope,
                  bool(w32), bool(b32)};
  return int(step == 0 ? batch_norm_elemt(a, nullptr)
                       : step == 1 ? batch_norm_bwd_reduce(a, nullptr) : batch_norm_bwd_elemt(a, nullptr));
}

}  // extern "C"
