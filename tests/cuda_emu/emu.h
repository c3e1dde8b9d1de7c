// A CPU emulator of the little of CUDA that the channel-norm kernels use, so that the real kernels and
// launchers (csrc/cuda/kernels/channel_norm.cuh, csrc/cuda/group_norm.cu, batch_norm.cu) run on a
// machine without a GPU (tests/test_cuda_channel_norm_emu.py). Compiled by the host compiler with
// tests/cuda_emu/include first on the include path (its cuda_*.h shims include this file).
//
// A launch runs its blocks one after another; a block's threads are fibers (ucontext) switched at
// every __syncthreads and warp shuffle, so barriers and shuffles behave as on the GPU: a barrier
// waits for every thread of the block (or warp) that has not exited, and a barrier that cannot be
// reached by all (a deadlock on the GPU) aborts with a message. Shared memory (`__shared__` is
// `static`) is one copy per kernel instantiation, valid because blocks run one at a time.
// fp16 / bf16 are stored as their bits and converted with round-to-nearest-even.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __CUDA_NO_HALF_CONVERSIONS__ 1

// ---------------------------------------------------------------------------- runtime API
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace emu {

inline cudaError_t last_error = cudaSuccess;

constexpr int kMaxThreads = 1024;
constexpr size_t kStack = 256 * 1024;

enum State { kRun, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  State state = kRun;
};

struct Block {
  unsigned threads = 0;
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  ucontext_t sched;
  int cur = -1;
  std::function<void()> body;
  uint64_t slots[kMaxThreads];  // warp shuffle exchange, by thread
};

inline Block& block() {
  static Block b;
  return b;
}
inline uint3 block_idx{0, 0, 0}, block_dim{1, 1, 1}, grid_dim{1, 1, 1};

inline uint3 thread_idx() { return {unsigned(block().cur), 0, 0}; }

inline void yield(State s) {
  Block& b = block();
  Fiber& f = b.fibers[b.cur];
  f.state = s;
  swapcontext(&f.ctx, &b.sched);
}

inline void fiber_main() {
  Block& b = block();
  b.body();
  b.fibers[b.cur].state = kDone;
  swapcontext(&b.fibers[b.cur].ctx, &b.sched);
}

// Runs body() as `threads` threads of one block until all have returned.
inline void run_block(unsigned threads, const std::function<void()>& body) {
  Block& b = block();
  if (threads > unsigned(kMaxThreads)) {
    std::fprintf(stderr, "emu: %u threads a block\n", threads);
    std::abort();
  }
  b.threads = threads;
  b.body = body;
  b.fibers.assign(threads, Fiber{});
  if (b.stacks.size() < threads) b.stacks.resize(threads);
  for (unsigned t = 0; t < threads; ++t) {
    if (b.stacks[t].empty()) b.stacks[t].resize(kStack);
    getcontext(&b.fibers[t].ctx);
    b.fibers[t].ctx.uc_stack.ss_sp = b.stacks[t].data();
    b.fibers[t].ctx.uc_stack.ss_size = kStack;
    b.fibers[t].ctx.uc_link = nullptr;
    makecontext(&b.fibers[t].ctx, fiber_main, 0);
  }
  for (;;) {
    for (unsigned t = 0; t < threads; ++t) {
      if (b.fibers[t].state != kRun) continue;
      b.cur = int(t);
      swapcontext(&b.sched, &b.fibers[t].ctx);
    }
    // Every thread waits at a barrier or has returned: release what can be released.
    bool any_live = false, all_block = true, released = false;
    for (unsigned t = 0; t < threads; ++t) {
      if (b.fibers[t].state == kDone) continue;
      any_live = true;
      all_block = all_block && b.fibers[t].state == kAtBlockBarrier;
    }
    if (!any_live) break;
    if (all_block) {
      for (auto& f : b.fibers)
        if (f.state == kAtBlockBarrier) f.state = kRun;
      continue;
    }
    for (unsigned w = 0; w * 32 < threads; ++w) {
      bool live = false, all_warp = true;
      for (unsigned t = w * 32; t < threads && t < w * 32 + 32; ++t) {
        if (b.fibers[t].state == kDone) continue;
        live = true;
        all_warp = all_warp && b.fibers[t].state == kAtWarpBarrier;
      }
      if (live && all_warp) {
        for (unsigned t = w * 32; t < threads && t < w * 32 + 32; ++t)
          if (b.fibers[t].state == kAtWarpBarrier) b.fibers[t].state = kRun;
        released = true;
      }
    }
    if (!released) {
      std::fprintf(stderr, "emu: deadlock in block %u: threads wait at different barriers\n", block_idx.x);
      std::abort();
    }
  }
  b.cur = -1;
}

// kernel<<<grid, block, smem, stream>>>(args...) becomes emu::Launch(grid, block, smem, stream).run(kernel, args...)
struct Launch {
  dim3 grid, blk;
  Launch(dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr) : grid(g), blk(b) {}
  template <typename K, typename... Args> void run(K kernel, Args... args) {
    if (grid.y != 1 || grid.z != 1 || blk.y != 1 || blk.z != 1 || grid.x == 0 || blk.x == 0 ||
        blk.x > unsigned(kMaxThreads)) {
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    grid_dim = {grid.x, 1, 1};
    block_dim = {blk.x, 1, 1};
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      block_idx = {bx, 0, 0};
      run_block(blk.x, [&] { kernel(args...); });
    }
  }
};

template <typename V> V shfl(V v, int src) {
  static_assert(sizeof(V) <= 8, "shuffle of at most 8 bytes");
  Block& b = block();
  const int me = b.cur, base = me - me % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  b.slots[me] = bits;
  yield(kAtWarpBarrier);
  V r = v;
  if (src >= 0 && src < 32 && base + src < int(b.threads)) std::memcpy(&r, &b.slots[base + src], sizeof(V));
  yield(kAtWarpBarrier);
  return r;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { emu::yield(emu::kAtBlockBarrier); }
template <typename V> V __shfl_down_sync(unsigned, V v, int delta, int width = 32) {
  const int lane = emu::block().cur % 32, seg = lane - lane % width;
  return emu::shfl(v, lane + delta < seg + width ? lane + delta : lane);
}
template <typename V> V __shfl_xor_sync(unsigned, V v, int mask, int width = 32) {
  const int lane = emu::block().cur % 32, seg = lane - lane % width;
  const int src = lane ^ mask;
  return emu::shfl(v, src >= seg && src < seg + width ? src : lane);
}

inline cudaError_t cudaGetLastError() {
  cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = 2;
  return cudaSuccess;
}

// ---------------------------------------------------------------------------- math
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float v) { return std::exp(v); }
inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }
inline float __double2float_rn(double v) { return float(v); }
using std::exp;
using std::sqrt;

