// Launch plans of the GroupNorm / BatchNorm kernels (csrc/cuda/kernels/channel_norm.cuh): plain C++,
// no CUDA header, so that tests/test_cuda_build.py compiles and checks them with the host compiler
// (tests/cuda_host/host_main.cpp).
//
// x is (N, C, S) in one of two layouts, and every kernel sees it as a matrix of rows:
// - NCHW: rows of S contiguous elements, one per (sample, channel) (GroupNorm's statistics: rows of
//   C/G * S, one per group). A block tile is `by` rows x `bx` threads x 8 elements (bx a power of two
//   up to 32: a row's lanes share a warp; by = 256 / bx), so that short rows (7x7 maps) still fill a
//   block and long ones are read 512 bytes a warp.
// - channels-last: rows of C channels at N * S positions; a thread owns 8 channels of a tile's row.
// Work items (one block each, the grid striding over them when there are more than 2^31 - 1):
// - rows plan (per-row results or elementwise): item (row tile, j) takes column tiles j, j + J, ...;
// - slab plan (BatchNorm NCHW statistics: a channel's N x S slab): item (channel, j) takes tiles
//   j, j + J, ... of the slab's row tiles x column tiles;
// - columns plan (channels-last): item (segment, channel block, j) takes the segment's row tiles
//   j, j + J, ... (a segment: a sample for GroupNorm's statistics, all N * S rows otherwise).
// J is chosen to give the GPU kPerSm blocks per SM, never more than there are tiles. The reductions
// write one partial per (output, j), combined afterwards in a fixed order: deterministic. The
// channels-last reductions write a partial per channel and split, so they aim at the blocks that are
// resident at once (kColReducePerSm) rather than more: fewer partials for the same parallelism (a
// batch-1 128-channel map: 264 splits on an H100, partials 5% of a bf16 input, not 20%).
#pragma once

#include <algorithm>
#include <cstdint>

