// The launch plan of the multi-tensor kernels (csrc/cuda/multi_tensor.cu): plain C++, no CUDA header,
// so that the tests compile and check it with the host compiler alone.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace fusedstab {
namespace cuda {
namespace mt {

// Reductions, with the Triton kernels' codes: sum |x|^p, sum x^2, sum |x|, max |x|, min |x|, count x != 0.
enum Reduce : int { kPow = 0, kSquare = 1, kAbs = 2, kMax = 3, kMin = 4, kNonzero = 5 };
inline Reduce reduce_kind(double p) {
  if (p == 2.0) return kSquare;
  if (p == 1.0) return kAbs;
  if (p == 0.0) return kNonzero;
  if (std::isinf(p)) return p > 0 ? kMax : kMin;
  return kPow;
}

// A chunk is what one block reads; a launch takes up to `cap` tensors, all their chunks.
constexpr int64_t kChunk = 32768;
inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

struct Launch {
  int first, count;    // tensors [first, first + count)
  int64_t chunk_base;  // index of the launch's first chunk among all chunks (its partials' offset)
  int64_t chunks;      // chunks of the launch (its grid)
};

// The launches for tensors of these sizes: consecutive tensors, at most `cap` a launch and fewer than
// 2^31 chunks (grid.x's limit). Pure host code (tests compile it with a plain C++ compiler).
inline std::vector<Launch> plan(const int64_t* numel, int n, int cap) {
  std::vector<Launch> out;
  int64_t base = 0;
  for (int i = 0; i < n;) {
    Launch l{i, 0, base, 0};
    while (i < n && l.count < cap && l.chunks + chunks_of(numel[i]) < (int64_t(1) << 31)) {
      l.chunks += chunks_of(numel[i]);
      ++l.count;
      ++i;
    }
    if (l.count == 0) { l.count = 1; l.chunks = chunks_of(numel[i]); ++i; }  // > 2^31 chunks: the launcher refuses
    base += l.chunks;
    out.push_back(l);
  }
  return out;
}

inline int64_t total_chunks(const int64_t* numel, int n) {
  int64_t c = 0;
  for (int i = 0; i < n; ++i) c += chunks_of(numel[i]);
  return c;
}

}  // namespace mt
}  // namespace cuda
}  // namespace fusedstab
