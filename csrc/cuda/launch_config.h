// Launch configurations of the row kernels (LayerNorm family, bias + Leaky ReLU): plain C++, no CUDA
// header, so that the tests compile and check them with the host compiler alone
// (tests/cuda_host/host_main.cpp).
#pragma once

#include <algorithm>
#include <cstdint>

namespace fusedstab {
namespace cuda {
namespace cfg {

constexpr int kGroup = 8;  // columns a thread takes at a time (kernels/common.cuh's kGroup)
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// LayerNorm: a row belongs to `tpr` threads (a power of two), each holding `groups` groups of 8
// columns in registers (columns 8 * (tx + j * tpr) + k); `threads` per block (a multiple of tpr:
// threads / tpr rows a block). Rows past max_tpr x max_groups x 8 elements: the long kernels, a block
// of kLongThreads per row.
constexpr int kMaxTpr = 512, kLongThreads = 512;
struct RowCfg {
  bool long_rows;
  int tpr, groups, threads;
};

inline RowCfg row_config(int64_t N, int max_groups, int max_tpr, int min_threads) {
  const int64_t n8 = cdiv(N, kGroup);
  if (n8 > int64_t(max_tpr) * max_groups) return {true, kLongThreads, 1, kLongThreads};
  int tpr = 1;
  while (tpr < cdiv(n8, max_groups)) tpr *= 2;
  int groups = 1;
  while (groups * tpr < n8) groups *= 2;
  return {false, tpr, groups, std::max(tpr, min_threads)};
}

// bias + Leaky ReLU: blocks of kBlrThreads = bx threads across a row (its 8-column groups, a power of
// two <= 32, so that a row's threads share a warp) x by rows; grid: `tiles` column tiles x `slices`
// row slices that stride over the rows, enough to give each SM `per_sm` blocks, at most one per `by`
// rows and 65535 (grid.y's limit).
constexpr int kBlrThreads = 256;
struct BlrGrid {
  int bx, by;
  int64_t tiles, slices;
};

inline BlrGrid blr_grid(int64_t R, int64_t L, int per_sm, int sms) {
  const int64_t L8 = cdiv(L, kGroup);
  int bx = 1;
  while (bx < 32 && bx < L8) bx *= 2;
  BlrGrid g{bx, kBlrThreads / bx, cdiv(L8, bx), 1};
  const int64_t want = cdiv(int64_t(per_sm) * sms, g.tiles);
  g.slices = std::max<int64_t>(1, std::min<int64_t>({want, cdiv(R, g.by), 65535}));
  return g;
}

}  // namespace cfg
}  // namespace cuda
}  // namespace fusedstab