namespace fusedstab {
namespace cuda {
namespace cn {

constexpr int kThreads = 256;  // every kernel's block
constexpr int kUnit = 8;       // consecutive elements a thread takes at a time (kernels/common.cuh's kGroup)
constexpr int kPerSm = 8;      // blocks per SM the grids aim for
constexpr int kColReducePerSm = 2;  // blocks per SM the channels-last reductions aim for
constexpr int64_t kMaxGrid = 2147483647;  // grid.x

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Tile {
  int bx, by;  // threads across a row (8 elements each), rows
};

// The tile for rows of `len` elements: the fewest lanes (a power of two <= 32) that cover a row.
inline Tile tile_for(int64_t len) {
  int bx = 1;
  while (bx < 32 && int64_t(bx) * kUnit < len) bx *= 2;
  return {bx, kThreads / bx};
}

struct Plan {
  Tile t;
  int64_t rt, ct;  // row tiles, column tiles (columns plan: channel blocks)
  int64_t J;       // splits of each output's tiles
  int64_t items;   // work items (blocks, the grid striding over them past kMaxGrid)
};

inline int64_t target_blocks(int sms, int per_sm = kPerSm) { return int64_t(per_sm) * std::max(sms, 1); }

// An (R x L) matrix, per-row results or elementwise: item (row tile, j), column tiles j, j + J, ...
inline Plan rows_plan(int64_t R, int64_t L, int sms) {
  const Tile t = tile_for(L);
  const int64_t rt = cdiv(R, t.by), ct = cdiv(L, int64_t(t.bx) * kUnit);
  const int64_t J = std::clamp<int64_t>(cdiv(target_blocks(sms), rt), 1, ct);
  return {t, rt, ct, J, rt * J};
}

// K slabs of N rows x S columns (BatchNorm NCHW: a channel's rows at every sample): item (slab, j),
// tiles j, j + J, ... of the slab's rt x ct.
inline Plan slab_plan(int64_t K, int64_t N, int64_t S, int sms) {
  const Tile t = tile_for(S);
  const int64_t rt = cdiv(N, t.by), ct = cdiv(S, int64_t(t.bx) * kUnit);
  const int64_t J = std::clamp<int64_t>(cdiv(target_blocks(sms), K), 1, rt * ct);
  return {t, rt, ct, J, K * J};
}

// nseg segments of `rows` rows of C channels (channels-last): item (segment, channel block, j), the
// segment's row tiles j, j + J, ...; ct is the number of channel blocks (bx x 8 channels each).
inline Plan cols_plan(int64_t nseg, int64_t rows, int64_t C, int sms, int per_sm = kPerSm) {
  const Tile t = tile_for(C);
  const int64_t cb = cdiv(C, int64_t(t.bx) * kUnit), rt = cdiv(rows, t.by);
  const int64_t J = std::clamp<int64_t>(cdiv(target_blocks(sms, per_sm), nseg * cb), 1, rt);
  return {t, rt, cb, J, nseg * cb * J};
}

inline int64_t grid_of(const Plan& p) { return std::min(p.items, kMaxGrid); }

// ---------------------------------------------------------------------------- per op
// The statistics records are float64 (count, mean, M2) triplets (24 bytes); the backward sums two
// arrays (dz, dz * xhat) of the accumulation type (acc_bytes: 4, or 8 for fp64).

// GroupNorm statistics: NCHW rows of a group's C/G * S values (N * G rows), records per (group,
// split); channels-last per (sample, split, channel), the samples as segments.
inline Plan gn_stats_plan(int64_t N, int64_t C, int64_t S, int64_t G, bool cl, int sms) {
  return cl ? cols_plan(N, S, C, sms, kColReducePerSm) : rows_plan(N * G, C / G * S, sms);
}
inline int64_t gn_fwd_workspace(int64_t N, int64_t C, int64_t S, int64_t G, bool cl, int sms) {
  const Plan p = gn_stats_plan(N, C, S, G, cl, sms);
  return 24 * N * p.J * (cl ? C : G);
}
// GroupNorm backward sums per (sample, split, channel): NCHW rows of S (N * C rows), channels-last
// the samples as segments; then the (N * G, 2) group coefficients.
inline Plan gn_bwd_plan(int64_t N, int64_t C, int64_t S, bool cl, int sms) {
  return cl ? cols_plan(N, S, C, sms, kColReducePerSm) : rows_plan(N * C, S, sms);
}
inline int64_t gn_bwd_workspace(int64_t N, int64_t C, int64_t S, int64_t G, bool cl, int acc_bytes, int sms) {
  const Plan p = gn_bwd_plan(N, C, S, cl, sms);
  return int64_t(acc_bytes) * (2 * N * p.J * C + 2 * N * G);
}
// BatchNorm statistics and backward sums per (split, channel): NCHW a channel's slab, channels-last
// all N * S rows as one segment.
inline Plan bn_plan(int64_t N, int64_t C, int64_t S, bool cl, int sms) {
  return cl ? cols_plan(1, N * S, C, sms, kColReducePerSm) : slab_plan(C, N, S, sms);
}
inline int64_t bn_stats_workspace(int64_t N, int64_t C, int64_t S, bool cl, int sms) {
  return 24 * bn_plan(N, C, S, cl, sms).J * C;
}
inline int64_t bn_bwd_workspace(int64_t N, int64_t C, int64_t S, bool cl, int acc_bytes, int sms) {
  return int64_t(acc_bytes) * 2 * bn_plan(N, C, S, cl, sms).J * C;
}
// Elementwise passes: NCHW rows of S; channels-last as the statistics (GroupNorm's coefficients
// depend on the sample: one per segment).
inline Plan elem_plan(int64_t N, int64_t C, int64_t S, bool cl, bool per_sample, int sms) {
  return cl ? cols_plan(per_sample ? N : 1, per_sample ? S : N * S, C, sms) : rows_plan(N * C, S, sms);
}

}  // namespace cn
}  // namespace cuda
}  // namespace fusedstab