// ---------------------------------------------------------------------------- fp16 / bf16
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace emu {
inline uint32_t fbits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bitsf(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace emu

inline float __bfloat162float(__nv_bfloat16 h) { return emu::bitsf(uint32_t(h.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = emu::fbits(f);
  if (std::isnan(f)) return {uint16_t((u >> 16) | 0x40)};
  return {uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16)};
}
inline __nv_bfloat16 __double2bfloat16(double d) { return __float2bfloat16_rn(float(d)); }  // unused: fp64 acc is fp64 x only

inline float __half2float(__half h) {
  const uint32_t s = uint32_t(h.bits & 0x8000) << 16, e = (h.bits >> 10) & 0x1f, m = h.bits & 0x3ff;
  if (e == 0x1f) return emu::bitsf(s | 0x7f800000 | (m << 13));
  if (e == 0) return (s ? -1.f : 1.f) * std::ldexp(float(m), -24);
  return emu::bitsf(s | ((e + 112) << 23) | (m << 13));
}
inline __half __float2half_rn(float f) {
  const uint32_t u = emu::fbits(f), s = (u >> 16) & 0x8000;
  const float a = std::fabs(f);
  if (std::isnan(f)) return {uint16_t(s | 0x7e00)};
  if (a >= 65520.f) return {uint16_t(s | 0x7c00)};
  if (a < std::ldexp(1.f, -14)) {  // subnormal: multiples of 2^-24, rounded to nearest even
    return {uint16_t(s | uint32_t(std::nearbyint(std::ldexp(a, 24))))};
  }
  const uint32_t v = emu::fbits(a), e = (v >> 23) - 112, m = v & 0x7fffff;
  uint32_t h = (e << 10) | (m >> 13);
  const uint32_t rest = m & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;
  return {uint16_t(s | h)};
}
inline __half __double2half(double d) { return __float2half_rn(float(d)); }  // unused, as above
